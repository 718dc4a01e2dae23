//! Issue #9 item 6 on real servers: after a 5-minute outage, with the breaker's reconnect backoff at its default (up to 180 s), the first ack comes within 2 s of the server's return.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sink_nats::BreakerStatus;
use sink_testkit::ServerVersion;

const OUTAGE: Duration = Duration::from_secs(300);

async fn prompt_recovery_after_a_long_outage(version: ServerVersion) {
    let mut server = server(version).await;
    // The default reconnect schedule (no `fast_reconnect`): during a 5-minute outage the
    // breaker's wait between probes grows to a minute and more.
    let sink = builder(&server.url()).connect().await.expect("connect");
    sink.emit(&event("outage", 0, 1))
        .await
        .expect("first event");
    server.kill().await.expect("kill -9");
    let mut pending = Vec::new();
    for i in 1..=10 {
        let e = event("outage", i, 1);
        pending.push((
            e.clone(),
            sink.send(e).await.expect("queued during the outage"),
        ));
    }
    tokio::time::sleep(OUTAGE).await;
    let during = sink.health();
    assert_ne!(
        during.breaker,
        BreakerStatus::Closed,
        "the outage opened the breaker: {during:?}"
    );
    server
        .restart()
        .await
        .expect("restart on the same port and store");
    let back = Instant::now();
    let (first_event, first) = pending.remove(0);
    let receipt = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("I5")
        .expect("the queued event is delivered");
    let took = back.elapsed();
    eprintln!(
        "{version}: first ack {took:?} after the server's return from a {OUTAGE:?} outage \
         (breaker {:?} before it), stored as {:?}",
        during.breaker, receipt.sequence
    );
    assert!(
        took < Duration::from_secs(2),
        "first ack {took:?} after the server came back; must be within 2 s"
    );
    let mut sent = vec![Sent {
        event: first_event,
        outcome: Ok(receipt),
    }];
    sent.extend(await_outcomes(pending).await);
    assert_all_ok(&sent);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_ack_within_2_s_of_the_servers_return_after_5_minutes_on_2_9() {
    prompt_recovery_after_a_long_outage(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_ack_within_2_s_of_the_servers_return_after_5_minutes_on_2_15() {
    prompt_recovery_after_a_long_outage(ServerVersion::V2_15).await;
}
