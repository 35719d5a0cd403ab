//! `Gateway`: the front door. The HTTP layer (gateway::http) validates, renders, tokenizes and
//! streams; this actor is the IO driver of `duet_core::pd::GatewayCore`, which decides where and
//! when each sequence runs (the same core the simulator drives): it feeds the core the registry's
//! membership and load, carries out its placements (a reservation to the decode group, naming the
//! prefill worker), and forwards aborts to whoever holds a sequence.

pub mod auth;
pub mod http;
pub mod stream;

use std::collections::BTreeMap;

use duet_core::pd::{GatewayAction, GatewayConfig, GatewayCore, PdRequest, RankId};
use duet_core::route::{BalancePolicy, PrefillRouterConfig, page_chain_hashes};
use duet_core::types::{SeqId, WorkerId};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::clock::Clock;
use crate::protocol::{
    DecodeRef, GatewayToDecode, GatewayToPrefill, PrefillPeer, PrefillRef, WorkerLoad, WorkerRef,
};
use crate::registry::{Board, SharedBoard, WorkerEntry};
use crate::seq::{SeqEvent, SeqFailure, SeqJob};
use crate::trace::child_span;

pub enum GatewayMsg {
    /// Route a sequence (new, or re-run after a worker loss).
    Submit(Box<SeqJob>),
    /// The client went away or a stop string matched: stop the sequence wherever it is.
    Abort(SeqId),
    /// The sequence finished; forget its route.
    Done(SeqId),
    /// Periodic: place what fits now, expire what waits for a role with no live worker.
    Tick,
}

/// How often the queue is retried without another event: a restarted worker registers, and
/// load reports arrive, within milliseconds.
const PUMP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
/// How long a sequence may wait while a role has no live worker before it fails: longer than any
/// restart, short enough that a cluster with no workers answers instead of hanging.
const NO_WORKER_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

pub struct GatewayArgs {
    pub board: SharedBoard,
    pub router: PrefillRouterConfig,
    pub balance: BalancePolicy,
    /// A prefill worker takes more prompts while its queued prompt tokens are below this.
    pub prefill_queued_tokens_max: u64,
    /// New tokens a sequence commits on its decode group (`decode.reserve_new_tokens`).
    pub commit_new_tokens_max: usize,
    pub clock: Clock,
}

pub struct GatewayState {
    board: SharedBoard,
    core: GatewayCore,
    /// Sequences waiting in the core's queue.
    waiting: BTreeMap<SeqId, Box<SeqJob>>,
    /// The `route` span of each traced sequence in `waiting`, from arrival to placement (so at most
    /// as many as `waiting`).
    queued_spans: BTreeMap<SeqId, tracing::Span>,
    /// Where each placed sequence was sent.
    routes: BTreeMap<SeqId, (PrefillRef, DecodeRef)>,
    /// The last load applied per worker: a report is applied once, so the core's own count of
    /// what it placed since is not overwritten by a stale copy.
    applied: BTreeMap<(bool, WorkerId), WorkerLoad>,
    clock: Clock,
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
        myself.send_interval(PUMP_INTERVAL, || GatewayMsg::Tick);
        Ok(GatewayState {
            core: GatewayCore::new(GatewayConfig {
                prefill: true,
                decode: true,
                prefill_queued_tokens_max: args.prefill_queued_tokens_max,
                // A worker process is one group of one rank.
                rank_router: args.router,
                group_router: args.router,
                balance: args.balance,
                commit_new_tokens_max: args.commit_new_tokens_max,
                no_worker_wait_max_us: NO_WORKER_WAIT_MAX.as_micros() as u64,
            }),
            board: args.board,
            waiting: BTreeMap::new(),
            queued_spans: BTreeMap::new(),
            routes: BTreeMap::new(),
            applied: BTreeMap::new(),
            clock: args.clock,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.now();
        match msg {
            GatewayMsg::Submit(job) => {
                let req = PdRequest {
                    seq: job.id,
                    prompt_len: job.tokens.len(),
                    max_new_tokens: job.params.max_new_tokens,
                    page_hashes: page_chain_hashes(&job.tokens),
                };
                let span = child_span(job.trace, || {
                    crate::trace_span!(
                        "route",
                        seq = job.id,
                        queue_depth = st.waiting.len(),
                        prefill_worker = tracing::field::Empty,
                        decode_group = tracing::field::Empty,
                        route_reason = tracing::field::Empty,
                        prefix_hit_tokens = tracing::field::Empty,
                        outcome = tracing::field::Empty,
                    )
                });
                if !span.is_disabled() {
                    st.queued_spans.insert(job.id, span);
                }
                st.waiting.insert(job.id, job);
                st.core.handle_arrival(now, req);
            }
            GatewayMsg::Abort(id) => {
                if let Some((p, d)) = st.routes.remove(&id) {
                    let _ = p.send_message(GatewayToPrefill::Abort(id));
                    let _ = d.send_message(GatewayToDecode::Abort(id));
                }
                st.waiting.remove(&id);
                st.queued_spans.remove(&id);
                st.core.handle_done(id);
            }
            GatewayMsg::Done(id) => {
                st.routes.remove(&id);
                st.core.handle_done(id);
            }
            GatewayMsg::Tick => {
                // Clients that went away while their sequence waited.
                let gone: Vec<SeqId> = st
                    .waiting
                    .iter()
                    .filter(|(_, j)| j.events.is_closed())
                    .map(|(&id, _)| id)
                    .collect();
                for id in gone {
                    st.waiting.remove(&id);
                    st.queued_spans.remove(&id);
                    st.core.handle_done(id);
                }
                st.core.handle_tick(now);
            }
        }
        st.pump();
        Ok(())
    }
}

impl GatewayState {
    fn now(&self) -> u64 {
        self.clock.now_us()
    }

