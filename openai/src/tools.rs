//! DeepSeek-V3/R1 tool calls in generated text (SGLang's `--tool-call-parser deepseekv3`).
//!
//! The syntax, as the V3 and R1 chat templates write an assistant's tool calls
//! (/work/shared/fixtures/tokenizers/deepseek-{v3,r1}/tokenizer_config.json):
//!
//! ```text
//! [content]<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
//!          \n<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME2\n```json\nARGS2\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ```
//!
//! The markers are single tokens of the tokenizer (added, not special), so they reach the parser
//! whole or, when text is pushed in pieces smaller than a token, as prefixes that are held back.
//!
//! Streaming follows the SGLang guide's example: a call's name is announced first
//! ([`ToolEvent::Start`], which the gateway sends with empty `arguments`), then the argument text
//! in fragments as it is generated ([`ToolEvent::Args`]). The `\n```` fence and the markers never
//! reach the argument string: it is exactly the JSON the model wrote.
//!
//! Malformed text never panics and is never silently lost where it could matter:
//! - Markup that has not yet produced a call name (`<｜tool▁calls▁begin｜>`, a call header, a name
//!   line longer than [`NAME_BYTES_MAX`]) is given back as content when it turns out malformed or
//!   the text ends. A call that was announced stays a call: its `Start` has already been streamed.
//!   Its arguments are whatever the model wrote before the text ended (`finish_reason` says
//!   "length" in that case).
//! - Non-whitespace text between calls, or after a call's closing fence, ends the calls block and
//!   is content.
//! - Accepted leniencies: `<｜tool▁call▁begin｜>` without `<｜tool▁calls▁begin｜>`, a missing or
//!   differently tagged fence, a missing `<｜tool▁call▁end｜>` (the next marker closes the call).

use super::stop::partial_suffix_len;

pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
pub const SEP: &str = "<｜tool▁sep｜>";
const FENCE_OPEN: &str = "```";
/// Closes the arguments. Valid JSON cannot contain it: newlines inside strings are escaped.
const FENCE_CLOSE: &str = "\n```";

/// Bound on the call type between `<｜tool▁call▁begin｜>` and `<｜tool▁sep｜>` (always "function").
const HEADER_BYTES_MAX: usize = 32;
/// Bound on a function name line. OpenAI limits names to 64 characters; 4 bytes per character
/// covers any script.
pub const NAME_BYTES_MAX: usize = 256;
/// Bound on the fence line "```json": a language tag longer than this is not a fence line.
const FENCE_LINE_BYTES_MAX: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    Start {
        index: usize,
        id: String,
        name: String,
    },
    Args {
        index: usize,
        delta: String,
    },
}

/// One call, for non-streaming responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub index: usize,
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Content,
    /// Inside `<｜tool▁calls▁begin｜>`, between calls.
    Between,
    /// After `<｜tool▁call▁begin｜>`, before `<｜tool▁sep｜>`.
    Header,
    /// After `<｜tool▁sep｜>`, before the newline that ends the name.
    Name,
    /// After the name line: an optional "```json" line.
    Fence,
    Args,
    /// After the closing fence, before `<｜tool▁call▁end｜>`.
    AfterArgs,
}

#[derive(Debug, Clone)]
pub struct ToolCallParser {
    state: State,
    buf: String,
    /// Markup consumed since the last call was announced; becomes content again if no call follows.
    pending_raw: String,
    calls: Vec<ToolCall>,
    id_prefix: String,
}

/// What a step of the state machine decided.
enum Step {
    Continue,
    NeedMore,
}

impl Default for ToolCallParser {
    fn default() -> Self {
        Self::new("call_")
    }
}

