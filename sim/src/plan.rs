//! `duet plan`: the smallest (or cheapest) cluster that serves a workload within an SLO.
//!
//! # Search
//!
//! Prefill and decode are sized separately, then verified together:
//!
//! 1. **Decode**: for every EP size (whole nodes), attention TP size and batch cap, one decode group
//!    runs the workload's mean context with the batch full. Options whose TPOT p99 stays within the
//!    SLO (with a margin for the variance of real lengths) give output tokens/s per node, hence the
//!    decode nodes the target rate needs, rounded up to whole EP groups.
//! 2. **Prefill**: for every EP size, attention TP size and per-GPU token budget, one group prefills
//!    the mean prompt at saturation; the nodes needed follow at a target utilisation that leaves
//!    queueing headroom for the TTFT SLO.
//! 3. **Verify**: the best few prefill and decode options are combined and the whole PD cluster is
//!    simulated at the target rate with Poisson arrivals and the workload's length distributions.
//!    A combination missing TTFT gets another prefill group, one missing TPOT another decode group,
//!    a bounded number of times. Passing clusters are ranked by GPUs or by cost per hour.
//!
//! The winner is written as core's cluster TOML (`duet_core::config::ClusterConfig`, its
//! parallelism in each role's `ep_size`/`tp_size`) and as an ansible inventory (`inventory.ini`)
//! with the group variables deploy/site.yml reads (`group_vars/all.yml`).

use duet_core::config::ClusterConfig;
use duet_core::pages_for;
use serde::Serialize;

use crate::SimError;
use crate::calibration::Calibration;
use crate::cost::{CostModel, GroupShape, MoeBalance};
use crate::engine::{SimConfig, Simulation};
use crate::hardware::Gpu;
use crate::model::ModelConfig;
use crate::report::Report;
use crate::rng::Rng;
use crate::workload::{Arrivals, LenDist, Synthetic};

/// What to minimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Objective {
    Gpus,
    Cost,
}

/// A planning question.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: ModelConfig,
    pub gpu: Gpu,
    pub calibration: Calibration,
    pub gpus_per_node: usize,
    pub input: LenDist,
    pub output: LenDist,
    pub prefix_ratio: f64,
    /// Target requests per second.
    pub rate: f64,
    pub slo_ttft_ms: f64,
    pub slo_tpot_ms: f64,
    pub mtp_accept: Option<f64>,
    pub objective: Objective,
    pub seed: u64,
    /// Requests simulated when verifying a candidate cluster.
    pub verify_requests: usize,
    pub decode_eps: Vec<usize>,
    /// Attention TP sizes tried inside each decode / prefill EP group (1: pure DP attention).
    pub decode_tps: Vec<usize>,
    pub decode_batches: Vec<usize>,
    pub prefill_eps: Vec<usize>,
    pub prefill_tps: Vec<usize>,
    pub prefill_tokens: Vec<usize>,
}

/// EP sizes tried for decode: one node up to DeepSeek's 144 (anchors §1), SGLang's 72 (§2) between.
pub const DECODE_EPS: [usize; 7] = [8, 16, 32, 64, 72, 128, 144];
/// Attention TP sizes tried for decode: pure DP attention (DeepSeek, SGLang) and one NVLink node. TP
/// splits the weights each GPU reads per step, which can win a tight TPOT at small batches; it buys
/// no KV room, since every GPU of a rank holds the whole latent.
pub const DECODE_TPS: [usize; 2] = [1, 8];
/// Attention TP sizes tried for prefill: DP, and the V3 report's TP4 (anchors §1b).
pub const PREFILL_TPS: [usize; 2] = [1, 4];
/// Attention TP sizes tried for a dense (Qwen2/Llama) model in both roles: with no experts to spread,
/// TP is how a model too big for one GPU fits, and how KV heads split for room.
pub const DENSE_TPS: [usize; 4] = [1, 2, 4, 8];
/// Decode batch caps per GPU tried: LMSYS runs 256, DeepSeek's profile 128 (§1b, §2).
pub const DECODE_BATCHES: [usize; 6] = [16, 32, 64, 96, 128, 256];
/// Prefill EP sizes tried: DeepSeek and LMSYS both use 32 (4 nodes).
pub const PREFILL_EPS: [usize; 3] = [8, 16, 32];
/// Prefill tokens per GPU per step tried: the profile's 16 K, and smaller for TTFT.
pub const PREFILL_TOKENS: [usize; 3] = [4096, 8192, 16384];

