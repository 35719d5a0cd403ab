//! The control plane's messages: rkyv-archived, validated on receipt (bytecheck), one per
//! length-prefixed frame of a `duet_transport::control` connection. The protocol version is
//! checked once per connection in the transport's hello, so a frame never needs its own.
//!
//! These are plain data mirrors of the in-process types (`SeqJob` without its channel, the
//! sampler as parameters + RNG state); conversions live here so the actors never see bytes.

use std::sync::Arc;

use duet_model::sampling::SamplingParams;
use rkyv::{Archive, Deserialize, Serialize};

use crate::protocol::WorkerLoad;
use crate::seq::{
    EventTx, Finish, SeqEvent, SeqFailure, SeqJob, SeqParams, SeqSampler, ThinkingBudgetSpec,
    TokenLogprob,
};
use crate::trace::TraceCtx;
use duet_model::grammar::{GrammarKind, GrammarSpec};

/// Bumped on any change to the messages below (3: `logit_bias` in the job's parameters; 4: the
/// model shape names the architecture and the KV width; 5: the job's grammar; 6: the job carries
/// its trace context).
pub const PROTOCOL_VERSION: u16 = 7;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireRole {
    Prefill,
    Decode,
}

/// What the gateway checks a joining worker against: the same model shape, or its KV is garbage.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub layers: u32,
    pub page_bytes: u64,
    pub vocab_size: u64,
    /// The model family (`DeepSeek`, `Qwen2`, `Llama`): tokenizer, template and KV must agree.
    pub architecture: String,
    /// KV values per token and layer (MLA latent or GQA `[k | v]`).
    pub kv_width: u32,
}

/// How a process moves KV: every process of a cluster must use the same.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireKvTransport {
    Quic,
    Ucx,
}

impl WireKvTransport {
    pub fn name(self) -> &'static str {
        match self {
            WireKvTransport::Quic => "quic",
            WireKvTransport::Ucx => "ucx",
        }
    }
}

/// The parallelism of a process's workers: each hosted worker is one DP-attention rank (its id);
/// with expert parallelism its ranks form EP group `ep_group` of `ep_size` ranks, each rank's
/// attention split over `tp_size` devices. Today every worker holds every expert: 0 / 1 / 1.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireParallelism {
    pub ep_group: u32,
    pub ep_size: u32,
    pub tp_size: u32,
}

