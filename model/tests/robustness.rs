//! Model files are outside input: whatever bytes a config or checkpoint holds, loading returns an
//! error or a model, never a panic. (Property tests standing in for a fuzzer on stable Rust.)

use std::path::{Path, PathBuf};

use duet_model::{DType, Model, ModelConfig};
use proptest::prelude::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/fixtures/v3-tiny")
}

fn load_catching(dir: &Path) -> std::thread::Result<bool> {
    let dir = dir.to_path_buf();
    std::panic::catch_unwind(move || Model::load(&dir, DType::F32, &|_| {}).is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Corrupt bytes anywhere in the safetensors header (and just after it).
    #[test]
    fn corrupted_checkpoints_never_panic(edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let src = fixture();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        for (at, b) in edits {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        std::fs::write(tmp.path().join("model.safetensors"), &bytes).unwrap();
        prop_assert!(load_catching(tmp.path()).is_ok(), "loading panicked");
    }

    /// Arbitrary numbers in the config's shape fields are rejected or loaded, never a panic
    /// (a zero head count, odd rope dims, more experts per token than experts, ...).
    #[test]
    fn odd_configs_never_panic(field in 0usize..10, value in prop_oneof![Just(0u64), Just(1), Just(3), Just(7), Just(1 << 40), 0u64..64]) {
        let src = fixture();
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        let name = ["hidden_size", "num_attention_heads", "qk_rope_head_dim", "kv_lora_rank", "n_routed_experts",
            "num_experts_per_tok", "n_group", "moe_layer_freq", "max_position_embeddings", "num_hidden_layers"][field];
        cfg[name] = serde_json::json!(value);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(src.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        let path = tmp.path().join("config.json");
        prop_assert!(std::panic::catch_unwind(move || ModelConfig::from_file(&path).is_ok()).is_ok());
        prop_assert!(load_catching(tmp.path()).is_ok(), "loading panicked with {} = {}", name, value);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The same for Qwen2/Llama configs: odd head counts, head widths, biases switched on, rope
    /// scaling of the wrong kind, a sliding window turned on.
    #[test]
    fn odd_gqa_configs_never_panic(fixture_name in prop_oneof![Just("qwen2-tiny-tied"), Just("llama3-tiny")],
                                   field in 0usize..9,
                                   value in prop_oneof![Just(0u64), Just(1), Just(3), Just(7), Just(1 << 40), 0u64..64]) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/fixtures").join(fixture_name);
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        let name = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "max_position_embeddings", "num_hidden_layers", "attention_bias", "use_sliding_window"][field];
        cfg[name] = match name {
            "attention_bias" | "use_sliding_window" => serde_json::json!(value % 2 == 1),
            _ => serde_json::json!(value),
        };
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(src.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        prop_assert!(load_catching(tmp.path()).is_ok(), "loading panicked with {} = {}", name, value);
    }
}

/// `generate` returns every page it took when it fails (ARCHITECTURE.md's invariant): after an
/// error the same cache serves the next request exactly as a fresh one does.
#[test]
fn generate_returns_its_pages_on_error() {
    use duet_model::generate::{GenerateRequest, generate};
    use duet_model::sampling::SamplingParams;

    let model = Model::load(&fixture(), DType::F32, &|_| {}).unwrap();
    let vocab = model.config.vocab_size as u32;
    let req = |prompt: Vec<u32>, max_tokens: usize| GenerateRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let ok = req((1..40).collect(), 8);
    let mut cache = model.new_cache(3);
    let want = generate(&model, &mut cache, std::slice::from_ref(&ok)).unwrap();
    assert_eq!(cache.pages_free(), 3);
    let failing = [
        // An id outside the vocabulary, in the second of two prompts (the first took pages).
        vec![ok.clone(), req(vec![5, vocab + 3, 7], 4)],
        // Decoding outgrows the pool: 3 pages hold 192 tokens.
        vec![ok.clone(), req((1..100).collect(), 200)],
    ];
    for reqs in failing {
        assert!(generate(&model, &mut cache, &reqs).is_err());
        assert_eq!(cache.pages_free(), 3, "every page came back");
        assert_eq!(
            generate(&model, &mut cache, std::slice::from_ref(&ok)).unwrap(),
            want
        );
    }
}
