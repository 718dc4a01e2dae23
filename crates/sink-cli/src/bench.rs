//! `jetsink bench`: fire-and-forget, serial-ack, raw pipelined and jetsink delivery side by side.

use std::future::IntoFuture;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::StorageType};
use async_nats::HeaderMap;
use futures::stream::{FuturesUnordered, StreamExt};
use sink_nats::sink_core::encoding::{self, Encoding};
use sink_nats::sink_core::event::{CloudEvent, MsgId};
use sink_nats::{
    EmitError, OrderingKey, OrderingMode, Pending, SinkBuilder, SinkConfig, StreamPolicy, WhenFull,
};
use sink_testkit::{FaultProxy, ProxyMode};

/// Tenants the events are spread over (the per-key-serial row orders by tenant).
const TENANTS: usize = 16;
/// Pipelining window of the raw async-nats row.
const RAW_WINDOW: usize = 1024;

/// Arguments of `jetsink bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Events per measured round.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Events for the serial-ack row (one ack awaited at a time is slow; the rate is what counts).
    #[arg(long, default_value_t = 5_000)]
    pub serial_events: usize,
    /// Events of the warm-up round (not reported).
    #[arg(long, default_value_t = 20_000)]
    pub warmup_events: usize,
    /// Seconds of blackholed broker for the memory test (0 skips it).
    #[arg(long, default_value_t = 0)]
    pub outage_secs: u64,
    /// Queue bound (events) for the memory test.
    #[arg(long, default_value_t = 50_000)]
    pub outage_queue_events: usize,
    /// Queue bound (MiB) for the memory test.
    #[arg(long, default_value_t = 32)]
    pub outage_queue_mib: usize,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured row.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    events: usize,
    secs: f64,
    /// Whether the row is a jetsink mode (gets the ratio to serial).
    jetsink: bool,
    /// Seconds until the last publish (or `send`) returned; the rest is waiting for acks.
    /// Close to `secs` means the caller side is the limit, well below it the broker/ack path.
    submit_secs: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }
}

/// `send` latency percentiles over one run, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// RSS during the blackholed-broker test, in KiB.
#[derive(Debug, Clone)]
struct Memory {
    secs: u64,
    start_kib: u64,
    at_full_kib: Option<u64>,
    max_kib: u64,
    end_kib: u64,
    accepted: u64,
    rejected: u64,
    delivered_after: u64,
    not_delivered_after: usize,
}

impl Memory {
    /// Growth after the queue filled, as a fraction of the RSS at that moment.
    fn growth_after_full(&self) -> Option<f64> {
        self.at_full_kib
            .map(|full| (self.max_kib.saturating_sub(full)) as f64 / full.max(1) as f64)
    }

    fn flat(&self) -> bool {
        self.growth_after_full().is_some_and(|g| g <= 0.10)
    }
}

/// The pre-built events of one round: the CloudEvents, their subjects and message ids.
struct Batch {
    events: Vec<CloudEvent>,
}

/// The connection the raw rows publish on, and the base sink config.
struct Bench {
    client: async_nats::Client,
    js: jetstream::Context,
    base: SinkConfig,
    prefix: String,
    round: u64,
}

