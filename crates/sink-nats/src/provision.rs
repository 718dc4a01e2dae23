//! The stream: requirements from the config, the check (and, under `Create`, the creation) at
//! start, the re-creation of a stream that went missing, the running re-verification, and the
//! guard that keeps chaining off where the server makes it unsafe.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sink_core::capability::{chaining_hazard, ServerVersion};
use sink_core::stream::{advise, verify, StreamFacts, StreamRequirements};
use tokio::sync::{mpsc, watch, Notify};

use crate::config::{SinkConfig, StreamPolicy};
use crate::error::StartError;
use crate::facts::{create_stream, read_stream_facts, StreamInfoError};
use crate::metrics as m;
use crate::server_url::redacted_servers;
use crate::stream_watch::{watch_stream, StreamCheck};
use crate::subjects::Subjects;

/// The stream settings a sink with this config needs.
pub(crate) fn requirements(config: &SinkConfig, subjects: &Subjects) -> StreamRequirements {
    let attempts = u32::try_from(config.retry.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    // Saturating: an ack timeout of `Duration::MAX` ("never") asks for a window no stream has,
    // which Verify reports, rather than a panic.
    let retry_span = config
        .ack_timeout
        .saturating_mul(attempts)
        .saturating_add(config.retry.total());
    let mut req = StreamRequirements::for_subject_filter(subjects.filter(), retry_span);
    req.retention_floor = config.retention_floor;
    req
}

/// Verifies (and with `Create`, creates) the stream; returns what the driver needs from it.
///
/// What costs speed without breaking a promise ([`advise`], e.g. a 2.14+ server whose stream does
/// not allow fast batches) is logged at WARN and does not fail the check.
pub(crate) async fn check_stream(
    client: &async_nats::Client,
    config: &SinkConfig,
    subjects: &Subjects,
    servers: &str,
) -> Result<StreamChecked, StartError> {
    let js = jetstream::new(client.clone());
    let read = |e: StreamInfoError| start_error(e, servers);
    let server = ServerVersion::parse(&client.server_info().version);
    let facts: StreamFacts = match read_stream_facts(&js, &config.stream).await.map_err(read)? {
        Some(facts) => facts,
        None if config.stream_policy != StreamPolicy::Create => {
            return Err(StartError::StreamMissing {
                stream: config.stream.clone(),
            });
        }
        None => {
            let facts = create_stream(&js, &config.stream, vec![subjects.filter()], server)
                .await
                .map_err(|e| match read(e) {
                    StartError::StreamApi { stream, reason } => StartError::StreamApi {
                        stream,
                        reason: format!("create failed: {reason}"),
                    },
                    other => other,
                })?;
            tracing::info!(
                stream = %config.stream,
                allow_batched = facts.allow_batched,
                "created stream"
            );
            facts
        }
    };
    let violations = verify(&facts, &requirements(config, subjects));
    if !violations.is_empty() {
        return Err(StartError::StreamViolations {
            stream: config.stream.clone(),
            violations,
        });
    }
    for advice in advise(&facts, server) {
        tracing::warn!(stream = %config.stream, field = advice.field(), "{advice}");
    }
    Ok(StreamChecked {
        duplicate_window: facts.duplicate_window,
        replicas: facts.replicas,
        allow_batched: facts.allow_batched,
    })
}

/// What the driver keeps from a passed stream check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamChecked {
    pub duplicate_window: Duration,
    pub replicas: u32,
    /// Whether the stream allows fast-batch publishing (`allow_batched`; false when the server
    /// does not report it, as before 2.14).
    pub allow_batched: bool,
}

/// A failed stream read at start as a start error.
fn start_error(e: StreamInfoError, servers: &str) -> StartError {
    match e {
        StreamInfoError::Unavailable { reason, .. } => StartError::JetStreamUnavailable {
            servers: servers.to_owned(),
            reason,
        },
        StreamInfoError::Api {
            stream,
            code,
            description,
        } => StartError::StreamApi {
            stream,
            reason: format!("JetStream error {code}: {description}"),
        },
        StreamInfoError::Request { stream, reason } => StartError::StreamApi { stream, reason },
        StreamInfoError::Malformed { stream, reason } => StartError::StreamApi {
            stream,
            reason: format!("the info reply cannot be read: {reason}"),
        },
    }
}

