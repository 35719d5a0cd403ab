//! The decoder: embedding → N × (attention, dense MLP or DeepSeekMoE) → norm → lm_head, where
//! attention is DeepSeek's MLA over the latent cache or, for Qwen2 and Llama, grouped-query
//! attention over a `[k | v]` cache (`gqa.rs`).
//!
//! A forward call takes a batch of sequences, each with some new tokens (a prompt chunk or one
//! decode token) at a start position, and that sequence's KV block table. Every op goes through
//! `duet_kernels::ops`, so the same code runs on any backend.

use std::path::Path;

use duet_kernels::moe::{self, RouterConfig};
use duet_kernels::ops::{self, AttnSeq, MlaShape, PAGE_TOKENS};
use duet_kernels::{DType, Device, Tensor, rope};

use crate::ep::{self, EpRank};
use crate::ffn::{ExpertShape, Ffn, load_experts, load_ffn};
use crate::gqa::{GqaAttention, GqaStep};
use crate::kv::KvCache;
use crate::loader::{LoadProgress, Mapped, TensorSource};
use crate::{Error, ModelConfig, Result};

/// `q_a_layernorm` and `kv_a_layernorm` are built without `rms_norm_eps` in the released modeling
/// code and in HF transformers, so they always use the RMSNorm default.
const LORA_NORM_EPS: f32 = 1e-6;

/// One sequence's part of a forward batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// New tokens to run (a prompt or chunk of it, or the last sampled token).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions `0..start_pos` are already in the cache.
    pub start_pos: usize,
    /// Pages covering at least `start_pos + tokens.len()` tokens.
    pub block_table: &'a [u32],
}

/// Which rows of logits to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Every input position (`duet logits`, scoring).
    All,
    /// Only each sequence's last position (generation): skips the vocabulary projection for the
    /// rest, the largest single matmul of a prefill.
    Last,
}

/// Which attention form to run (for GQA models `Absorbed` is the decode form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionForm {
    /// Decompressing prefill form when any sequence brings more than one token, absorbed
    /// otherwise.
    #[default]
    Auto,
    Prefill,
    Absorbed,
}

enum QProj {
    Lora { a: Tensor, norm: Tensor, b: Tensor },
    Plain(Tensor),
}

struct Attention {
    q: QProj,
    kv_a: Tensor,
    kv_a_norm: Tensor,
    kv_b: Tensor,
    o: Tensor,
}

enum Mlp {
    Dense(Ffn),
    Moe {
        gate: Tensor,
        bias: Option<Tensor>,
        router: RouterConfig,
        experts: Vec<Ffn>,
        shared: Option<Ffn>,
    },
}

enum LayerAttention {
    Mla(Attention),
    Gqa(GqaAttention),
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    attn: LayerAttention,
    mlp: Mlp,
}

pub struct Model {
    pub config: ModelConfig,
    pub dtype: DType,
    pub device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope_cos: Tensor,
    rope_sin: Tensor,
    softmax_scale: f32,
    eps: f32,
    pub attention_form: AttentionForm,
    /// This model's place in an expert-parallel group: it holds only its shard of each MoE
    /// layer's routed experts and reaches the rest through the group (`crate::ep`).
    ep: Option<EpRank>,
}

/// DeepSeek's MLA weights of layer `i`.
fn load_mla(src: &TensorSource<'_>, c: &ModelConfig, i: usize) -> Result<Attention> {
    let h = c.hidden_size;
    let s = c.mla_shape();
    let p = format!("model.layers.{i}");
    let qw = s.heads * c.qk_head_dim();
    let q = match c.q_lora_rank {
        Some(r) if r > 0 => QProj::Lora {
            a: src.weight(&format!("{p}.self_attn.q_a_proj.weight"), &[r, h])?,
            norm: src.f32(&format!("{p}.self_attn.q_a_layernorm.weight"), &[r])?,
            b: src.weight(&format!("{p}.self_attn.q_b_proj.weight"), &[qw, r])?,
        },
        _ => QProj::Plain(src.weight(&format!("{p}.self_attn.q_proj.weight"), &[qw, h])?),
    };
    Ok(Attention {
        q,
        kv_a: src.weight(
            &format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
            &[s.kv_lora + s.rope, h],
        )?,
        kv_a_norm: src.f32(
            &format!("{p}.self_attn.kv_a_layernorm.weight"),
            &[s.kv_lora],
        )?,
        kv_b: src.weight(
            &format!("{p}.self_attn.kv_b_proj.weight"),
            &[s.heads * (s.nope + s.v), s.kv_lora],
        )?,
        o: src.weight(&format!("{p}.self_attn.o_proj.weight"), &[h, s.heads * s.v])?,
    })
}