impl ToolCallParser {
    /// Call ids are `id_prefix` + the call's index; the gateway passes e.g. `call_<request id>_` so
    /// ids are deterministic and unique per request.
    pub fn new(id_prefix: impl Into<String>) -> Self {
        Self {
            state: State::Content,
            buf: String::new(),
            pending_raw: String::new(),
            calls: Vec::new(),
            id_prefix: id_prefix.into(),
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        let mut events = Vec::new();
        // Every `Continue` consumes text or moves to a state that will, so the loop ends.
        while let Step::Continue = self.step(&mut events) {}
        events
    }

    /// Releases held-back text at the end of generation (see the module doc for what becomes of
    /// unfinished markup).
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut events = Vec::new();
        let held = std::mem::take(&mut self.buf);
        match self.state {
            State::Content | State::Between | State::Header | State::Name => {
                let mut raw = std::mem::take(&mut self.pending_raw);
                raw.push_str(&held);
                emit_content(&mut events, &raw);
            }
            State::Args => self.emit_args(&mut events, &held),
            // A partial fence or marker after a call has been announced carries nothing.
            State::Fence | State::AfterArgs => {}
        }
        self.state = State::Content;
        events
    }

    /// Every call announced so far, with the arguments received so far.
    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    /// Whether the response should finish with `finish_reason: "tool_calls"`.
    pub fn had_calls(&self) -> bool {
        !self.calls.is_empty()
    }

    fn step(&mut self, ev: &mut Vec<ToolEvent>) -> Step {
        match self.state {
            State::Content => self.step_content(ev),
            State::Between => self.step_between(ev),
            State::Header => self.step_header(ev),
            State::Name => self.step_name(ev),
            State::Fence => self.step_fence(),
            State::Args => self.step_args(ev),
            State::AfterArgs => self.step_after_args(),
        }
    }

    fn step_content(&mut self, ev: &mut Vec<ToolEvent>) -> Step {
        match earliest(&self.buf, &[CALLS_BEGIN, CALL_BEGIN]) {
            Some((p, m)) => {
                emit_content(ev, &self.buf[..p]);
                self.buf.drain(..p + m.len());
                self.pending_raw = m.to_owned();
                self.state = if m == CALLS_BEGIN {
                    State::Between
                } else {
                    State::Header
                };
                Step::Continue
            }
            None => {
                let keep = partial_suffix_len(&self.buf, [CALLS_BEGIN, CALL_BEGIN]);
                let cut = self.buf.len() - keep;
                emit_content(ev, &self.buf[..cut]);
                self.buf.drain(..cut);
                Step::NeedMore
            }
        }
    }

    fn step_between(&mut self, ev: &mut Vec<ToolEvent>) -> Step {
        let ws = leading_ws(&self.buf);
        self.pending_raw.push_str(&self.buf[..ws]);
        self.buf.drain(..ws);
        if self.take_prefix(CALL_BEGIN) {
            self.pending_raw.push_str(CALL_BEGIN);
            self.state = State::Header;
        } else if self.take_prefix(CALLS_END) {
            // A finished (or empty) block: nothing of it is content.
            self.pending_raw.clear();
            self.state = State::Content;
        } else if self.buf.is_empty()
            || is_proper_prefix_of_any(&self.buf, &[CALL_BEGIN, CALLS_END])
        {
            return Step::NeedMore;
        } else {
            self.reject(ev);
        }
        Step::Continue
    }

    fn step_header(&mut self, ev: &mut Vec<ToolEvent>) -> Step {
        match find_bounded(&self.buf, SEP, HEADER_BYTES_MAX) {
            Bounded::Found(p) => {
                self.pending_raw.push_str(&self.buf[..p + SEP.len()]);
                self.buf.drain(..p + SEP.len());
                self.state = State::Name;
                Step::Continue
            }
            Bounded::TooLong => {
                self.reject(ev);
                Step::Continue
            }
            Bounded::NotYet => Step::NeedMore,
        }
    }

