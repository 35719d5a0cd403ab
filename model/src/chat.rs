//! Chat templates from `tokenizer_config.json`, rendered with minijinja the way HF
//! transformers' `apply_chat_template` renders them with jinja2:
//! `trim_blocks` and `lstrip_blocks` on, Python string methods (`strip`, `split`, `startswith`
//! via minijinja-contrib's pycompat), `raise_exception`, `strftime_now`, and a `tojson` that
//! prints like Python's `json.dumps(..., ensure_ascii=False)` (`", "` and `": "` separators, no
//! HTML escaping — minijinja's own `tojson` escapes `<`, which would change the prompt).
//!
//! Inputs are the OpenAI-style message list as JSON. An assistant message whose `content` is
//! `null` next to `tool_calls` — what OpenAI clients send — reaches the template as `none`,
//! which is the case DeepSeek's templates test for.

use minijinja::value::Kwargs;
use minijinja::{Environment, Error as MjError, ErrorKind, Value};
use serde_json::Value as Json;

use crate::Error;

const TEMPLATE_NAME: &str = "chat";

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

/// Python's `json.dumps` with `ensure_ascii=False` and optional `indent`.
pub fn python_json(v: &Json, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_py(v, indent, 0, &mut out);
    out
}

fn write_py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_py(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let (item_sep, newline) = match indent {
        Some(_) => (",", true),
        None => (", ", false),
    };
    let pad = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&n.to_string()),
        Json::String(s) => write_py_str(s, out),
        Json::Array(a) if a.is_empty() => out.push_str("[]"),
        Json::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                if newline {
                    pad(out, depth + 1);
                }
                write_py(x, indent, depth + 1, out);
            }
            if newline {
                pad(out, depth);
            }
            out.push(']');
        }
        Json::Object(m) if m.is_empty() => out.push_str("{}"),
        Json::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                if newline {
                    pad(out, depth + 1);
                }
                write_py_str(k, out);
                out.push_str(": ");
                write_py(x, indent, depth + 1, out);
            }
            if newline {
                pad(out, depth);
            }
            out.push('}');
        }
    }
}

fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, MjError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&v)
        .map_err(|e| MjError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from(python_json(&j, indent)))
}

/// A special token from `tokenizer_config.json`: a string or `{"content": ...}`.
pub fn special_token(cfg: &Json, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// From a parsed `tokenizer_config.json`; `None` when it has no `chat_template`.
    pub fn from_tokenizer_config(cfg: &Json) -> Result<Option<Self>, Error> {
        let source = match cfg.get("chat_template") {
            Some(Json::String(s)) => s.clone(),
            // The list form: [{"name": "default", "template": ...}, ...].
            Some(Json::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .or(list.first());
                match pick.and_then(|t| t.get("template")).and_then(Json::as_str) {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(Error::Template("chat_template list has no template".into()));
                    }
                }
            }
            _ => return Ok(None),
        };
        Self::new(
            source,
            special_token(cfg, "bos_token").unwrap_or_default(),
            special_token(cfg, "eos_token").unwrap_or_default(),
        )
        .map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, Error> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |m: String| -> Result<Value, MjError> {
            Err(MjError::new(ErrorKind::InvalidOperation, m))
        });
        env.add_function("strftime_now", |_fmt: String| -> Result<Value, MjError> {
            // Templates use this for "today's date" in system prompts; a server renders the
            // date the request arrives, but DeepSeek's templates do not call it.
            Err(MjError::new(
                ErrorKind::InvalidOperation,
                "strftime_now is not supported",
            ))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| Error::Template(format!("cannot parse chat template: {e}")))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders a conversation. `messages` is a JSON array of `{role, content, ...}`.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        self.render_with(
            messages,
            tools,
            add_generation_prompt,
            &serde_json::Map::new(),
        )
    }

    /// [`ChatTemplate::render`] with extra template variables (the API's `chat_template_kwargs`,
    /// e.g. `{"thinking": true}` for templates that switch reasoning on). They cannot override
    /// the standard variables.
    pub fn render_with(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Json>,
    ) -> Result<String, Error> {
        if !messages.is_array() {
            return Err(Error::Template("messages must be an array".into()));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            ..Value::from(minijinja::value::Serde(kwargs))
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(d) = e.detail() {
                msg = format!("{msg} ({d})");
            }
            Error::Template(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_json_matches_json_dumps() {
        let v = json!({"name": "get_weather", "parameters": {"type": "object", "required": ["city"], "n": 1.5, "ok": true, "x": null}, "s": "a\"b\n✓<>"});
        assert_eq!(
            python_json(&v, None),
            r#"{"name": "get_weather", "parameters": {"type": "object", "required": ["city"], "n": 1.5, "ok": true, "x": null}, "s": "a\"b\n✓<>"}"#
        );
        assert_eq!(
            python_json(&json!({"a": [1, 2]}), Some(2)),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}"
        );
    }

    #[test]
    fn kwargs_reach_the_template_but_not_over_standard_variables() {
        let t = ChatTemplate::new(
            "{% if thinking %}<think>{% endif %}{{ bos_token }}".into(),
            "<s>".into(),
            String::new(),
        )
        .unwrap();
        let kw = json!({"thinking": true, "bos_token": "X"});
        let kw = kw.as_object().unwrap();
        assert_eq!(
            t.render_with(&json!([]), None, false, kw).unwrap(),
            "<think><s>"
        );
        assert_eq!(t.render(&json!([]), None, false).unwrap(), "<s>");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let e = t.render(&json!([]), None, false).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }
}
