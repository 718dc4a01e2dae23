//! `jetsink bench`: fire-and-forget, serial-ack, raw pipelined and jetsink delivery side by side.
//!
//! The single-producer table is here; the many-producer rows (single server and a 3-node
//! cluster), their audits and the low-rate latency are in [`producers`].

mod producers;
mod spool;

use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::StorageType};
use async_nats::HeaderMap;
use futures::stream::{FuturesUnordered, StreamExt};
use sink_nats::sink_core::encoding::{self, Encoding};
use sink_nats::sink_core::event::{CloudEvent, MsgId};
use sink_nats::{
    Batching, EmitError, OrderingKey, OrderingMode, Pending, SinkBuilder, SinkConfig, StreamPolicy,
    WhenFull,
};
use sink_testkit::{FaultProxy, ProxyMode, ServerVersion};

use self::producers::{Audit, Section};

/// The global allocator this binary was built with; jetsink row labels carry it, because a
/// service embedding `sink-nats` may not use ours (`cargo xtask bench --system-alloc` builds
/// without the `mimalloc` feature).
const ALLOCATOR: &str = if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system alloc"
};

/// Tenants the events are spread over (the per-key-serial row orders by tenant).
const TENANTS: usize = 16;
/// How long after the queue filled the memory test takes its baseline (longer than the default
/// ack timeout of 5 s plus the retry schedule).
const SETTLE: Duration = Duration::from_secs(10);
/// Pipelining window of the raw async-nats row.
const RAW_WINDOW: usize = 1024;
// The raw row is named after its window.
const _: () = assert!(RAW_WINDOW == 1024);

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
    /// Rounds of every row, interleaved; the table shows medians (at least 1).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Run only the jetsink rows whose name contains this (the reference rows always run):
    /// `producer` keeps the many-producer rows, `low rate` the latency run.
    #[arg(long)]
    pub only: Option<String>,
    /// Process id of the nats-server when it runs on this machine: adds its CPU use to each row.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Producer counts of the many-producer rows: that many sinks, each with its own connection,
    /// share `--events` into one stream, against as many fire-and-forget connections; each run is
    /// read back and audited (0 skips them).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub producers: Vec<usize>,
    /// Also run the many-producer rows and the low-rate latency on a 3-node cluster of this
    /// nats-server release (2.9, 2.12 or 2.15) with an R3 stream, started here.
    #[arg(long, value_parser = parse_version)]
    pub cluster: Option<ServerVersion>,
    /// Rounds of the cluster rows, interleaved like `--rounds` (default 1: three nodes share this
    /// machine's cores and a round is long; the table shows medians).
    #[arg(long, default_value_t = 1)]
    pub cluster_rounds: usize,
    /// Events per second of the low-rate latency run (send to receipt, beside the serial ack).
    #[arg(long, default_value_t = 100)]
    pub low_rate: u32,
    /// Seconds of the low-rate latency run (0 skips it).
    #[arg(long, default_value_t = 5)]
    pub low_rate_secs: u64,
    /// Only the spooling rate during an outage (disk only, no server needed): the local spool
    /// with 1 and 4 appenders against a raw preallocated log + fdatasync, `--events` per row,
    /// `--rounds` rounds
    #[arg(long)]
    pub spool_only: bool,
    /// Directory for --spool-only's files, on the disk a spool would use (default: a fresh one
    /// under the system temp directory, removed after)
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Payload bytes per event for --spool-only
    #[arg(long, default_value_t = 512)]
    pub spool_payload: usize,
    /// Segment size in MiB for --spool-only's spool rows (the spool's default is 64)
    #[arg(long, default_value_t = 64)]
    pub spool_segment_mib: u64,
    /// Also run spooled delivery beside the many-producer rows of the single server: 1 and 4
    /// producers sending through one sink with a local spool (every event fdatasync'd before its
    /// `send` returns), against the reference with as many connections in the same round, each
    /// run audited; the table shows every row's `send` latency (in `--spool-dir`)
    #[arg(long, conflicts_with = "spool_only")]
    pub spool: bool,
}

