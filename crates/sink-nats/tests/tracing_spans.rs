//! Every event gets a `jetsink.event` span with its CloudEvent id; the driver's per-event records
//! are emitted inside it, and the span records the stream sequence once the event is stored.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use common::{builder, event, send_all, server};
use sink_testkit::ServerVersion;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// What the layer saw of one `jetsink.event` span.
#[derive(Debug, Default, Clone)]
struct SpanSeen {
    ce_id: String,
    stream_seq: Option<u64>,
    /// Messages of the events recorded inside the span.
    events: Vec<String>,
}

#[derive(Default)]
struct Seen {
    spans: HashMap<u64, SpanSeen>,
}

impl Seen {
    fn by_ce_id(&self, id: &str) -> Vec<SpanSeen> {
        self.spans
            .values()
            .filter(|s| s.ce_id == id)
            .cloned()
            .collect()
    }
}

/// Collects span fields and the messages of events inside those spans.
struct Collect(Arc<Mutex<Seen>>);

#[derive(Default)]
struct Fields {
    ce_id: Option<String>,
    stream_seq: Option<u64>,
    message: Option<String>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "stream_seq" {
            self.stream_seq = Some(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "ce.id" => self.ce_id = Some(format!("{value:?}")),
            "message" => self.message = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Collect {
    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        metadata.target().starts_with("sink_nats")
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() != "jetsink.event" {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        self.0.lock().unwrap().spans.insert(
            id.into_u64(),
            SpanSeen {
                ce_id: fields.ce_id.unwrap_or_default(),
                ..SpanSeen::default()
            },
        );
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        if let Some(span) = self.0.lock().unwrap().spans.get_mut(&id.into_u64()) {
            span.stream_seq = fields.stream_seq.or(span.stream_seq);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some(seen) = self.0.lock().unwrap().spans.get_mut(&span.id().into_u64()) {
            seen.events.push(fields.message.unwrap_or_default());
        }
    }
}

/// One collector for the whole test binary (a global default can be set once).
fn collector() -> Arc<Mutex<Seen>> {
    static SEEN: OnceLock<Arc<Mutex<Seen>>> = OnceLock::new();
    SEEN.get_or_init(|| {
        let seen = Arc::new(Mutex::new(Seen::default()));
        tracing_subscriber::registry()
            .with(Collect(seen.clone()))
            .init();
        seen
    })
    .clone()
}

async fn spans_carry_the_cloudevent_id(version: ServerVersion) {
    let seen = collector();
    let server = server(version).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let run = format!("spans-{}", version.as_str());
    let sent = send_all(&sink, &run, 25, 3).await;
    let seen = seen.lock().unwrap();
    for (i, s) in sent.iter().enumerate() {
        let receipt = s.outcome.as_ref().expect("delivered");
        assert_eq!(s.event.id, event(&run, i, 3).id);
        let spans = seen.by_ce_id(&s.event.id);
        assert_eq!(spans.len(), 1, "one span per event: {spans:?}");
        let span = &spans[0];
        assert_eq!(span.stream_seq, receipt.sequence, "{span:?}");
        for message in ["transmit", "delivered"] {
            assert!(
                span.events.iter().any(|m| m == message),
                "no `{message}` record inside the span of {}: {span:?}",
                s.event.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_has_a_span_with_its_id_and_stream_sequence_on_2_9() {
    spans_carry_the_cloudevent_id(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_has_a_span_with_its_id_and_stream_sequence_on_2_15() {
    spans_carry_the_cloudevent_id(ServerVersion::V2_15).await;
}
