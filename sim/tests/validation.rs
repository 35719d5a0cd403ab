//! Validation against published DeepSeek-V3/R1 deployments (anchors-performance.md §1, §1b, §2, §11),
//! all with the one embedded calibration (sim/calibration.toml) and no per-case factor.
//!
//! Tolerance: ±15 % on every throughput figure (the bar; the published figures themselves
//! come from different software, dates and traffic, and SGLang's own reading of DeepSeek's profile is
//! "within 5.6 %"). Each case states the published setup; where a setup leaves a quantity open (output
//! length), the case picks one that keeps the published *average context*, which is what the step
//! time depends on, and keeps the simulated request count small so that the test runs in seconds.

use duet_sim::workload::{Arrivals, LenDist, Synthetic};
use duet_sim::{
    Calibration, ModelConfig, MoeBalance, Report, SimConfig, Simulation, hardware, rng::Rng,
};

/// ±15 %: the acceptance bar for every published figure.
const TOLERANCE: f64 = 0.15;

struct Case {
    name: &'static str,
    published: f64,
    predicted: f64,
    unit: &'static str,
    /// False for a published figure that is a fleet average rather than a capacity: printed, and
    /// checked only as a lower bound (the simulated capacity must carry the published load).
    point: bool,
}

fn base(gpu: &str) -> SimConfig {
    SimConfig {
        model: ModelConfig::deepseek_v3(),
        gpu: hardware::gpu(gpu).unwrap(),
        calibration: Calibration::default(),
        prefill_nodes: 0,
        decode_nodes: 0,
        gpus_per_node: 8,
        prefill_ep: 32,
        decode_ep: 128,
        prefill_tp: 1,
        decode_tp: 1,
        decode_batch_per_gpu: 128,
        prefill_tokens_per_gpu: 16384,
        mtp_accept: None,
        moe_balance: MoeBalance::Eplb,
        prefix_cache: true,
        seed: 1,
        slo_ttft_ms: 2000.0,
        slo_tpot_ms: 50.0,
        invariant_check_every: 16,
    }
}

fn run(cfg: SimConfig, requests: usize, isl: u64, osl: u64, prefix_ratio: f64) -> Report {
    let w = Synthetic {
        requests,
        arrivals: Arrivals::Saturate,
        input: LenDist::Fixed(isl),
        output: LenDist::Fixed(osl),
        prefix_ratio,
        // Few shared prefixes: each prefill rank keeps its own radix cache, so every (prefix, rank)
        // pair misses once; DeepSeek's on-disk cache is global (anchors §1) and has no such misses.
        prefix_groups: 4,
    };
    let reqs = w.generate(&mut Rng::new(cfg.seed)).unwrap();
    Simulation::new(cfg, reqs).unwrap().run()
}

/// Prefill only (decode "assumed unlimited", as LMSYS measured it): 4 nodes, EP32, prompts for about
/// `steps` full steps of 32 GPUs × 16 K tokens.
fn prefill_case(gpu: &str, isl: u64, balanced: bool, prefix_ratio: f64, steps: f64) -> Report {
    let mut cfg = base(gpu);
    cfg.prefill_nodes = 4;
    cfg.prefill_ep = 32;
    cfg.moe_balance = if balanced {
        MoeBalance::Balanced
    } else {
        MoeBalance::Eplb
    };
    let computed = (isl as f64 * (1.0 - prefix_ratio)).max(1.0);
    let requests = (steps * 32.0 * 16384.0 / computed) as usize;
    run(cfg, requests, isl, 1, prefix_ratio)
}

/// Decode only (prefill not simulated): `nodes` × 8 GPUs in one EP group, `batch` per GPU, average
/// context `ctx` tokens.
fn decode_case(
    gpu: &str,
    nodes: usize,
    batch: usize,
    ctx: u64,
    balanced: bool,
    mtp: Option<f64>,
    waves: usize,
) -> Report {
    let mut cfg = base(gpu);
    cfg.decode_nodes = nodes;
    cfg.decode_ep = nodes * 8;
    cfg.decode_batch_per_gpu = batch;
    cfg.moe_balance = if balanced {
        MoeBalance::Balanced
    } else {
        MoeBalance::Eplb
    };
    cfg.mtp_accept = mtp;
    // Short outputs keep the test fast; the prompt is shortened by half of them so that the mean
    // context over the decode steps is `ctx`.
    let osl = 64;
    let requests = nodes * 8 * batch * waves;
    run(cfg, requests, ctx - osl / 2, osl, 0.0)
}

