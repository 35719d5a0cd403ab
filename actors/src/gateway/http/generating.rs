//! The one path every generating endpoint (chat, completions, SGLang's generate) takes: the
//! [`Endpoint`] trait says what differs (prompts and parameters in, the shape of the answer out);
//! [`generating`] does the rest the same for all three — body limit, parse, admission, one
//! [`ChoiceRun`] per choice, latency metrics, a JSON body or a bounded SSE stream with the closing
//! usage event and `[DONE]`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc;

use super::{
    Admission, AppState, SSE_QUEUE_EVENTS, Shared, admit, error_response, now_s, read_body,
};
use crate::clock::Clock;
use crate::gateway::stream::{ChoiceDelta, ChoiceFinish, ChoiceRun, Matched, TextOptions};
use crate::metrics::Metrics;
use crate::seq::TokenLogprob;
use crate::trace::TraceCtx;
use duet_openai::protocol::{self as p, ApiError, GenParams};

/// Latency bookkeeping for one choice, and its count in `duet_requests_total` by how it ended.
/// Dropped before [`Timing::finish`] (the client went away: the handler's future or the stream's
/// task ended early), it counts the choice as `abort`, so every choice is counted exactly once.
pub(super) struct Timing {
    metrics: Arc<Metrics>,
    start: Instant,
    first: bool,
    last: Instant,
    finished: bool,
}

impl Timing {
    fn new(metrics: Arc<Metrics>) -> Self {
        let now = Clock::instant();
        Self {
            metrics,
            start: now,
            first: true,
            last: now,
            finished: false,
        }
    }

    fn on_tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let m = &self.metrics;
        let now = Clock::instant();
        if self.first {
            m.time_to_first_token_seconds
                .observe((now - self.start).as_secs_f64());
            self.first = false;
        } else {
            m.inter_token_latency_seconds
                .observe((now - self.last).as_secs_f64());
        }
        self.last = now;
        m.generation_tokens_total.add(n as u64);
    }

    fn finish(&mut self, reason: &str) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.metrics
            .e2e_request_latency_seconds
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics.requests_total.with_label(reason).inc();
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        self.finish("abort");
    }
}

pub(super) fn finish_label(f: &ChoiceFinish) -> &'static str {
    match f {
        ChoiceFinish::Done { reason, .. } => match reason {
            p::FinishReason::Stop => "stop",
            p::FinishReason::Length => "length",
            p::FinishReason::ToolCalls => "tool_calls",
        },
        ChoiceFinish::Error(_) => "error",
    }
}

pub(super) fn matched_stop(f: &ChoiceFinish) -> Option<p::MatchedStop> {
    match f {
        ChoiceFinish::Done {
            matched: Some(Matched::Text(s)),
            ..
        } => Some(p::MatchedStop::Text(s.clone())),
        ChoiceFinish::Done {
            matched: Some(Matched::Token(t)),
            ..
        } => Some(p::MatchedStop::Token(*t)),
        _ => None,
    }
}

pub(super) fn finish_reason(f: &ChoiceFinish) -> Option<p::FinishReason> {
    match f {
        ChoiceFinish::Done { reason, .. } => Some(*reason),
        ChoiceFinish::Error(_) => None,
    }
}

/// Runs every choice to the end (non-streaming responses).
pub(super) async fn run_all(
    s: &Shared,
    runs: &mut [ChoiceRun],
) -> Vec<(Vec<ChoiceDelta>, ChoiceFinish)> {
    let futs = runs.iter_mut().map(|r| async {
        let mut timing = Timing::new(s.metrics.clone());
        let mut deltas = Vec::new();
        loop {
            match r.next().await {
                Some(mut d) => {
                    timing.on_tokens(d.tokens.len());
                    if let Some(f) = d.finish.take() {
                        timing.finish(finish_label(&f));
                        deltas.push(d);
                        return (deltas, f);
                    }
                    deltas.push(d);
                }
                None => {
                    timing.finish("error");
                    return (deltas, ChoiceFinish::Error("stream ended".into()));
                }
            }
        }
    });
    futures::future::join_all(futs).await
}

/// One SSE event, `data: {json}\n\n`, written straight into its frame: compact JSON never holds a
/// raw newline, so the line needs no splitting (what axum's `Event::data` scans and copies for).
pub(super) fn sse_event<T: Serialize>(v: &T) -> Event {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    // Serializing these types cannot fail (no maps with non-string keys, no I/O).
    let _ = serde_json::to_writer(&mut buf, v);
    buf.extend_from_slice(b"\n\n");
    Event::from(buf)
}