/// Runs the benchmark and prints one table (or JSON).
pub async fn run(args: BenchArgs, common: &crate::config::Common) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.serial_events > 0, "--serial-events must be at least 1");
    // Never the default URL: the benchmark creates and deletes streams on the server it is given.
    anyhow::ensure!(
        common.url.is_some() || common.config.is_some(),
        "bench needs --url (or NATS_URL): a server you run for it; `cargo xtask bench` starts one"
    );
    let base = common.sink_config()?;
    let url = base.servers.first().cloned().context("no server URL")?;
    // `--stream` names the prefix: each round creates `<prefix>_<ROW>_<n>` fresh and deletes it.
    let prefix = common.stream.clone().unwrap_or_else(|| "BENCH".to_owned());
    let client = sink_nats::connect_client(&base)
        .await
        .context("connecting to the server")?;
    let js = jetstream::new(client.clone());
    let mut bench = Bench {
        client,
        js,
        base,
        prefix,
        round: 0,
    };
    let progress = |s: &str| {
        if !args.json {
            eprintln!("bench: {s}");
        }
    };

    let n = args.events;
    if args.warmup_events > 0 {
        progress(&format!("warm-up ({} events)", args.warmup_events));
        bench.reference(args.warmup_events).await?;
        bench
            .jetsink(
                "warmup",
                args.warmup_events,
                OrderingMode::Chained,
                OrderingKey::Sink,
                1024,
                false,
            )
            .await?;
    }
    let mut rows = Vec::new();
    progress(&format!("(a) reference: fire-and-forget, {n} events"));
    rows.push(bench.reference(n).await?);
    progress(&format!("(b) serial ack, {} events", args.serial_events));
    rows.push(bench.serial(args.serial_events).await?);
    progress(&format!(
        "(c) raw pipelined window {RAW_WINDOW}, {n} events"
    ));
    rows.push(bench.raw_pipelined(n).await?);
    progress(&format!("(d) jetsink chained window 256, {n} events"));
    let (row, latency) = bench
        .jetsink(
            "jetsink chained w256",
            n,
            OrderingMode::Chained,
            OrderingKey::Sink,
            256,
            true,
        )
        .await?;
    rows.push(row);
    progress(&format!("(d) jetsink chained window 1024, {n} events"));
    let (row, latency_1024) = bench
        .jetsink(
            "jetsink chained w1024",
            n,
            OrderingMode::Chained,
            OrderingKey::Sink,
            1024,
            true,
        )
        .await?;
    rows.push(row);
    progress(&format!(
        "(e) jetsink per-key-serial, {TENANTS} tenants, {n} events"
    ));
    let (row, _) = bench
        .jetsink(
            &format!("jetsink per-key-serial x{TENANTS}"),
            n,
            OrderingMode::PerKeySerial,
            OrderingKey::Tenant,
            1024,
            false,
        )
        .await?;
    rows.push(row);
    progress(&format!("(f) jetsink unordered window 1024, {n} events"));
    let (row, _) = bench
        .jetsink(
            "jetsink unordered w1024",
            n,
            OrderingMode::Unordered,
            OrderingKey::Sink,
            1024,
            false,
        )
        .await?;
    rows.push(row);

    let memory = if args.outage_secs > 0 {
        progress(&format!("memory: {} s blackholed broker", args.outage_secs));
        Some(bench.outage(&args, &url).await?)
    } else {
        None
    };

    let latency = latency.or(latency_1024);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&rows, latency, memory.as_ref()))?
        );
    } else {
        print_table(&rows, latency, memory.as_ref());
    }
    Ok(ExitCode::SUCCESS)
}

impl Bench {
    /// A fresh file-storage stream for one round; returns its name and subject prefix.
    async fn fresh_stream(&mut self, row: &str) -> anyhow::Result<(String, String)> {
        self.round += 1;
        let name = format!(
            "{}_{}_{}",
            self.prefix,
            row.to_ascii_uppercase(),
            self.round
        );
        let subject = format!("bench.{}.{}", row.to_ascii_lowercase(), self.round);
        let _ = self.js.delete_stream(&name).await;
        let mut config = sink_nats::new_stream_config(&name, vec![format!("{subject}.>")]);
        config.storage = StorageType::File;
        config.max_age = Duration::ZERO;
        self.js
            .create_stream(config)
            .await
            .with_context(|| format!("creating stream {name}"))?;
        Ok((name, subject))
    }

    async fn drop_stream(&self, name: &str) {
        let _ = self.js.delete_stream(name).await;
    }

