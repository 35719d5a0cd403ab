//! The cluster as separate processes: `duet gateway`, `duet prefill`, `duet decode` joined over
//! the QUIC control plane, KV over QUIC, and what happens when a process is SIGKILLed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{Proc, Server, get, post, stream, tmp};
use serde_json::{Value, json};

/// One cluster at a time: each test runs 3–5 processes with compute threads of their own, and on
/// a 2-core machine several clusters at once starve each other's heartbeats into false deaths.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["text"].as_str().map(String::from))
        .collect()
}

fn long_prompt(i: usize, words: usize) -> String {
    (0..words)
        .map(|w| format!("w{}", (w * 7 + i * 13) % 97))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_give_the_one_process_cluster_s_greedy_tokens() {
    let _serial = SERIAL.lock().await;
    same_tokens_as_one_process(&["--dtype", "f32"]).await;
}

/// The same over UCX (shared memory here; RDMA on a fabric): decode grants each prefill worker a
/// registered staging region over the control plane, prefill writes with RMA puts.
#[cfg(feature = "ucx")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ucx_processes_give_the_one_process_cluster_s_greedy_tokens() {
    let _serial = SERIAL.lock().await;
    same_tokens_as_one_process(&[
        "--dtype",
        "f32",
        "--kv-transport",
        "ucx",
        "--ucx-tls",
        "sysv,posix,cma,self",
    ])
    .await;
}

#[cfg(feature = "ucx")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ucx_a_decode_process_killed_mid_stream_loses_no_token() {
    let _serial = SERIAL.lock().await;
    decode_killed_mid_stream(&[
        "--dtype",
        "f32",
        "--kv-transport",
        "ucx",
        "--ucx-tls",
        "tcp",
    ])
    .await;
}

