//! `duet sim` and `duet plan`: flags in, the sim crate's report or plan out.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use duet_sim::chart::{Chart, Series, cdf, line_chart_png, line_chart_svg};
use duet_sim::plan::{self, Objective, PlanRequest};
use duet_sim::rng::Rng;
use duet_sim::workload::{Arrivals, LenDist, Synthetic, parse_mooncake_trace};
use duet_sim::{Calibration, ModelConfig, SimConfig, Simulation, hardware};

/// Cluster and model flags shared by `sim` and `plan`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// `deepseek-v3` (built in) or a config.json: DeepSeek V2/V3 architecture (MLA + MoE), or a
    /// dense Qwen2/Llama model (the R1-Distill checkpoints).
    #[arg(long, default_value = "deepseek-v3")]
    model_config: String,
    /// GPU type: h100, h800, h200, h20, b200, gb200, mi300x, a100; or a device profile FILE.toml
    /// (`duet sim-calibrate-cpu` writes one for this machine's CPU).
    #[arg(long)]
    gpu: String,
    /// GPUs per node; default: the GPU's usual node (8; 4 for GB200).
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// MTP draft acceptance probability (0..1); omit to run without MTP.
    #[arg(long)]
    mtp_accept: Option<f64>,
    /// Calibration file overriding sim/calibration.toml (missing keys keep the default).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Prompt length: `4096`, `1024-8192` (uniform), `lognormal:MEAN:CV` or `exp:MEAN`.
    #[arg(long, default_value = "2000")]
    isl: String,
    /// Output length, same forms as --isl.
    #[arg(long, default_value = "200")]
    osl: String,
    /// Fraction of each prompt shared with other requests (system prompts, documents).
    #[arg(long, default_value_t = 0.0)]
    prefix_ratio: f64,
    #[arg(long, default_value_t = 2000.0)]
    slo_ttft_ms: f64,
    #[arg(long, default_value_t = 50.0)]
    slo_tpot_ms: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    #[command(flatten)]
    common: ModelArgs,
    #[arg(long)]
    prefill_nodes: usize,
    #[arg(long)]
    decode_nodes: usize,
    /// Prefill EP group size in GPUs; default: the largest divisor of the prefill GPUs up to 32.
    #[arg(long)]
    prefill_ep: Option<usize>,
    /// Decode EP group size in GPUs; default: the largest divisor of the decode GPUs up to 144.
    #[arg(long)]
    decode_ep: Option<usize>,
    /// Attention tensor-parallel GPUs per prefill DP rank (1: pure DP attention).
    #[arg(long, default_value_t = 1)]
    prefill_tp: usize,
    /// Attention tensor-parallel GPUs per decode DP rank (1: pure DP attention).
    #[arg(long, default_value_t = 1)]
    decode_tp: usize,
    #[arg(long, default_value_t = 128)]
    decode_batch_per_gpu: usize,
    /// Prefill tokens per GPU per step.
    #[arg(long, default_value_t = 16384)]
    prefill_tokens_per_gpu: usize,
    /// Replay a Mooncake-format JSONL trace instead of --isl/--osl.
    #[arg(long, conflicts_with_all = ["rate", "saturate"])]
    trace: Option<PathBuf>,
    /// Arrival rate, requests per second (Poisson, or gamma with --burstiness).
    #[arg(long, conflicts_with = "saturate")]
    rate: Option<f64>,
    /// All requests at time 0: measure throughput (the default without --rate or --trace).
    #[arg(long)]
    saturate: bool,
    /// Coefficient of variation of the gaps between arrivals (gamma); 1 is Poisson.
    #[arg(long)]
    burstiness: Option<f64>,
    /// Requests to simulate (a trace: at most this many of its lines).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    prefix_groups: u32,
    /// Routed-expert load perfectly balanced (DeepSeek's profile setup) instead of EPLB's.
    #[arg(long, conflicts_with = "no_eplb")]
    balanced_moe: bool,
    /// Static expert sharding, no EPLB and no redundant experts: what EPLB buys.
    #[arg(long)]
    no_eplb: bool,
    #[arg(long)]
    no_prefix_cache: bool,
    /// Also run at these rates (comma-separated) and chart throughput and latency against rate.
    #[arg(long, value_delimiter = ',')]
    sweep_rates: Vec<f64>,
    /// Write charts as SVG and PNG (TTFT/TPOT CDFs; with --sweep-rates, throughput and latency against
    /// rate) into this directory.
    #[arg(long)]
    chart_dir: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Include the wall-clock time in the JSON (it breaks byte-identical output across runs).
    #[arg(long)]
    wall_time: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ObjectiveArg {
    Gpus,
    Cost,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    common: ModelArgs,
    /// Target load, requests per second.
    #[arg(long)]
    rate: f64,
    #[arg(long, value_enum, default_value = "gpus")]
    minimise: ObjectiveArg,
    /// Candidates to print.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Requests simulated to verify each candidate cluster.
    #[arg(long, default_value_t = 1000)]
    verify_requests: usize,
    /// Where the winning duet.toml, the ansible inventory.ini and its group_vars/all.yml go
    /// (`ansible-playbook -i DIR/inventory.ini deploy/site.yml` deploys it).
    #[arg(long, default_value = "plan-out")]
    out: PathBuf,
    /// Model directory written into duet.toml, and the directory deploy/ copies to the hosts.
    #[arg(long, default_value = "/srv/models/deepseek-v3")]
    model_dir: String,
    #[arg(long)]
    json: bool,
}

