//! The HTTP API (axum): OpenAI-compatible chat and text completions, SGLang's `/generate`,
//! vLLM's `/tokenize` and `/detokenize`, `/v1/models`, `/health` and Prometheus `/metrics`.
//!
//! A handler validates and tokenizes, takes an admission slot (or answers 429), starts one
//! [`ChoiceRun`] per choice and turns their deltas into a JSON body or an SSE stream. Every body,
//! queue and choice count has a bound from [`HttpLimits`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use duet_core::pd::Context;
use duet_model::tokenizer::TextTokenizer;
use ractor::ActorRef;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::gateway::GatewayMsg;
use crate::gateway::stream::{ChoiceDelta, ChoiceFinish, ChoiceRun, Matched, TextOptions};
use crate::metrics::Metrics;
use crate::registry::SharedBoard;
use crate::seq::{SeqParams, ThinkingBudgetSpec, TokenLogprob};
use duet_model::sampling::SamplingParams;
use duet_openai::protocol::{self as p, ApiError, GenParams, RequestLimits};
use duet_openai::tools::ToolEvent;

/// Limits of the HTTP layer, from the cluster config's `[limits]`.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Requests admitted at once (running or waiting in the workers); one more gets 429.
    pub inflight_max: usize,
    pub body_bytes_max: usize,
    pub n_max: usize,
    pub max_tokens_default: usize,
    pub request_timeout: Duration,
}

/// SSE events a streaming response may have queued for a slow client before the choice tasks
/// wait: bounds memory per stream while keeping the writer busy.
const SSE_QUEUE_EVENTS: usize = 64;

