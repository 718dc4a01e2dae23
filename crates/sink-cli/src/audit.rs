//! `jetsink audit`: read a stream back and report count, gaps, duplicates and per-key counts; with
//! `--expect`, compare event by event with an NDJSON file of what was sent (missing, duplicated,
//! out of order per key).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Args, ValueEnum};
use sink_core::event::{CloudEvent, MsgId};
use sink_nats::audit::{
    analyze, compare_with, read_stream, CompareOptions, Expected, StoredMessage,
};
use sink_nats::connect_client;

use crate::config::Common;
use crate::output::{thousands, Table};

/// How many per-key rows the table shows.
const KEYS_SHOWN: usize = 20;

/// Options of `audit`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// What events share an order (per-key counts and order checks)
    #[arg(long, value_enum, default_value_t = KeyArg::Tenant)]
    pub key: KeyArg,
    /// NDJSON file of the events that were sent, in send order: each must be stored once, in
    /// order per key
    #[arg(long, value_name = "FILE")]
    pub expect: Option<PathBuf>,
    /// With --expect: other producers write the stream too; unknown messages do not fail
    #[arg(long, requires = "expect")]
    pub foreign_ok: bool,
    /// Seconds allowed for reading the whole stream
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
}

/// `--key`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyArg {
    /// The event's tenant (data.tenantId or the tenantid extension)
    Tenant,
    /// The NATS subject
    Subject,
    /// One order for the whole stream
    None,
}

/// Runs `audit`.
pub async fn run(args: AuditArgs, common: &Common) -> anyhow::Result<ExitCode> {
    let config = common.sink_config()?;
    // Read the expectations first: a bad --expect path is a usage error, found before any IO.
    let expected = match &args.expect {
        Some(path) => Some(read_expected(path, args.key, &config)?),
        None => None,
    };
    let client = connect_client(&config).await?;
    let js = jetstream::new(client);
    let stored = read_stream(&js, &config.stream, Duration::from_secs(args.timeout)).await?;

    let summary = analyze(&stored, |m| stored_key(m, args.key));
    let mut problems = 0usize;
    let mut t = Table::new(["stream", config.stream.as_str()]);
    t.row(["messages".to_owned(), thousands(summary.count as u64)]);
    t.row([
        "sequences".to_owned(),
        format!("{}..={}", summary.first_sequence, summary.last_sequence),
    ]);
    t.row(["sequence gaps".to_owned(), summary.gaps.len().to_string()]);
    t.row([
        "duplicate msg ids".to_owned(),
        summary.duplicates.len().to_string(),
    ]);
    t.row([
        "without msg id".to_owned(),
        summary.without_msg_id.to_string(),
    ]);
    t.row(["keys".to_owned(), summary.per_key.len().to_string()]);
    print!("{t}");
    problems += summary.gaps.len() + summary.duplicates.len();
    for (from, to) in summary.gaps.iter().take(10) {
        println!("  gap: sequences {from}..={to} missing (deleted or never stored)");
    }
    for (id, seqs) in summary.duplicates.iter().take(10) {
        println!("  duplicate: msg id {id} stored at {seqs:?}");
    }
    if summary.without_msg_id > 0 {
        println!(
            "  warning: {} message(s) carry no Nats-Msg-Id; they cannot be deduplicated",
            summary.without_msg_id
        );
    }

    if args.key != KeyArg::None && !summary.per_key.is_empty() {
        let mut keys = Table::new([key_title(args.key), "messages"]);
        let mut by_count: Vec<(&String, &usize)> = summary.per_key.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (key, count) in by_count.iter().take(KEYS_SHOWN) {
            keys.row([(*key).clone(), thousands(**count as u64)]);
        }
        if by_count.len() > KEYS_SHOWN {
            keys.row([
                format!("... {} more", by_count.len() - KEYS_SHOWN),
                String::new(),
            ]);
        }
        println!();
        print!("{keys}");
    }

    if let Some(mut expected) = expected {
        attach_sequences(&mut expected.events, &stored);
        let report = compare_with(
            &expected.events,
            &stored,
            CompareOptions {
                foreign_ok: args.foreign_ok,
            },
        );
        println!();
        if expected.skipped > 0 {
            println!(
                "{} line(s) of the --expect file were skipped: not valid CloudEvents, never publishable",
                expected.skipped
            );
        }
        print!("{report}");
        if !report.passed() {
            problems += 1;
        }
    } else {
        println!("\norder per key is checked against the send order: pass --expect <ndjson>");
    }

    Ok(if problems == 0 {
        println!("audit: no problems found");
        ExitCode::SUCCESS
    } else {
        println!("audit: problems found");
        ExitCode::from(1)
    })
}

fn key_title(key: KeyArg) -> &'static str {
    match key {
        KeyArg::Tenant => "tenant",
        KeyArg::Subject => "subject",
        KeyArg::None => "key",
    }
}

/// The ordering key of a stored message: decoded from its body and headers (either encoding).
fn stored_key(m: &StoredMessage, key: KeyArg) -> String {
    match key {
        KeyArg::None => "*".into(),
        KeyArg::Subject => m.subject.clone(),
        KeyArg::Tenant => match sink_core::encoding::decode(&m.headers, &m.payload) {
            Ok(event) => event
                .tenant_id()
                .map_or_else(|| "(no tenant)".into(), str::to_owned),
            Err(_) => "(not a CloudEvent)".into(),
        },
    }
}

struct ExpectedEvents {
    events: Vec<Expected>,
    skipped: usize,
}

/// Reads the `--expect` file. Lines that are not valid CloudEvents were never publishable and are
/// skipped; events whose subject cannot be rendered were refused by the sink and are expected
/// absent. The file carries no stream sequences, so every present event counts as reported at the
/// sequence it is stored at (I4 needs the sink's receipts, which an NDJSON input does not have).
fn read_expected(
    path: &PathBuf,
    key: KeyArg,
    config: &sink_nats::SinkConfig,
) -> anyhow::Result<ExpectedEvents> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --expect file {}", path.display()))?;
    // The sink's own subject rules (token rule, default or required tenant), so the audit
    // expects exactly the events the sink accepted.
    let subjects = sink_nats::subject_config(config)?;
    let mut out = ExpectedEvents {
        events: Vec::new(),
        skipped: 0,
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(event) = CloudEvent::from_json_line(line) else {
            out.skipped += 1;
            continue;
        };
        let subject = subjects.render(&event);
        let key = match key {
            KeyArg::None => "*".into(),
            KeyArg::Subject => subject
                .as_ref()
                .map_or_else(|_| "(no subject)".into(), Clone::clone),
            KeyArg::Tenant => event
                .tenant_id()
                .map_or_else(|| "(no tenant)".into(), str::to_owned),
        };
        out.events.push(Expected {
            msg_id: MsgId::for_event(&event).as_str().to_owned(),
            key,
            // Filled in below from the stream: see the doc comment.
            reported_sequence: subject.is_ok().then_some(0),
        });
    }
    Ok(out)
}

/// Sets each present expected event's reported sequence to where it is stored (`compare` then
/// judges presence, duplicates and order; a missing event keeps sequence 0 and counts as missing).
fn attach_sequences(expected: &mut [Expected], stored: &[StoredMessage]) {
    let mut first: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for m in stored {
        if let Some(id) = m.msg_id.as_deref() {
            first.entry(id).or_insert(m.stream_sequence);
        }
    }
    for e in expected.iter_mut() {
        if e.reported_sequence.is_some() {
            if let Some(seq) = first.get(e.msg_id.as_str()) {
                e.reported_sequence = Some(*seq);
            }
        }
    }
}
