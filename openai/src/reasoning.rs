//! DeepSeek-R1 reasoning: separates `<think>` … `</think>` from the answer.
//!
//! ## Separation (`separate_reasoning`, SGLang's `--reasoning-parser deepseek-r1`)
//!
//! R1's chat template ends the generation prompt with `<Assistant><think>\n`, so the model's output
//! starts *inside* the reasoning and the first tag it writes is `</think>`; older R1 checkpoints
//! write `<think>` themselves. The caller says which case applies (`starts_in_reasoning`: the
//! rendered prompt ends with `<think>` or `<think>\n`). Rules, chosen to match SGLang's
//! `DeepSeekR1Detector` where it is consistent and to be independent of chunking everywhere:
//!
//! - A `<think>` at the very start of the output (after whitespace only) opens reasoning and is
//!   dropped. Anywhere else `<think>` is ordinary text: SGLang drops the first `<think>` wherever it
//!   is, which would cut a literal tag out of an answer that merely talks about tags.
//! - Whitespace at the start and the end of the reasoning is stripped (SGLang strips both ends when
//!   not streaming and the end when streaming; the `\n` before `</think>` is layout, not thought).
//!   Trailing whitespace is therefore held back until more reasoning text follows it.
//! - Newlines right after `</think>` are stripped (R1 writes `</think>\n\n` before the answer; SGLang
//!   strips all surrounding whitespace of the answer when not streaming). Leading spaces are kept:
//!   they may be code indentation.
//! - Output that ends inside reasoning (no `</think>`, e.g. `max_tokens` reached) is all reasoning,
//!   as SGLang's detector does ("reasoning was truncated before `</think>`").
//! - After `</think>` everything is content; a second block is not parsed.
//!
//! The thinking budget is a logit-level rule on token ids, so it lives with the sampler
//! (`seq::SeqSampler`), not here.

use super::stop::partial_suffix_len;

pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// Text released by one `push`, split into the two channels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReasoningDelta {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Start of an output that is not (yet) in reasoning: waiting to see whether it opens with `<think>`.
    Lead,
    /// Start of the reasoning: stripping whitespace; `think_allowed` while a leading `<think>` may
    /// still be dropped.
    ReasoningLead {
        think_allowed: bool,
    },
    Reasoning,
    /// Just after `</think>`: stripping newlines.
    ContentLead,
    Content,
}

#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    /// Text received but not yet released (partial tags, whitespace whose fate is undecided).
    buf: String,
}

impl ReasoningParser {
    pub fn new(starts_in_reasoning: bool) -> Self {
        let state = if starts_in_reasoning {
            State::ReasoningLead {
                think_allowed: true,
            }
        } else {
            State::Lead
        };
        Self {
            state,
            buf: String::new(),
        }
    }

    /// Whether the text so far leaves the model inside `<think>` (for `finish_reason` bookkeeping
    /// and for the thinking budget's caller).
    pub fn in_reasoning(&self) -> bool {
        matches!(self.state, State::ReasoningLead { .. } | State::Reasoning)
    }

    pub fn push(&mut self, text: &str) -> ReasoningDelta {
        self.buf.push_str(text);
        let mut out = ReasoningDelta::default();
        // Each pass either changes state (at most four times: the states only move forward) or
        // returns, so the loop is bounded.
        loop {
            match self.state {
                State::Lead => {
                    let rest = self
                        .buf
                        .trim_start_matches(|c: char| c.is_ascii_whitespace());
                    if let Some(after) = rest.strip_prefix(THINK_START) {
                        self.buf = after.to_owned();
                        self.state = State::ReasoningLead {
                            think_allowed: false,
                        };
                    } else if THINK_START.starts_with(rest) {
                        return out; // empty or a partial `<think>`: undecided
                    } else {
                        self.state = State::Content;
                    }
                }
                State::ReasoningLead { think_allowed } => {
                    let rest = self
                        .buf
                        .trim_start_matches(|c: char| c.is_ascii_whitespace());
                    if rest.is_empty() {
                        self.buf.clear();
                        return out;
                    }
                    if think_allowed {
                        if let Some(after) = rest.strip_prefix(THINK_START) {
                            self.buf = after.to_owned();
                            self.state = State::ReasoningLead {
                                think_allowed: false,
                            };
                            continue;
                        }
                        if THINK_START.starts_with(rest) {
                            self.buf = rest.to_owned();
                            return out;
                        }
                    }
                    self.buf = rest.to_owned();
                    self.state = State::Reasoning;
                }
                State::Reasoning => {
                    if let Some(p) = self.buf.find(THINK_END) {
                        out.reasoning.push_str(trim_ws_end(&self.buf[..p]));
                        self.buf.drain(..p + THINK_END.len());
                        self.state = State::ContentLead;
                        continue;
                    }
                    let partial = partial_suffix_len(&self.buf, [THINK_END]);
                    let body = &self.buf[..self.buf.len() - partial];
                    // Hold trailing whitespace too: it is stripped if `</think>` follows it.
                    let emit = trim_ws_end(body).len();
                    out.reasoning.push_str(&self.buf[..emit]);
                    self.buf.drain(..emit);
                    return out;
                }
                State::ContentLead => {
                    let rest = self.buf.trim_start_matches(['\n', '\r']);
                    if rest.is_empty() {
                        self.buf.clear();
                        return out;
                    }
                    self.buf = rest.to_owned();
                    self.state = State::Content;
                }
                State::Content => {
                    out.content.push_str(&self.buf);
                    self.buf.clear();
                    return out;
                }
            }
        }
    }

