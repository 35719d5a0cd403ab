//! Membership and load: workers register when they start (and again after a restart), report
//! their load after every step, and the gateway reads the latest snapshot without a round trip.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use duet_core::route::{GroupLoad, PrefillLoad};
use duet_core::types::WorkerId;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::protocol::{RegistryMsg, WorkerLoad, WorkerRef};

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
                    WorkerRef::Prefill { .. } => &mut b.prefill,
                    WorkerRef::Decode { .. } => &mut b.decode,
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
