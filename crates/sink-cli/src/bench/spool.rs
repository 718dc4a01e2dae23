//! `jetsink bench --spool-only`: the spooling rate during an outage (disk only, no broker) against a raw preallocated log with fdatasync, measured in the same run.
//!
//! The raw rows write the records the spool would write (28-byte header with CRC32C, the
//! payload) into a file preallocated with zeros before the clock starts, one `pwrite` and one
//! `fdatasync` per group. The spool rows go through [`DiskSpool`] into a fresh directory: the
//! clock starts after the open (which prepares the first segment) and covers everything an
//! outage would pay, including preparing every further segment (64 MiB of zeros each) on the
//! IO thread. Each appender keeps a fixed number of appends in flight ([`DiskSpool::submit`],
//! then the durability future), which is what bounds a group commit's size.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use sink_nats::sink_core::spool::record::RECORD_HEADER_LEN;
use sink_nats::sink_core::spool::{crc32c, crc32c_append};
use sink_nats::spool::{DiskSpool, SpoolConfig};

use super::{BenchArgs, Spread};
use crate::output::{thousands, Table};

/// What one row measures.
#[derive(Debug, Clone, Copy)]
enum Spec {
    /// One pwrite + fdatasync per `group` records into a file preallocated with zeros, or (not
    /// `zeroed`) only sized with `set_len` (sparse: every sync also commits block allocation).
    Raw { group: usize, zeroed: bool },
    /// `appenders` tasks, each with `in_flight` appends outstanding.
    Spool { appenders: usize, in_flight: usize },
}

impl Spec {
    fn name(self) -> String {
        match self {
            Spec::Raw {
                group,
                zeroed: true,
            } => format!("raw log + fdatasync, {group}/group"),
            Spec::Raw {
                group,
                zeroed: false,
            } => format!("raw log, sparse file, {group}/group (info)"),
            Spec::Spool {
                appenders,
                in_flight,
            } => format!(
                "spool, {appenders} appender{} x {in_flight} in flight",
                if appenders == 1 { "" } else { "s" }
            ),
        }
    }

    /// The raw row with the same number of records per sync at most.
    fn baseline(self) -> Option<usize> {
        match self {
            Spec::Raw { .. } => None,
            Spec::Spool {
                appenders,
                in_flight,
            } => Some(appenders * in_flight),
        }
    }
}

const SPECS: [Spec; 9] = [
    Spec::Raw {
        group: 64,
        zeroed: true,
    },
    Spec::Raw {
        group: 512,
        zeroed: true,
    },
    Spec::Raw {
        group: 64,
        zeroed: false,
    },
    Spec::Raw {
        group: 512,
        zeroed: false,
    },
    Spec::Spool {
        appenders: 1,
        in_flight: 1,
    },
    Spec::Spool {
        appenders: 1,
        in_flight: 64,
    },
    Spec::Spool {
        appenders: 1,
        in_flight: 512,
    },
    Spec::Spool {
        appenders: 4,
        in_flight: 16,
    },
    Spec::Spool {
        appenders: 4,
        in_flight: 128,
    },
];

/// The one-in-flight row is bounded by fdatasync latency: fewer events keep it short.
const ONE_IN_FLIGHT_EVENTS: usize = 5_000;

