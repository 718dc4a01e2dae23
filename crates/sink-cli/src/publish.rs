//! `jetsink publish`: CloudEvents from NDJSON (file or stdin) or generated, delivered through the
//! sink with pipelined sends, a progress bar, per-line error reports and a summary table.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use sink_core::event::{CloudEvent, EventError};
use sink_nats::{
    Batching, EmitError, Encoding, Health, JetStreamSink, Mechanism, OrderingKey, OrderingMode,
    SinkBuilder, Staged, StreamPolicy,
};
use tokio::sync::mpsc;

use crate::config::Common;
use crate::output::{duration, rate, thousands, Table};

/// Options of `publish`.
#[derive(Args, Debug)]
pub struct PublishArgs {
    /// NDJSON file with one CloudEvent (structured JSON) per line; `-` or none reads stdin
    #[arg(value_name = "FILE", conflicts_with = "generate")]
    pub file: Option<PathBuf>,
    /// Publish N synthetic events instead of reading input
    #[arg(long, value_name = "N")]
    pub generate: Option<u64>,
    /// Number of tenants the generated events are spread over
    #[arg(long, value_name = "K", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub tenants: u32,
    /// Also write the generated events as NDJSON to FILE (input for `audit --expect`)
    #[arg(long, value_name = "FILE", requires = "generate")]
    pub save: Option<PathBuf>,
    /// Stop at the first malformed or rejected line (events before it are still delivered)
    #[arg(long)]
    pub strict: bool,
    /// What to do with the stream at start
    #[arg(long, value_enum, default_value_t = PolicyArg::Verify)]
    pub stream_policy: PolicyArg,
    /// Publishes in flight [default: 1024]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub window: Option<u64>,
    /// How order is kept with per-event acks
    #[arg(long, value_enum, default_value_t = OrderingArg::Chained)]
    pub ordering: OrderingArg,
    /// Fast-batch lanes: auto (nats-server 2.14+ and a stream with allow_batched) or off
    #[arg(long, value_enum, default_value_t = BatchingArg::Auto)]
    pub batching: BatchingArg,
    /// Which events share an order
    #[arg(long, value_enum, default_value_t = KeyArg::Sink)]
    pub ordering_key: KeyArg,
    /// Most fast-batch lanes with a tenant or subject ordering key (1-64) [default: 4]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    pub lanes: Option<u64>,
    /// Wire encoding of the events
    #[arg(long, value_enum, default_value_t = EncodingArg::Structured)]
    pub encoding: EncodingArg,
    /// Seconds to wait at the end for events not yet confirmed
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub close_timeout: u64,
    /// Local spool directory: an event is accepted only once it is durable there (fdatasync),
    /// what an earlier process left there is delivered first, and what is not confirmed by the
    /// end stays there for the next start on DIR or `jetsink spool drain DIR`. The broker may be
    /// down at start: events are spooled and delivered when it is reachable
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// Most MiB the spool may hold; past it `send` waits (up to 30 s, then the event is rejected)
    #[arg(long, value_name = "N", requires = "spool", value_parser = clap::value_parser!(u64).range(1..))]
    pub spool_max_mib: Option<u64>,
}

/// `--stream-policy`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyArg {
    /// Do not look at the stream
    Off,
    /// The stream must exist and meet the requirements
    Verify,
    /// Create the stream when missing; verify it when present
    Create,
}

/// `--ordering`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderingArg {
    /// Pipelined, chained with Nats-Expected-Last-Msg-Id (falls back when not the only writer)
    Chained,
    /// One publish in flight per ordering key
    PerKeySerial,
    /// Pipelined without order under faults
    Unordered,
}

/// `--batching`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchingArg {
    /// Fast-batch lanes where the server and stream allow them, per-event acks elsewhere
    Auto,
    /// Always per-event acks
    Off,
}

/// `--ordering-key`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyArg {
    /// All events of this run
    Sink,
    /// Events of one tenant
    Tenant,
    /// Events of one subject
    Subject,
}

/// `--encoding`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingArg {
    /// The whole event as a JSON body (application/cloudevents+json)
    Structured,
    /// Data as the body, attributes as ce- headers
    Binary,
}

/// One line of input (or one generated event), parsed off the async runtime.
struct Item {
    label: String,
    event: Result<CloudEvent, String>,
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    invalid: AtomicU64,
    undelivered: AtomicU64,
}

