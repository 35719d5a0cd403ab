//! Constrained decoding through `duet serve` on the tiny model (random weights, which never
//! produce JSON or a tool call on their own): `response_format`, forced tool calls, SGLang's
//! `regex`/`ebnf`/`json_schema` on `/generate`, grammar errors named by field, and the tool-aware
//! chat template chosen when the checkpoint's template ignores tools.

mod common;

use common::{Server, post, stream};
use serde_json::{Value, json};

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 120,
        "temperature": 0,
        // The tiny model's template (R1's) opens `<think>`; the grammar applies after
        // `</think>`, which this closes in the prompt.
        "chat_template_kwargs": {"thinking": false},
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
         "parameters": {"type": "object", "properties": {
             "city": {"type": "string", "maxLength": 12},
             "unit": {"enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
         "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
          "required": ["zone"], "additionalProperties": false}}}
    ])
}

/// The arguments hold to `get_weather`'s schema.
fn assert_weather_args(args: &str) {
    let a: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let o = a.as_object().unwrap();
    assert_eq!(o.len(), 2, "{a}");
    assert!(
        a["city"].as_str().is_some_and(|c| c.chars().count() <= 12),
        "{a}"
    );
    assert!(
        ["celsius", "fahrenheit"].contains(&a["unit"].as_str().unwrap()),
        "{a}"
    );
}

