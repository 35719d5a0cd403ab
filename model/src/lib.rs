//! DeepSeek-V2/V2-Lite/V3/R1, and the R1 distillations' Qwen2 and Llama, on duet's kernels:
//! config, checkpoint loading, tokenizer and chat template, the forward pass over the paged KV
//! cache (MLA's latent or GQA's keys and values), sampling and generation.

pub mod chat;
pub mod config;
pub mod ep;
mod ffn;
pub mod generate;
mod gqa;
pub mod grammar;
pub mod kv;
mod loader;
pub mod model;
pub use duet_core::rng;
pub mod safetensors_io;
pub mod sampling;
pub mod tiny;
pub mod tokenizer;

use std::path::PathBuf;

pub use config::{Architecture, ModelConfig};
pub use duet_kernels::DType;
pub use ep::{EpRank, ExpertExchange};
pub use loader::LoadProgress;
pub use model::{AttentionForm, LogitsMode, Model, SeqInput};

/// Everything that can go wrong between a model directory and a token. Variants name the file
/// and tensor so that a bad checkpoint is fixable from the message alone.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid config: {detail}", path.display())]
    Config { path: PathBuf, detail: String },
    #[error("{}: invalid safetensors file: {detail}", path.display())]
    Safetensors { path: PathBuf, detail: String },
    #[error("{}: no safetensors weights found (expected model.safetensors or model.safetensors.index.json)", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: {detail}", file.display())]
    ExpertLayout { file: PathBuf, detail: String },
    #[error("{}: missing tensor {name}", file.display())]
    MissingTensor { file: PathBuf, name: String },
    #[error("{}: tensor {name} has shape {got:?}, expected {expected:?}", file.display())]
    TensorShape {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{}: tensor {name} has unsupported dtype {dtype}", file.display())]
    TensorDType {
        file: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{}: tokenizer: {detail}", path.display())]
    Tokenizer { path: PathBuf, detail: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("KV cache full: {needed} pages needed, {free} free")]
    KvFull { needed: usize, free: usize },
    #[error("sequence of {len} tokens exceeds max_position_embeddings {max}")]
    TooLong { len: usize, max: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Kernel(#[from] duet_kernels::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
