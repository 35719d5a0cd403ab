//! The API's accounting and its conformance to what it documents, over real HTTP against
//! `duet serve`: usage and counters, BOS, `/tokenize`'s options, model retrieval, errors for a
//! wrong method or malformed JSON, and `/openapi.json` — checked against the router here and
//! fuzzed against the server by schemathesis.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Server, eventually, get, metric, post, post_raw, stream};
use futures::StreamExt;
use serde_json::{Value, json};

/// Every route the gateway serves, as `/openapi.json` must list it.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/generate"),
    ("post", "/tokenize"),
    ("post", "/detokenize"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model}"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

async fn metrics(srv: &Server) -> String {
    get(&srv.url("/metrics")).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_counters_count_what_they_say() {
    let srv = Server::start(&["--engine", "echo"]);
    let chat =
        json!({"messages": [{"role": "user", "content": "Count me once."}], "max_tokens": 3});
    let (status, one) = post(&srv.url("/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200, "{one}");
    let prompt = one["usage"]["prompt_tokens"].as_u64().unwrap();
    let mut three = chat.clone();
    three["n"] = json!(3);
    let (_, v) = post(&srv.url("/v1/chat/completions"), &three).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(prompt), "{v}");
    let total = v["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(
        total,
        prompt + v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    // Streamed with usage: the same count.
    three["stream"] = json!(true);
    three["stream_options"] = json!({"include_usage": true});
    let events = stream(&srv.url("/v1/chat/completions"), &three).await;
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(prompt), "{usage}");
    // Completions: two prompts, two choices each: each prompt counted once.
    let (_, a) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": "alpha", "max_tokens": 2}),
    )
    .await;
    let (_, ab) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": ["alpha", "alpha"], "n": 2, "max_tokens": 2}),
    )
    .await;
    assert_eq!(
        ab["usage"]["prompt_tokens"].as_u64().unwrap(),
        2 * a["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{ab}"
    );

    // Every refusal counts as rejected: invalid (400), unknown model (404), malformed JSON.
    let rejected = |m: &str| metric(m, "duet_requests_rejected_total").unwrap_or(0.0);
    let before = rejected(&metrics(&srv).await);
    let (s1, _) = post(
        &srv.url("/v1/chat/completions"),
        &json!({"messages": [], "max_tokens": 1}),
    )
    .await;
    let (s2, _) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": "x", "model": "nope"}),
    )
    .await;
    let (s3, _, _) = post_raw(&srv.url("/generate"), "{\"text\": ").await;
    assert_eq!((s1, s2, s3), (400, 404, 400));
    assert_eq!(rejected(&metrics(&srv).await), before + 3.0);

    // A client that goes away mid-stream is an abort.
    let aborts = |m: &str| metric(m, "duet_requests_total{finish_reason=\"abort\"}").unwrap_or(0.0);
    let aborts_before = aborts(&metrics(&srv).await);
    let resp = common::client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Go on:", "max_tokens": 30000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    assert!(
        eventually(Duration::from_secs(10), || async {
            aborts(&metrics(&srv).await) >= aborts_before + 1.0
        })
        .await,
        "the disconnect was not counted as an abort:\n{}",
        metrics(&srv).await
    );
    // And a non-streamed request whose client times out.
    let slow = common::client()
        .post(srv.url("/v1/completions"))
        .timeout(Duration::from_millis(300))
        .json(&json!({"prompt": "Go on:", "max_tokens": 30000, "ignore_eos": true}))
        .send()
        .await;
    assert!(slow.is_err(), "30,000 tokens in 300 ms?");
    assert!(
        eventually(Duration::from_secs(10), || async {
            aborts(&metrics(&srv).await) >= aborts_before + 2.0
        })
        .await,
        "the dropped non-streamed request was not counted as an abort"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bos_tokenize_models_and_errors_conform() {
    let srv = Server::start(&["--engine", "echo"]);
    // The tokenizer config says add_bos_token: a text prompt starts with BOS, as HF encodes it.
    let (_, t) = post(&srv.url("/tokenize"), &json!({"prompt": "hello world"})).await;
    let with_bos: Vec<u64> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(with_bos[0], 0, "BOS first: {t}");
    let (_, t) = post(
        &srv.url("/tokenize"),
        &json!({"prompt": "hello world", "add_special_tokens": false, "return_token_strs": true}),
    )
    .await;
    let without: Vec<u64> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(&with_bos[1..], &without[..]);
    assert_eq!(t["token_strs"], json!(["hello", "Ġworld"]), "{t}");
    // A completion's prompt gets the same BOS.
    let (_, c) = post(
        &srv.url("/v1/completions"),
        &json!({"prompt": "hello world", "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        c["usage"]["prompt_tokens"].as_u64(),
        Some(with_bos.len() as u64)
    );

    // client.models.retrieve: the served model by name (or "default"), 404 for another.
    let (_, list) = get(&srv.url("/v1/models")).await;
    let id = serde_json::from_str::<Value>(&list).unwrap()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for name in [id.as_str(), "default"] {
        let (status, m) = get(&srv.url(&format!("/v1/models/{name}"))).await;
        let m: Value = serde_json::from_str(&m).unwrap();
        assert_eq!((status, m["id"].as_str()), (200, Some(id.as_str())), "{m}");
        assert_eq!(m["object"], "model");
    }
    let (status, e) = get(&srv.url("/v1/models/deepseek-ai/DeepSeek-R1")).await;
    let e: Value = serde_json::from_str(&e).unwrap();
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found", "{e}");

    // A wrong method: 405 with an OpenAI error body (and Allow).
    let r = common::client()
        .get(srv.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "method_not_allowed", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("GET"));

    // Malformed JSON is the body's fault, with serde's line and column, not `messages`'.
    let (status, _, e) = post_raw(
        &srv.url("/v1/chat/completions"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"},]}",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["param"], "body", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("trailing comma at line 1 column"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_json_lists_every_route() {
    let srv = Server::start(&["--engine", "echo"]);
    let (status, doc) = get(&srv.url("/openapi.json")).await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut listed: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            listed.push((method.clone(), path.clone()));
        }
    }
    listed.sort();
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    routes.sort();
    assert_eq!(listed, routes);
    // Every documented route exists (nothing documented answers the router's 404).
    for (method, path) in ROUTES {
        let url = srv.url(&path.replace("{model}", "default"));
        let r = match *method {
            "get" => common::client().get(url).send().await.unwrap(),
            _ => common::client()
                .post(url)
                .json(&json!({}))
                .send()
                .await
                .unwrap(),
        };
        assert_ne!(r.status().as_u16(), 404, "{method} {path}");
    }
}

/// schemathesis (from PyPI, in a venv under target/ that scripts/test.sh makes) generates requests
/// from `/openapi.json` — valid and invalid, a bounded number per operation — and checks every
/// answer: no 5xx, a documented status and content type, a body valid against the schema.
#[test]
fn schemathesis_finds_no_server_errors_and_valid_responses() {
    let st = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv-schemathesis/bin/st");
    if !st.exists() {
        let why = format!("{} is missing (scripts/test.sh installs it)", st.display());
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set, so this test must run: {why}"
        );
        eprintln!("SKIPPED schemathesis_finds_no_server_errors_and_valid_responses: {why}");
        return;
    }
    // The echo engine keeps the run short (the HTTP layer is the same as the model's); a 256-token
    // context bounds every generation the fuzzer asks for.
    let srv = Server::start(&["--engine", "echo", "--kv-pages", "4"]);
    let out = Command::new(&st)
        .args([
            "--no-color",
            "run",
            &srv.url("/openapi.json"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            // Examples per operation: about a minute for the whole API on two cores.
            "--max-examples",
            "100",
            "--seed",
            "13",
            "--request-timeout",
            "30",
            // No example database written into the source tree.
            "--generation-database",
            "none",
        ])
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        srv.log()
    );
    assert!(text.contains("No issues found"), "{text}");
}
