//! The CPU backend: multi-threaded over the rayon pool (one thread per core by default).

pub mod attention;
pub mod gqa;
pub mod matmul;

use rayon::prelude::*;

/// An element a weight or KV pool can be stored as; computation is always in f32.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Whether [`Elem::load8`] exists for the AVX2 kernels.
    const HAS_AVX2_LOAD: bool;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The slice as BF16 when it is BF16 (for the AVX512-BF16 kernels).
    fn as_bf16(s: &[Self]) -> Option<&[half::bf16]>;
    /// `src` as f32: borrowed when it already is, converted into `scratch` otherwise.
    fn as_f32_block<'a>(src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];
    /// Loads 8 consecutive elements as f32 lanes.
    ///
    /// # Safety
    /// 8 elements must be readable at `p`, and the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

/// Rows per rayon task for cheap elementwise ops: below this, splitting costs more than it saves.
const ROWS_PER_TASK_ELEMENTWISE: usize = 8;

/// Below this many elements an elementwise op runs on the calling thread: waking the pool costs
/// more than the op (a decode step's activations are a few thousand values).
const SEQUENTIAL_ELEMS_MAX: usize = 1 << 16;

/// Dot product of two f32 slices (see [`dot_elem`]).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_elem(a, b)
}

/// Dot product with `b` stored as `E`, in eight independent partial sums so the compiler can
/// vectorise it without reassociating floats on its own.
#[inline]
pub fn dot_elem<E: Elem>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (ac, bc) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += ac[l] * bc[l].to_f32();
        }
    }
    let mut s = 0.0;
    for i in chunks * 8..n {
        s += a[i] * b[i].to_f32();
    }
    s + acc.iter().sum::<f32>()
}

/// `y += alpha * x` with `x` stored as `E`.
#[inline]
pub fn axpy_elem<E: Elem>(y: &mut [f32], alpha: f32, x: &[E]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi.to_f32();
    }
}

/// RMSNorm over rows of width `w.len()`: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    if x.len() <= SEQUENTIAL_ELEMS_MAX {
        for (orow, xrow) in out.chunks_mut(d).zip(x.chunks(d)) {
            rms_row(xrow, w, eps, orow);
        }
        return;
    }
    out.par_chunks_mut(d * ROWS_PER_TASK_ELEMENTWISE)
        .zip(x.par_chunks(d * ROWS_PER_TASK_ELEMENTWISE))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_mut(d).zip(xi.chunks(d)) {
                rms_row(xrow, w, eps, orow);
            }
        });
}

fn rms_row(xrow: &[f32], w: &[f32], eps: f32, orow: &mut [f32]) {
    let ms = dot(xrow, xrow) / w.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((oi, &xv), &wv) in orow.iter_mut().zip(xrow).zip(w) {
        *oi = xv * inv * wv;
    }
}

/// `silu(gate) * up` where each input row is `[gate | up]`, both of width `inter`.
pub fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
    if gu.len() <= SEQUENTIAL_ELEMS_MAX {
        for (o, row) in out.chunks_mut(inter).zip(gu.chunks(2 * inter)) {
            let (g, u) = row.split_at(inter);
            for i in 0..inter {
                o[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            }
        }
        return;
    }
    out.par_chunks_mut(inter)
        .zip(gu.par_chunks(2 * inter))
        .for_each(|(o, row)| {
            let (g, u) = row.split_at(inter);
            for i in 0..inter {
                let gv = g[i];
                o[i] = gv / (1.0 + (-gv).exp()) * u[i];
            }
        });
}

/// Numerically stable softmax of one row, in place.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Rotates interleaved pairs `(x[2i], x[2i+1])` by `pos · inv_freq[i]`, DeepSeek's layout.
/// `cos`/`sin` are rows of `rope/2` values for this position (with YaRN's mscale folded in).
#[inline]
pub fn rope_pairs(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for i in 0..cos.len() {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * cos[i] - b * sin[i];
        x[2 * i + 1] = a * sin[i] + b * cos[i];
    }
}

/// Rotates pairs `(x[i], x[i + d/2])` of a `d`-wide head by `pos · inv_freq[i]`: the "rotate
/// half" layout of Llama and Qwen2 (HF's `apply_rotary_pos_emb`). `cos`/`sin` hold `d/2` values.
#[inline]
pub fn rope_halves(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}
