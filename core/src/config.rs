//! The cluster config schema (TOML), read by `duet serve` and later by `deploy/` and `duet plan`.
//!
//! Every section and every field is optional: a missing one takes the default written next to it, so
//! an empty file is a valid one-process cluster for the tiny model on a small CPU machine. Unknown
//! fields are errors (a misspelt limit silently ignored is worse than a refusal). [`ClusterConfig::validate`]
//! names the offending field as `section.field`.

use serde::{Deserialize, Serialize};

use crate::kv::KvConfig;
use crate::route::BalancePolicy;
use crate::sched::SchedConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, a wrong type, or an unknown field (the message names it).
    #[error("cluster config: {0}")]
    Parse(String),
    #[error("cluster config: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub model: ModelSection,
    pub gateway: GatewaySection,
    pub prefill: PrefillSection,
    pub decode: DecodeSection,
    pub limits: LimitsSection,
}

/// The compute dtype of the engine.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    Bf16,
    F32,
}

/// Decode DP-group balancing (`route::BalancePolicy` without its seed).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    ExactMin,
    PowerOfTwo,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Model directory (config.json, safetensors, tokenizer). None: the embedded tiny model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The name clients use in `model`. None: the directory's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
    /// A Jinja chat template file used instead of the checkpoint's (`--chat-template`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Compute dtype: "bf16" (what FlashMLA and DeepSeek serve) or "f32" (CPU reference).
    pub dtype: ComputeDtype,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: None,
            served_model_name: None,
            chat_template: None,
            // BF16 halves weight and KV memory; the CPU kernels accumulate in f32 either way.
            dtype: ComputeDtype::Bf16,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    pub host: String,
    /// The OpenAI-compatible HTTP API.
    pub port: u16,
    /// Where workers join the cluster (control messages over QUIC).
    pub cluster_port: u16,
    /// A file of API keys, one per line, added to `--api-key` and `DUET_API_KEY`; with any key
    /// set, requests need `Authorization: Bearer <key>`.
    pub api_key_file: Option<String>,
    /// Paths that need no API key: probes and scrapers carry none.
    pub auth_exempt_paths: Vec<String>,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            // Loopback: reachable from other hosts only when `--host` says so (and then, with
            // API keys, only by those who hold one).
            host: "127.0.0.1".into(),
            // Unassigned by IANA and unlikely to clash with other local servers.
            port: 9965,
            cluster_port: 9966,
            api_key_file: None,
            auth_exempt_paths: vec!["/health".into(), "/metrics".into()],
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrefillSection {
    pub workers: usize,
    /// KV pages per worker (64 tokens each).
    pub kv_pages: u32,
    /// Most prompt tokens per sequence per step.
    pub chunk_tokens: usize,
    /// Most tokens per step.
    pub token_budget: usize,
    /// Most sequences prefilling at once.
    pub max_running: usize,
    pub prefix_cache: bool,
    /// GPUs of one expert-parallel instance; `workers` form instances of `ep_size / tp_size`
    /// attention ranks. The server runs 1 today (every worker holds every expert).
    pub ep_size: usize,
    /// GPUs one attention rank (one worker) spans with tensor parallelism.
    pub tp_size: usize,
    /// `duet prefill`: serve the process's `/health` and `/metrics` on this port (all
    /// interfaces, for Prometheus); unset: not served.
    pub metrics_port: Option<u16>,
}

