//! The sampler's draws against the exact distribution its parameters define: temperature, top-k,
//! top-p, min-p and their combination, each checked with Pearson's chi-square test on draws from
//! a fixed seed.
//!
//! False-failure rate: each test compares its statistic with the chi-square quantile at upper
//! tail 1e-6 (Wilson–Hilferty's approximation, which overestimates the far-tail quantile for
//! few degrees of freedom, so the rate is at most ~1e-6 per check). The seeds are fixed, so a
//! run is deterministic: a failure is a change in the sampler, not bad luck. A token the
//! parameters exclude must never be drawn (checked exactly, outside the chi-square).

use duet_model::sampling::{Sampler, SamplingParams};

const DRAWS: usize = 200_000;

/// Upper 1e-6 quantile of the standard normal.
const Z_1E6: f64 = 4.753_424;

/// Chi-square quantile with `df` degrees of freedom at upper tail 1e-6 (Wilson–Hilferty).
fn chi2_critical(df: usize) -> f64 {
    let d = df as f64;
    let a = 2.0 / (9.0 * d);
    d * (1.0 - a + Z_1E6 * a.sqrt()).powi(3)
}

/// softmax(logits / t) in f64.
fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&v| ((v as f64 - max) / t).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// The distribution the README and `sampling.rs` define: temperature, then top-k (the k most
/// likely), top-p (the smallest most-likely-first prefix whose mass reaches p, within what top-k
/// kept), min-p (probability at least min_p times the most likely one's), renormalised.
fn exact(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
    let probs = softmax(logits, p.temperature as f64);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut keep = vec![true; probs.len()];
    if p.top_k > 0 {
        for &i in &order[p.top_k.min(order.len())..] {
            keep[i] = false;
        }
    }
    if p.top_p < 1.0 {
        let kept: f64 = (0..probs.len())
            .filter(|&i| keep[i])
            .map(|i| probs[i])
            .sum();
        let mut acc = 0.0;
        let mut reached = false;
        let nucleus: Vec<usize> = order.iter().copied().filter(|&i| keep[i]).collect();
        for i in nucleus {
            if reached {
                keep[i] = false;
            } else {
                acc += probs[i] / kept;
                reached = acc >= p.top_p as f64;
            }
        }
    }
    if p.min_p > 0.0 {
        let top = probs[order[0]];
        for i in 0..probs.len() {
            if probs[i] < p.min_p as f64 * top {
                keep[i] = false;
            }
        }
    }
    let mass: f64 = (0..probs.len())
        .filter(|&i| keep[i])
        .map(|i| probs[i])
        .sum();
    (0..probs.len())
        .map(|i| if keep[i] { probs[i] / mass } else { 0.0 })
        .collect()
}