impl Model {
    /// Loads `dir/config.json` and its safetensors weights, converting weights to `dtype`.
    pub fn load(dir: &Path, dtype: DType, progress: &dyn Fn(LoadProgress)) -> Result<Self> {
        Self::load_with(dir, dtype, progress, None)
    }

    /// Loads rank `ep.me` of an expert-parallel group: every weight but the routed experts, and of
    /// those only the rank's shard (the other experts' bytes are never read or converted).
    pub fn load_ep_rank(
        dir: &Path,
        dtype: DType,
        progress: &dyn Fn(LoadProgress),
        ep: EpRank,
    ) -> Result<Self> {
        Self::load_with(dir, dtype, progress, Some(ep))
    }

    fn load_with(
        dir: &Path,
        dtype: DType,
        progress: &dyn Fn(LoadProgress),
        ep: Option<EpRank>,
    ) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let mapped = Mapped::open(dir)?;
        let fp8_block = config
            .quantization_config
            .as_ref()
            .and_then(|q| q.weight_block_size.as_deref())
            .and_then(|b| match b {
                [r, c] => Some((*r, *c)),
                _ => None,
            });
        let device = Device::Cpu;
        let src = TensorSource::new(dir, &mapped, fp8_block, dtype, device, progress)?;
        Self::from_source(config, &src, ep)
    }

    fn from_source(
        config: ModelConfig,
        src: &TensorSource<'_>,
        rank: Option<EpRank>,
    ) -> Result<Self> {
        let c = &config;
        let config_err = |detail| Error::Config {
            path: src.dir().join("config.json"),
            detail,
        };
        let gqa = c.architecture().map_err(config_err)?.is_gqa();
        let h = c.hidden_size;
        let embed = src.weight("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = if gqa {
                LayerAttention::Gqa(GqaAttention::load(src, c, i)?)
            } else {
                LayerAttention::Mla(load_mla(src, c, i)?)
            };
            let mlp = if c.is_moe_layer(i) {
                let n = c.n_routed_experts.unwrap_or(0);
                let router = c.router(n).map_err(|detail| Error::Config {
                    path: Path::new("config.json").to_path_buf(),
                    detail,
                })?;
                let bias_name = format!("{p}.mlp.gate.e_score_correction_bias");
                let bias = if src.contains(&bias_name) || c.topk_method == "noaux_tc" {
                    Some(src.f32(&bias_name, &[n])?)
                } else {
                    None
                };
                let shape = ExpertShape {
                    experts: n,
                    hidden: h,
                    inter: c.moe_intermediate_size,
                };
                let held: Vec<usize> = match &rank {
                    Some(r) if r.map.experts() != n => {
                        return Err(Error::Config {
                            path: Path::new("config.json").to_path_buf(),
                            detail: format!(
                                "the expert-parallel map places {} experts; layer {i} has {n}",
                                r.map.experts()
                            ),
                        });
                    }
                    Some(r) => r.shard_experts(),
                    None => (0..n).collect(),
                };
                let experts = load_experts(src, &format!("{p}.mlp"), shape, &held)?;
                let shared = match c.n_shared_experts {
                    Some(k) if k > 0 => Some(load_ffn(
                        src,
                        &format!("{p}.mlp.shared_experts"),
                        h,
                        k * c.moe_intermediate_size,
                    )?),
                    _ => None,
                };
                Mlp::Moe {
                    gate: src.f32(&format!("{p}.mlp.gate.weight"), &[n, h])?,
                    bias,
                    router,
                    experts,
                    shared,
                }
            } else {
                Mlp::Dense(load_ffn(src, &format!("{p}.mlp"), h, c.intermediate_size)?)
            };
            layers.push(Layer {
                input_norm: src.f32(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: src.f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn,
                mlp,
            });
        }
        let norm = src.f32("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings && !src.contains("lm_head.weight") {
            embed.clone()
        } else {
            src.weight("lm_head.weight", &[c.vocab_size, h])?
        };
        let rope_cfg = c.rope().map_err(config_err)?;
        let (rope_dim, qk_dim) = if gqa {
            (c.gqa_shape().head_dim, c.gqa_shape().head_dim)
        } else {
            (c.qk_rope_head_dim, c.qk_head_dim())
        };
        let (rope_cos, rope_sin) = match &rope_cfg.llama3 {
            Some(l) => rope::tables_llama3(
                rope_dim,
                rope_cfg.theta,
                l,
                c.max_position_embeddings,
                src.device,
            )?,
            None => rope::tables(
                rope_dim,
                rope_cfg.theta,
                rope_cfg.yarn.as_ref(),
                c.max_position_embeddings,
                src.device,
            )?,
        };
        let softmax_scale = ((qk_dim as f64).powf(-0.5)
            * rope::softmax_scale_factor(rope_cfg.yarn.as_ref()))
            as f32;
        Ok(Self {
            eps: c.rms_norm_eps as f32,
            dtype: src.dtype,
            device: src.device,
            embed,
            layers,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
            softmax_scale,
            attention_form: AttentionForm::Auto,
            config,
            ep: rank,
        })
    }

    /// A KV cache for this model with `pages` pages (`PAGE_TOKENS` tokens each).
    pub fn new_cache(&self, pages: usize) -> KvCache {
        KvCache::new(&self.config, pages, self.dtype, self.device)
    }

    /// Bytes of weights resident (for reports).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.size_bytes() + self.lm_head.size_bytes() + self.norm.size_bytes();
        for l in &self.layers {
            n += l.input_norm.size_bytes() + l.post_norm.size_bytes();
            n += match &l.attn {
                LayerAttention::Mla(a) => {
                    a.kv_a.size_bytes()
                        + a.kv_a_norm.size_bytes()
                        + a.kv_b.size_bytes()
                        + a.o.size_bytes()
                        + match &a.q {
                            QProj::Lora { a, norm, b } => {
                                a.size_bytes() + norm.size_bytes() + b.size_bytes()
                            }
                            QProj::Plain(q) => q.size_bytes(),
                        }
                }
                LayerAttention::Gqa(a) => a.size_bytes(),
            };
            let ffn = Ffn::size_bytes;
            n += match &l.mlp {
                Mlp::Dense(f) => ffn(f),
                Mlp::Moe {
                    gate,
                    experts,
                    shared,
                    ..
                } => {
                    gate.size_bytes()
                        + experts.iter().map(ffn).sum::<usize>()
                        + shared.as_ref().map_or(0, ffn)
                }
            };
        }
        n
    }

    /// Runs the batch through the model, writing the new tokens' latent KV into `cache`, and
    /// returns logits `[rows, vocab]` (rows per `mode`).
    pub fn forward(
        &self,
        cache: &mut KvCache,
        batch: &[SeqInput<'_>],
        mode: LogitsMode,
    ) -> Result<Tensor> {
        self.forward_observed(cache, batch, mode, &mut |_, _| Ok(()))
    }

    /// [`Model::forward`], calling `after_layer(l, cache)` as soon as layer `l`'s latent KV for
    /// the batch is in the cache: a prefill worker streams that layer's pages to decode while the
    /// later layers compute (DESIGN.md, step 3). An error from the callback stops the forward.
    pub fn forward_observed(
        &self,
        cache: &mut KvCache,
        batch: &[SeqInput<'_>],
        mode: LogitsMode,
        after_layer: &mut dyn FnMut(usize, &KvCache) -> Result<()>,
    ) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut seqs = Vec::with_capacity(batch.len());
        let max_pos = self.config.max_position_embeddings;
        for b in batch {
            if b.tokens.is_empty() {
                return Err(Error::Invalid(
                    "a sequence in the batch has no tokens".into(),
                ));
            }
            let end = b.start_pos + b.tokens.len();
            if end > max_pos {
                return Err(Error::TooLong {
                    len: end,
                    max: max_pos,
                });
            }
            if b.block_table.len() * PAGE_TOKENS < end {
                return Err(Error::Invalid(format!(
                    "block table of {} pages cannot hold {end} tokens",
                    b.block_table.len()
                )));
            }
            seqs.push(AttnSeq {
                q_row: ids.len(),
                q_len: b.tokens.len(),
                ctx_len: end,
                block_table: b.block_table,
            });
            for (i, &t) in b.tokens.iter().enumerate() {
                let pos = b.start_pos + i;
                ids.push(t);
                positions.push(pos as u32);
                slots.push(
                    b.block_table[pos / PAGE_TOKENS] * PAGE_TOKENS as u32
                        + (pos % PAGE_TOKENS) as u32,
                );
            }
        }
        let form = match self.attention_form {
            AttentionForm::Auto if batch.iter().all(|b| b.tokens.len() == 1) => {
                AttentionForm::Absorbed
            }
            AttentionForm::Auto => AttentionForm::Prefill,
            f => f,
        };
        let mut x = ops::embedding(&self.embed, &ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.input_norm, self.eps)?;
            let pool = &mut cache.pools[l];
            let a = match &layer.attn {
                LayerAttention::Mla(attn) => {
                    self.attention(attn, &h, &positions, &slots, &seqs, pool, form)?
                }
                LayerAttention::Gqa(attn) => {
                    let step = GqaStep {
                        shape: self.config.gqa_shape(),
                        positions: &positions,
                        slots: &slots,
                        seqs: &seqs,
                        rope_cos: &self.rope_cos,
                        rope_sin: &self.rope_sin,
                        softmax_scale: self.softmax_scale,
                        decode: form == AttentionForm::Absorbed,
                    };
                    attn.forward(&h, &step, pool)?
                }
            };
            ops::add_inplace(&mut x, &a)?;
            after_layer(l, cache)?;
            let h = ops::rms_norm(&x, &layer.post_norm, self.eps)?;
            let m = self.mlp(&layer.mlp, &h)?;
            ops::add_inplace(&mut x, &m)?;
        }
        let x = match mode {
            LogitsMode::All => x,
            LogitsMode::Last => {
                let last: Vec<u32> = seqs
                    .iter()
                    .map(|s| (s.q_row + s.q_len - 1) as u32)
                    .collect();
                ops::gather_rows(&x, &last)?
            }
        };
        let x = ops::rms_norm(&x, &self.norm, self.eps)?;
        Ok(ops::matmul(&x, &self.lm_head)?)
    }

    fn attention(
        &self,
        a: &Attention,
        h: &Tensor,
        positions: &[u32],
        slots: &[u32],
        seqs: &[AttnSeq<'_>],
        pool: &mut Tensor,
        form: AttentionForm,
    ) -> Result<Tensor> {
        let s: MlaShape = self.config.mla_shape();
        let qk = s.nope + s.rope;
        // The first projections share their input: one grouped matmul.
        let (mut q, kva) = match &a.q {
            QProj::Lora { a: qa_w, norm, b } => {
                let mut r = ops::matmul_grouped(&[(h, qa_w), (h, &a.kv_a)])?;
                let kva = r.pop().expect("two results");
                let qa = ops::rms_norm(&r[0], norm, LORA_NORM_EPS)?;
                (ops::matmul(&qa, b)?, kva)
            }
            QProj::Plain(w) => {
                let mut r = ops::matmul_grouped(&[(h, w), (h, &a.kv_a)])?;
                let kva = r.pop().expect("two results");
                (r.pop().expect("two results"), kva)
            }
        };
        ops::rope_inplace(
            &mut q,
            s.heads,
            qk,
            s.nope,
            positions,
            &self.rope_cos,
            &self.rope_sin,
        )?;
        let parts = ops::split_cols(&kva, &[s.kv_lora, s.rope])?;
        let c_kv = ops::rms_norm(&parts[0], &a.kv_a_norm, LORA_NORM_EPS)?;
        let mut k_pe = parts[1].clone();
        ops::rope_inplace(
            &mut k_pe,
            1,
            s.rope,
            0,
            positions,
            &self.rope_cos,
            &self.rope_sin,
        )?;
        let latent = ops::concat_cols(&[&c_kv, &k_pe])?;
        ops::kv_cache_write(pool, &latent, slots)?;
        let out = match form {
            AttentionForm::Absorbed => {
                ops::mla_absorbed(&q, &a.kv_b, pool, seqs, &s, self.softmax_scale)?
            }
            _ => ops::mla_prefill(&q, &a.kv_b, pool, seqs, &s, self.softmax_scale)?,
        };
        Ok(ops::matmul(&out, &a.o)?)
    }

    /// An expert-parallel rank's step with no tokens of its own: it takes part in every MoE
    /// layer's exchanges, serving the rows the other ranks send its experts (every rank of a
    /// group must exchange in every step, as SGLang's DP attention runs idle batches).
    pub fn ep_idle_step(&self) -> Result<()> {
        if self.ep.is_none() {
            return Ok(());
        }
        let empty = Tensor::zeros(&[0, self.config.hidden_size], DType::F32, self.device);
        for layer in &self.layers {
            if matches!(layer.mlp, Mlp::Moe { .. }) {
                self.mlp(&layer.mlp, &empty)?;
            }
        }
        Ok(())
    }

    fn mlp(&self, mlp: &Mlp, h: &Tensor) -> Result<Tensor> {
        match mlp {
            Mlp::Dense(f) => f.forward(h),
            Mlp::Moe {
                gate,
                bias,
                router,
                experts,
                shared,
            } if self.ep.is_some() => {
                let ep = self.ep.as_ref().expect("matched");
                ep::moe_layer(
                    ep,
                    h,
                    gate,
                    bias.as_ref(),
                    router,
                    experts,
                    shared.as_ref(),
                    self.device,
                )
            }
            Mlp::Moe {
                gate,
                bias,
                router,
                experts,
                shared,
            } => {
                let logits = ops::matmul(h, gate)?;
                let routing = moe::route(&logits, bias.as_ref(), router)?;
                let mut out = Tensor::zeros(h.shape(), DType::F32, self.device);
                // Group token rows by expert so each expert runs one matmul over its tokens.
                let mut rows: Vec<Vec<u32>> = vec![Vec::new(); experts.len()];
                let mut weights: Vec<Vec<f32>> = vec![Vec::new(); experts.len()];
                for (i, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
                    rows[e as usize].push((i / routing.top_k) as u32);
                    weights[e as usize].push(w);
                }
                // All experts with tokens, and the shared experts, as one grouped matmul per
                // projection.
                let active: Vec<usize> = (0..experts.len())
                    .filter(|&e| !rows[e].is_empty())
                    .collect();
                let inputs: Vec<Tensor> = active
                    .iter()
                    .map(|&e| ops::gather_rows(h, &rows[e]))
                    .collect::<std::result::Result<_, _>>()?;
                let mut ffns: Vec<&Ffn> = active.iter().map(|&e| &experts[e]).collect();
                let mut xs: Vec<&Tensor> = inputs.iter().collect();
                if let Some(sh) = shared {
                    ffns.push(sh);
                    xs.push(h);
                }
                let pairs: Vec<(&Tensor, &Tensor)> = xs
                    .iter()
                    .zip(&ffns)
                    .map(|(x, f)| (*x, &f.gate_up))
                    .collect();
                let gate_up = ops::matmul_grouped(&pairs)?;
                let acts: Vec<Tensor> = gate_up
                    .iter()
                    .map(ops::silu_mul)
                    .collect::<std::result::Result<_, _>>()?;
                let pairs: Vec<(&Tensor, &Tensor)> =
                    acts.iter().zip(&ffns).map(|(x, f)| (x, &f.down)).collect();
                let mut ys = ops::matmul_grouped(&pairs)?;
                if shared.is_some() {
                    let y = ys.pop().expect("shared expert output");
                    ops::add_inplace(&mut out, &y)?;
                }
                for (&e, y) in active.iter().zip(&ys) {
                    ops::scatter_add_rows(&mut out, y, &rows[e], &weights[e])?;
                }
                Ok(out)
            }
        }
    }
}
