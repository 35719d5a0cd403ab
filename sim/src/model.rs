//! The model side of the cost model: a `config.json` and the sizes and FLOP counts derived from it
//! (anchors-performance.md §10).
//!
//! Two families:
//! - DeepSeek-V3 architecture: any config with MLA (`kv_lora_rank`, `qk_rope_head_dim`, …) and
//!   DeepSeekMoE (`n_routed_experts`, `num_experts_per_tok`, …): other layer, head or expert counts,
//!   or no q-LoRA (`q_lora_rank: null`, as in V2-Lite). Linear weights FP8, as DeepSeek ships them.
//! - Dense grouped-query-attention models, `model_type` `qwen2` or `llama` (the R1-Distill
//!   checkpoints): every layer a dense SwiGLU FFN, KV of `num_key_value_heads × head_dim` keys and
//!   values per layer, weights in BF16 unless `quantization_config` says FP8, the lm_head tied to
//!   the embedding when `tie_word_embeddings`. TP splits their KV heads (MLA's latent is whole on
//!   every GPU).
//!
//! Fields the simulator does not use (rope scaling, token ids) are ignored.

use serde::Deserialize;

use crate::SimError;

/// The fields of a `config.json` that set sizes and FLOPs. Names are Hugging Face's; a dense model's
/// MoE and MLA fields are zero (see [`ModelConfig::gqa`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelConfig {
    pub hidden_size: u64,
    pub num_hidden_layers: u64,
    #[serde(default)]
    pub first_k_dense_replace: u64,
    /// Dense FFN width (the first `first_k_dense_replace` layers).
    pub intermediate_size: u64,
    pub n_routed_experts: u64,
    pub num_experts_per_tok: u64,
    #[serde(default)]
    pub n_shared_experts: u64,
    pub moe_intermediate_size: u64,
    pub num_attention_heads: u64,
    /// None: queries use a plain `q_proj`.
    #[serde(default)]
    pub q_lora_rank: Option<u64>,
    pub kv_lora_rank: u64,
    pub qk_nope_head_dim: u64,
    pub qk_rope_head_dim: u64,
    pub v_head_dim: u64,
    pub vocab_size: u64,
    /// Expert groups of group-limited routing (V3: 8); EPLB keeps a group on one node.
    #[serde(default)]
    pub n_group: Option<u64>,
    /// MTP modules (V3: 1).
    #[serde(default)]
    pub num_nextn_predict_layers: u64,
    /// Grouped-query attention instead of MLA: a dense model's.
    #[serde(skip)]
    pub gqa: Option<Gqa>,
    /// Linear weights in FP8 (DeepSeek's release) rather than BF16.
    #[serde(skip, default = "fp8_default")]
    pub fp8_weights: bool,
    /// The lm_head shares the embedding's weights.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn fp8_default() -> bool {
    true
}

/// Grouped-query attention's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gqa {
    pub kv_heads: u64,
    pub head_dim: u64,
}

/// The fields of a Qwen2 or Llama `config.json` the cost model needs.
#[derive(Deserialize)]
struct DenseJson {
    hidden_size: u64,
    num_hidden_layers: u64,
    intermediate_size: u64,
    num_attention_heads: u64,
    #[serde(default)]
    num_key_value_heads: Option<u64>,
    #[serde(default)]
    head_dim: Option<u64>,
    vocab_size: u64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    quantization_config: Option<serde_json::Value>,
}

/// DeepSeek-V3/R1's config.json (anchors §10a, confirmed against three sources).
pub const DEEPSEEK_V3_JSON: &str = r#"{
  "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3,
  "intermediate_size": 18432, "n_routed_experts": 256, "num_experts_per_tok": 8,
  "n_shared_experts": 1, "moe_intermediate_size": 2048, "num_attention_heads": 128,
  "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
  "v_head_dim": 128, "vocab_size": 129280, "num_nextn_predict_layers": 1, "n_group": 8
}"#;