/// Options of each side carried into verification.
const OPTIONS_KEPT: usize = 3;
/// Groups added to a failing combination before giving up on it.
const REPAIRS_MAX: usize = 4;
/// Decode must meet the TPOT SLO with this margin at full batch, since real lengths vary.
const TPOT_MARGIN: f64 = 0.9;
/// Decode is sized to run at most this fraction of its full-batch throughput.
const DECODE_UTILISATION: f64 = 0.9;
/// Prefill is sized at this fraction of its saturated throughput, leaving queueing headroom for TTFT.
const PREFILL_UTILISATION: f64 = 0.7;
/// Output tokens per request in the decode option runs: long enough for steady steps, short for speed.
const OPTION_OUTPUT_TOKENS: u64 = 32;

/// One side's sized option.
#[derive(Debug, Clone, Serialize)]
pub struct SideOption {
    pub ep: usize,
    pub tp: usize,
    /// Batch cap (decode) or tokens per GPU per step (prefill).
    pub knob: usize,
    pub nodes: usize,
    pub tokens_per_s_per_node: f64,
}

/// A verified cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub prefill_nodes: usize,
    pub decode_nodes: usize,
    pub prefill_ep: usize,
    pub decode_ep: usize,
    pub prefill_tp: usize,
    pub decode_tp: usize,
    pub decode_batch_per_gpu: usize,
    pub prefill_tokens_per_gpu: usize,
    pub gpus: usize,
    pub usd_per_hour: f64,
    pub meets_slo: bool,
    pub report: Report,
}

impl PlanRequest {
    fn sim_config(&self) -> SimConfig {
        SimConfig {
            model: self.model.clone(),
            gpu: self.gpu,
            calibration: self.calibration.clone(),
            prefill_nodes: 0,
            decode_nodes: 0,
            gpus_per_node: self.gpus_per_node,
            prefill_ep: self.gpus_per_node,
            decode_ep: self.gpus_per_node,
            prefill_tp: 1,
            decode_tp: 1,
            decode_batch_per_gpu: 128,
            prefill_tokens_per_gpu: 16384,
            mtp_accept: self.mtp_accept,
            moe_balance: MoeBalance::Eplb,
            prefix_cache: true,
            seed: self.seed,
            slo_ttft_ms: self.slo_ttft_ms,
            slo_tpot_ms: self.slo_tpot_ms,
            invariant_check_every: 0,
        }
    }

    /// Whether attention TP `tp` splits an EP group of `ep` GPUs and the model's heads evenly.
    fn tp_fits(&self, ep: usize, tp: usize) -> bool {
        tp > 0 && ep.is_multiple_of(tp) && self.model.splits_heads(tp)
    }

    fn run(&self, cfg: SimConfig, w: Synthetic) -> Result<Report, SimError> {
        let reqs = w.generate(&mut Rng::new(self.seed))?;
        Ok(Simulation::new(cfg, reqs)?.run())
    }

    fn decode_options(&self) -> Result<Vec<SideOption>, SimError> {
        let (isl, osl) = (self.input.mean(), self.output.mean());
        let ctx = (isl + osl / 2.0).max(OPTION_OUTPUT_TOKENS as f64);
        let mut out = Vec::new();
        let eps = self
            .decode_eps
            .iter()
            .filter(|&&e| e % self.gpus_per_node == 0);
        for (&ep, &tp) in eps.flat_map(|e| self.decode_tps.iter().map(move |t| (e, t))) {
            if !self.tp_fits(ep, tp) {
                continue;
            }
            let shape = GroupShape {
                ep,
                tp,
                gpus_per_node: self.gpus_per_node,
                mtp_drafts: usize::from(self.mtp_accept.is_some()),
                moe_balance: MoeBalance::Eplb,
            };
            let Ok(pages) =
                CostModel::new(&self.model, self.gpu, &self.calibration, shape)?.kv_pages_per_gpu()
            else {
                continue; // The weights do not fit at this EP size.
            };
            // Sequences per GPU the pool holds: a rank of `tp` GPUs has one GPU's pool.
            let fit = pages as usize / pages_for((isl + osl) as usize).max(1) / tp;
            for &b in &self.decode_batches {
                if b > fit.max(1) {
                    continue;
                }
                let mut cfg = self.sim_config();
                cfg.decode_nodes = ep / self.gpus_per_node;
                cfg.decode_ep = ep;
                cfg.decode_tp = tp;
                cfg.decode_batch_per_gpu = b;
                let w = Synthetic {
                    requests: ep * b,
                    arrivals: Arrivals::Saturate,
                    input: LenDist::Fixed(
                        (ctx as u64).saturating_sub(OPTION_OUTPUT_TOKENS / 2).max(1),
                    ),
                    output: LenDist::Fixed(OPTION_OUTPUT_TOKENS),
                    prefix_ratio: 0.0,
                    prefix_groups: 1,
                };
                let r = self.run(cfg, w)?;
                if r.tpot_ms_p99 > self.slo_tpot_ms * TPOT_MARGIN {
                    continue;
                }
                let per_node = r.decode_output_tokens_per_s_per_node;
                let unit = ep / self.gpus_per_node;
                let needed = self.rate * osl / (per_node * DECODE_UTILISATION).max(1e-9);
                out.push(SideOption {
                    ep,
                    tp,
                    knob: b,
                    nodes: round_up(needed.ceil() as usize, unit),
                    tokens_per_s_per_node: per_node,
                });
            }
        }
        Ok(self.best(out))
    }

