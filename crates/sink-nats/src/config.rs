//! Sink configuration: the builder, connection options (auth, TLS), policies, and secret handling.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use sink_core::backoff::{Backoff, RetrySchedule};
use sink_core::encoding::Encoding;
use sink_core::outbox::{BreakerOpenPolicy, OrderingMode, OutboxConfig};

use crate::secret::Secret;
use crate::server_url::redact_url;

/// How the sink authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// No credentials (or credentials in the URL's userinfo).
    #[default]
    None,
    /// A token.
    Token(Secret),
    /// User and password.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: Secret,
    },
    /// An nkey seed (`SU...`).
    NkeySeed(Secret),
    /// A `.creds` file (JWT + nkey seed).
    CredsFile(PathBuf),
}

/// TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    /// Require TLS even if the URL scheme does not say so.
    pub required: bool,
    /// PEM file with the CA(s) that signed the server certificate.
    pub root_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// What the sink does with its stream at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamPolicy {
    /// Do not look at the stream.
    Off,
    /// The stream must exist and meet the requirements (default).
    #[default]
    Verify,
    /// Create the stream when missing (file storage, max_age 90 days, duplicate window 2 min);
    /// verify it when present; never change an existing stream.
    Create,
}

/// What `send`/`emit` do when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait for room, at most this long, then fail with [`crate::EmitError::QueueFull`].
    Block {
        /// The longest wait.
        deadline: Duration,
    },
    /// Fail at once with [`crate::EmitError::QueueFull`].
    Reject,
}

impl Default for WhenFull {
    fn default() -> Self {
        WhenFull::Block {
            deadline: Duration::from_secs(30),
        }
    }
}

/// Whether the sink may deliver through fast-batch lanes (nats-server 2.14+, ADR-50).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// Lanes when the server supports them (2.14+) and the checked stream has `allow_batched`
    /// (which [`StreamPolicy::Create`] sets); per-event acks otherwise (default). With
    /// [`StreamPolicy::Off`] the stream's settings are unknown, so per-event acks.
    #[default]
    Auto,
    /// Always per-event acks, in [`SinkConfig::ordering`] (every receipt then carries its stream
    /// sequence).
    Off,
}

/// Which events share an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingKey {
    /// All events of the sink (default).
    #[default]
    Sink,
    /// Events of one tenant.
    Tenant,
    /// Events of one rendered subject.
    Subject,
}

/// Everything a sink needs; build it with [`crate::SinkBuilder`]. Its `Debug` redacts URL
/// credentials.
#[derive(Clone)]
pub struct SinkConfig {
    /// Server URLs (`nats://host:port`, `tls://...`). Credentials in a URL's userinfo are secrets:
    /// percent-decoded and handed to the client, never shown (see [`crate::ServerUrl`] for how a
    /// raw `@`, `/`, `?` or `:` in a password is read).
    pub servers: Vec<String>,
    /// Client connection name.
    pub name: String,
    /// Subject template, e.g. `cellos.events.{tenantId}.v1`.
    pub subject_template: String,
    /// Token used for `{tenantId}` when an event carries none (default `single`, the seed's
    /// `TENANT_ID_DEFAULT_TOKEN`). Not used when `require_tenant` is set.
    pub default_tenant: String,
    /// Refuse events without a tenant ([`sink_core::subject::SubjectError::MissingTenant`], that
    /// event alone) instead of sending them to `default_tenant` (default off, as the seed).
    pub require_tenant: bool,
    /// Longest accepted placeholder value (bytes).
    pub max_token_len: usize,
    /// Stream name.
    pub stream: String,
    /// Stream policy.
    pub stream_policy: StreamPolicy,
    /// The retention floor the stream must meet (`max_age` 0 or at least this).
    pub retention_floor: Duration,
    /// How often the running sink re-reads and re-verifies its stream (default 60 s), on top of
    /// every reconnect. `Duration::ZERO` (or a duration too large for the clock, such as
    /// `Duration::MAX`) turns the periodic check off; reconnects still re-verify. Not used with
    /// [`StreamPolicy::Off`].
    pub reverify_interval: Duration,
    /// Ordering mode of per-event delivery (and what lanes fall back to).
    pub ordering: OrderingMode,
    /// Whether fast-batch lanes may be used (default [`Batching::Auto`]). A lane keeps the
    /// order of every event of the sink (stronger than any ordering mode asks).
    pub batching: Batching,
    /// Ordering key.
    pub ordering_key: OrderingKey,
    /// Most fast-batch lanes with a tenant or subject ordering key (1 to 64, default 4): a key's
    /// events keep their order on one lane, and a slow or failing batch of one lane does not hold
    /// the keys of the others. With [`OrderingKey::Sink`] there is always one lane. Every open lane
    /// is a batch on the server, which divides its flow-ack budget (500 messages) among the
    /// batches of the stream.
    pub lanes: usize,
    /// Publishes awaiting an ack at once (default 1024: on 2 cores `cargo xtask bench` measured
    /// the chained window at 256 about 15% below 1024, which matches the broker's ingest rate).
    pub window: usize,
    /// Queue bound in events.
    pub max_events: usize,
    /// Queue bound in bytes.
    pub max_bytes: usize,
    /// When the queue is full.
    pub when_full: WhenFull,
    /// While the breaker is open.
    pub when_breaker_open: BreakerOpenPolicy,
    /// Ack timeout per publish. Fast-batch lanes wait at most 2 s for an expected answer (then
    /// ping, then give the batch up): an open batch must be answered well within the server's
    /// 10 s batch timeout.
    pub ack_timeout: Duration,
    /// Per-publish retry delays.
    pub retry: RetrySchedule,
    /// Breaker open durations (and client reconnect delays).
    pub reconnect: Backoff,
    /// Wire encoding.
    pub encoding: Encoding,
    /// Keep trying when the first connect fails (events queue meanwhile) instead of failing `connect`.
    pub retry_initial_connect: bool,
    /// Authentication.
    pub auth: Auth,
    /// TLS.
    pub tls: Tls,
    /// Client ping interval: how fast a dead connection is noticed.
    pub ping_interval: Duration,
    /// Connect timeout per attempt.
    pub connect_timeout: Duration,
    /// A local spool directory: `send` accepts an event only once it is durable there, and
    /// a sink started on the directory delivers what an earlier process left, first and in
    /// order (issue #12). `None` (default): events live in memory until acked.
    pub spool: Option<PathBuf>,
    /// Bytes the spool may hold (default 1 GiB); past it `send` waits or fails per
    /// [`SinkConfig::when_full`].
    pub spool_max_bytes: u64,
}

