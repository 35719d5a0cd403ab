//! `DecodeWorker`: one DP-attention group. It owns a KV pool and a running batch; it reserves
//! pages for prompts that prefill workers compute, receives their KV layer by layer, and then
//! generates one token per sequence per step until each finishes.
//!
//! The protocol's decisions (reservation order, deadlines, when a sequence starts, ends, or is
//! re-run, and every page's lifetime) are `duet_core::pd::DecodeCore`'s; this actor is its IO
//! driver: it turns messages into `handle_*` calls, carries out the core's actions, verifies and
//! writes KV frames into the pool, runs the engine and samples. Failures: actors/SEMANTICS.md.

use duet_core::pd::{DecodeAction, DecodeConfig, DecodeCore, FrameCheck, Held, SeqLimits};
use duet_transport::{KvFrame, KvLayout};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::clock::Clock;
use crate::engine::{StepDone, StepError, StepLogits, WorkerKv, echo_token, kv_layout, plan_rows};
use crate::protocol::{
    DecodeMsg, EpStep, GatewayToDecode, Handoff, KvDest, PrefillJob, PrefillPeer, PrefillToDecode,
    RegistryMsg, WorkerLoad, WorkerRef,
};
use crate::seq::{MaskJob, SeqEvent, SeqJob, SeqSampler};
use crate::trace::{TracedSeqs, child_span};
use crate::worker::{EpTurn, WorkerArgs, load_of};

/// Reservations waiting for pages before they are refused: a burst beyond this goes to another
/// group (the gateway retries) instead of queueing here without bound.
pub const RESERVE_QUEUE_MAX: usize = 1024;

/// Once the handoff arrived, every layer must be in within this time, or the sequence goes back to
/// the gateway for a re-run (a frame lost with a cut link; the sender's own deadline is shorter).
pub const KV_ARRIVAL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// A reservation that never got its handoff (its prefill worker died and the gateway's
/// `Unreserve` was lost with it) frees its pages after this long.
pub const RESERVATION_TTL: std::time::Duration = std::time::Duration::from_secs(120);
const DEADLINE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// A queued reservation: the job and the prefill worker it goes to once pages are reserved.
type Queued = (Box<SeqJob>, PrefillPeer);

/// A handed-off sequence: the job and its sampler.
pub struct DecodeRun {
    job: SeqJob,
    sampler: SeqSampler,
}

