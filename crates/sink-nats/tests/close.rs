//! Issue #9 item 4 on real servers: `close` is honest (a report is `complete()` only when every
//! accepted event has its outcome, however often and whenever `close` is called) and total (every
//! duration the builder takes, at its extremes, neither panics nor hangs).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sink_core::backoff::{Backoff, RetrySchedule};
use sink_nats::{CloseReport, EmitError, JetStreamSink, StartError, StreamPolicy, WhenFull};
use sink_testkit::{NatsServer, ServerVersion};

/// Panics anywhere in this test binary (the driver task and the client's tasks included: a panic
/// there does not reach the test's own thread).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// A sink whose server is down, with `n` events accepted and waiting: returns their handles.
async fn sink_with_undeliverable_events(
    version: ServerVersion,
    n: usize,
) -> (NatsServer, JetStreamSink, Vec<sink_nats::Pending>) {
    let mut server = server(version).await;
    let sink = builder(&server.url())
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    let first = sink.emit(&event("close", 0, 1)).await;
    assert!(first.is_ok(), "{first:?}");
    server.kill().await.expect("kill");
    let mut pending = Vec::new();
    for i in 1..=n {
        pending.push(sink.send(event("close", i, 1)).await.expect("queued"));
    }
    (server, sink, pending)
}

