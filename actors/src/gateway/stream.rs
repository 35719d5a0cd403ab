//! One choice of one request, from submission to its last delta: receives the workers' token
//! events, re-runs the sequence elsewhere when a worker is lost, and turns tokens into text deltas
//! through the incremental detokenizer, the stop-string matcher, the reasoning separator and the
//! tool-call parser, in that order (stop strings apply to the raw output text, as in OpenAI's API).
//!
//! Dropping an unfinished `ChoiceRun` (the client went away) aborts its sequence at once, which
//! frees its pages on whichever worker holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use duet_core::types::SeqId;
use duet_model::tokenizer::TextTokenizer;
use ractor::ActorRef;
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::gateway::GatewayMsg;
use crate::seq::{Finish, SeqEvent, SeqJob, SeqParams, TokenLogprob};
use crate::trace::TraceCtx;
use duet_openai::detok::Detokenizer;
use duet_openai::protocol::FinishReason;
use duet_openai::reasoning::ReasoningParser;
use duet_openai::stop::StopMatcher;
use duet_openai::tools::{ToolCallParser, ToolEvent};

/// Re-runs of one sequence after worker losses or bad transfers before the request fails: each
/// re-run is a full prefill, and a sequence that kills this many workers is itself the problem.
pub const RESUBMITS_MAX: u32 = 4;

/// What the text pipeline needs besides the worker parameters.
#[derive(Clone)]
pub struct TextOptions {
    pub stop: Vec<String>,
    /// `Some(starts_inside)` separates `<think>` reasoning from content.
    pub reasoning: Option<bool>,
    /// Parse DeepSeek tool calls out of the content (the request carried tools).
    pub tools: Option<String>,
    pub skip_special_tokens: bool,
}

