#!/usr/bin/env python3
"""Chat-template goldens for the DeepSeek-R1, DeepSeek-V3, R1-Distill-Qwen and R1-Distill-Llama tokenizers.

Usage (by hand, from the repository root; same venv as generate.py):

    HF_HUB_OFFLINE=1 /work/venv-golden/bin/python tests/golden/chat_golden.py

Reads /work/shared/fixtures/tokenizers/{deepseek-r1,deepseek-v3,deepseek-r1-distill-qwen-7b,deepseek-r1-distill-llama-8b}
(tokenizer.json + tokenizer_config.json with the released chat_template; override the folder with $DUET_TOKENIZERS)
and writes tests/golden/chat/<that name>.json: a list of cases
    {"name", "messages", "tools", "add_generation_prompt", "text", "ids", "method", "hf_apply_chat_template"}
`ids` = tokenizer(text, add_special_tokens=False).input_ids (the template itself emits BOS).

How `text` is obtained (`method`):
  * "apply_chat_template": tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
    add_generation_prompt=...). For these cases the script also asserts that
    apply_chat_template(tokenize=True) gives exactly `ids` and that the direct jinja render below gives `text`.
  * "jinja_direct": cases with an assistant message whose content is null (OpenAI clients send
    {"role":"assistant","content":null,"tool_calls":[...]}). transformers 5 (tokenization_utils_base.py,
    apply_chat_template) first DROPS every key whose value is None from every message, so the template sees
    no `content` key at all; `message['content'] is none` is then false (jinja Undefined is not None) and the
    template evaluates '<｜Assistant｜>' + message['content'] -> jinja2.UndefinedError
    "'dict object' has no attribute 'content'". The templates clearly mean content=None (both have an explicit
    `message['content'] is none` branch), so `text` is rendered by the very same compiled template HF uses
    (transformers.utils.chat_template_utils._compile_jinja_template: ImmutableSandboxedEnvironment,
    trim_blocks, lstrip_blocks, HF's tojson/raise_exception/strftime_now/namespace) with the messages
    unmodified (content=None kept), messages/tools/add_generation_prompt and the tokenizer's special-token
    strings (bos_token, eos_token, pad_token) as variables, exactly the variables apply_chat_template passes.
  `hf_apply_chat_template` records what HF's apply_chat_template does for the case ("same" or the error).
"""

import json
import os
import sys
from pathlib import Path

import transformers
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import _compile_jinja_template

HERE = Path(__file__).resolve().parent
TOK_ROOT = Path(os.environ.get("DUET_TOKENIZERS", "/work/shared/fixtures/tokenizers"))

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the local time in a timezone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string"}},
                "required": ["timezone"],
            },
        },
    },
]


def call(i, name, args):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


SYS = {"role": "system", "content": "You are a helpful assistant."}

