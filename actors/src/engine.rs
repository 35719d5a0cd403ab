//! What a worker computes with: the model (DeepSeek, Qwen2 or Llama) on duet's kernels, or the
//! echo engine.
//!
//! The echo engine returns tokens without computing anything. It exists to measure the serving
//! path around the model (gateway, actors, streaming) — `duet serve --engine echo` — and is a test
//! tool, never a way to serve a model: it emits the prompt's own tokens back in a cycle.

use std::collections::BTreeMap;
use std::sync::Arc;

use duet_core::sched::StepPlan;
use duet_core::types::SeqId;
use duet_model::kv::{KvCache, KvContent};
use duet_model::{LogitsMode, Model, SeqInput};
use duet_transport::{KvAttention, KvLayout};

#[derive(Clone)]
pub enum Engine {
    Model(Arc<Model>),
    Echo { vocab_size: usize },
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Model(_) => f.write_str("Engine::Model"),
            Engine::Echo { .. } => f.write_str("Engine::Echo"),
        }
    }
}

/// A worker's KV storage: the model's paged pools, or nothing for echo.
pub enum WorkerKv {
    Model(KvCache),
    Echo,
}

/// The wire layout of a cache's pages, which every KV frame carries and a decode worker checks.
pub fn kv_layout(cache: &KvCache) -> KvLayout {
    KvLayout {
        attention: match cache.content() {
            KvContent::Latent => KvAttention::Mla,
            KvContent::KeysValues => KvAttention::Gqa,
        },
        elem_bytes: cache.dtype().size_bytes() as u8,
        // A width comes from config.json, whose fields are bounded far below u32::MAX
        // (a layer's pool would not fit in memory long before).
        width: u32::try_from(cache.width()).unwrap_or(u32::MAX),
    }
}

/// One batch row: what the model runs for one sequence in one step. Owned, because a step runs
/// on a blocking thread while the worker's scheduler keeps serving its mailbox.
pub struct Row {
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub block_table: Vec<u32>,
}

/// The rows of a planned step: each item's chunk of tokens and its sequence's block table.
pub fn plan_rows(
    plan: &duet_core::sched::StepPlan,
    sched: &duet_core::sched::Scheduler,
    pages: &duet_core::kv::KvManager,
) -> Vec<Row> {
    plan.items
        .iter()
        .map(|it| {
            let toks = sched.tokens(it.seq).unwrap_or(&[]);
            let end = (it.start + it.len).min(toks.len());
            Row {
                tokens: toks[it.start.min(end)..end].to_vec(),
                start_pos: it.start,
                block_table: pages.block_table(it.seq).unwrap_or(&[]).to_vec(),
            }
        })
        .collect()
}

/// Last-position logits of every row, `rows × vocab`, or nothing for echo.
pub enum StepLogits {
    Model { data: Vec<f32>, vocab: usize },
    Echo,
}

impl StepLogits {
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        match self {
            StepLogits::Model { data, vocab } => data.get(i * vocab..(i + 1) * vocab),
            StepLogits::Echo => None,
        }
    }
}

/// Why a step produced no logits.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Model(#[from] duet_model::Error),
}

/// Why a sequence's KV did not reach its decode group.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Transport(#[from] duet_transport::TransportError),
    #[error("layer {layer} not delivered to decode group {group} within {deadline:?}")]
    Deadline {
        layer: u32,
        group: u32,
        deadline: std::time::Duration,
    },
    #[error("reading layer {layer} from the KV pool: {message}")]
    ReadPages { layer: usize, message: String },
    #[error("{src} source pages for {dest} destination pages")]
    PageCount { src: usize, dest: usize },
    #[error("the KV sender task ended early")]
    SenderLost,
}

/// A worker's step came back: the plan it ran, the pool it borrowed, and its logits or why not.
pub struct StepDone {
    pub plan: StepPlan,
    pub kv: WorkerKv,
    pub result: Result<StepLogits, StepError>,
    /// Prefill: sequences whose KV could not be delivered, with the first failure of each.
    pub send_errors: BTreeMap<SeqId, SendError>,
}

impl Engine {
    pub fn vocab_size(&self) -> usize {
        match self {
            Engine::Model(m) => m.config.vocab_size,
            Engine::Echo { vocab_size } => *vocab_size,
        }
    }

    pub fn max_positions(&self) -> usize {
        match self {
            Engine::Model(m) => m.config.max_position_embeddings,
            Engine::Echo { .. } => usize::MAX / 2,
        }
    }

    /// An expert-parallel rank's step without a batch: it serves the other ranks' MoE rows.
    pub fn ep_idle_step(&self) -> Result<(), StepError> {
        match self {
            Engine::Model(m) => Ok(m.ep_idle_step()?),
            Engine::Echo { .. } => Ok(()),
        }
    }

    /// [`Engine::ep_idle_step`] on a blocking thread; `done` gets the pool back (an empty plan:
    /// nothing of the worker's own ran).
    pub fn spawn_ep_idle_step(&self, kv: WorkerKv, done: impl FnOnce(StepDone) + Send + 'static) {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = engine.ep_idle_step().map(|()| StepLogits::Echo);
            done(StepDone {
                plan: Default::default(),
                kv,
                result,
                send_errors: Default::default(),
            });
        });
    }

    pub fn new_kv(&self, pages: usize) -> WorkerKv {
        match self {
            Engine::Model(m) => WorkerKv::Model(m.new_cache(pages)),
            Engine::Echo { .. } => WorkerKv::Echo,
        }
    }

    /// Runs one step, calling `after_layer` as each layer's KV lands in the cache.
    pub fn step(
        &self,
        kv: &mut WorkerKv,
        rows: &[Row],
        after_layer: &mut dyn FnMut(usize, &KvCache) -> duet_model::Result<()>,
    ) -> duet_model::Result<StepLogits> {
        match (self, kv) {
            (Engine::Model(m), WorkerKv::Model(cache)) => {
                let batch: Vec<SeqInput<'_>> = rows
                    .iter()
                    .map(|r| SeqInput {
                        tokens: &r.tokens,
                        start_pos: r.start_pos,
                        block_table: &r.block_table,
                    })
                    .collect();
                let logits = m.forward_observed(cache, &batch, LogitsMode::Last, after_layer)?;
                Ok(StepLogits::Model {
                    data: logits.to_vec_f32(),
                    vocab: m.config.vocab_size,
                })
            }
            _ => Ok(StepLogits::Echo),
        }
    }
}

/// The echo engine's next token for a sequence: its prompt replayed in a cycle.
pub fn echo_token(tokens: &[u32], prompt_len: usize) -> u32 {
    let prompt = &tokens[..prompt_len.clamp(1, tokens.len().max(1))];
    let generated = tokens.len().saturating_sub(prompt_len);
    prompt
        .get(generated % prompt.len().max(1))
        .copied()
        .unwrap_or(0)
}
