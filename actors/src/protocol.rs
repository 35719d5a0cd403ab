//! The role messages: what the gateway, the prefill workers, the decode groups and the registry
//! send each other. They live here, apart from the actors, so that no role module imports another
//! (decode and prefill talk through these types only), and each is split by sender: a sender holds
//! a [`DerivedActorRef`] that accepts exactly the messages it may send. An actor's mailbox
//! ([`DecodeMsg`], [`PrefillMsg`]) is the union of what its senders may send plus its own
//! timers and step results. A stand-in for a worker of another process (remote/) therefore
//! handles every message it can be given — there is nothing for it to drop.

use duet_core::types::{SeqId, WorkerId};
use duet_transport::{KvFrame, TransportError};
use ractor::{ActorRef, DerivedActorRef};

use crate::engine::StepDone;
use crate::seq::{SeqJob, SeqSampler};

/// The gateway → a decode group.
pub enum GatewayToDecode {
    /// Reserve pages for `job`'s tokens, then send the job to `prefill` with the destination.
    Reserve {
        job: Box<SeqJob>,
        prefill: PrefillPeer,
    },
    /// Client gone, stop string matched, or the gateway re-routed: drop the sequence.
    Abort(SeqId),
}

/// The gateway → a prefill worker.
pub enum GatewayToPrefill {
    /// Client gone, stop string matched, or the gateway re-routed: drop the sequence.
    Abort(SeqId),
}

/// A decode group → a prefill worker: compute `job`; its KV goes to `dest`.
pub struct PrefillJob {
    pub job: SeqJob,
    pub dest: KvDest,
}

/// A prefill worker → the decode group its KV goes to.
pub enum PrefillToDecode {
    /// First token, sampler state and the job: the sequence continues at the decode group.
    Handoff(Box<Handoff>),
    /// The prefill worker could not compute the sequence; free its reservation.
    Unreserve(SeqId),
}

pub struct Handoff {
    pub job: SeqJob,
    pub first_token: u32,
    pub sampler: SeqSampler,
    /// Layers of KV the prefill worker sent (0 for the echo engine).
    pub layers: usize,
}

/// What a decode group accepts from the gateway.
pub type DecodeRef = DerivedActorRef<GatewayToDecode>;
/// What a decode group accepts from the prefill workers computing its reservations.
pub type KvOwnerRef = DerivedActorRef<PrefillToDecode>;
/// What a prefill worker accepts from the gateway.
pub type PrefillRef = DerivedActorRef<GatewayToPrefill>;
/// What a prefill worker accepts from the decode groups.
pub type JobRef = DerivedActorRef<Box<PrefillJob>>;

/// The prefill worker a reservation names: its id, and where a decode group of this process sends
/// it the job. `jobs` is `None` only in the gateway process for a worker of another process: there
/// the reservation itself travels to the decode group's process, whose link resolves the id.
#[derive(Clone)]
pub struct PrefillPeer {
    pub id: WorkerId,
    pub jobs: Option<JobRef>,
}

/// Where a sequence's KV goes: the decode group, its actor, and the pages it reserved.
#[derive(Clone)]
pub struct KvDest {
    pub group: WorkerId,
    pub decode: KvOwnerRef,
    pub pages: Vec<u32>,
}

/// An EP group's step coordinator → each rank: run step `.0` now (with your batch, or idle).
pub struct EpStep(pub u64);

/// An EP group's ranks → its step coordinator.
pub enum EpMsg {
    /// Rank `rank` (re)started: where to send it steps.
    Join {
        rank: usize,
        steps: DerivedActorRef<EpStep>,
    },
    /// Rank `rank` has work and asks for a step.
    Request { rank: usize },
    /// Rank `rank` finished `step`; `more` if it has work left.
    Done { rank: usize, step: u64, more: bool },
}

/// A decode group's mailbox.
pub enum DecodeMsg {
    Gateway(GatewayToDecode),
    Ep(EpStep),
    Prefill(PrefillToDecode),
    /// One layer of KV for a reserved sequence (from the transport).
    Frame(KvFrame),
    /// A frame for this group arrived but failed verification (corrupt or truncated).
    BadFrame(TransportError),
    /// Periodic: enforce the transfer deadlines.
    Tick,
    StepDone(Box<StepDone>),
}

