//! `jetsink spool status` end to end on spool directories written through sink-nats: a clean spool, a damaged one (read-only status, then --repair), a newer format, a spool in use, a missing directory, and the JSON output; `jetsink publish --spool` with the broker down and `jetsink spool drain` to it once it is back, audited; help snapshots of the spool commands.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{jetsink, row_value as row, show, stdout};
use std::time::Duration;

use sink_nats::sink_core::event::{CloudEvent, MsgId};
use sink_nats::spool::{DiskSpool, SpoolConfig, FORMAT_VERSION, QUARANTINE_DIR};
use sink_testkit::{read_stream, NatsServer, ServerOptions, ServerVersion};

fn config() -> SpoolConfig {
    SpoolConfig {
        segment_size: 32 * 1024,
        max_record: 1024,
        ..SpoolConfig::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!("event {i} {}", "x".repeat(40)).into_bytes()
}

/// A spool holding records 1..=6 with 1 and 2 acknowledged (the watermark carried by record 6).
fn write_spool(dir: &Path) {
    let spool = DiskSpool::open(dir, config()).expect("open").spool;
    futures::executor::block_on(async {
        for i in 1..=5 {
            spool.append(&payload(i)).await.expect("append");
        }
        assert!(spool.ack(1) && spool.ack(2));
        spool.append(&payload(6)).await.expect("append");
        spool.close().await.expect("close");
    });
}

fn segment(dir: &Path) -> PathBuf {
    dir.join("0000000000000001.jspool")
}

/// Offset of record `k` in the first segment (64-byte header, 28-byte record headers).
fn offset(k: u64) -> usize {
    64 + (1..k).map(|i| 28 + payload(i).len()).sum::<usize>()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn status_of_a_clean_spool_shows_what_it_holds_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    write_spool(&dir);
    let out = jetsink(&["spool", "status", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row(&text, "records").as_deref(), Some("4"), "{text}");
    assert_eq!(row(&text, "oldest sequence").as_deref(), Some("3"));
    assert_eq!(row(&text, "next sequence").as_deref(), Some("7"));
    assert_eq!(
        row(&text, "format version"),
        Some(format!(
            "{FORMAT_VERSION} (this build reads {FORMAT_VERSION})"
        ))
    );
    assert_eq!(row(&text, "torn tail").as_deref(), Some("none"));
    assert_eq!(
        row(&text, "damaged regions").as_deref(),
        Some("0 (0 records missing)")
    );
    assert_eq!(row(&text, "in use").as_deref(), Some("no"));
    assert!(
        row(&text, "segments").unwrap().starts_with("1 live, "),
        "{text}"
    );
    assert!(!text.contains("repairs pending"), "{text}");

    let out = jetsink(&["spool", "status", path_str(&dir), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["records"], 4);
    assert_eq!(json["oldest_seq"], 3);
    assert_eq!(json["acked_through"], 2);
    assert_eq!(json["format_version"], FORMAT_VERSION);
    assert_eq!(json["damaged"], false);
    assert_eq!(json["needs_repair"], false);
    assert_eq!(json["in_use"], false);
}

#[test]
fn damage_is_reported_without_changing_anything_and_repaired_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    write_spool(&dir);
    let mut bytes = std::fs::read(segment(&dir)).unwrap();
    bytes[offset(4) + 30] ^= 0x01;
    std::fs::write(segment(&dir), &bytes).unwrap();

    let out = jetsink(&["spool", "status", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(
        row(&text, "damaged regions").as_deref(),
        Some("1 (1 records missing)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("0000000000000001.jspool offset {}", offset(4)))
            && text.contains("records 4..=4"),
        "{text}"
    );
    assert_eq!(row(&text, "records").as_deref(), Some("3"));
    assert!(
        text.contains("repairs pending (nothing was changed)"),
        "{text}"
    );
    assert_eq!(std::fs::read(segment(&dir)).unwrap(), bytes, "status wrote");
    assert!(!dir.join(QUARANTINE_DIR).exists());

    let out = jetsink(&["spool", "status", path_str(&dir), "--repair"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stdout(&out).contains("repaired: copy 1 damaged regions into quarantine/ and mark them"),
        "{}",
        show(&out)
    );

    let out = jetsink(&["spool", "status", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(
        row(&text, "damaged regions").as_deref(),
        Some("0 (0 records missing)")
    );
    assert!(
        row(&text, "quarantined before")
            .unwrap()
            .starts_with("1 regions marked; quarantine directory holds 1 files"),
        "{text}"
    );
    assert_eq!(row(&text, "records").as_deref(), Some("3"));
}

#[test]
fn a_newer_format_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    write_spool(&dir);
    let mut bytes = std::fs::read(segment(&dir)).unwrap();
    bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(segment(&dir), &bytes).unwrap();
    for args in [&[][..], &["--repair"][..]] {
        let mut all = vec!["spool", "status", path_str(&dir)];
        all.extend_from_slice(args);
        let out = jetsink(&all);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "0000000000000001.jspool has format version 2, newer than this build reads (1)"
            ) && err.contains("jetsink version that wrote it"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(segment(&dir)).unwrap(), bytes);
}

#[test]
fn a_spool_in_use_is_shown_as_such_and_not_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    write_spool(&dir);
    let held = DiskSpool::open(&dir, config()).expect("open").spool;
    let out = jetsink(&["spool", "status", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        row(&stdout(&out), "in use"),
        Some(format!(
            "yes, by pid {} (a snapshot of a running spool)",
            std::process::id()
        ))
    );
    let out = jetsink(&["spool", "status", path_str(&dir), "--repair"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is in use by another process"),
        "{}",
        show(&out)
    );
    futures::executor::block_on(held.close()).expect("close");
}

#[test]
fn a_missing_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("absent");
    let out = jetsink(&["spool", "status", path_str(&dir)]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file or directory"),
        "{}",
        show(&out)
    );
    assert!(!dir.exists(), "status created the directory");
}

/// `jetsink bench --spool-only` (a `lab` build): every row runs and reports sane numbers.
#[cfg(feature = "lab")]
#[test]
fn bench_spool_only_measures_the_spool_against_the_raw_log() {
    let tmp = tempfile::tempdir().unwrap();
    let out = jetsink(&[
        "bench",
        "--spool-only",
        "--events",
        // Whole groups of 512 and 64.
        "5120",
        "--rounds",
        "1",
        "--spool-segment-mib",
        "1",
        "--spool-dir",
        path_str(tmp.path()),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 9, "{json:#}");
    for row in rows {
        let name = row["name"].as_str().unwrap();
        assert!(
            row["events_per_sec"]["median"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        let per_sync = row["records_per_sync"].as_f64().unwrap();
        if name.starts_with("raw log") {
            let group: f64 = if name.contains(" 64/group") {
                64.0
            } else {
                512.0
            };
            assert!((per_sync - group).abs() < 1.0, "{row}");
        } else if name.contains("x 1 in flight") {
            assert!((per_sync - 1.0).abs() < 1e-9, "{row}");
            assert!(row["vs_raw"].is_null());
        } else {
            assert!(per_sync > 1.0, "group commit shares syncs: {row}");
            assert!(row["vs_raw"]["median"].as_f64().unwrap() > 0.0, "{row}");
        }
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the bench leaves no row directory behind");
}

const STREAM: &str = "SPOOLED";
const TEMPLATE: &str = "spooled.{tenantId}.v1";

/// `jetsink --url URL --stream SPOOLED --subject-template ... ARGS`, off the async runtime.
async fn jetsink_on(url: &str, args: &[&str]) -> Output {
    let mut all = vec![
        "--url",
        url,
        "--stream",
        STREAM,
        "--subject-template",
        TEMPLATE,
    ];
    all.extend_from_slice(args);
    let all: Vec<String> = all.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        jetsink(&refs)
    })
    .await
    .expect("jetsink task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spooled_while_the_broker_is_down_are_drained_once_and_in_order() {
    let mut server = NatsServer::start(ServerOptions::version(ServerVersion::V2_9))
        .await
        .expect("start nats-server 2.9");
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let sent = tmp.path().join("sent.ndjson");
    server.kill().await.expect("kill the broker");

    // The broker is down: every event is accepted into the spool, none is confirmed.
    let out = jetsink_on(
        &url,
        &[
            "publish",
            "--spool",
            path_str(&dir),
            "--generate",
            "300",
            "--save",
            path_str(&sent),
            "--stream-policy",
            "create",
            "--close-timeout",
            "1",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row(&text, "sent").as_deref(), Some("300"), "{text}");
    assert_eq!(row(&text, "delivered").as_deref(), Some("0"), "{text}");
    assert_eq!(row(&text, "rejected").as_deref(), Some("0"), "{text}");
    assert!(
        row(&text, "left in spool")
            .unwrap_or_default()
            .starts_with("300 (in "),
        "{text}"
    );

    // A drain to a broker that is still down fails to connect and leaves the spool alone.
    let out = jetsink_on(
        &url,
        &[
            "spool",
            "drain",
            path_str(&dir),
            "--stream-policy",
            "create",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = jetsink(&["spool", "status", path_str(&dir), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // The 300 events and the mark the clean close wrote.
    assert_eq!(json["records"], 301, "{json:#}");

    server.restart().await.expect("restart the broker");
    let out = jetsink_on(
        &url,
        &[
            "spool",
            "drain",
            path_str(&dir),
            "--stream-policy",
            "create",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row(&text, "delivered").as_deref(), Some("300"), "{text}");
    assert_eq!(row(&text, "left in spool").as_deref(), Some("0"), "{text}");
    assert_eq!(row(&text, "rejected").as_deref(), Some("0"), "{text}");

    // Every event once, in the order it was generated, with its own message id.
    let want: Vec<String> = std::fs::read_to_string(&sent)
        .unwrap()
        .lines()
        .map(|line| {
            let event = CloudEvent::from_json_line(line).expect("saved event");
            MsgId::for_event(&event).as_str().to_owned()
        })
        .collect();
    assert_eq!(want.len(), 300);
    let client = server.connect().await.expect("client");
    let js = async_nats::jetstream::new(client);
    let stored = read_stream(&js, STREAM, Duration::from_secs(30))
        .await
        .expect("read back");
    let got: Vec<String> = stored
        .iter()
        .map(|m| m.msg_id.clone().expect("msg id"))
        .collect();
    assert_eq!(got, want, "the stream holds every event once, in order");
    let out = jetsink_on(&url, &["audit", "--expect", path_str(&sent)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    // Drained: status shows an empty spool, a second drain delivers nothing and succeeds, and a
    // spooled publish to the running broker leaves nothing behind.
    let out = jetsink(&["spool", "status", path_str(&dir), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["damaged"], false, "{json:#}");
    let out = jetsink_on(&url, &["spool", "drain", path_str(&dir)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(row(&stdout(&out), "delivered").as_deref(), Some("0"));
    let out = jetsink_on(
        &url,
        &["publish", "--spool", path_str(&dir), "--generate", "40"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row(&text, "delivered").as_deref(), Some("40"), "{text}");
    assert_eq!(row(&text, "left in spool").as_deref(), Some("0"), "{text}");
    assert_eq!(
        read_stream(&js, STREAM, Duration::from_secs(30))
            .await
            .expect("read back")
            .len(),
        340,
        "nothing drained was sent again"
    );
}

#[test]
fn draining_a_missing_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("absent");
    // No broker is needed to refuse it: nothing connects.
    let out = jetsink(&[
        "--url",
        "nats://127.0.0.1:1",
        "spool",
        "drain",
        path_str(&dir),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        show(&out)
    );
    assert!(!dir.exists(), "drain created the directory");
}

#[test]
fn spool_help_texts() {
    for (name, args) in [
        ("help_spool", &["spool", "--help"][..]),
        ("help_spool_drain", &["spool", "drain", "--help"][..]),
        ("help_spool_status", &["spool", "status", "--help"][..]),
    ] {
        let out = jetsink(args);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        insta::assert_snapshot!(name, stdout(&out));
    }
}

/// `jetsink bench --spool` (a `lab` build): the spooled rows run beside their references, are
/// audited, and report their `send` latency.
#[cfg(feature = "lab")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_spool_rows_run_audited_beside_their_references() {
    let server = NatsServer::start(ServerOptions::version(ServerVersion::V2_9))
        .await
        .expect("start nats-server 2.9");
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let spool_dir = tmp.path().join("spools");
    let args: Vec<String> = [
        "--url",
        &url,
        "bench",
        "--spool",
        "--spool-dir",
        path_str(&spool_dir),
        "--only",
        "spooled",
        "--events",
        "2000",
        "--warmup-events",
        "0",
        "--serial-events",
        "50",
        "--rounds",
        "1",
        "--low-rate-secs",
        "0",
        "--producers",
        "1",
        "--json",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        jetsink(&refs)
    })
    .await
    .expect("bench task");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = json["sections"][0]["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(names[0], "reference x1 connection");
    assert!(names[1].starts_with("jetsink spooled, 1 producer on one sink"));
    assert_eq!(names[2], "reference x4 connections");
    assert!(names[3].starts_with("jetsink spooled, 4 producers on one sink"));
    for row in [&rows[1], &rows[3]] {
        assert_eq!(row["audit"], "ok", "{row}");
        assert!(
            row["vs_reference"]["median"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        let send = &row["send_latency_us"];
        assert!(send["p50"].as_f64().unwrap() > 0.0, "{row}");
        assert!(send["p99"].as_f64().unwrap() >= send["p50"].as_f64().unwrap());
    }
    // Every round's spool is removed; the directory given stays.
    assert_eq!(std::fs::read_dir(&spool_dir).unwrap().count(), 0);
}