impl Counts {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

enum Input {
    Lines {
        name: String,
        reader: Box<dyn Read + Send>,
    },
    Generated {
        count: u64,
        tenants: u32,
        save: Option<(PathBuf, BufWriter<File>)>,
    },
}

/// Runs `publish`.
pub async fn run(args: PublishArgs, common: &Common) -> anyhow::Result<ExitCode> {
    let mut config = common.sink_config()?;
    config.stream_policy = match args.stream_policy {
        PolicyArg::Off => StreamPolicy::Off,
        PolicyArg::Verify => StreamPolicy::Verify,
        PolicyArg::Create => StreamPolicy::Create,
    };
    config.ordering = match args.ordering {
        OrderingArg::Chained => OrderingMode::Chained,
        OrderingArg::PerKeySerial => OrderingMode::PerKeySerial,
        OrderingArg::Unordered => OrderingMode::Unordered,
    };
    config.encoding = match args.encoding {
        EncodingArg::Structured => Encoding::Structured,
        EncodingArg::Binary => Encoding::Binary,
    };
    config.batching = match args.batching {
        BatchingArg::Auto => Batching::Auto,
        BatchingArg::Off => Batching::Off,
    };
    config.ordering_key = match args.ordering_key {
        KeyArg::Sink => OrderingKey::Sink,
        KeyArg::Tenant => OrderingKey::Tenant,
        KeyArg::Subject => OrderingKey::Subject,
    };
    if let Some(lanes) = args.lanes {
        config.lanes = usize::try_from(lanes).context("--lanes is too large")?;
    }
    if let Some(window) = args.window {
        config.window = usize::try_from(window).context("--window is too large")?;
    }
    if let Some(dir) = &args.spool {
        config.spool = Some(dir.clone());
        if let Some(mib) = args.spool_max_mib {
            config.spool_max_bytes = mib
                .checked_mul(1024 * 1024)
                .context("--spool-max-mib is too large")?;
        }
        // With a spool an event is safe once it is on disk: a broker that is down at start does
        // not stop the run, the events wait in the spool.
        config.retry_initial_connect = true;
    }

    // Open the input before connecting: a missing file is a usage error, not a broker problem.
    let input = match (&args.generate, &args.file) {
        (Some(count), _) => {
            let save = match &args.save {
                Some(path) => {
                    let file = File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    Some((path.clone(), BufWriter::new(file)))
                }
                None => None,
            };
            Input::Generated {
                count: *count,
                tenants: args.tenants,
                save,
            }
        }
        (None, Some(path)) if path.as_os_str() != "-" => {
            let file =
                File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
            Input::Lines {
                name: path.display().to_string(),
                reader: Box::new(file),
            }
        }
        (None, _) => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading NDJSON CloudEvents from stdin (end with Ctrl-D)");
            }
            Input::Lines {
                name: "<stdin>".into(),
                reader: Box::new(std::io::stdin()),
            }
        }
    };
    let total = args.generate;

    let sink = SinkBuilder::from_config(config).connect().await?;
    // What an earlier process left in the spool (delivered first, not counted as sent).
    let spooled_at_start = sink.health().spool.map(|s| s.spool.records);

    let (item_tx, mut item_rx) = mpsc::channel::<Item>(1024);
    let reader = std::thread::spawn(move || produce(input, item_tx));

    let counts = Arc::new(Counts::default());
    let bar = progress_bar(total);
    let (pending_tx, pending_rx) = mpsc::unbounded_channel::<(String, Staged)>();
    let collector = tokio::spawn(collect(pending_rx, counts.clone(), bar.clone()));
    let started = Instant::now();
    let ticking = Arc::new(AtomicBool::new(true));
    let ticker = tokio::spawn(tick(
        bar.clone(),
        sink.clone(),
        counts.clone(),
        started,
        ticking.clone(),
    ));

    let mut stopped_at = None;
    while let Some(item) = item_rx.recv().await {
        let failure = match item.event {
            Err(problem) => {
                Counts::bump(&counts.invalid);
                Some(format!("{}: {problem}", item.label))
            }
            // Staged in input order; with a spool the collector waits for each event's
            // durability (shared fdatasyncs) while the next ones are staged.
            Ok(event) => match sink.stage(event).await {
                Ok(staged) => {
                    Counts::bump(&counts.sent);
                    // The collector outlives this loop, so the send cannot fail.
                    let _ = pending_tx.send((item.label, staged));
                    None
                }
                Err(e) => {
                    Counts::bump(&counts.rejected);
                    Some(format!("{}: {}: {e}", item.label, emit_field(&e)))
                }
            },
        };
        if let Some(line) = failure {
            bar.suspend(|| eprintln!("{line}"));
            if args.strict {
                stopped_at = Some(line);
                break;
            }
        }
    }
    drop(item_rx);

    let health = sink.health();
    let close = sink.close(Duration::from_secs(args.close_timeout)).await;
    // After close: what the spool still holds (events not confirmed, this run's or an earlier
    // one's), persisted for the next start on the directory.
    let spool_left = sink.health().spool.map(|s| s.spool.records);
    drop(pending_tx);
    // Every pending handle resolves once `close` has returned; the bound only guards a bug.
    if tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .is_err()
    {
        eprintln!("warning: some events had no outcome after close");
    }
    let elapsed = started.elapsed();
    ticking.store(false, Ordering::Relaxed);
    ticker.abort();
    bar.finish_and_clear();

    match reader.join() {
        Ok(Ok(())) => {}
        // A read error after the loop stopped on --strict is of no interest.
        Ok(Err(e)) if stopped_at.is_none() => return Err(e),
        Ok(Err(_)) => {}
        Err(_) => anyhow::bail!("the input reader thread panicked"),
    }

    let not_confirmed = close.not_delivered.len() as u64;
    let undelivered = Counts::get(&counts.undelivered).max(not_confirmed);
    let sent = Counts::get(&counts.sent);
    let delivered = Counts::get(&counts.delivered);
    let rejected = Counts::get(&counts.rejected);
    let invalid = Counts::get(&counts.invalid);
    let mut t = Table::new(["summary", "value"]);
    t.row(["sent".to_owned(), thousands(sent)]);
    t.row(["delivered".to_owned(), thousands(delivered)]);
    t.row([
        "duplicates".to_owned(),
        thousands(Counts::get(&counts.duplicates)),
    ]);
    t.row(["rejected".to_owned(), thousands(rejected)]);
    t.row(["invalid lines".to_owned(), thousands(invalid)]);
    t.row(["undelivered".to_owned(), thousands(undelivered)]);
    t.row(["elapsed".to_owned(), duration(elapsed)]);
    t.row(["rate".to_owned(), rate(delivered, elapsed)]);
    t.row(["delivery".to_owned(), delivery(&health)]);
    if let (Some(dir), Some(at_start), Some(left)) = (&args.spool, spooled_at_start, spool_left) {
        t.row([
            "spooled at start".to_owned(),
            format!(
                "{} records an earlier process left (delivered first; close marks included)",
                thousands(at_start)
            ),
        ]);
        t.row([
            "left in spool".to_owned(),
            if left == 0 {
                "0".to_owned()
            } else {
                format!(
                    "{} (in {}: delivered by the next start on it or `jetsink spool drain`)",
                    thousands(left),
                    dir.display()
                )
            },
        ]);
    }
    print!("{t}");
    if let Some(line) = &stopped_at {
        eprintln!("stopped at the first bad line (--strict): {line}");
    }
    for (event_id, msg_id, transmitted) in &close.not_delivered {
        eprintln!(
            "not confirmed before close: event {event_id} (msg id {msg_id}, transmitted: {transmitted})"
        );
    }
    let all_delivered = stopped_at.is_none()
        && rejected == 0
        && invalid == 0
        && undelivered == 0
        && delivered == sent
        && spool_left.unwrap_or(0) == 0;
    Ok(if all_delivered {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Reads (or generates) events on a plain thread and hands them over in order.
fn produce(input: Input, tx: mpsc::Sender<Item>) -> anyhow::Result<()> {
    match input {
        Input::Lines { name, reader } => {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            let mut line_no = 0u64;
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .with_context(|| format!("cannot read {name} after line {line_no}"))?;
                if n == 0 {
                    return Ok(());
                }
                line_no += 1;
                let label = format!("{name}:{line_no}");
                let event = match std::str::from_utf8(&buf) {
                    Err(e) => Err(format!(
                        "line: not UTF-8 at byte {}; NDJSON must be UTF-8",
                        e.valid_up_to()
                    )),
                    Ok(text) if text.trim().is_empty() => continue,
                    Ok(text) => CloudEvent::from_json_line(text.trim_end_matches(['\n', '\r']))
                        .map_err(|e| format!("{}: {e}", event_field(&e))),
                };
                if tx.blocking_send(Item { label, event }).is_err() {
                    return Ok(()); // the publisher stopped (--strict)
                }
            }
        }
        Input::Generated {
            count,
            tenants,
            mut save,
        } => {
            let run = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let source = format!("jetsink://generate/{run:x}");
            for i in 0..count {
                let event = generated_event(&source, i, tenants);
                if let Some((path, out)) = save.as_mut() {
                    writeln!(out, "{}", event.to_json_value())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                let item = Item {
                    label: format!("generated:{}", i + 1),
                    event: Ok(event),
                };
                if tx.blocking_send(item).is_err() {
                    break;
                }
            }
            if let Some((path, mut out)) = save {
                out.flush()
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// Synthetic event `i` of a run: tenants take turns, so each tenant's events interleave.
pub fn generated_event(source: &str, i: u64, tenants: u32) -> CloudEvent {
    let tenant = format!("tenant-{}", i % u64::from(tenants));
    CloudEvent::new(format!("evt-{i}"), source, "com.example.jetsink.generated")
        .with_datacontenttype("application/json")
        .with_data_json(serde_json::json!({
            "tenantId": tenant,
            "seq": i,
            "note": "synthetic event from jetsink publish --generate",
        }))
}

/// Awaits every pending outcome and counts it; broker rejections are reported with their line.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<(String, Staged)>,
    counts: Arc<Counts>,
    bar: ProgressBar,
) {
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = rx.recv(), if open => match next {
                Some((label, staged)) => pending.push(async move {
                    match staged.durable.await {
                        Ok(()) => (label, staged.pending.await),
                        Err(e) => (label, Err(e)),
                    }
                }),
                None => open = false,
            },
            Some((label, outcome)) = pending.next(), if !pending.is_empty() => match outcome {
                Ok(receipt) => {
                    Counts::bump(&counts.delivered);
                    if receipt.duplicate {
                        Counts::bump(&counts.duplicates);
                    }
                }
                Err(e @ (EmitError::Rejected { .. } | EmitError::Spool { .. })) => {
                    Counts::bump(&counts.rejected);
                    bar.suspend(|| eprintln!("{label}: {}: {e}", emit_field(&e)));
                }
                Err(_) => Counts::bump(&counts.undelivered),
            },
            else => break,
        }
    }
}

pub(crate) fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::new(n),
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        ),
        None => (
            ProgressBar::no_length(),
            "{spinner} [{elapsed_precise}] {pos} {msg}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

async fn tick(
    bar: ProgressBar,
    sink: JetStreamSink,
    counts: Arc<Counts>,
    started: Instant,
    running: Arc<AtomicBool>,
) {
    while running.load(Ordering::Relaxed) {
        let acked = Counts::get(&counts.delivered);
        let health = sink.health();
        bar.set_position(acked);
        let spooled = health
            .spool
            .map(|s| format!(" · spooled {}", s.spool.records))
            .unwrap_or_default();
        bar.set_message(format!(
            "acked · {} · retries {} · queued {} · in flight {}{spooled}",
            rate(acked, started.elapsed()),
            crate::RETRIES.load(Ordering::Relaxed),
            health.queued,
            health.in_flight,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The attribute an event error is about, for `file:line: <field>: <reason>` reports.
pub fn event_field(e: &EventError) -> String {
    match e {
        EventError::Json { .. } | EventError::NotAnObject { .. } => "json".into(),
        EventError::MissingAttribute { attribute }
        | EventError::EmptyAttribute { attribute }
        | EventError::EmptyOptionalAttribute { attribute } => (*attribute).into(),
        EventError::WrongType { attribute, .. }
        | EventError::ForbiddenCharacter { attribute, .. } => attribute.clone(),
        EventError::UnsupportedSpecVersion { .. } => "specversion".into(),
        EventError::InvalidExtensionName { name, .. }
        | EventError::ReservedExtensionName { name } => name.clone(),
        EventError::MalformedTime { .. } => "time".into(),
        EventError::InvalidDataContentType { .. } => "datacontenttype".into(),
        EventError::InvalidBase64 { .. } => "data_base64".into(),
        EventError::BothDataMembers | EventError::NullData | EventError::EmptyBinaryData => {
            "data".into()
        }
        _ => "event".into(),
    }
}

fn emit_field(e: &EmitError) -> String {
    match e {
        EmitError::InvalidEvent(inner) => event_field(inner),
        EmitError::Subject { .. } => "subject".into(),
        EmitError::Encode { .. } => "encoding".into(),
        EmitError::TooLarge { .. } => "size".into(),
        EmitError::Rejected { .. } => "broker".into(),
        _ => "delivery".into(),
    }
}

/// The mechanism in force, as the summary shows it.
fn delivery(health: &Health) -> String {
    match health.mechanism {
        Mechanism::FastBatch => format!("{} ({})", health.mechanism, plural(health.lanes, "lane")),
        _ => format!("{}, {}", health.mechanism, health.ordering),
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_errors_name_their_field() {
        for (line, field) in [
            ("{not json", "json"),
            ("[1]", "json"),
            (r#"{"specversion":"1.0","source":"/s","type":"t"}"#, "id"),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":7}"#,
                "type",
            ),
            (
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                "specversion",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#,
                "time",
            ),
        ] {
            let e = CloudEvent::from_json_line(line).expect_err(line);
            assert_eq!(event_field(&e), field, "{line}: {e}");
        }
    }

    #[test]
    fn generated_events_are_valid_and_spread_over_tenants() {
        let tenants: Vec<String> = (0..6)
            .map(|i| {
                let e = generated_event("jetsink://generate/t", i, 3);
                e.validate().expect("valid");
                e.tenant_id().expect("tenant").to_owned()
            })
            .collect();
        assert_eq!(
            tenants,
            ["tenant-0", "tenant-1", "tenant-2", "tenant-0", "tenant-1", "tenant-2"]
        );
    }
}
