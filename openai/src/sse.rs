//! A client-side Server-Sent Events parser: the subset of the WHATWG "event stream
//! interpretation" algorithm (HTML Living Standard §9.2.6) that servers use.
//!
//! The stream is split into lines at `\r\n`, `\n` or a lone `\r`. A line starting with `:` is a
//! comment. Otherwise the line is `field: value` (one space after the colon is dropped) or a bare
//! `field` with an empty value. `data` appends the value plus `\n` to the data buffer, `event`
//! sets the type, `id` sets the id (ignored when it contains NUL), anything else (`retry`
//! included) is ignored. A blank line dispatches the event with the data's final `\n` removed;
//! a block without any `data` line dispatches nothing. A leading UTF-8 BOM is dropped.
//!
//! Bytes arrive in arbitrary chunks, so a line is buffered until its terminator arrives and is
//! decoded only then: a chunk boundary inside a multi-byte character, or between `\r` and `\n`,
//! changes nothing. Invalid UTF-8 decodes with U+FFFD, as the spec says.
//!
//! One deviation: the spec's "last event ID" persists across events; here `SseEvent::id` is the id
//! given in that event's own block, which is what a client reading OpenAI-style streams wants.
//! The persistent value is [`SseParser::last_event_id`].

/// Longest line buffered while waiting for its terminator, in bytes. A streamed OpenAI chunk
/// carries one token's delta (well under 1 KiB, a few KiB with top logprobs); 4 MiB leaves room
/// for a final chunk with a large tool call while stopping a stream without newlines from growing
/// memory without limit.
pub const LINE_BYTES_MAX: usize = 4 << 20;
/// Largest data buffer of one event (its `data:` lines together), in bytes, for the same reason.
pub const EVENT_DATA_BYTES_MAX: usize = 16 << 20;

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field; `None` means the default type, "message".
    pub event: Option<String>,
    pub data: String,
    /// The `id:` field given in this event's block.
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an SSE line exceeds {bytes_max} bytes without a line ending")]
    LineTooLong { bytes_max: usize },
    #[error("an SSE event's data exceeds {bytes_max} bytes")]
    EventTooLarge { bytes_max: usize },
}

/// Limits of one parser; [`SseLimits::default`] is [`LINE_BYTES_MAX`], [`EVENT_DATA_BYTES_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseLimits {
    pub line_bytes_max: usize,
    pub event_data_bytes_max: usize,
}

impl Default for SseLimits {
    fn default() -> Self {
        Self {
            line_bytes_max: LINE_BYTES_MAX,
            event_data_bytes_max: EVENT_DATA_BYTES_MAX,
        }
    }
}

