//! One test suite for every KV transport (STYLE §3): each test is written once against the
//! `KvTransport` + `KvReceiver` pair a [`Harness`] sets up, and instantiated per implementation at
//! the bottom: in-process, QUIC over loopback, and — with the `ucx` feature — UCX forced onto
//! shared memory and onto tcp.

use std::sync::Arc;
use std::time::Duration;

use duet_transport::{
    EndpointId, InProcTransport, KvAttention, KvFrame, KvLayout, KvReceiver, KvTransport,
    TransportError,
};

/// Bytes of one DeepSeek-V3 page in the BF16 latent format: 64 tokens × 576 values × 2 B.
const V3_PAGE_BYTES: usize = 64 * 576 * 2;
/// DeepSeek-V3's layer count.
const V3_LAYERS: u32 = 61;
/// Upper bound on any single wait in this suite; a transport that needs longer is broken.
const WAIT_MAX: Duration = Duration::from_secs(30);

/// Sets up one transport with receivers bound for `eps`; `Self` keeps servers alive.
trait Harness: Sized + Send + 'static {
    type T: KvTransport;
    type R: KvReceiver + 'static;
    async fn setup(eps: &[EndpointId]) -> (Self, Arc<Self::T>, Vec<Self::R>);
}

fn frame(seq: u64, layer: u32, pages: usize, page_bytes: usize) -> KvFrame {
    let bytes = (0..pages * page_bytes)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(seq * 7 + layer as u64) as u8
        })
        .collect();
    KvFrame::new(
        seq,
        layer,
        LAYOUT,
        (0..pages as u32).map(|p| p * 3 + 1).collect(),
        bytes,
    )
}

/// Every transport carries the frame's KV layout to the receiver (here a GQA one).
const LAYOUT: KvLayout = KvLayout {
    attention: KvAttention::Gqa,
    elem_bytes: 2,
    width: 256,
};

async fn recv_ok<R: KvReceiver>(rx: &mut R) -> KvFrame {
    tokio::time::timeout(WAIT_MAX, rx.recv())
        .await
        .expect("frame within WAIT_MAX")
        .expect("endpoint open")
        .expect("frame verifies")
}

fn assert_same(got: &KvFrame, want: &KvFrame) {
    assert_eq!(
        (got.seq, got.layer, got.layout),
        (want.seq, want.layer, want.layout)
    );
    assert_eq!(got.pages, want.pages);
    assert_eq!(got.page_crc32, want.page_crc32);
    assert!(
        got.bytes == want.bytes,
        "bytes differ for seq {} layer {}",
        got.seq,
        got.layer
    );
}

async fn in_order<H: Harness>() {
    let (_h, t, mut rxs) = H::setup(&[1]).await;
    let frames: Vec<KvFrame> = (0..200)
        .map(|i| frame(5, i, (i % 4) as usize, 256))
        .collect();
    let sender = {
        let (t, frames) = (t.clone(), frames.clone());
        tokio::spawn(async move {
            for f in frames {
                t.send(1, f).await.unwrap();
            }
        })
    };
    for want in &frames {
        assert_same(&recv_ok(&mut rxs[0]).await, want);
    }
    sender.await.unwrap();
}

async fn two_endpoints_interleaved<H: Harness>() {
    let (_h, t, mut rxs) = H::setup(&[1, 2]).await;
    let sender = {
        let t = t.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                t.send(1, frame(1, i, 2, 512)).await.unwrap();
                t.send(2, frame(2, i, 3, 128)).await.unwrap();
            }
        })
    };
    let (a, b) = rxs.split_at_mut(1);
    let one = async {
        for i in 0..100 {
            assert_same(&recv_ok(&mut a[0]).await, &frame(1, i, 2, 512));
        }
    };
    let two = async {
        for i in 0..100 {
            assert_same(&recv_ok(&mut b[0]).await, &frame(2, i, 3, 128));
        }
    };
    tokio::join!(one, two);
    sender.await.unwrap();
}

/// A DeepSeek-V3-shaped handoff: 61 layer frames of 4 real-sized pages (≈ 18 MB).
async fn large_frames<H: Harness>() {
    let (_h, t, mut rxs) = H::setup(&[1]).await;
    let sender = {
        let t = t.clone();
        tokio::spawn(async move {
            for layer in 0..V3_LAYERS {
                t.send(1, frame(9, layer, 4, V3_PAGE_BYTES)).await.unwrap();
            }
        })
    };
    for layer in 0..V3_LAYERS {
        let got = recv_ok(&mut rxs[0]).await;
        assert_eq!(got.bytes.len(), 4 * V3_PAGE_BYTES);
        assert_same(&got, &frame(9, layer, 4, V3_PAGE_BYTES));
    }
    sender.await.unwrap();
}

