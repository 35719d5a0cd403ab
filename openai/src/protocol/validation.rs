//! Validation: ranges, defaults and the consistency of fields, turning a parsed request into the
//! normalised form the gateway and the workers use ([`GenParams`], [`ValidatedChat`], ...). Every
//! error names the parameter as the client wrote it.

use serde_json::{Map, Value, json};

use super::ApiError;
use super::requests::*;

// Bounds

/// OpenAI's documented limit; vLLM and SGLang take any number, but every client written for OpenAI
/// stays within it, and each stop string is scanned on every generated token.
pub const STOP_STRINGS_MAX: usize = 4;
/// No documented OpenAI limit. The stop matcher holds back up to this many bytes of output, which
/// delays streaming by as much: 256 bytes is tens of tokens, far more than any real stop sequence.
pub const STOP_BYTES_MAX: usize = 256;
/// Stop token ids are checked per generated token by a linear scan; 64 covers every EOS variant.
pub const STOP_TOKEN_IDS_MAX: usize = 64;
/// OpenAI's limit for `top_logprobs` (chat) and vLLM's default `max_logprobs`.
pub const TOP_LOGPROBS_MAX: usize = 20;
/// OpenAI's range for `temperature`.
pub const TEMPERATURE_MAX: f32 = 2.0;
/// OpenAI's range for presence and frequency penalties: [-2, 2].
pub const PENALTY_ABS_MAX: f32 = 2.0;
/// OpenAI's range for a `logit_bias` value: [-100, 100].
pub const LOGIT_BIAS_ABS_MAX: f32 = 100.0;
/// No documented OpenAI limit. Every entry is added to the logits at every step; 1,024 covers
/// banning a long word list in every casing.
pub const LOGIT_BIAS_ENTRIES_MAX: usize = 1024;
/// `reasoning_effort` as a thinking budget (reasoning tokens before `</think>` is forced), for
/// models that think (`<think>` in the vocabulary); `high` leaves the model its own length.
pub const REASONING_EFFORT_BUDGETS: [(&str, Option<u64>); 5] = [
    ("none", Some(0)),
    ("minimal", Some(256)),
    ("low", Some(1024)),
    ("medium", Some(4096)),
    ("high", None),
];

/// What validation needs from the server's configuration.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// `max_tokens` when the request gives none (the caller clips it to the context window).
    pub default_max_tokens: usize,
    /// Most sequences one request may ask for (`n`, times the number of prompts for completions).
    pub n_max: usize,
    /// Token ids at or above this are rejected.
    pub vocab_size: usize,
}

// Sampling

/// The sampling fields every endpoint shares, gathered from whichever request type carried them.
#[derive(Debug, Clone, Default)]
pub struct SamplingInput {
    /// (value, parameter name it came from) so errors name what the client sent.
    pub max_tokens: Option<(u64, &'static str)>,
    pub n: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<StopStrings>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: Option<Seed>,
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub thinking_budget: Option<u64>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub logit_bias: Option<Map<String, Value>>,
}

/// The normalised request the workers see.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub max_tokens: usize,
    /// The client set `max_tokens` (it must then fit beside the prompt); otherwise `max_tokens` is
    /// the server's default, clipped to what the context leaves.
    pub max_tokens_given: bool,
    pub temperature: f32,
    pub top_p: f32,
    /// 0: off.
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1: off.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: bool,
    pub top_logprobs: usize,
    pub thinking_budget: Option<usize>,
    pub n: usize,
    pub skip_special_tokens: bool,
    /// (token id, bias), sorted by token id.
    pub logit_bias: Vec<(u32, f32)>,
    /// Constrained decoding, set by the gateway once the request's grammar compiled (it knows
    /// where the output starts: after `</think>` for a reasoning prompt).
    pub grammar: Option<std::sync::Arc<duet_model::grammar::GrammarSpec>>,
}