pub struct DecodeState {
    args: WorkerArgs,
    kv: Option<WorkerKv>,
    core: DecodeCore<Queued, DecodeRun>,
    page_bytes: usize,
    /// The layout every frame must carry (`None` for the echo engine, which has no pool).
    kv_layout: Option<KvLayout>,
    /// Frames that arrived while the pool was lent to a running step.
    pending_frames: Vec<KvFrame>,
    steps: u64,
    /// (running, waiting, pages used) at the last load report.
    reported: Option<(usize, usize, usize)>,
    ep: EpTurn,
    /// Traced sequences from reservation to their first step, each with its open
    /// `decode.reserve` span (the parent of its frames' spans).
    traced: TracedSeqs,
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
        let (page_bytes, layers, kv_layout) = match &kv {
            WorkerKv::Model(c) => (c.page_bytes(), c.layers(), Some(kv_layout(c))),
            WorkerKv::Echo => (0, 0, None),
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
        let core = DecodeCore::new(
            DecodeConfig {
                group: args.id.0,
                layers,
                max_positions: args.engine.max_positions(),
                kv_arrival_deadline_us: KV_ARRIVAL_DEADLINE.as_micros() as u64,
                reservation_ttl_us: RESERVATION_TTL.as_micros() as u64,
                reserve_queue_max: RESERVE_QUEUE_MAX,
            },
            args.scheduler(),
            args.kv_manager(),
        );
        let mut state = DecodeState {
            core,
            kv: Some(kv),
            page_bytes,
            kv_layout,
            pending_frames: Vec::new(),
            steps: 0,
            reported: None,
            ep: EpTurn::default(),
            traced: TracedSeqs::default(),
            args,
        };
        let load = state.load();
        state.reported = Some(state.load_key());
        state.args.registry.cast(RegistryMsg::Register {
            id: state.args.id,
            worker: WorkerRef::decode(&myself),
            load,
        })?;
        if let Some(ep) = &state.args.ep {
            ep.join(myself.get_derived())?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.now();
        if !matches!(msg, DecodeMsg::Ep(_) | DecodeMsg::StepDone(_)) {
            st.ep.touch();
        }
        match msg {
            DecodeMsg::Ep(EpStep(step)) => st.ep_step(step, &myself),
            DecodeMsg::Gateway(GatewayToDecode::Reserve { job, prefill }) => {
                let (id, len) = (job.id, job.tokens.len());
                st.trace_reserve(&job);
                st.core.handle_reserve(now, id, len, (job, prefill));
            }
            DecodeMsg::Frame(frame) => {
                if st.kv.is_some() {
                    st.apply_frame(frame);
                } else {
                    st.pending_frames.push(frame);
                }
            }
            DecodeMsg::Prefill(PrefillToDecode::Handoff(h)) => {
                let Handoff {
                    job,
                    first_token,
                    sampler,
                    layers,
                } = *h;
                st.trace_handoff(&job, first_token, layers);
                let limits = SeqLimits {
                    max_new_tokens: job.params.max_new_tokens,
                    stop_token_ids: job.params.stop_token_ids.clone(),
                };
                let tokens = job.tokens.to_vec();
                // Refused (aborted meanwhile): dropping the job closes its channel if nobody
                // else holds it, which the gateway reads as "re-run".
                let _refused = st.core.handle_handoff(
                    now,
                    job.id,
                    tokens,
                    first_token,
                    layers,
                    limits,
                    DecodeRun { job, sampler },
                );
            }
            DecodeMsg::Prefill(PrefillToDecode::Unreserve(id)) => st.core.handle_unreserve(now, id),
            DecodeMsg::BadFrame(e) => st.bad_frame(e),
            DecodeMsg::Tick => st.core.handle_tick(now),
            // Whatever the sequence held comes back and is dropped here.
            DecodeMsg::Gateway(GatewayToDecode::Abort(id)) => {
                st.traced.remove(id);
                drop(st.core.handle_abort(now, id));
            }
            DecodeMsg::StepDone(done) => st.step_done(*done)?,
        }
        st.carry_out(&myself);
        st.kick(&myself);
        st.carry_out(&myself);
        st.report();
        Ok(())
    }
}

impl DecodeState {
    fn now(&self) -> u64 {
        self.args.now_us()
    }

    fn load(&self) -> WorkerLoad {
        let mut load = load_of(
            self.core.sched(),
            self.core.kv(),
            self.core.outstanding_tokens(),
            self.args.sched.max_running,
        );
        load.waiting += self.core.waiting();
        load.preemptions = self.core.preemptions();
        load
    }

    fn load_key(&self) -> (usize, usize, usize) {
        (
            self.core.running(),
            self.core.waiting(),
            self.core.kv().pages_used(),
        )
    }

    /// Reports the load when it changed (and after every step): a group whose last sequence
    /// ended must not look busy to the balancer.
    fn report(&mut self) {
        let key = self.load_key();
        if self.reported == Some(key) {
            return;
        }
        self.reported = Some(key);
        let _ = self.args.registry.cast(RegistryMsg::Load {
            id: self.args.id,
            load: self.load(),
        });
    }

