//! Serving metrics in the Prometheus text exposition format, version 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>), without a metrics crate.
//!
//! Every sample is an atomic, so request tasks update them without locks; only a labelled family
//! takes a mutex, and only to find or add a label value, which callers do once and keep the
//! returned `Arc`. A histogram keeps one non-cumulative count per bucket plus an overflow slot;
//! rendering sums them, so `_bucket{le="+Inf"}` always equals `_count` even while other threads
//! observe. Families render in label order (a `BTreeMap`), so the output is deterministic.
//!
//! Bucket bounds follow vLLM's serving histograms (vllm/engine/metrics.py), extended below to
//! sub-millisecond steps because a disaggregated decoder's inter-token gaps are a few ms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Time to first token: 1 ms (a prefix-cache hit on a warm prefill node) to 160 s (a 128k-token
/// prompt queued behind others).
pub const TTFT_BUCKETS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
];
/// Inter-token latency: 0.5 ms (a small batch on a fast decoder) to 2.5 s (a stalled step).
pub const ITL_BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// End-to-end request latency: 1 ms (a one-token reply) to 16 min (a long reasoning trace).
pub const E2E_BUCKETS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
];
/// Label values one family keeps. Workers and finish reasons are small fixed sets; the bound
/// keeps a bug (say, a request id used as a label) from growing /metrics without limit. Values
/// past it get a detached metric whose updates are not exported.
pub const FAMILY_LABELS_MAX: usize = 1024;

/// The finish reasons `duet_requests_total` is pre-populated with, so each renders from the start.
pub const FINISH_REASONS: &[&str] = &["stop", "length", "tool_calls", "abort", "error"];

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    let _ = writeln!(out, "\n# TYPE {name} {kind}");
}

fn push_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A float as the format spells it: `+Inf`, `-Inf`, `NaN`, else Rust's shortest round-trip form.
fn push_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// A monotone count.
#[derive(Debug)]
pub struct Counter {
    name: &'static str,
    help: &'static str,
    value: AtomicU64,
}

impl Counter {
    /// `name` should end in `_total`, as the format's conventions ask.
    pub fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            value: AtomicU64::new(0),
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "counter");
        let _ = writeln!(out, "{} {}", self.name, self.get());
    }
}

/// A value that goes up and down.
#[derive(Debug)]
pub struct Gauge {
    name: &'static str,
    help: &'static str,
    value: AtomicI64,
}

impl Gauge {
    pub fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            value: AtomicI64::new(0),
        }
    }

    pub fn set(&self, v: i64) {
        self.value.store(v, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn dec(&self) {
        self.add(-1);
    }

    pub fn add(&self, d: i64) {
        self.value.fetch_add(d, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "gauge");
        let _ = writeln!(out, "{} {}", self.name, self.get());
    }
}

/// A distribution of durations in seconds over fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds_s: &'static [f64],
    /// `counts[i]` observations fell in `(bounds_s[i-1], bounds_s[i]]`; the last slot is above
    /// every bound.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits updated by compare-and-swap.
    sum_bits: AtomicU64,
}

impl Histogram {
    /// `buckets_s` are the finite upper bounds, strictly increasing; `+Inf` is implied.
    pub fn new(name: &'static str, help: &'static str, buckets_s: &'static [f64]) -> Self {
        assert!(
            buckets_s.iter().all(|b| b.is_finite()) && buckets_s.windows(2).all(|w| w[0] < w[1]),
            "{name}: bucket bounds must be finite and strictly increasing"
        );
        Self {
            name,
            help,
            bounds_s: buckets_s,
            counts: (0..=buckets_s.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one duration. NaN is dropped: it has no bucket and would poison the sum.
    pub fn observe(&self, seconds: f64) {
        if seconds.is_nan() {
            return;
        }
        let slot = self.bounds_s.partition_point(|&b| b < seconds);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + seconds).to_bits();
            match self.sum_bits.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn sum_s(&self) -> f64 {
        f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "histogram");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let _ = write!(out, "{}_bucket{{le=\"", self.name);
            push_f64(out, self.bounds_s.get(i).copied().unwrap_or(f64::INFINITY));
            let _ = writeln!(out, "\"}} {cumulative}");
        }
        let _ = write!(out, "{}_sum ", self.name);
        push_f64(out, self.sum_s());
        let _ = writeln!(out, "\n{}_count {cumulative}", self.name);
    }
}

/// One sample of a labelled family.
pub trait FamilyMember: Send + Sync {
    const KIND: &'static str;
    fn detached() -> Self;
    fn push_value(&self, out: &mut String);
}

impl FamilyMember for Gauge {
    const KIND: &'static str = "gauge";
    fn detached() -> Self {
        Gauge::new("", "")
    }
    fn push_value(&self, out: &mut String) {
        let _ = write!(out, "{}", self.get());
    }
}

impl FamilyMember for Counter {
    const KIND: &'static str = "counter";
    fn detached() -> Self {
        Counter::new("", "")
    }
    fn push_value(&self, out: &mut String) {
        let _ = write!(out, "{}", self.get());
    }
}

/// Metrics of one name told apart by one label, e.g. `duet_kv_pages_used{worker="1"}`.
#[derive(Debug)]
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    members: Mutex<BTreeMap<String, Arc<M>>>,
}

