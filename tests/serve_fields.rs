//! Every request field OpenAI documents for chat and text completions, against `duet serve` on
//! the tiny model: each one is implemented (its effect is observed here) or refused with a 400
//! that names it — none is accepted and ignored. A few are informational (`user`, `metadata`, ...):
//! their documented meaning asks nothing of the answer, and this test checks they change nothing.

mod common;

use std::collections::BTreeSet;

use common::{Server, post, stream};
use serde_json::{Value, json};

/// OpenAI's chat completion request fields (API reference, create chat completion).
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "model",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

/// OpenAI's (legacy) completion request fields.
const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
];

fn merged(base: &Value, extra: Value) -> Value {
    let mut v = base.clone();
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

/// Reasoning and content of the first choice, in order.
fn chat_text(v: &Value) -> String {
    let m = &v["choices"][0]["message"];
    format!(
        "{}{}",
        m["reasoning_content"].as_str().unwrap_or(""),
        m["content"].as_str().unwrap_or("")
    )
}

struct Check {
    url: String,
    base: Value,
    observed: BTreeSet<&'static str>,
    rejected: BTreeSet<&'static str>,
}

impl Check {
    async fn ok(&self, extra: Value) -> Value {
        let (status, v) = post(&self.url, &merged(&self.base, extra.clone())).await;
        assert_eq!(status, 200, "{extra}: {v}");
        v
    }

    /// The field (with `value`) is refused with a 400 whose `param` names it.
    async fn rejects(&mut self, field: &'static str, value: Value) {
        self.rejects_with(field, json!({ field: value })).await;
    }

    /// `extra` is refused with a 400 whose `param` names `field`.
    async fn rejects_with(&mut self, field: &'static str, extra: Value) {
        let (status, e) = post(&self.url, &merged(&self.base, extra.clone())).await;
        assert_eq!(status, 400, "{field}: {extra} was accepted: {e}");
        let param = e["error"]["param"].as_str().unwrap_or("");
        assert!(
            param.starts_with(field),
            "{field}: the error names {param:?}: {e}"
        );
        self.rejected.insert(field);
    }

    fn saw(&mut self, field: &'static str) {
        self.observed.insert(field);
    }

    fn assert_every_field(&self, fields: &[&str]) {
        for f in fields {
            assert!(
                self.observed.contains(f) || self.rejected.contains(f),
                "{f} is neither observed to work nor refused"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chat_field_works_or_is_refused_by_name() {
    let srv = Server::start(&[]);
    let mut c = Check {
        url: srv.url("/v1/chat/completions"),
        base: json!({"messages": [{"role": "user", "content": "Tell me a story."}],
                     "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        observed: BTreeSet::new(),
        rejected: BTreeSet::new(),
    };
    let base = c.ok(json!({})).await;
    let greedy = chat_text(&base);
    let prompt_tokens = base["usage"]["prompt_tokens"].as_u64().unwrap();

    // Informational: accepted, and the answer is exactly the one without them.
    for (field, value) in [
        ("user", json!("user-1234")),
        ("metadata", json!({"team": "a"})),
        ("safety_identifier", json!("hash-1")),
        ("prompt_cache_key", json!("k")),
        ("store", json!(false)),
        ("service_tier", json!("auto")),
        ("modalities", json!(["text"])),
        ("parallel_tool_calls", json!(true)),
        // Without forced tool calls there is nothing for it to limit (forced: serve_grammar.rs).
        ("parallel_tool_calls", json!(false)),
        ("response_format", json!({"type": "text"})),
    ] {
        let v = c.ok(json!({ field: value })).await;
        assert_eq!(chat_text(&v), greedy, "{field} changed the answer");
        c.saw(field);
    }
    // Refused by name.
    for (field, value) in [
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("functions", json!([{"name": "f", "parameters": {}}])),
        ("function_call", json!("auto")),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("web_search_options", json!({})),
        ("verbosity", json!("low")),
        ("store", json!(true)),
        ("service_tier", json!("flex")),
        ("modalities", json!(["text", "audio"])),
        ("response_format", json!({"type": "json_schema"})),
        ("response_format", json!({"type": "yaml"})),
        ("reasoning_effort", json!("extreme")),
        ("logit_bias", json!({"5": 101})),
        ("logit_bias", json!({"99999999": 1})),
    ] {
        c.rejects(field, value).await;
    }

    // JSON output (the grammar starts after `</think>`, so thinking is off here; the schemas'
    // own checks are in serve_grammar.rs).
    for format in [
        json!({"type": "json_object"}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ] {
        let v = c
            .ok(json!({"response_format": format, "ignore_eos": false,
                       "chat_template_kwargs": {"thinking": false}}))
            .await;
        assert!(chat_text(&v).starts_with('{'), "{v}");
    }
    c.saw("response_format");

    // messages and model.
    let v = c
        .ok(json!({"messages": [{"role": "user", "content": "Tell me a much longer story."}]}))
        .await;
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > prompt_tokens);
    c.saw("messages");
    let (status, _) = post(&c.url, &merged(&c.base, json!({"model": "nope"}))).await;
    assert_eq!(status, 404);
    c.ok(json!({"model": "default"})).await;
    c.saw("model");
    // Lengths and choices.
    let v = c.ok(json!({"max_tokens": 2})).await;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    c.saw("max_tokens");
    let v = c.ok(json!({"max_completion_tokens": 3})).await;
    assert_eq!(v["usage"]["completion_tokens"], 3);
    c.saw("max_completion_tokens");
    let v = c.ok(json!({"n": 2})).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    c.saw("n");
    // Sampling: temperature 1 with a seed is reproducible and (on near-flat logits) not greedy;
    // top_p that keeps one token is greedy again.
    let hot = |seed: u64| json!({"temperature": 1.0, "seed": seed, "max_tokens": 12});
    let a = chat_text(&c.ok(hot(7)).await);
    assert_eq!(a, chat_text(&c.ok(hot(7)).await));
    assert_ne!(a, chat_text(&c.ok(hot(8)).await));
    c.saw("seed");
    let greedy12 = chat_text(&c.ok(json!({"max_tokens": 12})).await);
    assert_ne!(a, greedy12);
    c.saw("temperature");
    let v = c
        .ok(json!({"temperature": 1.0, "seed": 7, "max_tokens": 12, "top_p": 1e-6}))
        .await;
    assert_eq!(chat_text(&v), greedy12);
    c.saw("top_p");
    // Penalties: rewarding what was generated changes the greedy path.
    for field in ["frequency_penalty", "presence_penalty"] {
        let v = c.ok(json!({ field: -2.0, "max_tokens": 24 })).await;
        let plain = c.ok(json!({"max_tokens": 24})).await;
        assert_ne!(chat_text(&v), chat_text(&plain), "{field}");
    }
    c.saw("frequency_penalty");
    c.saw("presence_penalty");
    // Stop: cut at the greedy text's second character.
    let stop: String = greedy.chars().skip(1).take(1).collect();
    let v = c.ok(json!({ "stop": [stop.clone()] })).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(!chat_text(&v).contains(&stop), "{v}");
    c.saw("stop");
    // Log-probabilities.
    let v = c.ok(json!({"logprobs": true, "top_logprobs": 2})).await;
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), 6);
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    c.saw("logprobs");
    c.saw("top_logprobs");
    // logit_bias: -100 takes the greedy token out; +100 makes one token the only choice, on the
    // prefill worker (first token) and after the handoff on the decode worker (the rest).
    let tokens = |v: &Value| -> Vec<String> {
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, first) = post(
        &srv.url("/tokenize"),
        &json!({"prompt": lp[0]["token"], "add_special_tokens": false}),
    )
    .await;
    let first_id = first["tokens"][0].as_u64().unwrap();
    let v = c
        .ok(json!({"logprobs": true, "logit_bias": {first_id.to_string(): -100}}))
        .await;
    assert_ne!(tokens(&v)[0], lp[0]["token"].as_str().unwrap());
    let (_, forced) = post(&srv.url("/detokenize"), &json!({"tokens": [1000]})).await;
    let v = c
        .ok(json!({"logprobs": true, "logit_bias": {"1000": 100}}))
        .await;
    assert_eq!(
        tokens(&v),
        vec![forced["prompt"].as_str().unwrap().to_string(); 6],
        "{v}"
    );
    c.saw("logit_bias");
    // Streaming and its usage chunk.
    let events = stream(
        &c.url,
        &merged(
            &c.base,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    let streamed: String = events
        .iter()
        .filter_map(|e| {
            let d = &e["choices"].get(0)?["delta"];
            Some(format!(
                "{}{}",
                d["reasoning_content"].as_str().unwrap_or(""),
                d["content"].as_str().unwrap_or("")
            ))
        })
        .collect();
    assert_eq!(streamed, greedy);
    assert_eq!(events.last().unwrap()["usage"], base["usage"]);
    c.saw("stream");
    c.saw("stream_options");
    // Reasoning: the tiny model's R1 template opens `<think>`; `reasoning_effort: "none"` is a
    // budget of 0, so `</think>` comes first and nothing is reasoning.
    assert!(
        !base["choices"][0]["message"]["reasoning_content"]
            .as_str()
            .unwrap_or("")
            .is_empty()
    );
    let v = c.ok(json!({"reasoning_effort": "none"})).await;
    let m = &v["choices"][0]["message"];
    assert!(
        m["reasoning_content"]
            .as_str()
            .unwrap_or("")
            .trim()
            .is_empty(),
        "{v}"
    );
    let v = c.ok(json!({"reasoning_effort": "high"})).await;
    assert_eq!(chat_text(&v), greedy);
    c.saw("reasoning_effort");
    // chat_template_kwargs (vLLM's and SGLang's, not OpenAI's) reach the template; thinking off
    // closes the block R1's template opens, so the prompt grows and nothing is reasoning.
    for kw in [
        json!({"thinking": false}),
        json!({"enable_thinking": false}),
    ] {
        let v = c.ok(json!({ "chat_template_kwargs": kw })).await;
        assert!(
            v["usage"]["prompt_tokens"].as_u64().unwrap() > prompt_tokens,
            "{v}"
        );
        assert!(
            v["choices"][0]["message"]
                .get("reasoning_content")
                .is_none(),
            "{v}"
        );
    }
    let v = c
        .ok(json!({"chat_template_kwargs": {"thinking": true}}))
        .await;
    assert_eq!(chat_text(&v), greedy);
    // Tools reach the template and the tool-call parser (exercised with calls in serve_echo.rs and
    // the openai client tests); here, what validation holds them to.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    c.ok(json!({"tools": tools.clone(), "tool_choice": "auto"}))
        .await;
    c.ok(json!({"tools": tools.clone(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .await;
    c.rejects(
        "tool_choice",
        json!({"type": "function", "function": {"name": "nope"}}),
    )
    .await;
    c.rejects("tools", json!([{"type": "retrieval"}])).await;
    c.saw("tools");
    c.saw("tool_choice");

    c.assert_every_field(CHAT_FIELDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_completion_field_works_or_is_refused_by_name() {
    let srv = Server::start(&[]);
    let mut c = Check {
        url: srv.url("/v1/completions"),
        base: json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        observed: BTreeSet::new(),
        rejected: BTreeSet::new(),
    };
    let text = |v: &Value, i: usize| v["choices"][i]["text"].as_str().unwrap().to_string();
    let base = c.ok(json!({})).await;
    let greedy = text(&base, 0);

    let v = c.ok(json!({"user": "user-1234"})).await;
    assert_eq!(text(&v, 0), greedy);
    c.saw("user");
    c.rejects("suffix", json!(" and they lived happily.")).await;
    c.rejects_with("echo", json!({"echo": true, "logprobs": 1}))
        .await;
    c.rejects("best_of", json!(0)).await;
    c.rejects("logit_bias", json!({"-1": 5})).await;

    let v = c.ok(json!({"prompt": "A different prompt"})).await;
    assert_ne!(v["usage"]["prompt_tokens"], base["usage"]["prompt_tokens"]);
    c.saw("prompt");
    let (status, _) = post(&c.url, &merged(&c.base, json!({"model": "nope"}))).await;
    assert_eq!(status, 404);
    c.saw("model");
    let v = c.ok(json!({"max_tokens": 2})).await;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    c.saw("max_tokens");
    let v = c.ok(json!({"n": 3})).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    c.saw("n");
    let hot = |seed: u64| json!({"temperature": 1.0, "seed": seed, "max_tokens": 12});
    let a = text(&c.ok(hot(7)).await, 0);
    assert_eq!(a, text(&c.ok(hot(7)).await, 0));
    assert_ne!(a, text(&c.ok(hot(8)).await, 0));
    c.saw("seed");
    let greedy12 = text(&c.ok(json!({"max_tokens": 12})).await, 0);
    assert_ne!(a, greedy12);
    c.saw("temperature");
    let v = c
        .ok(json!({"temperature": 1.0, "seed": 7, "max_tokens": 12, "top_p": 1e-6}))
        .await;
    assert_eq!(text(&v, 0), greedy12);
    c.saw("top_p");
    // Penalties, on the prompt serve_api.rs measured them with ("a a a a" as ids, no BOS).
    let (_, ids) = post(
        &srv.url("/tokenize"),
        &json!({"prompt": "a a a a", "add_special_tokens": false}),
    )
    .await;
    let penalised = json!({"prompt": ids["tokens"], "max_tokens": 24});
    let plain = text(&c.ok(penalised.clone()).await, 0);
    for field in ["frequency_penalty", "presence_penalty"] {
        let v = c.ok(merged(&penalised, json!({ field: -2.0 }))).await;
        assert_ne!(text(&v, 0), plain, "{field}");
        c.saw(field);
    }
    let stop: String = greedy.chars().skip(1).take(1).collect();
    let v = c.ok(json!({ "stop": stop.clone() })).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    c.saw("stop");
    let v = c.ok(json!({"logprobs": 2})).await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    c.saw("logprobs");
    let (_, forced) = post(&srv.url("/detokenize"), &json!({"tokens": [1000]})).await;
    let v = c.ok(json!({"logit_bias": {"1000": 100}})).await;
    assert_eq!(text(&v, 0), forced["prompt"].as_str().unwrap().repeat(6));
    c.saw("logit_bias");
    // echo: the prompt before the completion, whole and streamed (its first chunk).
    let v = c.ok(json!({"echo": true})).await;
    assert_eq!(text(&v, 0), format!("Once upon a time{greedy}"));
    let events = stream(
        &c.url,
        &merged(&c.base, json!({"echo": true, "stream": true})),
    )
    .await;
    assert_eq!(events[0]["choices"][0]["text"], "Once upon a time");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["text"].as_str())
        .collect();
    assert_eq!(streamed, format!("Once upon a time{greedy}"));
    c.saw("echo");
    c.saw("stream");
    let events = stream(
        &c.url,
        &merged(
            &c.base,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(events.last().unwrap()["usage"], base["usage"]);
    c.saw("stream_options");
    // best_of: 4 candidates generated (all counted), the 2 most likely returned, best first.
    let v = c
        .ok(json!({"temperature": 1.0, "best_of": 4, "n": 2, "logprobs": 0}))
        .await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(v["usage"]["completion_tokens"], 4 * 6);
    let score = |c: &Value| -> f64 {
        c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum()
    };
    assert!(score(&choices[0]) >= score(&choices[1]), "{v}");
    let (status, e) = post(
        &c.url,
        &merged(&c.base, json!({"best_of": 2, "stream": true})),
    )
    .await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("best_of"))
    );
    c.saw("best_of");

    c.assert_every_field(COMPLETION_FIELDS);
}