    fn prefill_options(&self) -> Result<Vec<SideOption>, SimError> {
        let isl = self.input.mean();
        let mut out = Vec::new();
        let eps = self
            .prefill_eps
            .iter()
            .filter(|&&e| e % self.gpus_per_node == 0);
        for (&ep, &tp) in eps.flat_map(|e| self.prefill_tps.iter().map(move |t| (e, t))) {
            if !self.tp_fits(ep, tp) {
                continue;
            }
            for &tokens in &self.prefill_tokens {
                let mut cfg = self.sim_config();
                cfg.prefill_nodes = ep / self.gpus_per_node;
                cfg.prefill_ep = ep;
                cfg.prefill_tp = tp;
                cfg.prefill_tokens_per_gpu = tokens;
                let computed = (isl * (1.0 - self.prefix_ratio)).max(1.0);
                // About eight full steps of the group.
                let requests = ((8 * ep * tokens) as f64 / computed).ceil() as usize;
                let w = Synthetic {
                    requests: requests.max(ep),
                    arrivals: Arrivals::Saturate,
                    input: LenDist::Fixed(isl as u64),
                    output: LenDist::Fixed(1),
                    prefix_ratio: self.prefix_ratio,
                    prefix_groups: 4,
                };
                let r = match self.run(cfg, w) {
                    Ok(r) => r,
                    Err(SimError::DoesNotFit(_)) => continue,
                    Err(e) => return Err(e),
                };
                // One step alone must fit in the TTFT SLO, or no utilisation will meet it.
                if r.prefill_step_ms_mean > self.slo_ttft_ms / 2.0 {
                    continue;
                }
                let per_node = r.prefill_input_tokens_per_s_per_node;
                let unit = ep / self.gpus_per_node;
                let needed = self.rate * isl / (per_node * PREFILL_UTILISATION).max(1e-9);
                out.push(SideOption {
                    ep,
                    tp,
                    knob: tokens,
                    nodes: round_up(needed.ceil() as usize, unit),
                    tokens_per_s_per_node: per_node,
                });
            }
        }
        Ok(self.best(out))
    }

    fn best(&self, mut v: Vec<SideOption>) -> Vec<SideOption> {
        v.sort_by(|a, b| {
            a.nodes
                .cmp(&b.nodes)
                .then(b.tokens_per_s_per_node.total_cmp(&a.tokens_per_s_per_node))
                .then(a.ep.cmp(&b.ep))
                .then(a.tp.cmp(&b.tp))
                .then(a.knob.cmp(&b.knob))
        });
        v.truncate(OPTIONS_KEPT);
        v
    }

