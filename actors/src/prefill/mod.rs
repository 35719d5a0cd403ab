//! `PrefillWorker`: computes prompts in chunks over its own KV pool with a radix prefix cache,
//! streams each layer's latent KV to the decode group's reserved pages as soon as the layer of the
//! final chunk is computed, samples the first token, and hands the sequence to decode.
//!
//! What happens to a sequence (queueing, when it is refused, what its first token does, its
//! pages' lifetime) is `duet_core::pd::PrefillCore`'s decision; this actor drives it. Layer frames
//! go to a sender task through a bounded queue ([`KV_FRAMES_IN_FLIGHT`]), so layer l+1 is computed
//! while layer l is on the wire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use duet_core::pd::{FirstToken, PrefillCore, SeqLimits};
use duet_core::types::SeqId;
use duet_model::kv::KvCache;
use duet_transport::{KvFrame, KvTransport};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::engine::{SendError, StepDone, StepError, StepLogits, WorkerKv, echo_token, plan_rows};
use crate::metrics::WorkerStats;
use crate::protocol::{
    EpStep, GatewayToPrefill, Handoff, KvDest, PrefillJob, PrefillMsg, PrefillToDecode,
    RegistryMsg, WorkerLoad, WorkerRef,
};
use crate::seq::{SeqEvent, SeqJob, SeqSampler};
use crate::trace::child_span;
use crate::worker::{EpTurn, WorkerArgs, load_of};

/// One layer frame must be accepted by the destination within this time or the sequence is
/// re-run elsewhere (a cut link or a stalled decode process; a 61-layer, 4k-token prompt's layer is
/// ~5 MB, far under a second even over QUIC).
pub const KV_SEND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Layer frames computed and not yet accepted by the transport before the forward pass waits:
/// enough to keep the link busy while the next layers compute, few enough that a slow link holds
/// back the compute instead of queueing the whole prompt's KV in memory.
pub const KV_FRAMES_IN_FLIGHT: usize = 4;

/// What this worker keeps with a sequence.
struct Job {
    job: SeqJob,
    dest: KvDest,
    sampler: SeqSampler,
}

impl Job {
    /// Frees the sequence's reservation at its decode group.
    fn unreserve(&self) {
        let _ = self
            .dest
            .decode
            .send_message(PrefillToDecode::Unreserve(self.job.id));
    }
}

pub struct PrefillState {
    args: WorkerArgs,
    kv: Option<WorkerKv>,
    core: PrefillCore<Job>,
    steps: u64,
    ep: EpTurn,
}

pub struct PrefillWorker;

impl Actor for PrefillWorker {
    type Msg = PrefillMsg;
    type State = PrefillState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WorkerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let st = PrefillState {
            kv: Some(args.engine.new_kv(args.kv_pages as usize)),
            core: PrefillCore::new(
                args.id.0,
                args.engine.max_positions(),
                args.scheduler(),
                args.kv_manager(),
            ),
            steps: 0,
            ep: EpTurn::default(),
            args,
        };
        st.args.registry.cast(RegistryMsg::Register {
            id: st.args.id,
            worker: WorkerRef::prefill(st.args.id, &myself),
            load: st.load(),
        })?;
        if let Some(ep) = &st.args.ep {
            ep.join(myself.get_derived())?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.now();
        if !matches!(msg, PrefillMsg::Ep(_) | PrefillMsg::StepDone(_)) {
            st.ep.touch();
        }
        match msg {
            PrefillMsg::Ep(EpStep(step)) => st.ep_step(step, &myself),
            PrefillMsg::Job(p) => {
                let PrefillJob { job, dest } = *p;
                let limits = SeqLimits {
                    max_new_tokens: job.params.max_new_tokens,
                    stop_token_ids: job.params.stop_token_ids.clone(),
                };
                let sampler = SeqSampler::new(job.params.clone());
                let (id, tokens) = (job.id, job.tokens.to_vec());
                st.core
                    .handle_submit(now, id, tokens, limits, Job { job, dest, sampler });
            }
            PrefillMsg::Gateway(GatewayToPrefill::Abort(id)) => {
                if let Some(j) = st.core.handle_abort(now, id) {
                    j.unreserve();
                }
            }
            PrefillMsg::StepDone(done) => st.step_done(*done),
        }
        st.kick(&myself);
        st.refuse();
        st.report();
        Ok(())
    }
}

