//! Issue #9 item 3 on real servers: the size an event may have is the server's `max_payload`
//! counted the way the server counts it (header block + body, with every header the sink adds),
//! read again on every connect; an event that does not fit fails alone with `TooLarge`, never
//! retried forever.

mod common;

use std::time::Duration;

use common::*;
use sink_core::event::{CloudEvent, MsgId};
use sink_core::outbox::OrderingMode;
use sink_nats::{BreakerStatus, EmitError, JetStreamSink, Receipt, StreamPolicy};
use sink_testkit::{read_stream, NatsServer, ServerOptions, ServerVersion, StoredMessage};

/// A stream name of 100 characters: every byte of `Nats-Expected-Stream` counts.
fn long_stream_name() -> String {
    format!("EVENTS_{}", "L".repeat(93))
}

/// An event whose structured body grows by exactly one byte per unit of `blob`. Ids have a
/// fixed width so two events with the same `blob` have the same size.
fn sized_event(id: u32, blob: usize) -> CloudEvent {
    CloudEvent::new(
        format!("size-{id:05}"),
        "/test/sizes",
        "com.example.test.v1",
    )
    .with_data_json(serde_json::json!({ "tenantId": "tenant-0", "blob": "y".repeat(blob) }))
}

/// What the server counted for a stored message: its header block plus its body.
fn wire_size(m: &StoredMessage) -> usize {
    let header_block = "NATS/1.0\r\n".len()
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + ": ".len() + v.len() + "\r\n".len())
            .sum::<usize>()
        + "\r\n".len();
    header_block + m.payload.len()
}

async fn stored(server: &NatsServer, stream: &str) -> Vec<StoredMessage> {
    let js = async_nats::jetstream::new(server.connect().await.expect("client"));
    read_stream(&js, stream, Duration::from_secs(30))
        .await
        .expect("read stream back")
}

/// Emits `event`; an accepted event must get its outcome well within the I5 bound.
async fn emit_bounded(sink: &JetStreamSink, event: &CloudEvent) -> Result<Receipt, EmitError> {
    let outcome = tokio::time::timeout(Duration::from_secs(20), sink.emit(event))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "event {} was accepted but has no outcome after 20 s (retried forever?)",
                event.id
            )
        });
    outcome
}

/// Binary search for the largest `blob` the sink accepts: every accepted probe must be stored, every
/// refused one must be `TooLarge` naming the server's limit. Returns the largest accepted blob.
async fn largest_accepted_blob(sink: &JetStreamSink, max_payload: usize, ids: &mut u32) -> usize {
    let (mut fits, mut too_big) = (0, max_payload);
    while too_big - fits > 1 {
        let mid = (fits + too_big) / 2;
        *ids += 1;
        match emit_bounded(sink, &sized_event(*ids, mid)).await {
            Ok(_) => fits = mid,
            Err(EmitError::TooLarge {
                max_payload: limit, ..
            }) => {
                assert_eq!(limit, max_payload);
                too_big = mid;
            }
            Err(other) => panic!("blob {mid}: expected delivery or TooLarge, got {other:?}"),
        }
    }
    fits
}