    /// (a) Core publishes with the sink's headers, nothing awaited; timed until the stream holds all.
    async fn reference(&mut self, n: usize) -> anyhow::Result<Row> {
        let (stream, subject) = self.fresh_stream("ref").await?;
        let batch = Batch::new(n, self.round);
        let start = Instant::now();
        for event in &batch.events {
            let (subj, headers, w) = wire(event, &subject)?;
            self.client
                .publish_with_headers(subj, headers, w.body)
                .await
                .context("core publish")?;
        }
        let submit_secs = start.elapsed().as_secs_f64();
        self.client.flush().await.context("flush")?;
        let mut handle = self.js.get_stream(&stream).await?;
        let deadline = start + Duration::from_secs(120);
        loop {
            let info = handle.info().await?;
            if info.state.messages >= n as u64 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "reference: stream holds {} of {n} after 120 s",
                info.state.messages
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        self.drop_stream(&stream).await;
        Ok(Row {
            name: "reference: fire-and-forget".into(),
            events: n,
            secs,
            jetsink: false,
            submit_secs,
        })
    }

    /// (b) JetStream publish, each ack awaited before the next publish.
    async fn serial(&mut self, n: usize) -> anyhow::Result<Row> {
        let (stream, subject) = self.fresh_stream("serial").await?;
        let batch = Batch::new(n, self.round);
        let start = Instant::now();
        for event in &batch.events {
            let (subj, headers, w) = wire(event, &subject)?;
            self.js
                .publish_with_headers(subj, headers, w.body)
                .await
                .context("publish")?
                .await
                .context("ack")?;
        }
        let secs = start.elapsed().as_secs_f64();
        let submit_secs = secs;
        self.drop_stream(&stream).await;
        Ok(Row {
            name: "serial ack".into(),
            events: n,
            secs,
            jetsink: false,
            submit_secs,
        })
    }

    /// (c) async-nats ack futures, at most `RAW_WINDOW` outstanding, all awaited.
    async fn raw_pipelined(&mut self, n: usize) -> anyhow::Result<Row> {
        let (stream, subject) = self.fresh_stream("raw").await?;
        let batch = Batch::new(n, self.round);
        let start = Instant::now();
        let mut acks: FuturesUnordered<
            <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture,
        > = FuturesUnordered::new();
        for event in &batch.events {
            if acks.len() >= RAW_WINDOW {
                if let Some(ack) = acks.next().await {
                    ack.context("ack")?;
                }
            }
            let (subj, headers, w) = wire(event, &subject)?;
            let ack = self
                .js
                .publish_with_headers(subj, headers, w.body)
                .await
                .context("publish")?;
            acks.push(ack.into_future());
        }
        let submit_secs = start.elapsed().as_secs_f64();
        while let Some(ack) = acks.next().await {
            ack.context("ack")?;
        }
        let secs = start.elapsed().as_secs_f64();
        self.drop_stream(&stream).await;
        Ok(Row {
            name: format!("raw pipelined w{RAW_WINDOW}"),
            events: n,
            secs,
            jetsink: false,
            submit_secs,
        })
    }

    /// (d-f) The sink in one mode; every event's receipt awaited. Measures `send` when asked.
    async fn jetsink(
        &mut self,
        name: &str,
        n: usize,
        mode: OrderingMode,
        key: OrderingKey,
        window: usize,
        measure_send: bool,
    ) -> anyhow::Result<(Row, Option<Latency>)> {
        let (stream, subject) = self.fresh_stream("sink").await?;
        let mut config = self.base.clone();
        config.stream = stream.clone();
        config.subject_template = format!("{subject}.{{tenantId}}");
        config.stream_policy = StreamPolicy::Verify;
        config.retention_floor = Duration::ZERO;
        config.ordering = mode;
        config.ordering_key = key;
        config.window = window;
        // Room for the whole round so `send` measures enqueueing, not waiting for the broker.
        config.max_events = n;
        config.max_bytes = n * 2048;
        config.when_full = WhenFull::Block {
            deadline: Duration::from_secs(60),
        };
        let sink = SinkBuilder::from_config(config)
            .connect()
            .await
            .context("connecting the sink")?;
        let batch = Batch::new(n, self.round);
        let mut pendings: Vec<Pending> = Vec::with_capacity(n);
        let mut nanos: Vec<u64> = Vec::with_capacity(if measure_send { n } else { 0 });
        let start = Instant::now();
        for event in batch.events {
            if measure_send {
                let t = Instant::now();
                let pending = sink.send(event).await?;
                nanos.push(t.elapsed().as_nanos() as u64);
                pendings.push(pending);
            } else {
                pendings.push(sink.send(event).await?);
            }
        }
        let submit_secs = start.elapsed().as_secs_f64();
        let mut failed: Option<EmitError> = None;
        for pending in pendings {
            if let Err(e) = pending.await {
                failed.get_or_insert(e);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let report = sink.close(Duration::from_secs(10)).await;
        self.drop_stream(&stream).await;
        if let Some(e) = failed {
            anyhow::bail!("{name}: an event failed: {e}");
        }
        anyhow::ensure!(
            report.complete(),
            "{name}: events left undelivered at close"
        );
        let latency = measure_send.then(|| percentiles(&mut nanos));
        Ok((
            Row {
                name: name.into(),
                events: n,
                secs,
                jetsink: true,
                submit_secs,
            },
            latency,
        ))
    }

    /// Blackholes a proxy in front of the server and keeps sending into a bounded queue,
    /// sampling RSS once a second.
    async fn outage(&mut self, args: &BenchArgs, url: &str) -> anyhow::Result<Memory> {
        let upstream = crate::demo::host_port(url)?;
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .context("starting the fault proxy")?;
        let (stream, subject) = self.fresh_stream("outage").await?;
        let mut config = self.base.clone();
        config.servers = vec![proxy.url()];
        config.stream = stream.clone();
        config.subject_template = format!("{subject}.{{tenantId}}");
        config.stream_policy = StreamPolicy::Verify;
        config.retention_floor = Duration::ZERO;
        config.max_events = args.outage_queue_events;
        config.max_bytes = args.outage_queue_mib * 1024 * 1024;
        config.when_full = WhenFull::Reject;
        let sink = SinkBuilder::from_config(config)
            .connect()
            .await
            .context("connecting the sink through the proxy")?;

        let start_kib = rss_kib()?;
        proxy.set_mode(ProxyMode::Blackhole(sink_testkit::Direction::Both));
        let outage_start = Instant::now();
        let secs = args.outage_secs;
        let end = Instant::now() + Duration::from_secs(secs);
        let mut next_sample = Instant::now() + Duration::from_secs(1);
        let (mut accepted, mut rejected) = (0u64, 0u64);
        let mut at_full_kib = None;
        let mut max_kib = start_kib;
        let mut i = 0u64;
        // Offer about 100k events/s: far more than the queue holds, so it stays full.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while Instant::now() < end {
            tick.tick().await;
            for _ in 0..1000 {
                let event = make_event(self.round, i);
                i += 1;
                match sink.try_send(event) {
                    Ok(pending) => {
                        accepted += 1;
                        drop(pending);
                    }
                    Err(EmitError::QueueFull { .. }) => {
                        rejected += 1;
                        if at_full_kib.is_none() {
                            at_full_kib = Some(rss_kib()?);
                        }
                    }
                    Err(e) => anyhow::bail!("outage: unexpected send error: {e}"),
                }
            }
            if Instant::now() >= next_sample {
                next_sample += Duration::from_secs(1);
                let kib = rss_kib()?;
                max_kib = max_kib.max(kib);
                if !args.json {
                    eprintln!(
                        "bench: outage t={:>3}s rss {:>7} KiB queued {:>6} accepted {accepted} rejected {rejected}",
                        outage_start.elapsed().as_secs(),
                        kib,
                        sink.health().queued
                    );
                }
            }
        }
        let end_kib = rss_kib()?;
        max_kib = max_kib.max(end_kib);
        proxy.set_mode(ProxyMode::PassThrough);
        let report = sink.close(Duration::from_secs(60)).await;
        self.drop_stream(&stream).await;
        Ok(Memory {
            secs,
            start_kib,
            at_full_kib,
            max_kib,
            end_kib,
            accepted,
            rejected,
            delivered_after: report.delivered,
            not_delivered_after: report.not_delivered.len(),
        })
    }
}

impl Batch {
    fn new(n: usize, round: u64) -> Batch {
        Batch {
            events: (0..n as u64).map(|i| make_event(round, i)).collect(),
        }
    }
}

/// A CloudEvent of about 430 bytes on the wire (structured JSON), tenant `i % 16`.
fn make_event(round: u64, i: u64) -> CloudEvent {
    let tenant = format!("tenant-{:02}", i % TENANTS as u64);
    CloudEvent::new(
        format!("bench-{}-{round}-{i:08}", std::process::id()),
        "/jetsink/bench/supervisor-0001",
        "io.cellos.cell.lifecycle.started.v1",
    )
    .with_time("2024-05-01T12:00:00.000Z")
    .with_subject(format!("cell/{i:08}"))
    .with_data_json(serde_json::json!({
        "tenantId": tenant,
        "cellId": format!("cell-{i:08}"),
        "image": "registry.example.com/team/service:1.24.3",
        "node": "node-07.eu-west-1.example.internal",
        "reason": "scheduled",
        "attempt": 1,
        "labels": { "app": "checkout", "tier": "web", "region": "eu-west-1" }
    }))
}

/// The subject, headers and body the sink would send for `event` (structured mode + msg id).
fn wire(event: &CloudEvent, subject: &str) -> anyhow::Result<(String, HeaderMap, encoding::Wire)> {
    let w = encoding::encode(event, Encoding::Structured)?;
    let mut headers = HeaderMap::new();
    for (k, v) in &w.headers {
        headers.insert(k.as_str(), v.as_str());
    }
    headers.insert("Nats-Msg-Id", MsgId::for_event(event).as_str());
    let tenant = event.tenant_id().unwrap_or("none");
    Ok((format!("{subject}.{tenant}"), headers, w))
}

fn percentiles(nanos: &mut [u64]) -> Latency {
    nanos.sort_unstable();
    let at = |q: f64| -> f64 {
        if nanos.is_empty() {
            return 0.0;
        }
        let i = ((nanos.len() as f64 * q).ceil() as usize).clamp(1, nanos.len()) - 1;
        nanos[i] as f64 / 1000.0
    };
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: at(1.0),
    }
}

/// This process's resident set size from `/proc/self/status`.
fn rss_kib() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line in /proc/self/status")
}

