//! Fast-batch lanes on real servers (issue #11): chosen where the server and stream allow them, in
//! order per producer with several producers on one stream, through kill -9, idle past the
//! server's batch timeout, re-emits, ingest overload (429), and a stream edited to refuse batches
//! mid-run.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sink_nats::{Batching, JetStreamSink, Mechanism, OrderingKey, SinkBuilder};
use sink_testkit::{read_stream, Expected, NatsServer, ServerOptions, ServerVersion};

/// Producers on separate connections, each sending its own run of events concurrently.
struct Producers {
    sinks: Vec<JetStreamSink>,
    tasks: Vec<(String, tokio::task::JoinHandle<Vec<Sent>>)>,
}

impl Producers {
    /// Connects `count` sinks to `url` (each through `tweak`), checks they deliver through lanes,
    /// and starts each sending `per` events of the run `<prefix><i>`.
    async fn start(
        url: &str,
        count: usize,
        per: usize,
        prefix: &str,
        tweak: impl Fn(SinkBuilder) -> SinkBuilder,
    ) -> Self {
        let mut sinks = Vec::new();
        for p in 0..count {
            let sink = tweak(builder(url).name(format!("producer-{p}")))
                .connect()
                .await
                .expect("connect");
            let health = sink.health();
            assert_eq!(health.mechanism, Mechanism::FastBatch, "{health:?}");
            sinks.push(sink);
        }
        let tasks = sinks
            .iter()
            .enumerate()
            .map(|(p, sink)| {
                let run = format!("{prefix}{p}");
                (run.clone(), spawn_send_all(sink, &run, per, 3))
            })
            .collect();
        Self { sinks, tasks }
    }

    /// Waits for every producer; each must have had every event delivered.
    async fn finish(&mut self) -> Vec<(String, Vec<Sent>)> {
        let mut runs = Vec::new();
        for (run, task) in self.tasks.drain(..) {
            let sent = task.await.expect("producer task");
            assert_all_ok(&sent);
            runs.push((run, sent));
        }
        runs
    }

    async fn close(self) {
        for sink in self.sinks {
            let report = sink.close(Duration::from_secs(5)).await;
            assert!(report.complete(), "{report:?}");
        }
    }
}

/// The operator's edit: the stream's config as it is, with `allow_batched` set to `on`.
async fn set_allow_batched(js: &async_nats::jetstream::Context, on: bool) {
    let info: serde_json::Value = js
        .request(format!("STREAM.INFO.{STREAM}"), &())
        .await
        .expect("info");
    let mut config = info["config"].clone();
    config["allow_batched"] = on.into();
    let reply: serde_json::Value = js
        .request(format!("STREAM.UPDATE.{STREAM}"), &config)
        .await
        .expect("update");
    assert!(reply.get("error").is_none(), "{reply}");
}