    /// Releases what was held back at the end of generation.
    pub fn finish(&mut self) -> ReasoningDelta {
        let held = std::mem::take(&mut self.buf);
        let mut out = ReasoningDelta::default();
        match self.state {
            // Whitespace and/or an unfinished `<think>`: it never opened reasoning.
            State::Lead | State::Content => out.content = held,
            State::ReasoningLead { .. } => {
                out.reasoning = held
                    .trim_matches(|c: char| c.is_ascii_whitespace())
                    .to_owned();
            }
            // Only the end: the held text starts with whitespace that sits between reasoning text
            // and an unfinished tag.
            State::Reasoning => {
                out.reasoning = held
                    .trim_end_matches(|c: char| c.is_ascii_whitespace())
                    .to_owned();
            }
            State::ContentLead => {}
        }
        self.state = State::Content;
        out
    }
}

/// ASCII whitespace only, as the start is trimmed: Unicode spaces (e.g. U+3000) are text.
fn trim_ws_end(s: &str) -> &str {
    s.trim_end_matches(|c: char| c.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(starts: bool, chunks: &[&str]) -> (String, String) {
        let mut p = ReasoningParser::new(starts);
        let (mut r, mut c) = (String::new(), String::new());
        for ch in chunks {
            let d = p.push(ch);
            r.push_str(&d.reasoning);
            c.push_str(&d.content);
        }
        let d = p.finish();
        r.push_str(&d.reasoning);
        c.push_str(&d.content);
        (r, c)
    }

    fn pair(r: &str, c: &str) -> (String, String) {
        (r.to_owned(), c.to_owned())
    }

    #[test]
    fn r1_prompt_ends_in_think() {
        let out = run(
            true,
            &["Okay, the user", " asks.\n</th", "ink>\n\nParis ", "is."],
        );
        assert_eq!(out, pair("Okay, the user asks.", "Paris is."));
    }

    #[test]
    fn model_writes_think_itself() {
        assert_eq!(
            run(true, &["<think>\nhmm\n</think>\n\nhi"]),
            pair("hmm", "hi")
        );
        assert_eq!(
            run(false, &["  <thi", "nk>hmm</think>hi"]),
            pair("hmm", "hi")
        );
    }

    #[test]
    fn no_reasoning_without_tag() {
        assert_eq!(
            run(false, &["  hello <think> x"]),
            pair("", "  hello <think> x")
        );
        assert_eq!(run(false, &["<thi"]), pair("", "<thi"));
        assert_eq!(run(false, &["<thx"]), pair("", "<thx"));
    }

    #[test]
    fn truncated_reasoning_is_reasoning() {
        assert_eq!(
            run(true, &["step 1\n", "step 2\n\n"]),
            pair("step 1\nstep 2", "")
        );
        assert_eq!(run(true, &["a </thi"]), pair("a </thi", ""));
    }

    #[test]
    fn streaming_releases_text_early() {
        let mut p = ReasoningParser::new(true);
        assert_eq!(p.push("think").reasoning, "think");
        assert_eq!(p.push(" more\n").reasoning, " more");
        assert_eq!(p.push("x").reasoning, "\nx");
        assert!(p.in_reasoning());
        let d = p.push("</think>\n\nA");
        assert_eq!(
            d,
            ReasoningDelta {
                reasoning: String::new(),
                content: "A".into()
            }
        );
        assert!(!p.in_reasoning());
        assert_eq!(p.push("\n").content, "\n");
    }

    #[test]
    fn content_keeps_indentation_and_later_tags() {
        assert_eq!(
            run(true, &["r</think>\n    code</think>"]),
            pair("r", "    code</think>")
        );
    }

    fn split_all(text: &str, cuts: &[usize]) -> Vec<String> {
        let mut pts: Vec<usize> = cuts
            .iter()
            .map(|c| c % (text.len() + 1))
            .filter(|&c| text.is_char_boundary(c))
            .collect();
        pts.sort_unstable();
        let mut out = Vec::new();
        let mut prev = 0;
        for p in pts {
            out.push(text[prev..p].to_owned());
            prev = p;
        }
        out.push(text[prev..].to_owned());
        out
    }

    proptest! {
        #[test]
        fn chunking_does_not_matter(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("<think>".to_string()), Just("</think>".to_string()),
                    Just("\n".to_string()), Just(" ".to_string()), "[a<>/é]{0,3}"
                ], 0..12),
            cuts in proptest::collection::vec(0usize..200, 0..10),
            starts in any::<bool>(),
        ) {
            let text: String = parts.concat();
            let whole = run(starts, &[text.as_str()]);
            let chunks = split_all(&text, &cuts);
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            prop_assert_eq!(run(starts, &chunks), whole.clone());
            // One char at a time, the worst case for held-back state.
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            prop_assert_eq!(run(starts, &chars), whole);
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>(), cut in 0usize..64, starts in any::<bool>()) {
            let chunks = split_all(&text, &[cut]);
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let _ = run(starts, &chunks);
        }
    }
}