pub type GaugeVec = Family<Gauge>;
pub type CounterVec = Family<Counter>;

impl<M: FamilyMember> Family<M> {
    pub fn new(name: &'static str, help: &'static str, label: &'static str) -> Self {
        Self {
            name,
            help,
            label,
            members: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<M>>> {
        // A panic elsewhere while holding the lock leaves the map intact (no update spans two
        // statements), so a poisoned lock is still safe to use.
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member for `value`, added if new. Keep the `Arc` to update it without the lock.
    pub fn with_label(&self, value: &str) -> Arc<M> {
        let mut m = self.lock();
        if let Some(g) = m.get(value) {
            return Arc::clone(g);
        }
        let g = Arc::new(M::detached());
        if m.len() < FAMILY_LABELS_MAX {
            m.insert(value.to_owned(), Arc::clone(&g));
        }
        g
    }

    /// Stops exporting `value` (a worker that left).
    pub fn remove(&self, value: &str) {
        self.lock().remove(value);
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, M::KIND);
        for (value, m) in self.lock().iter() {
            let _ = write!(out, "{}{{{}=\"", self.name, self.label);
            push_label_value(out, value);
            out.push_str("\"} ");
            m.push_value(out);
            out.push('\n');
        }
    }
}

/// The serving metrics the gateway exports at `GET /metrics`. Fields are public: the gateway and
/// workers update them directly.
#[derive(Debug)]
pub struct Metrics {
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: Histogram,
    /// Requests waiting for admission.
    pub queue_depth: Gauge,
    pub running_requests: Gauge,
    /// Label `worker`.
    pub kv_pages_used: GaugeVec,
    /// Label `worker`.
    pub kv_pages_free: GaugeVec,
    /// Sequences a worker holds (running or waiting), label `worker`: which worker a failure
    /// would cost work.
    pub worker_sequences: GaugeVec,
    pub prefix_cache_queried_tokens_total: Counter,
    pub prefix_cache_hit_tokens_total: Counter,
    pub generation_tokens_total: Counter,
    pub prompt_tokens_total: Counter,
    /// Label `finish_reason`, one of [`FINISH_REASONS`].
    pub requests_total: CounterVec,
    pub requests_rejected_total: Counter,
    /// Sequences preempted (pages freed, recomputed later) by decode groups.
    pub preemptions_total: Counter,
    /// Workers the supervisor restarted after a failure.
    pub worker_restarts_total: Counter,
    /// What this process's own workers measured (`duet serve`; none in `duet gateway`).
    pub workers: Arc<WorkerStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let requests_total = CounterVec::new(
            "duet_requests_total",
            "Finished requests by finish reason.",
            "finish_reason",
        );
        for r in FINISH_REASONS {
            requests_total.with_label(r);
        }
        Self {
            time_to_first_token_seconds: Histogram::new(
                "duet_time_to_first_token_seconds",
                "Time from request arrival to its first output token.",
                TTFT_BUCKETS_S,
            ),
            inter_token_latency_seconds: Histogram::new(
                "duet_inter_token_latency_seconds",
                "Time between consecutive output tokens of a request.",
                ITL_BUCKETS_S,
            ),
            e2e_request_latency_seconds: Histogram::new(
                "duet_e2e_request_latency_seconds",
                "Time from request arrival to its last output token.",
                E2E_BUCKETS_S,
            ),
            queue_depth: Gauge::new("duet_queue_depth", "Requests waiting for admission."),
            running_requests: Gauge::new("duet_running_requests", "Requests being served."),
            kv_pages_used: GaugeVec::new(
                "duet_kv_pages_used",
                "KV cache pages in use, per worker.",
                "worker",
            ),
            kv_pages_free: GaugeVec::new(
                "duet_kv_pages_free",
                "KV cache pages free, per worker.",
                "worker",
            ),
            worker_sequences: GaugeVec::new(
                "duet_worker_sequences",
                "Sequences running or waiting, per worker.",
                "worker",
            ),
            prefix_cache_queried_tokens_total: Counter::new(
                "duet_prefix_cache_queried_tokens_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_cache_hit_tokens_total: Counter::new(
                "duet_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache.",
            ),
            generation_tokens_total: Counter::new(
                "duet_generation_tokens_total",
                "Output tokens generated.",
            ),
            prompt_tokens_total: Counter::new(
                "duet_prompt_tokens_total",
                "Prompt tokens received.",
            ),
            requests_total,
            requests_rejected_total: Counter::new(
                "duet_requests_rejected_total",
                "Requests refused before admission (overload or invalid).",
            ),
            preemptions_total: Counter::new(
                "duet_preemptions_total",
                "Sequences preempted for KV pages and recomputed later.",
            ),
            worker_restarts_total: Counter::new(
                "duet_worker_restarts_total",
                "Workers restarted by the supervisor after a failure.",
            ),
            workers: Arc::new(WorkerStats::new()),
        }
    }

    /// Hit tokens over queried tokens since start; 0 before any lookup.
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        let queried = self.prefix_cache_queried_tokens_total.get();
        if queried == 0 {
            return 0.0;
        }
        self.prefix_cache_hit_tokens_total.get() as f64 / queried as f64
    }

