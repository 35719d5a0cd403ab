//! `duet gateway`, `duet prefill`, `duet decode`: the cluster as separate processes.
//!
//! The minimal launch (a contract deploy/ and the tests rely on):
//!   duet gateway --model DIR --port 9965 --cluster-port 9966 --secret-file S
//!   duet prefill --model DIR --join 127.0.0.1:9966 --secret-file S
//!   duet decode  --model DIR --join 127.0.0.1:9966 --secret-file S

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use duet_actors::cluster::Role;
use duet_actors::engine::Engine;
use duet_actors::remote::{self, ModelShape, WorkerProcessOptions};
use duet_actors::serve::ServeOptions;
use duet_core::config::ClusterConfig;
use duet_model::ModelConfig;
use duet_model::tokenizer::TextTokenizer;
use duet_transport::quic::{ClusterSecret, SECRET_BYTES_MIN};

use crate::DTypeArg;
use crate::serve::EngineArg;
use duet_kernels::DType;

#[derive(clap::Args)]
pub struct Common {
    /// Model directory; the embedded tiny default when omitted. Every process of a cluster must
    /// load the same model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Cluster config (TOML, core's schema); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// File holding the cluster secret (at least 16 bytes; a trailing newline is ignored). Every
    /// process of the cluster must read the same one.
    #[arg(long)]
    secret_file: PathBuf,
    /// Compute dtype; overrides `[model] dtype` of `--config` (bf16 when neither says).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    #[arg(long, value_enum, default_value = "model")]
    engine: EngineArg,
}

#[derive(clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    common: Common,
    /// Address to bind the HTTP API and the cluster port; 127.0.0.1 by default, so workers on
    /// other hosts need `--host` (e.g. `0.0.0.0`).
    #[arg(long)]
    host: Option<String>,
    /// HTTP port (9965 by default).
    #[arg(long)]
    port: Option<u16>,
    /// Where workers join (QUIC; 9966 by default).
    #[arg(long)]
    cluster_port: Option<u16>,
    /// Requests admitted at once; one more is answered 429.
    #[arg(long)]
    queue_max: Option<usize>,
    #[arg(long)]
    served_model_name: Option<String>,
    /// A Jinja chat template used instead of the checkpoint's (see `duet serve --chat-template`).
    #[arg(long, value_name = "FILE")]
    chat_template: Option<std::path::PathBuf>,
    #[command(flatten)]
    api_keys: crate::serve::ApiKeyArgs,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    common: Common,
    /// The gateway's cluster address (host:port).
    #[arg(long)]
    join: String,
    /// Workers this process runs (prefill workers, or decode DP groups).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// KV pages (64 tokens each) per worker.
    #[arg(long)]
    kv_pages: Option<u32>,
    /// Sequences one decode group runs at once.
    #[arg(long)]
    max_running: Option<usize>,
    /// Decode: where to receive KV over QUIC (0.0.0.0:0 listens everywhere on a free port and
    /// advertises the address this host uses to reach the gateway).
    #[arg(long, default_value = "0.0.0.0:0")]
    kv_addr: SocketAddr,
    /// How KV moves from prefill to decode: QUIC, or UCX (RDMA on InfiniBand/RoCE, shared
    /// memory or tcp elsewhere; needs a duet built with `--features ucx`). Every process of a
    /// cluster must use the same.
    #[arg(long, value_enum, default_value = "quic")]
    kv_transport: KvTransportArg,
    /// UCX transports to use (as UCX_TLS, e.g. "rc,sm,self" or "tcp"); UCX's own choice if unset.
    #[arg(long)]
    ucx_tls: Option<String>,
    /// Serve this process's `/health` and `/metrics` on this port, on every interface (for
    /// Prometheus and service checks; 0 picks a free port). Overrides `metrics_port` of the
    /// role's section in `--config`; unset in both: not served.
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Test tool: flip a byte in the next N KV frames sent, after checksumming (recovery tests).
    #[arg(long, hide = true, default_value_t = 0)]
    fault_corrupt_kv_frames: u64,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum KvTransportArg {
    Quic,
    Ucx,
}

