//! The discrete-event engine: core's policies in virtual time.
//!
//! # Model of the cluster
//!
//! Prefill and decode GPUs form *groups* of `ep` GPUs (one expert-parallel instance each). Every GPU
//! is a *rank*: a real [`duet_core::sched::Scheduler`] over its own real
//! [`duet_core::kv::KvManager`] (radix prefix cache on prefill ranks), exactly as a worker actor
//! holds them. A group steps in lock-step (the MoE all-to-all synchronises its ranks): at a step
//! start every rank's scheduler plans its share, the cost model turns the plans into one duration,
//! and at the step end every rank completes its plan.
//!
//! Every PD decision is made by the server's own cores in `duet_core::pd`: the gateway is a
//! [`GatewayCore`] (a FIFO queue; decode placement against committed pages, then prefill routing,
//! each two-level as in SGLang PD: router → server → DP rank), each prefill rank a
//! [`PrefillCore`] and each decode rank a [`DecodeCore`] (reservation, handoff, batch, when a
//! sequence ends), each over a real scheduler and KV manager. When prefill completes a prompt its first token streams to
//! the client (TTFT), its full pages go into the rank's prefix cache, and the KV is streamed to the
//! decode rank: `kv_bytes_per_token × prompt` over the prefill GPU's NIC, layer-wise so that only
//! `1/layers` of it (or what the final chunk could not hide) is left after the prompt's last chunk,
//! queued behind earlier transfers on the same NIC. The decode rank then submits the sequence with
//! its KV already computed. With MTP each decode step verifies one draft per sequence and accepts it
//! with the configured probability (seeded draws).
//!
//! `prefill_nodes = 0` skips prefill (KV appears on decode at placement: a decode-only measurement);
//! `decode_nodes = 0` ends requests after their first token (prefill-only).
//!
//! # Events and determinism
//!
//! Time is an integer number of µs. Events live in a binary heap keyed by (time, insertion number), so
//! simultaneous events run in the order they were scheduled; arrivals come from the sorted request
//! list. Everything else iterates vectors or B-trees, and randomness comes from the seeded
//! [`Rng`]: the same inputs and seed give the same report, byte for byte.
//!
//! # No silent stall
//!
//! Every unfinished request is in exactly one place with a wake-up: a future arrival, the gateway
//! queue (woken by any step or transfer completion), a busy group's scheduler (its step-end event),
//! or a transfer in flight (its arrival event). Asserted: a group that goes idle has nothing it could
//! run, and the event loop may only run dry when every request has finished.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;

use duet_core::kv::{KvConfig, KvManager};
use duet_core::pd::{
    DecodeAction, DecodeConfig, DecodeCore, FirstToken, GatewayAction, GatewayConfig, GatewayCore,
    PdRequest, PrefillCore, RankId, SeqLimits,
};
use duet_core::route::{BalancePolicy, PrefillRouterConfig, page_chain_hashes};
use duet_core::sched::{SchedConfig, Scheduler, StepPlan};

use crate::SimError;
use crate::calibration::Calibration;
use crate::cost::{CostModel, GroupShape, MoeBalance, Phase, RankWork};
use crate::hardware::Gpu;
use crate::model::ModelConfig;
use crate::report::{LogHistogram, Report, quantile};
use crate::rng::Rng;
use crate::workload::Request;

/// A run's cluster and policy parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub model: ModelConfig,
    pub gpu: Gpu,
    pub calibration: Calibration,
    pub prefill_nodes: usize,
    pub decode_nodes: usize,
    pub gpus_per_node: usize,
    pub prefill_ep: usize,
    pub decode_ep: usize,
    /// Attention tensor-parallel size of the prefill / decode groups: GPUs per DP-attention rank
    /// (1: pure DP attention, DeepSeek's and SGLang's choice for MLA).
    pub prefill_tp: usize,
    pub decode_tp: usize,
    /// Decode batch cap per GPU (the scheduler's `max_running` is this × the rank's TP GPUs).
    pub decode_batch_per_gpu: usize,
    /// Prefill tokens per GPU per step (the scheduler's `token_budget` and chunk size).
    pub prefill_tokens_per_gpu: usize,
    /// Probability that an MTP draft token is accepted; None: no MTP.
    pub mtp_accept: Option<f64>,
    /// How routed-expert load spreads over each EP group's GPUs.
    pub moe_balance: MoeBalance,
    pub prefix_cache: bool,
    pub seed: u64,
    pub slo_ttft_ms: f64,
    pub slo_tpot_ms: f64,
    /// Run core's `check_invariants` every this many steps of each group (0: never). Tests use it;
    /// it costs O(pages) per rank.
    pub invariant_check_every: u64,
}

/// Most sequences prefilling at once on one rank: enough for 16 K-token steps of 64-token prompts.
const PREFILL_RUNNING_MAX: usize = 256;
/// A prefill rank accepts more prompts only while it has fewer than this many steps' worth of tokens
/// outstanding: one running and one ready, so it never idles, without hoarding work that another
/// rank could start now.
const PREFILL_QUEUED_STEPS_MAX: u64 = 2;
/// Bound of each scheduler's waiting queue; gateway admission keeps far below it.
const WAITING_MAX: usize = 1 << 20;
/// Decode recompute chunk after preemption, tokens: one prefill-sized chunk keeps a decode step
/// from stalling the batch for long.
const DECODE_CHUNK_TOKENS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    PrefillStepDone(u32),
    DecodeStepDone(u32),
    KvArrived(u32),
}

