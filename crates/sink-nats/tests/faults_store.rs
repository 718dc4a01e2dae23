//! F11 on real servers: a full stream (`max_msgs` with discard-new) fails the events that do not fit
//! with a typed, terminal error, loses nothing it acked, leaves the breaker closed, and recovers once
//! space is freed.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use common::*;
use sink_nats::{BreakerStatus, EmitError, StreamPolicy};
use sink_testkit::ServerVersion;

async fn full_stream_fails_overflow_alone_and_recovers(version: ServerVersion) {
    let server = server(version).await;
    let client = server.connect().await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(Config {
        name: STREAM.into(),
        subjects: vec!["t.events.*.v1".into()],
        max_messages: 100,
        discard: DiscardPolicy::New,
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Config::default()
    })
    .await
    .expect("create limited stream");
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Verify)
        .window(64)
        .connect()
        .await
        .expect("a discard-new limit is no violation");

    let mut sent = send_all(&sink, "full", 150, 3).await;
    let ok = sent.iter().filter(|s| s.outcome.is_ok()).count();
    assert_eq!(ok, 100, "exactly the first 100 fit");
    for s in &sent[100..] {
        match &s.outcome {
            Err(EmitError::Rejected { rejection, .. }) => assert!(
                rejection.reason.contains("maximum messages"),
                "typed terminal reason: {rejection}"
            ),
            other => panic!("event {} should be rejected, got {other:?}", s.event.id),
        }
    }
    assert_eq!(
        sink.health().breaker,
        BreakerStatus::Closed,
        "terminal errors never trip the breaker"
    );

    js.get_stream(STREAM)
        .await
        .expect("stream")
        .purge()
        .await
        .expect("purge frees space");
    let after = send_all(&sink, "after-purge", 20, 3).await;
    assert!(
        after.iter().all(|s| s.outcome.is_ok()),
        "recovers once space is freed"
    );
    sent.extend(after);
    let stored = {
        let js = async_nats::jetstream::new(server.connect().await.expect("connect"));
        sink_testkit::read_stream(&js, STREAM, Duration::from_secs(10))
            .await
            .expect("read back")
    };
    // The purge removed the first 100 on purpose; what remains must be exactly the 20 acked later.
    let report = sink_testkit::compare(&expectations(&sent[150..], false), &stored);
    report.assert_passed();
    assert_eq!(report.stored, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_stream_fails_overflow_alone_and_recovers_on_2_9() {
    full_stream_fails_overflow_alone_and_recovers(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_stream_fails_overflow_alone_and_recovers_on_2_15() {
    full_stream_fails_overflow_alone_and_recovers(ServerVersion::V2_15).await;
}
