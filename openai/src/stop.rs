//! Stop strings over streamed text.
//!
//! Text arrives in arbitrary chunks (one detokenized token at a time, usually). A stop string may be
//! split across chunks, so the matcher holds back the longest tail of what it has seen that is still
//! a prefix of some stop string, and emits the rest at once. When a stop string completes, everything
//! before it is emitted and the stop string itself is not, as OpenAI does.
//!
//! Which stop wins when several occur: the occurrence that *ends* first (ties: the one that starts
//! first, i.e. the longest). That is the only rule a streaming matcher can follow without waiting
//! for text that may never come, and it makes the result independent of how the text is chunked —
//! vLLM and SGLang check stop strings once per token and so effectively follow it too.

/// What one `push` releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text that is safe to send to the client now.
    pub emit: String,
    /// The stop string that matched, when one did; generation should end.
    pub stopped: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text seen but not yet emitted: a tail that may be the start of a stop string.
    held: String,
    /// Set once a stop matched; all later text is dropped.
    done: bool,
}

impl StopMatcher {
    /// Empty stop strings are dropped: they would match before any text and end every request.
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
            done: false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.done
    }

    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.done {
            return StopOutput::default();
        }
        if self.stops.is_empty() {
            return StopOutput {
                emit: text.to_owned(),
                stopped: None,
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        if let Some((start, stop)) = first_match(&buf, &self.stops) {
            self.done = true;
            buf.truncate(start);
            return StopOutput {
                emit: buf,
                stopped: Some(stop.to_owned()),
            };
        }
        let keep = partial_suffix_len(&buf, self.stops.iter().map(String::as_str));
        self.held = buf.split_off(buf.len() - keep);
        StopOutput {
            emit: buf,
            stopped: None,
        }
    }

    /// The held-back tail, at the end of generation (it never completed a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The earliest-ending occurrence of any stop in `text` (ties: earliest start), as (start, stop).
fn first_match<'a>(text: &str, stops: &'a [String]) -> Option<(usize, &'a str)> {
    let mut best: Option<(usize, usize, &str)> = None; // (end, start, stop)
    for stop in stops {
        // A stop's first occurrence is also its earliest-ending one: all have the same length.
        if let Some(start) = text.find(stop.as_str()) {
            let cand = (start + stop.len(), start, stop.as_str());
            if best.is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                best = Some(cand);
            }
        }
    }
    best.map(|(_, start, stop)| (start, stop))
}

/// Length in bytes of the longest suffix of `text` that is a proper, non-empty prefix of one of
/// `markers`. Such a suffix always starts on a char boundary: a marker is valid UTF-8, so its
/// prefixes start with a char's first byte. Shared by the reasoning and tool-call parsers, which
/// hold back partial markers the same way.
pub(crate) fn partial_suffix_len<'a>(
    text: &str,
    markers: impl IntoIterator<Item = &'a str>,
) -> usize {
    let mut best = 0;
    for m in markers {
        // Only suffixes shorter than the marker can be proper prefixes of it.
        let max = m.len().saturating_sub(1).min(text.len());
        for len in (best + 1..=max).rev() {
            let start = text.len() - len;
            if text.is_char_boundary(start) && m.starts_with(&text[start..]) {
                best = len;
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        let mut stopped = None;
        for c in chunks {
            let o = m.push(c);
            out.push_str(&o.emit);
            if o.stopped.is_some() {
                stopped = o.stopped;
            }
        }
        out.push_str(&m.finish());
        (out, stopped)
    }

    /// The reference: scan end positions in order, as a per-character streamer would.
    fn reference(stops: &[&str], text: &str) -> (String, Option<String>) {
        let stops: Vec<&str> = stops.iter().copied().filter(|s| !s.is_empty()).collect();
        for end in 0..=text.len() {
            if !text.is_char_boundary(end) {
                continue;
            }
            let best = stops
                .iter()
                .filter(|s| text[..end].ends_with(**s))
                .max_by_key(|s| s.len());
            if let Some(s) = best {
                return (text[..end - s.len()].to_owned(), Some((*s).to_owned()));
            }
        }
        (text.to_owned(), None)
    }

    #[test]
    fn stop_split_across_chunks_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("hello ST").emit, "hello ");
        let o = m.push("OP world");
        assert_eq!(o.emit, "");
        assert_eq!(o.stopped.as_deref(), Some("STOP"));
        assert_eq!(m.push("more").emit, "");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["</end>".into()]);
        assert_eq!(m.push("a </e").emit, "a ");
        assert_eq!(m.push("x").emit, "</ex");
        assert_eq!(m.push("</").emit, "");
        assert_eq!(m.finish(), "</");
    }

    #[test]
    fn earliest_end_wins() {
        assert_eq!(
            run(&["abcd", "bc"], &["abcd"]),
            ("a".into(), Some("bc".into()))
        );
        assert_eq!(run(&["b", "ab"], &["xab"]), ("x".into(), Some("ab".into())));
    }

    #[test]
    fn multibyte_stop_and_text() {
        assert_eq!(
            run(&["。"], &["你好", "。再见"]),
            ("你好".into(), Some("。".into()))
        );
        assert_eq!(run(&["🙂x"], &["a🙂", "🙂y"]), ("a🙂🙂y".into(), None));
    }

    #[test]
    fn empty_stops_are_ignored() {
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), None));
    }

    fn chunked(text: &str, cuts: &[usize]) -> Vec<String> {
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|c| c % (text.len() + 1))
            .filter(|&c| text.is_char_boundary(c))
            .collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut prev = 0;
        for p in points {
            out.push(text[prev..p].to_owned());
            prev = p;
        }
        out.push(text[prev..].to_owned());
        out
    }

    proptest! {
        #[test]
        fn any_chunking_matches_reference(
            text in "[ab😀。x]{0,24}",
            stops in proptest::collection::vec("[ab😀。]{0,3}", 0..4),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            let chunks = chunked(&text, &cuts);
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            prop_assert_eq!(run(&stops, &chunks), reference(&stops, &text));
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>(), stop in any::<String>(), cut in 0usize..64) {
            let chunks = chunked(&text, &[cut]);
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let _ = run(&[stop.as_str()], &chunks);
        }
    }
}