pub struct AppState {
    pub gateway: ActorRef<GatewayMsg>,
    pub tokenizer: Arc<TextTokenizer>,
    pub metrics: Arc<Metrics>,
    pub board: SharedBoard,
    pub limits: HttpLimits,
    pub served_model_name: String,
    /// The model's positions; the advertised context is [`AppState::context`].
    pub max_positions: usize,
    /// KV pages of a prefill worker's and a decode group's pool as configured, until the workers
    /// report their own.
    pub pool_pages: (usize, usize),
    pub vocab_size: usize,
    /// Token ids that end generation unless `ignore_eos`.
    pub eos_ids: Vec<u32>,
    pub think: Option<ThinkIds>,
    pub seq_ids: Arc<AtomicU64>,
    /// Each worker's cumulative counters at the last `/metrics` scrape (prefix queried, prefix
    /// hit, preemptions), keyed by its metrics label.
    pub worker_counters: std::sync::Mutex<std::collections::BTreeMap<String, [u64; 3]>>,
    pub request_ids: AtomicU64,
    pub inflight: AtomicUsize,
    pub draining: AtomicBool,
    pub started: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct ThinkIds {
    pub start: u32,
    pub end: u32,
    pub newline: u32,
}

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/generate", post(generate))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

fn now_s() -> u64 {
    Clock::unix_secs()
}

fn error_response(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, axum::Json(e.to_json())).into_response();
    if e.status == 429 || e.status == 503 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn not_found() -> Response {
    error_response(ApiError {
        status: 404,
        message: "no such endpoint".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found".into()),
    })
}

/// Reads the body within the size limit.
async fn read_body(s: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    // A Content-Length over the limit is refused before a byte of the body is read.
    if axum::body::HttpBody::size_hint(&body).lower() > s.limits.body_bytes_max as u64 {
        return Err(ApiError::too_large(s.limits.body_bytes_max));
    }
    axum::body::to_bytes(body, s.limits.body_bytes_max)
        .await
        .map_err(|_| ApiError::too_large(s.limits.body_bytes_max))
}

/// An admission slot; dropping it frees the slot.
struct Admission(Shared);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn admit(s: &Shared) -> Result<Admission, ApiError> {
    if s.draining.load(Ordering::Acquire) {
        return Err(ApiError::unavailable("server is shutting down"));
    }
    let prev = s.inflight.fetch_add(1, Ordering::AcqRel);
    if prev >= s.limits.inflight_max {
        s.inflight.fetch_sub(1, Ordering::AcqRel);
        s.metrics.requests_rejected_total.inc();
        return Err(ApiError::overloaded());
    }
    Ok(Admission(s.clone()))
}

impl AppState {
    fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            default_max_tokens: self.limits.max_tokens_default,
            n_max: self.limits.n_max,
            vocab_size: self.vocab_size,
        }
    }

    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if m == self.served_model_name || m == "default" => Ok(()),
            Some(m) => Err(ApiError::not_found_model(m)),
        }
    }

    fn next_request_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}",
            self.request_ids.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The context a request may use: the model's positions and the smallest KV pool among the
    /// live workers (a sequence is prefilled in one prefill worker's pool and decoded in one
    /// group's); the configured pools until workers have reported.
    pub fn context(&self) -> Context {
        let b = self.board.read().unwrap_or_else(|e| e.into_inner());
        let smallest = |m: &std::collections::BTreeMap<_, crate::registry::WorkerEntry>, cfg| {
            m.values()
                .map(|e| e.load.pages_total)
                .filter(|&p| p > 0)
                .min()
                .unwrap_or(cfg)
        };
        Context::new(
            self.max_positions,
            smallest(&b.prefill, self.pool_pages.0),
            smallest(&b.decode, self.pool_pages.1),
        )
    }

    /// Admission against the context: a request that can never fit gets 400
    /// `context_length_exceeded`; a default `max_tokens` is clipped to what the prompt leaves.
    fn fit(&self, prompt_len: usize, params: &mut GenParams) -> Result<(), ApiError> {
        if prompt_len == 0 {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        let given = params.max_tokens_given.then_some(params.max_tokens);
        params.max_tokens = self
            .context()
            .admit(prompt_len, given, params.max_tokens)
            .map_err(ApiError::context_exceeded)?;
        Ok(())
    }

    fn seq_params(&self, g: &GenParams) -> SeqParams {
        let mut stop_token_ids = g.stop_token_ids.clone();
        if !g.ignore_eos {
            stop_token_ids.extend(&self.eos_ids);
        }
        SeqParams {
            sampling: SamplingParams {
                temperature: g.temperature,
                top_k: g.top_k,
                top_p: g.top_p,
                min_p: g.min_p,
                seed: g.seed,
            },
            max_new_tokens: g.max_tokens,
            presence_penalty: g.presence_penalty,
            frequency_penalty: g.frequency_penalty,
            repetition_penalty: g.repetition_penalty,
            stop_token_ids,
            logprobs: g.logprobs.then_some(g.top_logprobs),
            thinking: match (g.thinking_budget, self.think) {
                (Some(budget), Some(t)) => Some(ThinkingBudgetSpec {
                    budget,
                    think_start_id: t.start,
                    think_end_id: t.end,
                    newline_id: t.newline,
                }),
                _ => None,
            },
        }
    }

    fn start_choice(&self, prompt: Arc<Vec<u32>>, g: &GenParams, text: TextOptions) -> ChoiceRun {
        ChoiceRun::start(
            self.gateway.clone(),
            self.seq_ids.clone(),
            self.tokenizer.clone(),
            prompt,
            self.seq_params(g),
            text,
            self.limits.request_timeout,
        )
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    fn chat_logprobs(&self, tokens: &[(u32, Option<TokenLogprob>)]) -> Option<p::ChatLogprobs> {
        let content: Vec<p::ChatTokenLogprob> = tokens
            .iter()
            .filter_map(|(t, lp)| {
                let lp = lp.as_ref()?;
                let token = self.token_text(*t);
                Some(p::ChatTokenLogprob {
                    bytes: Some(token.as_bytes().to_vec()),
                    token,
                    logprob: lp.logprob,
                    top_logprobs: lp
                        .top
                        .iter()
                        .map(|&(id, l)| {
                            let token = self.token_text(id);
                            p::TopLogprob {
                                bytes: Some(token.as_bytes().to_vec()),
                                token,
                                logprob: l,
                            }
                        })
                        .collect(),
                })
            })
            .collect();
        (!content.is_empty()).then_some(p::ChatLogprobs { content })
    }

    fn completion_logprobs(
        &self,
        tokens: &[(u32, Option<TokenLogprob>)],
        offset: &mut usize,
    ) -> Option<p::CompletionLogprobs> {
        let mut out = p::CompletionLogprobs::default();
        for (t, lp) in tokens {
            let Some(lp) = lp else { continue };
            let token = self.token_text(*t);
            out.text_offset.push(*offset);
            *offset += token.len();
            out.tokens.push(token);
            out.token_logprobs.push(lp.logprob);
            out.top_logprobs.push(p::TopLogprobMap(
                lp.top
                    .iter()
                    .map(|&(id, l)| (self.token_text(id), l))
                    .collect(),
            ));
        }
        (!out.tokens.is_empty()).then_some(out)
    }
}

/// Latency bookkeeping for one request.
struct Timing {
    start: Instant,
    first: bool,
    last: Instant,
}

impl Timing {
    fn new() -> Self {
        let now = Clock::instant();
        Self {
            start: now,
            first: true,
            last: now,
        }
    }

    fn on_tokens(&mut self, m: &Metrics, n: usize) {
        if n == 0 {
            return;
        }
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

    fn finish(&self, m: &Metrics, reason: &str) {
        m.e2e_request_latency_seconds
            .observe(self.start.elapsed().as_secs_f64());
        m.requests_total.with_label(reason).inc();
    }
}

fn finish_label(f: &ChoiceFinish) -> &'static str {
    match f {
        ChoiceFinish::Done { reason, .. } => match reason {
            p::FinishReason::Stop => "stop",
            p::FinishReason::Length => "length",
            p::FinishReason::ToolCalls => "tool_calls",
        },
        ChoiceFinish::Error(_) => "error",
    }
}

fn matched_stop(f: &ChoiceFinish) -> Option<p::MatchedStop> {
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

fn finish_reason(f: &ChoiceFinish) -> Option<p::FinishReason> {
    match f {
        ChoiceFinish::Done { reason, .. } => Some(*reason),
        ChoiceFinish::Error(_) => None,
    }
}

/// Runs every choice to the end (non-streaming responses).
async fn run_all(s: &Shared, runs: &mut [ChoiceRun]) -> Vec<(Vec<ChoiceDelta>, ChoiceFinish)> {
    let futs = runs.iter_mut().map(|r| async {
        let mut timing = Timing::new();
        let mut deltas = Vec::new();
        loop {
            match r.next().await {
                Some(mut d) => {
                    timing.on_tokens(&s.metrics, d.tokens.len());
                    if let Some(f) = d.finish.take() {
                        timing.finish(&s.metrics, finish_label(&f));
                        deltas.push(d);
                        return (deltas, f);
                    }
                    deltas.push(d);
                }
                None => return (deltas, ChoiceFinish::Error("stream ended".into())),
            }
        }
    });
    futures::future::join_all(futs).await
}

fn sse_event<T: Serialize>(v: &T) -> axum::response::sse::Event {
    axum::response::sse::Event::default().data(serde_json::to_string(v).unwrap_or_default())
}

/// Streams SSE events produced by `produce` (one task per choice feeding one bounded queue).
/// The client going away closes the queue, which ends the tasks and aborts their sequences.
fn sse_response(rx: mpsc::Receiver<axum::response::sse::Event>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    axum::response::sse::Sse::new(stream).into_response()
}

/// A failure after the response started cannot change the status code: vLLM's and SGLang's
/// streams carry it as an `{"error": ...}` event, and so does this one.
fn stream_error(d: &ChoiceDelta) -> Option<axum::response::sse::Event> {
    match &d.finish {
        Some(ChoiceFinish::Error(e)) => {
            Some(sse_event(&ApiError::unavailable(e.clone()).to_json()))
        }
        _ => None,
    }
}

/// Drives one choice, sending its events; stops early when the client is gone.
async fn pump<F>(
    mut run: ChoiceRun,
    tx: mpsc::Sender<axum::response::sse::Event>,
    s: Shared,
    mut to_events: F,
) -> ChoiceRun
where
    F: FnMut(&mut ChoiceRun, ChoiceDelta) -> Vec<axum::response::sse::Event>,
{
    let mut timing = Timing::new();
    loop {
        let d = tokio::select! {
            d = run.next() => d,
            () = tx.closed() => return run,
        };
        let Some(d) = d else { return run };
        timing.on_tokens(&s.metrics, d.tokens.len());
        if let Some(f) = &d.finish {
            timing.finish(&s.metrics, finish_label(f));
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
fn close_stream(
    tasks: Vec<tokio::task::JoinHandle<(usize, Option<usize>)>>,
    admission: Admission,
    tx: mpsc::Sender<axum::response::sse::Event>,
    usage: impl FnOnce(usize, usize) -> Option<axum::response::sse::Event> + Send + 'static,
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
        let _ = tx
            .send(axum::response::sse::Event::default().data("[DONE]"))
            .await;
    });
}

// ---------------------------------------------------------------------------------------------
// /v1/chat/completions
// ---------------------------------------------------------------------------------------------

async fn chat(State(s): State<Shared>, body: Body) -> Response {
    match chat_inner(s, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn chat_inner(s: Shared, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&s, body).await?;
    let req: p::ChatCompletionRequest = p::parse_json(&bytes)?;
    let mut v = p::validate_chat(req, &s.request_limits())?;
    s.check_model(v.model.as_deref())?;
    let tools_json = v
        .tools
        .as_ref()
        .map(|t| serde_json::to_value(t).unwrap_or(Value::Null));
    let (text, ids) = s
        .tokenizer
        .apply_chat_template_with(
            &v.messages,
            tools_json.as_ref(),
            true,
            &v.chat_template_kwargs,
        )
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    s.fit(ids.len(), &mut v.params)?;
    let admission = admit(&s)?;
    s.metrics.prompt_tokens_total.add(ids.len() as u64);
    let request_id = s.next_request_id("chatcmpl");
    let reasoning = (v.separate_reasoning && s.think.is_some())
        .then(|| text.trim_end_matches('\n').ends_with("<think>"));
    let text_opts = TextOptions {
        stop: v.params.stop.clone(),
        reasoning,
        tools: v.tools.as_ref().map(|_| format!("call_{request_id}_")),
        skip_special_tokens: v.params.skip_special_tokens,
    };
    let prompt = Arc::new(ids);
    let runs: Vec<ChoiceRun> = (0..v.params.n)
        .map(|_| s.start_choice(prompt.clone(), &v.params, text_opts.clone()))
        .collect();
    let created = now_s();
    let model = s.served_model_name.clone();
    if !v.stream {
        return Ok(chat_whole(&s, runs, request_id, created, model, &v).await);
    }
    let (tx, rx) = mpsc::channel(SSE_QUEUE_EVENTS);
    let include_usage = v.include_usage;
    let logprobs = v.params.logprobs;
    let n = runs.len();
    let prompt_len = prompt.len();
    let mut tasks = Vec::with_capacity(n);
    for (index, run) in runs.into_iter().enumerate() {
        let s2 = s.clone();
        let (id, model) = (request_id.clone(), model.clone());
        let chunk = move |choices| {
            let mut c = p::ChatCompletionChunk::new(id.clone(), created, model.clone(), choices);
            if include_usage {
                c.usage = Some(None);
            }
            c
        };
        let first = chunk(vec![p::ChunkChoice {
            index,
            delta: p::Delta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..Default::default()
            },
            logprobs: None,
            finish_reason: None,
            matched_stop: None,
        }]);
        let tx2 = tx.clone();
        tasks.push(tokio::spawn(async move {
            if tx2.send(sse_event(&first)).await.is_err() {
                return (0, None);
            }
            let s3 = s2.clone();
            let run = pump(run, tx2, s2, move |_, d| {
                chat_chunks(&s3, index, d, logprobs)
                    .into_iter()
                    .map(|c| sse_event(&chunk(vec![c])))
                    .collect()
            })
            .await;
            (run.generated().len(), run.cached_tokens)
        }));
    }
    close_stream(tasks, admission, tx, move |completion, cached| {
        include_usage.then(|| {
            let mut c = p::ChatCompletionChunk::new(request_id, created, model, vec![]);
            c.usage = Some(Some(p::Usage::new(
                prompt_len * n,
                completion,
                Some(cached),
            )));
            sse_event(&c)
        })
    });
    Ok(sse_response(rx))
}

/// One delta as chat chunk choices (content, reasoning and tool calls in one chunk; the finish in
/// its own chunk, as OpenAI streams).
fn chat_chunks(s: &AppState, index: usize, d: ChoiceDelta, logprobs: bool) -> Vec<p::ChunkChoice> {
    let mut out = Vec::new();
    let tool_calls: Vec<p::ToolCallDelta> = d
        .tool_events
        .into_iter()
        .filter_map(|e| match e {
            ToolEvent::Start { index, id, name } => Some(p::ToolCallDelta::start(index, id, name)),
            ToolEvent::Args { index, delta } => Some(p::ToolCallDelta::args(index, delta)),
            ToolEvent::Content(_) => None,
        })
        .collect();
    let lp = if logprobs {
        s.chat_logprobs(&d.tokens)
    } else {
        None
    };
    if !d.content.is_empty() || !d.reasoning.is_empty() || !tool_calls.is_empty() || lp.is_some() {
        out.push(p::ChunkChoice {
            index,
            delta: p::Delta {
                role: None,
                content: (!d.content.is_empty()).then_some(d.content),
                reasoning_content: (!d.reasoning.is_empty()).then_some(d.reasoning),
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
            },
            logprobs: lp,
            finish_reason: None,
            matched_stop: None,
        });
    }
    if let Some(f) = d.finish {
        out.push(p::ChunkChoice {
            index,
            delta: p::Delta::default(),
            logprobs: None,
            finish_reason: finish_reason(&f),
            matched_stop: matched_stop(&f),
        });
    }
    out
}

async fn chat_whole(
    s: &Shared,
    mut runs: Vec<ChoiceRun>,
    id: String,
    created: u64,
    model: String,
    v: &p::ValidatedChat,
) -> Response {
    let results = run_all(s, &mut runs).await;
    let mut choices = Vec::new();
    let mut completion = 0;
    for (index, ((deltas, finish), run)) in results.into_iter().zip(&runs).enumerate() {
        if let ChoiceFinish::Error(e) = &finish {
            return error_response(ApiError::unavailable(e.clone()));
        }
        completion += run.generated().len();
        let mut content = String::new();
        let mut reasoning = String::new();
        let mut tokens = Vec::new();
        for d in deltas {
            content.push_str(&d.content);
            reasoning.push_str(&d.reasoning);
            tokens.extend(d.tokens);
        }
        let calls: Vec<p::ToolCallOut> = run
            .tool_calls()
            .into_iter()
            .map(|c| p::ToolCallOut::function(c.id, c.name, c.arguments))
            .collect();
        choices.push(p::ChatChoice {
            index,
            message: p::ChatResponseMessage {
                role: "assistant",
                content: (!content.is_empty() || calls.is_empty()).then_some(content),
                reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
                tool_calls: (!calls.is_empty()).then_some(calls),
            },
            logprobs: if v.params.logprobs {
                s.chat_logprobs(&tokens)
            } else {
                None
            },
            finish_reason: finish_reason(&finish),
            matched_stop: matched_stop(&finish),
        });
    }
    let prompt_len = runs.first().map_or(0, ChoiceRun::prompt_len);
    let cached = runs.iter().find_map(|r| r.cached_tokens).unwrap_or(0);
    let usage = p::Usage::new(prompt_len * runs.len(), completion, Some(cached));
    axum::Json(p::ChatCompletion::new(id, created, model, choices, usage)).into_response()
}

// ---------------------------------------------------------------------------------------------
// /v1/completions
// ---------------------------------------------------------------------------------------------

async fn completions(State(s): State<Shared>, body: Body) -> Response {
    match completions_inner(s, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

fn encode_prompt(
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

async fn completions_inner(s: Shared, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&s, body).await?;
    let req: p::CompletionRequest = p::parse_json(&bytes)?;
    let mut v = p::validate_completion(req, &s.request_limits())?;
    s.check_model(v.model.as_deref())?;
    let mut prompts = Vec::with_capacity(v.prompts.len());
    let mut max_tokens = v.params.max_tokens;
    for pr in &v.prompts {
        let ids = encode_prompt(&s, pr, true)?;
        let mut g = v.params.clone();
        s.fit(ids.len(), &mut g)?;
        max_tokens = max_tokens.min(g.max_tokens);
        prompts.push(Arc::new(ids));
    }
    v.params.max_tokens = max_tokens;
    let admission = admit(&s)?;
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum::<usize>() * v.params.n;
    s.metrics.prompt_tokens_total.add(prompt_tokens as u64);
    let text_opts = TextOptions {
        stop: v.params.stop.clone(),
        reasoning: None,
        tools: None,
        skip_special_tokens: v.params.skip_special_tokens,
    };
    let runs: Vec<ChoiceRun> = prompts
        .iter()
        .flat_map(|pr| (0..v.params.n).map(move |_| pr.clone()))
        .map(|pr| s.start_choice(pr, &v.params, text_opts.clone()))
        .collect();
    let id = s.next_request_id("cmpl");
    let created = now_s();
    let model = s.served_model_name.clone();
    let logprobs = v.params.logprobs;
    if !v.stream {
        let mut runs = runs;
        let results = run_all(&s, &mut runs).await;
        let mut choices = Vec::new();
        let mut completion = 0;
        for (index, ((deltas, finish), run)) in results.into_iter().zip(&runs).enumerate() {
            if let ChoiceFinish::Error(e) = &finish {
                return Err(ApiError::unavailable(e.clone()));
            }
            completion += run.generated().len();
            let text: String = deltas.iter().map(|d| d.content.as_str()).collect();
            let tokens: Vec<_> = deltas.into_iter().flat_map(|d| d.tokens).collect();
            let mut offset = 0;
            choices.push(p::CompletionChoice {
                index,
                text,
                logprobs: if logprobs {
                    s.completion_logprobs(&tokens, &mut offset)
                } else {
                    None
                },
                finish_reason: finish_reason(&finish),
                matched_stop: matched_stop(&finish),
            });
        }
        let cached = runs.iter().find_map(|r| r.cached_tokens).unwrap_or(0);
        let mut c = p::Completion::new(id, created, model, choices);
        c.usage = Some(Some(p::Usage::new(prompt_tokens, completion, Some(cached))));
        return Ok(axum::Json(c).into_response());
    }
    let include_usage = v.include_usage;
    let (tx, rx) = mpsc::channel(SSE_QUEUE_EVENTS);
    let mut tasks = Vec::new();
    for (index, run) in runs.into_iter().enumerate() {
        let (s2, id, model, tx2) = (s.clone(), id.clone(), model.clone(), tx.clone());
        let s3 = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut offset = 0;
            let run = pump(run, tx2, s2, move |_, d| {
                let lp = if logprobs {
                    s3.completion_logprobs(&d.tokens, &mut offset)
                } else {
                    None
                };
                let finish = d.finish.as_ref();
                if d.content.is_empty() && lp.is_none() && finish.is_none() {
                    return vec![];
                }
                let mut c = p::Completion::new(
                    id.clone(),
                    created,
                    model.clone(),
                    vec![p::CompletionChoice {
                        index,
                        text: d.content,
                        logprobs: lp,
                        finish_reason: finish.and_then(finish_reason),
                        matched_stop: finish.and_then(matched_stop),
                    }],
                );
                if include_usage {
                    c.usage = Some(None);
                }
                vec![sse_event(&c)]
            })
            .await;
            (run.generated().len(), run.cached_tokens)
        }));
    }
    close_stream(tasks, admission, tx, move |completion, cached| {
        include_usage.then(|| {
            let mut c = p::Completion::new(id, created, model, vec![]);
            c.usage = Some(Some(p::Usage::new(prompt_tokens, completion, Some(cached))));
            sse_event(&c)
        })
    });
    Ok(sse_response(rx))
}

// ---------------------------------------------------------------------------------------------
// SGLang /generate
// ---------------------------------------------------------------------------------------------

async fn generate(State(s): State<Shared>, body: Body) -> Response {
    match generate_inner(s, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

fn generate_meta(
    id: &str,
    run: &ChoiceRun,
    finish: Option<&ChoiceFinish>,
    lps: Option<&[(u32, Option<TokenLogprob>)]>,
) -> p::GenerateMetaInfo {
    p::GenerateMetaInfo {
        id: id.to_string(),
        prompt_tokens: run.prompt_len(),
        completion_tokens: run.generated().len(),
        cached_tokens: run.cached_tokens.unwrap_or(0),
        finish_reason: finish.and_then(|f| match f {
            ChoiceFinish::Done {
                reason: p::FinishReason::Length,
                ..
            } => Some(p::GenerateFinish::length()),
            ChoiceFinish::Done { .. } => Some(p::GenerateFinish::stop(matched_stop(f))),
            ChoiceFinish::Error(_) => None,
        }),
        output_token_logprobs: lps.map(|t| {
            t.iter()
                .map(|(id, lp)| (lp.as_ref().map_or(0.0, |l| l.logprob), *id, None))
                .collect()
        }),
    }
}

async fn generate_inner(s: Shared, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&s, body).await?;
    let req: p::GenerateRequest = p::parse_json(&bytes)?;
    let mut v = p::validate_generate(req, &s.request_limits())?;
    v.params.logprobs |= v.return_logprob;
    let ids = encode_prompt(&s, &v.prompt, true)?;
    s.fit(ids.len(), &mut v.params)?;
    let admission = admit(&s)?;
    s.metrics.prompt_tokens_total.add(ids.len() as u64);
    let text_opts = TextOptions {
        stop: v.params.stop.clone(),
        reasoning: None,
        tools: None,
        skip_special_tokens: v.params.skip_special_tokens,
    };
    let mut run = s.start_choice(Arc::new(ids), &v.params, text_opts);
    let id = s.next_request_id("gen");
    let return_logprob = v.return_logprob;
    if !v.stream {
        let mut runs = [run];
        let mut results = run_all(&s, &mut runs).await;
        let (deltas, finish) = results
            .pop()
            .unwrap_or_else(|| (Vec::new(), ChoiceFinish::Error("no result".into())));
        if let ChoiceFinish::Error(e) = &finish {
            return Err(ApiError::unavailable(e.clone()));
        }
        let tokens: Vec<_> = deltas.into_iter().flat_map(|d| d.tokens).collect();
        let run = &runs[0];
        let body = p::GenerateResponse {
            text: run.text.clone(),
            output_ids: run.generated().to_vec(),
            meta_info: generate_meta(
                &id,
                run,
                Some(&finish),
                return_logprob.then_some(&tokens[..]),
            ),
        };
        return Ok(axum::Json(body).into_response());
    }
    let (tx, rx) = mpsc::channel(SSE_QUEUE_EVENTS);
    tokio::spawn(async move {
        let _admission = admission;
        let mut timing = Timing::new();
        let mut tokens = Vec::new();
        loop {
            let d = tokio::select! {
                d = run.next() => d,
                () = tx.closed() => return,
            };
            let Some(d) = d else { break };
            timing.on_tokens(&s.metrics, d.tokens.len());
            if let Some(f) = &d.finish {
                timing.finish(&s.metrics, finish_label(f));
            }
            if let Some(e) = stream_error(&d) {
                let _ = tx.send(e).await;
                break;
            }
            tokens.extend(d.tokens);
            // SGLang streams the cumulative text and ids on every chunk.
            let body = p::GenerateResponse {
                text: run.text.clone(),
                output_ids: run.generated().to_vec(),
                meta_info: generate_meta(
                    &id,
                    &run,
                    d.finish.as_ref(),
                    return_logprob.then_some(&tokens[..]),
                ),
            };
            if tx.send(sse_event(&body)).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(axum::response::sse::Event::default().data("[DONE]"))
            .await;
    });
    Ok(sse_response(rx))
}

// ---------------------------------------------------------------------------------------------
// /tokenize, /detokenize, /v1/models, /health, /metrics
// ---------------------------------------------------------------------------------------------

async fn tokenize(State(s): State<Shared>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&s, body).await?;
        let req: p::TokenizeRequest = p::parse_json(&bytes)?;
        s.check_model(req.model.as_deref())?;
        let ids = match p::validate_tokenize(req)? {
            p::TokenizeInput::Prompt {
                text,
                add_special_tokens,
            } => s
                .tokenizer
                .encode(&text, add_special_tokens)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
            p::TokenizeInput::Chat {
                messages,
                add_generation_prompt,
                add_special_tokens,
            } => {
                let (text, _) = s
                    .tokenizer
                    .apply_chat_template(&messages, None, add_generation_prompt)
                    .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
                s.tokenizer
                    .encode(&text, add_special_tokens)
                    .map_err(|e| ApiError::invalid("messages", e.to_string()))?
            }
        };
        Ok::<_, ApiError>(axum::Json(p::TokenizeResponse::new(
            ids,
            s.context().max_model_len,
        )))
    }
    .await;
    r.map_or_else(error_response, IntoResponse::into_response)
}

async fn detokenize(State(s): State<Shared>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&s, body).await?;
        let req: p::DetokenizeRequest = p::parse_json(&bytes)?;
        s.check_model(req.model.as_deref())?;
        p::validate_detokenize(&req, &s.request_limits())?;
        let prompt = s
            .tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
        Ok::<_, ApiError>(axum::Json(p::DetokenizeResponse { prompt }))
    }
    .await;
    r.map_or_else(error_response, IntoResponse::into_response)
}

