//! A worker process's side of the cluster: its workers run under a local supervisor and registry
//! exactly as in `duet serve`, and one link connects them to the gateway.
//!
//! The link (re)connects to the gateway (with back-off, forever: a restarted gateway is rejoined
//! without restarting the workers), says hello, and then
//! - reports the local workers and their loads whenever they change and at least every
//!   [`super::HEARTBEAT_INTERVAL`] (the heartbeat);
//! - turns the gateway's messages into local actor messages; every job gets a local event channel
//!   whose events a forwarder sends back tagged with the sequence id;
//! - stands in for the other role's actors with proxies: decode's "send the job to prefill P"
//!   and prefill's handoff to decode go back through the gateway.
//!
//! A job's event channel closing without a final event and without a handover means the worker
//! that held it failed (its state died with it): the forwarder reports `Lost` and the gateway
//! re-runs it. On a handover the proxy first waits for the forwarder to flush, so the first token
//! (sent by prefill) always reaches the gateway before the handoff that lets decode go on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use duet_core::types::{SeqId, WorkerId};
use duet_transport::TransportError;
use duet_transport::control::{self, ControlTx};
use duet_transport::quic::ClusterSecret;
use ractor::DerivedActorRef;
use tokio::sync::mpsc;

use super::forward::{Forward, Forwarder};
use super::wire::{
    self, Hello, PROTOCOL_VERSION, ToGateway, ToWorker, WireEvent, WireHandoff, WireJob, WireLoad,
    WireRole,
};
use super::{HEARTBEAT_INTERVAL, LOAD_POLL_INTERVAL};
use crate::clock::Clock;
use crate::protocol::{
    DecodeRef, GatewayToDecode, GatewayToPrefill, Handoff, JobRef, KvDest, KvOwnerRef, PrefillJob,
    PrefillPeer, PrefillRef, PrefillToDecode, WorkerRef,
};
use crate::registry::SharedBoard;
use crate::seq::SeqEvent;

/// Back-off between attempts to reach the gateway: from the first to the last, doubling.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How long the gateway has to answer the hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A handover waits this long for the job's forwarder to flush its events.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the gateway at {0} refused this process's cluster secret ({1}); check --secret-file")]
    Credential(SocketAddr, String),
    #[error("the gateway at {0} refused this process: {1}")]
    Refused(SocketAddr, String),
    #[error("cannot join the gateway at {0}: {1}")]
    Fatal(SocketAddr, String),
}

pub struct LinkArgs {
    pub join: SocketAddr,
    pub secret: ClusterSecret,
    pub hello: Hello,
    pub board: SharedBoard,
    /// The process's KV data plane (grants on decode, routes on prefill).
    pub data: Arc<crate::dataplane::DataPlane>,
    /// Called with one line when the process joins or loses the gateway.
    pub announce: Box<dyn Fn(String) + Send + Sync>,
    /// Turns true when the process drains: the gateway is told (again after any reconnect) to
    /// place nothing new here.
    pub drain: tokio::sync::watch::Receiver<bool>,
}

/// What the process sees of its link: how many sequences it still holds.
#[derive(Clone)]
pub struct LinkState(Arc<Shared>);

