//! The prefill/decode protocol as sans-IO state machines (quinn-proto's split: events in with the
//! time as an argument, decisions out as data; the actors are the IO drivers).
//!
//! - [`GatewayCore`]: where and when each sequence is prefilled and decoded (a FIFO queue,
//!   decode placement against committed pages, prefill routing by prefix and load).
//! - [`DecodeCore`]: one decode DP group — the reservation queue, reservations waiting for their
//!   KV and handoff (deadlines, TTL), the running batch, and when a sequence ends.
//! - [`PrefillCore`]: one prefill worker — its queue, its steps, and what happens to a sequence
//!   after its first token (finish, hand off to decode, or re-run).
//! - [`Context`]: the honest context limit of a cluster (what a group can hold), and the
//!   admission check against it.
//!
//! # Page ownership
//!
//! A sequence's pages on a worker are owned by exactly one entry of that worker's core: a
//! reservation, a running sequence, or a prefill job. Every path that ends an entry removes it and
//! frees its pages in the same call ([`DecodeCore`]'s `release`, [`PrefillCore`]'s `release`), so
//! pages are freed exactly once by construction; a release of an entry that is not there is
//! counted ([`DecodeCore::double_releases`]) and the property tests assert the count stays zero
//! and that the pool returns to empty after any interleaving.

mod decode;
mod gateway;
mod prefill;

pub use decode::{DecodeAction, DecodeConfig, DecodeCore, FrameCheck, Held, TokenOutcome};
pub use gateway::{GatewayAction, GatewayConfig, GatewayCore, PdRequest, RankId};
pub use prefill::{FirstToken, PrefillCore, PrefillJobState, Refused};

use crate::PAGE_TOKENS;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (EOS or `stop_token_ids`) was generated.
    Stop(u32),
    /// `max_tokens` or the context limit was reached.
    Length,
}

/// Why a worker could not go on with a sequence. `retryable` ones are re-run elsewhere by the
/// gateway from the tokens already streamed; the others end the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeqFailure {
    #[error("decode group {group} is full")]
    GroupFull { group: u32 },
    #[error("prefill worker {worker} queue is full")]
    PrefillFull { worker: u32 },
    #[error("decode batch queue full")]
    BatchFull,
    #[error("sequence of {tokens} tokens does not fit the KV pool of {what} ({pages} pages)")]
    TooLong {
        tokens: usize,
        what: String,
        pages: usize,
    },
    #[error("KV transfer: {0}")]
    Transfer(String),
    #[error("KV layers {layers_in} of {layers} arrived within the {deadline_ms} ms deadline")]
    TransferDeadline {
        layers_in: usize,
        layers: usize,
        deadline_ms: u64,
    },
    #[error("engine: {0}")]
    Engine(String),
    #[error("no live prefill worker and decode group to serve the request")]
    NoLiveWorkers,
    #[error("{0}")]
    Internal(String),
    /// What a worker process reported, as it said it (the control connection carries the text).
    #[error("{0}")]
    Remote(String),
}

impl SeqFailure {
    /// Whether another worker could serve the sequence.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SeqFailure::GroupFull { .. }
                | SeqFailure::PrefillFull { .. }
                | SeqFailure::BatchFull
                | SeqFailure::Transfer(_)
                | SeqFailure::TransferDeadline { .. }
        )
    }
}

/// What ends a sequence besides its context: the request's own limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqLimits {
    /// Tokens to generate in this run, counting the prefill worker's first token.
    pub max_new_tokens: usize,
    /// Generation ends after emitting one of these.
    pub stop_token_ids: Vec<u32>,
}

impl SeqLimits {
    /// Whether `token`, the `generated`-th token of this run, making the sequence `len` tokens long,
    /// ends it; `context` is the most tokens a sequence may have.
    pub fn finish(
        &self,
        token: u32,
        generated: usize,
        len: usize,
        context: usize,
    ) -> Option<Finish> {
        if self.stop_token_ids.contains(&token) {
            Some(Finish::Stop(token))
        } else if generated >= self.max_new_tokens || len >= context {
            Some(Finish::Length)
        } else {
            None
        }
    }
}

/// The context limit a cluster can honour: a sequence (prompt plus every generated token) is at
/// most `max_model_len` tokens, which the model's positions and every worker's KV pool can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub max_model_len: usize,
}

/// A request that can never fit, whatever the load: a 400, never a retryable 5xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "This model's maximum context length is {max_model_len} tokens. However, you requested \
     {requested} tokens ({prompt} in the messages, {max_tokens} in the completion). Please reduce \
     the length of the messages or completion."
)]
pub struct ContextExceeded {
    pub max_model_len: usize,
    pub requested: usize,
    pub prompt: usize,
    pub max_tokens: usize,
}

impl Context {
    /// The smallest of the model's positions and the pools a sequence passes through: it is
    /// prefilled in one prefill worker's pool and decoded in one decode group's (whole pages of
    /// [`PAGE_TOKENS`]).
    pub fn new(max_positions: usize, prefill_pages: usize, decode_pages: usize) -> Self {
        let pool = prefill_pages.min(decode_pages).saturating_mul(PAGE_TOKENS);
        Self {
            max_model_len: max_positions.min(pool),
        }
    }

    /// Admission: `Ok(max_tokens)` to generate. An explicit `max_tokens` must fit beside the prompt
    /// (vLLM's and OpenAI's rule); without one, `default_max_tokens` is clipped to what is left.
    pub fn admit(
        &self,
        prompt: usize,
        max_tokens: Option<usize>,
        default_max_tokens: usize,
    ) -> Result<usize, ContextExceeded> {
        let exceeded = |max_tokens: usize| ContextExceeded {
            max_model_len: self.max_model_len,
            requested: prompt.saturating_add(max_tokens),
            prompt,
            max_tokens,
        };
        // At least one token must be generated: a prompt of max_model_len leaves no room.
        if prompt >= self.max_model_len {
            return Err(exceeded(max_tokens.unwrap_or(1)));
        }
        match max_tokens {
            Some(m) if prompt.saturating_add(m) > self.max_model_len => Err(exceeded(m)),
            Some(m) => Ok(m),
            None => Ok(default_max_tokens.min(self.max_model_len - prompt)),
        }
    }
}

#[cfg(test)]
mod tests;
