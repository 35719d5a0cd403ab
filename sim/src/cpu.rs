//! A CPU as a cost-model device, fitted to the engine's own step times on this machine, so that
//! `duet sim` can be checked against `duet serve` where both run (BENCHMARKS.md "Simulator vs
//! duet serve").
//!
//! The cost model stays the one every GPU uses; only its inputs change. Measured: the machine's
//! read bandwidth, prefill of two prompt lengths, and decode steps of one and of many sequences.
//! The device gets two rates, because on a CPU the layers' small GEMMs and the lm_head's wide one
//! run at very different speeds (the tiny default model's hidden size is 128, its vocabulary 129 K):
//! - `fp8_flops`, the rate of the layers (MLA projections, FFN, experts): the rate at which the cost
//!   model's two prefill times differ by what the measured ones differ by, so a fixed per-step cost
//!   drops out (a prefill samples one token, so the lm_head barely counts);
//! - `bf16_flops`, the rate of the lm_head and attention: likewise from the decode steps of one and
//!   of the largest batch (there the lm_head is most of the work);
//! - the two are fitted in turn until they settle; then the step overheads are what the shorter
//!   prefill and the one-sequence decode took beyond the model's time for them.
//!
//! Every efficiency is 1 (the fitted rates are already effective), there is no communication
//! (one "GPU" per group), no overlap, no redundant experts, no activation reserve, and the memory is
//! sized so that the KV pool has the serving config's page count.

use crate::SimError;
use crate::calibration::Calibration;
use crate::cost::{CostModel, GroupShape, MoeBalance, Phase, RankWork};
use crate::hardware::Gpu;
use crate::model::ModelConfig;

/// What `duet sim-calibrate-cpu` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuMeasurements {
    /// Streaming read bandwidth of the machine, bytes/s.
    pub read_bytes_per_s: f64,
    /// Two prefills of one prompt each: (prompt tokens, seconds), shorter first.
    pub prefill: [(usize, f64); 2],
    /// Decode steps at one context: (context tokens, [(batch, seconds)]), batch 1 first, then the
    /// largest batch.
    pub decode: (usize, [(usize, f64); 2]),
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
    /// Layers' rate (`fp8_flops`) and lm_head/attention rate (`bf16_flops`), FLOP/s.
    pub layer_flops: f64,
    pub head_flops: f64,
    pub prefill_overhead_us: f64,
    pub decode_overhead_us: f64,
}

const SHAPE: GroupShape = GroupShape {
    ep: 1,
    tp: 1,
    gpus_per_node: 1,
    mtp_drafts: 0,
    moe_balance: MoeBalance::Balanced,
};

