//! Honest limits (core::pd's context and page ownership) through `duet serve` as a user meets
//! them: a pool of 4 KV pages (256 tokens) per worker.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn completion(prompt: &str, max_tokens: Option<u64>) -> Value {
    let mut body = json!({"prompt": prompt, "temperature": 0, "ignore_eos": true});
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    body
}

/// Sum of `duet_kv_pages_used` over every worker, and the running requests, from /metrics.
async fn pages_and_running(srv: &Server) -> (f64, f64) {
    let (_, m) = get(&srv.url("/metrics")).await;
    let pages = m
        .lines()
        .filter(|l| l.starts_with("duet_kv_pages_used{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (pages, metric(&m, "duet_running_requests").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pool_is_advertised_refused_honestly_and_shared_without_losing_output() {
    // The echo engine: the same scheduler, pools and protocol as the model, with tokens that do
    // not depend on float rounding, so a preempted and recomputed sequence must return exactly
    // the text it returns alone (with the model, recomputing its KV in the prefill form may flip
    // a near-tie of the random test weights).
    let srv = Server::start(&[
        "--kv-pages",
        "4",
        "--decode-groups",
        "1",
        "--engine",
        "echo",
    ]);

    // What the pools can hold is what the server advertises.
    let (s, models) = get(&srv.url("/v1/models")).await;
    assert_eq!(s, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 256, "{models}");

    // The new-user repro: max_tokens 1000 on a 256-token pool can never fit — a 400 that names
    // the limit, never a retryable 5xx that throws the output away.
    let url = srv.url("/v1/completions");
    let (s, v) = post(&url, &completion("Hello there", Some(1000))).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 256 tokens"),
        "{v}"
    );
    // A prompt longer than the pool: the same 400, blamed on the messages.
    let (s, v) = post(
        &srv.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "word ".repeat(400)}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");

    // Without max_tokens the default is clipped to what the prompt leaves: the sequence fills
    // the pool exactly and ends with "length", keeping every token.
    let (s, v) = post(&url, &completion("Hello there", None)).await;
    assert_eq!(s, 200, "{v}");
    // (The server's default max_tokens, 1024, is more than the pool leaves.)
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let long = 256 - prompt;
    assert_eq!(v["usage"]["completion_tokens"], long, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    // Three requests that each need most of the pool, at once: the group cannot hold them
    // together, so the gateway places one at a time (it commits full lengths) — each returns
    // exactly the text it returns alone, and nothing had to be preempted.
    let body = completion("Hello there", Some(long - 8));
    let (s, alone) = post(&url, &body).await;
    assert_eq!(s, 200, "{alone}");
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { post(&url, &body).await })
        })
        .collect();
    for r in runs {
        let (s, v) = r.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], long - 8, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        assert_eq!(v["choices"][0]["text"], alone["choices"][0]["text"]);
    }

    let (_, m) = get(&srv.url("/metrics")).await;
    assert_eq!(metric(&m, "duet_preemptions_total"), Some(0.0));

    // Afterwards every page and the running count are back to zero: the balancer sees an idle
    // group, not a leaked one.
    let idle = eventually(Duration::from_secs(10), || async {
        pages_and_running(&srv).await == (0.0, 0.0)
    })
    .await;
    assert!(idle, "{:?}", pages_and_running(&srv).await);
}

#[test]
fn a_config_asking_for_attention_tensor_parallelism_is_refused_until_the_server_runs_it() {
    // `duet plan` writes each role's ep_size/tp_size; a server without attention TP must say it
    // cannot run that, not serve a different topology silently.
    let cfg = tmp("tp2.toml");
    std::fs::write(&cfg, "[decode]\ngroups = 2\nep_size = 2\ntp_size = 2\n").unwrap();
    let mut p = Proc::spawn(&[
        "serve",
        "--engine",
        "echo",
        "--port",
        "0",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let status = p.wait_exit(Duration::from_secs(60));
    let err = p.log();
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {err}");
    assert!(
        err.contains("decode.tp_size = 2") && !err.contains("panicked"),
        "{err}"
    );
}
