//! Results of one run: latency percentiles, throughput per GPU and per node, goodput, KV use; as a
//! serialisable struct (`--json`) and as a table.

use serde::Serialize;

use crate::cost::MoeBalance;

/// Latency histogram for inter-token latencies, which are too many to keep one by one (a million
/// requests × a thousand tokens): log buckets 1 % wide, so a percentile is within 1 %.
#[derive(Debug, Clone)]
pub struct LogHistogram {
    counts: Vec<u64>,
    total: u64,
}

/// Bucket ratio 1.01: 1 % resolution.
const BUCKET_LN: f64 = 0.00995033085;
/// Buckets from 1 µs to e^(4096·0.00995) µs ≈ 5·10^17 µs: any virtual time.
const BUCKETS: usize = 4096;

impl Default for LogHistogram {
    fn default() -> Self {
        LogHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl LogHistogram {
    pub fn add(&mut self, us: u64) {
        let b = ((us.max(1) as f64).ln() / BUCKET_LN) as usize;
        self.counts[b.min(BUCKETS - 1)] += 1;
        self.total += 1;
    }

    /// The `p`-quantile (0..=1) in ms: the geometric middle of its bucket. 0 when empty.
    pub fn quantile_ms(&self, p: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((p * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return ((b as f64 + 0.5) * BUCKET_LN).exp() / 1e3;
            }
        }
        0.0
    }
}

/// Nearest-rank quantile of sorted values; 0 when empty.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One run's results. Field names are the stable JSON keys of `duet sim --json`; every quantity
/// carries its unit.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub gpu: String,
    pub prefill_nodes: usize,
    pub decode_nodes: usize,
    pub gpus_per_node: usize,
    pub prefill_ep: usize,
    pub decode_ep: usize,
    pub prefill_tp: usize,
    pub decode_tp: usize,
    pub moe_balance: MoeBalance,
    /// Routed-expert compute of a step over perfect balance (busiest GPU over the mean; 1 without
    /// that phase's groups).
    pub prefill_expert_imbalance: f64,
    pub decode_expert_imbalance: f64,
    pub decode_batch_per_gpu: usize,
    pub prefill_tokens_per_gpu: usize,
    pub kv_pages_per_prefill_gpu: u32,
    pub kv_pages_per_decode_gpu: u32,
    pub requests: usize,
    pub requests_finished: usize,
    pub requests_failed: usize,
    pub simulated_s: f64,
    pub prefill_input_tokens_per_s_per_node: f64,
    pub prefill_input_tokens_per_s_per_gpu: f64,
    /// Prompt tokens actually computed (cache hits excluded).
    pub prefill_computed_tokens_per_s_per_node: f64,
    pub decode_output_tokens_per_s_per_node: f64,
    pub decode_output_tokens_per_s_per_gpu: f64,
    pub output_tokens_per_s_per_user: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p90: f64,
    pub ttft_ms_p99: f64,
    pub tpot_ms_p50: f64,
    pub tpot_ms_p90: f64,
    pub tpot_ms_p99: f64,
    pub itl_ms_p50: f64,
    pub itl_ms_p99: f64,
    pub e2e_ms_p50: f64,
    pub e2e_ms_p99: f64,
    pub slo_ttft_ms: f64,
    pub slo_tpot_ms: f64,
    /// Fraction of requests meeting both SLOs.
    pub slo_attainment: f64,
    /// Requests per second meeting both SLOs, over the whole run.
    pub goodput_requests_per_s: f64,
    pub requests_per_s: f64,
    pub prefix_hit_ratio: f64,
    /// Busy-time-weighted mean of used / total KV pages on decode GPUs.
    pub kv_utilization_decode: f64,
    pub kv_utilization_prefill: f64,
    pub decode_batch_mean: f64,
    pub prefill_step_ms_mean: f64,
    pub decode_step_ms_mean: f64,
    pub preemptions: u64,
    /// Wall-clock seconds the simulation took (not part of the determinism guarantee; omitted from
    /// `--json` unless asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_s: Option<f64>,
}

impl Report {
    /// Rounds every float to 4 decimals so that the JSON is short; rounding is deterministic.
    pub fn rounded(mut self) -> Self {
        let r = |x: &mut f64| *x = (*x * 1e4).round() / 1e4;
        for x in [
            &mut self.simulated_s,
            &mut self.prefill_expert_imbalance,
            &mut self.decode_expert_imbalance,
            &mut self.prefill_input_tokens_per_s_per_node,
            &mut self.prefill_input_tokens_per_s_per_gpu,
            &mut self.prefill_computed_tokens_per_s_per_node,
            &mut self.decode_output_tokens_per_s_per_node,
            &mut self.decode_output_tokens_per_s_per_gpu,
            &mut self.output_tokens_per_s_per_user,
            &mut self.ttft_ms_p50,
            &mut self.ttft_ms_p90,
            &mut self.ttft_ms_p99,
            &mut self.tpot_ms_p50,
            &mut self.tpot_ms_p90,
            &mut self.tpot_ms_p99,
            &mut self.itl_ms_p50,
            &mut self.itl_ms_p99,
            &mut self.e2e_ms_p50,
            &mut self.e2e_ms_p99,
            &mut self.slo_attainment,
            &mut self.goodput_requests_per_s,
            &mut self.requests_per_s,
            &mut self.prefix_hit_ratio,
            &mut self.kv_utilization_decode,
            &mut self.kv_utilization_prefill,
            &mut self.decode_batch_mean,
            &mut self.prefill_step_ms_mean,
            &mut self.decode_step_ms_mean,
        ] {
            r(x);
        }
        self
    }