    /// The whole exposition, as served with `Content-Type: text/plain; version=0.0.4`.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        self.time_to_first_token_seconds.render(&mut out);
        self.inter_token_latency_seconds.render(&mut out);
        self.e2e_request_latency_seconds.render(&mut out);
        self.queue_depth.render(&mut out);
        self.running_requests.render(&mut out);
        self.kv_pages_used.render(&mut out);
        self.kv_pages_free.render(&mut out);
        self.worker_sequences.render(&mut out);
        self.prefix_cache_queried_tokens_total.render(&mut out);
        self.prefix_cache_hit_tokens_total.render(&mut out);
        let rate = "duet_prefix_cache_hit_rate";
        header(
            &mut out,
            rate,
            "Prefix cache hit tokens / queried tokens since start.",
            "gauge",
        );
        out.push_str(rate);
        out.push(' ');
        push_f64(&mut out, self.prefix_cache_hit_rate());
        out.push('\n');
        self.generation_tokens_total.render(&mut out);
        self.prompt_tokens_total.render(&mut out);
        self.requests_total.render(&mut out);
        self.requests_rejected_total.render(&mut out);
        self.preemptions_total.render(&mut out);
        self.worker_restarts_total.render(&mut out);
        render_build_info(&mut out);
        self.workers.render(&mut out);
        out
    }
}