    /// Carries out the core's actions.
    fn carry_out(&mut self, myself: &ActorRef<DecodeMsg>) {
        while let Some(action) = self.core.poll_action() {
            match action {
                DecodeAction::Prefill {
                    seq,
                    pages,
                    job: (job, prefill),
                } => {
                    let dest = KvDest {
                        group: self.args.id,
                        decode: myself.get_derived(),
                        pages,
                    };
                    let sent = match &prefill.jobs {
                        Some(jobs) => jobs
                            .send_message(Box::new(PrefillJob { job: *job, dest }))
                            .map_err(|e| e.to_string()),
                        None => Err(format!(
                            "prefill worker {} has no route from here",
                            prefill.id.0
                        )),
                    };
                    if let Err(e) = sent {
                        // The prefill worker is gone: free the pages; dropping the job closes the
                        // client's channel and the gateway re-routes.
                        tracing::warn!(seq, "prefill worker gone before prefill: {e}");
                        let now = self.now();
                        self.core.handle_prefill_unreachable(now, seq);
                    }
                }
                DecodeAction::Retry { seq, reason, job } => {
                    if let Some(span) = self.traced.remove(seq) {
                        span.record("outcome", reason.to_string().as_str());
                    }
                    send_to(&job, SeqEvent::Retry(reason));
                }
                DecodeAction::Fail { seq, reason, job } => {
                    if let Some(span) = self.traced.remove(seq) {
                        span.record("outcome", reason.to_string().as_str());
                    }
                    send_to(&job, SeqEvent::Failed(reason));
                }
            }
        }
    }

    fn apply_frame(&mut self, frame: KvFrame) {
        let now = self.now();
        match self
            .core
            .check_frame(now, frame.seq, frame.layer, &frame.pages)
        {
            FrameCheck::Write => {}
            FrameCheck::Unknown | FrameCheck::Rejected => {
                self.args.stats.kv_rejected_frames_total.inc();
                return;
            }
        }
        // A frame of another layout (another model or dtype) fails its sequence: its bytes
        // would fit the pool yet mean something else.
        let layout = match &self.kv_layout {
            Some(l) => frame.check_layout(l),
            None => Ok(()),
        };
        let verified = layout.map(|()| frame.verify(self.page_bytes));
        let checksum = match &verified {
            Ok(Ok(())) => "ok",
            Ok(Err(_)) => "mismatch",
            Err(_) => "not_checked",
        };
        let written = verified
            .and_then(|v| v)
            .map_err(|e| e.to_string())
            .and_then(|()| match self.kv.as_mut() {
                Some(WorkerKv::Model(cache)) => cache
                    .write_pages(frame.layer as usize, &frame.pages, &frame.bytes)
                    .map_err(|e| e.to_string()),
                _ => Err("no KV pool to write into".into()),
            });
        self.trace_frame(&frame, checksum, written.as_ref().err());
        match written {
            Ok(()) => {
                let s = &self.args.stats;
                s.kv_received_bytes_total.add(frame.bytes.len() as u64);
                self.core.handle_layer_written(now, frame.seq, frame.layer);
            }
            Err(e) => {
                self.args.stats.kv_rejected_frames_total.inc();
                self.core.handle_bad_transfer(now, frame.seq, e);
            }
        }
    }

    /// A frame that failed verification poisons its sequence's reservation: it is re-run, never
    /// decoded from bad KV.
    fn bad_frame(&mut self, e: duet_transport::TransportError) {
        use duet_transport::TransportError as E;
        self.args.stats.kv_rejected_frames_total.inc();
        let seq = match &e {
            E::Corrupt { seq, .. } | E::Truncated { seq, .. } | E::Layout { seq, .. } => *seq,
            _ => {
                tracing::warn!(group = self.args.id.0, "unattributable bad KV frame: {e}");
                return;
            }
        };
        if let Some(parent) = self.traced.span(seq) {
            let _bad = crate::trace_span!(
                parent: parent,
                "kv.layer",
                seq,
                transport = self.args.kv.transport_name(),
                checksum = if matches!(e, E::Corrupt { .. }) {
                    "mismatch"
                } else {
                    "not_checked"
                },
                error = e.to_string().as_str(),
            );
        }
        let now = self.now();
        self.core.handle_bad_transfer(now, seq, e.to_string());
    }

    /// A traced reservation: its span lasts until the sequence first runs (pages reserved,
    /// prefill, every layer's KV, the handoff), and parents the frames' spans.
    fn trace_reserve(&mut self, job: &SeqJob) {
        let span = child_span(job.trace, || {
            crate::trace_span!(
                "decode.reserve",
                seq = job.id,
                group = self.args.id.0,
                tokens = job.tokens.len(),
                outcome = tracing::field::Empty,
            )
        });
        if !span.is_disabled() {
            self.traced.insert(job.id, span);
        }
    }

