//! jetsink's NATS JetStream adapter: durable, ordered, exactly-once CloudEvent delivery.
//!
//! One driver task per sink runs the [`sink_core`] machines over async-nats and tokio; it is the
//! only place with a clock, an executor and a socket. Every publish carries a deterministic
//! `Nats-Msg-Id` (from the event's `source` + `id`), waits for its JetStream ack (pipelined within
//! the window), and is retried with the same id until stored; `duplicate: true` counts as
//! delivered. During an outage events stay queued (bounded); nothing is dropped silently.
//!
//! ```no_run
//! use std::time::Duration;
//! use sink_nats::{JetStreamSink, StreamPolicy};
//! use sink_nats::sink_core::event::CloudEvent;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let sink = JetStreamSink::builder("nats://127.0.0.1:4222")
//!     .subject_template("cellos.events.{tenantId}.v1")
//!     .stream("CELLOS_EVENTS")
//!     .stream_policy(StreamPolicy::Create)
//!     .connect()
//!     .await?;
//!
//! let event = CloudEvent::new("evt-1", "/svc/billing", "com.example.invoice.paid")
//!     .with_data_json(serde_json::json!({ "tenantId": "acme", "amount": 42 }));
//! let receipt = sink.emit(&event).await?; // returns once the stream has stored it
//! println!("stored in {} ({:?})", receipt.stream, receipt.sequence);
//!
//! // Pipelined: `send` returns once queued; the handle resolves when stored.
//! let pending = sink.send(event.clone()).await?;
//! pending.await?; // same source + id: stored once (a per-event ack says `duplicate: true`)
//!
//! let report = sink.close(Duration::from_secs(10)).await;
//! assert!(report.complete());
//! # Ok(()) }
//! ```
//!
//! Ordering modes, their guarantees and limits are described in [`sink_core::outbox`].

/// Read a stream back and compare it with what a sink reported (`jetsink audit`, `jetsink demo`).
pub mod audit;
mod classify;
mod clock;
mod config;
mod connect;
mod driver;
mod engine;
mod error;
mod facts;
mod handle;
mod lanes;
mod metrics;
mod provision;
mod secret;
mod server_url;
mod sink;
pub mod spool;
mod stream_watch;
mod subjects;
pub mod transport;
mod waiters;
mod wire;

/// The seed's `cellos_core::ports::EventSink`, implemented for [`JetStreamSink`].
#[cfg(feature = "cellos")]
pub mod cellos;

pub use classify::{classify, classify_api_error, parse_wrong_last_id, Verdict};
pub use config::{Auth, Batching, OrderingKey, SinkConfig, StreamPolicy, Tls, WhenFull};
pub use error::{EmitError, StartError};
pub use facts::{
    create_stream, facts_from_json, new_stream_config, new_stream_request, read_stream_facts,
    StreamInfoError,
};
pub use handle::{BatchReceipt, BreakerStatus, CloseReport, Health, Mechanism, Receipt};
pub use secret::Secret;
pub use server_url::{redact_url, ServerUrl, UrlError};
pub use sink::{Durable, EventSink, JetStreamSink, Pending, SinkBuilder, Staged};
pub use sink_core;
pub use sink_core::encoding::Encoding;
pub use sink_core::outbox::{BreakerOpenPolicy, OrderingMode};
pub use transport::{Transport, TransportError};

/// Connects a plain async-nats client with the sink's connection settings (auth, TLS, timeouts),
/// for tools that need the JetStream API directly (the CLI's `stream` and `audit`).
pub async fn connect_client(config: &SinkConfig) -> Result<async_nats::Client, StartError> {
    let opts = connect::connect_options(config).await?;
    opts.connect(connect::server_addrs(config)?)
        .await
        .map_err(|e| connect::connect_error(&e, config))
}

/// The stream requirements a sink with this config verifies (for `jetsink stream verify`).
pub fn stream_requirements(
    config: &SinkConfig,
) -> Result<sink_core::stream::StreamRequirements, StartError> {
    let subjects = subjects::Subjects::new(config)?;
    Ok(provision::requirements(config, &subjects))
}

/// The subject rules a sink with this config applies (template, token rule, default or
/// required tenant), for tools that must render subjects exactly as the sink does (the CLI's
/// `audit`).
pub fn subject_config(
    config: &SinkConfig,
) -> Result<sink_core::subject::SubjectConfig, StartError> {
    Ok(subjects::Subjects::new(config)?.into_config())
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