/// Step time of a worker: 0.5 ms (a small decode batch on a GPU) to 60 s (a long prompt's
/// chunk on a CPU).
pub const STEP_BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// What the workers of one process measure about themselves: their steps and the KV they moved
/// or refused. Shared by every worker of the process (a worker process hosts one role).
#[derive(Debug)]
pub struct WorkerStats {
    pub prefill_step_seconds: Histogram,
    pub decode_step_seconds: Histogram,
    /// Prefill: KV frame bytes the transport accepted.
    pub kv_sent_bytes_total: Counter,
    /// Prefill: sequences whose KV could not be delivered (each is re-run elsewhere).
    pub kv_send_failures_total: Counter,
    /// Decode: KV frame bytes verified and written into the pool.
    pub kv_received_bytes_total: Counter,
    /// Decode: frames refused (corrupt, truncated, or for pages the sequence does not hold).
    pub kv_rejected_frames_total: Counter,
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerStats {
    pub fn new() -> Self {
        Self {
            prefill_step_seconds: Histogram::new(
                "duet_prefill_step_seconds",
                "Time of one prefill worker step (forward pass and KV hand-off).",
                STEP_BUCKETS_S,
            ),
            decode_step_seconds: Histogram::new(
                "duet_decode_step_seconds",
                "Time of one decode group step (forward pass of the batch).",
                STEP_BUCKETS_S,
            ),
            kv_sent_bytes_total: Counter::new(
                "duet_kv_sent_bytes_total",
                "KV bytes prefill workers sent that the transport accepted.",
            ),
            kv_send_failures_total: Counter::new(
                "duet_kv_send_failures_total",
                "Sequences whose KV a prefill worker could not deliver.",
            ),
            kv_received_bytes_total: Counter::new(
                "duet_kv_received_bytes_total",
                "KV bytes decode groups verified and wrote into their pools.",
            ),
            kv_rejected_frames_total: Counter::new(
                "duet_kv_rejected_frames_total",
                "KV frames decode groups refused (corrupt, truncated or misaddressed).",
            ),
        }
    }

    pub fn render(&self, out: &mut String) {
        self.prefill_step_seconds.render(out);
        self.decode_step_seconds.render(out);
        self.kv_sent_bytes_total.render(out);
        self.kv_send_failures_total.render(out);
        self.kv_received_bytes_total.render(out);
        self.kv_rejected_frames_total.render(out);
    }
}

/// `duet_build_info{version="…"} 1`: which build a process runs (for rolling upgrades).
pub fn render_build_info(out: &mut String) {
    let name = "duet_build_info";
    header(out, name, "The duet build this process runs.", "gauge");
    let _ = writeln!(out, "{name}{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
}

/// One worker's load as a worker process reports it on its own `/metrics`.
pub struct WorkerSample {
    pub label: String,
    pub pages_used: u64,
    pub pages_free: u64,
    pub running: u64,
    pub waiting: u64,
    pub preemptions: u64,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
}

/// A worker process's exposition: its build, each of its workers' pools and batches, and what
/// they measured.
pub fn render_worker_process(
    workers: &[WorkerSample],
    stats: &WorkerStats,
    restarts: &Counter,
) -> String {
    let mut out = String::with_capacity(4 << 10);
    render_build_info(&mut out);
    type Field = fn(&WorkerSample) -> u64;
    let per_worker: [(&str, &str, &str, Field); 7] = [
        (
            "duet_kv_pages_used",
            "KV cache pages in use, per worker.",
            "gauge",
            |w| w.pages_used,
        ),
        (
            "duet_kv_pages_free",
            "KV cache pages free, per worker.",
            "gauge",
            |w| w.pages_free,
        ),
        (
            "duet_worker_running",
            "Sequences in the worker's running batch.",
            "gauge",
            |w| w.running,
        ),
        (
            "duet_worker_waiting",
            "Sequences waiting at the worker.",
            "gauge",
            |w| w.waiting,
        ),
        (
            "duet_worker_preemptions_total",
            "Sequences the worker preempted since it (re)started.",
            "counter",
            |w| w.preemptions,
        ),
        (
            "duet_worker_prefix_cache_queried_tokens_total",
            "Prompt tokens looked up in the worker's prefix cache since it (re)started.",
            "counter",
            |w| w.prefix_queried_tokens,
        ),
        (
            "duet_worker_prefix_cache_hit_tokens_total",
            "Prompt tokens found in the worker's prefix cache since it (re)started.",
            "counter",
            |w| w.prefix_hit_tokens,
        ),
    ];
    for (name, help, kind, field) in per_worker {
        header(&mut out, name, help, kind);
        for w in workers {
            let _ = write!(out, "{name}{{worker=\"");
            push_label_value(&mut out, &w.label);
            let _ = writeln!(out, "\"}} {}", field(w));
        }
    }
    stats.render(&mut out);
    restarts.render(&mut out);
    out
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed sample line: name, labels, value.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    fn parse_value(s: &str) -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            s => s.parse().unwrap_or_else(|_| panic!("bad value {s:?}")),
        }
    }

