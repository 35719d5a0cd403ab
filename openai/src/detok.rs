//! Incremental detokenization: token ids in, newly completed text out.
//!
//! Algorithm (vLLM's `detokenize_incrementally`, HF text-generation-inference's `decode_token`):
//! keep two offsets into the id list. `prefix_offset..read_offset` is text already emitted (kept as
//! context), `read_offset..` is not yet emitted. On each token decode both `prefix..read` and
//! `prefix..end`; the difference is the new text. It is released only when it does not end in
//! U+FFFD: DeepSeek's byte-level BPE splits a multi-byte UTF-8 character (CJK, emoji) across
//! tokens, and a decode that stops in the middle of one ends in the replacement character. Decoding
//! with context instead of token by token also keeps any decoder that treats the first token
//! specially (SentencePiece's leading space) from changing the text; the caller passes the last
//! few prompt tokens as that context.
//!
//! Special tokens and what the parsers need: in DeepSeek-V3/R1's `tokenizer.json` only BOS
//! (`<｜begin▁of▁sentence｜>`, 0) and EOS (`<｜end▁of▁sentence｜>`, 1) are marked `special`; `<think>`
//! (128798), `</think>` (128799) and the tool-call markers (128806..=128814) are added tokens with
//! `special: false`, so `skip_special_tokens` keeps them and the reasoning and tool parsers see them
//! (the tests check this on the real tokenizer). A tokenizer could mark them special (fine-tunes
//! do); then skipping is done here instead of in the tokenizer, dropping special ids except those
//! markers ([`PROTECTED_MARKERS`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use duet_model::Error;
use duet_model::tokenizer::TextTokenizer;

use super::reasoning::{THINK_END, THINK_START};
use super::tools::{CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP};

/// Added tokens that must survive `skip_special_tokens`: the reasoning and tool-call parsers read them.
pub const PROTECTED_MARKERS: [&str; 7] = [
    THINK_START,
    THINK_END,
    CALLS_BEGIN,
    CALLS_END,
    CALL_BEGIN,
    CALL_END,
    SEP,
];

/// How many prompt tokens to pass as context: vLLM's `INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`.
pub const PROMPT_CONTEXT_TOKENS: usize = 5;

#[derive(Debug)]
enum Skip {
    /// Decode with everything.
    None,
    /// The tokenizer's own `skip_special_tokens`: none of the protected markers is special.
    Tokenizer,
    /// Some protected marker is special: drop special ids here, keeping the protected ones.
    /// `special` caches the per-id verdict.
    Filter {
        protected: Vec<u32>,
        special: BTreeMap<u32, bool>,
    },
}

#[derive(Debug)]
pub struct Detokenizer {
    tok: Arc<TextTokenizer>,
    /// Ids from `prefix_offset` on; older ones are dropped, they are never decoded again.
    ids: Vec<u32>,
    /// Offset into `ids` where the not-yet-emitted text starts (`prefix_offset` is always 0).
    read_offset: usize,
    skip: Skip,
    /// Byte-level vocabularies (every DeepSeek tokenizer) take the fast path: each id's bytes are
    /// appended here and the complete UTF-8 prefix is released, O(new bytes) per token. Only an
    /// unfinished character stays (at most 3 bytes). `ids`/`read_offset` are unused then.
    pending: Option<Vec<u8>>,
}