impl fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        f.debug_struct("SinkConfig")
            .field("servers", &servers)
            .field("name", &self.name)
            .field("subject_template", &self.subject_template)
            .field("default_tenant", &self.default_tenant)
            .field("require_tenant", &self.require_tenant)
            .field("max_token_len", &self.max_token_len)
            .field("stream", &self.stream)
            .field("stream_policy", &self.stream_policy)
            .field("retention_floor", &self.retention_floor)
            .field("reverify_interval", &self.reverify_interval)
            .field("ordering", &self.ordering)
            .field("batching", &self.batching)
            .field("ordering_key", &self.ordering_key)
            .field("lanes", &self.lanes)
            .field("window", &self.window)
            .field("max_events", &self.max_events)
            .field("max_bytes", &self.max_bytes)
            .field("when_full", &self.when_full)
            .field("when_breaker_open", &self.when_breaker_open)
            .field("ack_timeout", &self.ack_timeout)
            .field("retry", &self.retry)
            .field("reconnect", &self.reconnect)
            .field("encoding", &self.encoding)
            .field("retry_initial_connect", &self.retry_initial_connect)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("ping_interval", &self.ping_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("spool", &self.spool)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .finish()
    }
}

impl SinkConfig {
    /// The outbox's share of the config: one failure opens the breaker, whose probes follow the
    /// reconnect backoff.
    pub(crate) fn outbox_config(&self) -> OutboxConfig {
        OutboxConfig {
            window: self.window,
            max_events: self.max_events,
            max_bytes: self.max_bytes,
            ordering: self.ordering,
            ack_timeout: self.ack_timeout,
            retry: self.retry.clone(),
            breaker: sink_core::breaker::BreakerConfig {
                failures_to_open: 1,
                reconnect: self.reconnect.clone(),
            },
            when_breaker_open: self.when_breaker_open,
        }
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            name: "jetsink".into(),
            subject_template: "cellos.events.{tenantId}.v1".into(),
            default_tenant: sink_core::subject::DEFAULT_TENANT.into(),
            require_tenant: false,
            max_token_len: 64,
            stream: "CELLOS_EVENTS".into(),
            stream_policy: StreamPolicy::Verify,
            retention_floor: Duration::from_secs(90 * 24 * 3600),
            reverify_interval: Duration::from_secs(60),
            ordering: OrderingMode::Chained,
            batching: Batching::Auto,
            ordering_key: OrderingKey::Sink,
            lanes: 4,
            window: 1024,
            max_events: 100_000,
            max_bytes: 64 * 1024 * 1024,
            when_full: WhenFull::default(),
            when_breaker_open: BreakerOpenPolicy::Queue,
            ack_timeout: Duration::from_secs(5),
            retry: RetrySchedule::default(),
            reconnect: Backoff::reconnect_default(),
            encoding: Encoding::Structured,
            retry_initial_connect: false,
            auth: Auth::None,
            tls: Tls::default(),
            ping_interval: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            spool: None,
            spool_max_bytes: 1024 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_redacts_url_credentials() {
        let config = SinkConfig {
            servers: vec!["nats://svc:hunter2@h:4222".into()],
            ..SinkConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("nats://***@h:4222"), "{shown}");
    }

    #[test]
    fn secrets_do_not_print() {
        let auth = Auth::UserPassword {
            user: "svc".into(),
            password: Secret::new("hunter2"),
        };
        let shown = format!("{auth:?} {}", Secret::new("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("svc"));
    }
}
