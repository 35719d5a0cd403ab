//! Same seed → byte-identical JSON; a PD run finishes every request with sane metrics; traces replay.

use duet_sim::workload::{Arrivals, LenDist, Synthetic, parse_mooncake_trace};
use duet_sim::{Calibration, ModelConfig, MoeBalance, SimConfig, Simulation, hardware, rng::Rng};

fn cfg(seed: u64) -> SimConfig {
    SimConfig {
        model: ModelConfig::deepseek_v3(),
        gpu: hardware::gpu("h200").unwrap(),
        calibration: Calibration::default(),
        prefill_nodes: 1,
        decode_nodes: 2,
        gpus_per_node: 8,
        prefill_ep: 8,
        decode_ep: 8,
        prefill_tp: 1,
        decode_tp: 1,
        decode_batch_per_gpu: 32,
        prefill_tokens_per_gpu: 8192,
        mtp_accept: Some(0.8),
        moe_balance: MoeBalance::Eplb,
        prefix_cache: true,
        seed,
        slo_ttft_ms: 2000.0,
        slo_tpot_ms: 50.0,
        invariant_check_every: 1,
    }
}

fn json(seed: u64) -> String {
    let w = Synthetic {
        requests: 400,
        arrivals: Arrivals::Gamma {
            rate: 40.0,
            cv: 2.0,
        },
        input: LenDist::LogNormal {
            mean: 1500.0,
            cv: 0.6,
        },
        output: LenDist::Exponential { mean: 60.0 },
        prefix_ratio: 0.4,
        prefix_groups: 8,
    };
    let reqs = w.generate(&mut Rng::new(seed)).unwrap();
    let report = Simulation::new(cfg(seed), reqs).unwrap().run().rounded();
    serde_json::to_string(&report).unwrap()
}

#[test]
fn same_seed_same_bytes() {
    let a = json(42);
    assert_eq!(a, json(42));
    assert_ne!(a, json(43));
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert_eq!(v["requests_finished"], 400);
    for key in [
        "prefill_input_tokens_per_s_per_node",
        "decode_output_tokens_per_s_per_node",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "tpot_ms_p50",
        "tpot_ms_p99",
        "itl_ms_p99",
        "output_tokens_per_s_per_user",
    ] {
        let x = v[key].as_f64().unwrap_or(-1.0);
        assert!(x > 0.0, "{key} = {x}");
    }
    assert!(v["prefix_hit_ratio"].as_f64().unwrap() > 0.1);
    assert!(v["ttft_ms_p50"].as_f64().unwrap() <= v["ttft_ms_p99"].as_f64().unwrap());
}

#[test]
fn mooncake_trace_replays() {
    // Requests 0 and 2 share their first block: the second one hits the prefix cache if routed to
    // the same rank, which the cache-aware router does.
    let text = "\
{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 20, \"hash_ids\": [7, 8, 9]}
{\"timestamp\": 10, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [1, 2]}
{\"timestamp\": 2000, \"input_length\": 1200, \"output_length\": 9, \"hash_ids\": [7, 8, 10]}
";
    let reqs = parse_mooncake_trace(text, None).unwrap();
    let r = Simulation::new(cfg(1), reqs).unwrap().run();
    assert_eq!(r.requests_finished, 3);
    assert!(r.prefix_hit_ratio > 0.2, "{}", r.prefix_hit_ratio);
}

#[test]
fn bad_setups_are_errors_not_panics() {
    let reqs = Synthetic {
        requests: 1,
        arrivals: Arrivals::Saturate,
        input: LenDist::Fixed(10),
        output: LenDist::Fixed(10),
        prefix_ratio: 0.0,
        prefix_groups: 1,
    }
    .generate(&mut Rng::new(1))
    .unwrap();
    let mut c = cfg(1);
    c.prefill_ep = 3;
    assert!(Simulation::new(c, reqs.clone()).is_err());
    let mut c = cfg(1);
    c.gpu = hardware::gpu("a100").unwrap();
    c.decode_ep = 8;
    // 671 B parameters over 8 A100s of 80 GB do not fit.
    assert!(Simulation::new(c, reqs).is_err());
}