fn parse_version(s: &str) -> Result<ServerVersion, String> {
    match s {
        "2.9" | "2.9.10" => Ok(ServerVersion::V2_9),
        "2.12" | "2.12.8" => Ok(ServerVersion::V2_12),
        "2.15" | "2.15.1" => Ok(ServerVersion::V2_15),
        other => Err(format!(
            "unknown server version `{other}`; use 2.9, 2.12 or 2.15"
        )),
    }
}

/// One measured row.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    events: usize,
    secs: f64,
    /// Whether the row is a jetsink mode (gets the ratio to serial).
    jetsink: bool,
    /// Index in its round of the row its "vs ref" ratio divides by (0, the reference, in the
    /// single-producer table; the reference with as many connections in a many-producer table).
    base: usize,
    /// Seconds until the last publish (or `send`) returned; the rest is waiting for acks.
    /// Close to `secs` means the caller side is the limit, well below it the broker/ack path.
    submit_secs: f64,
    /// CPU used during the row.
    cpu: CpuUse,
    /// Median over the rounds of this row's rate divided by the reference's in the same round,
    /// and the lowest and highest such ratio (filled in by `summarize`).
    vs_ref: Option<Spread>,
    /// The same against the serial-ack row (jetsink rows only).
    vs_serial: Option<Spread>,
    /// Many-producer rows: what reading the stream back found (a failure in any round wins).
    audit: Option<Audit>,
    /// Many-producer rows: the delivery mechanism the producers' sinks ran, counted; a reference
    /// row's note (what the broker dropped).
    mechanism: Option<String>,
    /// Many-producer jetsink rows: `send` latency over every producer's sends of the round.
    send: Option<Latency>,
}

/// A median and its range over the rounds.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &mut [f64]) -> Option<Spread> {
        values.sort_by(f64::total_cmp);
        Some(Spread {
            median: median_sorted(values)?,
            min: *values.first()?,
            max: *values.last()?,
        })
    }
}

fn median_sorted(sorted: &[f64]) -> Option<f64> {
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

/// What one row of the table measures.
enum RowSpec {
    Reference,
    NoReply,
    Serial,
    Raw,
    Jetsink {
        name: String,
        mode: OrderingMode,
        key: OrderingKey,
        window: usize,
        measure_send: bool,
    },
}

impl RowSpec {
    fn name(&self) -> &str {
        match self {
            RowSpec::Reference => "reference: publish, ack dropped",
            RowSpec::NoReply => "core publish, no reply (info)",
            RowSpec::Serial => "serial ack",
            RowSpec::Raw => "raw pipelined w1024", // RAW_WINDOW
            RowSpec::Jetsink { name, .. } => name,
        }
    }
}

/// The rows in table order; `only` keeps the jetsink rows whose name contains it.
fn row_specs(only: Option<&str>) -> Vec<RowSpec> {
    let jetsink = |name: String, mode, key, window, measure_send| RowSpec::Jetsink {
        name,
        mode,
        key,
        window,
        measure_send,
    };
    let mut specs = vec![
        RowSpec::Reference,
        RowSpec::NoReply,
        RowSpec::Serial,
        RowSpec::Raw,
    ];
    specs.extend(
        [
            jetsink(
                "jetsink chained w1024 (default)".into(),
                OrderingMode::Chained,
                OrderingKey::Sink,
                1024,
                true,
            ),
            jetsink(
                "jetsink chained w256".into(),
                OrderingMode::Chained,
                OrderingKey::Sink,
                256,
                false,
            ),
            jetsink(
                format!("jetsink per-key-serial x{TENANTS}"),
                OrderingMode::PerKeySerial,
                OrderingKey::Tenant,
                1024,
                false,
            ),
            jetsink(
                "jetsink unordered w1024".into(),
                OrderingMode::Unordered,
                OrderingKey::Sink,
                1024,
                false,
            ),
        ]
        .into_iter()
        .filter(|s| only.is_none_or(|o| s.name().contains(o))),
    );
    specs
}

/// One row per spec: the median round by rate, with the paired ratios' spreads.
fn summarize(rounds: &[Vec<Row>]) -> Vec<Row> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    let serial_at = first.iter().position(|r| r.name == "serial ack");
    (0..first.len())
        .map(|i| {
            let mut of_row: Vec<&Row> = rounds.iter().map(|r| &r[i]).collect();
            let ratios = |base: usize| -> Option<Spread> {
                if base >= first.len() {
                    return None;
                }
                let mut v: Vec<f64> = rounds
                    .iter()
                    .map(|r| r[i].rate() / r[base].rate().max(1e-9))
                    .collect();
                Spread::of(&mut v)
            };
            let vs_ref = ratios(first[i].base);
            let vs_serial = if of_row[0].jetsink {
                serial_at.and_then(ratios)
            } else {
                None
            };
            of_row.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            let mut row = of_row[(of_row.len() - 1) / 2].clone();
            row.vs_ref = vs_ref;
            row.vs_serial = vs_serial;
            row.audit = Audit::worst(rounds.iter().filter_map(|r| r[i].audit.clone()));
            let mut mechanisms: Vec<String> = Vec::new();
            for m in rounds.iter().filter_map(|r| r[i].mechanism.clone()) {
                if !mechanisms.contains(&m) {
                    mechanisms.push(m);
                }
            }
            row.mechanism = (!mechanisms.is_empty()).then(|| mechanisms.join(" / "));
            row
        })
        .collect()
}

