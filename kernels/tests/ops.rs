//! Each op against a naive f64 reference. Written against the op set (`ops::*` over `Tensor`), so a
//! second backend runs the same checks with the CPU result as the oracle.

use duet_kernels::moe::{RouterConfig, Scoring, TopkMethod, route};
use duet_kernels::ops::{self, AttnSeq, GqaShape, MlaShape, PAGE_TOKENS};
use duet_kernels::rope::{self, Yarn};
use duet_kernels::{DType, Device, Tensor};
use proptest::prelude::*;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_f32(shape, v, Device::Cpu).unwrap()
}

fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn naive_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                .sum();
        }
    }
    out
}

#[test]
fn matmul_matches_naive_for_every_regime() {
    // m covers the streaming kernel's 1/2/3/4-row blocks and the gemm path; odd n and k cover
    // the tails.
    for &m in &[1, 2, 3, 4, 5, 7, 16, 97, 130] {
        for &(n, k) in &[(37, 5), (130, 64), (64, 130), (9, 1)] {
            for dtype in [DType::F32, DType::BF16] {
                let x = values(m * k, m as u64);
                let w =
                    Tensor::from_f32_as(&[n, k], values(n * k, 7 + n as u64), dtype, Device::Cpu)
                        .unwrap();
                let wv = w.to_vec_f32(); // the rounded weights are the reference's weights
                let out = ops::matmul(&t(&[m, k], x.clone()), &w).unwrap();
                assert_eq!(out.shape(), [m, n]);
                // With BF16 weights on AVX512-BF16 machines the kernel rounds activations to
                // BF16 too (as HF's BF16 path does); the reference follows.
                let xr: Vec<f32> = if dtype == DType::BF16
                    && duet_kernels::cpu::matmul::bf16_weights_round_activations()
                {
                    x.iter()
                        .map(|v| half::bf16::from_f32(*v).to_f32())
                        .collect()
                } else {
                    x.clone()
                };
                let err = max_rel_err(&out.to_vec_f32(), &naive_matmul(&xr, m, k, &wv, n));
                assert!(err < 1e-5, "m={m} n={n} k={k} {dtype:?}: {err}");
            }
        }
    }
}