impl PrefillState {
    fn now(&self) -> u64 {
        self.args.now_us()
    }

    fn load(&self) -> WorkerLoad {
        let queued: u64 = self
            .core
            .jobs()
            .map(|(_, j)| j.job.job.tokens.len() as u64)
            .sum();
        load_of(
            self.core.sched(),
            self.core.kv(),
            queued,
            self.args.sched.max_running,
        )
    }

    fn report(&self) {
        let _ = self.args.registry.cast(RegistryMsg::Load {
            id: self.args.id,
            load: self.load(),
        });
    }

    /// Sequences the core refused or gave up: free their decode reservations and tell the
    /// gateway (re-run, or fail).
    fn refuse(&mut self) {
        while let Some(r) = self.core.poll_refused() {
            r.job.unreserve();
            let ev = if r.reason.retryable() {
                SeqEvent::Retry(r.reason)
            } else {
                SeqEvent::Failed(r.reason)
            };
            let _ = r.job.job.events.send(ev);
        }
    }

    fn kick(&mut self, myself: &ActorRef<PrefillMsg>) {
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

    /// The EP group runs `step`: this worker's prompts if it has some, an idle step otherwise.
    fn ep_step(&mut self, step: u64, myself: &ActorRef<PrefillMsg>) {
        if self.kv.is_none() {
            // The coordinator starts a step only when every rank finished the last one.
            tracing::warn!(worker = self.args.id.0, step, "EP step while stepping");
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
                    let _ = me.cast(PrefillMsg::StepDone(Box::new(done)));
                });
            }
        }
    }

    fn ep_finish(&mut self) {
        if let Some(ep) = &self.args.ep {
            self.ep.finish(ep, self.core.has_work());
        }
    }

    fn start_step(&mut self, plan: duet_core::sched::StepPlan, myself: &ActorRef<PrefillMsg>) {
        let rows = plan_rows(&plan, self.core.sched(), self.core.kv());
        // One span per traced sequence's chunk, open for the step (the forward and, for a final
        // chunk, the layer-by-layer KV sends).
        let chunk_spans: Vec<tracing::Span> = plan
            .items
            .iter()
            .filter(|_| crate::trace::enabled())
            .filter_map(|it| {
                let trace = self.core.job(it.seq)?.job.trace;
                let span = child_span(trace, || {
                    crate::trace_span!(
                        "prefill.chunk",
                        seq = it.seq,
                        worker = self.args.id.0,
                        start = it.start,
                        tokens = it.len,
                        last = it.samples,
                        batch = plan.items.len(),
                    )
                });
                (!span.is_disabled()).then_some(span)
            })
            .collect();
        let mut targets = Vec::new();
        for (it, row) in plan.items.iter().zip(&rows) {
            if let Some(j) = self.core.job(it.seq)
                && it.samples
            {
                targets.push(LayerTarget {
                    seq: it.seq,
                    src: row.block_table.clone(),
                    dest: j.dest.pages.clone(),
                    endpoint: j.dest.group.0,
                });
            }
        }
        let mut kv = self.kv.take().expect("not stepping, so the pool is here");
        let me = myself.clone();
        if matches!(kv, WorkerKv::Echo) {
            let _ = me.cast(PrefillMsg::StepDone(Box::new(StepDone {
                plan,
                kv,
                result: Ok(StepLogits::Echo),
                send_errors: BTreeMap::new(),
            })));
            return;
        }
        let engine = self.args.engine.clone();
        let transport = self.args.kv.sender();
        let corrupt = self.args.kv_corrupt.clone();
        let handle = tokio::runtime::Handle::current();
        let stats = self.args.stats.clone();
        tokio::task::spawn_blocking(move || {
            let started = Clock::instant();
            let sender = LayerSender::start(&handle, transport, KV_FRAMES_IN_FLIGHT, stats.clone());
            let mut local_errors = BTreeMap::new();
            let result = engine
                .step(&mut kv, &rows, &mut |layer, cache| {
                    let frames = layer_frames(&targets, layer, cache, &mut local_errors);
                    for (endpoint, mut frame) in frames {
                        corrupt_for_test(corrupt.as_deref(), &mut frame);
                        sender.push_blocking(endpoint, frame);
                    }
                    Ok(())
                })
                .map_err(StepError::from);
            let mut send_errors = handle
                .block_on(sender.finish())
                .unwrap_or_else(|lost| targets.iter().map(|t| (t.seq, lost.clone())).collect());
            send_errors.extend(local_errors);
            stats
                .prefill_step_seconds
                .observe(Clock::since(started).as_secs_f64());
            stats.kv_send_failures_total.add(send_errors.len() as u64);
            drop(chunk_spans);
            let _ = me.cast(PrefillMsg::StepDone(Box::new(StepDone {
                plan,
                kv,
                result,
                send_errors,
            })));
        });
    }

    fn step_done(&mut self, done: StepDone) {
        let StepDone {
            plan,
            kv,
            result,
            send_errors,
        } = done;
        let layers = match &kv {
            WorkerKv::Model(c) => c.layers(),
            WorkerKv::Echo => 0,
        };
        self.kv = Some(kv);
        if plan.items.is_empty() {
            // An EP group's idle step: nothing of this worker's ran.
            if let Err(e) = result {
                tracing::warn!(worker = self.args.id.0, "EP idle step: {e}");
            }
            self.ep_finish();
            return;
        }
        self.steps += 1;
        self.args.inject_fault(self.steps, "prefill worker");
        let now = self.now();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                self.core.handle_step_failed(now, &plan, e.to_string());
                self.ep_finish();
                return;
            }
        };
        self.core.handle_step_done(&plan);
        for (row, it) in plan.items.iter().enumerate() {
            if !it.samples {
                continue;
            }
            let Some((toks, j)) = self.core.sample_ctx(it.seq) else {
                continue; // aborted while the step ran
            };
            let prompt_len = j.job.prompt_len;
            let (token, logprob) = match logits.row(row) {
                Some(l) => j
                    .sampler
                    .next(l, toks, prompt_len, self.args.grammars.as_deref()),
                None => (echo_token(toks, prompt_len), None),
            };
            let transfer = match send_errors.get(&it.seq) {
                Some(e) => Err(e.to_string()),
                None => Ok(()),
            };
            let Some(out) = self.core.handle_first_token(now, it.seq, token, transfer) else {
                continue;
            };
            match out {
                FirstToken::Retry { reason, job } => {
                    job.unreserve();
                    let _ = job.job.events.send(SeqEvent::Retry(reason));
                }
                FirstToken::Finished {
                    finish,
                    cached,
                    job,
                } => {
                    job.unreserve();
                    let _ = job.job.events.send(SeqEvent::Token {
                        token,
                        logprob,
                        cached_tokens: Some(cached),
                        finish: Some(finish),
                    });
                }
                FirstToken::Handoff { cached, job } => {
                    let sent = job.job.events.send(SeqEvent::Token {
                        token,
                        logprob,
                        cached_tokens: Some(cached),
                        finish: None,
                    });
                    if sent.is_err() {
                        job.unreserve();
                        continue;
                    }
                    let Job {
                        job, dest, sampler, ..
                    } = job;
                    let _span = child_span(job.trace, || {
                        crate::trace_span!(
                            "prefill.handoff",
                            seq = it.seq,
                            decode_group = dest.group.0,
                            first_token = token,
                            cached_tokens = cached,
                            layers,
                        )
                    });
                    let handoff = Handoff {
                        job,
                        first_token: token,
                        sampler,
                        layers,
                    };
                    let sent = dest
                        .decode
                        .send_message(PrefillToDecode::Handoff(Box::new(handoff)));
                    if let Err(e) = sent {
                        // The decode group died: dropping the handoff closes the client's channel
                        // (if no one else holds it) and the gateway re-runs from the tokens
                        // streamed so far.
                        tracing::warn!(seq = it.seq, "decode group gone at handoff: {e}");
                    }
                }
            }
        }
        if cfg!(debug_assertions) {
            self.core.check_invariants();
        }
        self.ep_finish();
    }
}

