//! `jetsink bench`, many producers into one stream: sinks with their own connections against as many fire-and-forget connections, every run read back and audited; the same on a 3-node cluster with an R3 stream; send-to-receipt latency at a low rate beside the serial ack.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::Config as StreamConfig};
use sink_nats::audit::{compare, read_stream, Expected, StoredMessage};
use sink_nats::sink_core::audit::SEQUENCE_NOT_REPORTED;
use sink_nats::sink_core::capability::{fast_batch_supported, ServerVersion as Version};
use sink_nats::sink_core::event::{CloudEvent, MsgId};
use sink_nats::{
    Batching, Health, JetStreamSink, Mechanism, OrderingKey, OrderingMode, Pending, SinkBuilder,
    Staged, StreamPolicy, WhenFull,
};
use sink_testkit::{Cluster, ServerVersion};

use super::{percentiles, summarize, wire, Bench, BenchArgs, Cpu, Latency, Row, Spread, ALLOCATOR};

/// Serial publishes on the cluster for its own round trip (the single server's come from the
/// serial-ack row of the main table).
const CLUSTER_SERIAL_EVENTS: usize = 1000;
/// How long reading a stream back for an audit may take (100k events on R3 take a few seconds).
const AUDIT_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a reference stream must stop growing before the messages still missing count as
/// dropped by the broker (fire-and-forget publishes beyond what a replicated stream takes in are
/// dropped: nobody reads their error replies).
const REFERENCE_QUIET: Duration = Duration::from_secs(2);
/// Name of the low-rate run, for `--only`.
const LOW_RATE_ROW: &str = "jetsink low rate";
/// Waits for a staged event's durability and files it as accepted (or refused).
async fn accept(
    id: String,
    staged_at: Instant,
    staged: Staged,
    sends: &mut Vec<u64>,
    pendings: &mut Vec<(String, Pending)>,
    errors: &mut Vec<String>,
) {
    let durable = staged.durable.await;
    sends.push(staged_at.elapsed().as_nanos() as u64);
    match durable {
        Ok(()) => pendings.push((id, staged.pending)),
        Err(e) => errors.push(format!("not durable {id}: {e}")),
    }
}

/// Sends a producer of a spooled row keeps in flight.
const SPOOLED_SENDS_IN_FLIGHT: usize = 256;

/// Producer counts of the spooled rows (`--spool`).
const SPOOL_PRODUCERS: [usize; 2] = [1, 4];

/// What reading a many-producer row's stream back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Audit {
    /// Every event stored once, each producer's in its send order, at the sequence its receipt
    /// named; nothing else in the stream.
    Passed,
    /// Anything else, with a one-line summary.
    Failed(String),
}

impl Audit {
    /// A failure if any round failed, else passed; `None` without audits.
    pub(super) fn worst(audits: impl Iterator<Item = Audit>) -> Option<Audit> {
        let mut out = None;
        for audit in audits {
            if matches!(audit, Audit::Failed(_)) {
                return Some(audit);
            }
            out = Some(audit);
        }
        out
    }

    fn label(&self) -> &'static str {
        match self {
            Audit::Passed => "ok",
            Audit::Failed(_) => "FAIL",
        }
    }
}

/// One table of many-producer rows (single server or cluster) and its low-rate latency.
pub(super) struct Section {
    title: String,
    rows: Vec<Row>,
    pub(super) low_rate: Option<LowRate>,
    /// Distinct `health().mechanism_reason`s and `ordering_reason`s the producers' sinks gave.
    reasons: Vec<String>,
}

/// Send-to-receipt latency of one sink at a low, steady rate.
#[derive(Debug, Clone)]
pub(super) struct LowRate {
    rate: u32,
    secs: u64,
    events: usize,
    failed: usize,
    latency: Latency,
    /// Publish-to-ack round trips of a serial publisher on the same server in the same run.
    serial: Latency,
    serial_source: String,
    mechanism: String,
}

/// Whether the server the client is connected to takes fast-batch publishes.
pub(super) fn takes_fast_batch(client: &async_nats::Client) -> bool {
    Version::parse(&client.server_info().version)
        .as_ref()
        .is_some_and(fast_batch_supported)
}