fn check_range(param: &str, v: f32, ok: bool, range: &str) -> Result<f32, ApiError> {
    if ok && v.is_finite() {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be in {range}, got {v}"),
        ))
    }
}

/// Checks ranges and fills defaults (temperature 1, top_p 1, max_tokens from `limits`).
pub fn validate_sampling(s: SamplingInput, limits: &RequestLimits) -> Result<GenParams, ApiError> {
    let max_tokens = match s.max_tokens {
        None => limits.default_max_tokens,
        Some((0, name)) => {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be at least 1"),
            ));
        }
        Some((v, _)) => usize::try_from(v).unwrap_or(usize::MAX),
    };
    let n = s.n.unwrap_or(1);
    if n == 0 || n > limits.n_max as u64 {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be in 1..={}, got {n}", limits.n_max),
        ));
    }
    let t = s.temperature.unwrap_or(1.0);
    let temperature = check_range(
        "temperature",
        t,
        (0.0..=TEMPERATURE_MAX).contains(&t),
        "[0, 2]",
    )?;
    let p = s.top_p.unwrap_or(1.0);
    let top_p = check_range("top_p", p, p > 0.0 && p <= 1.0, "(0, 1]")?;
    // vLLM and SGLang spell "off" as -1; OpenAI has no top_k; 0 is off too.
    let top_k = match s.top_k.unwrap_or(0) {
        k if k == -1 || k == 0 => 0,
        k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        k => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1 (off) or >= 0, got {k}"),
            ));
        }
    };
    let mp = s.min_p.unwrap_or(0.0);
    let min_p = check_range("min_p", mp, (0.0..=1.0).contains(&mp), "[0, 1]")?;
    let pen = |name: &str, v: Option<f32>| {
        let v = v.unwrap_or(0.0);
        check_range(
            name,
            v,
            (-PENALTY_ABS_MAX..=PENALTY_ABS_MAX).contains(&v),
            "[-2, 2]",
        )
    };
    let presence_penalty = pen("presence_penalty", s.presence_penalty)?;
    let frequency_penalty = pen("frequency_penalty", s.frequency_penalty)?;
    let rp = s.repetition_penalty.unwrap_or(1.0);
    let repetition_penalty = check_range("repetition_penalty", rp, rp > 0.0, "(0, inf)")?;
    let top_logprobs = usize::try_from(s.top_logprobs.unwrap_or(0)).unwrap_or(usize::MAX);
    if top_logprobs > TOP_LOGPROBS_MAX {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("`top_logprobs` must be in 0..={TOP_LOGPROBS_MAX}, got {top_logprobs}"),
        ));
    }
    if top_logprobs > 0 && !s.logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs` to be true",
        ));
    }
    let stop = validate_stop(s.stop.unwrap_or_default().0)?;
    let stop_token_ids = s.stop_token_ids.unwrap_or_default();
    if stop_token_ids.len() > STOP_TOKEN_IDS_MAX {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("at most {STOP_TOKEN_IDS_MAX} stop token ids are allowed"),
        ));
    }
    check_token_ids("stop_token_ids", &stop_token_ids, limits.vocab_size)?;
    let logit_bias = validate_logit_bias(s.logit_bias.unwrap_or_default(), limits.vocab_size)?;
    Ok(GenParams {
        max_tokens,
        max_tokens_given: s.max_tokens.is_some(),
        temperature,
        top_p,
        top_k,
        min_p,
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
        seed: s.seed.map(|s| s.0),
        stop,
        stop_token_ids,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        logprobs: s.logprobs,
        top_logprobs,
        thinking_budget: s
            .thinking_budget
            .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
        n: n as usize,
        skip_special_tokens: s.skip_special_tokens.unwrap_or(true),
        logit_bias,
        grammar: None,
    })
}

/// `{"50256": -100, ...}`: keys are token ids in the vocabulary, values numbers in [-100, 100].
fn validate_logit_bias(
    map: Map<String, Value>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    if map.len() > LOGIT_BIAS_ENTRIES_MAX {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "at most {LOGIT_BIAS_ENTRIES_MAX} entries are allowed, got {}",
                map.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let param = format!("logit_bias.{k}");
        let id = k
            .parse::<u32>()
            .ok()
            .filter(|&id| (id as usize) < vocab_size)
            .ok_or_else(|| {
                ApiError::invalid(
                    &param,
                    format!("`{k}` is not a token id in the vocabulary (size {vocab_size})"),
                )
            })?;
        let bias = v
            .as_f64()
            .map(|b| b as f32)
            .filter(|b| b.is_finite() && (-LOGIT_BIAS_ABS_MAX..=LOGIT_BIAS_ABS_MAX).contains(b));
        let Some(bias) = bias else {
            return Err(ApiError::invalid(
                &param,
                format!("`logit_bias` values must be numbers in [-100, 100], got {v}"),
            ));
        };
        out.push((id, bias));
    }
    // "007" and "7" are one token: the last one given wins, as in a JSON object.
    out.sort_by_key(|&(id, _)| id);
    out.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            earlier.1 = later.1;
        }
        same
    });
    Ok(out)
}

/// A 400 for a documented field this server cannot honour, naming it and saying why.
fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::invalid(param, format!("`{param}` is not supported: {why}"))
}

fn validate_stop(stops: Vec<String>) -> Result<Vec<String>, ApiError> {
    // An empty stop string would end every request before its first token: ignore it.
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    if stops.len() > STOP_STRINGS_MAX {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {STOP_STRINGS_MAX} stop sequences are allowed, got {}",
                stops.len()
            ),
        ));
    }
    if let Some(s) = stops.iter().find(|s| s.len() > STOP_BYTES_MAX) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "stop sequences are limited to {STOP_BYTES_MAX} bytes, got one of {}",
                s.len()
            ),
        ));
    }
    Ok(stops)
}

fn check_token_ids(param: &str, ids: &[u32], vocab_size: usize) -> Result<(), ApiError> {
    match ids.iter().position(|&id| id as usize >= vocab_size) {
        Some(i) => Err(ApiError::invalid(
            format!("{param}[{i}]"),
            format!(
                "token id {} is outside the vocabulary (size {vocab_size})",
                ids[i]
            ),
        )),
        None => Ok(()),
    }
}

// Chat completions

/// `tool_choice`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

/// A chat request ready for the chat template and the workers.
#[derive(Debug, Clone)]
pub struct ValidatedChat {
    pub model: Option<String>,
    /// The messages as the chat template expects them: `content` a string (parts joined), or null
    /// only for an assistant message with `tool_calls` (the templates' `none` case); `developer`
    /// becomes `system`; tool-call `arguments` are JSON strings.
    pub messages: Value,
    /// `None` when there are no tools or `tool_choice` is "none".
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: ToolChoice,
    pub params: GenParams,
    pub stream: bool,
    pub include_usage: bool,
    pub separate_reasoning: bool,
    pub chat_template_kwargs: Map<String, Value>,
    /// The field the thinking budget came from (`thinking_budget`, `reasoning_effort`, ...), so a
    /// model that does not think can refuse it by name.
    pub thinking_param: Option<&'static str>,
    pub response_format: ResponseFormat,
    /// What the output must match: the forced tool call (`tool_choice` `required` or a
    /// function) or the `response_format` (JSON object or schema).
    pub grammar: Option<crate::grammar::RequestGrammar>,
}

/// `response_format`, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    /// The `json_schema` object as sent (`name`, `schema`, `strict`).
    JsonSchema(Value),
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

pub fn validate_chat(
    req: ChatCompletionRequest,
    limits: &RequestLimits,
) -> Result<ValidatedChat, ApiError> {
    reject_unsupported_chat_fields(&req)?;
    let response_format = validate_response_format(req.response_format.as_ref())?;
    let effort_budget = reasoning_effort_budget(req.reasoning_effort.as_deref())?;
    let custom_budget = req.custom_params.as_ref().and_then(|c| c.thinking_budget);
    let thinking_param = if req.thinking_budget.is_some() {
        Some("thinking_budget")
    } else if custom_budget.is_some() {
        Some("custom_params.thinking_budget")
    } else if req.reasoning_effort.is_some() {
        Some("reasoning_effort")
    } else {
        None
    };
    let messages = match (req.messages, req.text) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "text",
                "give either `messages` or `text`, not both",
            ));
        }
        (Some(m), None) => m,
        (None, Some(text)) => vec![ChatMessage {
            role: "user".into(),
            content: Some(MessageContent::Text(text)),
            tool_calls: None,
            tool_call_id: None,
            name: None,
            reasoning_content: None,
        }],
        (None, None) => return Err(ApiError::invalid("messages", "`messages` is required")),
    };
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let messages = template_messages(messages)?;
    let tools = req.tools.unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                "only `function` tools are supported",
            ));
        }
    }
    let tool_choice = validate_tool_choice(req.tool_choice, &tools)?;
    let tools = (!tools.is_empty() && tool_choice != ToolChoice::None).then_some(tools);
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => Some((v, "max_completion_tokens")),
        (None, Some(v)) => Some((v, "max_tokens")),
        (None, None) => None,
    };
    let logprobs = req.logprobs.unwrap_or(false);
    let params = validate_sampling(
        SamplingInput {
            max_tokens,
            n: req.n,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            repetition_penalty: req.repetition_penalty,
            stop: req.stop,
            stop_token_ids: req.stop_token_ids,
            seed: req.seed,
            logprobs,
            top_logprobs: req.top_logprobs,
            // An explicit budget wins over the one `reasoning_effort` stands for.
            thinking_budget: req.thinking_budget.or(custom_budget).or(effort_budget),
            ignore_eos: req.ignore_eos,
            skip_special_tokens: req.skip_special_tokens,
            logit_bias: req.logit_bias,
        },
        limits,
    )?;
    let stream = req.stream.unwrap_or(false);
    let grammar = chat_grammar(
        tools.as_deref(),
        &tool_choice,
        req.parallel_tool_calls.unwrap_or(true),
        &response_format,
    )?;
    Ok(ValidatedChat {
        grammar,
        model: req.model,
        messages,
        tools,
        tool_choice,
        params,
        stream,
        include_usage: stream
            && req
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        separate_reasoning: req.separate_reasoning.unwrap_or(true),
        chat_template_kwargs: req.chat_template_kwargs.unwrap_or_default(),
        thinking_param,
        response_format,
    })
}

/// OpenAI's chat fields that would change the answer in ways this server cannot honour: a 400
/// naming each, never a silent no-op. The values that mean the default pass.
fn reject_unsupported_chat_fields(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    let fields: [(&str, &Option<Value>, &str); 5] = [
        (
            "functions",
            &req.functions,
            "deprecated by OpenAI; use `tools`",
        ),
        (
            "function_call",
            &req.function_call,
            "deprecated by OpenAI; use `tool_choice`",
        ),
        ("audio", &req.audio, "these models read and write text only"),
        (
            "prediction",
            &req.prediction,
            "predicted outputs are not implemented",
        ),
        (
            "web_search_options",
            &req.web_search_options,
            "this server does not search the web",
        ),
    ];
    for (param, v, why) in fields {
        if given(v) {
            return Err(unsupported(param, why));
        }
    }
    if given(&req.verbosity) {
        return Err(unsupported(
            "verbosity",
            "these models have no verbosity control; ask in the prompt",
        ));
    }
    if given(&req.modalities) && req.modalities != Some(json!(["text"])) {
        return Err(unsupported("modalities", "only `[\"text\"]` is served"));
    }
    match &req.store {
        Some(Value::Bool(true)) => {
            return Err(unsupported("store", "completions are not stored"));
        }
        Some(Value::Bool(false) | Value::Null) | None => {}
        Some(_) => return Err(ApiError::invalid("store", "`store` must be a boolean")),
    }
    match &req.service_tier {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "auto" || s == "default" => {}
        Some(_) => {
            return Err(unsupported(
                "service_tier",
                "there is one tier; `auto` and `default` name it",
            ));
        }
    }
    Ok(())
}

