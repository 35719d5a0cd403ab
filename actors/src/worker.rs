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
use crate::ep::EpMember;
use crate::metrics::WorkerStats;
use crate::protocol::EpMsg;
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
    /// This worker's rank in an expert-parallel group (`duet serve --ep N`): it steps only when
    /// the group's coordinator says, together with the other ranks.
    pub ep: Option<EpMember>,
    /// Test tool (`duet prefill --fault-corrupt-kv-frames N`): the next N KV frames this worker
    /// sends get one byte flipped after their checksums were computed, as a bad link would.
    /// Shared across restarts, so it counts frames, not incarnations.
    pub kv_corrupt: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Compiles the grammars of constrained sequences (the model's tokenizer); `None` for the
    /// echo engine, which never samples.
    pub grammars: Option<Arc<duet_model::grammar::GrammarCompiler>>,
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

    /// The KV transport's name, for traces.
    pub fn transport_name(&self) -> &'static str {
        match self {
            KvLink::InProc(_) => "inproc",
            KvLink::Net { recv: Some(r), .. } => r.kind_name(),
            KvLink::Net { recv: None, .. } => "net",
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

/// A worker's turn-taking in its EP group: it asks for a step when it has work, runs the steps
/// the coordinator starts (its own batch, or idle), and reports each one done.
#[derive(Debug, Default)]
pub struct EpTurn {
    requested: bool,
    /// The group step this worker is running.
    step: Option<u64>,
    /// It had work the scheduler could not run (no pages yet): it asks again only after its
    /// state changes, instead of spinning the group through idle steps.
    blocked: bool,
}

impl EpTurn {
    /// Something changed (a message other than a step's own): work may be runnable again.
    pub fn touch(&mut self) {
        self.blocked = false;
    }

    /// Asks the coordinator for a step when this worker has work and none is pending.
    pub fn request(&mut self, ep: &EpMember, has_work: bool) {
        if has_work && !self.requested && !self.blocked && self.step.is_none() {
            self.requested = true;
            let _ = ep.coordinator.cast(EpMsg::Request { rank: ep.rank });
        }
    }

    /// The group started `step`; `planned` whether this worker has a batch for it.
    pub fn begin(&mut self, step: u64, planned: bool, has_work: bool) {
        self.requested = false;
        self.step = Some(step);
        self.blocked = !planned && has_work;
    }

    /// This worker's part of the running step is done.
    pub fn finish(&mut self, ep: &EpMember, has_work: bool) {
        if let Some(step) = self.step.take() {
            let more = has_work && !self.blocked;
            let _ = ep.coordinator.cast(EpMsg::Done {
                rank: ep.rank,
                step,
                more,
            });
        }
    }
}
