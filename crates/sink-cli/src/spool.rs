//! `jetsink spool status DIR`: what a local spool directory holds and what recovery would repair, read without changing anything (`--repair` applies the repairs); `jetsink spool drain DIR`: deliver what a spool holds and close.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sink_nats::sink_core::spool::record::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use sink_nats::spool::{inspect, DiskSpool, Inspection, SpoolConfig, FORMAT_VERSION};
use sink_nats::{SinkBuilder, StreamPolicy};

use crate::config::Common;
use crate::output::{duration, rate, thousands, Table};
use crate::publish::PolicyArg;

/// `jetsink spool ...`.
#[derive(Subcommand, Debug)]
pub enum SpoolCommand {
    /// Show what a spool directory holds (records, bytes, oldest sequence, segments, damage) and
    /// what recovery would repair; read-only unless --repair
    Status(StatusArgs),
    /// Deliver what a spool directory holds (a spool a dead service left) to the stream, then
    /// close; exits 0 only when the spool is empty afterwards
    Drain(DrainArgs),
}

/// Options of `spool drain`.
#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The spool directory (must exist; no other process may hold it)
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// What to do with the stream at start
    #[arg(long, value_enum, default_value_t = PolicyArg::Verify)]
    pub stream_policy: PolicyArg,
    /// Seconds to wait for the spool to be handed over and the queue to empty (0: no limit)
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    /// Seconds to wait at the end for events not yet confirmed
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub close_timeout: u64,
}

/// Options of `spool status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The spool directory
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Open the spool exclusively and apply what recovery finds: zero a torn tail, copy damaged
    /// regions into DIR/quarantine/ and mark them, move unreadable segment files there (what a
    /// sink opening the spool would do)
    #[arg(long)]
    pub repair: bool,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Runs `spool`.
pub async fn run(command: SpoolCommand, common: &Common) -> anyhow::Result<ExitCode> {
    match command {
        SpoolCommand::Status(args) => status(args).await,
        SpoolCommand::Drain(args) => drain(args, common).await,
    }
}

/// How often `drain` looks at the sink's health.
const DRAIN_POLL: Duration = Duration::from_millis(100);

