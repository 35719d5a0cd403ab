//! The model side of the cost model: a DeepSeek-V3-architecture `config.json` and the sizes and
//! FLOP counts derived from it (anchors-performance.md §10).
//!
//! Any config with MLA (`kv_lora_rank`, `qk_rope_head_dim`, …) and DeepSeekMoE (`n_routed_experts`,
//! `num_experts_per_tok`, …) works: other layer, head or expert counts, or no q-LoRA
//! (`q_lora_rank: null`, as in V2-Lite). Fields the simulator does not use (rope scaling, token ids)
//! are ignored.

use serde::Deserialize;

use crate::SimError;

/// The fields of a DeepSeek-V3 `config.json` that set sizes and FLOPs. Names are Hugging Face's.
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
}

/// DeepSeek-V3/R1's config.json (anchors §10a, confirmed against three sources).
pub const DEEPSEEK_V3_JSON: &str = r#"{
  "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3,
  "intermediate_size": 18432, "n_routed_experts": 256, "num_experts_per_tok": 8,
  "n_shared_experts": 1, "moe_intermediate_size": 2048, "num_attention_heads": 128,
  "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
  "v_head_dim": 128, "vocab_size": 129280, "num_nextn_predict_layers": 1, "n_group": 8
}"#;

/// Bytes per weight: DeepSeek ships FP8 E4M3 linear weights (anchors §10a); the 128×128 block scales
/// add 1/16384 and are ignored.
const LINEAR_WEIGHT_BYTES: f64 = 1.0;
/// Embedding and lm_head stay BF16 (anchors §10b, "plus embedding + head 3.7 (BF16)").
const EMBED_WEIGHT_BYTES: f64 = 2.0;
/// Latent KV is kept in BF16, what FlashMLA's dense decode kernel reads (DESIGN.md "The KV cache").
const KV_VALUE_BYTES: u64 = 2;
/// Largest accepted layer, head, expert or width count: far above any released model, low enough
/// that products of a few of them cannot overflow f64's exact integer range.
const DIM_MAX: u64 = 1 << 20;

impl ModelConfig {
    /// The built-in DeepSeek-V3 config.
    pub fn deepseek_v3() -> Self {
        Self::from_json(DEEPSEEK_V3_JSON).expect("the built-in config parses")
    }

    /// Parses and checks a config.json's text.
    pub fn from_json(text: &str) -> Result<Self, SimError> {
        let cfg: ModelConfig = serde_json::from_str(text)
            .map_err(|e| SimError::ModelConfig(format!("not a DeepSeek-V3 config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
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

    /// MLA weights of one layer (anchors §10b: 187.1 M for V3).
    pub fn mla_params_per_layer(&self) -> f64 {
        let h = self.hidden_size as f64;
        let heads = self.num_attention_heads as f64;
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
        self.layers() * self.mla_params_per_layer()
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

    /// All weights including every routed expert (671 B for V3).
    pub fn total_params(&self) -> f64 {
        self.replicated_linear_params()
            + self.moe_layers() * self.n_routed_experts as f64 * self.expert_params()
            + 2.0 * self.lm_head_params()
    }

    /// The part of [`Self::replicated_linear_params`] that attention tensor parallelism splits
    /// across the TP ranks: the per-head MLA projections (q_b, kv_b, o), the dense FFN layers and the
    /// shared experts. The latent down-projections (q_a, kv_a) and the router stay whole on every
    /// rank, as SGLang keeps them (`ReplicatedLinear`), because their output is the shared latent.
    pub fn tp_split_params(&self) -> f64 {
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
            * LINEAR_WEIGHT_BYTES
            + 2.0 * self.lm_head_params() * EMBED_WEIGHT_BYTES / tp.max(1) as f64
    }

    /// Latent KV bytes per token over all layers: (kv_lora_rank + qk_rope_head_dim) × 2 B × layers
    /// = 70,272 B for V3 (anchors §10c, ISCA'25 Table 1).
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.kv_lora_rank + self.qk_rope_head_dim) * KV_VALUE_BYTES * self.num_hidden_layers
    }

    /// Decode attention FLOPs per query token per context token, absorbed form:
    /// layers · 2 · heads · (576 + 512) (anchors §10d: 16.99 MFLOP for V3).
    pub fn decode_attn_flops_per_ctx(&self) -> f64 {
        let k = (self.kv_lora_rank + self.qk_rope_head_dim) as f64;
        let v = self.kv_lora_rank as f64;
        self.layers() * 2.0 * self.num_attention_heads as f64 * (k + v)
    }

    /// Prefill attention FLOPs per query token per context token, MHA form:
    /// layers · 2 · heads · (qk 192 + v 128) (anchors §10d).
    pub fn prefill_attn_flops_per_ctx(&self) -> f64 {
        let qk = (self.qk_nope_head_dim + self.qk_rope_head_dim) as f64;
        self.layers() * 2.0 * self.num_attention_heads as f64 * (qk + self.v_head_dim as f64)
    }

    /// FLOPs to decompress one cached prefix token's latent into MHA keys and values (kv_b), needed
    /// when prefill extends a cached prefix in MHA form.
    pub fn prefix_decompress_flops_per_token(&self) -> f64 {
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
        assert!(close(m.mla_params_per_layer(), 187.1e6, 0.001));
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
