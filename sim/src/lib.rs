//! duet's capacity planner: core's scheduler, KV page allocator with radix prefix cache, prefill
//! router and decode DP-group balancer, run unmodified under a virtual clock, with step times from a
//! cost model of DeepSeek-V3-architecture models on a catalogue of GPUs (sim/README.md).
//!
//! - [`rng`]: the seeded generator and distributions;
//! - [`hardware`]: the GPU catalogue;
//! - [`model`]: config.json and the sizes and FLOPs derived from it;
//! - [`calibration`]: every efficiency factor, from `calibration.toml`;
//! - [`cost`]: step times of prefill and decode groups, KV transfer times, the memory bound;
//! - [`workload`]: synthetic workloads and Mooncake traces;
//! - [`engine`]: the discrete-event simulation;
//! - [`report`]: percentiles, throughput, goodput, and the table;
//! - [`plan`]: the search behind `duet plan`;
//! - [`chart`]: SVG charts.

pub mod calibration;
pub mod chart;
pub mod cost;
pub mod cpu;
pub mod engine;
pub mod hardware;
pub mod model;
pub mod plan;
pub mod report;
pub use duet_core::rng;
pub mod workload;

pub use calibration::Calibration;
pub use cost::MoeBalance;
pub use engine::{SimConfig, Simulation};
pub use hardware::Gpu;
pub use model::ModelConfig;
pub use report::Report;

/// Errors at the simulator's edge: bad inputs from files or flags. Expected outcomes (a request that
/// fails, a cluster that misses its SLO) are data in the report, not errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    #[error("model config: {0}")]
    ModelConfig(String),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("workload: {0}")]
    Workload(String),
    #[error("invalid setup: {0}")]
    Invalid(String),
    #[error("does not fit: {0}")]
    DoesNotFit(String),
    #[error("{0}")]
    Io(String),
    #[error("chart: {0}")]
    Chart(String),
}
