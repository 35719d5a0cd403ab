//! `duet serve` on the embedded default model, driven over real HTTP: the OpenAI, SGLang and
//! vLLM endpoints, sampling parameters, the prefix cache, metrics and bad input.

mod common;

use std::process::Command;

use common::{Server, get, metric, post, post_raw, stream};

/// POSTs headers announcing a `len`-byte JSON body and no body bytes; returns the status and the
/// JSON the server answered with before reading any of it.
fn oversized_post(url: &str, len: usize) -> (u16, Value) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut c = std::net::TcpStream::connect(host).unwrap();
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).unwrap().parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(resp.clone())),
    )
}
use serde_json::{Value, json};

fn generated_ids(v: &Value) -> Vec<u64> {
    v["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The disaggregated path (prefill worker → KV frames → decode group) gives exactly the tokens
/// the single-engine `duet generate` gives: greedy decoding is a function of the KV alone, so any
/// lost, misplaced or corrupted page would change them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_handoff_matches_single_engine_generation() {
    let srv = Server::start(&[]);
    let ids: Vec<u32> = (0..150u32).map(|i| 1000 + i * 7).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["generate", "--max-tokens", "24", "--json", "--ids"])
        .arg(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
        .env("DUET_CACHE_DIR", common::cache_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: Vec<u64> = want["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let body = json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": true}});
    let (status, v) = post(&srv.url("/generate"), &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(generated_ids(&v), want);
    assert_eq!(v["meta_info"]["finish_reason"]["type"], "length");
    // The same prompt again is served from the prefill worker's prefix cache (two full pages of
    // 150 tokens) and still gives the same tokens.
    let (_, again) = post(&srv.url("/generate"), &body).await;
    assert_eq!(generated_ids(&again), want);
    assert_eq!(again["meta_info"]["cached_tokens"], 128);
    // Streaming /generate carries the cumulative text and ids, as SGLang's does.
    let events = stream(&srv.url("/generate"), &json!({"input_ids": ids, "stream": true, "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": true}})).await;
    assert_eq!(generated_ids(events.last().unwrap()), want);
    assert_eq!(events.len(), 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_whole_and_streamed_agree_with_usage() {
    let srv = Server::start(&[]);
    // A question long enough (over two KV pages of 64 tokens) that asking it again hits the prefix
    // cache.
    let question = "Why is the sky blue? ".repeat(30);
    let req = json!({"model": "default", "messages": [{"role": "user", "content": question}],
        "max_tokens": 16, "temperature": 0, "separate_reasoning": false});
    let (status, whole) = post(&srv.url("/v1/chat/completions"), &req).await;
    assert_eq!(status, 200, "{whole}");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["usage"]["completion_tokens"], 16);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let prompt_tokens = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 128, "{prompt_tokens}");
    // A fresh server has nothing cached.
    assert_eq!(
        whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{whole}"
    );

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let events = stream(&srv.url("/v1/chat/completions"), &sreq).await;
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events
        .iter()
        .filter_map(|e| {
            e["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, text);
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 16);
    assert_eq!(last["usage"]["prompt_tokens"], prompt_tokens);
    // The same prompt again: every full page but the one holding the last prompt token (which is
    // always computed) comes from the prefix cache.
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        (prompt_tokens - 1) / 64 * 64,
        "{last}"
    );
    let finishes: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?.get("finish_reason"))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("length")]);
    // Every chunk but the usage chunk carries `usage: null` when usage was asked for.
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["usage"].is_null())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_parameters_do_what_they_say() {
    let srv = Server::start(&[]);
    let url = srv.url("/v1/completions");
    let base = json!({"model": "default", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (_, greedy) = post(&url, &base).await;
    let text = greedy["choices"][0]["text"].as_str().unwrap().to_string();

    // Stop strings: generation ends before the first occurrence, which is not shown.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = text.find(&stop).unwrap();
    let mut req = base.clone();
    req["stop"] = json!([stop]);
    let (_, v) = post(&url, &req).await;
    assert_eq!(
        v["choices"][0]["text"],
        text[..cut],
        "stop {stop:?} in {text:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["matched_stop"], stop);
    // The same through a stream: the stop string split across chunks never leaks out.
    req["stream"] = json!(true);
    let events = stream(&url, &req).await;
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["text"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, text[..cut]);

    // stop_token_ids: the third generated token ends generation.
    let (_, g) = post(&srv.url("/generate"), &json!({"text": "The capital of France is", "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": true}})).await;
    let third = generated_ids(&g)[2];
    let mut req = base.clone();
    req["stop_token_ids"] = json!([third]);
    let (_, v) = post(&url, &req).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // A seed makes sampling reproducible; n gives independent choices.
    let seeded = json!({"model": "default", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.0, "seed": 42, "n": 2, "ignore_eos": true});
    let (_, a) = post(&url, &seeded).await;
    let (_, b) = post(&url, &seeded).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["usage"]["completion_tokens"], 20);

    // Logprobs: one entry per token; the greedy token is the most likely one.
    let (_, v) = post(&srv.url("/v1/chat/completions"), &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 3})).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], t["token"]);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        let lp: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lp[0] >= lp[1] && lp[1] >= lp[2], "{top:?}");
        assert_eq!(t["logprob"].as_f64().unwrap(), lp[0]);
    }

    // Frequency and presence penalties reach the sampler with their sign. Greedy decoding on the
    // tiny random model does not repeat itself (its logits are nearly flat); a negative penalty
    // (OpenAI's range is [-2, 2]) rewards tokens already generated, so it repeats them. The
    // prompt is "a a a a" without BOS (the case this was measured on), sent as token ids.
    let (_, t) = post(
        &srv.url("/tokenize"),
        &json!({"prompt": "a a a a", "add_special_tokens": false}),
    )
    .await;
    let prompt = t["tokens"].clone();
    let distinct = |penalty: Value| {
        let url = srv.url("/generate");
        let prompt = prompt.clone();
        async move {
            let mut sp = json!({"max_new_tokens": 24, "temperature": 0, "ignore_eos": true});
            if let Value::Object(p) = penalty {
                sp.as_object_mut().unwrap().extend(p);
            }
            let (s, v) = post(&url, &json!({"input_ids": prompt, "sampling_params": sp})).await;
            assert_eq!(s, 200, "{v}");
            let ids = generated_ids(&v);
            let mut uniq = ids.clone();
            uniq.sort_unstable();
            uniq.dedup();
            (uniq.len(), ids)
        }
    };
    let (plain, ids) = distinct(Value::Null).await;
    assert!(plain > 12, "greedy alone hardly repeats: {ids:?}");
    // Frequency: each repetition raises the token further, so greedy locks onto one or two.
    let (n, ids) = distinct(json!({"frequency_penalty": -2.0})).await;
    assert!(
        n <= 4,
        "frequency_penalty -2 repeats generated tokens: {ids:?}"
    );
    // Presence: a fixed reward for every token seen, so some come back.
    let (n, ids) = distinct(json!({"presence_penalty": -2.0})).await;
    assert!(
        n < plain,
        "presence_penalty -2 repeats generated tokens: {ids:?}"
    );

    // top_k, top_p and min_p reach the sampler: a seeded draw at temperature 1.5 differs from
    // greedy, and becomes greedy when the filter leaves only the most likely token.
    let sampled = |extra: Value| {
        let url = url.clone();
        async move {
            let mut req = json!({"model": "default", "prompt": "Once upon a time", "max_tokens": 12,
                "temperature": 1.5, "seed": 7, "ignore_eos": true});
            if let Value::Object(e) = extra {
                req.as_object_mut().unwrap().extend(e);
            }
            let (s, v) = post(&url, &req).await;
            assert_eq!(s, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let mut greedy_req = base.clone();
    greedy_req["prompt"] = json!("Once upon a time");
    let (_, g) = post(&url, &greedy_req).await;
    let greedy = g["choices"][0]["text"].as_str().unwrap().to_string();
    assert_ne!(
        sampled(Value::Null).await,
        greedy,
        "temperature 1.5 samples"
    );
    for filter in [
        json!({"top_k": 1}),
        json!({"top_p": 1e-6}),
        json!({"min_p": 1.0}),
    ] {
        assert_eq!(sampled(filter.clone()).await, greedy, "{filter}");
    }
    // top_k 3 and min_p 0.5: every sampled token is one the filter keeps, judged by the returned
    // log-probabilities (of the model's distribution, before temperature); without a filter some
    // token is not. min_p compares probabilities after temperature 1.5: p ≥ 0.5·p_max there is
    // logprob ≥ top logprob + 1.5·ln 0.5 here (less 1e-5 for f32 rounding).
    let chat = srv.url("/v1/chat/completions");
    let drawn = |extra: Value| {
        let chat = chat.clone();
        async move {
            let mut req = json!({"messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": 24, "temperature": 1.5, "seed": 11, "logprobs": true,
                "top_logprobs": 3, "ignore_eos": true});
            if let Value::Object(e) = extra {
                req.as_object_mut().unwrap().extend(e);
            }
            let (s, v) = post(&chat, &req).await;
            assert_eq!(s, 200, "{v}");
            v["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let top: Vec<(String, f64)> = t["top_logprobs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| {
                            (
                                x["token"].as_str().unwrap().to_string(),
                                x["logprob"].as_f64().unwrap(),
                            )
                        })
                        .collect();
                    (
                        t["token"].as_str().unwrap().to_string(),
                        t["logprob"].as_f64().unwrap(),
                        top,
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let in_top3 =
        |(tok, _, top): &(String, f64, Vec<(String, f64)>)| top.iter().any(|t| &t.0 == tok);
    let above_half = |(_, lp, top): &(String, f64, Vec<(String, f64)>)| {
        *lp >= top[0].1 + 1.5 * 0.5f64.ln() - 1e-5
    };
    let free = drawn(Value::Null).await;
    assert!(!free.iter().all(in_top3), "{free:?}");
    assert!(!free.iter().all(above_half), "{free:?}");
    let k = drawn(json!({"top_k": 3})).await;
    assert!(k.iter().all(in_top3), "top_k 3: {k:?}");
    let m = drawn(json!({"min_p": 0.5})).await;
    assert!(m.iter().all(above_half), "min_p 0.5: {m:?}");
}

/// R1's template opens `<think>`; with a thinking budget the reasoning is cut off with `\n</think>`
/// and the answer follows as content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_separated_and_the_thinking_budget_holds() {
    let srv = Server::start(&[]);
    let url = srv.url("/v1/chat/completions");
    let req = json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 20, "temperature": 0, "thinking_budget": 6});
    let (status, v) = post(&url, &req).await;
    assert_eq!(status, 200, "{v}");
    let msg = &v["choices"][0]["message"];
    assert!(
        !msg["reasoning_content"].as_str().unwrap().is_empty(),
        "{v}"
    );
    assert!(!msg["content"].as_str().unwrap().is_empty(), "{v}");
    // The budget counts from `<think>`: `<think>` and `\n` are in the prompt, 4 tokens thought,
    // then `\n` and `</think>` forced: content gets the other 14 tokens.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let events = stream(&url, &sreq).await;
    let reasoning: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["delta"]["reasoning_content"].as_str())
        .collect();
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert!(!reasoning.is_empty());
    assert_eq!(
        reasoning.concat(),
        msg["reasoning_content"].as_str().unwrap()
    );
    assert_eq!(content, msg["content"].as_str().unwrap());
    // Without separation everything is content, `</think>` included.
    let mut plain = req.clone();
    plain["separate_reasoning"] = json!(false);
    let (_, v) = post(&url, &plain).await;
    assert!(
        v["choices"][0]["message"]
            .get("reasoning_content")
            .is_none()
    );
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("</think>")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_models_health_metrics_and_paddle_form() {
    let srv = Server::start(&["--served-model-name", "deepseek-tiny"]);
    let (status, t) = post(
        &srv.url("/tokenize"),
        &json!({"prompt": "Hello, 世界", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
    // The default pools (512 pages of 64 tokens) bound the context below the model's 163,840 positions.
    assert_eq!(t["max_model_len"], 32768);
    let (_, d) = post(&srv.url("/detokenize"), &json!({"tokens": t["tokens"]})).await;
    assert_eq!(d["prompt"], "Hello, 世界");
    let (_, c) = post(
        &srv.url("/tokenize"),
        &json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true}),
    )
    .await;
    assert!(c["count"].as_u64().unwrap() > 3);

    let (status, m) = get(&srv.url("/v1/models")).await;
    assert_eq!(status, 200);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["data"][0]["id"], "deepseek-tiny");

    // The PaddleNLP guide's request shape, under the served name and the "default" alias.
    for model in ["deepseek-tiny", "default"] {
        let (status, v) = post(
            &srv.url("/v1/chat/completions"),
            &json!({"model": model, "text": "Hello!", "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    }

    let (status, h) = get(&srv.url("/health")).await;
    assert_eq!(status, 200, "{h}");
    let (_, text) = get(&srv.url("/metrics")).await;
    for name in [
        "duet_time_to_first_token_seconds_bucket",
        "duet_inter_token_latency_seconds_count",
        "duet_e2e_request_latency_seconds_sum",
        "duet_queue_depth",
        "duet_running_requests",
        "duet_kv_pages_free{worker=\"decode-1\"}",
        "duet_kv_pages_used{worker=\"decode-2\"}",
        "duet_prefix_cache_hit_rate",
        "duet_generation_tokens_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(metric(&text, "duet_generation_tokens_total").unwrap() >= 2.0);
    assert_eq!(
        metric(&text, "duet_time_to_first_token_seconds_count"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_the_server_stays_up() {
    let srv = Server::start(&["--served-model-name", "tiny"]);
    let chat = srv.url("/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (
            json!({"messages": msgs, "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (json!({"messages": msgs, "max_tokens": "ten"}), 400, None),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            None,
        ),
        (json!({"messages": msgs, "n": 1000}), 400, Some("n")),
        (
            json!({"messages": msgs, "temperature": -1}),
            400,
            Some("temperature"),
        ),
        (json!({"messages": msgs, "top_p": 0}), 400, Some("top_p")),
        (json!({"messages": []}), 400, None),
        (json!({"model": "gpt-4", "messages": msgs}), 404, None),
        (json!({"messages": msgs, "top_logprobs": 3}), 400, None),
    ];
    for (body, status, param) in cases {
        let (s, v) = post(&chat, &body).await;
        assert_eq!(s, status, "{body} → {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(
            e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
            "{v}"
        );
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{v}");
        }
    }
    let (s, _, v) = post_raw(&chat, "{not json").await;
    assert_eq!(s, 400, "{v}");
    // A body over the limit is refused from its Content-Length, before it is read. (Sent raw:
    // an HTTP client that keeps writing a 64 MiB body after the server answered and closed can
    // fail with a broken pipe before it reads the 413.)
    let (s, v) = oversized_post(&chat, 64 << 20);
    assert_eq!(s, 413, "{v}");
    let (s, v) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": vec![5u32; 200_000], "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": [200_000_000u32], "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &chat,
        &json!({"model": "tiny", "messages": msgs, "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, 200, "still serving after bad input: {v}");
}
