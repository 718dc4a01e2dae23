//! F20 on real servers: an event emitted again (same source + id) is a duplicate receipt and nothing else: no fallback, no reordering, nothing lost, also across a kill -9.

mod common;

use std::time::Duration;

use common::*;
use sink_core::outbox::OrderingMode;
use sink_nats::Batching;
use sink_testkit::ServerVersion;

/// A, B, then A again and C pipelined (C goes out before A's answer is in).
async fn reemit_between_two_events(version: ServerVersion) {
    let server = server(version).await;
    // Per-event acks: the duplicate receipt is theirs (lanes: tests/lanes.rs).
    let sink = builder(&server.url())
        .batching(Batching::Off)
        .window(256)
        .connect()
        .await
        .expect("connect");
    let [a, b, c] = [0, 1, 2].map(|i| event("reemit", i, 1));
    let first_a = sink.emit(&a).await.expect("A delivered");
    let first_b = sink.emit(&b).await.expect("B delivered");
    let again = sink.send(a.clone()).await.expect("A accepted again");
    let later = sink.send(c.clone()).await.expect("C accepted");
    let again = tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .expect("I5")
        .expect("the re-emit is a receipt, not an error");
    let later = tokio::time::timeout(Duration::from_secs(10), later)
        .await
        .expect("I5")
        .expect("C delivered");
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.sequence, first_a.sequence, "the original's sequence");
    assert!(!later.duplicate);
    assert_eq!(
        later.sequence,
        first_b.sequence.map(|s| s + 1),
        "C right after B"
    );
    assert!(later.sequence.is_some());
    let health = sink.health();
    assert_eq!(
        health.ordering,
        OrderingMode::Chained,
        "a re-emit is not another writer: {health:?}"
    );
    let sent: Vec<Sent> = [(a.clone(), first_a), (b, first_b), (a, again), (c, later)]
        .into_iter()
        .map(|(event, r)| Sent {
            event,
            outcome: Ok(r),
        })
        .collect();
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 3, "{report}");
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reemit_is_a_duplicate_receipt_and_keeps_chaining_on_2_9() {
    reemit_between_two_events(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reemit_is_a_duplicate_receipt_and_keeps_chaining_on_2_15() {
    reemit_between_two_events(ServerVersion::V2_15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reemit_is_a_duplicate_receipt_and_keeps_chaining_on_2_12() {
    reemit_between_two_events(ServerVersion::V2_12).await;
}

/// Which earlier event the `i`-th send re-emits, if any: every 5th send, alternating between one
/// a few sends back (still in the pipeline or just acked) and one far back (long acked).
fn reemit_of(i: usize) -> Option<usize> {
    if i < 400 || !i.is_multiple_of(5) {
        return None;
    }
    Some(if i.is_multiple_of(10) { i - 3 } else { i - 397 })
}

/// 4000 sends, a fifth of them re-emits, with the server killed (-9) and restarted in the middle:
/// every send gets a receipt, the stream holds each distinct event once, in first-send order,
/// and the sink is still chaining at the end.
async fn many_reemits_through_a_restart(version: ServerVersion) {
    let mut server = server(version).await;
    // Per-event acks: the duplicate receipt is theirs (lanes: tests/lanes.rs).
    let sink = builder(&server.url())
        .batching(Batching::Off)
        .window(256)
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    let n = 4000;
    let events: Vec<_> = (0..n)
        .map(|i| event("reemits", reemit_of(i).unwrap_or(i), 4))
        .collect();
    let mut pending = Vec::with_capacity(n);
    for (i, e) in events.iter().enumerate() {
        if i == n / 2 {
            server.kill().await.expect("kill -9");
            tokio::time::sleep(Duration::from_millis(500)).await;
            server
                .restart()
                .await
                .expect("restart on the same port and store");
        }
        pending.push((e.clone(), sink.send(e.clone()).await.expect("accepted")));
    }
    let sent = await_outcomes(pending).await;
    assert_all_ok(&sent);
    let reemits = (0..n).filter(|&i| reemit_of(i).is_some()).count();
    let dup_receipts = duplicate_acks(&sent);
    assert!(
        dup_receipts >= reemits,
        "every re-emit is a duplicate receipt: {dup_receipts} of {reemits}"
    );
    let health = sink.health();
    assert_eq!(
        health.ordering,
        OrderingMode::Chained,
        "re-emits and a restart are not another writer: {health:?}"
    );
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, n - reemits, "{report}");
    eprintln!(
        "F20 {version}: {n} sends, {reemits} re-emits, {dup_receipts} duplicate receipts, {} stored",
        report.stored
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reemits_through_a_restart_store_each_event_once_in_order_on_2_9() {
    many_reemits_through_a_restart(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reemits_through_a_restart_store_each_event_once_in_order_on_2_15() {
    many_reemits_through_a_restart(ServerVersion::V2_15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reemits_through_a_restart_store_each_event_once_in_order_on_2_12() {
    many_reemits_through_a_restart(ServerVersion::V2_12).await;
}
