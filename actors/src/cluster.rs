//! The one-process cluster of `duet serve`: a supervisor that starts the registry, the prefill
//! workers and the decode groups, and restarts a worker that fails (actors/SEMANTICS.md).

use std::collections::BTreeMap;
use std::sync::Arc;

use duet_core::types::WorkerId;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::decode::DecodeWorker;
use crate::metrics::Metrics;
use crate::prefill::PrefillWorker;
use crate::protocol::RegistryMsg;
use crate::registry::{Registry, SharedBoard};
use crate::worker::WorkerArgs;

/// Restarts allowed per worker before the supervisor leaves it down: a worker that fails this
/// often has a deterministic bug, and restarting it forever would hide that.
pub const RESTARTS_MAX: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

pub struct SupervisorArgs {
    pub workers: Vec<(Role, WorkerArgs)>,
    /// `duet_worker_restarts_total` is counted here.
    pub metrics: Arc<Metrics>,
}

pub struct Supervised {
    role: Role,
    args: WorkerArgs,
    restarts: u32,
}

pub struct SupervisorState {
    registry: ActorRef<RegistryMsg>,
    workers: BTreeMap<ActorId, Supervised>,
    metrics: Arc<Metrics>,
}

/// The supervisor takes no messages of its own: it acts on supervision events.
pub enum SupervisorMsg {}

pub struct Supervisor;

async fn spawn_worker(
    role: Role,
    args: WorkerArgs,
    sup: ActorCell,
) -> Result<ActorCell, ActorProcessingErr> {
    let cell = match role {
        Role::Prefill => Actor::spawn_linked(None, PrefillWorker, args, sup)
            .await?
            .0
            .get_cell(),
        Role::Decode => Actor::spawn_linked(None, DecodeWorker, args, sup)
            .await?
            .0
            .get_cell(),
    };
    Ok(cell)
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    /// The registry is spawned by the caller (the gateway needs its handle first).
    type Arguments = (SupervisorArgs, ActorRef<RegistryMsg>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (args, registry): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut workers = BTreeMap::new();
        for (role, w) in args.workers {
            let cell = spawn_worker(role, w.clone(), myself.get_cell()).await?;
            workers.insert(
                cell.get_id(),
                Supervised {
                    role,
                    args: w,
                    restarts: 0,
                },
            );
        }
        Ok(SupervisorState {
            registry,
            workers,
            metrics: args.metrics,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {}
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(mut w) = st.workers.remove(&cell.get_id()) else {
            return Ok(());
        };
        let id: WorkerId = w.args.id;
        let _ = st.registry.cast(RegistryMsg::Gone { id });
        tracing::error!(worker = id.0, role = ?w.role, "worker failed: {why}");
        if w.restarts >= RESTARTS_MAX {
            tracing::error!(
                worker = id.0,
                "restarted {RESTARTS_MAX} times; leaving it down"
            );
            return Ok(());
        }
        // The failed incarnation's KV pool and batch are gone with its state; its sequences'
        // channels closed, and the gateway re-runs them on the live workers. The new
        // incarnation starts empty and registers itself.
        w.args.fault = None;
        w.restarts += 1;
        st.metrics.worker_restarts_total.inc();
        let new = spawn_worker(w.role, w.args.clone(), myself.get_cell()).await?;
        st.workers.insert(new.get_id(), w);
        Ok(())
    }
}

/// Handles to a running cluster.
pub struct Cluster {
    pub registry: ActorRef<RegistryMsg>,
    pub supervisor: ActorRef<SupervisorMsg>,
}

impl Cluster {
    pub async fn start(
        workers: Vec<(Role, WorkerArgs)>,
        registry: ActorRef<RegistryMsg>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ActorProcessingErr> {
        let (supervisor, _) = Actor::spawn(
            None,
            Supervisor,
            (SupervisorArgs { workers, metrics }, registry.clone()),
        )
        .await?;
        Ok(Self {
            registry,
            supervisor,
        })
    }

    pub async fn spawn_registry(
        board: SharedBoard,
    ) -> Result<ActorRef<RegistryMsg>, ActorProcessingErr> {
        Ok(Actor::spawn(None, Registry, board).await?.0)
    }
}

/// Shares the cluster's board between the HTTP layer and actors.
pub fn new_board() -> SharedBoard {
    Arc::default()
}
