//! `duet serve` on the R1 distillations' architectures, Qwen2 and Llama, as `duet tiny-model`
//! writes them (random weights, the real R1-Distill tokenizers and chat template): the greedy
//! answer equals `duet generate`'s, it arrives as `reasoning_content` (these templates open
//! `<think>` in the generation prompt), `/tokenize` gives HF's ids, and tool calls parse.

mod common;

use common::{Server, duet, ok_json, post};
use serde_json::json;

/// `tokenizer("Hello world").input_ids` of HF transformers 5.24 `AutoTokenizer` on the released
/// R1-Distill-Qwen / R1-Distill-Llama tokenizer files. transformers 5 loads them as
/// `TokenizersBackend`, which adds no BOS; transformers 4's `LlamaTokenizerFast` (their
/// `tokenizer_class`, what vLLM and SGLang run today) adds BOS per `add_bos_token: true`, and so
/// does duet's `/tokenize` unless `add_special_tokens` is false.
const HELLO_WORLD_QWEN: [u32; 2] = [9707, 1879];
const HELLO_WORLD_LLAMA: [u32; 2] = [9906, 1917];
/// `<｜begin▁of▁sentence｜>` in both distill vocabularies.
const BOS: [(&str, u32); 2] = [("qwen2", 151646), ("llama", 128000)];

#[tokio::test(flavor = "multi_thread")]
async fn qwen2_and_llama_serve_what_generate_generates() {
    let tmp = tempfile::tempdir().unwrap();
    for (arch, hello) in [("qwen2", HELLO_WORLD_QWEN), ("llama", HELLO_WORLD_LLAMA)] {
        let dir = tmp.path().join(arch);
        let d = dir.to_str().unwrap();
        let out = duet(&["tiny-model", "--out", d, "--arch", arch, "--seed", "5"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let prompt = "Why is the sky blue?";
        let generated = ok_json(duet(&[
            "generate",
            "--model",
            d,
            "--prompt",
            prompt,
            "--chat",
            "--max-tokens",
            "10",
            "--temperature",
            "0",
            "--dtype",
            "f32",
            "--json",
        ]));
        let text = generated["text"].as_str().unwrap().to_string();
        assert_eq!(generated["ids"].as_array().unwrap().len(), 10, "{arch}");
        assert!(
            !text.contains("</think>"),
            "{arch}: pick a seed that stays in reasoning"
        );

        let srv = Server::start(&["--model", d, "--dtype", "f32", "--kv-pages", "32"]);
        let (status, body) = post(
            &srv.url("/v1/chat/completions"),
            &json!({"model": "default", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 10, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{arch}: {body}");
        let msg = &body["choices"][0]["message"];
        // The reasoning split drops ASCII whitespace at the start of the reasoning
        // (openai/src/reasoning.rs), so the engine's text is compared without it.
        let reasoning = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
        assert_eq!(
            msg["reasoning_content"].as_str(),
            Some(reasoning),
            "{arch}: {body}"
        );
        assert_eq!(msg["content"].as_str(), Some(""), "{arch}: {body}");
        assert_eq!(body["usage"]["completion_tokens"], 10, "{arch}");

        let (status, body) = post(
            &srv.url("/tokenize"),
            &json!({"model": "default", "prompt": "Hello world", "add_special_tokens": false}),
        )
        .await;
        assert_eq!(status, 200, "{arch}: {body}");
        assert_eq!(body["tokens"], json!(hello), "{arch}");
        let (_, body) = post(
            &srv.url("/tokenize"),
            &json!({"model": "default", "prompt": "Hello world"}),
        )
        .await;
        let bos = BOS.iter().find(|(a, _)| *a == arch).unwrap().1;
        let mut with_bos = vec![bos];
        with_bos.extend(hello);
        assert_eq!(body["tokens"], json!(with_bos), "{arch}");
    }
}

/// DeepSeek's tool-call syntax through the gateway with the distill vocabularies, where its markers
/// (`<｜tool▁calls▁begin｜>`, …) are not tokens of their own but several byte-level tokens each:
/// the echo engine replays a prompt holding exactly what a model emits for a call, so the streaming
/// parsers see the markers arrive in pieces.
#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_parse_when_their_markers_span_several_tokens() {
    const CALL: &str = "Let me check.</think>I will look it up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["qwen2", "llama"] {
        let dir = tmp.path().join(arch);
        let d = dir.to_str().unwrap();
        let out = duet(&["tiny-model", "--out", d, "--arch", arch]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The echo replays the whole prompt: the checkpoint's own template (which, as released,
        // renders no tools) keeps duet's tool template and its tools section out of the echo.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        let own = dir.join("own_template.jinja");
        std::fs::write(&own, cfg["chat_template"].as_str().unwrap()).unwrap();
        let own = own.to_str().unwrap();
        let srv = Server::start(&["--model", d, "--engine", "echo", "--chat-template", own]);
        let (_, marker) = post(
            &srv.url("/tokenize"),
            &json!({"prompt": "<｜tool▁calls▁begin｜>", "add_special_tokens": false}),
        )
        .await;
        assert!(marker["count"].as_u64().unwrap() > 1, "{arch}: {marker}");
        let (_, assistant) = post(
            &srv.url("/tokenize"),
            &json!({"prompt": "<｜Assistant｜>", "add_special_tokens": false}),
        )
        .await;
        assert_eq!(assistant["count"], 1, "{arch}: {assistant}");
        // The echo ends where the prompt's assistant turn starts.
        let req = json!({"messages": [{"role": "user", "content": CALL}], "tools": tools,
                         "max_tokens": 200, "stop_token_ids": [assistant["tokens"][0]]});
        for streamed in [false, true] {
            let (content, calls, finish) = if streamed {
                let mut sreq = req.clone();
                sreq["stream"] = json!(true);
                let events = common::stream(&srv.url("/v1/chat/completions"), &sreq).await;
                let deltas: Vec<&serde_json::Value> =
                    events.iter().filter_map(|e| e["choices"].get(0)).collect();
                let content: String = deltas
                    .iter()
                    .filter_map(|c| c["delta"]["content"].as_str())
                    .collect();
                let args: String = deltas
                    .iter()
                    .filter_map(|c| c["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
                    .collect();
                let name = deltas
                    .iter()
                    .find_map(|c| c["delta"]["tool_calls"][0]["function"]["name"].as_str())
                    .map(String::from);
                let finish = deltas
                    .iter()
                    .find_map(|c| c["finish_reason"].as_str())
                    .map(String::from);
                (content, (name, args), finish)
            } else {
                let (status, v) = post(&srv.url("/v1/chat/completions"), &req).await;
                assert_eq!(status, 200, "{arch}: {v}");
                let c = &v["choices"][0];
                let call = &c["message"]["tool_calls"][0]["function"];
                (
                    c["message"]["content"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    (
                        call["name"].as_str().map(String::from),
                        call["arguments"].as_str().unwrap_or_default().to_string(),
                    ),
                    c["finish_reason"].as_str().map(String::from),
                )
            };
            assert_eq!(content, "I will look it up.", "{arch} streamed {streamed}");
            assert_eq!(
                calls.0.as_deref(),
                Some("get_weather"),
                "{arch} streamed {streamed}"
            );
            let args: serde_json::Value = serde_json::from_str(&calls.1).unwrap();
            assert_eq!(args, json!({"city": "Paris"}), "{arch} streamed {streamed}");
            assert_eq!(
                finish.as_deref(),
                Some("tool_calls"),
                "{arch} streamed {streamed}"
            );
        }
    }
}
