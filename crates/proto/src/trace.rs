//! Trace context: the W3C `traceparent` that names a job's trace, carried from the API call
//! that submitted it to the agents (in the lease) and back (in reports and audit entries).
//!
//! Spans are `tracing` spans. When the process exports them (OpenTelemetry, set up by the
//! `fleetbox` command), [`enter`] puts a span into the trace a `traceparent` names and
//! [`of_span`] reads the ids OpenTelemetry gave it; without an exporter both fall back to the
//! ids Fleetbox keeps itself, so logs and audit entries carry a trace id either way.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The request header that carries a trace into an API call, and the field of a lease.
pub const HEADER: &str = "traceparent";

/// A W3C trace context: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero: the span the next one descends from.
    pub span_id: String,
    pub sampled: bool,
}

impl TraceParent {
    /// Parse a `traceparent` value as W3C Trace Context (level 1) says: version `00` is
    /// exactly four fields; a later version may append fields; `ff` and ids of all zeros are
    /// invalid. `None` for anything else (the caller starts a trace of its own).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim();
        let b = value.as_bytes();
        if b.len() < 55 || !value.is_ascii() {
            return None;
        }
        let (version, trace_id, span_id, flags) =
            (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let lower_hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !lower_hex(version) || version == "ff" || !lower_hex(flags) {
            return None;
        }
        if version == "00" && b.len() != 55 || version != "00" && b.len() > 55 && b[55] != b'-' {
            return None;
        }
        let nonzero = |s: &str| lower_hex(s) && s.bytes().any(|c| c != b'0');
        if !nonzero(trace_id) || !nonzero(span_id) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceParent {
            trace_id: trace_id.to_string(),
            span_id: span_id.to_string(),
            sampled: flags & 1 == 1,
        })
    }

    /// The header value (version `00`).
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    fn span_context(&self) -> Option<SpanContext> {
        let trace = TraceId::from_hex(&self.trace_id).ok()?;
        let span = SpanId::from_hex(&self.span_id).ok()?;
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Some(SpanContext::new(
            trace,
            span,
            flags,
            true,
            TraceState::default(),
        ))
    }
}

/// Put `span`, before it is first entered, into the trace `parent` names (a no-op when the
/// process does not export spans).
pub fn enter(span: &tracing::Span, parent: &TraceParent) {
    if let Some(cx) = parent.span_context() {
        let cx = opentelemetry::Context::new().with_remote_span_context(cx);
        // An error means no exporter, or a span already started: nothing to join either way.
        let _ = span.set_parent(cx);
    }
}

/// The trace and span ids OpenTelemetry gave `span`, when the process exports spans (the
/// span is started by this call).
pub fn of_span(span: &tracing::Span) -> Option<TraceParent> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_string(),
        span_id: sc.span_id().to_string(),
        sampled: sc.is_sampled(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let t = TraceParent::parse(GOOD).unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id, "00f067aa0ba902b7");
        assert!(t.sampled);
        assert_eq!(t.header(), GOOD);
        let unsampled = TraceParent::parse(&GOOD.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn refuses_what_the_spec_calls_invalid() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_may_append_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(TraceParent::parse(later).is_some());
        let glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceParent::parse(glued), None);
    }

    #[test]
    fn without_an_exporter_spans_have_no_otel_ids() {
        let span = tracing::info_span!("x");
        enter(&span, &TraceParent::parse(GOOD).unwrap());
        assert_eq!(of_span(&span), None);
    }
}