    fn is_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// A strict line parser for the subset we emit; returns (TYPE per family, samples).
    fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        assert!(text.ends_with('\n'));
        let mut types = BTreeMap::new();
        let mut helped = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _help) = rest.split_once(' ').unwrap();
                assert!(is_name(name));
                assert!(
                    helped.insert(name.to_owned(), ()).is_none(),
                    "HELP twice: {name}"
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helped.contains_key(name), "TYPE before HELP: {name}");
                assert!(["counter", "gauge", "histogram"].contains(&kind));
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => {
                        let l = l.strip_suffix('}').unwrap();
                        let labels = l
                            .split(',')
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').unwrap();
                                assert!(is_name(k));
                                let v = v.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
                                (k.to_owned(), v.to_owned())
                            })
                            .collect();
                        (n, labels)
                    }
                    None => (series, Vec::new()),
                };
                assert!(is_name(name), "{name}");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                    })
                    .unwrap_or(name);
                assert!(types.contains_key(family), "sample before its TYPE: {name}");
                samples.push(Sample {
                    name: name.to_owned(),
                    labels,
                    value: parse_value(value),
                });
            }
        }
        (types, samples)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && s.labels
                        .iter()
                        .zip(labels)
                        .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
            .value
    }

    /// Checks every histogram: cumulative, monotone buckets with increasing `le`, the last
    /// `+Inf` and equal to `_count`, a `_sum` present.
    fn check_histograms(types: &BTreeMap<String, String>, samples: &[Sample]) {
        for (name, _) in types.iter().filter(|(_, t)| *t == "histogram") {
            let buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|s| s.name == format!("{name}_bucket"))
                .map(|s| {
                    assert_eq!(s.labels[0].0, "le");
                    (parse_value(&s.labels[0].1), s.value)
                })
                .collect();
            assert!(buckets.len() >= 2, "{name}");
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{name}"
            );
            let (le_last, n_last) = *buckets.last().unwrap();
            assert_eq!(le_last, f64::INFINITY);
            assert_eq!(n_last, value(samples, &format!("{name}_count"), &[]));
            assert!(value(samples, &format!("{name}_sum"), &[]).is_finite());
        }
    }

    #[test]
    fn render_parses_as_prometheus_text() {
        let m = Metrics::new();
        for s in [0.0005, 0.002, 0.03, 0.03, 1.5, 9999.0] {
            m.time_to_first_token_seconds.observe(s);
            m.inter_token_latency_seconds.observe(s);
            m.e2e_request_latency_seconds.observe(s);
        }
        m.queue_depth.set(3);
        m.running_requests.inc();
        m.running_requests.inc();
        m.running_requests.dec();
        m.kv_pages_used.with_label("1").set(10);
        m.kv_pages_used.with_label("0").set(5);
        m.kv_pages_free.with_label("0").set(-1);
        m.worker_sequences.with_label("prefill-3").set(4);
        m.prefix_cache_queried_tokens_total.add(200);
        m.prefix_cache_hit_tokens_total.add(50);
        m.generation_tokens_total.add(7);
        m.prompt_tokens_total.add(11);
        m.requests_total.with_label("stop").inc();
        m.requests_total.with_label("length").add(2);
        m.requests_rejected_total.inc();

        let text = m.render();
        let (types, samples) = parse(&text);
        check_histograms(&types, &samples);
        // 17 serving families, the build, and the workers' 6 (step times, KV moved).
        assert_eq!(types.len(), 24);
        assert_eq!(types["duet_build_info"], "gauge");
        assert_eq!(types["duet_decode_step_seconds"], "histogram");
        assert_eq!(types["duet_worker_sequences"], "gauge");
        assert_eq!(
            value(
                &samples,
                "duet_worker_sequences",
                &[("worker", "prefill-3")]
            ),
            4.0
        );
        assert_eq!(types["duet_requests_total"], "counter");
        assert_eq!(types["duet_preemptions_total"], "counter");
        assert_eq!(types["duet_queue_depth"], "gauge");
        let ttft = "duet_time_to_first_token_seconds";
        assert_eq!(value(&samples, &format!("{ttft}_count"), &[]), 6.0);
        assert_eq!(
            value(&samples, &format!("{ttft}_bucket"), &[("le", "0.001")]),
            1.0
        );
        // `le` is inclusive: 0.03 lands in the 0.04 bucket, and 0.002 in 0.005.
        assert_eq!(
            value(&samples, &format!("{ttft}_bucket"), &[("le", "0.005")]),
            2.0
        );
        assert_eq!(
            value(&samples, &format!("{ttft}_bucket"), &[("le", "160")]),
            5.0
        );
        let sum = value(&samples, &format!("{ttft}_sum"), &[]);
        assert!((sum - 10000.5625).abs() < 1e-9, "{sum}");
        assert_eq!(value(&samples, "duet_queue_depth", &[]), 3.0);
        assert_eq!(value(&samples, "duet_running_requests", &[]), 1.0);
        assert_eq!(
            value(&samples, "duet_kv_pages_used", &[("worker", "1")]),
            10.0
        );
        assert_eq!(
            value(&samples, "duet_kv_pages_free", &[("worker", "0")]),
            -1.0
        );
        assert_eq!(value(&samples, "duet_prefix_cache_hit_rate", &[]), 0.25);
        assert_eq!(
            value(
                &samples,
                "duet_requests_total",
                &[("finish_reason", "length")]
            ),
            2.0
        );
        for r in FINISH_REASONS {
            value(&samples, "duet_requests_total", &[("finish_reason", r)]);
        }
        // Deterministic: label order, and the same text twice.
        assert!(text.find("worker=\"0\"").unwrap() < text.find("worker=\"1\"").unwrap());
        assert_eq!(text, m.render());
    }

    #[test]
    fn fresh_metrics_render_zeroes() {
        let m = Metrics::new();
        let (types, samples) = parse(&m.render());
        check_histograms(&types, &samples);
        assert_eq!(value(&samples, "duet_prefix_cache_hit_rate", &[]), 0.0);
        assert_eq!(
            value(&samples, "duet_e2e_request_latency_seconds_count", &[]),
            0.0
        );
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 10_000;
        let h = Histogram::new("t_seconds", "test", ITL_BUCKETS_S);
        let c = Counter::new("t_total", "test");
        let g = Gauge::new("t_gauge", "test");
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (h, c, g) = (&h, &c, &g);
                s.spawn(move || {
                    for i in 0..PER_THREAD {
                        // Multiples of 1/1024 s sum exactly in f64, so the sum is exact too.
                        h.observe(((t * PER_THREAD + i) % 4096) as f64 / 1024.0);
                        c.inc();
                        g.inc();
                        g.dec();
                    }
                });
            }
        });
        let n = (THREADS * PER_THREAD) as u64;
        assert_eq!(h.count(), n);
        assert_eq!(c.get(), n);
        assert_eq!(g.get(), 0);
        let want: f64 = (0..THREADS * PER_THREAD)
            .map(|k| (k % 4096) as f64 / 1024.0)
            .sum();
        assert_eq!(h.sum_s(), want);
        let mut out = String::new();
        h.render(&mut out);
        let (types, samples) = parse(&out);
        check_histograms(&types, &samples);
    }

    #[test]
    fn escaping_and_special_values() {
        let f = GaugeVec::new("esc", "a \\ help\nline", "l");
        f.with_label("a\"b\\c\nd").set(1);
        let mut out = String::new();
        f.render(&mut out);
        assert!(out.contains("# HELP esc a \\\\ help\\nline\n"));
        assert!(out.contains("esc{l=\"a\\\"b\\\\c\\nd\"} 1\n"));
        let h = Histogram::new("h", "h", &[1.0]);
        h.observe(f64::NAN);
        h.observe(f64::INFINITY);
        h.observe(-1.0);
        assert_eq!(h.count(), 2);
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum +Inf\n"));
    }

    #[test]
    fn a_worker_process_exposition_parses_and_says_what_each_worker_holds() {
        let stats = WorkerStats::new();
        stats.decode_step_seconds.observe(0.003);
        stats.kv_received_bytes_total.add(4096);
        let restarts = Counter::new("duet_worker_restarts_total", "Restarts.");
        restarts.inc();
        let w = |label: &str, used| WorkerSample {
            label: label.into(),
            pages_used: used,
            pages_free: 10 - used,
            running: 2,
            waiting: 1,
            preemptions: 0,
            prefix_queried_tokens: 0,
            prefix_hit_tokens: 0,
        };
        let text = render_worker_process(&[w("decode-7", 3), w("decode-9", 4)], &stats, &restarts);
        let (types, samples) = parse(&text);
        check_histograms(&types, &samples);
        assert_eq!(types["duet_kv_pages_used"], "gauge");
        assert_eq!(
            value(&samples, "duet_kv_pages_free", &[("worker", "decode-9")]),
            6.0
        );
        assert_eq!(value(&samples, "duet_kv_received_bytes_total", &[]), 4096.0);
        assert_eq!(value(&samples, "duet_decode_step_seconds_count", &[]), 1.0);
        assert_eq!(value(&samples, "duet_worker_restarts_total", &[]), 1.0);
        assert_eq!(
            value(
                &samples,
                "duet_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
    }

    #[test]
    fn family_is_bounded_and_removable() {
        let f = GaugeVec::new("f", "f", "w");
        for i in 0..FAMILY_LABELS_MAX + 5 {
            f.with_label(&i.to_string()).set(1);
        }
        let mut out = String::new();
        f.render(&mut out);
        assert_eq!(out.lines().count(), 2 + FAMILY_LABELS_MAX);
        f.remove("0");
        assert!(Arc::ptr_eq(&f.with_label("1"), &f.with_label("1")));
        let mut out = String::new();
        f.render(&mut out);
        assert!(!out.contains("f{w=\"0\"}"));
    }
}
