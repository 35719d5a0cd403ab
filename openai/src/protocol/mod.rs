//! Wire types of the OpenAI-compatible API (plus SGLang's `/generate` and vLLM's `/tokenize` and
//! `/detokenize`), and their validation into [`GenParams`], the one normalised form the workers see.
//!
//! Parsing rules: unknown fields are ignored (clients send vendor extensions freely), but a known
//! field with the wrong type is an error that names the field (`messages[2].content`), so a client
//! learns what to fix from the message alone. Ranges follow OpenAI's documented ones; where OpenAI has
//! none, the bound is a named constant with its reason.
//!
//! The module is split by what a piece is: [`requests`] the wire types clients send,
//! [`validation`] the checks and defaults that turn them into [`GenParams`], [`responses`] the wire
//! types the server answers with. Everything is re-exported here, so `protocol::X` names any of them.

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub mod requests;
pub mod responses;
pub mod validation;

pub use requests::*;
pub use responses::*;
pub use validation::*;

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

    /// 405: the path exists, the method does not.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self {
            status: 405,
            message: format!("Method {method} is not allowed on {path}."),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed".into()),
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
        // Malformed JSON is the body's fault wherever the parser stopped; serde's message says
        // what it found and where (line and column).
        let syntax = matches!(
            inner.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        if syntax || path == "." || path.is_empty() {
            ApiError::invalid("body", format!("Invalid JSON body: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("body", format!("Invalid JSON body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests;