const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// The response around an SSE body: the headers axum's `Sse` sets.
fn sse_body(body: Body) -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Streams SSE events produced by `produce` (one task per choice feeding one bounded queue).
/// The client going away closes the queue, which ends the tasks and aborts their sequences.
pub(super) fn sse_response(rx: mpsc::Receiver<Event>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    sse_body(Body::from_stream(stream))
}

/// A failure after the response started cannot change the status code: vLLM's and SGLang's
/// streams carry it as an `{"error": ...}` event, and so does this one.
pub(super) fn stream_error(d: &ChoiceDelta) -> Option<Event> {
    match &d.finish {
        Some(ChoiceFinish::Error(e)) => {
            Some(sse_event(&ApiError::unavailable(e.clone()).to_json()))
        }
        _ => None,
    }
}

/// Drives one choice, sending `opening` and then its events; stops early when the client is gone.
pub(super) async fn pump<F>(
    mut run: ChoiceRun,
    opening: Option<Event>,
    tx: mpsc::Sender<Event>,
    s: Shared,
    mut to_events: F,
) -> ChoiceRun
where
    F: FnMut(&mut ChoiceRun, ChoiceDelta) -> Vec<Event>,
{
    let mut timing = Timing::new(s.metrics.clone());
    if let Some(e) = opening
        && tx.send(e).await.is_err()
    {
        return run;
    }
    loop {
        let d = tokio::select! {
            d = run.next() => d,
            () = tx.closed() => return run,
        };
        let Some(d) = d else { return run };
        timing.on_tokens(d.tokens.len());
        if let Some(f) = &d.finish {
            timing.finish(finish_label(f));
        }
        let events = match stream_error(&d) {
            Some(e) => vec![e],
            None => to_events(&mut run, d),
        };
        for e in events {
            if tx.send(e).await.is_err() {
                return run;
            }
        }
    }
}

/// Once every choice's task ended: the usage event (if asked for), `[DONE]`, and the admission
/// slot back. `usage` gets the completion tokens of all choices and the prompt's cached tokens.
pub(super) fn close_stream(
    tasks: Vec<tokio::task::JoinHandle<(usize, Option<usize>)>>,
    admission: Admission,
    tx: mpsc::Sender<Event>,
    usage: impl FnOnce(usize, usize) -> Option<Event> + Send + 'static,
) {
    tokio::spawn(async move {
        let _admission = admission;
        let mut completion = 0;
        let mut cached = None;
        for t in tasks {
            if let Ok((c, k)) = t.await {
                completion += c;
                cached = cached.or(k);
            }
        }
        if let Some(e) = usage(completion, cached.unwrap_or(0)) {
            let _ = tx.send(e).await;
        }
        let _ = tx.send(Event::from_static(SSE_DONE)).await;
    });
}

// ---------------------------------------------------------------------------------------------
// The generating endpoints: one path, three answer shapes
// ---------------------------------------------------------------------------------------------

/// A generating endpoint (chat, completions, SGLang's generate): how a request becomes prompts and
/// parameters, and how finished choices and streamed deltas become its answer. Everything else
/// (body limits, admission, one [`ChoiceRun`] per choice, latency metrics, the SSE queue, the
/// closing usage event and `[DONE]`) is [`generating`]'s, the same for all three.
pub(super) trait Endpoint: Sized + Send + Sync + 'static {
    type Request: serde::de::DeserializeOwned;

    /// Validates, renders and tokenizes: everything before admission.
    fn prepare(s: &AppState, req: Self::Request) -> Result<Generation<Self>, ApiError>;

    /// The body of a non-streamed answer; every choice finished without error.
    fn whole(
        &self,
        s: &AppState,
        r: &RequestInfo,
        choices: Vec<ChoiceOutcome<'_>>,
        usage: p::Usage,
    ) -> Response;

    /// The event that opens choice `index`'s stream (chat's role chunk).
    fn opening(&self, _r: &RequestInfo, _index: usize) -> Option<Event> {
        None
    }

    /// The events one delta of choice `index` becomes (possibly none).
    fn delta(
        &self,
        s: &AppState,
        r: &RequestInfo,
        index: usize,
        run: &ChoiceRun,
        d: ChoiceDelta,
        st: &mut ChoiceStream,
    ) -> Vec<Event>;

    /// The closing event of a stream that asked for usage; `None` where the endpoint has none.
    fn usage(&self, r: &RequestInfo, usage: p::Usage) -> Option<Event>;
}

