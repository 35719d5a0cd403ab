//! Random-weight checkpoints in the released layouts (`duet tiny-model`): the demo and test
//! model, the benchmark shape, and the R1 distillations' Qwen2 and Llama architectures. They carry
//! the real tokenizers (DeepSeek-R1's, and the R1-Distill-Qwen / R1-Distill-Llama ones), shipped
//! compressed in `model/assets/` (sources and licences: `model/assets/README.md`), so the full
//! text path works on them.
//!
//! Weights get real magnitude (std 1/√fan_in, embeddings std 1, norms around 1): with the tiny
//! std of HF's default init every logit is ≈ 0 and nothing downstream can be told apart.

use std::io::Read;
use std::path::Path;

use rayon::prelude::*;
use serde_json::{Value, json};

use crate::rng::Rng;
use crate::safetensors_io::{self, TensorBytes};
use crate::{Error, ModelConfig};

const R1_TOKENIZER_GZ: &[u8] = include_bytes!("../assets/deepseek-r1-tokenizer.json.gz");
const R1_TOKENIZER_CONFIG: &str = include_str!("../assets/deepseek-r1-tokenizer_config.json");
const QWEN_TOKENIZER_GZ: &[u8] =
    include_bytes!("../assets/deepseek-r1-distill-qwen-tokenizer.json.gz");
const LLAMA_TOKENIZER_GZ: &[u8] =
    include_bytes!("../assets/deepseek-r1-distill-llama-tokenizer.json.gz");
/// The same file ships with R1-Distill-Qwen and R1-Distill-Llama.
const DISTILL_TOKENIZER_CONFIG: &str =
    include_str!("../assets/deepseek-r1-distill-tokenizer_config.json");

/// Rows of the embedding in the R1/V3 vocabulary (the tokenizer has fewer ids; the rest pad).
pub const DEEPSEEK_VOCAB: usize = 129_280;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// DeepSeek-V3/R1 shape in miniature: q-LoRA, noaux_tc routing, YaRN ×40.
    V3,
    /// DeepSeek-V2-Lite in miniature: plain q_proj, softmax greedy routing.
    V2Lite,
    /// The benchmark shape of BENCHMARKS.md: hidden 2048, 8 layers (1 dense), 64 experts top-6.
    V3Bench,
    /// DeepSeek-R1-Distill-Qwen's Qwen2 in miniature: GQA 4/2 with q/k/v biases, its tokenizer.
    Qwen2,
    /// DeepSeek-R1-Distill-Llama's Llama 3.1 in miniature: GQA 4/2, llama3 rope scaling.
    Llama,
}

impl std::str::FromStr for TinyArch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v3" => Ok(Self::V3),
            "v2-lite" => Ok(Self::V2Lite),
            "v3-bench" => Ok(Self::V3Bench),
            "qwen2" => Ok(Self::Qwen2),
            "llama" => Ok(Self::Llama),
            _ => Err(format!(
                "unknown arch {s:?} (v3, v2-lite, v3-bench, qwen2, llama)"
            )),
        }
    }
}

/// Qwen2 and Llama configs in the layout R1-Distill-Qwen / R1-Distill-Llama were released in.
fn distill_config_json(arch: TinyArch) -> Value {
    let qwen2 = json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151646, "eos_token_id": 151643, "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "use_cache": true, "use_mrope": false,
        "use_sliding_window": false, "vocab_size": 151936,
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "max_window_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    });
    match arch {
        TinyArch::Llama => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
            "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 131072,
            "mlp_bias": false, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "use_cache": true, "vocab_size": 128256,
            "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2,
        }),
        _ => qwen2,
    }
}

