//! Start-up with the server down (`retry_initial_connect`): the stream policy is applied once the
//! client connects, and nothing is published before it passes.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_all_ok, audit, await_outcomes, builder, event, fast_reconnect, server, stored_count,
    STREAM,
};
use sink_nats::{new_stream_config, Mechanism, StreamPolicy};
use sink_testkit::ServerVersion;

/// A stream that breaks the 90-day retention floor exists while the server is down. The sink
/// starts anyway (retry on initial connect), checks the stream once connected, holds every
/// event back while the check fails, and delivers them all once the stream is fixed.
async fn verify_after_the_first_connection(version: ServerVersion) {
    let mut server = server(version).await;
    let js = async_nats::jetstream::new(server.connect().await.expect("client"));
    let mut config = new_stream_config(STREAM, vec!["t.events.*.v1".into()]);
    config.max_age = Duration::from_secs(24 * 3600);
    js.create_stream(config.clone()).await.expect("create");
    server.kill().await.expect("kill");

    let sink = tokio::time::timeout(
        Duration::from_secs(10),
        builder(&server.url())
            .stream_policy(StreamPolicy::Verify)
            .retry_initial_connect(true)
            .reconnect(fast_reconnect())
            .connect(),
    )
    .await
    .expect("I5: connect returns while the server is down")
    .expect("starts without the server");
    let mut pending = Vec::new();
    for i in 0..50 {
        let e = event("deferred-verify", i, 3);
        let p = sink.send(e.clone()).await.expect("queued");
        pending.push((e, p));
    }
    server.restart().await.expect("server comes up");

    let deadline = Instant::now() + Duration::from_secs(15);
    let error = loop {
        let h = sink.health();
        if let Some(e) = h.last_error.filter(|e| e.contains("max_age")) {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the deferred check never reported the violation: {:?}",
            sink.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.contains("events stay queued"), "{error}");
    assert_eq!(sink.health().queued, 50, "{:?}", sink.health());
    // Give a wrongly released publish time to land before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stored_count(&server, STREAM).await,
        0,
        "nothing may be published into a stream that failed the check"
    );

    let js = async_nats::jetstream::new(server.connect().await.expect("client"));
    config.max_age = Duration::ZERO;
    js.update_stream(config).await.expect("fix the stream");
    let sent = await_outcomes(pending).await;
    assert_all_ok(&sent);
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 50);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_waits_for_the_first_connection_and_holds_events_until_the_stream_passes_on_2_9() {
    verify_after_the_first_connection(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_waits_for_the_first_connection_and_holds_events_until_the_stream_passes_on_2_15() {
    verify_after_the_first_connection(ServerVersion::V2_15).await;
}

/// No stream and the server down at start, policy Create: the stream is created once the server
/// is reachable, then everything queued is delivered.
async fn create_after_the_first_connection(version: ServerVersion) {
    let mut server = server(version).await;
    server.kill().await.expect("kill");
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Create)
        .retry_initial_connect(true)
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("starts without the server");
    let mut pending = Vec::new();
    for i in 0..30 {
        let e = event("deferred-create", i, 3);
        let p = sink.send(e.clone()).await.expect("queued");
        pending.push((e, p));
    }
    server.restart().await.expect("server comes up");
    let sent = await_outcomes(pending).await;
    assert_all_ok(&sent);
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 30);
    assert_eq!(stored_count(&server, STREAM).await, 30);
    // The events queued before the check moved to fast-batch lanes where the server has them.
    let health = sink.health();
    let lanes = version == ServerVersion::V2_15;
    assert_eq!(
        health.mechanism == Mechanism::FastBatch,
        lanes,
        "{version}: {health:?}"
    );
    assert!(
        sent.iter()
            .all(|s| s.outcome.as_ref().is_ok_and(|r| r.batch.is_some() == lanes)),
        "{version}: receipts come from the mechanism in force"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_the_stream_after_the_first_connection_on_2_9() {
    create_after_the_first_connection(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_the_stream_after_the_first_connection_on_2_15() {
    create_after_the_first_connection(ServerVersion::V2_15).await;
}