/// One measured run of a row.
#[derive(Debug, Clone, Copy)]
struct Run {
    events: usize,
    secs: f64,
    /// Group commits (spool) or fdatasyncs (raw).
    commits: u64,
    /// Bytes written, preallocation included for the spool.
    written: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

/// Runs the spool-only rows and prints them.
pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(args.spool_payload > 0, "--spool-payload must be at least 1");
    anyhow::ensure!(
        args.spool_segment_mib > 0 && args.spool_segment_mib < 4096,
        "--spool-segment-mib must be 1..=4095"
    );
    anyhow::ensure!(
        ((RECORD_HEADER_LEN + args.spool_payload + 64) as u64) <= args.spool_segment_mib << 20,
        "--spool-payload does not fit a segment of --spool-segment-mib"
    );
    let base = match &args.spool_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("jetsink-bench-spool-{}", std::process::id())),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let payload = Bytes::from(
        (0..args.spool_payload)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); SPECS.len()];
    let result = async {
        for round in 0..args.rounds {
            for (i, spec) in SPECS.iter().enumerate() {
                let events = match spec {
                    Spec::Spool { in_flight: 1, .. } => args.events.min(ONE_IN_FLIGHT_EVENTS),
                    _ => args.events,
                };
                if !args.json {
                    eprintln!(
                        "bench: round {}/{}: {} ({events} events)",
                        round + 1,
                        args.rounds,
                        spec.name()
                    );
                }
                let dir = base.join(format!("row{i}"));
                let run = match *spec {
                    Spec::Raw { group, zeroed } => {
                        let payload = payload.clone();
                        let dir = dir.clone();
                        tokio::task::spawn_blocking(move || {
                            raw_log(&dir, events, group, zeroed, &payload)
                        })
                        .await??
                    }
                    Spec::Spool {
                        appenders,
                        in_flight,
                    } => {
                        let shape = Shape {
                            appenders,
                            in_flight,
                            segment_size: args.spool_segment_mib << 20,
                        };
                        spool(&dir, events, shape, &payload).await?
                    }
                };
                let _ = std::fs::remove_dir_all(&dir);
                runs[i].push(run);
            }
        }
        anyhow::Ok(())
    }
    .await;
    if args.spool_dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    result?;
    report(args, &base, &runs)?;
    Ok(ExitCode::SUCCESS)
}

