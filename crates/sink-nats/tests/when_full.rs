//! Issue #9 item 5 on real servers: while acked events wait behind one unacked event, the queue is
//! full, and `send` under `WhenFull::Block` waits for room (under `Reject` it fails at once).

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use sink_core::event::CloudEvent;
use sink_core::outbox::OrderingMode;
use sink_nats::{EmitError, JetStreamSink, Pending, StreamPolicy, WhenFull};
use sink_testkit::{NatsServer, ServerVersion};

/// Events whose subject the stream captures.
const STORED_SUBJECT: &str = "t.events.good.v1";
/// The subject of the one event whose ack the test holds back: no stream captures it, a plain
/// subscriber of the test takes it instead.
const HELD_SUBJECT: &str = "t.events.held.v1";
const BOUND: usize = 8;

/// A broker that is slow for one event: the test stores the held event in the stream itself and
/// answers the sink only when told to.
struct HeldAck {
    client: async_nats::Client,
    reply: async_nats::Subject,
    stream_sequence: u64,
}

impl HeldAck {
    /// Sends the held event's ack: the sink may release everything acked behind it.
    async fn release(self) {
        let ack = serde_json::json!({ "stream": STREAM, "seq": self.stream_sequence });
        self.client
            .publish(self.reply, ack.to_string().into())
            .await
            .expect("publish ack");
        self.client.flush().await.expect("flush");
    }
}

/// A sink whose queue is full of acked events waiting behind one unacked event.
struct Full {
    server: NatsServer,
    sink: JetStreamSink,
    held: HeldAck,
    /// Events delivered (and let go of) before the held one, then the held event with its
    /// outcome handle, then the events acked behind it.
    before: Vec<Sent>,
    held_event: (CloudEvent, Pending),
    acked: Vec<Sent>,
}

/// Starts a server, a sink bounded at [`BOUND`] events, and fills its queue: one event is stored
/// but unacknowledged, the [`BOUND`] - 1 after it are acked and wait behind it.
async fn full_of_acked_events(version: ServerVersion, when_full: WhenFull) -> Full {
    let server = server(version).await;
    let client = server.connect().await.expect("client");
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(sink_nats::new_stream_config(
        STREAM,
        vec![STORED_SUBJECT.into()],
    ))
    .await
    .expect("create stream");
    let mut held = client.subscribe(HELD_SUBJECT).await.expect("subscribe");
    client.flush().await.expect("flush");
    let sink = builder(&server.url())
        // The held subject is outside the stream on purpose.
        .stream_policy(StreamPolicy::Off)
        // Admission is the same in every mode (the outbox keeps acked entries behind the first
        // unacked one in all of them); unordered publishes carry no expected-last id, and no
        // event waits for the answer to another, so which event is held is up to the test alone.
        .ordering(OrderingMode::Unordered)
        .queue_bound(BOUND, 1 << 20)
        .window(BOUND)
        .when_full(when_full)
        // Longer than the test: the held event must not time out and be re-sent.
        .ack_timeout(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect");

    let before = good_event("full", 0);
    let outcome = sink.emit(&before).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    let before = vec![Sent {
        event: before,
        outcome,
    }];
    let held_event = event("full", 1, 1).with_data_json(serde_json::json!({ "tenantId": "held" }));
    let held_pending = sink.send(held_event.clone()).await.expect("accepted");
    let msg = tokio::time::timeout(Duration::from_secs(10), held.next())
        .await
        .expect("the held event arrives")
        .expect("subscription open");
    // Store it as the broker would have (same headers, so the same Nats-Msg-Id) and keep its ack:
    // the stream holds it in its place, before the events sent after it.
    let stored = js
        .publish_with_headers(
            STORED_SUBJECT,
            msg.headers.clone().expect("the sink sends headers"),
            msg.payload.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let held_ack = HeldAck {
        client,
        reply: msg.reply.clone().expect("the sink asks for an ack"),
        stream_sequence: stored.sequence,
    };

    let mut acked = Vec::new();
    for i in 2..=BOUND {
        let e = good_event("full", i);
        let p = sink.send(e.clone()).await.expect("room for it");
        acked.push((e, p));
    }
    let acked = await_outcomes(acked).await;
    assert_all_ok(&acked);
    // The driver publishes its state after handling the acks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while sink.health().queued != BOUND && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let health = sink.health();
    assert_eq!(
        health.queued, BOUND,
        "acked events wait behind the held one: {health:?}"
    );
    Full {
        server,
        sink,
        held: held_ack,
        before,
        held_event: (held_event, held_pending),
        acked,
    }
}

fn good_event(run: &str, i: usize) -> CloudEvent {
    event(run, i, 1).with_data_json(serde_json::json!({ "tenantId": "good", "index": i }))
}

async fn block_waits_for_room(version: ServerVersion) {
    let Full {
        server,
        sink,
        held,
        before,
        held_event: (held_event, first),
        acked,
    } = full_of_acked_events(
        version,
        WhenFull::Block {
            deadline: Duration::from_secs(30),
        },
    )
    .await;
    let next = good_event("full", BOUND + 1);
    let waiting = {
        let sink = sink.clone();
        let next = next.clone();
        tokio::spawn(async move { sink.send(next).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "send under Block returned while the queue is full: {:?}",
        waiting.await
    );
    held.release().await;
    let accepted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("send returns once room appears")
        .expect("join")
        .expect("accepted once room appears");
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("I5");
    assert!(first.is_ok(), "{first:?}");
    let last = tokio::time::timeout(Duration::from_secs(10), accepted)
        .await
        .expect("I5");
    assert!(last.is_ok(), "{last:?}");
    // The stream holds the held event, then the others, in order.
    let mut sent = before;
    sent.push(Sent {
        event: held_event,
        outcome: first,
    });
    sent.extend(acked);
    sent.push(Sent {
        event: next,
        outcome: last,
    });
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, BOUND + 2);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_waits_while_acked_events_wait_behind_an_unacked_one_on_2_9() {
    block_waits_for_room(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_waits_while_acked_events_wait_behind_an_unacked_one_on_2_15() {
    block_waits_for_room(ServerVersion::V2_15).await;
}

async fn reject_fails_at_once(version: ServerVersion) {
    // The server must outlive the test: bind it.
    let Full {
        server: _server,
        sink,
        held,
        held_event: (_, first),
        ..
    } = full_of_acked_events(version, WhenFull::Reject).await;
    let refused = tokio::time::timeout(
        Duration::from_millis(200),
        sink.send(good_event("full", BOUND + 1)),
    )
    .await
    .expect("Reject does not wait");
    assert!(
        matches!(
            refused,
            Err(EmitError::QueueFull {
                max_events: BOUND,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(matches!(
        sink.try_send(good_event("full", BOUND + 1)),
        Err(EmitError::QueueFull { .. })
    ));
    held.release().await;
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("I5");
    assert!(first.is_ok(), "{first:?}");
    // Room again once the held event is acked and the queue lets go of it and those behind it.
    tokio::time::timeout(Duration::from_secs(10), sink.flush())
        .await
        .expect("I5")
        .expect("flush");
    let pending = sink
        .send(good_event("full", BOUND + 1))
        .await
        .expect("room after the release");
    let outcome = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("I5");
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_fails_at_once_while_acked_events_wait_behind_an_unacked_one_on_2_9() {
    reject_fails_at_once(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_fails_at_once_while_acked_events_wait_behind_an_unacked_one_on_2_15() {
    reject_fails_at_once(ServerVersion::V2_15).await;
}
