//! Network fault rows of RELIABILITY.md (F4 reset, F5 blackhole, F6 lost ack, F8 mid-frame cut, F13
//! long outage with a bounded queue, F18 reconnect storm) through the testkit's TCP fault proxy, on
//! nats-server 2.9 and 2.15. The sink talks to the proxy; the audit reads the server directly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sink_nats::{Batching, EmitError, JetStreamSink, WhenFull};
use sink_testkit::proxy::{Direction, FaultProxy, ProxyMode};
use sink_testkit::{NatsServer, ServerVersion};

/// Runs one scenario as two tests, one per supported server release.
macro_rules! on_both_versions {
    ($scenario:ident: $on_2_9:ident, $on_2_15:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_2_9() {
            $scenario(ServerVersion::V2_9).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_2_15() {
            $scenario(ServerVersion::V2_15).await;
        }
    };
}

/// A server, a proxy in front of it, and a sink connected through the proxy.
async fn setup(
    version: ServerVersion,
    configure: impl FnOnce(sink_nats::SinkBuilder) -> sink_nats::SinkBuilder,
) -> (NatsServer, FaultProxy, JetStreamSink) {
    let server = server(version).await;
    let proxy = FaultProxy::start(upstream_of(&server))
        .await
        .expect("start proxy");
    let sink = configure(builder(&proxy.url()).reconnect(fast_reconnect()))
        .connect()
        .await
        .expect("connect through the proxy");
    (server, proxy, sink)
}

/// Checks I1-I4 against the server and that every event was delivered.
async fn assert_all_delivered(server: &NatsServer, sent: &[Sent], stored: usize) {
    let failed: Vec<_> = sent
        .iter()
        .filter_map(|s| s.outcome.as_ref().err().map(|e| (&s.event.id, e)))
        .take(5)
        .collect();
    assert!(failed.is_empty(), "every event is delivered: {failed:?}");
    let report = audit(&server.url(), sent).await;
    report.assert_passed();
    assert_eq!(report.stored, stored, "{report}");
}

// F4: a TCP reset while hundreds of publishes are in flight loses nothing, stores nothing twice,
// keeps the order, and every receipt names the stored sequence.
async fn tcp_reset_with_hundreds_in_flight(version: ServerVersion) {
    let n = 3000;
    let (server, proxy, sink) = setup(version, |b| b.window(512)).await;
    // A little latency keeps the window full, so the reset really hits hundreds of publishes.
    proxy.set_latency(Duration::from_millis(20));
    let sending = spawn_send_all(&sink, "reset", n, 4);
    let in_flight = wait_in_flight(&sink, 200, Duration::from_secs(10)).await;
    assert!(
        in_flight >= 200,
        "hundreds in flight before the reset: {in_flight}"
    );
    proxy.reset_all();
    let sent = sending.await.expect("sender task");
    let stats = proxy.stats();
    assert!(
        stats.resets >= 1,
        "the reset hit a live connection: {stats}"
    );
    assert!(stats.accepted >= 2, "the sink reconnected: {stats}");
    assert_all_delivered(&server, &sent, n).await;
    eprintln!(
        "{version}: reset with {in_flight} in flight; duplicate acks {}; {stats}",
        duplicate_acks(&sent)
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

on_both_versions!(tcp_reset_with_hundreds_in_flight:
    tcp_reset_with_hundreds_in_flight_loses_nothing_on_2_9,
    tcp_reset_with_hundreds_in_flight_loses_nothing_on_2_15);

// F5: bytes vanish in both directions without a reset. Pending acks time out, the ping notices the
// dead connection, and once the network is back everything is delivered exactly once, in order.
async fn blackhole_then_recovery(version: ServerVersion) {
    // RELIABILITY.md says 30 s; 8 s keeps CI time down and is still four ack timeouts and sixteen
    // ping intervals: long enough for every timeout and the dead-connection check to fire.
    let outage = Duration::from_secs(8);
    let n = 2000;
    let (server, proxy, sink) = setup(version, |b| b.window(256)).await;
    proxy.set_latency(Duration::from_millis(10));
    let sending = spawn_send_all(&sink, "blackhole", n, 4);
    let in_flight = wait_in_flight(&sink, 100, Duration::from_secs(10)).await;
    assert!(
        in_flight >= 100,
        "publishes in flight at the blackhole: {in_flight}"
    );
    proxy.set_mode(ProxyMode::Blackhole(Direction::Both));
    let accepted_before = proxy.stats().accepted;
    tokio::time::sleep(outage).await;
    let during = sink.health();
    assert!(
        during.last_error.is_some(),
        "the outage is visible in health: {during:?}"
    );
    proxy.set_mode(ProxyMode::PassThrough);
    let sent = sending.await.expect("sender task");
    let stats = proxy.stats();
    assert!(
        stats.accepted > accepted_before,
        "the dead connection was detected and replaced: {stats}"
    );
    assert!(
        stats.bytes_discarded > 0,
        "the blackhole swallowed bytes: {stats}"
    );
    assert_all_delivered(&server, &sent, n).await;
    eprintln!(
        "{version}: blackhole {outage:?}; health during: {during:?}; duplicate acks {}; {stats}",
        duplicate_acks(&sent)
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

on_both_versions!(blackhole_then_recovery:
    blackhole_times_out_acks_detects_dead_connection_and_recovers_on_2_9,
    blackhole_times_out_acks_detects_dead_connection_and_recovers_on_2_15);

// F6: the publishes reach the server and are stored, but the acks are lost. The retries come back
// `duplicate: true` and are reported delivered at the sequence of the stored copy.
async fn lost_acks_are_recovered_as_duplicates(version: ServerVersion) {
    let warm = 20;
    // Fewer than the window: every publish goes out before any ack is due.
    let n = 200;
    // Per-event acks: a lane sends nothing past a batch's first message until it is answered,
    // and its confirmations name no sequence (lanes under a blackhole: the test above).
    let (server, proxy, sink) = setup(version, |b| b.window(256).batching(Batching::Off)).await;
    let mut sent = send_all(&sink, "warm", warm, 2).await;
    assert_eq!(delivered_count(&sent), warm);

    proxy.set_mode(ProxyMode::Blackhole(Direction::ServerToClient));
    let sending = spawn_send_all(&sink, "lost-ack", n, 4);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stored = stored_count(&server, STREAM).await;
    while stored < (warm + n) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stored = stored_count(&server, STREAM).await;
    }
    assert_eq!(
        stored,
        (warm + n) as u64,
        "every publish reached the server while its ack was swallowed"
    );
    // Reset while still blackholed, so the client never sees a frame with a hole in it.
    proxy.reset_all();
    proxy.set_mode(ProxyMode::PassThrough);

    let lost = sending.await.expect("sender task");
    let duplicates = duplicate_acks(&lost);
    sent.extend(lost);
    let report = audit(&server.url(), &sent).await;
    assert!(
        report.sequence_mismatch.is_empty(),
        "duplicates report the original sequence: {report}"
    );
    report.assert_passed();
    assert_eq!(report.stored, warm + n, "{report}");
    assert_eq!(delivered_count(&sent), warm + n);
    assert!(
        duplicates > 0,
        "retries of stored messages come back duplicate: true"
    );
    eprintln!("{version}: {duplicates} of {n} lost acks recovered as duplicates");
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

on_both_versions!(lost_acks_are_recovered_as_duplicates:
    lost_ack_retry_reports_duplicate_with_original_sequence_on_2_9,
    lost_ack_retry_reports_duplicate_with_original_sequence_on_2_15);

// F8: the connection is cut in the middle of a message frame (the server gets a partial frame and
// then end-of-stream). The partial message is not stored; nothing is lost or stored twice.
async fn cut_inside_a_frame(version: ServerVersion) {
    let n = 3000;
    let (server, proxy, sink) = setup(version, |b| b.window(256)).await;
    proxy.set_latency(Duration::from_millis(5));
    let sending = spawn_send_all(&sink, "cut", n, 4);
    let in_flight = wait_in_flight(&sink, 50, Duration::from_secs(10)).await;
    assert!(
        in_flight >= 50,
        "publishes in flight at the cut: {in_flight}"
    );
    // An odd budget: a frame is ~700 bytes, so 20 011 bytes from now ends inside one.
    proxy.cut_after(20_011, Direction::ClientToServer);
    let sent = sending.await.expect("sender task");
    let stats = proxy.stats();
    assert!(stats.cuts >= 1, "the cut happened: {stats}");
    assert!(!proxy.cut_pending());
    assert_all_delivered(&server, &sent, n).await;
    eprintln!(
        "{version}: cut mid-frame; duplicate acks {}; {stats}",
        duplicate_acks(&sent)
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

on_both_versions!(cut_inside_a_frame:
    connection_cut_inside_a_frame_loses_and_duplicates_nothing_on_2_9,
    connection_cut_inside_a_frame_loses_and_duplicates_nothing_on_2_15);

// F18: the connection is reset every 200 ms while events keep coming. No panic, no stuck permits;
// after the storm everything is delivered in order and new events flow again.
async fn reconnect_storm(version: ServerVersion) {
    // RELIABILITY.md says 20 s; 6 s (30 resets) keeps CI time down and exercises the same paths.
    let storm = Duration::from_secs(6);
    let during_n = 3000;
    let after_n = 1000;
    let (server, proxy, sink) =
        setup(version, |b| b.window(256).queue_bound(10_000, 64 << 20)).await;

    let paced = async {
        let mut pending = Vec::with_capacity(during_n);
        for i in 0..during_n {
            let e = event("storm", i, 4);
            let p = sink.send(e.clone()).await.expect("accepted");
            pending.push((e, p));
            if i % 50 == 49 {
                // 3000 events over ~6 s: the sends span the whole storm.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        pending
    };
    let ((), pending) = tokio::join!(
        proxy.reconnect_storm(Duration::from_millis(200), storm),
        paced
    );
    let storm_stats = proxy.stats();
    assert!(
        storm_stats.resets >= 10,
        "the storm hit live connections: {storm_stats}"
    );
    let mut sent = await_outcomes(pending).await;

    let started = Instant::now();
    let after = send_all(&sink, "after-storm", after_n, 4).await;
    let took = started.elapsed();
    assert_eq!(delivered_count(&after), after_n, "throughput recovers");
    assert!(
        took < Duration::from_secs(20),
        "{after_n} events after the storm took {took:?}"
    );
    sent.extend(after);
    sink.flush().await.expect("flush");
    let health = sink.health();
    assert_eq!((health.queued, health.in_flight), (0, 0), "{health:?}");
    assert_all_delivered(&server, &sent, during_n + after_n).await;
    eprintln!(
        "{version}: storm {storm_stats}; {after_n} after the storm in {took:?}; duplicate acks {}",
        duplicate_acks(&sent)
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

on_both_versions!(reconnect_storm:
    reconnect_storm_panics_nothing_and_throughput_recovers_on_2_9,
    reconnect_storm_panics_nothing_and_throughput_recovers_on_2_15);

// F13 (reject): during an outage the queue fills to its bound and no further; new events are
// refused with QueueFull at once; after recovery every accepted event is delivered.
async fn outage_fills_queue_then_rejects(version: ServerVersion) {
    let bound = 2000;
    let attempts = 3000;
    let (server, proxy, sink) = setup(version, |b| {
        b.queue_bound(bound, 64 << 20).when_full(WhenFull::Reject)
    })
    .await;
    let warm = event("warm", 0, 1);
    let receipt = sink.emit(&warm).await;
    assert!(receipt.is_ok(), "{receipt:?}");
    let mut pending = Vec::new();
    let mut sent = vec![Sent {
        event: warm,
        outcome: receipt,
    }];

    proxy.set_mode(ProxyMode::Blackhole(Direction::Both));
    let mut most_queued = 0;
    for i in 0..attempts {
        let e = event("outage", i, 4);
        let started = Instant::now();
        match sink.send(e.clone()).await {
            Ok(p) => pending.push((e, p)),
            Err(err) => {
                assert!(
                    matches!(err, EmitError::QueueFull { .. }),
                    "a full queue says so: {err}"
                );
                assert!(
                    started.elapsed() < Duration::from_millis(100),
                    "Reject does not wait"
                );
                sent.push(Sent {
                    event: e,
                    outcome: Err(err),
                });
            }
        }
        most_queued = most_queued.max(sink.health().queued);
    }
    assert_eq!(pending.len(), bound, "exactly the bound is accepted");
    assert_eq!(sent.len() - 1, attempts - bound, "the rest is refused");
    // Let the outage last: pings go unanswered and the connection is dropped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    most_queued = most_queued.max(sink.health().queued);
    assert!(most_queued <= bound, "queued {most_queued} > bound {bound}");
    proxy.set_mode(ProxyMode::PassThrough);

    sent.extend(await_outcomes(pending).await);
    assert_eq!(
        delivered_count(&sent),
        bound + 1,
        "every accepted event is delivered"
    );
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(
        report.stored,
        bound + 1,
        "refused events are not stored: {report}"
    );
    eprintln!(
        "{version}: accepted {bound}, refused {}, most queued {most_queued}",
        attempts - bound
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

on_both_versions!(outage_fills_queue_then_rejects:
    outage_with_reject_policy_bounds_the_queue_and_refuses_the_rest_on_2_9,
    outage_with_reject_policy_bounds_the_queue_and_refuses_the_rest_on_2_15);

// F13 (block): during an outage a send into a full queue waits for its deadline, then fails with
// QueueFull; it never hangs. After recovery every accepted event is delivered.
async fn outage_blocks_send_until_deadline(version: ServerVersion) {
    let bound = 200;
    let deadline = Duration::from_millis(500);
    let (server, proxy, sink) = setup(version, |b| {
        b.window(64)
            .queue_bound(bound, 64 << 20)
            .when_full(WhenFull::Block { deadline })
    })
    .await;
    let warm = event("warm", 0, 1);
    let receipt = sink.emit(&warm).await;
    assert!(receipt.is_ok(), "{receipt:?}");
    let mut sent = vec![Sent {
        event: warm,
        outcome: receipt,
    }];

    proxy.set_mode(ProxyMode::Blackhole(Direction::Both));
    let mut pending = Vec::with_capacity(bound);
    for i in 0..bound {
        let e = event("outage", i, 4);
        let p = sink.send(e.clone()).await.expect("room in the queue");
        pending.push((e, p));
    }
    let extra = event("outage-extra", 0, 1);
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(5), sink.send(extra.clone()))
        .await
        .expect("I5: a blocked send returns within its deadline");
    let waited = started.elapsed();
    match &outcome {
        Err(EmitError::QueueFull {
            waited: reported, ..
        }) => {
            assert!(*reported >= deadline, "reported wait {reported:?}");
        }
        other => panic!("a send into a full queue fails with QueueFull: {other:?}"),
    }
    assert!(
        waited >= deadline && waited < deadline + Duration::from_millis(700),
        "blocked for about the deadline: {waited:?}"
    );
    assert!(sink.health().queued <= bound);
    sent.push(Sent {
        event: extra,
        outcome: Err(outcome.expect_err("checked above")),
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_mode(ProxyMode::PassThrough);

    sent.extend(await_outcomes(pending).await);
    assert_eq!(delivered_count(&sent), bound + 1);
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, bound + 1, "{report}");
    eprintln!("{version}: blocked send failed after {waited:?}");
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

on_both_versions!(outage_blocks_send_until_deadline:
    outage_with_block_policy_fails_send_after_the_deadline_on_2_9,
    outage_with_block_policy_fails_send_after_the_deadline_on_2_15);
