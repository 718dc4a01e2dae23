//! Shared helpers for sink-nats integration tests: servers, sinks, events, audits.
#![allow(dead_code)] // each test binary uses a different subset

pub mod scripted;

use std::time::Duration;

use sink_core::event::{CloudEvent, MsgId};
use sink_nats::{JetStreamSink, Receipt, SinkBuilder, StreamPolicy};
use sink_testkit::{read_stream, AuditReport, Expected, NatsServer, ServerOptions, ServerVersion};

pub const STREAM: &str = "EVENTS";
pub const TEMPLATE: &str = "t.events.{tenantId}.v1";

pub async fn server(version: ServerVersion) -> NatsServer {
    NatsServer::start(ServerOptions::version(version))
        .await
        .unwrap_or_else(|e| panic!("cannot start nats-server {version}: {e}"))
}

/// A JetStream context on a client of its own (not the sink's) to `server`.
pub async fn jetstream(server: &NatsServer) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(server.connect().await.expect("client"))
}

/// How many messages `stream` on `server` holds now.
pub async fn stored_count(server: &NatsServer, stream: &str) -> u64 {
    let mut s = jetstream(server)
        .await
        .get_stream(stream)
        .await
        .expect("stream exists");
    s.info().await.expect("stream info").state.messages
}

/// A builder for a sink on `url` that creates its stream, with short timeouts for tests.
pub fn builder(url: &str) -> SinkBuilder {
    JetStreamSink::builder(url)
        .subject_template(TEMPLATE)
        .stream(STREAM)
        .stream_policy(StreamPolicy::Create)
        .ack_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_millis(500))
}

/// Event `i` of a run: ~430 bytes, tenant `tenant-{i % tenants}`.
pub fn event(run: &str, i: usize, tenants: usize) -> CloudEvent {
    CloudEvent::new(
        format!("{run}-{i:08}"),
        format!("/test/{run}"),
        "com.example.test.v1",
    )
    .with_time("2026-11-27T06:00:00Z")
    .with_data_json(serde_json::json!({
        "tenantId": format!("tenant-{}", i % tenants.max(1)),
        "index": i,
        "note": "x".repeat(220),
    }))
}

/// What the sink reported for each event, in send order.
pub struct Sent {
    pub event: CloudEvent,
    pub outcome: Result<Receipt, sink_nats::EmitError>,
}

pub fn expectations(sent: &[Sent], key_by_tenant: bool) -> Vec<Expected> {
    sent.iter()
        .map(|s| Expected {
            msg_id: MsgId::for_event(&s.event).as_str().to_owned(),
            key: if key_by_tenant {
                s.event.tenant_id().unwrap_or_default().to_owned()
            } else {
                String::new()
            },
            reported_sequence: s.outcome.as_ref().ok().map(|r| {
                r.sequence
                    .unwrap_or(sink_core::audit::SEQUENCE_NOT_REPORTED)
            }),
        })
        .collect()
}

/// Reads the stream back and compares it with what the sink reported.
pub async fn audit(url: &str, sent: &[Sent]) -> AuditReport {
    let client = async_nats::connect(url).await.expect("audit connect");
    let js = async_nats::jetstream::new(client);
    let stored = read_stream(&js, STREAM, Duration::from_secs(30))
        .await
        .expect("read stream back");
    sink_testkit::compare(&expectations(sent, false), &stored)
}

/// Sends `n` events pipelined and collects every outcome.
pub async fn send_all(sink: &JetStreamSink, run: &str, n: usize, tenants: usize) -> Vec<Sent> {
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let e = event(run, i, tenants);
        let p = sink.send(e.clone()).await.expect("accepted");
        pending.push((e, p));
    }
    await_outcomes(pending).await
}

/// Panics naming the first event that was not delivered.
#[track_caller]
pub fn assert_all_ok(sent: &[Sent]) {
    for s in sent {
        if let Err(e) = &s.outcome {
            panic!("event {} failed: {e}", s.event.id);
        }
    }
}

/// Awaits every pending outcome in send order, each within the I5 bound.
pub async fn await_outcomes(pending: Vec<(CloudEvent, sink_nats::Pending)>) -> Vec<Sent> {
    let mut sent = Vec::with_capacity(pending.len());
    for (event, p) in pending {
        let outcome = tokio::time::timeout(Duration::from_secs(120), p)
            .await
            .expect("I5: every outcome arrives within 120 s");
        sent.push(Sent { event, outcome });
    }
    sent
}

/// Reconnect/breaker backoff for fault tests: 100 ms doubling, capped at 1 s, so a test sees the
/// sink come back within a second of the fault ending instead of after a long exponential wait.
pub fn fast_reconnect() -> sink_core::backoff::Backoff {
    sink_core::backoff::Backoff {
        cap: Duration::from_secs(1),
        ..sink_core::backoff::Backoff::reconnect_default()
    }
}