/// A prefill rank: the server's prefill core over its scheduler and pool.
#[derive(Debug)]
struct PrefillRank {
    core: PrefillCore<()>,
    plan: StepPlan,
    /// When this GPU's NIC is free for the next KV transfer.
    nic_free_us: u64,
}

/// A decode rank: the server's decode-group core over its scheduler and pool.
#[derive(Debug)]
struct DecodeRank {
    core: DecodeCore<(), ()>,
    plan: StepPlan,
}

#[derive(Debug)]
struct Group<R> {
    ranks: Vec<R>,
    busy: bool,
    steps: u64,
    last_step_us: u64,
}

/// Per-request progress.
#[derive(Debug, Clone, Copy)]
struct ReqState {
    first_token_us: u64,
    last_token_us: u64,
    finish_us: u64,
    generated: u32,
    /// The decode rank holding its pages.
    decode_at: RankId,
    /// The rank that prefilled it.
    prefill_at: RankId,
    failed: bool,
}

const NONE_US: u64 = u64::MAX;

/// One simulation run. Build with [`Simulation::new`], then [`Simulation::run`].
pub struct Simulation {
    cfg: SimConfig,
    reqs: Vec<Request>,
    state: Vec<ReqState>,
    prefill_cost: Option<Rc<CostModel>>,
    decode_cost: Option<Rc<CostModel>>,
    prefill: Vec<Group<PrefillRank>>,
    decode: Vec<Group<DecodeRank>>,
    gateway: GatewayCore,
    /// Prompts hashed by the gateway in this `pump`, until their prefill rank takes them.
    placed_prompts: rustc_hash::FxHashMap<u64, Vec<u32>>,
    heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    event_seq: u64,
    next_arrival: usize,
    now_us: u64,
    mtp_rng: Rng,
    finished: usize,
    failed: usize,
    // Measurements.
    /// (time, prompt tokens) per completed prefill.
    prefill_done: Vec<(u64, u32)>,
    decode_steps: Vec<(u64, u32)>,
    itl: LogHistogram,
    prefill_busy_us: u64,
    prefill_steps: u64,
    prefill_kv_util_us: f64,
    decode_busy_us: u64,
    decode_steps_n: u64,
    decode_items: u64,
    decode_kv_util_us: f64,
    preemptions: u64,
    kv_pages_prefill: u32,
    kv_pages_decode: u32,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Simulation({} requests, t = {} µs)",
            self.reqs.len(),
            self.now_us
        )
    }
}

fn shape(cfg: &SimConfig, phase: Phase) -> GroupShape {
    let (ep, tp) = match phase {
        Phase::Prefill => (cfg.prefill_ep, cfg.prefill_tp),
        Phase::Decode => (cfg.decode_ep, cfg.decode_tp),
    };
    GroupShape {
        ep,
        tp,
        gpus_per_node: cfg.gpus_per_node,
        mtp_drafts: match (phase, cfg.mtp_accept) {
            (Phase::Decode, Some(_)) => 1,
            _ => 0,
        },
        moe_balance: cfg.moe_balance,
    }
}

