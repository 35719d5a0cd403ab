//! `duet serve`: the whole cluster in one process — gateway, prefill workers and decode groups as
//! actors, the KV handoff through the in-process transport — behind the HTTP API.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::serve::ListenerExt;
use duet_core::config::ClusterConfig;
use duet_core::route::PrefillRouterConfig;
use duet_core::types::WorkerId;
use duet_model::grammar::GrammarCompiler;
use duet_model::tokenizer::TextTokenizer;
use duet_model::{ExpertExchange, Model, ModelConfig};
use duet_transport::InProcTransport;
use duet_transport::a2a::InProcA2a;
use ractor::Actor;

use crate::clock::Clock;
use crate::cluster::{Cluster, Role, new_board};
use crate::engine::Engine;
use crate::ep::{A2aExchange, EpCoordinator, EpMember};
use crate::gateway::http::{self, AppState, HttpLimits, ThinkIds};
use crate::gateway::{Gateway, GatewayArgs};
use crate::metrics::Metrics;
use crate::protocol::RegistryMsg;
use crate::worker::{Fault, KvLink, WorkerArgs};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("starting actors: {0}")]
    Actors(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

pub struct ServeOptions {
    pub config: ClusterConfig,
    pub engine: Engine,
    pub tokenizer: Arc<TextTokenizer>,
    pub served_model_name: String,
    /// The model's positions (`max_position_embeddings`); the context the server advertises is
    /// also bounded by the KV pools.
    pub max_positions: usize,
    pub eos_ids: Vec<u32>,
    /// `Authorization: Bearer` keys the HTTP API accepts; empty: open to every caller.
    pub api_keys: Vec<String>,
    /// Fault injection (tests): the first decode group panics after this many steps.
    pub fault: Option<Fault>,
    /// Fault injection (tests): the first prefill worker panics after this many steps.
    pub prefill_fault: Option<Fault>,
    /// Loads one rank of an expert-parallel group (`rank`, `ranks`, its exchange), for a config
    /// whose `ep_size` is above 1 (`duet serve --ep N`).
    pub ep_rank_loader: Option<RankLoader>,
    /// Compiles the grammars of constrained requests (structured outputs, forced tool calls), for
    /// the gateway's validation and the workers' masks.
    pub grammars: Option<Arc<GrammarCompiler>>,
}

/// See [`ServeOptions::ep_rank_loader`].
pub type RankLoader =
    Arc<dyn Fn(usize, usize, Arc<dyn ExpertExchange>) -> Result<Engine, String> + Send + Sync>;

/// A running server: its address, and the state tests and the CLI look at.
pub struct Running {
    pub addr: SocketAddr,
    pub state: http::Shared,
    /// The local workers' supervisor; `None` for `duet gateway`, whose workers are processes.
    pub cluster: Option<Cluster>,
}

impl ServeOptions {
    /// The model engine with the checkpoint's own EOS.
    pub fn for_model(
        config: ClusterConfig,
        model: Arc<Model>,
        tokenizer: Arc<TextTokenizer>,
        served_model_name: String,
    ) -> Self {
        let mut o = Self::for_model_config(config, &model.config, tokenizer, served_model_name);
        o.engine = Engine::Model(model);
        o
    }

    /// Options for a model config, with the echo engine until the caller sets another.
    pub fn for_model_config(
        config: ClusterConfig,
        model: &ModelConfig,
        tokenizer: Arc<TextTokenizer>,
        served_model_name: String,
    ) -> Self {
        let eos_ids = eos_ids(model, &tokenizer);
        Self {
            max_positions: model.max_position_embeddings,
            engine: Engine::Echo {
                vocab_size: model.vocab_size,
            },
            config,
            grammars: Some(Arc::new(tokenizer.grammar_compiler(eos_ids.clone()))),
            tokenizer,
            served_model_name,
            eos_ids,
            api_keys: Vec::new(),
            fault: None,
            prefill_fault: None,
            ep_rank_loader: None,
        }
    }
}

/// The tokens that end a sequence: config.json's `eos_token_id` (one or a list) and the
/// tokenizer's `eos_token`.
pub fn eos_ids(model: &ModelConfig, tokenizer: &TextTokenizer) -> Vec<u32> {
    {
        let mut eos_ids: Vec<u32> = match &model.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| v as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        };
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        eos_ids
    }
}

