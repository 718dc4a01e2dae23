//! Fast-batch lanes under faults (issue #11): 4 producers flooding one R3 stream on a 3-node
//! nats-server 2.15.1 cluster through a stream-leader step-down, kill -9 of the node one producer
//! is connected to, kill -9 of the whole cluster, lanes idle past the server's batch timeout and
//! then re-emitting earlier events among new ones, and ingest overload (429); each audited for
//! every event stored once and each producer's events in its own send order.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sink_core::event::{CloudEvent, MsgId};
use sink_nats::{JetStreamSink, Mechanism, StreamPolicy, WhenFull};
use sink_testkit::{Cluster, Expected, ServerOptions, ServerVersion};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Producers per test, each a sink of its own on a connection of its own.
const PRODUCERS: usize = 4;

/// Events each producer sends.
const EVENTS: usize = 5_000;

/// Events each producer sends under overload, where progress is slow by design.
const EVENTS_OVERLOADED: usize = 2_500;

/// Each producer's queue: small beside [`EVENTS`], so `send` waits for room, the sender keeps
/// pace with delivery and is still sending when the fault hits.
const QUEUE: usize = 2_000;

/// The tests of this file run one at a time: each floods a cluster (or a server) from four
/// producers, and two of those at once on this 2-core machine would time each other out.
static ONE_AT_A_TIME: Semaphore = Semaphore::const_new(1);

async fn exclusive() -> SemaphorePermit<'static> {
    ONE_AT_A_TIME
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

