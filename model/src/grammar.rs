//! Constrained decoding: a grammar (a regular expression, a Lark grammar, a JSON schema) turned
//! into a per-step token mask by llguidance (<https://github.com/guidance-ai/llguidance>, the
//! engine vLLM, SGLang and llama.cpp use).
//!
//! The algorithm is llguidance's: an Earley parser over lexemes, each lexeme a derivative-based
//! regular expression; the mask of a step is a walk of the tokenizer's byte trie in which every
//! token is tried against the lexer state and the parser's allowed lexemes. Its cost depends on
//! the grammar and the vocabulary, not on the model (BENCHMARKS.md has the measured figures).
//!
//! The state of a [`GrammarMatcher`] is a function of the grammar and the tokens it consumed, so a
//! sequence that moves between workers or processes carries only its [`GrammarSpec`] and its
//! tokens; the receiving side compiles the spec again and replays the tokens
//! ([`GrammarMatcher::advance`]). Compiling is bounded by [`GRAMMAR_SOURCE_BYTES_MAX`] and by
//! llguidance's fuel limits ([`GrammarCompiler`] sets them), so an outside grammar cannot take
//! unbounded time or memory.

use std::sync::{Arc, OnceLock};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{self, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

/// Bound on a grammar's source text (a regex, a Lark grammar, a JSON schema's text): larger ones
/// are refused before compiling. 64 KiB holds any hand-written schema or a few hundred tools.
pub const GRAMMAR_SOURCE_BYTES_MAX: usize = 64 * 1024;

/// Bound on a compiled grammar's size in symbols (llguidance's `max_grammar_size`, default
/// 500 000): a tenth of the default, still far above what [`GRAMMAR_SOURCE_BYTES_MAX`] of source
/// produces, so the limit that refuses a grammar is the source size, named in the error.
const GRAMMAR_SYMBOLS_MAX: usize = 50_000;

/// What a grammar is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarKind {
    /// A regular expression the whole output matches (SGLang's `regex`).
    Regex,
    /// A Lark grammar in llguidance's dialect (SGLang's `ebnf` after [`gbnf_to_lark`], and the
    /// grammars of forced tool calls).
    Lark,
    /// A JSON schema as JSON text (`response_format`, SGLang's `json_schema`).
    JsonSchema,
}

/// A grammar as it travels with a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrammarSpec {
    pub kind: GrammarKind,
    pub source: String,
    /// The sequence starts inside a reasoning span: the grammar applies to the tokens after the
    /// first of this token (`</think>`) among the generated ones, and nothing is masked before it.
    pub starts_after: Option<u32>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GrammarError {
    #[error("the grammar is {bytes} bytes; at most {max} are accepted")]
    TooLarge { bytes: usize, max: usize },
    #[error("invalid grammar: {0}")]
    Invalid(String),
    #[error("the tokenizer cannot be used for constrained decoding: {0}")]
    Tokenizer(String),
    /// The generated tokens left the grammar (a token the mask forbade was forced in, e.g. by a
    /// thinking budget or `ignore_eos` past the grammar's end).
    #[error("the output left the grammar: {0}")]
    Rejected(String),
}

