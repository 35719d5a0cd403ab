//! `DecodeWorker`: one DP-attention group. It owns a KV pool and a running batch; it reserves
//! pages for prompts that prefill workers compute, receives their KV layer by layer, and then
//! generates one token per sequence per step until each finishes.
//!
//! Protocol (DESIGN.md, steps 2–5): `Reserve` (from the gateway) → pages reserved, the job is sent
//! on to the chosen prefill worker with the destination pages → KV frames arrive through the
//! transport, each verified → `Handoff` (first token, sampler, job) → once every layer is in, the
//! sequence joins the batch. Failures: see actors/SEMANTICS.md.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use duet_core::kv::{Alloc, KvManager};
use duet_core::sched::{NewSeq, Scheduler, StepPlan, Submit};
use duet_core::types::SeqId;
use duet_transport::KvFrame;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::engine::{StepLogits, WorkerKv, echo_token, plan_rows};
use crate::prefill::{KvDest, PrefillJob, PrefillMsg};
use crate::registry::{RegistryMsg, WorkerRef};
use crate::seq::{Finish, SeqEvent, SeqJob, SeqSampler};
use crate::worker::{WorkerArgs, load_of};

/// Reservations waiting for pages before they are refused: a burst beyond this goes to another
/// group (the gateway retries) instead of queueing here without bound.
pub const RESERVE_QUEUE_MAX: usize = 1024;

pub enum DecodeMsg {
    /// Reserve pages for `job`'s tokens, then send the job to `prefill` with the destination.
    Reserve {
        job: Box<SeqJob>,
        prefill: ActorRef<PrefillMsg>,
    },
    /// One layer of KV for a reserved sequence (from the transport).
    Frame(KvFrame),
    /// A frame for this group arrived but failed verification (corrupt or truncated).
    BadFrame(duet_transport::TransportError),
    /// Periodic: enforce the transfer deadlines.
    Tick,
    /// The prefill worker is done: first token, sampler state, and the job.
    Handoff(Box<Handoff>),
    /// The prefill worker could not compute the sequence; free its reservation.
    Unreserve(SeqId),
    /// Client gone, stop string matched, or the gateway re-routed: drop the sequence.
    Abort(SeqId),
    StepDone(Box<StepDone>),
}

pub struct Handoff {
    pub job: SeqJob,
    pub first_token: u32,
    pub sampler: SeqSampler,
    /// Layers of KV the prefill worker sent (0 for the echo engine).
    pub layers: usize,
}

pub struct StepDone {
    plan: StepPlan,
    kv: WorkerKv,
    result: Result<StepLogits, String>,
}

/// Once the handoff arrived, every layer must be in within this time, or the sequence goes back to
/// the gateway for a re-run (a frame lost with a cut link; the sender's own deadline is shorter).
pub const KV_ARRIVAL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// A reservation that never got its handoff (its prefill worker died and the gateway's
/// `Unreserve` was lost with it) frees its pages after this long.
pub const RESERVATION_TTL: std::time::Duration = std::time::Duration::from_secs(120);
const DEADLINE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

struct Reservation {
    since: std::time::Instant,
    handoff_at: Option<std::time::Instant>,
    pages: Vec<u32>,
    layers_in: BTreeSet<u32>,
    handoff: Option<Box<Handoff>>,
    bad: Option<String>,
}

/// A sequence in the batch.
struct Running {
    job: SeqJob,
    sampler: SeqSampler,
    /// Tokens generated for this job, counting the prefill worker's first token.
    generated: usize,
}

pub struct DecodeState {
    args: WorkerArgs,
    kv: Option<WorkerKv>,
    pages: KvManager,
    sched: Scheduler,
    page_bytes: usize,
    layers: usize,
    queued: VecDeque<(Box<SeqJob>, ActorRef<PrefillMsg>)>,
    reserved: BTreeMap<SeqId, Reservation>,
    running: BTreeMap<SeqId, Running>,
    /// Frames that arrived while the pool was lent to a running step.
    pending_frames: Vec<KvFrame>,
    /// Aborts that arrived during a step, applied when it returns.
    pending_aborts: Vec<SeqId>,
    stepping: bool,
    steps: u64,
    preemptions: u64,
}

pub struct DecodeWorker;