/// One role's workers: their engines and EP membership, `ep` ranks per group (1: no EP).
async fn role_engines(
    opts: &ServeOptions,
    role: &str,
    workers: usize,
    ep: usize,
    tp: usize,
) -> Result<Vec<(Engine, Option<EpMember>)>, ServeError> {
    if tp != 1 {
        return Err(ServeError::Config(format!(
            "{role}.tp_size = {tp}: attention tensor parallelism is not implemented in the server"
        )));
    }
    if ep == 1 {
        return Ok(vec![(opts.engine.clone(), None); workers]);
    }
    let Some(load) = &opts.ep_rank_loader else {
        return Err(ServeError::Config(format!(
            "{role}.ep_size = {ep} needs a model loaded per expert-parallel rank"
        )));
    };
    let mut out = Vec::with_capacity(workers);
    for _group in 0..workers / ep {
        let a2a = InProcA2a::group(ep).map_err(|e| ServeError::Config(e.to_string()))?;
        let (coordinator, _) = Actor::spawn(None, EpCoordinator, ep)
            .await
            .map_err(|e| ServeError::Actors(e.to_string()))?;
        for (rank, end) in a2a.into_iter().enumerate() {
            let exchange = Arc::new(A2aExchange::new(
                Arc::new(end),
                tokio::runtime::Handle::current(),
            ));
            let engine = load(rank, ep, exchange)
                .map_err(|e| ServeError::Config(format!("{role} EP rank {rank}: {e}")))?;
            let member = EpMember {
                rank,
                coordinator: coordinator.clone(),
            };
            out.push((engine, Some(member)));
        }
    }
    Ok(out)
}

fn think_ids(tok: &TextTokenizer) -> Option<ThinkIds> {
    let newline = tok.encode("\n", false).ok()?;
    Some(ThinkIds {
        start: tok.token_to_id("<think>")?,
        end: tok.token_to_id("</think>")?,
        newline: *newline.first().filter(|_| newline.len() == 1)?,
    })
}

