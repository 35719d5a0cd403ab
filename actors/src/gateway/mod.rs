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
}

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
    epoch: std::time::Instant,
}

pub struct Gateway;

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(GatewayState {
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
        }
        Ok(())
    }
}

impl GatewayState {
    fn submit(&mut self, job: Box<SeqJob>) {
        let board = self.board.read().unwrap_or_else(|e| e.into_inner()).clone();
        let now = self.epoch.elapsed().as_micros() as u64;
        let pages = job.tokens.len().div_ceil(PAGE_TOKENS);
        let groups = board.group_loads();
        // A group with room now; else the least loaded live group, whose reservation queue holds
        // the sequence until pages free up.
        let group = self.balancer.route(&groups, pages).or_else(|| {
            groups
                .iter()
                .min_by_key(|g| (g.outstanding_tokens, g.group))
                .map(|g| g.group)
        });
        let prefill = self
            .router
            .route(&job.tokens, &board.prefill_loads(), now)
            .map(|(w, _)| w);
        let pick = |map: &BTreeMap<WorkerId, crate::registry::WorkerEntry>, id| {
            map.get(&id).map(|e| e.worker.clone())
        };
        let (Some(WorkerRef::Prefill(p)), Some(WorkerRef::Decode(d))) = (
            prefill.and_then(|id| pick(&board.prefill, id)),
            group.and_then(|id| pick(&board.decode, id)),
        ) else {
            let _ = job.events.send(SeqEvent::Failed(
                "no live prefill worker and decode group to serve the request".into(),
            ));
            return;
        };
        let id = job.id;
        self.routes.insert(id, (p.clone(), d.clone()));
        if let Err(e) = d.cast(DecodeMsg::Reserve { job, prefill: p }) {
            // The group died since its last report: hand the sequence back for a re-run.
            if let ractor::MessagingErr::SendErr(DecodeMsg::Reserve { job, .. }) = e {
                let _ = job
                    .events
                    .send(SeqEvent::Retry("decode group went away".into()));
            }
            self.routes.remove(&id);
        }
    }
}