#[derive(Debug, Default)]
pub struct SseParser {
    limits: SseLimits,
    /// Bytes of the current, unterminated line.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` opening the next chunk belongs to that ending.
    after_cr: bool,
    /// No line has completed yet, so a BOM may still open the stream.
    at_stream_start: bool,
    data: String,
    /// At least one `data` field was seen in the current block.
    has_data: bool,
    event: Option<String>,
    id: Option<String>,
    last_event_id: String,
    /// Set by the first error: the stream's framing is lost, so every later push fails too.
    failed: Option<SseError>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::with_limits(SseLimits::default())
    }

    pub fn with_limits(limits: SseLimits) -> Self {
        Self {
            limits,
            at_stream_start: true,
            ..Self::default()
        }
    }

    /// The spec's "last event ID buffer": the latest `id:` value, kept across events.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Feeds the next bytes of the stream; returns the events they complete, in order. After an
    /// error the parser is spent: this and every later call return that error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        self.push_into(bytes, &mut events)?;
        Ok(events)
    }

    /// As [`SseParser::push`], appending to `events` so a caller can reuse one vector.
    pub fn push_into(
        &mut self,
        mut bytes: &[u8],
        events: &mut Vec<SseEvent>,
    ) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = (&bytes[..end], &bytes[end..]);
            let result = if self.line.is_empty() {
                self.check_line_len(head.len())
                    .and_then(|()| self.line_done(head, events))
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                let r = self
                    .check_line_len(line.len())
                    .and_then(|()| self.line_done(&line, events));
                line.clear();
                self.line = line; // keep the capacity for the next split line
                r
            };
            if let Err(e) = result {
                return Err(self.fail(e));
            }
            let ending = match rest {
                [b'\r', b'\n', ..] => 2,
                [b'\r'] => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            bytes = &rest[ending..];
        }
        if let Err(e) = self.check_line_len(self.line.len() + bytes.len()) {
            return Err(self.fail(e));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn fail(&mut self, e: SseError) -> SseError {
        self.line = Vec::new();
        self.data = String::new();
        self.failed = Some(e.clone());
        e
    }

    fn check_line_len(&self, bytes: usize) -> Result<(), SseError> {
        if bytes > self.limits.line_bytes_max {
            return Err(SseError::LineTooLong {
                bytes_max: self.limits.line_bytes_max,
            });
        }
        Ok(())
    }

    /// Interprets one complete line (without its ending).
    fn line_done(&mut self, mut line: &[u8], events: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if std::mem::take(&mut self.at_stream_start) {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(events);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let v = &line[colon + 1..];
                (&line[..colon], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &line[line.len()..]),
        };
        match field {
            b"data" => {
                let value = String::from_utf8_lossy(value);
                if self.data.len() + value.len() + 1 > self.limits.event_data_bytes_max {
                    return Err(SseError::EventTooLarge {
                        bytes_max: self.limits.event_data_bytes_max,
                    });
                }
                self.data.push_str(&value);
                self.data.push('\n');
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"id" if !value.contains(&0) => {
                let id = String::from_utf8_lossy(value).into_owned();
                self.last_event_id.clone_from(&id);
                self.id = Some(id);
            }
            _ => {} // `retry`, a NUL-bearing `id` and unknown fields are ignored by the spec
        }
        Ok(())
    }

    fn dispatch(&mut self, events: &mut Vec<SseEvent>) {
        let event = self.event.take();
        let id = self.id.take();
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line
        events.push(SseEvent { event, data, id });
    }
}

/// OpenAI's end-of-stream sentinel, `data: [DONE]`.
pub fn is_done(event: &SseEvent) -> bool {
    event.data.trim_ascii() == "[DONE]"
}

/// Writes `event` in the wire form [`SseParser`] reads: one `data:` line per line of `data`
/// (split at `\n`; a `\r` in data would end a line on the wire, so callers must not put one there).
pub fn write_event(out: &mut String, event: &SseEvent) {
    if let Some(e) = &event.event {
        out.push_str("event: ");
        out.push_str(e);
        out.push('\n');
    }
    if let Some(id) = &event.id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    for line in event.data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(d: &str) -> SseEvent {
        SseEvent {
            data: d.into(),
            ..SseEvent::default()
        }
    }

    fn parse_all(bytes: &[u8]) -> Vec<SseEvent> {
        SseParser::new().push(bytes).unwrap()
    }

    /// Parses `bytes` fed in pieces split at `cuts` (sorted, deduplicated, in range).
    fn parse_split(bytes: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            out.extend(p.push(&bytes[start..c]).unwrap());
            start = c;
        }
        out
    }

    fn every_byte(bytes: &[u8]) -> Vec<SseEvent> {
        let cuts: Vec<usize> = (1..bytes.len()).collect();
        parse_split(bytes, &cuts)
    }

    #[test]
    fn openai_stream() {
        let s = b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
        let ev = parse_all(s);
        assert_eq!(
            ev,
            vec![data("{\"a\":1}"), data("{\"a\":2}"), data("[DONE]")]
        );
        assert!(!is_done(&ev[0]));
        assert!(is_done(&ev[2]));
    }

    #[test]
    fn line_endings_all_kinds() {
        for s in [
            &b"event: e\ndata: x\nid: 7\n\n"[..],
            b"event: e\r\ndata: x\r\nid: 7\r\n\r\n",
            b"event: e\rdata: x\rid: 7\r\r",
            b"event: e\r\ndata: x\rid: 7\n\r\n",
        ] {
            let want = vec![SseEvent {
                event: Some("e".into()),
                data: "x".into(),
                id: Some("7".into()),
            }];
            assert_eq!(parse_all(s), want, "{:?}", String::from_utf8_lossy(s));
            assert_eq!(every_byte(s), want, "{:?}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn cr_then_lf_in_the_next_chunk_is_one_ending() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: a\r").unwrap().is_empty());
        // Had the `\n` been a second line ending, this would dispatch an event here.
        assert!(p.push(b"\n").unwrap().is_empty());
        assert_eq!(p.push(b"\r").unwrap(), vec![data("a")]);
        assert!(p.push(b"\n").unwrap().is_empty());
    }

    #[test]
    fn multiline_data_comments_and_spaces() {
        let s = b": keep-alive\ndata:one\ndata:  two\ndata\ndata: \n\n";
        assert_eq!(parse_all(s), vec![data("one\n two\n\n")]);
    }

    #[test]
    fn blocks_without_data_dispatch_nothing() {
        let s = b"event: ping\n\nid: 3\n\n: comment\n\n\n\ndata: x\n\n";
        let ev = parse_all(s);
        // The event type and id of a data-less block do not leak into the next one.
        assert_eq!(ev, vec![data("x")]);
    }

    #[test]
    fn empty_data_line_is_an_event() {
        assert_eq!(parse_all(b"data:\n\n"), vec![data("")]);
    }

    #[test]
    fn unknown_fields_retry_and_nul_ids_are_ignored() {
        let mut p = SseParser::new();
        let ev = p
            .push(b"retry: 100\nfoo: bar\nid: a\0b\ndata: x\n\n")
            .unwrap();
        assert_eq!(ev, vec![data("x")]);
        let ev = p.push(b"id: 9\ndata: y\n\ndata: z\n\n").unwrap();
        assert_eq!(ev[0].id.as_deref(), Some("9"));
        assert_eq!(ev[1].id, None);
        assert_eq!(p.last_event_id(), "9");
    }

    #[test]
    fn bom_is_dropped_even_when_split() {
        let s = b"\xEF\xBB\xBFdata: x\n\n";
        assert_eq!(parse_all(s), vec![data("x")]);
        assert_eq!(every_byte(s), vec![data("x")]);
        // Only at the start of the stream.
        let mut p = SseParser::new();
        p.push(b"data: a\n\n").unwrap();
        let ev = p.push(b"\xEF\xBB\xBFdata: b\n\n").unwrap();
        assert!(
            ev.is_empty(),
            "a mid-stream BOM makes an unknown field name"
        );
    }

    #[test]
    fn unterminated_event_is_not_dispatched() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: x\n").unwrap().is_empty());
        assert!(p.push(b"data: y").unwrap().is_empty());
    }

    #[test]
    fn splits_inside_multibyte_characters() {
        let text = "深度求索 🐳 says 你好👋🏽, stop here</think>!";
        let chunk = format!("{{\"choices\":[{{\"text\":\"{text}\"}}]}}");
        let mut wire = String::new();
        write_event(&mut wire, &data(&chunk));
        write_event(&mut wire, &data("[DONE]"));
        let bytes = wire.as_bytes();
        let want = vec![data(&chunk), data("[DONE]")];
        // Every cut position, and in particular the ones that fall mid-character.
        let mut mid_char_cuts = 0;
        for cut in 1..bytes.len() {
            mid_char_cuts += usize::from(!wire.is_char_boundary(cut));
            assert_eq!(parse_split(bytes, &[cut]), want, "cut at {cut}");
        }
        assert!(mid_char_cuts > 10);
        assert_eq!(every_byte(bytes), want);
        // Inside the stop-string-like payload `</think>` at each of its bytes, pairwise.
        let at = wire.find("</think>").unwrap();
        for a in at..at + 8 {
            for b in a + 1..=at + 8 {
                assert_eq!(parse_split(bytes, &[a, b]), want);
            }
        }
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(parse_all(b"data: a\xFFb\n\n"), vec![data("a\u{FFFD}b")]);
    }

    #[test]
    fn line_bound_is_enforced_and_sticks() {
        let limits = SseLimits {
            line_bytes_max: 16,
            event_data_bytes_max: 1024,
        };
        let mut p = SseParser::with_limits(limits);
        assert!(p.push(b"data: 0123456789").is_ok()); // exactly 16 buffered
        let err = SseError::LineTooLong { bytes_max: 16 };
        assert_eq!(p.push(b"x"), Err(err.clone()));
        assert_eq!(p.push(b"\n\n"), Err(err));
        // A long line split over chunks trips it too, a long complete line as well.
        let mut p = SseParser::with_limits(limits);
        assert!(p.push(b"data: 01234").is_ok());
        assert!(p.push(b"56789abcdef\n").is_err());
        let mut p = SseParser::with_limits(limits);
        assert!(p.push(b"data: 0123456789\n\n").is_ok());
        assert!(p.push(b"data: 0123456789a\n\n").is_err());
    }

    #[test]
    fn event_data_bound() {
        let limits = SseLimits {
            line_bytes_max: 64,
            event_data_bytes_max: 8,
        };
        let mut p = SseParser::with_limits(limits);
        assert!(p.push(b"data: abc\ndata: def\n").is_ok()); // "abc\ndef\n"
        assert_eq!(
            p.push(b"data: g\n"),
            Err(SseError::EventTooLarge { bytes_max: 8 })
        );
    }

    fn field_text() -> impl Strategy<Value = String> {
        // Values without line breaks (they end lines on the wire) and with no leading space
        // (the parser drops one, as the spec does); the rest of Unicode, multi-byte included.
        "[^\r\n ][^\r\n]{0,12}"
    }

    fn event() -> impl Strategy<Value = SseEvent> {
        (
            proptest::option::of(field_text()),
            "[^\r]{0,40}",
            proptest::option::of("[^\r\n\0 ][^\r\n\0]{0,8}"),
        )
            .prop_map(|(event, data, id)| SseEvent { event, data, id })
    }

    fn ending() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("\n"), Just("\r\n"), Just("\r")]
    }

    /// Serialises with the given line ending and a comment between events.
    fn serialise(events: &[SseEvent], eol: &str) -> Vec<u8> {
        let mut s = String::new();
        for e in events {
            write_event(&mut s, e);
            s.push_str(": comment\n");
        }
        s.replace('\n', eol).into_bytes()
    }

    proptest! {
        #[test]
        fn roundtrip_any_chunking(
            events in proptest::collection::vec(event(), 0..8),
            eol in ending(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let bytes = serialise(&events, eol);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            prop_assert_eq!(&parse_split(&bytes, &cuts), &events);
            prop_assert_eq!(&every_byte(&bytes), &events);
            prop_assert_eq!(&parse_all(&bytes), &events);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            cut in any::<prop::sample::Index>(),
        ) {
            let limits = SseLimits { line_bytes_max: 64, event_data_bytes_max: 128 };
            let mut p = SseParser::with_limits(limits);
            let c = cut.index(bytes.len() + 1);
            let _ = p.push(&bytes[..c]);
            let _ = p.push(&bytes[c..]);
            let _ = SseParser::new().push(&bytes);
        }
    }
}