    /// A two-column human-readable table.
    pub fn table(&self) -> String {
        let rows: Vec<(&str, String)> = vec![
            (
                "cluster",
                format!(
                    "{} × {}: {} prefill nodes (EP{}{}), {} decode nodes (EP{}{}), {} GPUs/node",
                    self.prefill_nodes + self.decode_nodes,
                    self.gpu,
                    self.prefill_nodes,
                    self.prefill_ep,
                    tp_note(self.prefill_tp),
                    self.decode_nodes,
                    self.decode_ep,
                    tp_note(self.decode_tp),
                    self.gpus_per_node
                ),
            ),
            (
                "expert load",
                format!(
                    "{:?}: busiest GPU {:.2}× the mean in prefill, {:.2}× in decode",
                    self.moe_balance, self.prefill_expert_imbalance, self.decode_expert_imbalance
                ),
            ),
            (
                "requests",
                format!(
                    "{} ({} finished, {} failed) in {:.1} s simulated",
                    self.requests, self.requests_finished, self.requests_failed, self.simulated_s
                ),
            ),
            (
                "prefill input tok/s",
                format!(
                    "{:.0} per node, {:.0} per GPU ({:.0} computed per node, prefix hits {:.1} %)",
                    self.prefill_input_tokens_per_s_per_node,
                    self.prefill_input_tokens_per_s_per_gpu,
                    self.prefill_computed_tokens_per_s_per_node,
                    self.prefix_hit_ratio * 100.0
                ),
            ),
            (
                "decode output tok/s",
                format!(
                    "{:.0} per node, {:.0} per GPU, {:.1} per user",
                    self.decode_output_tokens_per_s_per_node,
                    self.decode_output_tokens_per_s_per_gpu,
                    self.output_tokens_per_s_per_user
                ),
            ),
            (
                "TTFT ms p50/p90/p99",
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    self.ttft_ms_p50, self.ttft_ms_p90, self.ttft_ms_p99
                ),
            ),
            (
                "TPOT ms p50/p90/p99",
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    self.tpot_ms_p50, self.tpot_ms_p90, self.tpot_ms_p99
                ),
            ),
            (
                "ITL ms p50/p99",
                format!("{:.1} / {:.1}", self.itl_ms_p50, self.itl_ms_p99),
            ),
            (
                "E2E ms p50/p99",
                format!("{:.0} / {:.0}", self.e2e_ms_p50, self.e2e_ms_p99),
            ),
            (
                "goodput",
                format!(
                    "{:.2} req/s of {:.2} ({:.1} % within TTFT ≤ {} ms, TPOT ≤ {} ms)",
                    self.goodput_requests_per_s,
                    self.requests_per_s,
                    self.slo_attainment * 100.0,
                    self.slo_ttft_ms,
                    self.slo_tpot_ms
                ),
            ),
            (
                "KV utilisation",
                format!(
                    "decode {:.1} %, prefill {:.1} % ({} / {} pages per GPU)",
                    self.kv_utilization_decode * 100.0,
                    self.kv_utilization_prefill * 100.0,
                    self.kv_pages_per_decode_gpu,
                    self.kv_pages_per_prefill_gpu
                ),
            ),
            (
                "steps",
                format!(
                    "prefill {:.1} ms, decode {:.1} ms, decode batch {:.1}/GPU, {} preemptions",
                    self.prefill_step_ms_mean,
                    self.decode_step_ms_mean,
                    self.decode_batch_mean,
                    self.preemptions
                ),
            ),
        ];
        let w = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}

/// ", attention TP4" after an EP size; nothing for pure DP attention.
fn tp_note(tp: usize) -> String {
    if tp > 1 {
        format!(", attention TP{tp}")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_one_percent() {
        let mut h = LogHistogram::default();
        for us in 1..=100_000u64 {
            h.add(us);
        }
        let p99 = h.quantile_ms(0.99);
        assert!((p99 / 99.0 - 1.0).abs() < 0.01, "{p99}");
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
    }
}