struct LayerTarget {
    seq: SeqId,
    src: Vec<u32>,
    dest: Vec<u32>,
    endpoint: u32,
}

/// Layer `layer` of every finishing sequence as frames for their decode groups (layer-wise
/// streaming: this runs inside the forward, right after the layer's attention wrote its KV).
fn layer_frames(
    targets: &[LayerTarget],
    layer: usize,
    cache: &KvCache,
    errors: &mut BTreeMap<SeqId, SendError>,
) -> Vec<(u32, KvFrame)> {
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        if errors.contains_key(&t.seq) {
            continue;
        }
        let Some(src) = t.src.get(..t.dest.len()) else {
            errors.insert(
                t.seq,
                SendError::PageCount {
                    src: t.src.len(),
                    dest: t.dest.len(),
                },
            );
            continue;
        };
        let mut bytes = Vec::with_capacity(src.len() * cache.page_bytes());
        if let Err(e) = cache.read_pages(layer, src, &mut bytes) {
            errors.insert(
                t.seq,
                SendError::ReadPages {
                    layer,
                    message: e.to_string(),
                },
            );
            continue;
        }
        out.push((
            t.endpoint,
            KvFrame::new(
                t.seq,
                layer as u32,
                crate::engine::kv_layout(cache),
                t.dest.clone(),
                bytes,
            ),
        ));
    }
    out
}

