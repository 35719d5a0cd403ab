//! Workloads: synthetic (Poisson or gamma arrivals, fixed or distributed lengths, a prefix-sharing
//! ratio) or replayed from a JSONL trace in Mooncake's published format (anchors §6:
//! `timestamp`, `input_length`, `output_length`, `hash_ids`).
//!
//! Prompts are token ids made up so that the real radix prefix cache sees real sharing: tokens that
//! should match (a shared system prompt, a trace's equal block hash) are the same ids, everything
//! else is unique to its request.

use serde::Deserialize;

use crate::SimError;
use crate::rng::{Rng, mix64};

/// Longest prompt or output accepted, tokens: 4× V3's 160 K context, so a typo (an extra zero)
/// fails instead of allocating gigabytes of token ids.
pub const LENGTH_MAX: u64 = 640 * 1024;
/// Most requests one run may hold: 10 M, ten times the speed benchmark (each costs ~100 B plus its
/// live token ids).
pub const REQUESTS_MAX: usize = 10_000_000;
/// Tokens per `hash_ids` block in Mooncake's traces (FAST'25 release README).
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

/// A length distribution, from a CLI string: `4096` (fixed), `1024-8192` (uniform),
/// `lognormal:4096:0.8` (mean, coefficient of variation) or `exp:300` (exponential mean).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LenDist {
    Fixed(u64),
    Uniform { lo: u64, hi: u64 },
    LogNormal { mean: f64, cv: f64 },
    Exponential { mean: f64 },
}

impl LenDist {
    pub fn parse(s: &str) -> Result<Self, SimError> {
        let bad = |why: &str| SimError::Workload(format!("length {s:?}: {why}"));
        let num = |t: &str| t.trim().parse::<f64>().map_err(|_| bad("not a number"));
        let d = if let Some(rest) = s.strip_prefix("lognormal:") {
            let (m, cv) = rest
                .split_once(':')
                .ok_or_else(|| bad("lognormal:MEAN:CV"))?;
            LenDist::LogNormal {
                mean: num(m)?,
                cv: num(cv)?,
            }
        } else if let Some(m) = s.strip_prefix("exp:") {
            LenDist::Exponential { mean: num(m)? }
        } else if let Some((lo, hi)) = s.split_once('-') {
            LenDist::Uniform {
                lo: num(lo)? as u64,
                hi: num(hi)? as u64,
            }
        } else {
            LenDist::Fixed(num(s)? as u64)
        };
        let ok = match d {
            LenDist::Fixed(n) => (1..=LENGTH_MAX).contains(&n),
            LenDist::Uniform { lo, hi } => lo >= 1 && lo <= hi && hi <= LENGTH_MAX,
            LenDist::LogNormal { mean, cv } => {
                mean >= 1.0 && mean <= LENGTH_MAX as f64 && (0.0..=10.0).contains(&cv)
            }
            LenDist::Exponential { mean } => mean >= 1.0 && mean <= LENGTH_MAX as f64,
        };
        if !ok {
            return Err(bad(&format!("lengths must lie in 1..={LENGTH_MAX}")));
        }
        Ok(d)
    }

    pub fn mean(&self) -> f64 {
        match *self {
            LenDist::Fixed(n) => n as f64,
            LenDist::Uniform { lo, hi } => (lo + hi) as f64 / 2.0,
            LenDist::LogNormal { mean, .. } | LenDist::Exponential { mean } => mean,
        }
    }

    fn sample(&self, rng: &mut Rng) -> u32 {
        let x = match *self {
            LenDist::Fixed(n) => n as f64,
            LenDist::Uniform { lo, hi } => (lo + rng.below(hi - lo + 1)) as f64,
            LenDist::LogNormal { mean, cv } => rng.lognormal(mean, cv).round(),
            LenDist::Exponential { mean } => rng.exponential(mean).round(),
        };
        x.clamp(1.0, LENGTH_MAX as f64) as u32
    }
}

/// When requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Poisson process, requests per second.
    Poisson { rate: f64 },
    /// Gamma-distributed gaps with the given coefficient of variation (bursty when > 1).
    Gamma { rate: f64, cv: f64 },
    /// Everything at time 0: the cluster runs flat out (throughput measurement).
    Saturate,
}