    fn verify(&self, p: &SideOption, d: &SideOption) -> Result<Candidate, SimError> {
        let (mut p_nodes, mut d_nodes) = (p.nodes, d.nodes);
        let mut last = None;
        for _ in 0..=REPAIRS_MAX {
            let mut cfg = self.sim_config();
            cfg.prefill_nodes = p_nodes;
            cfg.decode_nodes = d_nodes;
            cfg.prefill_ep = p.ep;
            cfg.decode_ep = d.ep;
            cfg.prefill_tp = p.tp;
            cfg.decode_tp = d.tp;
            cfg.prefill_tokens_per_gpu = p.knob;
            cfg.decode_batch_per_gpu = d.knob;
            let w = Synthetic {
                requests: self.verify_requests,
                arrivals: Arrivals::Poisson { rate: self.rate },
                input: self.input,
                output: self.output,
                prefix_ratio: self.prefix_ratio,
                prefix_groups: 16,
            };
            let r = self.run(cfg, w)?;
            let ttft_ok = r.ttft_ms_p99 <= self.slo_ttft_ms;
            let tpot_ok = r.tpot_ms_p99 <= self.slo_tpot_ms;
            let gpus = (p_nodes + d_nodes) * self.gpus_per_node;
            let c = Candidate {
                prefill_nodes: p_nodes,
                decode_nodes: d_nodes,
                prefill_ep: p.ep,
                decode_ep: d.ep,
                prefill_tp: p.tp,
                decode_tp: d.tp,
                decode_batch_per_gpu: d.knob,
                prefill_tokens_per_gpu: p.knob,
                gpus,
                usd_per_hour: gpus as f64 * self.gpu.usd_per_gpu_hour,
                meets_slo: ttft_ok && tpot_ok,
                report: r,
            };
            if c.meets_slo {
                return Ok(c);
            }
            if !ttft_ok {
                p_nodes += p.ep / self.gpus_per_node;
            }
            if !tpot_ok {
                d_nodes += d.ep / self.gpus_per_node;
            }
            last = Some(c);
        }
        Ok(last.expect("the loop runs at least once"))
    }
}

fn round_up(n: usize, unit: usize) -> usize {
    n.max(1).div_ceil(unit) * unit
}

/// Runs the search; returns verified candidates, those meeting the SLO first, best first.
pub fn search(req: &PlanRequest) -> Result<Vec<Candidate>, SimError> {
    if !(req.rate.is_finite() && req.rate > 0.0) {
        return Err(SimError::Invalid("--rate must be > 0".into()));
    }
    let decode = req.decode_options()?;
    let prefill = req.prefill_options()?;
    if decode.is_empty() {
        return Err(SimError::DoesNotFit(format!(
            "no decode EP size and batch meets TPOT p99 ≤ {} ms on {} (or the weights do not fit)",
            req.slo_tpot_ms, req.gpu.name
        )));
    }
    if prefill.is_empty() {
        return Err(SimError::DoesNotFit(format!(
            "no prefill EP size fits on {} with a step under half the TTFT SLO",
            req.gpu.name
        )));
    }
    let mut out = Vec::new();
    for p in &prefill {
        for d in &decode {
            out.push(req.verify(p, d)?);
        }
    }
    let key = |c: &Candidate| match req.objective {
        Objective::Gpus => c.gpus as f64,
        Objective::Cost => c.usd_per_hour,
    };
    out.sort_by(|a, b| {
        b.meets_slo
            .cmp(&a.meets_slo)
            .then(key(a).total_cmp(&key(b)))
            .then(a.report.ttft_ms_p99.total_cmp(&b.report.ttft_ms_p99))
    });
    Ok(out)
}

/// The candidate as core's cluster config: one prefill worker and one decode group per attention
/// rank (`tp` GPUs).
fn planned_config(
    c: &Candidate,
    req: &PlanRequest,
    model_dir: &str,
) -> Result<ClusterConfig, SimError> {
    let mut cfg = ClusterConfig::default();
    cfg.model.path = Some(model_dir.to_string());
    cfg.model.dtype = duet_core::config::ComputeDtype::Bf16;
    let g = req.gpus_per_node;
    cfg.prefill.workers = c.prefill_nodes * g / c.prefill_tp;
    cfg.prefill.kv_pages = c.report.kv_pages_per_prefill_gpu;
    cfg.prefill.token_budget = c.prefill_tokens_per_gpu * c.prefill_tp;
    cfg.prefill.chunk_tokens = c.prefill_tokens_per_gpu * c.prefill_tp;
    cfg.decode.groups = c.decode_nodes * g / c.decode_tp;
    cfg.decode.kv_pages = c.report.kv_pages_per_decode_gpu;
    cfg.decode.max_running = c.decode_batch_per_gpu * c.decode_tp;
    cfg.decode.token_budget =
        c.decode_batch_per_gpu * c.decode_tp * (1 + usize::from(req.mtp_accept.is_some())) + 512;
    // A dense model has no experts to spread: each instance is one TP rank on its own.
    let dense = !req.model.is_moe();
    cfg.prefill.ep_size = if dense { c.prefill_tp } else { c.prefill_ep };
    cfg.prefill.tp_size = c.prefill_tp;
    cfg.decode.ep_size = if dense { c.decode_tp } else { c.decode_ep };
    cfg.decode.tp_size = c.decode_tp;
    cfg.validate()
        .map_err(|e| SimError::Invalid(format!("planned config: {e}")))?;
    Ok(cfg)
}

