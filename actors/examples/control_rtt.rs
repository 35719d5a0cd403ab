//! Control-plane round trip: the gateway sends a `Reserve` (a job with its prompt) to a worker
//! process over the authenticated QUIC control connection and the worker answers with a token
//! `Event`, both rkyv-encoded and validated — next to the floor, the same length-prefixed
//! ping-pong over a plain TCP socket (TCP_NODELAY) on the same machine in the same run.
//!
//!   cargo run --release -p duet-actors --example control_rtt [-- ROUNDS PROMPT_TOKENS]

use std::time::Instant;

use duet_actors::remote::wire::{
    self, PROTOCOL_VERSION, ToGateway, ToWorker, WireEvent, WireJob, WireParams,
};
use duet_transport::control::{self, ControlListener};
use duet_transport::quic::ClusterSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn job(tokens: usize) -> WireJob {
    WireJob {
        id: 1,
        tokens: (0..tokens as u32).collect(),
        prompt_len: tokens as u64,
        params: WireParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            max_new_tokens: 256,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            stop_token_ids: vec![1],
            logprobs: None,
            thinking: None,
            grammar: None,
        },
        trace: None,
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let prompt: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let secret = ClusterSecret::new(b"benchmark cluster secret, 32 b.").unwrap();

    // QUIC control plane with the real messages.
    let mut listener = ControlListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        secret.clone(),
        PROTOCOL_VERSION,
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let worker = tokio::spawn(async move {
        let mut c = control::connect(addr, &secret, PROTOCOL_VERSION)
            .await
            .unwrap();
        while let Ok(Some(b)) = c.rx.recv().await {
            let ToWorker::Reserve { job, .. } = wire::decode::<ToWorker>(&b).unwrap() else {
                panic!("unexpected message");
            };
            let ev = ToGateway::Events(vec![(
                job.id,
                WireEvent::Token {
                    token: 7,
                    logprob: None,
                    cached_tokens: Some(0),
                    finish: None,
                },
            )]);
            c.tx.send(wire::encode(&ev).unwrap()).await.unwrap();
        }
    });
    let mut gw = listener.accept().await.unwrap();
    let msg = ToWorker::Reserve {
        group: 1,
        prefill: 2,
        job: job(prompt),
    };
    let mut quic = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let t = Instant::now();
        gw.tx.send(wire::encode(&msg).unwrap()).await.unwrap();
        let b = gw.rx.recv().await.unwrap().unwrap();
        let _: ToGateway = wire::decode(&b).unwrap();
        if i >= rounds / 10 {
            quic.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let bytes = wire::encode(&msg).unwrap().len();
    gw.close("done");
    let _ = worker.await;

    // The floor: the same sizes over TCP, no encoding, no authentication.
    let tcp_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp_l.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let (mut s, _) = tcp_l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut len = [0u8; 4];
        let mut buf = Vec::new();
        while s.read_exact(&mut len).await.is_ok() {
            buf.resize(u32::from_le_bytes(len) as usize, 0);
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&48u32.to_le_bytes()).await.unwrap();
            s.write_all(&[0u8; 48]).await.unwrap();
        }
    });
    let mut s = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let payload = vec![1u8; bytes];
    let mut tcp = Vec::with_capacity(rounds);
    let mut len = [0u8; 4];
    let mut reply = vec![0u8; 48];
    for i in 0..rounds + rounds / 10 {
        let t = Instant::now();
        let mut frame = (bytes as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        s.write_all(&frame).await.unwrap();
        s.read_exact(&mut len).await.unwrap();
        s.read_exact(&mut reply).await.unwrap();
        if i >= rounds / 10 {
            tcp.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(s);
    let _ = echo.await;

    println!(
        "control round trip, Reserve of {prompt} prompt tokens ({bytes} B) → token Event, {rounds} rounds"
    );
    println!("{:<28} {:>10} {:>10}", "path", "p50 µs", "p99 µs");
    let (q50, q99) = (pct(&mut quic, 0.5), pct(&mut quic, 0.99));
    let (t50, t99) = (pct(&mut tcp, 0.5), pct(&mut tcp, 0.99));
    println!(
        "{:<28} {q50:>10.1} {q99:>10.1}",
        "duet control (QUIC + rkyv)"
    );
    println!(
        "{:<28} {t50:>10.1} {t99:>10.1}",
        "plain TCP ping-pong (floor)"
    );
}