/// Creates `config`; with `batched`, with `allow_batched: true`. A replicated stream is retried
/// for a while: right after the cluster starts, its peers may still be settling.
pub(super) async fn create_stream(
    js: &jetstream::Context,
    config: StreamConfig,
    batched: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let result = if batched {
            create_batched(js, &config).await
        } else {
            js.create_stream(config.clone())
                .await
                .map(drop)
                .map_err(anyhow::Error::from)
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if config.num_replicas > 1 && Instant::now() < deadline => {
                tracing::info!("retrying the creation of stream {}: {e:#}", config.name);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The stream-create request by hand: async-nats 0.51 has `allow_batched` only behind its
/// `server_2_14` feature, which the workspace does not turn on, and `sink_nats::create_stream`
/// makes the `Create` policy's stream (90-day max_age, one replica), not the bench's.
async fn create_batched(js: &jetstream::Context, config: &StreamConfig) -> anyhow::Result<()> {
    let mut body = serde_json::to_value(config)?;
    body["allow_batched"] = serde_json::Value::Bool(true);
    let reply: serde_json::Value = js
        .request(format!("STREAM.CREATE.{}", config.name), &body)
        .await?;
    if let Some(error) = reply.get("error") {
        anyhow::bail!("the server refused the stream: {error}");
    }
    anyhow::ensure!(
        reply["config"]["allow_batched"] == serde_json::Value::Bool(true),
        "the server created the stream without allow_batched: {}",
        reply["config"]
    );
    Ok(())
}

/// Whether `--only` keeps the row called `name`.
fn selected(args: &BenchArgs, name: &str) -> bool {
    args.only.as_deref().is_none_or(|o| name.contains(o))
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The name of the jetsink row with `count` producers, without the allocator.
fn producers_row(count: usize) -> String {
    format!("jetsink {count} producer{}", plural(count))
}

/// The name of the spooled row with `count` producers, without the allocator.
fn spooled_row(count: usize) -> String {
    format!(
        "jetsink spooled, {count} producer{} on one sink",
        plural(count)
    )
}

/// `n` split into `parts` nearly equal shares, the larger ones first.
fn shares(n: usize, parts: usize) -> impl Iterator<Item = usize> {
    (0..parts).map(move |p| n / parts + usize::from(p < n % parts))
}

/// The `count` events of producer `p`, each with its message id: their own source, so no two
/// producers share an id.
fn producer_events(round: u64, p: usize, count: usize) -> Vec<(String, CloudEvent)> {
    (0..count as u64)
        .map(|i| {
            let event = super::make_event_of(round, p, i);
            (MsgId::for_event(&event).as_str().to_owned(), event)
        })
        .collect()
}

/// The delivery mechanism a sink runs, as the table names it: "fast-batch lane", or with
/// per-event acks the ordering mode in force.
fn mechanism(health: &Health) -> String {
    match health.mechanism {
        Mechanism::FastBatch => "fast-batch lane".to_owned(),
        _ => health.ordering.to_string(),
    }
}

/// `reason` with every double-quoted part (a message id) shortened to `"…"`, so that sixteen
/// producers giving the same reason list it once.
fn without_quoted(reason: &str) -> String {
    reason
        .split('"')
        .enumerate()
        .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
        .collect::<Vec<_>>()
        .join("\"")
}

/// "chained x1", "per-key-serial x4", "chained x1 + per-key-serial x3".
fn count_mechanisms(mechanisms: &[String]) -> String {
    let mut counted: Vec<(&str, usize)> = Vec::new();
    for m in mechanisms {
        match counted.iter_mut().find(|(name, _)| *name == m.as_str()) {
            Some((_, n)) => *n += 1,
            None => counted.push((m.as_str(), 1)),
        }
    }
    counted
        .iter()
        .map(|(name, n)| format!("{name} x{n}"))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// A sink config for a many-producer or low-rate row: what a service gets by default (chained,
/// falling back by itself; one ordering key per sink), on producer `p`'s server.
fn producer_config(
    bench: &Bench,
    p: usize,
    stream: &str,
    subject: &str,
    queue: usize,
) -> sink_nats::SinkConfig {
    let mut config = bench.base.clone();
    config.servers = vec![bench.url_for(p)];
    config.name = format!("jetsink-bench-producer-{p}");
    config.stream = stream.to_owned();
    config.subject_template = format!("{subject}.{{tenantId}}");
    config.stream_policy = StreamPolicy::Verify;
    config.retention_floor = Duration::ZERO;
    config.ordering = OrderingMode::Chained;
    config.ordering_key = OrderingKey::Sink;
    config.window = 1024;
    // What these rows measure: lanes where the server and the stream allow them.
    config.batching = Batching::Auto;
    // Room for the producer's whole share, so `send` measures enqueueing.
    config.max_events = queue.max(1024);
    config.max_bytes = queue.max(1024) * 2048;
    config.when_full = WhenFull::Block {
        deadline: Duration::from_secs(60),
    };
    config
}

/// What one producer of a many-producer row did.
struct ProducerRun {
    /// Until its last `send` returned.
    submitted: Duration,
    /// Until its last receipt (or failure) arrived.
    finished: Duration,
    /// Every event it sent, in send order: message id and the sequence its receipt named.
    outcomes: Vec<(String, Option<u64>)>,
    errors: Vec<String>,
    /// How long each `send` took, in nanoseconds.
    sends: Vec<u64>,
}

impl Bench {
    /// Client URL for producer (or connection) `p`: spread over the servers in turn.
    fn url_for(&self, p: usize) -> String {
        self.urls[p % self.urls.len()].clone()
    }

    /// The reference with `connections` connections: each publishes its share of `n` with the
    /// ack future dropped, all at once, timed until the stream holds all `n`. A broker that drops
    /// some (an R3 stream's ingest queue overflows, and the error replies go unread) is timed until
    /// its last stored message, its rate counts what it stored, and the row says how many it
    /// dropped.
    async fn reference_connections(&mut self, connections: usize, n: usize) -> anyhow::Result<Row> {
        let (stream, subject) = self.fresh_stream("refn", true).await?;
        let mut clients = Vec::with_capacity(connections);
        for p in 0..connections {
            let mut config = self.base.clone();
            config.servers = vec![self.url_for(p)];
            let client = sink_nats::connect_client(&config)
                .await
                .context("connecting a reference connection")?;
            clients.push(client);
        }
        let round = self.round;
        let events: Vec<Vec<(String, CloudEvent)>> = shares(n, connections)
            .enumerate()
            .map(|(p, count)| producer_events(round, p, count))
            .collect();
        let cpu = Cpu::start(&self.server_pids);
        let start = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .zip(events)
            .map(|(client, events)| {
                let subject = subject.clone();
                tokio::spawn(async move {
                    let js = jetstream::new(client.clone());
                    for (_, event) in &events {
                        let (subj, headers, w) = wire(event, &subject)?;
                        drop(
                            js.publish_with_headers(subj, headers, w.body)
                                .await
                                .context("publish")?,
                        );
                    }
                    let submitted = start.elapsed();
                    client.flush().await.context("flush")?;
                    anyhow::Ok((submitted, client))
                })
            })
            .collect();
        let mut submitted = Duration::ZERO;
        // Open until the stream holds everything: closing a connection right after its flush lost
        // publishes the server had not stored yet (148 of 2000 over 4 connections on 2.15.1).
        let mut open = Vec::with_capacity(connections);
        for task in tasks {
            let (took, client) = task.await.context("a reference connection's task")??;
            submitted = submitted.max(took);
            open.push(client);
        }
        let (stored, took) = self.await_ingested(&stream, n, start).await?;
        drop(open);
        let cpu = cpu.stop();
        self.drop_stream(&stream).await;
        let name = format!("reference x{connections} connection{}", plural(connections));
        let mut row = Row::new(
            name,
            stored,
            took.as_secs_f64(),
            submitted.as_secs_f64(),
            cpu,
            false,
        );
        if stored < n {
            row.mechanism = Some(format!(
                "broker dropped {} of {n}; rate counts the {stored} stored",
                n - stored
            ));
        }
        Ok(row)
    }

    /// Waits until `stream` holds `n` messages, or has not grown for [`REFERENCE_QUIET`]; returns
    /// what it holds and when it last grew (since `start`). At most 120 s.
    async fn await_ingested(
        &self,
        stream: &str,
        n: usize,
        start: Instant,
    ) -> anyhow::Result<(usize, Duration)> {
        self.client.flush().await.context("flush")?;
        let mut handle = self.js.get_stream(stream).await?;
        let deadline = start + Duration::from_secs(120);
        let (mut stored, mut grew) = (0, start.elapsed());
        loop {
            let held = handle.info().await?.state.messages as usize;
            let now = start.elapsed();
            if held >= n {
                return Ok((held, now));
            }
            if held > stored {
                (stored, grew) = (held, now);
            } else if now - grew >= REFERENCE_QUIET {
                return Ok((stored, grew));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{stream}: stream holds {held} of {n} after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// `count` sinks, each with its own connection, send their shares of `n` into one stream at
    /// once; every receipt awaited; then the stream is read back and audited.
    ///
    /// With `spool`, one sink with a fresh spool in that directory (removed after) serves all
    /// `count` producers: their appends share the group commits, as a service's would.
    async fn producers(
        &mut self,
        count: usize,
        n: usize,
        reasons: &mut Vec<String>,
        spool: Option<&Path>,
    ) -> anyhow::Result<Row> {
        let (stream, subject) = self.fresh_stream("multi", true).await?;
        let round = self.round;
        let mut sinks: Vec<(JetStreamSink, Vec<(String, CloudEvent)>)> = Vec::with_capacity(count);
        let spool_dir = match spool {
            Some(dir) => {
                let dir = dir.join(format!("round-{round}"));
                // A directory left by an interrupted run would be replayed into this stream.
                let _ = std::fs::remove_dir_all(&dir);
                let mut config = producer_config(self, 0, &stream, &subject, n);
                config.spool = Some(dir.clone());
                let sink = SinkBuilder::from_config(config)
                    .connect()
                    .await
                    .context("connecting the spooled sink")?;
                for (p, share) in shares(n, count).enumerate() {
                    sinks.push((sink.clone(), producer_events(round, p, share)));
                }
                Some(dir)
            }
            None => {
                for (p, share) in shares(n, count).enumerate() {
                    let config = producer_config(self, p, &stream, &subject, share);
                    let sink = SinkBuilder::from_config(config)
                        .connect()
                        .await
                        .with_context(|| format!("connecting producer {p}'s sink"))?;
                    sinks.push((sink, producer_events(round, p, share)));
                }
                None
            }
        };
        let cpu = Cpu::start(&self.server_pids);
        let start = Instant::now();
        // A spooled `send` returns once its record is fdatasync'd: a producer keeps this many in
        // flight so they share syncs (polled in order, they keep their order; the audit checks).
        let in_flight = if spool_dir.is_some() {
            SPOOLED_SENDS_IN_FLIGHT
        } else {
            1
        };
        let tasks: Vec<_> = sinks
            .iter_mut()
            .map(|(sink, events)| {
                let sink = sink.clone();
                let events = std::mem::take(events);
                tokio::spawn(async move {
                    let mut pendings = Vec::with_capacity(events.len());
                    let mut sends = Vec::with_capacity(events.len());
                    let mut errors = Vec::new();
                    // Spooled: stage one event after another (that keeps their order) and
                    // await their durability in a window, so they share fdatasyncs; a send's
                    // time is from its stage to its durability.
                    let mut window = std::collections::VecDeque::new();
                    for (id, event) in events {
                        let t = Instant::now();
                        if in_flight == 1 {
                            let sent = sink.send(event).await;
                            sends.push(t.elapsed().as_nanos() as u64);
                            match sent {
                                Ok(pending) => pendings.push((id, pending)),
                                Err(e) => {
                                    // The rest is not sent: the audit expects what was accepted.
                                    errors.push(format!("send refused {id}: {e}"));
                                    break;
                                }
                            }
                            continue;
                        }
                        match sink.stage(event).await {
                            Ok(staged) => window.push_back((id, t, staged)),
                            Err(e) => {
                                errors.push(format!("send refused {id}: {e}"));
                                break;
                            }
                        }
                        if window.len() >= in_flight {
                            let (id, t, staged) = window.pop_front().expect("a full window");
                            accept(id, t, staged, &mut sends, &mut pendings, &mut errors).await;
                        }
                    }
                    while let Some((id, t, staged)) = window.pop_front() {
                        accept(id, t, staged, &mut sends, &mut pendings, &mut errors).await;
                    }
                    let submitted = start.elapsed();
                    let mut outcomes = Vec::with_capacity(pendings.len());
                    for (id, pending) in pendings {
                        match pending.await {
                            // A lane's receipt names no stream sequence: the audit then
                            // checks presence and order, not position.
                            Ok(receipt) => outcomes.push((
                                id,
                                Some(receipt.sequence.unwrap_or(SEQUENCE_NOT_REPORTED)),
                            )),
                            Err(e) => {
                                errors.push(format!("{id}: {e}"));
                                outcomes.push((id, None));
                            }
                        }
                    }
                    ProducerRun {
                        submitted,
                        finished: start.elapsed(),
                        outcomes,
                        errors,
                        sends,
                    }
                })
            })
            .collect();
        let mut runs = Vec::with_capacity(count);
        for task in tasks {
            runs.push(task.await.context("a producer's task")?);
        }
        let secs = runs
            .iter()
            .map(|r| r.finished)
            .max()
            .unwrap_or_default()
            .as_secs_f64();
        let submitted = runs.iter().map(|r| r.submitted).max().unwrap_or_default();
        let cpu = cpu.stop();
        let mut sends: Vec<u64> = runs.iter().flat_map(|r| r.sends.iter().copied()).collect();

        let mut mechanisms = Vec::with_capacity(count);
        let mut errors: Vec<String> = runs.iter().flat_map(|r| r.errors.clone()).collect();
        for (p, (sink, _)) in sinks.iter().enumerate() {
            let health = sink.health();
            mechanisms.push(mechanism(&health));
            let why = [
                Some(format!("{}: {}", health.mechanism, health.mechanism_reason)),
                health
                    .ordering_reason
                    .as_deref()
                    .map(|r| format!("{}: {r}", health.ordering)),
            ];
            // Without the round's stream name and message ids, sixteen producers' reasons and
            // every round's are one line.
            let general = |r: &String| without_quoted(&r.replace(stream.as_str(), "<stream>"));
            for reason in why.iter().flatten().map(general) {
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
            if spool_dir.is_some() && p > 0 {
                continue; // one sink for all: closed once
            }
            let report = sink.close(Duration::from_secs(10)).await;
            if !report.complete() {
                errors.push(format!(
                    "producer {p}: {} events undelivered at close",
                    report.not_delivered.len()
                ));
            }
            if let Some(left) = sink.health().spool.map(|s| s.spool.records) {
                if left > 0 {
                    errors.push(format!("{left} records left in the spool after close"));
                }
            }
        }
        if let Some(dir) = &spool_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let expected: Vec<Expected> = runs
            .iter()
            .enumerate()
            .flat_map(|(p, run)| {
                run.outcomes
                    .iter()
                    .map(move |(id, seq)| Expected::new(id.clone(), format!("producer-{p}"), *seq))
            })
            .collect();
        let audit = match self.read_back(&stream).await {
            Ok(stored) => judge(&expected, &stored, n, &errors),
            Err(e) => Audit::Failed(format!("could not read the stream back: {e:#}")),
        };
        self.drop_stream(&stream).await;
        let name = if spool_dir.is_some() {
            format!("{} [{ALLOCATOR}]", spooled_row(count))
        } else {
            format!("{} [{ALLOCATOR}]", producers_row(count))
        };
        if let Audit::Failed(why) = &audit {
            eprintln!("bench: AUDIT FAIL {name}, round {round}: {why}");
        }
        let mut row = Row::new(name, n, secs, submitted.as_secs_f64(), cpu, true);
        row.audit = Some(audit);
        row.mechanism = Some(if spool_dir.is_some() {
            format!("{} + spool", mechanisms.first().map_or("", String::as_str))
        } else {
            count_mechanisms(&mechanisms)
        });
        row.send = Some(percentiles(&mut sends));
        Ok(row)
    }

    /// Every message of `stream`; on a cluster the first read after heavy writes may time out
    /// while the consumer API settles, so it is tried three times.
    async fn read_back(&self, stream: &str) -> anyhow::Result<Vec<StoredMessage>> {
        let mut attempt = 1;
        loop {
            match read_stream(&self.js, stream, AUDIT_READ_TIMEOUT).await {
                Ok(stored) => return Ok(stored),
                Err(e) if attempt < 3 => {
                    tracing::info!("retrying the audit read of {stream}: {e}");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One sink sends `rate` events a second for `secs` seconds; each event's time from `send`
    /// to its receipt.
    async fn low_rate(
        &mut self,
        rate: u32,
        secs: u64,
        serial: Latency,
        serial_source: String,
    ) -> anyhow::Result<LowRate> {
        let (stream, subject) = self.fresh_stream("lowrate", true).await?;
        let events = (u64::from(rate) * secs) as usize;
        let config = producer_config(self, 0, &stream, &subject, events);
        let sink = SinkBuilder::from_config(config)
            .connect()
            .await
            .context("connecting the low-rate sink")?;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut waiting = Vec::with_capacity(events);
        for (_, event) in producer_events(self.round, 0, events) {
            tick.tick().await;
            let sent = Instant::now();
            let pending = sink.send(event).await?;
            // A task per event, so each receipt is timed when it arrives, not when the loop
            // gets to it.
            waiting.push(tokio::spawn(async move {
                let outcome = pending.await;
                (sent.elapsed(), outcome.is_ok())
            }));
        }
        let mut nanos = Vec::with_capacity(events);
        let mut failed = 0;
        for task in waiting {
            let (took, ok) = task.await.context("a receipt task")?;
            if ok {
                nanos.push(took.as_nanos() as u64);
            } else {
                failed += 1;
            }
        }
        let mechanism = mechanism(&sink.health());
        let report = sink.close(Duration::from_secs(10)).await;
        self.drop_stream(&stream).await;
        anyhow::ensure!(
            report.complete(),
            "low rate: events left undelivered at close"
        );
        Ok(LowRate {
            rate,
            secs,
            events,
            failed,
            latency: percentiles(&mut nanos),
            serial,
            serial_source,
            mechanism,
        })
    }
}

/// The audit verdict: `compare`'s invariants, plus every event accepted, stored, and nothing
/// refused or left over.
fn judge(expected: &[Expected], stored: &[StoredMessage], n: usize, errors: &[String]) -> Audit {
    let report = compare(expected, stored);
    let mut problems = Vec::new();
    if !report.passed() {
        problems.push(
            format!("{report}")
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
    if expected.len() != n {
        problems.push(format!("{} of {n} events accepted", expected.len()));
    }
    if stored.len() != n {
        problems.push(format!("stream holds {} of {n}", stored.len()));
    }
    if !errors.is_empty() {
        problems.push(format!(
            "{} errors, first: {}",
            errors.len(),
            errors.first().map_or("", String::as_str)
        ));
    }
    if problems.is_empty() {
        Audit::Passed
    } else {
        Audit::Failed(problems.join("; "))
    }
}

/// The many-producer rows of `args.producers` in `rounds` interleaved rounds: per count, the
/// reference with as many connections, then the sinks; with `spool`, also the spooled rows of
/// [`SPOOL_PRODUCERS`] after the sinks of their count (with their own reference when that count
/// is not in `args.producers`).
pub(super) async fn section(
    bench: &mut Bench,
    args: &BenchArgs,
    rounds: usize,
    title: String,
    spool: bool,
    progress: &dyn Fn(&str),
) -> anyhow::Result<Section> {
    let mut plan: Vec<(usize, bool, bool)> = args
        .producers
        .iter()
        .copied()
        .filter(|&c| c > 0 && selected(args, &producers_row(c)))
        .map(|c| (c, true, false))
        .collect();
    if spool {
        for count in SPOOL_PRODUCERS {
            if !selected(args, &spooled_row(count)) {
                continue;
            }
            match plan.iter_mut().find(|(c, ..)| *c == count) {
                Some(entry) => entry.2 = true,
                None => plan.push((count, false, true)),
            }
        }
        plan.sort_by_key(|(c, ..)| *c);
    }
    let mut section = Section {
        title,
        rows: Vec::new(),
        low_rate: None,
        reasons: Vec::new(),
    };
    if plan.is_empty() {
        return Ok(section);
    }
    // Where each count's reference sits in a round.
    let mut at = Vec::with_capacity(plan.len());
    let mut next = 0;
    for &(_, memory, spooled) in &plan {
        at.push(next);
        next += 1 + usize::from(memory) + usize::from(spooled);
    }
    // Reference rows show their ratio to the 1-connection reference when it runs.
    let single_ref = plan.iter().position(|&(c, ..)| c == 1).map(|i| at[i]);
    let spool_root = if plan.iter().any(|&(_, _, s)| s) {
        Some(SpoolRoot::new(args)?)
    } else {
        None
    };
    let mut all: Vec<Vec<Row>> = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let mut rows = Vec::with_capacity(next);
        for (i, &(count, memory, spooled)) in plan.iter().enumerate() {
            progress(&format!(
                "{}: round {round}/{rounds}: reference x{count} connection{}, {} events",
                bench.place(),
                plural(count),
                args.events
            ));
            let mut reference = bench.reference_connections(count, args.events).await?;
            reference.base = single_ref.unwrap_or(at[i]);
            rows.push(reference);
            let spool_dir = spool_root.as_ref().map(|r| r.path.clone());
            let runs = [
                (memory, producers_row(count), None),
                (spooled, spooled_row(count), spool_dir),
            ];
            for (wanted, name, dir) in runs {
                if !wanted {
                    continue;
                }
                progress(&format!(
                    "{}: round {round}/{rounds}: {name}, {} events",
                    bench.place(),
                    args.events
                ));
                let mut row = bench
                    .producers(count, args.events, &mut section.reasons, dir.as_deref())
                    .await?;
                row.base = at[i];
                rows.push(row);
            }
        }
        all.push(rows);
    }
    section.rows = summarize(&all);
    Ok(section)
}

/// Where the spooled rows keep their spools: `--spool-dir`, or a fresh directory under the
/// system temp directory, removed at the end.
struct SpoolRoot {
    path: PathBuf,
    remove: bool,
}

impl SpoolRoot {
    fn new(args: &BenchArgs) -> anyhow::Result<SpoolRoot> {
        match &args.spool_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Ok(SpoolRoot {
                    path: dir.clone(),
                    remove: false,
                })
            }
            None => {
                let path = std::env::temp_dir()
                    .join(format!("jetsink-bench-spool-{}", std::process::id()));
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                Ok(SpoolRoot { path, remove: true })
            }
        }
    }
}

impl Drop for SpoolRoot {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The low-rate latency run unless skipped, against `serial` (round trips measured on the same
/// server in this run).
pub(super) async fn low_rate(
    bench: &mut Bench,
    args: &BenchArgs,
    serial: Latency,
    serial_source: &str,
    progress: &dyn Fn(&str),
) -> anyhow::Result<Option<LowRate>> {
    if args.low_rate_secs == 0 || args.low_rate == 0 || !selected(args, LOW_RATE_ROW) {
        return Ok(None);
    }
    progress(&format!(
        "{}: low rate, {} events/s for {} s",
        bench.place(),
        args.low_rate,
        args.low_rate_secs
    ));
    let run = bench
        .low_rate(
            args.low_rate,
            args.low_rate_secs,
            serial,
            serial_source.to_owned(),
        )
        .await?;
    Ok(Some(run))
}

/// Starts a 3-node cluster of `version`, runs the many-producer rows (`--cluster-rounds`) and the
/// low-rate latency against R3 streams on it, and stops it.
pub(super) async fn cluster(
    single: &Bench,
    args: &BenchArgs,
    version: ServerVersion,
    progress: &dyn Fn(&str),
) -> anyhow::Result<Section> {
    progress(&format!(
        "starting a 3-node cluster of nats-server {version}"
    ));
    let cluster = Cluster::start(version)
        .await
        .context("starting the 3-node cluster")?;
    let urls = cluster.urls();
    let mut base = single.base.clone();
    base.servers = urls.clone();
    let client = sink_nats::connect_client(&base)
        .await
        .context("connecting to the cluster")?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(10));
    let batched = takes_fast_batch(&client);
    let server = client.server_info().version;
    let mut bench = Bench {
        client,
        js,
        base,
        prefix: format!("{}_R3", single.prefix),
        round: 0,
        server_pids: cluster.nodes().iter().filter_map(|n| n.pid()).collect(),
        urls,
        replicas: 3,
        batched,
    };
    if args.warmup_events > 0 {
        progress(&format!("cluster: warm-up ({} events)", args.warmup_events));
        bench.fire_and_forget(args.warmup_events, true).await?;
    }
    let title = format!(
        "{} producers into one R3 stream, 3-node cluster of nats-server {server}, {} round(s)",
        args.producers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        args.cluster_rounds
    );
    let mut section = section(
        &mut bench,
        args,
        args.cluster_rounds,
        title,
        false,
        progress,
    )
    .await?;
    if args.low_rate_secs > 0 && args.low_rate > 0 && selected(args, LOW_RATE_ROW) {
        progress(&format!(
            "cluster: serial ack round trip, {CLUSTER_SERIAL_EVENTS} events"
        ));
        let (_, mut nanos) = bench.serial(CLUSTER_SERIAL_EVENTS).await?;
        let serial = percentiles(&mut nanos);
        let source = format!("{CLUSTER_SERIAL_EVENTS} serial publishes on the cluster");
        section.low_rate = low_rate(&mut bench, args, serial, &source, progress).await?;
    }
    drop(bench);
    drop(cluster);
    Ok(section)
}

impl Bench {
    /// "single" or "cluster", for progress lines.
    fn place(&self) -> &'static str {
        if self.replicas > 1 {
            "cluster"
        } else {
            "single"
        }
    }
}

impl Section {
    /// Names of the rows whose audit failed.
    pub(super) fn failed_rows(&self) -> impl Iterator<Item = &str> {
        self.rows
            .iter()
            .filter(|r| matches!(r.audit, Some(Audit::Failed(_))))
            .map(|r| r.name.as_str())
    }

    /// The table, its notes and the low-rate line.
    pub(super) fn print(&self) {
        if self.rows.is_empty() && self.low_rate.is_none() {
            return;
        }
        println!();
        println!("{}", self.title);
        if !self.rows.is_empty() {
            self.print_rows();
        }
        if let Some(l) = &self.low_rate {
            println!(
                "{LOW_RATE_ROW} [{ALLOCATOR}], {} events/s for {} s ({} events, {} failed), {}: send to receipt p50 {:.0} us  p99 {:.0} us  max {:.0} us",
                l.rate, l.secs, l.events, l.failed, l.mechanism, l.latency.p50, l.latency.p99, l.latency.max
            );
            println!(
                "  serial ack round trip ({}): p50 {:.0} us  p99 {:.0} us; low-rate p50 / serial p50 = {:.2}x",
                l.serial_source,
                l.serial.p50,
                l.serial.p99,
                l.latency.p50 / l.serial.p50.max(1e-9)
            );
        }
    }

    fn print_rows(&self) {
        let width = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(0)
            .max(4);
        println!(
            "{:<width$}  {:>8}  {:>8}  {:>10}  {:>19}  {:>8}  {:>9}  {:>9}  {:>15}  {:>5}  mechanism / notes",
            "row",
            "events",
            "secs",
            "events/s",
            "vs ref (min-max)",
            "submit %",
            "cpu us/ev",
            "srv us/ev",
            "send p50/p99 us",
            "audit"
        );
        println!("{}", "-".repeat(width + 127));
        let spread = |s: Option<Spread>| {
            s.map_or_else(String::new, |s| {
                format!("{:.2}x ({:.2}-{:.2})", s.median, s.min, s.max)
            })
        };
        for r in &self.rows {
            let per_event = |secs: f64| format!("{:.2}", secs * 1e6 / r.events.max(1) as f64);
            let send = r
                .send
                .map_or_else(String::new, |l| format!("{:.1} / {:.1}", l.p50, l.p99));
            println!(
                "{:<width$}  {:>8}  {:>8.2}  {:>10.0}  {:>19}  {:>7.0}%  {:>9}  {:>9}  {:>15}  {:>5}  {}",
                r.name,
                r.events,
                r.secs,
                r.rate(),
                spread(r.vs_ref),
                100.0 * r.submit_secs / r.secs.max(1e-9),
                per_event(r.cpu.client),
                r.cpu.server.map_or_else(|| "-".into(), per_event),
                send,
                r.audit.as_ref().map_or("", Audit::label),
                r.mechanism.as_deref().unwrap_or("")
            );
        }
        println!(
            "target: every jetsink row >= 0.90x the reference with as many connections, audit ok"
        );
        if self
            .rows
            .iter()
            .any(|r| r.name.starts_with("jetsink spooled"))
        {
            println!("spooled rows (issue #12): >= 0.5x the reference with as many connections (stretch 0.8x); one sink with a local spool shared by the producers (one connection), each `send` returns once its event is fdatasync'd (group commit), every round audited");
        }
        println!("send p50/p99: time in `send` over every producer's sends of the median round (in memory: enqueueing; spooled: until the event is durable on disk)");
        println!("vs ref: jetsink rows to the reference with as many connections in the same round; reference rows to the 1-connection reference");
        println!("audit: the stream read back; every event stored once, each producer's in send order, at its receipt's sequence (lane receipts name none)");
        println!("mechanism: delivery mechanism of the producers' sinks at the end of the run, counted (health().mechanism; with per-event acks the ordering mode)");
        for reason in &self.reasons {
            println!("  why, {reason}");
        }
        for r in &self.rows {
            if let Some(Audit::Failed(why)) = &r.audit {
                println!("AUDIT FAIL {}: {why}", r.name);
            }
        }
    }

    /// The section as JSON.
    pub(super) fn to_json(&self) -> serde_json::Value {
        let spread = |s: Option<Spread>| {
            s.map(|s| serde_json::json!({ "median": s.median, "min": s.min, "max": s.max }))
        };
        let latency = |l: &Latency| serde_json::json!({ "p50": l.p50, "p99": l.p99, "p999": l.p999, "max": l.max });
        serde_json::json!({
            "title": self.title,
            "rows": self.rows.iter().map(|r| serde_json::json!({
                "name": r.name,
                "events": r.events,
                "secs": r.secs,
                "submit_secs": r.submit_secs,
                "rate": r.rate(),
                "cpu_secs": r.cpu.client,
                "server_cpu_secs": r.cpu.server,
                "vs_reference": spread(r.vs_ref),
                "audit": r.audit.as_ref().map(|a| match a {
                    Audit::Passed => serde_json::json!("ok"),
                    Audit::Failed(why) => serde_json::json!({ "failed": why }),
                }),
                "mechanism": r.mechanism,
                "send_latency_us": r.send.as_ref().map(latency),
            })).collect::<Vec<_>>(),
            "ordering_reasons": self.reasons,
            "low_rate": self.low_rate.as_ref().map(|l| serde_json::json!({
                "rate": l.rate,
                "secs": l.secs,
                "events": l.events,
                "failed": l.failed,
                "mechanism": l.mechanism,
                "send_to_receipt_us": latency(&l.latency),
                "serial_round_trip_us": latency(&l.serial),
                "serial_source": l.serial_source,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_evenly_with_the_remainder_first() {
        assert_eq!(shares(100_000, 16).collect::<Vec<_>>(), vec![6250; 16]);
        assert_eq!(shares(10, 4).collect::<Vec<_>>(), vec![3, 3, 2, 2]);
        assert_eq!(shares(10, 1).collect::<Vec<_>>(), vec![10]);
    }

    #[test]
    fn mechanisms_are_counted_in_first_seen_order() {
        let m = |v: &[&str]| count_mechanisms(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(m(&["chained"]), "chained x1");
        assert_eq!(
            m(&["chained", "per-key-serial", "per-key-serial", "chained"]),
            "chained x2 + per-key-serial x2"
        );
    }

    #[test]
    fn reasons_differing_only_in_a_quoted_id_read_the_same() {
        assert_eq!(
            without_quoted(r#"last message id is "ce1-ab", not this sink's"#),
            r#"last message id is "…", not this sink's"#
        );
        assert_eq!(without_quoted("no quotes"), "no quotes");
    }

    #[test]
    fn one_failed_round_fails_the_row() {
        let failed = Audit::Failed("x".into());
        assert_eq!(
            Audit::worst([Audit::Passed, failed.clone(), Audit::Passed].into_iter()),
            Some(failed)
        );
        assert_eq!(
            Audit::worst([Audit::Passed].into_iter()),
            Some(Audit::Passed)
        );
        assert_eq!(Audit::worst(std::iter::empty()), None);
    }

    #[test]
    fn producers_have_distinct_message_ids() {
        let a = producer_events(1, 0, 3);
        let b = producer_events(1, 1, 3);
        for (id, _) in &a {
            assert!(b.iter().all(|(other, _)| other != id), "{id} shared");
        }
    }

    #[test]
    fn producer_events_are_the_size_of_the_single_producer_rows() {
        let size = |event: &CloudEvent| {
            let (_, _, w) = wire(event, "bench.multi.1").expect("encodes");
            w.body.len()
        };
        let single = size(&super::super::make_event(1, 7));
        for p in [0, 15] {
            let (_, event) = &producer_events(1, p, 8)[7];
            assert_eq!(size(event), single);
        }
    }
}