fn read_secret(path: &Path) -> Result<ClusterSecret> {
    let mut bytes = std::fs::read(path)
        .with_context(|| format!("reading the cluster secret {}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.len() < SECRET_BYTES_MIN {
        bail!(
            "the cluster secret in {} is {} bytes; at least {SECRET_BYTES_MIN} are needed \
             (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
            path.display(),
            bytes.len(),
            path.display()
        );
    }
    ClusterSecret::new(&bytes).map_err(|e| anyhow::anyhow!("{e}"))
}

fn model_dir(c: &Common, cfg: &ClusterConfig) -> Result<PathBuf> {
    match c
        .model
        .clone()
        .or_else(|| cfg.model.path.clone().map(PathBuf::from))
    {
        Some(d) => Ok(d),
        None => crate::default_model_dir(),
    }
}

fn shape(model: &ModelConfig, page_bytes: u64) -> Result<ModelShape> {
    let architecture = model
        .architecture()
        .map_err(|e| anyhow::anyhow!("config.json: {e}"))?;
    Ok(ModelShape {
        layers: model.num_hidden_layers as u32,
        page_bytes,
        vocab_size: model.vocab_size as u64,
        architecture: format!("{architecture:?}"),
        kv_width: u32::try_from(model.kv_width()).context("KV width")?,
    })
}

fn announce() -> Box<dyn Fn(String) + Send + Sync> {
    Box::new(|line| {
        println!("{line}");
        let _ = std::io::stdout().flush();
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

pub fn run_gateway(a: GatewayArgs) -> Result<()> {
    let mut cfg = crate::serve::read_config(a.common.config.as_deref())?;
    if let Some(h) = &a.host {
        cfg.gateway.host = h.clone();
    }
    if let Some(p) = a.port {
        cfg.gateway.port = p;
    }
    if let Some(p) = a.cluster_port {
        cfg.gateway.cluster_port = p;
    }
    if let Some(n) = a.queue_max {
        cfg.limits.queue_max = n;
    }
    cfg.validate().context("invalid cluster configuration")?;
    let api_keys = a.api_keys.keys(&cfg)?;
    let secret = read_secret(&a.common.secret_file)?;
    let dir = model_dir(&a.common, &cfg)?;
    let model = ModelConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    let tokenizer = Arc::new(crate::serve::load_tokenizer(
        &dir,
        a.chat_template.as_deref(),
        &cfg,
    )?);
    let served = a
        .served_model_name
        .clone()
        .or_else(|| cfg.model.served_model_name.clone())
        .unwrap_or_else(|| {
            dir.file_name()
                .map_or("default".into(), |n| n.to_string_lossy().into_owned())
        });
    // The gateway never runs the model: it renders, tokenizes, routes and streams.
    let mut opts = ServeOptions::for_model_config(cfg.clone(), &model, tokenizer, served);
    opts.api_keys = api_keys;
    let shape = shape(&model, 0)?;
    runtime()?.block_on(async move {
        let addr = format!("{}:{}", cfg.gateway.host, cfg.gateway.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let cluster: SocketAddr = format!("{}:{}", cfg.gateway.host, cfg.gateway.cluster_port)
            .to_socket_addrs()
            .with_context(|| format!("cluster address {}", cfg.gateway.host))?
            .next()
            .context("cluster address resolves to nothing")?;
        let g = remote::start_gateway(
            opts,
            shape,
            listener,
            cluster,
            secret,
            crate::serve::shutdown_signal(),
            announce(),
        )
        .await?;
        // The addresses actually bound (the OS's ports for `--port 0`).
        println!(
            "duet gateway serving {} at http://{} ; workers join at {}",
            g.running.state.served_model_name, g.running.addr, g.cluster_addr
        );
        let _ = std::io::stdout().flush();
        g.server.await.context("server task")??;
        eprintln!("duet: drained, exiting");
        Ok(())
    })
}

pub fn run_worker(role: Role, a: WorkerArgs) -> Result<()> {
    let mut cfg = crate::serve::read_config(a.common.config.as_deref())?;
    crate::serve::apply_pool_flags(&mut cfg, a.max_running, a.kv_pages);
    cfg.validate().context("invalid cluster configuration")?;
    if a.workers == 0 || a.workers > remote::hub::WORKERS_PER_PROCESS_MAX {
        bail!(
            "--workers must be 1 to {}",
            remote::hub::WORKERS_PER_PROCESS_MAX
        );
    }
    let secret = read_secret(&a.common.secret_file)?;
    let join = a
        .join
        .to_socket_addrs()
        .with_context(|| format!("--join {}", a.join))?
        .next()
        .with_context(|| format!("--join {} resolves to nothing", a.join))?;
    let dir = model_dir(&a.common, &cfg)?;
    let model_cfg = ModelConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    let engine = match a.common.engine {
        EngineArg::Model => {
            let dtype = a.common.dtype.map_or(cfg.model.dtype.into(), DType::from);
            Engine::Model(Arc::new(crate::load_model(&dir, dtype)?))
        }
        EngineArg::Echo => Engine::Echo {
            vocab_size: model_cfg.vocab_size,
        },
    };
    // The workers compile the grammars of constrained sequences over the model's vocabulary.
    let grammars = match &engine {
        Engine::Model(_) => {
            let tokenizer = TextTokenizer::from_dir(&dir).with_context(|| {
                format!(
                    "loading the tokenizer from {} (a worker compiles constrained sequences' \
                     grammars over the model's vocabulary)",
                    dir.display()
                )
            })?;
            let eos = duet_actors::serve::eos_ids(&model_cfg, &tokenizer);
            Some(Arc::new(tokenizer.grammar_compiler(eos)))
        }
        Engine::Echo { .. } => None,
    };
    let page_bytes = match engine.new_kv(1) {
        duet_actors::engine::WorkerKv::Model(c) => c.page_bytes() as u64,
        duet_actors::engine::WorkerKv::Echo => 0,
    };
    let name = format!(
        "{}-{}",
        match role {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        },
        std::process::id()
    );
    let metrics_port = a.metrics_port.or(match role {
        Role::Prefill => cfg.prefill.metrics_port,
        Role::Decode => cfg.decode.metrics_port,
    });
    let drain = std::time::Duration::from_secs(cfg.limits.drain_timeout_s);
    let opts = WorkerProcessOptions {
        metrics_addr: metrics_port.map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
        role,
        engine,
        shape: shape(&model_cfg, page_bytes)?,
        config: cfg,
        workers: a.workers,
        join,
        secret,
        kv_bind: a.kv_addr,
        kv_transport: match a.kv_transport {
            KvTransportArg::Quic => duet_actors::dataplane::DataKind::Quic,
            KvTransportArg::Ucx => duet_actors::dataplane::DataKind::Ucx {
                tls: a.ucx_tls.clone(),
            },
        },
        kv_corrupt_frames: a.fault_corrupt_kv_frames,
        grammars,
        name,
        announce: announce(),
    };
    runtime()?.block_on(async move {
        let mut process = remote::start_worker(opts).await?;
        if let Some(addr) = process.endpoint {
            println!("health and metrics: http://{addr}/health http://{addr}/metrics");
            let _ = std::io::stdout().flush();
        }
        tokio::select! {
            r = &mut process.link => return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
                Err(e) => Err(anyhow::anyhow!("worker link task: {e}")),
            },
            () = crate::serve::shutdown_signal() => {}
        }
        // The drain: the gateway places nothing new here, the sequences held run to their end
        // (a rolling restart loses none and re-runs none), then the process exits. A second
        // signal, or the drain deadline, exits at once; the gateway re-runs what is left.
        eprintln!(
            "duet: draining: no new sequences; finishing the {} held (at most {drain:?})",
            process.held()
        );
        let left = tokio::select! {
            left = process.drain(drain) => left,
            () = crate::serve::shutdown_signal() => process.held(),
        };
        if left > 0 {
            eprintln!("duet: exiting with {left} sequences held; the gateway re-runs them");
        } else {
            eprintln!("duet: drained, exiting");
        }
        Ok(())
    })
}
