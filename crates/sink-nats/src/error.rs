//! Typed errors of the sink: start-up (configuration, connection, stream) and per-event outcomes.

use std::time::Duration;

use sink_core::encoding::EncodeError;
use sink_core::event::EventError;
use sink_core::outbox::Rejection;
use sink_core::stream::Violation;
use sink_core::subject::{SubjectError, TemplateError};

/// Why a sink could not start. Messages never contain credentials.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The subject template does not parse.
    #[error("subject template: {0}")]
    Template(#[from] TemplateError),
    /// The spool directory could not be opened (locked by another process, a newer format,
    /// permissions, disk full), or an event in it could not be read back.
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    /// A setting is out of range.
    #[error("config {field}: {problem}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to {servers}: {reason}")]
    Connect {
        /// The server list, credentials redacted.
        servers: String,
        /// The client's reason.
        reason: String,
    },
    /// The server refused the credentials.
    #[error(
        "authorization failed at {servers}: check the token, user/password, nkey or creds file"
    )]
    Authorization {
        /// The server list, credentials redacted.
        servers: String,
    },
    /// The creds file, CA or client certificate could not be read.
    #[error("cannot read {what} {path}: {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// The IO error.
        reason: String,
    },
    /// JetStream is not enabled for this account or server.
    #[error("JetStream is not available at {servers}: {reason}; start nats-server with -js")]
    JetStreamUnavailable {
        /// The server list, credentials redacted.
        servers: String,
        /// The API reason.
        reason: String,
    },
    /// The stream does not exist and the policy does not create it.
    #[error("stream {stream} does not exist; create it (`jetsink stream ensure`) or use StreamPolicy::Create")]
    StreamMissing {
        /// The stream name.
        stream: String,
    },
    /// The stream exists but violates the requirements.
    #[error("stream {stream} does not meet the requirements:\n{}", list(.violations))]
    StreamViolations {
        /// The stream name.
        stream: String,
        /// Every violation, with found and required values.
        violations: Vec<Violation>,
    },
    /// A JetStream API call failed.
    #[error("stream {stream}: {reason}")]
    StreamApi {
        /// The stream name.
        stream: String,
        /// The API reason.
        reason: String,
    },
}

fn list(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("  - {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why one event was not delivered. Other events are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmitError {
    /// The CloudEvent is invalid.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] EventError),
    /// The subject could not be rendered (e.g. a tenant id that is not one NATS token).
    #[error("event {event_id}: {error}")]
    Subject {
        /// The CloudEvent id.
        event_id: String,
        /// Why.
        error: SubjectError,
    },
    /// The event could not be encoded.
    #[error("event {event_id}: {error}")]
    Encode {
        /// The CloudEvent id.
        event_id: String,
        /// Why.
        error: EncodeError,
    },
    /// The encoded event is larger than the server accepts. Refused by `send` before it is
    /// queued, or, when the server's limit shrank after it was accepted (a restart with a smaller
    /// `max_payload`), when its turn to be sent came; it was never sent either way.
    #[error("event {event_id} is {size} bytes on the wire (headers + body, with the headers the sink adds); the server's max_payload is {max_payload}: send a smaller event or raise max_payload in the server config")]
    TooLarge {
        /// The CloudEvent id.
        event_id: String,
        /// Size as the server counts it: the header block (with `Nats-Msg-Id`,
        /// `Nats-Expected-Stream` and `Nats-Expected-Last-Msg-Id`) plus the body.
        size: usize,
        /// The server limit.
        max_payload: usize,
    },
    /// The event alone needs more queue bytes than the queue's whole byte bound, so no amount of
    /// waiting would make room for it.
    #[error("event {event_id} needs {size} bytes of queue; the queue holds at most {max_bytes} bytes: raise the byte bound (SinkBuilder::queue_bound) or send a smaller event")]
    ExceedsQueue {
        /// The CloudEvent id.
        event_id: String,
        /// The bytes it would hold in the queue.
        size: usize,
        /// The queue's byte bound.
        max_bytes: usize,
    },
    /// The queue stayed full (Reject policy, or the Block deadline passed).
    #[error("queue full ({max_events} events / {max_bytes} bytes) after waiting {waited:?}; the broker is slower than the input or unavailable")]
    QueueFull {
        /// The event bound.
        max_events: usize,
        /// The byte bound.
        max_bytes: usize,
        /// How long the call waited.
        waited: Duration,
    },
    /// The breaker is open and the policy is fail-fast.
    #[error("breaker open (fail-fast policy): the broker is failing; the event was not queued")]
    BreakerOpen,
    /// The spool could not make the event durable (full, disk full, an IO error): it was not
    /// accepted. [`crate::spool::SpoolError`] names the directory and the fix.
    #[error("event {event_id} not accepted: {error}")]
    Spool {
        /// The event.
        event_id: String,
        /// What the spool said.
        error: crate::spool::SpoolError,
    },
    /// `try_send` on a spooled sink: acceptance waits for the spool's fdatasync, which a call
    /// that never waits cannot do. Use `send`.
    #[error("event {event_id}: a spooled sink accepts an event only once it is on disk, which try_send cannot wait for; use send")]
    SpoolNeedsSend {
        /// The event.
        event_id: String,
    },
    /// The broker refused the event for good.
    #[error("event {event_id} rejected by the broker: {rejection}")]
    Rejected {
        /// The CloudEvent id.
        event_id: String,
        /// The broker's reason.
        rejection: Rejection,
    },
    /// The sink closed before the event was confirmed stored.
    #[error("event {event_id} not confirmed before close (transmitted: {transmitted}); it may need to be sent again")]
    NotDelivered {
        /// The CloudEvent id.
        event_id: String,
        /// Whether it was sent at least once (it may then be stored after all).
        transmitted: bool,
    },
    /// The sink is closed.
    #[error("the sink is closed")]
    Closed,
}