CASES = [
    dict(name="single_user", add_generation_prompt=True, tools=None,
         messages=[{"role": "user", "content": "Hello! What is 2+2?"}]),
    dict(name="system_user", add_generation_prompt=True, tools=None,
         messages=[SYS, {"role": "user", "content": "Write a haiku about the sea."}]),
    dict(name="two_system_prompts", add_generation_prompt=True, tools=None,
         messages=[SYS, {"role": "system", "content": "Answer in French."},
                   {"role": "user", "content": "Where is Lyon?"}]),
    dict(name="multi_turn_with_think", add_generation_prompt=True, tools=None,
         messages=[
             {"role": "user", "content": "What is 17*3?"},
             {"role": "assistant", "content": "<think>\n17*3 = 51, check: 50+1.\n</think>\n\n17 × 3 = 51."},
             {"role": "user", "content": "And 51*2?"},
         ]),
    dict(name="final_assistant_no_generation_prompt", add_generation_prompt=False, tools=None,
         messages=[SYS, {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
    dict(name="multi_turn_think_final_assistant", add_generation_prompt=False, tools=None,
         messages=[
             {"role": "user", "content": "Capital of Italy?"},
             {"role": "assistant", "content": "<think>Easy.</think>Rome."},
             {"role": "user", "content": "And of Spain?"},
             {"role": "assistant", "content": "<think>\nAlso easy.\n</think>\n\nMadrid."},
         ]),
    dict(name="unicode_system_user", add_generation_prompt=True, tools=None,
         messages=[
             {"role": "system", "content": "你是一个乐于助人的助手。Réponds en français, s'il te plaît ☕ — naïve café."},
             {"role": "user", "content": "日本語で答えて 😀🚀 Ünïcödé ñ Ελληνικά 한국어 👨‍👩‍👧"},
         ]),
    dict(name="tool_call_roundtrip", add_generation_prompt=False, tools=WEATHER_TOOLS,
         messages=[
             SYS,
             {"role": "user", "content": "What's the weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [call(0, "get_weather", {"city": "Paris"})]},
             {"role": "tool", "tool_call_id": "call_0", "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"},
             {"role": "assistant", "content": "It is 21 °C and sunny in Paris."},
         ]),
    dict(name="tool_result_then_generation_prompt", add_generation_prompt=True, tools=WEATHER_TOOLS,
         messages=[
             {"role": "user", "content": "What's the weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [call(0, "get_weather", {"city": "Paris"})]},
             {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21C"},
         ]),
    dict(name="multiple_tool_calls_consecutive_outputs", add_generation_prompt=True, tools=WEATHER_TOOLS,
         messages=[
             {"role": "user", "content": "Weather in Paris and the time in Tokyo?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 call(0, "get_weather", {"city": "Paris", "unit": "celsius"}),
                 call(1, "get_time", {"timezone": "Asia/Tokyo"}),
             ]},
             {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21C"},
             {"role": "tool", "tool_call_id": "call_1", "content": "14:05"},
         ]),
    dict(name="multiple_tool_calls_full", add_generation_prompt=False, tools=WEATHER_TOOLS,
         messages=[
             {"role": "user", "content": "Weather in Paris and Berlin?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 call(0, "get_weather", {"city": "Paris"}),
                 call(1, "get_weather", {"city": "Berlin"}),
                 call(2, "get_time", {"timezone": "Europe/Berlin"}),
             ]},
             {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
             {"role": "tool", "tool_call_id": "call_1", "content": "rainy"},
             {"role": "tool", "tool_call_id": "call_2", "content": "09:30"},
             {"role": "assistant", "content": "Paris is sunny; Berlin is rainy (09:30 there)."},
         ]),
    dict(name="two_tool_rounds", add_generation_prompt=True, tools=WEATHER_TOOLS,
         messages=[
             {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [call(0, "get_weather", {"city": "Paris"})]},
             {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
             {"role": "assistant", "content": "Sunny in Paris."},
             {"role": "user", "content": "And Rome?"},
             {"role": "assistant", "content": None, "tool_calls": [call(1, "get_weather", {"city": "Rome"})]},
             {"role": "tool", "tool_call_id": "call_1", "content": "cloudy"},
         ]),
    dict(name="tool_call_with_text_content", add_generation_prompt=True, tools=WEATHER_TOOLS,
         messages=[
             {"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "content": "Let me check.",
              "tool_calls": [call(0, "get_weather", {"city": "Oslo"})]},
             {"role": "tool", "tool_call_id": "call_0", "content": "snow"},
         ]),
    dict(name="tool_call_empty_string_content", add_generation_prompt=True, tools=WEATHER_TOOLS,
         messages=[
             {"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "content": "", "tool_calls": [call(0, "get_weather", {"city": "Oslo"})]},
             {"role": "tool", "tool_call_id": "call_0", "content": "snow"},
         ]),
]


def has_null_content(messages):
    return any(m.get("content", "x") is None for m in messages)


def build(model: str):
    tok = AutoTokenizer.from_pretrained(str(TOK_ROOT / model))
    template = tok.chat_template
    compiled = _compile_jinja_template(template)
    out = []
    for case in CASES:
        msgs, tools, agp = case["messages"], case["tools"], case["add_generation_prompt"]
        direct = compiled.render(messages=json.loads(json.dumps(msgs)), tools=tools, documents=None,
                                 add_generation_prompt=agp, **tok.special_tokens_map)
        try:
            hf_text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=agp)
            hf_err = None
        except Exception as e:  # noqa: BLE001
            hf_text, hf_err = None, f"{type(e).__name__}: {e}"
        if has_null_content(msgs):
            method, text = "jinja_direct", direct
            if hf_err is None:
                note = "same" if hf_text == direct else "DIFFERENT: " + json.dumps(hf_text, ensure_ascii=False)
            else:
                note = "fails: " + hf_err
        else:
            assert hf_err is None, (model, case["name"], hf_err)
            assert hf_text == direct, (model, case["name"], hf_text, direct)
            method, text, note = "apply_chat_template", hf_text, "same"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if method == "apply_chat_template":
            r = tok.apply_chat_template(msgs, tools=tools, tokenize=True, add_generation_prompt=agp)
            hf_ids = r["input_ids"] if hasattr(r, "keys") else r
            assert list(hf_ids) == ids, (model, case["name"])
        assert text.startswith(tok.bos_token) and ids[0] == tok.bos_token_id
        assert tok.decode(ids) == text, (model, case["name"])
        out.append(dict(name=case["name"], messages=msgs, tools=tools, add_generation_prompt=agp, text=text,
                        ids=ids, method=method, hf_apply_chat_template=note))
        print(f"[{model}] {case['name']}: {method}, {len(ids)} ids, HF: {note[:90]}")
    return out


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    d = HERE / "chat"
    d.mkdir(exist_ok=True)
    for model in ["deepseek-r1", "deepseek-v3", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b"]:
        cases = build(model)
        (d / f"{model}.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
