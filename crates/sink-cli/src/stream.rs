//! `jetsink stream ensure|verify`: the stream's facts against the sink's requirements, as a table.
//!
//! Below the table come the violations (exit 1) and then the advice: settings that cost speed, not
//! a promise (a 2.14+ stream without `allow_batched`), which leave the exit code alone.

use std::process::ExitCode;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Args, Subcommand};
use sink_core::capability::ServerVersion;
use sink_core::stream::{advise, verify, Advice, StreamFacts, StreamRequirements, Violation};
use sink_nats::{connect_client, create_stream, read_stream_facts, stream_requirements};

use crate::config::Common;
use crate::output::{duration, Table};

/// Stream subcommands.
#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Create the stream if it is missing (file storage, max_age 90d, duplicate window 2m,
    /// allow_batched on nats-server 2.14+), then verify it; an existing stream is never changed
    Ensure(StreamArgs),
    /// Check the stream against the requirements (subjects, retention floor, duplicate window,
    /// storage, acks, limits, and settings that evict, rewrite or refuse events); exit 1 on any
    /// violation
    Verify(StreamArgs),
}

/// Options of `stream ensure` / `stream verify`.
#[derive(Args, Debug)]
pub struct StreamArgs {
    /// Retention floor in days: max_age must be 0 (unlimited) or at least this
    #[arg(long, value_name = "DAYS", default_value_t = 90)]
    pub retention_floor_days: u64,
}

/// What a stream lookup found.
pub enum Lookup {
    /// The stream exists.
    Found(Box<StreamFacts>),
    /// No stream by that name.
    Missing,
}

/// Reads a stream's facts; `Missing` when the server says it does not exist.
pub async fn lookup(js: &jetstream::Context, name: &str) -> anyhow::Result<Lookup> {
    match read_stream_facts(js, name).await? {
        Some(facts) => Ok(Lookup::Found(Box::new(facts))),
        None => Ok(Lookup::Missing),
    }
}