struct Common {
    model: ModelConfig,
    gpu: hardware::Gpu,
    calibration: Calibration,
    gpus_per_node: usize,
    input: LenDist,
    output: LenDist,
}

fn common(a: &ModelArgs) -> Result<Common> {
    let model = ModelConfig::load(&a.model_config)?;
    let gpu = if a.gpu.ends_with(".toml") {
        let text =
            std::fs::read_to_string(&a.gpu).with_context(|| format!("reading --gpu {}", a.gpu))?;
        hardware::from_toml(&text).with_context(|| a.gpu.clone())?
    } else {
        hardware::gpu(&a.gpu).with_context(|| {
            format!(
                "unknown --gpu {:?}; known: {} (or a device profile FILE.toml)",
                a.gpu,
                hardware::names().join(", ")
            )
        })?
    };
    let calibration = match &a.calibration {
        Some(p) => Calibration::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{}", p.display()))?,
        None => Calibration::default(),
    };
    Ok(Common {
        model,
        gpu,
        calibration,
        gpus_per_node: a.gpus_per_node.unwrap_or(gpu.gpus_per_node),
        input: LenDist::parse(&a.isl)?,
        output: LenDist::parse(&a.osl)?,
    })
}

/// The largest divisor of `gpus` not above `cap` (at least 1).
fn default_ep(gpus: usize, cap: usize) -> usize {
    (1..=cap.min(gpus.max(1)))
        .rev()
        .find(|d| gpus.is_multiple_of(*d))
        .unwrap_or(1)
}