/// A synthetic workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Synthetic {
    pub requests: usize,
    pub arrivals: Arrivals,
    pub input: LenDist,
    pub output: LenDist,
    /// Fraction of each prompt that is a prefix shared with other requests.
    pub prefix_ratio: f64,
    /// Distinct shared prefixes (system prompts, documents).
    pub prefix_groups: u32,
}

/// How a request's prompt tokens are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The first `prefix_len` tokens are shared prefix `group`; the rest are unique.
    Shared { group: u32, prefix_len: u32 },
    /// Mooncake: one hash per 512-token block; equal hashes are equal tokens.
    Blocks(Vec<u64>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub arrival_us: u64,
    pub input_len: u32,
    pub output_len: u32,
    pub prompt: Prompt,
}

impl Request {
    /// The prompt's token ids; `id` and `seed` make the unique part unique to this request and run.
    /// Only equality between tokens matters (prefix caches and the router compare them), so each run
    /// of tokens is a cheap stream from one well-mixed seed: equal seeds give equal runs.
    pub fn prompt_tokens(&self, id: u64, seed: u64) -> Vec<u32> {
        let n = self.input_len as usize;
        // Tags keep the three kinds of run from sharing a seed by construction of the hash input.
        const SHARED: u64 = 1 << 62;
        const BLOCK: u64 = 2 << 62;
        let mut out = Vec::with_capacity(n);
        let unique = mix64(seed ^ mix64(id));
        match &self.prompt {
            Prompt::Shared { group, prefix_len } => {
                let shared = (*prefix_len as usize).min(n);
                let group_seed = mix64(seed ^ SHARED ^ ((*group as u64) << 32));
                token_run(&mut out, group_seed, shared);
                token_run(&mut out, unique, n - shared);
            }
            Prompt::Blocks(hashes) => {
                let mut left = n;
                for h in hashes {
                    if left == 0 {
                        break;
                    }
                    let len = left.min(MOONCAKE_BLOCK_TOKENS);
                    token_run(&mut out, mix64(seed ^ BLOCK ^ mix64(*h)), len);
                    left -= len;
                }
                token_run(&mut out, unique, left);
            }
        }
        out
    }
}

/// Appends `len` tokens of the stream seeded by `seed` (a 64-bit LCG's high halves: distinct seeds
/// give unrelated runs, the same seed the same run).
fn token_run(out: &mut Vec<u32>, seed: u64, len: usize) {
    let mut x = seed;
    out.extend((0..len).map(|_| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 32) as u32
    }));
}

