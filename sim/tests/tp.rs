//! Attention tensor parallelism inside a DP group: what it costs and what it buys, as a capacity
//! planner's user would see it in `duet sim`'s report.

use duet_sim::workload::{Arrivals, LenDist, Synthetic};
use duet_sim::{
    Calibration, ModelConfig, MoeBalance, Report, SimConfig, SimError, Simulation, hardware,
    rng::Rng,
};

/// `nodes` nodes of `gpu`, as one EP group of the phase under test (the other phase has none).
fn base(gpu: &str) -> SimConfig {
    SimConfig {
        model: ModelConfig::deepseek_v3(),
        gpu: hardware::gpu(gpu).unwrap(),
        calibration: Calibration::default(),
        prefill_nodes: 0,
        decode_nodes: 0,
        gpus_per_node: 8,
        prefill_ep: 8,
        decode_ep: 8,
        prefill_tp: 1,
        decode_tp: 1,
        decode_batch_per_gpu: 128,
        prefill_tokens_per_gpu: 8192,
        mtp_accept: None,
        moe_balance: MoeBalance::Balanced,
        prefix_cache: false,
        seed: 5,
        slo_ttft_ms: 2000.0,
        slo_tpot_ms: 50.0,
        invariant_check_every: 8,
    }
}

fn run(cfg: SimConfig, requests: usize, isl: u64, osl: u64) -> Result<Report, SimError> {
    let w = Synthetic {
        requests,
        arrivals: Arrivals::Saturate,
        input: LenDist::Fixed(isl),
        output: LenDist::Fixed(osl),
        prefix_ratio: 0.0,
        prefix_groups: 1,
    };
    let r = Simulation::new(cfg, w.generate(&mut Rng::new(5))?)?.run();
    assert_eq!(r.requests_failed, 0, "{r:?}");
    Ok(r)
}

/// Decode on `nodes` nodes of `gpu` as one EP group, attention TP `tp`, one wave of full batches.
fn decode(
    gpu: &str,
    nodes: usize,
    tp: usize,
    batch_per_gpu: usize,
    ctx: u64,
) -> Result<Report, SimError> {
    let mut cfg = base(gpu);
    cfg.decode_nodes = nodes;
    cfg.decode_ep = nodes * 8;
    cfg.decode_tp = tp;
    cfg.decode_batch_per_gpu = batch_per_gpu;
    run(cfg, nodes * 8 * batch_per_gpu, ctx, 32)
}

/// Prefill of 2K prompts on `nodes` H800 nodes as one EP group, attention TP `tp`, 8 K tokens per
/// GPU per step.
fn prefill(nodes: usize, tp: usize) -> Report {
    let mut cfg = base("h800");
    cfg.prefill_nodes = nodes;
    cfg.prefill_ep = nodes * 8;
    cfg.prefill_tp = tp;
    run(cfg, nodes * 8 * 8 * 4, 2048, 1).unwrap()
}

/// MLA's latent KV is one tensor for all heads, so every GPU of a TP rank holds all of it: TP8 has
/// one GPU's KV pool for eight GPUs. At 4K contexts and a memory-bound batch, DP attention carries
/// several times the decode throughput (LMSYS measured 5.2× over TP16, anchors §2).
#[test]
fn dp_attention_beats_tp_when_kv_bounds_the_batch() {
    // One H200 node (V3's experts fit in 8 × 141 GB at EP8).
    let dp = decode("h200", 1, 1, 256, 4096).unwrap();
    let tp = decode("h200", 1, 8, 256, 4096).unwrap();
    // TP8 frees weight memory on each GPU, but the node then has one rank's pool, not eight.
    let (dp_pages, tp_pages) = (dp.kv_pages_per_decode_gpu, tp.kv_pages_per_decode_gpu);
    assert!(
        tp_pages > dp_pages && 8 * dp_pages > 3 * tp_pages,
        "{dp_pages} / {tp_pages}"
    );
    let ratio = dp.decode_output_tokens_per_s_per_node / tp.decode_output_tokens_per_s_per_node;
    assert!(ratio > 3.0, "DP/TP decode throughput {ratio:.2}");
    // The batch really was KV-bound: far below the 256 cap per GPU.
    assert!(dp.decode_batch_mean < 200.0, "{}", dp.decode_batch_mean);
}

/// With few sequences, a step is the time to read the weights. At EP64 a GPU holds 5 expert slots
/// but all 15 B replicated parameters; TP splits the per-head projections, dense FFNs and shared
/// experts across eight GPUs, so each step reads less and TPOT drops. This is the trade `duet plan`
/// weighs against KV room under a tight TPOT SLO.
#[test]
fn tp_lowers_tpot_at_small_batches() {
    let dp = decode("h800", 8, 1, 2, 1024).unwrap();
    let tp = decode("h800", 8, 8, 2, 1024).unwrap();
    assert!(
        tp.tpot_ms_p50 < 0.9 * dp.tpot_ms_p50,
        "TP8 {} ms vs DP {} ms",
        tp.tpot_ms_p50,
        dp.tpot_ms_p50
    );
}

/// A TP rank wider than an NVLink node all-reduces over the NIC, twice per layer.
#[test]
fn tp_across_nodes_pays_for_the_nic() {
    let in_node = prefill(2, 8);
    let across = prefill(2, 16);
    assert!(
        across.prefill_step_ms_mean > 1.1 * in_node.prefill_step_ms_mean,
        "TP16 step {} ms vs TP8 {} ms",
        across.prefill_step_ms_mean,
        in_node.prefill_step_ms_mean
    );
    assert!(
        across.prefill_input_tokens_per_s_per_node < in_node.prefill_input_tokens_per_s_per_node
    );
}

#[test]
fn tp_that_does_not_divide_the_group_is_refused() {
    let e = decode("h200", 1, 3, 8, 512).unwrap_err();
    assert!(e.to_string().contains("--decode-tp 3"), "{e}");
}