/// `127.0.0.1:PORT` of a server, for `FaultProxy::start`.
pub fn upstream_of(server: &NatsServer) -> String {
    format!("127.0.0.1:{}", server.port())
}

/// Reads `stream` back through `client` and compares it with what the sink reported.
pub async fn audit_stream(client: async_nats::Client, stream: &str, sent: &[Sent]) -> AuditReport {
    let js = async_nats::jetstream::new(client);
    let stored = read_stream(&js, stream, Duration::from_secs(30))
        .await
        .expect("read stream back");
    sink_testkit::compare(&expectations(sent, false), &stored)
}

/// Sends `n` events pipelined from a background task (see [`send_all`]).
pub fn spawn_send_all(
    sink: &JetStreamSink,
    run: &str,
    n: usize,
    tenants: usize,
) -> tokio::task::JoinHandle<Vec<Sent>> {
    let sink = sink.clone();
    let run = run.to_owned();
    tokio::spawn(async move { send_all(&sink, &run, n, tenants).await })
}

/// Polls `health().in_flight` until it reaches `at_least` or `timeout` passes; returns the highest
/// value seen (the caller asserts on it).
pub async fn wait_in_flight(sink: &JetStreamSink, at_least: usize, timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut most = 0;
    loop {
        most = most.max(sink.health().in_flight);
        if most >= at_least || tokio::time::Instant::now() >= deadline {
            return most;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Number of events reported delivered.
pub fn delivered_count(sent: &[Sent]) -> usize {
    sent.iter().filter(|s| s.outcome.is_ok()).count()
}

/// Number of events reported delivered with `duplicate: true`.
pub fn duplicate_acks(sent: &[Sent]) -> usize {
    sent.iter()
        .filter(|s| s.outcome.as_ref().is_ok_and(|r| r.duplicate))
        .count()
}

/// Subscribes to everything on `server` (a client of its own) and hands every message to `see`
/// until the returned sender fires; then drains what the server sent before a final flush and
/// returns the state.
pub async fn observe<T: Send + 'static>(
    server: &NatsServer,
    mut state: T,
    mut see: impl FnMut(&mut T, &async_nats::Message) + Send + 'static,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<T>) {
    use futures::{FutureExt, StreamExt};

    let client = server
        .connect_options()
        .subscription_capacity(1 << 20)
        .connect(server.url())
        .await
        .expect("observer connect");
    let mut all = client.subscribe(">").await.expect("subscribe to >");
    client.flush().await.expect("the subscription is in place");
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = all.next() => match msg {
                    Some(msg) => see(&mut state, &msg),
                    None => break,
                },
                _ = &mut stop_rx => {
                    // Everything the server sent before the flush's PONG is in the channel now.
                    let _ = client.flush().await;
                    while let Some(Some(msg)) = all.next().now_or_never() {
                        see(&mut state, &msg);
                    }
                    break;
                }
            }
        }
        state
    });
    (stop_tx, task)
}

/// Whether `msg` is a 429 reply to a fast-batch publish (status 429, or the JSON error 10167).
pub fn is_lane_429(msg: &async_nats::Message) -> bool {
    msg.subject.ends_with(".$FI")
        && (msg.status.map(|s| s.as_u16()) == Some(429)
            || serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .is_ok_and(|v| v["error"]["code"] == 429 || v["error"]["err_code"] == 10167))
}

/// Fast-batch traffic seen by an [`observe`]r counting with [`LaneTraffic::count`].
#[derive(Debug, Default)]
pub struct LaneTraffic {
    /// Event publishes with a fast-batch reply subject (first sends and re-sends).
    pub publishes: usize,
    /// Replies on fast-batch reply subjects.
    pub replies: usize,
    /// 429s among them.
    pub too_many: usize,
    /// The first 429: subject, status, body.
    pub sample: Option<String>,
}

impl LaneTraffic {
    /// Counts one message seen on the server.
    pub fn count(&mut self, msg: &async_nats::Message) {
        let to_lane = msg.reply.as_deref().is_some_and(|r| r.ends_with(".$FI"));
        self.publishes += usize::from(msg.subject.starts_with("t.events.") && to_lane);
        self.replies += usize::from(msg.subject.ends_with(".$FI"));
        if is_lane_429(msg) {
            self.too_many += 1;
            self.sample.get_or_insert_with(|| {
                format!(
                    "{} status {:?} {:?}",
                    msg.subject,
                    msg.status,
                    String::from_utf8_lossy(&msg.payload)
                )
            });
        }
    }
}
