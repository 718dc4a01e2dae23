//! Server-level fault rows of RELIABILITY.md (F2, F3, F7, F9, F12, F14, F15, F16, F17) on real 2.9 and
//! 2.15 servers (F12 on 2.15 only: 2.9 has no bound to overload).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sink_core::backoff::{Backoff, Jitter, RetrySchedule};
use sink_core::event::CloudEvent;
use sink_core::outbox::Failure;
use sink_nats::{
    classify, new_stream_config, BreakerStatus, EmitError, JetStreamSink, OrderingMode, Pending,
    StartError, StreamPolicy, Verdict,
};
use sink_testkit::{
    read_stream, Direction, Expected, FaultProxy, NatsServer, ProxyMode, ServerOptions,
    ServerVersion,
};

/// The longest any single outcome may take (I5).
const OUTCOME_BOUND: Duration = Duration::from_secs(60);

/// Breaker and client reconnect delays that stay short, so recovery after a fault is quick.
fn quick_reconnect() -> Backoff {
    Backoff {
        base: Duration::from_millis(100),
        factor: 2,
        cap: Duration::from_secs(1),
        jitter: Jitter::None,
        seed: 0,
    }
}

/// Sends `n` events from a task, 20 at a time with `pace` between batches, so a fault can land in
/// the middle; the counter says how many were accepted so far.
fn send_paced(
    sink: &JetStreamSink,
    run: &str,
    n: usize,
    pace: Duration,
) -> (
    tokio::task::JoinHandle<Vec<(CloudEvent, Pending)>>,
    Arc<AtomicUsize>,
) {
    let sink = sink.clone();
    let run = run.to_owned();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let e = event(&run, i, 4);
            let p = sink.send(e.clone()).await.expect("accepted into the queue");
            out.push((e, p));
            counter.store(i + 1, Ordering::Relaxed);
            if i % 20 == 19 {
                tokio::time::sleep(pace).await;
            }
        }
        out
    });
    (task, accepted)
}