#[tokio::test]
async fn forced_tool_calls_hold_to_the_declared_function_and_schema() {
    let srv = Server::start(&[]);
    let url = srv.url("/v1/chat/completions");
    // A named function: exactly that call, arguments valid against its schema.
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (st, v) = post(
        &url,
        &chat(
            json!({"tools": weather_tools(), "tool_choice": named, "parallel_tool_calls": false}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_weather_args(calls[0]["function"]["arguments"].as_str().unwrap());

    // "required": some declared function, each call valid against its own schema.
    let (st, v) = post(
        &url,
        &chat(json!({"tools": weather_tools(), "tool_choice": "required", "max_tokens": 200})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty(), "{v}");
    for c in calls {
        let args: Value =
            serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
        match c["function"]["name"].as_str().unwrap() {
            "get_weather" => assert_weather_args(&args.to_string()),
            "get_time" => assert!(["utc", "cet"].contains(&args["zone"].as_str().unwrap())),
            other => panic!("undeclared function {other}"),
        }
    }

    // Streamed: the name first, then argument fragments that add up to valid arguments.
    let events = stream(
        &url,
        &chat(
            json!({"tools": weather_tools(), "tool_choice": named, "stream": true,
                     "parallel_tool_calls": false}),
        ),
    )
    .await;
    let mut name = String::new();
    let mut args = String::new();
    for e in &events {
        for d in e["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            name.push_str(d["function"]["name"].as_str().unwrap_or(""));
            args.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(name, "get_weather");
    assert_weather_args(&args);
}

#[tokio::test]
async fn response_format_yields_json_that_validates() {
    let srv = Server::start(&[]);
    let url = srv.url("/v1/chat/completions");
    let schema = json!({"type": "object", "properties": {
        "answer": {"type": "string", "maxLength": 20},
        "sure": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["answer", "sure", "score"], "additionalProperties": false});
    for seed in 0..3 {
        let (st, v) = post(
            &url,
            &chat(json!({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "reply", "schema": schema, "strict": true}},
                         "temperature": 1.0, "seed": seed})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        let a: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
        assert!(a["answer"].as_str().unwrap().chars().count() <= 20, "{a}");
        assert!(a["sure"].is_boolean(), "{a}");
        assert!((0..=9).contains(&a["score"].as_i64().unwrap()), "{a}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    // JSON mode: any object. Its strings are unbounded and random weights would fill them to
    // max_tokens; favouring `"` and `}` lets the grammar close the object within a few tokens
    // (without the grammar those two would just repeat).
    let mut bias = serde_json::Map::new();
    for ch in ["\"", "}"] {
        let (_, t) = post(
            &srv.url("/tokenize"),
            &json!({"prompt": ch, "add_special_tokens": false}),
        )
        .await;
        bias.insert(t["tokens"][0].to_string(), json!(30));
    }
    let (st, v) = post(
        &url,
        &chat(json!({"response_format": {"type": "json_object"}, "logit_bias": bias, "max_tokens": 60})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(content).unwrap().is_object(),
        "{content}"
    );
    // With reasoning on, the reasoning is free and the answer after `</think>` is the JSON.
    let mut body = chat(json!({"response_format": {"type": "json_schema",
                               "json_schema": {"name": "reply", "schema": schema}},
                               "thinking_budget": 4}));
    body.as_object_mut().unwrap().remove("chat_template_kwargs");
    let (st, v) = post(&url, &body).await;
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let a: Value = serde_json::from_str(content.trim()).unwrap_or_else(|e| panic!("{v}: {e}"));
    assert!(a["sure"].is_boolean(), "{a}");
}

#[tokio::test]
async fn generate_takes_regex_ebnf_and_json_schema() {
    let srv = Server::start(&[]);
    let url = srv.url("/generate");
    let body = |sp: Value| json!({"text": "The answer is", "sampling_params": sp});
    let (st, v) = post(
        &url,
        &body(json!({"regex": "(yes|no), [0-9]{2}", "max_new_tokens": 30})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let text = v["text"].as_str().unwrap();
    let (word, num) = text.split_once(", ").unwrap_or_else(|| panic!("{text:?}"));
    assert!(word == "yes" || word == "no", "{text:?}");
    assert!(
        num.len() == 2 && num.chars().all(|c| c.is_ascii_digit()),
        "{text:?}"
    );

    let ebnf = "root ::= greet \" \" name\ngreet ::= \"hi\" | \"yo\"\nname ::= [a-c] [a-c] [a-c]";
    let (st, v) = post(&url, &body(json!({"ebnf": ebnf, "max_new_tokens": 30}))).await;
    assert_eq!(st, 200, "{v}");
    let text = v["text"].as_str().unwrap();
    let (g, n) = text.split_once(' ').unwrap_or_else(|| panic!("{text:?}"));
    assert!(g == "hi" || g == "yo", "{text:?}");
    assert!(
        n.len() == 3 && n.chars().all(|c| ('a'..='c').contains(&c)),
        "{text:?}"
    );

    let schema = r#"{"type":"object","properties":{"n":{"enum":[1,2,3]}},"required":["n"],"additionalProperties":false}"#;
    let (st, v) = post(
        &url,
        &body(json!({"json_schema": schema, "max_new_tokens": 30})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let a: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
    assert!([1, 2, 3].contains(&a["n"].as_i64().unwrap()), "{a}");
}

#[tokio::test]
async fn bad_grammars_are_400s_naming_the_field() {
    let srv = Server::start(&[]);
    let chat_url = srv.url("/v1/chat/completions");
    let gen_url = srv.url("/generate");
    let cases = [
        (
            &gen_url,
            json!({"text": "x", "sampling_params": {"regex": "(unclosed"}}),
            "sampling_params.regex",
        ),
        (
            &gen_url,
            json!({"text": "x", "sampling_params": {"ebnf": "root ::= [a-z]{2,3}"}}),
            "sampling_params.ebnf",
        ),
        (
            &gen_url,
            json!({"text": "x", "sampling_params": {"regex": "a", "json_schema": "{}"}}),
            "sampling_params",
        ),
        (
            &gen_url,
            json!({"text": "x", "sampling_params": {"regex": "a".repeat(70_000)}}),
            "sampling_params.regex",
        ),
        (
            &chat_url,
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})),
            "response_format.json_schema.schema",
        ),
        (
            &chat_url,
            chat(json!({"response_format": {"type": "json_schema",
                         "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})),
            "response_format.json_schema.schema",
        ),
        (
            &chat_url,
            chat(json!({"tools": weather_tools(), "tool_choice": "required",
                        "response_format": {"type": "json_object"}})),
            "response_format",
        ),
    ];
    for (url, body, param) in cases {
        let (st, v) = post(url, &body).await;
        assert_eq!(st, 400, "{param}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[tokio::test]
async fn tools_reach_the_prompt_through_the_tool_template() {
    // The tiny model's template (R1's) ignores `tools`; duet's R1 tool template renders them.
    let srv = Server::start(&[]);
    let url = srv.url("/v1/chat/completions");
    let prompt_tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    let base = chat(json!({"max_tokens": 1}));
    let (_, plain) = post(&url, &base).await;
    let (_, with) = post(
        &url,
        &chat(json!({"max_tokens": 1, "tools": weather_tools()})),
    )
    .await;
    assert!(
        prompt_tokens(&with) > prompt_tokens(&plain) + 30,
        "{plain} {with}"
    );

    // `--chat-template` replaces the checkpoint's template for every request.
    let dir = common::tmp("chat-template");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if tools %}TOOLS {{ tools | length }}\n{% endif %}[assistant] ",
    )
    .unwrap();
    let srv2 = Server::start(&["--chat-template", file.to_str().unwrap()]);
    let tok = srv2.url("/tokenize");
    let (st, v) = post(
        &tok,
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (_, d) = post(&srv2.url("/detokenize"), &json!({"tokens": v["tokens"]})).await;
    assert_eq!(d["prompt"], "[user] hi\n[assistant] ", "{d}");
}

#[tokio::test]
async fn auto_calls_the_model_starts_are_well_formed() {
    let srv = Server::start(&[]);
    let url = srv.url("/v1/chat/completions");
    // Favouring the calls marker makes the model start a call (random weights never would); under
    // `auto` the grammar then holds the call to a declared function and its schema (without it,
    // the marker would just repeat).
    let (_, t) = post(
        &srv.url("/tokenize"),
        &json!({"prompt": "<｜tool▁calls▁begin｜>", "add_special_tokens": false}),
    )
    .await;
    let marker = t["tokens"][0].to_string();
    let (st, v) = post(
        &url,
        &chat(
            json!({"tools": weather_tools(), "tool_choice": "auto", "max_tokens": 200,
                     "logit_bias": {marker.as_str(): 30}, "parallel_tool_calls": false}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    let c = &calls[0]["function"];
    let args: Value = serde_json::from_str(c["arguments"].as_str().unwrap()).unwrap();
    match c["name"].as_str().unwrap() {
        "get_weather" => assert_weather_args(&args.to_string()),
        "get_time" => assert!(["utc", "cet"].contains(&args["zone"].as_str().unwrap())),
        other => panic!("undeclared function {other}"),
    }
    // Without the push the model writes text, which may not smuggle in a marker.
    let (st, v) = post(
        &url,
        &chat(json!({"tools": weather_tools(), "max_tokens": 40})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(!content.contains('｜'), "{v}");
}