/// Compiles grammars for one tokenizer. The token trie (every token's bytes) is built on first
/// use, so a server that never sees a grammar never pays for it.
pub struct GrammarCompiler {
    tokenizer_json: Arc<[u8]>,
    eos_ids: Vec<u32>,
    factory: OnceLock<Result<Arc<ParserFactory>, GrammarError>>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// llguidance's view of the tokenizer: the trie of token bytes, and HF tokenization for the
/// text it forces (canonical, so forced text is tokenized as the model would see it).
struct HfTokEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for HfTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            // Not UTF-8 (a prefix ending inside a character): the trie's greedy tokenization.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl GrammarCompiler {
    /// `tokenizer_json`: the checkpoint's tokenizer.json; `eos_ids`: the tokens that end a
    /// sequence, which the mask allows once the grammar is complete (the first is forced).
    pub fn new(tokenizer_json: Arc<[u8]>, eos_ids: Vec<u32>) -> Self {
        Self {
            tokenizer_json,
            eos_ids,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, GrammarError> {
        self.factory
            .get_or_init(|| self.build_factory().map(Arc::new))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build_factory(&self) -> Result<ParserFactory, GrammarError> {
        let err = |e: String| GrammarError::Tokenizer(e);
        let json: serde_json::Value =
            serde_json::from_slice(&self.tokenizer_json).map_err(|e| err(e.to_string()))?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| err(e.to_string()))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&self.tokenizer_json)
            .map_err(|e| err(e.to_string()))?;
        let vocab = words.len().max(tokenizer.get_vocab_size(true));
        words.resize(vocab, vec![]);
        let vocab_u32 = u32::try_from(vocab).map_err(|_| err("vocabulary too large".into()))?;
        let eos = self
            .eos_ids
            .iter()
            .copied()
            .filter(|&t| t < vocab_u32)
            .collect::<Vec<_>>();
        let Some(&first_eos) = eos.first() else {
            return Err(err("no end-of-sequence token in the vocabulary".into()));
        };
        let trie =
            TokTrie::from(&TokRxInfo::new(vocab_u32, first_eos), &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(HfTokEnv { trie, tokenizer });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| err(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            max_grammar_size: GRAMMAR_SYMBOLS_MAX,
            ..ParserLimits::default()
        };
        Ok(factory)
    }

    /// Compiles `spec` into a matcher at the start of the output.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<GrammarMatcher, GrammarError> {
        if spec.source.len() > GRAMMAR_SOURCE_BYTES_MAX {
            return Err(GrammarError::TooLarge {
                bytes: spec.source.len(),
                max: GRAMMAR_SOURCE_BYTES_MAX,
            });
        }
        let grammar = match spec.kind {
            GrammarKind::Regex => TopLevelGrammar::from_regex(&spec.source),
            GrammarKind::Lark => TopLevelGrammar::from_lark(spec.source.clone()),
            GrammarKind::JsonSchema => {
                let schema: serde_json::Value = serde_json::from_str(&spec.source)
                    .map_err(|e| GrammarError::Invalid(format!("the schema is not JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(compact_json(schema))
            }
        };
        let factory = self.factory()?;
        // The grammar comes from outside: a panic inside the compiler (a bug of llguidance's
        // on some input) is that grammar's refusal, not the server's failure.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.create_parser(grammar)
        }))
        .map_err(|_| GrammarError::Invalid("the grammar compiler failed on this grammar".into()))?
        .map_err(|e| GrammarError::Invalid(first_line(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(first_line(&e)));
        }
        Ok(GrammarMatcher {
            matcher,
            consumed: 0,
            vocab: factory.tok_env().tok_trie().vocab_size(),
        })
    }
}

/// A JSON schema whose output is compact: no whitespace between tokens, unless the schema's own
/// `x-guidance` options say otherwise. llguidance's default allows any whitespace, and a model
/// that prefers whitespace (a random one does) would then never finish the object.
pub fn compact_json(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        let opts = obj
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(opts) = opts.as_object_mut() {
            opts.entry("whitespace_flexible")
                .or_insert(serde_json::Value::Bool(false));
        }
    }
    schema
}

/// llguidance's errors carry the grammar and the parser state after the first line; a client
/// needs the first.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// One sequence's position in its grammar.
#[derive(Clone)]
pub struct GrammarMatcher {
    matcher: Matcher,
    /// Tokens of the constrained output consumed so far.
    consumed: usize,
    vocab: usize,
}

impl std::fmt::Debug for GrammarMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarMatcher")
            .field("consumed", &self.consumed)
            .finish()
    }
}

/// The tokens a grammar allows next, one bit per token.
#[derive(Debug, Clone)]
pub struct TokenMask {
    bits: toktrie::SimpleVob,
    vocab: usize,
}

impl GrammarMatcher {
    /// Tokens of the constrained output consumed so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Consumes the tokens of `output` (the whole constrained output so far) it has not seen.
    pub fn advance(&mut self, output: &[u32]) -> Result<(), GrammarError> {
        if output.len() < self.consumed {
            return Err(GrammarError::Rejected(
                "the output is shorter than what the grammar consumed".into(),
            ));
        }
        self.consume(&output[self.consumed..])
    }

    /// Consumes `new`, the tokens that follow those consumed so far.
    pub fn consume(&mut self, new: &[u32]) -> Result<(), GrammarError> {
        if new.is_empty() {
            return Ok(());
        }
        self.matcher
            .consume_tokens(new)
            .map_err(|e| GrammarError::Rejected(first_line(&e.to_string())))?;
        self.consumed += new.len();
        Ok(())
    }

    /// The tokens allowed next (only the end-of-sequence tokens once the grammar is complete).
    /// This is the expensive part of a step: a walk of the token trie.
    pub fn next_mask(&mut self) -> Result<TokenMask, GrammarError> {
        let bits = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Rejected(first_line(&e.to_string())))?;
        Ok(TokenMask {
            bits,
            vocab: self.vocab,
        })
    }

    /// [`Self::next_mask`] applied to `logits`.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        self.next_mask()?.apply(logits);
        Ok(())
    }
}

