//! Distributed traces: one OpenTelemetry trace per request across the gateway, prefill and decode
//! processes (W3C Trace Context, <https://www.w3.org/TR/trace-context/>).
//!
//! Spans are `tracing` spans of the target [`TARGET`]; the binary installs the
//! `tracing-opentelemetry` layer (OTLP exporter) for that target only when tracing is configured.
//! Without it every such span is disabled at its callsite, so tracing off costs one cached
//! interest check per span site, and no context travels ([`TraceCtx::of`] is `None`).
//!
//! The context of a sequence travels in its job ([`crate::seq::SeqJob::trace`]), across processes
//! inside the control messages (`remote::wire::WireTrace`). Workers open their spans only for a
//! job whose context is sampled, so a request the gateway's sampler dropped costs the workers
//! nothing. A decode step serves many sequences: its span is a root of its own, linked to each
//! traced sequence it advanced.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span meant for the trace exporter.
pub const TARGET: &str = "duet_trace";

/// A span for the trace exporter (target [`TARGET`], level INFO); fields as `tracing::info_span!`.
#[macro_export]
macro_rules! trace_span {
    (parent: $parent:expr, $name:literal $($fields:tt)*) => {
        tracing::info_span!(target: "duet_trace", parent: $parent, $name $($fields)*)
    };
    ($name:literal $($fields:tt)*) => {
        tracing::info_span!(target: "duet_trace", $name $($fields)*)
    };
}

/// Where a sequence's work joins its trace: the trace, the span its work is a child of, and the
/// W3C trace flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// `traceparent` is 55 characters in version 00; later versions may append fields.
const TRACEPARENT_BYTES_MAX: usize = 512;

impl TraceCtx {
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Parses a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`); `None` for anything
    /// malformed, an all-zero id, or version `ff` (the recommendation: start a new trace).
    pub fn parse_traceparent(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() > TRACEPARENT_BYTES_MAX || !s.is_ascii() {
            return None;
        }
        let mut parts = s.split('-');
        let version = hex_array::<1>(parts.next()?)?[0];
        let trace_id = hex_array::<16>(parts.next()?)?;
        let span_id = hex_array::<8>(parts.next()?)?;
        let flags = hex_array::<1>(parts.next()?)?[0];
        // Version 00 has exactly four fields; a later version may have more.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The context of `span` as its children in other processes see it; `None` when the span is
    /// disabled (tracing off) or its trace is not sampled.
    pub fn of(span: &tracing::Span) -> Option<Self> {
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.is_valid() && sc.is_sampled()).then(|| Self {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        })
    }

    fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        )
    }

    /// Makes `span` a child of this context (its parent lives in another process or actor).
    pub fn adopt(&self, span: &tracing::Span) {
        let cx = opentelemetry::Context::new().with_remote_span_context(self.span_context());
        // Fails only when the span already started; every caller passes a span it just made.
        let _ = span.set_parent(cx);
    }

    /// Links `span` to this context (a span that serves many sequences: a decode step).
    pub fn link(&self, span: &tracing::Span) {
        span.add_link(self.span_context());
    }
}

/// Whether a trace exporter listens (the binary installed it): one cached callsite check, for
/// loops that would otherwise look up every sequence's context each step.
pub fn enabled() -> bool {
    tracing::enabled!(target: "duet_trace", tracing::Level::INFO)
}

/// A span made by `make` as a child of `ctx`, or a disabled span when `ctx` is absent or not
/// sampled (then `make` is not called).
pub fn child_span(ctx: Option<TraceCtx>, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    match ctx {
        Some(c) if c.sampled() => {
            let span = make();
            c.adopt(&span);
            span
        }
        _ => tracing::Span::none(),
    }
}

/// The traced sequences a worker holds between messages (a decode group from reservation to
/// handoff: its KV frames carry no context of their own), each with its open span. Bounded:
/// past [`TRACED_SEQS_MAX`] the oldest sequence (lowest id: ids grow) stops being traced here,
/// so a path that never removes an entry costs a bounded amount.
#[derive(Default)]
pub struct TracedSeqs {
    spans: std::collections::BTreeMap<u64, tracing::Span>,
}

/// More than a decode group's reservation queue and running batch together hold.
pub const TRACED_SEQS_MAX: usize = 4096;

impl TracedSeqs {
    /// Keeps `span` open for `seq` until [`Self::remove`].
    pub fn insert(&mut self, seq: u64, span: tracing::Span) {
        if self.spans.len() >= TRACED_SEQS_MAX {
            self.spans.pop_first();
        }
        self.spans.insert(seq, span);
    }

    pub fn span(&self, seq: u64) -> Option<&tracing::Span> {
        self.spans.get(&seq)
    }

    /// Forgets `seq`; its span closes when the returned handle drops.
    pub fn remove(&mut self, seq: u64) -> Option<tracing::Span> {
        self.spans.remove(&seq)
    }
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        // Lower-case hex only, as the W3C grammar says.
        let hi = hex_digit(s.as_bytes()[2 * i])?;
        let lo = hex_digit(s.as_bytes()[2 * i + 1])?;
        *b = hi << 4 | lo;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_w3c_example() {
        let c =
            TraceCtx::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                .unwrap();
        assert_eq!(c.trace_id[0], 0x0a);
        assert_eq!(c.span_id[7], 0x31);
        assert!(c.sampled());
        let c =
            TraceCtx::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
                .unwrap();
        assert!(!c.sampled());
    }

    #[test]
    fn refuses_malformed_headers() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01",
            "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-001",
        ] {
            assert_eq!(TraceCtx::parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            TraceCtx::parse_traceparent(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what"
            )
            .is_some()
        );
    }

    #[test]
    fn no_span_no_context() {
        // No trace layer installed in unit tests: spans are disabled and carry nothing.
        let span = crate::trace_span!("t");
        assert_eq!(TraceCtx::of(&span), None);
        assert!(!enabled());
        assert!(child_span(None, || unreachable!()).is_disabled());
    }

    proptest! {
        /// Header bytes from a client never panic the parser.
        #[test]
        fn arbitrary_headers_never_panic(s in ".{0,80}") {
            let _ = TraceCtx::parse_traceparent(&s);
        }
    }
}
