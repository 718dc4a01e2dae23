//! The stream: requirements from the config, the check (and, under `Create`, the creation) at
//! start, the re-creation of a stream that went missing, the running re-verification, and the
//! guard that keeps chaining off where the server makes it unsafe.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sink_core::capability::{chaining_hazard, ServerVersion};
use sink_core::stream::{verify, StreamFacts, StreamRequirements};
use tokio::sync::{mpsc, Notify};

use crate::config::{SinkConfig, StreamPolicy};
use crate::error::StartError;
use crate::facts::{new_stream_config, read_stream_facts, StreamInfoError};
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

/// Verifies (and with `Create`, creates) the stream; returns its duplicate window.
pub(crate) async fn check_stream(
    client: &async_nats::Client,
    config: &SinkConfig,
    subjects: &Subjects,
    servers: &str,
) -> Result<StreamChecked, StartError> {
    let js = jetstream::new(client.clone());
    let api = |reason: String| StartError::StreamApi {
        stream: config.stream.clone(),
        reason,
    };
    let read = |e: StreamInfoError| start_error(e, servers);
    let facts: StreamFacts = match read_stream_facts(&js, &config.stream).await.map_err(read)? {
        Some(facts) => facts,
        None if config.stream_policy != StreamPolicy::Create => {
            return Err(StartError::StreamMissing {
                stream: config.stream.clone(),
            });
        }
        None => {
            js.create_stream(new_stream_config(&config.stream, vec![subjects.filter()]))
                .await
                .map_err(|e| api(format!("create failed: {e}")))?;
            tracing::info!(stream = %config.stream, "created stream");
            read_stream_facts(&js, &config.stream)
                .await
                .map_err(read)?
                .ok_or_else(|| api("created, then not found: deleted at once?".to_owned()))?
        }
    };
    let violations = verify(&facts, &requirements(config, subjects));
    if !violations.is_empty() {
        return Err(StartError::StreamViolations {
            stream: config.stream.clone(),
            violations,
        });
    }
    Ok(StreamChecked {
        duplicate_window: facts.duplicate_window,
        replicas: facts.replicas,
    })
}

/// What the driver keeps from a passed stream check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamChecked {
    pub duplicate_window: Duration,
    pub replicas: u32,
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
}

impl Provisioner {
    pub(crate) fn new(client: async_nats::Client, config: SinkConfig, subjects: Subjects) -> Self {
        debug_assert!(config.stream_policy != StreamPolicy::Off);
        Self {
            client,
            config,
            subjects,
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The start check, applied once the client is connected (the server was down at start).
    pub(crate) async fn check(&self) -> Result<StreamChecked, StartError> {
        let servers = redacted_servers(&self.config.servers);
        check_stream(&self.client, &self.config, &self.subjects, &servers).await
    }

    /// Re-creates the stream if it is missing (policy `Create`, after the breaker opened).
    pub(crate) async fn recreate(&self) -> Result<(), String> {
        let js = jetstream::new(self.client.clone());
        if js.get_stream(&self.config.stream).await.is_ok() {
            return Ok(());
        }
        js.create_stream(new_stream_config(
            &self.config.stream,
            vec![self.subjects.filter()],
        ))
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
