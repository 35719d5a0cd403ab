//! Exact-min against power-of-two-choices for decode DP-group balancing, with stale load reports.
//!
//! `cargo run --release -p duet-core --example balance`
//!
//! A deterministic step-level model of one gateway in front of G decode DP-attention groups:
//!
//! - arrivals are Poisson at each of `LOADS` of the groups' decode slots (Little's law over the mean residence);
//! - prompts are uniform in 64..=4096 tokens, `max_tokens` is one of 256/1024/4096, and the actual
//!   output length is exponential with mean `OUTPUT_MEAN_TOKENS`, capped at `max_tokens` (so the
//!   gateway's "outstanding tokens" estimate, which can only use `max_tokens`, is wrong as in life);
//! - a routed sequence reserves its prompt pages at once, spends 2..=12 steps in prefill, then decodes
//!   one token per step, growing a page every 64 tokens;
//! - the balancer sees each group's true load only every R steps, plus the gateway's own increments
//!   for what it routed since the last report.
//!
//! Printed per (G, R, policy), averaged over `SEEDS`: the mean over steps of max/mean outstanding tokens
//! and of max/mean batch size across groups (in DP attention + EP every group waits for the slowest at
//! each all-to-all, so the largest batch sets the step time) and of max/mean KV tokens attended over
//! (decode attention work), the p99 per-group batch size, and the
//! mean number of requests waiting at the gateway because no group had room.

use duet_core::pages_for;
use duet_core::route::{BalancePolicy, DecodeBalancer, GroupLoad, SplitMix64};
use duet_core::types::WorkerId;

/// Decode slots per group (`max_running`).
const MAX_RUNNING: usize = 128;
/// KV pages per group: 4096 × 64 = 256 Ki tokens, enough that slots, not pages, bind at this load.
const PAGES_PER_GROUP: usize = 4096;
/// Offered loads as fractions of all decode slots: moderately busy, and close to saturation.
const LOADS: [f64; 2] = [0.6, 0.9];
const OUTPUT_MEAN_TOKENS: f64 = 400.0;
const MAX_TOKENS_CHOICES: [u64; 3] = [256, 1024, 4096];
const PROMPT_TOKENS_MIN: u64 = 64;
const PROMPT_TOKENS_MAX: u64 = 4096;
const PREFILL_STEPS_MIN: u64 = 2;
const PREFILL_STEPS_MAX: u64 = 12;
const WARMUP_STEPS: u64 = 2_000;
const MEASURE_STEPS: u64 = 10_000;
const SEEDS: [u64; 3] = [1, 2, 3];

struct Seq {
    prompt: u64,
    /// Tokens still to generate, in truth.
    left: u64,
    /// Tokens still to generate as the gateway estimates: max_tokens minus generated.
    left_est: u64,
    generated: u64,
    /// Step at which prefill is done and decoding starts.
    join_step: u64,
}

#[derive(Default)]
struct Group {
    seqs: Vec<Seq>,
}

impl Group {
    fn pages_used(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| pages_for((s.prompt + s.generated) as usize))
            .sum()
    }

    fn load(&self, id: usize, step: u64) -> GroupLoad {
        let outstanding = self
            .seqs
            .iter()
            .map(|s| s.left_est + if step < s.join_step { s.prompt } else { 0 })
            .sum();
        GroupLoad {
            group: WorkerId(id as u32),
            outstanding_tokens: outstanding,
            pages_free: PAGES_PER_GROUP - self.pages_used(),
            running: self.seqs.len(),
            max_running: MAX_RUNNING,
            alive: true,
        }
    }

    /// KV tokens the group's decoding sequences attend over: decode attention work per step.
    fn context_tokens(&self, step: u64) -> u64 {
        self.seqs
            .iter()
            .filter(|s| step >= s.join_step)
            .map(|s| s.prompt + s.generated)
            .sum()
    }

    fn batch(&self, step: u64) -> usize {
        self.seqs.iter().filter(|s| step >= s.join_step).count()
    }
}

fn uniform(rng: &mut SplitMix64, lo: u64, hi: u64) -> u64 {
    lo + rng.below((hi - lo + 1) as usize) as u64
}

/// Knuth's Poisson sampler: fine for the small means used here (< 30).
fn poisson(rng: &mut SplitMix64, mean: f64) -> u64 {
    let limit = (-mean).exp();
    let mut k = 0;
    let mut p = rng.unit_f64();
    while p > limit {
        k += 1;
        p *= rng.unit_f64();
    }
    k
}

#[derive(Default, Clone, Copy)]
struct Outcome {
    out_ratio: f64,
    batch_ratio: f64,
    ctx_ratio: f64,
    batch_p99: f64,
    /// Mean requests waiting at the gateway because no group had room.
    queued: f64,
}

