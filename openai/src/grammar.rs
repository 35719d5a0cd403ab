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

/// The grammar of a forced tool call: one call (`parallel` false) or one or more, to the
/// function named `only` or to any of `tools`, each call's arguments valid against its function's
/// `parameters` (any JSON object where it has none).
pub fn tool_calls(
    tools: &[Tool],
    only: Option<&str>,
    parallel: bool,
) -> Result<RequestGrammar, ApiError> {
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
    let mut g = format!(
        "start: {} {calls} {}\ncall: {}\n",
        lit(CALLS_BEGIN),
        lit(CALLS_END),
        alts.join(" | ")
    );
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
