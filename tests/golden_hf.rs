//! The engine against HF transformers' reference (tests/golden/: fixtures and how they were made).
//!
//! Tolerances, a few times above what is measured (the numbers below; each test prints its own):
//! f32 logits within [`LOGITS_REL_TOL`] of HF relative to the largest |logit| (HF's own float64
//! reference carries float32 islands worth ~1e-6); the greedy continuation identical (the
//! absorbed decode path against HF's naive cached path); BF16 logits within
//! [`BF16_LOGITS_REL_TOL`] and the BF16 top-1 token equal to HF's on ≥ 95 % of positions.
//! scripts/test.sh runs this file twice, the second time with `DUET_NO_AVX512=1`, so both BF16
//! kernels (AVX512-BF16, which rounds activations to BF16, and AVX2) are held to these bounds.

use std::path::{Path, PathBuf};

use duet_model::generate::{GenerateRequest, generate};
use duet_model::sampling::SamplingParams;
use duet_model::{AttentionForm, DType, LogitsMode, Model, SeqInput};
use serde::Deserialize;

/// f32, every fixture and form (prefill, chunked prefill, absorbed / GQA decode). Measured worst
/// case: 7.4e-7 (v2-tiny-grouped, prefill form; the others 2.9e-7 to 4.7e-7), the same on the
/// AVX512-BF16 and AVX2 machines' paths (f32 weights never take the BF16 kernel). The README's
/// "matching HF transformers to 2e-6" is this constant.
const LOGITS_REL_TOL: f64 = 2e-6;
/// BF16 weights and KV cache, fixtures stored in BF16, FP8 or F32. Measured worst case: 8.2e-3
/// (v2-lite-tiny, AVX512-BF16 kernel; 6.6e-3 on the AVX2 kernel; v3-tiny 6.0e-3 / 3.3e-3,
/// v3-tiny-fp8 8.0e-3 / 5.8e-3; v3-tiny-fp8-fused 8.8e-3 / 6.6e-3; qwen2-tiny-tied 7.8e-3 / 3.5e-3,
/// qwen2-tiny 7.2e-3 / 5.8e-3, llama3-tiny 7.9e-3 / 6.2e-3). BF16 top-1: 24/24 everywhere except
/// qwen2-tiny on the AVX512-BF16 kernel, 23/24 (a prompt position whose top-2 margin the generator
/// does not control; it checks margins on the greedy steps only).
const BF16_LOGITS_REL_TOL: f64 = 2e-2;
const BF16_TOP1_MIN: f64 = 0.95;

