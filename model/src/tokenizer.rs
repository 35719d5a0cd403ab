//! `tokenizer.json` (HF tokenizers, pure-Rust regex) plus `tokenizer_config.json`'s special tokens
//! and chat template.

use std::path::Path;

use serde_json::Value as Json;

use crate::Error;
use crate::chat::{ChatTemplate, special_token};

/// duet's tool-aware chat templates (`model/assets/tool_chat_template_deepseek*.jinja`): the
/// released DeepSeek templates plus a tools section in the system turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolTemplate {
    DeepSeekV3,
    DeepSeekR1,
}

impl ToolTemplate {
    pub fn source(self) -> &'static str {
        match self {
            ToolTemplate::DeepSeekV3 => {
                include_str!("../assets/tool_chat_template_deepseekv3.jinja")
            }
            ToolTemplate::DeepSeekR1 => {
                include_str!("../assets/tool_chat_template_deepseekr1.jinja")
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ToolTemplate::DeepSeekV3 => "tool_chat_template_deepseekv3.jinja",
            ToolTemplate::DeepSeekR1 => "tool_chat_template_deepseekr1.jinja",
        }
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// `add_bos_token` of tokenizer_config.json: `encode(.., add_special_tokens: true)` starts
    /// with BOS, as HF's tokenizer does (DeepSeek's tokenizer.json has no post-processor that
    /// would add it).
    pub bos_id: Option<u32>,
    pub chat: Option<ChatTemplate>,
    /// The template for requests that carry tools, when `chat` ignores them
    /// ([`TextTokenizer::tool_template_choice`]).
    tool_chat: Option<(ToolTemplate, ChatTemplate)>,
    /// tokenizer.json as loaded, for the grammar engine's token trie ([`Self::grammar_compiler`]).
    json: std::sync::Arc<[u8]>,
    /// Built on first use by [`Self::byte_vocab`]; `None` inside when the decoder is not byte-level.
    byte_vocab: std::sync::OnceLock<Option<ByteVocab>>,
}

/// Every id's bytes under a byte-level BPE decoder (DeepSeek's, Qwen's, Llama 3's), so that
/// streamed text is produced in O(new bytes) per token instead of re-decoding a window of ids
/// through the tokenizer (the gateway's largest per-token cost at high concurrency, BENCHMARKS.md).
///
/// `Tokenizer::decode` with a `ByteLevel` decoder is exactly: each id's token string (added
/// vocabulary first, then the model; unknown ids dropped; special tokens dropped when skipping),
/// each mapped back char by char through GPT-2's byte alphabet (a token with any char outside it
/// is taken as its UTF-8 bytes), all concatenated, then decoded as lossy UTF-8. So the bytes of
/// each id are fixed, and any sequence's text is `from_utf8_lossy` of their concatenation; the
/// tests check this against `decode` on the real DeepSeek, Qwen and Llama tokenizers.
pub struct ByteVocab {
    /// `bytes[offsets[id]..offsets[id + 1]]`; an id with no token has an empty range and
    /// `known` false.
    offsets: Vec<u32>,
    bytes: Vec<u8>,
    known: Vec<bool>,
    special: Vec<bool>,
}

impl ByteVocab {
    fn build(inner: &tokenizers::Tokenizer) -> Option<Self> {
        if !matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        ) {
            return None;
        }
        let char_bytes = gpt2_char_bytes();
        let special_strings: std::collections::HashSet<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        let n = inner
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut v = Self {
            offsets: Vec::with_capacity(n + 1),
            bytes: Vec::new(),
            known: Vec::with_capacity(n),
            special: Vec::with_capacity(n),
        };
        v.offsets.push(0);
        for id in 0..n {
            let tok = inner.id_to_token(id as u32);
            if let Some(t) = &tok {
                let start = v.bytes.len();
                let mapped = t.chars().try_for_each(|c| {
                    let b = char_bytes.get(&c)?;
                    v.bytes.push(*b);
                    Some(())
                });
                if mapped.is_none() {
                    v.bytes.truncate(start);
                    v.bytes.extend_from_slice(t.as_bytes());
                }
            }
            v.special
                .push(tok.as_ref().is_some_and(|t| special_strings.contains(t)));
            v.known.push(tok.is_some());
            v.offsets.push(u32::try_from(v.bytes.len()).ok()?);
        }
        Some(v)
    }

    /// The id's bytes; `None` for an id the tokenizer does not know (its decode drops it).
    pub fn bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if !*self.known.get(i)? {
            return None;
        }
        Some(&self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize])
    }

    /// Whether `decode(.., skip_special_tokens: true)` drops this id.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }
}

