//! What prefill and decode workers share: their start-up arguments, the clock, load reports.

use std::sync::Arc;

use duet_core::kv::{KvConfig, KvManager};
use duet_core::sched::{SchedConfig, Scheduler};
use duet_core::types::WorkerId;
use duet_transport::{InProcTransport, KvFrame, KvInbox, KvReceiver, KvTransport, TransportError};
use ractor::ActorRef;
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::engine::Engine;
use crate::metrics::WorkerStats;
use crate::protocol::{RegistryMsg, WorkerLoad};

/// Fault injection for tests of recovery: the worker panics inside its step handler after this
/// many steps (`duet serve --fault-decode-panic-after-steps N` / `--fault-prefill-panic-after-steps
/// N`). Only the first incarnation of a worker gets it; its restarted successor runs clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub panic_after_steps: u64,
}

#[derive(Clone)]
pub struct WorkerArgs {
    pub id: WorkerId,
    pub engine: Engine,
    pub kv_pages: u32,
    pub prefix_cache: bool,
    pub sched: SchedConfig,
    pub registry: ActorRef<RegistryMsg>,
    pub kv: KvLink,
    /// The process's clock: every core of the process sees one timeline.
    pub clock: Clock,
    /// What the process's workers measure (step times, KV moved).
    pub stats: Arc<WorkerStats>,
    pub fault: Option<Fault>,
    /// Test tool (`duet prefill --fault-corrupt-kv-frames N`): the next N KV frames this worker
    /// sends get one byte flipped after their checksums were computed, as a bad link would.
    /// Shared across restarts, so it counts frames, not incarnations.
    pub kv_corrupt: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// How a worker moves KV: in-process channels (`duet serve`) or the network (role processes:
/// QUIC, whose server a decode process runs to receive).
#[derive(Clone)]
pub enum KvLink {
    InProc(Arc<InProcTransport>),
    Net {
        send: Arc<dyn KvTransport>,
        recv: Option<Arc<crate::dataplane::DataPlane>>,
    },
}

/// The receiving end of a decode group's KV endpoint.
pub enum KvInboxAny {
    InProc(mpsc::Receiver<KvFrame>),
    Net(KvInbox),
}

impl KvInboxAny {
    pub async fn recv(&mut self) -> Option<Result<KvFrame, TransportError>> {
        match self {
            KvInboxAny::InProc(rx) => KvReceiver::recv(rx).await,
            KvInboxAny::Net(rx) => rx.recv().await,
        }
    }
}

impl KvLink {
    pub fn sender(&self) -> Arc<dyn KvTransport> {
        match self {
            KvLink::InProc(t) => t.clone(),
            KvLink::Net { send, .. } => send.clone(),
        }
    }

    /// Binds (or rebinds, after a restart) decode endpoint `ep`.
    pub fn bind(&self, ep: u32) -> Option<KvInboxAny> {
        match self {
            KvLink::InProc(t) => Some(KvInboxAny::InProc(t.bind(ep))),
            KvLink::Net { recv, .. } => recv.as_ref()?.bind(ep).map(KvInboxAny::Net),
        }
    }
}

impl WorkerArgs {
    pub fn now_us(&self) -> u64 {
        self.clock.now_us()
    }

    /// Test tool (`Fault`): panics, as a bug in a step would, once this incarnation of `role`
    /// finished `steps` steps.
    pub fn inject_fault(&self, steps: u64, role: &str) {
        if let Some(f) = self.fault
            && steps >= f.panic_after_steps
        {
            panic!(
                "fault injected: {role} {} panics after {steps} steps",
                self.id.0
            );
        }
    }

    pub fn kv_manager(&self) -> KvManager {
        KvManager::new(KvConfig {
            pages_total: self.kv_pages,
            prefix_cache: self.prefix_cache,
        })
    }

    pub fn scheduler(&self) -> Scheduler {
        Scheduler::new(self.sched)
    }
}

pub fn load_of(
    sched: &Scheduler,
    kv: &KvManager,
    outstanding_tokens: u64,
    max_running: usize,
) -> WorkerLoad {
    let stats = kv.prefix_stats();
    WorkerLoad {
        running: sched.running(),
        waiting: sched.waiting(),
        outstanding_tokens,
        pages_free: kv.pages_available(),
        pages_used: kv.pages_used(),
        pages_total: kv.pages_total(),
        max_running,
        prefix_queried_tokens: stats.queried_tokens,
        prefix_hit_tokens: stats.hit_tokens,
        preemptions: 0,
    }
}
