//! What the public handle and the driver task share: the commands one sends the other, the
//! health snapshot the driver publishes, and the outcome types both speak.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use sink_core::event::MsgId;
use sink_core::outbox::{Message, OrderingMode};
use sink_core::stream::Violation;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};

use crate::error::EmitError;

/// Proof that an event is stored.
///
/// How much it can say depends on the mechanism that delivered it ([`Health::mechanism`]): a
/// per-event publish ack names the stream sequence and whether the stream had the message
/// already; a fast-batch confirmation (a flow ack or the batch's commit) says only that the
/// event is persisted in order, in which batch and at which batch sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The stream that stored it.
    pub stream: String,
    /// Its stream sequence, when the broker's ack named it (per-event acks). `None` for an
    /// event confirmed by a fast batch: the server's flow acks carry no stream sequence.
    pub sequence: Option<u64>,
    /// The broker said it had the event already (a retry, or the same event emitted twice within
    /// the duplicate window): it is stored once. Only per-event acks say so; inside a fast batch
    /// the server skips a duplicate without a word, so `false` there proves nothing either way.
    pub duplicate: bool,
    /// The `Nats-Msg-Id` it was stored under.
    pub msg_id: MsgId,
    /// The fast batch that confirmed it, when a lane delivered it.
    pub batch: Option<BatchReceipt>,
}

/// Where a fast batch confirmed an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchReceipt {
    /// The batch id.
    pub id: String,
    /// The event's sequence within that batch (from 1).
    pub seq: u64,
}

/// How the sink delivers, as decided at start (and changed only when the stream changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mechanism {
    /// One publish per event, each with its own ack, in [`Health::ordering`].
    PerEvent,
    /// Fast-batch lanes (nats-server 2.14+, a stream with `allow_batched`): pipelined, ordered
    /// per lane, confirmed by flow acks.
    FastBatch,
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mechanism::PerEvent => "per-event acks",
            Mechanism::FastBatch => "fast-batch lanes",
        })
    }
}

/// The breaker's state as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerStatus {
    /// Publishing.
    Closed,
    /// Not publishing until the next probe.
    Open,
    /// Probing.
    HalfOpen,
}

/// A snapshot of the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Breaker state.
    pub breaker: BreakerStatus,
    /// Events accepted and not yet delivered or rejected.
    pub queued: usize,
    /// Publishes awaiting an ack.
    pub in_flight: usize,
    /// The last failure the driver saw, if any (no credentials).
    pub last_error: Option<String>,
    /// The server's version string at connect.
    pub server_version: String,
    /// The ordering mode in force (chained may have fallen back to per-key-serial).
    pub ordering: OrderingMode,
    /// Events re-sent after more than the stream's duplicate window since their first transmit:
    /// a copy stored before the fault would not be deduplicated (RELIABILITY.md F3). Also the
    /// `jetsink_retries_beyond_dedup_window_total` counter and a warning per event.
    pub retried_beyond_window: u64,
    /// Publishes allowed in flight now: the configured window, or less while the sink backs off
    /// from broker overload (429).
    pub window: usize,
    /// What the last re-verification of the running stream found wrong (empty while it meets
    /// every requirement): an operator edited the stream after the sink started. Each violation
    /// names the field, the value found and the fix; it is also logged at ERROR when it appears
    /// and counted by the `jetsink_stream_violations{stream}` gauge. While one of them
    /// [blocks delivery](sink_core::stream::Violation::blocks_delivery) (the stream became sealed,
    /// a mirror, interest retention, ...) nothing is published and events stay queued; the others
    /// (a shorter `max_age`, a per-subject limit, rollups, ...) are reported and delivery goes on.
    /// Re-verified on every reconnect and every [`SinkConfig::reverify_interval`](crate::SinkConfig::reverify_interval).
    pub stream_violations: Vec<Violation>,
    /// Why the ordering mode in force differs from the configured one, when the driver switched
    /// it (chaining is unsafe on this server and stream, see [`sink_core::capability`]); `None`
    /// while the configured mode is in force.
    pub ordering_reason: Option<String>,
    /// The delivery mechanism in force.
    pub mechanism: Mechanism,
    /// Fast-batch lanes open (0 with per-event acks): one per sink, or with a tenant or subject
    /// ordering key up to [`SinkConfig::lanes`](crate::SinkConfig::lanes).
    pub lanes: usize,
    /// Why that mechanism: the server version and stream settings that decided it, or the event
    /// that changed it (the stream stopped allowing batches). Also logged at INFO when decided.
    pub mechanism_reason: String,
    /// The local spool's counts (records and bytes held, oldest sequence, segments, quarantined
    /// regions, torn tails, syncs), when the sink has one.
    pub spool: Option<crate::spool::DiskSpoolStats>,
    /// Whether spooled events of an earlier process are still being handed to delivery (new
    /// events wait behind them, so their order holds across the restart).
    pub spool_replay_pending: bool,
}

