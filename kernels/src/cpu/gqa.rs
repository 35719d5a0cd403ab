//! Grouped-query attention over a paged KV cache (Ainslie et al. 2023, "GQA"; the attention of
//! Llama 2/3 and Qwen2): `heads` query heads share `kv_heads` key/value heads, query head `h`
//! reading kv head `h / (heads / kv_heads)`.
//!
//! Per token and layer the pool holds `[k (kv_heads × head_dim) | v (kv_heads × head_dim)]`, with
//! rope already applied to `k`; pages of `PAGE_TOKENS` tokens as for MLA, so the page allocator,
//! the prefix cache and KV transfer move these pages unchanged.
//!
//! - **prefill form**: per sequence and kv head, gather the context's `K` and `Vᵀ` once, then two
//!   matmuls per query head of the group (scores for the full `[q_len, ctx]` rectangle, the causal
//!   part masked), as `mla_prefill` does.
//! - **decode form**: per query row, dot products straight from the pool rows, parallel over
//!   query heads; nothing is gathered. Cheapest for one token per sequence.
//!
//! Causal mask as for MLA: query `i` of a sequence whose context is `ctx_len` long sits at
//! position `ctx_len - q_len + i` and sees keys `0..=that position`.

use rayon::prelude::*;

use super::{Elem, axpy_elem, dot_elem, softmax};
use crate::shape::{AttnSeq, GqaShape, PAGE_TOKENS};

fn slot(block_table: &[u32], pos: usize) -> usize {
    block_table[pos / PAGE_TOKENS] as usize * PAGE_TOKENS + pos % PAGE_TOKENS
}

/// Prefill form. `q` is `[T, heads, head_dim]` (rope applied); returns `[T, heads, head_dim]`.
pub fn gqa_prefill<E: Elem>(
    q: &[f32],
    pool: &[E],
    seqs: &[AttnSeq<'_>],
    s: &GqaShape,
    scale: f32,
    out: &mut [f32],
) {
    let d = s.head_dim;
    let width = s.pool_width();
    let group = s.heads / s.kv_heads;
    for seq in seqs {
        let ctx = seq.ctx_len;
        let first_pos = ctx - seq.q_len;
        let mut k = vec![0.0f32; ctx * d];
        let mut v_t = vec![0.0f32; d * ctx];
        let mut q_h = vec![0.0f32; seq.q_len * d];
        let mut scores = vec![0.0f32; seq.q_len * ctx];
        let mut o = vec![0.0f32; seq.q_len * d];
        for g in 0..s.kv_heads {
            for j in 0..ctx {
                let row = &pool[slot(seq.block_table, j) * width..][..width];
                let (kr, vr) = (&row[g * d..(g + 1) * d], &row[(s.kv_heads + g) * d..][..d]);
                for (dst, x) in k[j * d..(j + 1) * d].iter_mut().zip(kr) {
                    *dst = x.to_f32();
                }
                for (c, x) in vr.iter().enumerate() {
                    v_t[c * ctx + j] = x.to_f32();
                }
            }
            for h in g * group..(g + 1) * group {
                for i in 0..seq.q_len {
                    q_h[i * d..(i + 1) * d]
                        .copy_from_slice(&q[((seq.q_row + i) * s.heads + h) * d..][..d]);
                }
                super::matmul::matmul(&q_h, seq.q_len, d, &k, ctx, &mut scores);
                for (i, row) in scores.chunks_mut(ctx).enumerate() {
                    let n_keys = first_pos + i + 1;
                    for x in &mut row[..n_keys] {
                        *x *= scale;
                    }
                    softmax(&mut row[..n_keys]);
                    row[n_keys..].fill(0.0);
                }
                super::matmul::matmul(&scores, seq.q_len, ctx, &v_t, d, &mut o);
                for i in 0..seq.q_len {
                    out[((seq.q_row + i) * s.heads + h) * d..][..d]
                        .copy_from_slice(&o[i * d..(i + 1) * d]);
                }
            }
        }
    }
}

/// Decode form. Same inputs and output as [`gqa_prefill`].
pub fn gqa_decode<E: Elem>(
    q: &[f32],
    pool: &[E],
    seqs: &[AttnSeq<'_>],
    s: &GqaShape,
    scale: f32,
    out: &mut [f32],
) {
    let d = s.head_dim;
    let width = s.pool_width();
    let group = s.heads / s.kv_heads;
    let rows: usize = seqs.iter().map(|q| q.q_len).sum();
    let per_head: Vec<Vec<f32>> = (0..s.heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let (k_at, v_at) = (g * d, (s.kv_heads + g) * d);
            let mut o = vec![0.0f32; rows * d];
            let mut scores = Vec::new();
            let mut r = 0;
            for seq in seqs {
                scores.resize(seq.ctx_len, 0.0);
                let first_pos = seq.ctx_len - seq.q_len;
                for i in 0..seq.q_len {
                    let qrow = &q[((seq.q_row + i) * s.heads + h) * d..][..d];
                    let n_keys = first_pos + i + 1;
                    for (j, sc) in scores[..n_keys].iter_mut().enumerate() {
                        let at = slot(seq.block_table, j) * width + k_at;
                        *sc = dot_elem(qrow, &pool[at..at + d]) * scale;
                    }
                    softmax(&mut scores[..n_keys]);
                    let orow = &mut o[r * d..(r + 1) * d];
                    for (j, &p) in scores[..n_keys].iter().enumerate() {
                        let at = slot(seq.block_table, j) * width + v_at;
                        axpy_elem(orow, p, &pool[at..at + d]);
                    }
                    r += 1;
                }
            }
            o
        })
        .collect();
    for (h, o) in per_head.iter().enumerate() {
        let mut r = 0;
        for seq in seqs {
            for i in 0..seq.q_len {
                out[((seq.q_row + i) * s.heads + h) * d..][..d]
                    .copy_from_slice(&o[r * d..(r + 1) * d]);
                r += 1;
            }
        }
    }
}