/// What an endpoint decided before any sequence runs.
pub(super) struct Generation<E> {
    /// One prompt per choice group; each gets `params.n` choices.
    pub(super) prompts: Vec<Arc<Vec<u32>>>,
    pub(super) params: GenParams,
    pub(super) text: TextOptions,
    pub(super) stream: bool,
    pub(super) request: RequestInfo,
    pub(super) endpoint: E,
}

/// What every answer of one request carries.
pub(super) struct RequestInfo {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    /// `stream_options.include_usage`: `usage` is null on every chunk, and a last chunk has it.
    pub(super) include_usage: bool,
}

impl RequestInfo {
    pub(super) fn new(s: &AppState, prefix: &str, include_usage: bool) -> Self {
        Self {
            id: s.next_request_id(prefix),
            created: now_s(),
            model: s.served_model_name.clone(),
            include_usage,
        }
    }
}

/// One finished choice of a non-streamed answer.
pub(super) struct ChoiceOutcome<'a> {
    pub(super) deltas: Vec<ChoiceDelta>,
    pub(super) finish: ChoiceFinish,
    pub(super) run: &'a ChoiceRun,
}

/// A streamed choice's state from one delta to the next.
#[derive(Default)]
pub(super) struct ChoiceStream {
    /// Text offset of the next token (completions' logprobs).
    pub(super) offset: usize,
    /// Every token so far (SGLang streams cumulative logprobs).
    pub(super) tokens: Vec<(u32, Option<TokenLogprob>)>,
}

/// One encoded SSE event (`data: ...\n\n`).
pub(super) type Event = axum::body::Bytes;

/// The handler of every generating endpoint.
pub(super) async fn generating<E: Endpoint>(
    State(s): State<Shared>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let prepared = match read_body(&s, body).await {
        Ok(bytes) => p::parse_json(&bytes).and_then(|req| E::prepare(&s, req)),
        Err(e) => Err(e),
    };
    let g = match prepared {
        Ok(g) => g,
        Err(e) => {
            // Invalid requests are refusals too (`admit` counts the ones it refuses).
            s.metrics.requests_rejected_total.inc();
            return error_response(e);
        }
    };
    let span = request_span(&headers, &g.request.id);
    answer(s, g, span).await.unwrap_or_else(error_response)
}

/// The request's trace span: a child of the caller's W3C `traceparent` when it sends one, else
/// the root of a new trace (disabled when tracing is off).
pub(super) fn request_span(headers: &axum::http::HeaderMap, request_id: &str) -> tracing::Span {
    let span = crate::trace_span!("request", request_id, admission = tracing::field::Empty);
    if !span.is_disabled()
        && let Some(parent) = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceCtx::parse_traceparent)
    {
        parent.adopt(&span);
    }
    span
}

pub(super) async fn answer<E: Endpoint>(
    s: Shared,
    g: Generation<E>,
    span: tracing::Span,
) -> Result<Response, ApiError> {
    let admission = match admit(&s) {
        Ok(a) => a,
        Err(e) => {
            span.record("admission", "refused");
            return Err(e);
        }
    };
    span.record("admission", "admitted");
    let n = g.params.n;
    // Each prompt counts once however many choices share it (OpenAI's `usage`).
    let prompt_tokens = g.prompts.iter().map(|p| p.len()).sum::<usize>();
    s.metrics.prompt_tokens_total.add(prompt_tokens as u64);
    let runs: Vec<ChoiceRun> = g
        .prompts
        .iter()
        .flat_map(|pr| (0..n).map(move |_| pr.clone()))
        .map(|pr| s.start_choice(pr, &g.params, g.text.clone(), &span))
        .collect();
    let shape = Arc::new((g.endpoint, g.request));
    if !g.stream {
        let mut runs = runs;
        let results = run_all(&s, &mut runs).await;
        let mut choices = Vec::with_capacity(results.len());
        let mut completion = 0;
        for ((deltas, finish), run) in results.into_iter().zip(&runs) {
            if let ChoiceFinish::Error(e) = &finish {
                return Err(ApiError::unavailable(e.clone()));
            }
            completion += run.generated().len();
            choices.push(ChoiceOutcome {
                deltas,
                finish,
                run,
            });
        }
        let cached = runs.iter().find_map(|r| r.cached_tokens).unwrap_or(0);
        let usage = p::Usage::new(prompt_tokens, completion, Some(cached));
        let (endpoint, request) = &*shape;
        let body = endpoint.whole(&s, request, choices, usage);
        drop(admission);
        return Ok(body);
    }
    let runs = match <[ChoiceRun; 1]>::try_from(runs) {
        Ok([run]) => return Ok(single_stream(s, shape, run, admission, prompt_tokens)),
        Err(runs) => runs,
    };
    let (tx, rx) = mpsc::channel(SSE_QUEUE_EVENTS);
    let tasks = runs
        .into_iter()
        .enumerate()
        .map(|(index, run)| {
            let (s, shape, tx) = (s.clone(), shape.clone(), tx.clone());
            tokio::spawn(async move {
                let opening = shape.0.opening(&shape.1, index);
                let mut st = ChoiceStream::default();
                let s2 = s.clone();
                let run = pump(run, opening, tx, s, move |run, d| {
                    shape.0.delta(&s2, &shape.1, index, run, d, &mut st)
                })
                .await;
                (run.generated().len(), run.cached_tokens)
            })
        })
        .collect();
    close_stream(tasks, admission, tx, move |completion, cached| {
        let (endpoint, request) = &*shape;
        let usage = p::Usage::new(prompt_tokens, completion, Some(cached));
        request
            .include_usage
            .then(|| endpoint.usage(request, usage))
            .flatten()
    });
    Ok(sse_response(rx))
}