/// The grammar a chat request's output must match: a forced tool call, or its `response_format`
/// (not both: a forced call is not the JSON the format describes).
fn chat_grammar(
    tools: Option<&[Tool]>,
    choice: &ToolChoice,
    parallel: bool,
    format: &ResponseFormat,
) -> Result<Option<crate::grammar::RequestGrammar>, ApiError> {
    use crate::grammar::CallMode;
    let mode = match choice {
        ToolChoice::Required => Some(CallMode::Required),
        ToolChoice::Function(name) => Some(CallMode::Named(name)),
        ToolChoice::Auto => Some(CallMode::Auto),
        ToolChoice::None => None,
    };
    let calls = match (mode, tools) {
        (Some(mode), Some(t)) => Some((mode, crate::grammar::tool_calls(t, mode, parallel)?)),
        _ => None,
    };
    match (calls, format) {
        // With `auto` the model may answer in the format instead of calling.
        (Some((CallMode::Auto, _)), ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_)) => {
            json_format(format)
        }
        (Some(_), ResponseFormat::JsonObject | ResponseFormat::JsonSchema(_)) => {
            Err(ApiError::invalid(
                "response_format",
                "a JSON `response_format` cannot be combined with a forced `tool_choice`",
            ))
        }
        (Some((_, g)), ResponseFormat::Text) => Ok(Some(g)),
        (None, format) => json_format(format),
    }
}