/// The candidate as core's cluster config (TOML), with the parallelism in a comment header.
pub fn cluster_toml(c: &Candidate, req: &PlanRequest, model_dir: &str) -> Result<String, SimError> {
    let cfg = planned_config(c, req, model_dir)?;
    let dense = !req.model.is_moe();
    let parallelism = if dense {
        format!(
            "# Parallelism (dense model, no experts): prefill instances of TP{ptp}, decode instances\n\
             # of TP{dtp}; one prefill worker and one decode group per instance.\n",
            ptp = c.prefill_tp,
            dtp = c.decode_tp,
        )
    } else {
        format!(
            "# Parallelism: prefill EP{pep} with DP{pdp} × TP{ptp} attention per instance, decode\n\
             # EP{dep} with DP{ddp} × TP{dtp}; one prefill worker and one decode group per attention\n\
             # rank (`ep_size`/`tp_size` below).\n",
            pep = c.prefill_ep,
            dep = c.decode_ep,
            pdp = c.prefill_ep / c.prefill_tp,
            ptp = c.prefill_tp,
            ddp = c.decode_ep / c.decode_tp,
            dtp = c.decode_tp,
        )
    };
    let header = format!(
        "# Written by `duet plan` for {gpu} × {gpus} ({pn} prefill + {dn} decode nodes of {g}).\n\
         {parallelism}\
         # Predicted at {rate} req/s: TTFT p99 {ttft:.0} ms, TPOT p99 {tpot:.1} ms, \
         {out:.0} output tok/s per decode node.\n\n",
        gpu = req.gpu.name,
        gpus = c.gpus,
        pn = c.prefill_nodes,
        dn = c.decode_nodes,
        rate = req.rate,
        ttft = c.report.ttft_ms_p99,
        tpot = c.report.tpot_ms_p99,
        out = c.report.decode_output_tokens_per_s_per_node,
        g = req.gpus_per_node,
    );
    Ok(header + &cfg.to_toml())
}

/// The candidate as an ansible inventory for deploy/site.yml (INI): groups `duet_gateway`,
/// `duet_prefill`, `duet_decode`, one host per node; each worker host carries its EP instance and
/// its rank in it. Replace each `ansible_host` with the machine's address. `duet_prometheus` (where
/// site.yml installs Prometheus scraping every process) is the gateway host.
pub fn ansible_inventory(c: &Candidate, req: &PlanRequest) -> String {
    let mut s = String::from(
        "# Written by `duet plan`. Replace each ansible_host with the machine's address, then:\n\
         #   ansible-playbook -i inventory.ini deploy/site.yml\n\
         # The variables are in group_vars/all.yml (deploy/README.md lists them).\n\n\
         [duet_gateway]\ngateway-0 ansible_host=gateway-0.invalid\n",
    );
    for (role, nodes, ep) in [
        ("prefill", c.prefill_nodes, c.prefill_ep),
        ("decode", c.decode_nodes, c.decode_ep),
    ] {
        s.push_str(&format!("\n[duet_{role}]\n"));
        let per_instance = (ep / req.gpus_per_node).max(1);
        for n in 0..nodes {
            s.push_str(&format!(
                "{role}-{n} ansible_host={role}-{n}.invalid duet_instance={} duet_node_rank={}\n",
                n / per_instance,
                n % per_instance
            ));
        }
    }
    s.push_str("\n# Prometheus (scraping every process above, with deploy/prometheus's rules).\n");
    s.push_str("[duet_prometheus]\ngateway-0\n");
    s
}

