//! The stream's `allow_batched` (fast-batch publishing, 2.14+) on real servers: Create sets it only
//! where the server has it, facts read it both ways, and Verify accepts a 2.15 stream without it
//! while warning what it costs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sink_nats::sink_core::capability::ServerVersion as Version;
use sink_nats::sink_core::stream::{advise, StreamFacts};
use sink_nats::{new_stream_config, read_stream_facts, StreamPolicy};
use sink_testkit::{NatsServer, ServerVersion};
use tracing_subscriber::fmt::MakeWriter;

/// Everything the sink logs at WARN or above while the guard lives (on this thread, so the
/// tests run on the current-thread runtime, where the sink's tasks run too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// The `config` of `$JS.API.STREAM.INFO.<STREAM>`, as the server wrote it.
async fn raw_config(server: &NatsServer) -> serde_json::Value {
    let js = jetstream(server).await;
    let reply: serde_json::Value = js
        .request(format!("STREAM.INFO.{STREAM}"), &())
        .await
        .expect("info request");
    reply.get("config").cloned().unwrap_or_else(|| {
        panic!("no config in {reply}");
    })
}

/// The version the server reports to a client.
async fn version_of(server: &NatsServer) -> Option<Version> {
    let client = server.connect().await.expect("client");
    Version::parse(&client.server_info().version)
}

/// `Create` makes the stream, delivers into it, and the stream has `allow_batched` exactly when
/// the server knows the setting; no warning either way.
async fn create_sets_allow_batched_where_known(version: ServerVersion, want: bool) {
    let server = server(version).await;
    let logs = Logs::default();
    let _guard = logs.capture();
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Create)
        .connect()
        .await
        .expect("creates the stream");
    sink.emit(&event("batched", 0, 1)).await.expect("delivered");
    let config = raw_config(&server).await;
    assert_eq!(
        config
            .get("allow_batched")
            .and_then(serde_json::Value::as_bool),
        want.then_some(true),
        "nats-server {version}: {config}"
    );
    let js = jetstream(&server).await;
    let facts = read_stream_facts(&js, STREAM)
        .await
        .expect("read")
        .expect("created");
    assert_eq!(facts.allow_batched, want);
    assert!(advise(&facts, version_of(&server).await).is_empty());
    assert!(sink.health().stream_violations.is_empty());
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
    let text = logs.text();
    assert!(!text.contains("allow_batched"), "{text}");
}

#[tokio::test]
async fn create_turns_allow_batched_on_on_2_15() {
    create_sets_allow_batched_where_known(ServerVersion::V2_15, true).await;
}

#[tokio::test]
async fn create_leaves_allow_batched_out_on_2_12() {
    create_sets_allow_batched_where_known(ServerVersion::V2_12, false).await;
}

#[tokio::test]
async fn create_leaves_allow_batched_out_on_2_9() {
    create_sets_allow_batched_where_known(ServerVersion::V2_9, false).await;
}

/// A 2.15 stream without `allow_batched` passes Verify and takes events; the start check warns
/// with the field, the fix and the cost, and changes nothing.
#[tokio::test]
async fn verify_accepts_a_2_15_stream_without_allow_batched_and_warns() {
    let server = server(ServerVersion::V2_15).await;
    let js = jetstream(&server).await;
    js.create_stream(new_stream_config(STREAM, vec!["t.events.*.v1".into()]))
        .await
        .expect("create");
    let logs = Logs::default();
    let _guard = logs.capture();
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Verify)
        .connect()
        .await
        .expect("no allow_batched is not a violation");
    sink.emit(&event("plain", 0, 1)).await.expect("delivered");
    assert!(sink.health().stream_violations.is_empty());
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");

    let text = logs.text();
    let version = version_of(&server).await.expect("a version");
    let on_version = format!("nats-server {version}");
    let line = text
        .lines()
        .find(|l| l.contains("allow_batched is false"))
        .unwrap_or_else(|| panic!("no allow_batched warning in:\n{text}"));
    for needle in [
        "WARN",
        STREAM,
        &on_version,
        "one acknowledgement per event",
        "chained on this single-replica stream",
        "set allow_batched to true",
        "--allow-fast",
    ] {
        assert!(line.contains(needle), "missing {needle:?} in {line}");
    }
    let facts = read_stream_facts(&js, STREAM)
        .await
        .expect("read")
        .expect("exists");
    assert!(!facts.allow_batched, "Verify changes nothing");
    let advice = advise(&facts, version_of(&server).await);
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert_eq!(advice[0].field(), "allow_batched");
    assert_eq!(advice[0].stream(), STREAM);
}

