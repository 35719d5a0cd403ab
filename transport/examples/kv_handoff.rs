//! A DeepSeek-V3-sized KV handoff over every transport, next to a plain memcpy of the same bytes.
//!
//! One request of 4,096 tokens: 61 layers × 64 pages × 64 tokens × 576 values × 2 B (BF16
//! latent) = 288 MB, sent as 61 layer frames of 64 pages (4.7 MB each), one `send().await` after
//! the other as the prefill worker does. Time runs from the first send until the receiver holds
//! the 61st verified frame; frames are built (and checksummed) before the clock starts. Also: the
//! round trip of a 64-byte message over QUIC (to an echo endpoint and back), standing in for a
//! control message on the authenticated connection.
//!
//! Run (release): `cargo run --release -p duet-transport --example kv_handoff [--features ucx]`
//! `REPS=n` sets the repetitions (default 5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use duet_transport::quic::{ClusterSecret, QuicKvServer, QuicTransport};
use duet_transport::{
    EndpointId, InProcTransport, KvAttention, KvFrame, KvLayout, KvReceiver, KvTransport,
};

const LAYERS: u32 = 61;
const PAGES_PER_FRAME: usize = 64;
const PAGE_BYTES: usize = 64 * 576 * 2;
const FRAME_BYTES: usize = PAGES_PER_FRAME * PAGE_BYTES;
const TOTAL_BYTES: usize = LAYERS as usize * FRAME_BYTES;
const RTT_ITERATIONS: usize = 2000;
/// DeepSeek-V3's latent in BF16.
const LAYOUT: KvLayout = KvLayout {
    attention: KvAttention::Mla,
    elem_bytes: 2,
    width: 576,
};

fn frames(seed: u8) -> Vec<KvFrame> {
    (0..LAYERS)
        .map(|layer| {
            let bytes: Vec<u8> = (0..FRAME_BYTES)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed ^ layer as u8))
                .collect();
            KvFrame::new(
                1,
                layer,
                LAYOUT,
                (0..PAGES_PER_FRAME as u32).collect(),
                bytes,
            )
        })
        .collect()
}

async fn handoff<T: KvTransport, R: KvReceiver + 'static>(
    t: &Arc<T>,
    rx: &mut R,
    ep: EndpointId,
    batch: Vec<KvFrame>,
) -> Duration {
    let start = Instant::now();
    let sender = {
        let t = t.clone();
        tokio::spawn(async move {
            for f in batch {
                t.send(ep, f).await.expect("send");
            }
        })
    };
    for layer in 0..LAYERS {
        let f = rx.recv().await.expect("open").expect("verified");
        assert_eq!(f.layer, layer);
        assert_eq!(f.bytes.len(), FRAME_BYTES);
    }
    let elapsed = start.elapsed();
    sender.await.expect("sender");
    elapsed
}

fn report(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let best = times[0];
    let median = times[times.len() / 2];
    let gbps = |d: Duration| TOTAL_BYTES as f64 / d.as_secs_f64() / 1e9;
    println!(
        "{name:<28} best {:>7.1} ms {:>6.2} GB/s   median {:>7.1} ms {:>6.2} GB/s",
        best.as_secs_f64() * 1e3,
        gbps(best),
        median.as_secs_f64() * 1e3,
        gbps(median)
    );
}

async fn bench<T: KvTransport, R: KvReceiver + 'static>(
    name: &str,
    reps: usize,
    t: Arc<T>,
    mut rx: R,
    ep: EndpointId,
    template: &[KvFrame],
) {
    // One unmeasured run warms connections, staging and allocator.
    handoff(&t, &mut rx, ep, template.to_vec()).await;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let batch = template.to_vec();
        times.push(handoff(&t, &mut rx, ep, batch).await);
    }
    report(name, times);
}