impl Simulation {
    pub fn new(cfg: SimConfig, reqs: Vec<Request>) -> Result<Self, SimError> {
        validate(&cfg)?;
        if reqs.is_empty() {
            return Err(SimError::Workload("no requests".into()));
        }
        if reqs.len() > u32::MAX as usize {
            return Err(SimError::Workload("more than 2^32 requests".into()));
        }
        debug_assert!(reqs.windows(2).all(|w| w[0].arrival_us <= w[1].arrival_us));
        let p_gpus = cfg.prefill_nodes * cfg.gpus_per_node;
        let d_gpus = cfg.decode_nodes * cfg.gpus_per_node;
        let mut root = Rng::new(cfg.seed);
        let mtp_rng = root.fork(1);
        let (prefill_cost, kv_pages_prefill) = if p_gpus > 0 {
            let c = CostModel::new(
                &cfg.model,
                cfg.gpu,
                &cfg.calibration,
                shape(&cfg, Phase::Prefill),
            )?;
            let pages = c.kv_pages_per_gpu()?;
            (Some(Rc::new(c)), pages)
        } else {
            (None, 0)
        };
        let (decode_cost, kv_pages_decode) = if d_gpus > 0 {
            let c = CostModel::new(
                &cfg.model,
                cfg.gpu,
                &cfg.calibration,
                shape(&cfg, Phase::Decode),
            )?;
            let pages = c.kv_pages_per_gpu()?;
            (Some(Rc::new(c)), pages)
        } else {
            (None, 0)
        };
        // A rank of `tp` GPUs takes `tp` GPUs' worth of tokens and sequences; its KV pool stays one
        // GPU's, since each of its GPUs holds the whole latent.
        let (p_tp, d_tp) = (cfg.prefill_tp, cfg.decode_tp);
        let prefill_sched = SchedConfig {
            max_running: PREFILL_RUNNING_MAX,
            token_budget: cfg.prefill_tokens_per_gpu * p_tp,
            chunk_tokens: cfg.prefill_tokens_per_gpu * p_tp,
            waiting_max: WAITING_MAX,
        };
        let drafts = usize::from(cfg.mtp_accept.is_some());
        let decode_sched = SchedConfig {
            max_running: cfg.decode_batch_per_gpu * d_tp,
            // A full batch with every sequence's accepted drafts, plus one recompute chunk.
            token_budget: cfg.decode_batch_per_gpu * d_tp * (1 + drafts) + DECODE_CHUNK_TOKENS,
            chunk_tokens: DECODE_CHUNK_TOKENS,
            waiting_max: WAITING_MAX,
        };
        // The gateway's model of a rank's cache needs no more pages than the rank's pool holds: the
        // rank has evicted the rest. A group's model covers all its ranks' pools.
        let rank_router = PrefillRouterConfig {
            tree_pages_max: (kv_pages_prefill as usize).max(1),
            ..PrefillRouterConfig::default()
        };
        let group_router = PrefillRouterConfig {
            tree_pages_max: (kv_pages_prefill as usize * (cfg.prefill_ep / p_tp)).max(1),
            ..PrefillRouterConfig::default()
        };
        let groups = |gpus: usize, ep: usize, tp: usize| (gpus / ep.max(1), ep / tp);
        let (p_groups, p_ranks) = groups(p_gpus, cfg.prefill_ep, p_tp);
        let (d_groups, d_ranks) = groups(d_gpus, cfg.decode_ep, d_tp);
        let mut gateway = GatewayCore::new(GatewayConfig {
            prefill: p_gpus > 0,
            decode: d_gpus > 0,
            prefill_queued_tokens_max: PREFILL_QUEUED_STEPS_MAX
                * (cfg.prefill_tokens_per_gpu * p_tp) as u64,
            rank_router,
            group_router,
            balance: BalancePolicy::default(),
            commit_new_tokens_max: usize::MAX,
            // Every role has its ranks from the start: nothing waits for a worker to join.
            no_worker_wait_max_us: u64::MAX,
        });
        let prefill_kv = KvConfig {
            pages_total: kv_pages_prefill,
            prefix_cache: cfg.prefix_cache,
        };
        let prefill = (0..p_groups)
            .map(|g| {
                gateway.set_prefill_group(g as u32, p_ranks);
                Group {
                    ranks: (0..p_ranks)
                        .map(|k| PrefillRank {
                            core: PrefillCore::new(
                                k as u32,
                                usize::MAX,
                                Scheduler::new(prefill_sched),
                                KvManager::new(prefill_kv),
                            ),
                            plan: StepPlan::default(),
                            nic_free_us: 0,
                        })
                        .collect(),
                    busy: false,
                    steps: 0,
                    last_step_us: 0,
                }
            })
            .collect();
        let decode_kv = KvConfig {
            pages_total: kv_pages_decode,
            prefix_cache: false,
        };
        let decode = (0..d_groups)
            .map(|g| {
                gateway.set_decode_group(
                    g as u32,
                    &vec![(kv_pages_decode as usize, decode_sched.max_running); d_ranks],
                );
                Group {
                    ranks: (0..d_ranks)
                        .map(|k| DecodeRank {
                            core: DecodeCore::new(
                                DecodeConfig {
                                    group: k as u32,
                                    // The transfer's arrival is one event: no per-layer frames.
                                    layers: 0,
                                    max_positions: usize::MAX,
                                    kv_arrival_deadline_us: u64::MAX,
                                    reservation_ttl_us: u64::MAX,
                                    reserve_queue_max: WAITING_MAX,
                                },
                                Scheduler::new(decode_sched),
                                KvManager::new(decode_kv),
                            ),
                            plan: StepPlan::default(),
                        })
                        .collect(),
                    busy: false,
                    steps: 0,
                    last_step_us: 0,
                }
            })
            .collect();
        let n = reqs.len();
        Ok(Simulation {
            state: vec![
                ReqState {
                    first_token_us: NONE_US,
                    last_token_us: NONE_US,
                    finish_us: NONE_US,
                    generated: 0,
                    decode_at: RankId { group: 0, rank: 0 },
                    prefill_at: RankId { group: 0, rank: 0 },
                    failed: false,
                };
                n
            ],
            reqs,
            prefill_cost,
            decode_cost,
            prefill,
            decode,
            gateway,
            placed_prompts: Default::default(),
            heap: BinaryHeap::new(),
            event_seq: 0,
            next_arrival: 0,
            now_us: 0,
            mtp_rng,
            finished: 0,
            failed: 0,
            prefill_done: Vec::with_capacity(n),
            decode_steps: Vec::new(),
            itl: LogHistogram::default(),
            prefill_busy_us: 0,
            prefill_steps: 0,
            prefill_kv_util_us: 0.0,
            decode_busy_us: 0,
            decode_steps_n: 0,
            decode_items: 0,
            decode_kv_util_us: 0.0,
            preemptions: 0,
            kv_pages_prefill,
            kv_pages_decode,
            cfg,
        })
    }

    fn push(&mut self, at_us: u64, ev: Event) {
        self.event_seq += 1;
        self.heap.push(Reverse((at_us, self.event_seq, ev)));
    }

    /// Runs to completion and returns the report.
    pub fn run(self) -> Report {
        self.run_detailed().0
    }