#[test]
fn published_deployments_within_tolerance() {
    let mut cases = Vec::new();

    // §1b/§2: DeepSeek's profile as read by SGLang: prefill EP32, 4K prompts, 16K tokens per GPU,
    // perfectly balanced MoE routing.
    let r = prefill_case("h800", 4096, true, 0.0, 12.0);
    cases.push(Case {
        name: "DeepSeek profile prefill (H800, EP32, 4K, balanced)",
        published: 62_713.0,
        predicted: r.prefill_input_tokens_per_s_per_node,
        unit: "in tok/s/node",
        point: true,
    });
    // Decode EP128, 128 requests per GPU, 4K context, balanced.
    let r = decode_case("h800", 16, 128, 4096, true, None, 2);
    cases.push(Case {
        name: "DeepSeek profile decode (H800, EP128, 128/GPU, 4K)",
        published: 18_598.0,
        predicted: r.decode_output_tokens_per_s_per_node,
        unit: "out tok/s/node",
        point: true,
    });

    // §2: LMSYS on H100: prefill EP32 at 1K / 2K / 4K prompts (default EPLB).
    for (isl, published) in [(1024, 57_674.0), (2048, 54_543.0), (4096, 50_302.0)] {
        let r = prefill_case("h100", isl, false, 0.0, 12.0);
        cases.push(Case {
            name: match isl {
                1024 => "LMSYS prefill 1K (H100, EP32)",
                2048 => "LMSYS prefill 2K (H100, EP32)",
                _ => "LMSYS prefill 4K (H100, EP32)",
            },
            published,
            predicted: r.prefill_input_tokens_per_s_per_node,
            unit: "in tok/s/node",
            point: true,
        });
    }
    // Decode EP72 (9 nodes), 256 sequences per GPU, KV 2,000; ITL ≈ 100 ms.
    let r = decode_case("h100", 9, 256, 2000, false, None, 2);
    cases.push(Case {
        name: "LMSYS decode (H100, EP72, 256/GPU, 2K)",
        published: 22_282.0,
        predicted: r.decode_output_tokens_per_s_per_node,
        unit: "out tok/s/node",
        point: true,
    });
    cases.push(Case {
        name: "LMSYS decode ITL p50",
        published: 100.0,
        predicted: r.itl_ms_p50,
        unit: "ms",
        point: true,
    });

    // §1/§11: DeepSeek production decode (H800, EP144, MTP with 80-90 % acceptance, average KV
    // length 4,989, 20-22 tok/s per user): the batch per GPU is what the user speed allows, so the
    // case finds the largest batch whose simulated speed is still ≥ 20 tok/s, then compares the
    // throughput at that batch.
    let (mut lo, mut hi) = (16usize, 256usize);
    let mut best = None;
    while hi - lo > 4 {
        let mid = (lo + hi) / 2;
        let r = decode_case("h800", 18, mid, 4989, false, Some(0.85), 1);
        if r.output_tokens_per_s_per_user >= 20.0 {
            lo = mid;
            best = Some(r);
        } else {
            hi = mid;
        }
    }
    let r = best.expect("some batch reaches 20 tok/s per user");
    // Past ~100 sequences the KV pool, not the cap, bounds the batch; print what actually ran.
    println!(
        "production decode: cap {lo}, {:.0} sequences per GPU running on average, {:.1} tok/s per user",
        r.decode_batch_mean, r.output_tokens_per_s_per_user
    );
    cases.push(Case {
        name: "DeepSeek production decode (H800, EP144, MTP, KV 4,989, ≥ 20 tok/s/user)",
        published: 14_800.0,
        predicted: r.decode_output_tokens_per_s_per_node,
        unit: "out tok/s/node",
        point: true,
    });

    // §1: DeepSeek production prefill (H800, EP32), 56.3 % of input tokens from cache. Prompt length
    // 4,385 is derived: input/output = 608/168 (§1) and average KV 4,989 ≈ input + output/2.
    // The published figure is a 24-hour average of an autoscaled fleet (the load it carried), not a
    // saturated capacity, and the simulator predicts capacity: so this case is a lower bound (the
    // simulated nodes must be able to carry the published load), not a ±15 % point match. The
    // simulator's capacity is ~24 % above it, i.e. the fleet ran at about 80 % of what the model says
    // it could carry; see sim/README.md "Known gaps". The cache makes a prompt's cost depend on which
    // rank saw its prefix first, so this case runs ~30 steps (12 leave the cold misses of the first
    // steps inside the measured window, which understated the capacity by ~7 %).
    let r = prefill_case("h800", 4385, false, 0.563, 30.0);
    cases.push(Case {
        name: "DeepSeek production prefill capacity (H800, EP32, 56.3 % cached) [24 h average: lower bound]",
        published: 73_700.0,
        predicted: r.prefill_input_tokens_per_s_per_node,
        unit: "in tok/s/node",
        point: false,
    });

    print_table(&cases);
    let bad: Vec<&Case> = cases
        .iter()
        .filter(|c| {
            let err = c.predicted / c.published - 1.0;
            if c.point {
                err.abs() > TOLERANCE
            } else {
                err < -TOLERANCE
            }
        })
        .collect();
    assert!(bad.is_empty(), "{} case(s) outside ±15 %", bad.len());
}

fn print_table(cases: &[Case]) {
    println!("\n| setup | published | predicted | error |");
    println!("|---|---:|---:|---:|");
    for c in cases {
        println!(
            "| {} | {:.0} {} | {:.0} | {:+.1} % |",
            c.name,
            c.published,
            c.unit,
            c.predicted,
            (c.predicted / c.published - 1.0) * 100.0
        );
    }
}
