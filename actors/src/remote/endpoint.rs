//! A worker process's own `/health` and `/metrics` (`duet prefill|decode --metrics-port`), for
//! load balancers, systemd/ansible checks and Prometheus: the gateway's `/metrics` sees the
//! cluster through the workers' reports, this sees one process from the inside.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::cluster::Role;
use crate::metrics::{self, Metrics, WorkerSample};
use crate::registry::SharedBoard;

struct Endpoint {
    role: Role,
    /// Workers the process runs; it is healthy while all of them are live.
    workers: usize,
    board: SharedBoard,
    metrics: Arc<Metrics>,
}

/// Serves `/health` and `/metrics` on `listener` until the process exits.
pub fn spawn(
    listener: tokio::net::TcpListener,
    role: Role,
    workers: usize,
    board: SharedBoard,
    metrics: Arc<Metrics>,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let state = Arc::new(Endpoint {
        role,
        workers,
        board,
        metrics,
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("worker endpoint: {e}");
        }
    });
    Ok(addr)
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
    }
}

/// 200 while every worker of the process is live (a restarting one is briefly missing).
async fn health(State(s): State<Arc<Endpoint>>) -> Response {
    let live = {
        let b = s.board.read().unwrap_or_else(|e| e.into_inner());
        match s.role {
            Role::Prefill => b.prefill.values().filter(|e| e.worker.is_running()).count(),
            Role::Decode => b.decode.values().filter(|e| e.worker.is_running()).count(),
        }
    };
    let status = if live >= s.workers {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"role": role_name(s.role), "workers": s.workers, "live_workers": live});
    (status, axum::Json(body)).into_response()
}

async fn render(State(s): State<Arc<Endpoint>>) -> Response {
    let samples: Vec<WorkerSample> = {
        let b = s.board.read().unwrap_or_else(|e| e.into_inner());
        let map = match s.role {
            Role::Prefill => &b.prefill,
            Role::Decode => &b.decode,
        };
        map.iter()
            .map(|(id, e)| WorkerSample {
                label: format!("{}-{}", role_name(s.role), id.0),
                pages_used: e.load.pages_used as u64,
                pages_free: e.load.pages_free as u64,
                running: e.load.running as u64,
                waiting: e.load.waiting as u64,
                preemptions: e.load.preemptions,
                prefix_queried_tokens: e.load.prefix_queried_tokens,
                prefix_hit_tokens: e.load.prefix_hit_tokens,
            })
            .collect()
    };
    let text = metrics::render_worker_process(
        &samples,
        &s.metrics.workers,
        &s.metrics.worker_restarts_total,
    );
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}
