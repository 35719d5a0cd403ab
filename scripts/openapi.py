"""Writes actors/src/gateway/openapi.json, the OpenAPI 3.1 description duet serves at /openapi.json.

The document is written here, as Python data, because JSON Schema is easier to read and keep right
this way than as 1,600 lines of JSON. After editing: python3 scripts/openapi.py > actors/src/gateway/openapi.json
tests/serve_conformance.rs holds the document to the router and runs schemathesis against it.
"""
import json
S = lambda name: {"$ref": f"#/components/schemas/{name}"}
nul = lambda t: {"type": [t, "null"]}
I = {"type": "integer"}
N = {"type": "number"}
B = {"type": "boolean"}
Str = {"type": "string"}
ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
stop = {"oneOf": [Str, {"type": "array", "items": Str, "maxItems": 4}]}
sampling_common = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "description": "-1 or 0: off"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "stop": stop,
    "stop_token_ids": {**ids, "maxItems": 64},
    "ignore_eos": B,
    "skip_special_tokens": B,
}
openai_sampling = {
    "model": Str,
    "n": {"type": "integer", "minimum": 1, "description": "at most limits.n_max (8 by default)"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "seed": I,
    "stream": B,
    "stream_options": {"type": "object", "properties": {"include_usage": B}},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "description": "token id (as a string) -> bias added to its logit"},
    **sampling_common,
}
message = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {"oneOf": [Str, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": Str}}}]},
        "name": Str,
        "tool_call_id": Str,
        "reasoning_content": Str,
        "tool_calls": {"type": "array", "items": {"type": "object", "required": ["function"], "properties": {
            "id": Str, "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": Str, "arguments": Str}}}}},
    },
}
tool = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": Str, "description": Str, "parameters": {"type": "object"}, "strict": B}}}}
chat_req = {
    "type": "object",
    "description": "Also accepted: text (PaddleNLP's one-message form) instead of messages, custom_params.thinking_budget. "
                   "Refused with a 400 naming the field: functions, function_call, audio, prediction, web_search_options, "
                   "verbosity, store: true, service_tier other than auto/default, modalities other than [\"text\"]. "
                   "Informational and accepted: user, metadata, safety_identifier, prompt_cache_key.",
    "required": ["messages"],
    "properties": {
        **openai_sampling,
        "messages": {"type": "array", "minItems": 1, "items": S("ChatMessage")},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": B,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "description": "needs logprobs: true"},
        "tools": {"type": "array", "items": S("Tool")},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"}, "function": {"type": "object", "required": ["name"], "properties": {"name": Str}}}}],
            "description": "`required` or a named function needs that tool in `tools`"},
        "separate_reasoning": B,
        "thinking_budget": {"type": "integer", "minimum": 0},
        "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high"],
                             "description": "a thinking budget: 0, 256, 1024, 4096 tokens, or the model's own (high)"},
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {"name": Str, "schema": {"type": ["object", "boolean"]},
                                                          "strict": B}}},
            "description": "json_object and json_schema are enforced by constrained decoding; "
                           "json_schema needs json_schema.schema; a schema that does not compile is a 400"},
        "parallel_tool_calls": {"type": "boolean",
                                "description": "false holds a forced tool call (tool_choice required or a function) to one call"},
        "ignore_eos": B,
        "chat_template_kwargs": {"type": "object"},
    },
}
cmpl_req = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        **openai_sampling,
        "prompt": {"oneOf": [Str, {"type": "array", "minItems": 1, "items": Str},
                             {**ids, "minItems": 1}, {"type": "array", "minItems": 1, "items": {**ids, "minItems": 1}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "echo": {"type": "boolean", "description": "with logprobs: 400 (no prompt log-probabilities)"},
        "best_of": {"type": "integer", "minimum": 1, "description": ">= n; with stream: 400"},
        "suffix": {"type": ["string", "null"], "description": "non-empty: 400 (no fill-in-the-middle)"},
    },
}
gen_req = {
    "type": "object",
    "description": "exactly one of text and input_ids",
    "oneOf": [{"required": ["text"]}, {"required": ["input_ids"]}],
    "properties": {
        "text": Str,
        "input_ids": {**ids, "minItems": 1},
        "stream": B,
        "return_logprob": B,
        "sampling_params": {"type": "object", "properties": {
            "max_new_tokens": {"type": "integer", "minimum": 1},
            "n": {"type": "integer", "minimum": 1, "maximum": 1}, **sampling_common,
            "regex": {**Str, "description": "the output matches this regular expression"},
            "ebnf": {**Str, "description": "the output is a sentence of this GBNF grammar (root ::= ...)"},
            "json_schema": {"type": ["object", "boolean", "string"],
                            "description": "the output is JSON valid against this schema (or its JSON text)"}},
            "description": "at most one of regex, ebnf and json_schema; one that does not compile is a 400"},
    },
}
tok_req = {"type": "object", "description": "exactly one of prompt and messages",
    "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}], "properties": {
    "model": Str, "prompt": Str, "messages": {"type": "array", "minItems": 1, "items": S("ChatMessage")},
    "add_generation_prompt": B, "add_special_tokens": B, "return_token_strs": B}}