fn print_table(rows: &[Row], latency: Option<Latency>, memory: Option<&Memory>) {
    let reference = rows.first().map_or(1.0, Row::rate);
    let serial = rows
        .iter()
        .find(|r| r.name == "serial ack")
        .map_or(1.0, Row::rate);
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<width$}  {:>8}  {:>8}  {:>10}  {:>7}  {:>9}  {:>9}",
        "row", "events", "secs", "events/s", "vs ref", "vs serial", "submit %"
    );
    println!("{}", "-".repeat(width + 63));
    for r in rows {
        let vs_serial = if r.jetsink {
            format!("{:.1}x", r.rate() / serial)
        } else {
            String::new()
        };
        println!(
            "{:<width$}  {:>8}  {:>8.2}  {:>10.0}  {:>6.2}x  {:>9}  {:>8.0}%",
            r.name,
            r.events,
            r.secs,
            r.rate(),
            r.rate() / reference,
            vs_serial,
            100.0 * r.submit_secs / r.secs.max(1e-9)
        );
    }
    println!("targets: jetsink >= 0.90x reference, >= 8x serial");
    println!("submit %: share of the row's time until the last publish/send returned (the rest waits for acks)");
    if let Some(l) = latency {
        println!(
            "send (enqueue) latency, chained run: p50 {:.1} us  p99 {:.1} us  p999 {:.1} us  max {:.0} us  (target p99 <= 20 us)",
            l.p50, l.p99, l.p999, l.max
        );
    }
    if let Some(m) = memory {
        println!(
            "memory, {} s blackholed broker: rss start {} KiB, at queue full {}, max {} KiB, end {} KiB; growth after full {}: {}",
            m.secs,
            m.start_kib,
            m.at_full_kib.map_or_else(|| "never full".into(), |k| format!("{k} KiB")),
            m.max_kib,
            m.end_kib,
            m.growth_after_full().map_or_else(|| "n/a".into(), |g| format!("{:.1}%", g * 100.0)),
            if m.flat() { "flat" } else { "NOT flat" }
        );
        println!(
            "  accepted {} rejected {} (queue full); after the outage delivered {} and {} left undelivered at close",
            m.accepted, m.rejected, m.delivered_after, m.not_delivered_after
        );
    }
}

