//! `duet serve`: the one-process cluster behind the HTTP API.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::ValueEnum;
use duet_actors::engine::Engine;
use duet_actors::serve::{ServeOptions, start};
use duet_actors::worker::Fault;
use duet_core::config::ClusterConfig;
use duet_model::tokenizer::TextTokenizer;

use crate::DTypeArg;
use duet_kernels::DType;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum EngineArg {
    /// The model (DeepSeek, or the R1 distillations' Qwen2 and Llama) on duet's kernels.
    Model,
    /// A test tool: returns the prompt's tokens without computing, to measure the serving path.
    Echo,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory; the embedded tiny default when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Cluster config (TOML, core's schema); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    /// 9965 by default, as in the PaddleNLP guide.
    #[arg(long)]
    port: Option<u16>,
    #[arg(long)]
    prefill_workers: Option<usize>,
    #[arg(long)]
    decode_groups: Option<usize>,
    /// Sequences one decode group runs at once.
    #[arg(long)]
    max_running: Option<usize>,
    /// KV pages (64 tokens each) per worker.
    #[arg(long)]
    kv_pages: Option<u32>,
    /// Requests admitted at once; one more is answered 429.
    #[arg(long)]
    queue_max: Option<usize>,
    /// Name clients use in `model`; by default the model directory's name ("default" always works).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, value_enum, default_value = "model")]
    engine: EngineArg,
    /// Compute dtype; overrides `[model] dtype` of `--config` (bf16 when neither says).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Test tool: the first decode group panics after this many steps (recovery tests).
    #[arg(long, hide = true)]
    fault_decode_panic_after_steps: Option<u64>,
    /// Test tool: the first prefill worker panics after this many steps (recovery tests).
    #[arg(long, hide = true)]
    fault_prefill_panic_after_steps: Option<u64>,
}

/// The cluster config from `--config`, or the defaults.
pub(crate) fn read_config(path: Option<&std::path::Path>) -> Result<ClusterConfig> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            ClusterConfig::from_toml(&text).with_context(|| format!("in {}", p.display()))
        }
        None => Ok(ClusterConfig::default()),
    }
}

/// `--max-running` and `--kv-pages`, shared by `duet serve` and the worker processes.
pub(crate) fn apply_pool_flags(
    c: &mut ClusterConfig,
    max_running: Option<usize>,
    kv_pages: Option<u32>,
) {
    if let Some(n) = max_running {
        c.decode.max_running = n;
        // A step must be able to hold one decode token per running sequence.
        c.decode.token_budget = c.decode.token_budget.max(n);
    }
    if let Some(n) = kv_pages {
        c.prefill.kv_pages = n;
        c.decode.kv_pages = n;
    }
}

fn config(a: &Args) -> Result<ClusterConfig> {
    let mut c = read_config(a.config.as_deref())?;
    if let Some(h) = &a.host {
        c.gateway.host = h.clone();
    }
    if let Some(p) = a.port {
        c.gateway.port = p;
    }
    if let Some(n) = a.prefill_workers {
        c.prefill.workers = n;
    }
    if let Some(n) = a.decode_groups {
        c.decode.groups = n;
    }
    apply_pool_flags(&mut c, a.max_running, a.kv_pages);
    if let Some(n) = a.queue_max {
        c.limits.queue_max = n;
    }
    c.validate().context("invalid cluster configuration")?;
    Ok(c)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = config(&a)?;
    let dir = match a
        .model
        .clone()
        .or_else(|| cfg.model.path.clone().map(PathBuf::from))
    {
        Some(d) => d,
        None => crate::default_model_dir()?,
    };
    let served = a
        .served_model_name
        .clone()
        .or_else(|| cfg.model.served_model_name.clone())
        .unwrap_or_else(|| {
            dir.file_name()
                .map_or("default".into(), |n| n.to_string_lossy().into_owned())
        });
    let tokenizer = Arc::new(
        TextTokenizer::from_dir(&dir)
            .with_context(|| format!("loading the tokenizer from {}", dir.display()))?,
    );
    let opts = match a.engine {
        EngineArg::Model => {
            let dtype = a.dtype.map_or(cfg.model.dtype.into(), DType::from);
            let model = Arc::new(crate::load_model(&dir, dtype)?);
            ServeOptions::for_model(cfg.clone(), model, tokenizer, served)
        }
        EngineArg::Echo => {
            let cfg_model = duet_model::ModelConfig::from_file(&dir.join("config.json"))?;
            let mut o = ServeOptions::for_model_config(cfg.clone(), &cfg_model, tokenizer, served);
            o.engine = Engine::Echo {
                vocab_size: cfg_model.vocab_size,
            };
            o
        }
    };
    let opts = ServeOptions {
        prefill_fault: a.fault_prefill_panic_after_steps.map(|n| Fault {
            panic_after_steps: n,
        }),
        fault: a.fault_decode_panic_after_steps.map(|n| Fault {
            panic_after_steps: n,
        }),
        ..opts
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", cfg.gateway.host, cfg.gateway.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let (running, server) = start(opts, listener, shutdown_signal()).await?;
        let port = running.addr.port();
        let host = match cfg.gateway.host.as_str() {
            "0.0.0.0" | "::" => "127.0.0.1".to_string(),
            h => h.to_string(),
        };
        println!("duet serving {} at http://{host}:{port}", running.state.served_model_name);
        println!(
            "try: curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'"
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        server.await.context("server task")??;
        eprintln!("duet: drained, exiting");
        Ok(())
    })
}

pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    eprintln!("duet: shutting down: no new requests; draining running ones");
}