/// A frame whose bytes changed after checksumming is reported against its sequence and page;
/// one whose bytes do not fill its pages is reported as truncated; frames around them arrive.
async fn corruption_is_detected_by_the_receiver<H: Harness>() {
    let (_h, t, mut rxs) = H::setup(&[1]).await;
    let mut bad = frame(3, 1, 3, 1024);
    bad.bytes[1024 + 17] ^= 0x40;
    let mut short = frame(3, 2, 3, 1024);
    short.bytes.truncate(3 * 1024 - 5);
    for f in [frame(3, 0, 3, 1024), bad, short, frame(3, 3, 3, 1024)] {
        t.send(1, f).await.unwrap();
    }
    assert_eq!(recv_ok(&mut rxs[0]).await.layer, 0);
    let got = tokio::time::timeout(WAIT_MAX, rxs[0].recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.unwrap_err(),
        TransportError::Corrupt {
            seq: 3,
            layer: 1,
            page: 4
        }
    );
    let got = tokio::time::timeout(WAIT_MAX, rxs[0].recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            got,
            Err(TransportError::Truncated {
                seq: 3,
                layer: 2,
                ..
            })
        ),
        "{got:?}"
    );
    assert_eq!(recv_ok(&mut rxs[0]).await.layer, 3);
}

async fn unknown_endpoint_is_an_error<H: Harness>() {
    let (_h, t, _rxs) = H::setup(&[1]).await;
    assert_eq!(
        t.send(99, frame(1, 0, 1, 64)).await,
        Err(TransportError::UnknownEndpoint(99))
    );
}

