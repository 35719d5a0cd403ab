//! A CPU as a cost-model device, fitted to the engine's own step times on this machine, so that
//! `duet sim` can be checked against `duet serve` where both run (BENCHMARKS.md "Simulator vs
//! duet serve").
//!
//! The cost model stays the one every GPU uses; only its inputs change. Measured: the machine's
//! read bandwidth, prefill of two prompt lengths, and a batch-1 decode step. Fitted:
//! - FLOP/s from the two prefills: the rate at which the cost model's two prefill times differ by
//!   what the measured ones differ by (so a fixed per-step cost drops out; byte-bound parts, such as
//!   reading the lm_head, count at the measured bandwidth);
//! - the prefill step overhead: what the shorter prefill took beyond its FLOPs;
//! - the decode step overhead: what the batch-1 step took beyond the roofline the cost model gives
//!   it with the fitted FLOP/s and the measured bandwidth.
//!
//! Every efficiency is 1 (the fitted rates are already effective), there is no communication
//! (one "GPU" per group), no overlap, no redundant experts, no activation reserve, and the memory is
//! sized so that the KV pool has the serving config's page count.

use crate::SimError;
use crate::calibration::Calibration;
use crate::cost::{CostModel, GroupShape, Phase, RankWork};
use crate::hardware::Gpu;
use crate::model::ModelConfig;

/// What `duet sim-calibrate-cpu` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuMeasurements {
    /// Streaming read bandwidth of the machine, bytes/s.
    pub read_bytes_per_s: f64,
    /// Two prefills of one prompt each: (prompt tokens, seconds), shorter first.
    pub prefill: [(usize, f64); 2],
    /// One decode step of one sequence at this context: (context tokens, seconds).
    pub decode_b1: (usize, f64),
    /// KV pages per worker in the serving config the profile stands for.
    pub kv_pages: u32,
    /// Threads the engine ran with (recorded in the profile's source line).
    pub threads: usize,
}

/// The fitted device and its calibration.
#[derive(Debug, Clone)]
pub struct CpuProfile {
    pub gpu: Gpu,
    pub calibration: Calibration,
    /// `calibration` as a file `--calibration` reads.
    pub calibration_toml: String,
    pub flops: f64,
    pub prefill_overhead_us: f64,
    pub decode_overhead_us: f64,
}

const SHAPE: GroupShape = GroupShape {
    ep: 1,
    gpus_per_node: 1,
    mtp_drafts: 0,
    balanced_moe: true,
};

/// Fits a CPU profile for `model` to the measurements. See the module doc.
pub fn fit(model: &ModelConfig, m: &CpuMeasurements) -> Result<CpuProfile, SimError> {
    let bad = |why: String| Err(SimError::Calibration(format!("CPU fit: {why}")));
    let [(l1, t1), (l2, t2)] = m.prefill;
    if !(l1 < l2 && t1 > 0.0 && t2 > t1) {
        return bad(format!(
            "the longer prefill must take longer: {l1} tokens {t1} s, {l2} tokens {t2} s"
        ));
    }
    if !(m.read_bytes_per_s > 0.0 && m.decode_b1.1 > 0.0) {
        return bad("bandwidth and decode time must be positive".into());
    }
    let text = |prefill_us: f64, decode_us: f64| {
        format!(
            "# Fitted by `duet sim-calibrate-cpu` on this machine ({} threads); see sim/src/cpu.rs.\n\
             [compute]\ngemm_efficiency = 1.0\nattn_prefill_efficiency = 1.0\n\
             attn_decode_efficiency = 1.0\nhbm_efficiency = 1.0\n\
             [overlap]\nprefill_overlap = 0.0\ndecode_overlap = 0.0\n\
             prefill_step_overhead_us = {prefill_us:.1}\ndecode_step_overhead_us = {decode_us:.1}\n\
             [moe]\neplb_imbalance = 1.0\nredundant_experts = 0\n\
             [memory]\nactivation_reserve_bytes = 0.0\nhbm_usable_fraction = 1.0\n\
             [pd]\nhandoff_latency_us = 0.0\n",
            m.threads
        )
    };
    let device = |flops: f64, hbm_bytes: f64| Gpu {
        name: "cpu",
        hbm_bytes,
        hbm_bytes_per_s: m.read_bytes_per_s,
        bf16_flops: flops,
        fp8_flops: flops,
        // One device per group: nothing crosses a link but the KV handoff, an in-process copy.
        nvlink_bytes_per_s: m.read_bytes_per_s,
        nvlink_domain_gpus: 1,
        nic_bytes_per_s: m.read_bytes_per_s,
        gpus_per_node: 1,
        usd_per_gpu_hour: 0.0,
        source: "fitted to this machine by duet sim-calibrate-cpu",
    };
    let zero = Calibration::from_toml(&text(0.0, 0.0))?;
    let cost = |gpu: Gpu| CostModel::new(model, gpu, &zero, SHAPE);
    let prefill_s = |flops: f64, len: usize| -> Result<f64, SimError> {
        let c = cost(device(flops, 1e18))?;
        let mut w = RankWork::default();
        c.add_prefill_item(&mut w, 0, len, true);
        Ok(c.step(Phase::Prefill, &[w]).total_us / 1e6)
    };
    // The FLOP/s at which the model's two prefills differ by what the measured ones differ by
    // (byte-bound parts such as the lm_head read count at the measured bandwidth). The difference
    // shrinks as FLOP/s grow: bisect on a log scale between 1 MFLOP/s and 10 PFLOP/s.
    let target = t2 - t1;
    let (mut lo, mut hi) = (6.0f64, 16.0f64);
    let gap = |log_f: f64| -> Result<f64, SimError> {
        let f = 10f64.powf(log_f);
        Ok(prefill_s(f, l2)? - prefill_s(f, l1)? - target)
    };
    if gap(hi)? > 0.0 || gap(lo)? < 0.0 {
        return bad(format!(
            "no FLOP rate explains {l1} vs {l2} prefill tokens taking {t1} vs {t2} s"
        ));
    }
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if gap(mid)? > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let flops = 10f64.powf((lo + hi) / 2.0);
    let prefill_overhead_us = ((t1 - prefill_s(flops, l1)?) * 1e6).max(0.0);
    let fitted = cost(device(flops, 1e18))?;
    let (ctx, t_dec) = m.decode_b1;
    let mut w = RankWork::default();
    fitted.add_decode_item(&mut w, ctx, 1, true);
    let roofline_us = fitted.step(Phase::Decode, &[w]).total_us;
    let decode_overhead_us = (t_dec * 1e6 - roofline_us).max(0.0);
    // Memory: the weights plus exactly the serving config's KV pages (and half a page, so that the
    // page count does not round down).
    let page_bytes = model.kv_bytes_per_token() as f64 * duet_core::PAGE_TOKENS as f64;
    let hbm_bytes = fitted.weight_bytes_per_gpu() + (f64::from(m.kv_pages) + 0.5) * page_bytes;
    let calibration_toml = text(prefill_overhead_us, decode_overhead_us);
    Ok(CpuProfile {
        gpu: device(flops, hbm_bytes),
        calibration: Calibration::from_toml(&calibration_toml)?,
        calibration_toml,
        flops,
        prefill_overhead_us,
        decode_overhead_us,
    })
}

