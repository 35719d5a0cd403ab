//! Identifiers shared by every policy in the core.

use serde::{Deserialize, Serialize};

/// One sequence (one choice of one request) inside a worker. Unique per worker while it lives.
pub type SeqId = u64;

/// A worker: a prefill worker, or one decode DP-attention group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}", self.0)
    }
}
