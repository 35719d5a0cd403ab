//! The model CLI contracts (`duet logits`, `duet generate`, `duet tiny-model`), driven through the
//! real binary as scripts use it, and the errors a bad model directory gets.

mod common;

use std::path::{Path, PathBuf};

use common::{duet, ok_json};
use duet_model::safetensors_io::{TensorBytes, write};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/fixtures")
        .join(name)
}

#[test]
fn logits_prints_one_row_per_position_matching_hf() {
    let dir = fixture("v3-tiny");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids: Vec<String> = golden["input_ids"].as_array().unwrap()[..5]
        .iter()
        .map(|v| v.to_string())
        .collect();
    let v = ok_json(duet(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        &ids.join(","),
    ]));
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    // HF's logits at the same positions (causal: the first 5 rows do not depend on later ids),
    // held to golden_hf.rs's f32 bound relative to the largest |logit| (`duet logits` computes in
    // f32 by default).
    let reference = &golden["logits"].as_array().unwrap()[..5];
    let scale = reference
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .fold(0.0f64, |m, v| m.max(v.as_f64().unwrap().abs()));
    let mut worst = 0.0f64;
    for (row, reference) in rows.iter().zip(reference) {
        let (row, reference) = (row.as_array().unwrap(), reference.as_array().unwrap());
        assert_eq!(row.len(), 512, "the full vocabulary");
        for (a, b) in row.iter().zip(reference) {
            worst = worst.max((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() / scale);
        }
    }
    assert!(
        worst < LOGITS_REL_TOL,
        "`duet logits` off HF by {worst:e} of the largest |logit| (tolerance {LOGITS_REL_TOL:e})"
    );
}

/// golden_hf.rs's f32 tolerance (measured there: at most 7.4e-7).
const LOGITS_REL_TOL: f64 = 2e-6;

#[test]
fn generate_ids_json_is_hf_greedy_without_a_tokenizer() {
    let dir = fixture("v2-lite-tiny");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids: Vec<String> = golden["greedy_prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let v = ok_json(duet(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        &ids.join(","),
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--dtype",
        "f32",
        "--json",
    ]));
    assert_eq!(v["ids"], golden["greedy_ids"]);
    assert!(v["text"].is_null(), "no tokenizer in this directory");
}

#[test]
fn tiny_model_generates_text_and_same_seed_gives_same_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let out = duet(&[
        "tiny-model",
        "--out",
        dir.to_str().unwrap(),
        "--arch",
        "v2-lite",
        "--seed",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let run = |seed: &str| {
        ok_json(duet(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Why is the sky blue?",
            "--chat",
            "--max-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--json",
        ]))
    };
    let (a, b, c) = (run("7"), run("7"), run("8"));
    assert_eq!(a, b, "same seed, same output");
    assert_eq!(a["ids"].as_array().unwrap().len(), 12);
    assert!(a["text"].as_str().is_some_and(|t| !t.is_empty()));
    assert_ne!(a["ids"], c["ids"], "another seed samples differently");
}

