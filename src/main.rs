//! The `duet` command line. Everything here is argument parsing and printing; the work is in the
//! library crates.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use duet_model::generate::{GenerateRequest, generate};
use duet_model::sampling::SamplingParams;
use duet_model::tiny::{TinyArch, write_random_model, write_tiny_model};
use duet_model::tokenizer::TextTokenizer;
use duet_model::{DType, LogitsMode, Model, SeqInput};
use serde_json::json;

mod calibrate_cpu;
mod cluster_cli;
mod engine_bench;
mod otel;
mod serve;
mod sim_cli;

#[derive(Parser)]
#[command(
    name = "duet",
    version,
    about = "Disaggregated prefill/decode serving for DeepSeek-V3/R1"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    otlp: otel::OtlpArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the logits of every input position as one JSON object {"logits": [[...], ...]}.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
    },
    /// Generate a continuation of token ids or a text prompt.
    Generate {
        /// Model directory; the embedded tiny default when omitted.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(
            long,
            value_delimiter = ',',
            conflicts_with = "prompt",
            required_unless_present = "prompt"
        )]
        ids: Option<Vec<u32>>,
        #[arg(long)]
        prompt: Option<String>,
        /// Wrap the prompt as one user message in the model's chat template.
        #[arg(long, requires = "prompt")]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 disables.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        #[arg(long)]
        seed: Option<u64>,
        /// Print {"ids": [...], "text": "..."} instead of the text.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DTypeArg,
    },
    /// Write a random-weight checkpoint in the released layout (DeepSeek with the R1 tokenizer;
    /// qwen2/llama: R1-Distill-Qwen/-Llama's architecture and tokenizer).
    TinyModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "v3")]
        arch: TinyArch,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A JSON object merged into the config: a real model's dimensions for a random
        /// checkpoint of its shape, e.g. '{"hidden_size": 1536, "num_hidden_layers": 28}'.
        #[arg(long)]
        config_overrides: Option<String>,
    },
    /// Measure the engine: prefill and decode tokens/s (see BENCHMARKS.md).
    EngineBench(engine_bench::Args),
    /// Serve the OpenAI-compatible API: gateway, prefill and decode actors in one process.
    Serve(serve::Args),
    /// The cluster's front as its own process: HTTP API, routing, and the port workers join.
    Gateway(cluster_cli::GatewayArgs),
    /// A prefill worker process that joins a gateway (`--join HOST:PORT`).
    Prefill(cluster_cli::WorkerArgs),
    /// A decode worker process (one or more DP groups) that joins a gateway.
    Decode(cluster_cli::WorkerArgs),
    /// Load generator for a running server, in the manner of SGLang's bench_serving.
    Bench(duet_loadgen::Args),
    /// Simulate a PD cluster in virtual time with core's policies and a calibrated cost model.
    Sim(sim_cli::SimArgs),
    /// Search P:D node counts, EP sizes and batch caps for the smallest cluster meeting an SLO.
    Plan(sim_cli::PlanArgs),
    /// Time the engine on this CPU and write a device profile for `duet sim --gpu FILE.toml`.
    SimCalibrateCpu(calibrate_cpu::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let service = match &cli.cmd {
        Cmd::Gateway(_) => "duet-gateway",
        Cmd::Prefill(_) => "duet-prefill",
        Cmd::Decode(_) => "duet-decode",
        _ => "duet",
    };
    // Warnings (lost workers, re-runs, refused peers) to stderr; RUST_LOG overrides. Traces when
    // an OTLP endpoint is configured; flushed when `_telemetry` drops, after the command.
    let _telemetry = otel::init(&cli.otlp, service)?;
    match cli.cmd {
        Cmd::Logits { model, ids, dtype } => logits(&model, &ids, dtype.into()),
        Cmd::Generate {
            model,
            ids,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            json,
            dtype,
        } => {
            let sampling = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed,
            };
            sampling.validate().map_err(anyhow::Error::msg)?;
            let dir = match model {
                Some(d) => d,
                None => default_model_dir()?,
            };
            let input = match (ids, prompt) {
                (Some(ids), _) => Input::Ids(ids),
                (None, Some(p)) => Input::Text { prompt: p, chat },
                (None, None) => bail!("give --ids or --prompt"),
            };
            run_generate(&dir, input, max_tokens, sampling, json, dtype.into())
        }
        Cmd::TinyModel {
            out,
            arch,
            seed,
            config_overrides,
        } => {
            let overrides = match config_overrides {
                Some(text) => {
                    match serde_json::from_str(&text).context("--config-overrides is not JSON")? {
                        serde_json::Value::Object(m) => m,
                        _ => bail!("--config-overrides must be a JSON object"),
                    }
                }
                None => Default::default(),
            };
            write_random_model(&out, arch, seed, &overrides)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote a random {arch:?} checkpoint to {}", out.display());
            Ok(())
        }
        Cmd::EngineBench(args) => engine_bench::run(args),
        Cmd::Bench(args) => Ok(duet_loadgen::run(args)?),
        Cmd::Serve(args) => serve::run(args),
        Cmd::Gateway(args) => cluster_cli::run_gateway(args),
        Cmd::Prefill(args) => cluster_cli::run_worker(duet_actors::cluster::Role::Prefill, args),
        Cmd::Decode(args) => cluster_cli::run_worker(duet_actors::cluster::Role::Decode, args),
        Cmd::Sim(args) => sim_cli::run_sim(args),
        Cmd::Plan(args) => sim_cli::run_plan(args),
        Cmd::SimCalibrateCpu(args) => calibrate_cpu::run(args),
    }
}

