//! F10 and F26 on real servers: stream drift and settings that evict, rewrite or refuse events are
//! refused with every violation named, the retention floor's edges are accepted, and the Create
//! policy creates a clean stream and never mutates an existing one.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream::{Config, StorageType};
use common::*;
use sink_nats::{new_stream_config, read_stream_facts, StartError, StreamPolicy};
use sink_testkit::ServerVersion;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// max_age 30 d, a 100 ms duplicate window, memory storage.
fn drifted() -> Config {
    Config {
        max_age: DAY * 30,
        duplicate_window: Duration::from_millis(100),
        storage: StorageType::Memory,
        ..new_stream_config(STREAM, vec!["t.events.*.v1".into()])
    }
}

async fn stored_config(js: &async_nats::jetstream::Context) -> Config {
    js.get_stream(STREAM)
        .await
        .expect("stream exists")
        .info()
        .await
        .expect("info")
        .config
        .clone()
}

async fn drift_is_refused(version: ServerVersion, policy: StreamPolicy) {
    let server = server(version).await;
    let js = jetstream(&server).await;
    js.create_stream(drifted()).await.expect("create drifted");
    let before = stored_config(&js).await;
    let err = builder(&server.url())
        .stream_policy(policy)
        .connect()
        .await
        .expect_err("a drifted stream is refused");
    let StartError::StreamViolations { stream, violations } = &err else {
        panic!("expected StreamViolations, got {err:?}");
    };
    assert_eq!(stream, STREAM);
    let mut fields: Vec<&str> = violations.iter().map(|v| v.field()).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["duplicate_window", "max_age", "storage"], "{err}");
    let text = err.to_string();
    println!("F10 {version} {policy:?}:\n{text}");
    // Each violation is named with the found and the required value. The builder's retry span is
    // 2 s ack timeout * 3 attempts + 100 ms + 400 ms = 6.5 s.
    for needle in [
        STREAM,
        "max_age",
        "30d",
        "90d",
        "duplicate_window",
        "100ms",
        "6s500ms",
        "storage",
        "memory",
        "file",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let after = stored_config(&js).await;
    assert_eq!(after.max_age, before.max_age, "never mutated");
    assert_eq!(after.duplicate_window, before.duplicate_window);
    assert_eq!(after.storage, StorageType::Memory);
    assert_eq!(after.max_age, DAY * 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_each_drifted_setting_with_found_and_required_on_2_9() {
    drift_is_refused(ServerVersion::V2_9, StreamPolicy::Verify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_each_drifted_setting_with_found_and_required_on_2_15() {
    drift_is_refused(ServerVersion::V2_15, StreamPolicy::Verify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_a_drifted_stream_and_leaves_it_unchanged_on_2_9() {
    drift_is_refused(ServerVersion::V2_9, StreamPolicy::Create).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_a_drifted_stream_and_leaves_it_unchanged_on_2_15() {
    drift_is_refused(ServerVersion::V2_15, StreamPolicy::Create).await;
}

async fn retention_edges_are_accepted(version: ServerVersion) {
    for max_age in [Duration::ZERO, DAY * 90] {
        let server = server(version).await;
        let js = jetstream(&server).await;
        js.create_stream(Config {
            max_age,
            ..new_stream_config(STREAM, vec!["t.events.*.v1".into()])
        })
        .await
        .expect("create");
        let sink = builder(&server.url())
            .stream_policy(StreamPolicy::Verify)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("max_age {max_age:?} meets the floor: {e}"));
        sink.emit(&event("edge", 0, 1)).await.expect("delivered");
        assert_eq!(stored_count(&server, STREAM).await, 1);
        assert_eq!(stored_config(&js).await.max_age, max_age);
        let close = sink.close(Duration::from_secs(5)).await;
        assert!(close.complete(), "{close:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accepts_unlimited_and_exactly_90_days_on_2_9() {
    retention_edges_are_accepted(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accepts_unlimited_and_exactly_90_days_on_2_15() {
    retention_edges_are_accepted(ServerVersion::V2_15).await;
}

async fn a_second_short_of_the_floor_is_refused(version: ServerVersion) {
    let server = server(version).await;
    let js = jetstream(&server).await;
    js.create_stream(Config {
        max_age: DAY * 90 - Duration::from_secs(1),
        ..new_stream_config(STREAM, vec!["t.events.*.v1".into()])
    })
    .await
    .expect("create");
    let err = builder(&server.url())
        .stream_policy(StreamPolicy::Verify)
        .connect()
        .await
        .expect_err("below the floor");
    let StartError::StreamViolations { violations, .. } = &err else {
        panic!("expected StreamViolations, got {err:?}");
    };
    assert_eq!(violations.len(), 1, "{err}");
    assert_eq!(violations[0].field(), "max_age");
    assert!(err.to_string().contains("89d23h59m59s"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_a_second_short_of_90_days_on_2_9() {
    a_second_short_of_the_floor_is_refused(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_a_second_short_of_90_days_on_2_15() {
    a_second_short_of_the_floor_is_refused(ServerVersion::V2_15).await;
}

/// Our stream is deleted mid-run and another stream takes over its subjects. Chained publishes
/// name their predecessor, which the impostor does not hold; the re-anchor and the probes carry
/// `Nats-Expected-Stream`. So nothing lands in the impostor: events stay queued (retryable,
/// breaker) and are delivered, in order, once our stream is back.
async fn impostor_stream_stores_nothing(version: ServerVersion) {
    let server = server(version).await;
    let js = jetstream(&server).await;
    js.create_stream(new_stream_config(STREAM, vec!["t.events.*.v1".into()]))
        .await
        .expect("create");
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Verify)
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    let before = send_all(&sink, "impostor-before", 50, 3).await;
    assert_all_ok(&before);

    js.delete_stream(STREAM).await.expect("delete ours");
    let impostor = "IMPOSTOR";
    js.create_stream(new_stream_config(impostor, vec!["t.events.*.v1".into()]))
        .await
        .expect("impostor takes the subjects");
    let mut pending = Vec::new();
    for i in 0..100 {
        let e = event("impostor-after", i, 3);
        let p = sink.send(e.clone()).await.expect("queued");
        pending.push((e, p));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let h = sink.health();
        if h.breaker == sink_nats::BreakerStatus::Open {
            assert!(
                h.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("10060") || e.contains("expected stream")),
                "{h:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "breaker never opened: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut info = js.get_stream(impostor).await.expect("impostor");
    assert_eq!(
        info.info().await.expect("info").state.messages,
        0,
        "nothing may be stored in a stream that is not ours"
    );

    js.delete_stream(impostor).await.expect("delete impostor");
    js.create_stream(new_stream_config(STREAM, vec!["t.events.*.v1".into()]))
        .await
        .expect("ours again");
    let after = await_outcomes(pending).await;
    assert_all_ok(&after);
    let report = audit(&server.url(), &after).await;
    report.assert_passed();
    assert_eq!(report.stored, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_replacing_ours_on_the_same_subjects_stores_nothing_on_2_9() {
    impostor_stream_stores_nothing(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_replacing_ours_on_the_same_subjects_stores_nothing_on_2_15() {
    impostor_stream_stores_nothing(ServerVersion::V2_15).await;
}

/// Creates `STREAM` from raw JSON: async-nats 0.51 (as this workspace builds it) has no fields for
/// the settings of 2.10+ servers, which is the reason the sink reads raw JSON too.
async fn create_raw(js: &async_nats::jetstream::Context, config: serde_json::Value) {
    let mut config = config;
    config["name"] = STREAM.into();
    let reply: serde_json::Value = js
        .request(format!("STREAM.CREATE.{STREAM}"), &config)
        .await
        .expect("create request");
    assert!(reply.get("error").is_none(), "create {config}: {reply}");
}

/// One stream setting that can evict, rewrite or refuse our events, what Verify must name
/// (every field, in order) and what its message must contain.
struct Lossy {
    config: serde_json::Value,
    fields: &'static [&'static str],
    needles: &'static [&'static str],
}

/// A clean stream for `t.events.*.v1` (90 days, 2 min dedup, file) with `extra` merged in.
fn clean_with(extra: serde_json::Value) -> serde_json::Value {
    let mut config = serde_json::json!({
        "subjects": ["t.events.*.v1"],
        "retention": "limits",
        "storage": "file",
        "max_age": (DAY * 90).as_nanos() as u64,
        "duplicate_window": 120_000_000_000u64,
        "num_replicas": 1,
    });
    for (k, v) in extra.as_object().expect("object") {
        config[k] = v.clone();
    }
    config
}

/// What both supported servers know.
fn lossy_everywhere() -> Vec<Lossy> {
    use serde_json::json;
    vec![
        Lossy {
            config: clean_with(json!({ "max_msgs_per_subject": 10 })),
            fields: &["max_msgs_per_subject"],
            needles: &[
                "max_msgs_per_subject is 10",
                "older ones are deleted",
                "set max_msgs_per_subject to -1",
            ],
        },
        Lossy {
            config: clean_with(json!({
                "max_msgs_per_subject": 10,
                "discard": "new",
                "discard_new_per_subject": true,
            })),
            fields: &["max_msgs_per_subject"],
            needles: &[
                "max_msgs_per_subject is 10 with discard_new_per_subject",
                "refuses every further event",
                "discard_new_per_subject to false",
            ],
        },
        Lossy {
            config: clean_with(json!({ "allow_rollup_hdrs": true })),
            fields: &["allow_rollup_hdrs"],
            needles: &[
                "allow_rollup_hdrs is true",
                "Nats-Rollup",
                "set allow_rollup_hdrs to false",
            ],
        },
        Lossy {
            // A mirror has no subjects and no duplicate window of its own.
            config: json!({ "mirror": { "name": "ORIGIN" }, "storage": "file", "num_replicas": 1 }),
            fields: &["subjects", "duplicate_window", "mirror"],
            needles: &[
                "mirror is \"ORIGIN\"",
                "accepts no publishes",
                "not a mirror",
            ],
        },
    ]
}

/// What only 2.10+ (transforms), 2.11+ (delete markers) and 2.12+ (persist mode, counters,
/// schedules) servers know.
fn lossy_on_2_15() -> Vec<Lossy> {
    use serde_json::json;
    vec![
        Lossy {
            config: clean_with(json!({
                "subject_transform": { "src": "t.events.*.v1", "dest": "t.archive.{{wildcard(1)}}" },
            })),
            fields: &["subject_transform"],
            needles: &[
                "subject_transform maps \"t.events.*.v1\" to \"t.archive.{{wildcard(1)}}\"",
                "remove the subject transform",
            ],
        },
        Lossy {
            config: clean_with(json!({ "persist_mode": "async" })),
            fields: &["persist_mode"],
            needles: &[
                "persist_mode is async",
                "acknowledged before they are written",
                "persist_mode default",
            ],
        },
        Lossy {
            config: clean_with(json!({ "allow_msg_counter": true })),
            fields: &["allow_msg_counter"],
            needles: &["allow_msg_counter is true", "Nats-Incr", "without counters"],
        },
        Lossy {
            // The server turns rollups on for schedules.
            config: clean_with(json!({ "allow_msg_schedules": true })),
            fields: &["allow_rollup_hdrs", "allow_msg_schedules"],
            needles: &["allow_msg_schedules is true", "Nats-Schedule-Rollup"],
        },
        Lossy {
            // The server turns rollups on for delete markers; the markers evict nothing.
            config: clean_with(json!({ "subject_delete_marker_ttl": 60_000_000_000u64 })),
            fields: &["allow_rollup_hdrs"],
            needles: &["subject_delete_marker_ttl to 0 first"],
        },
    ]
}

/// F26: each lossy setting on a pre-created stream is refused at start, named with its value and
/// the fix, and the stream is left as it was.
async fn lossy_settings_are_refused(version: ServerVersion, cases: Vec<Lossy>) {
    let server = server(version).await;
    let js = jetstream(&server).await;
    js.create_stream(new_stream_config("ORIGIN", vec!["origin.>".into()]))
        .await
        .expect("origin for the mirror");
    for case in cases {
        create_raw(&js, case.config.clone()).await;
        let before = read_stream_facts(&js, STREAM).await.expect("read");
        for policy in [StreamPolicy::Verify, StreamPolicy::Create] {
            let err = builder(&server.url())
                .stream_policy(policy)
                .connect()
                .await
                .expect_err("a lossy stream is refused");
            let StartError::StreamViolations { violations, .. } = &err else {
                panic!("{}: expected StreamViolations, got {err:?}", case.config);
            };
            let fields: Vec<&str> = violations.iter().map(|v| v.field()).collect();
            assert_eq!(fields, case.fields, "{} {policy:?}: {err}", case.config);
            let text = err.to_string();
            for needle in case.needles {
                assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
            }
            println!("F26 {version} {policy:?}:\n{text}");
        }
        assert_eq!(
            read_stream_facts(&js, STREAM).await.expect("read"),
            before,
            "never mutated"
        );
        js.delete_stream(STREAM).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_per_subject_limits_rollups_and_mirrors_naming_value_and_fix_on_2_9() {
    lossy_settings_are_refused(ServerVersion::V2_9, lossy_everywhere()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_per_subject_limits_rollups_and_mirrors_naming_value_and_fix_on_2_15() {
    lossy_settings_are_refused(ServerVersion::V2_15, lossy_everywhere()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_transforms_async_persist_counters_and_schedules_on_2_15() {
    lossy_settings_are_refused(ServerVersion::V2_15, lossy_on_2_15()).await;
}

/// The Create policy makes a stream with none of the refused settings, as the server reports it,
/// and with `allow_batched` on 2.15.
async fn created_stream_is_clean(version: ServerVersion) {
    let server = server(version).await;
    let sink = builder(&server.url())
        .stream_policy(StreamPolicy::Create)
        .connect()
        .await
        .expect("creates the stream");
    let js = jetstream(&server).await;
    let facts = read_stream_facts(&js, STREAM)
        .await
        .expect("read")
        .expect("created");
    // Where the server has fast-batch publishing (2.14+), Create allows it too.
    assert_eq!(
        facts,
        sink_nats::sink_core::stream::StreamFacts {
            allow_batched: version == ServerVersion::V2_15,
            ..sink_nats::sink_core::stream::StreamFacts::recommended(
                STREAM,
                vec!["t.events.*.v1".into()]
            )
        }
    );
    assert!(sink.health().stream_violations.is_empty());
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_a_stream_without_any_refused_setting_on_2_9() {
    created_stream_is_clean(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_a_stream_without_any_refused_setting_on_2_15() {
    created_stream_is_clean(ServerVersion::V2_15).await;
}