async fn drain(args: DrainArgs, common: &Common) -> anyhow::Result<ExitCode> {
    // A drain delivers an existing spool; it never creates one (a typo would otherwise start an
    // empty spool and report success).
    anyhow::ensure!(
        args.dir.is_dir(),
        "spool directory {} does not exist",
        args.dir.display()
    );
    let mut config = common.sink_config()?;
    config.stream_policy = match args.stream_policy {
        PolicyArg::Off => StreamPolicy::Off,
        PolicyArg::Verify => StreamPolicy::Verify,
        PolicyArg::Create => StreamPolicy::Create,
    };
    config.spool = Some(args.dir.clone());
    let sink = SinkBuilder::from_config(config).connect().await?;
    let at_start = sink.health().spool.map_or(0, |s| s.spool.records);
    let bar = crate::publish::progress_bar(Some(at_start));
    let started = Instant::now();
    let limit = (args.timeout > 0).then(|| started + Duration::from_secs(args.timeout));
    let mut timed_out = false;
    loop {
        let health = sink.health();
        let held = health.spool.map_or(0, |s| s.spool.records);
        let done = at_start.saturating_sub(held);
        bar.set_position(done);
        bar.set_message(format!(
            "handed over · {} · retries {} · queued {} · in flight {}{}",
            rate(done, started.elapsed()),
            crate::RETRIES.load(std::sync::atomic::Ordering::Relaxed),
            health.queued,
            health.in_flight,
            if health.spool_replay_pending {
                " · replaying"
            } else {
                ""
            }
        ));
        if !health.spool_replay_pending && health.queued == 0 {
            break;
        }
        if limit.is_some_and(|l| Instant::now() >= l) {
            timed_out = true;
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let last_error = sink.health().last_error;
    let close = sink.close(Duration::from_secs(args.close_timeout)).await;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    // After close: what the spool still holds, persisted for the next start on it.
    let left = sink.health().spool.map_or(0, |s| s.spool.records);

    let mut t = Table::new(["spool drain", &args.dir.display().to_string()]);
    t.row([
        "records at start".to_owned(),
        format!("{} (close marks included)", thousands(at_start)),
    ]);
    t.row(["delivered".to_owned(), thousands(close.delivered)]);
    t.row(["rejected".to_owned(), thousands(close.rejected)]);
    t.row([
        "not confirmed".to_owned(),
        thousands(close.not_delivered.len() as u64),
    ]);
    t.row(["left in spool".to_owned(), thousands(left)]);
    t.row(["elapsed".to_owned(), duration(elapsed)]);
    t.row(["rate".to_owned(), rate(close.delivered, elapsed)]);
    print!("{t}");
    if timed_out {
        eprintln!(
            "the spool was not handed over within --timeout {} s; what is left stays in {}",
            args.timeout,
            args.dir.display()
        );
    }
    if left > 0 {
        if let Some(e) = last_error {
            eprintln!("last error: {e}");
        }
        eprintln!(
            "{} records stay in {} for the next start on it",
            thousands(left),
            args.dir.display()
        );
    }
    if close.rejected > 0 {
        eprintln!(
            "{} events were rejected by the broker (see the log with -v); they are not in the spool any more",
            thousands(close.rejected)
        );
    }
    Ok(if left == 0 && close.rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.clone();
    let found = tokio::task::spawn_blocking(move || inspect(&dir))
        .await
        .context("spool inspection stopped")??;
    let repaired =
        if args.repair {
            if let Some(in_use) = found.in_use {
                anyhow::bail!(
                "spool directory {} is in use by another process{}; stop it before --repair (a \
                 running sink repairs its spool when it opens it)",
                found.dir.display(),
                in_use.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            );
            }
            let dir = args.dir.clone();
            // Spares a repair prepares get the size the spool was written with.
            let defaults = SpoolConfig::default();
            let segment_size = match found.largest_segment_file {
                0 => defaults.segment_size,
                n => n,
            };
            let fits = segment_size.saturating_sub((SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64);
            let config = SpoolConfig {
                segment_size,
                max_record: u32::try_from(fits)
                    .unwrap_or(u32::MAX)
                    .min(defaults.max_record),
                ..defaults
            };
            let opened = tokio::task::spawn_blocking(move || DiskSpool::open(&dir, config))
                .await
                .context("spool repair stopped")??;
            opened.spool.close().await?;
            Some(opened.report)
        } else {
            None
        };

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&found, repaired.is_some()))?
        );
    } else {
        print!("{}", table(&found));
        if let Some(note) = repair_note(&found, repaired.is_some()) {
            println!("{note}");
        }
    }
    Ok(if found.damaged() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn table(found: &Inspection) -> Table {
    let r = &found.report;
    let mut t = Table::new(["spool", &found.dir.display().to_string()]);
    t.row([
        "format version".to_owned(),
        format!(
            "{} (this build reads {FORMAT_VERSION})",
            found.format_version
        ),
    ]);
    t.row(["records".to_owned(), thousands(r.records)]);
    t.row(["bytes".to_owned(), thousands(r.bytes)]);
    t.row([
        "oldest sequence".to_owned(),
        r.oldest.map_or("-".to_owned(), thousands),
    ]);
    t.row(["next sequence".to_owned(), thousands(r.next_seq)]);
    t.row([
        "segments".to_owned(),
        format!(
            "{} live, {} free ({} files, {} bytes on disk)",
            r.segments,
            r.free_segments,
            found.segment_files,
            thousands(found.segment_file_bytes)
        ),
    ]);
    t.row([
        "torn tail".to_owned(),
        match &r.torn_tail {
            Some(tail) => format!(
                "record {} at {} offset {} ({} bytes, never confirmed durable)",
                thousands(tail.seq),
                tail.segment,
                thousands(tail.offset),
                tail.len
            ),
            None => "none".to_owned(),
        },
    ]);
    let missing: u64 = r.quarantined.iter().map(|q| q.missing).sum();
    t.row([
        "damaged regions".to_owned(),
        format!(
            "{} ({} records missing)",
            r.quarantined.len(),
            thousands(missing)
        ),
    ]);
    for q in &r.quarantined {
        let records = match q.first_missing {
            Some(first) if q.missing > 0 => format!(
                "records {}..={}",
                thousands(first),
                thousands(first + q.missing - 1)
            ),
            _ => "no record known lost".to_owned(),
        };
        t.row([
            String::new(),
            format!(
                "{} offset {}: {} bytes, {records}",
                q.segment,
                thousands(q.offset),
                q.len
            ),
        ]);
    }
    if r.unexplained_missing > 0 {
        t.row([
            "missing between segments".to_owned(),
            thousands(r.unexplained_missing),
        ]);
    }
    t.row([
        "damaged segments".to_owned(),
        r.damaged_segments.len().to_string(),
    ]);
    for (segment, reason) in &r.damaged_segments {
        t.row([String::new(), format!("{segment}: {reason}")]);
    }
    t.row([
        "quarantined before".to_owned(),
        format!(
            "{} regions marked; quarantine directory holds {} files, {} bytes",
            r.previously_quarantined,
            found.quarantine_files,
            thousands(found.quarantine_bytes)
        ),
    ]);
    t.row([
        "in use".to_owned(),
        match found.in_use {
            Some(in_use) => format!(
                "yes, by {} (a snapshot of a running spool)",
                in_use
                    .pid
                    .map_or("another process".to_owned(), |p| format!("pid {p}"))
            ),
            None => "no".to_owned(),
        },
    ]);
    t
}

/// What happened to the repairs recovery asks for, when it asks for any.
fn repair_note(found: &Inspection, repaired: bool) -> Option<String> {
    if !found.needs_repair() {
        return None;
    }
    let r = &found.report;
    let mut what = Vec::new();
    if r.torn_tail.is_some() {
        what.push("zero the torn tail".to_owned());
    }
    if !r.quarantined.is_empty() {
        what.push(format!(
            "copy {} damaged regions into quarantine/ and mark them",
            r.quarantined.len()
        ));
    }
    if !r.damaged_segments.is_empty() {
        what.push(format!(
            "move {} unreadable segment files into quarantine/",
            r.damaged_segments.len()
        ));
    }
    let what = what.join(", ");
    Some(if repaired {
        format!("repaired: {what}")
    } else {
        format!(
            "repairs pending (nothing was changed): {what}; opening the spool applies them (a \
             sink with this spool, or `jetsink spool status {} --repair`)",
            found.dir.display()
        )
    })
}

fn to_json(found: &Inspection, repaired: bool) -> serde_json::Value {
    let r = &found.report;
    serde_json::json!({
        "dir": found.dir,
        "format_version": found.format_version,
        "records": r.records,
        "bytes": r.bytes,
        "oldest_seq": r.oldest,
        "next_seq": r.next_seq,
        "acked_through": r.acked_through,
        "segments": r.segments,
        "free_segments": r.free_segments,
        "segment_files": found.segment_files,
        "segment_file_bytes": found.segment_file_bytes,
        "torn_tail": r.torn_tail.map(|t| serde_json::json!({
            "segment": t.segment.file_name(),
            "offset": t.offset,
            "len": t.len,
            "seq": t.seq,
        })),
        "damaged_regions": r.quarantined.iter().map(|q| serde_json::json!({
            "segment": q.segment.file_name(),
            "offset": q.offset,
            "len": q.len,
            "first_missing": q.first_missing,
            "missing": q.missing,
        })).collect::<Vec<_>>(),
        "missing_between_segments": r.unexplained_missing,
        "damaged_segments": r.damaged_segments.iter().map(|(s, reason)| serde_json::json!({
            "segment": s.file_name(),
            "reason": reason,
        })).collect::<Vec<_>>(),
        "previously_quarantined": r.previously_quarantined,
        "quarantine_files": found.quarantine_files,
        "quarantine_bytes": found.quarantine_bytes,
        "in_use_by_pid": found.in_use.map(|u| u.pid),
        "in_use": found.in_use.is_some(),
        "needs_repair": found.needs_repair() && !repaired,
        "repaired": repaired && found.needs_repair(),
        "damaged": found.damaged(),
    })
}