impl LinkState {
    pub fn new(data: Arc<crate::dataplane::DataPlane>) -> Self {
        Self(Arc::new(Shared {
            tx: RwLock::new(None),
            data,
            handed: DashMap::new(),
            forwarders: DashMap::new(),
            generation: std::sync::atomic::AtomicU64::new(0),
            local: DashMap::new(),
            batch: Mutex::new(Vec::new()),
            batch_ready: tokio::sync::Notify::new(),
            send_order: tokio::sync::Mutex::new(()),
            released: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// A draining process may go: it holds nothing, and the gateway said nothing is on its way
    /// (or there is no gateway to send anything).
    pub fn drained(&self) -> bool {
        let connected = self
            .0
            .tx
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        self.held() == 0
            && (self.0.released.load(std::sync::atomic::Ordering::Acquire) || !connected)
    }

    /// Sequences this process's workers hold for the gateway (reserved, prefilling or decoding,
    /// and not handed over).
    pub fn held(&self) -> usize {
        self.0.local.len()
    }
}

struct Shared {
    tx: RwLock<Option<ControlTx>>,
    data: Arc<crate::dataplane::DataPlane>,
    /// Sequences handed to another process: their forwarder must not report them lost.
    handed: DashMap<SeqId, ()>,
    /// Each job's forwarder, with a generation so a finished one removes only itself.
    forwarders: DashMap<SeqId, (u64, tokio::task::JoinHandle<()>)>,
    generation: std::sync::atomic::AtomicU64,
    /// Sequence → the local worker holding it, to abort them all if the gateway goes away.
    local: DashMap<SeqId, u32>,
    /// Sequence events not yet sent, in the order the forwarders took them: one control message
    /// carries them all (a decode step's tokens for all its sequences), not one per token.
    batch: Mutex<Vec<(SeqId, WireEvent)>>,
    /// Wakes the batcher when `batch` gets its first event.
    batch_ready: tokio::sync::Notify,
    /// Held from taking a batch (or a message) to queueing it, so that messages leave in the
    /// order their causes happened: a first token before the handoff that follows it.
    send_order: tokio::sync::Mutex<()>,
    /// The gateway answered a drain with `Drained`: nothing is on its way here any more.
    released: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Sends `msg` after every event taken before it.
    async fn send(&self, msg: &ToGateway) -> bool {
        let _order = self.send_order.lock().await;
        self.send_batch().await;
        self.send_now(msg).await
    }

    /// Sends the events waiting in `batch`.
    async fn flush(&self) {
        let _order = self.send_order.lock().await;
        self.send_batch().await;
    }

    /// Under `send_order`.
    async fn send_batch(&self) {
        let events = std::mem::take(&mut *self.batch.lock().unwrap_or_else(|e| e.into_inner()));
        if !events.is_empty() {
            // Disconnected: the events are dropped, as the gateway re-runs the session's
            // sequences from what it received.
            self.send_now(&ToGateway::Events(events)).await;
        }
    }

    /// Queues one sequence event for the next batch; a full batch is sent at once (waiting on the
    /// control plane's bounded queue, which holds the worker's forwarders back).
    async fn push_event(&self, seq: SeqId, event: WireEvent) {
        let len = {
            let mut b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
            b.push((seq, event));
            b.len()
        };
        if len >= wire::EVENTS_PER_MESSAGE_MAX {
            self.flush().await;
        } else if len == 1 {
            self.batch_ready.notify_one();
        }
    }

    /// Sends batches as events arrive. After a wake-up it yields once, so that the forwarders
    /// woken by the same step (one per sequence) add their tokens to this batch first.
    async fn batcher(self: Arc<Self>) {
        loop {
            self.batch_ready.notified().await;
            tokio::task::yield_now().await;
            self.flush().await;
        }
    }

    async fn send_now(&self, msg: &ToGateway) -> bool {
        let tx = self.tx.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(tx) = tx else { return false };
        match wire::encode(msg) {
            Ok(b) => tx.send(b).await.is_ok(),
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }

    /// A local event channel for `seq` whose events go to the gateway.
    fn events_for(self: &Arc<Self>, seq: SeqId, worker: u32) -> crate::seq::EventTx {
        let (tx, mut rx) = mpsc::unbounded_channel::<SeqEvent>();
        let me = self.clone();
        self.local.insert(seq, worker);
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let h = tokio::spawn(async move {
            let mut done = false;
            while let Some(ev) = rx.recv().await {
                let event = WireEvent::from(&ev);
                done |= event.is_final();
                me.push_event(seq, event).await;
            }
            let handed = me.handed.remove(&seq).is_some();
            if !done && !handed {
                me.send(&ToGateway::Lost { seq }).await;
            }
            if !handed {
                me.local.remove(&seq);
            }
            me.forwarders.remove_if(&seq, |_, (g, _)| *g == generation);
        });
        if let Some((_, old)) = self.forwarders.insert(seq, (generation, h)) {
            old.abort();
        }
        tx
    }

    /// Hands `job` to another process: marks it handed over (so its forwarder does not report
    /// it lost), drops its event sender, and waits until the forwarder sent everything it had.
    async fn hand_over(&self, job: crate::seq::SeqJob) {
        let seq = job.id;
        self.handed.insert(seq, ());
        drop(job);
        let h = self.forwarders.remove(&seq).map(|(_, (_, h))| h);
        if let Some(h) = h {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, h).await;
        }
        self.local.remove(&seq);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the link until a fatal refusal (wrong credential, another model, a version mismatch).
/// Losing the gateway is not fatal: the link reconnects.
pub async fn run(mut args: LinkArgs, state: LinkState) -> Result<(), LinkError> {
    let shared = state.0;
    let batcher = tokio::spawn(shared.clone().batcher());
    let _batcher = AbortOnDrop(batcher);
    let proxies = Proxies::default();
    let mut backoff = RECONNECT_FIRST;
    let mut reported_unreachable = false;
    loop {
        let mut conn = match control::connect(args.join, &args.secret, PROTOCOL_VERSION).await {
            Ok(c) => c,
            Err(TransportError::Auth(why)) => return Err(LinkError::Credential(args.join, why)),
            Err(TransportError::Protocol(why)) => return Err(LinkError::Fatal(args.join, why)),
            Err(e) => {
                if !reported_unreachable {
                    (args.announce)(format!(
                        "gateway at {} not reachable ({e}); retrying",
                        args.join
                    ));
                    reported_unreachable = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        let hello = ToGateway::Hello(args.hello.clone());
        let sent = match wire::encode(&hello) {
            Ok(b) => conn.tx.send(b).await.is_ok(),
            Err(e) => return Err(LinkError::Fatal(args.join, e.to_string())),
        };
        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, conn.rx.recv()).await {
            Ok(Ok(Some(b))) if sent => wire::decode::<ToWorker>(&b).ok(),
            _ => None,
        };
        match welcome {
            Some(ToWorker::Welcome) => {}
            Some(ToWorker::Refused(why)) => return Err(LinkError::Refused(args.join, why)),
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        }
        backoff = RECONNECT_FIRST;
        reported_unreachable = false;
        *shared.tx.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.tx.clone());
        (args.announce)(format!(
            "joined the gateway at {} as {:?} workers {:?}",
            args.join, args.hello.role, args.hello.workers
        ));
        let why = session(&mut args, &shared, &proxies, &mut conn.rx).await;
        tracing::warn!("lost the gateway at {}: {why}; rejoining", args.join);
        *shared.tx.write().unwrap_or_else(|e| e.into_inner()) = None;
        conn.close("link closed");
        (args.announce)(format!(
            "lost the gateway at {}: {why}; rejoining",
            args.join
        ));
        // Sequences of the lost session: nobody is listening for them any more.
        let orphans: Vec<(SeqId, u32)> = shared
            .local
            .iter()
            .map(|e| (*e.key(), *e.value()))
            .collect();
        shared.local.clear();
        for (seq, worker) in orphans {
            abort_local(&args.board, worker, seq);
        }
    }
}

async fn session(
    args: &mut LinkArgs,
    shared: &Arc<Shared>,
    proxies: &Proxies,
    rx: &mut control::ControlRx,
) -> String {
    let mut poll = tokio::time::interval(LOAD_POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Vec<(u32, WireLoad)>> = None;
    let mut last_sent = Clock::instant();
    // A drain (begun before this session too) is repeated until the gateway releases it.
    let mut drain_resend = tokio::time::interval(super::DRAIN_RESEND_INTERVAL);
    drain_resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_watch = true;
    loop {
        let draining = *args.drain.borrow_and_update()
            && !shared.released.load(std::sync::atomic::Ordering::Acquire);
        tokio::select! {
            changed = args.drain.changed(), if drain_watch && !draining => {
                // The sender gone (the process is exiting anyway): stop watching.
                drain_watch = changed.is_ok();
            }
            _ = drain_resend.tick(), if draining => {
                if !shared.send(&ToGateway::Draining).await {
                    return "control connection closed".into();
                }
            }
            msg = rx.recv() => {
                let msg = match msg {
                    Ok(Some(b)) => b,
                    Ok(None) => return "closed by the gateway".into(),
                    Err(e) => return e.to_string(),
                };
                match wire::decode::<ToWorker>(&msg) {
                    Ok(m) => handle(&*args, shared, proxies, m).await,
                    Err(e) => return format!("bad control message: {e}"),
                }
            }
            _ = poll.tick() => {
                let now = workers_of(&args.board, args.hello.role);
                if last.as_ref() != Some(&now) || last_sent.elapsed() >= HEARTBEAT_INTERVAL {
                    if !shared.send(&ToGateway::Workers(now.clone())).await {
                        return "control connection closed".into();
                    }
                    last = Some(now);
                    last_sent = Clock::instant();
                }
            }
        }
    }
}

fn workers_of(board: &SharedBoard, role: WireRole) -> Vec<(u32, WireLoad)> {
    let b = board.read().unwrap_or_else(|e| e.into_inner());
    let map = match role {
        WireRole::Prefill => &b.prefill,
        WireRole::Decode => &b.decode,
    };
    map.iter()
        .map(|(id, e)| (id.0, WireLoad::from(&e.load)))
        .collect()
}

/// Local decode group `id`: what the gateway and what prefill workers send it.
fn local_decode(board: &SharedBoard, id: u32) -> Option<(DecodeRef, KvOwnerRef)> {
    let b = board.read().unwrap_or_else(|e| e.into_inner());
    match b.decode.get(&WorkerId(id)).map(|e| &e.worker) {
        Some(WorkerRef::Decode {
            gateway,
            kv: Some(kv),
        }) => Some((gateway.clone(), kv.clone())),
        _ => None,
    }
}

/// Local prefill worker `id`: what the gateway and what decode groups send it.
fn local_prefill(board: &SharedBoard, id: u32) -> Option<(PrefillRef, JobRef)> {
    let b = board.read().unwrap_or_else(|e| e.into_inner());
    match b.prefill.get(&WorkerId(id)).map(|e| &e.worker) {
        Some(WorkerRef::Prefill {
            abort,
            peer: PrefillPeer {
                jobs: Some(jobs), ..
            },
        }) => Some((abort.clone(), jobs.clone())),
        _ => None,
    }
}

fn abort_local(board: &SharedBoard, worker: u32, seq: SeqId) {
    if let Some((d, _)) = local_decode(board, worker) {
        let _ = d.send_message(GatewayToDecode::Abort(seq));
    }
    if let Some((p, _)) = local_prefill(board, worker) {
        let _ = p.send_message(GatewayToPrefill::Abort(seq));
    }
}

async fn handle(args: &LinkArgs, shared: &Arc<Shared>, proxies: &Proxies, msg: ToWorker) {
    match msg {
        ToWorker::Welcome | ToWorker::Refused(_) => {}
        ToWorker::Drained => shared
            .released
            .store(true, std::sync::atomic::Ordering::Release),
        ToWorker::Reserve {
            group,
            prefill,
            job,
        } => {
            let seq = job.id;
            let job = job.into_job(shared.events_for(seq, group));
            let p = proxies.prefill(shared, prefill).await;
            match (local_decode(&args.board, group), p) {
                (Some((d, _)), Some(p)) => {
                    // A failed send drops the job: its forwarder reports it lost.
                    let _ = d.send_message(GatewayToDecode::Reserve {
                        job: Box::new(job),
                        prefill: PrefillPeer {
                            id: WorkerId(prefill),
                            jobs: Some(p),
                        },
                    });
                }
                _ => drop(job),
            }
        }
        ToWorker::Prefill {
            prefill,
            group,
            kv_addr,
            pages,
            job,
            grant,
        } => {
            let seq = job.id;
            let routed = shared
                .data
                .route(group, &kv_addr, grant.as_deref())
                .await
                .map_err(|e| tracing::warn!(seq, group, "cannot reach decode group: {e}"));
            let job = job.into_job(shared.events_for(seq, prefill));
            let d = proxies.decode(shared, group).await;
            match (local_prefill(&args.board, prefill), d, routed) {
                (Some((_, p)), Some(decode), Ok(())) => {
                    let dest = KvDest {
                        group: WorkerId(group),
                        decode,
                        pages,
                    };
                    let _ = p.send_message(Box::new(PrefillJob { job, dest }));
                }
                _ => {
                    shared.send(&ToGateway::Unreserve { group, seq }).await;
                    drop(job);
                }
            }
        }
        ToWorker::Handoff(h) => {
            let seq = h.job.id;
            let sampler = h.sampler();
            let WireHandoff {
                group,
                job,
                first_token,
                layers,
                ..
            } = h;
            let job = job.into_job(shared.events_for(seq, group));
            match local_decode(&args.board, group) {
                Some((_, d)) => {
                    let _ = d.send_message(PrefillToDecode::Handoff(Box::new(Handoff {
                        job,
                        first_token,
                        sampler,
                        layers: layers as usize,
                    })));
                }
                None => drop(job),
            }
        }
        ToWorker::Unreserve { group, seq } => {
            if let Some((_, d)) = local_decode(&args.board, group) {
                let _ = d.send_message(PrefillToDecode::Unreserve(seq));
            }
        }
        ToWorker::Abort { worker, seq } => {
            shared.local.remove(&seq);
            abort_local(&args.board, worker, seq);
        }
    }
}

/// The other role's workers, as local actors that relay through the gateway.
#[derive(Default)]
struct Proxies {
    prefill: Mutex<BTreeMap<u32, JobRef>>,
    decode: Mutex<BTreeMap<u32, KvOwnerRef>>,
}

impl Proxies {
    async fn prefill(&self, shared: &Arc<Shared>, id: u32) -> Option<JobRef> {
        get_or_spawn(&self.prefill, shared, id).await
    }

    async fn decode(&self, shared: &Arc<Shared>, id: u32) -> Option<KvOwnerRef> {
        get_or_spawn(&self.decode, shared, id).await
    }
}

/// The relay for remote worker `id`, spawned the first time it is needed.
async fn get_or_spawn<M: Forward<Via = Relay>>(
    map: &Mutex<BTreeMap<u32, DerivedActorRef<M>>>,
    shared: &Arc<Shared>,
    id: u32,
) -> Option<DerivedActorRef<M>> {
    if let Some(a) = map.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        return Some(a.clone());
    }
    let relay = Relay {
        shared: shared.clone(),
        worker: id,
    };
    let a = Forwarder::<M>::spawn(relay).await.ok()?;
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, a.clone());
    Some(a)
}

/// What a stand-in for a worker of another process forwards through: the link to the gateway.
pub struct Relay {
    shared: Arc<Shared>,
    worker: u32,
}

/// A decode group's job for a prefill worker of another process.
impl Forward for Box<PrefillJob> {
    type Via = Relay;

    async fn forward(self, st: &Relay) {
        let PrefillJob { job, dest } = *self;
        let wire_job = WireJob::of(&job);
        let grant = match st.shared.data.grant_for(dest.group.0, st.worker).await {
            Ok(g) => g,
            Err(e) => {
                // Without a grant the prefill worker cannot write here: free the pages and let
                // the job's channel close (re-run elsewhere).
                tracing::warn!(group = dest.group.0, "UCX grant: {e}");
                let _ = dest.decode.send_message(PrefillToDecode::Unreserve(job.id));
                return;
            }
        };
        st.shared.hand_over(job).await;
        st.shared
            .send(&ToGateway::Prefill {
                prefill: st.worker,
                group: dest.group.0,
                pages: dest.pages,
                job: wire_job,
                grant,
            })
            .await;
    }
}

/// A prefill worker's messages for a decode group of another process.
impl Forward for PrefillToDecode {
    type Via = Relay;

    async fn forward(self, st: &Relay) {
        match self {
            PrefillToDecode::Handoff(h) => {
                let Handoff {
                    job,
                    first_token,
                    sampler,
                    layers,
                } = *h;
                let wire_job = WireJob::of(&job);
                st.shared.hand_over(job).await;
                st.shared
                    .send(&ToGateway::Handoff(WireHandoff {
                        group: st.worker,
                        job: wire_job,
                        first_token,
                        rng: sampler.rng_state(),
                        layers: layers as u32,
                    }))
                    .await;
            }
            PrefillToDecode::Unreserve(seq) => {
                st.shared
                    .send(&ToGateway::Unreserve {
                        group: st.worker,
                        seq,
                    })
                    .await;
            }
        }
    }
}