impl TokenMask {
    /// Sets the logits of every token the mask forbids to −∞. Tokens beyond the tokenizer's
    /// vocabulary (a model's padded embedding rows) are always forbidden.
    pub fn apply(&self, logits: &mut [f32]) {
        let mask = &self.bits;
        // 32 tokens per mask word: whole words are skipped (all allowed) or filled (none).
        let words = mask.as_slice();
        let vocab = self.vocab.min(logits.len());
        let (inside, beyond) = logits.split_at_mut(vocab);
        beyond.fill(f32::NEG_INFINITY);
        for (w, chunk) in inside.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                u32::MAX if chunk.len() == 32 => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (i, v) in chunk.iter_mut().enumerate() {
                        if bits & (1 << i) == 0 {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }
}

impl GrammarMatcher {
    /// The grammar is complete and allows nothing but the end of the sequence.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

/// Translates a GBNF grammar (llama.cpp's and xgrammar's EBNF, the dialect of SGLang's `ebnf`
/// parameter: `root ::= "a" item*`, `[a-z]` classes, `( | )`, `* + ?`, `#` comments) into
/// llguidance's Lark. Rule names are renamed into Lark's lower-case namespace (`root` is `start`);
/// bounded repetition (`{m,n}`) is refused by name rather than guessed.
pub fn gbnf_to_lark(src: &str) -> Result<String, GrammarError> {
    let bad = |m: String| GrammarError::Invalid(format!("ebnf: {m}"));
    let mut out = String::new();
    let mut chars = src.char_indices().peekable();
    let mut rules = 0usize;
    while let Some(&(i, c)) = chars.peek() {
        match c {
            '#' => while chars.next_if(|&(_, c)| c != '\n').is_some() {},
            c if c.is_whitespace() => {
                chars.next();
            }
            ':' if src[i..].starts_with("::=") => {
                for _ in 0..3 {
                    chars.next();
                }
                trim_end_spaces(&mut out);
                out.push_str(": ");
            }
            '"' => {
                chars.next();
                let mut lit = String::new();
                loop {
                    let Some((_, c)) = chars.next() else {
                        return Err(bad("unterminated string".into()));
                    };
                    match c {
                        '"' => break,
                        '\\' => lit.push(gbnf_escape(&mut chars).map_err(bad)?),
                        c => lit.push(c),
                    }
                }
                if lit.is_empty() {
                    return Err(bad("empty string literal".into()));
                }
                out.push_str(&serde_json::Value::String(lit).to_string());
                out.push(' ');
            }
            '[' => {
                chars.next();
                out.push_str("/[");
                loop {
                    let Some((_, c)) = chars.next() else {
                        return Err(bad("unterminated character class".into()));
                    };
                    match c {
                        ']' => break,
                        '/' => out.push_str("\\/"),
                        '\\' => {
                            out.push('\\');
                            let Some((_, e)) = chars.next() else {
                                return Err(bad("unterminated character class".into()));
                            };
                            out.push(e);
                        }
                        c => out.push(c),
                    }
                }
                out.push_str("]/ ");
            }
            '.' => {
                chars.next();
                out.push_str("/(?s:.)/ ");
            }
            '(' | ')' | '|' | '*' | '+' | '?' => {
                chars.next();
                if matches!(c, '*' | '+' | '?') {
                    trim_end_spaces(&mut out);
                }
                out.push(c);
                out.push(' ');
            }
            '{' => return Err(bad("bounded repetition `{m,n}` is not supported".into())),
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                let start = i;
                let mut end = i;
                while let Some((j, c)) =
                    chars.next_if(|&(_, c)| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    end = j + c.len_utf8();
                }
                let name = &src[start..end];
                // A name followed by `::=` starts a rule: one Lark rule per line.
                if src[end..].trim_start().starts_with("::=") {
                    if rules > 0 {
                        out.push('\n');
                    }
                    rules += 1;
                }
                out.push_str(&lark_rule_name(name));
                out.push(' ');
            }
            c => return Err(bad(format!("unexpected `{c}` at byte {i}"))),
        }
    }
    if rules == 0 {
        return Err(bad("no rule (`root ::= ...`)".into()));
    }
    out.push('\n');
    Ok(out)
}

fn trim_end_spaces(s: &mut String) {
    while s.ends_with(' ') {
        s.pop();
    }
}

/// `root` is Lark's `start`; any other name goes to `g_…` with `-` and capitals spelled out, so
/// distinct GBNF names stay distinct and never collide with `start` or a terminal.
fn lark_rule_name(name: &str) -> String {
    if name == "root" {
        return "start".into();
    }
    let mut s = String::from("g_");
    for c in name.chars() {
        match c {
            '-' => s.push_str("_h"),
            c if c.is_ascii_uppercase() => {
                s.push_str("_u");
                s.push(c.to_ascii_lowercase());
            }
            c => s.push(c),
        }
    }
    s
}

/// One escape of a GBNF string after its backslash.
fn gbnf_escape(chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>) -> Result<char, String> {
    let Some((_, e)) = chars.next() else {
        return Err("unterminated escape".into());
    };
    let hex = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>, n: usize| {
        let mut v = 0u32;
        for _ in 0..n {
            let d = chars
                .next()
                .and_then(|(_, c)| c.to_digit(16))
                .ok_or_else(|| "bad hexadecimal escape".to_string())?;
            v = v * 16 + d;
        }
        char::from_u32(v).ok_or_else(|| "escape is not a character".to_string())
    };
    Ok(match e {
        'n' => '\n',
        't' => '\t',
        'r' => '\r',
        'x' => hex(chars, 2)?,
        'u' => hex(chars, 4)?,
        'U' => hex(chars, 8)?,
        c => c,
    })
}

#[cfg(test)]
mod tests;