#[test]
fn matmul_grouped_equals_separate_matmuls() {
    let ws: Vec<Tensor> = (0..5)
        .map(|i| {
            Tensor::from_f32_as(
                &[33 + i, 48],
                values((33 + i) * 48, i as u64),
                DType::BF16,
                Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    let xs: Vec<Tensor> = (0..5)
        .map(|i| t(&[1 + i * 7, 48], values((1 + i * 7) * 48, 100 + i as u64)))
        .collect();
    let pairs: Vec<(&Tensor, &Tensor)> = xs.iter().zip(&ws).collect();
    let grouped = ops::matmul_grouped(&pairs).unwrap();
    for ((x, w), g) in pairs.iter().zip(&grouped) {
        assert_eq!(ops::matmul(x, w).unwrap().to_vec_f32(), g.to_vec_f32());
    }
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    let e = ops::matmul(&t(&[2, 3], vec![0.0; 6]), &t(&[4, 5], vec![0.0; 20])).unwrap_err();
    assert!(e.to_string().contains("matmul"), "{e}");
}

#[test]
fn rms_norm_silu_softmax_match_naive() {
    let x = values(3 * 10, 1);
    let w = values(10, 2);
    let out = ops::rms_norm(&t(&[3, 10], x.clone()), &t(&[10], w.clone()), 1e-6)
        .unwrap()
        .to_vec_f32();
    let mut reference = Vec::new();
    for row in x.chunks(10) {
        let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 10.0;
        reference.extend(
            row.iter()
                .zip(&w)
                .map(|(v, w)| *v as f64 / (ms + 1e-6).sqrt() * *w as f64),
        );
    }
    assert!(max_rel_err(&out, &reference) < 1e-6);

    let gu = values(2 * 8, 3);
    let out = ops::silu_mul(&t(&[2, 8], gu.clone())).unwrap().to_vec_f32();
    let reference: Vec<f64> = gu
        .chunks(8)
        .flat_map(|r| {
            (0..4).map(move |i| {
                let g = r[i] as f64;
                g / (1.0 + (-g).exp()) * r[4 + i] as f64
            })
        })
        .collect();
    assert!(max_rel_err(&out, &reference) < 1e-6);

    let mut row = vec![1000.0, 1001.0, 999.0];
    duet_kernels::cpu::softmax(&mut row);
    let e: Vec<f64> = [0.0f64, 1.0, -1.0].iter().map(|v| v.exp()).collect();
    let s: f64 = e.iter().sum();
    assert!(
        max_rel_err(&row, &e.iter().map(|v| v / s).collect::<Vec<_>>()) < 1e-6,
        "large logits do not overflow"
    );
}

#[test]
fn embedding_rejects_out_of_vocabulary_ids() {
    let table = t(&[4, 2], values(8, 1));
    assert_eq!(
        ops::embedding(&table, &[3, 0]).unwrap().to_vec_f32()[..2],
        table.to_vec_f32()[6..8]
    );
    let e = ops::embedding(&table, &[4]).unwrap_err().to_string();
    assert!(e.contains("token id 4"), "{e}");
}

/// Values HF transformers 5.23 computes for the golden fixtures (tests/golden/HF_SEMANTICS.md §8).
#[test]
fn yarn_matches_hf_worked_values() {
    let v3 = Yarn {
        factor: 4.0,
        original_max_position_embeddings: 16,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: 1.0,
        mscale_all_dim: 0.8,
    };
    let hf = [
        1.0,
        0.079056941,
        0.0250000004,
        0.00790569466,
        0.00249999994,
        0.000790569466,
        0.000250000012,
        7.90569466e-05,
    ];
    for (ours, hf) in rope::inv_freq(16, 10000.0, Some(&v3)).iter().zip(hf) {
        assert!((ours / hf - 1.0).abs() < 1e-6, "{ours} vs {hf}");
    }
    let scale = 40f64.powf(-0.5) * rope::softmax_scale_factor(Some(&v3));
    assert!((scale - 0.19512940158293646).abs() < 1e-12, "{scale}");
    let (cos, _) = rope::tables(16, 10000.0, Some(&v3), 2, Device::Cpu).unwrap();
    assert!(
        (cos.to_vec_f32()[0] as f64 - 1.0249579607969668).abs() < 1e-6,
        "attention factor on cos"
    );

    let grouped = Yarn {
        beta_fast: 4.0,
        beta_slow: 0.5,
        mscale: 0.707,
        mscale_all_dim: 0.707,
        ..v3
    };
    let f = rope::inv_freq(16, 10000.0, Some(&grouped));
    assert!(
        (f[1] / 0.197642356 - 1.0).abs() < 1e-6,
        "a fractional ramp blends: {}",
        f[1]
    );
}

fn router(method: TopkMethod, scoring: Scoring) -> RouterConfig {
    RouterConfig {
        n_experts: 8,
        top_k: 2,
        n_group: 4,
        topk_group: 2,
        scoring,
        method,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
        scale_after_norm: true,
    }
}

#[test]
fn noaux_tc_selects_by_biased_group_scores_and_weights_by_unbiased() {
    // Experts 0..8 in 4 groups of 2. Without bias the best experts are 6 and 7 (group 3); the
    // bias makes groups 0 and 1 win, so experts come from there, weighted by the raw sigmoid.
    let logits = t(&[1, 8], vec![0.0, 0.1, 0.2, -0.5, -3.0, -3.0, 3.0, 2.9]);
    let bias = t(&[8], vec![5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0]);
    let r = route(
        &logits,
        Some(&bias),
        &router(TopkMethod::NoauxTc, Scoring::Sigmoid),
    )
    .unwrap();
    let mut chosen = r.experts.clone();
    chosen.sort();
    assert_eq!(chosen, vec![1, 2]);
    let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
    let (s1, s2) = (sig(0.1), sig(0.2));
    let w: f32 = r.weights.iter().sum();
    assert!((w - 2.5).abs() < 1e-5, "normalised then scaled: {w}");
    let w2 = r.weights[r.experts.iter().position(|&e| e == 2).unwrap()];
    assert!((w2 - 2.5 * s2 / (s1 + s2)).abs() < 1e-5);
}

#[test]
fn v2_routing_greedy_and_group_limited() {
    let logits = t(&[1, 8], vec![0.0, 4.0, 0.0, 0.0, 3.0, 3.5, 0.0, 0.0]);
    let mut cfg = router(TopkMethod::Greedy, Scoring::Softmax);
    cfg.norm_topk_prob = false;
    cfg.scale_after_norm = false;
    let r = route(&logits, None, &cfg).unwrap();
    assert_eq!(r.experts, vec![1, 5]);
    // Group-limited with one group kept: group 0 (experts 0, 1) has the best max, so only its
    // experts are eligible even though expert 5 beats expert 0.
    cfg.method = TopkMethod::GroupLimitedGreedy;
    cfg.topk_group = 1;
    let r = route(&logits, None, &cfg).unwrap();
    assert_eq!(r.experts, vec![1, 0]);
}

proptest! {
    #[test]
    fn routing_invariants(seed in 0u64..500, tokens in 1usize..6) {
        let logits = t(&[tokens, 8], values(tokens * 8, seed).iter().map(|v| v * 4.0).collect());
        let bias = t(&[8], values(8, seed + 1));
        let cfg = router(TopkMethod::NoauxTc, Scoring::Sigmoid);
        let r = route(&logits, Some(&bias), &cfg).unwrap();
        prop_assert_eq!(r.experts.len(), tokens * 2);
        for (experts, weights) in r.experts.chunks(2).zip(r.weights.chunks(2)) {
            prop_assert!(experts[0] != experts[1]);
            let groups: std::collections::BTreeSet<u32> = experts.iter().map(|e| e / 2).collect();
            prop_assert!(groups.len() <= cfg.topk_group);
            prop_assert!(((weights.iter().sum::<f32>()) - 2.5).abs() < 1e-4);
            prop_assert!(weights.iter().all(|w| *w > 0.0));
        }
    }
}

/// Plain multi-head attention over decompressed K/V, in f64: the definition MLA must equal.
fn reference_mla(
    q: &[f32],
    kv_b: &[f32],
    latent: &[Vec<f32>],
    q_pos: &[usize],
    s: &MlaShape,
    scale: f64,
) -> Vec<f64> {
    let (qw, kvw, width) = (s.nope + s.rope, s.nope + s.v, s.kv_lora + s.rope);
    let decompress = |row: &[f32], r: usize| -> f64 {
        (0..s.kv_lora)
            .map(|c| row[c] as f64 * kv_b[r * s.kv_lora + c] as f64)
            .sum()
    };
    let mut out = vec![0.0; q_pos.len() * s.heads * s.v];
    for (i, &pos) in q_pos.iter().enumerate() {
        for h in 0..s.heads {
            let qr = &q[(i * s.heads + h) * qw..][..qw];
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    let row = &latent[j];
                    let nope: f64 = (0..s.nope)
                        .map(|d| qr[d] as f64 * decompress(row, h * kvw + d))
                        .sum();
                    let pe: f64 = (0..s.rope)
                        .map(|d| qr[s.nope + d] as f64 * row[s.kv_lora + d] as f64)
                        .sum();
                    (nope + pe) * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..s.v {
                out[(i * s.heads + h) * s.v + d] = (0..=pos)
                    .map(|j| e[j] / sum * decompress(&latent[j], h * kvw + s.nope + d))
                    .sum();
            }
            let _ = width;
        }
    }
    out
}

#[test]
fn mla_prefill_and_absorbed_forms_equal_plain_attention_over_scattered_pages() {
    let s = MlaShape {
        heads: 3,
        kv_lora: 16,
        rope: 8,
        nope: 12,
        v: 10,
    };
    let width = s.kv_lora + s.rope;
    let pages = 6;
    let mut pool = Tensor::zeros(&[pages, PAGE_TOKENS, width], DType::F32, Device::Cpu);
    // Sequence A: 70 tokens of context in pages 4 and 1 (not in order), 3 new queries at the end.
    // Sequence B: 5 tokens in page 2, all new (a prefill).
    let table_a = [4u32, 1];
    let table_b = [2u32];
    let lat_a: Vec<Vec<f32>> = (0..70).map(|j| values(width, 1000 + j)).collect();
    let lat_b: Vec<Vec<f32>> = (0..5).map(|j| values(width, 2000 + j)).collect();
    for (lat, table) in [(&lat_a, &table_a[..]), (&lat_b, &table_b[..])] {
        let slots: Vec<u32> = (0..lat.len())
            .map(|p| table[p / PAGE_TOKENS] * PAGE_TOKENS as u32 + (p % PAGE_TOKENS) as u32)
            .collect();
        let flat: Vec<f32> = lat.iter().flatten().copied().collect();
        ops::kv_cache_write(&mut pool, &t(&[lat.len(), width], flat), &slots).unwrap();
    }
    let kv_b = values(s.heads * (s.nope + s.v) * s.kv_lora, 7);
    let kv_b_t = t(&[s.heads * (s.nope + s.v), s.kv_lora], kv_b.clone());
    let rows = 3 + 5;
    let q = values(rows * s.heads * (s.nope + s.rope), 9);
    let seqs = [
        AttnSeq {
            q_row: 0,
            q_len: 3,
            ctx_len: 70,
            block_table: &table_a,
        },
        AttnSeq {
            q_row: 3,
            q_len: 5,
            ctx_len: 5,
            block_table: &table_b,
        },
    ];
    let scale = 0.3;
    let qt = t(&[rows, s.heads * (s.nope + s.rope)], q.clone());
    let prefill = ops::mla_prefill(&qt, &kv_b_t, &pool, &seqs, &s, scale as f32)
        .unwrap()
        .to_vec_f32();
    let absorbed = ops::mla_absorbed(&qt, &kv_b_t, &pool, &seqs, &s, scale as f32)
        .unwrap()
        .to_vec_f32();
    let qw = s.heads * (s.nope + s.rope);
    let mut reference = reference_mla(&q[..3 * qw], &kv_b, &lat_a, &[67, 68, 69], &s, scale);
    reference.extend(reference_mla(
        &q[3 * qw..],
        &kv_b,
        &lat_b,
        &[0, 1, 2, 3, 4],
        &s,
        scale,
    ));
    assert!(max_rel_err(&prefill, &reference) < 1e-5, "prefill form");
    assert!(max_rel_err(&absorbed, &reference) < 1e-5, "absorbed form");

    // A block table too short for its context is an error, not an out-of-bounds read.
    let bad = [AttnSeq {
        q_row: 0,
        q_len: 3,
        ctx_len: 70,
        block_table: &table_a[..1],
    }];
    assert!(
        ops::mla_absorbed(
            &t(&[3, qw], q[..3 * qw].to_vec()),
            &kv_b_t,
            &pool,
            &bad,
            &s,
            0.3
        )
        .is_err()
    );
}

/// Plain causal GQA in f64 over one sequence's `[k | v]` rows, queries at `q_pos`.
fn reference_gqa(
    q: &[f32],
    kv: &[Vec<f32>],
    q_pos: &[usize],
    s: &GqaShape,
    scale: f64,
) -> Vec<f64> {
    let d = s.head_dim;
    let group = s.heads / s.kv_heads;
    let mut out = vec![0.0; q_pos.len() * s.heads * d];
    for (i, &pos) in q_pos.iter().enumerate() {
        for h in 0..s.heads {
            let g = h / group;
            let qr = &q[(i * s.heads + h) * d..][..d];
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..d)
                        .map(|c| qr[c] as f64 * kv[j][g * d + c] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                out[(i * s.heads + h) * d + c] = (0..=pos)
                    .map(|j| e[j] / sum * kv[j][(s.kv_heads + g) * d + c] as f64)
                    .sum();
            }
        }
    }
    out
}

#[test]
fn gqa_prefill_and_decode_forms_equal_plain_attention_over_scattered_pages() {
    let s = GqaShape {
        heads: 6,
        kv_heads: 2,
        head_dim: 8,
    };
    let width = s.pool_width();
    for dtype in [DType::F32, DType::BF16] {
        let mut pool = Tensor::zeros(&[5, PAGE_TOKENS, width], dtype, Device::Cpu);
        // A: 70 tokens in pages 3 then 0, the last 3 new; B: 4 tokens in page 4, all new.
        let (table_a, table_b) = ([3u32, 0], [4u32]);
        let kv_a: Vec<Vec<f32>> = (0..70).map(|j| values(width, 300 + j)).collect();
        let kv_b: Vec<Vec<f32>> = (0..4).map(|j| values(width, 400 + j)).collect();
        for (kv, table) in [(&kv_a, &table_a[..]), (&kv_b, &table_b[..])] {
            let slots: Vec<u32> = (0..kv.len())
                .map(|p| table[p / PAGE_TOKENS] * PAGE_TOKENS as u32 + (p % PAGE_TOKENS) as u32)
                .collect();
            let flat: Vec<f32> = kv.iter().flatten().copied().collect();
            ops::kv_cache_write(&mut pool, &t(&[kv.len(), width], flat), &slots).unwrap();
        }
        // The reference reads what the pool holds (BF16-rounded for a BF16 pool).
        let round = |kv: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            kv.iter()
                .map(|r| {
                    Tensor::from_f32_as(&[width], r.clone(), dtype, Device::Cpu)
                        .unwrap()
                        .to_vec_f32()
                })
                .collect()
        };
        let qw = s.heads * s.head_dim;
        let q = values(7 * qw, 11);
        let seqs = [
            AttnSeq {
                q_row: 0,
                q_len: 3,
                ctx_len: 70,
                block_table: &table_a,
            },
            AttnSeq {
                q_row: 3,
                q_len: 4,
                ctx_len: 4,
                block_table: &table_b,
            },
        ];
        let scale = 0.35;
        let qt = t(&[7, qw], q.clone());
        let mut reference = reference_gqa(&q[..3 * qw], &round(&kv_a), &[67, 68, 69], &s, scale);
        reference.extend(reference_gqa(
            &q[3 * qw..],
            &round(&kv_b),
            &[0, 1, 2, 3],
            &s,
            scale,
        ));
        for (form, out) in [
            (
                "prefill",
                ops::gqa_prefill(&qt, &pool, &seqs, &s, scale as f32),
            ),
            (
                "decode",
                ops::gqa_decode(&qt, &pool, &seqs, &s, scale as f32),
            ),
        ] {
            let err = max_rel_err(&out.unwrap().to_vec_f32(), &reference);
            assert!(err < 1e-5, "{form} form, {dtype:?} pool: {err}");
        }
        // A block table too short for its context, or heads not a multiple of kv heads, is an
        // error.
        let short = [AttnSeq {
            q_row: 0,
            q_len: 3,
            ctx_len: 70,
            block_table: &table_a[..1],
        }];
        let q3 = t(&[3, qw], q[..3 * qw].to_vec());
        assert!(ops::gqa_decode(&q3, &pool, &short, &s, 1.0).is_err());
        assert!(ops::gqa_prefill(&q3, &pool, &short, &s, 1.0).is_err());
        let odd = GqaShape {
            heads: 5,
            kv_heads: 2,
            head_dim: 8,
        };
        assert!(
            ops::gqa_decode(&t(&[3, 40], vec![0.0; 120]), &pool, &seqs[..1], &odd, 1.0).is_err()
        );
    }
}

#[test]
fn rope_halves_rotates_pairs_half_a_head_apart() {
    let (heads, d) = (2, 8);
    let (cos, sin) = rope::tables(d, 10000.0, None, 5, Device::Cpu).unwrap();
    let x = values(3 * heads * d, 5);
    let mut xt = t(&[3, heads * d], x.clone());
    let positions = [0u32, 4, 2];
    ops::rope_halves_inplace(&mut xt, heads, d, &positions, &cos, &sin).unwrap();
    let got = xt.to_vec_f32();
    let inv = rope::inv_freq(d, 10000.0, None);
    for (r, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (r * heads + h) * d;
            for i in 0..d / 2 {
                let a = (p as f32 * inv[i] as f32) as f64;
                let (x1, x2) = (x[base + i] as f64, x[base + i + d / 2] as f64);
                assert!((got[base + i] as f64 - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-6);
                assert!(
                    (got[base + i + d / 2] as f64 - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-6
                );
            }
        }
    }
    assert!(ops::rope_halves_inplace(&mut xt, heads, d, &[0, 5, 1], &cos, &sin).is_err());
}

#[test]
fn llama3_scaling_keeps_high_divides_low_and_blends_medium_frequencies() {
    // Llama 3.1's published values: factor 8, low 1, high 4, original 8192, theta 500000,
    // head_dim 128. Wavelength 2π/f: below 2048 kept, above 8192 divided by 8, between blended.
    let l = rope::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let plain = rope::inv_freq(128, 500000.0, None);
    let scaled = rope::inv_freq_llama3(128, 500000.0, &l);
    let mut kinds = [0; 3];
    for (f, g) in plain.iter().zip(&scaled) {
        let wavelen = 2.0 * std::f64::consts::PI / f;
        if wavelen < 2048.0 {
            assert_eq!(f, g);
            kinds[0] += 1;
        } else if wavelen > 8192.0 {
            assert!((g - f / 8.0).abs() < 1e-15);
            kinds[2] += 1;
        } else {
            let smooth = (8192.0 / wavelen - 1.0) / 3.0;
            assert!((g - ((1.0 - smooth) * f / 8.0 + smooth * f)).abs() < 1e-15);
            assert!(*g < *f && *g > f / 8.0);
            kinds[1] += 1;
        }
    }
    assert!(
        kinds.iter().all(|&k| k > 0),
        "all three regimes occur: {kinds:?}"
    );
}

#[test]
fn add_bias_adds_to_every_row() {
    let mut x = t(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    ops::add_bias_inplace(&mut x, &t(&[3], vec![0.5, -1.0, 2.0])).unwrap();
    assert_eq!(x.to_vec_f32(), [1.5, 1.0, 5.0, 4.5, 4.0, 8.0]);
    assert!(ops::add_bias_inplace(&mut x, &t(&[2], vec![0.0; 2])).is_err());
}