pub fn run_sim(a: SimArgs) -> Result<()> {
    let c = common(&a.common)?;
    let p_gpus = a.prefill_nodes * c.gpus_per_node;
    let d_gpus = a.decode_nodes * c.gpus_per_node;
    let cfg = SimConfig {
        model: c.model.clone(),
        gpu: c.gpu,
        calibration: c.calibration.clone(),
        prefill_nodes: a.prefill_nodes,
        decode_nodes: a.decode_nodes,
        gpus_per_node: c.gpus_per_node,
        // Defaults: DeepSeek's production sizes, anchors §1 (prefill EP32, decode EP144).
        prefill_ep: a.prefill_ep.unwrap_or_else(|| default_ep(p_gpus, 32)),
        decode_ep: a.decode_ep.unwrap_or_else(|| default_ep(d_gpus, 144)),
        prefill_tp: a.prefill_tp,
        decode_tp: a.decode_tp,
        decode_batch_per_gpu: a.decode_batch_per_gpu,
        prefill_tokens_per_gpu: a.prefill_tokens_per_gpu,
        mtp_accept: a.common.mtp_accept,
        moe_balance: match (a.balanced_moe, a.no_eplb) {
            (true, _) => duet_sim::MoeBalance::Balanced,
            (_, true) => duet_sim::MoeBalance::Static,
            _ => duet_sim::MoeBalance::Eplb,
        },
        prefix_cache: !a.no_prefix_cache,
        seed: a.common.seed,
        slo_ttft_ms: a.common.slo_ttft_ms,
        slo_tpot_ms: a.common.slo_tpot_ms,
        invariant_check_every: 0,
    };
    let trace = match &a.trace {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let workload = |rate: Option<f64>| -> Result<Vec<duet_sim::workload::Request>> {
        if let Some(text) = &trace {
            return Ok(parse_mooncake_trace(text, Some(a.requests))?);
        }
        let arrivals = match (rate, a.burstiness) {
            (Some(rate), Some(cv)) => Arrivals::Gamma { rate, cv },
            (Some(rate), None) => Arrivals::Poisson { rate },
            (None, _) => Arrivals::Saturate,
        };
        let w = Synthetic {
            requests: a.requests,
            arrivals,
            input: c.input,
            output: c.output,
            prefix_ratio: a.common.prefix_ratio,
            prefix_groups: a.prefix_groups,
        };
        Ok(w.generate(&mut Rng::new(a.common.seed))?)
    };
    let started = Instant::now();
    let (report, samples) = Simulation::new(cfg.clone(), workload(a.rate)?)?.run_detailed();
    let wall_s = started.elapsed().as_secs_f64();
    let mut report = report.rounded();
    if a.wall_time {
        report.wall_s = Some((wall_s * 1e3).round() / 1e3);
    }
    if let Some(dir) = &a.chart_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Every chart as NAME.svg and NAME.png.
        let write = |name: &str, chart: Chart<'_>| -> Result<()> {
            let svg = dir.join(format!("{name}.svg"));
            std::fs::write(&svg, line_chart_svg(chart)?)
                .with_context(|| format!("writing {}", svg.display()))?;
            let png = dir.join(format!("{name}.png"));
            std::fs::write(&png, line_chart_png(chart)?)
                .with_context(|| format!("writing {}", png.display()))
        };
        let one = |name: &str, v: &[f64]| {
            [Series {
                name: name.into(),
                points: cdf(v),
            }]
        };
        write(
            "ttft_cdf",
            Chart {
                title: "TTFT CDF",
                x_label: "TTFT (ms)",
                y_label: "fraction of requests",
                series: &one("TTFT", &samples.ttft_ms),
            },
        )?;
        write(
            "tpot_cdf",
            Chart {
                title: "TPOT CDF",
                x_label: "TPOT (ms)",
                y_label: "fraction of requests",
                series: &one("TPOT", &samples.tpot_ms),
            },
        )?;
        if !a.sweep_rates.is_empty() {
            let mut rows = Vec::new();
            for &r in &a.sweep_rates {
                let rep = Simulation::new(cfg.clone(), workload(Some(r))?)?.run();
                rows.push((r, rep));
            }
            let pick = |name: &str, f: &dyn Fn(&duet_sim::Report) -> f64| Series {
                name: name.into(),
                points: rows.iter().map(|(r, rep)| (*r, f(rep))).collect(),
            };
            write(
                "throughput_vs_rate",
                Chart {
                    title: "Throughput against request rate",
                    x_label: "requests/s",
                    y_label: "tokens/s per node",
                    series: &[
                        pick("prefill input", &|r| r.prefill_input_tokens_per_s_per_node),
                        pick("decode output", &|r| r.decode_output_tokens_per_s_per_node),
                    ],
                },
            )?;
            write(
                "latency_vs_rate",
                Chart {
                    title: "Latency against request rate",
                    x_label: "requests/s",
                    y_label: "ms",
                    series: &[
                        pick("TTFT p99", &|r| r.ttft_ms_p99),
                        pick("TPOT p99", &|r| r.tpot_ms_p99),
                        pick("ITL p99", &|r| r.itl_ms_p99),
                    ],
                },
            )?;
        }
    } else if !a.sweep_rates.is_empty() {
        bail!("--sweep-rates needs --chart-dir");
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
        eprintln!("simulated in {wall_s:.2} s wall time");
    }
    Ok(())
}