/// The grammar of a JSON `response_format` (none for `text`).
fn json_format(
    format: &ResponseFormat,
) -> Result<Option<crate::grammar::RequestGrammar>, ApiError> {
    match format {
        ResponseFormat::Text => Ok(None),
        ResponseFormat::JsonObject => Ok(Some(crate::grammar::json_object())),
        ResponseFormat::JsonSchema(js) => {
            let schema = js.get("schema").ok_or_else(|| {
                ApiError::invalid(
                    "response_format.json_schema.schema",
                    "`schema` is required for `json_schema`",
                )
            })?;
            crate::grammar::json_schema(schema, "response_format.json_schema.schema").map(Some)
        }
    }
}

/// `text`, `json_object` or `json_schema` (whose `json_schema` object must be given); the JSON
/// modes are enforced by the grammar engine ([`chat_grammar`]).
fn validate_response_format(f: Option<&ResponseFormatIn>) -> Result<ResponseFormat, ApiError> {
    let Some(f) = f else {
        return Ok(ResponseFormat::Text);
    };
    let format = match f.kind.as_str() {
        "text" => ResponseFormat::Text,
        "json_object" => ResponseFormat::JsonObject,
        "json_schema" => match &f.json_schema {
            Some(js @ Value::Object(_)) => ResponseFormat::JsonSchema(js.clone()),
            _ => {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    "`json_schema` (an object with `name` and `schema`) is required",
                ));
            }
        },
        other => {
            return Err(ApiError::invalid(
                "response_format.type",
                format!("must be `text`, `json_object` or `json_schema`, got `{other}`"),
            ));
        }
    };
    Ok(format)
}

