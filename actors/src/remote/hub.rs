//! The gateway's side of the cluster port: every worker process that joined, a proxy actor per
//! remote worker (so the gateway actor routes to remote workers exactly as to local ones), and
//! the table of sequences held by remote processes.
//!
//! All control goes through the gateway (a star): decode's "send this job to prefill P" and
//! prefill's handoff to decode are relayed here, which is also how the gateway always knows which
//! process holds a sequence. KV bytes do not come here: they go from prefill to decode directly.
//!
//! A sequence's entry holds the client's event channel. Dropping the entry closes the channel,
//! which the client's `ChoiceRun` reads as "lost" and re-runs from the tokens already streamed,
//! so every failure below ends in dropping the entry: the holder's process died or went silent
//! (no message for [`HEARTBEAT_TIMEOUT`]), it reported the sequence lost, or a relay found its
//! destination gone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use duet_core::types::{SeqId, WorkerId};
use duet_transport::control::{ControlConn, ControlListener, ControlTx};
use ractor::{ActorProcessingErr, ActorRef};

use super::forward::{Forward, Forwarder};
use super::wire::{
    self, Hello, ModelShape, ToGateway, ToWorker, WireEvent, WireJob, WireKvTransport, WireLoad,
    WireParallelism, WireRole,
};
use crate::clock::Clock;
use crate::protocol::{
    GatewayToDecode, GatewayToPrefill, PrefillPeer, RegistryMsg, WorkerLoad, WorkerRef,
};
use crate::seq::{EventTx, SeqEvent};

/// A worker process that sends nothing for this long (not even its load heartbeat, sent every
/// [`super::HEARTBEAT_INTERVAL`]) is dead: its connection is closed and its sequences re-run.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// A joining process must say hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Workers one process may host.
pub const WORKERS_PER_PROCESS_MAX: usize = 64;

type PeerId = u64;

struct Peer {
    tx: ControlTx,
    role: WireRole,
    kv_addr: Option<String>,
    kv_transport: WireKvTransport,
    name: String,
    /// Live workers of the process and their proxies.
    workers: BTreeMap<u32, WorkerRef>,
    /// Every id the process announced in its hello (reserved for it while it is connected).
    ids: BTreeSet<u32>,
    page_bytes: u64,
    /// Draining since: its workers are off the routing board (nothing new is placed on them) but
    /// keep their proxies, so the sequences they hold finish normally.
    draining: Option<std::time::Instant>,
}

/// A sequence a remote process holds.
struct Held {
    events: EventTx,
    holder: PeerId,
    /// The decode group that reserved pages for it, until the handoff.
    group: Option<u32>,
    /// The prefill worker the reservation will send it to, until it is sent there: a process
    /// that drains must not leave while work is on its way to it.
    prefill: Option<u32>,
}

/// How long after a process starts draining it is first released: placements the gateway made
/// just before its workers left the board are in flight (actor messages within this process) for
/// far less.
const DRAIN_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Hub {
    registry: ActorRef<RegistryMsg>,
    shape: ModelShape,
    peers: Mutex<BTreeMap<PeerId, Peer>>,
    owner: DashMap<u32, PeerId>,
    seqs: DashMap<SeqId, Held>,
    next_peer: AtomicU64,
    /// Called with one line per join and leave (the CLI prints them; tests wait on them).
    announce: Box<dyn Fn(String) + Send + Sync>,
}

