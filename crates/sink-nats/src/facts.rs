//! Reads a stream's configuration from the raw JetStream API reply into sink-core's broker-neutral [`StreamFacts`].
//!
//! async-nats 0.51's `stream::Config` gates the settings of servers 2.10+ (subject transforms,
//! message TTLs and delete markers, counters, schedules) behind cargo features this workspace does
//! not enable, and serde silently drops what a struct lacks. A setting that can delete or rewrite
//! our events must never be dropped that way, so the facts come from the JSON of
//! `$JS.API.STREAM.INFO.<name>` itself. A field a server does not know (2.9.10 has no
//! `persist_mode`) is absent from its reply and reads as the broker's default.
//!
//! The `Create` policy's stream goes out as raw JSON too ([`create_stream`]), for the same reason in
//! the other direction: `allow_batched` (2.14+) has no field in async-nats as built here.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, context::RequestErrorKind};
use serde::Deserialize;
use sink_core::capability::{fast_batch_supported, ServerVersion};
use sink_core::stream::{
    DiscardKind, PersistMode, RetentionKind, StorageKind, StreamFacts, SubjectTransform,
};

/// JetStream: stream not found.
const STREAM_NOT_FOUND: u16 = 10059;
/// JetStream: not enabled on the server / for the account.
const JETSTREAM_NOT_ENABLED: [u16; 2] = [10076, 10039];

