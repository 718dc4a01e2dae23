//! The seam between the driver and the network: what the driver needs of a connection to publish
//! and hear the replies. async-nats implements it for real servers; the test kit implements it over
//! its scripted broker, so the same driver runs in-process on virtual time.
//!
//! The driver is generic over it (no dynamic dispatch on the hot path). Connection events
//! (connected, disconnected, lame duck) arrive on a channel of [`async_nats::Event`] next to it.

use std::future::Future;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::Stream;

/// A connection the driver publishes through. See the module docs.
pub trait Transport: Send + Sync + 'static {
    /// Messages arriving on a subscription: the replies to publishes.
    type Replies: Stream<Item = async_nats::Message> + Unpin + Send + 'static;

    /// A fresh, unique inbox prefix for this connection's reply subjects.
    fn new_inbox(&self) -> String;

    /// Subscribes to `subject` (the driver's `<inbox>.>`).
    fn subscribe(
        &self,
        subject: String,
    ) -> impl Future<Output = Result<Self::Replies, TransportError>> + Send;

    /// Hands one publish to the connection; its reply arrives on the subscription to `reply`.
    /// Returns once the connection has taken it, not when the broker has it.
    fn publish(
        &self,
        subject: String,
        reply: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The connected (or last connected) server's `max_payload`.
    fn max_payload(&self) -> usize;

    /// The connected (or last connected) server's version string (empty before the first
    /// connection).
    fn server_version(&self) -> String;
}

/// Why a publish or subscription was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The message is larger than the connected server's `max_payload` (it changed across a
    /// reconnect): that event fails alone as too large.
    #[error("larger than the connected server's max_payload")]
    MaxPayloadExceeded,
    /// The connection could not take it now (closed, its buffer full); the driver retries.
    #[error("{reason}")]
    Unavailable {
        /// What the client said.
        reason: String,
    },
}

/// The async-nats client as a [`Transport`].
impl Transport for async_nats::Client {
    type Replies = async_nats::Subscriber;

    fn new_inbox(&self) -> String {
        async_nats::Client::new_inbox(self)
    }

    async fn subscribe(&self, subject: String) -> Result<Self::Replies, TransportError> {
        async_nats::Client::subscribe(self, subject)
            .await
            .map_err(|e| TransportError::Unavailable {
                reason: e.to_string(),
            })
    }

    async fn publish(
        &self,
        subject: String,
        reply: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), TransportError> {
        self.publish_with_reply_and_headers(subject, reply, headers, body)
            .await
            .map_err(|e| match e.kind() {
                async_nats::PublishErrorKind::MaxPayloadExceeded => {
                    TransportError::MaxPayloadExceeded
                }
                _ => TransportError::Unavailable {
                    reason: e.to_string(),
                },
            })
    }

    fn max_payload(&self) -> usize {
        async_nats::Client::max_payload(self)
    }

    fn server_version(&self) -> String {
        self.server_info().version
    }
}
