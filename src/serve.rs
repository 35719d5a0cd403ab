//! `duet serve`: the one-process cluster behind the HTTP API.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use duet_actors::engine::Engine;
use duet_actors::serve::{ServeOptions, start};
use duet_actors::worker::Fault;
use duet_core::config::ClusterConfig;
use duet_core::ep::ExpertMap;
use duet_model::tokenizer::TextTokenizer;
use duet_model::{EpRank, Model};

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
    /// Address to bind; 127.0.0.1 by default (`0.0.0.0` for every interface).
    #[arg(long)]
    host: Option<String>,
    /// 9965 by default, as in the PaddleNLP guide.
    #[arg(long)]
    port: Option<u16>,
    #[arg(long)]
    prefill_workers: Option<usize>,
    #[arg(long)]
    decode_groups: Option<usize>,
    /// Expert parallelism: each prefill worker and each decode group becomes an EP group of N
    /// ranks in this process. Each rank runs attention on its own batch (a DP rank the gateway
    /// balances over) and holds 1/N of every MoE layer's routed experts; the ranks exchange
    /// token rows in every MoE layer and step together. Sets `ep_size` of both roles.
    #[arg(long, value_name = "N")]
    ep: Option<usize>,
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
    /// A Jinja chat template used instead of the checkpoint's (tokenizer_config.json), for every
    /// request; overrides `[model] chat_template` of `--config`.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "model")]
    engine: EngineArg,
    #[command(flatten)]
    api_keys: ApiKeyArgs,
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

/// Who may call the HTTP API, shared by `duet serve` and `duet gateway`.
#[derive(clap::Args)]
pub(crate) struct ApiKeyArgs {
    /// A key clients must send as `Authorization: Bearer KEY` (repeatable). Keys also come from
    /// `--api-key-file`, `[gateway] api_key_file` and the DUET_API_KEY environment variable; with
    /// none the API is open to every caller that can reach it.
    #[arg(long = "api-key", value_name = "KEY")]
    api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and lines starting with `#` are skipped).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
}

impl ApiKeyArgs {
    /// Every key from the flags, the key files and DUET_API_KEY.
    pub(crate) fn keys(&self, cfg: &ClusterConfig) -> Result<Vec<String>> {
        let mut keys = self.api_key.clone();
        let files = self
            .api_key_file
            .iter()
            .cloned()
            .chain(cfg.gateway.api_key_file.iter().map(PathBuf::from));
        for f in files {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("reading API keys from {}", f.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        if let Ok(k) = std::env::var("DUET_API_KEY")
            && !k.trim().is_empty()
        {
            keys.push(k.trim().to_string());
        }
        // A key a client cannot send in a header would lock everyone out without a word.
        // (Which key, by position: key material stays out of logs.)
        if let Some(i) = keys
            .iter()
            .position(|k| k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            anyhow::bail!(
                "API key #{} (flags first, then files, then DUET_API_KEY) is empty or contains \
                 whitespace or control characters",
                i + 1
            );
        }
        Ok(keys)
    }
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
    if let Some(n) = a.ep {
        if n == 0 {
            bail!("--ep must be at least 1");
        }
        c.prefill.workers *= n;
        c.decode.groups *= n;
        c.prefill.ep_size = n;
        c.decode.ep_size = n;
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
    let api_keys = a.api_keys.keys(&cfg)?;
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
    let tokenizer = Arc::new(load_tokenizer(&dir, a.chat_template.as_deref(), &cfg)?);
    let opts = match a.engine {
        EngineArg::Model => {
            let dtype = a.dtype.map_or(cfg.model.dtype.into(), DType::from);
            let model_cfg = duet_model::ModelConfig::from_file(&dir.join("config.json"))?;
            let experts = model_cfg.n_routed_experts.unwrap_or(0);
            // With every role expert-parallel no worker runs the whole model: each rank loads its
            // own shard below, and the whole model is never loaded.
            let mut o = if cfg.prefill.ep_size > 1 && cfg.decode.ep_size > 1 {
                ServeOptions::for_model_config(cfg.clone(), &model_cfg, tokenizer, served)
            } else {
                let model = Arc::new(crate::load_model(&dir, dtype)?);
                ServeOptions::for_model(cfg.clone(), model, tokenizer, served)
            };
            let dir = dir.clone();
            o.ep_rank_loader = Some(Arc::new(move |me, ranks, exchange| {
                let map = ExpertMap::static_sharding(experts, ranks).map_err(|e| e.to_string())?;
                let ep = EpRank { me, map, exchange };
                let m = Model::load_ep_rank(&dir, dtype, &|_| {}, ep).map_err(|e| e.to_string())?;
                Ok(Engine::Model(Arc::new(m)))
            }));
            o
        }
        EngineArg::Echo => {
            let cfg_model = duet_model::ModelConfig::from_file(&dir.join("config.json"))?;
            let mut o = ServeOptions::for_model_config(cfg.clone(), &cfg_model, tokenizer, served);
            let vocab_size = cfg_model.vocab_size;
            o.engine = Engine::Echo { vocab_size };
            // EP ranks of the echo engine compute nothing, but step together as model ranks do.
            o.ep_rank_loader = Some(Arc::new(move |_, _, _| Ok(Engine::Echo { vocab_size })));
            o
        }
    };
    let opts = ServeOptions {
        api_keys,
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
        // The address actually bound (the OS's port for `--port 0`).
        let addr = running.addr;
        println!("duet serving {} at http://{addr}", running.state.served_model_name);
        let auth = if running.state.api_keys.enabled() {
            " -H 'Authorization: Bearer <key>'"
        } else {
            ""
        };
        println!(
            "try: curl http://{addr}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'"
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

/// The checkpoint's tokenizer, with the chat template of `--chat-template` (or the config's
/// `[model] chat_template`) in place of its own when one is given.
pub fn load_tokenizer(
    dir: &std::path::Path,
    flag: Option<&std::path::Path>,
    cfg: &duet_core::config::ClusterConfig,
) -> anyhow::Result<TextTokenizer> {
    let mut tokenizer = TextTokenizer::from_dir(dir)
        .with_context(|| format!("loading the tokenizer from {}", dir.display()))?;
    let path = flag
        .map(PathBuf::from)
        .or_else(|| cfg.model.chat_template.as_ref().map(PathBuf::from));
    if let Some(path) = path {
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the chat template {}", path.display()))?;
        tokenizer
            .set_chat_template(source)
            .with_context(|| format!("chat template {}", path.display()))?;
    }
    Ok(tokenizer)
}
