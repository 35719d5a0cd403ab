//! The cluster across processes and hosts: `duet gateway` (HTTP front, routing, the cluster port)
//! and `duet prefill` / `duet decode` worker processes that join it.
//!
//! Control messages (`wire.rs`, rkyv) travel over authenticated QUIC connections
//! (`duet_transport::control`); KV goes from prefill to decode directly over QUIC
//! (`duet_transport::quic`). The gateway side is `hub.rs`, the worker side `link.rs`.

pub mod endpoint;
pub mod forward;
pub mod hub;
pub mod link;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use duet_core::config::ClusterConfig;
use duet_core::types::WorkerId;
use duet_transport::control::ControlListener;
use duet_transport::quic::ClusterSecret;

use crate::clock::Clock;
use crate::cluster::{Cluster, Role, new_board};
use crate::dataplane::{DataKind, DataPlane};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::protocol::RegistryMsg;
use crate::serve::{Running, ServeError, ServeOptions, start_front};
use crate::worker::{KvLink, WorkerArgs};
pub use hub::Hub;
pub use link::LinkError;
pub use wire::{ModelShape, PROTOCOL_VERSION};

/// A worker process reports its workers at least this often, load changed or not: the heartbeat
/// the gateway's [`hub::HEARTBEAT_TIMEOUT`] waits for.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// How often a worker process looks for load changes to report (the gateway routes on them).
/// A draining worker process repeats `Draining` this often until the gateway releases it.
pub const DRAIN_RESEND_INTERVAL: Duration = Duration::from_millis(50);
pub const LOAD_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A running `duet gateway`.
pub struct GatewayProcess {
    pub running: Running,
    pub server: tokio::task::JoinHandle<Result<(), ServeError>>,
    pub cluster_addr: SocketAddr,
    pub hub: Arc<Hub>,
}