fn run(load: f64, groups_n: usize, report_every: u64, policy: BalancePolicy, seed: u64) -> Outcome {
    let mut rng = SplitMix64::new(seed);
    let mut balancer = DecodeBalancer::new(policy);
    let mut groups: Vec<Group> = (0..groups_n).map(|_| Group::default()).collect();
    // E[min(Exp(mu), cap)] = mu (1 - e^(-cap/mu)), averaged over the caps, plus the prefill steps that
    // also hold a slot.
    let residence: f64 = MAX_TOKENS_CHOICES
        .iter()
        .map(|&c| OUTPUT_MEAN_TOKENS * (1.0 - (-(c as f64) / OUTPUT_MEAN_TOKENS).exp()))
        .sum::<f64>()
        / MAX_TOKENS_CHOICES.len() as f64
        + (PREFILL_STEPS_MIN + PREFILL_STEPS_MAX) as f64 / 2.0;
    let arrivals_per_step = load * (groups_n * MAX_RUNNING) as f64 / residence;

    let mut view: Vec<GroupLoad> = Vec::new();
    let (mut out_sum, mut batch_sum, mut ctx_sum, mut samples) = (0.0, 0.0, 0.0, 0u64);
    let mut batches: Vec<usize> = Vec::new();
    let mut waiting = 0u64;
    let mut queue = std::collections::VecDeque::new();
    for step in 0..WARMUP_STEPS + MEASURE_STEPS {
        if step % report_every == 0 {
            view = groups
                .iter()
                .enumerate()
                .map(|(i, g)| g.load(i, step))
                .collect();
        }
        for _ in 0..poisson(&mut rng, arrivals_per_step) {
            let prompt = uniform(&mut rng, PROMPT_TOKENS_MIN, PROMPT_TOKENS_MAX);
            let max_tokens = MAX_TOKENS_CHOICES[rng.below(MAX_TOKENS_CHOICES.len())];
            let actual = -OUTPUT_MEAN_TOKENS * (1.0 - rng.unit_f64()).ln();
            let left = (actual.ceil() as u64).clamp(1, max_tokens);
            let prefill_steps = uniform(&mut rng, PREFILL_STEPS_MIN, PREFILL_STEPS_MAX);
            queue.push_back((prompt, max_tokens, left, prefill_steps));
        }
        // The gateway's admission queue, FIFO: a request no group can take waits for the next step.
        while let Some(&(prompt, max_tokens, left, prefill_steps)) = queue.front() {
            let pages_needed = pages_for(prompt as usize + 1);
            let Some(g) = balancer.route(&view, pages_needed) else {
                break;
            };
            queue.pop_front();
            let gi = g.0 as usize;
            // The gateway's own increments until the next report.
            view[gi].outstanding_tokens += prompt + max_tokens;
            view[gi].running += 1;
            view[gi].pages_free = view[gi].pages_free.saturating_sub(pages_needed);
            groups[gi].seqs.push(Seq {
                prompt,
                left,
                left_est: max_tokens,
                generated: 0,
                join_step: step + prefill_steps,
            });
        }
        if step >= WARMUP_STEPS {
            waiting += queue.len() as u64;
        }
        if step >= WARMUP_STEPS {
            let outs: Vec<f64> = groups
                .iter()
                .enumerate()
                .map(|(i, g)| g.load(i, step).outstanding_tokens as f64)
                .collect();
            let bs: Vec<usize> = groups.iter().map(|g| g.batch(step)).collect();
            let ctx: Vec<u64> = groups.iter().map(|g| g.context_tokens(step)).collect();
            let mean_ctx = ctx.iter().sum::<u64>() as f64 / groups_n as f64;
            let mean_out = outs.iter().sum::<f64>() / groups_n as f64;
            let mean_b = bs.iter().sum::<usize>() as f64 / groups_n as f64;
            if mean_out > 0.0 && mean_b > 0.0 && mean_ctx > 0.0 {
                ctx_sum += *ctx.iter().max().unwrap() as f64 / mean_ctx;
                out_sum += outs.iter().cloned().fold(0.0, f64::max) / mean_out;
                batch_sum += *bs.iter().max().unwrap() as f64 / mean_b;
                samples += 1;
            }
            batches.extend(bs);
        }
        for g in &mut groups {
            for s in g.seqs.iter_mut().filter(|s| step >= s.join_step) {
                s.left -= 1;
                s.left_est -= 1;
                s.generated += 1;
            }
            g.seqs.retain(|s| s.left > 0);
        }
    }
    batches.sort_unstable();
    let p99 = batches[(batches.len() * 99 / 100).min(batches.len() - 1)];
    Outcome {
        out_ratio: out_sum / samples as f64,
        batch_ratio: batch_sum / samples as f64,
        ctx_ratio: ctx_sum / samples as f64,
        batch_p99: p99 as f64,
        queued: waiting as f64 / MEASURE_STEPS as f64,
    }
}

fn main() {
    println!(
        "load   G   R  policy        out max/mean  batch max/mean  ctx max/mean  batch p99  queued"
    );
    for load in LOADS {
        for groups_n in [8, 32] {
            for report_every in [1, 4, 16] {
                for policy in [
                    BalancePolicy::ExactMin,
                    BalancePolicy::PowerOfTwo { seed: 0 },
                ] {
                    row(load, groups_n, report_every, policy);
                }
            }
        }
    }
}

fn row(load: f64, groups_n: usize, report_every: u64, policy: BalancePolicy) {
    let mut sum = Outcome::default();
    for seed in SEEDS {
        let policy = match policy {
            BalancePolicy::PowerOfTwo { .. } => BalancePolicy::PowerOfTwo { seed },
            p => p,
        };
        let o = run(load, groups_n, report_every, policy, seed);
        sum.out_ratio += o.out_ratio;
        sum.batch_ratio += o.batch_ratio;
        sum.ctx_ratio += o.ctx_ratio;
        sum.batch_p99 += o.batch_p99;
        sum.queued += o.queued;
    }
    let n = SEEDS.len() as f64;
    println!(
        "{load:>4.2}  {groups_n:>2}  {report_every:>2}  {:<12}  {:>12.3}  {:>14.3}  {:>12.3}  {:>9.1}  {:>6.2}",
        policy.name(),
        sum.out_ratio / n,
        sum.batch_ratio / n,
        sum.ctx_ratio / n,
        sum.batch_p99 / n,
        sum.queued / n
    );
}
