//! The HTTP API (axum): OpenAI-compatible chat and text completions, SGLang's `/generate`,
//! vLLM's `/tokenize` and `/detokenize`, `/v1/models`, `/health` and Prometheus `/metrics`.
//!
//! The generating endpoints share one handler (`generating.rs`): it validates and tokenizes
//! through the endpoint's [`Endpoint`](generating::Endpoint) implementation (`endpoints.rs`),
//! takes an admission slot (or answers 429), starts one [`ChoiceRun`] per choice and turns their
//! deltas into a JSON body or an SSE stream shaped by the endpoint. Every body, queue and choice
//! count has a bound from [`HttpLimits`]. This file holds the shared state, the router and the
//! endpoints that do not generate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use duet_core::pd::Context;
use duet_model::tokenizer::TextTokenizer;
use ractor::ActorRef;
use serde_json::json;

use crate::clock::Clock;
use crate::gateway::GatewayMsg;
use crate::gateway::stream::{ChoiceRun, TextOptions};
use crate::metrics::Metrics;
use crate::registry::SharedBoard;
use crate::seq::{SeqParams, ThinkingBudgetSpec, TokenLogprob};
use duet_model::sampling::SamplingParams;
use duet_openai::protocol::{self as p, ApiError, GenParams, RequestLimits};

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

/// SSE events a streaming response with several choices may have queued for a slow client before
/// the choice tasks wait: bounds memory per stream while keeping the writer busy. (A one-choice
/// stream has no queue: its body reads the sequence's channel directly.)
const SSE_QUEUE_EVENTS: usize = 64;

pub struct AppState {
    pub gateway: ActorRef<GatewayMsg>,
    pub tokenizer: Arc<TextTokenizer>,
    pub metrics: Arc<Metrics>,
    pub board: SharedBoard,
    pub limits: HttpLimits,
    pub served_model_name: String,
    /// Who may call: `Authorization: Bearer` keys and the paths that need none.
    pub api_keys: crate::gateway::auth::ApiKeys,
    /// The model's positions; the advertised context is [`AppState::context`].
    pub max_positions: usize,
    /// KV pages of a prefill worker's and a decode group's pool as configured, until the workers
    /// report their own.
    pub pool_pages: (usize, usize),
    pub vocab_size: usize,
    /// Token ids that end generation unless `ignore_eos`.
    pub eos_ids: Vec<u32>,
    pub think: Option<ThinkIds>,
    /// Compiles request grammars (validation here; the workers compile their own copies).
    pub grammars: Option<Arc<duet_model::grammar::GrammarCompiler>>,
    pub seq_ids: Arc<AtomicU64>,
    /// Each worker's cumulative counters at the last `/metrics` scrape (prefix queried, prefix
    /// hit, preemptions), keyed by its metrics label.
    pub worker_counters: std::sync::Mutex<std::collections::BTreeMap<String, [u64; 3]>>,
    pub request_ids: AtomicU64,
    pub inflight: AtomicUsize,
    /// Woken when `inflight` drops to zero, so a drain ends as soon as the last request does.
    pub idle: tokio::sync::Notify,
    pub draining: AtomicBool,
    pub started: u64,
}

impl AppState {
    /// Returns once no request holds an admission slot.
    pub async fn idle(&self) {
        loop {
            let woken = self.idle.notified();
            tokio::pin!(woken);
            // Registered before the check, so a release between the check and the await wakes it.
            woken.as_mut().enable();
            if self.inflight.load(Ordering::Acquire) == 0 {
                return;
            }
            woken.await;
        }
    }

    fn release(&self) {
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ThinkIds {
    pub start: u32,
    pub end: u32,
    pub newline: u32,
}

pub type Shared = Arc<AppState>;

mod endpoints;
mod generating;

use endpoints::{Chat, Completions, Generate};
use generating::generating;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(generating::<Chat>))
        .route("/v1/completions", post(generating::<Completions>))
        .route("/generate", post(generating::<Generate>))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::gateway::auth::require_key,
        ))
        .with_state(state)
}

fn now_s() -> u64 {
    Clock::unix_secs()
}

pub(crate) fn error_response(e: ApiError) -> Response {
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

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_response(ApiError::method_not_allowed(method.as_str(), uri.path()))
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
        self.0.release();
    }
}

