//! Membership and load: workers register when they start (and again after a restart), report
//! their load after every step, and the gateway reads the latest snapshot without a round trip.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use duet_core::route::{GroupLoad, PrefillLoad};
use duet_core::types::WorkerId;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::decode::DecodeMsg;
use crate::prefill::PrefillMsg;

/// A worker's handle as the gateway sees it.
#[derive(Clone)]
pub enum WorkerRef {
    Prefill(ActorRef<PrefillMsg>),
    Decode(ActorRef<DecodeMsg>),
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

#[derive(Clone)]
pub struct WorkerEntry {
    pub worker: WorkerRef,
    pub load: WorkerLoad,
}

/// What the gateway routes on: every live worker and its last report.
#[derive(Clone, Default)]
pub struct Board {
    pub prefill: BTreeMap<WorkerId, WorkerEntry>,
    pub decode: BTreeMap<WorkerId, WorkerEntry>,
}

impl Board {
    pub fn prefill_loads(&self) -> Vec<PrefillLoad> {
        self.prefill
            .iter()
            .map(|(&worker, e)| PrefillLoad {
                worker,
                queued_tokens: e.load.outstanding_tokens,
                running: e.load.running + e.load.waiting,
                alive: true,
            })
            .collect()
    }

    pub fn group_loads(&self) -> Vec<GroupLoad> {
        self.decode
            .iter()
            .map(|(&group, e)| GroupLoad {
                group,
                outstanding_tokens: e.load.outstanding_tokens,
                pages_free: e.load.pages_free,
                running: e.load.running + e.load.waiting,
                max_running: e.load.max_running,
                alive: true,
            })
            .collect()
    }
}

pub type SharedBoard = Arc<RwLock<Board>>;

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

pub struct Registry;

impl Actor for Registry {
    type Msg = RegistryMsg;
    type State = SharedBoard;
    type Arguments = SharedBoard;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        board: SharedBoard,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(board)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        board: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let mut b = board.write().unwrap_or_else(|e| e.into_inner());
        match msg {
            RegistryMsg::Register { id, worker, load } => {
                let map = match worker {
                    WorkerRef::Prefill(_) => &mut b.prefill,
                    WorkerRef::Decode(_) => &mut b.decode,
                };
                map.insert(id, WorkerEntry { worker, load });
            }
            RegistryMsg::Load { id, load } => {
                if let Some(e) = b.prefill.get_mut(&id) {
                    e.load = load;
                } else if let Some(e) = b.decode.get_mut(&id) {
                    e.load = load;
                }
            }
            RegistryMsg::Gone { id } => {
                b.prefill.remove(&id);
                b.decode.remove(&id);
            }
            RegistryMsg::Sync(reply) => {
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}