impl Actor for DecodeWorker {
    type Msg = DecodeMsg;
    type State = DecodeState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WorkerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let kv = args.engine.new_kv(args.kv_pages as usize);
        let (page_bytes, layers) = match &kv {
            WorkerKv::Model(c) => (c.page_bytes(), c.layers()),
            WorkerKv::Echo => (0, 0),
        };
        // Frames for this group arrive on the transport endpoint; forward them into the mailbox
        // so they are applied between steps, never while a step holds the pool.
        if let Some(mut rx) = args.kv.bind(args.id.0) {
            let me = myself.clone();
            tokio::spawn(async move {
                while let Some(frame) = rx.recv().await {
                    let msg = match frame {
                        Ok(f) => DecodeMsg::Frame(f),
                        Err(e) => DecodeMsg::BadFrame(e),
                    };
                    if me.cast(msg).is_err() {
                        break;
                    }
                }
            });
        }
        myself.send_interval(DEADLINE_CHECK_INTERVAL, || DecodeMsg::Tick);
        let state = DecodeState {
            pages: args.kv_manager(),
            sched: args.scheduler(),
            kv: Some(kv),
            page_bytes,
            layers,
            queued: VecDeque::new(),
            reserved: BTreeMap::new(),
            running: BTreeMap::new(),
            pending_frames: Vec::new(),
            pending_aborts: Vec::new(),
            stepping: false,
            steps: 0,
            preemptions: 0,
            args,
        };
        let load = state.load();
        state.args.registry.cast(RegistryMsg::Register {
            id: state.args.id,
            worker: WorkerRef::Decode(myself),
            load,
        })?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DecodeMsg::Reserve { job, prefill } => {
                st.queued.push_back((job, prefill));
                st.admit_reservations(&myself);
            }
            DecodeMsg::Frame(frame) => {
                if st.kv.is_some() {
                    st.apply_frame(frame);
                } else {
                    st.pending_frames.push(frame);
                }
            }
            DecodeMsg::Handoff(h) => {
                let id = h.job.id;
                match st.reserved.get_mut(&id) {
                    Some(r) => {
                        r.handoff = Some(h);
                        r.handoff_at = Some(std::time::Instant::now());
                    }
                    // Aborted meanwhile: dropping the job closes its channel if nobody else
                    // holds it, which the gateway reads as "re-run".
                    None => drop(h),
                }
                st.try_start(id);
            }
            DecodeMsg::Unreserve(id) => st.drop_reservation(id),
            DecodeMsg::BadFrame(e) => st.bad_frame(e),
            DecodeMsg::Tick => st.check_deadlines(),
            DecodeMsg::Abort(id) => {
                if st.stepping {
                    st.pending_aborts.push(id);
                } else {
                    st.abort(id);
                }
            }
            DecodeMsg::StepDone(done) => st.step_done(*done)?,
        }
        st.admit_reservations(&myself);
        st.kick(&myself);
        Ok(())
    }
}

impl DecodeState {
    fn now(&self) -> u64 {
        self.args.now_us()
    }

    fn load(&self) -> crate::registry::WorkerLoad {
        let outstanding: u64 = self
            .running
            .values()
            .map(|r| r.job.params.max_new_tokens.saturating_sub(r.generated) as u64)
            .sum::<u64>()
            + self
                .reserved
                .values()
                .map(|r| r.pages.len() as u64)
                .sum::<u64>();
        let mut load = load_of(
            &self.sched,
            &self.pages,
            outstanding,
            self.args.sched.max_running,
        );
        load.waiting += self.queued.len() + self.reserved.len();
        load.preemptions = self.preemptions;
        load
    }

    fn report(&self) {
        let _ = self.args.registry.cast(RegistryMsg::Load {
            id: self.args.id,
            load: self.load(),
        });
    }

    /// Reserves pages for queued jobs in arrival order while pages last, and sends each to its
    /// prefill worker with the destination.
    fn admit_reservations(&mut self, myself: &ActorRef<DecodeMsg>) {
        while let Some((job, _)) = self.queued.front() {
            let id = job.id;
            let len = job.tokens.len();
            let now = self.now();
            match self.sched.reserve(id, len, &mut self.pages, now) {
                Ok(Ok(pages)) => {
                    let (job, prefill) = self.queued.pop_front().expect("front exists");
                    self.reserved.insert(
                        id,
                        Reservation {
                            since: std::time::Instant::now(),
                            handoff_at: None,
                            pages: pages.clone(),
                            layers_in: BTreeSet::new(),
                            handoff: None,
                            bad: None,
                        },
                    );
                    let dest = KvDest {
                        group: self.args.id,
                        decode: myself.clone(),
                        pages,
                    };
                    if let Err(e) = prefill.cast(PrefillMsg::Prefill(Box::new(PrefillJob {
                        job: *job,
                        dest,
                    }))) {
                        // The prefill worker is gone: free the pages; dropping the job closes the
                        // client's channel and the gateway re-routes.
                        tracing::warn!(seq = id, "prefill worker gone before prefill: {e}");
                        self.drop_reservation(id);
                    }
                }
                Ok(Err(Alloc::Later { .. })) | Ok(Err(Alloc::Ok)) => {
                    if self.queued.len() > RESERVE_QUEUE_MAX {
                        let (job, _) = self.queued.pop_back().expect("non-empty");
                        let _ = job.events.send(SeqEvent::Retry(format!(
                            "decode group {} is full",
                            self.args.id.0
                        )));
                        continue;
                    }
                    if self.running.is_empty() && self.reserved.is_empty() {
                        // Nothing will ever free pages: this prompt alone exceeds the pool.
                        let (job, _) = self.queued.pop_front().expect("front exists");
                        let _ = job.events.send(SeqEvent::Failed(format!(
                            "prompt of {len} tokens does not fit the KV pool of decode group {} ({} pages)",
                            self.args.id.0,
                            self.pages.pages_total()
                        )));
                        continue;
                    }
                    break;
                }
                Err(e) => {
                    let (job, _) = self.queued.pop_front().expect("front exists");
                    let _ = job.events.send(SeqEvent::Failed(e.to_string()));
                }
            }
        }
    }