async fn models(State(s): State<Shared>) -> Response {
    axum::Json(p::ModelList::new(vec![p::ModelCard {
        id: s.served_model_name.clone(),
        object: "model",
        created: s.started,
        owned_by: "duet".into(),
        max_model_len: Some(s.context().max_model_len),
    }]))
    .into_response()
}

/// 200 once every role has a live worker; 503 while starting, draining or degraded.
async fn health(State(s): State<Shared>) -> Response {
    let (p, d) = {
        let b = s.board.read().unwrap_or_else(|e| e.into_inner());
        (b.prefill.len(), b.decode.len())
    };
    let body = json!({"prefill_workers": p, "decode_groups": d, "draining": s.draining.load(Ordering::Acquire)});
    let ok = p > 0 && d > 0 && !s.draining.load(Ordering::Acquire);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(s): State<Shared>) -> Response {
    let m = &s.metrics;
    {
        let b = s.board.read().unwrap_or_else(|e| e.into_inner());
        let (mut running, mut waiting) = (0, 0);
        let mut seen = s.worker_counters.lock().unwrap_or_else(|e| e.into_inner());
        for (role, map) in [("prefill", &b.prefill), ("decode", &b.decode)] {
            for (id, e) in map {
                let label = format!("{role}-{}", id.0);
                m.kv_pages_used
                    .with_label(&label)
                    .set(e.load.pages_used as i64);
                m.kv_pages_free
                    .with_label(&label)
                    .set(e.load.pages_free as i64);
                m.worker_sequences
                    .with_label(&label)
                    .set((e.load.running + e.load.waiting) as i64);
                if role == "decode" {
                    running += e.load.running;
                }
                waiting += e.load.waiting;
                // Workers report totals since their own start; a restarted worker starts again
                // from 0. Add what grew since the last scrape, and all of it after a reset, so the
                // counters only move forward and lose nothing (Prometheus counter semantics).
                let now = [
                    e.load.prefix_queried_tokens,
                    e.load.prefix_hit_tokens,
                    e.load.preemptions,
                ];
                let last = seen.insert(label, now).unwrap_or_default();
                let grew = |i: usize| now[i].checked_sub(last[i]).unwrap_or(now[i]);
                m.prefix_cache_queried_tokens_total.add(grew(0));
                m.prefix_cache_hit_tokens_total.add(grew(1));
                m.preemptions_total.add(grew(2));
            }
        }
        m.running_requests.set(running as i64);
        m.queue_depth.set(waiting as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        m.render(),
    )
        .into_response()
}