/// The `config.json` written for `arch`, in the released layout.
pub fn config_json(arch: TinyArch) -> Value {
    if matches!(arch, TinyArch::Qwen2 | TinyArch::Llama) {
        return distill_config_json(arch);
    }
    let yarn_v3 = json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0});
    let common = json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": DEEPSEEK_VOCAB, "bos_token_id": 0, "eos_token_id": 1,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "max_position_embeddings": 163840, "tie_word_embeddings": false, "attention_bias": false,
        "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16", "moe_layer_freq": 1,
        "first_k_dense_replace": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "norm_topk_prob": true, "routed_scaling_factor": 2.5, "rope_scaling": yarn_v3,
    });
    let specific = match arch {
        TinyArch::V3 => json!({
            "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "q_lora_rank": 64, "kv_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32,
            "v_head_dim": 32, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4,
            "topk_group": 2, "n_shared_experts": 1,
        }),
        TinyArch::V2Lite => json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "q_lora_rank": null, "kv_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32,
            "v_head_dim": 32, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 1,
            "topk_group": 1, "n_shared_experts": 2, "scoring_func": "softmax", "topk_method": "greedy",
            "norm_topk_prob": false, "routed_scaling_factor": 1.0,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        }),
        TinyArch::V3Bench => json!({
            "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 512,
            "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
            "q_lora_rank": 768, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
            "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 8,
            "topk_group": 4, "n_shared_experts": 1,
        }),
        TinyArch::Qwen2 | TinyArch::Llama => unreachable!("returned above"),
    };
    let mut c = common;
    let obj = c.as_object_mut().expect("literal object");
    for (k, v) in specific.as_object().expect("literal object") {
        obj.insert(k.clone(), v.clone());
    }
    c
}

/// What a tensor's random values look like.
#[derive(Clone, Copy)]
enum Init {
    /// N(0, std²).
    Normal(f64),
    /// 1 + N(0, 0.1²): an RMSNorm weight.
    Norm,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    f32: bool,
}

/// Qwen2/Llama tensors: q/k/v/o_proj (Qwen2: q/k/v biases), SwiGLU mlp, untied lm_head.
fn dense_specs(c: &ModelConfig) -> Vec<Spec> {
    let mut v = Vec::new();
    let mut add = |name: String, shape: &[usize], init: Init| {
        v.push(Spec {
            name,
            shape: shape.to_vec(),
            init,
            f32: false,
        })
    };
    let lin = |fan_in: usize| Init::Normal(1.0 / (fan_in as f64).sqrt());
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let g = c.gqa_shape();
    let (q, kv) = (g.heads * g.head_dim, g.kv_heads * g.head_dim);
    let biased = c.architecture() == Ok(crate::Architecture::Qwen2);
    add(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        Init::Normal(1.0),
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h], Init::Norm);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            Init::Norm,
        );
        for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            add(format!("{p}.self_attn.{name}.weight"), &[rows, h], lin(h));
            if biased {
                add(
                    format!("{p}.self_attn.{name}.bias"),
                    &[rows],
                    Init::Normal(0.5),
                );
            }
        }
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q], lin(q));
        add(format!("{p}.mlp.gate_proj.weight"), &[i, h], lin(h));
        add(format!("{p}.mlp.up_proj.weight"), &[i, h], lin(h));
        add(format!("{p}.mlp.down_proj.weight"), &[h, i], lin(i));
    }
    add("model.norm.weight".into(), &[h], Init::Norm);
    add(
        "lm_head.weight".into(),
        &[c.vocab_size, h],
        Init::Normal(2.0 / (h as f64).sqrt()),
    );
    v
}

