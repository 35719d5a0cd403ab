//! What happens around requests: overload (429), client disconnect (pages freed at once),
//! SIGTERM (drain), and a decode worker panicking mid-stream (requests re-run, nothing lost).

mod common;

use std::time::Duration;

use common::{Server, eventually, get, metric, post, stream};
use futures::StreamExt;
use serde_json::{Value, json};

async fn decode_pages_used(srv: &Server) -> f64 {
    let (_, text) = get(&srv.url("/metrics")).await;
    ["decode-1", "decode-2"]
        .iter()
        .map(|w| metric(&text, &format!("duet_kv_pages_used{{worker=\"{w}\"}}")).unwrap_or(0.0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_429_and_a_disconnect_frees_pages_at_once() {
    let srv = Server::start(&["--queue-max", "1"]);
    // Practically endless, and within the 32,768-token context of the default pools.
    let req = json!({"prompt": "A long story:", "max_tokens": 30000, "stream": true, "ignore_eos": true, "temperature": 0});
    let resp = common::client()
        .post(srv.url("/v1/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    // Wait for the first token: the request is admitted and decoding.
    body.next().await.unwrap().unwrap();

    let r = common::client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].is_string());
    assert!(
        decode_pages_used(&srv).await > 0.0 || {
            // The gauge is refreshed from the workers' last report; give it one scrape to show up.
            eventually(Duration::from_secs(10), || async {
                decode_pages_used(&srv).await > 0.0
            })
            .await
        }
    );

    // The client goes away: the sequence is aborted and its pages return without waiting for
    // its (practically endless) max_tokens.
    drop(body);
    assert!(
        eventually(Duration::from_secs(20), || async {
            decode_pages_used(&srv).await == 0.0
        })
        .await,
        "pages still held after the client disconnected"
    );
    let (status, v) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "the admission slot came back: {v}");
    let (_, text) = get(&srv.url("/metrics")).await;
    assert_eq!(metric(&text, "duet_requests_rejected_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_requests_while_health_says_503_then_exits_cleanly() {
    let mut srv = Server::start(&[]);
    let url = srv.url("/v1/completions");
    let req = json!({"prompt": "Count with me:", "max_tokens": 40, "stream": true, "ignore_eos": true, "temperature": 0,
        "stream_options": {"include_usage": true}});
    let resp = common::client().post(&url).json(&req).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    // A practically endless request keeps the drain open (30 s by default) until its client goes.
    let endless =
        json!({"prompt": "Endless:", "max_tokens": 30000, "stream": true, "ignore_eos": true});
    let resp = common::client()
        .post(&url)
        .json(&endless)
        .send()
        .await
        .unwrap();
    let mut endless_body = resp.bytes_stream();
    endless_body.next().await.unwrap().unwrap();
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(srv.pid() as i32, libc::SIGTERM) }, 0);
    // While draining the server still answers: `/health` says 503 so a load balancer stops
    // sending, and a new request is refused with 503 rather than a refused connection.
    let health = srv.url("/health");
    let draining = eventually(Duration::from_secs(20), || async {
        get(&health).await.0 == 503
    });
    assert!(draining.await, "/health turned 503 after SIGTERM");
    let (status, h) = get(&health).await;
    assert_eq!(status, 503, "{h}");
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["draining"], true, "{h}");
    let (status, v) = post(&url, &json!({"prompt": "late", "max_tokens": 2})).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{v}"
    );

    // The running request finishes whole.
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        text.contains("\"completion_tokens\":40"),
        "every token of the running request arrived: {text}"
    );
    assert!(text.contains("\"finish_reason\":\"length\""));
    // Its client leaving ends the last request, and with it the drain, long before the deadline.
    drop(endless_body);
    let status = srv
        .wait_exit(Duration::from_secs(30))
        .expect("exited after draining");
    assert!(status.success(), "{status:?}: {}", srv.log());
    assert!(!srv.log().contains("drain deadline"), "{}", srv.log());
    assert!(
        common::client().post(&url).json(&req).send().await.is_err(),
        "no new connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_decode_worker_loses_no_request_and_no_token() {
    // Decode group 1 panics after its 3rd step, with sequences in flight; the supervisor
    // restarts it and the gateway re-runs its sequences from the tokens already streamed.
    // f32 for the same reason as the preemption test: a re-run recomputes the streamed tokens'
    // KV in MLA's prefill form, which BF16 rounds differently from the decode form.
    let srv = Server::start(&["--fault-decode-panic-after-steps", "3", "--dtype", "f32"]);
    let url = srv.url("/v1/completions");
    let prompts: Vec<String> = (0..8).map(|i| format!("Request number {i} says")).collect();
    let runs = prompts.iter().map(|p| {
        let url = url.clone();
        let body = json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "stream": true});
        async move { stream(&url, &body).await }
    });
    let results = futures::future::join_all(runs).await;
    assert!(
        srv.log().contains("fault injected"),
        "the fault fired: {}",
        srv.log()
    );
    for (p, events) in prompts.iter().zip(results) {
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"].get(0)?["text"].as_str().map(String::from))
            .collect();
        let finish: Vec<&Value> = events
            .iter()
            .filter_map(|e| e["choices"].get(0)?.get("finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, vec![&json!("length")]);
        // An undisturbed run of the same request (the restarted worker runs clean) gives the
        // same text: no token was lost or repeated across the re-run.
        let (_, v) = post(
            &url,
            &json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), text, "{p}");
        assert_eq!(v["usage"]["completion_tokens"], 16);
    }
    let (status, h) = get(&srv.url("/health")).await;
    assert_eq!(status, 200, "{h}");
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["decode_groups"], 2, "the failed group was restarted");
    let (_, text) = get(&srv.url("/metrics")).await;
    assert_eq!(metric(&text, "duet_worker_restarts_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_finish_later_with_the_same_tokens() {
    // One decode group of 6 pages (384 tokens): four sequences growing to 64 + 120 tokens need
    // 12 pages. Each reserves only 8 new tokens at the gateway (`decode.reserve_new_tokens`), so
    // all four are placed together and the group must preempt (free and later recompute) some.
    // Exact f32: a recomputed sequence's KV comes from the prefill form of MLA instead of the
    // absorbed decode form; in BF16 the two round differently and a near-tie can flip a greedy
    // token (seen here), in f32 they agree to ~1e-6.
    let cfg = common::tmp("overcommit.toml");
    std::fs::write(&cfg, "[decode]\nreserve_new_tokens = 8\n").unwrap();
    let small = Server::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--decode-groups",
        "1",
        "--kv-pages",
        "6",
        "--max-running",
        "4",
        "--dtype",
        "f32",
    ]);
    let roomy = Server::start(&["--decode-groups", "1", "--dtype", "f32"]);
    let body = |i: u32| {
        let ids: Vec<u32> = (0..64).map(|t| 2000 + i * 100 + t).collect();
        json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 120, "temperature": 0, "ignore_eos": true}})
    };
    let url = small.url("/generate");
    let runs = (0..4).map(|i| {
        let url = url.clone();
        async move { post(&url, &body(i)).await }
    });
    let results = futures::future::join_all(runs).await;
    for (i, (status, v)) in results.into_iter().enumerate() {
        assert_eq!(status, 200, "{v}");
        let (_, want) = post(&roomy.url("/generate"), &body(i as u32)).await;
        assert_eq!(v["output_ids"], want["output_ids"], "sequence {i}");
        assert_eq!(v["meta_info"]["completion_tokens"], 120);
    }
    // The small pool really did preempt (and the roomy one never had to).
    let preempted = |text: String| metric(&text, "duet_preemptions_total").unwrap_or(0.0);
    assert!(preempted(get(&small.url("/metrics")).await.1) > 0.0);
    assert_eq!(preempted(get(&roomy.url("/metrics")).await.1), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_prefill_worker_loses_no_request() {
    // The only prefill worker panics after its 2nd step with prompts queued and in flight; its
    // sequences wait for the restarted worker and run there.
    let srv = Server::start(&["--fault-prefill-panic-after-steps", "2", "--dtype", "f32"]);
    let url = srv.url("/v1/completions");
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Prefill victim {i} writes"))
        .collect();
    let runs = prompts.iter().map(|p| {
        let url = url.clone();
        let body = json!({"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
        async move { post(&url, &body).await }
    });
    let results = futures::future::join_all(runs).await;
    assert!(
        srv.log().contains("fault injected"),
        "the fault fired: {}",
        srv.log()
    );
    for (p, (status, v)) in prompts.iter().zip(results) {
        assert_eq!(status, 200, "{p}: {v}");
        let (_, again) = post(
            &url,
            &json!({"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        assert_eq!(v["choices"][0]["text"], again["choices"][0]["text"], "{p}");
        assert_eq!(v["usage"]["completion_tokens"], 8);
    }
    let (status, h) = get(&srv.url("/health")).await;
    assert_eq!(status, 200, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_applies_flags_override_it_and_its_drain_timeout_cuts_a_request() {
    // `--config` sets the served name, three decode groups and a 1 s drain timeout; the
    // `--decode-groups 1` flag overrides the groups.
    let cfg = common::tmp("cluster.toml");
    std::fs::write(
        &cfg,
        "[model]\nserved_model_name = \"from-config\"\n[decode]\ngroups = 3\n[limits]\ndrain_timeout_s = 1\n",
    )
    .unwrap();
    let mut srv = Server::start(&["--config", cfg.to_str().unwrap(), "--decode-groups", "1"]);
    let (status, h) = get(&srv.url("/health")).await;
    assert_eq!(status, 200, "{h}");
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["decode_groups"], 1, "the flag overrides the file: {h}");
    let (_, models) = get(&srv.url("/v1/models")).await;
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "from-config", "{models}");

    // A request that would run practically forever is cut off by the drain timeout: the server
    // exits cleanly without it finishing.
    let req = json!({"model": "from-config", "prompt": "Endless:", "max_tokens": 30000,
        "stream": true, "ignore_eos": true, "temperature": 0});
    let resp = common::client()
        .post(srv.url("/v1/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(srv.pid() as i32, libc::SIGTERM) }, 0);
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let status = srv
        .wait_exit(Duration::from_secs(60))
        .expect("exited after the drain timeout");
    assert!(status.success(), "{status:?}: {}", srv.log());
    assert!(
        srv.log().contains("drain deadline of 1s passed"),
        "the configured drain timeout ended it: {}",
        srv.log()
    );
    assert!(!text.contains("finish_reason\":\"length"), "{text}");
}

/// Sum of a per-worker gauge over every worker, from /metrics.
fn worker_sum(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_holds_its_slot_with_bounded_events_and_then_gets_every_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = Server::start(&["--queue-max", "1"]);
    let mut req = json!({"messages": [{"role": "user", "content": "Read slowly."}],
        "max_tokens": 1500, "ignore_eos": true, "temperature": 0});
    let (status, whole) = post(&srv.url("/v1/chat/completions"), &req).await;
    assert_eq!(status, 200, "{whole}");
    let want = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // A client that stops reading after the first bytes. Its stream (4 greedy choices of 1,500
    // tokens with 20 top logprobs each: ~1.5 KB an event, ~9 MB) is more than hyper's write
    // buffer (~400 KB) and the sockets' buffers (4 MB at most, tcp_wmem) can absorb.
    let addr: std::net::SocketAddr = srv.url("").trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut conn = sock.connect(addr).await.unwrap();
    req["stream"] = json!(true);
    req["n"] = json!(4);
    req["logprobs"] = json!(true);
    req["top_logprobs"] = json!(20);
    let body = serde_json::to_vec(&req).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 512];
    // Up to the first token's event: the sequences are in the engine.
    while !String::from_utf8_lossy(&raw).contains("\"top_logprobs\"") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    assert!(raw.starts_with(b"HTTP/1.0 200") || raw.starts_with(b"HTTP/1.1 200"));

    // The engine finishes the sequences regardless of the reader...
    let url = srv.url("/metrics");
    let done = eventually(Duration::from_secs(120), || async {
        worker_sum(&get(&url).await.1, "duet_worker_sequences") == 0.0
    });
    assert!(
        done.await,
        "the stalled stream's sequences finished in the engine"
    );
    // ...but its events wait in the stream's bounded queue (`SSE_QUEUE_EVENTS`, `n` > 1), not in
    // unbounded memory: the request still holds its admission slot, so `--queue-max 1` refuses
    // the next one.
    let (status, v) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 429, "{v}");

    // Reading again delivers every token of every choice, in order; then the slot is free.
    conn.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let events: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let mut texts = vec![String::new(); 4];
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            texts[c["index"].as_u64().unwrap() as usize].push_str(t);
        }
    }
    for t in &texts {
        assert_eq!(t, &want, "the stalled stream lost or repeated nothing");
    }
    let (status, v) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}