async fn largest_event_is_stored(version: ServerVersion, ordering: OrderingMode) {
    const MAX_PAYLOAD: usize = 16 * 1024;
    let server = NatsServer::start(ServerOptions {
        max_payload: Some(MAX_PAYLOAD as u32),
        ..ServerOptions::version(version)
    })
    .await
    .expect("start");
    let stream = long_stream_name();
    let sink = builder(&server.url())
        .stream(&stream)
        .ordering(ordering)
        .connect()
        .await
        .expect("connect");
    let mut ids = 0;
    let fits = largest_accepted_blob(&sink, MAX_PAYLOAD, &mut ids).await;

    // One byte more is refused by `send` itself, before anything is queued or sent.
    let over = sized_event(90_001, fits + 1);
    match sink.try_send(over.clone()) {
        Err(EmitError::TooLarge {
            event_id,
            size,
            max_payload,
        }) => {
            assert_eq!(event_id, over.id);
            assert_eq!(max_payload, MAX_PAYLOAD);
            assert_eq!(size, MAX_PAYLOAD + 1, "the limit is exact");
        }
        other => panic!("one byte over: expected TooLarge, got {other:?}"),
    }
    // The largest accepted size, once more under a fresh id, is stored.
    let largest = sized_event(90_000, fits);
    let receipt = emit_bounded(&sink, &largest)
        .await
        .expect("the largest accepted event is stored");
    assert_eq!(sink.health().breaker, BreakerStatus::Closed);
    let messages = stored(&server, &stream).await;
    let id = MsgId::for_event(&largest);
    let copy = messages
        .iter()
        .find(|m| m.msg_id.as_deref() == Some(id.as_str()))
        .expect("stored");
    match receipt.sequence {
        Some(sequence) => assert_eq!(copy.stream_sequence, sequence),
        None => assert!(
            receipt.batch.is_some(),
            "a receipt names a sequence or a batch"
        ),
    }
    let size = wire_size(copy);
    assert!(size <= MAX_PAYLOAD, "{size}");
    if ordering == OrderingMode::Unordered {
        // Unordered publishes never carry Nats-Expected-Last-Msg-Id; the sink's worst case
        // counts it, and nothing else is left over: the accounting is exact.
        let expected_last_line = "Nats-Expected-Last-Msg-Id: \r\n".len() + id.as_str().len();
        assert_eq!(
            copy.header("Nats-Expected-Stream"),
            Some(stream.as_str()),
            "{copy:?}"
        );
        assert_eq!(size + expected_last_line, MAX_PAYLOAD, "{copy:?}");
    }
    println!(
        "sizes {version} {ordering}: largest blob {fits}, stored {size} of {MAX_PAYLOAD} bytes, \
         {} probes",
        ids
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_accepted_event_on_a_long_stream_name_is_stored_and_one_byte_more_is_too_large_on_2_9(
) {
    largest_event_is_stored(ServerVersion::V2_9, OrderingMode::Unordered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_accepted_event_on_a_long_stream_name_is_stored_and_one_byte_more_is_too_large_on_2_15(
) {
    largest_event_is_stored(ServerVersion::V2_15, OrderingMode::Unordered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_accepted_event_is_stored_when_chained_on_2_9() {
    largest_event_is_stored(ServerVersion::V2_9, OrderingMode::Chained).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_accepted_event_is_stored_when_chained_on_2_15() {
    largest_event_is_stored(ServerVersion::V2_15, OrderingMode::Chained).await;
}

const SMALL_LIMIT: usize = 8 * 1024;

/// A server with `max_payload` 8 KiB that has a stream and is down.
async fn small_limit_server_down(version: ServerVersion) -> NatsServer {
    let mut server = NatsServer::start(ServerOptions {
        max_payload: Some(SMALL_LIMIT as u32),
        ..ServerOptions::version(version)
    })
    .await
    .expect("start");
    let js = async_nats::jetstream::new(server.connect().await.expect("client"));
    js.create_stream(sink_nats::new_stream_config(
        STREAM,
        vec!["t.events.*.v1".into()],
    ))
    .await
    .expect("create stream");
    server.kill().await.expect("kill");
    server
}

/// Queues a 20 KiB event between small ones, brings the server up, and checks that the big one
/// fails alone with `TooLarge` while everything else is delivered in order. `before`: what the sink
/// delivered earlier, for the audit.
async fn oversized_queued_event_fails_alone(
    server: &mut NatsServer,
    sink: &JetStreamSink,
    before: Vec<Sent>,
) {
    let mut pending = Vec::new();
    for i in 0..6 {
        let e = if i == 2 {
            sized_event(2, 20 * 1024)
        } else {
            event("small", i, 2)
        };
        let p = sink.send(e.clone()).await.expect("accepted while down");
        pending.push((e, p));
    }
    server.restart().await.expect("server comes up");
    let mut sent = before;
    sent.extend(await_outcomes(pending).await);
    for s in &sent {
        if s.event.id == "size-00002" {
            match &s.outcome {
                Err(EmitError::TooLarge {
                    event_id,
                    size,
                    max_payload,
                }) => {
                    assert_eq!(event_id, &s.event.id);
                    assert_eq!(*max_payload, SMALL_LIMIT);
                    assert!(*size > 20 * 1024, "{size}");
                }
                other => panic!("expected TooLarge for the queued big event, got {other:?}"),
            }
        } else {
            assert!(s.outcome.is_ok(), "{}: {:?}", s.event.id, s.outcome);
        }
    }
    // The limit is known now: the next big event is refused by `send`, before queueing.
    match sink.send(sized_event(3, 20 * 1024)).await {
        Err(EmitError::TooLarge { max_payload, .. }) => assert_eq!(max_payload, SMALL_LIMIT),
        other => panic!("expected TooLarge from send, got {other:?}"),
    }
    assert_eq!(sink.health().breaker, BreakerStatus::Closed);
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, sent.len() - 1);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

async fn started_before_a_small_limit_server(version: ServerVersion) {
    let mut server = small_limit_server_down(version).await;
    let sink = tokio::time::timeout(
        Duration::from_secs(20),
        builder(&server.url())
            .stream_policy(StreamPolicy::Verify)
            .retry_initial_connect(true)
            .reconnect(fast_reconnect())
            .connect(),
    )
    .await
    .expect("I5: connect returns while the server is down")
    .expect("starts without the server");
    oversized_queued_event_fails_alone(&mut server, &sink, Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_started_before_a_small_max_payload_server_fails_the_big_event_alone_on_2_9() {
    started_before_a_small_limit_server(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_started_before_a_small_max_payload_server_fails_the_big_event_alone_on_2_15() {
    started_before_a_small_limit_server(ServerVersion::V2_15).await;
}

async fn limit_shrinks_across_a_restart(version: ServerVersion) {
    let mut server = NatsServer::start(ServerOptions {
        max_payload: Some(64 * 1024),
        ..ServerOptions::version(version)
    })
    .await
    .expect("start");
    let sink = builder(&server.url())
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    let first = event("before", 0, 1);
    let outcome = sink.emit(&first).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    server.kill().await.expect("kill");
    // The server comes back with a smaller limit than the one the big event is accepted under.
    server.options_mut().max_payload = Some(SMALL_LIMIT as u32);
    let before = vec![Sent {
        event: first,
        outcome,
    }];
    oversized_queued_event_fails_alone(&mut server, &sink, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_accepted_before_max_payload_shrank_fails_alone_when_sent_on_2_9() {
    limit_shrinks_across_a_restart(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_accepted_before_max_payload_shrank_fails_alone_when_sent_on_2_15() {
    limit_shrinks_across_a_restart(ServerVersion::V2_15).await;
}
