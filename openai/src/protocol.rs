//! Wire types of the OpenAI-compatible API (plus SGLang's `/generate` and vLLM's `/tokenize` and
//! `/detokenize`), and their validation into [`GenParams`], the one normalised form the workers see.
//!
//! Parsing rules: unknown fields are ignored (clients send vendor extensions freely), but a known
//! field with the wrong type is an error that names the field (`messages[2].content`), so a client
//! learns what to fix from the message alone. Ranges follow OpenAI's documented ones; where OpenAI has
//! none, the bound is a named constant with its reason.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error answer: HTTP status plus OpenAI's error object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: "invalid_request_error", "not_found_error", ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    /// 400 about one parameter.
    pub fn invalid(param: impl Into<String>, msg: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: msg.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn not_found_model(name: &str) -> Self {
        Self {
            status: 404,
            message: format!("The model `{name}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        }
    }

    pub fn too_large(limit_bytes: usize) -> Self {
        Self {
            status: 413,
            message: format!("Request body is larger than {limit_bytes} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large".into()),
        }
    }

    pub fn overloaded() -> Self {
        Self {
            status: 429,
            message: "The server is overloaded; retry later.".into(),
            kind: "server_overloaded",
            param: None,
            code: Some("rate_limit_exceeded".into()),
        }
    }

    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self {
            status: 503,
            message: msg.into(),
            kind: "service_unavailable",
            param: None,
            code: None,
        }
    }

    /// OpenAI's wording, so clients that parse it (LangChain's retry-with-shorter-prompt) work.
    pub fn context_length(prompt_tokens: usize, max_model_len: usize) -> Self {
        Self {
            status: 400,
            message: format!(
                "This model's maximum context length is {max_model_len} tokens. However, your \
                 messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
            ),
            kind: "invalid_request_error",
            param: Some("messages".into()),
            code: Some("context_length_exceeded".into()),
        }
    }

    /// A request that can never fit the context: the prompt alone (OpenAI's wording), or the
    /// prompt with the `max_tokens` asked for (vLLM's).
    pub fn context_exceeded(e: duet_core::pd::ContextExceeded) -> Self {
        if e.prompt >= e.max_model_len {
            return Self::context_length(e.prompt, e.max_model_len);
        }
        Self {
            status: 400,
            message: e.to_string(),
            kind: "invalid_request_error",
            param: Some("max_tokens".into()),
            code: Some("context_length_exceeded".into()),
        }
    }

    /// `{"error": {"message", "type", "param", "code"}}`; `param` and `code` are null when unset.
    pub fn to_json(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// Parses a request body. Errors name the field (`temperature`, `messages[0].role`) when serde
/// can tell; "." means the body as a whole (not JSON, or not an object).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every request body is an object. Checked first because serde's derived structs also accept
    // arrays (fields by position), which would give confusing errors.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid(
            "body",
            "The request body must be a JSON object.",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::invalid("body", format!("Invalid JSON body: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("body", format!("Invalid JSON body: {e}")))?;
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Requests: shared pieces
// ---------------------------------------------------------------------------------------------

/// `stop`: a string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStrings(pub Vec<String>);

impl<'de> Deserialize<'de> for StopStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopStrings;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StopStrings, E> {
                Ok(StopStrings(vec![s.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StopStrings, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(StopStrings(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A seed as OpenAI clients send it: any JSON integer (some send negative ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub u64);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seed;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seed, E> {
                Ok(Seed(v))
            }
            // Negative seeds keep their bits: still deterministic, still distinct.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seed, E> {
                Ok(Seed(v as u64))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

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
    })
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

// ---------------------------------------------------------------------------------------------
// Chat completions
// ---------------------------------------------------------------------------------------------

/// `content`: a string, or an array of parts of which only `{"type": "text", "text": ...}` is
/// supported (DeepSeek-V3/R1 read text only).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    /// A JSON-encoded string per OpenAI; some clients send the object itself.
    pub arguments: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

/// `tool_choice`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CustomParams {
    pub thinking_budget: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// PaddleNLP's form: `{"model": "default", "text": "..."}` is one user message.
    pub text: Option<String>,
    pub n: Option<u64>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
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
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoiceIn>,
    pub separate_reasoning: Option<bool>,
    pub thinking_budget: Option<u64>,
    /// The SGLang guide's form of the budget: `custom_params: {"thinking_budget": 512}` next to a
    /// `custom_logit_processor` (which is ignored: the budget is built in).
    pub custom_params: Option<CustomParams>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
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
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

pub fn validate_chat(
    req: ChatCompletionRequest,
    limits: &RequestLimits,
) -> Result<ValidatedChat, ApiError> {
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
            thinking_budget: req
                .thinking_budget
                .or(req.custom_params.and_then(|c| c.thinking_budget)),
            ignore_eos: req.ignore_eos,
            skip_special_tokens: req.skip_special_tokens,
        },
        limits,
    )?;
    let stream = req.stream.unwrap_or(false);
    Ok(ValidatedChat {
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

// ---------------------------------------------------------------------------------------------
// Completions
// ---------------------------------------------------------------------------------------------

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// One prompt, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptIn>,
    pub n: Option<u64>,
    pub max_tokens: Option<u64>,
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
    /// The completions API's form: how many top alternatives to return per token.
    pub logprobs: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct ValidatedCompletion {
    pub model: Option<String>,
    /// One choice group per prompt, `params.n` choices each.
    pub prompts: Vec<Prompt>,
    pub params: GenParams,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn validate_completion(
    req: CompletionRequest,
    limits: &RequestLimits,
) -> Result<ValidatedCompletion, ApiError> {
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
    if prompts.len().saturating_mul(params.n) > limits.n_max {
        return Err(ApiError::invalid(
            "n",
            format!(
                "prompts × n must be at most {}, got {} × {}",
                limits.n_max,
                prompts.len(),
                params.n
            ),
        ));
    }
    let stream = req.stream.unwrap_or(false);
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
    })
}

// ---------------------------------------------------------------------------------------------
// SGLang /generate
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SglSamplingParams {
    pub max_new_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub stop: Option<StopStrings>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub n: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerateRequest {
    pub text: Option<String>,
    pub input_ids: Option<Vec<u32>>,
    pub sampling_params: Option<SglSamplingParams>,
    pub stream: Option<bool>,
    pub return_logprob: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct ValidatedGenerate {
    pub prompt: Prompt,
    pub params: GenParams,
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
    Ok(ValidatedGenerate {
        prompt,
        params,
        stream: req.stream.unwrap_or(false),
        return_logprob: req.return_logprob.unwrap_or(false),
    })
}

// ---------------------------------------------------------------------------------------------
// vLLM /tokenize and /detokenize
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub add_generation_prompt: Option<bool>,
    pub add_special_tokens: Option<bool>,
}

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

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

pub fn validate_detokenize(
    req: &DetokenizeRequest,
    limits: &RequestLimits,
) -> Result<(), ApiError> {
    check_token_ids("tokens", &req.tokens, limits.vocab_size)
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    pub fn new(
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: Option<usize>,
    ) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: cached_tokens
                .map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        }
    }
}

/// JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
pub const LOGPROB_FLOOR: f32 = -9999.0;

fn ser_logprob<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f32(if v.is_finite() { *v } else { LOGPROB_FLOOR })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    #[serde(serialize_with = "ser_logprob")]
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    #[serde(serialize_with = "ser_logprob")]
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat format: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// One token's alternatives, serialised as a JSON object `{token: logprob}` in the given order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopLogprobMap(pub Vec<(String, f32)>);

impl Serialize for TopLogprobMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, &if v.is_finite() { *v } else { LOGPROB_FLOOR })?;
        }
        m.end()
    }
}

/// Completions format: parallel arrays.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<TopLogprobMap>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionOut {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

impl ToolCallOut {
    pub fn function(id: String, name: String, arguments: String) -> Self {
        Self {
            id,
            kind: "function",
            function: FunctionOut { name, arguments },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatResponseMessage {
    pub role: &'static str,
    /// Null (not absent) when the answer is only tool calls, as OpenAI sends it.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// SGLang's extension: the stop string or token id that ended the choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_stop: Option<MatchedStop>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

impl ChatCompletion {
    pub fn new(
        id: String,
        created: u64,
        model: String,
        choices: Vec<ChatChoice>,
        usage: Usage,
    ) -> Self {
        Self {
            id,
            object: "chat.completion",
            created,
            model,
            choices,
            usage,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// A streamed tool call fragment: the first carries id, type and name with empty arguments, the
/// following ones carry argument text only (the SGLang guide's and OpenAI's streams).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

impl ToolCallDelta {
    pub fn start(index: usize, id: String, name: String) -> Self {
        Self {
            index,
            id: Some(id),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some(name),
                arguments: String::new(),
            },
        }
    }

    pub fn args(index: usize, delta: String) -> Self {
        Self {
            index,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: delta,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_stop: Option<MatchedStop>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Absent unless `stream_options.include_usage`; then null on every chunk but the last
    /// (which has no choices), as OpenAI streams it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl ChatCompletionChunk {
    pub fn new(id: String, created: u64, model: String, choices: Vec<ChunkChoice>) -> Self {
        Self {
            id,
            object: "chat.completion.chunk",
            created,
            model,
            choices,
            usage: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_stop: Option<MatchedStop>,
}

/// A completion, or (with `usage` absent or null) one streamed chunk of one: OpenAI uses the same
/// object for both.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl Completion {
    pub fn new(id: String, created: u64, model: String, choices: Vec<CompletionChoice>) -> Self {
        Self {
            id,
            object: "text_completion",
            created,
            model,
            choices,
            usage: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    /// vLLM's extension: the context window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

impl ModelList {
    pub fn new(data: Vec<ModelCard>) -> Self {
        Self {
            object: "list",
            data,
        }
    }
}

/// What ended a sequence: a stop string or a stop token id (EOS included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum MatchedStop {
    Text(String),
    Token(u32),
}

/// SGLang's `meta_info.finish_reason`: `{"type": "stop", "matched": 1}` or `{"type": "length"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerateFinish {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<MatchedStop>,
}

impl GenerateFinish {
    pub fn stop(matched: Option<MatchedStop>) -> Self {
        Self {
            kind: "stop",
            matched,
        }
    }
    pub fn length() -> Self {
        Self {
            kind: "length",
            matched: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateMetaInfo {
    pub id: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    /// Null while streaming, until the last chunk.
    pub finish_reason: Option<GenerateFinish>,
    /// `[[logprob, token_id, null], ...]` as SGLang returns with `return_logprob`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_token_logprobs: Option<Vec<(f32, u32, Option<String>)>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateResponse {
    pub text: String,
    pub output_ids: Vec<u32>,
    pub meta_info: GenerateMetaInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
    pub count: usize,
    pub max_model_len: usize,
}

impl TokenizeResponse {
    pub fn new(tokens: Vec<u32>, max_model_len: usize) -> Self {
        Self {
            count: tokens.len(),
            tokens,
            max_model_len,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: RequestLimits = RequestLimits {
        default_max_tokens: 1000,
        n_max: 8,
        vocab_size: 129_280,
    };

    fn chat(body: &str) -> Result<ValidatedChat, ApiError> {
        validate_chat(parse_json(body.as_bytes())?, &LIMITS)
    }

    fn err_param(r: Result<impl fmt::Debug, ApiError>) -> String {
        r.unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn the_guides_tool_request_parses() {
        let body = r#"{"temperature": 0, "max_tokens": 100, "model": "deepseek-ai/DeepSeek-V3-0324", "tools": [{"type": "function", "function": {"name": "query_weather", "description": "Get weather of an city, the user should supply a city first", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Beijing"}}, "required": ["city"]}}}], "messages": [{"role": "user", "content": "Hows the weather like in Qingdao today"}]}"#;
        let c = chat(body).unwrap();
        assert_eq!(c.params.temperature, 0.0);
        assert_eq!(c.params.max_tokens, 100);
        assert_eq!(c.tool_choice, ToolChoice::Auto);
        assert_eq!(c.tools.unwrap()[0].function.name, "query_weather");
        assert_eq!(
            c.messages,
            json!([{"role": "user", "content": "Hows the weather like in Qingdao today"}])
        );
        assert!(c.separate_reasoning);
        assert!(!c.stream);
    }

    #[test]
    fn defaults() {
        let c = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "extra": {"x": 1}}"#)
            .unwrap();
        let p = c.params;
        assert_eq!(
            (p.max_tokens, p.n, p.temperature, p.top_p, p.top_k),
            (1000, 1, 1.0, 1.0, 0)
        );
        assert_eq!((p.repetition_penalty, p.min_p, p.seed), (1.0, 0.0, None));
        assert!(p.skip_special_tokens && !p.ignore_eos && !p.logprobs);
    }

    #[test]
    fn paddlenlp_text_form() {
        let c = chat(r#"{"model": "default", "text": "Hello, how are you?"}"#).unwrap();
        assert_eq!(
            c.messages,
            json!([{"role": "user", "content": "Hello, how are you?"}])
        );
        assert_eq!(err_param(chat(r#"{"model": "default"}"#)), "messages");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("temperature"), "{}", e.message);
        assert_eq!(
            err_param(chat(r#"{"messages": [{"role": 3}]}"#)),
            "messages[0].role"
        );
        assert_eq!(err_param(chat(r#"{"messages": [], "stop": 5}"#)), "stop");
        assert_eq!(err_param(chat(r#"{"messages": "hi"}"#)), "messages");
        assert_eq!(err_param(chat("[1, 2]")), "body");
        assert_eq!(err_param(chat("{\"messages\": [] } x")), "body");
        assert_eq!(err_param(chat("not json")), "body");
    }

    #[test]
    fn message_validation() {
        let e = chat(
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}"#,
        );
        assert_eq!(err_param(e), "messages[1].role");
        assert_eq!(err_param(chat(r#"{"messages": []}"#)), "messages");
        let e = chat(
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#,
        );
        assert_eq!(err_param(e), "messages[0].content[0].type");
    }

    #[test]
    fn messages_take_the_templates_shape() {
        let c = chat(
            r#"{"messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                {"role": "tool", "tool_call_id": "call_0", "content": "42"},
                {"role": "assistant", "content": null}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            c.messages,
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "ab"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "call_0"},
                {"role": "assistant", "content": ""}
            ])
        );
    }

    #[test]
    fn ranges_name_the_parameter() {
        let base = r#"{"messages": [{"role": "user", "content": "hi"}]"#;
        for (extra, param) in [
            (r#""temperature": 2.5"#, "temperature"),
            (r#""temperature": -0.1"#, "temperature"),
            (r#""top_p": 0"#, "top_p"),
            (r#""top_p": 1.5"#, "top_p"),
            (r#""top_k": -2"#, "top_k"),
            (r#""min_p": 1.5"#, "min_p"),
            (r#""presence_penalty": 2.1"#, "presence_penalty"),
            (r#""frequency_penalty": -3"#, "frequency_penalty"),
            (r#""repetition_penalty": 0"#, "repetition_penalty"),
            (r#""max_tokens": 0"#, "max_tokens"),
            (r#""max_completion_tokens": 0"#, "max_completion_tokens"),
            (r#""max_tokens": -5"#, "max_tokens"),
            (r#""n": 0"#, "n"),
            (r#""n": 9"#, "n"),
            (r#""top_logprobs": 3"#, "top_logprobs"),
            (r#""logprobs": true, "top_logprobs": 21"#, "top_logprobs"),
            (r#""stop": ["a", "b", "c", "d", "e"]"#, "stop"),
            (r#""stop_token_ids": [200000]"#, "stop_token_ids[0]"),
            (r#""tool_choice": "sometimes""#, "tool_choice"),
            (r#""tool_choice": "required""#, "tool_choice"),
            (
                r#""tool_choice": {"type": "function", "function": {"name": "nope"}}"#,
                "tool_choice.function.name",
            ),
        ] {
            let body = format!("{base}, {extra}}}");
            assert_eq!(err_param(chat(&body)), param, "{extra}");
        }
        let long = "x".repeat(STOP_BYTES_MAX + 1);
        assert_eq!(
            err_param(chat(&format!(r#"{base}, "stop": "{long}"}}"#))),
            "stop"
        );
    }

    #[test]
    fn accepted_edges() {
        let c = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "top_k": -1, "temperature": 0,
                "stop": "x", "seed": -1, "logprobs": true, "top_logprobs": 20, "max_tokens": 5,
                "max_completion_tokens": 7, "stream": true, "stream_options": {"include_usage": true},
                "separate_reasoning": false, "thinking_budget": 512, "chat_template_kwargs": {"thinking": true}}"#,
        )
        .unwrap();
        let p = &c.params;
        assert_eq!((p.top_k, p.max_tokens, p.top_logprobs), (0, 7, 20));
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.thinking_budget, Some(512));
        assert!(c.stream && c.include_usage && !c.separate_reasoning);
        assert_eq!(c.chat_template_kwargs["thinking"], json!(true));
        let c = chat(
            r#"{"messages": [{"role": "user", "content": "Question: Is Paris the Capital of France?"}],
                "max_tokens": 1024, "custom_logit_processor": "...", "custom_params": {"thinking_budget": 512}}"#,
        )
        .unwrap();
        assert_eq!(c.params.thinking_budget, Some(512));
    }

    #[test]
    fn tool_choice_none_drops_tools() {
        let c = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "none",
                "tools": [{"type": "function", "function": {"name": "f"}}]}"#,
        )
        .unwrap();
        assert!(c.tools.is_none());
        let c = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "function", "function": {"name": "f"}},
                "tools": [{"type": "function", "function": {"name": "f"}}]}"#,
        )
        .unwrap();
        assert_eq!(c.tool_choice, ToolChoice::Function("f".into()));
    }

    #[test]
    fn completions() {
        let v = |b: &str| validate_completion(parse_json(b.as_bytes())?, &LIMITS);
        let c = v(r#"{"prompt": "hi", "logprobs": 2, "max_tokens": 3}"#).unwrap();
        assert_eq!(c.prompts, vec![Prompt::Text("hi".into())]);
        assert!(c.params.logprobs);
        assert_eq!(c.params.top_logprobs, 2);
        let c = v(r#"{"prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(c.prompts, vec![Prompt::Ids(vec![1, 2, 3])]);
        let c = v(r#"{"prompt": ["a", "b"], "n": 2}"#).unwrap();
        assert_eq!(c.prompts.len(), 2);
        let c = v(r#"{"prompt": [[1], [2, 3]]}"#).unwrap();
        assert_eq!(c.prompts[1], Prompt::Ids(vec![2, 3]));
        assert_eq!(err_param(v(r#"{"prompt": ["a", "b"], "n": 5}"#)), "n");
        assert_eq!(
            err_param(v(r#"{"prompt": "a", "logprobs": 21}"#)),
            "logprobs"
        );
        assert_eq!(
            err_param(v(r#"{"prompt": "a", "logprobs": true}"#)),
            "logprobs"
        );
        assert_eq!(err_param(v(r#"{"prompt": [1, 999999]}"#)), "prompt[0][1]");
        assert_eq!(err_param(v(r#"{"prompt": []}"#)), "prompt");
        assert_eq!(err_param(v(r#"{}"#)), "prompt");
    }

    #[test]
    fn sglang_generate() {
        let v = |b: &str| validate_generate(parse_json(b.as_bytes())?, &LIMITS);
        let g = v(r#"{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 16, "temperature": 0, "stop": ["\n"]}, "return_logprob": true}"#).unwrap();
        assert_eq!(g.prompt, Prompt::Text("The capital of France is".into()));
        assert_eq!((g.params.max_tokens, g.params.temperature), (16, 0.0));
        assert!(g.return_logprob && g.params.logprobs);
        let g = v(r#"{"input_ids": [0, 5, 6]}"#).unwrap();
        assert_eq!(g.prompt, Prompt::Ids(vec![0, 5, 6]));
        assert_eq!(
            err_param(v(r#"{"text": "a", "sampling_params": {"top_p": 2}}"#)),
            "sampling_params.top_p"
        );
        assert_eq!(
            err_param(v(
                r#"{"text": "a", "sampling_params": {"max_new_tokens": 0}}"#
            )),
            "sampling_params.max_new_tokens"
        );
        assert_eq!(
            err_param(v(r#"{"text": "a", "sampling_params": {"n": "2"}}"#)),
            "sampling_params.n"
        );
        assert_eq!(err_param(v(r#"{}"#)), "text");
    }

    #[test]
    fn tokenize_and_detokenize() {
        let t = |b: &str| validate_tokenize(parse_json(b.as_bytes())?);
        assert_eq!(
            t(r#"{"prompt": "hi"}"#).unwrap(),
            TokenizeInput::Prompt {
                text: "hi".into(),
                add_special_tokens: true
            }
        );
        assert_eq!(
            t(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap(),
            TokenizeInput::Chat {
                messages: json!([{"role": "user", "content": "hi"}]),
                add_generation_prompt: true,
                add_special_tokens: false
            }
        );
        assert_eq!(err_param(t(r#"{}"#)), "prompt");
        let d: DetokenizeRequest = parse_json(br#"{"tokens": [1, 2]}"#).unwrap();
        assert!(validate_detokenize(&d, &LIMITS).is_ok());
        assert_eq!(
            err_param(parse_json::<DetokenizeRequest>(br#"{"tokens": ["a"]}"#)),
            "tokens[0]"
        );
    }

    #[test]
    fn error_shapes() {
        let e = ApiError::invalid("temperature", "bad");
        assert_eq!(
            e.to_json(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
        let e = ApiError::not_found_model("x");
        assert_eq!(
            (e.status, e.code.as_deref()),
            (404, Some("model_not_found"))
        );
        let e = ApiError::context_length(5000, 4096);
        assert_eq!(
            (e.status, e.code.as_deref()),
            (400, Some("context_length_exceeded"))
        );
        assert!(e.message.contains("4096") && e.message.contains("5000"));
        assert_eq!(ApiError::too_large(10).status, 413);
        assert_eq!(ApiError::overloaded().status, 429);
        assert_eq!(ApiError::unavailable("down").status, 503);
    }

    #[test]
    fn response_shapes() {
        let msg = ChatCompletion::new(
            "id1".into(),
            1,
            "m".into(),
            vec![ChatChoice {
                index: 0,
                message: ChatResponseMessage {
                    role: "assistant",
                    content: None,
                    reasoning_content: None,
                    tool_calls: Some(vec![ToolCallOut::function(
                        "0".into(),
                        "query_weather".into(),
                        "{\"city\": \"Qingdao\"}".into(),
                    )]),
                },
                logprobs: None,
                finish_reason: Some(FinishReason::ToolCalls),
                matched_stop: None,
            }],
            Usage::new(116, 22, None),
        );
        assert_eq!(
            serde_json::to_value(&msg).unwrap(),
            json!({"id": "id1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                    "tool_calls": [{"id": "0", "type": "function", "function": {"name": "query_weather", "arguments": "{\"city\": \"Qingdao\"}"}}]},
                    "logprobs": null, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 116, "completion_tokens": 22, "total_tokens": 138}})
        );
        let mut chunk = ChatCompletionChunk::new(
            "id1".into(),
            1,
            "m".into(),
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    tool_calls: Some(vec![ToolCallDelta::args(0, "{\"".into())]),
                    ..Delta::default()
                },
                logprobs: None,
                finish_reason: None,
                matched_stop: None,
            }],
        );
        chunk.usage = Some(None);
        assert_eq!(
            serde_json::to_value(&chunk).unwrap()["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\""}}]})
        );
        assert_eq!(serde_json::to_value(&chunk).unwrap()["usage"], Value::Null);
        assert_eq!(
            serde_json::to_value(ToolCallDelta::start(0, "call_0".into(), "f".into())).unwrap(),
            json!({"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": ""}})
        );
        let lp = ChatLogprobs {
            content: vec![ChatTokenLogprob {
                token: "a".into(),
                logprob: f32::NEG_INFINITY,
                bytes: Some(vec![97]),
                top_logprobs: vec![TopLogprob {
                    token: "a".into(),
                    logprob: -0.5,
                    bytes: Some(vec![97]),
                }],
            }],
        };
        assert_eq!(
            serde_json::to_value(&lp).unwrap(),
            json!({"content": [{"token": "a", "logprob": -9999.0, "bytes": [97],
                "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}]})
        );
        let clp = CompletionLogprobs {
            tokens: vec!["a".into()],
            token_logprobs: vec![-0.5],
            top_logprobs: vec![TopLogprobMap(vec![("a".into(), -0.5), ("b".into(), -1.0)])],
            text_offset: vec![0],
        };
        assert_eq!(
            serde_json::to_string(&clp).unwrap(),
            r#"{"tokens":["a"],"token_logprobs":[-0.5],"top_logprobs":[{"a":-0.5,"b":-1.0}],"text_offset":[0]}"#
        );
        let g = GenerateResponse {
            text: "Paris".into(),
            output_ids: vec![5, 1],
            meta_info: GenerateMetaInfo {
                id: "r".into(),
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 0,
                finish_reason: Some(GenerateFinish::stop(Some(MatchedStop::Token(1)))),
                output_token_logprobs: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&g).unwrap()["meta_info"]["finish_reason"],
            json!({"type": "stop", "matched": 1})
        );
        assert_eq!(
            serde_json::to_value(GenerateFinish::length()).unwrap(),
            json!({"type": "length"})
        );
        assert_eq!(
            serde_json::to_value(TokenizeResponse::new(vec![1, 2], 4096)).unwrap(),
            json!({"tokens": [1, 2], "count": 2, "max_model_len": 4096})
        );
        assert_eq!(
            serde_json::to_value(Usage::new(10, 5, Some(4))).unwrap(),
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}})
        );
        assert_eq!(
            serde_json::to_value(ModelList::new(vec![ModelCard {
                id: "m".into(),
                object: "model",
                created: 0,
                owned_by: "duet".into(),
                max_model_len: None
            }]))
            .unwrap(),
            json!({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "duet"}]})
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            (-10.0f64..10.0).prop_map(|f| json!(f)),
            "[a-z_]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("messages".to_string()),
                            Just("role".to_string()),
                            Just("content".to_string()),
                            Just("stop".to_string()),
                            Just("tools".to_string()),
                            Just("tool_choice".to_string()),
                            Just("prompt".to_string()),
                            Just("n".to_string()),
                            Just("temperature".to_string()),
                            Just("text".to_string()),
                            Just("tool_calls".to_string()),
                            Just("function".to_string()),
                            "[a-z]{1,4}"
                        ],
                        inner
                    ),
                    0..5
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_json::<ChatCompletionRequest>(&body);
            let _ = parse_json::<CompletionRequest>(&body);
            let _ = parse_json::<GenerateRequest>(&body);
        }

        #[test]
        fn arbitrary_json_never_panics(v in json_value()) {
            let body = serde_json::to_vec(&v).unwrap();
            if let Ok(r) = parse_json::<ChatCompletionRequest>(&body)
                && let Ok(c) = validate_chat(r, &LIMITS)
            {
                prop_assert!(c.params.n >= 1 && c.params.n <= LIMITS.n_max);
                prop_assert!(c.messages.as_array().is_some_and(|m| !m.is_empty()));
            }
            if let Ok(r) = parse_json::<CompletionRequest>(&body) {
                let _ = validate_completion(r, &LIMITS);
            }
            if let Ok(r) = parse_json::<GenerateRequest>(&body) {
                let _ = validate_generate(r, &LIMITS);
            }
            if let Ok(r) = parse_json::<TokenizeRequest>(&body) {
                let _ = validate_tokenize(r);
            }
            // Errors always render.
            if let Err(e) = parse_json::<ChatCompletionRequest>(&body) {
                prop_assert!(e.to_json()["error"]["message"].is_string());
            }
        }
    }
}
