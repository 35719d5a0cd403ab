//! The model's expert-parallel exchange over the transport's all-to-all: a rank's forward pass
//! runs on a blocking thread and waits here for each round while the runtime moves the blocks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use duet_core::ep::RowBlock;
use duet_model::ExpertExchange;
use duet_transport::a2a::AllToAll;

/// One rank's [`ExpertExchange`]: numbers its rounds and runs each on the given runtime.
pub struct A2aExchange {
    a2a: Arc<dyn AllToAll>,
    rt: tokio::runtime::Handle,
    round: AtomicU64,
}

impl A2aExchange {
    pub fn new(a2a: Arc<dyn AllToAll>, rt: tokio::runtime::Handle) -> Self {
        Self {
            a2a,
            rt,
            round: AtomicU64::new(0),
        }
    }
}

impl ExpertExchange for A2aExchange {
    /// Called from a thread outside the runtime (a step's blocking thread).
    fn exchange(&self, blocks: Vec<RowBlock>) -> Result<Vec<RowBlock>, String> {
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        self.rt
            .block_on(self.a2a.exchange(round, blocks))
            .map_err(|e| e.to_string())
    }
}