/// The R1 distillations' architectures across processes: the prefill process sends GQA `[k | v]`
/// pages (frames carrying that layout), and greedy output equals the one-process cluster's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_and_llama_processes_give_the_one_process_cluster_s_greedy_tokens() {
    let _serial = SERIAL.lock().await;
    for arch in ["qwen2", "llama"] {
        let dir = tmp(&format!("tiny-{arch}"));
        let d = dir.to_str().unwrap();
        let out = common::duet(&["tiny-model", "--out", d, "--arch", arch, "--seed", "2"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let worker = ["--model", d, "--dtype", "f32"];
        let c = Cluster::start_with(1, 1, &["--model", d], &worker);
        let one = Server::start(&worker);
        let body = json!({"prompt": long_prompt(1, 100), "max_tokens": 16, "temperature": 0,
                          "ignore_eos": true});
        let (s1, remote) = post(&c.url("/v1/completions"), &body).await;
        let (s2, local) = post(&one.url("/v1/completions"), &body).await;
        assert_eq!((s1, s2), (200, 200), "{arch}: {remote} {local}");
        assert_eq!(
            remote["choices"][0]["text"], local["choices"][0]["text"],
            "{arch}"
        );
        assert_eq!(remote["usage"]["completion_tokens"], 16, "{arch}");
    }
}

async fn same_tokens_as_one_process(worker_args: &[&str]) {
    // KV crosses from the prefill process to the decode process, layer by layer, and the
    // sequence's sampler over the control plane: any lost page or misplaced layer would change
    // the greedy continuation.
    let mut args = worker_args.to_vec();
    args.extend_from_slice(&["--metrics-port", "0"]);
    let c = Cluster::start(1, 1, &args);
    let endpoints = (c.prefill[0].endpoint(), c.decode[0].endpoint());
    let one = Server::start(&["--dtype", "f32"]);
    let prompt = long_prompt(0, 150);
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let (s1, remote) = post(&c.url("/v1/completions"), &body).await;
    let (s2, local) = post(&one.url("/v1/completions"), &body).await;
    assert_eq!((s1, s2), (200, 200), "{remote} {local}");
    assert_eq!(remote["choices"][0]["text"], local["choices"][0]["text"]);
    assert_eq!(remote["usage"]["completion_tokens"], 24);
    // Streamed gives the same text; the second run hits the prefill process's prefix cache.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = stream(&c.url("/v1/completions"), &sbody).await;
    assert_eq!(
        json!(text_of(&events)),
        local["choices"][0]["text"],
        "streamed across processes"
    );
    let usage = events.last().unwrap()["usage"].clone();
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 128,
        "{usage}"
    );
    // Seeded sampling continues the same random stream after the handoff.
    let seeded = json!({"prompt": "Tell me", "max_tokens": 16, "temperature": 0.9, "seed": 5, "ignore_eos": true});
    let (_, a) = post(&c.url("/v1/completions"), &seeded).await;
    let (_, b) = post(&one.url("/v1/completions"), &seeded).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // logit_bias travels with the sampler: the decode process applies it as the prefill process
    // did to the first token (a bias of 8 moves some of the 16 draws, not all).
    let biased = json!({"prompt": "Tell me", "max_tokens": 16, "temperature": 0.9, "seed": 5,
        "ignore_eos": true, "logit_bias": {"1000": 8, "2000": -100}});
    let (_, a) = post(&c.url("/v1/completions"), &biased).await;
    let (_, b) = post(&one.url("/v1/completions"), &biased).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "{a}");
    let (_, plain) = post(&one.url("/v1/completions"), &seeded).await;
    assert_ne!(a["choices"][0]["text"], plain["choices"][0]["text"]);
    // A grammar travels as its text: the decode process compiles it and replays the tokens, so
    // the output after the handoff still holds to it (unconstrained, these random weights never
    // write JSON), token for token as in one process.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"},
        "n": {"enum": [1, 2, 3]}, "tag": {"type": "string", "maxLength": 8}},
        "required": ["ok", "n", "tag"], "additionalProperties": false});
    let constrained = json!({"text": "Tell me", "sampling_params":
        {"json_schema": schema, "max_new_tokens": 48, "temperature": 0}});
    let (s1, a) = post(&c.url("/generate"), &constrained).await;
    let (s2, b) = post(&one.url("/generate"), &constrained).await;
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    assert_eq!(a["text"], b["text"]);
    let v: Value =
        serde_json::from_str(a["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("{a}: {e}"));
    assert!(
        v["ok"].is_boolean() && [1, 2, 3].contains(&v["n"].as_i64().unwrap()),
        "{v}"
    );
    let (status, h) = get(&c.url("/health")).await;
    assert_eq!(status, 200);
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(
        (h["prefill_workers"].clone(), h["decode_groups"].clone()),
        (json!(1), json!(1))
    );
    // Each worker process's own endpoint: healthy, valid exposition, and the KV the prefill
    // process sent is exactly what the decode process verified and wrote.
    let (_, gateway_metrics) = get(&c.url("/metrics")).await;
    common::promtool_check(&gateway_metrics);
    let mut seen = Vec::new();
    for (role, base) in [("prefill", &endpoints.0), ("decode", &endpoints.1)] {
        let (status, h) = get(&format!("{base}/health")).await;
        assert_eq!(status, 200, "{role}: {h}");
        let h: Value = serde_json::from_str(&h).unwrap();
        assert_eq!(
            (h["role"].as_str(), h["live_workers"].as_u64()),
            (Some(role), Some(1))
        );
        let (status, m) = get(&format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        common::promtool_check(&m);
        let value = |name: &str| common::metric(&m, name).unwrap_or_else(|| panic!("{name}: {m}"));
        assert!(m.contains("duet_build_info{version=\""), "{m}");
        assert!(
            value(&format!("duet_{role}_step_seconds_count")) >= 1.0,
            "{m}"
        );
        assert_eq!(value("duet_worker_restarts_total"), 0.0);
        seen.push(m);
    }
    let sent = common::metric(&seen[0], "duet_kv_sent_bytes_total").unwrap();
    let received = common::metric(&seen[1], "duet_kv_received_bytes_total").unwrap();
    assert!(
        sent > 0.0 && sent == received,
        "sent {sent}, received {received}"
    );
    assert_eq!(
        common::metric(&seen[1], "duet_kv_rejected_frames_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_credential_is_refused_and_the_worker_exits_non_zero() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(1, 1, &["--engine", "echo"]);
    let bad = tmp("bad-secret");
    std::fs::write(&bad, "not the cluster's secret, but long enough").unwrap();
    for role in ["prefill", "decode"] {
        let mut w = Proc::spawn(&[
            role,
            "--engine",
            "echo",
            "--join",
            &c.join,
            "--secret-file",
            bad.to_str().unwrap(),
        ]);
        let status = w
            .wait_exit(Duration::from_secs(30))
            .expect("the worker exits");
        assert!(!status.success());
        assert!(
            w.log().contains("refused this process's cluster secret"),
            "{}",
            w.log()
        );
    }
    // A secret too short to be one is refused before anything starts.
    let short = tmp("short-secret");
    std::fs::write(&short, "abc\n").unwrap();
    let mut w = Proc::spawn(&[
        "decode",
        "--join",
        &c.join,
        "--secret-file",
        short.to_str().unwrap(),
    ]);
    assert!(!w.wait_exit(Duration::from_secs(30)).unwrap().success());
    assert!(w.log().contains("at least 16 are needed"), "{}", w.log());
    // Nobody joined: the board still lists the two real workers, and they serve.
    let (_, h) = get(&c.url("/health")).await;
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(
        (h["prefill_workers"].clone(), h["decode_groups"].clone()),
        (json!(1), json!(1))
    );
    let (s, v) = post(
        &c.url("/v1/completions"),
        &json!({"prompt": "still here", "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_model_or_dtype_is_refused_at_join() {
    let _serial = SERIAL.lock().await;
    // The cluster runs the default model in f32. A worker in BF16 (other KV pages) or with
    // another model is refused when it joins, exits non-zero saying why, and is never routed to.
    let c = Cluster::start(1, 1, &["--dtype", "f32"]);
    // V2-Lite's golden fixture with a tokenizer beside it: a worker loads one to compile grammars.
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/fixtures/v2-lite-tiny");
    let other = tmp("v2-lite-with-tokenizer");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let (tok, tok_cfg) = duet_model::tiny::r1_tokenizer_files().unwrap();
    std::fs::write(other.join("tokenizer.json"), tok).unwrap();
    std::fs::write(other.join("tokenizer_config.json"), tok_cfg).unwrap();
    let other_model = other.to_str().unwrap().to_string();
    // A Qwen2 config with the default model's layer count and vocabulary: only the architecture
    // (and so the KV layout) differs.
    let qwen2 = tmp("qwen2-same-shape");
    std::fs::create_dir_all(&qwen2).unwrap();
    let mut cfg = duet_model::tiny::config_json(duet_model::tiny::TinyArch::Qwen2);
    cfg["vocab_size"] = json!(duet_model::tiny::DEEPSEEK_VOCAB);
    std::fs::write(qwen2.join("config.json"), cfg.to_string()).unwrap();
    let qwen2 = qwen2.to_str().unwrap().to_string();
    for (role, extra, why) in [
        ("prefill", vec!["--dtype", "bf16"], "KV pages differ"),
        (
            "decode",
            vec!["--dtype", "f32", "--model", other_model.as_str()],
            "model differs",
        ),
        (
            "decode",
            vec!["--engine", "echo", "--model", qwen2.as_str()],
            "the gateway serves DeepSeek with 96 KV values per token, this worker Qwen2 with 128",
        ),
    ] {
        let mut w = c.worker(role, &extra);
        let status = w
            .wait_exit(Duration::from_secs(60))
            .expect("the refused worker exits");
        assert!(!status.success(), "{role} {extra:?}");
        assert!(
            w.log().contains("refused this process") && w.log().contains(why),
            "{role} {extra:?}: {}",
            w.log()
        );
    }
    let (_, h) = get(&c.url("/health")).await;
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(
        (h["prefill_workers"].clone(), h["decode_groups"].clone()),
        (json!(1), json!(1)),
        "only the matching workers are routed to"
    );
    let (s, v) = post(
        &c.url("/v1/completions"),
        &json!({"prompt": "still serving", "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_fit_gets_a_clean_error_across_processes() {
    let _serial = SERIAL.lock().await;
    // A decode process with 4 pages (256 tokens) cannot hold a 400-token prompt: the gateway
    // learns the pool from the worker's reports and refuses with a 400, not a retryable 5xx.
    let mut c = Cluster::gateway_only();
    // A gateway without workers is up but not healthy.
    let (status, h) = get(&c.url("/health")).await;
    assert_eq!(status, 503, "{h}");
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(
        (h["prefill_workers"].clone(), h["decode_groups"].clone()),
        (json!(0), json!(0))
    );
    let _p = c.worker("prefill", &["--engine", "echo"]);
    let _d = c.worker("decode", &["--engine", "echo", "--kv-pages", "4"]);
    c.await_joins(2);
    // Healthy once both joined workers are on the routing board.
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            get(&c.url("/health")).await.0 == 200
        })
        .await,
        "{}",
        get(&c.url("/health")).await.1
    );
    let (s, v) = post(
        &c.url("/v1/completions"),
        &json!({"prompt": long_prompt(1, 400), "max_tokens": 4}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 256 tokens"),
        "{v}"
    );
    let (_, models) = get(&c.url("/v1/models")).await;
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 256, "{models}");
    let (s, _) = post(
        &c.url("/v1/completions"),
        &json!({"prompt": "short", "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_kv_transfer_is_detected_and_re_run() {
    let _serial = SERIAL.lock().await;
    // The prefill process flips a byte in its first KV frame after checksumming it (a bad link).
    // The decode process's per-page CRC-32 catches it, the sequence is never decoded from that
    // KV, and the re-run gives exactly the undisturbed answer.
    let mut c = Cluster::gateway_only();
    let _p = c.worker(
        "prefill",
        &["--dtype", "f32", "--fault-corrupt-kv-frames", "1"],
    );
    let _d = c.worker("decode", &["--dtype", "f32"]);
    c.await_joins(2);
    let body = json!({"prompt": long_prompt(3, 100), "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (s1, first) = post(&c.url("/v1/completions"), &body).await;
    let (s2, again) = post(&c.url("/v1/completions"), &body).await;
    assert_eq!((s1, s2), (200, 200), "{first} {again}");
    assert_eq!(first["choices"][0]["text"], again["choices"][0]["text"]);
    let log = c.gateway.log();
    assert!(
        log.contains("re-running") && log.contains("checksum mismatch"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_process_killed_mid_stream_loses_no_token() {
    let _serial = SERIAL.lock().await;
    decode_killed_mid_stream(&["--dtype", "f32"]).await;
}

async fn decode_killed_mid_stream(worker_args: &[&str]) {
    // Two decode processes share 6 streams; one is SIGKILLed while every stream is under way.
    // The gateway notices within its heartbeat timeout, re-runs the lost sequences from the
    // tokens already streamed on another prefill/decode pair, and each SSE stream continues:
    // the final text equals an undisturbed run (f32: see serve_lifecycle.rs).
    let mut c = Cluster::start(1, 2, worker_args);
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Stream {i} goes on and on"))
        .collect();
    let max_tokens = 160;
    let bodies = prompts
        .iter()
        .map(|p| json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true}))
        .collect();
    let streams = common::start_streams(&c.url("/v1/completions"), bodies, 4).await;
    let (victim, name) = c.busiest("decode").await;
    c.decode.remove(victim).kill9();
    let mut results = Vec::new();
    for s in streams {
        results.push(s.await.unwrap());
    }
    let left = c
        .gateway
        .wait_line(Duration::from_secs(10), |l| l.starts_with("left "))
        .expect("the gateway noticed the dead decode process");
    assert!(left.contains("decode-"), "{left}");
    assert!(
        c.lost_with(&name) > 0,
        "the killed process held sequences that were re-run: {}",
        c.gateway.log()
    );
    assert_whole_and_undisturbed(&c, &prompts, &results, max_tokens).await;
    let (_, h) = get(&c.url("/health")).await;
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["decode_groups"], 1, "the dead process is unrouted");
}

/// Each stream ended whole (`length`) with the text an undisturbed greedy run gives.
async fn assert_whole_and_undisturbed(
    c: &Cluster,
    prompts: &[String],
    results: &[Vec<Value>],
    max_tokens: usize,
) {
    for (p, events) in prompts.iter().zip(results) {
        let finish: Vec<&Value> = events
            .iter()
            .filter_map(|e| e["choices"].get(0)?.get("finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, vec![&json!("length")], "{p}");
        let (_, again) = post(
            &c.url("/v1/completions"),
            &json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        assert_eq!(json!(text_of(events)), again["choices"][0]["text"], "{p}");
    }
}

/// A process sent SIGTERM exited 0 after its drain, and the gateway lost and re-ran nothing.
fn assert_drained_cleanly(c: &Cluster, drained: &mut Proc, name: &str) {
    let status = drained
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the drained process did not exit: {}", drained.log()));
    assert!(status.success(), "{status:?}: {}", drained.log());
    assert!(
        drained.log().contains("duet: drained, exiting"),
        "{}",
        drained.log()
    );
    assert_eq!(c.lost_with(name), 0, "{}", c.gateway.log());
    assert!(
        !c.gateway.log().contains("re-running"),
        "a sequence was re-run: {}",
        c.gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_decode_process_its_streams_finish_there_and_none_is_re_run() {
    // A rolling restart's step: the decode process holding the most streams gets SIGTERM while
    // every stream is under way. It takes nothing new (a request sent now is served by the other
    // one), finishes what it holds, and exits 0; no sequence is lost or re-run, every stream
    // ends whole with an undisturbed run's text.
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(1, 2, &["--dtype", "f32"]);
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Drained stream {i} goes on"))
        .collect();
    let max_tokens = 120;
    let bodies = prompts
        .iter()
        .map(|p| json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true}))
        .collect();
    let streams = common::start_streams(&c.url("/v1/completions"), bodies, 4).await;
    let (victim, name) = c.busiest("decode").await;
    let mut drained = c.decode.remove(victim);
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    assert_eq!(
        unsafe { libc::kill(drained.child.id() as i32, libc::SIGTERM) },
        0
    );
    // The gateway takes the draining process off its routing at once (its /health counts one
    // decode group), while its streams go on.
    let health = c.url("/health");
    let unrouted = common::eventually(Duration::from_secs(10), || async {
        let (_, h) = get(&health).await;
        serde_json::from_str::<Value>(&h).is_ok_and(|h| h["decode_groups"] == 1)
    });
    assert!(unrouted.await, "{}", c.gateway.log());
    let (s, v) = post(
        &c.url("/v1/completions"),
        &json!({"prompt": "a request during the drain", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let mut results = Vec::new();
    for st in streams {
        results.push(st.await.unwrap());
    }
    assert_drained_cleanly(&c, &mut drained, &name);
    assert_whole_and_undisturbed(&c, &prompts, &results, max_tokens).await;
}

/// Sends every prompt at once (6 greedy tokens each) and returns once the first answer came:
/// the prefill processes are busy with the rest.
async fn six_tokens_each_after_the_first_answer(
    url: &str,
    prompts: &[String],
) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    let done = Arc::new(tokio::sync::Notify::new());
    let tasks = prompts
        .iter()
        .map(|p| {
            let url = url.to_string();
            let done = done.clone();
            let body = json!({"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
            tokio::spawn(async move {
                let r = post(&url, &body).await;
                done.notify_one();
                r
            })
        })
        .collect();
    done.notified().await;
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_prefill_process_under_load_without_a_re_run() {
    // Two prefill processes under a queue of long prompts; the busier one gets SIGTERM after the
    // first answer. What it holds, and what decode groups had already reserved for it, is
    // prefilled there before it exits 0; the rest goes to the other one. Nothing is re-run.
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(2, 1, &["--dtype", "f32"]);
    let prompts: Vec<String> = (0..16).map(|i| long_prompt(i, 900)).collect();
    let url = c.url("/v1/completions");
    let tasks = six_tokens_each_after_the_first_answer(&url, &prompts).await;
    let (victim, name) = c.busiest("prefill").await;
    let mut drained = c.prefill.remove(victim);
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    assert_eq!(
        unsafe { libc::kill(drained.child.id() as i32, libc::SIGTERM) },
        0
    );
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 6);
    }
    assert_drained_cleanly(&c, &mut drained, &name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_process_killed_under_load_has_its_requests_retried() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(2, 1, &["--dtype", "f32"]);
    // Long prompts keep both prefill processes busy; one dies after the first answer.
    let prompts: Vec<String> = (0..16).map(|i| long_prompt(i, 900)).collect();
    let url = c.url("/v1/completions");
    let tasks = six_tokens_each_after_the_first_answer(&url, &prompts).await;
    let (victim, name) = c.busiest("prefill").await;
    c.prefill.remove(victim).kill9();
    let mut answers = Vec::new();
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 6);
        answers.push(v);
    }
    assert!(
        c.gateway
            .wait_line(Duration::from_secs(10), |l| l.starts_with("left ")
                && l.contains("prefill-"))
            .is_some(),
        "the gateway noticed the dead prefill process"
    );
    assert!(
        c.lost_with(&name) > 0,
        "the killed prefill process held sequences that were re-run: {}",
        c.gateway.log()
    );
    for (p, v) in prompts.iter().zip(answers) {
        let (_, again) = post(
            &url,
            &json!({"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        assert_eq!(v["choices"][0]["text"], again["choices"][0]["text"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_rejoin_a_restarted_gateway_without_restarting() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(1, 1, &["--engine", "echo"]);
    let port: u16 = c.join.rsplit(':').next().unwrap().parse().unwrap();
    let pids: Vec<u32> = c
        .prefill
        .iter()
        .chain(&c.decode)
        .map(|p| p.child.id())
        .collect();
    c.gateway.kill9();
    let (gw, http, _) = Cluster::gateway(&c.secret, port);
    c.gateway = gw;
    c.http = http;
    c.await_joins(2);
    for w in c.prefill.iter().chain(&c.decode) {
        assert!(
            w.wait_line(Duration::from_secs(10), |l| l
                .starts_with("joined the gateway"))
                .is_some()
        );
    }
    let now: Vec<u32> = c
        .prefill
        .iter_mut()
        .chain(c.decode.iter_mut())
        .map(|p| {
            assert!(p.child.try_wait().unwrap().is_none(), "a worker exited");
            p.child.id()
        })
        .collect();
    assert_eq!(pids, now);
    let (s, v) = post(
        &c.url("/v1/completions"),
        &json!({"prompt": "after the restart", "max_tokens": 4}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_survive_killed_workers() {
    let _serial = SERIAL.lock().await;
    // 200 requests at once on 2 prefill and 2 decode processes; the decode and the prefill
    // process holding the most sequences are SIGKILLed while they run. Every request completes
    // with exactly the text an undisturbed run gives: nothing lost, nothing repeated. f32: a
    // re-run recomputes the streamed tokens' KV in MLA's prefill form (serve_lifecycle.rs).
    let mut c = Cluster::start(2, 2, &["--dtype", "f32"]);
    let prompts: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "Concurrent request {i}: {}",
                long_prompt(i, PROMPT_WORDS_200)
            )
        })
        .collect();
    let url = c.url("/v1/completions");
    let body =
        |p: &str| json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let finished = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let url = url.clone();
            let finished = finished.clone();
            let body = body(p);
            tokio::spawn(async move {
                let r = post(&url, &body).await;
                finished.fetch_add(1, Ordering::Relaxed);
                r
            })
        })
        .collect();
    // Kill once a quarter is done, with most still in flight.
    let end = Instant::now() + Duration::from_secs(300);
    while finished.load(Ordering::Relaxed) < 50 {
        assert!(Instant::now() < end, "requests never finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (d, decode_name) = c.busiest("decode").await;
    c.decode.remove(d).kill9();
    let (p, prefill_name) = c.busiest("prefill").await;
    c.prefill.remove(p).kill9();
    let mut answers = Vec::new();
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 24, "{v}");
        answers.push(v);
    }
    for name in [&decode_name, &prefill_name] {
        println!(
            "{} sequences re-run after {name} was killed",
            c.lost_with(name)
        );
        assert!(
            c.lost_with(name) > 0,
            "{name} held sequences that were re-run: {}",
            c.gateway.log()
        );
    }
    // The undisturbed run: the same 200 requests, at once, on the surviving processes.
    let again = futures::future::join_all(prompts.iter().map(|p| {
        let url = url.clone();
        let body = body(p);
        async move { post(&url, &body).await }
    }))
    .await;
    for ((p, v), (s, want)) in prompts.iter().zip(&answers).zip(again) {
        assert_eq!(s, 200, "{want}");
        assert_eq!(v["choices"][0]["text"], want["choices"][0]["text"], "{p}");
    }
}

/// Words per prompt in the 200-request test: long enough that prefill is still queued when the
/// kills come, so the killed prefill process holds sequences.
const PROMPT_WORDS_200: usize = 200;
