//! The decode actor's named bound on reservations, through its mailbox as the gateway uses it.

use std::sync::Arc;
use std::time::Duration;

use duet_core::config::ClusterConfig;
use duet_core::types::WorkerId;
use duet_model::sampling::SamplingParams;
use duet_transport::InProcTransport;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use super::*;
use crate::clock::Clock;
use crate::registry::Registry;
use crate::seq::{EventRx, SeqParams};
use crate::worker::KvLink;

/// A prefill worker that takes jobs and never finishes them: each reservation keeps its pages.
struct Stalled;

impl Actor for Stalled {
    type Msg = Box<PrefillJob>;
    type State = Vec<Box<PrefillJob>>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Vec::new())
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        job: Self::Msg,
        held: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        held.push(job);
        Ok(())
    }
}

fn job(id: u64) -> (Box<SeqJob>, EventRx) {
    let (events, rx) = mpsc::unbounded_channel();
    let params = SeqParams {
        sampling: SamplingParams::greedy(),
        max_new_tokens: 4,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        repetition_penalty: 1.0,
        logit_bias: vec![],
        stop_token_ids: vec![],
        logprobs: None,
        thinking: None,
        grammar: None,
    };
    let job = SeqJob {
        trace: None,
        id,
        tokens: Arc::new(vec![1, 2, 3]),
        prompt_len: 3,
        params,
        events,
    };
    (Box::new(job), rx)
}

#[tokio::test]
async fn reservations_beyond_the_queue_bound_go_back_to_the_gateway_at_once() {
    let (registry, _) = Actor::spawn(None, Registry, crate::registry::SharedBoard::default())
        .await
        .unwrap();
    let args = WorkerArgs {
        id: WorkerId(1),
        engine: crate::engine::Engine::Echo { vocab_size: 16 },
        // One page: the first reservation takes it and its prefill never ends.
        kv_pages: 1,
        prefix_cache: false,
        sched: ClusterConfig::default().decode_sched(),
        registry,
        kv: KvLink::InProc(Arc::new(InProcTransport::new())),
        clock: Clock::start(),
        stats: Default::default(),
        ep: None,
        fault: None,
        kv_corrupt: None,
        grammars: None,
    };
    let (decode, _) = Actor::spawn(None, DecodeWorker, args).await.unwrap();
    let (prefill, _) = Actor::spawn(None, Stalled, ()).await.unwrap();
    let gateway: crate::protocol::DecodeRef = decode.get_derived();
    let over = 5;
    let mut events = Vec::new();
    for id in 0..(1 + RESERVE_QUEUE_MAX + over) as u64 {
        let (job, rx) = job(id);
        events.push(rx);
        let peer = PrefillPeer {
            id: WorkerId(0),
            jobs: Some(prefill.get_derived()),
        };
        gateway
            .send_message(GatewayToDecode::Reserve { job, prefill: peer })
            .unwrap_or_else(|_| panic!("decode group is running"));
    }
    // The newest arrivals beyond the bound are refused with a retryable reason (the gateway
    // re-routes them); the first holds the page and the next RESERVE_QUEUE_MAX wait in order.
    let mut refused = Vec::new();
    for (id, rx) in events.iter_mut().enumerate().rev().take(over) {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("refusal arrives");
        match ev {
            Some(SeqEvent::Retry(r)) => {
                assert!(r.retryable(), "{r}");
                refused.push(id);
            }
            other => panic!("sequence {id}: {other:?}"),
        }
    }
    assert_eq!(refused.len(), over);
    for (id, rx) in events.iter_mut().enumerate().take(1 + RESERVE_QUEUE_MAX) {
        assert!(rx.try_recv().is_err(), "sequence {id} still waits");
    }
}
