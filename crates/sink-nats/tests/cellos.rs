//! The `cellos` feature: a service written against the seed's `cellos_core::ports::EventSink` switches
//! to jetsink by changing the constructor only, and gains acked, deduplicated delivery.
#![cfg(feature = "cellos")]

mod common;

use cellos_core::types::CloudEventV1;
use common::*;
use sink_testkit::ServerVersion;

fn seed_event(i: usize) -> CloudEventV1 {
    CloudEventV1 {
        specversion: "1.0".into(),
        id: format!("seed-{i}"),
        source: "cellos://supervisor/host-a".into(),
        ty: "io.cellos.cell.started".into(),
        datacontenttype: Some("application/json".into()),
        data: Some(serde_json::json!({ "tenantId": "acme", "cell": i })),
        time: Some("2026-11-27T06:00:00Z".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_trait_emits_are_stored_once_each() {
    let server = server(ServerVersion::V2_9).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let dyn_sink: &dyn cellos_core::ports::EventSink = &sink;
    for i in 0..20 {
        dyn_sink.emit(&seed_event(i)).await.expect("stored");
    }
    // The same event again: deduplicated by its message id, still Ok like the seed.
    dyn_sink
        .emit(&seed_event(0))
        .await
        .expect("duplicate is Ok");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stored = sink_testkit::read_stream(&js, STREAM, std::time::Duration::from_secs(10))
        .await
        .expect("read back");
    assert_eq!(stored.len(), 20);
    assert!(stored.iter().all(|m| m.subject == "t.events.acme.v1"));
    let bad = CloudEventV1 {
        specversion: "0.3".into(),
        ..seed_event(99)
    };
    let err = dyn_sink
        .emit(&bad)
        .await
        .expect_err("specversion 0.3 is refused");
    assert!(err.to_string().contains("specversion"), "{err}");
}

/// cellos-core omits `tenantId` from the data of an event without a tenant; the seed published
/// such events under its default token `single`, and so does jetsink: no new error on switching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_events_without_a_tenant_go_to_single_as_with_the_seed() {
    let server = server(ServerVersion::V2_9).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let dyn_sink: &dyn cellos_core::ports::EventSink = &sink;
    let untenanted = CloudEventV1 {
        data: Some(serde_json::json!({ "cell": 1 })),
        ..seed_event(1)
    };
    dyn_sink
        .emit(&untenanted)
        .await
        .expect("an event without a tenant is Ok, as with the seed");
    dyn_sink.emit(&seed_event(2)).await.expect("stored");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stored = sink_testkit::read_stream(&js, STREAM, std::time::Duration::from_secs(10))
        .await
        .expect("read back");
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["t.events.single.v1", "t.events.acme.v1"]);
}