/// The round with the median p99 (send latency is measured on the default chained row).
fn median_latency(latencies: &mut [Latency]) -> Option<Latency> {
    latencies.sort_by(|a, b| a.p99.total_cmp(&b.p99));
    latencies.get(latencies.len().checked_sub(1)? / 2).copied()
}

impl Row {
    fn new(
        name: impl Into<String>,
        events: usize,
        secs: f64,
        submit_secs: f64,
        cpu: CpuUse,
        jetsink: bool,
    ) -> Row {
        Row {
            name: name.into(),
            events,
            secs,
            jetsink,
            base: 0,
            submit_secs,
            cpu,
            vs_ref: None,
            vs_serial: None,
            audit: None,
            mechanism: None,
            send: None,
        }
    }

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
    /// RSS one settle period after the queue filled: the first ack timeout and its re-sends have
    /// happened, every bounded buffer holds what it will hold.
    settled_kib: Option<u64>,
    /// Highest RSS sampled from then on.
    max_kib: u64,
    end_kib: u64,
    accepted: u64,
    rejected: u64,
    delivered_after: u64,
    not_delivered_after: usize,
}

impl Memory {
    /// Growth after settling, as a fraction of the settled RSS.
    fn growth_after_full(&self) -> Option<f64> {
        self.settled_kib
            .map(|base| (self.max_kib.saturating_sub(base)) as f64 / base.max(1) as f64)
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
    /// The servers' process ids, when they run on this machine (for the CPU column).
    server_pids: Vec<u32>,
    /// Client URLs of the servers; producer `p` of a many-producer row connects to `p % len`.
    urls: Vec<String>,
    /// Replicas of every stream the bench creates (3 on the cluster).
    replicas: usize,
    /// The server takes fast-batch publishes (2.14+): the streams of the many-producer and
    /// low-rate rows get `allow_batched`, so a sink there may run lanes.
    batched: bool,
}

/// Runs the benchmark and prints one table (or JSON).
pub async fn run(args: BenchArgs, common: &crate::config::Common) -> anyhow::Result<ExitCode> {
    if args.spool_only {
        return spool::run(&args).await;
    }
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.serial_events > 0, "--serial-events must be at least 1");
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
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
    let batched = producers::takes_fast_batch(&client);
    let urls = base.servers.clone();
    let mut bench = Bench {
        client,
        js,
        base,
        prefix,
        round: 0,
        server_pids: args.server_pid.into_iter().collect(),
        urls,
        replicas: 1,
        batched,
    };
    let progress = |s: &str| {
        if !args.json {
            eprintln!("bench: {s}");
        }
    };

