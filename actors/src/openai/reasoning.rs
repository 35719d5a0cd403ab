//! DeepSeek-R1 reasoning: separates `<think>` … `</think>` from the answer, and the thinking budget.
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
//! ## Thinking budget (the SGLang DeepSeek guide's `ThinkingBudgetLogitProcessor`)
//!
//! See [`ThinkingBudget`].

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

/// Caps the number of reasoning tokens, mirroring the SGLang DeepSeek guide's
/// `ThinkingBudgetLogitProcessor`:
///
/// - It counts `len(cur_ids) - cur_ids.index(<think>)` where `cur_ids` is prompt + output: the
///   `<think>` token itself and every token after it, *including prompt tokens* (R1's prompt ends
///   with `<think>` `\n`, which is 2 tokens before the first generated one).
/// - Once that count reaches the budget, it forces `\n` unless the last token already is `\n`,
///   then forces `</think>`.
/// - It does nothing when no `<think>` was seen or once a `</think>` was.
///
/// Differences, both at edges the Python does not handle: with no output yet the Python would
/// index `output_ids[-1]` of an empty list; here `last_token` is the prompt's last token then.
/// And the Python scans all ids every step; here the caller reports each step's last token, so a
/// step that appends several tokens (speculative decoding) must report them all via
/// [`ThinkingBudget::observe`].
#[derive(Debug, Clone)]
pub struct ThinkingBudget {
    budget: usize,
    think_end_id: u32,
    newline_id: u32,
    /// `<think>`'s id, when the model may open reasoning itself.
    think_start_id: Option<u32>,
    /// Position of `<think>` relative to the first generated token (negative: in the prompt).
    start: Option<i64>,
    ended: bool,
    /// Number of generated tokens already looked at, so repeated calls do not re-count.
    seen: usize,
}

impl ThinkingBudget {
    /// For a prompt that ends inside reasoning with `<think>` as its last token. Use
    /// [`Self::prompt_tokens_in_thinking`] when more prompt tokens follow `<think>` (R1: `<think>\n`).
    pub fn new(budget: usize, think_end_id: u32, newline_id: u32) -> Self {
        Self {
            budget,
            think_end_id,
            newline_id,
            think_start_id: None,
            start: Some(-1),
            ended: false,
            seen: 0,
        }
    }

    /// `n` = the prompt's tokens from `<think>` (inclusive) to its end: 2 for R1's `<think>\n`.
    pub fn prompt_tokens_in_thinking(mut self, n: usize) -> Self {
        self.start = Some(-(n as i64));
        self
    }

    /// For a prompt without `<think>`: the budget starts counting when the model writes `<think>`.
    pub fn opened_by_model(
        budget: usize,
        think_start_id: u32,
        think_end_id: u32,
        newline_id: u32,
    ) -> Self {
        Self {
            budget,
            think_end_id,
            newline_id,
            think_start_id: Some(think_start_id),
            start: None,
            ended: false,
            seen: 0,
        }
    }

    /// Records generated token number `position` (0-based). Calls for positions already seen are
    /// ignored.
    pub fn observe(&mut self, position: usize, token: u32) {
        if position < self.seen {
            return;
        }
        self.seen = position + 1;
        // The seed stops for any `</think>` in the ids, even one before `<think>`.
        if token == self.think_end_id {
            self.ended = true;
        } else if self.start.is_none() && Some(token) == self.think_start_id {
            self.start = Some(position as i64);
        }
    }

    /// The token the sampler must produce next, if the budget forces one. `generated_so_far` is the
    /// number of tokens generated; `last_token` the last of them (the prompt's last token when none).
    pub fn forced_next(&mut self, generated_so_far: usize, last_token: u32) -> Option<u32> {
        if generated_so_far > 0 {
            self.observe(generated_so_far - 1, last_token);
        }
        if self.ended {
            return None;
        }
        let start = self.start?;
        // len(cur_ids) - start_index, with cur_ids indexed from the first generated token.
        let in_thinking = generated_so_far as i64 - start;
        if in_thinking < self.budget as i64 {
            return None;
        }
        if last_token != self.newline_id {
            Some(self.newline_id)
        } else {
            Some(self.think_end_id)
        }
    }
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

    const THINK: u32 = 128798;
    const END: u32 = 128799;
    const NL: u32 = 201;

    /// Drives a budget with a "model" that would never stop thinking (always says token 7).
    fn drive(mut b: ThinkingBudget, prompt_last: u32, steps: usize) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for _ in 0..steps {
            let last = out.last().copied().unwrap_or(prompt_last);
            let next = b.forced_next(out.len(), last).unwrap_or(7);
            out.push(next);
        }
        out
    }

    #[test]
    fn budget_counts_prompt_think_tokens_like_the_seed() {
        // Prompt "...<think>\n": count = 2 + generated. Budget 5: 3 free tokens, then force.
        let b = ThinkingBudget::new(5, END, NL).prompt_tokens_in_thinking(2);
        assert_eq!(drive(b, NL, 7), vec![7, 7, 7, NL, END, 7, 7]);
    }

    #[test]
    fn budget_skips_newline_when_last_token_is_newline() {
        let mut b = ThinkingBudget::new(2, END, NL).prompt_tokens_in_thinking(2);
        // Budget already met at the first step and the prompt ends with "\n": close at once.
        assert_eq!(b.forced_next(0, NL), Some(END));
        assert_eq!(b.forced_next(1, END), None);
        assert_eq!(b.forced_next(2, 7), None);
    }

    #[test]
    fn budget_is_idle_after_natural_end() {
        let mut b = ThinkingBudget::new(4, END, NL).prompt_tokens_in_thinking(2);
        assert_eq!(b.forced_next(0, NL), None);
        assert_eq!(b.forced_next(1, END), None);
        assert_eq!(b.forced_next(2, 7), None);
        assert_eq!(b.forced_next(3, 7), None);
    }

    #[test]
    fn budget_waits_for_model_to_open_thinking() {
        let mut b = ThinkingBudget::opened_by_model(3, THINK, END, NL);
        assert_eq!(b.forced_next(1, 7), None);
        assert_eq!(b.forced_next(2, THINK), None); // <think> at position 1: count 1
        assert_eq!(b.forced_next(3, 7), None); // count 2
        assert_eq!(b.forced_next(4, 7), Some(NL)); // count 3 = budget
        assert_eq!(b.forced_next(5, NL), Some(END));
        assert_eq!(b.forced_next(6, END), None);
    }

    #[test]
    fn budget_zero_closes_immediately() {
        let b = ThinkingBudget::new(0, END, NL);
        assert_eq!(drive(b, THINK, 3), vec![NL, END, 7]);
    }
}
