//! duet's compute ops: one op set over device tensors, with a CPU backend that always builds.
//!
//! The model crate calls only the functions in [`ops`] and the constructors/readers on
//! [`Tensor`]; it never reaches into a host slice. That keeps a second backend (CUDA through
//! cudarc, feature `cuda`, a later issue) a matter of adding a `Storage` variant and one arm per
//! op, as candle does. Host-side *metadata* (token positions, block tables, routing decisions)
//! is passed as plain slices: every backend needs it on the host to size its launches anyway.
//!
//! Conventions:
//! - activations are `F32`, row-major `[rows, cols]`;
//! - a linear layer's weight is `[out_features, in_features]` as checkpoints store it, and
//!   [`ops::matmul`] computes `x · Wᵀ` with f32 accumulation whatever the weight dtype.

pub mod cpu;
pub mod moe;
pub mod ops;
pub mod rope;
pub mod shape;
mod tensor;

pub use tensor::{DType, Device, Tensor};

/// The config's compute dtype as a tensor dtype.
impl From<duet_core::config::ComputeDtype> for DType {
    fn from(d: duet_core::config::ComputeDtype) -> Self {
        match d {
            duet_core::config::ComputeDtype::F32 => DType::F32,
            duet_core::config::ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

/// Errors from ops: shape and dtype checks at the op boundary. Ops never panic on a bad shape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: unsupported dtype {dtype:?}")]
    DType { op: &'static str, dtype: DType },
    #[error("tensor of shape {shape:?} needs {expected} elements, got {got}")]
    ElementCount {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn shape_err<T>(op: &'static str, detail: String) -> Result<T> {
    Err(Error::Shape { op, detail })
}
