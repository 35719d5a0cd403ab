//! `config.json` of the checkpoints duet runs: DeepSeek-V2/V2-Lite/V3/R1 as released, and the
//! dense R1 distillations' Qwen2 (`Qwen2ForCausalLM`) and Llama 3.1/3.3 (`LlamaForCausalLM`).
//! The architecture comes from `architectures` (or, without it, `model_type`); the DeepSeek-only
//! fields are required only of DeepSeek configs.
//!
//! Released configs put `rope_theta` and `rope_scaling` at the top level; transformers ≥ 5 writes
//! them inside `rope_parameters` instead. Both are accepted.

use std::path::Path;

use duet_kernels::moe::{RouterConfig, Scoring, TopkMethod};
use duet_kernels::ops::GqaShape;
use duet_kernels::ops::MlaShape;
use duet_kernels::rope::{Llama3, Yarn};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Error;

/// Longest context a config may declare. The rope tables are sized by it (V3: 163,840 positions,
/// 42 MB); this keeps a corrupt config from asking for terabytes.
pub const MAX_POSITIONS: usize = 1 << 20;

/// Most decoder layers a config may declare (V3: 61, Llama-3.1-405B: 126): the layer list and the
/// KV pools are sized by it before any weight is read.
pub const LAYERS_MAX: usize = 1 << 12;

/// Most query values per token and layer a GQA config may declare (heads × head_dim), so that a
/// corrupt config is refused instead of overflowing a shape; Llama-3.1-405B has 128 × 128.
pub const GQA_WIDTH_MAX: usize = 1 << 20;

/// The fields of `config.json` duet reads. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default = "one")]
    pub routed_scaling_factor: f32,
    #[serde(default)]
    pub kv_lora_rank: usize,
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    #[serde(default)]
    pub qk_rope_head_dim: usize,
    #[serde(default)]
    pub qk_nope_head_dim: usize,
    #[serde(default)]
    pub v_head_dim: usize,
    #[serde(default = "greedy")]
    pub topk_method: String,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default = "one_usize")]
    pub moe_layer_freq: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "softmax")]
    pub scoring_func: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// GQA key/value heads (Qwen2, Llama); DeepSeek's MLA ignores it.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width of Qwen2/Llama attention; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub sliding_window: Option<Value>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5's per-layer attention kinds (`full_attention`, `sliding_attention`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Fraction of each head RoPE rotates (HF `partial_rotary_factor`; 1 when absent).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// The model families duet runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// DeepSeek-V2/V2-Lite/V3/R1: MLA and DeepSeekMoE.
    DeepSeek,
    /// Qwen2 (DeepSeek-R1-Distill-Qwen): GQA with q/k/v biases, SwiGLU, RMSNorm.
    Qwen2,
    /// Llama 3.x (DeepSeek-R1-Distill-Llama): GQA, optional `llama3` rope scaling.
    Llama,
}

impl Architecture {
    /// Whether attention is grouped-query over a `[k | v]` cache (otherwise MLA's latent cache).
    pub fn is_gqa(self) -> bool {
        !matches!(self, Architecture::DeepSeek)
    }
}

const SUPPORTED: &str =
    "DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM";

/// `quantization_config` of FP8 checkpoints (DeepSeek-V3/R1 ship `fp8`, e4m3, 128×128 blocks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    #[serde(default)]
    pub fmt: Option<String>,
    #[serde(default)]
    pub weight_block_size: Option<Vec<usize>>,
    #[serde(default)]
    pub activation_scheme: Option<String>,
}

fn one() -> f32 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn greedy() -> String {
    "greedy".into()
}
fn softmax() -> String {
    "softmax".into()
}
fn default_max_pos() -> usize {
    4096
}
fn default_eps() -> f64 {
    1e-6
}