/// Why chaining must not be used on this server and stream (a replicated stream on 2.11+, see
/// [`sink_core::capability`]), as the reason the driver gives for switching to per-key-serial.
pub(crate) fn chaining_guard(server_version: &str, replicas: u32) -> Option<String> {
    let version = ServerVersion::parse(server_version);
    chaining_hazard(version, replicas).map(|hazard| {
        format!(
            "{hazard}; keeping order with per-key-serial delivery (one publish in flight per \
             ordering key) instead of chaining"
        )
    })
}

/// The stream work a running sink does through its client (only with a stream policy).
pub(crate) struct Provisioner {
    client: async_nats::Client,
    config: SinkConfig,
    subjects: Subjects,
    /// The stream's `allow_batched` as last read by the deferred check or the re-verification.
    allow_batched: watch::Sender<Option<bool>>,
}

impl Provisioner {
    pub(crate) fn new(client: async_nats::Client, config: SinkConfig, subjects: Subjects) -> Self {
        debug_assert!(config.stream_policy != StreamPolicy::Off);
        Self {
            client,
            config,
            subjects,
            allow_batched: watch::Sender::new(None),
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The start check, applied once the client is connected (the server was down at start).
    pub(crate) async fn check(&self) -> Result<StreamChecked, StartError> {
        let servers = redacted_servers(&self.config.servers);
        let checked = check_stream(&self.client, &self.config, &self.subjects, &servers).await?;
        self.allow_batched.send_replace(Some(checked.allow_batched));
        Ok(checked)
    }

    /// The stream's `allow_batched` as last read by [`Provisioner::check`] or by the running
    /// re-verification, `None` before either has read the stream (the start check's value is in
    /// [`StreamChecked`]). The watcher updates it before it sends the [`StreamCheck::Verified`] of
    /// the same read, so a driver handling that check reads the value it belongs to (or a newer
    /// one).
    pub(crate) fn allow_batched(&self) -> Option<bool> {
        *self.allow_batched.borrow()
    }

    /// Re-creates the stream if it is missing (policy `Create`, after the breaker opened).
    pub(crate) async fn recreate(&self) -> Result<(), String> {
        let js = jetstream::new(self.client.clone());
        if js.get_stream(&self.config.stream).await.is_ok() {
            return Ok(());
        }
        let server = ServerVersion::parse(&self.client.server_info().version);
        create_stream(
            &js,
            &self.config.stream,
            vec![self.subjects.filter()],
            server,
        )
        .await
        .map_err(|e| format!("re-create stream: {e}"))?;
        tracing::warn!(stream = %self.config.stream, "stream was missing; re-created it (policy Create)");
        Ok(())
    }

    /// Starts the re-verification task; its findings arrive on the receiver, and `recheck`
    /// asks for one at once.
    pub(crate) fn watch(&self, recheck: Arc<Notify>) -> mpsc::Receiver<StreamCheck> {
        let (tx, rx) = mpsc::channel(4);
        m::stream_violations(&self.config.stream, 0);
        tokio::spawn(watch_stream(
            self.client.clone(),
            self.config.stream.clone(),
            requirements(&self.config, &self.subjects),
            self.config.reverify_interval,
            recheck,
            tx,
            self.allow_batched.clone(),
        ));
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations at their extremes saturate instead of overflowing.
    #[test]
    fn requirements_saturate_at_duration_max() {
        let config = SinkConfig {
            ack_timeout: Duration::MAX,
            ..SinkConfig::default()
        };
        let subjects = Subjects::new(&config).expect("default template");
        assert_eq!(
            requirements(&config, &subjects).min_duplicate_window,
            Duration::MAX
        );
    }
}