/// Loads a model with a progress bar on a terminal.
pub fn load_model(dir: &Path, dtype: DType) -> Result<Model> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {msg} [{bar:40}] {bytes}/{total_bytes} ({eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b.set_message(dir.display().to_string());
        b
    });
    let progress = |p: duet_model::LoadProgress| {
        if let Some(b) = &bar {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
        }
    };
    let model = Model::load(dir, dtype, &progress)
        .with_context(|| format!("loading model from {}", dir.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(model)
}

fn logits(dir: &Path, ids: &[u32], dtype: DType) -> Result<()> {
    let model = load_model(dir, dtype)?;
    if ids.is_empty() {
        bail!("--ids is empty");
    }
    let mut cache = model.new_cache(ids.len().div_ceil(duet_kernels::ops::PAGE_TOKENS));
    let mut table = Vec::new();
    cache.ensure(&mut table, ids.len())?;
    let out = model.forward(
        &mut cache,
        &[SeqInput {
            tokens: ids,
            start_pos: 0,
            block_table: &table,
        }],
        LogitsMode::All,
    )?;
    let vocab = model.config.vocab_size;
    let v = out.to_vec_f32();
    let rows: Vec<&[f32]> = v.chunks(vocab).collect();
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut stdout, &json!({ "logits": rows }))?;
    writeln!(stdout)?;
    Ok(())
}

enum Input {
    Ids(Vec<u32>),
    Text { prompt: String, chat: bool },
}

fn run_generate(
    dir: &Path,
    input: Input,
    max_tokens: usize,
    sampling: SamplingParams,
    as_json: bool,
    dtype: DType,
) -> Result<()> {
    let tokenizer = match TextTokenizer::from_dir(dir) {
        Ok(t) => Some(t),
        Err(e) if matches!(input, Input::Ids(_)) => {
            eprintln!("note: no tokenizer ({e}); printing ids only");
            None
        }
        Err(e) => return Err(e).context("a text prompt needs the model's tokenizer"),
    };
    let prompt = match &input {
        Input::Ids(ids) => ids.clone(),
        Input::Text { prompt, chat: true } => {
            let tok = tokenizer.as_ref().expect("loaded above for text input");
            let messages = json!([{ "role": "user", "content": prompt }]);
            tok.apply_chat_template(&messages, None, true)?.1
        }
        Input::Text {
            prompt,
            chat: false,
        } => tokenizer
            .as_ref()
            .expect("loaded above for text input")
            .encode(prompt, true)?,
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let model = load_model(dir, dtype)?;
    let mut stop_ids = model.config.eos_ids();
    if let Some(id) = tokenizer
        .as_ref()
        .and_then(|t| t.eos_token.as_deref().and_then(|e| t.token_to_id(e)))
    {
        stop_ids.push(id);
    }
    let pages = (prompt.len() + max_tokens).div_ceil(duet_kernels::ops::PAGE_TOKENS) + 1;
    let mut cache = model.new_cache(pages);
    let started = Instant::now();
    let req = GenerateRequest {
        prompt,
        max_tokens,
        sampling,
        stop_ids,
    };
    let out = generate(&model, &mut cache, std::slice::from_ref(&req))?.remove(0);
    let elapsed = started.elapsed();
    let text = match &tokenizer {
        Some(t) => Some(t.decode(&out, true)?),
        None => None,
    };
    if as_json {
        println!("{}", json!({ "ids": out, "text": text }));
    } else {
        match text {
            Some(t) => println!("{t}"),
            None => println!(
                "{}",
                out.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            ),
        }
    }
    if std::io::stderr().is_terminal() {
        eprintln!("[{} tokens in {:.2} s]", out.len(), elapsed.as_secs_f64());
    }
    Ok(())
}

/// The embedded default model: `duet tiny-model --arch v3 --seed 0`, generated once into the
/// cache directory (`$DUET_CACHE_DIR`, else `$XDG_CACHE_HOME/duet`, else `~/.cache/duet`).
pub fn default_model_dir() -> Result<PathBuf> {
    let base = std::env::var_os("DUET_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("duet")))
        .or_else(|| std::env::var_os("HOME").map(|p| PathBuf::from(p).join(".cache").join("duet")))
        .context("no cache directory: set DUET_CACHE_DIR")?;
    let dir = base.join(format!("tiny-v3-seed0-{}", env!("CARGO_PKG_VERSION")));
    if dir.join("config.json").exists() && dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    // Write beside and rename, so a crash or a concurrent first run never leaves half a model.
    let tmp = base.join(format!(".tiny-v3-{}", std::process::id()));
    write_tiny_model(&tmp, TinyArch::V3, 0)
        .with_context(|| format!("writing the default model to {}", tmp.display()))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("moving the default model to {}", dir.display()));
        }
    }
    Ok(dir)
}
