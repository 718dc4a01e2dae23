//! F19: a 3-node cluster with an R3 stream loses its stream leader mid-run; the sink, which knows
//! every node, retries the transient failures and the stream ends up complete, in order, once each.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sink_nats::{StreamPolicy, WhenFull};
use sink_testkit::{Cluster, ServerVersion};

/// Creates the R3 stream the sink verifies, retrying while the cluster settles.
async fn create_r3_stream(cluster: &Cluster) {
    let mut js = async_nats::jetstream::new(cluster.connect().await.expect("connect cluster"));
    js.set_timeout(Duration::from_secs(3));
    let mut config = sink_nats::new_stream_config(STREAM, vec!["t.events.*.v1".to_owned()]);
    config.num_replicas = 3;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying stream create: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot create the R3 stream: {e}"),
        }
    }
}

/// Reads the stream back through a live node, retrying while the consumer API still settles after
/// the election (the first consumer create after a leader change can time out on 2.15).
async fn audit_cluster(cluster: &Cluster, sent: &[Sent]) -> sink_testkit::AuditReport {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let client = cluster.connect().await.map_err(|e| e.to_string())?;
            let js = async_nats::jetstream::new(client);
            sink_testkit::read_stream(&js, STREAM, Duration::from_secs(20))
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(stored) => return sink_testkit::compare(&expectations(sent, false), &stored),
            Err(e) if Instant::now() < deadline => eprintln!("retrying the audit read: {e}"),
            Err(e) => panic!("cannot read the stream back: {e}"),
        }
    }
}

async fn stream_leader_killed_mid_run(version: ServerVersion) {
    let n = 3000;
    let started = Instant::now();
    let mut cluster = Cluster::start(version).await.expect("start cluster");
    create_r3_stream(&cluster).await;
    let leader = cluster
        .wait_stream_leader(STREAM, None, Duration::from_secs(20))
        .await
        .expect("the stream has a leader");
    eprintln!(
        "{version}: cluster and R3 stream up after {:?}, leader n{}",
        started.elapsed(),
        leader + 1
    );

    let sink = builder(&cluster.urls().join(","))
        .stream_policy(StreamPolicy::Verify)
        .reconnect(fast_reconnect())
        .window(256)
        // A queue of two windows makes `send` wait for room: the sender runs unpaced, keeps a full
        // window in flight, and is still sending when the leader dies. The long block deadline
        // outlasts the election.
        .queue_bound(512, 64 * 1024 * 1024)
        .when_full(WhenFull::Block {
            deadline: Duration::from_secs(120),
        })
        .connect()
        .await
        .expect("the sink accepts the R3 stream");
    let accepted = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let sending = {
        let sink = sink.clone();
        let accepted = Arc::clone(&accepted);
        let killed = Arc::clone(&killed);
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(n);
            let mut sent_after_kill = 0;
            for i in 0..n {
                let e = event("failover", i, 4);
                let p = sink.send(e.clone()).await.expect("accepted");
                pending.push((e, p));
                accepted.store(i + 1, Ordering::SeqCst);
                if killed.load(Ordering::SeqCst) {
                    sent_after_kill += 1;
                }
            }
            (pending, sent_after_kill)
        })
    };
    // Once the first `acked_before_kill` events are acked, in the middle of the burst, freeze the
    // leader and then kill it. On loopback the cluster acks faster than the sender submits (2.9
    // often had nothing in flight at any given instant), so the freeze is what guarantees a kill
    // with publishes in flight: nothing commits while the leader is stopped, the sender keeps
    // going, and after 200 ms (long enough for acks already on a socket to be taken in, far
    // below the ping and ack timeouts) the sink's in-flight count is what the kill catches.
    let acked_before_kill = 1000;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Accepted first: an event accepted after it is at worst counted as unacked.
        let accepted = accepted.load(Ordering::SeqCst);
        let health = sink.health();
        let acked = accepted.saturating_sub(health.queued);
        if acked >= acked_before_kill {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {acked} acks within 60 s: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cluster.node(leader).pause().expect("SIGSTOP the leader");
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_in_flight(&sink, 1, Duration::from_secs(5)).await;
    let before_kill = sink.health();
    let killed_at = Instant::now();
    cluster.kill_node(leader).await.expect("kill the leader");
    killed.store(true, Ordering::SeqCst);
    let in_flight = before_kill.in_flight;
    assert!(
        in_flight > 0,
        "the leader was killed with publishes in flight: {before_kill:?}"
    );

    let (pending, sent_after_kill) = sending.await.expect("sender task");
    assert!(
        sent_after_kill > 0,
        "the kill happened mid-run, not after the last send"
    );
    let sent = await_outcomes(pending).await;
    let recovered = killed_at.elapsed();
    let new_leader = cluster
        .wait_stream_leader(STREAM, Some(leader), Duration::from_secs(30))
        .await
        .expect("a new leader is elected");
    let failed: Vec<_> = sent
        .iter()
        .filter_map(|s| s.outcome.as_ref().err().map(|e| (&s.event.id, e)))
        .take(5)
        .collect();
    assert!(
        failed.is_empty(),
        "transient errors are retried: {failed:?}"
    );
    let report = audit_cluster(&cluster, &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, n, "{report}");
    eprintln!(
        "{version}: leader n{} killed after at least {acked_before_kill} acks with {in_flight} in \
         flight, {} accepted but unacked and {sent_after_kill} events sent after the kill; new \
         leader n{}; all {n} delivered {recovered:?} after the kill; duplicate acks {}",
        leader + 1,
        before_kill.queued,
        new_leader + 1,
        duplicate_acks(&sent)
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_mid_run_loses_and_reorders_nothing_on_2_9() {
    stream_leader_killed_mid_run(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_mid_run_loses_and_reorders_nothing_on_2_15() {
    stream_leader_killed_mid_run(ServerVersion::V2_15).await;
}