/// `reasoning_effort` as a thinking budget ([`REASONING_EFFORT_BUDGETS`]).
fn reasoning_effort_budget(effort: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(effort) = effort else {
        return Ok(None);
    };
    REASONING_EFFORT_BUDGETS
        .iter()
        .find(|(name, _)| *name == effort)
        .map(|&(_, budget)| budget)
        .ok_or_else(|| {
            ApiError::invalid(
                "reasoning_effort",
                format!("must be none, minimal, low, medium or high, got `{effort}`"),
            )
        })
}

fn validate_tool_choice(
    choice: Option<ToolChoiceIn>,
    tools: &[Tool],
) -> Result<ToolChoice, ApiError> {
    let default = if tools.is_empty() {
        ToolChoice::None
    } else {
        ToolChoice::Auto
    };
    match choice {
        None => Ok(default),
        Some(ToolChoiceIn::Mode(m)) => match m.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" if tools.is_empty() => Err(ApiError::invalid(
                "tool_choice",
                "`required` needs at least one tool in `tools`",
            )),
            "required" => Ok(ToolChoice::Required),
            other => Err(ApiError::invalid(
                "tool_choice",
                format!("`tool_choice` must be none, auto, required or a function, got `{other}`"),
            )),
        },
        Some(ToolChoiceIn::Named { kind, function }) => {
            if kind != "function" {
                return Err(ApiError::invalid("tool_choice.type", "must be `function`"));
            }
            if !tools.iter().any(|t| t.function.name == function.name) {
                return Err(ApiError::invalid(
                    "tool_choice.function.name",
                    format!("no tool named `{}` in `tools`", function.name),
                ));
            }
            Ok(ToolChoice::Function(function.name))
        }
    }
}