    fn apply_frame(&mut self, frame: KvFrame) {
        let Some(r) = self.reserved.get_mut(&frame.seq) else {
            return; // aborted or unknown: nothing to write into
        };
        let checked = if frame.pages != r.pages || frame.layer as usize >= self.layers {
            Err(format!(
                "KV frame for layer {} names pages other than the {} reserved",
                frame.layer,
                r.pages.len()
            ))
        } else {
            frame.verify(self.page_bytes).map_err(|e| e.to_string())
        };
        let written = checked.and_then(|()| match self.kv.as_mut() {
            Some(WorkerKv::Model(cache)) => cache
                .write_pages(frame.layer as usize, &frame.pages, &frame.bytes)
                .map_err(|e| e.to_string()),
            _ => Err("no KV pool to write into".into()),
        });
        match written {
            Ok(()) => {
                r.layers_in.insert(frame.layer);
            }
            Err(e) => r.bad = Some(e),
        }
        let id = frame.seq;
        self.try_start(id);
    }

    /// A frame that failed verification poisons its sequence's reservation: it is re-run, never
    /// decoded from bad KV.
    fn bad_frame(&mut self, e: duet_transport::TransportError) {
        use duet_transport::TransportError as E;
        let seq = match &e {
            E::Corrupt { seq, .. } | E::Truncated { seq, .. } => *seq,
            _ => {
                tracing::warn!(group = self.args.id.0, "unattributable bad KV frame: {e}");
                return;
            }
        };
        if let Some(r) = self.reserved.get_mut(&seq) {
            r.bad = Some(e.to_string());
        }
        self.try_start(seq);
    }

