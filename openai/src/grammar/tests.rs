use super::*;
use crate::protocol::FunctionDef;
use duet_model::grammar::GrammarCompiler;
use duet_model::tokenizer::TextTokenizer;

fn r1() -> (TextTokenizer, GrammarCompiler) {
    let (json, cfg) = duet_model::tiny::r1_tokenizer_files().unwrap();
    let cfg: Value = serde_json::from_str(cfg).unwrap();
    let tok = TextTokenizer::from_bytes(&json, &cfg, "r1".as_ref()).unwrap();
    let eos = tok.token_to_id("<｜end▁of▁sentence｜>").unwrap();
    (tok, GrammarCompiler::new(json.into(), vec![eos]))
}

fn tool(name: &str, parameters: Value) -> Tool {
    Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: name.into(),
            description: None,
            parameters: Some(parameters),
            strict: None,
        },
    }
}

/// Whether `text` is a complete sentence of `g`.
fn accepts(g: &RequestGrammar, text: &str) -> bool {
    let (tok, c) = r1();
    let mut m = c.compile(&g.spec).unwrap();
    let ids = tok.encode(text, false).unwrap();
    m.advance(&ids).is_ok() && m.is_accepting()
}

fn call(name: &str, args: &str) -> String {
    format!("{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}")
}

#[test]
fn a_forced_call_must_name_a_declared_function_with_valid_arguments() {
    let city = json!({"type": "object", "properties": {"city": {"type": "string"}},
        "required": ["city"], "additionalProperties": false});
    let tools = [
        tool("weather", city),
        tool("time", json!({"type": "object"})),
    ];
    let any = tool_calls(&tools, CallMode::Required, false).unwrap();
    let ok = format!(
        "{CALLS_BEGIN}{}{CALLS_END}",
        call("weather", r#"{"city":"Oslo"}"#)
    );
    assert!(accepts(&any, &ok));
    let time = format!("{CALLS_BEGIN}{}{CALLS_END}", call("time", "{}"));
    assert!(accepts(&any, &time));
    // Unknown function, missing required property, extra property, two calls without parallel.
    for bad in [
        format!("{CALLS_BEGIN}{}{CALLS_END}", call("nope", "{}")),
        format!("{CALLS_BEGIN}{}{CALLS_END}", call("weather", "{}")),
        format!(
            "{CALLS_BEGIN}{}{CALLS_END}",
            call("weather", r#"{"city":"a","x":1}"#)
        ),
        format!(
            "{CALLS_BEGIN}{}\n{}{CALLS_END}",
            call("time", "{}"),
            call("time", "{}")
        ),
    ] {
        assert!(!accepts(&any, &bad), "{bad}");
    }
    // A named choice allows only that function; parallel allows several calls.
    let named = tool_calls(&tools, CallMode::Named("time"), true).unwrap();
    assert!(!accepts(&named, &ok));
    let two = format!(
        "{CALLS_BEGIN}{}\n{}{CALLS_END}",
        call("time", "{}"),
        call("time", "{}")
    );
    assert!(accepts(&named, &two));
}

#[test]
fn generate_constraints_are_exclusive_and_named() {
    let e = sampling_constraint(Some("a".into()), Some("root ::= \"a\"".into()), None).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("sampling_params"));
    let e = sampling_constraint(None, None, Some(Value::String("{oops".into()))).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("sampling_params.json_schema"));
    let g = sampling_constraint(
        None,
        None,
        Some(Value::String(r#"{"type":"integer"}"#.into())),
    )
    .unwrap()
    .unwrap();
    assert!(accepts(&g, "42"));
    assert!(!accepts(&g, "\"42\""));
    let g = sampling_constraint(None, Some("root ::= \"x\" [0-9]".into()), None)
        .unwrap()
        .unwrap();
    assert!(accepts(&g, "x7") && !accepts(&g, "y7"));
}

#[test]
fn auto_allows_text_or_text_then_valid_calls() {
    let tools = [tool(
        "time",
        json!({"type": "object", "properties": {"zone": {"enum": ["utc"]}},
        "required": ["zone"], "additionalProperties": false}),
    )];
    let auto = tool_calls(&tools, CallMode::Auto, true).unwrap();
    let call = call("time", r#"{"zone":"utc"}"#);
    assert!(accepts(&auto, "Just text, a < b."));
    assert!(accepts(&auto, ""));
    assert!(accepts(
        &auto,
        &format!("Let me see.{CALLS_BEGIN}{call}{CALLS_END}")
    ));
    assert!(accepts(
        &auto,
        &format!("{CALLS_BEGIN}{call}\n{call}{CALLS_END}")
    ));
    // A call the model starts must be well formed.
    assert!(!accepts(
        &auto,
        &format!("x{CALLS_BEGIN}{}{CALLS_END}", call_to("nope"))
    ));
    assert!(!accepts(
        &auto,
        &format!("x{CALLS_BEGIN}{}{CALLS_END}", call_bad_args())
    ));
}

fn call_to(name: &str) -> String {
    call(name, "{}")
}

fn call_bad_args() -> String {
    call("time", r#"{"zone":"cet"}"#)
}
