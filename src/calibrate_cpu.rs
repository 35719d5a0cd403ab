//! `duet sim-calibrate-cpu`: times the engine on this machine and fits the simulator's CPU device to
//! it (sim/src/cpu.rs), so that `duet sim --gpu OUT/cpu.toml --calibration OUT/calibration.toml`
//! predicts what `duet serve` does here. `bench/sim_vs_serve.sh` runs both side by side.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use duet_model::rng::Rng;
use duet_sim::ModelConfig;
use duet_sim::cost::Phase;
use duet_sim::cpu::{self, CpuMeasurements};
use serde_json::json;

use crate::DTypeArg;
use crate::engine_bench::{decode_step_times, prefill_times};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory; the embedded tiny default when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DTypeArg,
    /// Where cpu.toml (the device) and calibration.toml go.
    #[arg(long)]
    out: PathBuf,
    /// KV pages per worker of the serving config the profile stands for (`duet serve`'s default).
    #[arg(long, default_value_t = 512)]
    kv_pages: u32,
    /// The two prompt lengths whose prefill times fix the FLOP rate.
    #[arg(long, value_delimiter = ',', default_value = "64,512")]
    prefill_lens: Vec<usize>,
    /// Context of the decode sequences.
    #[arg(long, default_value_t = 256)]
    decode_context: usize,
    /// Decode batch sizes to time; batch 1 and the largest are fitted, the others are checks.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
}

/// Timed repetitions per measurement; the median is kept (the best would flatter a noisy VM, where
/// serving sees the median).
const REPEATS: usize = 9;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of `REPEATS` runs after a warm-up run (which warms caches and page tables).
fn warm_median(mut times: Vec<f64>) -> f64 {
    median(times.split_off(1))
}

pub fn run(a: Args) -> Result<()> {
    let [l1, l2] = a.prefill_lens[..] else {
        bail!("--prefill-lens takes exactly two lengths");
    };
    if !a.batches.contains(&1) || a.batches.iter().all(|&b| b <= 1) {
        bail!("--batches must include 1 and a larger batch (the decode fit)");
    }
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => crate::default_model_dir()?,
    };
    let model = crate::load_model(&dir, a.dtype.into())?;
    let sim_model = ModelConfig::load(&dir.join("config.json").display().to_string())?;
    let mut rng = Rng::new(1);
    let mut prefill = [(l1, 0.0), (l2, 0.0)];
    for (len, t) in prefill.iter_mut() {
        *t = warm_median(prefill_times(&model, &mut rng, *len, REPEATS + 1)?);
    }
    let mut decode = Vec::new();
    for &b in &a.batches {
        let times = decode_step_times(&model, &mut rng, b, a.decode_context, REPEATS + 1)?;
        decode.push((b, warm_median(times)));
    }
    let b1 = *decode.iter().find(|d| d.0 == 1).expect("checked");
    let widest = *decode.iter().max_by_key(|d| d.0).expect("not empty");
    let m = CpuMeasurements {
        read_bytes_per_s: crate::engine_bench::read_bandwidth_bytes_per_s(),
        prefill,
        decode: (a.decode_context, [b1, widest]),
        kv_pages: a.kv_pages,
        threads: rayon::current_num_threads(),
    };
    let p = cpu::fit(&sim_model, &m)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    std::fs::write(a.out.join("cpu.toml"), p.gpu.to_toml())?;
    std::fs::write(a.out.join("calibration.toml"), &p.calibration_toml)?;
    let mut checks = Vec::new();
    for &(len, t) in &prefill {
        let pred = cpu::predict_us(&sim_model, &p, Phase::Prefill, len, 0)?;
        checks.push(json!({"prefill_tokens": len, "measured_us": t * 1e6, "model_us": pred}));
    }
    for &(b, t) in &decode {
        let pred = cpu::predict_us(&sim_model, &p, Phase::Decode, b, a.decode_context)?;
        checks.push(json!({"decode_batch": b, "measured_us": t * 1e6, "model_us": pred}));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "model": dir.display().to_string(),
            "threads": m.threads,
            "read_gb_s": m.read_bytes_per_s / 1e9,
            "fitted_layer_gflops": p.layer_flops / 1e9,
            "fitted_head_gflops": p.head_flops / 1e9,
            "prefill_step_overhead_us": p.prefill_overhead_us,
            "decode_step_overhead_us": p.decode_overhead_us,
            "steps": checks,
            "wrote": [a.out.join("cpu.toml"), a.out.join("calibration.toml")],
        }))?
    );
    Ok(())
}