impl Synthetic {
    pub fn generate(&self, rng: &mut Rng) -> Result<Vec<Request>, SimError> {
        if self.requests == 0 || self.requests > REQUESTS_MAX {
            return Err(SimError::Workload(format!(
                "requests must lie in 1..={REQUESTS_MAX}"
            )));
        }
        if !(0.0..1.0).contains(&self.prefix_ratio) {
            return Err(SimError::Workload(format!(
                "prefix ratio {} is not in [0, 1)",
                self.prefix_ratio
            )));
        }
        let rate_ok = |r: f64| r.is_finite() && r > 0.0;
        match self.arrivals {
            Arrivals::Poisson { rate } if !rate_ok(rate) => {
                return Err(SimError::Workload(format!("rate {rate} must be > 0")));
            }
            Arrivals::Gamma { rate, cv } if !(rate_ok(rate) && cv > 0.0 && cv <= 100.0) => {
                return Err(SimError::Workload(format!(
                    "gamma arrivals: rate {rate} must be > 0 and cv {cv} in (0, 100]"
                )));
            }
            _ => {}
        }
        let mut t_s = 0.0;
        let groups = self.prefix_groups.max(1) as u64;
        let mut out = Vec::with_capacity(self.requests);
        for _ in 0..self.requests {
            let input_len = self.input.sample(rng);
            let output_len = self.output.sample(rng);
            let group = rng.below(groups) as u32;
            let prefix_len = (input_len as f64 * self.prefix_ratio) as u32;
            out.push(Request {
                arrival_us: (t_s * 1e6) as u64,
                input_len,
                output_len,
                prompt: Prompt::Shared { group, prefix_len },
            });
            t_s += match self.arrivals {
                Arrivals::Poisson { rate } => rng.exponential(1.0 / rate),
                Arrivals::Gamma { rate, cv } => {
                    let k = 1.0 / (cv * cv);
                    rng.gamma(k, 1.0 / (rate * k))
                }
                Arrivals::Saturate => 0.0,
            };
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
struct TraceLine {
    timestamp: f64,
    input_length: u64,
    output_length: u64,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Parses a Mooncake-format JSONL trace (timestamps in milliseconds). Requests are returned in
/// timestamp order (stable for equal stamps); `limit` keeps the first that many lines.
pub fn parse_mooncake_trace(text: &str, limit: Option<usize>) -> Result<Vec<Request>, SimError> {
    let mut out = Vec::new();
    let limit = limit.unwrap_or(REQUESTS_MAX).min(REQUESTS_MAX);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if out.len() >= limit {
            break;
        }
        let bad = |why: String| SimError::Workload(format!("trace line {}: {why}", i + 1));
        let l: TraceLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if !(l.timestamp.is_finite() && l.timestamp >= 0.0) {
            return Err(bad(format!("timestamp {} is not ≥ 0", l.timestamp)));
        }
        for (name, v) in [
            ("input_length", l.input_length),
            ("output_length", l.output_length),
        ] {
            if !(1..=LENGTH_MAX).contains(&v) {
                return Err(bad(format!("{name} {v} is not in 1..={LENGTH_MAX}")));
            }
        }
        let blocks_max = (l.input_length as usize).div_ceil(MOONCAKE_BLOCK_TOKENS) + 1;
        if l.hash_ids.len() > blocks_max {
            return Err(bad(format!(
                "{} hash_ids for {} input tokens (512 per block)",
                l.hash_ids.len(),
                l.input_length
            )));
        }
        out.push(Request {
            arrival_us: (l.timestamp * 1e3) as u64,
            input_len: l.input_length as u32,
            output_len: l.output_length as u32,
            prompt: Prompt::Blocks(l.hash_ids),
        });
    }
    if out.is_empty() {
        return Err(SimError::Workload("the trace has no requests".into()));
    }
    out.sort_by_key(|r| r.arrival_us);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lengths() {
        assert_eq!(LenDist::parse("4096").unwrap(), LenDist::Fixed(4096));
        assert_eq!(
            LenDist::parse("10-20").unwrap(),
            LenDist::Uniform { lo: 10, hi: 20 }
        );
        assert!(matches!(
            LenDist::parse("lognormal:1000:0.5").unwrap(),
            LenDist::LogNormal { .. }
        ));
        for bad in ["0", "-5", "abc", "20-10", "99999999", "lognormal:5"] {
            assert!(LenDist::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_prefixes_share_tokens() {
        let w = Synthetic {
            requests: 50,
            arrivals: Arrivals::Poisson { rate: 10.0 },
            input: LenDist::Fixed(1000),
            output: LenDist::Fixed(10),
            prefix_ratio: 0.5,
            prefix_groups: 1,
        };
        let reqs = w.generate(&mut Rng::new(1)).unwrap();
        let (a, b) = (reqs[0].prompt_tokens(0, 9), reqs[1].prompt_tokens(1, 9));
        assert_eq!(a[..500], b[..500]);
        assert_ne!(a[500..], b[500..]);
        assert!(reqs.windows(2).all(|p| p[0].arrival_us <= p[1].arrival_us));
    }

    #[test]
    fn mooncake_trace() {
        let text = r#"{"timestamp": 5, "input_length": 1000, "output_length": 7, "hash_ids": [1, 2]}
{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 3]}
"#;
        let reqs = parse_mooncake_trace(text, None).unwrap();
        assert_eq!(reqs[0].input_len, 600);
        assert_eq!(reqs[1].arrival_us, 5000);
        let (a, b) = (reqs[0].prompt_tokens(0, 1), reqs[1].prompt_tokens(1, 1));
        assert_eq!(a[..512], b[..512]);
        assert_ne!(a[512..600], b[512..600]);
        for bad in [
            "{\"timestamp\": -1, \"input_length\": 5, \"output_length\": 1}",
            "{\"timestamp\": 0, \"input_length\": 0, \"output_length\": 1}",
            "{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [1,2,3]}",
            "not json",
            "",
        ] {
            assert!(parse_mooncake_trace(bad, None).is_err(), "{bad}");
        }
    }
}
