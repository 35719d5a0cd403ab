//! Multi-head Latent Attention over the paged latent KV cache (DeepSeek-V2 paper §2.1).
//!
//! Per token and layer the cache holds `[c_kv (kv_lora) | k_pe (rope)]`, 576 values for V3.
//! `kv_b_proj` (`[H·(nope+v), kv_lora]`) holds, per head, `W_UK` (nope rows) then `W_UV` (v rows).
//!
//! - **prefill form**: decompress the context once, `[k_nope | v] = c_kv · kv_bᵀ`, then ordinary
//!   causal attention per head with `k = [k_nope | k_pe]`. Cheapest when many queries share the
//!   context.
//! - **absorbed form** (decode): `q_lat = q_nope · W_UK` moves the query into latent space,
//!   `score = q_lat · c_kv + q_pe · k_pe`, `o_lat = Σ p · c_kv`, and `out = W_UV · o_lat`. The
//!   cache is never decompressed, so a step reads 576 values per context token for all heads.
//!
//! Both forms apply the causal mask inside a sequence: query `i` of a sequence whose context
//! (cache, including the new tokens) is `ctx_len` long sits at position `ctx_len - q_len + i` and
//! sees keys `0..=that position`.

use rayon::prelude::*;

use super::{Elem, axpy_elem, dot_elem, softmax};
use crate::shape::{AttnSeq, MlaShape, PAGE_TOKENS};

fn slot(block_table: &[u32], pos: usize) -> usize {
    block_table[pos / PAGE_TOKENS] as usize * PAGE_TOKENS + pos % PAGE_TOKENS
}

/// Reads a sequence's cached latent rows `0..ctx_len` into f32 `[ctx_len, width]`.
fn gather_context<E: Elem>(pool: &[E], width: usize, seq: &AttnSeq<'_>) -> Vec<f32> {
    let mut out = vec![0.0f32; seq.ctx_len * width];
    for (p, row) in out.chunks_mut(width).enumerate() {
        let s = slot(seq.block_table, p);
        for (o, v) in row.iter_mut().zip(&pool[s * width..(s + 1) * width]) {
            *o = v.to_f32();
        }
    }
    out
}