/// Fits a CPU profile for `model` to the measurements. See the module doc.
pub fn fit(model: &ModelConfig, m: &CpuMeasurements) -> Result<CpuProfile, SimError> {
    let bad = |why: String| Err(SimError::Calibration(format!("CPU fit: {why}")));
    if !model.fp8_weights {
        // The fit gives the layers the FP8 rate and the lm_head the BF16 one; a BF16 dense model's
        // layers and head run at one rate, so the two cannot be told apart.
        return bad("the CPU profile is fitted for DeepSeek (MLA + MoE) checkpoints only".into());
    }
    let [(l1, t1), (l2, t2)] = m.prefill;
    if !(l1 < l2 && t1 > 0.0 && t2 > t1) {
        return bad(format!(
            "the longer prefill must take longer: {l1} tokens {t1} s, {l2} tokens {t2} s"
        ));
    }
    let (ctx, [(b1, d1), (b2, d2)]) = m.decode;
    if !(b1 == 1 && b2 > 1 && d1 > 0.0 && d2 > d1) {
        return bad(format!(
            "need decode steps of 1 and of more sequences, the larger slower: {b1} in {d1} s, {b2} in {d2} s"
        ));
    }
    if m.read_bytes_per_s.is_nan() || m.read_bytes_per_s <= 0.0 {
        return bad("the read bandwidth must be positive".into());
    }
    let text = |prefill_us: f64, decode_us: f64| {
        format!(
            "# Fitted by `duet sim-calibrate-cpu` on this machine ({} threads); see sim/src/cpu.rs.\n\
             [compute]\ngemm_efficiency = 1.0\nattn_prefill_efficiency = 1.0\n\
             attn_decode_efficiency = 1.0\nhbm_efficiency = 1.0\n\
             [overlap]\nprefill_overlap = 0.0\ndecode_overlap = 0.0\n\
             prefill_step_overhead_us = {prefill_us:.1}\ndecode_step_overhead_us = {decode_us:.1}\n\
             [moe]\nexpert_load_cv = 0.0\nexpert_load_drift_cv = 0.0\nredundant_experts = 0\n\
             [memory]\nactivation_reserve_bytes = 0.0\nhbm_usable_fraction = 1.0\n\
             [pd]\nhandoff_latency_us = 0.0\n",
            m.threads
        )
    };
    let device = |layer: f64, head: f64, hbm_bytes: f64| Gpu {
        name: "cpu",
        hbm_bytes,
        hbm_bytes_per_s: m.read_bytes_per_s,
        bf16_flops: head,
        fp8_flops: layer,
        // One device per group: nothing crosses a link but the KV handoff, an in-process copy.
        nvlink_bytes_per_s: m.read_bytes_per_s,
        nvlink_domain_gpus: 1,
        nic_bytes_per_s: m.read_bytes_per_s,
        gpus_per_node: 1,
        usd_per_gpu_hour: 0.0,
        source: "fitted to this machine by duet sim-calibrate-cpu",
    };
    let zero = Calibration::from_toml(&text(0.0, 0.0))?;
    let step_s = |layer: f64, head: f64, phase: Phase, n: usize| -> Result<f64, SimError> {
        let c = CostModel::new(model, device(layer, head, 1e18), &zero, SHAPE)?;
        let mut w = RankWork::default();
        match phase {
            Phase::Prefill => c.add_prefill_item(&mut w, 0, n, true),
            Phase::Decode => {
                for _ in 0..n {
                    c.add_decode_item(&mut w, ctx, 1, true);
                }
            }
        }
        Ok(c.step(phase, &[w]).total_us / 1e6)
    };
    // The rate (log10 FLOP/s, between 1 MFLOP/s and 10 PFLOP/s) at which `diff(rate)` — a model time
    // difference, shrinking as the rate grows — equals `target`.
    let solve = |what: &str, target: f64, diff: &dyn Fn(f64) -> Result<f64, SimError>| {
        let (mut lo, mut hi) = (6.0f64, 16.0f64);
        let gap = |log_f: f64| Ok::<f64, SimError>(diff(10f64.powf(log_f))? - target);
        if gap(hi)? > 0.0 || gap(lo)? < 0.0 {
            return Err(SimError::Calibration(format!(
                "CPU fit: no {what} rate explains the measured difference of {target} s"
            )));
        }
        for _ in 0..100 {
            let mid = (lo + hi) / 2.0;
            if gap(mid)? > 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(10f64.powf((lo + hi) / 2.0))
    };
    // Start from free layers: the decode slope is mostly the lm_head. Each rate then moves the
    // other's fit only a little (a prefill samples one token; a decode step's layers are small), so a
    // few rounds settle both.
    let (mut layer, mut head) = (1e16, 1e16);
    for _ in 0..8 {
        head = solve("lm_head", d2 - d1, &|f| {
            Ok(step_s(layer, f, Phase::Decode, b2)? - step_s(layer, f, Phase::Decode, b1)?)
        })?;
        layer = solve("layer", t2 - t1, &|f| {
            Ok(step_s(f, head, Phase::Prefill, l2)? - step_s(f, head, Phase::Prefill, l1)?)
        })?;
    }
    let prefill_overhead_us = ((t1 - step_s(layer, head, Phase::Prefill, l1)?) * 1e6).max(0.0);
    let decode_overhead_us = ((d1 - step_s(layer, head, Phase::Decode, 1)?) * 1e6).max(0.0);
    let fitted = CostModel::new(model, device(layer, head, 1e18), &zero, SHAPE)?;
    // Memory: the weights plus exactly the serving config's KV pages (and half a page, so that the
    // page count does not round down).
    let page_bytes = model.kv_bytes_per_token() as f64 * duet_core::PAGE_TOKENS as f64;
    let hbm_bytes = fitted.weight_bytes_per_gpu() + (f64::from(m.kv_pages) + 0.5) * page_bytes;
    let calibration_toml = text(prefill_overhead_us, decode_overhead_us);
    Ok(CpuProfile {
        gpu: device(layer, head, hbm_bytes),
        calibration: Calibration::from_toml(&calibration_toml)?,
        calibration_toml,
        layer_flops: layer,
        head_flops: head,
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
            prefill: [(64, 0.012), (512, 0.070)],
            decode: (256, [(1, 0.003), (32, 0.030)]),
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
        for (b, t) in m.decode.1 {
            let got = predict_us(&model, &p, Phase::Decode, b, 256).unwrap();
            assert!(
                (got / (t * 1e6) - 1.0).abs() < 0.01,
                "decode {b}: {got} µs vs {t} s"
            );
        }
        // The KV pool is the serving config's.
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