/// Messages in the shape DeepSeek's chat templates read (see [`ValidatedChat::messages`]).
pub fn template_messages(messages: Vec<ChatMessage>) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "unknown role `{}`; expected one of {}",
                    m.role,
                    ROLES.join(", ")
                ),
            ));
        }
        // OpenAI renamed `system` to `developer` for newer models; the templates know `system`.
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        let content = match m.content {
            None => None,
            Some(MessageContent::Text(t)) => Some(t),
            Some(MessageContent::Parts(parts)) => Some(join_text_parts(i, parts)?),
        };
        let mut obj = Map::new();
        obj.insert("role".into(), Value::String(role.into()));
        let calls = m.tool_calls.filter(|c| !c.is_empty());
        let content = match content {
            Some(c) => Value::String(c),
            // The templates test `content is none` only next to tool calls; elsewhere they
            // concatenate it, so a missing content is the empty string.
            None if role == "assistant" && calls.is_some() => Value::Null,
            None => Value::String(String::new()),
        };
        obj.insert("content".into(), content);
        if let Some(calls) = calls {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|c| {
                    let arguments = match c.function.arguments {
                        Some(Value::String(s)) => s,
                        None | Some(Value::Null) => "{}".into(),
                        Some(other) => other.to_string(),
                    };
                    json!({
                        "id": c.id.unwrap_or_default(),
                        "type": c.kind.unwrap_or_else(|| "function".into()),
                        "function": {"name": c.function.name, "arguments": arguments},
                    })
                })
                .collect();
            obj.insert("tool_calls".into(), Value::Array(calls));
        }
        for (key, v) in [
            ("tool_call_id", m.tool_call_id),
            ("name", m.name),
            ("reasoning_content", m.reasoning_content),
        ] {
            if let Some(v) = v {
                obj.insert(key.into(), Value::String(v));
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(Value::Array(out))
}

fn join_text_parts(i: usize, parts: Vec<ContentPart>) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, p) in parts.into_iter().enumerate() {
        match (p.kind.as_str(), p.text) {
            ("text", Some(t)) => text.push_str(&t),
            ("text", None) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content[{j}].text"),
                    "missing `text`",
                ));
            }
            (other, _) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content[{j}].type"),
                    format!("content type `{other}` is not supported; only `text` is"),
                ));
            }
        }
    }
    Ok(text)
}

// Completions

/// One prompt, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct ValidatedCompletion {
    pub model: Option<String>,
    /// One choice group per prompt, `params.n` choices each.
    pub prompts: Vec<Prompt>,
    pub params: GenParams,
    pub stream: bool,
    pub include_usage: bool,
    /// Return each prompt's text before its completion.
    pub echo: bool,
    /// Candidates per prompt (≥ `params.n`); the `n` with the highest cumulative log-probability
    /// are returned.
    pub best_of: usize,
}