fn admit(s: &Shared) -> Result<Admission, ApiError> {
    if s.draining.load(Ordering::Acquire) {
        s.metrics.requests_rejected_total.inc();
        return Err(ApiError::unavailable("server is shutting down"));
    }
    let prev = s.inflight.fetch_add(1, Ordering::AcqRel);
    if prev >= s.limits.inflight_max {
        s.release();
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

    /// Compiles the request's grammar (a 400 naming its field when it does not compile or is too
    /// large) and sets it on `params`. The output it constrains starts after `</think>` when the
    /// prompt leaves the model inside a reasoning span (its last `<think>` is not closed).
    /// The first grammar of a process also builds the token trie (once; in `duet serve` the
    /// workers share it).
    fn constrain(
        &self,
        g: Option<duet_openai::grammar::RequestGrammar>,
        prompt: &[u32],
        params: &mut GenParams,
    ) -> Result<(), ApiError> {
        let Some(g) = g else {
            return Ok(());
        };
        let Some(compiler) = &self.grammars else {
            return Err(ApiError::invalid(
                g.param,
                "this server has no grammar engine (no tokenizer.json)",
            ));
        };
        let mut spec = g.spec;
        spec.starts_after = self.think.and_then(|t| {
            let open = prompt.iter().rposition(|&x| x == t.start)?;
            let closed = prompt.iter().rposition(|&x| x == t.end);
            (closed < Some(open)).then_some(t.end)
        });
        // The first grammar of a process builds the token trie (a second or so): on a
        // multi-threaded runtime the worker thread hands its other tasks on meanwhile.
        let compile = || compiler.compile(&spec);
        let compiled = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(compile),
            _ => compile(),
        };
        compiled.map_err(|e| ApiError::invalid(g.param, e.to_string()))?;
        params.grammar = Some(Arc::new(spec));
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
            logit_bias: g.logit_bias.clone(),
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
            grammar: g.grammar.clone(),
        }
    }

    fn start_choice(
        &self,
        prompt: Arc<Vec<u32>>,
        g: &GenParams,
        text: TextOptions,
        request_span: &tracing::Span,
    ) -> ChoiceRun {
        ChoiceRun::start(
            self.gateway.clone(),
            self.seq_ids.clone(),
            self.tokenizer.clone(),
            prompt,
            self.seq_params(g),
            text,
            self.limits.request_timeout,
            request_span,
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

// ---------------------------------------------------------------------------------------------
// /tokenize, /detokenize, /v1/models, /health, /metrics
// ---------------------------------------------------------------------------------------------

async fn tokenize(State(s): State<Shared>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&s, body).await?;
        let req: p::TokenizeRequest = p::parse_json(&bytes)?;
        s.check_model(req.model.as_deref())?;
        let token_strs = req.return_token_strs.unwrap_or(false);
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
        let strs = token_strs.then(|| {
            ids.iter()
                .map(|&id| s.tokenizer.id_to_token(id).unwrap_or_default())
                .collect()
        });
        let mut r = p::TokenizeResponse::new(ids, s.context().max_model_len);
        r.token_strs = strs;
        Ok::<_, ApiError>(axum::Json(r))
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

impl AppState {
    fn model_card(&self) -> p::ModelCard {
        p::ModelCard {
            id: self.served_model_name.clone(),
            object: "model",
            created: self.started,
            owned_by: "duet".into(),
            max_model_len: Some(self.context().max_model_len),
        }
    }
}

async fn models(State(s): State<Shared>) -> Response {
    axum::Json(p::ModelList::new(vec![s.model_card()])).into_response()
}

/// `GET /v1/models/{id}` (`client.models.retrieve`); ids may contain `/` (`deepseek-ai/...`).
async fn model(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match s.check_model(Some(&id)) {
        Ok(()) => axum::Json(s.model_card()).into_response(),
        Err(e) => error_response(e),
    }
}

/// The OpenAPI 3.1 description of every endpoint (`openapi.json`, written by hand as Python data in
/// scripts/openapi.py; tests/serve_conformance.rs holds it to the router, and its schemathesis run
/// holds the server to it).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI_JSON,
    )
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
