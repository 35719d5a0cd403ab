//! One suite for every all-to-all implementation: what an EP group's MoE layers rely on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use duet_core::ep::EpError;
use duet_transport::a2a::{A2aError, AllToAll, InProcA2a, QuicA2a, RowBlock};
use duet_transport::quic::ClusterSecret;

const SHORT_WAIT: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug)]
enum Kind {
    InProc,
    Quic,
}

fn secret(s: &str) -> ClusterSecret {
    ClusterSecret::new(s.as_bytes()).unwrap()
}

async fn group(kind: Kind, n: usize, wait: Duration) -> Vec<Arc<dyn AllToAll>> {
    match kind {
        Kind::InProc => {
            let g = InProcA2a::group(n).unwrap();
            for r in &g {
                r.set_wait(wait).await;
            }
            g.into_iter()
                .map(|r| Arc::new(r) as Arc<dyn AllToAll>)
                .collect()
        }
        Kind::Quic => {
            let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let ranks: Vec<QuicA2a> = (0..n)
                .map(|r| QuicA2a::bind(r, n, local, secret("an all-to-all test secret")).unwrap())
                .collect();
            let addrs: Vec<SocketAddr> = ranks.iter().map(|r| r.local_addr().unwrap()).collect();
            for r in &ranks {
                r.connect(&addrs).await.unwrap();
                r.set_wait(wait).await;
            }
            ranks
                .into_iter()
                .map(|r| Arc::new(r) as Arc<dyn AllToAll>)
                .collect()
        }
    }
}

/// What rank `from` sends rank `to` in `round`: sizes vary, some blocks are empty.
fn block(from: usize, to: usize, round: u64) -> RowBlock {
    let rows = (from * 3 + to * 5 + round as usize) % 4;
    RowBlock {
        meta: (0..rows as u32).map(|i| i * 100 + from as u32).collect(),
        data: (0..rows * 1000)
            .map(|i| (i as u64 * 31 + from as u64 * 7 + to as u64 * 13 + round) as u8)
            .collect(),
    }
}

async fn rounds_deliver_every_block_in_sender_order(kind: Kind) {
    let n = 3;
    let g = group(kind, n, Duration::from_secs(10)).await;
    let tasks: Vec<_> = g
        .iter()
        .cloned()
        .map(|a| {
            tokio::spawn(async move {
                for round in 0..4u64 {
                    let me = a.rank();
                    let out = (0..n).map(|to| block(me, to, round)).collect();
                    let got = a.exchange(round, out).await.unwrap();
                    assert_eq!(got.len(), n);
                    for (from, b) in got.iter().enumerate() {
                        assert_eq!(*b, block(from, me, round), "{kind:?} round {round}");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_rounds_deliver_every_block_in_sender_order() {
    rounds_deliver_every_block_in_sender_order(Kind::InProc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_rounds_deliver_every_block_in_sender_order() {
    rounds_deliver_every_block_in_sender_order(Kind::Quic).await;
}

/// A rank that stops taking part fails the others' round, naming it, within the wait.
async fn a_silent_rank_fails_the_round_naming_it(kind: Kind) {
    let g = group(kind, 3, SHORT_WAIT).await;
    let live: Vec<_> = g[..2]
        .iter()
        .cloned()
        .map(|a| {
            tokio::spawn(async move {
                let out = vec![RowBlock::default(); 3];
                a.exchange(0, out).await
            })
        })
        .collect();
    for t in live {
        match t.await.unwrap() {
            Err(A2aError::Round(EpError::Timeout { round, missing, .. })) => {
                assert_eq!((round, missing), (0, vec![2]), "{kind:?}");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_a_silent_rank_fails_the_round_naming_it() {
    a_silent_rank_fails_the_round_naming_it(Kind::InProc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_a_silent_rank_fails_the_round_naming_it() {
    a_silent_rank_fails_the_round_naming_it(Kind::Quic).await;
}

/// Bad calls are errors, not panics: a block count that is not the group size, a skipped round.
async fn bad_calls_are_errors(kind: Kind) {
    let g = group(kind, 2, SHORT_WAIT).await;
    assert!(matches!(
        g[0].exchange(0, vec![RowBlock::default()]).await,
        Err(A2aError::Blocks { got: 1, ranks: 2 })
    ));
    assert!(matches!(
        g[0].exchange(5, vec![RowBlock::default(); 2]).await,
        Err(A2aError::Round(EpError::WrongRound {
            got: 5,
            want: 0,
            ..
        }))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_bad_calls_are_errors() {
    bad_calls_are_errors(Kind::InProc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_bad_calls_are_errors() {
    bad_calls_are_errors(Kind::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_without_the_cluster_secret_cannot_join() {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let good = QuicA2a::bind(0, 2, local, secret("the group's own secret, 32 bytes")).unwrap();
    let bad = QuicA2a::bind(1, 2, local, secret("another secret entirely, 32 byte")).unwrap();
    let addrs = [good.local_addr().unwrap(), bad.local_addr().unwrap()];
    assert!(bad.connect(&addrs).await.is_err());
}