/// A one-choice stream (nearly every request) is driven by the response body itself: each poll
/// from hyper waits for the choice's next delta and encodes it, plus every further delta already
/// waiting, into one frame. No task and no queue between the sequence's events and the socket:
/// one wake-up per step instead of two, and a stream that fell behind catches up in one write.
/// A client that stops reading stops the polls, so its events wait in the sequence's channel
/// (bounded by its `max_tokens`); one that goes away drops the body, which aborts the sequence.
fn single_stream<E: Endpoint>(
    s: Shared,
    shape: Arc<(E, RequestInfo)>,
    run: ChoiceRun,
    admission: Admission,
    prompt_tokens: usize,
) -> Response {
    struct One<E> {
        s: Shared,
        shape: Arc<(E, RequestInfo)>,
        run: ChoiceRun,
        timing: Timing,
        st: ChoiceStream,
        opened: bool,
        done: bool,
        prompt_tokens: usize,
        _admission: Admission,
    }
    let one = One {
        timing: Timing::new(s.metrics.clone()),
        s,
        shape,
        run,
        st: ChoiceStream::default(),
        opened: false,
        done: false,
        prompt_tokens,
        _admission: admission,
    };
    let stream = futures::stream::unfold(one, |mut o| async move {
        if o.done {
            return None;
        }
        let (endpoint, request) = &*o.shape;
        // The opening (chat's role chunk) goes out at once, before the first token.
        if !std::mem::replace(&mut o.opened, true)
            && let Some(e) = endpoint.opening(request, 0)
        {
            return Some((Ok(e), o));
        }
        let mut frame = Vec::new();
        let mut next = o.run.next().await;
        while let Some(d) = next.take() {
            o.timing.on_tokens(d.tokens.len());
            let finished = d.finish.is_some();
            if let Some(f) = &d.finish {
                o.timing.finish(finish_label(f));
            }
            match stream_error(&d) {
                Some(e) => frame.extend_from_slice(&e),
                None => {
                    for e in endpoint.delta(&o.s, request, 0, &o.run, d, &mut o.st) {
                        frame.extend_from_slice(&e);
                    }
                }
            }
            if finished {
                break;
            }
            next = o.run.try_next();
        }
        if o.run.is_finished() {
            let cached = o.run.cached_tokens.unwrap_or(0);
            let usage = p::Usage::new(o.prompt_tokens, o.run.generated().len(), Some(cached));
            if request.include_usage
                && let Some(e) = endpoint.usage(request, usage)
            {
                frame.extend_from_slice(&e);
            }
            frame.extend_from_slice(SSE_DONE);
            o.done = true;
        }
        Some((Ok::<_, std::convert::Infallible>(Event::from(frame)), o))
    });
    sse_body(Body::from_stream(stream))
}

pub(super) fn encode_prompt(
    s: &AppState,
    prompt: &p::Prompt,
    add_special: bool,
) -> Result<Vec<u32>, ApiError> {
    match prompt {
        p::Prompt::Ids(ids) => Ok(ids.clone()),
        p::Prompt::Text(t) => s
            .tokenizer
            .encode(t, add_special)
            .map_err(|e| ApiError::invalid("prompt", e.to_string())),
    }
}