async fn second_close_repeats_the_first_report(version: ServerVersion) {
    let (_server, sink, pending) = sink_with_undeliverable_events(version, 3).await;
    let first = sink.close(Duration::from_millis(300)).await;
    assert!(!first.complete(), "{first:?}");
    assert_eq!(first.delivered, 1);
    assert_eq!(first.not_delivered.len(), 3, "{first:?}");
    // The driver has ended: a second close (from any clone, with any deadline) must still tell
    // the truth, at once.
    let started = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(5), sink.clone().close(Duration::MAX))
        .await
        .expect("I5: a close after the driver ended returns at once");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(second, first);
    for p in pending {
        let outcome = tokio::time::timeout(Duration::from_secs(5), p)
            .await
            .expect("I5");
        assert!(
            matches!(outcome, Err(EmitError::NotDelivered { .. })),
            "{outcome:?}"
        );
    }
    match sink.send(event("close", 99, 1)).await {
        Err(EmitError::Closed) => {}
        other => panic!("a closed sink accepts nothing: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_close_reports_what_the_first_could_not_deliver_on_2_9() {
    second_close_repeats_the_first_report(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_close_reports_what_the_first_could_not_deliver_on_2_15() {
    second_close_repeats_the_first_report(ServerVersion::V2_15).await;
}

async fn concurrent_closes_agree(version: ServerVersion) {
    let (_server, sink, _pending) = sink_with_undeliverable_events(version, 3).await;
    let (a, b) = (sink.clone(), sink.clone());
    let long = tokio::spawn(async move { a.close(Duration::from_secs(2)).await });
    // Let the long close reach the driver first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let short = tokio::spawn(async move { b.close(Duration::from_millis(200)).await });
    let (long, short) = tokio::time::timeout(Duration::from_secs(10), async {
        (long.await.expect("join"), short.await.expect("join"))
    })
    .await
    .expect("I5: both closes return");
    assert!(!long.complete(), "{long:?}");
    assert_eq!(long.not_delivered.len(), 3, "{long:?}");
    assert_eq!(
        short, long,
        "every caller of close gets the same, true report"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_closes_both_get_the_true_report_on_2_9() {
    concurrent_closes_agree(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_closes_both_get_the_true_report_on_2_15() {
    concurrent_closes_agree(ServerVersion::V2_15).await;
}

async fn close_forever_after_delivery(version: ServerVersion) {
    count_panics();
    let server = server(version).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let sent = send_all(&sink, "closemax", 200, 2).await;
    assert_all_ok(&sent);
    let started = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(5), sink.close(Duration::MAX))
        .await
        .expect("I5: close(Duration::MAX) returns once the queue is empty");
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.delivered, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let again = sink.close(Duration::MAX).await;
    assert_eq!(again, report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_duration_max_returns_promptly_once_everything_is_delivered_on_2_9() {
    close_forever_after_delivery(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_duration_max_returns_promptly_once_everything_is_delivered_on_2_15() {
    close_forever_after_delivery(ServerVersion::V2_15).await;
}

// ---------------------------------------------------------------------------------------------
// Every duration the builder takes, at its extremes.

/// Positive durations from the edges inwards: the smallest, a few ordinary ones, an hour, and
/// `Duration::MAX` ("never"). Zero, where a setting refuses it, is refused before anything starts
/// (`zero_durations_are_refused_naming_the_setting`); drawing it here would only start fewer sinks.
fn positive() -> impl Strategy<Value = Duration> {
    prop_oneof![
        3 => Just(Duration::MAX),
        1 => Just(Duration::from_nanos(1)),
        1 => Just(Duration::from_millis(1)),
        2 => Just(Duration::from_millis(200)),
        2 => Just(Duration::from_secs(2)),
        1 => Just(Duration::from_secs(3600)),
    ]
}

/// For settings where zero means something (no wait, no floor, no periodic check): [`positive`]
/// or zero.
fn extreme() -> impl Strategy<Value = Duration> {
    prop_oneof![1 => Just(Duration::ZERO), 3 => positive()]
}

/// Ping intervals: as [`positive`], without sub-millisecond ones (a ping every nanosecond is a
/// hot loop in the client, not an edge of the sink).
fn ping() -> impl Strategy<Value = Duration> {
    prop_oneof![
        3 => Just(Duration::MAX),
        1 => Just(Duration::from_millis(1)),
        2 => Just(Duration::from_millis(200)),
        1 => Just(Duration::from_secs(3600)),
    ]
}

#[derive(Debug, Clone)]
struct Durations {
    ack_timeout: Duration,
    ping_interval: Duration,
    connect_timeout: Duration,
    retry: Vec<Duration>,
    reconnect_base: Duration,
    reconnect_cap: Duration,
    /// `None`: `WhenFull::Reject`.
    block: Option<Duration>,
    retention_floor: Duration,
    reverify_interval: Duration,
    close: Duration,
    verify_stream: bool,
    retry_initial_connect: bool,
}

prop_compose! {
    fn durations()(
        ack_timeout in positive(),
        ping_interval in ping(),
        connect_timeout in positive(),
        retry in proptest::collection::vec(positive(), 0..3),
        reconnect_base in positive(),
        reconnect_cap in positive(),
        block in proptest::option::of(extreme()),
        retention_floor in extreme(),
        reverify_interval in extreme(),
        close in extreme(),
        verify_stream in any::<bool>(),
        retry_initial_connect in any::<bool>(),
    ) -> Durations {
        Durations {
            ack_timeout, ping_interval, connect_timeout, retry, reconnect_base, reconnect_cap,
            block, retention_floor, reverify_interval, close, verify_stream,
            retry_initial_connect,
        }
    }
}

/// A start error is an answer too, if it names what is wrong.
fn typed_start_error(e: &StartError, d: &Durations) -> Result<String, TestCaseError> {
    match e {
        StartError::Config { field, problem } => {
            prop_assert!(!field.is_empty() && !problem.is_empty(), "{e}");
        }
        StartError::StreamViolations { violations, .. } => {
            prop_assert!(!violations.is_empty(), "{e}");
        }
        // A connect timeout too short for any TCP handshake.
        StartError::Connect { .. } => {}
        // The client's request timeout is the ack timeout: too short for the stream check too.
        StartError::StreamApi { reason, .. } if d.ack_timeout <= Duration::from_millis(1) => {
            prop_assert!(reason.contains("timed out"), "{e}");
        }
        other => prop_assert!(false, "unexpected start error: {other:?}"),
    }
    Ok(format!("refused at start: {e}"))
}

/// Builds and runs one sink with `d`; checks that nothing panics or hangs and that the close
/// report matches every accepted event's outcome. Returns what happened, for the log.
async fn run_case(url: &str, d: &Durations, case: usize) -> Result<String, TestCaseError> {
    let mut b = JetStreamSink::builder(url)
        .subject_template(TEMPLATE)
        .stream(STREAM)
        .stream_policy(if d.verify_stream {
            StreamPolicy::Verify
        } else {
            StreamPolicy::Off
        })
        .ack_timeout(d.ack_timeout)
        .ping_interval(d.ping_interval)
        .connect_timeout(d.connect_timeout)
        .reconnect(Backoff {
            base: d.reconnect_base,
            // A cap below the base is refused like a zero (see the test below).
            cap: d.reconnect_cap.max(d.reconnect_base),
            ..Backoff::reconnect_default()
        })
        .when_full(match d.block {
            Some(deadline) => WhenFull::Block { deadline },
            None => WhenFull::Reject,
        })
        .retention_floor(d.retention_floor)
        .reverify_interval(d.reverify_interval)
        .retry_initial_connect(d.retry_initial_connect);
    match RetrySchedule::new(d.retry.clone()) {
        Ok(schedule) => b = b.retry(schedule),
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    let started = tokio::time::timeout(Duration::from_secs(30), b.connect()).await;
    prop_assert!(started.is_ok(), "I5: connect returns within 30 s");
    let sink = match started.expect("checked") {
        Ok(sink) => sink,
        Err(e) => return typed_start_error(&e, d),
    };
    let mut pending = Vec::new();
    for i in 0..2 {
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            sink.send(event(&format!("ext{case}"), i, 2)),
        )
        .await;
        prop_assert!(sent.is_ok(), "I5: send returns (queue never full here)");
        match sent.expect("checked") {
            Ok(p) => pending.push(p),
            Err(e) => prop_assert!(
                matches!(e, EmitError::QueueFull { .. } | EmitError::BreakerOpen),
                "{e:?}"
            ),
        }
    }
    let all_in = tokio::time::timeout(Duration::from_secs(3), sink.flush())
        .await
        .is_ok();
    // `Duration::MAX` as the close deadline only once nothing is left to wait for; otherwise it
    // would (rightly) wait forever for a broker these durations may never let through.
    let deadline = if all_in {
        d.close
    } else {
        d.close.min(Duration::from_millis(500))
    };
    let report = tokio::time::timeout(Duration::from_secs(10), sink.close(deadline)).await;
    prop_assert!(report.is_ok(), "I5: close({deadline:?}) returns");
    let report: CloseReport = report.expect("checked");
    let again = tokio::time::timeout(Duration::from_secs(5), sink.close(Duration::MAX)).await;
    prop_assert!(again.is_ok(), "I5: a second close returns at once");
    prop_assert_eq!(again.as_ref().expect("checked"), &report);
    let mut settled = 0;
    let mut not_delivered = 0;
    for p in pending {
        let outcome = tokio::time::timeout(Duration::from_secs(5), p).await;
        prop_assert!(outcome.is_ok(), "I5: every accepted event gets an outcome");
        match outcome.expect("checked") {
            Ok(_) | Err(EmitError::Rejected { .. } | EmitError::TooLarge { .. }) => settled += 1,
            Err(EmitError::NotDelivered { .. }) => not_delivered += 1,
            Err(e) => prop_assert!(false, "unexpected outcome {e:?}"),
        }
    }
    prop_assert_eq!(report.not_delivered.len(), not_delivered, "{:?}", report);
    prop_assert_eq!(report.complete(), not_delivered == 0);
    prop_assert_eq!(report.delivered + report.rejected, settled as u64);
    Ok(format!(
        "{settled} settled, {not_delivered} not delivered, closed with {deadline:?}"
    ))
}

fn durations_at_their_extremes(version: ServerVersion) {
    count_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(server(version));
    // The stream exists up front, so cases with the stream policy off have somewhere to write.
    rt.block_on(async {
        let js = async_nats::jetstream::new(server.connect().await.expect("client"));
        js.create_stream(sink_nats::new_stream_config(
            STREAM,
            vec!["t.events.*.v1".into()],
        ))
        .await
        .expect("create stream");
    });
    let mut runner = TestRunner::new(Config {
        cases: 16,
        failure_persistence: None,
        ..Config::default()
    });
    let cases = AtomicUsize::new(0);
    let result = runner.run(&durations(), |d| {
        let case = cases.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let panics = PANICS.load(Ordering::SeqCst);
        let what = rt.block_on(run_case(&server.url(), &d, case))?;
        println!("case {case} ({:?}): {what}\n  {d:?}", started.elapsed());
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), panics, "a task panicked");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn builder_durations_at_their_extremes_neither_panic_nor_hang_and_close_tells_the_truth_on_2_15() {
    durations_at_their_extremes(ServerVersion::V2_15);
}

/// The settings a zero makes meaningless are refused by `connect`, before any connection, naming
/// the setting and the fix.
#[tokio::test]
async fn zero_durations_are_refused_naming_the_setting() {
    // Nothing listens here: validation comes first.
    let base =
        || JetStreamSink::builder("nats://127.0.0.1:1").connect_timeout(Duration::from_millis(10));
    let cases = [
        ("ack_timeout", base().ack_timeout(Duration::ZERO)),
        ("ping_interval", base().ping_interval(Duration::ZERO)),
        ("connect_timeout", base().connect_timeout(Duration::ZERO)),
        (
            "backoff base",
            base().reconnect(Backoff {
                base: Duration::ZERO,
                ..Backoff::reconnect_default()
            }),
        ),
        (
            "cap",
            base().reconnect(Backoff {
                cap: Duration::from_millis(1),
                ..Backoff::reconnect_default()
            }),
        ),
    ];
    for (setting, builder) in cases {
        match builder.connect().await {
            Err(e @ StartError::Config { .. }) => {
                let text = e.to_string();
                assert!(text.contains(setting), "{setting}: {text}");
            }
            other => panic!("{setting} 0: expected a config error, got {other:?}"),
        }
    }
    let zero_retry = RetrySchedule::new(vec![Duration::from_millis(100), Duration::ZERO])
        .expect_err("a zero retry delay is refused");
    assert!(
        zero_retry.to_string().contains("retry delay #1 is 0s"),
        "{zero_retry}"
    );
}