/// Copies `v3-tiny` with its weights rewritten by `edit`.
fn broken_copy(tmp: &Path, edit: impl FnOnce(&mut Vec<TensorBytes>)) -> PathBuf {
    let src = fixture("v3-tiny");
    let dir = tmp.join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<TensorBytes> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| TensorBytes {
            name,
            dtype: match v.dtype() {
                safetensors::Dtype::BF16 => "BF16",
                safetensors::Dtype::F32 => "F32",
                d => panic!("fixture dtype {d:?}"),
            },
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    edit(&mut tensors);
    write(&dir.join("model.safetensors"), &tensors, &[]).unwrap();
    dir
}

fn fails_with(dir: &Path, expected: &[&str]) {
    let out = duet(&["logits", "--model", dir.to_str().unwrap(), "--ids", "1,2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad model must fail");
    assert!(!err.contains("panicked"), "an error, not a panic: {err}");
    for e in expected {
        assert!(err.contains(e), "stderr should mention {e:?}: {err}");
    }
}

#[test]
fn bad_model_directories_fail_with_the_file_and_tensor_named() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.1.mlp.gate.weight";

    let dir = broken_copy(tmp.path(), |t| t.retain(|t| t.name != name));
    fails_with(&dir, &["missing tensor", name]);

    // A layer with its routed experts in neither layout names both.
    let dir = broken_copy(tmp.path(), |t| {
        t.retain(|t| !t.name.starts_with("model.layers.2.mlp.experts."))
    });
    fails_with(
        &dir,
        &[
            "no routed experts",
            "model.layers.2.mlp.experts.0.gate_proj.weight",
            "model.layers.2.mlp.experts.gate_up_proj",
        ],
    );

    let dir = broken_copy(tmp.path(), |t| {
        let x = t.iter_mut().find(|t| t.name == name).unwrap();
        x.shape = vec![x.shape[1], x.shape[0]];
    });
    fails_with(&dir, &["model.safetensors", name, "shape"]);

    let dir = broken_copy(tmp.path(), |t| {
        let x = t.iter_mut().find(|t| t.name == name).unwrap();
        x.dtype = "I16";
    });
    fails_with(&dir, &["model.safetensors", name, "unsupported dtype"]);

    let dir = broken_copy(tmp.path(), |_| {});
    let full = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    fails_with(&dir, &["model.safetensors", "invalid safetensors"]);

    // An architecture duet does not run is named, with the ones it does.
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(fixture("qwen2-tiny").join("config.json")).unwrap())
            .unwrap();
    cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    fails_with(
        &dir,
        &[
            "config.json",
            "MistralForCausalLM",
            "not supported",
            "Qwen2ForCausalLM",
        ],
    );

    std::fs::write(dir.join("config.json"), "{\"hidden_size\": ").unwrap();
    fails_with(&dir, &["config.json", "invalid config"]);

    fails_with(
        &tmp.path().join("does-not-exist"),
        &["does-not-exist", "config.json"],
    );
}

#[test]
fn out_of_vocabulary_ids_are_an_error() {
    let out = duet(&[
        "logits",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--ids",
        "5,512",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token id 512") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn generation_stops_at_the_context_window() {
    // v3-tiny has max_position_embeddings 64: asking for 100 tokens after 3 gives 61, not an error.
    let v = ok_json(duet(&[
        "generate",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--ids",
        "5,6,7",
        "--max-tokens",
        "100",
        "--dtype",
        "f32",
        "--json",
    ]));
    assert_eq!(v["ids"].as_array().unwrap().len(), 61);
    // A prompt longer than the window is an error that says so.
    let ids: Vec<String> = (0..70).map(|i| (i % 500 + 2).to_string()).collect();
    let out = duet(&[
        "generate",
        "--model",
        fixture("v3-tiny").to_str().unwrap(),
        "--ids",
        &ids.join(","),
        "--max-tokens",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_position_embeddings"));
}

#[test]
fn engine_bench_reports_prefill_and_every_decode_batch() {
    let dir = fixture("v3-tiny");
    let v = ok_json(duet(&[
        "engine-bench",
        "--model",
        dir.to_str().unwrap(),
        "--dtype",
        "f32",
        "--prompt-len",
        "32",
        "--batches",
        "1,3",
        "--decode-context",
        "16",
        "--decode-steps",
        "2",
        "--repeats",
        "1",
        "--json",
    ]));
    assert_eq!(v["engine"], "duet");
    assert_eq!(v["dtype"], "F32");
    assert_eq!(v["prefill_tokens"], 32);
    let positive = |x: &Value| x.as_f64().is_some_and(|x| x.is_finite() && x > 0.0);
    assert!(positive(&v["prefill_tok_s"]), "{v}");
    let decode = v["decode"].as_array().unwrap();
    assert_eq!(
        decode
            .iter()
            .map(|d| d["batch"].clone())
            .collect::<Vec<_>>(),
        [1, 3],
        "{v}"
    );
    assert!(decode.iter().all(|d| positive(&d["tok_s"])), "{v}");
    assert!(positive(&v["weights_resident_bytes"]), "{v}");
    assert!(positive(&v["active_weight_bytes_per_token"]), "{v}");
}