    fn step_name(&mut self, ev: &mut Vec<ToolEvent>) -> Step {
        match find_bounded(&self.buf, "\n", NAME_BYTES_MAX) {
            Bounded::Found(p) => {
                let name = self.buf[..p].trim();
                if name.is_empty() {
                    self.reject(ev);
                    return Step::Continue;
                }
                let index = self.calls.len();
                let call = ToolCall {
                    index,
                    id: format!("{}{index}", self.id_prefix),
                    name: name.to_owned(),
                    arguments: String::new(),
                };
                ev.push(ToolEvent::Start {
                    index,
                    id: call.id.clone(),
                    name: call.name.clone(),
                });
                self.calls.push(call);
                self.pending_raw.clear();
                self.buf.drain(..p + 1);
                self.state = State::Fence;
                Step::Continue
            }
            Bounded::TooLong => {
                self.reject(ev);
                Step::Continue
            }
            Bounded::NotYet => Step::NeedMore,
        }
    }

    fn step_fence(&mut self) -> Step {
        if self.buf.starts_with(FENCE_OPEN) {
            match find_bounded(&self.buf[FENCE_OPEN.len()..], "\n", FENCE_LINE_BYTES_MAX) {
                Bounded::Found(p) => {
                    self.buf.drain(..FENCE_OPEN.len() + p + 1);
                }
                // Not a fence line after all: drop just the backticks, the rest is arguments.
                Bounded::TooLong => {
                    self.buf.drain(..FENCE_OPEN.len());
                }
                Bounded::NotYet => return Step::NeedMore,
            }
        } else if self.buf.is_empty() || FENCE_OPEN.starts_with(self.buf.as_str()) {
            return Step::NeedMore;
        }
        self.state = State::Args;
        Step::Continue
    }

    fn step_args(&mut self, ev: &mut Vec<ToolEvent>) -> Step {
        const ENDS: [&str; 4] = [FENCE_CLOSE, CALL_END, CALLS_END, CALL_BEGIN];
        match earliest(&self.buf, &ENDS) {
            Some((p, m)) => {
                let args = self.buf[..p].to_owned();
                self.emit_args(ev, &args);
                self.buf.drain(..p + m.len());
                self.after_call_marker(m);
                Step::Continue
            }
            None => {
                let keep = partial_suffix_len(&self.buf, ENDS);
                let cut = self.buf.len() - keep;
                let args = self.buf[..cut].to_owned();
                self.emit_args(ev, &args);
                self.buf.drain(..cut);
                Step::NeedMore
            }
        }
    }

    fn step_after_args(&mut self) -> Step {
        const ENDS: [&str; 3] = [CALL_END, CALLS_END, CALL_BEGIN];
        let ws = leading_ws(&self.buf);
        self.buf.drain(..ws);
        if let Some(m) = ENDS.into_iter().find(|m| self.buf.starts_with(m)) {
            self.buf.drain(..m.len());
            self.after_call_marker(m);
        } else if self.buf.is_empty() || is_proper_prefix_of_any(&self.buf, &ENDS) {
            return Step::NeedMore;
        } else {
            // Text after the closing fence: the call is over and this is the answer's text.
            self.state = State::Content;
        }
        Step::Continue
    }

    /// State after a marker that ends a call's arguments.
    fn after_call_marker(&mut self, marker: &str) {
        self.state = match marker {
            FENCE_CLOSE => State::AfterArgs,
            CALL_END => State::Between,
            CALL_BEGIN => {
                self.pending_raw = CALL_BEGIN.to_owned();
                State::Header
            }
            _ => State::Content, // CALLS_END
        };
    }

    /// The markup since the last announced call was not a call: give it back as content and parse
    /// what follows it as content (it may itself open a call).
    fn reject(&mut self, ev: &mut Vec<ToolEvent>) {
        let raw = std::mem::take(&mut self.pending_raw);
        emit_content(ev, &raw);
        self.state = State::Content;
    }

    fn emit_args(&mut self, ev: &mut Vec<ToolEvent>, delta: &str) {
        let Some(call) = self.calls.last_mut() else {
            return; // unreachable by construction: Args follows a Start
        };
        if delta.is_empty() {
            return;
        }
        call.arguments.push_str(delta);
        let index = call.index;
        match ev.last_mut() {
            Some(ToolEvent::Args { index: i, delta: d }) if *i == index => d.push_str(delta),
            _ => ev.push(ToolEvent::Args {
                index,
                delta: delta.to_owned(),
            }),
        }
    }