impl Hub {
    /// `shape.page_bytes` is ignored: the first worker to join sets it, and every later one must
    /// match it (prefill and decode must agree on the KV dtype).
    pub fn new(
        registry: ActorRef<RegistryMsg>,
        shape: ModelShape,
        announce: Box<dyn Fn(String) + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            shape,
            peers: Mutex::default(),
            owner: DashMap::new(),
            seqs: DashMap::new(),
            next_peer: AtomicU64::new(1),
            announce,
        })
    }

    /// Sequences held by remote processes right now (for tests and metrics).
    pub fn held(&self) -> usize {
        self.seqs.len()
    }

    fn tx_of_worker(&self, worker: u32) -> Option<(PeerId, ControlTx, Option<String>)> {
        let peer = *self.owner.get(&worker)?;
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let p = peers.get(&peer)?;
        p.workers
            .contains_key(&worker)
            .then(|| (peer, p.tx.clone(), p.kv_addr.clone()))
    }

    /// Stops `seq` at the remote worker `via` stands for; the sequence is no longer held there.
    async fn abort(&self, via: &ProxyArgs, seq: SeqId) {
        self.seqs.remove(&seq);
        let msg = ToWorker::Abort {
            worker: via.worker,
            seq,
        };
        Self::send(&via.tx, &msg).await;
    }

    async fn send(tx: &ControlTx, msg: &ToWorker) -> bool {
        match wire::encode(msg) {
            Ok(b) => tx.send(b).await.is_ok(),
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }

    /// Accepts worker processes until the listener stops.
    pub async fn serve(self: Arc<Self>, mut listener: ControlListener) {
        while let Some(conn) = listener.accept().await {
            tokio::spawn(self.clone().serve_peer(conn));
        }
    }

    async fn serve_peer(self: Arc<Self>, mut conn: ControlConn) {
        let addr = conn.peer;
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, conn.rx.recv()).await {
            Ok(Ok(Some(b))) => match wire::decode::<ToGateway>(&b) {
                Ok(ToGateway::Hello(h)) => h,
                _ => {
                    conn.close("expected hello");
                    return;
                }
            },
            _ => {
                conn.close("no hello");
                return;
            }
        };
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        if let Err(why) = self.admit(id, &hello, conn.tx.clone()) {
            tracing::warn!("refused {} from {addr}: {why}", hello.name);
            let _ = Self::send(&conn.tx, &ToWorker::Refused(why)).await;
            // Let the refusal leave before the connection goes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.close("refused");
            return;
        }
        if !Self::send(&conn.tx, &ToWorker::Welcome).await {
            self.leave(id, "lost before welcome").await;
            return;
        }
        (self.announce)(format!(
            "joined {} {} workers {:?} from {addr}",
            match hello.role {
                WireRole::Prefill => "prefill",
                WireRole::Decode => "decode",
            },
            hello.name,
            hello.workers
        ));
        let why = loop {
            let msg = match tokio::time::timeout(HEARTBEAT_TIMEOUT, conn.rx.recv()).await {
                Err(_) => break format!("no heartbeat for {HEARTBEAT_TIMEOUT:?}"),
                Ok(Ok(Some(b))) => b,
                Ok(Ok(None)) => break "closed by the worker".to_string(),
                Ok(Err(e)) => break e.to_string(),
            };
            match wire::decode::<ToGateway>(&msg) {
                Ok(m) => self.dispatch(id, m).await,
                Err(e) => break format!("bad control message: {e}"),
            }
        };
        conn.close(&why);
        self.leave(id, &why).await;
        (self.announce)(format!("left {} from {addr}: {why}", hello.name));
    }

    fn admit(&self, id: PeerId, h: &Hello, tx: ControlTx) -> Result<(), String> {
        if h.shape.layers != self.shape.layers || h.shape.vocab_size != self.shape.vocab_size {
            return Err(format!(
                "model differs: the gateway serves {} layers and {} tokens, this worker {} and {}",
                self.shape.layers, self.shape.vocab_size, h.shape.layers, h.shape.vocab_size
            ));
        }
        if h.shape.architecture != self.shape.architecture
            || h.shape.kv_width != self.shape.kv_width
        {
            return Err(format!(
                "model differs: the gateway serves {} with {} KV values per token, this worker {} with {}",
                self.shape.architecture,
                self.shape.kv_width,
                h.shape.architecture,
                h.shape.kv_width
            ));
        }
        if h.workers.is_empty() || h.workers.len() > WORKERS_PER_PROCESS_MAX {
            return Err(format!(
                "a process hosts 1 to {WORKERS_PER_PROCESS_MAX} workers, not {}",
                h.workers.len()
            ));
        }
        let quic = h.kv_transport == WireKvTransport::Quic;
        if h.parallelism != WireParallelism::default() {
            return Err(format!(
                "expert/tensor parallelism {:?} is not supported by this gateway yet",
                h.parallelism
            ));
        }
        let kv_addr = match (h.role, &h.kv_addr) {
            (WireRole::Decode, Some(a)) if quic => match a.parse::<SocketAddr>() {
                Ok(_) => Some(a.clone()),
                Err(e) => return Err(format!("KV address {a:?}: {e}")),
            },
            (WireRole::Decode, None) if quic => {
                return Err("a decode process needs a KV address".into());
            }
            _ => None,
        };
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = peers.values().find(|p| p.page_bytes != h.shape.page_bytes) {
            return Err(format!(
                "KV pages differ: {} bytes here, {} bytes on {} (same model and --dtype everywhere)",
                h.shape.page_bytes, other.page_bytes, other.name
            ));
        }
        if let Some(other) = peers.values().find(|p| p.kv_transport != h.kv_transport) {
            return Err(format!(
                "KV transport differs: {} here, {} on {} (same --kv-transport everywhere)",
                h.kv_transport.name(),
                other.kv_transport.name(),
                other.name
            ));
        }
        if let Some(w) = h.workers.iter().find(|w| self.owner.contains_key(w)) {
            return Err(format!("worker id {w} is already in the cluster"));
        }
        for &w in &h.workers {
            self.owner.insert(w, id);
        }
        peers.insert(
            id,
            Peer {
                tx,
                role: h.role,
                kv_addr,
                kv_transport: h.kv_transport,
                name: h.name.clone(),
                workers: BTreeMap::new(),
                ids: h.workers.iter().copied().collect(),
                page_bytes: h.shape.page_bytes,
                draining: None,
            },
        );
        Ok(())
    }

    /// One sequence event from a worker process into the sequence's stream.
    fn on_event(&self, from: PeerId, seq: u64, event: WireEvent) {
        // Only the process holding a sequence speaks for it: a stale or confused peer
        // cannot put tokens into another's stream.
        let last = event.is_final();
        match self.seqs.get(&seq) {
            Some(h) if h.holder == from => {
                let _ = h.events.send(SeqEvent::from(event));
            }
            Some(h) => {
                tracing::debug!(
                    seq,
                    from,
                    holder = h.holder,
                    "event from a non-holder dropped"
                );
                return;
            }
            None => return,
        }
        if last {
            self.seqs.remove(&seq);
        }
    }

    async fn dispatch(self: &Arc<Self>, from: PeerId, msg: ToGateway) {
        match msg {
            ToGateway::Hello(_) => tracing::warn!("second hello from a worker process; ignored"),
            ToGateway::Workers(list) => self.update_workers(from, list).await,
            ToGateway::Draining => self.drain(from).await,
            ToGateway::Events(events) => {
                for (seq, event) in events {
                    self.on_event(from, seq, event);
                }
            }
            ToGateway::Prefill {
                prefill,
                group,
                pages,
                job,
                grant,
            } => {
                let seq = job.id;
                let dest = self.tx_of_worker(prefill);
                let kv_addr = self
                    .tx_of_worker(group)
                    .map(|(_, _, a)| a.unwrap_or_default());
                let live = self.seqs.contains_key(&seq);
                let forwarded = match (dest, kv_addr, live) {
                    (Some((p, tx, _)), Some(kv_addr), true) => {
                        if let Some(mut h) = self.seqs.get_mut(&seq) {
                            h.holder = p;
                            h.group = Some(group);
                            h.prefill = None;
                        }
                        let msg = ToWorker::Prefill {
                            prefill,
                            group,
                            kv_addr,
                            pages,
                            job,
                            grant,
                        };
                        self.alive(p) && Self::send(&tx, &msg).await
                    }
                    _ => false,
                };
                tracing::debug!(seq, prefill, group, forwarded, "prefill relay");
                if !forwarded {
                    // The prefill worker is gone (or the request was aborted): free the pages;
                    // dropping the entry re-runs the sequence.
                    self.unreserve(group, seq).await;
                    self.seqs.remove(&seq);
                }
            }
            ToGateway::Handoff(h) => {
                let seq = h.job.id;
                let forwarded = match self.tx_of_worker(h.group) {
                    Some((d, tx, _)) if self.seqs.contains_key(&seq) => {
                        if let Some(mut e) = self.seqs.get_mut(&seq) {
                            e.holder = d;
                            e.group = None;
                        }
                        self.alive(d) && Self::send(&tx, &ToWorker::Handoff(h)).await
                    }
                    _ => false,
                };
                tracing::debug!(seq, forwarded, "handoff relay");
                if !forwarded {
                    self.seqs.remove(&seq);
                }
            }
            ToGateway::Unreserve { group, seq } => self.unreserve(group, seq).await,
            ToGateway::Lost { seq } => {
                self.seqs.remove_if(&seq, |_, h| h.holder == from);
            }
        }
    }

    async fn unreserve(&self, group: u32, seq: SeqId) {
        if let Some((_, tx, _)) = self.tx_of_worker(group) {
            Self::send(&tx, &ToWorker::Unreserve { group, seq }).await;
        }
    }

    async fn update_workers(self: &Arc<Self>, from: PeerId, list: Vec<(u32, WireLoad)>) {
        let (role, tx, ids, known, draining) = {
            let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let Some(p) = peers.get(&from) else { return };
            (
                p.role,
                p.tx.clone(),
                p.ids.clone(),
                p.workers.keys().copied().collect::<BTreeSet<u32>>(),
                p.draining.is_some(),
            )
        };
        let listed: BTreeSet<u32> = list
            .iter()
            .map(|(w, _)| *w)
            .filter(|w| ids.contains(w))
            .collect();
        for &w in known.difference(&listed) {
            // Restarting inside its process: not routed to until it is listed again.
            self.drop_worker(from, w);
        }
        for (w, load) in list {
            // A draining process's workers stay off the board.
            if !ids.contains(&w) || draining {
                continue;
            }
            let load = WorkerLoad::from(&load);
            if known.contains(&w) {
                let _ = self.registry.cast(RegistryMsg::Load {
                    id: WorkerId(w),
                    load,
                });
                continue;
            }
            let worker = match self.spawn_proxy(role, w, tx.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("proxy for worker {w}: {e}");
                    continue;
                }
            };
            if let Some(p) = self
                .peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&from)
            {
                p.workers.insert(w, worker.clone());
            }
            let _ = self.registry.cast(RegistryMsg::Register {
                id: WorkerId(w),
                worker,
                load,
            });
        }
    }

    async fn spawn_proxy(
        self: &Arc<Self>,
        role: WireRole,
        worker: u32,
        tx: ControlTx,
    ) -> Result<WorkerRef, ActorProcessingErr> {
        let args = ProxyArgs {
            hub: self.clone(),
            worker,
            tx,
        };
        // Jobs and KV handoffs go between the worker processes (relayed by `dispatch`), never
        // from this process's actors: the stand-ins take only the gateway's messages.
        Ok(match role {
            WireRole::Prefill => WorkerRef::Prefill {
                abort: Forwarder::<GatewayToPrefill>::spawn(args).await?,
                peer: PrefillPeer {
                    id: WorkerId(worker),
                    jobs: None,
                },
            },
            WireRole::Decode => WorkerRef::Decode {
                gateway: Forwarder::<GatewayToDecode>::spawn(args).await?,
                kv: None,
            },
        })
    }

    /// `peer` drains (it repeats this every [`super::DRAIN_RESEND_INTERVAL`] until released): the
    /// first time, its workers leave the routing board and nothing else changes; each time, once
    /// no sequence is held there or on its way there, it is told it may go. Placements made just
    /// before the board changed reach this table within [`DRAIN_SETTLE`], so the release waits
    /// at least that long.
    async fn drain(&self, peer: PeerId) {
        let (first, since, name, workers, tx) = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let Some(p) = peers.get_mut(&peer) else {
                return;
            };
            let first = p.draining.is_none();
            let since = *p.draining.get_or_insert_with(Clock::instant);
            (
                first,
                since,
                p.name.clone(),
                p.workers.keys().copied().collect::<Vec<_>>(),
                p.tx.clone(),
            )
        };
        if first {
            tracing::info!(
                process = name,
                "draining: no new sequences for workers {workers:?}"
            );
            for &w in &workers {
                let _ = self.registry.cast(RegistryMsg::Gone { id: WorkerId(w) });
            }
        }
        if since.elapsed() >= DRAIN_SETTLE && !self.holds_any(peer) {
            Self::send(&tx, &ToWorker::Drained).await;
        }
    }

    /// Whether a sequence is held by `peer`, or reserved elsewhere for one of its prefill workers.
    fn holds_any(&self, peer: PeerId) -> bool {
        self.seqs.iter().any(|h| {
            h.holder == peer
                || h.prefill
                    .is_some_and(|w| self.owner.get(&w).is_some_and(|o| *o == peer))
        })
    }

    fn drop_worker(&self, peer: PeerId, w: u32) {
        let _ = self.registry.cast(RegistryMsg::Gone { id: WorkerId(w) });
        let removed = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&peer)
            .and_then(|p| p.workers.remove(&w));
        if let Some(r) = removed {
            self.stop_proxy(r);
        }
    }

    fn stop_proxy(&self, r: WorkerRef) {
        r.cell().stop(None);
    }

    /// Whether `peer` is still connected. A relay sets a sequence's holder first and checks this
    /// after, while `leave` unregisters the peer first and scans holders after: whichever runs
    /// second sees the other's write, so no sequence can be left with a departed holder.
    fn alive(&self, peer: PeerId) -> bool {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&peer)
    }

    /// A process left (or died): unroute its workers, re-run what it held, free the decode
    /// reservations made for its prefill work.
    async fn leave(&self, peer: PeerId, why: &str) {
        let Some(p) = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer)
        else {
            return;
        };
        for (w, r) in p.workers {
            let _ = self.registry.cast(RegistryMsg::Gone { id: WorkerId(w) });
            self.stop_proxy(r);
        }
        for w in &p.ids {
            self.owner.remove_if(w, |_, o| *o == peer);
        }
        let lost: Vec<(SeqId, Option<u32>)> = self
            .seqs
            .iter()
            .filter(|e| e.holder == peer)
            .map(|e| (*e.key(), e.group))
            .collect();
        if !lost.is_empty() {
            tracing::warn!(
                "{} sequences lost with worker process {} ({why}); re-running them",
                lost.len(),
                p.name
            );
        }
        for (seq, group) in lost {
            self.seqs.remove(&seq);
            if let Some(g) = group {
                self.unreserve(g, seq).await;
            }
        }
    }
}