/// Audits several producers' reports against the stream: every delivered event stored once, each
/// producer's events in its own send order (other producers interleave freely).
async fn audit_producers(url: &str, runs: &[(String, Vec<Sent>)]) -> sink_testkit::AuditReport {
    let client = async_nats::connect(url).await.expect("audit connect");
    let js = async_nats::jetstream::new(client);
    let stored = read_stream(&js, STREAM, Duration::from_secs(60))
        .await
        .expect("read stream back");
    let expected: Vec<Expected> = runs
        .iter()
        .flat_map(|(run, sent)| {
            expectations(sent, false).into_iter().map(move |mut e| {
                e.key = run.clone();
                e
            })
        })
        .collect();
    sink_testkit::compare(&expected, &stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_producer_delivers_in_order_through_a_lane_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let health = sink.health();
    assert_eq!(health.mechanism, Mechanism::FastBatch, "{health:?}");
    assert_eq!(health.lanes, 1, "{health:?}");
    assert!(
        health.mechanism_reason.contains("allow_batched"),
        "{health:?}"
    );
    let sent = send_all(&sink, "lane1", 20_000, 3).await;
    assert_all_ok(&sent);
    let batched = sent
        .iter()
        .filter(|s| s.outcome.as_ref().is_ok_and(|r| r.batch.is_some()))
        .count();
    assert_eq!(batched, sent.len(), "every receipt names its batch");
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 20_000, "{report}");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_producers_each_keep_their_order_on_one_stream_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let mut producers = Producers::start(&server.url(), 4, 5_000, "p", |b| b).await;
    let runs = producers.finish().await;
    let report = audit_producers(&server.url(), &runs).await;
    report.assert_passed();
    assert_eq!(report.stored, 20_000, "{report}");
    producers.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_event_is_confirmed_without_waiting_for_a_batch_to_fill_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    assert_eq!(sink.health().mechanism, Mechanism::FastBatch);
    for i in 0..5 {
        let started = Instant::now();
        let receipt = sink.emit(&event("lone", i, 1)).await.expect("delivered");
        // The server's batch timeout is 10 s: a receipt long before it means the lane committed
        // the lone event instead of waiting for more.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "event {i} took {:?}",
            started.elapsed()
        );
        assert!(receipt.batch.is_some(), "{receipt:?}");
    }
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_idle_past_the_batch_timeout_goes_on_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let first = send_all(&sink, "idle-a", 300, 1).await;
    assert_all_ok(&first);
    // Longer than the server's 10 s batch timeout.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let second = send_all(&sink, "idle-b", 300, 1).await;
    assert_all_ok(&second);
    let runs = vec![("a".to_owned(), first), ("b".to_owned(), second)];
    let report = audit_producers(&server.url(), &runs).await;
    report.assert_passed();
    assert_eq!(report.stored, 600, "{report}");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_emitted_events_are_stored_once_through_a_lane_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let sink = builder(&server.url()).connect().await.expect("connect");
    let first = send_all(&sink, "re", 1_000, 1).await;
    assert_all_ok(&first);
    // Every other event of the first run again, interleaved with new ones.
    let mut pending = Vec::new();
    for i in 0..1_000 {
        let e = if i % 2 == 0 {
            event("re", i, 1)
        } else {
            event("re-new", i, 1)
        };
        pending.push((e.clone(), sink.send(e).await.expect("accepted")));
    }
    let second = await_outcomes(pending).await;
    assert_all_ok(&second);
    let mut all = first;
    all.extend(second);
    let report = audit(&server.url(), &all).await;
    report.assert_passed();
    assert_eq!(report.stored, 1_500, "{report}");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_producers_through_kill_9_and_restart_lose_nothing_on_2_15() {
    let mut server = server(ServerVersion::V2_15).await;
    let mut producers = Producers::start(&server.url(), 4, 10_000, "k", |b| {
        b.reconnect(fast_reconnect())
    })
    .await;
    wait_in_flight(&producers.sinks[0], 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill().await.expect("kill -9");
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().await.expect("restart");
    let runs = producers.finish().await;
    let report = audit_producers(&server.url(), &runs).await;
    report.assert_passed();
    assert_eq!(report.stored, 40_000, "{report}");
    producers.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_servers_and_batching_off_use_per_event_acks() {
    let old = server(ServerVersion::V2_9).await;
    let sink = builder(&old.url()).connect().await.expect("connect");
    let health = sink.health();
    assert_eq!(health.mechanism, Mechanism::PerEvent, "{health:?}");
    assert!(health.mechanism_reason.contains("2.9.10"), "{health:?}");
    let receipt = sink.emit(&event("old", 0, 1)).await.expect("delivered");
    assert!(
        receipt.sequence.is_some() && receipt.batch.is_none(),
        "{receipt:?}"
    );
    assert!(sink.close(Duration::from_secs(5)).await.complete());

    let new = server(ServerVersion::V2_15).await;
    let sink = builder(&new.url())
        .batching(Batching::Off)
        .connect()
        .await
        .expect("connect");
    let health = sink.health();
    assert_eq!(health.mechanism, Mechanism::PerEvent, "{health:?}");
    let receipt = sink.emit(&event("off", 0, 1)).await.expect("delivered");
    assert_eq!(receipt.sequence, Some(1), "{receipt:?}");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_lanes_keep_each_tenants_order_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let sink = builder(&server.url())
        .ordering_key(OrderingKey::Tenant)
        .lanes(3)
        .connect()
        .await
        .expect("connect");
    assert_eq!(sink.health().mechanism, Mechanism::FastBatch);
    // Eight tenants over at most three lanes: keys share lanes and move between them as lanes
    // empty; every tenant's order must hold throughout.
    let mut sent = Vec::new();
    for round in 0..4 {
        sent.extend(send_all(&sink, &format!("tenants-{round}"), 2_000, 8).await);
    }
    assert_all_ok(&sent);
    assert_eq!(
        sink.health().lanes,
        3,
        "eight tenants opened the three lanes allowed"
    );
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stored = read_stream(&js, STREAM, Duration::from_secs(60))
        .await
        .expect("read back");
    let report = sink_testkit::compare(&expectations(&sent, true), &stored);
    report.assert_passed();
    assert_eq!(report.stored, 8_000, "{report}");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_edited_to_refuse_batches_mid_run_moves_the_sink_to_per_event_acks_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let sink = builder(&server.url())
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    assert_eq!(sink.health().mechanism, Mechanism::FastBatch);
    let sending = spawn_send_all(&sink, "edit", 20_000, 1);
    wait_in_flight(&sink, 1, Duration::from_secs(10)).await;
    set_allow_batched(&jetstream(&server).await, false).await;
    let mut sent = sending.await.expect("sender");
    // Events sent after the edit certainly meet it (the first run may have ended before).
    sent.extend(send_all(&sink, "after-edit", 2_000, 1).await);
    assert_all_ok(&sent);
    let health = sink.health();
    assert_eq!(health.mechanism, Mechanism::PerEvent, "{health:?}");
    assert!(
        health.mechanism_reason.contains("refused batch publishing"),
        "{health:?}"
    );
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 22_000, "{report}");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_edited_to_allow_batches_mid_run_moves_the_sink_to_lanes_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let js = jetstream(&server).await;
    // A stream made without allow_batched (portable config): per-event acks at start.
    js.create_stream(sink_nats::new_stream_config(
        STREAM,
        vec!["t.events.*.v1".into()],
    ))
    .await
    .expect("create");
    let sink = builder(&server.url())
        .stream_policy(sink_nats::StreamPolicy::Verify)
        .reverify_interval(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect");
    let health = sink.health();
    assert_eq!(health.mechanism, Mechanism::PerEvent, "{health:?}");
    assert!(
        health.mechanism_reason.contains("allow_batched"),
        "{health:?}"
    );
    let sending = spawn_send_all(&sink, "upgrade", 30_000, 1);
    wait_in_flight(&sink, 1, Duration::from_secs(10)).await;
    set_allow_batched(&js, true).await;
    let mut sent = sending.await.expect("sender");
    // The next re-verification (every 300 ms here) sees the edit; what is sent after goes
    // through lanes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.health().mechanism != Mechanism::FastBatch && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sent.extend(send_all(&sink, "after-edit", 2_000, 1).await);
    assert_all_ok(&sent);
    let health = sink.health();
    assert_eq!(health.mechanism, Mechanism::FastBatch, "{health:?}");
    let (per_event, batched) = sent.iter().fold((0, 0), |(p, b), s| match &s.outcome {
        Ok(r) if r.batch.is_some() => (p, b + 1),
        _ => (p + 1, b),
    });
    assert!(
        per_event > 0 && batched > 0,
        "both mechanisms delivered: {per_event} / {batched}"
    );
    let report = audit(&server.url(), &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 32_000, "{report}");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
}

// ---------------------------------------------------------------------------------------------
// Ingest overload (429)

/// Inbound publishes the stream may queue before the server drops the next and answers it 429
/// (as in `faults_server.rs` F12 and `lanes_cluster.rs`): four lanes pipelining their flow
/// windows overflow it at once.
const MAX_BUFFERED_MSGS: u64 = 8;

/// Events each producer sends under overload.
const EVENTS_OVERLOADED: usize = 2_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_producers_through_ingest_overload_429_lose_nothing_on_2_15() {
    let server = NatsServer::start(ServerOptions {
        jetstream_max_buffered_msgs: Some(MAX_BUFFERED_MSGS),
        ..ServerOptions::version(ServerVersion::V2_15)
    })
    .await
    .expect("start");
    let (stop_observer, observer) =
        observe(&server, LaneTraffic::default(), LaneTraffic::count).await;
    let mut producers = Producers::start(&server.url(), 4, EVENTS_OVERLOADED, "o", |b| {
        b.reconnect(fast_reconnect())
    })
    .await;
    let started = Instant::now();
    let runs = producers.finish().await;
    let flood = started.elapsed();
    stop_observer.send(()).expect("observer still running");
    let traffic = observer.await.expect("observer task");
    assert!(
        traffic.too_many > 0,
        "no 429 among the replies to fast-batch publishes: lower max_buffered_msgs; {traffic:?}"
    );
    assert!(
        server
            .log_tail(2000)
            .contains("Dropping messages due to excessive stream ingest rate"),
        "the server logs the drops: {}",
        server.log_tail(20)
    );
    for (run, sent) in &runs {
        let unbatched = sent
            .iter()
            .filter(|s| s.outcome.as_ref().is_ok_and(|r| r.batch.is_none()))
            .count();
        assert_eq!(
            unbatched, 0,
            "producer {run}: every receipt names its batch"
        );
    }
    for sink in &producers.sinks {
        let health = sink.health();
        assert_eq!(
            health.mechanism,
            Mechanism::FastBatch,
            "a 429 is no reason to leave the lane: {health:?}"
        );
    }
    let events = runs.len() * EVENTS_OVERLOADED;
    let batches: Vec<usize> = runs
        .iter()
        .map(|(_, sent)| {
            let mut ids: Vec<&str> = sent
                .iter()
                .filter_map(|s| Some(s.outcome.as_ref().ok()?.batch.as_ref()?.id.as_str()))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len()
        })
        .collect();
    eprintln!(
        "overload: flood took {flood:?}; {} publishes for {events} events ({:.2} per event), {} \
         replies, {} of them 429; batches per producer {batches:?}; first 429: {}",
        traffic.publishes,
        traffic.publishes as f64 / events as f64,
        traffic.replies,
        traffic.too_many,
        traffic.sample.as_deref().unwrap_or("-")
    );
    // Every event went out at least once, and lanes back off: a batch that meets a 429 halves
    // what later batches send unconfirmed, so re-sends do not multiply the load.
    assert!(
        traffic.publishes >= events,
        "the observer saw every event published: {traffic:?}"
    );
    assert!(
        traffic.publishes <= 4 * events,
        "re-sends under overload multiply the load: {traffic:?}"
    );
    let report = audit_producers(&server.url(), &runs).await;
    report.assert_passed();
    assert_eq!(report.stored, events, "{report}");
    producers.close().await;
}