impl Default for PrefillSection {
    fn default() -> Self {
        PrefillSection {
            // One process, one prefill worker: the smallest disaggregated cluster.
            workers: 1,
            // 512 pages = 32 Ki tokens: a few long prompts plus a warm prefix cache for the tiny model.
            kv_pages: 512,
            // Keeps one step short on a CPU so a long prompt does not stall the others for seconds.
            chunk_tokens: 512,
            // Four full chunks per step: batching amortises weight reads without long steps.
            token_budget: 2048,
            // Bounded by token_budget / small prompts; more only queues inside the worker.
            max_running: 32,
            // Chat traffic repeats system prompts and history; caching them is nearly free.
            prefix_cache: true,
            ep_size: 1,
            tp_size: 1,
            metrics_port: None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeSection {
    /// DP-attention groups, each a decode worker with its own KV pool.
    pub groups: usize,
    /// KV pages per group (64 tokens each).
    pub kv_pages: u32,
    /// Decode batch cap per group.
    pub max_running: usize,
    /// Most tokens per step: one per running sequence, plus recompute after preemption.
    pub token_budget: usize,
    /// DP-group balancing: "exact-min" or "power-of-two" (see `route::BalancePolicy`).
    pub balance: Balance,
    /// New tokens each sequence reserves on its decode group besides its prompt. Unset: its whole
    /// `max_tokens`, so sequences placed together never outgrow a pool; less packs more
    /// sequences per group, and a group that runs out preempts and recomputes
    /// (`pd::GatewayConfig::commit_new_tokens_max`).
    pub reserve_new_tokens: Option<usize>,
    /// GPUs of one expert-parallel instance; `groups` form instances of `ep_size / tp_size`
    /// DP-attention ranks. The server runs 1 today (every group holds every expert).
    pub ep_size: usize,
    /// GPUs one DP-attention group spans with tensor parallelism.
    pub tp_size: usize,
    /// `duet decode`: serve the process's `/health` and `/metrics` on this port (all
    /// interfaces, for Prometheus); unset: not served.
    pub metrics_port: Option<u16>,
}

impl Default for DecodeSection {
    fn default() -> Self {
        DecodeSection {
            // Two groups: the smallest setup that exercises DP balancing.
            groups: 2,
            // 512 pages = 32 Ki tokens per group, enough for max_running sequences of ~1 Ki tokens.
            kv_pages: 512,
            // A CPU decode step grows roughly linearly past a few dozen sequences.
            max_running: 32,
            // A full batch plus room to recompute a preempted sequence in chunks.
            token_budget: 512,
            // Measured in core/examples/balance.rs; see BalancePolicy's doc.
            balance: Balance::ExactMin,
            reserve_new_tokens: None,
            ep_size: 1,
            tp_size: 1,
            metrics_port: None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Requests waiting at the gateway before it answers 429.
    pub queue_max: usize,
    /// Largest HTTP request body.
    pub body_bytes_max: usize,
    /// Largest `n` (choices per request).
    pub n_max: usize,
    /// `max_tokens` when a request gives none.
    pub max_tokens_default: usize,
    /// A request running longer is aborted.
    pub request_timeout_s: u64,
    /// On shutdown, in-flight requests get this long to finish.
    pub drain_timeout_s: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            // A few batches' worth: beyond that a client is better told to back off than kept waiting.
            queue_max: 256,
            // A 160 Ki-token context is ~1 MB of text as JSON; 8 MiB leaves room for long histories.
            body_bytes_max: 8 << 20,
            // Each choice is a sequence with its own pages; more than 8 is rarely useful.
            n_max: 8,
            // Enough for a short answer from a non-reasoning request.
            max_tokens_default: 1024,
            // Ten minutes: long reasoning answers on slow hardware.
            request_timeout_s: 600,
            // Long enough for typical answers to finish, short enough for a rolling restart.
            drain_timeout_s: 30,
        }
    }
}

impl ClusterConfig {
    /// Parses and validates a config file's text.
    pub fn from_toml(s: &str) -> Result<Self, ConfigError> {
        let cfg: ClusterConfig =
            toml::from_str(s).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML; `from_toml(to_toml())` gives it back.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every field serialises to TOML")
    }

    /// Checks every value; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        non_empty("model.path", m.path.as_deref())?;
        non_empty("model.served_model_name", m.served_model_name.as_deref())?;

        let g = &self.gateway;
        non_empty("gateway.host", Some(&g.host))?;
        // Port 0 asks the OS for a free port (tests, several servers on one host).
        if g.port != 0 && g.port == g.cluster_port {
            return invalid(
                "gateway.cluster_port",
                format!("equals gateway.port ({})", g.port),
            );
        }

        let p = &self.prefill;
        at_least_1("prefill.workers", p.workers as u64)?;
        at_least_1("prefill.kv_pages", p.kv_pages as u64)?;
        at_least_1("prefill.chunk_tokens", p.chunk_tokens as u64)?;
        at_least_1("prefill.token_budget", p.token_budget as u64)?;
        at_least_1("prefill.max_running", p.max_running as u64)?;
        if p.chunk_tokens > p.token_budget {
            return invalid(
                "prefill.chunk_tokens",
                format!(
                    "{} exceeds prefill.token_budget ({})",
                    p.chunk_tokens, p.token_budget
                ),
            );
        }

        parallelism(
            ("prefill.ep_size", "prefill.tp_size"),
            p.workers,
            p.ep_size,
            p.tp_size,
        )?;

        let d = &self.decode;
        at_least_1("decode.groups", d.groups as u64)?;
        parallelism(
            ("decode.ep_size", "decode.tp_size"),
            d.groups,
            d.ep_size,
            d.tp_size,
        )?;
        at_least_1("decode.kv_pages", d.kv_pages as u64)?;
        at_least_1("decode.max_running", d.max_running as u64)?;
        if d.token_budget < d.max_running {
            return invalid(
                "decode.token_budget",
                format!(
                    "{} is below decode.max_running ({}): a full batch must decode in one step",
                    d.token_budget, d.max_running
                ),
            );
        }

        let l = &self.limits;
        at_least_1("limits.queue_max", l.queue_max as u64)?;
        at_least_1("limits.body_bytes_max", l.body_bytes_max as u64)?;
        at_least_1("limits.n_max", l.n_max as u64)?;
        at_least_1("limits.max_tokens_default", l.max_tokens_default as u64)?;
        at_least_1("limits.request_timeout_s", l.request_timeout_s)?;
        Ok(())
    }

    pub fn prefill_kv(&self) -> KvConfig {
        KvConfig {
            pages_total: self.prefill.kv_pages,
            prefix_cache: self.prefill.prefix_cache,
        }
    }

    pub fn prefill_sched(&self) -> SchedConfig {
        SchedConfig {
            max_running: self.prefill.max_running,
            token_budget: self.prefill.token_budget,
            chunk_tokens: self.prefill.chunk_tokens,
            // The gateway holds the admission queue; a worker queues what it was routed.
            waiting_max: self.limits.queue_max,
        }
    }

    pub fn decode_kv(&self) -> KvConfig {
        KvConfig {
            pages_total: self.decode.kv_pages,
            // Decode pages arrive from prefill workers; there is no prompt to match them against.
            prefix_cache: false,
        }
    }

    pub fn decode_sched(&self) -> SchedConfig {
        SchedConfig {
            max_running: self.decode.max_running,
            token_budget: self.decode.token_budget,
            // Chunks only matter for recompute after preemption; keep them as short as prefill's.
            chunk_tokens: self.prefill.chunk_tokens.min(self.decode.token_budget),
            waiting_max: self.limits.queue_max,
        }
    }

    /// The decode balancing policy; `seed` seeds power-of-two's sampling.
    pub fn balance_policy(&self, seed: u64) -> BalancePolicy {
        match self.decode.balance {
            Balance::ExactMin => BalancePolicy::ExactMin,
            Balance::PowerOfTwo => BalancePolicy::PowerOfTwo { seed },
        }
    }
}

fn invalid(field: &'static str, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { field, reason })
}

/// A role's parallelism: whole attention ranks per EP instance, whole instances.
fn parallelism(
    (ep_field, tp_field): (&'static str, &'static str),
    ranks: usize,
    ep: usize,
    tp: usize,
) -> Result<(), ConfigError> {
    at_least_1(ep_field, ep as u64)?;
    at_least_1(tp_field, tp as u64)?;
    if !ep.is_multiple_of(tp) {
        return invalid(
            ep_field,
            format!("{ep} is not a multiple of {tp_field} ({tp})"),
        );
    }
    let per_instance = ep / tp;
    if !ranks.is_multiple_of(per_instance) {
        return invalid(
            ep_field,
            format!(
                "an instance of EP{ep} / TP{tp} has {per_instance} attention ranks, which do not \
                 divide the role's {ranks}"
            ),
        );
    }
    Ok(())
}

fn at_least_1(field: &'static str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return invalid(field, "must be at least 1".into());
    }
    Ok(())
}

fn non_empty(field: &'static str, v: Option<&str>) -> Result<(), ConfigError> {
    if v.is_some_and(|s| s.trim().is_empty()) {
        return invalid(field, "must not be empty".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_file_is_the_default_and_default_is_valid() {
        assert_eq!(ClusterConfig::from_toml(""), Ok(ClusterConfig::default()));
        ClusterConfig::default().validate().unwrap();
    }

    #[test]
    fn round_trip() {
        let mut c = ClusterConfig::default();
        c.model.path = Some("/models/DeepSeek-V3".into());
        c.model.served_model_name = Some("deepseek-v3".into());
        c.decode.balance = Balance::PowerOfTwo;
        c.prefill.prefix_cache = false;
        c.limits.drain_timeout_s = 0;
        let text = c.to_toml();
        assert_eq!(ClusterConfig::from_toml(&text), Ok(c.clone()), "{text}");
        assert!(
            ClusterConfig::default()
                .to_toml()
                .parse::<toml::Table>()
                .is_ok()
        );
    }

    #[test]
    fn each_section_and_field_is_optional() {
        let c = ClusterConfig::from_toml("[prefill]\nworkers = 3\n[decode]\n[limits]\nn_max = 2")
            .unwrap();
        let mut want = ClusterConfig::default();
        want.prefill.workers = 3;
        want.limits.n_max = 2;
        assert_eq!(c, want);
    }

    #[test]
    fn unknown_fields_are_named() {
        for (text, name) in [
            ("[prefill]\nworker = 2", "worker"),
            ("[gateway]\nhost = \"::\"\nprot = 1", "prot"),
            ("[cache]\n", "cache"),
            // Choices are enums: an unknown one is refused by name, with the choices.
            ("[decode]\nbalance = \"random\"", "balance"),
            ("[model]\ndtype = \"fp8\"", "dtype"),
        ] {
            let err = ClusterConfig::from_toml(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Parse(m) if m.contains(name)),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            ("[prefill]\nworkers = 0", "prefill.workers"),
            ("[prefill]\nkv_pages = 0", "prefill.kv_pages"),
            ("[prefill]\nchunk_tokens = 4096", "prefill.chunk_tokens"),
            ("[decode]\nkv_pages = 0", "decode.kv_pages"),
            ("[decode]\ngroups = 0", "decode.groups"),
            ("[decode]\nmax_running = 600", "decode.token_budget"),
            ("[gateway]\ncluster_port = 9965", "gateway.cluster_port"),
            ("[gateway]\nhost = \"\"", "gateway.host"),
            ("[model]\npath = \" \"", "model.path"),
            ("[limits]\nqueue_max = 0", "limits.queue_max"),
            (
                "[limits]\nrequest_timeout_s = 0",
                "limits.request_timeout_s",
            ),
            ("[prefill]\nep_size = 0", "prefill.ep_size"),
            ("[decode]\ntp_size = 0", "decode.tp_size"),
            // EP4 over TP8 is no whole number of ranks.
            ("[decode]\nep_size = 4\ntp_size = 8", "decode.ep_size"),
            // Two groups cannot form an instance of four DP ranks.
            ("[decode]\ngroups = 2\nep_size = 4", "decode.ep_size"),
        ];
        for (text, field) in cases {
            match ClusterConfig::from_toml(text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        // Out of range for the type is a parse error that names the field.
        let err = ClusterConfig::from_toml("[gateway]\nport = 70000").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse(m) if m.contains("port")),
            "{err}"
        );
        let err = ClusterConfig::from_toml("[prefill]\nworkers = -1").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse(m) if m.contains("workers")),
            "{err}"
        );
    }

    #[test]
    fn parallelism_is_whole_instances_of_whole_ranks() {
        let c = ClusterConfig::from_toml(
            "[prefill]\nworkers = 8\nep_size = 32\ntp_size = 4\n\
             [decode]\ngroups = 144\nep_size = 72\ntp_size = 1",
        )
        .unwrap();
        assert_eq!((c.prefill.ep_size, c.prefill.tp_size), (32, 4));
        assert_eq!((c.decode.ep_size, c.decode.tp_size), (72, 1));
        assert_eq!(ClusterConfig::from_toml(&c.to_toml()), Ok(c));
    }

    #[test]
    fn derived_configs_follow_the_sections() {
        let c = ClusterConfig::default();
        assert_eq!(c.prefill_kv().pages_total, c.prefill.kv_pages);
        assert!(!c.decode_kv().prefix_cache);
        assert_eq!(c.decode_sched().max_running, c.decode.max_running);
        assert_eq!(c.balance_policy(1), BalancePolicy::default());
    }

    proptest! {
        #[test]
        fn from_toml_never_panics(s in ".{0,200}") {
            let _ = ClusterConfig::from_toml(&s);
        }

        #[test]
        fn from_toml_never_panics_on_near_configs(
            section in prop::sample::select(vec!["model", "gateway", "prefill", "decode", "limits", "x"]),
            field in "[a-z_]{1,20}",
            value in prop::sample::select(vec!["0", "-1", "1e99", "\"\"", "true", "[]", "{}", "99999999999999999999", "\"bf16\""]),
        ) {
            let _ = ClusterConfig::from_toml(&format!("[{section}]\n{field} = {value}\n"));
        }
    }
}