async fn wait_accepted(accepted: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.load(Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "sender stalled before {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Awaits every outcome, each within [`OUTCOME_BOUND`] (I5).
async fn outcomes(pending: Vec<(CloudEvent, Pending)>) -> Vec<Sent> {
    let mut sent = Vec::with_capacity(pending.len());
    for (event, p) in pending {
        let outcome = tokio::time::timeout(OUTCOME_BOUND, p)
            .await
            .unwrap_or_else(|_| panic!("I5: outcome of {} within {OUTCOME_BOUND:?}", event.id));
        sent.push(Sent { event, outcome });
    }
    sent
}

fn duplicate_acks(sent: &[Sent]) -> usize {
    sent.iter()
        .filter(|s| s.outcome.as_ref().is_ok_and(|r| r.duplicate))
        .count()
}

fn js_of(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(client)
}

// ---------------------------------------------------------------------------------------------
// F2: kill -9 mid-stream, restart after 2 s on the same port and store

async fn kill_9_mid_stream(version: ServerVersion) {
    let mut server = server(version).await;
    let sink = builder(&server.url())
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("connect");
    let (task, accepted) = send_paced(&sink, "f2", 3000, Duration::from_millis(2));
    wait_accepted(&accepted, 1000).await;
    server.kill().await.expect("kill -9");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = sink.health();
    println!("F2 {version}: health during the outage: {during:?}");
    assert!(during.queued > 0, "the kill landed mid-stream: {during:?}");
    server
        .restart()
        .await
        .expect("restart on the same port and store");
    let pending = task.await.expect("sender task");
    let sent = outcomes(pending).await;
    assert_all_ok(&sent);
    let health = sink.health();
    println!(
        "F2 {version}: duplicate acks after restart: {}, ordering now {:?}, last error {:?}",
        duplicate_acks(&sent),
        health.ordering,
        health.last_error
    );
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 3000, "0 stored duplicates, nothing lost");
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_stores_no_duplicate_on_2_9() {
    kill_9_mid_stream(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_stores_no_duplicate_on_2_15() {
    kill_9_mid_stream(ServerVersion::V2_15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_stores_no_duplicate_on_2_12() {
    kill_9_mid_stream(ServerVersion::V2_12).await;
}

// ---------------------------------------------------------------------------------------------
// F3: outage longer than the duplicate window

async fn outage_beyond_duplicate_window(version: ServerVersion) {
    let window = Duration::from_secs(5);
    let mut server = server(version).await;
    let client = server.connect().await.expect("client");
    let mut config = new_stream_config(STREAM, vec!["t.events.*.v1".into()]);
    config.duplicate_window = window;
    js_of(client)
        .create_stream(config)
        .await
        .expect("create stream with a 5 s duplicate window");
    // Retry span: 1 s * 3 attempts + 0.5 s = 3.5 s, inside the 5 s window, so Verify accepts it.
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Verify)
        .ack_timeout(Duration::from_secs(1))
        .retry(
            RetrySchedule::new(vec![Duration::from_millis(100), Duration::from_millis(400)])
                .unwrap(),
        )
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("Verify accepts a window longer than the retry span");
    let (task, accepted) = send_paced(&sink, "f3", 2000, Duration::from_millis(2));
    wait_accepted(&accepted, 700).await;
    // Freeze the server before killing it, so the publishes the sender keeps making stay unacked
    // (200 ms also lets the driver take in any ack still buffered on the socket): the in-flight
    // count read then is what the kill catches, and those publishes are the ones re-sent after
    // the window has passed.
    server.pause().expect("SIGSTOP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let in_flight_at_kill = wait_in_flight(&sink, 1, Duration::from_secs(2)).await;
    server.kill().await.expect("kill -9");
    let killed_at = Instant::now();
    assert!(
        in_flight_at_kill > 0,
        "the kill caught publishes in flight: {:?}",
        sink.health()
    );
    tokio::time::sleep(window + Duration::from_secs(1)).await;
    assert!(sink.health().queued > 0, "{:?}", sink.health());
    server.restart().await.expect("restart");
    let outage = killed_at.elapsed();
    assert!(
        outage > window,
        "the outage ({outage:?}) outlasts the {window:?} window"
    );
    let pending = task.await.expect("sender task");
    let sent = outcomes(pending).await;
    assert_all_ok(&sent);
    let health = sink.health();
    let report = audit(&server.url(), &sent).await;
    println!(
        "F3 {version}: {in_flight_at_kill} in flight at the kill, outage {outage:?}, retried \
         beyond the window {}, duplicate acks {}, stored {}, stored duplicates {}, ordering {:?}",
        health.retried_beyond_window,
        duplicate_acks(&sent),
        report.stored,
        report.duplicates.len(),
        health.ordering
    );
    // The row's "reports retries beyond the window": an event in flight at the kill that the driver
    // sends again after the restart was first sent more than `window` earlier, and counts once.
    // (Not every one of them: re-sends the driver issued during the outage wait in the client's
    // command channel and reach the restarted server on their own, so the count can be lower
    // than the in-flight number.)
    assert!(
        health.retried_beyond_window > 0,
        "the sink reports retries beyond the duplicate window: {health:?}"
    );
    assert!(
        health.retried_beyond_window <= sent.len() as u64,
        "counted at most once per event: {health:?}"
    );
    report.assert_passed_allowing_copies();
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_duplicate_window_keeps_acked_events_in_order_on_2_9() {
    outage_beyond_duplicate_window(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_duplicate_window_keeps_acked_events_in_order_on_2_15() {
    outage_beyond_duplicate_window(ServerVersion::V2_15).await;
}

/// F3's sharpest case, made deterministic: the server has stored a tail of events whose acks were
/// lost (the proxy swallows every server-to-client byte), then dies, and comes back after the
/// duplicate window. The re-sends of that tail can no longer be deduplicated: on 2.9 (which does
/// not keep the last message id across a restart) the chain re-anchors and the tail is stored a
/// second time, which F3 allows; on 2.15 the stream's last id is a later event of this very sink,
/// and the first unacked event must still get an outcome within the I5 bound.
async fn outage_beyond_window_after_lost_acks(version: ServerVersion) {
    let window = Duration::from_secs(5);
    let mut server = server(version).await;
    let mut config = new_stream_config(STREAM, vec!["t.events.*.v1".into()]);
    config.duplicate_window = window;
    js_of(server.connect().await.expect("client"))
        .create_stream(config)
        .await
        .expect("create stream with a 5 s duplicate window");
    let proxy = FaultProxy::start(upstream_of(&server))
        .await
        .expect("start proxy");
    let sink = builder(&proxy.url())
        .stream_policy(StreamPolicy::Verify)
        .ack_timeout(Duration::from_secs(1))
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("connect through the proxy");
    let warm = 20;
    let mut sent = Vec::new();
    for i in 0..warm {
        let e = event("f3-lost-warm", i, 4);
        let outcome = sink.emit(&e).await;
        sent.push(Sent { event: e, outcome });
    }
    assert_all_ok(&sent);

    // Fewer than the window, so all of them go out before any ack is due.
    let tail = 100;
    proxy.set_mode(ProxyMode::Blackhole(Direction::ServerToClient));
    let mut pending = Vec::with_capacity(tail);
    for i in 0..tail {
        let e = event("f3-lost", i, 4);
        let p = sink.send(e.clone()).await.expect("accepted");
        pending.push((e, p));
    }
    let js = js_of(server.connect().await.expect("direct client"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = js
            .get_stream(STREAM)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .state
            .messages;
        if stored == (warm + tail) as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tail reached the server: {stored} stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(js);
    server.kill().await.expect("kill -9");
    let killed_at = Instant::now();
    proxy.reset_all();
    proxy.set_mode(ProxyMode::PassThrough);
    tokio::time::sleep(window + Duration::from_secs(1)).await;
    server.restart().await.expect("restart");
    assert!(killed_at.elapsed() > window);

    let tail_sent = outcomes(pending).await;
    assert_all_ok(&tail_sent);
    sent.extend(tail_sent);
    let health = sink.health();
    let report = audit(&server.url(), &sent).await;
    println!(
        "F3 lost acks {version}: retried beyond the window {}, duplicate acks {}, stored {}, \
         stored duplicates {}, ordering {:?}",
        health.retried_beyond_window,
        duplicate_acks(&sent),
        report.stored,
        report.duplicates.len(),
        health.ordering
    );
    assert!(
        health.retried_beyond_window >= tail as u64,
        "every event of the stored-but-unacked tail was re-sent beyond the window: {health:?}"
    );
    report.assert_passed_allowing_copies();
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_beyond_window_after_lost_acks_keeps_acked_events_in_order_on_2_9() {
    outage_beyond_window_after_lost_acks(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_beyond_window_after_lost_acks_keeps_acked_events_in_order_on_2_15() {
    outage_beyond_window_after_lost_acks(ServerVersion::V2_15).await;
}

// ---------------------------------------------------------------------------------------------
// F7: SIGSTOP longer than the ack timeout, then SIGCONT

async fn paused_server(version: ServerVersion) {
    let server = server(version).await;
    let sink = builder(&server.url())
        .ack_timeout(Duration::from_secs(1))
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("connect");
    let (task, accepted) = send_paced(&sink, "f7", 2000, Duration::from_millis(2));
    wait_accepted(&accepted, 700).await;
    server.pause().expect("SIGSTOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = sink.health();
    println!("F7 {version}: health while paused: {during:?}");
    assert!(during.queued > 0, "{during:?}");
    server.resume().expect("SIGCONT");
    let started = Instant::now();
    let pending = task.await.expect("sender task");
    let sent = outcomes(pending).await;
    println!(
        "F7 {version}: everything settled {:?} after SIGCONT, duplicate acks {}",
        started.elapsed(),
        duplicate_acks(&sent)
    );
    assert_all_ok(&sent);
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 2000);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_longer_than_ack_timeout_stores_no_duplicate_and_resumes_on_2_9() {
    paused_server(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_longer_than_ack_timeout_stores_no_duplicate_and_resumes_on_2_15() {
    paused_server(ServerVersion::V2_15).await;
}

// ---------------------------------------------------------------------------------------------
// F9: stream missing at start, deleted mid-run

async fn stream_missing_at_start(version: ServerVersion) {
    let server = server(version).await;
    let err = builder(&server.url())
        .stream_policy(StreamPolicy::Verify)
        .connect()
        .await
        .expect_err("no stream, Verify");
    match &err {
        StartError::StreamMissing { stream } => assert_eq!(stream, STREAM),
        other => panic!("expected StreamMissing, got {other:?}"),
    }
    assert!(err.to_string().contains("StreamPolicy::Create"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_to_start_without_the_stream_on_2_9() {
    stream_missing_at_start(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_to_start_without_the_stream_on_2_15() {
    stream_missing_at_start(ServerVersion::V2_15).await;
}

async fn send_and_settle(sink: &JetStreamSink, run: &str, n: usize) -> Vec<Sent> {
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let e = event(run, i, 3);
        let p = sink.send(e.clone()).await.expect("accepted");
        pending.push((e, p));
    }
    outcomes(pending).await
}

async fn stream_deleted_mid_run_with_verify(version: ServerVersion) {
    let server = server(version).await;
    let js = js_of(server.connect().await.expect("client"));
    let config = new_stream_config(STREAM, vec!["t.events.*.v1".into()]);
    js.create_stream(config.clone()).await.expect("create");
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Verify)
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("connect");
    let before = send_and_settle(&sink, "f9v-before", 200).await;
    assert_all_ok(&before);
    js.delete_stream(STREAM).await.expect("delete stream");

    let mut pending = Vec::new();
    for i in 0..300 {
        let e = event("f9v-after", i, 3);
        let p = sink
            .send(e.clone())
            .await
            .expect("queued while the stream is gone");
        pending.push((e, p));
    }
    // The breaker opens and the events stay queued with a clear error.
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let h = sink.health();
        if h.breaker == BreakerStatus::Open {
            break h;
        }
        assert!(Instant::now() < deadline, "breaker never opened: {h:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!("F9 {version}: health with the stream gone: {health:?}");
    let error = health.last_error.clone().unwrap_or_default();
    assert!(error.contains("no stream captures"), "{health:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = sink.health();
    assert_eq!(
        health.queued, 300,
        "nothing dropped or delivered: {health:?}"
    );

    js.create_stream(config).await.expect("re-create");
    let after = outcomes(pending).await;
    assert_all_ok(&after);
    let report = audit(&server.url(), &after).await;
    report.assert_passed();
    assert_eq!(report.stored, 300);
    assert_eq!(sink.health().breaker, BreakerStatus::Closed);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_deleted_mid_run_queues_opens_breaker_then_delivers_on_recreate_on_2_9() {
    stream_deleted_mid_run_with_verify(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_deleted_mid_run_queues_opens_breaker_then_delivers_on_recreate_on_2_15() {
    stream_deleted_mid_run_with_verify(ServerVersion::V2_15).await;
}

async fn stream_deleted_mid_run_with_create(version: ServerVersion) {
    let server = server(version).await;
    let js = js_of(server.connect().await.expect("client"));
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Create)
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("connect creates the stream");
    let before = send_and_settle(&sink, "f9c-before", 200).await;
    assert_all_ok(&before);
    js.delete_stream(STREAM).await.expect("delete stream");
    let after = send_and_settle(&sink, "f9c-after", 300).await;
    assert_all_ok(&after);
    let info = js
        .get_stream(STREAM)
        .await
        .expect("the driver re-created the stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.config.max_age, Duration::from_secs(90 * 24 * 3600));
    let report = audit(&server.url(), &after).await;
    report.assert_passed();
    assert_eq!(report.stored, 300);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_policy_recreates_a_deleted_stream_and_delivers_on_2_9() {
    stream_deleted_mid_run_with_create(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_policy_recreates_a_deleted_stream_and_delivers_on_2_15() {
    stream_deleted_mid_run_with_create(ServerVersion::V2_15).await;
}

// ---------------------------------------------------------------------------------------------
// F12: 429 overload (stream ingest queue full, nats-server 2.11+)
//
// Only on 2.15: nats-server 2.9 (and 2.10) queue a stream's inbound publishes without a bound, so
// there is no 429 to provoke, and 2.9 refuses to start with `max_buffered_msgs` in its config
// ("unknown field").

/// Inbound publishes the stream may queue before the server drops the next and answers it 429
/// (`NATS/1.0 429 Too Many Requests`). A sink's window of 256 overflows it at once.
const F12_MAX_BUFFERED_MSGS: u64 = 8;

/// A sink publish (any attempt) or the reply to one, as seen by a client subscribed to `>`.
struct Seen {
    /// The sink's reply inbox (one per sink), the driver's event sequence and attempt, all from
    /// the reply subject `_INBOX.<nuid>.<seq>.<attempt>`.
    inbox: String,
    seq: u64,
    attempt: u32,
    /// When the observer took it in.
    at: Instant,
    what: SeenKind,
}

enum SeenKind {
    /// A publish; `chained` if it carried `Nats-Expected-Last-Msg-Id`.
    Publish { chained: bool },
    /// A 429 reply, with the driver's classification of it.
    TooManyRequests(Verdict),
    /// A publish ack (stored, or a duplicate of a stored message).
    Stored,
    /// Any other reply (10070 wrong last msg id, ...).
    OtherReply,
}

/// `_INBOX.<nuid>.<seq>.<attempt>` (the driver's reply subjects) into its parts.
fn split_reply_subject(subject: &str) -> Option<(String, u64, u32)> {
    let mut parts = subject.rsplitn(3, '.');
    let attempt = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let inbox = parts.next()?;
    inbox
        .starts_with("_INBOX.")
        .then(|| (inbox.to_owned(), seq, attempt))
}

fn is_too_many_requests(msg: &async_nats::Message) -> bool {
    msg.status.map(|s| s.as_u16()) == Some(429)
        || serde_json::from_slice::<serde_json::Value>(&msg.payload)
            .is_ok_and(|v| v["error"]["code"] == 429 || v["error"]["err_code"] == 10167)
}

fn seen(msg: &async_nats::Message) -> Option<Seen> {
    let at = Instant::now();
    if msg.subject.starts_with("t.events.") {
        let (inbox, seq, attempt) = split_reply_subject(msg.reply.as_deref()?)?;
        let chained = msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get("Nats-Expected-Last-Msg-Id").is_some());
        return Some(Seen {
            inbox,
            seq,
            attempt,
            at,
            what: SeenKind::Publish { chained },
        });
    }
    let (inbox, seq, attempt) = split_reply_subject(&msg.subject)?;
    let verdict = classify(
        msg.status.map(|s| s.as_u16()),
        msg.description.as_deref(),
        &msg.payload,
    );
    let what = if is_too_many_requests(msg) {
        SeenKind::TooManyRequests(verdict)
    } else if matches!(verdict, Verdict::Ack(_)) {
        SeenKind::Stored
    } else {
        SeenKind::OtherReply
    };
    Some(Seen {
        inbox,
        seq,
        attempt,
        at,
        what,
    })
}

/// What happened to one event on the wire.
#[derive(Default)]
struct EventTrace {
    /// Highest attempt published.
    last_attempt: u32,
    /// (attempt, when) of each 429.
    too_many: Vec<(u32, Instant)>,
    /// First publish of each attempt, and whether it was chained.
    published: HashMap<u32, (Instant, bool)>,
    /// Attempts answered with an ack.
    stored: Vec<u32>,
}

/// `producers` sinks (default chained ordering, window 256) pipeline `events` each into
/// one stream whose ingest queue holds [`F12_MAX_BUFFERED_MSGS`]: the server drops publishes and
/// answers them 429. Checks that 429s happened, that the driver classifies them retryable, that
/// each event answered 429 was sent again (or another attempt of it was stored), that no event
/// was re-sent faster than the retry schedule allows, and audits I1-I4 with each producer as
/// its own ordering key. Returns the sinks for mode checks.
async fn ingest_overload(producers: usize, events: usize) -> Vec<JetStreamSink> {
    let version = ServerVersion::V2_15;
    let server = NatsServer::start(ServerOptions {
        jetstream_max_buffered_msgs: Some(F12_MAX_BUFFERED_MSGS),
        ..ServerOptions::version(version)
    })
    .await
    .expect("start");
    js_of(server.connect().await.expect("client"))
        .create_stream(new_stream_config(STREAM, vec!["t.events.*.v1".into()]))
        .await
        .expect("create stream");
    let (stop_observer, observer) = observe(&server, Vec::new(), |log: &mut Vec<Seen>, msg| {
        log.extend(seen(msg))
    })
    .await;

    let mut sinks = Vec::with_capacity(producers);
    for p in 0..producers {
        let sink = builder(&server.url())
            .name(format!("f12-producer-{p}"))
            .stream_policy(StreamPolicy::Verify)
            .window(256)
            .reconnect(quick_reconnect())
            .connect()
            .await
            .expect("connect");
        sinks.push(sink);
    }
    let started = Instant::now();
    // Every producer queues all its events at once, so each keeps its whole window in flight.
    let tasks: Vec<_> = sinks
        .iter()
        .enumerate()
        .map(|(p, sink)| spawn_send_all(sink, &format!("f12-p{p}"), events, 4))
        .collect();
    let mut per_producer = Vec::with_capacity(producers);
    for task in tasks {
        per_producer.push(task.await.expect("producer task"));
    }
    let elapsed = started.elapsed();
    stop_observer.send(()).expect("observer still running");
    let log = observer.await.expect("observer task");

    for sent in &per_producer {
        assert_all_ok(sent);
    }
    // I1-I4, each producer its own ordering key (`OrderingKey::Sink`).
    let expected: Vec<Expected> = per_producer
        .iter()
        .enumerate()
        .flat_map(|(p, sent)| {
            expectations(sent, false).into_iter().map(move |mut e| {
                e.key = format!("producer-{p}");
                e
            })
        })
        .collect();
    let js = js_of(server.connect().await.expect("audit client"));
    let stored = read_stream(&js, STREAM, Duration::from_secs(60))
        .await
        .expect("read the stream back");
    let report = sink_testkit::compare(&expected, &stored);
    report.assert_passed();
    assert_eq!(report.stored, producers * events, "{report}");

    let mut traces: HashMap<(&str, u64), EventTrace> = HashMap::new();
    let (mut publishes, mut chained_429) = (0, 0);
    for s in &log {
        let t = traces.entry((s.inbox.as_str(), s.seq)).or_default();
        match &s.what {
            SeenKind::Publish { chained } => {
                publishes += 1;
                t.last_attempt = t.last_attempt.max(s.attempt);
                t.published.entry(s.attempt).or_insert((s.at, *chained));
            }
            SeenKind::TooManyRequests(verdict) => {
                assert!(
                    matches!(verdict, Verdict::Fail(Failure::Overloaded { .. })),
                    "the driver must classify a 429 as overload (retried, window shrinks), it gives {verdict:?}"
                );
                t.too_many.push((s.attempt, s.at));
            }
            SeenKind::Stored => t.stored.push(s.attempt),
            SeenKind::OtherReply => {}
        }
    }
    let too_many: usize = traces.values().map(|t| t.too_many.len()).sum();
    // The overload really happened.
    assert!(
        too_many > 0,
        "no 429 among the replies to {publishes} publishes: raise the load or lower \
         max_buffered_msgs"
    );
    // Each event answered 429 went out again with a higher attempt, unless another of its
    // attempts was stored (an attempt the sink gave up on, e.g. after its ack timeout, can still
    // be stored and acked).
    let mut resend_gaps = Vec::new();
    let mut stored_by_earlier_attempt = 0;
    for ((inbox, seq), t) in &traces {
        for &(attempt, at) in &t.too_many {
            let resent = t.last_attempt > attempt;
            let stored_otherwise = t.stored.iter().any(|&a| a != attempt);
            assert!(
                resent || stored_otherwise,
                "event {seq} of {inbox} was answered 429 on attempt {attempt} and neither sent \
                 again nor stored by another attempt"
            );
            stored_by_earlier_attempt += usize::from(!resent);
            if t.published
                .get(&attempt)
                .is_some_and(|&(_, chained)| chained)
            {
                chained_429 += 1;
            }
            if let Some((next, _)) = t.published.get(&(attempt + 1)) {
                resend_gaps.push(next.saturating_duration_since(at));
            }
        }
    }
    resend_gaps.sort();
    // No hot retry loop: each re-send follows a failure episode that waits at least the first
    // retry delay (100 ms) or the breaker's reconnect base (100 ms). Half that leaves room for
    // a re-send released by a neighbour's episode.
    let max_attempts = traces.values().map(|t| t.last_attempt).max().unwrap_or(0);
    let bound = 2 + (elapsed.as_millis() / 50) as u32;
    assert!(
        max_attempts <= bound,
        "an event was published {max_attempts} times in {elapsed:?}: retries without backoff"
    );
    let total = producers * events;
    println!(
        "F12 {version}, {producers} producer(s): {total} events in {elapsed:?}; {publishes} \
         publishes ({:.1} per event), {too_many} answered 429 ({chained_429} of them chained, \
         {stored_by_earlier_attempt} not re-sent because another attempt was stored), max \
         attempts of one event {max_attempts}; 429 to next attempt of that event: min {:?}, \
         median {:?}",
        publishes as f64 / total as f64,
        resend_gaps.first(),
        resend_gaps.get(resend_gaps.len() / 2),
    );
    for (p, sink) in sinks.iter().enumerate() {
        let h = sink.health();
        println!(
            "F12 producer {p}: ordering {:?}, breaker {:?}, last error {:?}",
            h.ordering, h.breaker, h.last_error
        );
    }
    assert!(
        server
            .log_tail(500)
            .contains("Dropping messages due to excessive stream ingest rate"),
        "the server logs the drops: {}",
        server.log_tail(20)
    );
    for sink in &sinks {
        let close = sink.close(Duration::from_secs(5)).await;
        assert!(close.complete(), "{close:?}");
    }
    sinks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_overload_429_from_many_producers_is_retried_and_keeps_every_invariant_on_2_15() {
    // Eight writers on one stream: each sink's chain soon meets another sink's last message id
    // and falls back to per-key-serial (by design); the 429s land before and after that.
    ingest_overload(8, 1500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_overload_429_on_a_chained_window_is_retried_and_keeps_the_chain_on_2_15() {
    // One writer keeps its chained window of 256 the whole run: every 429 breaks the chain in the
    // middle of the window, and the sink must repair it without reordering or falling back.
    let sinks = ingest_overload(1, 500).await;
    assert_eq!(
        sinks[0].health().ordering,
        OrderingMode::Chained,
        "a 429 is no sign of another writer"
    );
}

// ---------------------------------------------------------------------------------------------
// F14: initial connect while the server is down

/// A server that has been started (so its port and store exist), given a stream, and killed.
async fn down_server(version: ServerVersion) -> NatsServer {
    let mut server = server(version).await;
    let js = js_of(server.connect().await.expect("client"));
    js.create_stream(new_stream_config(STREAM, vec!["t.events.*.v1".into()]))
        .await
        .expect("create");
    server.kill().await.expect("kill");
    server
}

async fn connect_refused_without_retry(version: ServerVersion) {
    let server = down_server(version).await;
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        builder(&server.url())
            .stream_policy(StreamPolicy::Verify)
            .retry_initial_connect(false)
            .connect(),
    )
    .await
    .expect("I5: connect fails within 20 s");
    let err = result.expect_err("the server is down");
    assert!(matches!(err, StartError::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&server.port().to_string()), "{text}");
    println!(
        "F14 {version}: failed after {:?}: {text}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_down_server_fails_with_a_connect_error_on_2_9() {
    connect_refused_without_retry(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_down_server_fails_with_a_connect_error_on_2_15() {
    connect_refused_without_retry(ServerVersion::V2_15).await;
}

async fn starts_and_queues_until_the_server_comes_up(version: ServerVersion) {
    let mut server = down_server(version).await;
    let started = Instant::now();
    let sink = tokio::time::timeout(
        Duration::from_secs(10),
        builder(&server.url())
            .stream_policy(StreamPolicy::Off)
            .retry_initial_connect(true)
            .reconnect(quick_reconnect())
            .connect(),
    )
    .await
    .expect("I5: connect returns while the server is down")
    .expect("starts without the server");
    println!(
        "F14 {version}: connect returned after {:?} with the server down",
        started.elapsed()
    );
    let mut pending = Vec::new();
    for i in 0..500 {
        let e = event("f14", i, 3);
        let p = sink.send(e.clone()).await.expect("queued");
        pending.push((e, p));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.health().queued, 500, "{:?}", sink.health());
    server.restart().await.expect("server comes up");
    let sent = outcomes(pending).await;
    assert_all_ok(&sent);
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 500);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_initial_connect_starts_queues_and_delivers_once_the_server_is_up_on_2_9() {
    starts_and_queues_until_the_server_comes_up(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_initial_connect_starts_queues_and_delivers_once_the_server_is_up_on_2_15() {
    starts_and_queues_until_the_server_comes_up(ServerVersion::V2_15).await;
}

// ---------------------------------------------------------------------------------------------
// F15: lame duck mid-stream, then restart

async fn lame_duck_mid_stream(version: ServerVersion) {
    let mut server = NatsServer::start(ServerOptions {
        extra_config: "lame_duck_grace_period: 1s\n".into(),
        ..ServerOptions::version(version)
    })
    .await
    .expect("start");
    let sink = builder(&server.url())
        .ack_timeout(Duration::from_secs(1))
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("connect");
    // ~3 s of sending, so events keep coming after the server closes the connection.
    let (task, accepted) = send_paced(&sink, "f15", 2000, Duration::from_millis(30));
    wait_accepted(&accepted, 500).await;
    server.lame_duck().await.expect("lame duck");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = sink.health();
    println!("F15 {version}: health in lame duck: {during:?}");
    assert!(during.queued > 0, "{during:?}");
    server.restart().await.expect("restart");
    let pending = task.await.expect("sender task");
    let sent = outcomes(pending).await;
    assert_all_ok(&sent);
    println!(
        "F15 {version}: duplicate acks {}, ordering {:?}",
        duplicate_acks(&sent),
        sink.health().ordering
    );
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 2000);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_mid_stream_then_restart_keeps_every_invariant_on_2_9() {
    lame_duck_mid_stream(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_mid_stream_then_restart_keeps_every_invariant_on_2_15() {
    lame_duck_mid_stream(ServerVersion::V2_15).await;
}

// ---------------------------------------------------------------------------------------------
// F16: oversized event

async fn oversized_event(version: ServerVersion) {
    let server = NatsServer::start(ServerOptions {
        max_payload: Some(64 * 1024),
        ..ServerOptions::version(version)
    })
    .await
    .expect("start");
    let sink = builder(&server.url()).connect().await.expect("connect");
    let mut sent = Vec::new();
    for i in 0..50 {
        let e = event("f16", i, 2);
        let outcome = sink.emit(&e).await;
        sent.push(Sent { event: e, outcome });
    }
    let big = CloudEvent::new("f16-big", "/test/f16", "com.example.test.v1").with_data_json(
        serde_json::json!({ "tenantId": "tenant-0", "blob": "y".repeat(100 * 1024) }),
    );
    let outcome = tokio::time::timeout(Duration::from_secs(5), sink.emit(&big))
        .await
        .expect("I5: refused at once");
    match &outcome {
        Err(EmitError::TooLarge {
            event_id,
            size,
            max_payload,
        }) => {
            assert_eq!(event_id, "f16-big");
            assert_eq!(*max_payload, 64 * 1024);
            assert!(*size > 100 * 1024, "{size}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    sent.push(Sent {
        event: big,
        outcome,
    });
    for i in 50..100 {
        let e = event("f16", i, 2);
        let outcome = sink.emit(&e).await;
        sent.push(Sent { event: e, outcome });
    }
    assert!(sent
        .iter()
        .filter(|s| s.event.id != "f16-big")
        .all(|s| s.outcome.is_ok()));
    assert_eq!(sink.health().breaker, BreakerStatus::Closed);
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 100);
    assert_eq!(report.not_delivered.len(), 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_fails_alone_before_sending_on_2_9() {
    oversized_event(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_fails_alone_before_sending_on_2_15() {
    oversized_event(ServerVersion::V2_15).await;
}

// ---------------------------------------------------------------------------------------------
// F17: invalid tenant tokens

fn tenant_event(id: String, tenant: &str) -> CloudEvent {
    CloudEvent::new(id, "/test/f17", "com.example.test.v1")
        .with_data_json(serde_json::json!({ "tenantId": tenant, "note": "z" }))
}

fn is_valid_token(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

async fn invalid_tenants(version: ServerVersion) {
    let server = server(version).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let long = "a".repeat(300);
    let bad = [
        "a.b",
        "*",
        ">",
        "",
        " ",
        "acme corp",
        "tab\there",
        "$SYS",
        long.as_str(),
        "nul\u{0}",
        "line\nbreak",
        "del\u{7f}",
        "ümlaut",
        "x.>",
    ];
    let mut sent = Vec::new();
    for (i, tenant) in bad.iter().enumerate() {
        let good = tenant_event(format!("f17-good-{i}"), &format!("tenant-{}", i % 3));
        let outcome = sink.emit(&good).await;
        sent.push(Sent {
            event: good,
            outcome,
        });
        let e = tenant_event(format!("f17-bad-{i}"), tenant);
        let outcome = tokio::time::timeout(Duration::from_secs(5), sink.emit(&e))
            .await
            .expect("I5");
        match &outcome {
            Err(EmitError::Subject { event_id, .. }) => assert_eq!(event_id, &e.id),
            other => panic!("tenant {tenant:?}: expected EmitError::Subject, got {other:?}"),
        }
        assert_eq!(sink.health().breaker, BreakerStatus::Closed, "{tenant:?}");
        sent.push(Sent { event: e, outcome });
    }
    for s in sent.iter().filter(|s| s.event.id.starts_with("f17-good")) {
        assert!(s.outcome.is_ok(), "{}: {:?}", s.event.id, s.outcome);
    }
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(
        report.stored,
        bad.len(),
        "only the valid tenants' events are stored"
    );
    assert_eq!(report.not_delivered.len(), bad.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tenant_tokens_fail_alone_and_other_tenants_are_delivered_on_2_9() {
    invalid_tenants(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tenant_tokens_fail_alone_and_other_tenants_are_delivered_on_2_15() {
    invalid_tenants(ServerVersion::V2_15).await;
}

/// Arbitrary tenant strings against one server: a valid token is delivered, anything else fails
/// alone with `EmitError::Subject`; the breaker never moves and the audit passes.
fn arbitrary_tenants(version: ServerVersion) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(server(version));
    let sink = rt
        .block_on(builder(&server.url()).connect())
        .expect("connect");
    let sent = std::sync::Mutex::new(Vec::new());
    let strategy = prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_-]{1,64}",
        "[A-Za-z0-9_.*>$ \t-]{0,70}",
    ];
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |tenant| {
        let mut sent = sent.lock().unwrap();
        let e = tenant_event(format!("f17p-{:04}", sent.len()), &tenant);
        let outcome = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), sink.emit(&e))
                .await
                .expect("I5")
        });
        if is_valid_token(&tenant) {
            prop_assert!(outcome.is_ok(), "{tenant:?}: {outcome:?}");
        } else {
            prop_assert!(
                matches!(outcome, Err(EmitError::Subject { .. })),
                "{tenant:?}: {outcome:?}"
            );
        }
        prop_assert_eq!(sink.health().breaker, BreakerStatus::Closed);
        sent.push(Sent { event: e, outcome });
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let sent = sent.into_inner().unwrap();
    let report = rt.block_on(audit(&server.url(), &sent));
    report.assert_passed();
    println!(
        "F17 proptest {version}: {} cases, {} valid stored, {} refused",
        sent.len(),
        report.stored,
        report.not_delivered.len()
    );
}

#[test]
fn arbitrary_tenant_strings_are_delivered_iff_they_are_one_valid_token_on_2_9() {
    arbitrary_tenants(ServerVersion::V2_9);
}

#[test]
fn arbitrary_tenant_strings_are_delivered_iff_they_are_one_valid_token_on_2_15() {
    arbitrary_tenants(ServerVersion::V2_15);
}

/// With `retry_initial_connect(true)` and the server up, the stream policy still applies: the
/// client's first connection happens in the background, and the sink must wait for it instead of
/// skipping the check.
async fn retry_initial_connect_still_verifies_a_reachable_server(version: ServerVersion) {
    let server = server(version).await;
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        builder(&server.url())
            .stream_policy(StreamPolicy::Verify)
            .retry_initial_connect(true)
            .connect(),
    )
    .await
    .expect("I5")
    .expect_err("no stream, Verify");
    assert!(
        matches!(err, StartError::StreamMissing { .. }),
        "expected StreamMissing, got {err:?}"
    );
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Create)
        .retry_initial_connect(true)
        .connect()
        .await
        .expect("Create makes the stream");
    assert_eq!(sink.health().server_version, version.as_str());
    sink.emit(&event("f14v", 0, 1)).await.expect("delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_initial_connect_still_verifies_the_stream_when_the_server_is_up_on_2_9() {
    retry_initial_connect_still_verifies_a_reachable_server(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_initial_connect_still_verifies_the_stream_when_the_server_is_up_on_2_15() {
    retry_initial_connect_still_verifies_a_reachable_server(ServerVersion::V2_15).await;
}