/// Creates the R3 stream with `allow_batched` (as `StreamPolicy::Create` would on 2.15, with
/// three replicas), retrying while the cluster settles, and waits for its leader.
async fn create_r3_batched_stream(cluster: &Cluster) -> usize {
    let client = cluster.connect().await.expect("connect cluster");
    let mut body = serde_json::to_value(sink_nats::new_stream_config(
        STREAM,
        vec!["t.events.*.v1".to_owned()],
    ))
    .expect("a stream config serializes");
    body["num_replicas"] = 3.into();
    body["allow_batched"] = true.into();
    let body = bytes::Bytes::from(serde_json::to_vec(&body).expect("serialize"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(
                format!("$JS.API.STREAM.CREATE.{STREAM}"),
                bytes::Bytes::clone(&body),
            ),
        )
        .await;
        let why = match reply {
            Ok(Ok(msg)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&msg.payload).expect("a JSON reply");
                if v.get("error").is_none() {
                    assert_eq!(v["config"]["allow_batched"], true, "{v}");
                    assert_eq!(v["config"]["num_replicas"], 3, "{v}");
                    break;
                }
                v.to_string()
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no reply within 3 s".to_owned(),
        };
        assert!(
            Instant::now() < deadline,
            "cannot create the R3 stream: {why}"
        );
        eprintln!("retrying stream create: {why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster
        .wait_stream_leader(STREAM, None, Duration::from_secs(20))
        .await
        .expect("the stream has a leader")
}

/// One producer: its sink, how many events it has handed to `send`, and the task sending them.
struct Producer {
    run: String,
    sink: JetStreamSink,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(Vec<Sent>, usize)>,
}

impl Producer {
    /// Events delivered or rejected so far (accepted first: an event accepted after that read is
    /// at worst counted as not yet delivered).
    fn settled(&self) -> usize {
        let accepted = self.accepted.load(Ordering::SeqCst);
        accepted.saturating_sub(self.sink.health().queued)
    }
}

/// Connects a sink for producer `p` to `url` (one node or several, comma-separated) and checks
/// that it delivers through a lane.
async fn connect_producer(p: usize, url: &str) -> JetStreamSink {
    let sink = builder(url)
        .name(format!("producer-{p}"))
        .stream_policy(StreamPolicy::Verify)
        .reconnect(fast_reconnect())
        .queue_bound(QUEUE, 64 * 1024 * 1024)
        // Longer than any fault here lasts: `send` waits through it instead of failing.
        .when_full(WhenFull::Block {
            deadline: Duration::from_secs(120),
        })
        .connect()
        .await
        .expect("the sink accepts the stream");
    let health = sink.health();
    assert_eq!(
        health.mechanism,
        Mechanism::FastBatch,
        "producer {p} on a stream with allow_batched on 2.15 uses a lane: {health:?}"
    );
    sink
}

/// Connects one producer per URL (see [`connect_producer`]), then starts them all at once, each
/// sending `events` events (see [`spawn_producers`]).
async fn start_producers(urls: &[String], fault: &Arc<AtomicBool>, events: usize) -> Vec<Producer> {
    let mut sinks = Vec::with_capacity(urls.len());
    for (p, url) in urls.iter().enumerate() {
        sinks.push(connect_producer(p, url).await);
    }
    spawn_producers(sinks, fault, events, |run, i| event(run, i, 3))
}

/// Starts each sink sending `events` events, event `i` of producer `p` being `make("p{p}", i)`.
/// Each task counts the sends made after `fault` was raised, and returns every outcome in send
/// order.
fn spawn_producers(
    sinks: Vec<JetStreamSink>,
    fault: &Arc<AtomicBool>,
    events: usize,
    make: fn(&str, usize) -> CloudEvent,
) -> Vec<Producer> {
    let mut producers = Vec::with_capacity(sinks.len());
    for (p, sink) in sinks.into_iter().enumerate() {
        let run = format!("p{p}");
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = {
            let (sink, run, accepted, fault) = (
                sink.clone(),
                run.clone(),
                Arc::clone(&accepted),
                Arc::clone(fault),
            );
            tokio::spawn(async move {
                let mut pending = Vec::with_capacity(events);
                let mut after_fault = 0;
                for i in 0..events {
                    let e = make(&run, i);
                    let p = sink.send(e.clone()).await.expect("accepted");
                    pending.push((e, p));
                    accepted.store(i + 1, Ordering::SeqCst);
                    after_fault += usize::from(fault.load(Ordering::SeqCst));
                }
                (await_outcomes(pending).await, after_fault)
            })
        };
        producers.push(Producer {
            run,
            sink,
            accepted,
            task,
        });
    }
    producers
}

/// Waits until every producer has had at least `at_least` events settled: the flood is well
/// under way on all of them.
async fn wait_settled(producers: &[Producer], at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let settled: Vec<usize> = producers.iter().map(Producer::settled).collect();
        if settled.iter().all(|&s| s >= at_least) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the producers settled only {settled:?} of {EVENTS} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What the producers did, for the audit and the log line.
struct Finished {
    runs: Vec<(String, Vec<Sent>)>,
    /// Per producer: sends made after the fault was raised.
    after_fault: Vec<usize>,
    /// Per producer: distinct batches that confirmed its events.
    batches: Vec<usize>,
    sinks: Vec<JetStreamSink>,
}

/// Awaits every producer; asserts every outcome Ok, every receipt from a fast batch, every
/// producer still on its lane, and that each was still sending when the fault was raised.
async fn finish(producers: Vec<Producer>) -> Finished {
    let mut finished = Finished {
        runs: Vec::new(),
        after_fault: Vec::new(),
        batches: Vec::new(),
        sinks: Vec::new(),
    };
    for producer in producers {
        let (sent, after_fault) = producer.task.await.expect("producer task");
        let health = producer.sink.health();
        let failed: Vec<_> = sent
            .iter()
            .filter_map(|s| {
                s.outcome
                    .as_ref()
                    .err()
                    .map(|e| (s.event.id.clone(), e.to_string()))
            })
            .take(5)
            .collect();
        assert!(
            failed.is_empty(),
            "producer {}: transient errors are retried, yet {} of {} failed, first {failed:?}; \
             {health:?}",
            producer.run,
            sent.len() - delivered_count(&sent),
            sent.len()
        );
        let mut ids: Vec<&str> = Vec::new();
        for s in &sent {
            let receipt = s.outcome.as_ref().expect("checked above");
            let batch = receipt.batch.as_ref().unwrap_or_else(|| {
                panic!(
                    "producer {}: {} was confirmed without a batch: {receipt:?}",
                    producer.run, s.event.id
                )
            });
            assert_eq!(receipt.sequence, None, "{receipt:?}");
            if ids.last() != Some(&batch.id.as_str()) {
                ids.push(&batch.id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        finished.batches.push(ids.len());
        assert_eq!(
            health.mechanism,
            Mechanism::FastBatch,
            "producer {} still delivers through its lane: {health:?}",
            producer.run
        );
        assert!(
            after_fault > 0,
            "producer {}: the fault came mid-flood, not after the last send",
            producer.run
        );
        finished.after_fault.push(after_fault);
        finished.runs.push((producer.run, sent));
        finished.sinks.push(producer.sink);
    }
    finished
}

/// Each producer's expectations, keyed by producer: its events in its own send order.
fn expected_of(runs: &[(String, Vec<Sent>)]) -> Vec<Expected> {
    runs.iter()
        .flat_map(|(run, sent)| {
            expectations(sent, false).into_iter().map(move |mut e| {
                e.key = run.clone();
                e
            })
        })
        .collect()
}

/// Reads the stream back through the cluster (retrying while the consumer API settles after an
/// election) and audits every producer: each delivered event stored once, per-producer order.
async fn audit_cluster_producers(
    cluster: &Cluster,
    runs: &[(String, Vec<Sent>)],
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
            Ok(stored) => return sink_testkit::compare(&expected_of(runs), &stored),
            Err(e) if Instant::now() < deadline => eprintln!("retrying the audit read: {e}"),
            Err(e) => panic!("cannot read the stream back: {e}"),
        }
    }
}

/// Audits, checks the count (each distinct event once: a re-emit is no new event), logs what
/// happened, and closes every sink.
async fn audit_and_close(cluster: &Cluster, finished: Finished, what: &str, started: Instant) {
    let report = audit_cluster_producers(cluster, &finished.runs).await;
    report.assert_passed();
    let distinct: HashSet<MsgId> = finished
        .runs
        .iter()
        .flat_map(|(_, sent)| sent.iter().map(|s| MsgId::for_event(&s.event)))
        .collect();
    let total = distinct.len();
    assert_eq!(report.stored, total, "{report}");
    eprintln!(
        "{what}: all {} events stored once, in order per producer, {:?} after the flood began; \
         sends after the fault per producer {:?}; batches per producer {:?}",
        total,
        started.elapsed(),
        finished.after_fault,
        finished.batches
    );
    for sink in finished.sinks {
        let close = sink.close(Duration::from_secs(5)).await;
        assert!(close.complete(), "{close:?}");
    }
}

/// Starts watching the producers' progress from now: for each, when it had settled `more` events
/// beyond what it had settled now (all of its `events` if fewer remain); `None` if that did
/// not happen within 60 s (a stall).
fn watch_progress(
    producers: &[Producer],
    more: usize,
    events: usize,
) -> tokio::task::JoinHandle<Vec<Option<Instant>>> {
    let watched: Vec<(JetStreamSink, Arc<AtomicUsize>, usize)> = producers
        .iter()
        .map(|p| {
            let target = (p.settled() + more).min(events);
            (p.sink.clone(), Arc::clone(&p.accepted), target)
        })
        .collect();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut reached = vec![None; watched.len()];
        while Instant::now() < deadline && reached.iter().any(Option::is_none) {
            for (i, (sink, accepted, target)) in watched.iter().enumerate() {
                let settled = accepted
                    .load(Ordering::SeqCst)
                    .saturating_sub(sink.health().queued);
                if reached[i].is_none() && settled >= *target {
                    reached[i] = Some(Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        reached
    })
}

/// How long after `fault` each producer made progress again (see [`watch_progress`]); panics
/// naming a producer that stalled.
async fn resumed_after(
    watch: tokio::task::JoinHandle<Vec<Option<Instant>>>,
    fault: Instant,
) -> Vec<Duration> {
    let reached = watch.await.expect("progress watch");
    reached
        .iter()
        .enumerate()
        .map(|(p, at)| {
            at.unwrap_or_else(|| panic!("producer {p} made no progress within 60 s of the fault"))
                .saturating_duration_since(fault)
        })
        .collect()
}

/// Events a producer must settle after a fault to count as going on again: more than a lane
/// can have in flight, so some of them were published after the fault.
const PROGRESS: usize = 1_000;

/// In-flight counts of every producer now.
fn in_flight(producers: &[Producer]) -> Vec<usize> {
    producers
        .iter()
        .map(|p| p.sink.health().in_flight)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_lane_producers_through_a_stream_leader_step_down_on_a_2_15_cluster() {
    let _one = exclusive().await;
    let cluster = Cluster::start(ServerVersion::V2_15)
        .await
        .expect("start cluster");
    let leader = create_r3_batched_stream(&cluster).await;
    let urls = cluster.urls().join(",");
    let fault = Arc::new(AtomicBool::new(false));
    let producers = start_producers(&vec![urls; PRODUCERS], &fault, EVENTS).await;
    let started = Instant::now();
    wait_settled(&producers, EVENTS / 4).await;
    let busy = in_flight(&producers);
    let progress = watch_progress(&producers, PROGRESS, EVENTS);
    fault.store(true, Ordering::SeqCst);
    let fault_at = Instant::now();
    let client = cluster.connect().await.expect("admin client");
    let reply = client
        .request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}"),
            Default::default(),
        )
        .await
        .expect("step-down answered");
    let reply = String::from_utf8_lossy(&reply.payload).into_owned();
    assert!(reply.contains(r#""success":true"#), "step-down: {reply}");
    let new_leader = cluster
        .wait_stream_leader(STREAM, Some(leader), Duration::from_secs(20))
        .await
        .expect("a new leader is elected");
    let elected = fault_at.elapsed();
    let resumed = resumed_after(progress, fault_at).await;
    eprintln!(
        "step-down: n{} -> n{} seen {elected:?} after the request, in flight then {busy:?}; \
         each producer settled {PROGRESS} more events {resumed:?} after it",
        leader + 1,
        new_leader + 1,
    );
    let finished = finish(producers).await;
    audit_and_close(&cluster, finished, "step-down", started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_lane_producers_through_kill_9_of_one_producers_node_on_a_2_15_cluster() {
    let _one = exclusive().await;
    let mut cluster = Cluster::start(ServerVersion::V2_15)
        .await
        .expect("start cluster");
    let leader = create_r3_batched_stream(&cluster).await;
    // Producer 0 knows only the node that leads the stream (it may still learn the others from
    // the server's INFO, as any NATS client does); the others know every node.
    let victim = leader;
    let all = cluster.urls().join(",");
    let fault = Arc::new(AtomicBool::new(false));
    let mut urls = vec![all; PRODUCERS];
    urls[0] = cluster.node(victim).url();
    let producers = start_producers(&urls, &fault, EVENTS).await;
    let started = Instant::now();
    wait_settled(&producers, EVENTS / 4).await;
    let busy = in_flight(&producers);
    let progress = watch_progress(&producers, PROGRESS, EVENTS);
    fault.store(true, Ordering::SeqCst);
    let fault_at = Instant::now();
    cluster.kill_node(victim).await.expect("kill -9 the node");
    let new_leader = cluster
        .wait_stream_leader(STREAM, Some(victim), Duration::from_secs(20))
        .await
        .expect("a new leader is elected");
    let elected = fault_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster
        .restart_node(victim)
        .await
        .expect("restart the node");
    let back = fault_at.elapsed();
    let resumed = resumed_after(progress, fault_at).await;
    eprintln!(
        "node kill: n{} (producer 0's node, stream leader) killed with {busy:?} in flight, new \
         leader n{} seen after {elected:?}, node back after {back:?}; each producer settled \
         {PROGRESS} more events {resumed:?} after the kill",
        victim + 1,
        new_leader + 1,
    );
    let finished = finish(producers).await;
    audit_and_close(&cluster, finished, "node kill", started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_lane_producers_through_kill_9_of_the_whole_cluster_on_2_15() {
    let _one = exclusive().await;
    let mut cluster = Cluster::start(ServerVersion::V2_15)
        .await
        .expect("start cluster");
    create_r3_batched_stream(&cluster).await;
    let urls = cluster.urls().join(",");
    let fault = Arc::new(AtomicBool::new(false));
    let producers = start_producers(&vec![urls; PRODUCERS], &fault, EVENTS).await;
    let started = Instant::now();
    wait_settled(&producers, EVENTS / 4).await;
    let busy = in_flight(&producers);
    let progress = watch_progress(&producers, PROGRESS, EVENTS);
    fault.store(true, Ordering::SeqCst);
    let fault_at = Instant::now();
    cluster.kill_all().await.expect("kill -9 every node");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart_all().await.expect("restart every node");
    let leader = cluster
        .wait_stream_leader(STREAM, None, Duration::from_secs(30))
        .await
        .expect("the stream has a leader again");
    let back = fault_at.elapsed();
    let resumed = resumed_after(progress, fault_at).await;
    eprintln!(
        "cluster kill: every node killed with {busy:?} in flight; back with leader n{} after \
         {back:?}; each producer settled {PROGRESS} more events {resumed:?} after the kill",
        leader + 1,
    );
    let finished = finish(producers).await;
    audit_and_close(&cluster, finished, "cluster kill", started).await;
}

// ---------------------------------------------------------------------------------------------
// A lane idle past the batch timeout, then re-emits

/// Events each producer sends before the pause, and again after it.
const IDLE_RUN: usize = 2_000;

/// Longer than the server's fast-batch timeout (10 s, silent): a batch left open over the pause
/// is gone on the server when the producers send again.
const IDLE: Duration = Duration::from_secs(12);

/// Event `i` a producer sends after the pause: even `i` re-emit the second half of its first run
/// in their first order (same source and id, so the same `Nats-Msg-Id`, well within the stream's
/// 2-minute duplicate window), odd `i` are new events.
fn after_the_pause(run: &str, i: usize) -> CloudEvent {
    if i.is_multiple_of(2) {
        event(run, IDLE_RUN / 2 + i / 2, 3)
    } else {
        event(run, IDLE_RUN + i / 2, 3)
    }
}

/// The batch ids that confirmed `sent`, without repeats.
fn batch_ids(sent: &[Sent]) -> HashSet<String> {
    sent.iter()
        .filter_map(|s| s.outcome.as_ref().ok()?.batch.as_ref())
        .map(|b| b.id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_lane_producers_idle_past_the_batch_timeout_then_re_emit_on_a_2_15_cluster() {
    let _one = exclusive().await;
    let cluster = Cluster::start(ServerVersion::V2_15)
        .await
        .expect("start cluster");
    create_r3_batched_stream(&cluster).await;
    let urls = cluster.urls().join(",");
    // The "fault" is the pause between two runs, not something striking mid-flood: every send
    // counts as after it.
    let fault = Arc::new(AtomicBool::new(true));
    let producers = start_producers(&vec![urls; PRODUCERS], &fault, IDLE_RUN).await;
    let started = Instant::now();
    let before = finish(producers).await;
    for sink in &before.sinks {
        let health = sink.health();
        assert_eq!(
            (health.queued, health.in_flight),
            (0, 0),
            "every event of the first run is confirmed before the pause: {health:?}"
        );
    }
    let first_run = started.elapsed();
    tokio::time::sleep(IDLE).await;
    let resumed = Instant::now();
    let after = finish(spawn_producers(
        before.sinks,
        &fault,
        IDLE_RUN,
        after_the_pause,
    ))
    .await;
    let second_run = resumed.elapsed();
    // Batches that confirmed events on both sides of the pause: a lane that kept its batch
    // alive over it (pings) rather than ending it; either is fine, the log says which.
    let kept: Vec<usize> = before
        .runs
        .iter()
        .zip(&after.runs)
        .map(|((_, first), (_, second))| batch_ids(first).intersection(&batch_ids(second)).count())
        .collect();
    eprintln!(
        "idle + re-emit: first run {first_run:?}, pause {IDLE:?}, second run {second_run:?} \
         ({} re-emits and {} new events per producer); batches per producer before {:?}, after \
         {:?}, confirming on both sides of the pause {kept:?}",
        IDLE_RUN.div_ceil(2),
        IDLE_RUN / 2,
        before.batches,
        after.batches,
    );
    let mut runs = before.runs;
    for ((run, first), (again, second)) in runs.iter_mut().zip(after.runs) {
        assert_eq!(*run, again, "the same producers, in the same order");
        first.extend(second);
    }
    let finished = Finished {
        runs,
        after_fault: after.after_fault,
        batches: after.batches,
        sinks: after.sinks,
    };
    audit_and_close(&cluster, finished, "idle + re-emit", started).await;
}

// ---------------------------------------------------------------------------------------------
// Ingest overload (429)

/// Inbound publishes a stream may queue before the server drops the next and answers it 429;
/// four lanes pipelining their flow windows overflow it at once.
const MAX_BUFFERED_MSGS: u64 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_lane_producers_through_ingest_overload_429_on_a_2_15_cluster() {
    let _one = exclusive().await;
    let cluster = Cluster::start_with(ServerOptions {
        jetstream_max_buffered_msgs: Some(MAX_BUFFERED_MSGS),
        ..ServerOptions::version(ServerVersion::V2_15)
    })
    .await
    .expect("start cluster");
    create_r3_batched_stream(&cluster).await;
    let (stop_observer, observer) =
        observe(cluster.node(0), LaneTraffic::default(), LaneTraffic::count).await;
    let urls = cluster.urls().join(",");
    // The overload lasts the whole run: every send is "after the fault".
    let fault = Arc::new(AtomicBool::new(true));
    let producers = start_producers(&vec![urls; PRODUCERS], &fault, EVENTS_OVERLOADED).await;
    let started = Instant::now();
    let finished = finish(producers).await;
    let flood = started.elapsed();
    stop_observer.send(()).expect("observer still running");
    let traffic = observer.await.expect("observer task");
    assert!(
        traffic.too_many > 0,
        "no 429 among the replies to fast-batch publishes: lower max_buffered_msgs; {traffic:?}"
    );
    let dropped = cluster.nodes().iter().any(|n| {
        n.log_tail(2000)
            .contains("Dropping messages due to excessive stream ingest rate")
    });
    assert!(dropped, "a server logs the drops");
    let events = PRODUCERS * EVENTS_OVERLOADED;
    eprintln!(
        "overload: flood took {flood:?}; {} publishes for {events} events ({:.1} per event), {} \
         replies, {} of them 429; first 429: {}",
        traffic.publishes,
        traffic.publishes as f64 / events as f64,
        traffic.replies,
        traffic.too_many,
        traffic.sample.as_deref().unwrap_or("-")
    );
    // Lanes back off: a batch that meets a 429 halves what later batches send unconfirmed.
    // Without it this run measured 1.3 to 31 publishes per event; with it 1.4 to 1.5.
    assert!(
        traffic.publishes <= 4 * events,
        "re-sends under overload multiply the load: {traffic:?}"
    );
    audit_and_close(&cluster, finished, "overload", started).await;
}