/// The fitted model's step time, µs: a prefill of one `len`-token prompt, or a decode step of
/// `batch` sequences at `ctx` (for the fit report and its test).
pub fn predict_us(
    model: &ModelConfig,
    p: &CpuProfile,
    phase: Phase,
    len_or_batch: usize,
    ctx: usize,
) -> Result<f64, SimError> {
    let c = CostModel::new(model, p.gpu, &p.calibration, SHAPE)?;
    let mut w = RankWork::default();
    match phase {
        Phase::Prefill => c.add_prefill_item(&mut w, 0, len_or_batch, true),
        Phase::Decode => {
            for _ in 0..len_or_batch {
                c.add_decode_item(&mut w, ctx, 1, true);
            }
        }
    }
    Ok(c.step(phase, &[w]).total_us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware;

    fn tiny() -> ModelConfig {
        // The embedded default model's shape (`duet tiny-model --arch v3`).
        ModelConfig::from_json(
            r#"{"vocab_size": 129280, "hidden_size": 128, "intermediate_size": 384,
                "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                "q_lora_rank": 64, "kv_lora_rank": 64, "qk_rope_head_dim": 32,
                "qk_nope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 16,
                "num_experts_per_tok": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                "num_nextn_predict_layers": 0}"#,
        )
        .unwrap()
    }

    fn measured() -> CpuMeasurements {
        CpuMeasurements {
            read_bytes_per_s: 20e9,
            prefill: [(64, 0.004), (512, 0.012)],
            decode_b1: (256, 0.003),
            kv_pages: 512,
            threads: 2,
        }
    }

    #[test]
    fn the_fit_reproduces_what_it_was_fitted_to_and_round_trips() {
        let model = tiny();
        let m = measured();
        let p = fit(&model, &m).unwrap();
        for (len, t) in m.prefill {
            let got = predict_us(&model, &p, Phase::Prefill, len, 0).unwrap();
            assert!(
                (got / (t * 1e6) - 1.0).abs() < 0.01,
                "prefill {len}: {got} µs vs {t} s"
            );
        }
        let got = predict_us(&model, &p, Phase::Decode, 1, 256).unwrap();
        assert!((got / 3000.0 - 1.0).abs() < 0.01, "decode: {got} µs");
        // Bigger batches cost more; the KV pool is the serving config's.
        assert!(predict_us(&model, &p, Phase::Decode, 32, 256).unwrap() > got);
        let c = CostModel::new(&model, p.gpu, &p.calibration, SHAPE).unwrap();
        assert_eq!(c.kv_pages_per_gpu().unwrap(), 512);
        let back = hardware::from_toml(&p.gpu.to_toml()).unwrap();
        assert_eq!(back.hbm_bytes, p.gpu.hbm_bytes);
        assert_eq!(back.fp8_flops, p.gpu.fp8_flops);
    }

    #[test]
    fn inconsistent_measurements_are_refused() {
        let mut m = measured();
        m.prefill = [(64, 0.012), (512, 0.004)];
        assert!(fit(&tiny(), &m).is_err());
        assert!(hardware::from_toml("name = \"x\"").is_err());
    }
}