fn specs(c: &ModelConfig) -> Vec<Spec> {
    if c.architecture().is_ok_and(|a| a.is_gqa()) {
        return dense_specs(c);
    }
    let mut v = Vec::new();
    let mut add = |name: String, shape: &[usize], init: Init, f32: bool| {
        v.push(Spec {
            name,
            shape: shape.to_vec(),
            init,
            f32,
        })
    };
    let lin = |fan_in: usize| Init::Normal(1.0 / (fan_in as f64).sqrt());
    let h = c.hidden_size;
    let s = c.mla_shape();
    add(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        Init::Normal(1.0),
        false,
    );
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        add(
            format!("{p}.input_layernorm.weight"),
            &[h],
            Init::Norm,
            false,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            Init::Norm,
            false,
        );
        let qw = s.heads * (s.nope + s.rope);
        match c.q_lora_rank {
            Some(r) if r > 0 => {
                add(
                    format!("{p}.self_attn.q_a_proj.weight"),
                    &[r, h],
                    lin(h),
                    false,
                );
                add(
                    format!("{p}.self_attn.q_a_layernorm.weight"),
                    &[r],
                    Init::Norm,
                    false,
                );
                add(
                    format!("{p}.self_attn.q_b_proj.weight"),
                    &[qw, r],
                    lin(r),
                    false,
                );
            }
            _ => add(
                format!("{p}.self_attn.q_proj.weight"),
                &[qw, h],
                lin(h),
                false,
            ),
        }
        add(
            format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
            &[s.kv_lora + s.rope, h],
            lin(h),
            false,
        );
        add(
            format!("{p}.self_attn.kv_a_layernorm.weight"),
            &[s.kv_lora],
            Init::Norm,
            false,
        );
        add(
            format!("{p}.self_attn.kv_b_proj.weight"),
            &[s.heads * (s.nope + s.v), s.kv_lora],
            lin(s.kv_lora),
            false,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, s.heads * s.v],
            lin(s.heads * s.v),
            false,
        );
        let mut ffn = |prefix: String, inter: usize| {
            add(
                format!("{prefix}.gate_proj.weight"),
                &[inter, h],
                lin(h),
                false,
            );
            add(
                format!("{prefix}.up_proj.weight"),
                &[inter, h],
                lin(h),
                false,
            );
            add(
                format!("{prefix}.down_proj.weight"),
                &[h, inter],
                lin(inter),
                false,
            );
        };
        if c.is_moe_layer(i) {
            let n = c.n_routed_experts.unwrap_or(0);
            for e in 0..n {
                ffn(format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size);
            }
            if let Some(k) = c.n_shared_experts.filter(|&k| k > 0) {
                ffn(
                    format!("{p}.mlp.shared_experts"),
                    k * c.moe_intermediate_size,
                );
            }
            add(format!("{p}.mlp.gate.weight"), &[n, h], lin(h), false);
            if c.topk_method == "noaux_tc" {
                add(
                    format!("{p}.mlp.gate.e_score_correction_bias"),
                    &[n],
                    Init::Normal(0.1),
                    true,
                );
            }
        } else {
            ffn(format!("{p}.mlp"), c.intermediate_size);
        }
    }
    add("model.norm.weight".into(), &[h], Init::Norm, false);
    add(
        "lm_head.weight".into(),
        &[c.vocab_size, h],
        Init::Normal(2.0 / (h as f64).sqrt()),
        false,
    );
    v
}

/// The R1 tokenizer files shipped with duet: `(tokenizer.json bytes, tokenizer_config.json)`.
pub fn r1_tokenizer_files() -> Result<(Vec<u8>, &'static str), Error> {
    tokenizer_files(TinyArch::V3)
}

/// The tokenizer files shipped for `arch`: R1's for the DeepSeek shapes, R1-Distill-Qwen's or
/// R1-Distill-Llama's for Qwen2 and Llama.
pub fn tokenizer_files(arch: TinyArch) -> Result<(Vec<u8>, &'static str), Error> {
    let (gz, name, cfg) = match arch {
        TinyArch::Qwen2 => (
            QWEN_TOKENIZER_GZ,
            "deepseek-r1-distill-qwen-tokenizer.json.gz",
            DISTILL_TOKENIZER_CONFIG,
        ),
        TinyArch::Llama => (
            LLAMA_TOKENIZER_GZ,
            "deepseek-r1-distill-llama-tokenizer.json.gz",
            DISTILL_TOKENIZER_CONFIG,
        ),
        TinyArch::V3 | TinyArch::V2Lite | TinyArch::V3Bench => (
            R1_TOKENIZER_GZ,
            "deepseek-r1-tokenizer.json.gz",
            R1_TOKENIZER_CONFIG,
        ),
    };
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .map_err(|e| Error::Io {
            path: format!("model/assets/{name}").into(),
            source: e,
        })?;
    Ok((out, cfg))
}