    /// One layer's KV arrived: its size, transport, its checksums' verdict (`not_checked` when
    /// its layout was refused first) and why it was not written, if it was not.
    fn trace_frame(&self, frame: &KvFrame, checksum: &str, error: Option<&String>) {
        let Some(parent) = self.traced.span(frame.seq) else {
            return;
        };
        let _span = crate::trace_span!(
            parent: parent,
            "kv.layer",
            seq = frame.seq,
            layer = frame.layer,
            bytes = frame.bytes.len(),
            pages = frame.pages.len(),
            transport = self.args.kv.transport_name(),
            checksum,
            error = error.map(String::as_str),
        );
    }

    /// The handoff, a span of its own (the reservation's lasts until the sequence first runs:
    /// frames may still be arriving).
    fn trace_handoff(&self, job: &SeqJob, first_token: u32, layers: usize) {
        let _span = child_span(job.trace, || {
            crate::trace_span!(
                "decode.handoff",
                seq = job.id,
                group = self.args.id.0,
                first_token,
                layers,
            )
        });
    }

    /// A step's span: a root of its own (it serves many requests), linked to each traced
    /// sequence it advances; disabled when none is traced.
    fn step_span(&mut self, plan: &duet_core::sched::StepPlan) -> tracing::Span {
        if !crate::trace::enabled() {
            return tracing::Span::none();
        }
        let mut links = Vec::new();
        for it in &plan.items {
            if let Some(reserved) = self.traced.remove(it.seq) {
                reserved.record("outcome", "running");
            }
            if let Some(ctx) = self.core.sample_ctx(it.seq).and_then(|(_, r)| r.job.trace)
                && ctx.sampled()
            {
                links.push(ctx);
            }
        }
        if links.is_empty() {
            return tracing::Span::none();
        }
        let span = crate::trace_span!(
            parent: None,
            "decode.step",
            group = self.args.id.0,
            batch = plan.items.len(),
            traced = links.len(),
        );
        for l in &links {
            l.link(&span);
        }
        span
    }

    /// Starts a step if none is running and there is work; in an EP group, asks for one.
    fn kick(&mut self, myself: &ActorRef<DecodeMsg>) {
        if self.kv.is_none() {
            return;
        }
        if let Some(ep) = &self.args.ep {
            self.ep.request(ep, self.core.has_work());
            return;
        }
        let now = self.now();
        if let Some(plan) = self.core.plan_step(now) {
            self.start_step(plan, myself);
        }
    }

    /// The EP group runs `step`: this group's batch if it has one, an idle step otherwise.
    fn ep_step(&mut self, step: u64, myself: &ActorRef<DecodeMsg>) {
        if self.kv.is_none() {
            // The coordinator starts a step only when every rank finished the last one.
            tracing::warn!(group = self.args.id.0, step, "EP step while stepping");
            return;
        }
        let now = self.now();
        let plan = self.core.plan_step(now);
        self.ep.begin(step, plan.is_some(), self.core.has_work());
        match plan {
            Some(plan) => self.start_step(plan, myself),
            None => {
                let kv = self.kv.take().expect("checked above");
                let me = myself.clone();
                self.args.engine.spawn_ep_idle_step(kv, move |done| {
                    let _ = me.cast(DecodeMsg::StepDone(Box::new(done)));
                });
            }
        }
    }

    fn start_step(&mut self, plan: duet_core::sched::StepPlan, myself: &ActorRef<DecodeMsg>) {
        let rows = plan_rows(&plan, self.core.sched(), self.core.kv());
        let span = self.step_span(&plan);
        let mut kv = self.kv.take().expect("not stepping, so the pool is here");
        let engine = self.args.engine.clone();
        let me = myself.clone();
        if matches!(kv, WorkerKv::Echo) {
            let _ = me.cast(DecodeMsg::StepDone(Box::new(StepDone {
                plan,
                kv,
                result: Ok(StepLogits::Echo),
                send_errors: Default::default(),
            })));
            return;
        }
        let stats = self.args.stats.clone();
        let masks = self.mask_jobs(&plan);
        tokio::task::spawn_blocking(move || {
            let started = Clock::instant();
            // The grammar masks of the step's constrained sequences are computed on their own
            // thread while the model runs; sampling then only applies them.
            let result = std::thread::scope(|scope| {
                let jobs = (!masks.is_empty()).then(|| {
                    scope.spawn(|| {
                        for j in &masks {
                            j.run();
                        }
                    })
                });
                let r = span.in_scope(|| engine.step(&mut kv, &rows, &mut |_, _| Ok(())));
                if let Some(jobs) = jobs {
                    // A panicking mask job leaves its slot without a mask; sampling computes it.
                    let _ = jobs.join();
                }
                r
            })
            .map_err(StepError::from);
            stats
                .decode_step_seconds
                .observe(Clock::since(started).as_secs_f64());
            let _ = me.cast(DecodeMsg::StepDone(Box::new(StepDone {
                plan,
                kv,
                result,
                send_errors: Default::default(),
            })));
        });
    }