/// Test tool: flips a byte of the next N frames after their checksums were computed.
fn corrupt_for_test(corrupt: Option<&std::sync::atomic::AtomicU64>, frame: &mut KvFrame) {
    if let Some(left) = corrupt
        && left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        && let Some(b) = frame.bytes.last_mut()
    {
        *b ^= 0x5a;
    }
}

/// Sends a step's layer frames from a task of their own while the forward pass goes on: at most
/// `in_flight` frames wait for the transport before [`LayerSender::push_blocking`] waits (the
/// named bound [`KV_FRAMES_IN_FLIGHT`]). Frames of a sequence whose earlier frame failed are not
/// sent; the first failure per sequence is reported by [`LayerSender::finish`].
pub struct LayerSender {
    tx: mpsc::Sender<(u32, KvFrame)>,
    task: tokio::task::JoinHandle<BTreeMap<SeqId, SendError>>,
}

impl LayerSender {
    pub fn start(
        handle: &tokio::runtime::Handle,
        transport: Arc<dyn KvTransport>,
        in_flight: usize,
        stats: Arc<WorkerStats>,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<(u32, KvFrame)>(in_flight.max(1));
        let task = handle.spawn(async move {
            let mut errors = BTreeMap::new();
            while let Some((endpoint, frame)) = rx.recv().await {
                if errors.contains_key(&frame.seq) {
                    continue;
                }
                let (seq, layer, bytes) = (frame.seq, frame.layer, frame.bytes.len() as u64);
                match tokio::time::timeout(KV_SEND_DEADLINE, transport.send(endpoint, frame)).await
                {
                    Ok(Ok(())) => stats.kv_sent_bytes_total.add(bytes),
                    Ok(Err(e)) => {
                        errors.insert(seq, SendError::Transport(e));
                    }
                    Err(_) => {
                        errors.insert(
                            seq,
                            SendError::Deadline {
                                layer,
                                group: endpoint,
                                deadline: KV_SEND_DEADLINE,
                            },
                        );
                    }
                }
            }
            errors
        });
        Self { tx, task }
    }

    /// From the forward pass's thread: queues a frame, waiting while `in_flight` are queued.
    pub fn push_blocking(&self, endpoint: u32, frame: KvFrame) {
        // The task only ends when this sender is dropped, so the send cannot fail.
        let _ = self.tx.blocking_send((endpoint, frame));
    }

    /// From async code (tests): queues a frame, waiting while `in_flight` are queued.
    pub async fn push(&self, endpoint: u32, frame: KvFrame) {
        let _ = self.tx.send((endpoint, frame)).await;
    }

    /// Waits until every queued frame was sent; the first error of each failed sequence.
    /// `Err` when the sending task itself ended early: then no frame is known to have landed.
    pub async fn finish(self) -> Result<BTreeMap<SeqId, SendError>, SendError> {
        drop(self.tx);
        self.task.await.map_err(|_| SendError::SenderLost)
    }
}

#[cfg(test)]
mod tests;
