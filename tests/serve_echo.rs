//! DeepSeek tool calls and reasoning through the whole gateway, made deterministic with the echo
//! engine (`--engine echo` replays the rendered prompt's tokens as its output): the prompt holds
//! exactly the text a DeepSeek model emits for a tool call, so the parsers see what they would in
//! production, token by token.

mod common;

use common::{Server, post, stream};
use serde_json::{Value, json};

const CALL: &str = "Let me check.</think>I will look it up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"unit\": \"°C\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}}])
}

async fn assistant_token(srv: &Server) -> u64 {
    let (_, t) = post(
        &srv.url("/tokenize"),
        &json!({"prompt": "<｜Assistant｜>", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(t["count"], 1, "{t}");
    t["tokens"][0].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_round_trip_whole_and_streamed() {
    let srv = Server::start(&["--engine", "echo"]);
    let url = srv.url("/v1/chat/completions");
    // The echo ends where the prompt's assistant turn starts.
    let stop = assistant_token(&srv).await;
    let req = json!({"messages": [{"role": "user", "content": CALL}], "tools": tools(), "max_tokens": 200, "stop_token_ids": [stop]});
    let (status, v) = post(&url, &req).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let msg = &choice["message"];
    assert_eq!(msg["content"], "I will look it up.");
    assert!(
        msg["reasoning_content"]
            .as_str()
            .unwrap()
            .ends_with("Let me check.")
    );
    let call = &msg["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "°C"}));

    // Streamed: the name arrives first with empty arguments, then argument fragments whose
    // concatenation is the JSON (the SGLang guide's example stream), then finish "tool_calls".
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let events = stream(&url, &sreq).await;
    let deltas: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["delta"].get("tool_calls"))
        .flat_map(|t| t.as_array().unwrap())
        .collect();
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert_eq!(deltas[0]["function"]["arguments"], "");
    assert!(deltas[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(deltas[0]["type"], "function");
    assert!(deltas.len() > 2, "arguments stream in several deltas");
    let streamed: String = deltas
        .iter()
        .map(|d| d["function"]["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, call["function"]["arguments"].as_str().unwrap());
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "I will look it up.");
    let reasoning: String = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, msg["reasoning_content"].as_str().unwrap());
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // Second turn: the assistant's call (null content) and the tool's answer go back in.
    let turn2 = json!({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["function"]["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 21}"}
    ], "tools": tools(), "max_tokens": 4});
    let (status, v) = post(&url, &turn2).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_text_without_tools_in_the_request_stays_content() {
    let srv = Server::start(&["--engine", "echo"]);
    let stop = assistant_token(&srv).await;
    let req = json!({"messages": [{"role": "user", "content": CALL}], "max_tokens": 200, "stop_token_ids": [stop], "separate_reasoning": false});
    let (status, v) = post(&srv.url("/v1/chat/completions"), &req).await;
    assert_eq!(status, 200, "{v}");
    let msg = &v["choices"][0]["message"];
    assert!(msg.get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(
        msg["content"]
            .as_str()
            .unwrap()
            .contains("<｜tool▁calls▁begin｜>")
    );
}
