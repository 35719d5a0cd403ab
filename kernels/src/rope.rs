//! Rotary position tables, plain or with YaRN scaling, as DeepSeek-V2/V3 define them
//! (`DeepseekV3YarnRotaryEmbedding` in the released modeling code; YaRN paper, Peng et al. 2023).
//!
//! YaRN blends, per rotary frequency, the original frequency (`extrapolation`, high frequencies)
//! and the frequency divided by `factor` (`interpolation`, low frequencies) with a linear ramp
//! between the dimensions where a full rotation takes `beta_fast` and `beta_slow` turns over
//! `original_max_position_embeddings`. Cos and sin are multiplied by
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`, and the attention softmax scale by
//! `mscale(factor, mscale_all_dim)²` ([`softmax_scale_factor`]).
//!
//! Llama 3.1's frequency scaling ([`Llama3`]) builds its tables here too.

use crate::{Device, Result, Tensor};

/// YaRN parameters from `config.json`'s `rope_scaling` (type `yarn`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// `0.1 · m · ln(scale) + 1` for `scale > 1`, else 1 (DeepSeek's `yarn_get_mscale`).
pub fn yarn_get_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// The factor the softmax scale `1/sqrt(qk_head_dim)` is multiplied by.
pub fn softmax_scale_factor(yarn: Option<&Yarn>) -> f64 {
    match yarn {
        Some(y) if y.mscale_all_dim != 0.0 => {
            let m = yarn_get_mscale(y.factor, y.mscale_all_dim);
            m * m
        }
        _ => 1.0,
    }
}

fn correction_dim(num_rotations: f64, dim: usize, base: f64, max_pos: usize) -> f64 {
    (dim as f64 * (max_pos as f64 / (num_rotations * 2.0 * std::f64::consts::PI)).ln())
        / (2.0 * base.ln())
}

/// Inverse frequencies for `dim` rotary dims (`dim/2` values).
pub fn inv_freq(dim: usize, base: f64, yarn: Option<&Yarn>) -> Vec<f64> {
    let half = dim / 2;
    let extra: Vec<f64> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
        .collect();
    let Some(y) = yarn else { return extra };
    let low = correction_dim(y.beta_fast, dim, base, y.original_max_position_embeddings)
        .floor()
        .max(0.0);
    let high = correction_dim(y.beta_slow, dim, base, y.original_max_position_embeddings)
        .ceil()
        .min(dim as f64 - 1.0);
    let high = if low == high { high + 0.001 } else { high };
    (0..half)
        .map(|i| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let inter = extra[i] / y.factor;
            inter * (1.0 - extrapolation) + extra[i] * extrapolation
        })
        .collect()
}

/// `(cos, sin)` tables `[max_positions, dim/2]` with YaRN's mscale folded in.
///
/// Angles are computed as `f32(pos) · f32(inv_freq)` in f32, the way the released code and HF
/// transformers compute them (their `inv_freq` buffer and the product are float32), so that
/// positions far out rotate by the same angle as the reference.
pub fn tables(
    dim: usize,
    base: f64,
    yarn: Option<&Yarn>,
    max_positions: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let m = yarn.map_or(1.0, |y| {
        yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
    });
    tables_from(&inv_freq(dim, base, yarn), m, max_positions, device)
}

/// `(cos, sin)` tables `[max_positions, dim/2]` for Llama 3.1's scaling (no mscale).
pub fn tables_llama3(
    dim: usize,
    base: f64,
    scaling: &Llama3,
    max_positions: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    tables_from(
        &inv_freq_llama3(dim, base, scaling),
        1.0,
        max_positions,
        device,
    )
}

/// Llama 3.1's `rope_scaling` (`rope_type: "llama3"`; HF `_compute_llama3_parameters`): rotary
/// frequencies whose wavelength exceeds `original_max_position_embeddings / low_freq_factor`
/// are divided by `factor`, those shorter than `original / high_freq_factor` kept, and the ones
/// between blended linearly in `original / wavelength`. No attention scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3 {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Inverse frequencies for `dim` rotary dims under [`Llama3`] scaling.
pub fn inv_freq_llama3(dim: usize, base: f64, l: &Llama3) -> Vec<f64> {
    let old = l.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / l.low_freq_factor, old / l.high_freq_factor);
    inv_freq(dim, base, None)
        .into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / l.factor
            } else {
                let smooth =
                    (old / wavelen - l.low_freq_factor) / (l.high_freq_factor - l.low_freq_factor);
                (1.0 - smooth) * f / l.factor + smooth * f
            }
        })
        .collect()
}

fn tables_from(
    inv_freq: &[f64],
    m: f64,
    max_positions: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let freqs: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
    let half = freqs.len();
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for p in 0..max_positions {
        for &f in &freqs {
            let angle = (p as f32 * f) as f64;
            cos.push((angle.cos() * m) as f32);
            sin.push((angle.sin() * m) as f32);
        }
    }
    Ok((
        Tensor::from_f32(&[max_positions, half], cos, device)?,
        Tensor::from_f32(&[max_positions, half], sin, device)?,
    ))
}