impl Detokenizer {
    /// `prompt_tail`: the prompt's last few ids ([`PROMPT_CONTEXT_TOKENS`]), used as decoding
    /// context only; their text is never emitted.
    pub fn new(tok: Arc<TextTokenizer>, prompt_tail: &[u32], skip_special_tokens: bool) -> Self {
        let skip = if skip_special_tokens {
            let protected: Vec<u32> = PROTECTED_MARKERS
                .iter()
                .filter_map(|m| tok.token_to_id(m))
                .filter(|&id| tok.decode(&[id], true).is_ok_and(|s| s.is_empty()))
                .collect();
            if protected.is_empty() {
                Skip::Tokenizer
            } else {
                let protected = PROTECTED_MARKERS
                    .iter()
                    .filter_map(|m| tok.token_to_id(m))
                    .collect();
                Skip::Filter {
                    protected,
                    special: BTreeMap::new(),
                }
            }
        } else {
            Skip::None
        };
        // A byte-level decoder has no context-dependent rule (no leading-space stripping), so
        // the fast path needs no prompt context.
        let pending = tok.byte_vocab().map(|_| Vec::new());
        let start = prompt_tail.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
        let ids = if pending.is_some() {
            Vec::new()
        } else {
            prompt_tail[start..].to_vec()
        };
        Self {
            read_offset: ids.len(),
            ids,
            tok,
            skip,
            pending,
        }
    }

    /// Adds one generated id; returns the text it completes (often empty: a partial character, or
    /// a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<String, Error> {
        if self.is_skipped(id)? {
            return Ok(String::new());
        }
        if let (Some(pending), Some(vocab)) = (&mut self.pending, self.tok.byte_vocab()) {
            if matches!(self.skip, Skip::Tokenizer) && vocab.is_special(id) {
                return Ok(String::new());
            }
            pending.extend_from_slice(vocab.bytes(id).unwrap_or_default());
            return Ok(release_utf8(pending, false));
        }
        self.ids.push(id);
        let prefix = self.decode(&self.ids[..self.read_offset])?;
        let full = self.decode(&self.ids)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(delta) = new_suffix(&prefix, &full) else {
            return Ok(String::new());
        };
        let delta = delta.to_owned();
        // The emitted text becomes the context for the next token.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Text still held back at the end of generation: an unfinished character, as U+FFFD.
    pub fn finish(&mut self) -> Result<String, Error> {
        if let Some(pending) = &mut self.pending {
            return Ok(release_utf8(pending, true));
        }
        let prefix = self.decode(&self.ids[..self.read_offset])?;
        let full = self.decode(&self.ids)?;
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(new_suffix(&prefix, &full).unwrap_or_default().to_owned())
    }

    fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.tok.decode(ids, matches!(self.skip, Skip::Tokenizer))
    }

    fn is_skipped(&mut self, id: u32) -> Result<bool, Error> {
        let Skip::Filter { protected, special } = &mut self.skip else {
            return Ok(false);
        };
        if protected.contains(&id) {
            return Ok(false);
        }
        if let Some(&s) = special.get(&id) {
            return Ok(s);
        }
        // Special = text of its own that the tokenizer's skipping removes.
        let s =
            self.tok.decode(&[id], true)?.is_empty() && !self.tok.decode(&[id], false)?.is_empty();
        special.insert(id, s);
        Ok(s)
    }
}

/// Takes the text `bytes` completes off their front, as `String::from_utf8_lossy` of everything
/// pushed would have it: invalid sequences become U+FFFD; a character still unfinished at the end
/// stays for the next token, unless `last` (then it is U+FFFD too).
fn release_utf8(bytes: &mut Vec<u8>, last: bool) -> String {
    let mut out = String::new();
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(s) => {
                out.push_str(s);
                at = bytes.len();
                break;
            }
            Err(e) => {
                let valid = at + e.valid_up_to();
                out.push_str(std::str::from_utf8(&bytes[at..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        at = valid + n;
                    }
                    None if last => {
                        out.push('\u{FFFD}');
                        at = bytes.len();
                        break;
                    }
                    None => {
                        at = valid;
                        break;
                    }
                }
            }
        }
    }
    bytes.drain(..at);
    out
}