    /// The mask jobs of the plan's constrained sequences (see [`MaskJob`]).
    fn mask_jobs(&mut self, plan: &duet_core::sched::StepPlan) -> Vec<MaskJob> {
        let grammars = self.args.grammars.clone();
        let mut jobs = Vec::new();
        for it in plan.items.iter().filter(|it| it.samples) {
            if let Some((toks, run)) = self.core.sample_ctx(it.seq) {
                let prompt_len = run.job.prompt_len;
                jobs.extend(run.sampler.mask_job(toks, prompt_len, grammars.as_deref()));
            }
        }
        jobs
    }

    fn step_done(&mut self, done: StepDone) -> Result<(), ActorProcessingErr> {
        let StepDone {
            plan, kv, result, ..
        } = done;
        self.kv = Some(kv);
        if plan.items.is_empty() {
            // An EP group's idle step: nothing of this group's ran.
            if let Err(e) = result {
                tracing::warn!(group = self.args.id.0, "EP idle step: {e}");
            }
            self.ep_finish();
            return Ok(());
        }
        self.steps += 1;
        self.args.inject_fault(self.steps, "decode group");
        let now = self.now();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The engine refused the batch (a bug or a corrupt pool): its sequences fail with
                // the reason rather than retry forever.
                self.core.handle_step_failed(now, &plan, e.to_string());
                self.ep_finish();
                return Ok(());
            }
        };
        self.core.handle_step_done(&plan);
        for (row, it) in plan.items.iter().enumerate() {
            if !it.samples {
                continue;
            }
            let Some((toks, run)) = self.core.sample_ctx(it.seq) else {
                continue; // ended while the step ran
            };
            let prompt_len = run.job.prompt_len;
            let (token, logprob) = match logits.row(row) {
                Some(l) => run
                    .sampler
                    .next(l, toks, prompt_len, self.args.grammars.as_deref()),
                None => (echo_token(toks, prompt_len), None),
            };
            let events = run.job.events.clone();
            let Some(out) = self.core.handle_token(now, it.seq, token) else {
                continue;
            };
            let sent = events.send(SeqEvent::Token {
                token,
                logprob,
                cached_tokens: None,
                finish: out.finish,
            });
            if sent.is_err() && out.finish.is_none() {
                // The client went away: free the sequence now rather than at the gateway's abort.
                drop(self.core.handle_abort(now, it.seq));
            }
        }
        for f in std::mem::take(&mut self.pending_frames) {
            self.apply_frame(f);
        }
        if cfg!(debug_assertions) {
            self.core.check_invariants();
        }
        // After every step, so the registry's picture stays fresh even at a steady state.
        self.reported = None;
        self.ep_finish();
        Ok(())
    }

    fn ep_finish(&mut self) {
        if let Some(ep) = &self.args.ep {
            self.ep.finish(ep, self.core.has_work());
        }
    }
}

/// Sends `ev` on the channel of the sequence `job` holds, if it holds one here.
fn send_to(job: &Held<Queued, DecodeRun>, ev: SeqEvent) {
    let tx = match job {
        Held::Queued((j, _)) => &j.events,
        Held::HandedOff(r) => &r.job.events,
        Held::AtPrefill => return,
    };
    let _ = tx.send(ev);
}

#[cfg(test)]
mod tests;
