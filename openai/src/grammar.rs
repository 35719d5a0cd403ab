//! The grammars requests ask for, as [`GrammarSpec`]s for the grammar engine
//! (`duet_model::grammar`): `response_format` (JSON mode and JSON schema), SGLang's `regex`,
//! `ebnf` and `json_schema` sampling parameters, and forced tool calls (`tool_choice`
//! `"required"` or a named function), whose grammar is DeepSeek's tool-call syntax (see
//! [`crate::tools`]) with each function's `parameters` schema in the arguments' place.

use duet_model::grammar::{GrammarKind, GrammarSpec, compact_json, gbnf_to_lark};
use serde_json::{Value, json};

use crate::protocol::{ApiError, Tool};
use crate::tools::{CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP};

/// A grammar and the request field it came from (named in a 400 when it does not compile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestGrammar {
    pub spec: GrammarSpec,
    pub param: &'static str,
}

fn spec(kind: GrammarKind, source: String) -> GrammarSpec {
    GrammarSpec {
        kind,
        source,
        starts_after: None,
    }
}

/// A JSON schema as a grammar (compact output, see [`compact_json`]).
pub fn json_schema(schema: &Value, param: &'static str) -> Result<RequestGrammar, ApiError> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(ApiError::invalid(param, "a JSON schema is an object"));
    }
    Ok(RequestGrammar {
        spec: spec(GrammarKind::JsonSchema, schema.to_string()),
        param,
    })
}

/// `response_format: {"type": "json_object"}`: any JSON object.
pub fn json_object() -> RequestGrammar {
    RequestGrammar {
        spec: spec(
            GrammarKind::JsonSchema,
            json!({"type": "object"}).to_string(),
        ),
        param: "response_format",
    }
}

/// SGLang's `/generate` constraints: at most one of `regex`, `ebnf` (GBNF, translated to Lark)
/// and `json_schema` (a schema object, or its JSON text as SGLang's clients send it).
pub fn sampling_constraint(
    regex: Option<String>,
    ebnf: Option<String>,
    json_schema_in: Option<Value>,
) -> Result<Option<RequestGrammar>, ApiError> {
    let given = [regex.is_some(), ebnf.is_some(), json_schema_in.is_some()];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(ApiError::invalid(
            "sampling_params",
            "give at most one of `regex`, `ebnf` and `json_schema`",
        ));
    }
    if let Some(rx) = regex {
        return Ok(Some(RequestGrammar {
            spec: spec(GrammarKind::Regex, rx),
            param: "sampling_params.regex",
        }));
    }
    if let Some(g) = ebnf {
        let lark = gbnf_to_lark(&g)
            .map_err(|e| ApiError::invalid("sampling_params.ebnf", e.to_string()))?;
        return Ok(Some(RequestGrammar {
            spec: spec(GrammarKind::Lark, lark),
            param: "sampling_params.ebnf",
        }));
    }
    let Some(schema) = json_schema_in else {
        return Ok(None);
    };
    let param = "sampling_params.json_schema";
    let schema = match schema {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| ApiError::invalid(param, format!("not a JSON schema: {e}")))?,
        v => v,
    };
    json_schema(&schema, param).map(Some)
}

/// How a request's tool calls are held to its tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallMode<'a> {
    /// `tool_choice: "auto"`: text, or text followed by calls — the model chooses, and a call it
    /// starts must be well formed. The text may not contain `｜` (U+FF5C, which only DeepSeek's
    /// markers use), so a marker cannot hide inside it.
    Auto,
    /// `"required"`: calls only, each to any of the tools.
    Required,
    /// A named function: calls only, each to that function.
    Named(&'a str),
}

/// The grammar of a request's tool calls (see [`CallMode`]): one call (`parallel` false) or one
/// or more, each to a declared function with arguments valid against its `parameters` (any JSON
/// object where it has none).
pub fn tool_calls(
    tools: &[Tool],
    mode: CallMode<'_>,
    parallel: bool,
) -> Result<RequestGrammar, ApiError> {
    let only = match mode {
        CallMode::Named(name) => Some(name),
        CallMode::Auto | CallMode::Required => None,
    };
    let lit = |s: &str| Value::String(s.to_string()).to_string();
    let mut rules = Vec::new();
    let mut alts = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        if only.is_some_and(|n| n != t.function.name) {
            continue;
        }
        let schema = t
            .function
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object"}));
        if !schema.is_object() {
            return Err(ApiError::invalid(
                format!("tools[{i}].function.parameters"),
                "must be a JSON schema object",
            ));
        }
        let head = format!("{CALL_BEGIN}function{SEP}{}\n```json\n", t.function.name);
        rules.push(format!(
            "f{i}: {} a{i} {}",
            lit(&head),
            lit(&format!("\n```{CALL_END}"))
        ));
        rules.push(format!("a{i}: %json {}", compact_json(schema)));
        alts.push(format!("f{i}"));
    }
    if alts.is_empty() {
        return Err(ApiError::invalid(
            "tool_choice.function.name",
            "no tool of that name in `tools`",
        ));
    }
    let calls = if parallel {
        format!("call ({} call)*", lit("\n"))
    } else {
        "call".to_string()
    };
    // The calls block after its opening marker.
    let rest = format!(
        "calls: {calls} {}\ncall: {}\n",
        lit(CALLS_END),
        alts.join(" | ")
    );
    let mut g = match mode {
        // A lazy rule ends at its suffix: the text before the marker, which `TEXT` (greedy)
        // could not give back once it had taken the marker's `<`.
        CallMode::Auto => format!(
            "start: TEXT | pre calls\nTEXT: /[^｜]*/\npre[suffix={}]: /[^｜]*/\n{rest}",
            lit(CALLS_BEGIN)
        ),
        CallMode::Required | CallMode::Named(_) => {
            format!("start: {} calls\n{rest}", lit(CALLS_BEGIN))
        }
    };
    for r in rules {
        g.push_str(&r);
        g.push('\n');
    }
    Ok(RequestGrammar {
        spec: spec(GrammarKind::Lark, g),
        param: "tools",
    })
}

#[cfg(test)]
mod tests;