    /// Tells the core which workers are alive and how loaded (new reports only). A worker whose
    /// actor stopped is gone even while the registry still lists it.
    fn sync(&mut self, board: &Board) {
        let live = |e: &WorkerEntry| e.worker.is_running();
        let prefill: Vec<u32> = self.core.prefill_groups().collect();
        for g in prefill {
            if !board.prefill.get(&WorkerId(g)).is_some_and(live) {
                self.core.remove_prefill_group(g);
                self.applied.remove(&(true, WorkerId(g)));
            }
        }
        let decode: Vec<u32> = self.core.decode_groups().collect();
        for g in decode {
            if !board.decode.get(&WorkerId(g)).is_some_and(live) {
                self.core.remove_decode_group(g);
                self.applied.remove(&(false, WorkerId(g)));
            }
        }
        for (id, e) in board.prefill.iter().filter(|(_, e)| live(e)) {
            if self.applied.get(&(true, *id)) == Some(&e.load) {
                continue;
            }
            self.applied.insert((true, *id), e.load.clone());
            self.core.set_prefill_group(id.0, 1);
            let at = RankId {
                group: id.0,
                rank: 0,
            };
            self.core.update_prefill(
                at,
                e.load.outstanding_tokens,
                e.load.running + e.load.waiting,
            );
        }
        for (id, e) in board.decode.iter().filter(|(_, e)| live(e)) {
            if self.applied.get(&(false, *id)) == Some(&e.load) {
                continue;
            }
            self.applied.insert((false, *id), e.load.clone());
            self.core
                .set_decode_group(id.0, &[(e.load.pages_total, e.load.max_running)]);
        }
    }

    /// Forgets a worker found gone while delivering: the next sync adds it back only if its actor
    /// runs, so the retry loop ends.
    fn forget(&mut self, role_prefill: bool, group: u32) {
        self.applied.remove(&(role_prefill, WorkerId(group)));
        if role_prefill {
            self.core.remove_prefill_group(group);
        } else {
            self.core.remove_decode_group(group);
        }
    }

