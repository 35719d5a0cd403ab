//! Expert-parallel groups in the actors: the model's exchange over the transport's all-to-all (a
//! rank's forward pass runs on a blocking thread and waits here for each round while the runtime
//! moves the blocks), and the coordinator that keeps a group's ranks stepping together.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use duet_core::ep::{RowBlock, StepBarrier};
use duet_model::ExpertExchange;
use duet_transport::a2a::AllToAll;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};

use crate::protocol::{EpMsg, EpStep};

/// One rank's [`ExpertExchange`]: numbers its rounds and runs each on the given runtime.
pub struct A2aExchange {
    a2a: Arc<dyn AllToAll>,
    rt: tokio::runtime::Handle,
    round: AtomicU64,
}

impl A2aExchange {
    pub fn new(a2a: Arc<dyn AllToAll>, rt: tokio::runtime::Handle) -> Self {
        Self {
            a2a,
            rt,
            round: AtomicU64::new(0),
        }
    }
}

impl ExpertExchange for A2aExchange {
    /// Called from a thread outside the runtime (a step's blocking thread).
    fn exchange(&self, blocks: Vec<RowBlock>) -> Result<Vec<RowBlock>, String> {
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        self.rt
            .block_on(self.a2a.exchange(round, blocks))
            .map_err(|e| e.to_string())
    }
}

/// An EP group's step coordinator: drives `core::ep::StepBarrier`, so that every rank runs every
/// step (its own batch, or an idle step that only serves the MoE exchanges) and no rank starts
/// step s+1 before every rank finished step s.
pub struct EpCoordinator;

pub struct EpCoordinatorState {
    barrier: StepBarrier,
    ranks: Vec<Option<DerivedActorRef<EpStep>>>,
}

impl Actor for EpCoordinator {
    type Msg = EpMsg;
    type State = EpCoordinatorState;
    type Arguments = usize;

    async fn pre_start(
        &self,
        _myself: ActorRef<EpMsg>,
        ranks: usize,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(EpCoordinatorState {
            barrier: StepBarrier::new(ranks)?,
            ranks: vec![None; ranks],
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<EpMsg>,
        msg: EpMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let start = match msg {
            EpMsg::Join { rank, steps } => {
                if let Some(slot) = st.ranks.get_mut(rank) {
                    *slot = Some(steps.clone());
                }
                // A rank that (re)joins while a step runs takes part in it.
                if let Some(step) = st.barrier.running() {
                    let _ = steps.send_message(EpStep(step));
                }
                None
            }
            EpMsg::Request { rank } => st.barrier.handle_request(rank)?,
            EpMsg::Done { rank, step, more } => match st.barrier.handle_done(rank, step, more) {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!("EP step coordinator: {e}");
                    None
                }
            },
        };
        if let Some(step) = start {
            for r in st.ranks.iter().flatten() {
                let _ = r.send_message(EpStep(step));
            }
        }
        Ok(())
    }
}

/// A worker's place in its EP group.
#[derive(Clone)]
pub struct EpMember {
    pub rank: usize,
    pub coordinator: ActorRef<EpMsg>,
}

impl EpMember {
    /// Tells the coordinator where this rank (or its restarted incarnation) takes its steps.
    pub fn join(&self, steps: DerivedActorRef<EpStep>) -> Result<(), ActorProcessingErr> {
        self.coordinator.cast(EpMsg::Join {
            rank: self.rank,
            steps,
        })?;
        Ok(())
    }
}