detok_req = {"type": "object", "required": ["tokens"], "properties": {"model": Str, "tokens": ids}}

usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": I, "completion_tokens": I, "total_tokens": I,
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": I}}}}
finish = {"enum": ["stop", "length", "tool_calls", None]}
matched = {"oneOf": [Str, I]}
tool_out = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": Str, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {"name": Str, "arguments": Str}}}}
chat_lp = {"type": ["object", "null"], "required": ["content"], "properties": {"content": {"type": "array", "items": {
    "type": "object", "required": ["token", "logprob", "top_logprobs"], "properties": {
        "token": Str, "logprob": N, "bytes": {"type": ["array", "null"], "items": I},
        "top_logprobs": {"type": "array", "items": {"type": "object", "required": ["token", "logprob"],
                                                      "properties": {"token": Str, "logprob": N}}}}}}}}
chat_resp = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": Str, "object": {"const": "chat.completion"}, "created": I, "model": Str,
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "message", "finish_reason"], "properties": {
        "index": I,
        "message": {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"const": "assistant"}, "content": nul("string"), "reasoning_content": Str,
            "tool_calls": {"type": "array", "items": tool_out}}},
        "logprobs": chat_lp, "finish_reason": finish, "matched_stop": matched}}},
    "usage": usage}}
cmpl_lp = {"type": ["object", "null"], "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"], "properties": {
    "tokens": {"type": "array", "items": Str}, "token_logprobs": {"type": "array", "items": nul("number")},
    "top_logprobs": {"type": "array", "items": {"type": ["object", "null"], "additionalProperties": N}},
    "text_offset": {"type": "array", "items": I}}}
cmpl_resp = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": Str, "object": {"const": "text_completion"}, "created": I, "model": Str,
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "text", "logprobs", "finish_reason"], "properties": {
        "index": I, "text": Str, "logprobs": cmpl_lp, "finish_reason": finish, "matched_stop": matched}}},
    "usage": usage}}
gen_resp = {"type": "object", "required": ["text", "output_ids", "meta_info"], "properties": {
    "text": Str, "output_ids": ids,
    "meta_info": {"type": "object", "required": ["id", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason"], "properties": {
        "id": Str, "prompt_tokens": I, "completion_tokens": I, "cached_tokens": I,
        "finish_reason": {"type": ["object", "null"], "required": ["type"], "properties": {
            "type": {"enum": ["stop", "length"]}, "matched": matched}},
        "output_token_logprobs": {"type": "array", "description": "[logprob, token id, null] per output token",
            "items": {"type": "array", "minItems": 3, "maxItems": 3}}}}}}
tok_resp = {"type": "object", "required": ["tokens", "count", "max_model_len"], "properties": {
    "tokens": ids, "count": I, "max_model_len": I, "token_strs": {"type": "array", "items": Str}}}