/// Writes a random checkpoint for `arch` into `dir` (created if missing).
pub fn write_tiny_model(dir: &Path, arch: TinyArch, seed: u64) -> Result<(), Error> {
    write_random_model(dir, arch, seed, &serde_json::Map::new())
}

/// [`write_tiny_model`] with `overrides` merged into the config first: a random checkpoint of a
/// real model's shape (hidden size, layers, heads, …) for benchmarks, with the same layout,
/// tokenizer and initialisation.
pub fn write_random_model(
    dir: &Path,
    arch: TinyArch,
    seed: u64,
    overrides: &serde_json::Map<String, Value>,
) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::Io {
            path: path.clone(),
            source: e,
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut cfg_json = config_json(arch);
    if let Some(obj) = cfg_json.as_object_mut() {
        obj.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let cfg: ModelConfig = serde_json::from_value(cfg_json.clone()).map_err(|e| Error::Config {
        path: dir.join("config.json"),
        detail: e.to_string(),
    })?;
    let specs = specs(&cfg);
    let heads: Vec<safetensors_io::TensorHead> = specs
        .iter()
        .map(|s| {
            let n: usize = s.shape.iter().product();
            safetensors_io::TensorHead {
                name: s.name.clone(),
                dtype: if s.f32 { "F32" } else { "BF16" },
                shape: s.shape.clone(),
                bytes: n * if s.f32 { 4 } else { 2 },
            }
        })
        .collect();
    // A few tensors at a time, each from its own seeded stream, so the bytes do not depend on the
    // batching and a real model's shape never has to fit in memory at once.
    let batch = 2 * rayon::current_num_threads();
    let mut next = 0;
    safetensors_io::write_streamed(
        &dir.join("model.safetensors"),
        &heads,
        &[("format", "pt")],
        |left| {
            let end = next + left.min(batch);
            let out = specs[next..end]
                .par_iter()
                .enumerate()
                .map(|(j, s)| {
                    let i = next + j;
                    let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9).wrapping_add(i as u64));
                    let n: usize = s.shape.iter().product();
                    let vals: Vec<f32> = (0..n)
                        .map(|_| match s.init {
                            Init::Normal(std) => (rng.normal() * std) as f32,
                            Init::Norm => (1.0 + 0.1 * rng.normal()) as f32,
                        })
                        .collect();
                    if s.f32 {
                        TensorBytes::f32(s.name.clone(), &s.shape, &vals).data
                    } else {
                        TensorBytes::bf16(s.name.clone(), &s.shape, &vals).data
                    }
                })
                .collect();
            next = end;
            Ok(out)
        },
    )?;
    let cfg_path = dir.join("config.json");
    let pretty = serde_json::to_string_pretty(&cfg_json).expect("JSON value serialises");
    std::fs::write(&cfg_path, pretty).map_err(io(&cfg_path))?;
    let (tok, tok_cfg) = tokenizer_files(arch)?;
    let tp = dir.join("tokenizer.json");
    std::fs::write(&tp, tok).map_err(io(&tp))?;
    let tcp = dir.join("tokenizer_config.json");
    std::fs::write(&tcp, tok_cfg).map_err(io(&tcp))?;
    let gen_cfg = dir.join("generation_config.json");
    // R1 and its distillations recommend temperature 0.6, top_p 0.95 (their generation_config).
    let generation = json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "do_sample": true, "temperature": 0.6, "top_p": 0.95});
    std::fs::write(&gen_cfg, generation.to_string()).map_err(io(&gen_cfg))?;
    Ok(())
}