/// The raw baseline: records encoded as the spool encodes them, `group` per pwrite + fdatasync,
/// into a file preallocated with zeros, or only sized (both before the clock starts).
fn raw_log(
    dir: &Path,
    events: usize,
    group: usize,
    zeroed: bool,
    payload: &[u8],
) -> anyhow::Result<Run> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("raw.log");
    let record = RECORD_HEADER_LEN + payload.len();
    let size = (record * events) as u64;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    if !zeroed {
        file.set_len(size)?;
        at = size;
    }
    while at < size {
        let n = (size - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;

    let started = Instant::now();
    let mut buf = Vec::with_capacity(record * group);
    let (mut offset, mut seq, mut syncs) = (0u64, 0u64, 0u64);
    let mut left = events;
    while left > 0 {
        buf.clear();
        for _ in 0..group.min(left) {
            seq += 1;
            let mut header = [0u8; RECORD_HEADER_LEN];
            header[4] = 0xA7;
            header[5] = 1;
            header[6] = 1;
            header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            header[12..20].copy_from_slice(&seq.to_le_bytes());
            let crc = crc32c_append(crc32c(&header[4..]), payload);
            header[0..4].copy_from_slice(&crc.to_le_bytes());
            buf.extend_from_slice(&header);
            buf.extend_from_slice(payload);
        }
        file.write_all_at(&buf, offset)?;
        file.sync_data()?;
        offset += buf.len() as u64;
        syncs += 1;
        left -= group.min(left);
    }
    Ok(Run {
        events,
        secs: started.elapsed().as_secs_f64(),
        commits: syncs,
        written: offset,
    })
}

/// How a spool row appends.
#[derive(Debug, Clone, Copy)]
struct Shape {
    appenders: usize,
    in_flight: usize,
    segment_size: u64,
}

/// The spool row: a fresh spool, `appenders` tasks appending `events` in all.
async fn spool(dir: &Path, events: usize, shape: Shape, payload: &Bytes) -> anyhow::Result<Run> {
    let Shape {
        appenders,
        in_flight,
        segment_size,
    } = shape;
    let _ = std::fs::remove_dir_all(dir);
    let record = (RECORD_HEADER_LEN + payload.len()) as u64;
    let defaults = SpoolConfig::default();
    let config = SpoolConfig {
        segment_size,
        max_record: u32::try_from(record).context("--spool-payload is too large")?,
        // Room for the whole run: nothing is acknowledged during an outage.
        max_bytes: defaults.max_bytes.max(record * events as u64 * 2),
        ..defaults
    };
    let opening = dir.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || DiskSpool::open(&opening, config)).await??;
    let spool = opened.spool;
    let before = spool.stats();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let share = events / appenders + usize::from(a < events % appenders);
        let spool = spool.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending = VecDeque::with_capacity(in_flight);
            for _ in 0..share {
                pending.push_back(spool.submit(&payload).await?);
                if pending.len() >= in_flight {
                    pending.pop_front().expect("non-empty").await?;
                }
            }
            for durable in pending {
                durable.await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let after = spool.stats();
    anyhow::ensure!(
        after.spool.durable_through - before.spool.durable_through == events as u64,
        "the spool confirmed {} of {events} appends",
        after.spool.durable_through - before.spool.durable_through
    );
    spool.close().await?;
    Ok(Run {
        events,
        secs,
        commits: after.commits - before.commits,
        written: after.bytes_written - before.bytes_written,
    })
}

fn report(args: &BenchArgs, dir: &Path, runs: &[Vec<Run>]) -> anyhow::Result<()> {
    let payload = args.spool_payload as f64;
    // Per row: median rate, and the median over rounds of its ratio to the raw row with the same
    // records per sync (paired by round).
    let rows: Vec<(Spec, Spread, Option<Spread>, Run)> = SPECS
        .iter()
        .zip(runs)
        .map(|(spec, row)| {
            let mut rates: Vec<f64> = row.iter().map(Run::rate).collect();
            let rate = Spread::of(&mut rates).expect("at least one round");
            let ratio = spec.baseline().and_then(|group| {
                let base = SPECS.iter().position(
                    |s| matches!(s, Spec::Raw { group: g, zeroed: true } if *g == group),
                )?;
                let mut ratios: Vec<f64> = row
                    .iter()
                    .zip(&runs[base])
                    .map(|(r, b)| r.rate() / b.rate())
                    .collect();
                Spread::of(&mut ratios)
            });
            let median = *row
                .iter()
                .min_by(|a, b| {
                    (a.rate() - rate.median)
                        .abs()
                        .total_cmp(&(b.rate() - rate.median).abs())
                })
                .expect("at least one round");
            (*spec, rate, ratio, median)
        })
        .collect();
    if args.json {
        let json = serde_json::json!({
            "payload_bytes": args.spool_payload,
            "segment_mib": args.spool_segment_mib,
            "events": args.events,
            "rounds": args.rounds,
            "dir": dir,
            "rows": rows.iter().map(|(spec, rate, ratio, run)| serde_json::json!({
                "name": spec.name(),
                "events": run.events,
                "events_per_sec": { "median": rate.median, "min": rate.min, "max": rate.max },
                "payload_bytes_per_sec": rate.median * payload,
                "vs_raw": ratio.map(|r| serde_json::json!({ "median": r.median, "min": r.min, "max": r.max })),
                "records_per_sync": run.events as f64 / run.commits.max(1) as f64,
                "bytes_written": run.written,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    println!(
        "spooling rate, disk only: {} rounds, {}-byte payloads, {} MiB segments, {} events per \
         row ({} for one in flight), in {}",
        args.rounds,
        args.spool_payload,
        args.spool_segment_mib,
        thousands(args.events as u64),
        thousands(args.events.min(ONE_IN_FLIGHT_EVENTS) as u64),
        dir.display()
    );
    let mut t = Table::new([
        "row",
        "events/s (min..max)",
        "payload MiB/s",
        "records/sync",
        "vs raw, group = in flight",
        "written MiB",
    ]);
    for (spec, rate, ratio, run) in &rows {
        t.row([
            spec.name(),
            format!(
                "{} ({}..{})",
                thousands(rate.median.round() as u64),
                thousands(rate.min.round() as u64),
                thousands(rate.max.round() as u64)
            ),
            format!("{:.1}", rate.median * payload / (1024.0 * 1024.0)),
            format!("{:.1}", run.events as f64 / run.commits.max(1) as f64),
            ratio.map_or("-".to_owned(), |r| {
                format!("{:.2}x ({:.2}..{:.2})", r.median, r.min, r.max)
            }),
            format!("{:.1}", run.written as f64 / (1024.0 * 1024.0)),
        ]);
    }
    print!("{t}");
    println!(
        "records/sync: events over fdatasyncs (raw) or group commits (spool; with n in flight \
         about n/2, the other half waits for the commit being synced); written: bytes written in \
         the run, the spool's segment preparation ({} MiB of zeros each) included",
        args.spool_segment_mib
    );
    Ok(())
}