/// Everything the gateway learned from one event.
#[derive(Debug, Default)]
pub struct ChoiceDelta {
    pub reasoning: String,
    pub content: String,
    pub tool_events: Vec<ToolEvent>,
    /// Tokens this delta accounts for, with their log-probabilities when asked for.
    pub tokens: Vec<(u32, Option<TokenLogprob>)>,
    pub finish: Option<ChoiceFinish>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceFinish {
    Done {
        reason: FinishReason,
        /// The stop string or stop token that ended generation.
        matched: Option<Matched>,
    },
    Error(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Matched {
    Text(String),
    Token(u32),
}

pub struct ChoiceRun {
    gateway: ActorRef<GatewayMsg>,
    ids: Arc<AtomicU64>,
    id: SeqId,
    prompt: Arc<Vec<u32>>,
    params: SeqParams,
    rx: mpsc::UnboundedReceiver<SeqEvent>,
    generated: Vec<u32>,
    resubmits: u32,
    finished: bool,
    pub cached_tokens: Option<usize>,
    detok: Detokenizer,
    stop: StopMatcher,
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
    deadline: Instant,
    /// The whole output text so far (before reasoning/tool separation), for /generate.
    pub text: String,
    /// This choice's trace span (disabled when the request is not traced) and the span of its
    /// current run: the first, or a re-run after a failure.
    span: tracing::Span,
    run_span: tracing::Span,
}

impl ChoiceRun {
    /// Submits the sequence and returns the run that will receive its tokens.
    pub fn start(
        gateway: ActorRef<GatewayMsg>,
        ids: Arc<AtomicU64>,
        tokenizer: Arc<TextTokenizer>,
        prompt: Arc<Vec<u32>>,
        params: SeqParams,
        text: TextOptions,
        timeout: Duration,
        request_span: &tracing::Span,
    ) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(8)..];
        let detok = Detokenizer::new(tokenizer, tail, text.skip_special_tokens);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let mut run = Self {
            gateway,
            ids,
            id,
            params,
            rx,
            generated: Vec::new(),
            resubmits: 0,
            finished: false,
            cached_tokens: None,
            detok,
            stop: StopMatcher::new(text.stop),
            reasoning: text.reasoning.map(ReasoningParser::new),
            tools: text.tools.map(ToolCallParser::new),
            deadline: Clock::deadline(timeout),
            text: String::new(),
            span: crate::trace_span!(
                parent: request_span,
                "choice",
                prompt_tokens = prompt.len(),
                completion_tokens = tracing::field::Empty,
                finish_reason = tracing::field::Empty,
                error = tracing::field::Empty,
            ),
            run_span: tracing::Span::none(),
            prompt,
        };
        run.submit(tx, None);
        run
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    pub fn tool_calls(&self) -> Vec<duet_openai::tools::ToolCall> {
        self.tools
            .as_ref()
            .map(|t| t.calls().to_vec())
            .unwrap_or_default()
    }

    /// Sends the sequence (again, after `rerun_reason`) from the tokens streamed so far.
    fn submit(&mut self, events: mpsc::UnboundedSender<SeqEvent>, rerun_reason: Option<&str>) {
        self.run_span = crate::trace_span!(
            parent: &self.span,
            "sequence",
            seq = self.id,
            run = self.resubmits,
            rerun_reason = rerun_reason,
            tokens_already_streamed = self.generated.len(),
            outcome = tracing::field::Empty,
        );
        let mut tokens = Vec::with_capacity(self.prompt.len() + self.generated.len());
        tokens.extend_from_slice(&self.prompt);
        tokens.extend_from_slice(&self.generated);
        let mut params = self.params.clone();
        params.max_new_tokens = params.max_new_tokens.saturating_sub(self.generated.len());
        let job = SeqJob {
            id: self.id,
            tokens: Arc::new(tokens),
            prompt_len: self.prompt.len(),
            params,
            events,
            trace: TraceCtx::of(&self.run_span),
        };
        if self
            .gateway
            .cast(GatewayMsg::Submit(Box::new(job)))
            .is_err()
        {
            // The gateway actor is gone (shutting down); the closed channel ends the run.
        }
    }

    /// Re-runs the sequence from the tokens streamed so far, under a new id.
    fn resubmit(&mut self, why: &str) -> Result<(), String> {
        let _ = self.gateway.cast(GatewayMsg::Abort(self.id));
        if self.resubmits >= RESUBMITS_MAX {
            return Err(format!(
                "sequence lost {} times, giving up (last: {why})",
                self.resubmits + 1
            ));
        }
        self.resubmits += 1;
        tracing::warn!(
            seq = self.id,
            resubmit = self.resubmits,
            "re-running: {why}"
        );
        self.run_span.record("outcome", why);
        let (tx, rx) = mpsc::unbounded_channel();
        self.rx = rx;
        self.id = self.ids.fetch_add(1, Ordering::Relaxed);
        self.submit(tx, Some(why));
        Ok(())
    }

    /// Waits for the next worker event and returns what it adds; `None` once finished.
    pub async fn next(&mut self) -> Option<ChoiceDelta> {
        if self.finished {
            return None;
        }
        loop {
            let ev = tokio::time::timeout_at(self.deadline.into(), self.rx.recv()).await;
            let ev = match ev {
                Err(_) => return Some(self.fail("request timed out".into())),
                Ok(ev) => ev,
            };
            if let Some(d) = self.on_event(ev) {
                return Some(d);
            }
        }
    }

    /// The next delta if its event has already arrived, without waiting: a stream that fell
    /// behind the engine sends what is waiting in one write.
    pub fn try_next(&mut self) -> Option<ChoiceDelta> {
        use tokio::sync::mpsc::error::TryRecvError;
        while !self.finished {
            let ev = match self.rx.try_recv() {
                Ok(ev) => Some(ev),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => None,
            };
            if let Some(d) = self.on_event(ev) {
                return Some(d);
            }
        }
        None
    }

    /// Whether the last delta ended the choice.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// One event (`None`: every sender gone) into a delta; `None` when the sequence was re-run
    /// instead and the next event is awaited.
    fn on_event(&mut self, ev: Option<SeqEvent>) -> Option<ChoiceDelta> {
        let outcome = match ev {
            Some(SeqEvent::Token {
                token,
                logprob,
                cached_tokens,
                finish,
            }) => {
                if self.cached_tokens.is_none() {
                    self.cached_tokens = cached_tokens;
                }
                return Some(self.on_token(token, logprob, finish));
            }
            Some(SeqEvent::Failed(e)) => return Some(self.fail(e.to_string())),
            Some(SeqEvent::Retry(why)) => self.resubmit(&why.to_string()),
            // Every sender dropped without a final event: the worker holding the sequence
            // was lost. Re-run it from what was streamed.
            None => self.resubmit("worker lost"),
        };
        match outcome {
            Ok(()) => None,
            Err(e) => Some(self.fail(e)),
        }
    }

    fn fail(&mut self, e: String) -> ChoiceDelta {
        self.finished = true;
        self.run_span.record("outcome", e.as_str());
        self.span.record("error", e.as_str());
        let _ = self.gateway.cast(GatewayMsg::Abort(self.id));
        ChoiceDelta {
            finish: Some(ChoiceFinish::Error(e)),
            ..Default::default()
        }
    }

    fn on_token(
        &mut self,
        token: u32,
        logprob: Option<TokenLogprob>,
        finish: Option<Finish>,
    ) -> ChoiceDelta {
        self.generated.push(token);
        let mut out = ChoiceDelta {
            tokens: vec![(token, logprob)],
            ..Default::default()
        };
        // A stop token ends generation and is not shown (OpenAI).
        let raw = match finish {
            Some(Finish::Stop(_)) => String::new(),
            _ => self.detok.push(token).unwrap_or_default(),
        };
        let mut matched = None;
        let mut emit = String::new();
        if !raw.is_empty() {
            let s = self.stop.push(&raw);
            emit = s.emit;
            matched = s.stopped.map(Matched::Text);
        }
        let finishing = finish.is_some() || matched.is_some();
        if finishing && matched.is_none() {
            if let Ok(rest) = self.detok.finish()
                && !rest.is_empty()
            {
                let s = self.stop.push(&rest);
                emit.push_str(&s.emit);
                matched = s.stopped.map(Matched::Text);
            }
            if matched.is_none() {
                emit.push_str(&self.stop.finish());
            }
        }
        self.text.push_str(&emit);
        self.route_text(&emit, finishing, &mut out);
        if finishing {
            self.finished = true;
            let tool_calls = self.tools.as_ref().is_some_and(|t| t.had_calls());
            let reason = match (matched.is_some(), finish) {
                (false, Some(Finish::Length)) => FinishReason::Length,
                _ if tool_calls => FinishReason::ToolCalls,
                _ => FinishReason::Stop,
            };
            let matched = matched.or(match finish {
                Some(Finish::Stop(t)) => Some(Matched::Token(t)),
                _ => None,
            });
            if matches!(matched, Some(Matched::Text(_))) {
                // The worker is still generating: stop it now.
                let _ = self.gateway.cast(GatewayMsg::Abort(self.id));
            } else {
                let _ = self.gateway.cast(GatewayMsg::Done(self.id));
            }
            self.end_of_stream(reason);
            out.finish = Some(ChoiceFinish::Done { reason, matched });
        }
        out
    }

    /// Records the end of the stream on the choice's trace span.
    fn end_of_stream(&self, reason: FinishReason) {
        let reason = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        };
        self.run_span.record("outcome", "finished");
        self.span.record("completion_tokens", self.generated.len());
        self.span.record("finish_reason", reason);
        tracing::info!(
            target: crate::trace::TARGET,
            parent: &self.span,
            completion_tokens = self.generated.len(),
            finish_reason = reason,
            "end of stream"
        );
    }

    /// Splits released text into reasoning, content and tool-call events.
    fn route_text(&mut self, text: &str, last: bool, out: &mut ChoiceDelta) {
        let (mut reasoning, mut content) = (String::new(), String::new());
        match &mut self.reasoning {
            Some(p) => {
                let d = p.push(text);
                reasoning.push_str(&d.reasoning);
                content.push_str(&d.content);
                if last {
                    let d = p.finish();
                    reasoning.push_str(&d.reasoning);
                    content.push_str(&d.content);
                }
            }
            None => content.push_str(text),
        }
        out.reasoning = reasoning;
        match &mut self.tools {
            Some(t) => {
                let mut events = t.push(&content);
                if last {
                    events.extend(t.finish());
                }
                for e in events {
                    match e {
                        ToolEvent::Content(c) => out.content.push_str(&c),
                        other => out.tool_events.push(other),
                    }
                }
            }
            None => out.content = content,
        }
    }
}

impl Drop for ChoiceRun {
    fn drop(&mut self) {
        if !self.finished {
            self.run_span.record("outcome", "client gone");
            // Client disconnect: free the sequence's pages now, not at its next token.
            let _ = self.gateway.cast(GatewayMsg::Abort(self.id));
        }
    }
}