/// Starts the gateway: HTTP on `listener`, the cluster port on `cluster_addr`. Workers appear on
/// the board as they join.
pub async fn start_gateway(
    opts: ServeOptions,
    shape: ModelShape,
    listener: tokio::net::TcpListener,
    cluster_addr: SocketAddr,
    secret: ClusterSecret,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    announce: Box<dyn Fn(String) + Send + Sync>,
) -> Result<GatewayProcess, ServeError> {
    opts.config
        .validate()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let board = new_board();
    let registry = Cluster::spawn_registry(board.clone())
        .await
        .map_err(|e| ServeError::Actors(e.to_string()))?;
    let control = ControlListener::bind(cluster_addr, secret, PROTOCOL_VERSION).map_err(|e| {
        ServeError::Bind {
            addr: cluster_addr.to_string(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    let cluster_addr = control
        .local_addr()
        .map_err(|e| ServeError::Actors(e.to_string()))?;
    let hub = Hub::new(registry, shape, announce);
    tokio::spawn(hub.clone().serve(control));
    let metrics = Arc::new(Metrics::new());
    let (running, server) =
        start_front(opts, listener, shutdown, board, metrics, Clock::start()).await?;
    Ok(GatewayProcess {
        running,
        server,
        cluster_addr,
        hub,
    })
}

pub struct WorkerProcessOptions {
    pub role: Role,
    pub engine: Engine,
    pub shape: ModelShape,
    pub config: ClusterConfig,
    /// Workers (prefill workers or decode DP groups) this process runs.
    pub workers: usize,
    pub join: SocketAddr,
    pub secret: ClusterSecret,
    /// Decode: where to receive KV (an unspecified IP listens everywhere and advertises the
    /// address this host uses to reach the gateway).
    pub kv_bind: SocketAddr,
    pub kv_transport: DataKind,
    /// Where to serve this process's `/health` and `/metrics` (none: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// Test tool: corrupt this many of the KV frames the process sends (see `WorkerArgs`).
    pub kv_corrupt_frames: u64,
    /// Compiles the grammars of constrained sequences (`None` for the echo engine).
    pub grammars: Option<Arc<duet_model::grammar::GrammarCompiler>>,
    pub name: String,
    pub announce: Box<dyn Fn(String) + Send + Sync>,
}

/// Worker ids are drawn at random so processes need no coordinator; the gateway refuses a
/// duplicate (2⁻³² per pair).
fn random_id(i: usize) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    // RandomState's keys come from the OS's randomness once per process (then vary per
    // instance): enough to tell processes apart without reading the clock.
    h.write_u32(std::process::id());
    h.write_usize(i);
    // Above the ids `duet serve` uses, so logs never confuse the two.
    (h.finish() as u32) | 0x1000_0000
}

/// The address this host uses to reach `peer` (no packet is sent: a UDP connect only routes).
fn local_ip_towards(peer: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(peer)?;
    Ok(s.local_addr()?.ip())
}

/// Starts a worker process's workers and its link to the gateway. The returned task ends only
/// with a fatal refusal (wrong credential, another model).
pub async fn start_worker(o: WorkerProcessOptions) -> Result<WorkerProcess, ServeError> {
    o.config
        .validate()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let setup = |e: &dyn std::fmt::Display| ServeError::Actors(e.to_string());
    let board = new_board();
    let registry = Cluster::spawn_registry(board.clone())
        .await
        .map_err(|e| setup(&e))?;
    let (kv, data, kv_addr) =
        match o.role {
            Role::Decode => {
                let plane = DataPlane::receiver(&o.kv_transport, o.kv_bind, o.secret.clone())
                    .map_err(|e| ServeError::Bind {
                        addr: o.kv_bind.to_string(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                let kv_addr = match plane.quic_port() {
                    Some(port) => {
                        let ip = if o.kv_bind.ip().is_unspecified() {
                            local_ip_towards(o.join).map_err(|e| setup(&e))?
                        } else {
                            o.kv_bind.ip()
                        };
                        Some(SocketAddr::new(ip, port).to_string())
                    }
                    None => None,
                };
                let plane = Arc::new(plane);
                let link = KvLink::Net {
                    send: plane.transport(),
                    recv: Some(plane.clone()),
                };
                (link, plane, kv_addr)
            }
            Role::Prefill => {
                let local: SocketAddr = if o.join.is_ipv4() {
                    "0.0.0.0:0".parse().expect("literal")
                } else {
                    "[::]:0".parse().expect("literal")
                };
                let plane = Arc::new(
                    DataPlane::sender(&o.kv_transport, local, o.secret.clone())
                        .map_err(|e| setup(&e))?,
                );
                let link = KvLink::Net {
                    send: plane.transport(),
                    recv: None,
                };
                (link, plane, None)
            }
        };
    let clock = Clock::start();
    let metrics = Arc::new(Metrics::new());
    let kv_corrupt = (o.kv_corrupt_frames > 0)
        .then(|| Arc::new(std::sync::atomic::AtomicU64::new(o.kv_corrupt_frames)));
    let ids: Vec<u32> = (0..o.workers).map(random_id).collect();
    let workers = ids
        .iter()
        .map(|&id| {
            let (kv_pages, prefix_cache, sched) = match o.role {
                Role::Prefill => (
                    o.config.prefill.kv_pages,
                    o.config.prefill.prefix_cache,
                    o.config.prefill_sched(),
                ),
                Role::Decode => (o.config.decode.kv_pages, false, o.config.decode_sched()),
            };
            (
                o.role,
                WorkerArgs {
                    id: WorkerId(id),
                    engine: o.engine.clone(),
                    kv_pages,
                    prefix_cache,
                    sched,
                    registry: registry.clone(),
                    kv: kv.clone(),
                    clock,
                    stats: metrics.workers.clone(),
                    fault: None,
                    ep: None,
                    kv_corrupt: kv_corrupt.clone(),
                    grammars: o.grammars.clone(),
                },
            )
        })
        .collect();
    let cluster = Cluster::start(workers, registry, metrics.clone())
        .await
        .map_err(|e| setup(&e))?;
    ractor::call!(cluster.registry, RegistryMsg::Sync).map_err(|e| setup(&e))?;
    let endpoint = match o.metrics_addr {
        Some(addr) => {
            let bind = |e: std::io::Error| ServeError::Bind {
                addr: addr.to_string(),
                source: e,
            };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
            let bound = endpoint::spawn(listener, o.role, o.workers, board.clone(), metrics)
                .map_err(bind)?;
            Some(bound)
        }
        None => None,
    };
    let hello = wire::Hello {
        role: match o.role {
            Role::Prefill => wire::WireRole::Prefill,
            Role::Decode => wire::WireRole::Decode,
        },
        workers: ids,
        kv_addr,
        kv_transport: match o.kv_transport {
            DataKind::Quic => wire::WireKvTransport::Quic,
            DataKind::Ucx { .. } => wire::WireKvTransport::Ucx,
        },
        parallelism: {
            let (ep, tp) = match o.role {
                Role::Prefill => (o.config.prefill.ep_size, o.config.prefill.tp_size),
                Role::Decode => (o.config.decode.ep_size, o.config.decode.tp_size),
            };
            wire::WireParallelism {
                ep_group: 0,
                ep_size: u32::try_from(ep).unwrap_or(u32::MAX),
                tp_size: u32::try_from(tp).unwrap_or(u32::MAX),
            }
        },
        shape: o.shape,
        name: o.name,
    };
    let (drain, drain_rx) = tokio::sync::watch::channel(false);
    let state = link::LinkState::new(data.clone());
    let args = link::LinkArgs {
        join: o.join,
        secret: o.secret,
        hello,
        board,
        data,
        announce: o.announce,
        drain: drain_rx,
    };
    let link = tokio::spawn({
        let state = state.clone();
        async move {
            // The supervisor lives as long as the link.
            let _cluster = cluster;
            link::run(args, state).await
        }
    });
    Ok(WorkerProcess {
        link,
        endpoint,
        drain,
        state,
    })
}

/// A running `duet prefill` / `duet decode`.
pub struct WorkerProcess {
    /// Ends only with a fatal refusal (wrong credential, another model).
    pub link: tokio::task::JoinHandle<Result<(), LinkError>>,
    /// Where `/health` and `/metrics` are served, if they are.
    pub endpoint: Option<SocketAddr>,
    drain: tokio::sync::watch::Sender<bool>,
    state: link::LinkState,
}

impl WorkerProcess {
    /// Drains: the gateway places nothing new here; returns once every sequence the process
    /// holds finished or was handed over and the gateway confirmed nothing more is on its way
    /// (or, with the gateway unreachable, once nothing is held), or when `timeout` passed (then
    /// the gateway re-runs what is left when the process goes). Returns the sequences still held.
    pub async fn drain(&self, timeout: std::time::Duration) -> usize {
        self.drain.send_replace(true);
        let deadline = crate::clock::Clock::deadline(timeout);
        while !self.state.drained() && crate::clock::Clock::instant() < deadline {
            tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
        }
        self.state.held()
    }

    /// Sequences the process holds now.
    pub fn held(&self) -> usize {
        self.state.held()
    }
}

/// How often a draining process looks whether its last sequence ended.
const DRAIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
