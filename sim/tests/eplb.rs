//! Expert load balance as a capacity planner's user sees it: core's EPLB against static sharding
//! and perfect balance, and how the residual imbalance grows with the EP size.

use duet_sim::workload::{Arrivals, LenDist, Synthetic};
use duet_sim::{
    Calibration, ModelConfig, MoeBalance, Report, SimConfig, Simulation, hardware, rng::Rng,
};

/// One phase only on `nodes` H800 nodes as one EP group: prefill of 4K prompts at 16K tokens per
/// GPU (compute-bound, where expert balance shows), or decode of 64 sequences per GPU at ~2K context.
fn run(nodes: usize, prefill: bool, balance: MoeBalance) -> Report {
    let cfg = SimConfig {
        model: ModelConfig::deepseek_v3(),
        gpu: hardware::gpu("h800").unwrap(),
        calibration: Calibration::default(),
        prefill_nodes: if prefill { nodes } else { 0 },
        decode_nodes: if prefill { 0 } else { nodes },
        gpus_per_node: 8,
        prefill_ep: nodes * 8,
        decode_ep: nodes * 8,
        prefill_tp: 1,
        decode_tp: 1,
        decode_batch_per_gpu: 64,
        prefill_tokens_per_gpu: 16384,
        mtp_accept: None,
        moe_balance: balance,
        prefix_cache: false,
        seed: 3,
        slo_ttft_ms: 2000.0,
        slo_tpot_ms: 50.0,
        invariant_check_every: 0,
    };
    let (requests, isl, osl) = if prefill {
        (nodes * 8 * 4 * 6, 4096, 1)
    } else {
        (nodes * 8 * 64, 2000, 16)
    };
    let w = Synthetic {
        requests,
        arrivals: Arrivals::Saturate,
        input: LenDist::Fixed(isl),
        output: LenDist::Fixed(osl),
        prefix_ratio: 0.0,
        prefix_groups: 1,
    };
    let r = Simulation::new(cfg, w.generate(&mut Rng::new(3)).unwrap())
        .unwrap()
        .run();
    assert_eq!(r.requests_failed, 0, "{r:?}");
    r
}

fn decode(nodes: usize, balance: MoeBalance) -> Report {
    run(nodes, false, balance)
}

#[test]
fn eplb_sits_between_static_sharding_and_perfect_balance() {
    let [balanced, eplb, fixed] =
        [MoeBalance::Balanced, MoeBalance::Eplb, MoeBalance::Static].map(|b| run(4, true, b));
    let tput = |r: &Report| r.prefill_input_tokens_per_s_per_node;
    assert!(
        tput(&balanced) > tput(&eplb) && tput(&eplb) > tput(&fixed),
        "balanced {} EPLB {} static {}",
        tput(&balanced),
        tput(&eplb),
        tput(&fixed)
    );
    assert_eq!(balanced.prefill_expert_imbalance, 1.0);
    assert!(eplb.prefill_expert_imbalance > 1.0);
    assert!(fixed.prefill_expert_imbalance > eplb.prefill_expert_imbalance);
    // Static sharding has no redundant experts: fewer expert weights per GPU, more room for KV.
    assert!(fixed.kv_pages_per_prefill_gpu > eplb.kv_pages_per_prefill_gpu);
    let json = serde_json::to_value(&eplb).unwrap();
    assert_eq!(json["moe_balance"], "eplb");
}

/// Fewer experts per GPU average out less of a step's drift: EP128 decode keeps more of its
/// imbalance after EPLB than EP32 does, and the report says so.
#[test]
fn residual_imbalance_grows_with_the_ep_size() {
    let ep32 = decode(4, MoeBalance::Eplb);
    let ep128 = decode(16, MoeBalance::Eplb);
    assert!(
        ep128.decode_expert_imbalance > ep32.decode_expert_imbalance,
        "EP128 {} EP32 {}",
        ep128.decode_expert_imbalance,
        ep32.decode_expert_imbalance
    );
}