fn memcpy_bench(reps: usize, template: &[KvFrame]) {
    let mut dst = vec![0u8; TOTAL_BYTES];
    let mut times = Vec::with_capacity(reps);
    for _ in 0..=reps {
        let start = Instant::now();
        for (i, f) in template.iter().enumerate() {
            dst[i * FRAME_BYTES..(i + 1) * FRAME_BYTES].copy_from_slice(&f.bytes);
        }
        std::hint::black_box(&mut dst);
        times.push(start.elapsed());
    }
    times.remove(0);
    report("memcpy (same bytes)", times);
}

async fn quic_rtt(secret: &ClusterSecret) {
    let local = "127.0.0.1:0".parse().unwrap();
    let a_server = QuicKvServer::listen(local, secret.clone()).unwrap();
    let b_server = QuicKvServer::listen(local, secret.clone()).unwrap();
    let mut a_rx = a_server.bind(1);
    let mut b_rx = b_server.bind(2);
    let a = QuicTransport::new(local, secret.clone()).unwrap();
    let b = Arc::new(QuicTransport::new(local, secret.clone()).unwrap());
    a.add_peer(2, b_server.local_addr().unwrap());
    b.add_peer(1, a_server.local_addr().unwrap());
    let echo = {
        let b = b.clone();
        tokio::spawn(async move {
            while let Some(Ok(f)) = b_rx.recv().await {
                if b.send(1, f).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut rtts = Vec::with_capacity(RTT_ITERATIONS);
    for i in 0..RTT_ITERATIONS + 100 {
        let start = Instant::now();
        a.send(
            2,
            KvFrame::new(i as u64, 0, LAYOUT, vec![0], vec![0x5a; 64]),
        )
        .await
        .unwrap();
        a_rx.recv().await.unwrap().unwrap();
        if i >= 100 {
            rtts.push(start.elapsed());
        }
    }
    rtts.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "QUIC 64-byte round trip      p50 {:.0} µs   p99 {:.0} µs   ({RTT_ITERATIONS} round trips)",
        us(rtts[rtts.len() / 2]),
        us(rtts[rtts.len() * 99 / 100])
    );
    drop(a);
    echo.abort();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "KV handoff: {LAYERS} layer frames × {PAGES_PER_FRAME} pages × {PAGE_BYTES} B = {:.1} MB, {reps} repetitions (+1 warm-up)",
        TOTAL_BYTES as f64 / 1e6
    );
    let template = frames(7);
    memcpy_bench(reps, &template);

    let t = Arc::new(InProcTransport::new());
    let rx = t.bind(1);
    bench("in-process", reps, t, rx, 1, &template).await;

    let secret = ClusterSecret::new(b"benchmark-cluster-secret-000000").unwrap();
    let local = "127.0.0.1:0".parse().unwrap();
    let server = QuicKvServer::listen(local, secret.clone()).unwrap();
    let rx = server.bind(1);
    let t = Arc::new(QuicTransport::new(local, secret.clone()).unwrap());
    t.add_peer(1, server.local_addr().unwrap());
    bench("QUIC (loopback)", reps, t, rx, 1, &template).await;
    drop(server);

    #[cfg(feature = "ucx")]
    for (name, tls) in [
        ("UCX shm (sysv,posix,cma)", "sysv,posix,cma,self"),
        ("UCX shm (sysv only)", "sysv,self"),
        ("UCX tcp (loopback)", "tcp"),
    ] {
        use duet_transport::ucx::{UcxConfig, UcxKvServer, UcxTransport};
        let cfg = UcxConfig {
            tls: Some(tls.into()),
            ..UcxConfig::default()
        };
        let server = UcxKvServer::start(cfg).unwrap();
        let rx = server.bind(1).unwrap();
        let t = Arc::new(UcxTransport::start(Some(tls.into())).unwrap());
        t.connect(1, server.grant(1).await.unwrap()).await.unwrap();
        bench(name, reps, t, rx, 1, &template).await;
    }
    #[cfg(not(feature = "ucx"))]
    println!("UCX: not built (add --features ucx)");

    quic_rtt(&secret).await;
}