/// Rope settings resolved from either config layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSettings {
    pub theta: f64,
    pub yarn: Option<Yarn>,
    pub llama3: Option<Llama3>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        cfg.validate().map_err(|detail| Error::Config {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(cfg)
    }

    /// Checks what the forward pass relies on, so a bad config is an error at load, not a panic
    /// mid-step.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.num_hidden_layers > LAYERS_MAX {
            return Err(format!(
                "num_hidden_layers {} exceeds the supported {LAYERS_MAX}",
                self.num_hidden_layers
            ));
        }
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(format!(
                "max_position_embeddings {} exceeds the supported {MAX_POSITIONS}",
                self.max_position_embeddings
            ));
        }
        if self.architecture()?.is_gqa() {
            self.validate_gqa()?;
        } else {
            self.validate_deepseek()?;
        }
        self.validate_quantization()?;
        self.rope()?;
        Ok(())
    }

    /// The architecture `architectures[0]` names, or (without one) `model_type` does.
    pub fn architecture(&self) -> Result<Architecture, String> {
        let by_name = match self.architectures.first().map(String::as_str) {
            Some("DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM") => Some(Architecture::DeepSeek),
            Some("Qwen2ForCausalLM") => Some(Architecture::Qwen2),
            Some("LlamaForCausalLM") => Some(Architecture::Llama),
            Some(other) => {
                return Err(format!(
                    "architecture {other:?} is not supported (duet runs {SUPPORTED})"
                ));
            }
            None => None,
        };
        if let Some(a) = by_name {
            return Ok(a);
        }
        match self.model_type.as_str() {
            "deepseek_v2" | "deepseek_v3" => Ok(Architecture::DeepSeek),
            "qwen2" => Ok(Architecture::Qwen2),
            "llama" => Ok(Architecture::Llama),
            "" => Err(format!(
                "neither architectures nor model_type names the architecture (duet runs {SUPPORTED})"
            )),
            other => Err(format!(
                "model_type {other:?} is not supported (duet runs {SUPPORTED})"
            )),
        }
    }

    /// Attention geometry of a Qwen2/Llama config (`num_key_value_heads` defaults to the
    /// attention heads, `head_dim` to `hidden_size / num_attention_heads`, as in HF).
    pub fn gqa_shape(&self) -> GqaShape {
        let heads = self.num_attention_heads;
        GqaShape {
            heads,
            kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads.max(1)),
        }
    }

    /// Values per token and layer in the KV cache: MLA's latent `kv_lora_rank + qk_rope_head_dim`,
    /// or GQA's `[k | v]`.
    pub fn kv_width(&self) -> usize {
        match self.architecture() {
            Ok(a) if a.is_gqa() => self.gqa_shape().pool_width(),
            _ => self.kv_lora_rank + self.qk_rope_head_dim,
        }
    }

    fn validate_gqa(&self) -> Result<(), String> {
        let g = self.gqa_shape();
        if g.kv_heads == 0 || !g.heads.is_multiple_of(g.kv_heads) {
            return Err(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                g.heads, g.kv_heads
            ));
        }
        if g.head_dim == 0 || !g.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be positive and even", g.head_dim));
        }
        if g.heads
            .checked_mul(g.head_dim)
            .is_none_or(|w| w > GQA_WIDTH_MAX)
        {
            return Err(format!(
                "{} heads × head_dim {} exceeds the supported {GQA_WIDTH_MAX} values per token",
                g.heads, g.head_dim
            ));
        }
        if self.intermediate_size == 0 {
            return Err("intermediate_size must be positive".into());
        }
        if self.mlp_bias {
            return Err("mlp_bias is not supported".into());
        }
        if let Some(f) = self.partial_rotary_factor.filter(|&f| f != 1.0) {
            return Err(format!(
                "partial_rotary_factor {f} is not supported (RoPE over the whole head is)"
            ));
        }
        if self.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return Err(format!(
                "hidden_act {:?} is not supported (silu is)",
                self.hidden_act
            ));
        }
        // HF Qwen2 slides the window only where use_sliding_window is set, from layer
        // max_window_layers on; transformers 5 spells it out in layer_types.
        let sliding_layers = self
            .layer_types
            .as_ref()
            .is_some_and(|t| t.iter().any(|k| k == "sliding_attention"))
            || (self.use_sliding_window
                && self.max_window_layers.unwrap_or(0) < self.num_hidden_layers);
        if sliding_layers {
            return Err(format!(
                "sliding-window attention (use_sliding_window, sliding_window {}) is not supported",
                self.sliding_window
                    .as_ref()
                    .map_or("unset".into(), Value::to_string)
            ));
        }
        Ok(())
    }

    fn validate_deepseek(&self) -> Result<(), String> {
        let positive = [
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err("qk_rope_head_dim must be even".into());
        }
        if self.moe_layer_freq == 0 {
            return Err("moe_layer_freq must be positive".into());
        }
        if let Some(e) = self.n_routed_experts.filter(|&e| e > 0) {
            let k = self.num_experts_per_tok.unwrap_or(0);
            if k == 0 || k > e {
                return Err(format!("num_experts_per_tok {k} must be in 1..={e}"));
            }
            if self.moe_intermediate_size == 0 {
                return Err("moe_intermediate_size must be positive".into());
            }
            let g = self.n_group.unwrap_or(1).max(1);
            if e % g != 0 || self.topk_group.unwrap_or(1) > g {
                return Err(format!(
                    "n_group {g} / topk_group {:?} do not divide {e} experts",
                    self.topk_group
                ));
            }
            self.router(e)?;
        }
        Ok(())
    }

    fn validate_quantization(&self) -> Result<(), String> {
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "fp8" {
                return Err(format!(
                    "quantization method {:?} is not supported (fp8 is)",
                    q.quant_method
                ));
            }
            match q.weight_block_size.as_deref() {
                Some([a, b]) if *a > 0 && *b > 0 => {}
                other => {
                    return Err(format!(
                        "fp8 weight_block_size {other:?} must be two positive sizes"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn mla_shape(&self) -> MlaShape {
        MlaShape {
            heads: self.num_attention_heads,
            kv_lora: self.kv_lora_rank,
            rope: self.qk_rope_head_dim,
            nope: self.qk_nope_head_dim,
            v: self.v_head_dim,
        }
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether layer `i` has routed experts (DeepSeek's `first_k_dense_replace`/`moe_layer_freq`).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.is_some_and(|e| e > 0)
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq)
    }

    /// The first EOS id (configs give one id or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn router(&self, n_experts: usize) -> Result<RouterConfig, String> {
        let method = match self.topk_method.as_str() {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => return Err(format!("unknown topk_method {other:?}")),
        };
        let scoring = match self.scoring_func.as_str() {
            "softmax" => Scoring::Softmax,
            "sigmoid" => Scoring::Sigmoid,
            other => return Err(format!("unknown scoring_func {other:?}")),
        };
        Ok(RouterConfig {
            n_experts,
            top_k: self.num_experts_per_tok.unwrap_or(1),
            n_group: self.n_group.unwrap_or(1).max(1),
            topk_group: self.topk_group.unwrap_or(1).max(1),
            scoring,
            method,
            norm_topk_prob: self.norm_topk_prob,
            routed_scaling_factor: self.routed_scaling_factor,
            scale_after_norm: self.model_type != "deepseek_v2",
        })
    }

    /// `rope_theta` and YaRN from the top level (released) or `rope_parameters` (transformers 5).
    pub fn rope(&self) -> Result<RopeSettings, String> {
        let params = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let scaling = params.or(self.rope_scaling.as_ref().filter(|v| v.is_object()));
        let theta = self
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0);
        let Some(s) = scaling else {
            return Ok(RopeSettings {
                theta,
                yarn: None,
                llama3: None,
            });
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match kind {
            "default" => Ok(RopeSettings {
                theta,
                yarn: None,
                llama3: None,
            }),
            "llama3" if self.architecture()? == Architecture::Llama => {
                let f = |k: &str| s.get(k).and_then(Value::as_f64);
                let orig = s
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize);
                match (f("factor"), f("low_freq_factor"), f("high_freq_factor"), orig) {
                    (Some(factor), Some(low), Some(high), Some(orig))
                        if factor > 0.0 && low > 0.0 && high > low && orig > 0 =>
                    {
                        Ok(RopeSettings {
                            theta,
                            yarn: None,
                            llama3: Some(Llama3 {
                                factor,
                                low_freq_factor: low,
                                high_freq_factor: high,
                                original_max_position_embeddings: orig,
                            }),
                        })
                    }
                    _ => Err("llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0".into()),
                }
            }
            "yarn" if self.architecture()?.is_gqa() => Err(format!(
                "yarn rope scaling is supported for DeepSeek checkpoints only, not {:?}",
                self.architecture()?
            )),
            "yarn" => {
                let f = |k: &str, d: f64| s.get(k).and_then(Value::as_f64).unwrap_or(d);
                let factor = f("factor", 1.0);
                let orig = s
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
                    .unwrap_or(self.max_position_embeddings);
                if factor <= 0.0 || orig == 0 {
                    return Err(
                        "yarn factor and original_max_position_embeddings must be positive".into(),
                    );
                }
                Ok(RopeSettings {
                    theta,
                    llama3: None,
                    yarn: Some(Yarn {
                        factor,
                        original_max_position_embeddings: orig,
                        beta_fast: f("beta_fast", 32.0),
                        beta_slow: f("beta_slow", 1.0),
                        mscale: f("mscale", 1.0),
                        mscale_all_dim: f("mscale_all_dim", 0.0),
                    }),
                })
            }
            other => Err(format!(
                "rope scaling type {other:?} is not supported (yarn for DeepSeek, llama3 for Llama)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released() -> Value {
        crate::tiny::config_json(crate::tiny::TinyArch::V3)
    }

    #[test]
    fn transformers5_rope_parameters_equal_released_layout() {
        let a: ModelConfig = serde_json::from_value(released()).unwrap();
        let mut v5 = released();
        let obj = v5.as_object_mut().unwrap();
        let mut params = obj.remove("rope_scaling").unwrap();
        params["rope_type"] = params["type"].take();
        params["rope_theta"] = obj.remove("rope_theta").unwrap();
        obj.insert("rope_parameters".into(), params);
        let b: ModelConfig = serde_json::from_value(v5).unwrap();
        assert_eq!(a.rope().unwrap(), b.rope().unwrap());
        let yarn = a.rope().unwrap().yarn.unwrap();
        assert_eq!(
            (yarn.factor, yarn.original_max_position_embeddings),
            (40.0, 4096)
        );
    }

    #[test]
    fn invalid_configs_say_why() {
        let mut v = released();
        v["num_experts_per_tok"] = 99.into();
        let c: ModelConfig = serde_json::from_value(v).unwrap();
        assert!(c.validate().unwrap_err().contains("num_experts_per_tok"));
        let mut v = released();
        v["rope_scaling"]["type"] = "dynamic".into();
        let c: ModelConfig = serde_json::from_value(v).unwrap();
        assert!(c.validate().unwrap_err().contains("dynamic"));
    }

    fn qwen2() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
            "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072,
            "rope_theta": 10000, "rms_norm_eps": 1e-6, "sliding_window": 4096,
            "max_window_layers": 21, "use_sliding_window": false, "tie_word_embeddings": false,
            "hidden_act": "silu"
        })
    }

    fn parse(v: Value) -> Result<ModelConfig, String> {
        let c: ModelConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn architecture_comes_from_architectures_then_model_type() {
        // R1-Distill-Qwen-1.5B's config: GQA 12/2, head_dim 128, sliding window off.
        let c = parse(qwen2()).unwrap();
        assert_eq!(c.architecture(), Ok(Architecture::Qwen2));
        assert_eq!(
            c.gqa_shape(),
            GqaShape {
                heads: 12,
                kv_heads: 2,
                head_dim: 128
            }
        );
        assert_eq!(c.kv_width(), 512);
        let mut v = qwen2();
        v.as_object_mut().unwrap().remove("architectures");
        v["model_type"] = "llama".into();
        assert_eq!(parse(v).unwrap().architecture(), Ok(Architecture::Llama));
        assert_eq!(
            parse(released()).unwrap().architecture(),
            Ok(Architecture::DeepSeek)
        );
    }

    #[test]
    fn unsupported_architectures_and_settings_are_named() {
        let mut v = qwen2();
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        let e = parse(v).unwrap_err();
        assert!(
            e.contains("MistralForCausalLM") && e.contains("Qwen2ForCausalLM"),
            "{e}"
        );
        let mut v = qwen2();
        v.as_object_mut().unwrap().remove("architectures");
        v["model_type"] = "gemma".into();
        assert!(parse(v).unwrap_err().contains("\"gemma\""));
        let mut v = qwen2();
        v["use_sliding_window"] = true.into();
        let e = parse(v).unwrap_err();
        assert!(e.contains("sliding") && e.contains("4096"), "{e}");
        let mut v = qwen2();
        v["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"]);
        assert!(parse(v).unwrap_err().contains("sliding"));
        let mut v = qwen2();
        v["num_key_value_heads"] = 5.into();
        assert!(parse(v).unwrap_err().contains("num_key_value_heads"));
        let mut v = qwen2();
        v["partial_rotary_factor"] = 0.5.into();
        assert!(parse(v).unwrap_err().contains("partial_rotary_factor"));
        let mut v = qwen2();
        v["head_dim"] = (1u64 << 60).into();
        assert!(parse(v).unwrap_err().contains("values per token"));
        let mut v = qwen2();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(v).unwrap_err().contains("yarn"));
    }

    #[test]
    fn llama3_rope_scaling_is_read_for_llama_only() {
        let mut v = qwen2();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        v["rope_scaling"] = serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"});
        let r = parse(v.clone()).unwrap().rope().unwrap();
        assert_eq!(
            r.llama3,
            Some(Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        v["rope_scaling"]["high_freq_factor"] = 0.5.into();
        assert!(parse(v.clone()).unwrap_err().contains("high_freq_factor"));
        v["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        v["rope_scaling"]["high_freq_factor"] = 4.0.into();
        assert!(parse(v).unwrap_err().contains("llama3"));
    }

    #[test]
    fn dense_and_moe_layers() {
        let mut c: ModelConfig = serde_json::from_value(released()).unwrap();
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.is_moe_layer(3));
        c.moe_layer_freq = 2;
        assert!(!c.is_moe_layer(1) && c.is_moe_layer(2));
    }
}
