//! Token sampling from logits: temperature, then top-k, top-p (nucleus) and min-p filters,
//! then a draw from the renormalised distribution. Temperature 0 is greedy (argmax).
//! The same seed and logits give the same token.

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Rejects values no sampler can honour, with the parameter's name.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::new);
        Self { params, rng }
    }

    /// A sampler that continues another's random stream (a sequence moving between processes).
    pub fn resume(params: SamplingParams, rng_state: [u64; 4]) -> Self {
        Self {
            params,
            rng: Rng::from_state(rng_state),
        }
    }

    pub fn rng_state(&self) -> [u64; 4] {
        self.rng.state()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut cand: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, ((v as f64 - max) * inv_t).exp()))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let filtering = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if filtering {
            let by_prob = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            if p.top_k > 0 && p.top_k < cand.len() {
                cand.select_nth_unstable_by(p.top_k - 1, by_prob);
                cand.truncate(p.top_k);
            }
            cand.sort_unstable_by(by_prob);
            let total: f64 = cand.iter().map(|c| c.1).sum();
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                let mut keep = cand.len();
                for (i, c) in cand.iter().enumerate() {
                    acc += c.1 / total;
                    if acc >= p.top_p as f64 {
                        keep = i + 1;
                        break;
                    }
                }
                cand.truncate(keep);
            }
            if p.min_p > 0.0 {
                let floor = cand[0].1 * p.min_p as f64;
                cand.retain(|c| c.1 >= floor);
            }
        }
        let total: f64 = cand.iter().map(|c| c.1).sum();
        let mut u = self.rng.unit() * total;
        for c in &cand {
            u -= c.1;
            if u < 0.0 {
                return c.0;
            }
        }
        cand.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1 over a flat-ish distribution varies"
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_filters_hold() {
        let logits = [1.0, 5.0, 4.9, -3.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        // top_p small keeps only the best token.
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.01,
            seed: Some(2),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        // min_p 0.5 keeps tokens with p ≥ half the best: 1 and 2, never 0 or 3.
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        let seen: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(seen.iter().all(|&t| t == 1 || t == 2));
        assert!(seen.contains(&1) && seen.contains(&2));
    }
}