/// The variables deploy/site.yml reads (`group_vars/all.yml` next to the inventory): the config
/// file, the model, and what each worker process runs — DP ranks per host, KV pages, batch caps —
/// with the parallelism and the ports.
pub fn ansible_group_vars(
    c: &Candidate,
    req: &PlanRequest,
    model_dir: &str,
) -> Result<String, SimError> {
    let cfg = planned_config(c, req, model_dir)?;
    let g = req.gpus_per_node;
    let quoted = |v: &str| serde_json::to_string(v).expect("a string serialises");
    Ok(format!(
        "---\n\
         # Written by `duet plan` for {gpu} × {gpus}: what deploy/site.yml deploys.\n\
         duet_gpu: {gpu_q}\n\
         duet_gpus_per_node: {g}\n\
         # The cluster config (core's TOML schema) next to this inventory.\n\
         duet_config_src: \"{{{{ inventory_dir }}}}/duet.toml\"\n\
         # The model directory on the control node; the hosts get a verified copy.\n\
         duet_model_src: {model}\n\
         duet_prefill_ep: {pep}\n\
         duet_prefill_tp: {ptp}\n\
         duet_decode_ep: {dep}\n\
         duet_decode_tp: {dtp}\n\
         # One worker process per host, one worker (DP rank) per attention rank of TP GPUs.\n\
         duet_prefill_workers_per_host: {pw}\n\
         duet_decode_workers_per_host: {dw}\n\
         duet_prefill_kv_pages: {pkv}\n\
         duet_decode_kv_pages: {dkv}\n\
         duet_decode_max_running: {dmr}\n\
         duet_http_port: {http}\n\
         duet_cluster_port: {cluster}\n\
         duet_metrics_port: 9967\n",
        gpu = req.gpu.name,
        gpu_q = quoted(req.gpu.name),
        gpus = c.gpus,
        model = quoted(model_dir),
        pep = cfg.prefill.ep_size,
        ptp = cfg.prefill.tp_size,
        dep = cfg.decode.ep_size,
        dtp = cfg.decode.tp_size,
        pw = (g / c.prefill_tp).max(1),
        dw = (g / c.decode_tp).max(1),
        pkv = cfg.prefill.kv_pages,
        dkv = cfg.decode.kv_pages,
        dmr = cfg.decode.max_running,
        http = cfg.gateway.port,
        cluster = cfg.gateway.cluster_port,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::gpu;

    #[test]
    fn plans_a_small_cluster_and_writes_valid_config() {
        let req = PlanRequest {
            model: ModelConfig::deepseek_v3(),
            gpu: gpu("h200").unwrap(),
            calibration: Calibration::default(),
            gpus_per_node: 8,
            input: LenDist::Fixed(1000),
            output: LenDist::Fixed(50),
            prefix_ratio: 0.0,
            rate: 4.0,
            slo_ttft_ms: 3000.0,
            slo_tpot_ms: 100.0,
            mtp_accept: None,
            objective: Objective::Gpus,
            seed: 1,
            verify_requests: 60,
            decode_eps: vec![8],
            decode_tps: vec![1],
            decode_batches: vec![16, 32],
            prefill_eps: vec![8],
            prefill_tps: vec![1],
            prefill_tokens: vec![4096],
        };
        let cands = search(&req).unwrap();
        let best = &cands[0];
        assert!(best.meets_slo, "{:?}", best.report);
        let toml = cluster_toml(best, &req, "/srv/models/deepseek-v3").unwrap();
        let parsed = ClusterConfig::from_toml(&toml).unwrap();
        assert_eq!(parsed.decode.max_running, best.decode_batch_per_gpu);
        let inv = ansible_inventory(best, &req);
        assert!(inv.contains("\n[duet_prefill]\n") && inv.contains("\ndecode-0 ansible_host="));
        assert!(inv.ends_with("\n[duet_prometheus]\ngateway-0\n"), "{inv}");
        let vars = ansible_group_vars(best, &req, "/srv/models/deepseek-v3").unwrap();
        let var = |k: &str| {
            let line = vars
                .lines()
                .find(|l| l.starts_with(&format!("{k}: ")))
                .unwrap();
            line[k.len() + 2..].to_string()
        };
        assert_eq!(
            var("duet_decode_max_running"),
            parsed.decode.max_running.to_string()
        );
        assert_eq!(
            var("duet_decode_kv_pages"),
            parsed.decode.kv_pages.to_string()
        );
        assert_eq!(var("duet_prefill_ep"), best.prefill_ep.to_string());
        assert_eq!(
            var("duet_decode_workers_per_host"),
            (8 / best.decode_tp).to_string()
        );
        assert_eq!(var("duet_model_src"), "\"/srv/models/deepseek-v3\"");
    }
}