/// Why a stream's configuration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamInfoError {
    /// Nothing answered the JetStream API, or JetStream is disabled.
    #[error(
        "JetStream did not answer about stream {stream}: {reason}; start nats-server with -js \
         and check that the account has JetStream"
    )]
    Unavailable {
        /// The stream name.
        stream: String,
        /// What the client or the server said.
        reason: String,
    },
    /// The JetStream API answered with an error.
    #[error("stream {stream}: JetStream error {code}: {description}")]
    Api {
        /// The stream name.
        stream: String,
        /// The JetStream error code (e.g. 10059).
        code: u16,
        /// The server's description.
        description: String,
    },
    /// The request failed (timeout, connection lost).
    #[error("stream {stream}: info request failed: {reason}; retry once the server is reachable")]
    Request {
        /// The stream name.
        stream: String,
        /// The client's reason.
        reason: String,
    },
    /// The reply is not a stream info the sink understands (e.g. an unknown `persist_mode`).
    #[error("stream {stream}: the info reply cannot be read: {reason}")]
    Malformed {
        /// The stream name.
        stream: String,
        /// What could not be read, naming the field.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
struct InfoReply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    config: Option<RawConfig>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

/// The stream config fields the checks read, as the server writes them (Go's `StreamConfig`:
/// durations in nanoseconds, enums as lower-case strings, `omitempty` fields absent).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    name: String,
    subjects: Option<Vec<String>>,
    retention: String,
    max_msgs: i64,
    max_bytes: i64,
    max_age: i64,
    max_msgs_per_subject: i64,
    max_msg_size: i32,
    discard: String,
    storage: String,
    num_replicas: i64,
    no_ack: bool,
    duplicate_window: i64,
    mirror: Option<RawSource>,
    sealed: bool,
    deny_delete: bool,
    deny_purge: bool,
    allow_rollup_hdrs: bool,
    discard_new_per_subject: bool,
    allow_msg_schedules: bool,
    subject_delete_marker_ttl: i64,
    subject_transform: Option<RawTransform>,
    persist_mode: String,
    allow_msg_counter: bool,
    allow_batched: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSource {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTransform {
    src: String,
    dest: String,
}

/// Reads stream `name`'s facts with one `STREAM.INFO` request; `Ok(None)` when it does not exist.
pub async fn read_stream_facts(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<StreamFacts>, StreamInfoError> {
    let reply = api_request(js, format!("STREAM.INFO.{name}"), &(), name).await?;
    facts_from_reply(name, serde_json::from_value(reply))
}

/// One JetStream API request (`subject` without the `$JS.API.` prefix) about stream `name`,
/// answered as raw JSON.
async fn api_request<T: serde::Serialize + ?Sized>(
    js: &jetstream::Context,
    subject: String,
    body: &T,
    name: &str,
) -> Result<serde_json::Value, StreamInfoError> {
    let reply: Result<serde_json::Value, _> = js.request(subject, body).await;
    match reply {
        Ok(value) => Ok(value),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => Err(StreamInfoError::Unavailable {
            stream: name.to_owned(),
            reason: "no responders".to_owned(),
        }),
        Err(e) => Err(StreamInfoError::Request {
            stream: name.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Parses the JSON of a `STREAM.INFO` (or `STREAM.CREATE`) reply for stream `name`; `Ok(None)`
/// when the server says the stream does not exist.
pub fn facts_from_json(name: &str, reply: &[u8]) -> Result<Option<StreamFacts>, StreamInfoError> {
    facts_from_reply(name, serde_json::from_slice(reply))
}

fn facts_from_reply(
    name: &str,
    reply: Result<InfoReply, serde_json::Error>,
) -> Result<Option<StreamFacts>, StreamInfoError> {
    let malformed = |reason: String| StreamInfoError::Malformed {
        stream: name.to_owned(),
        reason,
    };
    let reply = reply.map_err(|e| malformed(e.to_string()))?;
    if let Some(err) = reply.error {
        let code = if err.err_code != 0 {
            err.err_code
        } else {
            err.code
        };
        return match code {
            STREAM_NOT_FOUND => Ok(None),
            c if JETSTREAM_NOT_ENABLED.contains(&c) => Err(StreamInfoError::Unavailable {
                stream: name.to_owned(),
                reason: err.description,
            }),
            _ => Err(StreamInfoError::Api {
                stream: name.to_owned(),
                code,
                description: err.description,
            }),
        };
    }
    let c = reply
        .config
        .ok_or_else(|| malformed("no `config` in the reply".to_owned()))?;
    facts_from_config(c).map(Some).map_err(malformed)
}

fn facts_from_config(c: RawConfig) -> Result<StreamFacts, String> {
    let unknown = |field: &str, value: &str| {
        format!("unknown {field} {value:?}; this sink knows the settings of nats-server up to 2.15")
    };
    let nanos = |n: i64| Duration::from_nanos(u64::try_from(n).unwrap_or(0));
    Ok(StreamFacts {
        name: c.name,
        subjects: c.subjects.unwrap_or_default(),
        max_age: nanos(c.max_age),
        duplicate_window: nanos(c.duplicate_window),
        storage: match c.storage.as_str() {
            "file" | "" => StorageKind::File,
            "memory" => StorageKind::Memory,
            other => return Err(unknown("storage", other)),
        },
        retention: match c.retention.as_str() {
            "limits" | "" => RetentionKind::Limits,
            "interest" => RetentionKind::Interest,
            "workqueue" => RetentionKind::WorkQueue,
            other => return Err(unknown("retention", other)),
        },
        discard: match c.discard.as_str() {
            "old" | "" => DiscardKind::Old,
            "new" => DiscardKind::New,
            other => return Err(unknown("discard", other)),
        },
        replicas: u32::try_from(c.num_replicas).unwrap_or(0),
        sealed: c.sealed,
        no_ack: c.no_ack,
        max_msgs: c.max_msgs,
        max_bytes: c.max_bytes,
        max_msg_size: c.max_msg_size,
        deny_delete: c.deny_delete,
        deny_purge: c.deny_purge,
        max_msgs_per_subject: c.max_msgs_per_subject,
        discard_new_per_subject: c.discard_new_per_subject,
        allow_rollup: c.allow_rollup_hdrs,
        allow_msg_schedules: c.allow_msg_schedules,
        subject_delete_marker_ttl: nanos(c.subject_delete_marker_ttl),
        subject_transform: c.subject_transform.map(|t| SubjectTransform {
            source: t.src,
            destination: t.dest,
        }),
        persist_mode: match c.persist_mode.as_str() {
            "default" | "" => PersistMode::Default,
            "async" => PersistMode::Async,
            other => return Err(unknown("persist_mode", other)),
        },
        allow_msg_counter: c.allow_msg_counter,
        mirror: c.mirror.map(|m| m.name),
        allow_batched: c.allow_batched,
    })
}

/// The config the `Create` policy uses: sink-core's recommended facts (file storage, max_age 90
/// days, duplicate window 2 min, and none of the settings `verify` refuses) as an async-nats
/// stream config.
pub fn new_stream_config(name: &str, subjects: Vec<String>) -> Config {
    let facts = StreamFacts::recommended(name, subjects);
    Config {
        name: facts.name,
        subjects: facts.subjects,
        max_age: facts.max_age,
        duplicate_window: facts.duplicate_window,
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        num_replicas: facts.replicas as usize,
        max_messages: facts.max_msgs,
        max_bytes: facts.max_bytes,
        max_message_size: facts.max_msg_size,
        max_messages_per_subject: facts.max_msgs_per_subject,
        discard_new_per_subject: facts.discard_new_per_subject,
        allow_rollup: facts.allow_rollup,
        no_ack: facts.no_ack,
        sealed: facts.sealed,
        mirror: None,
        // Absent: 2.9 does not know the field, and newer servers default to acknowledging after
        // the write.
        persist_mode: None,
        ..Config::default()
    }
}

/// The body of the `STREAM.CREATE` request the `Create` policy sends to a server of `server`:
/// [`new_stream_config`], plus `"allow_batched": true` where the server has fast-batch publishing
/// ([`fast_batch_supported`], 2.14+).
///
/// Never sent to an older or unknown version: 2.12.8 refuses a create carrying the field (10025
/// "unknown field"), and 2.9.10 makes the stream without it, which would claim a setting the
/// stream does not have.
pub fn new_stream_request(
    name: &str,
    subjects: Vec<String>,
    server: Option<ServerVersion>,
) -> serde_json::Value {
    let mut body = serde_json::to_value(new_stream_config(name, subjects))
        .expect("a stream config serializes to JSON");
    if server.as_ref().is_some_and(fast_batch_supported) {
        body["allow_batched"] = true.into();
    }
    body
}

/// Creates stream `name` capturing `subjects` as the `Create` policy does
/// ([`new_stream_request`] for a server of `server`) and returns the created stream's facts, as
/// the server reports them.
///
/// Like async-nats' `create_stream`, this succeeds without change when an identical stream
/// exists, and fails (JetStream error 10058) when a different one does.
pub async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: Vec<String>,
    server: Option<ServerVersion>,
) -> Result<StreamFacts, StreamInfoError> {
    let body = new_stream_request(name, subjects, server);
    let reply = api_request(js, format!("STREAM.CREATE.{name}"), &body, name).await?;
    facts_from_reply(name, serde_json::from_value(reply))?.ok_or_else(|| {
        StreamInfoError::Malformed {
            stream: name.to_owned(),
            reason: "the create reply says the stream does not exist".to_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sink_core::stream::{verify, StreamRequirements, Violation};

    fn req(filter: &str) -> StreamRequirements {
        StreamRequirements::for_subject_filter(filter, Duration::from_millis(500))
    }

    fn fields(facts: &StreamFacts, filter: &str) -> Vec<&'static str> {
        verify(facts, &req(filter))
            .iter()
            .map(Violation::field)
            .collect()
    }

    /// Replies captured from nats-server 2.9.10 and 2.15.1 (`state` and timestamps trimmed).
    const GOOD_2_9: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","total":0,"offset":0,"limit":0,"config":{"name":"GOOD","subjects":["a.\u003e"],"retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":7776000000000000,"max_msgs_per_subject":-1,"max_msg_size":-1,"discard":"old","storage":"file","num_replicas":1,"duplicate_window":120000000000,"allow_direct":false,"mirror_direct":false,"sealed":false,"deny_delete":false,"deny_purge":false,"allow_rollup_hdrs":false}}"#;
    const BAD_2_15: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","total":0,"offset":0,"limit":0,"config":{"name":"BAD","subjects":["b.\u003e"],"retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"max_msgs_per_subject":5,"max_msg_size":-1,"discard":"old","storage":"file","num_replicas":1,"duplicate_window":120000000000,"compression":"none","subject_transform":{"src":"b.\u003e","dest":"c.\u003e"},"allow_direct":false,"mirror_direct":false,"sealed":false,"deny_delete":false,"deny_purge":false,"allow_rollup_hdrs":true,"consumer_limits":{},"allow_msg_ttl":false,"persist_mode":"async","metadata":{"_nats.level":"5","_nats.req.level":"2","_nats.ver":"2.15.1"}}}"#;
    const COUNTER_2_15: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","config":{"name":"CNT","subjects":["c2.\u003e"],"retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"max_msgs_per_subject":-1,"max_msg_size":-1,"discard":"old","storage":"file","num_replicas":1,"duplicate_window":120000000000,"compression":"none","allow_direct":false,"mirror_direct":false,"sealed":false,"deny_delete":false,"deny_purge":false,"allow_rollup_hdrs":false,"consumer_limits":{},"allow_msg_ttl":false,"allow_msg_counter":true}}"#;
    const SCHEDULES_2_15: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","config":{"name":"SCH","subjects":["d.\u003e"],"retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"max_msgs_per_subject":-1,"max_msg_size":-1,"discard":"old","storage":"file","num_replicas":1,"duplicate_window":120000000000,"compression":"none","allow_direct":false,"mirror_direct":false,"sealed":false,"deny_delete":false,"deny_purge":false,"allow_rollup_hdrs":true,"consumer_limits":{},"allow_msg_ttl":true,"subject_delete_marker_ttl":60000000000,"allow_msg_schedules":true}}"#;
    const MIRROR_2_9: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","config":{"name":"MIR","retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"max_msgs_per_subject":-1,"max_msg_size":-1,"discard":"old","storage":"file","num_replicas":1,"mirror":{"name":"GOOD"},"allow_direct":false,"mirror_direct":false,"sealed":false,"deny_delete":false,"deny_purge":false,"allow_rollup_hdrs":false},"mirror":{"name":"GOOD","lag":0,"active":-1}}"#;
    /// A 2.12.8 stream (no `allow_batched`: the server does not know it) and a 2.15.1 stream
    /// created with it, captured from the servers (`state` and timestamps trimmed).
    const PLAIN_2_12: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","total":0,"offset":0,"limit":0,"config":{"name":"OLD","subjects":["old.\u003e"],"retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"max_msgs_per_subject":-1,"max_msg_size":-1,"discard":"old","storage":"file","num_replicas":1,"duplicate_window":120000000000,"compression":"none","allow_direct":false,"mirror_direct":false,"sealed":false,"deny_delete":false,"deny_purge":false,"allow_rollup_hdrs":false,"consumer_limits":{},"allow_msg_ttl":false,"metadata":{"_nats.level":"3","_nats.req.level":"0","_nats.ver":"2.12.8"}}}"#;
    const BATCHED_2_15: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","total":0,"offset":0,"limit":0,"config":{"name":"FAST","subjects":["fast.\u003e"],"retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"max_msgs_per_subject":-1,"max_msg_size":-1,"discard":"old","storage":"file","num_replicas":1,"duplicate_window":120000000000,"compression":"none","allow_direct":false,"mirror_direct":false,"sealed":false,"deny_delete":false,"deny_purge":false,"allow_rollup_hdrs":false,"consumer_limits":{},"allow_msg_ttl":false,"allow_batched":true,"metadata":{"_nats.level":"5","_nats.req.level":"4","_nats.ver":"2.15.1"}}}"#;
    const MISSING: &str = r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","error":{"code":404,"err_code":10059,"description":"stream not found"},"total":0,"offset":0,"limit":0}"#;

    fn parse(json: &str) -> StreamFacts {
        facts_from_json("S", json.as_bytes())
            .expect("parses")
            .expect("exists")
    }

    #[test]
    fn a_2_9_reply_without_the_newer_fields_reads_as_their_defaults() {
        let facts = parse(GOOD_2_9);
        assert_eq!(
            facts,
            StreamFacts::recommended("GOOD", vec!["a.>".to_owned()])
        );
        assert_eq!(fields(&facts, "a.*.v1"), Vec::<&str>::new());
    }

    #[test]
    fn every_lossy_setting_in_a_2_15_reply_is_read() {
        let bad = parse(BAD_2_15);
        assert_eq!(bad.max_msgs_per_subject, 5);
        assert!(bad.allow_rollup);
        assert_eq!(bad.persist_mode, PersistMode::Async);
        assert_eq!(
            bad.subject_transform,
            Some(SubjectTransform {
                source: "b.>".to_owned(),
                destination: "c.>".to_owned()
            })
        );
        assert_eq!(
            fields(&bad, "b.*"),
            [
                "max_msgs_per_subject",
                "allow_rollup_hdrs",
                "subject_transform",
                "persist_mode"
            ]
        );
        assert_eq!(fields(&parse(COUNTER_2_15), "c2.*"), ["allow_msg_counter"]);
        let schedules = parse(SCHEDULES_2_15);
        assert_eq!(schedules.subject_delete_marker_ttl, Duration::from_secs(60));
        assert_eq!(
            fields(&schedules, "d.*"),
            ["allow_rollup_hdrs", "allow_msg_schedules"]
        );
        let mirror = parse(MIRROR_2_9);
        assert_eq!(mirror.mirror.as_deref(), Some("GOOD"));
        assert_eq!(
            fields(&mirror, "a.*"),
            ["subjects", "duplicate_window", "mirror"]
        );
    }

    #[test]
    fn allow_batched_is_read_and_absent_means_false() {
        let batched = parse(BATCHED_2_15);
        assert!(batched.allow_batched);
        assert_eq!(
            fields(&batched, "fast.*"),
            Vec::<&str>::new(),
            "not refused"
        );
        assert!(!parse(PLAIN_2_12).allow_batched);
        assert!(!parse(GOOD_2_9).allow_batched);
        assert!(!parse(BAD_2_15).allow_batched);
    }

    #[test]
    fn the_create_request_carries_allow_batched_only_for_2_14_and_later() {
        let subjects = || vec!["a.*.v1".to_owned()];
        let portable = serde_json::to_value(new_stream_config("S", subjects())).expect("json");
        assert!(portable.get("allow_batched").is_none());
        for (server, batched) in [
            (None, false),
            (ServerVersion::parse("2.9.10"), false),
            (ServerVersion::parse("2.12.8"), false),
            (ServerVersion::parse("2.13.0"), false),
            (ServerVersion::parse("2.14.0"), true),
            (ServerVersion::parse("2.15.1"), true),
        ] {
            let body = new_stream_request("S", subjects(), server);
            let mut rest = body.clone();
            let flag = rest
                .as_object_mut()
                .expect("object")
                .remove("allow_batched");
            assert_eq!(flag, batched.then_some(true.into()), "{server:?}: {body}");
            assert_eq!(rest, portable, "{server:?}: only allow_batched differs");
            let json = serde_json::to_vec(&serde_json::json!({ "config": body })).expect("json");
            let facts = facts_from_json("S", &json)
                .expect("parses")
                .expect("exists");
            assert_eq!(
                facts,
                StreamFacts {
                    allow_batched: batched,
                    ..StreamFacts::recommended("S", subjects())
                }
            );
        }
    }

    #[test]
    fn missing_unavailable_and_unreadable_replies() {
        assert_eq!(facts_from_json("S", MISSING.as_bytes()), Ok(None));
        let disabled =
            br#"{"error":{"code":503,"err_code":10039,"description":"jetstream not enabled for account"}}"#;
        assert!(matches!(
            facts_from_json("S", disabled),
            Err(StreamInfoError::Unavailable { .. })
        ));
        let other = br#"{"error":{"code":500,"err_code":10010,"description":"boom"}}"#;
        assert_eq!(
            facts_from_json("S", other),
            Err(StreamInfoError::Api {
                stream: "S".to_owned(),
                code: 10010,
                description: "boom".to_owned()
            })
        );
        let future = GOOD_2_9.replace(r#""discard":"old""#, r#""discard":"sideways""#);
        let err = facts_from_json("S", future.as_bytes()).expect_err("unknown discard");
        assert!(err.to_string().contains("discard \"sideways\""), "{err}");
        assert!(matches!(
            facts_from_json("S", b"{}"),
            Err(StreamInfoError::Malformed { .. })
        ));
    }

    #[test]
    fn the_created_config_has_none_of_the_refused_settings() {
        let config = new_stream_config("S", vec!["a.*.v1".to_owned()]);
        let json = serde_json::to_vec(&serde_json::json!({ "config": config })).expect("json");
        let facts = facts_from_json("S", &json)
            .expect("parses")
            .expect("exists");
        assert_eq!(
            facts,
            StreamFacts::recommended("S", vec!["a.*.v1".to_owned()])
        );
        assert_eq!(fields(&facts, "a.*.v1"), Vec::<&str>::new());
        assert!(config.sources.is_none() && config.republish.is_none());
    }
}
