//! F1 on real servers: events are stored exactly once, in order, and the receipts match the stream.

mod common;

use common::*;
use sink_testkit::ServerVersion;

async fn delivers_everything_in_order(version: ServerVersion, window: usize, n: usize) {
    let server = server(version).await;
    let sink = builder(&server.url())
        .window(window)
        .connect()
        .await
        .expect("connect");
    let sent = send_all(&sink, &format!("w{window}"), n, 4).await;
    let delivered = sent.iter().filter(|s| s.outcome.is_ok()).count();
    assert_eq!(delivered, n, "every event is delivered");
    let dups = sent
        .iter()
        .filter(|s| s.outcome.as_ref().is_ok_and(|r| r.duplicate))
        .count();
    assert_eq!(dups, 0, "no fault, no duplicate acks");
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, n);
    let close = sink.close(std::time::Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
    assert_eq!(close.delivered, n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_one_stores_everything_in_order_on_2_9() {
    delivers_everything_in_order(ServerVersion::V2_9, 1, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_one_stores_everything_in_order_on_2_15() {
    delivers_everything_in_order(ServerVersion::V2_15, 1, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_window_stores_100k_in_order_on_2_9() {
    delivers_everything_in_order(ServerVersion::V2_9, 256, 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_window_stores_100k_in_order_on_2_15() {
    delivers_everything_in_order(ServerVersion::V2_15, 1024, 100_000).await;
}