/// Embedding and lm_head stay BF16 (anchors §10b, "plus embedding + head 3.7 (BF16)").
const EMBED_WEIGHT_BYTES: f64 = 2.0;
/// KV (MLA's latent, GQA's keys and values) is kept in BF16, what FlashMLA's dense decode kernel reads (DESIGN.md "The KV cache").
const KV_VALUE_BYTES: u64 = 2;
/// Largest accepted layer, head, expert or width count: far above any released model, low enough
/// that products of a few of them cannot overflow f64's exact integer range.
const DIM_MAX: u64 = 1 << 20;

impl ModelConfig {
    /// The built-in DeepSeek-V3 config.
    pub fn deepseek_v3() -> Self {
        Self::from_json(DEEPSEEK_V3_JSON).expect("the built-in config parses")
    }

    /// Parses and checks a config.json's text: a dense model by its `model_type`, otherwise the
    /// DeepSeek-V3 architecture.
    pub fn from_json(text: &str) -> Result<Self, SimError> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| SimError::ModelConfig(format!("not a config.json: {e}")))?;
        let cfg = match v.get("model_type").and_then(|t| t.as_str()) {
            Some("qwen2" | "llama") => Self::dense(v)?,
            Some(t) if !t.starts_with("deepseek") => {
                return Err(SimError::ModelConfig(format!(
                    "model_type {t:?} is not simulated (DeepSeek V2/V3, qwen2 and llama are)"
                )));
            }
            _ => serde_json::from_value(v).map_err(|e| {
                SimError::ModelConfig(format!("not a DeepSeek-V3 config.json: {e}"))
            })?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A Qwen2/Llama config as a model with no experts and no MLA.
    fn dense(v: serde_json::Value) -> Result<Self, SimError> {
        let d: DenseJson = serde_json::from_value(v)
            .map_err(|e| SimError::ModelConfig(format!("not a Qwen2/Llama config.json: {e}")))?;
        if d.num_attention_heads == 0 || d.num_attention_heads > DIM_MAX {
            return Err(SimError::ModelConfig(format!(
                "num_attention_heads = {} is outside 1..={DIM_MAX}",
                d.num_attention_heads
            )));
        }
        let head_dim = d.head_dim.unwrap_or(d.hidden_size / d.num_attention_heads);
        let kv_heads = d.num_key_value_heads.unwrap_or(d.num_attention_heads);
        let fp8_weights = d
            .quantization_config
            .as_ref()
            .and_then(|q| q.get("quant_method"))
            .and_then(|m| m.as_str())
            == Some("fp8");
        Ok(ModelConfig {
            hidden_size: d.hidden_size,
            num_hidden_layers: d.num_hidden_layers,
            first_k_dense_replace: d.num_hidden_layers,
            intermediate_size: d.intermediate_size,
            n_routed_experts: 0,
            num_experts_per_tok: 0,
            n_shared_experts: 0,
            moe_intermediate_size: 0,
            num_attention_heads: d.num_attention_heads,
            q_lora_rank: None,
            kv_lora_rank: 0,
            qk_nope_head_dim: 0,
            qk_rope_head_dim: 0,
            v_head_dim: 0,
            vocab_size: d.vocab_size,
            n_group: None,
            num_nextn_predict_layers: 0,
            gqa: Some(Gqa { kv_heads, head_dim }),
            fp8_weights,
            tie_word_embeddings: d.tie_word_embeddings,
        })
    }

    /// Whether attention TP `tp` splits the heads evenly: the query heads, and for GQA the KV heads
    /// (or TP a multiple of them, which replicates each KV head on `tp / kv_heads` GPUs).
    pub fn splits_heads(&self, tp: usize) -> bool {
        let tp = tp as u64;
        tp > 0
            && self.num_attention_heads.is_multiple_of(tp)
            && self
                .gqa
                .is_none_or(|g| g.kv_heads.is_multiple_of(tp) || tp.is_multiple_of(g.kv_heads))
    }

    /// Whether the model has routed experts (DeepSeekMoE) at all.
    pub fn is_moe(&self) -> bool {
        self.n_routed_experts > 0
    }

    /// Bytes per linear weight: FP8 or BF16 (block scales of FP8 add 1/16384 and are ignored).
    pub fn linear_weight_bytes(&self) -> f64 {
        if self.fp8_weights { 1.0 } else { 2.0 }
    }

    /// `deepseek-v3` (or `deepseek-r1`, the same architecture) or a path to a config.json.
    pub fn load(spec: &str) -> Result<Self, SimError> {
        match spec {
            "deepseek-v3" | "deepseek-r1" => Ok(Self::deepseek_v3()),
            path => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| SimError::ModelConfig(format!("{path}: {e}")))?;
                Self::from_json(&text).map_err(|e| SimError::ModelConfig(format!("{path}: {e}")))
            }
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        if let Some(g) = self.gqa {
            return self.validate_dense(g);
        }
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in dims {
            if v == 0 || v > DIM_MAX {
                return Err(SimError::ModelConfig(format!(
                    "{name} = {v} is outside 1..={DIM_MAX}"
                )));
            }
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(SimError::ModelConfig(format!(
                "first_k_dense_replace = {} exceeds num_hidden_layers = {}",
                self.first_k_dense_replace, self.num_hidden_layers
            )));
        }
        if let Some(g) = self.n_group
            && (g == 0 || !self.n_routed_experts.is_multiple_of(g))
        {
            return Err(SimError::ModelConfig(format!(
                "n_group = {g} does not divide n_routed_experts = {}",
                self.n_routed_experts
            )));
        }
        if self.num_experts_per_tok > self.n_routed_experts {
            return Err(SimError::ModelConfig(format!(
                "num_experts_per_tok = {} exceeds n_routed_experts = {}",
                self.num_experts_per_tok, self.n_routed_experts
            )));
        }
        if self.q_lora_rank.is_some_and(|r| r == 0 || r > DIM_MAX)
            || self.n_shared_experts > DIM_MAX
            || self.num_nextn_predict_layers > DIM_MAX
        {
            return Err(SimError::ModelConfig(
                "q_lora_rank, n_shared_experts or num_nextn_predict_layers out of range".into(),
            ));
        }
        Ok(())
    }

    fn validate_dense(&self, g: Gqa) -> Result<(), SimError> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", g.kv_heads),
            ("head_dim", g.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in dims {
            if v == 0 || v > DIM_MAX {
                return Err(SimError::ModelConfig(format!(
                    "{name} = {v} is outside 1..={DIM_MAX}"
                )));
            }
        }
        if !self.num_attention_heads.is_multiple_of(g.kv_heads) {
            return Err(SimError::ModelConfig(format!(
                "num_key_value_heads = {} does not divide num_attention_heads = {}",
                g.kv_heads, self.num_attention_heads
            )));
        }
        Ok(())
    }

    pub fn layers(&self) -> f64 {
        self.num_hidden_layers as f64
    }

    /// Expert groups EPLB packs onto nodes: `n_group`, or 1 without group-limited routing.
    pub fn expert_groups(&self) -> u64 {
        self.n_group.unwrap_or(1)
    }

    pub fn moe_layers(&self) -> f64 {
        (self.num_hidden_layers - self.first_k_dense_replace) as f64
    }

    pub fn dense_layers(&self) -> f64 {
        self.first_k_dense_replace as f64
    }

    /// Attention weights of one layer: MLA's (anchors §10b: 187.1 M for V3), or GQA's q, k, v and o
    /// projections (biases ignored).
    pub fn attn_params_per_layer(&self) -> f64 {
        let h = self.hidden_size as f64;
        let heads = self.num_attention_heads as f64;
        if let Some(g) = self.gqa {
            let (kv, d) = (g.kv_heads as f64, g.head_dim as f64);
            return 2.0 * h * heads * d + 2.0 * h * kv * d;
        }
        let qk = (self.qk_nope_head_dim + self.qk_rope_head_dim) as f64;
        let q = match self.q_lora_rank {
            Some(r) => h * r as f64 + r as f64 * heads * qk,
            None => h * heads * qk,
        };
        let kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) as f64;
        let kv_b =
            self.kv_lora_rank as f64 * heads * (self.qk_nope_head_dim + self.v_head_dim) as f64;
        let o = heads * self.v_head_dim as f64 * h;
        q + kv_a + kv_b + o
    }

    /// One SwiGLU expert (routed or shared): 44.04 M for V3.
    pub fn expert_params(&self) -> f64 {
        3.0 * self.hidden_size as f64 * self.moe_intermediate_size as f64
    }

    pub fn dense_ffn_params(&self) -> f64 {
        3.0 * self.hidden_size as f64 * self.intermediate_size as f64
    }

    fn gate_params(&self) -> f64 {
        self.hidden_size as f64 * self.n_routed_experts as f64
    }

    /// Weights every attention rank holds whatever the EP size: MLA, dense FFN layers, shared
    /// experts and routers (DP attention replicates them, anchors §1 "MLA and shared expert DP32").
    pub fn replicated_linear_params(&self) -> f64 {
        self.layers() * self.attn_params_per_layer()
            + self.dense_layers() * self.dense_ffn_params()
            + self.moe_layers()
                * (self.n_shared_experts as f64 * self.expert_params() + self.gate_params())
    }

    /// Matmul parameters a token passes through, embedding and lm_head excluded (anchors §10d:
    /// 2 × this ≈ 71.4 GFLOP for V3).
    pub fn active_linear_params(&self) -> f64 {
        self.replicated_linear_params()
            + self.moe_layers() * self.num_experts_per_tok as f64 * self.expert_params()
    }

    /// The MoE part of [`Self::active_linear_params`]: routed experts only.
    pub fn active_routed_params(&self) -> f64 {
        self.moe_layers() * self.num_experts_per_tok as f64 * self.expert_params()
    }

    pub fn lm_head_params(&self) -> f64 {
        (self.vocab_size * self.hidden_size) as f64
    }

    /// Embedding and lm_head matrices: one when they are tied.
    fn vocab_matrices(&self) -> f64 {
        if self.tie_word_embeddings { 1.0 } else { 2.0 }
    }

    /// All weights including every routed expert (671 B for V3).
    pub fn total_params(&self) -> f64 {
        self.replicated_linear_params()
            + self.moe_layers() * self.n_routed_experts as f64 * self.expert_params()
            + self.vocab_matrices() * self.lm_head_params()
    }

    /// The part of [`Self::replicated_linear_params`] that attention tensor parallelism splits
    /// across the TP ranks: the per-head MLA projections (q_b, kv_b, o), the dense FFN layers and the
    /// shared experts. The latent down-projections (q_a, kv_a) and the router stay whole on every
    /// rank, as SGLang keeps them (`ReplicatedLinear`), because their output is the shared latent.
    /// GQA's q, k, v and o projections split by heads whole.
    pub fn tp_split_params(&self) -> f64 {
        if self.gqa.is_some() {
            return self.layers() * self.attn_params_per_layer()
                + self.dense_layers() * self.dense_ffn_params();
        }
        let h = self.hidden_size as f64;
        let heads = self.num_attention_heads as f64;
        let qk = (self.qk_nope_head_dim + self.qk_rope_head_dim) as f64;
        let q_b = match self.q_lora_rank {
            Some(r) => r as f64 * heads * qk,
            None => h * heads * qk,
        };
        let kv_b =
            self.kv_lora_rank as f64 * heads * (self.qk_nope_head_dim + self.v_head_dim) as f64;
        let o = heads * self.v_head_dim as f64 * h;
        self.layers() * (q_b + kv_b + o)
            + self.dense_layers() * self.dense_ffn_params()
            + self.moe_layers() * self.n_shared_experts as f64 * self.expert_params()
    }

    /// Replicated linear weights one GPU of a TP-`tp` attention rank holds and multiplies by.
    pub fn replicated_linear_params_per_gpu(&self, tp: usize) -> f64 {
        let split = self.tp_split_params();
        self.replicated_linear_params() - split + split / tp.max(1) as f64
    }

    /// Weight bytes on one GPU holding `expert_slots` routed experts per MoE layer, in an attention
    /// rank of `tp` GPUs (embedding and lm_head vocab-parallel across them).
    pub fn weight_bytes_per_gpu(&self, expert_slots: f64, tp: usize) -> f64 {
        (self.replicated_linear_params_per_gpu(tp)
            + self.moe_layers() * expert_slots * self.expert_params())
            * self.linear_weight_bytes()
            + self.vocab_matrices() * self.lm_head_params() * EMBED_WEIGHT_BYTES / tp.max(1) as f64
    }

    /// KV bytes per token over all layers: MLA's latent, (kv_lora_rank + qk_rope_head_dim) × 2 B ×
    /// layers = 70,272 B for V3 (anchors §10c, ISCA'25 Table 1); GQA's keys and values,
    /// 2 × kv_heads × head_dim × 2 B × layers (327,680 B for Qwen-2.5-72B, ISCA'25 Table 1).
    pub fn kv_bytes_per_token(&self) -> u64 {
        match self.gqa {
            Some(g) => 2 * g.kv_heads * g.head_dim * KV_VALUE_BYTES * self.num_hidden_layers,
            None => {
                (self.kv_lora_rank + self.qk_rope_head_dim)
                    * KV_VALUE_BYTES
                    * self.num_hidden_layers
            }
        }
    }

    /// The KV bytes per token one GPU of a TP-`tp` attention rank holds and reads: MLA's latent is
    /// whole on every GPU; GQA's KV heads are split, down to one head per GPU (TP beyond the KV
    /// heads replicates them, as vLLM and SGLang do).
    pub fn kv_bytes_per_token_per_gpu(&self, tp: usize) -> f64 {
        let all = self.kv_bytes_per_token() as f64;
        match self.gqa {
            Some(g) => all / (tp.max(1) as f64).min(g.kv_heads as f64),
            None => all,
        }
    }

    /// Decode attention FLOPs per query token per context token. MLA, absorbed form:
    /// layers · 2 · heads · (576 + 512) (anchors §10d: 16.99 MFLOP for V3); GQA: layers · 2 · heads ·
    /// 2 · head_dim.
    pub fn decode_attn_flops_per_ctx(&self) -> f64 {
        if let Some(g) = self.gqa {
            return self.layers() * 2.0 * self.num_attention_heads as f64 * 2.0 * g.head_dim as f64;
        }
        let k = (self.kv_lora_rank + self.qk_rope_head_dim) as f64;
        let v = self.kv_lora_rank as f64;
        self.layers() * 2.0 * self.num_attention_heads as f64 * (k + v)
    }

    /// Prefill attention FLOPs per query token per context token, MHA form:
    /// layers · 2 · heads · (qk 192 + v 128) (anchors §10d).
    pub fn prefill_attn_flops_per_ctx(&self) -> f64 {
        if self.gqa.is_some() {
            return self.decode_attn_flops_per_ctx();
        }
        let qk = (self.qk_nope_head_dim + self.qk_rope_head_dim) as f64;
        self.layers() * 2.0 * self.num_attention_heads as f64 * (qk + self.v_head_dim as f64)
    }

    /// FLOPs to decompress one cached prefix token's latent into MHA keys and values (kv_b), needed
    /// when prefill extends a cached prefix in MHA form. GQA caches keys and values as they are.
    pub fn prefix_decompress_flops_per_token(&self) -> f64 {
        if self.gqa.is_some() {
            return 0.0;
        }
        self.layers()
            * 2.0
            * self.kv_lora_rank as f64
            * self.num_attention_heads as f64
            * (self.qk_nope_head_dim + self.v_head_dim) as f64
    }

    /// Bytes one token sends per MoE layer in an EP dispatch (FP8 hidden + one f32 scale per 128
    /// values) and gets back in the combine (BF16 hidden), per expert copy (anchors §10d: 7,392 and
    /// 14,336 B for V3).
    pub fn ep_bytes_per_copy(&self) -> (f64, f64) {
        let h = self.hidden_size as f64;
        (h + h / 128.0 * 4.0, 2.0 * h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The derived sizes of anchors §10b–d, within the rounding the anchors print.
    #[test]
    fn deepseek_v3_sizes_match_anchors() {
        let m = ModelConfig::deepseek_v3();
        let close = |a: f64, b: f64, tol: f64| (a / b - 1.0).abs() < tol;
        assert!(close(m.attn_params_per_layer(), 187.1e6, 0.001));
        assert!(close(m.expert_params(), 44.04e6, 0.001));
        assert!(close(m.total_params(), 671.03e9, 0.001));
        // 71.4 GFLOP/token without lm_head (anchors §10d), 0.5 % for the printed rounding.
        assert!(close(2.0 * m.active_linear_params(), 71.4e9, 0.005));
        assert_eq!(m.kv_bytes_per_token(), 70_272);
        assert!(close(m.decode_attn_flops_per_ctx(), 16.99e6, 0.001));
        // Prefill weights per GPU at EP32 with 9 routed slots: ≈ 42 GB (anchors §10b).
        assert!(close(m.weight_bytes_per_gpu(9.0, 1), 42e9, 0.03));
        // TP splits the per-head MLA projections, dense FFNs and shared experts, not the latent
        // down-projections or routers: most of the replicated weights, never all of them.
        let split = m.tp_split_params() / m.replicated_linear_params();
        assert!((0.7..0.95).contains(&split), "{split}");
        assert!(m.weight_bytes_per_gpu(9.0, 8) < m.weight_bytes_per_gpu(9.0, 1));
        assert!(m.replicated_linear_params_per_gpu(8) > m.replicated_linear_params() / 8.0);
        let (d, c) = m.ep_bytes_per_copy();
        assert_eq!((d, c), (7392.0, 14336.0));
    }

    /// DeepSeek-R1-Distill-Qwen-7B's config.json (Qwen2 architecture), as released.
    pub(crate) const DISTILL_QWEN_7B_JSON: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
      "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
      "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
      "rope_theta": 10000, "sliding_window": 4096, "use_sliding_window": false,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    }"#;

    fn dense(
        model_type: &str,
        h: u64,
        inter: u64,
        layers: u64,
        heads: u64,
        kv: u64,
        vocab: u64,
    ) -> ModelConfig {
        ModelConfig::from_json(&format!(
            r#"{{"model_type": "{model_type}", "hidden_size": {h}, "intermediate_size": {inter},
            "num_hidden_layers": {layers}, "num_attention_heads": {heads},
            "num_key_value_heads": {kv}, "vocab_size": {vocab}}}"#
        ))
        .unwrap()
    }

    /// Parameter counts as the model cards give them, and KV bytes per token as ISCA'25 Table 1
    /// gives them (anchors §10c).
    #[test]
    fn dense_gqa_sizes_match_model_cards_and_isca_table() {
        let close = |a: f64, b: f64| (a / b - 1.0).abs() < 0.005;
        let qwen7 = ModelConfig::from_json(DISTILL_QWEN_7B_JSON).unwrap();
        assert!(!qwen7.is_moe() && !qwen7.fp8_weights);
        assert!(
            close(qwen7.total_params(), 7.62e9),
            "{}",
            qwen7.total_params()
        );
        // Qwen2-7B's card: 6.53 B parameters without the embeddings.
        assert!(close(
            qwen7.total_params() - 2.0 * qwen7.lm_head_params(),
            6.53e9
        ));
        assert_eq!(qwen7.kv_bytes_per_token(), 57_344);
        assert_eq!(qwen7.kv_bytes_per_token_per_gpu(2), 28_672.0);
        // Four KV heads: TP 8 replicates them, two GPUs per head.
        assert_eq!(qwen7.kv_bytes_per_token_per_gpu(8), 14_336.0);
        assert!(qwen7.splits_heads(4) && !qwen7.splits_heads(8) && !qwen7.splits_heads(3));
        let llama8 = dense("llama", 4096, 14336, 32, 32, 8, 128256);
        assert!(
            close(llama8.total_params(), 8.03e9),
            "{}",
            llama8.total_params()
        );
        let llama70 = dense("llama", 8192, 28672, 80, 64, 8, 128256);
        assert!(
            close(llama70.total_params(), 70.55e9),
            "{}",
            llama70.total_params()
        );
        // BF16: 2 bytes a weight, TP splitting all of attention and the FFN.
        assert!(close(llama70.weight_bytes_per_gpu(0.0, 1), 2.0 * 70.55e9));
        assert!(close(
            llama70.weight_bytes_per_gpu(0.0, 4),
            2.0 * 70.55e9 / 4.0
        ));
        let qwen72 = dense("qwen2", 8192, 29568, 80, 64, 8, 152064);
        assert_eq!(qwen72.kv_bytes_per_token(), 327_680);
        let llama405 = dense("llama", 16384, 53248, 126, 128, 8, 128256);
        assert_eq!(llama405.kv_bytes_per_token(), 516_096);
        // Tied embeddings count once.
        let tied = DISTILL_QWEN_7B_JSON.replace(
            "\"tie_word_embeddings\": false",
            "\"tie_word_embeddings\": true",
        );
        let tied = ModelConfig::from_json(&tied).unwrap();
        assert_eq!(
            tied.total_params(),
            qwen7.total_params() - qwen7.lm_head_params()
        );
        // A Qwen2 checkpoint in FP8 reads one byte a weight.
        let fp8 = DISTILL_QWEN_7B_JSON.replace(
            "\"torch_dtype\"",
            "\"quantization_config\": {\"quant_method\": \"fp8\"}, \"torch_dtype\"",
        );
        assert!(ModelConfig::from_json(&fp8).unwrap().fp8_weights);
    }

    #[test]
    fn rejects_bad_dense_configs_and_unknown_types_by_name() {
        let e = ModelConfig::from_json(r#"{"model_type": "mistral", "hidden_size": 4096}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"mistral\""), "{e}");
        let bad_kv = DISTILL_QWEN_7B_JSON
            .replace("\"num_key_value_heads\": 4", "\"num_key_value_heads\": 5");
        let e = ModelConfig::from_json(&bad_kv).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let no_layers =
            DISTILL_QWEN_7B_JSON.replace("\"num_hidden_layers\": 28", "\"num_hidden_layers\": 0");
        assert!(ModelConfig::from_json(&no_layers).is_err());
    }

    #[test]
    fn rejects_bad_configs() {
        assert!(ModelConfig::from_json("{}").is_err());
        let zero_layers =
            DEEPSEEK_V3_JSON.replace("\"num_hidden_layers\": 61", "\"num_hidden_layers\": 0");
        assert!(ModelConfig::from_json(&zero_layers).is_err());
        let no_qlora = DEEPSEEK_V3_JSON.replace("\"q_lora_rank\": 1536", "\"q_lora_rank\": null");
        assert!(ModelConfig::from_json(&no_qlora).is_ok());
    }
}