/// Prefill form. `q` is `[T, H, nope + rope]` (rope part already rotated); returns `[T, H, v]`.
pub fn mla_prefill<W: Elem, E: Elem>(
    q: &[f32],
    kv_b: &[W],
    pool: &[E],
    seqs: &[AttnSeq<'_>],
    s: &MlaShape,
    scale: f32,
    out: &mut [f32],
) {
    let width = s.kv_lora + s.rope;
    let qw = s.nope + s.rope;
    let kvw = s.nope + s.v;
    for seq in seqs {
        let ctx = gather_context(pool, width, seq);
        // c_kv rows are the first kv_lora values of each context row.
        let mut c_kv = vec![0.0f32; seq.ctx_len * s.kv_lora];
        for (dst, src) in c_kv.chunks_mut(s.kv_lora).zip(ctx.chunks(width)) {
            dst.copy_from_slice(&src[..s.kv_lora]);
        }
        let mut kv = vec![0.0f32; seq.ctx_len * s.heads * kvw];
        super::matmul::matmul(&c_kv, seq.ctx_len, s.kv_lora, kv_b, s.heads * kvw, &mut kv);
        let first_pos = seq.ctx_len - seq.q_len;
        let ctx_len = seq.ctx_len;
        // Per head, both products are matmuls (vectorised, parallel inside): the full
        // [q_len, ctx] score rectangle is computed and the causal part masked, which costs at
        // most twice the triangle's FLOPs but runs at the matmul kernels' rate.
        let mut k_h = vec![0.0f32; ctx_len * qw];
        let mut v_t = vec![0.0f32; s.v * ctx_len];
        let mut q_h = vec![0.0f32; seq.q_len * qw];
        let mut scores = vec![0.0f32; seq.q_len * ctx_len];
        let mut o = vec![0.0f32; seq.q_len * s.v];
        for h in 0..s.heads {
            for j in 0..ctx_len {
                let kv_row = &kv[(j * s.heads + h) * kvw..][..kvw];
                let dst = &mut k_h[j * qw..(j + 1) * qw];
                dst[..s.nope].copy_from_slice(&kv_row[..s.nope]);
                dst[s.nope..].copy_from_slice(&ctx[j * width + s.kv_lora..(j + 1) * width]);
                for d in 0..s.v {
                    v_t[d * ctx_len + j] = kv_row[s.nope + d];
                }
            }
            for i in 0..seq.q_len {
                q_h[i * qw..(i + 1) * qw]
                    .copy_from_slice(&q[((seq.q_row + i) * s.heads + h) * qw..][..qw]);
            }
            super::matmul::matmul(&q_h, seq.q_len, qw, &k_h, ctx_len, &mut scores);
            for (i, row) in scores.chunks_mut(ctx_len).enumerate() {
                let n_keys = first_pos + i + 1;
                for v in &mut row[..n_keys] {
                    *v *= scale;
                }
                softmax(&mut row[..n_keys]);
                row[n_keys..].fill(0.0);
            }
            super::matmul::matmul(&scores, seq.q_len, ctx_len, &v_t, s.v, &mut o);
            for i in 0..seq.q_len {
                out[((seq.q_row + i) * s.heads + h) * s.v..][..s.v]
                    .copy_from_slice(&o[i * s.v..(i + 1) * s.v]);
            }
        }
    }
}

/// Absorbed (decode) form. Same inputs and output as [`mla_prefill`].
pub fn mla_absorbed<W: Elem, E: Elem>(
    q: &[f32],
    kv_b: &[W],
    pool: &[E],
    seqs: &[AttnSeq<'_>],
    s: &MlaShape,
    scale: f32,
    out: &mut [f32],
) {
    let width = s.kv_lora + s.rope;
    let qw = s.nope + s.rope;
    let kvw = s.nope + s.v;
    let per_head: Vec<Vec<f32>> = (0..s.heads)
        .into_par_iter()
        .map(|h| {
            let w_uk = &kv_b[h * kvw * s.kv_lora..(h * kvw + s.nope) * s.kv_lora];
            let w_uv = &kv_b[(h * kvw + s.nope) * s.kv_lora..(h + 1) * kvw * s.kv_lora];
            let rows: usize = seqs.iter().map(|q| q.q_len).sum();
            let mut o = vec![0.0f32; rows * s.v];
            let mut q_lat = vec![0.0f32; s.kv_lora];
            let mut o_lat = vec![0.0f32; s.kv_lora];
            let mut scores = Vec::new();
            let mut r = 0;
            for seq in seqs {
                scores.resize(seq.ctx_len, 0.0);
                let first_pos = seq.ctx_len - seq.q_len;
                for i in 0..seq.q_len {
                    let qrow = &q[((seq.q_row + i) * s.heads + h) * qw..][..qw];
                    let (q_nope, q_pe) = qrow.split_at(s.nope);
                    q_lat.fill(0.0);
                    for (d, &qv) in q_nope.iter().enumerate() {
                        axpy_elem(&mut q_lat, qv, &w_uk[d * s.kv_lora..(d + 1) * s.kv_lora]);
                    }
                    let n_keys = first_pos + i + 1;
                    for j in 0..n_keys {
                        let sl = slot(seq.block_table, j);
                        let row = &pool[sl * width..(sl + 1) * width];
                        let (c, k_pe) = row.split_at(s.kv_lora);
                        scores[j] = (dot_elem(&q_lat, c) + dot_elem(q_pe, k_pe)) * scale;
                    }
                    softmax(&mut scores[..n_keys]);
                    o_lat.fill(0.0);
                    for j in 0..n_keys {
                        let sl = slot(seq.block_table, j);
                        axpy_elem(
                            &mut o_lat,
                            scores[j],
                            &pool[sl * width..sl * width + s.kv_lora],
                        );
                    }
                    let orow = &mut o[r * s.v..(r + 1) * s.v];
                    for (d, ov) in orow.iter_mut().enumerate() {
                        *ov = dot_elem(&o_lat, &w_uv[d * s.kv_lora..(d + 1) * s.kv_lora]);
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
                let dst = &mut out[((seq.q_row + i) * s.heads + h) * s.v..][..s.v];
                dst.copy_from_slice(&o[r * s.v..(r + 1) * s.v]);
                r += 1;
            }
        }
    }
}
