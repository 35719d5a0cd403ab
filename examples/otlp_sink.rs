//! An OTLP/HTTP trace receiver for benchmarks: decodes every `POST /v1/traces` export (the real
//! protobuf) and counts the spans; `GET /spans` answers the count so far. `bench/tracing_overhead.sh`
//! points `duet serve` at it to measure what tracing costs.
//!
//! cargo run --release --example otlp_sink -- PORT

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::{get, post};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: otlp_sink PORT");
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(move |body: Bytes| {
                let spans = counted.clone();
                async move {
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let n: usize = req
                        .resource_spans
                        .iter()
                        .flat_map(|r| &r.scope_spans)
                        .map(|s| s.spans.len())
                        .sum();
                    spans.fetch_add(n as u64, Ordering::Relaxed);
                    StatusCode::OK
                }
            }),
        )
        .route(
            "/spans",
            get(move || {
                let spans = spans.clone();
                async move { spans.load(Ordering::Relaxed).to_string() }
            }),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("binding the sink's port");
    println!("otlp sink at http://127.0.0.1:{port}");
    axum::serve(listener, app).await.expect("serving");
}