#[derive(Deserialize)]
struct Golden {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f64>>,
    greedy_prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn fixture(name: &str) -> (PathBuf, Golden) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/fixtures")
        .join(name);
    let text = std::fs::read_to_string(dir.join("golden.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

fn load(dir: &Path, dtype: DType) -> Model {
    Model::load(dir, dtype, &|_| {}).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Logits of every position of `ids`, fed in chunks of the given sizes (one forward each).
fn logits_in_chunks(model: &Model, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = model.new_cache(4);
    let mut table = Vec::new();
    cache.ensure(&mut table, ids.len()).unwrap();
    let mut out = Vec::new();
    let mut start = 0;
    for &n in chunks {
        let tokens = &ids[start..start + n];
        let l = model
            .forward(
                &mut cache,
                &[SeqInput {
                    tokens,
                    start_pos: start,
                    block_table: &table,
                }],
                LogitsMode::All,
            )
            .unwrap();
        out.extend(l.to_vec_f32());
        start += n;
    }
    assert_eq!(start, ids.len());
    out
}

fn worst_rel_err(ours: &[f32], reference: &[Vec<f64>]) -> f64 {
    let flat: Vec<f64> = reference.iter().flatten().copied().collect();
    assert_eq!(ours.len(), flat.len());
    let scale = flat.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    ours.iter()
        .zip(&flat)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
        / scale
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

fn argmax64(row: &[f64]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

/// `bf16_top1_min` and `bf16_rel_tol`: BF16_TOP1_MIN and BF16_LOGITS_REL_TOL for checkpoints
/// stored in BF16, FP8 or F32. An F16 checkpoint loses three mantissa bits when its weights are
/// stored as BF16, which flips near-tied group-limited routing decisions (this fixture's smallest
/// expert-score margin is 1.3e-4; measured: 24/24 top-1 and 1.4e-2 on the AVX512-BF16 kernel,
/// 19/24 and 0.97 on the AVX2 kernel), so there only the top-1 bound holds; the f32 path still
/// matches it to LOGITS_REL_TOL, and users of F16 checkpoints should run `--dtype f32`.
fn check_fixture(name: &str) {
    check_fixture_bf16(name, BF16_TOP1_MIN, Some(BF16_LOGITS_REL_TOL))
}

fn check_fixture_bf16(name: &str, bf16_top1_min: f64, bf16_rel_tol: Option<f64>) {
    let (dir, g) = fixture(name);
    let model = load(&dir, DType::F32);

    let ours = logits_in_chunks(&model, &g.input_ids, &[g.input_ids.len()]);
    let err = worst_rel_err(&ours, &g.logits);
    println!("{name}: f32 prefill-form logits, worst error relative to max |logit|: {err:.3e}");
    assert!(
        err < LOGITS_REL_TOL,
        "{name}: f32 logits off by {err:e} (tolerance {LOGITS_REL_TOL:e})"
    );

    // Chunked prefill reads the first chunk back from the paged cache.
    let chunked = logits_in_chunks(&model, &g.input_ids, &[10, 1, 13]);
    let err_chunked = worst_rel_err(&chunked, &g.logits);
    println!("{name}: chunked prefill (10+1+13) worst relative error: {err_chunked:.3e}");
    assert!(
        err_chunked < LOGITS_REL_TOL,
        "{name}: chunked prefill logits off by {err_chunked:e} (tolerance {LOGITS_REL_TOL:e})"
    );

    let mut greedy = GenerateRequest {
        prompt: g.greedy_prompt_ids.clone(),
        max_tokens: g.greedy_ids.len(),
        sampling: SamplingParams::greedy(),
        stop_ids: model.config.eos_ids(),
    };
    let mut cache = model.new_cache(4);
    let out = generate(&model, &mut cache, std::slice::from_ref(&greedy))
        .unwrap()
        .remove(0);
    assert_eq!(
        out, g.greedy_ids,
        "{name}: greedy continuation (absorbed decode) differs from HF"
    );
    assert_eq!(cache.pages_free(), 4, "generation returns its pages");

    // The absorbed (MLA) / decode (GQA) form on the whole prompt equals the prefill form.
    let mut absorbed = load(&dir, DType::F32);
    absorbed.attention_form = AttentionForm::Absorbed;
    let a = logits_in_chunks(&absorbed, &g.input_ids, &[g.input_ids.len()]);
    let err_abs = worst_rel_err(&a, &g.logits);
    println!("{name}: absorbed-form logits worst relative error: {err_abs:.3e}");
    assert!(
        err_abs < LOGITS_REL_TOL,
        "{name}: absorbed-form logits off by {err_abs:e} (tolerance {LOGITS_REL_TOL:e})"
    );

    // BF16 weights and KV cache.
    let bf = load(&dir, DType::BF16);
    let ours = logits_in_chunks(&bf, &g.input_ids, &[g.input_ids.len()]);
    let vocab = bf.config.vocab_size;
    let agree = ours
        .chunks(vocab)
        .zip(&g.logits)
        .filter(|(o, r)| argmax(o) == argmax64(r))
        .count();
    let frac = agree as f64 / g.logits.len() as f64;
    let err_bf16 = worst_rel_err(&ours, &g.logits);
    let kernel = if duet_kernels::cpu::matmul::bf16_weights_round_activations() {
        "AVX512-BF16"
    } else {
        "AVX2"
    };
    println!(
        "{name}: bf16 ({kernel} kernel) top-1 agreement {agree}/{} = {:.1}%, worst relative error {err_bf16:.3e}",
        g.logits.len(),
        frac * 100.0,
    );
    assert!(frac >= bf16_top1_min, "{name}: bf16 top-1 agreement {frac}");
    if let Some(tol) = bf16_rel_tol {
        assert!(
            err_bf16 < tol,
            "{name}: bf16 logits ({kernel} kernel) off by {err_bf16:e} (tolerance {tol:e})"
        );
    }

    // Batching does not change results: the same prompt twice in one batch, plus a shorter one.
    greedy.max_tokens = 6;
    let short = GenerateRequest {
        prompt: g.greedy_prompt_ids[..9].to_vec(),
        ..greedy.clone()
    };
    let mut cache = model.new_cache(8);
    let batch = generate(
        &model,
        &mut cache,
        &[greedy.clone(), short.clone(), greedy.clone()],
    )
    .unwrap();
    assert_eq!(batch[0], g.greedy_ids[..6]);
    assert_eq!(batch[2], g.greedy_ids[..6]);
    let alone = generate(&model, &mut cache, &[short]).unwrap().remove(0);
    assert_eq!(
        batch[1], alone,
        "{name}: a sequence's tokens do not depend on its batch"
    );
}

#[test]
fn v3_tiny_matches_hf() {
    check_fixture("v3-tiny");
}

#[test]
fn v3_tiny_fp8_matches_hf() {
    check_fixture("v3-tiny-fp8");
}

/// transformers 5's fused experts (`mlp.experts.gate_up_proj`/`down_proj`) and its config layout
/// (`rope_parameters`); the same stored values as `v3-tiny`.
#[test]
fn v3_tiny_fused_matches_hf() {
    check_fixture("v3-tiny-fused");
}

/// Fused experts in FP8 with `gate_up_proj_scale_inv` blocks over the fused rows.
#[test]
fn v3_tiny_fp8_fused_matches_hf() {
    check_fixture("v3-tiny-fp8-fused");
}

/// The two layouts of the same weights give bit-identical logits, in f32 and BF16.
#[test]
fn fused_and_per_expert_checkpoints_give_identical_logits() {
    let (per_expert, g) = fixture("v3-tiny");
    let (fused, _) = fixture("v3-tiny-fused");
    for dtype in [DType::F32, DType::BF16] {
        let a = logits_in_chunks(&load(&per_expert, dtype), &g.input_ids, &[24]);
        let b = logits_in_chunks(&load(&fused, dtype), &g.input_ids, &[24]);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{dtype:?}: the fused checkpoint computes other logits"
        );
    }
}

/// Qwen2 (R1-Distill-Qwen): GQA 4/2 with q/k/v biases, tied embeddings, BF16.
#[test]
fn qwen2_tiny_tied_matches_hf() {
    check_fixture("qwen2-tiny-tied");
}

/// Qwen2 with its own lm_head, F32, sharded.
#[test]
fn qwen2_tiny_sharded_matches_hf() {
    check_fixture("qwen2-tiny");
}

/// Llama (R1-Distill-Llama): `llama3` rope scaling from an original context of 32, run past it
/// (40 positions), head_dim 24 ≠ hidden/heads, F16.
#[test]
fn llama3_tiny_matches_hf() {
    check_fixture("llama3-tiny");
}

/// The dense fixtures' config.json as transformers 5 writes it (`rope_parameters` with `rope_type`
/// default or llama3, `layer_types`, `sliding_window: null`; tests/golden/hf5-configs/) loads the
/// same model as the released layout: bit-identical logits.
#[test]
fn transformers5_configs_of_qwen2_and_llama_load_as_released() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for name in ["qwen2-tiny-tied", "qwen2-tiny", "llama3-tiny"] {
        let (dir, g) = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
        std::fs::copy(
            root.join("hf5-configs").join(format!("{name}.json")),
            tmp.path().join("config.json"),
        )
        .unwrap();
        let a = logits_in_chunks(&load(&dir, DType::F32), &g.input_ids, &[24]);
        let b = logits_in_chunks(&load(tmp.path(), DType::F32), &g.input_ids, &[24]);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: the transformers 5 config computes other logits"
        );
    }
}

#[test]
fn v2_lite_tiny_sharded_matches_hf() {
    check_fixture("v2-lite-tiny");
}

#[test]
fn v2_grouped_f16_matches_hf() {
    check_fixture_bf16("v2-tiny-grouped", 0.75, None);
}
