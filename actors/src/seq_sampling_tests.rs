//! [`SeqSampler`] against exact references: draws under presence, frequency and repetition
//! penalties against the penalised softmax (Pearson's chi-square, fixed seeds, critical value at
//! upper tail 1e-6 by Wilson–Hilferty, which overestimates the far-tail quantile for few degrees
//! of freedom: a false failure rate of at most ~1e-6 per check, and a run is deterministic), and
//! returned log-probabilities against an f64 log-softmax of the same logits.

use super::*;

const DRAWS: usize = 200_000;

fn chi2_critical(df: usize) -> f64 {
    const Z_1E6: f64 = 4.753_424;
    let d = df as f64;
    let a = 2.0 / (9.0 * d);
    d * (1.0 - a + Z_1E6 * a.sqrt()).powi(3)
}

fn softmax(logits: &[f64], t: f64) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&v| ((v - max) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn params(temperature: f32, seed: u64) -> SeqParams {
    SeqParams {
        sampling: SamplingParams {
            temperature,
            seed: Some(seed),
            ..Default::default()
        },
        max_new_tokens: 10,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        repetition_penalty: 1.0,
        logit_bias: vec![],
        stop_token_ids: vec![],
        logprobs: None,
        thinking: None,
        grammar: None,
    }
}

/// Draws from `params` on the sequence `tokens` (the first `prompt_len` the prompt) and checks
/// the counts against `want` with a chi-square test.
fn check(
    name: &str,
    p: SeqParams,
    logits: &[f32],
    tokens: &[u32],
    prompt_len: usize,
    want: &[f64],
) {
    let mut s = SeqSampler::new(p);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..DRAWS {
        counts[s.next(logits, tokens, prompt_len, None).0 as usize] += 1;
    }
    let n = DRAWS as f64;
    let stat: f64 = counts
        .iter()
        .zip(want)
        .map(|(&c, &w)| (c as f64 - w * n).powi(2) / (w * n))
        .sum();
    assert!(want.iter().all(|&w| w * n >= 5.0), "{name}: bins too small");
    let critical = chi2_critical(want.len() - 1);
    println!("{name}: chi-square {stat:.2} (critical {critical:.2})");
    assert!(
        stat < critical,
        "{name}: draws do not follow the penalised distribution: chi-square {stat:.1} ≥ \
         {critical:.1}\n  counts {counts:?}\n  expected {:?}",
        want.iter().map(|w| (w * n).round()).collect::<Vec<_>>()
    );
}

const LOGITS: [f32; 8] = [1.0, 2.0, -0.5, 0.5, 1.5, -1.0, 0.2, 1.2];
/// Prompt [2, 3, 3]; generated 1 three times, 4 once, 7 once.
const TOKENS: [u32; 8] = [2, 3, 3, 1, 4, 1, 7, 1];
const PROMPT_LEN: usize = 3;

#[test]
fn presence_penalty_subtracts_once_per_generated_token() {
    // OpenAI's definition: presence subtracts a constant from every token generated at least once,
    // however often; prompt tokens are not penalised.
    let p = SeqParams {
        presence_penalty: 0.8,
        ..params(1.0, 21)
    };
    let mut l: Vec<f64> = LOGITS.iter().map(|&v| v as f64).collect();
    for t in [1, 4, 7] {
        l[t] -= 0.8;
    }
    check(
        "presence 0.8",
        p,
        &LOGITS,
        &TOKENS,
        PROMPT_LEN,
        &softmax(&l, 1.0),
    );
}

#[test]
fn frequency_penalty_subtracts_per_occurrence_and_composes_with_presence() {
    let p = SeqParams {
        frequency_penalty: 0.4,
        presence_penalty: 0.3,
        ..params(0.8, 22)
    };
    let mut l: Vec<f64> = LOGITS.iter().map(|&v| v as f64).collect();
    l[1] -= 3.0 * 0.4 + 0.3;
    l[4] -= 0.4 + 0.3;
    l[7] -= 0.4 + 0.3;
    check(
        "frequency 0.4 + presence 0.3, temperature 0.8",
        p,
        &LOGITS,
        &TOKENS,
        PROMPT_LEN,
        &softmax(&l, 0.8),
    );
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
    // HF / CTRL: over prompt and generated tokens alike (here 1, 2, 3, 4, 7; 2 is negative).
    let p = SeqParams {
        repetition_penalty: 1.6,
        ..params(1.0, 23)
    };
    let mut l: Vec<f64> = LOGITS.iter().map(|&v| v as f64).collect();
    for t in [1, 2, 3, 4, 7] {
        l[t] = if l[t] > 0.0 { l[t] / 1.6 } else { l[t] * 1.6 };
    }
    check(
        "repetition 1.6",
        p,
        &LOGITS,
        &TOKENS,
        PROMPT_LEN,
        &softmax(&l, 1.0),
    );
}

/// log-softmax in f64 of f32 logits.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

#[test]
fn returned_logprobs_are_the_log_softmax_of_the_logits() {
    // A vocabulary of DeepSeek-V3's size with logits spread as a model's are.
    let mut rng = duet_core::rng::Rng::new(31);
    let logits: Vec<f32> = (0..129_280)
        .map(|_| (rng.unit() * 30.0 - 12.0) as f32)
        .collect();
    let want = log_softmax(&logits);
    let mut by_prob: Vec<u32> = (0..logits.len() as u32).collect();
    by_prob.sort_by(|&a, &b| {
        want[b as usize]
            .total_cmp(&want[a as usize])
            .then(a.cmp(&b))
    });
    // f32 results: each value is within a few f32 ulps of the largest magnitude involved (the
    // logit and the log-sum-exp, both below 32 here; an ulp at 32 is 3.8e-6).
    let tol = 4.0 * 32.0 * f32::EPSILON as f64;
    for (temperature, seed) in [(0.0, 1), (1.0, 2)] {
        let mut s = SeqSampler::new(SeqParams {
            logprobs: Some(5),
            ..params(temperature, seed)
        });
        for _ in 0..3 {
            let (t, lp) = s.next(&logits, &[0], 1, None);
            let lp = lp.expect("logprobs were asked for");
            let err = (lp.logprob as f64 - want[t as usize]).abs();
            assert!(
                err < tol,
                "temperature {temperature}: token {t}: logprob {} vs {} (f64)",
                lp.logprob,
                want[t as usize]
            );
            let ids: Vec<u32> = lp.top.iter().map(|x| x.0).collect();
            assert_eq!(ids, by_prob[..5], "the 5 most likely, most likely first");
            for &(id, v) in &lp.top {
                assert!((v as f64 - want[id as usize]).abs() < tol, "top {id}: {v}");
            }
        }
        if temperature == 0.0 {
            assert_eq!(
                s.next(&logits, &[0], 1, None).0,
                by_prob[0],
                "greedy is the argmax"
            );
        }
    }
}
