//! The three generating endpoints as [`Endpoint`]s: what each makes of a request, and the shape of
//! its answers (OpenAI's chat and text completions, SGLang's cumulative `/generate` chunks).

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::generating::*;
use super::{AppState, error_response};
use crate::gateway::stream::{ChoiceDelta, ChoiceFinish, ChoiceRun, TextOptions};
use crate::seq::TokenLogprob;
use duet_openai::protocol::{self as p, ApiError};
use duet_openai::tools::ToolEvent;

// ---------------------------------------------------------------------------------------------
// /v1/chat/completions
// ---------------------------------------------------------------------------------------------

pub(super) struct Chat {
    logprobs: bool,
}

impl Chat {
    fn chunk(r: &RequestInfo, choices: Vec<p::ChunkChoice>) -> Event {
        let mut c = p::ChatCompletionChunk::new(r.id.clone(), r.created, r.model.clone(), choices);
        if r.include_usage {
            c.usage = Some(None);
        }
        sse_event(&c)
    }

    /// The prompt: the chat template over the messages and tools, with `chat_template_kwargs`.
    /// `thinking: false` / `enable_thinking: false` reach the template; one that opens a
    /// reasoning block regardless (R1's) gets it closed here, as templates that know the switch
    /// do themselves (DeepSeek-V3.1's, Qwen3's).
    fn render(s: &AppState, v: &p::ValidatedChat) -> Result<(String, Vec<u32>), ApiError> {
        let tools = v
            .tools
            .as_ref()
            .map(|t| serde_json::to_value(t).unwrap_or(Value::Null));
        let kwargs = &v.chat_template_kwargs;
        let (mut text, ids) = s
            .tokenizer
            .render_request(&v.messages, tools.as_ref(), kwargs)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let thinking_off = ["thinking", "enable_thinking"]
            .iter()
            .any(|k| kwargs.get(*k) == Some(&Value::Bool(false)));
        if !(thinking_off && s.think.is_some() && text.trim_end_matches('\n').ends_with("<think>"))
        {
            return Ok((text, ids));
        }
        text.push_str(if text.ends_with('\n') {
            "\n</think>\n\n"
        } else {
            "\n\n</think>\n\n"
        });
        let ids = s
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        Ok((text, ids))
    }
}

impl Endpoint for Chat {
    type Request = p::ChatCompletionRequest;

    fn prepare(s: &AppState, req: Self::Request) -> Result<Generation<Self>, ApiError> {
        let mut v = p::validate_chat(req, &s.request_limits())?;
        s.check_model(v.model.as_deref())?;
        if let (Some(param), None) = (v.thinking_param, s.think) {
            return Err(ApiError::invalid(
                param,
                format!("`{param}` needs a model that thinks; this one has no <think> token"),
            ));
        }
        let (text, ids) = Self::render(s, &v)?;
        s.fit(ids.len(), &mut v.params)?;
        s.constrain(v.grammar.take(), &ids, &mut v.params)?;
        let request = RequestInfo::new(s, "chatcmpl", v.include_usage);
        let reasoning = (v.separate_reasoning && s.think.is_some())
            .then(|| text.trim_end_matches('\n').ends_with("<think>"));
        let text = TextOptions {
            stop: v.params.stop.clone(),
            reasoning,
            tools: v.tools.as_ref().map(|_| format!("call_{}_", request.id)),
            skip_special_tokens: v.params.skip_special_tokens,
        };
        Ok(Generation {
            prompts: vec![Arc::new(ids)],
            endpoint: Chat {
                logprobs: v.params.logprobs,
            },
            params: v.params,
            text,
            stream: v.stream,
            request,
        })
    }

    fn whole(
        &self,
        s: &AppState,
        r: &RequestInfo,
        outcomes: Vec<ChoiceOutcome<'_>>,
        usage: p::Usage,
    ) -> Response {
        let mut choices = Vec::with_capacity(outcomes.len());
        for (index, o) in outcomes.into_iter().enumerate() {
            let mut content = String::new();
            let mut reasoning = String::new();
            let mut tokens = Vec::new();
            for d in o.deltas {
                content.push_str(&d.content);
                reasoning.push_str(&d.reasoning);
                tokens.extend(d.tokens);
            }
            let calls: Vec<p::ToolCallOut> = o
                .run
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
                logprobs: if self.logprobs {
                    s.chat_logprobs(&tokens)
                } else {
                    None
                },
                finish_reason: finish_reason(&o.finish),
                matched_stop: matched_stop(&o.finish),
            });
        }
        let (id, model) = (r.id.clone(), r.model.clone());
        axum::Json(p::ChatCompletion::new(id, r.created, model, choices, usage)).into_response()
    }

    fn opening(&self, r: &RequestInfo, index: usize) -> Option<Event> {
        Some(Self::chunk(
            r,
            vec![p::ChunkChoice {
                index,
                delta: p::Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Default::default()
                },
                logprobs: None,
                finish_reason: None,
                matched_stop: None,
            }],
        ))
    }

    fn delta(
        &self,
        s: &AppState,
        r: &RequestInfo,
        index: usize,
        _run: &ChoiceRun,
        d: ChoiceDelta,
        _st: &mut ChoiceStream,
    ) -> Vec<Event> {
        chat_chunks(s, index, d, self.logprobs)
            .into_iter()
            .map(|c| Self::chunk(r, vec![c]))
            .collect()
    }

    fn usage(&self, r: &RequestInfo, usage: p::Usage) -> Option<Event> {
        let mut c = p::ChatCompletionChunk::new(r.id.clone(), r.created, r.model.clone(), vec![]);
        c.usage = Some(Some(usage));
        Some(sse_event(&c))
    }
}

