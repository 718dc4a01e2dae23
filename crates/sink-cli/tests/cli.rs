//! The `jetsink` binary end to end: publish, audit, stream, doctor and bad input, against a
//! nats-server each test spawns, plus snapshots of the help texts.

use std::path::Path;
use std::time::Duration;

mod common;

use async_nats::jetstream::stream::{Config, StorageType};
use common::{code, jetsink, row_value, show, stderr, stdout};
use sink_testkit::{NatsServer, ServerOptions, ServerVersion};

async fn server() -> NatsServer {
    NatsServer::start(ServerOptions::version(ServerVersion::V2_9))
        .await
        .expect("start nats-server 2.9")
}

fn event_line(id: &str, tenant: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"/cli-test","type":"com.example.test","data":{{"tenantId":"{tenant}"}}}}"#
    )
}

/// Five lines; line 3 has no `id`.
fn write_file_with_bad_line(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("events.ndjson");
    let lines = [
        event_line("e-1", "acme"),
        event_line("e-2", "globex"),
        r#"{"specversion":"1.0","source":"/cli-test","type":"com.example.test","data":{"tenantId":"acme"}}"#.to_owned(),
        event_line("e-4", "acme"),
        event_line("e-5", "globex"),
    ];
    std::fs::write(&path, lines.join("\n") + "\n").expect("write events");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_goes_through_per_tenant_lanes_on_2_15_and_audit_passes() {
    let server = NatsServer::start(ServerOptions::version(ServerVersion::V2_15))
        .await
        .expect("start nats-server 2.15");
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let sent = dir.path().join("sent.ndjson");
    let sent = sent.to_str().expect("utf-8 path");
    let out = jetsink(&[
        "--url",
        &url,
        "publish",
        "--generate",
        "2000",
        "--tenants",
        "6",
        "--stream-policy",
        "create",
        "--ordering-key",
        "tenant",
        "--lanes",
        "2",
        "--save",
        sent,
    ]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(
        row_value(&text, "delivered").as_deref(),
        Some("2,000"),
        "{text}"
    );
    assert_eq!(
        row_value(&text, "delivery").as_deref(),
        Some("fast-batch lanes (2 lanes)"),
        "{text}"
    );
    let out = jetsink(&["--url", &url, "audit", "--expect", sent]);
    assert_eq!(code(&out), 0, "{}", show(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_events_are_delivered_and_audit_passes() {
    let server = server().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let sent = dir.path().join("sent.ndjson");
    let sent = sent.to_str().expect("utf-8 path");
    let out = jetsink(&[
        "--url",
        &url,
        "publish",
        "--generate",
        "500",
        "--tenants",
        "5",
        "--stream-policy",
        "create",
        "--save",
        sent,
    ]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row_value(&text, "sent").as_deref(), Some("500"), "{text}");
    assert_eq!(
        row_value(&text, "delivered").as_deref(),
        Some("500"),
        "{text}"
    );
    assert_eq!(
        row_value(&text, "undelivered").as_deref(),
        Some("0"),
        "{text}"
    );
    assert_eq!(
        row_value(&text, "delivery").as_deref(),
        Some("per-event acks, chained"),
        "nats-server 2.9 has no fast batches: {text}"
    );

    let out = jetsink(&["--url", &url, "audit", "--expect", sent]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(
        row_value(&text, "messages").as_deref(),
        Some("500"),
        "{text}"
    );
    assert_eq!(row_value(&text, "keys").as_deref(), Some("5"), "{text}");
    assert!(
        text.contains("audit PASSED: expected 500, stored 500"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_fails_when_sent_events_are_missing() {
    let server = server().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let sent = dir.path().join("sent.ndjson");
    let sent = sent.to_str().expect("utf-8 path");
    let out = jetsink(&[
        "--url",
        &url,
        "publish",
        "--generate",
        "20",
        "--stream-policy",
        "create",
        "--save",
        sent,
    ]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    // Claim one more event was sent than the stream holds.
    let mut text = std::fs::read_to_string(sent).expect("read sent");
    text.push_str(&event_line("never-published", "acme"));
    text.push('\n');
    std::fs::write(sent, text).expect("write sent");

    let out = jetsink(&["--url", &url, "audit", "--expect", sent]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("I1 missing"), "{text}");
    assert!(text.contains("audit FAILED"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_line_is_reported_and_the_others_are_delivered() {
    let server = server().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file_with_bad_line(dir.path());
    let file = file.to_str().expect("utf-8 path");

    let out = jetsink(&["--url", &url, "publish", "--stream-policy", "create", file]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("events.ndjson:3: id:"), "{err}");
    assert!(err.contains("attribute `id` is missing"), "{err}");
    let text = stdout(&out);
    assert_eq!(
        row_value(&text, "delivered").as_deref(),
        Some("4"),
        "{text}"
    );
    assert_eq!(
        row_value(&text, "invalid lines").as_deref(),
        Some("1"),
        "{text}"
    );

    let out = jetsink(&["--url", &url, "audit", "--key", "tenant"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row_value(&text, "messages").as_deref(), Some("4"), "{text}");
    assert_eq!(row_value(&text, "acme").as_deref(), Some("2"), "{text}");
    assert_eq!(row_value(&text, "globex").as_deref(), Some("2"), "{text}");
}

/// As the seed, an event without a tenant goes to `single`; `--require-tenant` refuses that one
/// line, naming `data.tenantId`, and delivers the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_a_tenant_goes_to_single_unless_require_tenant() {
    let server = server().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let untenanted = r#"{"specversion":"1.0","id":"e-2","source":"/cli-test","type":"com.example.test","data":{"cell":"c1"}}"#;
    let write = |name: &str, id: &str| {
        let path = dir.path().join(name);
        let lines = [
            event_line(&format!("{id}-1"), "acme"),
            untenanted.replace("e-2", &format!("{id}-2")),
            event_line(&format!("{id}-3"), "globex"),
        ];
        std::fs::write(&path, lines.join("\n") + "\n").expect("write events");
        path.to_str().expect("utf-8 path").to_owned()
    };
    let lenient = write("lenient.ndjson", "l");
    let strict = write("strict.ndjson", "s");

    let out = jetsink(&[
        "--url",
        &url,
        "publish",
        "--stream-policy",
        "create",
        &lenient,
    ]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert_eq!(
        row_value(&stdout(&out), "delivered").as_deref(),
        Some("3"),
        "{}",
        show(&out)
    );

    let out = jetsink(&["--url", &url, "--require-tenant", "publish", &strict]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("strict.ndjson:2: subject:"), "{err}");
    assert!(err.contains("data.tenantId"), "{err}");
    let text = stdout(&out);
    assert_eq!(
        row_value(&text, "delivered").as_deref(),
        Some("2"),
        "{text}"
    );
    assert_eq!(row_value(&text, "rejected").as_deref(), Some("1"), "{text}");

    let out = jetsink(&["--url", &url, "audit", "--key", "subject"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row_value(&text, "messages").as_deref(), Some("5"), "{text}");
    assert_eq!(
        row_value(&text, "cellos.events.single.v1").as_deref(),
        Some("1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_stops_at_the_first_bad_line() {
    let server = server().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file_with_bad_line(dir.path());
    let file = file.to_str().expect("utf-8 path");

    let out = jetsink(&[
        "--url",
        &url,
        "publish",
        "--stream-policy",
        "create",
        "--strict",
        file,
    ]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("events.ndjson:3: id:"), "{err}");
    assert!(err.contains("--strict"), "{err}");
    assert!(!err.contains("events.ndjson:4"), "{err}");

    let out = jetsink(&["--url", &url, "audit"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert_eq!(row_value(&text, "messages").as_deref(), Some("2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_each_drifted_field_with_found_and_required() {
    let server = server().await;
    let client = server.connect().await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(Config {
        name: "CELLOS_EVENTS".into(),
        subjects: vec!["cellos.events.>".into()],
        max_age: Duration::from_secs(30 * 86_400),
        storage: StorageType::Memory,
        duplicate_window: Duration::from_secs(120),
        ..Config::default()
    })
    .await
    .expect("create drifted stream");

    let out = jetsink(&["--url", &server.url(), "stream", "verify"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    let text = stdout(&out);
    let max_age = text
        .lines()
        .find(|l| l.starts_with("max_age "))
        .unwrap_or_default();
    assert!(max_age.contains("30d"), "{text}");
    assert!(max_age.contains(">= 90d"), "{text}");
    assert!(max_age.contains("VIOLATION"), "{text}");
    let storage = text
        .lines()
        .find(|l| l.starts_with("storage "))
        .unwrap_or_default();
    assert!(storage.contains("memory"), "{text}");
    assert!(storage.contains("file"), "{text}");
    assert!(storage.contains("VIOLATION"), "{text}");
    assert!(text.contains("2 violation(s)"), "{text}");

    // ensure never mutates an existing stream: still the same violations.
    let out = jetsink(&["--url", &server.url(), "stream", "ensure"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert!(!stdout(&out).contains("created"), "{}", show(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_creates_a_missing_stream_that_then_verifies() {
    let server = server().await;
    let url = server.url();
    let out = jetsink(&["--url", &url, "stream", "verify"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert!(stdout(&out).contains("does not exist"), "{}", show(&out));

    let out = jetsink(&["--url", &url, "--stream", "ORDERS", "stream", "ensure"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("created stream ORDERS"), "{text}");
    assert!(text.contains("stream meets every requirement"), "{text}");

    let out = jetsink(&["--url", &url, "--stream", "ORDERS", "stream", "verify"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(!stdout(&out).contains("created"), "{}", show(&out));
}

/// On 2.15, `ensure` creates the stream with `allow_batched`; `verify` and `doctor` accept a
/// stream without it (exit 0) and advise turning it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_batched_is_created_on_2_15_and_advised_where_missing() {
    let server = NatsServer::start(ServerOptions::version(ServerVersion::V2_15))
        .await
        .expect("start nats-server 2.15");
    let url = server.url();
    let out = jetsink(&["--url", &url, "stream", "ensure"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("created stream CELLOS_EVENTS"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("allow_batched "))
        .unwrap_or_default();
    assert!(row.contains("true") && row.ends_with("ok"), "{text}");
    assert!(!text.contains("advice"), "{text}");

    let js = async_nats::jetstream::new(server.connect().await.expect("connect"));
    js.delete_stream("CELLOS_EVENTS").await.expect("delete");
    js.create_stream(Config {
        name: "CELLOS_EVENTS".into(),
        subjects: vec!["cellos.events.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Config::default()
    })
    .await
    .expect("create a stream without allow_batched");
    let out = jetsink(&["--url", &url, "stream", "verify"]);
    assert_eq!(code(&out), 0, "advice is not a violation: {}", show(&out));
    let text = stdout(&out);
    let row = text
        .lines()
        .find(|l| l.starts_with("allow_batched "))
        .unwrap_or_default();
    assert!(row.contains("false") && row.ends_with("ADVICE"), "{text}");
    assert!(text.contains("stream meets every requirement"), "{text}");
    assert!(text.contains("1 advice"), "{text}");
    assert!(text.contains("set allow_batched to true"), "{text}");

    let out = jetsink(&["--url", &url, "doctor"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains("PASS  capability    fast-batch publish (allow_batched): yes (2.14+)"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("WARN  stream") && l.contains("allow_batched is false")),
        "{text}"
    );
}

#[test]
fn unreachable_url_exits_2_without_echoing_the_password() {
    let out = jetsink(&[
        "--url",
        "nats://user:s3cret@127.0.0.1:1",
        "publish",
        "--generate",
        "1",
    ]);
    assert_eq!(code(&out), 2, "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to nats://***@127.0.0.1:1"),
        "{err}"
    );
    assert!(!show(&out).contains("s3cret"), "{}", show(&out));
}

#[test]
fn malformed_url_is_named_without_echoing_the_password() {
    let out = jetsink(&[
        "--url",
        "nats://user:s3cret@127.0.0.1:99999",
        "stream",
        "verify",
    ]);
    assert_eq!(code(&out), 2, "{}", show(&out));
    let err = stderr(&out);
    // A URL that does not parse is shown fully redacted, with the parser's reason.
    assert!(err.contains("invalid port number"), "{err}");
    assert!(err.contains("nats://***"), "{err}");
    assert!(!show(&out).contains("s3cret"), "{}", show(&out));
}

#[test]
fn unreadable_creds_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("missing.creds");
    let creds = creds.to_str().expect("utf-8 path");
    let out = jetsink(&["--creds", creds, "publish", "--generate", "1"]);
    assert_eq!(code(&out), 2, "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot read creds file {creds}")),
        "{err}"
    );
}

#[test]
fn invalid_template_names_the_problem() {
    let out = jetsink(&[
        "--subject-template",
        "cellos.{tenant}.v1",
        "publish",
        "--generate",
        "1",
    ]);
    assert_eq!(code(&out), 2, "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("subject template \"cellos.{tenant}.v1\""),
        "{err}"
    );
    assert!(err.contains("unknown placeholder {tenant}"), "{err}");
}

#[test]
fn unknown_config_file_key_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jetsink.toml");
    std::fs::write(
        &path,
        "stream = \"A\"\nsubjet_template = \"x.{tenantId}\"\n",
    )
    .expect("write");
    let out = jetsink(&[
        "--config",
        path.to_str().expect("utf-8"),
        "stream",
        "verify",
    ]);
    assert_eq!(code(&out), 2, "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("jetsink.toml:2"), "{err}");
    assert!(err.contains("subjet_template"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_against_a_server_configured_by_file() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jetsink.toml");
    std::fs::write(&path, format!("url = \"{}\"\n", server.url())).expect("write");
    let config = path.to_str().expect("utf-8");

    let out = jetsink(&["--config", config, "doctor"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = stdout(&out);
    for check in ["connectivity", "auth", "server", "jetstream"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("PASS") && l.contains(check)),
            "no PASS line for {check}:\n{text}"
        );
    }
    assert!(text.contains("nats-server 2.9."), "{text}");
    assert!(
        text.contains("atomic batch publish: no (needs 2.12)"),
        "{text}"
    );
    assert!(text.contains("WARN  stream"), "{text}");

    // A flag beats the file: the same command pointed elsewhere fails to connect.
    let out = jetsink(&["--config", config, "--url", "nats://127.0.0.1:1", "doctor"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert!(
        stdout(&out).contains("FAIL  connectivity"),
        "{}",
        show(&out)
    );
}

#[test]
fn help_texts() {
    // `bench` and `demo` exist only in a `lab` build, so the top-level help has one snapshot each.
    let top = if cfg!(feature = "lab") {
        "help_lab"
    } else {
        "help"
    };
    let mut cases = vec![
        (top, &["--help"][..]),
        ("help_publish", &["publish", "--help"][..]),
        ("help_stream", &["stream", "--help"][..]),
        ("help_stream_ensure", &["stream", "ensure", "--help"][..]),
        ("help_stream_verify", &["stream", "verify", "--help"][..]),
        ("help_audit", &["audit", "--help"][..]),
        ("help_doctor", &["doctor", "--help"][..]),
    ];
    if cfg!(feature = "lab") {
        cases.push(("help_bench", &["bench", "--help"][..]));
        cases.push(("help_demo", &["demo", "--help"][..]));
    }
    for (name, args) in cases {
        let out = jetsink(args);
        assert_eq!(code(&out), 0, "{name}: {}", show(&out));
        insta::assert_snapshot!(name, stdout(&out));
    }
}