model_card = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": Str, "object": {"const": "model"}, "created": I, "owned_by": Str, "max_model_len": I}}
model_list = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": S("Model")}}}
health = {"type": "object", "required": ["prefill_workers", "decode_groups", "draining"], "properties": {
    "prefill_workers": I, "decode_groups": I, "draining": B}}
error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
    "required": ["message", "type", "param", "code"], "properties": {
        "message": Str, "type": Str, "param": nul("string"), "code": nul("string")}}}}

def j(schema): return {"application/json": {"schema": schema}}
err = {"description": "An error in OpenAI's shape (400 invalid request, 401 missing or wrong API key, "
       "404 unknown model, 405 wrong method, 413 body too large, 429 overloaded, 503 unavailable)",
       "content": j(S("Error"))}
sse = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
        "description": "with stream: true, one event per chunk: `data: <chunk JSON>`, then `data: [DONE]`"}}}
def gen_op(summary, req, resp, op_id):
    return {"post": {"operationId": op_id, "summary": summary,
        "requestBody": {"required": True, "content": j(S(req))},
        "responses": {"200": {"description": "the answer, or its stream", "content": {**j(S(resp)), **sse}},
                      "default": err}}}
doc = {
    "openapi": "3.1.0",
    "info": {"title": "duet", "version": "0.1.0", "description":
             "duet's HTTP API: OpenAI-compatible chat and text completions, SGLang's /generate, vLLM's "
             "/tokenize and /detokenize. Unknown request fields are ignored. When the server has API keys, "
             "every endpoint but the exempt ones (/health and /metrics by default) needs `Authorization: Bearer <key>`."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "ChatMessage": message, "Tool": tool,
            "ChatCompletionRequest": chat_req, "CompletionRequest": cmpl_req, "GenerateRequest": gen_req,
            "TokenizeRequest": tok_req, "DetokenizeRequest": detok_req,
            "ChatCompletion": chat_resp, "Completion": cmpl_resp, "GenerateResponse": gen_resp,
            "TokenizeResponse": tok_resp, "Model": model_card, "ModelList": model_list, "Health": health,
            "Error": error}},
    "security": [{"bearer": []}, {}],
    "paths": {
        "/v1/chat/completions": gen_op("Chat completion (OpenAI)", "ChatCompletionRequest", "ChatCompletion", "chat"),
        "/v1/completions": gen_op("Text completion (OpenAI)", "CompletionRequest", "Completion", "completions"),
        "/generate": gen_op("Generation (SGLang)", "GenerateRequest", "GenerateResponse", "generate"),
        "/tokenize": {"post": {"operationId": "tokenize", "summary": "Tokenize a prompt or a rendered chat (vLLM)",
            "requestBody": {"required": True, "content": j(S("TokenizeRequest"))},
            "responses": {"200": {"description": "the tokens", "content": j(S("TokenizeResponse"))}, "default": err}}},
        "/detokenize": {"post": {"operationId": "detokenize", "summary": "Token ids to text (vLLM)",
            "requestBody": {"required": True, "content": j(S("DetokenizeRequest"))},
            "responses": {"200": {"description": "the text", "content": j({"type": "object", "required": ["prompt"], "properties": {"prompt": Str}})},
                          "default": err}}},
        "/v1/models": {"get": {"operationId": "listModels", "summary": "The served model",
            "responses": {"200": {"description": "one model", "content": j(S("ModelList"))}, "default": err}}},
        "/v1/models/{model}": {"get": {"operationId": "retrieveModel", "summary": "One model by id (404 for another id)",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": Str}],
            "responses": {"200": {"description": "the model", "content": j(S("Model"))}, "default": err}}},
        "/health": {"get": {"operationId": "health", "summary": "200 once every role has a live worker",
            "security": [{}],
            "responses": {"200": {"description": "ready", "content": j(S("Health"))},
                          "503": {"description": "starting, draining or degraded", "content": j(S("Health"))},
                          "default": err}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text exposition", "security": [{}],
            "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": Str}}}, "default": err}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": j({"type": "object"})}, "default": err}}},
    },
}
print(json.dumps(doc, indent=1))