    fn check_deadlines(&mut self) {
        let now = std::time::Instant::now();
        let late: Vec<SeqId> = self
            .reserved
            .iter()
            .filter(|(_, r)| match r.handoff_at {
                Some(at) => now.duration_since(at) > KV_ARRIVAL_DEADLINE,
                None => now.duration_since(r.since) > RESERVATION_TTL,
            })
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            let Some(r) = self.reserved.get_mut(&id) else {
                continue;
            };
            if r.handoff.is_some() {
                r.bad = Some(format!(
                    "KV layers {} of {} arrived within {KV_ARRIVAL_DEADLINE:?}",
                    r.layers_in.len(),
                    self.layers
                ));
                self.try_start(id);
            } else {
                tracing::warn!(seq = id, "reservation never handed off; freeing its pages");
                self.drop_reservation(id);
            }
        }
    }

    /// Moves a reservation into the batch once its handoff and every layer are in. A bad
    /// transfer is never decoded from: the sequence goes back to the gateway for a re-run.
    fn try_start(&mut self, id: SeqId) {
        let Some(r) = self.reserved.get(&id) else {
            return;
        };
        let Some(h) = &r.handoff else { return };
        if let Some(bad) = &r.bad {
            let _ = h.job.events.send(SeqEvent::Retry(bad.clone()));
            self.drop_reservation(id);
            return;
        }
        if r.layers_in.len() < h.layers.min(self.layers) {
            return;
        }
        let r = self.reserved.remove(&id).expect("checked above");
        let h = r.handoff.expect("checked above");
        let Handoff {
            job,
            first_token,
            sampler,
            ..
        } = *h;
        let mut tokens = job.tokens.to_vec();
        let computed = tokens.len();
        tokens.push(first_token);
        let now = self.now();
        let seq = NewSeq {
            id,
            tokens,
            computed,
            arrival_us: now,
        };
        match self.sched.submit(seq, &mut self.pages, now) {
            Ok(Submit::Queued) => {
                self.running.insert(
                    id,
                    Running {
                        job,
                        sampler,
                        generated: 1,
                    },
                );
            }
            Ok(Submit::Full) => {
                self.sched.unreserve(id, &mut self.pages, now);
                let _ = job
                    .events
                    .send(SeqEvent::Retry("decode batch queue full".into()));
            }
            Err(e) => {
                self.sched.unreserve(id, &mut self.pages, now);
                let _ = job.events.send(SeqEvent::Failed(e.to_string()));
            }
        }
    }

    fn drop_reservation(&mut self, id: SeqId) {
        if self.reserved.remove(&id).is_some() {
            let now = self.now();
            self.sched.unreserve(id, &mut self.pages, now);
        }
    }

    fn abort(&mut self, id: SeqId) {
        self.queued.retain(|(j, _)| j.id != id);
        self.drop_reservation(id);
        if self.running.remove(&id).is_some() {
            let now = self.now();
            if let Err(e) = self.sched.finish(id, false, &mut self.pages, now) {
                tracing::error!(seq = id, "finishing an aborted sequence: {e}");
            }
        }
    }

    /// Starts a step if none is running and there is work.
    fn kick(&mut self, myself: &ActorRef<DecodeMsg>) {
        if self.stepping || self.running.is_empty() {
            return;
        }
        let now = self.now();
        let plan = self.sched.schedule(&mut self.pages, now);
        self.preemptions += plan.preempted.len() as u64;
        for id in self.sched.take_unservable() {
            if let Some(r) = self.running.remove(&id) {
                let _ = r.job.events.send(SeqEvent::Failed(format!(
                    "sequence of {} tokens cannot fit decode group {}'s {} KV pages",
                    self.sched.tokens(id).map_or(0, <[u32]>::len),
                    self.args.id.0,
                    self.pages.pages_total()
                )));
            }
            let _ = self.sched.finish(id, false, &mut self.pages, now);
        }
        if plan.items.is_empty() {
            return;
        }
        let rows = plan_rows(&plan, &self.sched, &self.pages);
        let mut kv = self.kv.take().expect("not stepping, so the pool is here");
        self.stepping = true;
        let engine = self.args.engine.clone();
        let me = myself.clone();
        if matches!(kv, WorkerKv::Echo) {
            let _ = me.cast(DecodeMsg::StepDone(Box::new(StepDone {
                plan,
                kv,
                result: Ok(StepLogits::Echo),
            })));
            return;
        }
        tokio::task::spawn_blocking(move || {
            let result = engine
                .step(&mut kv, &rows, &mut |_, _| Ok(()))
                .map_err(|e| e.to_string());
            let _ = me.cast(DecodeMsg::StepDone(Box::new(StepDone { plan, kv, result })));
        });
    }

    fn step_done(&mut self, done: StepDone) -> Result<(), ActorProcessingErr> {
        let StepDone { plan, kv, result } = done;
        self.kv = Some(kv);
        self.stepping = false;
        self.steps += 1;
        if let Some(f) = self.args.fault
            && self.steps >= f.panic_after_steps
        {
            panic!(
                "fault injected: decode group {} panics after {} steps",
                self.args.id.0, self.steps
            );
        }
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The engine refused the batch (a bug or a corrupt pool): fail its sequences with
                // the reason rather than retry forever.
                for it in &plan.items {
                    if let Some(r) = self.running.remove(&it.seq) {
                        let _ = r.job.events.send(SeqEvent::Failed(format!("engine: {e}")));
                    }
                    let now = self.now();
                    let _ = self.sched.finish(it.seq, false, &mut self.pages, now);
                }
                return Ok(());
            }
        };
        self.sched.complete(&plan);
        let max_pos = self.args.engine.max_positions();
        for (row, it) in plan.items.iter().enumerate() {
            if !it.samples {
                continue;
            }
            let Some(r) = self.running.get_mut(&it.seq) else {
                continue;
            };
            let toks = self.sched.tokens(it.seq).unwrap_or(&[]);
            let prompt_len = r.job.prompt_len;
            let (token, logprob) = match logits.row(row) {
                Some(l) => r.sampler.next(l, toks, prompt_len),
                None => (echo_token(toks, prompt_len), None),
            };
            let len = toks.len() + 1;
            self.sched.append_token(it.seq, token);
            r.generated += 1;
            let finish = if r.job.params.stop_token_ids.contains(&token) {
                Some(Finish::Stop(token))
            } else if r.generated >= r.job.params.max_new_tokens || len >= max_pos {
                Some(Finish::Length)
            } else {
                None
            };
            let sent = r.job.events.send(SeqEvent::Token {
                token,
                logprob,
                cached_tokens: None,
                finish,
            });
            if finish.is_some() || sent.is_err() {
                self.running.remove(&it.seq);
                let now = self.now();
                let _ = self.sched.finish(it.seq, false, &mut self.pages, now);
            }
        }
        for id in std::mem::take(&mut self.pending_aborts) {
            self.abort(id);
        }
        for f in std::mem::take(&mut self.pending_frames) {
            self.apply_frame(f);
        }
        if cfg!(debug_assertions) {
            self.sched.check_invariants(&self.pages);
        }
        self.report();
        Ok(())
    }
}
