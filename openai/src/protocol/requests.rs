//! Requests as clients send them: serde types that accept every documented form of each field
//! (a string or an array for `stop`, negative seeds, content parts, the PaddleNLP and SGLang
//! variants) and nothing else. Checking ranges and filling defaults is [`super::validation`]'s.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `stop`: a string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStrings(pub Vec<String>);

impl<'de> Deserialize<'de> for StopStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopStrings;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StopStrings, E> {
                Ok(StopStrings(vec![s.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StopStrings, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(StopStrings(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A seed as OpenAI clients send it: any JSON integer (some send negative ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub u64);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seed;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seed, E> {
                Ok(Seed(v))
            }
            // Negative seeds keep their bits: still deterministic, still distinct.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seed, E> {
                Ok(Seed(v as u64))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

// Chat completions

/// `content`: a string, or an array of parts of which only `{"type": "text", "text": ...}` is
/// supported (DeepSeek-V3/R1 read text only).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    /// A JSON-encoded string per OpenAI; some clients send the object itself.
    pub arguments: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CustomParams {
    pub thinking_budget: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// PaddleNLP's form: `{"model": "default", "text": "..."}` is one user message.
    pub text: Option<String>,
    pub n: Option<u64>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<StopStrings>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: Option<Seed>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoiceIn>,
    pub separate_reasoning: Option<bool>,
    pub thinking_budget: Option<u64>,
    /// The SGLang guide's form of the budget: `custom_params: {"thinking_budget": 512}` next to a
    /// `custom_logit_processor` (which is ignored: the budget is built in).
    pub custom_params: Option<CustomParams>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    /// Token id (a string, as JSON object keys are) → bias in [-100, 100].
    pub logit_bias: Option<Map<String, Value>>,
    /// `none`, `minimal`, `low`, `medium`, `high`: a thinking budget ([`super::REASONING_EFFORT_BUDGETS`]).
    pub reasoning_effort: Option<String>,
    /// `text`, `json_object` or `json_schema`, the JSON ones enforced by the grammar engine.
    pub response_format: Option<ResponseFormatIn>,
    pub parallel_tool_calls: Option<bool>,
    // Documented OpenAI fields that would change the answer in ways this server cannot honour:
    // validation refuses any value but the one meaning the default (`store: false`,
    // `modalities: ["text"]`, `service_tier: "auto"`/`"default"`) with a 400 naming the field.
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub audio: Option<Value>,
    pub modalities: Option<Value>,
    pub prediction: Option<Value>,
    pub web_search_options: Option<Value>,
    pub verbosity: Option<Value>,
    pub store: Option<Value>,
    pub service_tier: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseFormatIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<Value>,
}

// Completions

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptIn>,
    pub n: Option<u64>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<StopStrings>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: Option<Seed>,
    /// The completions API's form: how many top alternatives to return per token.
    pub logprobs: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub logit_bias: Option<Map<String, Value>>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
    /// Candidates generated per prompt, of which the `n` with the highest cumulative
    /// log-probability are returned.
    pub best_of: Option<u64>,
    /// Fill-in-the-middle text after the completion; refused (these models have no FIM mode).
    pub suffix: Option<String>,
}

// SGLang /generate

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SglSamplingParams {
    pub max_new_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub stop: Option<StopStrings>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub n: Option<u64>,
    /// The output matches this regular expression.
    pub regex: Option<String>,
    /// The output is a sentence of this GBNF grammar (`root ::= ...`).
    pub ebnf: Option<String>,
    /// The output is JSON valid against this schema (an object, or its JSON text).
    pub json_schema: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerateRequest {
    pub text: Option<String>,
    pub input_ids: Option<Vec<u32>>,
    pub sampling_params: Option<SglSamplingParams>,
    pub stream: Option<bool>,
    pub return_logprob: Option<bool>,
}

// vLLM /tokenize and /detokenize

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub add_generation_prompt: Option<bool>,
    pub add_special_tokens: Option<bool>,
    /// vLLM's: also return each token's vocabulary string.
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}
