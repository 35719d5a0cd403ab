//! The floor for gateway benchmarks: a bare axum server that streams `max_tokens` OpenAI
//! completion chunks per request with no actors, tokenizer, scheduler or per-token processing —
//! what the HTTP stack alone costs. `bench/gateway_overhead.sh` runs `duet bench` against it and
//! against `duet serve --engine echo` in the same run.
//!
//! cargo run --release --example sse_floor -- PORT

use std::convert::Infallible;

use axum::Json;
use axum::response::sse::{Event, Sse};
use axum::routing::post;
use serde_json::{Value, json};

async fn completions(
    Json(req): Json<Value>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let n = req["max_tokens"].as_u64().unwrap_or(16).min(1 << 20);
    let prompt_tokens = req["prompt"].as_array().map_or(1, Vec::len);
    let stream = futures::stream::unfold(0u64, move |i| async move {
        let ev = if i < n {
            let finish = if i + 1 == n {
                json!("length")
            } else {
                Value::Null
            };
            json!({"id": "cmpl-floor", "object": "text_completion", "created": 0, "model": "floor",
                "choices": [{"index": 0, "text": " tok", "logprobs": null, "finish_reason": finish}], "usage": null})
            .to_string()
        } else if i == n {
            json!({"id": "cmpl-floor", "object": "text_completion", "created": 0, "model": "floor", "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens as u64 + n}})
            .to_string()
        } else if i == n + 1 {
            "[DONE]".to_string()
        } else {
            return None;
        };
        Some((Ok(Event::default().data(ev)), i + 1))
    });
    Sse::new(stream)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    use axum::serve::ListenerExt;
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(19980);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let listener = listener.tap_io(|t| {
        let _ = t.set_nodelay(true);
    });
    println!("floor at http://127.0.0.1:{port}");
    let app = axum::Router::new().route("/v1/completions", post(completions));
    axum::serve(listener, app).await.expect("serve");
}