/// What the gateway's stand-in for a remote worker forwards through.
pub struct ProxyArgs {
    hub: Arc<Hub>,
    worker: u32,
    tx: ControlTx,
}

/// The gateway's messages to a remote decode group.
impl Forward for GatewayToDecode {
    type Via = ProxyArgs;

    async fn forward(self, st: &ProxyArgs) {
        match self {
            GatewayToDecode::Reserve { job, prefill } => {
                // The prefill worker went down meanwhile: dropping the job re-runs it.
                if st.hub.tx_of_worker(prefill.id.0).is_none() {
                    return;
                }
                let Some(holder) = st.hub.owner.get(&st.worker).map(|p| *p) else {
                    return;
                };
                let seq = job.id;
                let wire_job = WireJob::of(&job);
                st.hub.seqs.insert(
                    seq,
                    Held {
                        events: job.events,
                        holder,
                        group: None,
                        prefill: Some(prefill.id.0),
                    },
                );
                let msg = ToWorker::Reserve {
                    group: st.worker,
                    prefill: prefill.id.0,
                    job: wire_job,
                };
                if !st.hub.alive(holder) || !Hub::send(&st.tx, &msg).await {
                    st.hub.seqs.remove(&seq);
                }
            }
            GatewayToDecode::Abort(seq) => st.hub.abort(st, seq).await,
        }
    }
}

/// The gateway's messages to a remote prefill worker.
impl Forward for GatewayToPrefill {
    type Via = ProxyArgs;

    async fn forward(self, st: &ProxyArgs) {
        match self {
            GatewayToPrefill::Abort(seq) => st.hub.abort(st, seq).await,
        }
    }
}