/// GPT-2's `bytes_to_unicode`, inverted: the char each byte is written as in a byte-level vocab.
fn gpt2_char_bytes() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.iter().map(|&b| u32::from(b)).collect();
    let mut n = 0;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, b)))
        .collect()
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("bos_token", &self.bos_token)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let tj = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tj).map_err(|e| Error::Io {
            path: tj.clone(),
            source: e,
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Io {
                path: cfg_path.clone(),
                source: e,
            })?;
            serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
                path: cfg_path.clone(),
                detail: e.to_string(),
            })?
        } else {
            Json::Null
        };
        Self::from_bytes(&bytes, &cfg, &tj)
    }

    pub fn from_bytes(tokenizer_json: &[u8], cfg: &Json, origin: &Path) -> Result<Self, Error> {
        let inner =
            tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| Error::Tokenizer {
                path: origin.to_path_buf(),
                detail: e.to_string(),
            })?;
        let bos_token = special_token(cfg, "bos_token");
        let add_bos = cfg.get("add_bos_token").and_then(Json::as_bool) == Some(true);
        let bos_id = bos_token
            .as_deref()
            .and_then(|b| inner.token_to_id(b))
            .filter(|_| add_bos);
        let mut t = Self {
            inner,
            bos_token,
            bos_id,
            eos_token: special_token(cfg, "eos_token"),
            chat: ChatTemplate::from_tokenizer_config(cfg)?,
            tool_chat: None,
            json: tokenizer_json.into(),
            byte_vocab: std::sync::OnceLock::new(),
        };
        t.tool_chat = t.tool_template_choice()?;
        Ok(t)
    }

    /// Replaces the checkpoint's chat template (`duet serve --chat-template FILE`). The given
    /// template is used for every request, with or without tools.
    pub fn set_chat_template(&mut self, source: String) -> Result<(), Error> {
        let bos = self.bos_token.clone().unwrap_or_default();
        let eos = self.eos_token.clone().unwrap_or_default();
        self.chat = Some(ChatTemplate::new(source, bos, eos)?);
        self.tool_chat = None;
        Ok(())
    }

    /// The template requests with tools get instead of the checkpoint's own, if any.
    pub fn tool_template(&self) -> Option<ToolTemplate> {
        self.tool_chat.as_ref().map(|(t, _)| *t)
    }

    /// Whether the checkpoint's template ignores tools, and which of duet's tool-aware
    /// templates replaces it then. Decided by rendering: a probe conversation with and without a
    /// probe tool; the same text both ways means the template never shows the model its tools.
    /// A DeepSeek template (its turns are `<｜User｜>`/`<｜Assistant｜>`) whose generation prompt
    /// opens `<think>` gets the R1 tool template, any other DeepSeek one the V3 tool template; a
    /// template of another family keeps rendering as it does.
    fn tool_template_choice(&self) -> Result<Option<(ToolTemplate, ChatTemplate)>, Error> {
        let Some(chat) = &self.chat else {
            return Ok(None);
        };
        let messages = serde_json::json!([{"role": "user", "content": "probe"}]);
        let tools = serde_json::json!([{"type": "function", "function": {
            "name": "duet_probe_tool", "description": "probe",
            "parameters": {"type": "object", "properties": {}}}}]);
        // A template that fails on tools is not one that shows them either.
        let with = chat
            .render(&messages, Some(&tools), true)
            .unwrap_or_default();
        let without = chat.render(&messages, None, true)?;
        if with.contains("duet_probe_tool") || !without.contains("<｜User｜>") {
            return Ok(None);
        }
        let which = if without.trim_end_matches('\n').ends_with("<think>") {
            ToolTemplate::DeepSeekR1
        } else {
            ToolTemplate::DeepSeekV3
        };
        let bos = self.bos_token.clone().unwrap_or_default();
        let eos = self.eos_token.clone().unwrap_or_default();
        let t = ChatTemplate::new(which.source().to_string(), bos, eos)?;
        Ok(Some((which, t)))
    }

    /// A grammar compiler over this vocabulary; `eos_ids` end a sequence whose grammar is done.
    pub fn grammar_compiler(&self, eos_ids: Vec<u32>) -> crate::grammar::GrammarCompiler {
        crate::grammar::GrammarCompiler::new(self.json.clone(), eos_ids)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, Error> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: "tokenizer.json".into(),
                detail: e.to_string(),
            })?;
        let ids = enc.get_ids();
        match self.bos_id {
            Some(bos) if add_special_tokens && ids.first() != Some(&bos) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// The token's string in the vocabulary (`Ġhello`), as vLLM's `return_token_strs` gives it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The per-id bytes of a byte-level vocabulary ([`ByteVocab`]), built once on first use;
    /// `None` for a tokenizer with another decoder.
    pub fn byte_vocab(&self) -> Option<&ByteVocab> {
        self.byte_vocab
            .get_or_init(|| ByteVocab::build(&self.inner))
            .as_ref()
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, Error> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: "tokenizer.json".into(),
                detail: e.to_string(),
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` with the chat template and tokenizes the result without adding special
    /// tokens again (the template writes BOS itself), as `apply_chat_template(tokenize=True)`.
    pub fn apply_chat_template(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<u32>), Error> {
        self.apply_chat_template_with(messages, tools, add_generation_prompt, &Default::default())
    }

    /// The prompt a server renders for a request: [`Self::apply_chat_template_with`], except that
    /// a request with tools gets duet's tool-aware template where the checkpoint's ignores tools
    /// ([`Self::tool_template`]). `apply_chat_template*` stay HF's rendering, tools or not.
    pub fn render_request(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        kwargs: &serde_json::Map<String, Json>,
    ) -> Result<(String, Vec<u32>), Error> {
        match (&self.tool_chat, tools) {
            (Some((_, t)), Some(_)) => {
                let text = t.render_with(messages, tools, true, kwargs)?;
                let ids = self.encode(&text, false)?;
                Ok((text, ids))
            }
            _ => self.apply_chat_template_with(messages, tools, true, kwargs),
        }
    }

    /// [`TextTokenizer::apply_chat_template`] with extra template variables.
    pub fn apply_chat_template_with(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Json>,
    ) -> Result<(String, Vec<u32>), Error> {
        let chat = self
            .chat
            .as_ref()
            .ok_or_else(|| Error::Template("tokenizer_config.json has no chat_template".into()))?;
        let text = chat.render_with(messages, tools, add_generation_prompt, kwargs)?;
        let ids = self.encode(&text, false)?;
        Ok((text, ids))
    }
}