/// Facts read `allow_batched` both ways on 2.15, including after the edit the advice asks for.
#[tokio::test]
async fn facts_read_allow_batched_off_on_and_after_an_edit_on_2_15() {
    let server = server(ServerVersion::V2_15).await;
    let js = jetstream(&server).await;
    let create = |name: &str, batched: bool| {
        let mut config = serde_json::to_value(new_stream_config(
            name,
            vec![format!("{}.>", name.to_lowercase())],
        ))
        .expect("json");
        if batched {
            config["allow_batched"] = true.into();
        }
        config
    };
    for (name, batched) in [("OFF", false), ("ON", true)] {
        let reply: serde_json::Value = js
            .request(format!("STREAM.CREATE.{name}"), &create(name, batched))
            .await
            .expect("create request");
        assert!(reply.get("error").is_none(), "{reply}");
        let facts = read_stream_facts(&js, name)
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(facts.allow_batched, batched, "{name}");
        assert_eq!(
            facts,
            StreamFacts {
                allow_batched: batched,
                ..StreamFacts::recommended(name, vec![format!("{}.>", name.to_lowercase())])
            }
        );
    }
    // The fix the advice names: an edit of the existing stream's config.
    let reply: serde_json::Value = js
        .request("STREAM.UPDATE.OFF".to_owned(), &create("OFF", true))
        .await
        .expect("update request");
    assert!(reply.get("error").is_none(), "{reply}");
    let facts = read_stream_facts(&js, "OFF")
        .await
        .expect("read")
        .expect("exists");
    assert!(facts.allow_batched);
    assert!(advise(&facts, version_of(&server).await).is_empty());
}

/// Why Create never sends the field to an older server: 2.12.8 refuses the whole create, and
/// 2.9.10 makes the stream without it. Facts read false on both.
async fn older_server_and_allow_batched(version: ServerVersion) {
    let server = server(version).await;
    let js = jetstream(&server).await;
    let mut config = serde_json::to_value(new_stream_config(STREAM, vec!["t.events.*.v1".into()]))
        .expect("json");
    config["allow_batched"] = true.into();
    let reply: serde_json::Value = js
        .request(format!("STREAM.CREATE.{STREAM}"), &config)
        .await
        .expect("create request");
    let stored = read_stream_facts(&js, STREAM).await.expect("read");
    match version {
        ServerVersion::V2_12 => {
            let err = reply.get("error").unwrap_or_else(|| panic!("{reply}"));
            assert_eq!(err["err_code"], 10025, "{reply}");
            let text = err["description"].as_str().unwrap_or_default();
            assert!(text.contains("unknown field \"allow_batched\""), "{reply}");
            assert_eq!(stored, None, "nothing created");
        }
        _ => {
            assert!(reply.get("error").is_none(), "{reply}");
            assert!(raw_config(&server).await.get("allow_batched").is_none());
            assert!(!stored.expect("created").allow_batched, "silently dropped");
        }
    }
}

#[tokio::test]
async fn a_create_with_allow_batched_is_refused_by_2_12() {
    older_server_and_allow_batched(ServerVersion::V2_12).await;
}

#[tokio::test]
async fn a_create_with_allow_batched_loses_the_field_on_2_9() {
    older_server_and_allow_batched(ServerVersion::V2_9).await;
}
