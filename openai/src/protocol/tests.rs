use std::fmt;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

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
    let c =
        chat(r#"{"messages": [{"role": "user", "content": "hi"}], "extra": {"x": 1}}"#).unwrap();
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
    // A syntax error inside `messages` is the body's, and says where it is.
    let e = chat("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"},]}").unwrap_err();
    assert_eq!(e.param.as_deref(), Some("body"));
    assert!(e.message.contains("line 1 column"), "{}", e.message);
    let e = chat("{\"messages\": [{\"role\": \"user\"").unwrap_err();
    assert_eq!(e.param.as_deref(), Some("body"));
    assert!(e.message.contains("EOF"), "{}", e.message);
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
fn logit_bias_effort_and_unsupported_fields() {
    let base = r#"{"messages": [{"role": "user", "content": "hi"}]"#;
    let c = chat(&format!(
        r#"{base}, "logit_bias": {{"7": -100, "3": 2.5, "007": 1}}}}"#
    ))
    .unwrap();
    assert_eq!(c.params.logit_bias, vec![(3, 2.5), (7, 1.0)]);
    for (extra, param) in [
        (r#""logit_bias": {"x": 1}"#, "logit_bias.x"),
        (r#""logit_bias": {"1": 100.5}"#, "logit_bias.1"),
        (r#""logit_bias": {"1": "a"}"#, "logit_bias.1"),
        (r#""logit_bias": {"129280": 1}"#, "logit_bias.129280"),
        (r#""reasoning_effort": "max""#, "reasoning_effort"),
        (
            r#""response_format": {"type": "json_schema"}"#,
            "response_format.json_schema",
        ),
        (
            r#""response_format": {"type": "yaml"}"#,
            "response_format.type",
        ),
        (r#""functions": []"#, "functions"),
        (r#""store": true"#, "store"),
        (r#""service_tier": "priority""#, "service_tier"),
        (r#""modalities": ["audio"]"#, "modalities"),
    ] {
        assert_eq!(
            err_param(chat(&format!("{base}, {extra}}}"))),
            param,
            "{extra}"
        );
    }
    for (effort, budget, param) in [
        ("none", Some(0), Some("reasoning_effort")),
        ("low", Some(1024), Some("reasoning_effort")),
        ("high", None, Some("reasoning_effort")),
    ] {
        let c = chat(&format!(r#"{base}, "reasoning_effort": "{effort}"}}"#)).unwrap();
        assert_eq!(
            (c.params.thinking_budget, c.thinking_param),
            (budget, param)
        );
    }
    // An explicit budget wins and is the one named.
    let c = chat(&format!(
        r#"{base}, "reasoning_effort": "low", "thinking_budget": 9}}"#
    ))
    .unwrap();
    assert_eq!(
        (c.params.thinking_budget, c.thinking_param),
        (Some(9), Some("thinking_budget"))
    );
    // The values meaning the default pass.
    let c = chat(&format!(
        r#"{base}, "store": false, "service_tier": "auto", "modalities": ["text"], "functions": null,
            "parallel_tool_calls": true, "response_format": {{"type": "text"}}, "user": "u"}}"#
    ))
    .unwrap();
    assert_eq!(c.response_format, ResponseFormat::Text);
}

#[test]
fn completions_echo_best_of_suffix() {
    let v = |b: &str| validate_completion(parse_json(b.as_bytes())?, &LIMITS);
    let c = v(r#"{"prompt": "a", "echo": true, "best_of": 3, "n": 2, "suffix": ""}"#).unwrap();
    assert!(c.echo);
    assert_eq!((c.best_of, c.params.n), (3, 2));
    assert_eq!(v(r#"{"prompt": "a"}"#).unwrap().best_of, 1);
    assert_eq!(err_param(v(r#"{"prompt": "a", "suffix": "b"}"#)), "suffix");
    assert_eq!(
        err_param(v(r#"{"prompt": "a", "echo": true, "logprobs": 1}"#)),
        "echo"
    );
    assert_eq!(
        err_param(v(r#"{"prompt": "a", "best_of": 1, "n": 2}"#)),
        "best_of"
    );
    assert_eq!(
        err_param(v(r#"{"prompt": "a", "best_of": 2, "stream": true}"#)),
        "best_of"
    );
    // best_of counts against n_max: 2 prompts × 5 > 8.
    assert_eq!(
        err_param(v(r#"{"prompt": ["a", "b"], "best_of": 5}"#)),
        "best_of"
    );
    let g = |b: &str| validate_generate(parse_json(b.as_bytes())?, &LIMITS);
    assert_eq!(
        err_param(g(r#"{"text": "a", "sampling_params": {"n": 2}}"#)),
        "sampling_params.n"
    );
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