/// Draws `DRAWS` tokens and checks them against `want`: excluded tokens never drawn, and Pearson's
/// chi-square over the rest (tokens expected fewer than 5 times pooled into one bin) below the
/// 1e-6 critical value.
fn check_draws(name: &str, draws: usize, mut draw: impl FnMut() -> u32, want: &[f64]) {
    let mut counts = vec![0usize; want.len()];
    for _ in 0..draws {
        counts[draw() as usize] += 1;
    }
    for (i, (&c, &w)) in counts.iter().zip(want).enumerate() {
        assert!(
            w > 0.0 || c == 0,
            "{name}: token {i} is excluded but was drawn {c} times"
        );
    }
    let n = draws as f64;
    let (mut stat, mut bins) = (0.0, 0);
    let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
    for (&c, &w) in counts.iter().zip(want).filter(|(_, w)| **w > 0.0) {
        let e = w * n;
        if e < 5.0 {
            pooled_obs += c as f64;
            pooled_exp += e;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled_exp > 0.0 {
        stat += (pooled_obs - pooled_exp).powi(2) / pooled_exp;
        bins += 1;
    }
    assert!(bins >= 2, "{name}: a test needs at least two outcomes");
    let critical = chi2_critical(bins - 1);
    println!("{name}: chi-square {stat:.2} over {bins} bins (critical {critical:.2})");
    assert!(
        stat < critical,
        "{name}: draws do not follow the exact distribution: chi-square {stat:.1} ≥ {critical:.1} \
         with {} degrees of freedom\n  counts {counts:?}\n  expected {:?}",
        bins - 1,
        want.iter().map(|w| (w * n).round()).collect::<Vec<_>>()
    );
}

fn check(name: &str, logits: &[f32], params: SamplingParams) {
    check_n(name, DRAWS, logits, params)
}

fn check_n(name: &str, draws: usize, logits: &[f32], params: SamplingParams) {
    let want = exact(logits, &params);
    let mut s = Sampler::new(params);
    check_draws(name, draws, || s.sample(logits), &want);
}

/// Twelve tokens with well-separated logits; no cumulative mass lands near the top-p values used.
const LOGITS: [f32; 12] = [
    2.0, -1.0, 0.5, 3.1, 1.2, -0.3, 2.6, 0.0, 1.7, -2.5, 0.9, 2.2,
];

fn params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn temperature_draws_follow_the_scaled_softmax() {
    for (t, seed) in [(1.0, 1), (0.5, 2), (2.0, 3)] {
        check(&format!("temperature {t}"), &LOGITS, params(t, seed));
    }
}

#[test]
fn top_k_draws_follow_the_renormalised_k_most_likely() {
    let p = SamplingParams {
        top_k: 4,
        ..params(0.8, 4)
    };
    assert_eq!(exact(&LOGITS, &p).iter().filter(|&&w| w > 0.0).count(), 4);
    check("top_k 4", &LOGITS, p);
}

#[test]
fn top_p_draws_follow_the_renormalised_nucleus() {
    // The nucleus at 0.7 (temperature 1) is the 4 most likely tokens: their mass is 0.775, the
    // first 3 have 0.665, so the token that crosses p is kept.
    let p = SamplingParams {
        top_p: 0.7,
        ..params(1.0, 5)
    };
    assert_eq!(exact(&LOGITS, &p).iter().filter(|&&w| w > 0.0).count(), 4);
    check("top_p 0.7", &LOGITS, p);
    let p = SamplingParams {
        top_p: 0.9,
        ..params(1.3, 6)
    };
    check("top_p 0.9, temperature 1.3", &LOGITS, p);
}

#[test]
fn min_p_draws_follow_the_tokens_above_the_floor() {
    // At temperature 1.5, p ≥ 0.3 · p_max keeps 5 of the 12 tokens (the 6th has 0.28 · p_max).
    let p = SamplingParams {
        min_p: 0.3,
        ..params(1.5, 7)
    };
    assert_eq!(exact(&LOGITS, &p).iter().filter(|&&w| w > 0.0).count(), 5);
    check("min_p 0.3", &LOGITS, p);
}

#[test]
fn combined_filters_follow_their_composition() {
    let p = SamplingParams {
        temperature: 0.7,
        top_k: 8,
        top_p: 0.95,
        min_p: 0.05,
        seed: Some(8),
    };
    check("top_k 8, top_p 0.95, min_p 0.05", &LOGITS, p);
}

#[test]
fn a_long_tail_keeps_its_mass() {
    // A few likely tokens and a long tail of unlikely ones, as a model's logits look: the pooled
    // tail bin checks that the many unlikely tokens keep their mass, and top-p cuts inside it.
    let vocab = 1024;
    let mut rng = duet_model::rng::Rng::new(11);
    let logits: Vec<f32> = (0..vocab)
        .map(|i| {
            let base = (rng.unit() * 4.0 - 2.0) as f32;
            if i % 101 == 0 { base + 6.0 } else { base }
        })
        .collect();
    check_n(
        "vocab 1024, temperature 1",
        50_000,
        &logits,
        params(1.0, 12),
    );
    let p = SamplingParams {
        top_p: 0.5,
        ..params(0.9, 13)
    };
    check_n("vocab 1024, top_p 0.5", 50_000, &logits, p);
}