    /// Runs to completion; returns the report and the per-request latency samples (for charts).
    pub fn run_detailed(mut self) -> (Report, Samples) {
        let n = self.reqs.len();
        loop {
            let next_event = self.heap.peek().map(|Reverse((t, _, _))| *t);
            let next_arrival = self.reqs.get(self.next_arrival).map(|r| r.arrival_us);
            let arrival_first = match (next_arrival, next_event) {
                (None, None) => break,
                (Some(ta), Some(te)) => ta <= te,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            match next_arrival {
                Some(ta) if arrival_first => {
                    self.now_us = ta;
                    while self.next_arrival < n && self.reqs[self.next_arrival].arrival_us == ta {
                        let r = self.next_arrival;
                        let req = &self.reqs[r];
                        // Hashed when placed (`pump`), not while it waits.
                        self.gateway.handle_arrival(
                            ta,
                            PdRequest {
                                seq: r as u64,
                                prompt_len: req.input_len as usize,
                                max_new_tokens: req.output_len as usize,
                                page_hashes: Vec::new(),
                            },
                        );
                        self.next_arrival += 1;
                    }
                    self.pump();
                }
                _ => {
                    let Reverse((t, _, ev)) = self.heap.pop().expect("peeked");
                    debug_assert!(t >= self.now_us, "time ran backwards");
                    self.now_us = t;
                    match ev {
                        Event::PrefillStepDone(g) => self.prefill_step_done(g as usize),
                        Event::DecodeStepDone(g) => self.decode_step_done(g as usize),
                        Event::KvArrived(r) => self.kv_arrived(r),
                    }
                }
            }
            // The wake-up invariant: work left means something is scheduled to happen.
            assert!(
                self.finished == n || !self.heap.is_empty() || self.next_arrival < n,
                "stall at t = {} µs: {} of {n} requests unfinished, {} at the gateway, nothing scheduled",
                self.now_us,
                n - self.finished,
                self.gateway.queued()
            );
        }
        assert_eq!(
            self.finished, n,
            "the event loop ended with unfinished requests"
        );
        self.report()
    }

    // ---------------------------------------------------------------------------------------------
    // Gateway
    // ---------------------------------------------------------------------------------------------

    /// Places requests from the head of the gateway queue while there is room (core's
    /// [`GatewayCore`], the server's own policy), reserving at the decode rank first.
    fn pump(&mut self) {
        let now = self.now_us;
        // The prompt's tokens are made once, when it is placed: hashed for routing here, kept for
        // the prefill rank's submit below.
        let (reqs, seed, prompts) = (&self.reqs, self.cfg.seed, &mut self.placed_prompts);
        self.gateway.pump_with(now, &mut |req| {
            let tokens = reqs[req.seq as usize].prompt_tokens(req.seq, seed);
            let hashes = page_chain_hashes(&tokens);
            prompts.insert(req.seq, tokens);
            hashes
        });
        // Groups get their new work only after the whole batch of placements, so that a step does
        // not start with the first placed request alone.
        let mut touched_prefill = Vec::new();
        let mut touched_decode = Vec::new();
        while let Some(action) = self.gateway.poll_action() {
            let (req, prefill, decode) = match action {
                GatewayAction::Place {
                    req,
                    prefill,
                    decode,
                    ..
                } => (req, prefill, decode),
                GatewayAction::Refuse { req, .. } | GatewayAction::Expire { req } => {
                    self.fail(req.seq as u32);
                    continue;
                }
            };
            let r = req.seq as u32;
            if let Some(at) = decode {
                self.state[r as usize].decode_at = at;
                let rank = &mut self.decode[at.group as usize].ranks[at.rank as usize];
                rank.core.handle_reserve(now, req.seq, req.prompt_len, ());
                // Commitments cover full lengths, so the pages are there now.
                match rank.core.poll_action() {
                    Some(DecodeAction::Prefill { .. }) => {}
                    other => panic!("decode reservation of request {r} after placement: {other:?}"),
                }
            }
            match (prefill, decode) {
                (Some(at), _) => {
                    self.state[r as usize].prefill_at = at;
                    let tokens = match self.placed_prompts.remove(&req.seq) {
                        Some(t) => t,
                        None => self.reqs[r as usize].prompt_tokens(req.seq, self.cfg.seed),
                    };
                    let limits = SeqLimits {
                        max_new_tokens: req.max_new_tokens,
                        stop_token_ids: Vec::new(),
                    };
                    let rank = &mut self.prefill[at.group as usize].ranks[at.rank as usize];
                    rank.core.handle_submit(now, req.seq, tokens, limits, ());
                    if let Some(refused) = rank.core.poll_refused() {
                        panic!("prefill submit of request {r}: {}", refused.reason);
                    }
                    touched_prefill.push(at.group as usize);
                }
                (None, Some(at)) => {
                    // Decode-only: the KV is there at once; the first token counts as produced now.
                    let s = &mut self.state[r as usize];
                    s.first_token_us = now;
                    s.last_token_us = now;
                    s.generated = 1;
                    if self.reqs[r as usize].output_len <= 1 {
                        let rank = &mut self.decode[at.group as usize].ranks[at.rank as usize];
                        rank.core.handle_unreserve(now, req.seq);
                        self.gateway.handle_done(req.seq);
                        self.finish(r, false);
                    } else {
                        self.hand_off(r);
                        touched_decode.push(at.group as usize);
                    }
                }
                (None, None) => unreachable!("a simulation has prefill or decode ranks"),
            }
        }
        touched_prefill.sort_unstable();
        touched_prefill.dedup();
        for g in touched_prefill {
            self.start_prefill(g);
        }
        touched_decode.sort_unstable();
        touched_decode.dedup();
        for g in touched_decode {
            self.start_decode(g);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Prefill
    // ---------------------------------------------------------------------------------------------

    /// Starts a step of prefill group `g` if it is idle and has work.
    fn start_prefill(&mut self, g: usize) {
        if self.prefill[g].busy {
            return;
        }
        let now = self.now_us;
        let cost = Rc::clone(self.prefill_cost.as_ref().expect("prefill groups exist"));
        let grp = &mut self.prefill[g];
        let mut works = vec![RankWork::default(); grp.ranks.len()];
        let mut any = false;
        let mut failed = Vec::new();
        let mut used_pages = 0usize;
        for (k, rank) in grp.ranks.iter_mut().enumerate() {
            let plan = rank.core.plan_step(now).unwrap_or_default();
            while let Some(refused) = rank.core.poll_refused() {
                failed.push(refused.seq as u32);
            }
            for item in &plan.items {
                cost.add_prefill_item(&mut works[k], item.start, item.len, item.samples);
            }
            any |= !plan.items.is_empty();
            self.preemptions += plan.preempted.len() as u64;
            used_pages += rank.core.kv().pages_used();
            rank.plan = plan;
        }
        for r in failed {
            self.fail_in_prefill(r);
        }
        let grp = &mut self.prefill[g];
        if !any {
            for rank in &grp.ranks {
                let sched = rank.core.sched();
                assert!(
                    sched.running() == 0 && sched.waiting() == 0,
                    "prefill group {g} idle with {} running and {} waiting sequences",
                    sched.running(),
                    sched.waiting()
                );
            }
            return;
        }
        let step = cost.step(Phase::Prefill, &works);
        let dur = (step.total_us.ceil() as u64).max(1);
        grp.busy = true;
        grp.last_step_us = dur;
        self.prefill_busy_us += dur;
        self.prefill_steps += 1;
        let total_pages = (self.kv_pages_prefill as usize * grp.ranks.len()).max(1);
        self.prefill_kv_util_us += used_pages as f64 / total_pages as f64 * dur as f64;
        self.push(now + dur, Event::PrefillStepDone(g as u32));
    }

    fn prefill_step_done(&mut self, g: usize) {
        let now = self.now_us;
        let layers = self.cfg.model.layers();
        let handoff_us = self.cfg.calibration.pd.handoff_latency_us;
        let has_decode = !self.decode.is_empty();
        let check = self.cfg.invariant_check_every;
        let grp = &mut self.prefill[g];
        grp.busy = false;
        grp.steps += 1;
        let last_step_us = grp.last_step_us;
        let mut done = Vec::new();
        for (k, rank) in grp.ranks.iter_mut().enumerate() {
            let plan = std::mem::take(&mut rank.plan);
            rank.core.handle_step_done(&plan);
            for item in plan.items.iter().filter(|i| i.samples) {
                // The core caches the prompt's full pages for later requests.
                let out = rank
                    .core
                    .handle_first_token(now, item.seq, 0, Ok(()))
                    .expect("a sampled sequence is known to its core");
                let ends = matches!(out, FirstToken::Finished { .. });
                done.push((k, item.seq as u32, ends));
            }
            if check > 0 && grp.steps.is_multiple_of(check) {
                rank.core.check_invariants();
            }
        }
        for k in 0..self.prefill[g].ranks.len() {
            let core = &self.prefill[g].ranks[k].core;
            let (queued, running) = (core.sched().outstanding_tokens(), core.sched().running());
            let at = RankId {
                group: g as u32,
                rank: k as u32,
            };
            self.gateway.update_prefill(at, queued, running);
        }
        for (k, r, ends) in done {
            let input = self.reqs[r as usize].input_len;
            let s = &mut self.state[r as usize];
            s.first_token_us = now;
            s.last_token_us = now;
            s.generated = 1;
            self.prefill_done.push((now, input));
            if !has_decode {
                self.finish(r, false);
                continue;
            }
            let at = self.state[r as usize].decode_at;
            if ends {
                let rank = &mut self.decode[at.group as usize].ranks[at.rank as usize];
                rank.core.handle_unreserve(now, r as u64);
                self.gateway.handle_done(r as u64);
                self.finish(r, false);
                continue;
            }
            // Layer-wise streaming: the transfer runs alongside the prompt's computation, so after
            // the last chunk only the last layer's share, or what the chunk was too short to hide,
            // remains; transfers on one NIC queue behind each other.
            let xfer_us = self
                .prefill_cost
                .as_ref()
                .expect("prefill exists")
                .kv_transfer_us(input as usize);
            let rank = &mut self.prefill[g].ranks[k];
            let start = rank.nic_free_us.max(now.saturating_sub(last_step_us));
            let end = (start as f64 + xfer_us).max(now as f64 + xfer_us / layers);
            let end_us = end.ceil() as u64;
            rank.nic_free_us = end_us;
            self.push(end_us + handoff_us.ceil() as u64, Event::KvArrived(r));
        }
        self.pump();
        self.start_prefill(g);
    }

    // ---------------------------------------------------------------------------------------------
    // Decode
    // ---------------------------------------------------------------------------------------------

    fn kv_arrived(&mut self, r: u32) {
        self.hand_off(r);
        let g = self.state[r as usize].decode_at.group as usize;
        self.start_decode(g);
    }

    /// Hands a sequence whose KV sits in its reserved pages to its decode rank's core.
    fn hand_off(&mut self, r: u32) {
        let now = self.now_us;
        let at = self.state[r as usize].decode_at;
        let (input, output) = (
            self.reqs[r as usize].input_len as usize,
            self.reqs[r as usize].output_len as usize,
        );
        // Decode ranks keep no prefix cache, so token values do not matter. Room for every token
        // to come, so that appending never reallocates.
        let mut tokens = Vec::with_capacity(input + output + 1);
        tokens.resize(input, 0);
        let limits = SeqLimits {
            max_new_tokens: output,
            stop_token_ids: Vec::new(),
        };
        let rank = &mut self.decode[at.group as usize].ranks[at.rank as usize];
        let handed = rank
            .core
            .handle_handoff(now, r as u64, tokens, 0, 0, limits, ());
        assert!(handed.is_ok(), "handoff of request {r} to its reservation");
        if let Some(a) = rank.core.poll_action() {
            panic!("decode handoff of request {r}: {a:?}");
        }
    }

    fn start_decode(&mut self, g: usize) {
        if self.decode[g].busy {
            return;
        }
        let now = self.now_us;
        let cost = Rc::clone(self.decode_cost.as_ref().expect("decode groups exist"));
        let grp = &mut self.decode[g];
        let mut works = vec![RankWork::default(); grp.ranks.len()];
        let mut any = false;
        let mut failed = Vec::new();
        let mut used_pages = 0usize;
        let mut items = 0u64;
        for (k, rank) in grp.ranks.iter_mut().enumerate() {
            let plan = rank.core.plan_step(now).unwrap_or_default();
            while let Some(a) = rank.core.poll_action() {
                match a {
                    DecodeAction::Fail { seq, .. } | DecodeAction::Retry { seq, .. } => {
                        failed.push(seq as u32)
                    }
                    DecodeAction::Prefill { seq, .. } => {
                        panic!("decode rank {g}/{k} reserved request {seq} late")
                    }
                }
            }
            for item in &plan.items {
                cost.add_decode_item(&mut works[k], item.start, item.len, item.samples);
            }
            items += plan.items.len() as u64;
            any |= !plan.items.is_empty();
            self.preemptions += plan.preempted.len() as u64;
            used_pages += rank.core.kv().pages_used();
            rank.plan = plan;
        }
        for r in failed {
            self.gateway.handle_done(r as u64);
            self.fail(r);
        }
        let grp = &mut self.decode[g];
        if !any {
            for rank in &grp.ranks {
                // Waiting sequences with reserved pages may wait for pages only while a transfer
                // (an event) is on its way; running ones always get planned.
                let sched = rank.core.sched();
                assert!(
                    sched.running() == 0 && (sched.waiting() == 0 || sched.reserved() > 0),
                    "decode group {g} idle with {} running, {} waiting, {} reserved",
                    sched.running(),
                    sched.waiting(),
                    sched.reserved()
                );
            }
            return;
        }
        let step = cost.step(Phase::Decode, &works);
        let dur = (step.total_us.ceil() as u64).max(1);
        grp.busy = true;
        self.decode_busy_us += dur;
        self.decode_steps_n += 1;
        self.decode_items += items;
        let total_pages = (self.kv_pages_decode as usize * grp.ranks.len()).max(1);
        self.decode_kv_util_us += used_pages as f64 / total_pages as f64 * dur as f64;
        self.push(now + dur, Event::DecodeStepDone(g as u32));
    }

    fn decode_step_done(&mut self, g: usize) {
        let now = self.now_us;
        let accept = self.cfg.mtp_accept;
        let check = self.cfg.invariant_check_every;
        let mut emitted_total = 0u32;
        let mut finished = Vec::new();
        let grp = &mut self.decode[g];
        grp.busy = false;
        grp.steps += 1;
        for rank in grp.ranks.iter_mut() {
            let plan = std::mem::take(&mut rank.plan);
            rank.core.handle_step_done(&plan);
            for item in plan.items.iter().filter(|i| i.samples) {
                let r = item.seq as usize;
                let accepted = match accept {
                    Some(p) => u32::from(self.mtp_rng.bernoulli(p)),
                    None => 0,
                };
                let s = &mut self.state[r];
                let left = self.reqs[r].output_len - s.generated;
                let n = (1 + accepted).min(left);
                // With MTP the verified draft and the new token are both this step's.
                let mut ended = false;
                for _ in 0..n {
                    let out = rank
                        .core
                        .handle_token(now, item.seq, 0)
                        .expect("a sampled sequence is running");
                    ended = out.finish.is_some();
                }
                s.generated += n;
                emitted_total += n;
                self.gateway.handle_tokens(item.seq, n as u64);
                self.itl.add(now - s.last_token_us);
                s.last_token_us = now;
                debug_assert_eq!(ended, s.generated >= self.reqs[r].output_len);
                if ended {
                    self.gateway.handle_done(item.seq);
                    finished.push(r as u32);
                }
            }
            if check > 0 && grp.steps.is_multiple_of(check) {
                rank.core.check_invariants();
            }
        }
        if check > 0 && grp.steps.is_multiple_of(check) {
            self.gateway.check_invariants();
        }
        self.decode_steps.push((now, emitted_total));
        for r in finished {
            self.finish(r, false);
        }
        self.pump();
        self.start_decode(g);
    }

    fn finish(&mut self, r: u32, failed: bool) {
        let s = &mut self.state[r as usize];
        debug_assert_eq!(s.finish_us, NONE_US, "request {r} finished twice");
        s.finish_us = self.now_us;
        s.failed = failed;
        self.finished += 1;
        self.failed += usize::from(failed);
    }

    /// A request no rank can hold (longer than a whole KV pool): failed, as the server would.
    fn fail(&mut self, r: u32) {
        self.finish(r, true);
    }

    /// A prompt its prefill rank refused: its decode reservation and commitment go too.
    fn fail_in_prefill(&mut self, r: u32) {
        if !self.decode.is_empty() {
            let at = self.state[r as usize].decode_at;
            let now = self.now_us;
            let rank = &mut self.decode[at.group as usize].ranks[at.rank as usize];
            rank.core.handle_unreserve(now, r as u64);
            self.gateway.handle_done(r as u64);
        }
        self.fail(r);
    }

    // ---------------------------------------------------------------------------------------------
    // Report
    // ---------------------------------------------------------------------------------------------

    fn report(self) -> (Report, Samples) {
        let cfg = &self.cfg;
        let ok: Vec<(&Request, &ReqState)> = self
            .reqs
            .iter()
            .zip(&self.state)
            .filter(|(_, s)| !s.failed)
            .collect();
        let ms = |us: u64| us as f64 / 1e3;
        let mut ttft: Vec<f64> = ok
            .iter()
            .map(|(q, s)| ms(s.first_token_us - q.arrival_us))
            .collect();
        let mut e2e: Vec<f64> = ok
            .iter()
            .map(|(q, s)| ms(s.finish_us - q.arrival_us))
            .collect();
        let has_decode = !self.decode.is_empty();
        let tpot_of = |q: &Request, s: &ReqState| {
            (has_decode && q.output_len > 1)
                .then(|| ms(s.finish_us - s.first_token_us) / (q.output_len - 1) as f64)
        };
        let mut tpot: Vec<f64> = ok.iter().filter_map(|(q, s)| tpot_of(q, s)).collect();
        let speeds: Vec<f64> = tpot.iter().filter(|t| **t > 0.0).map(|t| 1e3 / t).collect();
        let good = ok
            .iter()
            .filter(|(q, s)| {
                ms(s.first_token_us - q.arrival_us) <= cfg.slo_ttft_ms
                    && tpot_of(q, s).is_none_or(|t| t <= cfg.slo_tpot_ms)
            })
            .count();
        for v in [&mut ttft, &mut e2e, &mut tpot] {
            v.sort_by(f64::total_cmp);
        }
        let first_arrival = self.reqs.first().map_or(0, |r| r.arrival_us);
        let last_finish = self.state.iter().map(|s| s.finish_us).max().unwrap_or(0);
        let span_s = (last_finish.saturating_sub(first_arrival)).max(1) as f64 / 1e6;

        let mut prefill_events: Vec<(u64, f64)> = self
            .prefill_done
            .iter()
            .map(|&(t, n)| (t, n as f64))
            .collect();
        prefill_events.sort_by_key(|e| e.0);
        let prefill_rate = windowed_rate(&prefill_events);
        let decode_events: Vec<(u64, f64)> = self
            .decode_steps
            .iter()
            .map(|&(t, n)| (t, n as f64))
            .collect();
        let decode_rate = windowed_rate(&decode_events);
        let (queried, hits) = self
            .prefill
            .iter()
            .flat_map(|g| &g.ranks)
            .map(|r| r.core.kv().prefix_stats())
            .fold((0u64, 0u64), |(q, h), s| {
                (q + s.queried_tokens, h + s.hit_tokens)
            });
        let hit_ratio = if queried > 0 {
            hits as f64 / queried as f64
        } else {
            0.0
        };
        let gpn = cfg.gpus_per_node as f64;
        let p_nodes = cfg.prefill_nodes.max(1) as f64;
        let d_nodes = cfg.decode_nodes.max(1) as f64;
        let prefill_input = if cfg.prefill_nodes > 0 {
            prefill_rate
        } else {
            0.0
        };
        let decode_output = if has_decode { decode_rate } else { 0.0 };
        let d_gpus = (cfg.decode_nodes * cfg.gpus_per_node).max(1) as f64;
        let report = Report {
            gpu: cfg.gpu.name.to_string(),
            prefill_nodes: cfg.prefill_nodes,
            decode_nodes: cfg.decode_nodes,
            gpus_per_node: cfg.gpus_per_node,
            prefill_ep: cfg.prefill_ep,
            decode_ep: cfg.decode_ep,
            prefill_tp: cfg.prefill_tp,
            decode_tp: cfg.decode_tp,
            moe_balance: cfg.moe_balance,
            prefill_expert_imbalance: self.prefill_cost.as_ref().map_or(1.0, |c| c.imbalance),
            decode_expert_imbalance: self.decode_cost.as_ref().map_or(1.0, |c| c.imbalance),
            decode_batch_per_gpu: cfg.decode_batch_per_gpu,
            prefill_tokens_per_gpu: cfg.prefill_tokens_per_gpu,
            kv_pages_per_prefill_gpu: self.kv_pages_prefill,
            kv_pages_per_decode_gpu: self.kv_pages_decode,
            requests: self.reqs.len(),
            requests_finished: self.finished - self.failed,
            requests_failed: self.failed,
            simulated_s: span_s,
            prefill_input_tokens_per_s_per_node: prefill_input / p_nodes,
            prefill_input_tokens_per_s_per_gpu: prefill_input / p_nodes / gpn,
            prefill_computed_tokens_per_s_per_node: prefill_input * (1.0 - hit_ratio) / p_nodes,
            decode_output_tokens_per_s_per_node: decode_output / d_nodes,
            decode_output_tokens_per_s_per_gpu: decode_output / d_gpus,
            output_tokens_per_s_per_user: mean(&speeds),
            ttft_ms_p50: quantile(&ttft, 0.5),
            ttft_ms_p90: quantile(&ttft, 0.9),
            ttft_ms_p99: quantile(&ttft, 0.99),
            tpot_ms_p50: quantile(&tpot, 0.5),
            tpot_ms_p90: quantile(&tpot, 0.9),
            tpot_ms_p99: quantile(&tpot, 0.99),
            itl_ms_p50: self.itl.quantile_ms(0.5),
            itl_ms_p99: self.itl.quantile_ms(0.99),
            e2e_ms_p50: quantile(&e2e, 0.5),
            e2e_ms_p99: quantile(&e2e, 0.99),
            slo_ttft_ms: cfg.slo_ttft_ms,
            slo_tpot_ms: cfg.slo_tpot_ms,
            slo_attainment: good as f64 / self.reqs.len() as f64,
            goodput_requests_per_s: good as f64 / span_s,
            requests_per_s: self.reqs.len() as f64 / span_s,
            prefix_hit_ratio: hit_ratio,
            kv_utilization_decode: ratio(self.decode_kv_util_us, self.decode_busy_us as f64),
            kv_utilization_prefill: ratio(self.prefill_kv_util_us, self.prefill_busy_us as f64),
            decode_batch_mean: ratio(
                self.decode_items as f64,
                self.decode_steps_n as f64 * cfg.decode_ep as f64,
            ),
            prefill_step_ms_mean: ratio(self.prefill_busy_us as f64, self.prefill_steps as f64)
                / 1e3,
            decode_step_ms_mean: ratio(self.decode_busy_us as f64, self.decode_steps_n as f64)
                / 1e3,
            preemptions: self.preemptions,
            wall_s: None,
        };
        (
            report,
            Samples {
                ttft_ms: ttft,
                tpot_ms: tpot,
            },
        )
    }
}

/// Per-request latencies of one run, sorted ascending (successful requests only).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub ttft_ms: Vec<f64>,
    pub tpot_ms: Vec<f64>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Steady-state rate of a stream of (time µs, amount) events: the amount between the moments 10 %
/// and 90 % of the total had arrived, over that interval, so that ramp-up and drain do not count.
/// Falls back to total / last time for too few events.
fn windowed_rate(events: &[(u64, f64)]) -> f64 {
    let total: f64 = events.iter().map(|e| e.1).sum();
    if total == 0.0 {
        return 0.0;
    }
    let (mut acc, mut t_lo, mut t_hi, mut amount) = (0.0, None, None, 0.0);
    for &(t, a) in events {
        acc += a;
        if t_lo.is_none() && acc >= 0.1 * total {
            t_lo = Some(t);
            continue;
        }
        if t_lo.is_some() && t_hi.is_none() {
            amount += a;
            if acc >= 0.9 * total {
                t_hi = Some(t);
            }
        }
    }
    match (t_lo, t_hi) {
        (Some(lo), Some(hi)) if hi > lo => amount / ((hi - lo) as f64 / 1e6),
        _ => {
            let last = events.last().map_or(1, |e| e.0).max(1);
            total / (last as f64 / 1e6)
        }
    }
}

fn validate(cfg: &SimConfig) -> Result<(), SimError> {
    let bad = |m: String| Err(SimError::Invalid(m));
    if cfg.gpus_per_node == 0 || cfg.gpus_per_node > 72 {
        return bad(format!(
            "--gpus-per-node {} is not in 1..=72",
            cfg.gpus_per_node
        ));
    }
    // 100 k nodes: far past any deployment, and keeps rank counts within u32 ids.
    const NODES_MAX: usize = 100_000;
    if cfg.prefill_nodes + cfg.decode_nodes == 0
        || cfg.prefill_nodes > NODES_MAX
        || cfg.decode_nodes > NODES_MAX
    {
        return bad(format!(
            "need 1..={NODES_MAX} prefill or decode nodes, got {} and {}",
            cfg.prefill_nodes, cfg.decode_nodes
        ));
    }
    for (name, nodes, ep, tp) in [
        ("prefill", cfg.prefill_nodes, cfg.prefill_ep, cfg.prefill_tp),
        ("decode", cfg.decode_nodes, cfg.decode_ep, cfg.decode_tp),
    ] {
        let gpus = nodes * cfg.gpus_per_node;
        if gpus > 0 && (ep == 0 || !gpus.is_multiple_of(ep)) {
            return bad(format!(
                "--{name}-ep {ep} must divide the {gpus} {name} GPUs"
            ));
        }
        let heads = cfg.model.num_attention_heads as usize;
        if gpus > 0 && (tp == 0 || !ep.is_multiple_of(tp) || !cfg.model.splits_heads(tp)) {
            return bad(format!(
                "--{name}-tp {tp} must divide --{name}-ep {ep} and the model's {heads} heads"
            ));
        }
    }
    // 4096 sequences per GPU: beyond any KV pool's reach for real prompt lengths.
    const DECODE_BATCH_MAX: usize = 4096;
    if !(1..=DECODE_BATCH_MAX).contains(&cfg.decode_batch_per_gpu) {
        return bad(format!(
            "--decode-batch-per-gpu must lie in 1..={DECODE_BATCH_MAX}"
        ));
    }
    // 1 M tokens per GPU step: past any activation memory.
    const PREFILL_TOKENS_MAX: usize = 1 << 20;
    if !(64..=PREFILL_TOKENS_MAX).contains(&cfg.prefill_tokens_per_gpu) {
        return bad(format!(
            "--prefill-tokens-per-gpu must lie in 64..={PREFILL_TOKENS_MAX}"
        ));
    }
    if let Some(a) = cfg.mtp_accept {
        if !(0.0..=1.0).contains(&a) {
            return bad(format!("--mtp-accept {a} is not in [0, 1]"));
        }
        if cfg.model.num_nextn_predict_layers == 0 {
            return bad("--mtp-accept needs a model with num_nextn_predict_layers ≥ 1".into());
        }
    }
    if !(cfg.slo_ttft_ms > 0.0 && cfg.slo_tpot_ms > 0.0) {
        return bad("SLOs must be > 0 ms".into());
    }
    Ok(())
}
