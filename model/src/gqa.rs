//! Grouped-query self-attention of Qwen2 and Llama (HF `Qwen2Attention`, `LlamaAttention`):
//! `q/k/v_proj` (Qwen2: with biases; Llama: with biases on all four projections when
//! `attention_bias`), RoPE in the rotate-half layout on q and k, `[k | v]` written to the layer's
//! paged pool, softmax scale `head_dim^-½`, `o_proj`.
//!
//! q, k and v share their input, so they are stored stacked and run as one matmul.

use duet_kernels::Tensor;
use duet_kernels::ops::{self, AttnSeq, GqaShape};

use crate::loader::TensorSource;
use crate::{Architecture, Error, ModelConfig, Result};

pub(crate) struct GqaAttention {
    /// `q_proj`, `k_proj`, `v_proj` stacked: `[(heads + 2·kv_heads)·head_dim, hidden]`.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    o_bias: Option<Tensor>,
}

/// What one layer's attention needs besides its weights.
pub(crate) struct GqaStep<'a> {
    pub shape: GqaShape,
    pub positions: &'a [u32],
    pub slots: &'a [u32],
    pub seqs: &'a [AttnSeq<'a>],
    pub rope_cos: &'a Tensor,
    pub rope_sin: &'a Tensor,
    pub softmax_scale: f32,
    /// The decode form (one token per sequence) rather than the prefill form.
    pub decode: bool,
}

impl GqaAttention {
    pub fn load(src: &TensorSource<'_>, c: &ModelConfig, layer: usize) -> Result<Self> {
        let arch = c.architecture().map_err(|detail| Error::Config {
            path: src.dir().join("config.json"),
            detail,
        })?;
        let g = c.gqa_shape();
        let (h, d) = (c.hidden_size, g.head_dim);
        let p = format!("model.layers.{layer}.self_attn");
        let (q_rows, kv_rows) = (g.heads * d, g.kv_heads * d);
        let mut qkv = src.f32_values(&format!("{p}.q_proj.weight"), &[q_rows, h])?;
        qkv.extend(src.f32_values(&format!("{p}.k_proj.weight"), &[kv_rows, h])?);
        qkv.extend(src.f32_values(&format!("{p}.v_proj.weight"), &[kv_rows, h])?);
        let qkv_biased = arch == Architecture::Qwen2 || c.attention_bias;
        let qkv_bias = if qkv_biased {
            let mut b = src.f32_values(&format!("{p}.q_proj.bias"), &[q_rows])?;
            b.extend(src.f32_values(&format!("{p}.k_proj.bias"), &[kv_rows])?);
            b.extend(src.f32_values(&format!("{p}.v_proj.bias"), &[kv_rows])?);
            Some(Tensor::from_f32(&[q_rows + 2 * kv_rows], b, src.device)?)
        } else {
            None
        };
        // Llama's attention_bias puts a bias on o_proj too; Qwen2's o_proj never has one.
        let o_bias = if arch == Architecture::Llama && c.attention_bias {
            Some(src.f32(&format!("{p}.o_proj.bias"), &[h])?)
        } else {
            None
        };
        Ok(Self {
            qkv: Tensor::from_f32_as(&[q_rows + 2 * kv_rows, h], qkv, src.dtype, src.device)?,
            qkv_bias,
            o: src.weight(&format!("{p}.o_proj.weight"), &[h, q_rows])?,
            o_bias,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.qkv.size_bytes()
            + self.o.size_bytes()
            + self.qkv_bias.as_ref().map_or(0, Tensor::size_bytes)
            + self.o_bias.as_ref().map_or(0, Tensor::size_bytes)
    }

    /// Attention of the batch's rows `h` (`[T, hidden]`), writing their `[k | v]` into `pool`.
    pub fn forward(&self, h: &Tensor, step: &GqaStep<'_>, pool: &mut Tensor) -> Result<Tensor> {
        let g = step.shape;
        let d = g.head_dim;
        let mut qkv = ops::matmul(h, &self.qkv)?;
        if let Some(b) = &self.qkv_bias {
            ops::add_bias_inplace(&mut qkv, b)?;
        }
        let mut parts = ops::split_cols(&qkv, &[g.heads * d, 2 * g.kv_heads * d])?;
        let mut kv = parts.pop().expect("two parts");
        let mut q = parts.pop().expect("two parts");
        ops::rope_halves_inplace(
            &mut q,
            g.heads,
            d,
            step.positions,
            step.rope_cos,
            step.rope_sin,
        )?;
        // k is the first kv_heads·d columns of [k | v]: rotate it there, v passes untouched.
        let mut k_v = ops::split_cols(&kv, &[g.kv_heads * d, g.kv_heads * d])?;
        ops::rope_halves_inplace(
            &mut k_v[0],
            g.kv_heads,
            d,
            step.positions,
            step.rope_cos,
            step.rope_sin,
        )?;
        kv = ops::concat_cols(&[&k_v[0], &k_v[1]])?;
        ops::kv_cache_write(pool, &kv, step.slots)?;
        let out = if step.decode {
            ops::gqa_decode(&q, pool, step.seqs, &g, step.softmax_scale)?
        } else {
            ops::gqa_prefill(&q, pool, step.seqs, &g, step.softmax_scale)?
        };
        let mut o = ops::matmul(&out, &self.o)?;
        if let Some(b) = &self.o_bias {
            ops::add_bias_inplace(&mut o, b)?;
        }
        Ok(o)
    }
}