/// Runs `stream ensure` or `stream verify`.
pub async fn run(command: StreamCommand, common: &Common) -> anyhow::Result<ExitCode> {
    let (args, create) = match command {
        StreamCommand::Ensure(args) => (args, true),
        StreamCommand::Verify(args) => (args, false),
    };
    let mut config = common.sink_config()?;
    config.retention_floor = std::time::Duration::from_secs(args.retention_floor_days * 86_400);
    let req = stream_requirements(&config)?;
    let client = connect_client(&config).await?;
    let server = ServerVersion::parse(&client.server_info().version);
    let js = jetstream::new(client);
    let facts = match lookup(&js, &config.stream).await? {
        Lookup::Found(facts) => *facts,
        Lookup::Missing if create => {
            let facts = create_stream(&js, &config.stream, req.subject_filters.clone(), server)
                .await
                .with_context(|| format!("cannot create stream {}", config.stream))?;
            println!(
                "created stream {} (subjects {})",
                config.stream,
                req.subject_filters.join(", ")
            );
            facts
        }
        Lookup::Missing => {
            println!(
                "stream {} does not exist; create it with `jetsink stream ensure`",
                config.stream
            );
            return Ok(ExitCode::from(1));
        }
    };
    let violations = verify(&facts, &req);
    let advice = advise(&facts, server);
    print!("{}", report(&facts, &req, &violations, &advice));
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The facts table followed by one line per violation (or a verdict that the stream is fit),
/// then one line per advice.
pub fn report(
    facts: &StreamFacts,
    req: &StreamRequirements,
    violations: &[Violation],
    advice: &[Advice],
) -> String {
    let mut out = format!("stream {}\n\n", facts.name);
    out.push_str(&facts_table(facts, req, violations, advice).to_string());
    out.push('\n');
    if violations.is_empty() {
        out.push_str("stream meets every requirement\n");
    } else {
        out.push_str(&format!("{} violation(s):\n", violations.len()));
        for v in violations {
            out.push_str(&format!("  - {v}\n"));
        }
    }
    if !advice.is_empty() {
        out.push_str(&format!(
            "{} advice (not a violation; costs speed):\n",
            advice.len()
        ));
        for a in advice {
            out.push_str(&format!("  - {a}\n"));
        }
    }
    out
}

/// One row per checked field: found value, required value, `ok`, `VIOLATION` or `ADVICE`.
pub fn facts_table(
    facts: &StreamFacts,
    req: &StreamRequirements,
    violations: &[Violation],
    advice: &[Advice],
) -> Table {
    let bad = |field: &str| violations.iter().any(|v| v.field() == field);
    let advised = |field: &str| advice.iter().any(|a| a.field() == field);
    let status = |field: &str| {
        if bad(field) {
            "VIOLATION"
        } else if advised(field) {
            "ADVICE"
        } else {
            "ok"
        }
    };
    let limit = |n: i64| {
        if n <= 0 {
            "unlimited".to_owned()
        } else {
            n.to_string()
        }
    };
    let age = |d: std::time::Duration| {
        if d.is_zero() {
            "0 (unlimited)".to_owned()
        } else {
            duration(d)
        }
    };
    let mut t = Table::new(["field", "found", "required", "status"]);
    t.row([
        "subjects".to_owned(),
        facts.subjects.join(", "),
        format!("covers {}", req.subject_filters.join(", ")),
        status("subjects").to_owned(),
    ]);
    t.row([
        "max_age".to_owned(),
        age(facts.max_age),
        format!(">= {} or 0 (unlimited)", duration(req.retention_floor)),
        status("max_age").to_owned(),
    ]);
    t.row([
        "retention".to_owned(),
        facts.retention.to_string(),
        "limits".to_owned(),
        status("retention").to_owned(),
    ]);
    t.row([
        "duplicate_window".to_owned(),
        duration(facts.duplicate_window),
        format!(">= {}", duration(req.min_duplicate_window)),
        status("duplicate_window").to_owned(),
    ]);
    t.row([
        "storage".to_owned(),
        facts.storage.to_string(),
        req.storage.map_or("any".to_owned(), |s| s.to_string()),
        status("storage").to_owned(),
    ]);
    t.row([
        "sealed".to_owned(),
        facts.sealed.to_string(),
        "false".to_owned(),
        status("sealed").to_owned(),
    ]);
    t.row([
        "no_ack".to_owned(),
        facts.no_ack.to_string(),
        "false".to_owned(),
        status("no_ack").to_owned(),
    ]);
    t.row([
        "num_replicas".to_owned(),
        facts.replicas.to_string(),
        format!(">= {}", req.min_replicas),
        status("num_replicas").to_owned(),
    ]);
    t.row([
        "discard".to_owned(),
        facts.discard.to_string(),
        "-".to_owned(),
        "ok".to_owned(),
    ]);
    t.row([
        "max_msgs".to_owned(),
        limit(facts.max_msgs),
        "unlimited, or discard new".to_owned(),
        status("max_msgs").to_owned(),
    ]);
    t.row([
        "max_bytes".to_owned(),
        limit(facts.max_bytes),
        "unlimited, or discard new".to_owned(),
        status("max_bytes").to_owned(),
    ]);
    t.row([
        "max_msg_size".to_owned(),
        limit(i64::from(facts.max_msg_size)),
        "-".to_owned(),
        "ok".to_owned(),
    ]);
    t.row([
        "max_msgs_per_subject".to_owned(),
        limit(facts.max_msgs_per_subject),
        "unlimited".to_owned(),
        status("max_msgs_per_subject").to_owned(),
    ]);
    t.row([
        "allow_rollup_hdrs".to_owned(),
        facts.allow_rollup.to_string(),
        "false".to_owned(),
        status("allow_rollup_hdrs").to_owned(),
    ]);
    t.row([
        "allow_msg_schedules".to_owned(),
        facts.allow_msg_schedules.to_string(),
        "false".to_owned(),
        status("allow_msg_schedules").to_owned(),
    ]);
    t.row([
        "subject_transform".to_owned(),
        facts
            .subject_transform
            .as_ref()
            .map_or("none".to_owned(), |t| {
                format!("{} -> {}", t.source, t.destination)
            }),
        "none on our subjects".to_owned(),
        status("subject_transform").to_owned(),
    ]);
    t.row([
        "persist_mode".to_owned(),
        facts.persist_mode.to_string(),
        "default".to_owned(),
        status("persist_mode").to_owned(),
    ]);
    t.row([
        "allow_msg_counter".to_owned(),
        facts.allow_msg_counter.to_string(),
        "false".to_owned(),
        status("allow_msg_counter").to_owned(),
    ]);
    t.row([
        "mirror".to_owned(),
        facts.mirror.clone().unwrap_or_else(|| "none".to_owned()),
        "none".to_owned(),
        status("mirror").to_owned(),
    ]);
    t.row([
        "allow_batched".to_owned(),
        facts.allow_batched.to_string(),
        "true advised on 2.14+".to_owned(),
        status("allow_batched").to_owned(),
    ]);
    t
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn drifted_stream_renders_found_and_required() {
        let req = StreamRequirements::for_subject_filter(
            "cellos.events.*.v1",
            Duration::from_millis(15_500),
        );
        let mut facts = StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".into()]);
        facts.max_age = Duration::from_secs(30 * 86_400);
        facts.storage = sink_core::stream::StorageKind::Memory;
        let violations = verify(&facts, &req);
        insta::assert_snapshot!(report(&facts, &req, &violations, &[]));
    }

    #[test]
    fn lossy_settings_render_found_and_required() {
        let req = StreamRequirements::for_subject_filter(
            "cellos.events.*.v1",
            Duration::from_millis(15_500),
        );
        let mut facts = StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".into()]);
        facts.max_msgs_per_subject = 100;
        facts.allow_rollup = true;
        facts.subject_transform = Some(sink_core::stream::SubjectTransform {
            source: "cellos.events.>".into(),
            destination: "archive.>".into(),
        });
        facts.persist_mode = sink_core::stream::PersistMode::Async;
        let violations = verify(&facts, &req);
        insta::assert_snapshot!(report(&facts, &req, &violations, &[]));
    }

    #[test]
    fn a_2_15_stream_without_allow_batched_passes_with_advice() {
        let req = StreamRequirements::for_subject_filter(
            "cellos.events.*.v1",
            Duration::from_millis(15_500),
        );
        let facts = StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".into()]);
        let violations = verify(&facts, &req);
        assert!(violations.is_empty());
        let advice = advise(&facts, ServerVersion::parse("2.15.1"));
        insta::assert_snapshot!(report(&facts, &req, &violations, &advice));
        let on_2_12 = advise(&facts, ServerVersion::parse("2.12.8"));
        assert!(on_2_12.is_empty());
        let text = report(&facts, &req, &violations, &on_2_12);
        assert!(!text.contains("advice"), "{text}");
        assert!(!text.contains("ADVICE"), "{text}");
    }
}