/// `full` minus its `prefix` text. Decoders normally extend the prefix; when one does not (a
/// cleanup rule joined text across the boundary), fall back to a byte offset, as vLLM does, but only
/// on a char boundary.
fn new_suffix<'a>(prefix: &str, full: &'a str) -> Option<&'a str> {
    full.strip_prefix(prefix)
        .or_else(|| full.get(prefix.len()..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::OnceLock;

    fn r1() -> Arc<TextTokenizer> {
        static TOK: OnceLock<Arc<TextTokenizer>> = OnceLock::new();
        TOK.get_or_init(|| {
            let (json, cfg) = duet_model::tiny::r1_tokenizer_files().unwrap();
            let cfg: serde_json::Value = serde_json::from_str(cfg).unwrap();
            Arc::new(TextTokenizer::from_bytes(&json, &cfg, Path::new("r1")).unwrap())
        })
        .clone()
    }

    fn stream(
        tok: &Arc<TextTokenizer>,
        prompt_tail: &[u32],
        ids: &[u32],
        skip: bool,
    ) -> (String, usize) {
        let mut d = Detokenizer::new(tok.clone(), prompt_tail, skip);
        let mut out = String::new();
        let mut pieces = 0;
        for &id in ids {
            let s = d.push(id).unwrap();
            assert!(
                !s.contains('\u{FFFD}'),
                "emitted a partial character: {s:?}"
            );
            pieces += usize::from(!s.is_empty());
            out.push_str(&s);
        }
        out.push_str(&d.finish().unwrap());
        (out, pieces)
    }

    const TEXTS: [&str; 5] = [
        "你好，世界！深度求索的模型会思考。",
        "Emoji: 👩‍👩‍👧‍👦 🇨🇳 🙂🙃 and ümlauts, ñ, ∑ x² — done.",
        "日本語のテキスト、カタカナ、ひらがな。한국어도.",
        "  leading spaces\n\n\tand tabs\r\n",
        "<think>\n推理过程\n</think>\n\n答案<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"城市\": \"青岛\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ];

    #[test]
    fn id_by_id_reproduces_text_and_one_shot_decode() {
        let tok = r1();
        let prompt = tok.encode("<｜User｜>hi<｜Assistant｜>", false).unwrap();
        for text in TEXTS {
            let ids = tok.encode(text, false).unwrap();
            let one_shot = tok.decode(&ids, true).unwrap();
            assert_eq!(one_shot, text);
            for tail in [&[][..], &prompt[..]] {
                for skip in [true, false] {
                    assert_eq!(
                        stream(&tok, tail, &ids, skip).0,
                        text,
                        "{text:?} skip={skip}"
                    );
                }
            }
        }
    }

    #[test]
    fn multibyte_characters_split_across_tokens_come_out_whole() {
        let tok = r1();
        // Rare CJK and emoji are byte-level pieces: more ids than characters.
        let text = "𠀀𪚥🦀🫠";
        let ids = tok.encode(text, false).unwrap();
        assert!(
            ids.len() > text.chars().count(),
            "expected split characters, got {ids:?}"
        );
        let (out, pieces) = stream(&tok, &[], &ids, true);
        assert_eq!(out, text);
        assert!(pieces <= text.chars().count());
    }

    #[test]
    fn r1_marks_only_bos_and_eos_special() {
        let tok = r1();
        for m in PROTECTED_MARKERS {
            let id = tok.token_to_id(m).unwrap();
            assert_eq!(tok.decode(&[id], true).unwrap(), m, "{m} is special");
        }
        assert_eq!(tok.token_to_id(THINK_START), Some(128798));
        assert_eq!(tok.token_to_id(THINK_END), Some(128799));
        assert_eq!(tok.token_to_id(CALLS_BEGIN), Some(128806));
        for id in [0, 1] {
            assert_eq!(tok.decode(&[id], true).unwrap(), "");
        }
        let d = Detokenizer::new(tok, &[], true);
        assert!(matches!(d.skip, Skip::Tokenizer));
    }

    #[test]
    fn eos_is_skipped_only_when_asked() {
        let tok = r1();
        let mut ids = tok.encode("ok", false).unwrap();
        ids.push(1);
        assert_eq!(stream(&tok, &[], &ids, true).0, "ok");
        assert_eq!(stream(&tok, &[], &ids, false).0, "ok<｜end▁of▁sentence｜>");
    }

    #[test]
    fn markers_survive_skipping_when_the_tokenizer_marks_them_special() {
        // The R1 tokenizer with `<think>`/`</think>` marked special, as some fine-tunes ship it.
        let (json, cfg) = duet_model::tiny::r1_tokenizer_files().unwrap();
        let mut j: serde_json::Value = serde_json::from_slice(&json).unwrap();
        for t in j["added_tokens"].as_array_mut().unwrap() {
            if t["content"] == THINK_START || t["content"] == THINK_END {
                t["special"] = serde_json::Value::Bool(true);
            }
        }
        let cfg: serde_json::Value = serde_json::from_str(cfg).unwrap();
        let tok = TextTokenizer::from_bytes(&serde_json::to_vec(&j).unwrap(), &cfg, Path::new("x"))
            .unwrap();
        let tok = Arc::new(tok);
        assert_eq!(tok.decode(&[128798], true).unwrap(), "");
        let d = Detokenizer::new(tok.clone(), &[], true);
        assert!(matches!(d.skip, Skip::Filter { .. }));
        let mut ids = tok.encode("<think>\n想</think>\n\n好", false).unwrap();
        ids.insert(0, 0);
        ids.push(1);
        assert_eq!(stream(&tok, &[], &ids, true).0, "<think>\n想</think>\n\n好");
    }

    fn distill(arch: duet_model::tiny::TinyArch) -> Arc<TextTokenizer> {
        let (json, cfg) = duet_model::tiny::tokenizer_files(arch).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(cfg).unwrap();
        Arc::new(TextTokenizer::from_bytes(&json, &cfg, Path::new("distill")).unwrap())
    }

    /// The byte-level fast path against the tokenizer's own decode of the whole sequence, on
    /// arbitrary ids (partial characters, invalid byte runs, special and added tokens, ids past
    /// the vocabulary) for DeepSeek's, Qwen's and Llama 3's vocabularies, skipping or not.
    #[test]
    fn fast_path_equals_one_shot_decode_on_arbitrary_ids() {
        use duet_model::tiny::TinyArch;
        use proptest::prelude::*;
        let toks = [r1(), distill(TinyArch::Qwen2), distill(TinyArch::Llama)];
        for tok in &toks {
            assert!(tok.byte_vocab().is_some());
        }
        let n = 160_000u32;
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 300,
            ..ProptestConfig::default()
        });
        // Byte-piece ids (single bytes of multi-byte characters) are rare in a uniform draw:
        // mix in low ids, where every byte-level vocabulary keeps its 256 byte tokens.
        let id = prop_oneof![0..n, 0..400u32, 128_790..128_820u32, 151_640..151_670u32];
        runner
            .run(
                &(
                    0..toks.len(),
                    proptest::collection::vec(id, 0..40),
                    any::<bool>(),
                ),
                |(t, ids, skip)| {
                    let tok = &toks[t];
                    let mut d = Detokenizer::new(tok.clone(), &[], skip);
                    prop_assert!(d.pending.is_some());
                    let mut out = String::new();
                    for &id in &ids {
                        out.push_str(&d.push(id).unwrap());
                    }
                    out.push_str(&d.finish().unwrap());
                    prop_assert_eq!(out, tok.decode(&ids, skip).unwrap());
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn unfinished_character_is_flushed_at_finish() {
        let tok = r1();
        let ids = tok.encode("🦀", false).unwrap();
        assert!(ids.len() > 1);
        let mut d = Detokenizer::new(tok.clone(), &[], true);
        assert_eq!(d.push(ids[0]).unwrap(), "");
        assert_eq!(d.finish().unwrap(), tok.decode(&ids[..1], true).unwrap());
    }
}
