//! `PrefillWorker`: computes prompts in chunks over its own KV pool with a radix prefix cache,
//! streams each layer's latent KV to the decode group's reserved pages as soon as the layer of the
//! final chunk is computed, samples the first token, and hands the sequence to decode.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use duet_core::sched::{NewSeq, Scheduler, StepPlan, Submit};
use duet_core::types::{SeqId, WorkerId};
use duet_model::kv::KvCache;
use duet_transport::{KvFrame, KvTransport};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::decode::{DecodeMsg, Handoff};
use crate::engine::{StepLogits, WorkerKv, echo_token, plan_rows};
use crate::registry::{RegistryMsg, WorkerRef};
use crate::seq::{Finish, SeqEvent, SeqJob, SeqSampler};
use crate::worker::{WorkerArgs, load_of};
use duet_core::kv::KvManager;

/// One layer frame must be accepted by the destination within this time or the sequence is
/// re-run elsewhere (a cut link or a stalled decode process; a 61-layer, 4k-token prompt's layer is
/// ~5 MB, far under a second even over QUIC).
pub const KV_SEND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a sequence's KV goes: the decode group, its actor, and the pages it reserved.
#[derive(Clone)]
pub struct KvDest {
    pub group: WorkerId,
    pub decode: ActorRef<DecodeMsg>,
    pub pages: Vec<u32>,
}

pub struct PrefillJob {
    pub job: SeqJob,
    pub dest: KvDest,
}

pub enum PrefillMsg {
    Prefill(Box<PrefillJob>),
    Abort(SeqId),
    StepDone(Box<StepDone>),
}

pub struct StepDone {
    plan: StepPlan,
    kv: WorkerKv,
    result: Result<StepLogits, String>,
    /// Sequences whose KV could not be delivered, with the reason.
    send_errors: BTreeMap<SeqId, String>,
}

struct Job {
    job: SeqJob,
    dest: KvDest,
    sampler: SeqSampler,
    /// Prompt tokens found in the prefix cache, known when the sequence is first scheduled.
    cached: Option<usize>,
}

pub struct PrefillState {
    args: WorkerArgs,
    kv: Option<WorkerKv>,
    pages: KvManager,
    sched: Scheduler,
    jobs: BTreeMap<SeqId, Job>,
    pending_aborts: Vec<SeqId>,
    stepping: bool,
    steps: u64,
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
            pages: args.kv_manager(),
            sched: args.scheduler(),
            jobs: BTreeMap::new(),
            pending_aborts: Vec::new(),
            stepping: false,
            steps: 0,
            args,
        };
        st.args.registry.cast(RegistryMsg::Register {
            id: st.args.id,
            worker: WorkerRef::Prefill(myself),
            load: st.load(),
        })?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PrefillMsg::Prefill(p) => st.submit(*p),
            PrefillMsg::Abort(id) => {
                if st.stepping {
                    st.pending_aborts.push(id);
                } else {
                    st.abort(id);
                }
            }
            PrefillMsg::StepDone(done) => st.step_done(*done),
        }
        st.kick(&myself);
        Ok(())
    }
}

impl PrefillState {
    fn now(&self) -> u64 {
        self.args.now_us()
    }

