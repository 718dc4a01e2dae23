//! Stream audit over JetStream: read a whole stream back with an ordered consumer, then judge it
//! with the pure half in [`sink_core::audit`] (re-exported here), event by event against what a
//! sink reported (invariants I1-I4 of DESIGN.md) or as a summary (gaps, duplicates, per key).
//!
//! Product code: `jetsink audit` and `jetsink demo` use it, and so do the tests (through the test
//! kit's re-export).

use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;

pub use sink_core::audit::{
    analyze, compare, compare_with, AuditReport, CompareOptions, Expected, OrderViolation,
    StoredMessage, StreamSummary,
};

/// Why a stream could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The stream's info could not be fetched.
    #[error(
        "could not look up stream {stream}: {detail}; check the stream name and that JetStream is \
         enabled on the server the context points at"
    )]
    StreamLookup {
        /// Stream name.
        stream: String,
        /// The client's error, rendered.
        detail: String,
    },
    /// The ordered consumer could not be created or started.
    #[error(
        "could not start an ordered consumer on stream {stream}: {detail}; check that the account \
         may create consumers and that the server is reachable"
    )]
    Consumer {
        /// Stream name.
        stream: String,
        /// The client's error, rendered.
        detail: String,
    },
    /// The consumer failed while delivering messages.
    #[error(
        "reading stream {stream} failed after {read} messages: {detail}; retry the audit once the \
         server is healthy"
    )]
    Read {
        /// Stream name.
        stream: String,
        /// Messages read before the failure.
        read: usize,
        /// The client's error, rendered.
        detail: String,
    },
    /// Not every message up to the last sequence arrived in time.
    #[error(
        "reading stream {stream} timed out after {timeout:?}: got {read} messages, up to sequence \
         {reached} of {last_sequence}; raise the timeout for large streams or check the server"
    )]
    Timeout {
        /// Stream name.
        stream: String,
        /// The timeout that ran out.
        timeout: Duration,
        /// Messages read before it ran out.
        read: usize,
        /// Highest stream sequence read.
        reached: u64,
        /// The stream's last sequence when the read started.
        last_sequence: u64,
    },
}

/// Reads every message of `stream`, in stream order, up to the stream's last sequence at the time of
/// the call, with an ephemeral ordered pull consumer (deliver all, no acks). Fails if that does not
/// finish within `timeout`.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
    timeout: Duration,
) -> Result<Vec<StoredMessage>, AuditError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let lookup = |detail: String| AuditError::StreamLookup {
        stream: stream.to_owned(),
        detail,
    };
    let mut handle = tokio::time::timeout_at(deadline, js.get_stream(stream))
        .await
        .map_err(|_| lookup(format!("no reply within {timeout:?}")))?
        .map_err(|e| lookup(e.to_string()))?;
    let state = tokio::time::timeout_at(deadline, handle.info())
        .await
        .map_err(|_| lookup(format!("no reply within {timeout:?}")))?
        .map_err(|e| lookup(e.to_string()))?
        .state
        .clone();
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let last_sequence = state.last_sequence;

    let consumer_err = |detail: String| AuditError::Consumer {
        stream: stream.to_owned(),
        detail,
    };
    let config = OrderedConfig {
        deliver_policy: DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = tokio::time::timeout_at(deadline, handle.create_consumer(config))
        .await
        .map_err(|_| consumer_err(format!("no reply within {timeout:?}")))?
        .map_err(|e| consumer_err(e.to_string()))?;
    let mut messages = tokio::time::timeout_at(deadline, consumer.messages())
        .await
        .map_err(|_| consumer_err(format!("no reply within {timeout:?}")))?
        .map_err(|e| consumer_err(e.to_string()))?;

    let mut stored: Vec<StoredMessage> = Vec::with_capacity(state.messages.min(1 << 20) as usize);
    loop {
        let read_err = |read: usize, detail: String| AuditError::Read {
            stream: stream.to_owned(),
            read,
            detail,
        };
        let next = match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(next) => next,
            Err(_) => {
                return Err(AuditError::Timeout {
                    stream: stream.to_owned(),
                    timeout,
                    read: stored.len(),
                    reached: stored.last().map_or(0, |m| m.stream_sequence),
                    last_sequence,
                })
            }
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(read_err(stored.len(), e.to_string())),
            None => {
                return Err(read_err(
                    stored.len(),
                    "the consumer's message stream ended early".to_owned(),
                ))
            }
        };
        let (sequence, pending) = match message.info() {
            Ok(info) => (info.stream_sequence, info.pending),
            Err(e) => {
                return Err(read_err(
                    stored.len(),
                    format!("unparsable delivery metadata: {e}"),
                ))
            }
        };
        if sequence > last_sequence {
            break;
        }
        stored.push(to_stored(&message.message, sequence));
        // `pending == 0` covers a stream whose last message was deleted after the info call.
        if sequence == last_sequence || pending == 0 {
            break;
        }
    }
    Ok(stored)
}

fn to_stored(message: &async_nats::Message, stream_sequence: u64) -> StoredMessage {
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|map| map.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.as_str().to_owned()))
        })
        .collect();
    // HeaderMap iterates in hash order; a stable sort by name keeps per-name value order.
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let msg_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned());
    StoredMessage {
        stream_sequence,
        subject: message.subject.to_string(),
        msg_id,
        payload: message.payload.clone(),
        headers,
    }
}