/// Sends after the receiver is gone fail with `Closed` — on a network transport once the news
/// crossed the network (frames already on their way are lost with the receiver), so the test
/// keeps sending until then, within WAIT_MAX.
async fn closed_endpoint_is_an_error<H: Harness>() {
    let (_h, t, mut rxs) = H::setup(&[1]).await;
    t.send(1, frame(1, 0, 1, 64)).await.unwrap();
    recv_ok(&mut rxs[0]).await;
    drop(rxs);
    let outcome = tokio::time::timeout(WAIT_MAX, async {
        let mut layer = 0u32;
        loop {
            layer = layer.wrapping_add(1);
            if let Err(e) = t.send(1, frame(1, layer, 1, 64)).await {
                return e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a send fails within WAIT_MAX of the receiver closing");
    assert_eq!(outcome, TransportError::Closed(1));
}

/// A receiver that does not read stops the sender (bounded buffering), and once it reads,
/// every frame arrives, in order.
async fn back_pressure_loses_nothing<H: Harness>() {
    const FRAMES: u32 = 500; // × 64 KiB = 32 MiB, more than any transport's buffers
    let (_h, t, mut rxs) = H::setup(&[1]).await;
    let mut sender = {
        let t = t.clone();
        tokio::spawn(async move {
            for i in 0..FRAMES {
                t.send(1, frame(4, i, 4, 16 << 10)).await.unwrap();
            }
        })
    };
    // The sender must be held back while nobody reads: it cannot finish.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut sender).await;
    assert!(
        early.is_err(),
        "sender finished 32 MiB into an unread endpoint"
    );
    for i in 0..FRAMES {
        let got = recv_ok(&mut rxs[0]).await;
        assert_eq!(got.layer, i);
        assert_eq!(got.bytes.len(), 4 * (16 << 10));
    }
    tokio::time::timeout(WAIT_MAX, sender)
        .await
        .unwrap()
        .unwrap();
}

/// Two tasks sending to one endpoint at once: every frame arrives, each task's in its order.
async fn concurrent_senders_keep_their_order<H: Harness>() {
    let (_h, t, mut rxs) = H::setup(&[1]).await;
    let tasks: Vec<_> = (0..2u64)
        .map(|seq| {
            let t = t.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    t.send(1, frame(seq, i, 2, 300)).await.unwrap();
                }
            })
        })
        .collect();
    let mut next = [0u32; 2];
    for _ in 0..200 {
        let got = recv_ok(&mut rxs[0]).await;
        let s = got.seq as usize;
        assert_eq!(got.layer, next[s]);
        assert_same(&got, &frame(got.seq, next[s], 2, 300));
        next[s] += 1;
    }
    for task in tasks {
        task.await.unwrap();
    }
}

macro_rules! suite {
    ($name:ident, $harness:ty) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_order() {
                super::in_order::<$harness>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_endpoints_interleaved() {
                super::two_endpoints_interleaved::<$harness>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_frames() {
                super::large_frames::<$harness>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn corruption_is_detected_by_the_receiver() {
                super::corruption_is_detected_by_the_receiver::<$harness>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unknown_endpoint_is_an_error() {
                super::unknown_endpoint_is_an_error::<$harness>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn closed_endpoint_is_an_error() {
                super::closed_endpoint_is_an_error::<$harness>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn back_pressure_loses_nothing() {
                super::back_pressure_loses_nothing::<$harness>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_senders_keep_their_order() {
                super::concurrent_senders_keep_their_order::<$harness>().await
            }
        }
    };
}

struct InProc;

impl Harness for InProc {
    type T = InProcTransport;
    type R = tokio::sync::mpsc::Receiver<KvFrame>;
    async fn setup(eps: &[EndpointId]) -> (Self, Arc<Self::T>, Vec<Self::R>) {
        let t = Arc::new(InProcTransport::new());
        let rxs = eps.iter().map(|&ep| t.bind(ep)).collect();
        (InProc, t, rxs)
    }
}

suite!(inproc, InProc);

struct Quic(#[allow(dead_code)] duet_transport::quic::QuicKvServer);

impl Harness for Quic {
    type T = duet_transport::quic::QuicTransport;
    type R = duet_transport::KvInbox;
    async fn setup(eps: &[EndpointId]) -> (Self, Arc<Self::T>, Vec<Self::R>) {
        use duet_transport::quic::{ClusterSecret, QuicKvServer, QuicTransport};
        let secret = ClusterSecret::new(b"suite-cluster-secret-0123456789").unwrap();
        let local = "127.0.0.1:0".parse().unwrap();
        let server = QuicKvServer::listen(local, secret.clone()).unwrap();
        let rxs = eps.iter().map(|&ep| server.bind(ep)).collect();
        let t = QuicTransport::new(local, secret).unwrap();
        for &ep in eps {
            t.add_peer(ep, server.local_addr().unwrap());
        }
        // Endpoint 99 routes to the server but is not bound there: the server says so.
        t.add_peer(99, server.local_addr().unwrap());
        (Quic(server), Arc::new(t), rxs)
    }
}

suite!(quic, Quic);

#[cfg(feature = "ucx")]
mod ucx_harness {
    use super::*;
    use duet_transport::ucx::{UcxConfig, UcxKvServer, UcxTransport};

    /// UCX with one transport selection; `Self` keeps the receiver's worker alive.
    pub struct Ucx<const TCP: bool>(#[allow(dead_code)] UcxKvServer);

    /// Shared-memory transports only (as `UCX_TLS=posix,sysv,cma,self`).
    pub const SHM_TLS: &str = "posix,sysv,cma,self";

    impl<const TCP: bool> Harness for Ucx<TCP> {
        type T = UcxTransport;
        type R = duet_transport::KvInbox;
        async fn setup(eps: &[EndpointId]) -> (Self, Arc<Self::T>, Vec<Self::R>) {
            let tls = if TCP { "tcp" } else { SHM_TLS };
            let cfg = UcxConfig {
                tls: Some(tls.into()),
                slot_bytes: 1 << 20,
                slots: 8,
            };
            let server = UcxKvServer::start(cfg).unwrap();
            let rxs = eps.iter().map(|&ep| server.bind(ep).unwrap()).collect();
            let t = UcxTransport::start(Some(tls.into())).unwrap();
            // The grant travels in process here; a cluster sends its bytes over QUIC.
            for &ep in eps {
                let grant = server.grant(ep).await.unwrap();
                t.connect(ep, grant).await.unwrap();
            }
            (Ucx(server), Arc::new(t), rxs)
        }
    }
}

#[cfg(feature = "ucx")]
suite!(ucx_shm, ucx_harness::Ucx<false>);
#[cfg(feature = "ucx")]
suite!(ucx_tcp, ucx_harness::Ucx<true>);