/// What `close` could not deliver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloseReport {
    /// Events confirmed stored during the sink's life.
    pub delivered: u64,
    /// Events that failed for good: rejected by the broker, or larger than its `max_payload` when
    /// their turn came (each with its own error).
    pub rejected: u64,
    /// Events without confirmation when the deadline passed, in order: (CloudEvent id, message id,
    /// transmitted at least once).
    pub not_delivered: Vec<(String, MsgId, bool)>,
}

impl CloseReport {
    /// Whether everything accepted was confirmed (or rejected with a reason).
    pub fn complete(&self) -> bool {
        self.not_delivered.is_empty()
    }
}

/// Queue admission held by an event until its outcome; dropping it makes room.
#[derive(Debug)]
#[allow(dead_code)] // held for their Drop, never read
pub(crate) struct Permits {
    pub event: OwnedSemaphorePermit,
    pub bytes: OwnedSemaphorePermit,
}

/// Permits an event of `size` bytes takes from the byte bound (one per byte).
pub(crate) fn permit_count(size: usize) -> u32 {
    u32::try_from(size).unwrap_or(u32::MAX)
}

/// The payload of a clean close's last spool record: it carries the spool's acknowledgements to
/// disk (each record persists the acknowledged-through mark as it is written), so a restart does
/// not deliver again what this process saw stored. Read back, it is acknowledged and skipped.
pub(crate) const SPOOL_CLOSE_MARK: &[u8] = &[0];

/// What a [`JetStreamSink`](crate::JetStreamSink) asks of its driver.
#[allow(clippy::large_enum_variant)] // one per event, moved once; boxing would cost an allocation each
pub(crate) enum Command {
    /// Queue one accepted event; its outcome goes to `reply`.
    Emit {
        message: Message,
        event_id: String,
        permits: Permits,
        span: tracing::Span,
        reply: oneshot::Sender<Result<Receipt, EmitError>>,
        /// Its spool record, when the sink has a spool: acknowledged there once it has an
        /// outcome.
        spool_seq: Option<crate::spool::RecordSeq>,
    },
    /// Reply once every event accepted before has an outcome.
    Flush { reply: oneshot::Sender<()> },
    /// Stop taking events and end by `deadline` at the latest.
    Close {
        deadline: Instant,
        reply: oneshot::Sender<CloseReport>,
    },
}

/// State the driver publishes for the handles.
pub(crate) struct Shared {
    /// The driver's latest snapshot; `health()` clones it.
    pub health: watch::Sender<Health>,
    /// The connected server's `max_payload` (the client's 1 MiB assumption before the first
    /// connection); refreshed by the driver on every connect. An atomic, not part of
    /// [`Health`], because every `send` reads it.
    pub max_payload: AtomicUsize,
    /// The report the driver left when it ended; a `close` after that returns it.
    pub final_report: watch::Sender<Option<CloseReport>>,
}

impl Shared {
    /// The state of a sink that has sent nothing yet.
    pub(crate) fn new(
        server_version: String,
        window: usize,
        ordering: OrderingMode,
        max_payload: usize,
    ) -> Self {
        Self {
            health: watch::Sender::new(Health {
                breaker: BreakerStatus::Closed,
                queued: 0,
                in_flight: 0,
                last_error: None,
                server_version,
                ordering,
                retried_beyond_window: 0,
                window,
                stream_violations: Vec::new(),
                ordering_reason: None,
                mechanism: Mechanism::PerEvent,
                lanes: 0,
                mechanism_reason: "not decided yet: the stream has not been checked".to_owned(),
                spool: None,
                spool_replay_pending: false,
            }),
            max_payload: AtomicUsize::new(max_payload),
            final_report: watch::Sender::new(None),
        }
    }

    pub(crate) fn set_error(&self, e: impl Into<String>) {
        let e = e.into();
        self.health.send_modify(|h| h.last_error = Some(e));
    }

    /// Whether the breaker is open now (the fail-fast admission check).
    pub(crate) fn breaker_open(&self) -> bool {
        self.health.borrow().breaker == BreakerStatus::Open
    }

    pub(crate) fn max_payload(&self) -> usize {
        self.max_payload.load(Ordering::Relaxed)
    }

    /// Records the limit of the server connected now; whether it changed.
    pub(crate) fn set_max_payload(&self, max_payload: usize) -> bool {
        self.max_payload.swap(max_payload, Ordering::Relaxed) != max_payload
    }
}