    fn load(&self) -> crate::registry::WorkerLoad {
        let queued: u64 = self.jobs.values().map(|j| j.job.tokens.len() as u64).sum();
        load_of(
            &self.sched,
            &self.pages,
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

    fn submit(&mut self, p: PrefillJob) {
        let PrefillJob { job, dest } = p;
        let id = job.id;
        let now = self.now();
        let seq = NewSeq {
            id,
            tokens: job.tokens.to_vec(),
            computed: 0,
            arrival_us: now,
        };
        let refused = match self.sched.submit(seq, &mut self.pages, now) {
            Ok(Submit::Queued) => None,
            Ok(Submit::Full) => Some(SeqEvent::Retry(format!(
                "prefill worker {} queue is full",
                self.args.id.0
            ))),
            Err(e) => Some(SeqEvent::Failed(e.to_string())),
        };
        if let Some(ev) = refused {
            let _ = dest.decode.cast(DecodeMsg::Unreserve(id));
            let _ = job.events.send(ev);
            return;
        }
        let sampler = SeqSampler::new(job.params.clone());
        self.jobs.insert(
            id,
            Job {
                job,
                dest,
                sampler,
                cached: None,
            },
        );
        self.report();
    }

    fn abort(&mut self, id: SeqId) {
        if let Some(j) = self.jobs.remove(&id) {
            let now = self.now();
            let _ = self.sched.finish(id, false, &mut self.pages, now);
            let _ = j.dest.decode.cast(DecodeMsg::Unreserve(id));
        }
    }

    fn kick(&mut self, myself: &ActorRef<PrefillMsg>) {
        if self.stepping || self.jobs.is_empty() {
            return;
        }
        let now = self.now();
        let plan = self.sched.schedule(&mut self.pages, now);
        for id in self.sched.take_unservable() {
            if let Some(j) = self.jobs.remove(&id) {
                let _ = j.dest.decode.cast(DecodeMsg::Unreserve(id));
                let _ = j.job.events.send(SeqEvent::Failed(format!(
                    "prompt of {} tokens cannot fit prefill worker {}'s {} KV pages",
                    j.job.tokens.len(),
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
        let mut targets = Vec::new();
        for (it, row) in plan.items.iter().zip(&rows) {
            if let Some(j) = self.jobs.get_mut(&it.seq) {
                j.cached.get_or_insert(it.start);
                if it.samples {
                    targets.push(LayerTarget {
                        seq: it.seq,
                        src: row.block_table.clone(),
                        dest: j.dest.pages.clone(),
                        endpoint: j.dest.group.0,
                    });
                }
            }
        }
        let mut kv = self.kv.take().expect("not stepping, so the pool is here");
        self.stepping = true;
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
        tokio::task::spawn_blocking(move || {
            let mut send_errors = BTreeMap::new();
            let result = engine
                .step(&mut kv, &rows, &mut |layer, cache| {
                    stream_layer(
                        &handle,
                        &transport,
                        &targets,
                        layer,
                        cache,
                        &mut send_errors,
                        corrupt.as_deref(),
                    );
                    Ok(())
                })
                .map_err(|e| e.to_string());
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
        self.kv = Some(kv);
        self.stepping = false;
        self.steps += 1;
        if let Some(f) = self.args.fault
            && self.steps >= f.panic_after_steps
        {
            panic!(
                "fault injected: prefill worker {} panics after {} steps",
                self.args.id.0, self.steps
            );
        }
        let now = self.now();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for it in &plan.items {
                    if let Some(j) = self.jobs.remove(&it.seq) {
                        let _ = j.dest.decode.cast(DecodeMsg::Unreserve(it.seq));
                        let _ = j.job.events.send(SeqEvent::Failed(format!("engine: {e}")));
                    }
                    let _ = self.sched.finish(it.seq, false, &mut self.pages, now);
                }
                return;
            }
        };
        self.sched.complete(&plan);
        let layers = match self.kv.as_ref() {
            Some(WorkerKv::Model(c)) => c.layers(),
            _ => 0,
        };
        let max_pos = self.args.engine.max_positions();
        for (row, it) in plan.items.iter().enumerate() {
            if !it.samples {
                continue;
            }
            let Some(mut j) = self.jobs.remove(&it.seq) else {
                continue;
            };
            let toks = self.sched.tokens(it.seq).unwrap_or(&[]);
            let (token, logprob) = match logits.row(row) {
                Some(l) => j.sampler.next(l, toks, j.job.prompt_len),
                None => (echo_token(toks, j.job.prompt_len), None),
            };
            let finish = if j.job.params.stop_token_ids.contains(&token) {
                Some(Finish::Stop(token))
            } else if j.job.params.max_new_tokens <= 1 || toks.len() + 1 >= max_pos {
                Some(Finish::Length)
            } else {
                None
            };
            // Cache the prompt's pages for later requests sharing its prefix.
            let _ = self.sched.finish(it.seq, true, &mut self.pages, now);
            if let Some(e) = send_errors.get(&it.seq) {
                let _ = j.dest.decode.cast(DecodeMsg::Unreserve(it.seq));
                let _ = j
                    .job
                    .events
                    .send(SeqEvent::Retry(format!("KV transfer: {e}")));
                continue;
            }
            let sent = j.job.events.send(SeqEvent::Token {
                token,
                logprob,
                cached_tokens: Some(j.cached.unwrap_or(0)),
                finish,
            });
            if finish.is_some() || sent.is_err() {
                let _ = j.dest.decode.cast(DecodeMsg::Unreserve(it.seq));
                continue;
            }
            let handoff = Handoff {
                job: j.job,
                first_token: token,
                sampler: j.sampler,
                layers,
            };
            if let Err(e) = j.dest.decode.cast(DecodeMsg::Handoff(Box::new(handoff))) {
                // The decode group died: dropping the handoff closes the client's channel (if
                // no one else holds it) and the gateway re-runs from the tokens streamed so far.
                tracing::warn!(seq = it.seq, "decode group gone at handoff: {e}");
            }
        }
        for id in std::mem::take(&mut self.pending_aborts) {
            self.abort(id);
        }
        if cfg!(debug_assertions) {
            self.sched.check_invariants(&self.pages);
        }
        self.report();
    }
}

struct LayerTarget {
    seq: SeqId,
    src: Vec<u32>,
    dest: Vec<u32>,
    endpoint: u32,
}

/// Sends layer `layer` of every finishing sequence to its decode group (layer-wise streaming:
/// this runs inside the forward, right after the layer's attention wrote its KV).
fn stream_layer(
    handle: &tokio::runtime::Handle,
    transport: &Arc<dyn KvTransport>,
    targets: &[LayerTarget],
    layer: usize,
    cache: &KvCache,
    errors: &mut BTreeMap<SeqId, String>,
    corrupt: Option<&std::sync::atomic::AtomicU64>,
) {
    for t in targets {
        if errors.contains_key(&t.seq) {
            continue;
        }
        let Some(src) = t.src.get(..t.dest.len()) else {
            errors.insert(
                t.seq,
                format!(
                    "{} source pages for {} destination pages",
                    t.src.len(),
                    t.dest.len()
                ),
            );
            continue;
        };
        let mut bytes = Vec::with_capacity(src.len() * cache.page_bytes());
        if let Err(e) = cache.read_pages(layer, src, &mut bytes) {
            errors.insert(t.seq, e.to_string());
            continue;
        }
        let mut frame = KvFrame::new(t.seq, layer as u32, t.dest.clone(), bytes);
        if let Some(left) = corrupt
            && left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            && let Some(b) = frame.bytes.last_mut()
        {
            *b ^= 0x5a;
        }
        match handle.block_on(tokio::time::timeout(
            KV_SEND_DEADLINE,
            transport.send(t.endpoint, frame),
        )) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors.insert(t.seq, e.to_string());
            }
            Err(_) => {
                errors.insert(
                    t.seq,
                    format!(
                        "layer {layer} not delivered to decode group {} within {KV_SEND_DEADLINE:?}",
                        t.endpoint
                    ),
                );
            }
        }
    }
}