pub fn validate_completion(
    req: CompletionRequest,
    limits: &RequestLimits,
) -> Result<ValidatedCompletion, ApiError> {
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported(
            "suffix",
            "DeepSeek-V3 and R1 have no fill-in-the-middle mode",
        ));
    }
    let echo = req.echo.unwrap_or(false);
    if echo && req.logprobs.is_some() {
        // Prompt log-probabilities would need the logits of every prompt position, which the
        // prefill does not keep; echoing without them would be a silent half answer.
        return Err(unsupported(
            "echo",
            "`echo` with `logprobs` (prompt log-probabilities) is not implemented",
        ));
    }
    let prompts = match req.prompt {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(PromptIn::Text(t)) => vec![Prompt::Text(t)],
        Some(PromptIn::Texts(ts)) => ts.into_iter().map(Prompt::Text).collect(),
        Some(PromptIn::Ids(ids)) => vec![Prompt::Ids(ids)],
        Some(PromptIn::IdLists(l)) => l.into_iter().map(Prompt::Ids).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if let Prompt::Ids(ids) = p {
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "prompt",
                    "a token-id prompt must not be empty",
                ));
            }
            check_token_ids(&format!("prompt[{i}]"), ids, limits.vocab_size)?;
        }
    }
    let top_logprobs = req.logprobs;
    let params = validate_sampling(
        SamplingInput {
            max_tokens: req.max_tokens.map(|v| (v, "max_tokens")),
            n: req.n,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            repetition_penalty: req.repetition_penalty,
            stop: req.stop,
            stop_token_ids: req.stop_token_ids,
            seed: req.seed,
            logprobs: top_logprobs.is_some(),
            top_logprobs,
            thinking_budget: None,
            ignore_eos: req.ignore_eos,
            skip_special_tokens: req.skip_special_tokens,
            logit_bias: req.logit_bias,
        },
        limits,
    )
    .map_err(|mut e| {
        // The completions API names it `logprobs`.
        if e.param.as_deref() == Some("top_logprobs") {
            e.param = Some("logprobs".into());
            e.message = e.message.replace("top_logprobs", "logprobs");
        }
        e
    })?;
    let stream = req.stream.unwrap_or(false);
    let best_of = match req.best_of {
        None => params.n,
        Some(b) if b < params.n as u64 => {
            return Err(ApiError::invalid(
                "best_of",
                format!("`best_of` must be at least `n` ({}), got {b}", params.n),
            ));
        }
        Some(b) if stream && b > params.n as u64 => {
            return Err(unsupported(
                "best_of",
                "with `stream` (the best candidates are known only at the end)",
            ));
        }
        Some(b) => usize::try_from(b).unwrap_or(usize::MAX),
    };
    let (param, per_prompt) = if best_of > params.n {
        ("best_of", best_of)
    } else {
        ("n", params.n)
    };
    if prompts.len().saturating_mul(per_prompt) > limits.n_max {
        return Err(ApiError::invalid(
            param,
            format!(
                "prompts × {param} must be at most {}, got {} × {per_prompt}",
                limits.n_max,
                prompts.len(),
            ),
        ));
    }
    Ok(ValidatedCompletion {
        model: req.model,
        prompts,
        params,
        stream,
        include_usage: stream
            && req
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        echo,
        best_of,
    })
}

// SGLang /generate

#[derive(Debug, Clone)]
pub struct ValidatedGenerate {
    pub prompt: Prompt,
    pub params: GenParams,
    /// `regex`, `ebnf` or `json_schema`.
    pub grammar: Option<crate::grammar::RequestGrammar>,
    pub stream: bool,
    pub return_logprob: bool,
}