    fn take_prefix(&mut self, p: &str) -> bool {
        if self.buf.starts_with(p) {
            self.buf.drain(..p.len());
            true
        } else {
            false
        }
    }
}

fn emit_content(ev: &mut Vec<ToolEvent>, text: &str) {
    if text.is_empty() {
        return;
    }
    match ev.last_mut() {
        Some(ToolEvent::Content(c)) => c.push_str(text),
        _ => ev.push(ToolEvent::Content(text.to_owned())),
    }
}

fn leading_ws(s: &str) -> usize {
    s.len() - s.trim_start().len()
}

fn is_proper_prefix_of_any(s: &str, markers: &[&str]) -> bool {
    markers
        .iter()
        .any(|m| m.len() > s.len() && m.starts_with(s))
}

/// The earliest occurrence of any of `markers` (ties: the first listed), as (position, marker).
fn earliest<'a>(s: &str, markers: &[&'a str]) -> Option<(usize, &'a str)> {
    markers
        .iter()
        .filter_map(|m| s.find(m).map(|p| (p, *m)))
        .min_by_key(|(p, _)| *p)
}

enum Bounded {
    Found(usize),
    TooLong,
    NotYet,
}

/// Looks for `marker` starting within the first `max` bytes. The answer depends only on the text,
/// not on how much of it has arrived: "too long" is only said once a marker starting within the
/// bound would already be visible.
fn find_bounded(s: &str, marker: &str, max: usize) -> Bounded {
    match s.find(marker) {
        Some(p) if p <= max => Bounded::Found(p),
        Some(_) => Bounded::TooLong,
        None if s.len() >= max + marker.len() => Bounded::TooLong,
        None => Bounded::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WEATHER: &str = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>query_weather\n```json\n{\"city\": \"Qingdao\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

    /// Content, then per call (name, args), from events — the client's view of the stream.
    fn collect(events: &[ToolEvent]) -> (String, Vec<(String, String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for e in events {
            match e {
                ToolEvent::Content(c) => content.push_str(c),
                ToolEvent::Start { index, id, name } => {
                    assert_eq!(*index, calls.len());
                    calls.push((id.clone(), name.clone(), String::new()));
                }
                ToolEvent::Args { index, delta } => calls[*index].2.push_str(delta),
            }
        }
        (content, calls)
    }

    fn run(chunks: &[&str]) -> (Vec<ToolEvent>, ToolCallParser) {
        let mut p = ToolCallParser::new("call_");
        let mut ev = Vec::new();
        for c in chunks {
            ev.extend(p.push(c));
        }
        ev.extend(p.finish());
        (ev, p)
    }

    fn call(id: &str, name: &str, args: &str) -> (String, String, String) {
        (id.into(), name.into(), args.into())
    }

    #[test]
    fn the_guides_weather_example() {
        let (ev, p) = run(&[WEATHER]);
        assert_eq!(
            collect(&ev),
            (
                String::new(),
                vec![call("call_0", "query_weather", "{\"city\": \"Qingdao\"}")]
            )
        );
        assert!(p.had_calls());
        assert_eq!(p.calls()[0].arguments, "{\"city\": \"Qingdao\"}");
    }

    #[test]
    fn name_first_then_argument_fragments() {
        let mut p = ToolCallParser::new("");
        let head = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>query_weather\n```json\n";
        assert_eq!(
            p.push(head),
            vec![ToolEvent::Start {
                index: 0,
                id: "0".into(),
                name: "query_weather".into()
            }]
        );
        let mut args = String::new();
        for frag in [
            "{\"",
            "city",
            "\": \"",
            "Q",
            "ing",
            "dao",
            "\"}",
            "\n",
            "``",
            "`",
            "<｜tool▁call▁end｜>",
            "<｜tool▁calls▁end｜>",
        ] {
            for e in p.push(frag) {
                match e {
                    ToolEvent::Args { index: 0, delta } => args.push_str(&delta),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(args, "{\"city\": \"Qingdao\"}");
        assert!(p.finish().is_empty());
    }

    #[test]
    fn content_then_two_calls_as_the_template_writes_them() {
        let text = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>a\n```json\n{\"x\": 1}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>b\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (ev, _) = run(&[text]);
        assert_eq!(
            collect(&ev),
            (
                "Let me check.".into(),
                vec![call("call_0", "a", "{\"x\": 1}"), call("call_1", "b", "{}")]
            )
        );
    }

    #[test]
    fn plain_text_is_content() {
        let (ev, p) = run(&["Hello <｜tool", " world"]);
        assert_eq!(collect(&ev), ("Hello <｜tool world".into(), vec![]));
        assert!(!p.had_calls());
    }

    #[test]
    fn unfinished_header_becomes_content() {
        let text = "x<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>na";
        let (ev, p) = run(&[text]);
        assert_eq!(collect(&ev), (text.into(), vec![]));
        assert!(!p.had_calls());
    }

    #[test]
    fn truncated_arguments_stay_a_call() {
        let (ev, p) = run(&[
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": \"b",
        ]);
        assert_eq!(
            collect(&ev),
            (String::new(), vec![call("call_0", "f", "{\"a\": \"b")])
        );
        assert_eq!(p.calls().len(), 1);
    }

    #[test]
    fn overlong_name_is_content() {
        let name = "n".repeat(NAME_BYTES_MAX + 1);
        let text = format!("<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n{{}}");
        let (ev, _) = run(&[&text]);
        assert_eq!(collect(&ev), (text.clone(), vec![]));
    }

    #[test]
    fn text_after_a_call_is_content() {
        let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```\nDone.";
        let (ev, _) = run(&[text]);
        assert_eq!(
            collect(&ev),
            ("Done.".into(), vec![call("call_0", "f", "{}")])
        );
    }

    #[test]
    fn lenient_forms() {
        // No fence, no calls-begin, next call opened without closing the previous one.
        let text = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{\"a\":1}<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```\n[]\n```<｜tool▁calls▁end｜>tail";
        let (ev, _) = run(&[text]);
        assert_eq!(
            collect(&ev),
            (
                "tail".into(),
                vec![call("call_0", "f", "{\"a\":1}"), call("call_1", "g", "[]")]
            )
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

    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(CALLS_BEGIN.to_string()),
            Just(CALLS_END.to_string()),
            Just(CALL_BEGIN.to_string()),
            Just(CALL_END.to_string()),
            Just(SEP.to_string()),
            Just("function".to_string()),
            Just("\n".to_string()),
            Just("```json\n".to_string()),
            Just("\n```".to_string()),
            Just("`".to_string()),
            "[a{}\" é]{0,4}",
        ]
    }

    proptest! {
        #[test]
        fn chunking_does_not_matter(
            parts in proptest::collection::vec(piece(), 0..16),
            cuts in proptest::collection::vec(0usize..400, 0..10),
        ) {
            let text: String = parts.concat();
            let (whole, wp) = run(&[text.as_str()]);
            let whole = collect(&whole);
            let chunks = split_all(&text, &cuts);
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let (ev, p) = run(&chunks);
            prop_assert_eq!(collect(&ev), whole.clone());
            prop_assert_eq!(p.calls(), wp.calls());
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            prop_assert_eq!(collect(&run(&chars).0), whole.clone());
            // Non-streaming view agrees with the streamed one.
            let from_calls: Vec<_> = wp.calls().iter().map(|c| (c.id.clone(), c.name.clone(), c.arguments.clone())).collect();
            prop_assert_eq!(from_calls, whole.1);
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>(), cuts in proptest::collection::vec(0usize..64, 0..4)) {
            let chunks = split_all(&text, &cuts);
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let (ev, _) = run(&chunks);
            // Text without markers is all content, unchanged.
            if !text.contains("<｜tool▁call") {
                prop_assert_eq!(collect(&ev).0, text);
            }
        }
    }
}
