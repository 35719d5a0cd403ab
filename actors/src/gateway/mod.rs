//! `Gateway`: the front door. The HTTP layer (gateway::http) validates, renders, tokenizes and
//! streams; this actor owns routing and the request table: it picks a prefill worker (prefix
//! affinity, then load) and a decode DP group (balancer), sends the reservation to the group, and
//! forwards aborts to whoever holds a sequence.

pub mod http;
pub mod stream;

use std::collections::BTreeMap;

use duet_core::PAGE_TOKENS;
use duet_core::route::{BalancePolicy, DecodeBalancer, PrefillRouter, PrefillRouterConfig};
use duet_core::types::{SeqId, WorkerId};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::decode::DecodeMsg;
use crate::prefill::PrefillMsg;
use crate::registry::{SharedBoard, WorkerRef};
use crate::seq::{SeqEvent, SeqJob};

pub enum GatewayMsg {
    /// Route a sequence (new, or re-run after a worker loss).
    Submit(Box<SeqJob>),
    /// The client went away or a stop string matched: stop the sequence wherever it is.
    Abort(SeqId),
    /// The sequence finished; forget its route.
    Done(SeqId),
    /// Periodic: retry sequences parked while no worker of a role was alive.
    Tick,
}

/// How often parked sequences are retried: a restarted worker registers within milliseconds.
const PARKED_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
/// How long a sequence may wait for a live worker before it fails: longer than any restart, short
/// enough that a cluster with no workers answers instead of hanging.
const PARKED_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

pub struct GatewayArgs {
    pub board: SharedBoard,
    pub router: PrefillRouterConfig,
    pub balance: BalancePolicy,
}

pub struct GatewayState {
    board: SharedBoard,
    router: PrefillRouter,
    balancer: DecodeBalancer,
    /// Where each live sequence was sent.
    routes: BTreeMap<SeqId, (ActorRef<PrefillMsg>, ActorRef<DecodeMsg>)>,
    /// Sequences that found no live prefill worker or decode group (a worker restarting), with
    /// when they were parked. Bounded by the gateway's admission limit.
    parked: std::collections::VecDeque<(std::time::Instant, Box<SeqJob>)>,
    epoch: std::time::Instant,
}

pub struct Gateway;

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(PARKED_RETRY_INTERVAL, || GatewayMsg::Tick);
        Ok(GatewayState {
            parked: std::collections::VecDeque::new(),
            board: args.board,
            router: PrefillRouter::new(args.router),
            balancer: DecodeBalancer::new(args.balance),
            routes: BTreeMap::new(),
            epoch: std::time::Instant::now(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Submit(job) => st.submit(job),
            GatewayMsg::Abort(id) => {
                if let Some((p, d)) = st.routes.remove(&id) {
                    let _ = p.cast(PrefillMsg::Abort(id));
                    let _ = d.cast(DecodeMsg::Abort(id));
                }
            }
            GatewayMsg::Done(id) => {
                st.routes.remove(&id);
            }
            GatewayMsg::Tick => {
                for (since, job) in std::mem::take(&mut st.parked) {
                    if job.events.is_closed() {
                        continue; // the client went away while it waited
                    }
                    if since.elapsed() > PARKED_WAIT_MAX {
                        let _ = job.events.send(SeqEvent::Failed(
                            "no live prefill worker and decode group to serve the request".into(),
                        ));
                        continue;
                    }
                    st.submit_at(job, since);
                }
            }
        }
        Ok(())
    }
}

impl GatewayState {
    fn submit(&mut self, job: Box<SeqJob>) {
        self.submit_at(job, std::time::Instant::now());
    }

    fn submit_at(&mut self, mut job: Box<SeqJob>, since: std::time::Instant) {
        let mut board = self.board.read().unwrap_or_else(|e| e.into_inner()).clone();
        let now = self.epoch.elapsed().as_micros() as u64;
        let pages = job.tokens.len().div_ceil(PAGE_TOKENS);
        // A worker can die between its last report and this cast; route around it at once
        // instead of spending one of the sequence's re-runs. Bounded by the number of workers.
        loop {
            let Some((pid, p, gid, d)) = self.pick(&board, &job.tokens, pages, now) else {
                // No live worker of a role right now (one restarting): wait for it.
                self.parked.push_back((since, job));
                return;
            };
            if p.get_status() != ractor::ActorStatus::Running {
                board.prefill.remove(&pid);
                continue;
            }
            let id = job.id;
            self.routes.insert(id, (p.clone(), d.clone()));
            match d.cast(DecodeMsg::Reserve { job, prefill: p }) {
                Ok(()) => return,
                Err(ractor::MessagingErr::SendErr(DecodeMsg::Reserve { job: back, .. })) => {
                    self.routes.remove(&id);
                    board.decode.remove(&gid);
                    job = back;
                }
                Err(_) => {
                    // The message did not come back; its channel closes and the client's run
                    // re-submits it.
                    self.routes.remove(&id);
                    return;
                }
            }
        }
    }

    /// A prefill worker (prefix affinity, then load) and a decode group (balancer; else the least
    /// loaded live group, whose reservation queue holds the sequence until pages free up).
    fn pick(
        &mut self,
        board: &crate::registry::Board,
        tokens: &[u32],
        pages: usize,
        now: u64,
    ) -> Option<(
        WorkerId,
        ActorRef<PrefillMsg>,
        WorkerId,
        ActorRef<DecodeMsg>,
    )> {
        let groups = board.group_loads();
        let gid = self.balancer.route(&groups, pages).or_else(|| {
            groups
                .iter()
                .min_by_key(|g| (g.outstanding_tokens, g.group))
                .map(|g| g.group)
        })?;
        let (pid, _) = self.router.route(tokens, &board.prefill_loads(), now)?;
        match (
            board.prefill.get(&pid).map(|e| &e.worker),
            board.decode.get(&gid).map(|e| &e.worker),
        ) {
            (Some(WorkerRef::Prefill(p)), Some(WorkerRef::Decode(d))) => {
                Some((pid, p.clone(), gid, d.clone()))
            }
            _ => None,
        }
    }
}