    let n = args.events;
    if args.warmup_events > 0 {
        progress(&format!("warm-up ({} events)", args.warmup_events));
        bench.fire_and_forget(args.warmup_events, true).await?;
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
    // The memory test runs before the throughput rounds: they push a few hundred MB through the
    // allocator, which keeps part of it and re-commits it later, so an RSS measured after them
    // climbs back towards their peak whatever the sink does.
    let memory = if args.outage_secs > 0 {
        progress(&format!("memory: {} s blackholed broker", args.outage_secs));
        Some(bench.outage(&args, &url).await?)
    } else {
        None
    };
    let specs = row_specs(args.only.as_deref());
    // Rounds interleave the rows, so a slow spell of the machine hits every row alike; each
    // row reports its median round, and its ratio is the median of the per-round ratios.
    let mut rounds: Vec<Vec<Row>> = Vec::new();
    let mut latencies = Vec::new();
    let mut serial_nanos = Vec::new();
    for round in 1..=args.rounds {
        let mut rows = Vec::with_capacity(specs.len());
        for spec in &specs {
            let events = match spec {
                RowSpec::Serial => args.serial_events,
                _ => n,
            };
            progress(&format!(
                "round {round}/{}: {}, {events} events",
                args.rounds,
                spec.name()
            ));
            let row = match spec {
                RowSpec::Reference => bench.fire_and_forget(events, true).await?,
                RowSpec::NoReply => bench.fire_and_forget(events, false).await?,
                RowSpec::Serial => {
                    let (row, nanos) = bench.serial(events).await?;
                    serial_nanos.extend(nanos);
                    row
                }
                RowSpec::Raw => bench.raw_pipelined(events).await?,
                RowSpec::Jetsink {
                    name,
                    mode,
                    key,
                    window,
                    measure_send,
                } => {
                    let (row, latency) = bench
                        .jetsink(name, events, *mode, *key, *window, *measure_send)
                        .await?;
                    latencies.extend(latency);
                    row
                }
            };
            rows.push(row);
        }
        rounds.push(rows);
    }
    let rows = summarize(&rounds);
    let latency = median_latency(&mut latencies);
    let serial_rtt = percentiles(&mut serial_nanos);

    let mut sections: Vec<Section> = Vec::new();
    let title = format!(
        "{} producers into one stream, nats-server {} (single node, R1), {} round(s)",
        args.producers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        bench.client.server_info().version,
        args.rounds
    );
    let mut single =
        producers::section(&mut bench, &args, args.rounds, title, args.spool, &progress).await?;
    single.low_rate = producers::low_rate(
        &mut bench,
        &args,
        serial_rtt,
        "serial-ack rows of this run",
        &progress,
    )
    .await?;
    sections.push(single);
    // A cluster that cannot be started or fails mid-way must not cost the rows measured so far.
    let mut cluster_error = None;
    if let Some(version) = args.cluster {
        match producers::cluster(&bench, &args, version, &progress).await {
            Ok(section) => sections.push(section),
            Err(e) => cluster_error = Some(format!("{e:#}")),
        }
    }

    if args.json {
        let mut json = to_json(&rows, latency, memory.as_ref());
        json["allocator"] = ALLOCATOR.into();
        json["sections"] = sections.iter().map(Section::to_json).collect();
        json["cluster_error"] = cluster_error.clone().into();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_table(&rows, latency, memory.as_ref());
        for section in &sections {
            section.print();
        }
        if let Some(e) = &cluster_error {
            println!("\ncluster rows FAILED: {e}");
        }
    }
    let failed: Vec<&str> = sections.iter().flat_map(Section::failed_rows).collect();
    if !failed.is_empty() {
        eprintln!(
            "bench: AUDIT FAILED for {}: events lost, duplicated or out of order (see above)",
            failed.join(", ")
        );
    }
    if let Some(e) = &cluster_error {
        eprintln!("bench: FAILED: the cluster rows: {e}");
    }
    if failed.is_empty() && cluster_error.is_none() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

impl Bench {
    /// A fresh file-storage stream for one round, with [`Bench::replicas`] replicas and, when
    /// `batched` and the server takes fast-batch publishes, `allow_batched`; returns its name and
    /// subject prefix.
    async fn fresh_stream(&mut self, row: &str, batched: bool) -> anyhow::Result<(String, String)> {
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
        config.num_replicas = self.replicas;
        producers::create_stream(&self.js, config, batched && self.batched)
            .await
            .with_context(|| format!("creating stream {name}"))?;
        Ok((name, subject))
    }

    async fn drop_stream(&self, name: &str) {
        let _ = self.js.delete_stream(name).await;
    }

    /// (a) The reference, the seed's way: JetStream publishes whose ack futures are dropped (the
    /// server still answers each one; nobody waits), timed until the stream holds all N.
    /// With `reply` false, (a') core publishes without a reply subject: the server sends no acks at
    /// all. Not a target, shown to tell what the acks themselves cost the server and the client.
    async fn fire_and_forget(&mut self, n: usize, reply: bool) -> anyhow::Result<Row> {
        let (stream, subject) = self
            .fresh_stream(if reply { "ref" } else { "noreply" }, false)
            .await?;
        let batch = Batch::new(n, self.round);
        let cpu = Cpu::start(&self.server_pids);
        let start = Instant::now();
        for event in &batch.events {
            let (subj, headers, w) = wire(event, &subject)?;
            if reply {
                drop(
                    self.js
                        .publish_with_headers(subj, headers, w.body)
                        .await
                        .context("publish")?,
                );
            } else {
                self.client
                    .publish_with_headers(subj, headers, w.body)
                    .await
                    .context("core publish")?;
            }
        }
        let submit_secs = start.elapsed().as_secs_f64();
        self.await_stored(&stream, n, start).await?;
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu.stop();
        self.drop_stream(&stream).await;
        let name = if reply {
            RowSpec::Reference.name()
        } else {
            RowSpec::NoReply.name()
        };
        Ok(Row::new(name, n, secs, submit_secs, cpu, false))
    }

    /// Flushes the client and waits until `stream` holds `n` messages (at most 120 s after `start`).
    async fn await_stored(&self, stream: &str, n: usize, start: Instant) -> anyhow::Result<()> {
        self.client.flush().await.context("flush")?;
        let mut handle = self.js.get_stream(stream).await?;
        let deadline = start + Duration::from_secs(120);
        loop {
            let info = handle.info().await?;
            if info.state.messages >= n as u64 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{stream}: stream holds {} of {n} after 120 s",
                info.state.messages
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// (b) JetStream publish, each ack awaited before the next publish. Also returns each
    /// publish's round trip (publish to ack) in nanoseconds: what the low-rate latency of the sink
    /// is held against.
    async fn serial(&mut self, n: usize) -> anyhow::Result<(Row, Vec<u64>)> {
        let (stream, subject) = self.fresh_stream("serial", false).await?;
        let batch = Batch::new(n, self.round);
        let mut nanos = Vec::with_capacity(n);
        let cpu = Cpu::start(&self.server_pids);
        let start = Instant::now();
        for event in &batch.events {
            let (subj, headers, w) = wire(event, &subject)?;
            let t = Instant::now();
            self.js
                .publish_with_headers(subj, headers, w.body)
                .await
                .context("publish")?
                .await
                .context("ack")?;
            nanos.push(t.elapsed().as_nanos() as u64);
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu.stop();
        let submit_secs = secs;
        self.drop_stream(&stream).await;
        let row = Row::new(RowSpec::Serial.name(), n, secs, submit_secs, cpu, false);
        Ok((row, nanos))
    }

    /// (c) async-nats ack futures, at most `RAW_WINDOW` outstanding, all awaited.
    async fn raw_pipelined(&mut self, n: usize) -> anyhow::Result<Row> {
        let (stream, subject) = self.fresh_stream("raw", false).await?;
        let batch = Batch::new(n, self.round);
        let cpu = Cpu::start(&self.server_pids);
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
        let cpu = cpu.stop();
        self.drop_stream(&stream).await;
        Ok(Row::new(
            RowSpec::Raw.name(),
            n,
            secs,
            submit_secs,
            cpu,
            false,
        ))
    }

    /// (d-f) The sink in one mode; every event's receipt awaited. Measures `send` when asked.
    /// Per-event acks (`Batching::Off`): the mode named is the mode measured.
    async fn jetsink(
        &mut self,
        name: &str,
        n: usize,
        mode: OrderingMode,
        key: OrderingKey,
        window: usize,
        measure_send: bool,
    ) -> anyhow::Result<(Row, Option<Latency>)> {
        // The stream allows batches where the server has them (no advice to print), and
        // `Batching::Off` below keeps the row per-event.
        let (stream, subject) = self.fresh_stream("sink", true).await?;
        let mut config = self.base.clone();
        config.stream = stream.clone();
        config.subject_template = format!("{subject}.{{tenantId}}");
        config.stream_policy = StreamPolicy::Verify;
        config.retention_floor = Duration::ZERO;
        config.ordering = mode;
        config.ordering_key = key;
        // These rows measure the named ordering mode with per-event acks (lanes are the
        // many-producer rows' business).
        config.batching = Batching::Off;
        config.window = window;
        // Room for the whole round so `send` measures enqueueing, not waiting for the broker.
        config.max_events = n.max(window);
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
        let cpu = Cpu::start(&self.server_pids);
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
        let cpu = cpu.stop();
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
        let name = format!("{name} [{ALLOCATOR}]");
        Ok((Row::new(name, n, secs, submit_secs, cpu, true), latency))
    }

    /// Blackholes a proxy in front of the server and keeps sending into a bounded queue,
    /// sampling RSS once a second.
    async fn outage(&mut self, args: &BenchArgs, url: &str) -> anyhow::Result<Memory> {
        let upstream = crate::demo::host_port(url)?;
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .context("starting the fault proxy")?;
        let (stream, subject) = self.fresh_stream("outage", true).await?;
        let mut config = self.base.clone();
        config.servers = vec![proxy.url()];
        config.stream = stream.clone();
        config.subject_template = format!("{subject}.{{tenantId}}");
        config.stream_policy = StreamPolicy::Verify;
        config.retention_floor = Duration::ZERO;
        config.batching = Batching::Off; // the same mechanism as the main rows
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
        // What must stay flat is the RSS once the queue is full and the first ack timeout and its
        // re-sends are behind (SETTLE after full): before that the queue is filling, the first
        // re-sends are being buffered, and the allocator may still hold memory freed by the rows
        // before.
        let mut full_at: Option<Instant> = None;
        let mut settled_kib: Option<u64> = None;
        let mut max_kib = 0;
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
                            full_at = Some(Instant::now());
                        }
                    }
                    Err(e) => anyhow::bail!("outage: unexpected send error: {e}"),
                }
            }
            if Instant::now() >= next_sample {
                next_sample += Duration::from_secs(1);
                let kib = rss_kib()?;
                if settled_kib.is_none() && full_at.is_some_and(|t| t.elapsed() >= SETTLE) {
                    settled_kib = Some(kib);
                }
                if settled_kib.is_some() {
                    max_kib = max_kib.max(kib);
                }
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
        if settled_kib.is_some() {
            max_kib = max_kib.max(end_kib);
        }
        proxy.set_mode(ProxyMode::PassThrough);
        let report = sink.close(Duration::from_secs(60)).await;
        self.drop_stream(&stream).await;
        Ok(Memory {
            secs,
            start_kib,
            at_full_kib,
            settled_kib,
            max_kib,
            end_kib,
            accepted,
            rejected,
            delivered_after: report.delivered,
            not_delivered_after: report.not_delivered.len(),
        })
    }
}

/// CPU seconds (user + system) of this process and of the server during one row.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    client: f64,
    server: Option<f64>,
}

/// A CPU measurement in progress.
struct Cpu {
    server_pids: Vec<u32>,
    client: Option<f64>,
    server: Option<f64>,
}

impl Cpu {
    fn start(server_pids: &[u32]) -> Cpu {
        Cpu {
            server_pids: server_pids.to_vec(),
            client: cpu_secs("self"),
            server: servers_cpu_secs(server_pids),
        }
    }

