//! F26 at run time: an operator edits the stream while the sink runs; the sink re-verifies on its interval and on reconnect, reports the drift in `health()` and the metrics, and holds events rather than lose them.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Config;
use common::*;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sink_nats::{new_stream_config, JetStreamSink, StreamPolicy};
use sink_testkit::ServerVersion;

const DAY: Duration = Duration::from_secs(24 * 3600);
const SUBJECTS: &str = "t.events.*.v1";

/// The process-wide recorder: every test of this binary reads its gauges, each under a stream
/// name of its own.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder of this test binary")
    })
}

/// `jetsink_stream_violations{stream}` as rendered for Prometheus, if set.
fn violations_gauge(stream: &str) -> Option<f64> {
    let prefix = format!("jetsink_stream_violations{{stream=\"{stream}\"}} ");
    recorder()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.parse().expect("number")))
}

fn stream_name(kind: &str, version: ServerVersion) -> String {
    format!("DRIFT_{kind}_{}", version.as_str().replace('.', "_"))
}

fn config(stream: &str) -> Config {
    new_stream_config(stream, vec![SUBJECTS.into()])
}

/// Polls `health().stream_violations` until their fields are `fields`, within `within`.
async fn wait_for_fields(sink: &JetStreamSink, fields: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let h = sink.health();
        let found: Vec<&str> = h.stream_violations.iter().map(|v| v.field()).collect();
        if found == fields {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stream violations {found:?} never became {fields:?} within {within:?}: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Delivery goes on through a drift that only puts events at risk later (`max_age` 30 d, a
/// per-subject limit), and stops, with events held, while the stream does not acknowledge
/// (`no_ack`); once fixed, everything is stored once, in order.
async fn drift_found_on_the_interval(version: ServerVersion) {
    let stream = stream_name("INTERVAL", version);
    recorder();
    let server = server(version).await;
    let js = async_nats::jetstream::new(server.connect().await.expect("client"));
    js.create_stream(config(&stream)).await.expect("create");
    let sink = builder(&server.url())
        .stream(&stream)
        .stream_policy(StreamPolicy::Verify)
        .reverify_interval(Duration::from_millis(200))
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    let before = send_all(&sink, "drift-before", 100, 3).await;
    assert_all_ok(&before);
    assert!(sink.health().stream_violations.is_empty());
    assert_eq!(violations_gauge(&stream), Some(0.0));

    let drifted = Config {
        max_age: DAY * 30,
        max_messages_per_subject: 1_000,
        ..config(&stream)
    };
    js.update_stream(drifted.clone()).await.expect("edit");
    wait_for_fields(
        &sink,
        &["max_age", "max_msgs_per_subject"],
        Duration::from_secs(5),
    )
    .await;
    let health = sink.health();
    let texts: Vec<String> = health
        .stream_violations
        .iter()
        .map(ToString::to_string)
        .collect();
    println!("F26 run time {version}: {texts:#?}");
    assert!(texts[0].contains("max_age is 30d"), "{texts:?}");
    assert!(
        texts[1].contains("max_msgs_per_subject is 1000")
            && texts[1].contains("set max_msgs_per_subject to -1"),
        "{texts:?}"
    );
    assert_eq!(violations_gauge(&stream), Some(2.0));
    let during = send_all(&sink, "drift-during", 100, 3).await;
    assert_all_ok(&during);

    js.update_stream(Config {
        no_ack: true,
        ..drifted
    })
    .await
    .expect("edit: no acks");
    wait_for_fields(
        &sink,
        &["max_age", "no_ack", "max_msgs_per_subject"],
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(violations_gauge(&stream), Some(3.0));
    let count = stored_count(&server, &stream).await;
    let mut pending = Vec::new();
    for i in 0..50 {
        let e = event("drift-held", i, 3);
        let p = sink.send(e.clone()).await.expect("queued");
        pending.push((e, p));
    }
    // Give a wrongly released publish time to land before looking.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let health = sink.health();
    assert_eq!(health.queued, 50, "{health:?}");
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no_ack") && e.contains("events stay queued")),
        "{health:?}"
    );
    assert_eq!(
        stored_count(&server, &stream).await,
        count,
        "nothing may be published while the stream does not acknowledge"
    );

    js.update_stream(config(&stream)).await.expect("fix");
    let held = await_outcomes(pending).await;
    assert_all_ok(&held);
    wait_for_fields(&sink, &[], Duration::from_secs(5)).await;
    assert_eq!(violations_gauge(&stream), Some(0.0));
    let sent: Vec<Sent> = before.into_iter().chain(during).chain(held).collect();
    let report = audit_stream(server.connect().await.expect("client"), &stream, &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 250);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_edited_while_running_is_reported_and_unsafe_drift_holds_events_on_2_9() {
    drift_found_on_the_interval(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_edited_while_running_is_reported_and_unsafe_drift_holds_events_on_2_15() {
    drift_found_on_the_interval(ServerVersion::V2_15).await;
}

/// With the periodic check off, an edit is found on the next reconnect.
async fn drift_found_on_reconnect(version: ServerVersion) {
    let stream = stream_name("RECONNECT", version);
    recorder();
    let mut server = server(version).await;
    let js = async_nats::jetstream::new(server.connect().await.expect("client"));
    js.create_stream(config(&stream)).await.expect("create");
    let sink = builder(&server.url())
        .stream(&stream)
        .stream_policy(StreamPolicy::Verify)
        .reverify_interval(Duration::MAX)
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    let before = send_all(&sink, "reconnect-before", 20, 3).await;
    assert_all_ok(&before);
    js.update_stream(Config {
        max_age: DAY * 30,
        ..config(&stream)
    })
    .await
    .expect("edit");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        sink.health().stream_violations.is_empty(),
        "the periodic check is off: {:?}",
        sink.health()
    );

    server.kill().await.expect("kill");
    server.restart().await.expect("restart");
    wait_for_fields(&sink, &["max_age"], Duration::from_secs(15)).await;
    assert_eq!(violations_gauge(&stream), Some(1.0));
    let after = send_all(&sink, "reconnect-after", 20, 3).await;
    assert_all_ok(&after);
    let sent: Vec<Sent> = before.into_iter().chain(after).collect();
    let report = audit_stream(server.connect().await.expect("client"), &stream, &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_edited_while_running_is_found_on_reconnect_on_2_9() {
    drift_found_on_reconnect(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_edited_while_running_is_found_on_reconnect_on_2_15() {
    drift_found_on_reconnect(ServerVersion::V2_15).await;
}