    /// Places what the core lets through and carries out its decisions.
    fn pump(&mut self) {
        let board = self.board.read().unwrap_or_else(|e| e.into_inner()).clone();
        // A worker can die between its last report and a cast: such a placement is undone, the
        // worker forgotten, and the queue pumped again. Bounded by the number of workers.
        loop {
            self.sync(&board);
            let now = self.now();
            self.core.pump(now);
            let mut undelivered = false;
            while let Some(action) = self.core.poll_action() {
                match action {
                    GatewayAction::Place {
                        req,
                        prefill,
                        decode,
                        prefix_tokens,
                    } => {
                        let (Some(p), Some(d)) = (prefill, decode) else {
                            unreachable!("the server's gateway places both roles");
                        };
                        let seq = req.seq;
                        let delivered = self.deliver(&board, req, p, d);
                        self.trace_route(seq, p, d, prefix_tokens, delivered);
                        undelivered |= !delivered;
                    }
                    GatewayAction::Refuse { req, pool_pages } => {
                        self.fail(
                            req.seq,
                            SeqFailure::TooLong {
                                tokens: req.prompt_len + req.max_new_tokens,
                                what: "any decode group (prompt and max_tokens)".into(),
                                pages: pool_pages,
                            },
                        );
                    }
                    GatewayAction::Expire { req } => self.fail(req.seq, SeqFailure::NoLiveWorkers),
                }
            }
            if !undelivered {
                return;
            }
        }
    }

    /// Ends a traced sequence's route span with the routing decision and its reason: the
    /// prefill worker's cache held part of the prompt, or load alone chose. A placement undone
    /// (a worker found gone) stays queued and keeps its span.
    fn trace_route(&mut self, seq: SeqId, p: RankId, d: RankId, prefix_tokens: usize, ok: bool) {
        let Some(span) = self.queued_spans.get(&seq) else {
            return;
        };
        if !ok && self.waiting.contains_key(&seq) {
            return;
        }
        span.record("prefill_worker", p.group);
        span.record("decode_group", d.group);
        span.record("prefix_hit_tokens", prefix_tokens);
        span.record(
            "route_reason",
            if prefix_tokens > 0 {
                "prefix_hit"
            } else {
                "load"
            },
        );
        span.record("outcome", "placed");
        self.queued_spans.remove(&seq);
    }

    fn fail(&mut self, seq: SeqId, why: SeqFailure) {
        if let Some(span) = self.queued_spans.remove(&seq) {
            span.record("outcome", why.to_string().as_str());
        }
        if let Some(job) = self.waiting.remove(&seq) {
            let _ = job.events.send(SeqEvent::Failed(why));
        }
    }

    /// Sends a placed sequence's reservation to its decode group; false (and the placement undone)
    /// when a chosen worker is gone.
    fn deliver(&mut self, board: &Board, req: PdRequest, p: RankId, d: RankId) -> bool {
        let id = req.seq;
        let Some(job) = self.waiting.remove(&id) else {
            // Aborted while it waited.
            self.core.handle_done(id);
            return true;
        };
        if job.events.is_closed() {
            self.core.handle_done(id);
            return true; // the client went away while it waited
        }
        let prefill: Option<(PrefillRef, PrefillPeer)> =
            match board.prefill.get(&WorkerId(p.group)).map(|e| &e.worker) {
                Some(w @ WorkerRef::Prefill { abort, peer }) if w.is_running() => {
                    Some((abort.clone(), peer.clone()))
                }
                _ => None,
            };
        let decode = match board.decode.get(&WorkerId(d.group)).map(|e| &e.worker) {
            Some(WorkerRef::Decode { gateway, .. }) => Some(gateway.clone()),
            _ => None,
        };
        let (Some((prefill, peer)), Some(decode)) = (prefill.clone(), decode) else {
            if prefill.is_none() {
                self.forget(true, p.group);
            } else {
                self.forget(false, d.group);
            }
            self.waiting.insert(id, job);
            self.core.handle_undelivered(self.now(), req);
            return false;
        };
        self.routes.insert(id, (prefill, decode.clone()));
        match decode.send_message(GatewayToDecode::Reserve { job, prefill: peer }) {
            Ok(()) => true,
            Err(ractor::MessagingErr::SendErr(GatewayToDecode::Reserve { job: back, .. })) => {
                self.routes.remove(&id);
                self.forget(false, d.group);
                self.waiting.insert(id, back);
                self.core.handle_undelivered(self.now(), req);
                false
            }
            Err(_) => {
                // The message did not come back; its channel closes and the client's run
                // re-submits it.
                self.routes.remove(&id);
                self.core.handle_done(id);
                true
            }
        }
    }
}
