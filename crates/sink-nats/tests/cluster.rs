//! F19, F21 and restarts on a 3-node cluster with an R3 stream: leader killed mid-run, a foreign writer mid-run, the whole cluster restarted; complete, in order, once each, no rejection.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sink_core::outbox::OrderingMode;
use sink_nats::{StreamPolicy, WhenFull};
use sink_testkit::{Cluster, CompareOptions, ServerVersion};

/// Creates the R3 stream the sink verifies, retrying while the cluster settles.
async fn create_r3_stream(cluster: &Cluster) {
    create_r3_stream_with(cluster, |_| {}).await;
}

/// As [`create_r3_stream`], with the config adjusted by `adjust` first.
async fn create_r3_stream_with(
    cluster: &Cluster,
    adjust: impl Fn(&mut async_nats::jetstream::stream::Config),
) {
    let mut js = async_nats::jetstream::new(cluster.connect().await.expect("connect cluster"));
    js.set_timeout(Duration::from_secs(3));
    let mut config = sink_nats::new_stream_config(STREAM, vec!["t.events.*.v1".to_owned()]);
    config.num_replicas = 3;
    adjust(&mut config);
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
    audit_cluster_with(cluster, sent, CompareOptions::default()).await
}

/// As [`audit_cluster`], with compare options (e.g. other producers' messages allowed).
async fn audit_cluster_with(
    cluster: &Cluster,
    sent: &[Sent],
    options: CompareOptions,
) -> sink_testkit::AuditReport {
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
            Ok(stored) => {
                return sink_testkit::compare_with(&expectations(sent, false), &stored, options)
            }
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

/// Sends `n` events in bursts of 64 (so publishes are in flight most of the time) and has
/// another client publish one message to the same stream when half of them are sent.
async fn send_with_a_foreign_publish_midway(
    sink: &sink_nats::JetStreamSink,
    cluster: &Cluster,
    n: usize,
) -> (Vec<Sent>, Instant) {
    let foreign = cluster.connect().await.expect("foreign client");
    let mut pending = Vec::with_capacity(n);
    let mut foreign_at = None;
    for i in 0..n {
        if i == n / 2 {
            // Another producer of the same kind: its message carries a msg id of its own.
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", "other-producer-1");
            let ack = foreign
                .request_with_headers("t.events.other-service.v1", headers, "not ours".into())
                .await
                .expect("foreign publish answered");
            let ack = String::from_utf8_lossy(&ack.payload).into_owned();
            assert!(ack.contains("\"seq\""), "foreign publish stored: {ack}");
            foreign_at = Some(Instant::now());
        }
        let e = event("foreign", i, 4);
        pending.push((e.clone(), sink.send(e).await.expect("accepted")));
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    (
        await_outcomes(pending).await,
        foreign_at.expect("the foreign publish happened"),
    )
}

/// F21: another producer writes the R3 stream while the sink has publishes in flight. On 2.9 the
/// chain breaks (10070 naming the other producer's id) and the sink falls back to per-key-serial.
/// On 2.12 and 2.15 the sink never chains on a replicated stream (a failed expected-last check
/// there reserves the id or stops the stream: see the fact tests at the end of this file),
/// so the other producer changes nothing. Either way nothing is rejected, nothing stalls, and the
/// stream holds every event once, in order, plus the foreign message.
async fn foreign_writer_mid_run(version: ServerVersion) {
    let n = 3000;
    let window = Duration::from_secs(10);
    let cluster = Cluster::start(version).await.expect("start cluster");
    create_r3_stream_with(&cluster, |c| c.duplicate_window = window).await;
    let sink = builder(&cluster.urls().join(","))
        .stream_policy(StreamPolicy::Verify)
        .reconnect(fast_reconnect())
        .window(256)
        .connect()
        .await
        .expect("the sink accepts the R3 stream");
    let (sent, foreign_at) = send_with_a_foreign_publish_midway(&sink, &cluster, n).await;
    let settled = foreign_at.elapsed();
    let rejected: Vec<_> = sent
        .iter()
        .filter_map(|s| {
            s.outcome
                .as_ref()
                .err()
                .map(|e| (&s.event.id, e.to_string()))
        })
        .take(5)
        .collect();
    assert!(rejected.is_empty(), "no event is rejected: {rejected:?}");
    let health = sink.health();
    assert_eq!(
        health.ordering,
        OrderingMode::PerKeySerial,
        "the sink noticed the other writer: {health:?}"
    );
    assert!(
        health.ordering_reason.is_some(),
        "health says why the ordering mode changed: {health:?}"
    );
    assert!(
        settled < Duration::from_secs(30),
        "everything settled {settled:?} after the foreign publish: a stall"
    );
    let report = audit_cluster_with(&cluster, &sent, CompareOptions { foreign_ok: true }).await;
    report.assert_passed();
    assert_eq!(report.stored, n + 1, "{report}");
    eprintln!(
        "F21 {version}: all {n} delivered {settled:?} after the foreign publish; ordering now {:?}; \
         last error {:?}",
        health.ordering, health.last_error
    );
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_writer_mid_run_rejects_nothing_and_keeps_order_on_2_9() {
    foreign_writer_mid_run(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_writer_mid_run_rejects_nothing_and_keeps_order_on_2_15() {
    foreign_writer_mid_run(ServerVersion::V2_15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_writer_mid_run_rejects_nothing_and_keeps_order_on_2_12() {
    foreign_writer_mid_run(ServerVersion::V2_12).await;
}

/// The whole cluster crashes and restarts while the sink is idle: the stream forgets its last
/// message id. The next event must be re-anchored rather than chained to the old id: on 2.11+ a
/// chained publish failing that check blocks its id "in process" for the duplicate window (the
/// server's default, 2 minutes, here), and before that it was reported rejected (10158 was
/// terminal).
async fn whole_cluster_restart_while_idle(version: ServerVersion) {
    let n = 200;
    let mut cluster = Cluster::start(version).await.expect("start cluster");
    create_r3_stream(&cluster).await;
    let sink = builder(&cluster.urls().join(","))
        .stream_policy(StreamPolicy::Verify)
        .reconnect(fast_reconnect())
        .window(64)
        .connect()
        .await
        .expect("the sink accepts the R3 stream");
    let mut sent = send_all(&sink, "before-restart", n, 2).await;
    assert_all_ok(&sent);
    cluster.kill_all().await.expect("kill every node");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart_all().await.expect("restart every node");
    cluster
        .wait_stream_leader(STREAM, None, Duration::from_secs(30))
        .await
        .expect("the stream has a leader again");
    let back = Instant::now();
    let after = send_all(&sink, "after-restart", n, 2).await;
    let took = back.elapsed();
    assert_all_ok(&after);
    assert!(
        took < Duration::from_secs(30),
        "{n} events took {took:?} after the cluster was back: a stall"
    );
    sent.extend(after);
    let report = audit_cluster(&cluster, &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 2 * n, "{report}");
    let health = sink.health();
    let expected = match version {
        ServerVersion::V2_9 => OrderingMode::Chained,
        _ => OrderingMode::PerKeySerial,
    };
    assert_eq!(health.ordering, expected, "{health:?}");
    // On 2.11+ the chaining guard switched the mode at start, and health says why.
    let reason = health.ordering_reason.as_deref();
    match version {
        ServerVersion::V2_9 => assert_eq!(reason, None, "{health:?}"),
        _ => assert!(
            reason.is_some_and(|r| r.contains("per-key-serial")),
            "{health:?}"
        ),
    }
    eprintln!("{version}: {n} events after the full restart in {took:?}");
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_while_idle_reanchors_without_a_stall_on_2_9() {
    whole_cluster_restart_while_idle(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_while_idle_reanchors_without_a_stall_on_2_15() {
    whole_cluster_restart_while_idle(ServerVersion::V2_15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_while_idle_reanchors_without_a_stall_on_2_12() {
    whole_cluster_restart_while_idle(ServerVersion::V2_12).await;
}

/// One publish of the fact tests below, with `Nats-Msg-Id: id` and, when given,
/// `Nats-Expected-Last-Msg-Id: expect`; the reply's payload, or the request error (a timeout when
/// the stream does not answer).
async fn publish_fact(
    client: &async_nats::Client,
    id: &str,
    expect: Option<&str>,
) -> Result<String, async_nats::RequestError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    if let Some(last) = expect {
        headers.insert("Nats-Expected-Last-Msg-Id", last);
    }
    let request = async_nats::Request::new()
        .headers(headers)
        .payload("x".into())
        .timeout(Some(Duration::from_secs(3)));
    client
        .send_request("t.events.facts.v1", request)
        .await
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
}

/// The server behaviour that rules chaining out on replicated streams of 2.14+ (read in
/// `applyStreamMsgOp`, seen here): one publish failing its `Nats-Expected-Last-Msg-Id` check is
/// answered 10070, and from then on the stream answers no publish at all (the servers log
/// "critical write error: last msgid mismatch"). If a later server fixes this, this test fails and
/// `sink_core::capability` should be revisited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_stream_stops_answering_after_a_failed_expected_last_check_on_2_15() {
    let cluster = Cluster::start(ServerVersion::V2_15)
        .await
        .expect("start cluster");
    create_r3_stream(&cluster).await;
    cluster
        .wait_stream_leader(STREAM, None, Duration::from_secs(20))
        .await
        .expect("leader");
    let client = cluster.connect().await.expect("connect");
    let publish = |id, expect| publish_fact(&client, id, expect);
    let a = publish("id-a", None).await.expect("a answered");
    assert!(a.contains(r#""seq":1"#), "{a}");
    let other = publish("id-other", None).await.expect("other answered");
    assert!(other.contains(r#""seq":2"#), "{other}");
    let b = publish("id-b", Some("id-a")).await.expect("b answered");
    assert!(b.contains("10070"), "b fails its check: {b}");
    let c = publish("id-c", None).await;
    assert!(
        c.is_err(),
        "after one failed check the stream answers nothing, not even a plain publish: {c:?}"
    );
}

/// The server behaviour that rules chaining out on replicated streams of 2.11-2.13, measured on
/// 2.12.8: one publish failing its `Nats-Expected-Last-Msg-Id` check is answered 10070, the stream
/// keeps storing other message ids, but the failed id stays reserved: publishing it again is
/// answered 10158 "duplicate message id is in process" until the duplicate window (3 s here) has
/// passed, and then it is stored. `sink_core::capability::chaining_hazard` describes this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_stream_reserves_a_failed_expected_last_id_for_the_window_on_2_12() {
    let window = Duration::from_secs(3);
    let cluster = Cluster::start(ServerVersion::V2_12)
        .await
        .expect("start cluster");
    create_r3_stream_with(&cluster, |c| c.duplicate_window = window).await;
    cluster
        .wait_stream_leader(STREAM, None, Duration::from_secs(20))
        .await
        .expect("leader");
    let client = cluster.connect().await.expect("connect");
    let publish = |id, expect| publish_fact(&client, id, expect);
    let a = publish("id-a", None).await.expect("a answered");
    assert!(a.contains(r#""seq":1"#), "{a}");
    let other = publish("id-other", None).await.expect("other answered");
    assert!(other.contains(r#""seq":2"#), "{other}");
    let b = publish("id-b", Some("id-a")).await.expect("b answered");
    assert!(b.contains("10070"), "b fails its check: {b}");
    let failed_at = Instant::now();
    let c = publish("id-c", None)
        .await
        .expect("the stream still answers a new id");
    assert!(c.contains(r#""seq":3"#), "a new id is stored: {c}");
    let b_again = publish("id-b", None)
        .await
        .expect("the failed id is answered");
    assert!(
        b_again.contains("10158"),
        "the failed id is still reserved within the window: {b_again}"
    );
    // Still reserved late in the window: the reservation is not a short-lived in-flight marker.
    let late = window - Duration::from_secs(1);
    tokio::time::sleep(late.saturating_sub(failed_at.elapsed())).await;
    let b_late = publish("id-b", None)
        .await
        .expect("the failed id is answered");
    assert!(
        b_late.contains("10158"),
        "the failed id is still reserved {:?} after the failure: {b_late}",
        failed_at.elapsed()
    );
    // The reservation lasts the duplicate window; the server purges expired ids on a timer, so
    // allow a few seconds past it before calling the id stuck.
    tokio::time::sleep(window.saturating_sub(failed_at.elapsed())).await;
    let deadline = failed_at + window + Duration::from_secs(10);
    let stored = loop {
        let reply = publish("id-b", None)
            .await
            .expect("the failed id is answered");
        if reply.contains(r#""seq":4"#) {
            break reply;
        }
        assert!(
            reply.contains("10158") && Instant::now() < deadline,
            "the failed id is stored once the window has passed: {reply} after {:?}",
            failed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let freed_after = failed_at.elapsed();
    eprintln!(
        "2.12.8: the failed id was reserved for {freed_after:?} (window {window:?}): {stored}"
    );
}