pub fn validate_generate(
    req: GenerateRequest,
    limits: &RequestLimits,
) -> Result<ValidatedGenerate, ApiError> {
    let prompt = match (req.text, req.input_ids) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "text",
                "give either `text` or `input_ids`, not both",
            ));
        }
        (Some(t), None) => Prompt::Text(t),
        (None, Some(ids)) if ids.is_empty() => {
            return Err(ApiError::invalid(
                "input_ids",
                "`input_ids` must not be empty",
            ));
        }
        (None, Some(ids)) => {
            check_token_ids("input_ids", &ids, limits.vocab_size)?;
            Prompt::Ids(ids)
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "text",
                "`text` or `input_ids` is required",
            ));
        }
    };
    let sp = req.sampling_params.unwrap_or_default();
    if sp.n.is_some_and(|n| n > 1) {
        // SGLang answers a list for n > 1; one request is one sequence here.
        return Err(unsupported(
            "sampling_params.n",
            "one sequence per /generate request; send several requests",
        ));
    }
    let params = validate_sampling(
        SamplingInput {
            max_tokens: sp
                .max_new_tokens
                .map(|v| (v, "sampling_params.max_new_tokens")),
            n: sp.n,
            temperature: sp.temperature,
            top_p: sp.top_p,
            top_k: sp.top_k,
            min_p: sp.min_p,
            presence_penalty: sp.presence_penalty,
            frequency_penalty: sp.frequency_penalty,
            repetition_penalty: sp.repetition_penalty,
            stop: sp.stop,
            stop_token_ids: sp.stop_token_ids,
            seed: None,
            logprobs: req.return_logprob.unwrap_or(false),
            top_logprobs: None,
            thinking_budget: None,
            ignore_eos: sp.ignore_eos,
            skip_special_tokens: sp.skip_special_tokens,
            logit_bias: None,
        },
        limits,
    )
    .map_err(|mut e| {
        // Name the field where the client wrote it.
        if let Some(p) = e
            .param
            .as_mut()
            .filter(|p| !p.starts_with("sampling_params"))
        {
            *p = format!("sampling_params.{p}");
        }
        e
    })?;
    let grammar = crate::grammar::sampling_constraint(sp.regex, sp.ebnf, sp.json_schema)?;
    Ok(ValidatedGenerate {
        prompt,
        grammar,
        params,
        stream: req.stream.unwrap_or(false),
        return_logprob: req.return_logprob.unwrap_or(false),
    })
}

// vLLM /tokenize and /detokenize

#[derive(Debug, Clone, PartialEq)]
pub enum TokenizeInput {
    Prompt {
        text: String,
        add_special_tokens: bool,
    },
    /// `messages` in template shape (see [`template_messages`]).
    Chat {
        messages: Value,
        add_generation_prompt: bool,
        add_special_tokens: bool,
    },
}

/// vLLM's defaults: a prompt gets special tokens (BOS) added, a rendered chat does not (the
/// template writes BOS itself).
pub fn validate_tokenize(req: TokenizeRequest) -> Result<TokenizeInput, ApiError> {
    match (req.prompt, req.messages) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "prompt",
            "give either `prompt` or `messages`, not both",
        )),
        (Some(text), None) => Ok(TokenizeInput::Prompt {
            text,
            add_special_tokens: req.add_special_tokens.unwrap_or(true),
        }),
        (None, Some(m)) if m.is_empty() => Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        )),
        (None, Some(m)) => Ok(TokenizeInput::Chat {
            messages: template_messages(m)?,
            add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
            add_special_tokens: req.add_special_tokens.unwrap_or(false),
        }),
        (None, None) => Err(ApiError::invalid(
            "prompt",
            "`prompt` or `messages` is required",
        )),
    }
}

pub fn validate_detokenize(
    req: &DetokenizeRequest,
    limits: &RequestLimits,
) -> Result<(), ApiError> {
    check_token_ids("tokens", &req.tokens, limits.vocab_size)
}
