//! The calibration file: every efficiency factor of the cost model (see `sim/calibration.toml`, which
//! is embedded as the default and documents each factor and its source).

use serde::Deserialize;

use crate::SimError;

/// The embedded default calibration.
pub const DEFAULT_CALIBRATION: &str = include_str!("../calibration.toml");
/// Largest expert-load CV accepted: at 10 a log-normal puts nearly all load on a handful of experts,
/// beyond anything routing with an auxiliary-loss-free balance term produces.
const EXPERT_LOAD_CV_MAX: f64 = 10.0;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub compute: Compute,
    pub network: Network,
    pub overlap: Overlap,
    pub moe: Moe,
    pub memory: Memory,
    pub pd: Pd,
    pub mtp: Mtp,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compute {
    pub gemm_efficiency: f64,
    pub attn_prefill_efficiency: f64,
    pub attn_decode_efficiency: f64,
    pub hbm_efficiency: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub nvlink_efficiency: f64,
    pub rdma_efficiency: f64,
    pub all_to_all_latency_us: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlap {
    pub prefill_overlap: f64,
    pub decode_overlap: f64,
    pub prefill_step_overhead_us: f64,
    pub decode_step_overhead_us: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Moe {
    /// Coefficient of variation of the experts' long-run loads within a layer (what EPLB places by).
    pub expert_load_cv: f64,
    /// Coefficient of variation of a step's per-expert load around its long-run value.
    pub expert_load_drift_cv: f64,
    pub redundant_experts: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    pub activation_reserve_bytes: f64,
    pub hbm_usable_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pd {
    pub handoff_latency_us: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtp {
    pub draft_layer_cost: f64,
}

impl Default for Calibration {
    fn default() -> Self {
        Self::from_toml(DEFAULT_CALIBRATION).expect("the embedded calibration parses")
    }
}

impl Calibration {
    /// Parses a calibration file. A file may give only some keys: the rest come from the default.
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        let mut base: toml::Table = toml::from_str(DEFAULT_CALIBRATION)
            .map_err(|e| SimError::Calibration(format!("embedded default: {e}")))?;
        let over: toml::Table =
            toml::from_str(text).map_err(|e| SimError::Calibration(e.to_string()))?;
        for (section, v) in over {
            match (base.get_mut(&section), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(o)) => b.extend(o),
                _ => {
                    return Err(SimError::Calibration(format!(
                        "unknown section [{section}]"
                    )));
                }
            }
        }
        let cal: Calibration = toml::Value::Table(base)
            .try_into()
            .map_err(|e: toml::de::Error| SimError::Calibration(e.to_string()))?;
        cal.validate()?;
        Ok(cal)
    }

    fn validate(&self) -> Result<(), SimError> {
        let fractions = [
            ("compute.gemm_efficiency", self.compute.gemm_efficiency),
            (
                "compute.attn_prefill_efficiency",
                self.compute.attn_prefill_efficiency,
            ),
            (
                "compute.attn_decode_efficiency",
                self.compute.attn_decode_efficiency,
            ),
            ("compute.hbm_efficiency", self.compute.hbm_efficiency),
            ("network.nvlink_efficiency", self.network.nvlink_efficiency),
            ("network.rdma_efficiency", self.network.rdma_efficiency),
            (
                "memory.hbm_usable_fraction",
                self.memory.hbm_usable_fraction,
            ),
        ];
        for (name, v) in fractions {
            if !(v > 0.0 && v <= 1.0) {
                return Err(SimError::Calibration(format!(
                    "{name} = {v} is not in (0, 1]"
                )));
            }
        }
        let overlaps = [
            ("overlap.prefill_overlap", self.overlap.prefill_overlap),
            ("overlap.decode_overlap", self.overlap.decode_overlap),
        ];
        for (name, v) in overlaps {
            if !(0.0..=1.0).contains(&v) {
                return Err(SimError::Calibration(format!(
                    "{name} = {v} is not in [0, 1]"
                )));
            }
        }
        let non_negative = [
            (
                "network.all_to_all_latency_us",
                self.network.all_to_all_latency_us,
            ),
            (
                "overlap.prefill_step_overhead_us",
                self.overlap.prefill_step_overhead_us,
            ),
            (
                "overlap.decode_step_overhead_us",
                self.overlap.decode_step_overhead_us,
            ),
            (
                "memory.activation_reserve_bytes",
                self.memory.activation_reserve_bytes,
            ),
            ("pd.handoff_latency_us", self.pd.handoff_latency_us),
            ("mtp.draft_layer_cost", self.mtp.draft_layer_cost),
            ("moe.expert_load_cv", self.moe.expert_load_cv),
            ("moe.expert_load_drift_cv", self.moe.expert_load_drift_cv),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(SimError::Calibration(format!(
                    "{name} = {v} must be finite and ≥ 0"
                )));
            }
        }
        for (name, cv) in [
            ("moe.expert_load_cv", self.moe.expert_load_cv),
            ("moe.expert_load_drift_cv", self.moe.expert_load_drift_cv),
        ] {
            if cv > EXPERT_LOAD_CV_MAX {
                return Err(SimError::Calibration(format!(
                    "{name} = {cv} is above {EXPERT_LOAD_CV_MAX}: one expert would take nearly all tokens"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses_and_partial_override_merges() {
        let d = Calibration::default();
        let c = Calibration::from_toml("[moe]\nexpert_load_drift_cv = 0.0\n").unwrap();
        assert_eq!(c.moe.expert_load_drift_cv, 0.0);
        assert_eq!(c.moe.expert_load_cv, d.moe.expert_load_cv);
        assert_eq!(c.compute, d.compute);
        assert!(Calibration::from_toml("[moe]\nexpert_load_cv = -0.5\n").is_err());
        assert!(Calibration::from_toml("[moe]\nexpert_load_drift_cv = 50\n").is_err());
        assert!(Calibration::from_toml("[nope]\nx = 1\n").is_err());
        assert!(Calibration::from_toml("[moe]\ntypo = 1\n").is_err());
    }
}