pub fn run_plan(a: PlanArgs) -> Result<()> {
    let c = common(&a.common)?;
    // A dense model plans whole-node groups of independent TP instances; DeepSeek plans EP sizes.
    let dense = !c.model.is_moe();
    let node = vec![c.gpus_per_node];
    let req = PlanRequest {
        model: c.model,
        gpu: c.gpu,
        calibration: c.calibration,
        gpus_per_node: c.gpus_per_node,
        input: c.input,
        output: c.output,
        prefix_ratio: a.common.prefix_ratio,
        rate: a.rate,
        slo_ttft_ms: a.common.slo_ttft_ms,
        slo_tpot_ms: a.common.slo_tpot_ms,
        mtp_accept: a.common.mtp_accept,
        objective: match a.minimise {
            ObjectiveArg::Gpus => Objective::Gpus,
            ObjectiveArg::Cost => Objective::Cost,
        },
        seed: a.common.seed,
        verify_requests: a.verify_requests,
        decode_eps: if dense {
            node.clone()
        } else {
            plan::DECODE_EPS.to_vec()
        },
        decode_tps: if dense {
            plan::DENSE_TPS.to_vec()
        } else {
            plan::DECODE_TPS.to_vec()
        },
        decode_batches: plan::DECODE_BATCHES.to_vec(),
        prefill_eps: if dense {
            node
        } else {
            plan::PREFILL_EPS.to_vec()
        },
        prefill_tps: if dense {
            plan::DENSE_TPS.to_vec()
        } else {
            plan::PREFILL_TPS.to_vec()
        },
        prefill_tokens: plan::PREFILL_TOKENS.to_vec(),
    };
    let cands = plan::search(&req)?;
    let best = &cands[0];
    if !best.meets_slo {
        bail!(
            "no searched cluster meets TTFT p99 ≤ {} ms and TPOT p99 ≤ {} ms at {} req/s",
            req.slo_ttft_ms,
            req.slo_tpot_ms,
            req.rate
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let toml_path = a.out.join("duet.toml");
    std::fs::write(&toml_path, plan::cluster_toml(best, &req, &a.model_dir)?)
        .with_context(|| format!("writing {}", toml_path.display()))?;
    let inv_path = a.out.join("inventory.ini");
    std::fs::write(&inv_path, plan::ansible_inventory(best, &req))
        .with_context(|| format!("writing {}", inv_path.display()))?;
    let vars_dir = a.out.join("group_vars");
    std::fs::create_dir_all(&vars_dir)
        .with_context(|| format!("creating {}", vars_dir.display()))?;
    let vars_path = vars_dir.join("all.yml");
    std::fs::write(
        &vars_path,
        plan::ansible_group_vars(best, &req, &a.model_dir)?,
    )
    .with_context(|| format!("writing {}", vars_path.display()))?;
    let top: Vec<_> = cands.iter().take(a.top).collect();
    if a.json {
        println!("{}", serde_json::to_string(&top)?);
    } else {
        println!(
            "{:>4} {:>5} {:>8} {:>8} {:>6} {:>5} {:>10} {:>7} {:>5} {:>9} {:>9} {:>9}  SLO",
            "GPUs",
            "$/h",
            "P nodes",
            "D nodes",
            "P EP",
            "P TP",
            "P tok/GPU",
            "D EP",
            "D TP",
            "D batch",
            "TTFT p99",
            "TPOT p99"
        );
        for c in &top {
            println!(
                "{:>4} {:>5.0} {:>8} {:>8} {:>6} {:>5} {:>10} {:>7} {:>5} {:>9} {:>9.0} {:>9.1}  {}",
                c.gpus,
                c.usd_per_hour,
                c.prefill_nodes,
                c.decode_nodes,
                c.prefill_ep,
                c.prefill_tp,
                c.prefill_tokens_per_gpu,
                c.decode_ep,
                c.decode_tp,
                c.decode_batch_per_gpu,
                c.report.ttft_ms_p99,
                c.report.tpot_ms_p99,
                if c.meets_slo { "ok" } else { "miss" }
            );
        }
    }
    eprintln!(
        "wrote {}, {} and {}",
        toml_path.display(),
        inv_path.display(),
        vars_path.display()
    );
    Ok(())
}
