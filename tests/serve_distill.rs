//! `duet serve` on the R1 distillations' architectures, Qwen2 and Llama, as `duet tiny-model`
//! writes them (random weights, the real R1-Distill tokenizers and chat template): the greedy
//! answer equals `duet generate`'s, it arrives as `reasoning_content` (these templates open
//! `<think>` in the generation prompt), and `/tokenize` gives HF's ids.

mod common;

use common::{Server, duet, ok_json, post};
use serde_json::json;

/// `tokenizer("Hello world").input_ids` of HF transformers 5.24 `AutoTokenizer` on the released
/// R1-Distill-Qwen / R1-Distill-Llama tokenizer files (no BOS: their `tokenizer.json` adds none).
const HELLO_WORLD_QWEN: [u32; 2] = [9707, 1879];
const HELLO_WORLD_LLAMA: [u32; 2] = [9906, 1917];

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
            &json!({"model": "default", "prompt": "Hello world"}),
        )
        .await;
        assert_eq!(status, 200, "{arch}: {body}");
        assert_eq!(body["tokens"], json!(hello), "{arch}");
    }
}