/// One delta as chat chunk choices (content, reasoning and tool calls in one chunk; the finish in
/// its own chunk, as OpenAI streams).
pub(super) fn chat_chunks(
    s: &AppState,
    index: usize,
    d: ChoiceDelta,
    logprobs: bool,
) -> Vec<p::ChunkChoice> {
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

// ---------------------------------------------------------------------------------------------
// /v1/completions
// ---------------------------------------------------------------------------------------------

pub(super) struct Completions {
    /// The client asked for log-probabilities (`best_of` asks the workers for them regardless).
    logprobs: bool,
    /// `echo`: each prompt's text, returned before its completion.
    echo: Option<Vec<String>>,
    /// Choices returned per prompt.
    n: usize,
    /// Candidates generated per prompt (`best_of`, ≥ `n`).
    candidates: usize,
}

impl Completions {
    fn body(
        r: &RequestInfo,
        choices: Vec<p::CompletionChoice>,
        usage: Option<p::Usage>,
    ) -> p::Completion {
        let mut c = p::Completion::new(r.id.clone(), r.created, r.model.clone(), choices);
        c.usage = match usage {
            Some(u) => Some(Some(u)),
            None => r.include_usage.then_some(None),
        };
        c
    }
}

impl Endpoint for Completions {
    type Request = p::CompletionRequest;

    fn prepare(s: &AppState, req: Self::Request) -> Result<Generation<Self>, ApiError> {
        let mut v = p::validate_completion(req, &s.request_limits())?;
        s.check_model(v.model.as_deref())?;
        let mut prompts = Vec::with_capacity(v.prompts.len());
        let mut max_tokens = v.params.max_tokens;
        for pr in &v.prompts {
            let ids = encode_prompt(s, pr, true)?;
            let mut g = v.params.clone();
            s.fit(ids.len(), &mut g)?;
            max_tokens = max_tokens.min(g.max_tokens);
            prompts.push(Arc::new(ids));
        }
        v.params.max_tokens = max_tokens;
        let text = TextOptions {
            stop: v.params.stop.clone(),
            reasoning: None,
            tools: None,
            skip_special_tokens: v.params.skip_special_tokens,
        };
        let echo = v.echo.then(|| {
            v.prompts
                .iter()
                .map(|pr| match pr {
                    p::Prompt::Text(t) => t.clone(),
                    p::Prompt::Ids(ids) => s
                        .tokenizer
                        .decode(ids, v.params.skip_special_tokens)
                        .unwrap_or_default(),
                })
                .collect()
        });
        let endpoint = Completions {
            logprobs: v.params.logprobs,
            echo,
            n: v.params.n,
            candidates: v.best_of,
        };
        // Ranking candidates needs each sampled token's log-probability.
        v.params.n = v.best_of;
        v.params.logprobs |= v.best_of > endpoint.n;
        Ok(Generation {
            prompts,
            endpoint,
            params: v.params,
            text,
            stream: v.stream,
            request: RequestInfo::new(s, "cmpl", v.include_usage),
        })
    }

    fn whole(
        &self,
        s: &AppState,
        r: &RequestInfo,
        outcomes: Vec<ChoiceOutcome<'_>>,
        usage: p::Usage,
    ) -> Response {
        // Outcomes come prompt by prompt, `candidates` each; `best_of` keeps the `n` with the
        // highest cumulative log-probability (ties: the earlier one).
        let mut groups: Vec<Vec<(f32, ChoiceOutcome<'_>)>> = Vec::new();
        for (i, o) in outcomes.into_iter().enumerate() {
            if i % self.candidates.max(1) == 0 {
                groups.push(Vec::new());
            }
            let score: f32 = o
                .deltas
                .iter()
                .flat_map(|d| &d.tokens)
                .filter_map(|(_, lp)| lp.as_ref().map(|l| l.logprob))
                .sum();
            if let Some(g) = groups.last_mut() {
                g.push((score, o));
            }
        }
        let mut choices = Vec::new();
        for (prompt, mut group) in groups.into_iter().enumerate() {
            if self.candidates > self.n {
                group.sort_by(|a, b| b.0.total_cmp(&a.0));
            }
            for (_, o) in group.into_iter().take(self.n) {
                let mut text = self
                    .echo
                    .as_ref()
                    .and_then(|e| e.get(prompt).cloned())
                    .unwrap_or_default();
                text.extend(o.deltas.iter().map(|d| d.content.as_str()));
                let tokens: Vec<_> = o.deltas.into_iter().flat_map(|d| d.tokens).collect();
                choices.push(p::CompletionChoice {
                    index: choices.len(),
                    text,
                    logprobs: if self.logprobs {
                        s.completion_logprobs(&tokens, &mut 0)
                    } else {
                        None
                    },
                    finish_reason: finish_reason(&o.finish),
                    matched_stop: matched_stop(&o.finish),
                });
            }
        }
        axum::Json(Self::body(r, choices, Some(usage))).into_response()
    }

    fn delta(
        &self,
        s: &AppState,
        r: &RequestInfo,
        index: usize,
        _run: &ChoiceRun,
        d: ChoiceDelta,
        st: &mut ChoiceStream,
    ) -> Vec<Event> {
        let lp = if self.logprobs {
            s.completion_logprobs(&d.tokens, &mut st.offset)
        } else {
            None
        };
        let finish = d.finish.as_ref();
        if d.content.is_empty() && lp.is_none() && finish.is_none() {
            return vec![];
        }
        let choice = p::CompletionChoice {
            index,
            text: d.content,
            logprobs: lp,
            finish_reason: finish.and_then(finish_reason),
            matched_stop: finish.and_then(matched_stop),
        };
        vec![sse_event(&Self::body(r, vec![choice], None))]
    }

    fn usage(&self, r: &RequestInfo, usage: p::Usage) -> Option<Event> {
        Some(sse_event(&Self::body(r, vec![], Some(usage))))
    }

    /// `echo`: the prompt's text opens its choices' streams.
    fn opening(&self, r: &RequestInfo, index: usize) -> Option<Event> {
        let text = self
            .echo
            .as_ref()?
            .get(index / self.candidates.max(1))?
            .clone();
        let choice = p::CompletionChoice {
            index,
            text,
            logprobs: None,
            finish_reason: None,
            matched_stop: None,
        };
        Some(sse_event(&Self::body(r, vec![choice], None)))
    }
}

// ---------------------------------------------------------------------------------------------
// SGLang /generate
// ---------------------------------------------------------------------------------------------

pub(super) struct Generate {
    return_logprob: bool,
}

impl Generate {
    fn body(
        &self,
        r: &RequestInfo,
        run: &ChoiceRun,
        finish: Option<&ChoiceFinish>,
        tokens: &[(u32, Option<TokenLogprob>)],
    ) -> p::GenerateResponse {
        p::GenerateResponse {
            text: run.text.clone(),
            output_ids: run.generated().to_vec(),
            meta_info: p::GenerateMetaInfo {
                id: r.id.clone(),
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
                output_token_logprobs: self.return_logprob.then(|| {
                    tokens
                        .iter()
                        .map(|(id, lp)| (lp.as_ref().map_or(0.0, |l| l.logprob), *id, None))
                        .collect()
                }),
            },
        }
    }
}

impl Endpoint for Generate {
    type Request = p::GenerateRequest;

    fn prepare(s: &AppState, req: Self::Request) -> Result<Generation<Self>, ApiError> {
        let mut v = p::validate_generate(req, &s.request_limits())?;
        v.params.logprobs |= v.return_logprob;
        // One sequence per request: SGLang answers `n` > 1 with a list, which this endpoint does
        // not build.
        v.params.n = 1;
        let ids = encode_prompt(s, &v.prompt, true)?;
        s.fit(ids.len(), &mut v.params)?;
        s.constrain(v.grammar.take(), &ids, &mut v.params)?;
        let text = TextOptions {
            stop: v.params.stop.clone(),
            reasoning: None,
            tools: None,
            skip_special_tokens: v.params.skip_special_tokens,
        };
        Ok(Generation {
            prompts: vec![Arc::new(ids)],
            params: v.params,
            text,
            stream: v.stream,
            request: RequestInfo::new(s, "gen", false),
            endpoint: Generate {
                return_logprob: v.return_logprob,
            },
        })
    }

    fn whole(
        &self,
        _s: &AppState,
        r: &RequestInfo,
        outcomes: Vec<ChoiceOutcome<'_>>,
        _usage: p::Usage,
    ) -> Response {
        let Some(o) = outcomes.into_iter().next() else {
            return error_response(ApiError::unavailable("no result"));
        };
        let tokens: Vec<_> = o.deltas.into_iter().flat_map(|d| d.tokens).collect();
        axum::Json(self.body(r, o.run, Some(&o.finish), &tokens)).into_response()
    }

    /// SGLang streams the cumulative text and ids on every chunk.
    fn delta(
        &self,
        _s: &AppState,
        r: &RequestInfo,
        _index: usize,
        run: &ChoiceRun,
        d: ChoiceDelta,
        st: &mut ChoiceStream,
    ) -> Vec<Event> {
        st.tokens.extend(d.tokens);
        vec![sse_event(&self.body(r, run, d.finish.as_ref(), &st.tokens))]
    }

    fn usage(&self, _r: &RequestInfo, _usage: p::Usage) -> Option<Event> {
        None
    }
}