impl Default for WireParallelism {
    fn default() -> Self {
        Self {
            ep_group: 0,
            ep_size: 1,
            tp_size: 1,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
pub struct Hello {
    pub role: WireRole,
    /// The workers this process hosts (one per prefill worker / decode DP group).
    pub workers: Vec<u32>,
    /// Where a decode process receives KV over QUIC ("ip:port", reachable from prefill hosts).
    pub kv_addr: Option<String>,
    pub kv_transport: WireKvTransport,
    pub parallelism: WireParallelism,
    pub shape: ModelShape,
    /// For logs: the process's host name and pid.
    pub name: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct WireLoad {
    pub running: u64,
    pub waiting: u64,
    pub outstanding_tokens: u64,
    pub pages_free: u64,
    pub pages_used: u64,
    pub pages_total: u64,
    pub max_running: u64,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
pub struct WireParams {
    pub temperature: f32,
    pub top_k: u64,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub max_new_tokens: u64,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    /// (token id, bias), as [`SeqParams::logit_bias`].
    pub logit_bias: Vec<(u32, f32)>,
    pub stop_token_ids: Vec<u32>,
    pub logprobs: Option<u64>,
    /// budget, `<think>`, `</think>`, `\n`.
    pub thinking: Option<(u64, u32, u32, u32)>,
    /// Constrained decoding: the spec only; the receiver compiles it and replays the tokens.
    pub grammar: Option<WireGrammar>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireGrammarKind {
    Regex,
    Lark,
    JsonSchema,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireGrammar {
    pub kind: WireGrammarKind,
    pub source: String,
    pub starts_after: Option<u32>,
}

impl From<&GrammarSpec> for WireGrammar {
    fn from(g: &GrammarSpec) -> Self {
        Self {
            kind: match g.kind {
                GrammarKind::Regex => WireGrammarKind::Regex,
                GrammarKind::Lark => WireGrammarKind::Lark,
                GrammarKind::JsonSchema => WireGrammarKind::JsonSchema,
            },
            source: g.source.clone(),
            starts_after: g.starts_after,
        }
    }
}

impl From<&WireGrammar> for GrammarSpec {
    fn from(g: &WireGrammar) -> Self {
        Self {
            kind: match g.kind {
                WireGrammarKind::Regex => GrammarKind::Regex,
                WireGrammarKind::Lark => GrammarKind::Lark,
                WireGrammarKind::JsonSchema => GrammarKind::JsonSchema,
            },
            source: g.source.clone(),
            starts_after: g.starts_after,
        }
    }
}

/// Events in one [`ToGateway::Events`]: ~200 bytes each with 20 top logprobs, far under the
/// control plane's frame limit.
pub const EVENTS_PER_MESSAGE_MAX: usize = 4096;

/// W3C trace context (fixed-size fields: nothing to bound on receipt).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireTrace {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
pub struct WireJob {
    pub id: u64,
    pub tokens: Vec<u32>,
    pub prompt_len: u64,
    pub params: WireParams,
    /// The span the job's work joins, when the request is traced.
    pub trace: Option<WireTrace>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFinish {
    Stop(u32),
    Length,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
pub enum WireEvent {
    Token {
        token: u32,
        logprob: Option<(f32, Vec<(u32, f32)>)>,
        cached_tokens: Option<u64>,
        finish: Option<WireFinish>,
    },
    Failed(String),
    Retry(String),
}

/// A sequence leaving prefill for decode: the job, its first token and its sampler.
#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
pub struct WireHandoff {
    pub group: u32,
    pub job: WireJob,
    pub first_token: u32,
    pub rng: [u64; 4],
    pub layers: u32,
}

/// Worker process → gateway.
#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
pub enum ToGateway {
    Hello(Hello),
    /// Every live worker of the process and its load: sent when a load changes and at least
    /// every heartbeat interval. A worker missing from the list is down (restarting).
    Workers(Vec<(u32, WireLoad)>),
    /// Sequence events in the order they happened: everything a process's workers produced since
    /// the last message (a decode step's tokens for all its sequences travel together), at most
    /// [`EVENTS_PER_MESSAGE_MAX`].
    Events(Vec<(u64, WireEvent)>),
    /// Decode reserved `pages` in `group`: send the job on to prefill worker `prefill`.
    Prefill {
        prefill: u32,
        group: u32,
        pages: Vec<u32>,
        job: WireJob,
        /// UCX: the staging grant for this prefill worker, the first time the pair meets.
        grant: Option<Vec<u8>>,
    },
    Handoff(WireHandoff),
    /// Prefill gave the job up: free the reservation.
    Unreserve {
        group: u32,
        seq: u64,
    },
    /// A worker lost a sequence it held (it failed and restarted): re-run it.
    Lost {
        seq: u64,
    },
    /// The process is draining (it got SIGTERM): place nothing new on its workers; what it holds
    /// runs to the end, and its relays, handoffs and aborts keep flowing until it leaves.
    Draining,
}

/// Gateway → worker process.
#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
pub enum ToWorker {
    Welcome,
    Refused(String),
    /// To a draining process: nothing is held there or on its way there any more; it may exit.
    Drained,
    Reserve {
        group: u32,
        prefill: u32,
        job: WireJob,
    },
    Prefill {
        prefill: u32,
        group: u32,
        /// The decode process's KV address (QUIC; empty for UCX).
        kv_addr: String,
        pages: Vec<u32>,
        job: WireJob,
        grant: Option<Vec<u8>>,
    },
    Handoff(WireHandoff),
    Unreserve {
        group: u32,
        seq: u64,
    },
    Abort {
        worker: u32,
        seq: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireMsgError {
    #[error("control message does not decode: {0}")]
    Decode(String),
    #[error("control message does not encode: {0}")]
    Encode(String),
}

pub fn encode<T>(msg: &T) -> Result<Vec<u8>, WireMsgError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(msg)
        .map(|b| b.to_vec())
        .map_err(|e| WireMsgError::Encode(e.to_string()))
}

/// Validates (bytecheck) and deserializes a frame from a peer; never panics on bad bytes.
pub fn decode<T>(buf: &[u8]) -> Result<T, WireMsgError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    // rkyv reads archived data in place and needs it aligned; a frame off the wire is not.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(buf.len());
    aligned.extend_from_slice(buf);
    rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned)
        .map_err(|e| WireMsgError::Decode(e.to_string()))
}

impl From<&WorkerLoad> for WireLoad {
    fn from(l: &WorkerLoad) -> Self {
        Self {
            running: l.running as u64,
            waiting: l.waiting as u64,
            outstanding_tokens: l.outstanding_tokens,
            pages_free: l.pages_free as u64,
            pages_used: l.pages_used as u64,
            pages_total: l.pages_total as u64,
            max_running: l.max_running as u64,
            prefix_queried_tokens: l.prefix_queried_tokens,
            prefix_hit_tokens: l.prefix_hit_tokens,
            preemptions: l.preemptions,
        }
    }
}

impl From<&WireLoad> for WorkerLoad {
    fn from(l: &WireLoad) -> Self {
        Self {
            running: l.running as usize,
            waiting: l.waiting as usize,
            outstanding_tokens: l.outstanding_tokens,
            pages_free: l.pages_free as usize,
            pages_used: l.pages_used as usize,
            pages_total: l.pages_total as usize,
            max_running: l.max_running as usize,
            prefix_queried_tokens: l.prefix_queried_tokens,
            prefix_hit_tokens: l.prefix_hit_tokens,
            preemptions: l.preemptions,
        }
    }
}

impl From<&SeqParams> for WireParams {
    fn from(p: &SeqParams) -> Self {
        Self {
            temperature: p.sampling.temperature,
            top_k: p.sampling.top_k as u64,
            top_p: p.sampling.top_p,
            min_p: p.sampling.min_p,
            seed: p.sampling.seed,
            max_new_tokens: p.max_new_tokens as u64,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            repetition_penalty: p.repetition_penalty,
            logit_bias: p.logit_bias.clone(),
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs.map(|k| k as u64),
            thinking: p.thinking.map(|t| {
                (
                    t.budget as u64,
                    t.think_start_id,
                    t.think_end_id,
                    t.newline_id,
                )
            }),
            grammar: p.grammar.as_deref().map(WireGrammar::from),
        }
    }
}

impl From<&WireParams> for SeqParams {
    fn from(p: &WireParams) -> Self {
        Self {
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.min_p,
                seed: p.seed,
            },
            max_new_tokens: p.max_new_tokens as usize,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            repetition_penalty: p.repetition_penalty,
            logit_bias: p.logit_bias.clone(),
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs.map(|k| k as usize),
            thinking: p
                .thinking
                .map(
                    |(budget, think_start_id, think_end_id, newline_id)| ThinkingBudgetSpec {
                        budget: budget as usize,
                        think_start_id,
                        think_end_id,
                        newline_id,
                    },
                ),
            grammar: p
                .grammar
                .as_ref()
                .map(|g| std::sync::Arc::new(GrammarSpec::from(g))),
        }
    }
}

impl WireJob {
    pub fn of(job: &SeqJob) -> Self {
        Self {
            id: job.id,
            tokens: job.tokens.to_vec(),
            prompt_len: job.prompt_len as u64,
            params: WireParams::from(&job.params),
            trace: job.trace.map(|t| WireTrace {
                trace_id: t.trace_id,
                span_id: t.span_id,
                flags: t.flags,
            }),
        }
    }

    /// The job again, its events going to `events`.
    pub fn into_job(self, events: EventTx) -> SeqJob {
        SeqJob {
            id: self.id,
            prompt_len: (self.prompt_len as usize).min(self.tokens.len()),
            tokens: Arc::new(self.tokens),
            params: SeqParams::from(&self.params),
            events,
            trace: self.trace.map(|t| TraceCtx {
                trace_id: t.trace_id,
                span_id: t.span_id,
                flags: t.flags,
            }),
        }
    }
}

impl WireHandoff {
    pub fn sampler(&self) -> SeqSampler {
        SeqSampler::resume(SeqParams::from(&self.job.params), self.rng)
    }
}

impl WireEvent {
    pub fn is_final(&self) -> bool {
        match self {
            WireEvent::Token { finish, .. } => finish.is_some(),
            WireEvent::Failed(_) | WireEvent::Retry(_) => true,
        }
    }
}

impl From<&SeqEvent> for WireEvent {
    fn from(e: &SeqEvent) -> Self {
        match e {
            SeqEvent::Token {
                token,
                logprob,
                cached_tokens,
                finish,
            } => WireEvent::Token {
                token: *token,
                logprob: logprob.as_ref().map(|l| (l.logprob, l.top.clone())),
                cached_tokens: cached_tokens.map(|c| c as u64),
                finish: finish.map(|f| match f {
                    Finish::Stop(t) => WireFinish::Stop(t),
                    Finish::Length => WireFinish::Length,
                }),
            },
            SeqEvent::Failed(m) => WireEvent::Failed(m.to_string()),
            SeqEvent::Retry(m) => WireEvent::Retry(m.to_string()),
        }
    }
}

impl From<WireEvent> for SeqEvent {
    fn from(e: WireEvent) -> Self {
        match e {
            WireEvent::Token {
                token,
                logprob,
                cached_tokens,
                finish,
            } => SeqEvent::Token {
                token,
                logprob: logprob.map(|(logprob, top)| TokenLogprob { logprob, top }),
                cached_tokens: cached_tokens.map(|c| c as usize),
                finish: finish.map(|f| match f {
                    WireFinish::Stop(t) => Finish::Stop(t),
                    WireFinish::Length => Finish::Length,
                }),
            },
            WireEvent::Failed(m) => SeqEvent::Failed(SeqFailure::Remote(m)),
            WireEvent::Retry(m) => SeqEvent::Retry(SeqFailure::Remote(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job() -> WireJob {
        WireJob {
            id: 42,
            tokens: vec![1, 2, 3, 70_000],
            prompt_len: 3,
            params: WireParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.0,
                seed: Some(7),
                max_new_tokens: 128,
                presence_penalty: 0.1,
                frequency_penalty: 0.2,
                repetition_penalty: 1.1,
                logit_bias: vec![(5, -100.0), (9, 2.5)],
                stop_token_ids: vec![1, 2],
                logprobs: Some(3),
                thinking: Some((16, 128_798, 128_799, 201)),
                grammar: Some(WireGrammar {
                    kind: WireGrammarKind::JsonSchema,
                    source: r#"{"type":"object"}"#.into(),
                    starts_after: Some(128_799),
                }),
            },
            trace: Some(WireTrace {
                trace_id: [7; 16],
                span_id: [9; 8],
                flags: 1,
            }),
        }
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            ToWorker::Reserve {
                group: 9,
                prefill: 3,
                job: job(),
            },
            ToWorker::Handoff(WireHandoff {
                group: 1,
                job: job(),
                first_token: 5,
                rng: [1, 2, 3, u64::MAX],
                layers: 61,
            }),
            ToWorker::Refused("no".into()),
        ];
        for m in msgs {
            let back: ToWorker = decode(&encode(&m).unwrap()).unwrap();
            assert_eq!(format!("{m:?}"), format!("{back:?}"));
        }
        let e = ToGateway::Events(vec![
            (
                3,
                WireEvent::Token {
                    token: 7,
                    logprob: Some((-0.5, vec![(7, -0.5), (8, -1.5)])),
                    cached_tokens: Some(64),
                    finish: Some(WireFinish::Stop(7)),
                },
            ),
            (4, WireEvent::Retry("moved".into())),
        ]);
        let back: ToGateway = decode(&encode(&e).unwrap()).unwrap();
        assert_eq!(format!("{e:?}"), format!("{back:?}"));
    }

    #[test]
    fn a_job_keeps_every_parameter_and_the_sampler_its_stream() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let j = job().into_job(tx);
        assert_eq!(format!("{:?}", WireJob::of(&j)), format!("{:?}", job()));
        let mut a = SeqSampler::new(j.params.clone());
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let toks = [1u32, 2, 3];
        a.next(&logits, &toks, 3, None);
        let mut b = SeqSampler::resume(j.params.clone(), a.rng_state());
        for _ in 0..20 {
            assert_eq!(
                a.next(&logits, &toks, 3, None),
                b.next(&logits, &toks, 3, None)
            );
        }
    }

    proptest! {
        /// Bytes from a peer never panic the decoder, whatever they are.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ToGateway>(&bytes);
            let _ = decode::<ToWorker>(&bytes);
        }

        /// A valid frame with bytes flipped or cut either decodes or errors; never panics.
        #[test]
        fn damaged_frames_never_panic(at in 0usize..400, bit in 0u8..8, cut in 0usize..400) {
            let mut b = encode(&ToWorker::Reserve { group: 1, prefill: 2, job: job() }).unwrap();
            let i = at % b.len();
            b[i] ^= 1 << bit;
            let _ = decode::<ToWorker>(&b);
            b.truncate(cut.min(b.len()));
            let _ = decode::<ToWorker>(&b);
        }
    }
}