    fn stop(self) -> CpuUse {
        let since = |before: Option<f64>, now: Option<f64>| Some(now? - before?);
        CpuUse {
            client: since(self.client, cpu_secs("self")).unwrap_or(0.0),
            server: since(self.server, servers_cpu_secs(&self.server_pids)),
        }
    }
}

/// CPU seconds of all `pids` together (a cluster's nodes); `None` without pids or if one is gone.
fn servers_cpu_secs(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_secs(&p.to_string())).sum()
}

/// User + system CPU seconds of `/proc/<pid>` (clock ticks of 1/100 s, Linux's fixed `USER_HZ`).
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, which may itself hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
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
    make_event_of(round, 1, i)
}

/// Event `i` of `round` from supervisor `source` (each producer of a many-producer row has its
/// own source, so no two share a message id).
fn make_event_of(round: u64, source: usize, i: u64) -> CloudEvent {
    let tenant = format!("tenant-{:02}", i % TENANTS as u64);
    CloudEvent::new(
        format!("bench-{}-{round}-{i:08}", std::process::id()),
        format!("/jetsink/bench/supervisor-{source:04}"),
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
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<width$}  {:>8}  {:>8}  {:>10}  {:>19}  {:>20}  {:>8}  {:>9}  {:>9}",
        "row",
        "events",
        "secs",
        "events/s",
        "vs ref (min-max)",
        "vs serial (min-max)",
        "submit %",
        "cpu us/ev",
        "srv us/ev"
    );
    println!("{}", "-".repeat(width + 112));
    let spread = |s: Option<Spread>, digits: usize| {
        s.map_or_else(String::new, |s| {
            format!(
                "{:.digits$}x ({:.digits$}-{:.digits$})",
                s.median, s.min, s.max
            )
        })
    };
    for r in rows {
        let per_event = |secs: f64| format!("{:.2}", secs * 1e6 / r.events.max(1) as f64);
        println!(
            "{:<width$}  {:>8}  {:>8.2}  {:>10.0}  {:>19}  {:>20}  {:>7.0}%  {:>9}  {:>9}",
            r.name,
            r.events,
            r.secs,
            r.rate(),
            spread(r.vs_ref, 2),
            spread(r.vs_serial, 1),
            100.0 * r.submit_secs / r.secs.max(1e-9),
            per_event(r.cpu.client),
            r.cpu.server.map_or_else(|| "-".into(), per_event)
        );
    }
    println!(
        "targets: jetsink >= 0.90x reference, >= 8x serial; allocator of this build: {ALLOCATOR}"
    );
    println!("each row is its median round; ratios are medians of per-round ratios (same round, same server)");
    println!("submit %: share of the row's time until the last publish/send returned (the rest waits for acks)");
    println!("cpu / srv us/ev: CPU time of this process / of the server per event during the row (10 ms ticks)");
    if let Some(l) = latency {
        println!(
            "send (enqueue) latency, default chained run: p50 {:.1} us  p99 {:.1} us  p999 {:.1} us  max {:.0} us  (target p99 <= 20 us)",
            l.p50, l.p99, l.p999, l.max
        );
    }
    if let Some(m) = memory {
        println!(
            "memory, {} s blackholed broker: rss start {} KiB, at queue full {}, {} s later {}, max after {} KiB, end {} KiB; growth after that {}: {}",
            m.secs,
            m.start_kib,
            m.at_full_kib.map_or_else(|| "never full".into(), |k| format!("{k} KiB")),
            SETTLE.as_secs(),
            m.settled_kib.map_or_else(|| "not reached".into(), |k| format!("{k} KiB")),
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
    let spread = |s: Option<Spread>| {
        s.map(|s| serde_json::json!({ "median": s.median, "min": s.min, "max": s.max }))
    };
    serde_json::json!({
        "rows": rows.iter().map(|r| serde_json::json!({
            "name": r.name,
            "events": r.events,
            "secs": r.secs,
            "submit_secs": r.submit_secs,
            "rate": r.rate(),
            "cpu_secs": r.cpu.client,
            "server_cpu_secs": r.cpu.server,
            "vs_reference": spread(r.vs_ref),
            "vs_serial": spread(r.vs_serial),
        })).collect::<Vec<_>>(),
        "send_latency_us": latency.map(|l| serde_json::json!({
            "p50": l.p50, "p99": l.p99, "p999": l.p999, "max": l.max,
        })),
        "memory": memory.map(|m| serde_json::json!({
            "outage_secs": m.secs,
            "rss_start_kib": m.start_kib,
            "rss_at_queue_full_kib": m.at_full_kib,
            "rss_settled_kib": m.settled_kib,
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