/// A prefill worker's mailbox.
pub enum PrefillMsg {
    Gateway(GatewayToPrefill),
    Ep(EpStep),
    Job(Box<PrefillJob>),
    StepDone(Box<StepDone>),
}

/// Wires a sender-side message type into a mailbox, both ways (ractor's [`DerivedActorRef`]
/// hands an undeliverable message back to its sender in the sender's own type).
macro_rules! into_mailbox {
    ($part:ty => $mailbox:ident :: $variant:ident) => {
        impl From<$part> for $mailbox {
            fn from(m: $part) -> Self {
                $mailbox::$variant(m)
            }
        }
        impl TryFrom<$mailbox> for $part {
            type Error = $mailbox;
            fn try_from(m: $mailbox) -> Result<Self, $mailbox> {
                match m {
                    $mailbox::$variant(p) => Ok(p),
                    other => Err(other),
                }
            }
        }
    };
}

into_mailbox!(GatewayToDecode => DecodeMsg::Gateway);
into_mailbox!(PrefillToDecode => DecodeMsg::Prefill);
into_mailbox!(GatewayToPrefill => PrefillMsg::Gateway);
into_mailbox!(Box<PrefillJob> => PrefillMsg::Job);
into_mailbox!(EpStep => DecodeMsg::Ep);
into_mailbox!(EpStep => PrefillMsg::Ep);

/// A worker as the board lists it: what the gateway sends it and, for a worker of this
/// process, what the other role sends it. A worker of another process (its stand-in made by the
/// gateway's hub) has no `jobs`/`kv` here: those messages travel between the worker processes.
#[derive(Clone)]
pub enum WorkerRef {
    Prefill {
        abort: PrefillRef,
        peer: PrefillPeer,
    },
    Decode {
        gateway: DecodeRef,
        kv: Option<KvOwnerRef>,
    },
}

impl WorkerRef {
    /// A prefill worker of this process.
    pub fn prefill(id: WorkerId, a: &ActorRef<PrefillMsg>) -> Self {
        WorkerRef::Prefill {
            abort: a.get_derived(),
            peer: PrefillPeer {
                id,
                jobs: Some(a.get_derived()),
            },
        }
    }

    /// A decode group of this process.
    pub fn decode(a: &ActorRef<DecodeMsg>) -> Self {
        WorkerRef::Decode {
            gateway: a.get_derived(),
            kv: Some(a.get_derived()),
        }
    }

    pub fn cell(&self) -> ractor::ActorCell {
        match self {
            WorkerRef::Prefill { abort, .. } => abort.get_cell(),
            WorkerRef::Decode { gateway, .. } => gateway.get_cell(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.cell().get_status() == ractor::ActorStatus::Running
    }
}

/// Load a worker reports after each step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerLoad {
    pub running: usize,
    pub waiting: usize,
    /// Prompt tokens queued and not yet computed (prefill) / tokens left to generate (decode).
    pub outstanding_tokens: u64,
    pub pages_free: usize,
    pub pages_used: usize,
    pub pages_total: usize,
    pub max_running: usize,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Sequences this incarnation preempted so far.
    pub preemptions: u64,
}

/// Workers → the registry.
pub enum RegistryMsg {
    Register {
        id: WorkerId,
        worker: WorkerRef,
        load: WorkerLoad,
    },
    Load {
        id: WorkerId,
        load: WorkerLoad,
    },
    /// The worker stopped or failed; it is no longer routed to until it registers again.
    Gone {
        id: WorkerId,
    },
    /// Replies once every message sent before it was applied (start-up waits on it, so the
    /// server reports ready only when the board lists every worker).
    Sync(ractor::RpcReplyPort<()>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_gets_back_its_own_message_type() {
        let m: DecodeMsg = GatewayToDecode::Abort(7).into();
        assert!(matches!(
            GatewayToDecode::try_from(m),
            Ok(GatewayToDecode::Abort(s)) if s == 7
        ));
        let m: DecodeMsg = PrefillToDecode::Unreserve(3).into();
        assert!(GatewayToDecode::try_from(m).is_err());
    }
}
