//! Chat templates rendered exactly as HF's `apply_chat_template` renders them (goldens in
//! tests/golden/chat/, made by tests/golden/chat_golden.py from the released R1 and V3
//! tokenizer_config.json, and the R1-Distill-Qwen / R1-Distill-Llama ones). The tokenizers are
//! the ones duet ships (R1's, the two distill ones); the V3 vocabulary differs only in ids
//! 128798/128799, which V3 calls placeholders instead of `<think>`/`</think>`.

use std::path::Path;

use duet_model::tiny::{TinyArch, r1_tokenizer_files, tokenizer_files};
use duet_model::tokenizer::TextTokenizer;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Value,
    tools: Option<Value>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

fn tokenizer(v3: bool) -> TextTokenizer {
    let (json, r1_cfg) = r1_tokenizer_files().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (json, cfg) = if v3 {
        let text = String::from_utf8(json)
            .unwrap()
            .replace("\"<think>\"", "\"<｜place▁holder▁no▁798｜>\"")
            .replace("\"</think>\"", "\"<｜place▁holder▁no▁799｜>\"");
        let cfg = std::fs::read_to_string(
            root.join("tests/golden/chat/deepseek-v3-tokenizer_config.json"),
        )
        .unwrap();
        (text.into_bytes(), cfg)
    } else {
        (json, r1_cfg.to_string())
    };
    TextTokenizer::from_bytes(
        &json,
        &serde_json::from_str(&cfg).unwrap(),
        Path::new("tokenizer.json"),
    )
    .unwrap()
}

fn check(file: &str, v3: bool) {
    check_with(file, &tokenizer(v3));
}

fn check_with(file: &str, tok: &TextTokenizer) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/golden/chat").join(file)).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let (text, ids) = tok
            .apply_chat_template(&c.messages, c.tools.as_ref(), c.add_generation_prompt)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(text, c.text, "{file} {}: rendered text", c.name);
        assert_eq!(ids, c.ids, "{file} {}: token ids", c.name);
    }
}

#[test]
fn r1_template_matches_hf() {
    check("deepseek-r1.json", false);
}

#[test]
fn v3_template_matches_hf() {
    check("deepseek-v3.json", true);
}

fn shipped(arch: TinyArch) -> TextTokenizer {
    let (json, cfg) = tokenizer_files(arch).unwrap();
    TextTokenizer::from_bytes(
        &json,
        &serde_json::from_str(cfg).unwrap(),
        Path::new("tokenizer.json"),
    )
    .unwrap()
}

/// R1-Distill-Qwen's template (system, multi-turn with reasoning cut at `</think>`, tool calls and
/// outputs) with its 152k-entry Qwen vocabulary.
#[test]
fn r1_distill_qwen_template_matches_hf() {
    check_with(
        "deepseek-r1-distill-qwen-7b.json",
        &shipped(TinyArch::Qwen2),
    );
}

/// The same template over R1-Distill-Llama's 128k Llama 3 vocabulary.
#[test]
fn r1_distill_llama_template_matches_hf() {
    check_with(
        "deepseek-r1-distill-llama-8b.json",
        &shipped(TinyArch::Llama),
    );
}

#[test]
fn tokenizer_round_trips_unicode() {
    let tok = tokenizer(false);
    let text = "Grüße, 世界! 🚀 <think>";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.token_to_id("<think>"), Some(128798));
    assert_eq!(tok.token_to_id("<｜Assistant｜>"), Some(128804));
}

/// The released R1 and V3 templates ignore `tools` (the goldens above hold them to HF); a request
/// with tools is rendered with duet's tool template instead, which is the released one plus the
/// tools in the system turn: without tools the two agree, and the checkpoint's kind (does the
/// generation prompt open `<think>`?) picks R1's or V3's.
#[test]
fn requests_with_tools_get_the_tool_template_where_the_checkpoint_s_ignores_them() {
    use duet_model::tokenizer::ToolTemplate;
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"}]);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let none = serde_json::Map::new();
    for (v3, kind, opens_think) in [
        (false, ToolTemplate::DeepSeekR1, true),
        (true, ToolTemplate::DeepSeekV3, false),
    ] {
        let tok = tokenizer(v3);
        assert_eq!(tok.tool_template(), Some(kind));
        let (plain, _) = tok.apply_chat_template(&messages, None, true).unwrap();
        let (ignored, _) = tok
            .apply_chat_template(&messages, Some(&tools), true)
            .unwrap();
        assert_eq!(plain, ignored, "the released template ignores tools");
        let (same, _) = tok.render_request(&messages, None, &none).unwrap();
        assert_eq!(same, plain);
        let (with, ids) = tok.render_request(&messages, Some(&tools), &none).unwrap();
        assert!(
            with.starts_with("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools"),
            "{with}"
        );
        assert!(
            with.contains("### get_weather\nDescription: Weather of a city\n"),
            "{with}"
        );
        assert!(
            with.contains(r#"Parameters: {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#),
            "{with}"
        );
        assert!(with.contains("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"));
        assert!(with.ends_with("<｜User｜>Weather in Paris?<｜Assistant｜>") != opens_think);
        assert_eq!(with.ends_with("<think>\n"), opens_think, "{with}");
        assert_eq!(ids, tok.encode(&with, false).unwrap());
    }
    // A template that is not DeepSeek's keeps rendering as it does.
    let mut tok = tokenizer(false);
    tok.set_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}".into())
        .unwrap();
    assert_eq!(tok.tool_template(), None);
}