/// Starts the cluster and the HTTP server; the server runs until `shutdown` resolves, then drains
/// (stops accepting, lets running requests finish within `drain_timeout_s`).
pub async fn start(
    opts: ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(Running, tokio::task::JoinHandle<Result<(), ServeError>>), ServeError> {
    let cfg = &opts.config;
    cfg.validate()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let prefill_engines = role_engines(
        &opts,
        "prefill",
        cfg.prefill.workers,
        cfg.prefill.ep_size,
        cfg.prefill.tp_size,
    )
    .await?;
    let decode_engines = role_engines(
        &opts,
        "decode",
        cfg.decode.groups,
        cfg.decode.ep_size,
        cfg.decode.tp_size,
    )
    .await?;
    let board = new_board();
    let registry = Cluster::spawn_registry(board.clone())
        .await
        .map_err(|e| ServeError::Actors(e.to_string()))?;
    let transport = Arc::new(InProcTransport::new());
    let clock = Clock::start();
    let metrics = Arc::new(Metrics::new());
    let mut workers = Vec::new();
    for (i, (engine, ep)) in prefill_engines.into_iter().enumerate() {
        workers.push((
            Role::Prefill,
            WorkerArgs {
                id: WorkerId(i as u32),
                engine,
                ep,
                kv_pages: cfg.prefill.kv_pages,
                prefix_cache: cfg.prefill.prefix_cache,
                sched: cfg.prefill_sched(),
                registry: registry.clone(),
                kv: KvLink::InProc(transport.clone()),
                clock,
                stats: metrics.workers.clone(),
                fault: if i == 0 { opts.prefill_fault } else { None },
                kv_corrupt: None,
                grammars: opts.grammars.clone(),
            },
        ));
    }
    let first_decode = cfg.prefill.workers as u32;
    for (g, (engine, ep)) in decode_engines.into_iter().enumerate() {
        workers.push((
            Role::Decode,
            WorkerArgs {
                id: WorkerId(first_decode + g as u32),
                engine,
                ep,
                kv_pages: cfg.decode.kv_pages,
                prefix_cache: false,
                sched: cfg.decode_sched(),
                registry: registry.clone(),
                kv: KvLink::InProc(transport.clone()),
                clock,
                stats: metrics.workers.clone(),
                fault: if g == 0 { opts.fault } else { None },
                kv_corrupt: None,
                grammars: opts.grammars.clone(),
            },
        ));
    }
    let cluster = Cluster::start(workers, registry, metrics.clone())
        .await
        .map_err(|e| ServeError::Actors(e.to_string()))?;
    // Workers registered in their pre_start, before the supervisor finished starting; once the
    // registry answers this, the board lists all of them.
    ractor::call!(cluster.registry, RegistryMsg::Sync)
        .map_err(|e| ServeError::Actors(e.to_string()))?;
    let (mut running, server) =
        start_front(opts, listener, shutdown, board, metrics, clock).await?;
    running.cluster = Some(cluster);
    Ok((running, server))
}

/// Starts the gateway actor and the HTTP server over `board` (filled by local workers, or by
/// remote ones through the cluster port). Runs until `shutdown` resolves, then drains.
pub async fn start_front(
    opts: ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    board: crate::registry::SharedBoard,
    metrics: Arc<Metrics>,
    clock: Clock,
) -> Result<(Running, tokio::task::JoinHandle<Result<(), ServeError>>), ServeError> {
    let cfg = &opts.config;
    // A fixed seed: the gateway's choices replay exactly for the same request order.
    let balance = cfg.balance_policy(0x5eed);
    let (gateway, _) = Actor::spawn(
        None,
        Gateway,
        GatewayArgs {
            board: board.clone(),
            // The gateway's picture of each worker's prefix cache holds no more than the worker's
            // own pool: beyond it the worker has evicted, and "cached" would only pull requests
            // to a worker that must recompute them anyway.
            router: PrefillRouterConfig {
                tree_pages_max: cfg.prefill.kv_pages as usize,
                ..PrefillRouterConfig::default()
            },
            balance,
            // Two steps' worth: one running and one ready, so a worker never idles, while the
            // rest waits at the gateway where prefix affinity can still bind it (the simulator's
            // setting too).
            prefill_queued_tokens_max: 2 * cfg.prefill.token_budget as u64,
            commit_new_tokens_max: cfg.decode.reserve_new_tokens.unwrap_or(usize::MAX),
            clock,
        },
    )
    .await
    .map_err(|e| ServeError::Actors(e.to_string()))?;
    let state = Arc::new(AppState {
        gateway,
        think: think_ids(&opts.tokenizer),
        grammars: opts.grammars.clone(),
        tokenizer: opts.tokenizer,
        metrics,
        board,
        limits: HttpLimits {
            inflight_max: cfg.limits.queue_max,
            body_bytes_max: cfg.limits.body_bytes_max,
            n_max: cfg.limits.n_max,
            max_tokens_default: cfg.limits.max_tokens_default,
            request_timeout: Duration::from_secs(cfg.limits.request_timeout_s),
        },
        served_model_name: opts.served_model_name,
        api_keys: crate::gateway::auth::ApiKeys::new(
            opts.api_keys,
            cfg.gateway.auth_exempt_paths.clone(),
        ),
        max_positions: opts.max_positions,
        pool_pages: (cfg.prefill.kv_pages as usize, cfg.decode.kv_pages as usize),
        vocab_size: opts.engine.vocab_size(),
        eos_ids: opts.eos_ids,
        seq_ids: Arc::new(AtomicU64::new(1)),
        worker_counters: Default::default(),
        request_ids: AtomicU64::new(1),
        inflight: AtomicUsize::new(0),
        idle: tokio::sync::Notify::new(),
        draining: AtomicBool::new(false),
        started: Clock::unix_secs(),
    });
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let app = http::router(state.clone());
    // Every SSE event is a small write; without TCP_NODELAY Nagle's algorithm holds each one for
    // up to 40 ms waiting for the client's ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("TCP_NODELAY: {e}");
        }
    });
    let drain = Duration::from_secs(cfg.limits.drain_timeout_s);
    let st = state.clone();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        // Draining keeps the listener open until the last running request ends: `/health` answers
        // 503 so load balancers and rolling restarts see the drain, and new requests get a 503
        // instead of a refused connection. Only then does the server stop accepting.
        let graceful = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            st.draining.store(true, Ordering::Release);
            let _ = drain_tx.send(());
            st.idle().await;
        });
        let mut serving = tokio::spawn(async move { graceful.await });
        // Once draining starts, running requests get `drain` to finish; then the server stops.
        tokio::select! {
            r = &mut serving => {
                return match r {
                    Ok(r) => r.map_err(ServeError::Http),
                    Err(e) => Err(ServeError::Http(std::io::Error::other(e))),
                };
            }
            _ = drain_rx => {}
        }
        match tokio::time::timeout(drain, serving).await {
            Ok(Ok(r)) => r.map_err(ServeError::Http),
            Ok(Err(e)) => Err(ServeError::Http(std::io::Error::other(e))),
            Err(_) => {
                tracing::warn!("drain deadline of {drain:?} passed; exiting with requests running");
                Ok(())
            }
        }
    });
    Ok((
        Running {
            addr,
            state,
            cluster: None,
        },
        server,
    ))
}