fn to_json(rows: &[Row], latency: Option<Latency>, memory: Option<&Memory>) -> serde_json::Value {
    let reference = rows.first().map_or(1.0, Row::rate);
    let serial = rows
        .iter()
        .find(|r| r.name == "serial ack")
        .map_or(1.0, Row::rate);
    serde_json::json!({
        "rows": rows.iter().map(|r| serde_json::json!({
            "name": r.name,
            "events": r.events,
            "secs": r.secs,
            "submit_secs": r.submit_secs,
            "rate": r.rate(),
            "vs_reference": r.rate() / reference,
            "vs_serial": if r.jetsink { Some(r.rate() / serial) } else { None },
        })).collect::<Vec<_>>(),
        "send_latency_us": latency.map(|l| serde_json::json!({
            "p50": l.p50, "p99": l.p99, "p999": l.p999, "max": l.max,
        })),
        "memory": memory.map(|m| serde_json::json!({
            "outage_secs": m.secs,
            "rss_start_kib": m.start_kib,
            "rss_at_queue_full_kib": m.at_full_kib,
            "rss_max_kib": m.max_kib,
            "rss_end_kib": m.end_kib,
            "growth_after_full": m.growth_after_full(),
            "flat": m.flat(),
            "accepted": m.accepted,
            "rejected": m.rejected,
            "delivered_after": m.delivered_after,
            "not_delivered_after": m.not_delivered_after,
        })),
    })
}
