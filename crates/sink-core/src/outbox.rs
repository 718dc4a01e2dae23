//! The outbox: the ordered delivery machine between callers and the broker.
//!
//! Callers [`push`](Outbox::push) encoded messages; the adapter drains [`poll_output`](Outbox::poll_output)
//! for [`Output::Transmit`] commands and outcome events, feeds broker replies back with
//! [`handle_ack`](Outbox::handle_ack) / [`handle_failure`](Outbox::handle_failure) /
//! [`handle_connection_lost`](Outbox::handle_connection_lost), and calls
//! [`handle_timeout`](Outbox::handle_timeout) at [`poll_timeout`](Outbox::poll_timeout).
//! Every pushed event ends in exactly one outcome: [`Output::Delivered`], [`Output::Rejected`], or
//! (when the owner gives up) it is handed back by [`Outbox::abandon`].
//!
//! # Ordering modes
//!
//! - [`OrderingMode::Chained`] (default): up to `window` publishes in flight; each carries the message
//!   id of its predecessor as `Nats-Expected-Last-Msg-Id`. The broker stores a message only right after
//!   its predecessor, so a lost or failed message blocks everything after it (error 10070) until it is
//!   re-sent: no event is ever stored after a later one, whatever is lost, delayed or duplicated.
//!   Re-sending from the first unacknowledged event is clean because the broker checks the duplicate
//!   window before the expected-last id. Limit: the check is stream-wide, so it assumes this sink is the
//!   only writer of the stream. When a 10070 names a last message id that is not ours while our
//!   predecessor is known to be stored, another writer is present: the outbox announces
//!   [`Output::OrderingFallback`] and switches to [`OrderingMode::PerKeySerial`]; nothing is failed.
//! - [`OrderingMode::PerKeySerial`]: at most one publish in flight per ordering key (many keys still go
//!   in parallel up to `window`). Correct with any number of writers; throughput per key is one round
//!   trip per event.
//! - [`OrderingMode::Unordered`]: pipelined, every event retried on its own. Exactly-once still holds
//!   (message ids), order under faults does not.
//!
//! Atomic batch publish (server 2.12+) was measured at ~56k/s against ~78k/s for the chained window on
//! one connection (see DESIGN.md), and 2.9 lacks it, so it is not a mode here.
//!
//! # Retries, breaker, bounds
//!
//! A failure of an in-flight publish (timeout = ambiguous, connection lost, 503, 429, wrong last id)
//! rewinds delivery to that event and waits `retry.delay(n)` (default 100 ms, then 400 ms). When the
//! schedule runs out the episode counts as one breaker failure; an open breaker transmits nothing until
//! its deadline, then a single probe. Any answer to the probe that is not a retryable failure (an
//! ack, a terminal rejection, a 10070 handled without an episode) shows the broker is reachable and
//! closes it. Events are never dropped by a fault: they stay queued, bounded by `max_events` and
//! `max_bytes`; a full queue refuses new pushes ([`Refused::QueueFull`]) and the adapter applies its
//! when-full policy (block with a deadline, or reject). With [`BreakerOpenPolicy::FailFast`] pushes
//! are refused while the breaker is open (the seed's behaviour).
//!
//! An overload answer (429, [`Failure::Overloaded`]) is retried the same way and also halves the
//! window in force ([`Outbox::window`]), once per burst; each ack grows it back by one up to the
//! configured window. Without that, every 429 re-sent a whole window into the same full queue.
//!
//! A 10158 answer ("duplicate message id is in process", replicated streams) is ambiguous: the event
//! is re-sent with the same id after a growing delay, without an episode ([`Failure::InProcess`]).
//! A reconnect ([`Outbox::handle_reconnected`]) ends the breaker's wait at once.
//!
//! # State
//!
//! Each entry has its own state (pending, in flight with its attempt, acked). The machine as a
//! whole has a *gate* (open, retry at an instant, hold behind one event) that every transmission
//! passes, and a *scheduler* per ordering mode that carries only that mode's data (the chain's
//! anchor and re-anchor flag and its memory of recent ids; the per-key locks) and picks the next
//! event. A new ordering mode is a new scheduler variant.
//!
//! Entries keep only what a persistent spool needs: a local sequence, the message (with its stable
//! message id) and the unix millis it was accepted at. No `Instant` is stored in an entry.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backoff::{deadline_after, RetrySchedule};
use crate::breaker::{Admission, Breaker, BreakerConfig, BreakerEvent, BreakerInput, BreakerState};
use crate::event::MsgId;

/// Local sequence number of a pushed event, increasing from 1 in push order.
pub type EventSeq = u64;

/// One encoded event, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The rendered, validated subject.
    pub subject: String,
    /// The deterministic message id (`Nats-Msg-Id`).
    pub msg_id: MsgId,
    /// Headers other than the ones the outbox and adapter add (content type, `ce-` attributes).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// The ordering key: events of one key are stored in push order.
    pub key: String,
}

impl Message {
    /// Bytes this message accounts for against `max_bytes`.
    pub fn size(&self) -> usize {
        self.subject.len()
            + self.msg_id.as_str().len()
            + self.body.len()
            + self.key.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
    }
}

/// How order is kept; see the module docs for the guarantee of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingMode {
    /// Pipelined with `Nats-Expected-Last-Msg-Id` chaining (single writer; falls back automatically).
    #[default]
    Chained,
    /// One in flight per ordering key (any number of writers).
    PerKeySerial,
    /// Pipelined, no order under faults.
    Unordered,
}

impl fmt::Display for OrderingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OrderingMode::Chained => "chained",
            OrderingMode::PerKeySerial => "per-key-serial",
            OrderingMode::Unordered => "unordered",
        })
    }
}

/// What `push` does while the breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakerOpenPolicy {
    /// Keep accepting into the bounded queue (default).
    #[default]
    Queue,
    /// Refuse with [`Refused::BreakerOpen`] (the seed's behaviour).
    FailFast,
}

/// Outbox settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Maximum publishes awaiting an ack (>= 1).
    pub window: usize,
    /// Maximum events held (queued + in flight) (>= 1).
    pub max_events: usize,
    /// Maximum bytes held, per [`Message::size`] (>= 1).
    pub max_bytes: usize,
    /// The ordering mechanism.
    pub ordering: OrderingMode,
    /// How long a publish may wait for its ack before it counts as an (ambiguous) failure.
    pub ack_timeout: Duration,
    /// Delays between re-sends within one failure episode.
    pub retry: RetrySchedule,
    /// The breaker.
    pub breaker: BreakerConfig,
    /// What `push` does while the breaker is open.
    pub when_breaker_open: BreakerOpenPolicy,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            window: 256,
            max_events: 100_000,
            max_bytes: 64 * 1024 * 1024,
            ordering: OrderingMode::Chained,
            ack_timeout: Duration::from_secs(5),
            retry: RetrySchedule::default(),
            breaker: BreakerConfig::default(),
            when_breaker_open: BreakerOpenPolicy::Queue,
        }
    }
}

/// A configuration value the outbox cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A bound that must be at least 1 is 0.
    #[error("outbox {field} is 0; it must be at least 1")]
    Zero {
        /// The field name.
        field: &'static str,
    },
    /// The ack timeout is zero.
    #[error("outbox ack_timeout is 0; give publishes time to be acknowledged (default 5 s)")]
    ZeroAckTimeout,
    /// The window exceeds the event bound, so it could never fill.
    #[error("outbox window ({window}) is larger than max_events ({max_events}); lower the window or raise max_events")]
    WindowAboveQueue {
        /// The window.
        window: usize,
        /// The event bound.
        max_events: usize,
    },
}

impl OutboxConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("window", self.window),
            ("max_events", self.max_events),
            ("max_bytes", self.max_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.ack_timeout.is_zero() {
            return Err(ConfigError::ZeroAckTimeout);
        }
        if self.window > self.max_events {
            return Err(ConfigError::WindowAboveQueue {
                window: self.window,
                max_events: self.max_events,
            });
        }
        Ok(())
    }
}

/// Why a push was refused. Nothing was queued; the caller still owns the event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The queue is at its bound.
    #[error("outbox full: {events} events / {bytes} bytes held, bounds {max_events} events / {max_bytes} bytes; wait for deliveries or raise the bounds")]
    QueueFull {
        /// Events held.
        events: usize,
        /// Bytes held.
        bytes: usize,
        /// The event bound.
        max_events: usize,
        /// The byte bound.
        max_bytes: usize,
    },
    /// One message is larger than the whole byte bound.
    #[error("event of {size} bytes exceeds the outbox byte bound of {max_bytes}; raise max_bytes")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The byte bound.
        max_bytes: usize,
    },
    /// The breaker is open and the policy is fail-fast.
    #[error(
        "breaker open (fail-fast policy); the broker is failing, retry after the breaker's probe"
    )]
    BreakerOpen,
}

/// The command to publish one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Which event; fetch its bytes with [`Outbox::message`].
    pub seq: EventSeq,
    /// Transmission count of this event, from 1; echo it in `handle_failure`.
    pub attempt: u32,
    /// The `Nats-Expected-Last-Msg-Id` to send, if any.
    pub expected_last_msg_id: Option<MsgId>,
    /// Whether this is the breaker's single half-open probe.
    pub probe: bool,
}

/// A broker acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Stream that stored the event.
    pub stream: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// The broker had it already (a retry within the duplicate window).
    pub duplicate: bool,
}

/// Why a publish did not produce an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Not stored; safe and sensible to retry (connection lost, 503, 429, stream unavailable).
    Retryable {
        /// Human-readable cause.
        reason: String,
    },
    /// No answer within the ack timeout: it may or may not be stored. Retried with the same id.
    Timeout,
    /// The broker is overloaded (429, e.g. a stream's ingest queue is full): not stored. Retried
    /// like [`Failure::Retryable`], and the window in force halves (once per burst) and grows
    /// back by one per ack, so the re-sends do not recreate the overload.
    Overloaded {
        /// Human-readable cause.
        reason: String,
    },
    /// "Duplicate message id is in process" (JetStream 10158, replicated streams on 2.11+): the
    /// stream leader holds this message id as not yet decided. Either an earlier transmission is
    /// still being replicated (it will be stored, and a re-send then answers `duplicate`), or an
    /// earlier transmission failed when it was applied (e.g. 10070) and the leader keeps its id
    /// blocked until the duplicate window passes or the leader changes. Ambiguous, never terminal:
    /// the event is re-sent with the same id after a delay, without counting against the breaker
    /// (the broker answered).
    InProcess,
    /// The broker's last message id is not the expected one (JetStream 10070).
    WrongLastMsgId {
        /// The last id the broker reported, when the error text carried it.
        actual: Option<String>,
    },
    /// This event can never be stored (invalid, too large, rejected by stream limits).
    Terminal(Rejection),
}

/// A terminal, per-event refusal by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The broker's error code, if any (JetStream `err_code`).
    pub code: Option<u16>,
    /// What the broker said.
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{} (error {code})", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// What the outbox tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Publish this event now.
    Transmit(Transmit),
    /// The event is stored.
    Delivered {
        /// Which event.
        seq: EventSeq,
        /// The broker's ack.
        ack: Ack,
    },
    /// The event can never be stored; it has left the outbox.
    Rejected {
        /// Which event.
        seq: EventSeq,
        /// Why.
        rejection: Rejection,
    },
    /// A failure episode: delivery resumes from `seq` after `delay`.
    Retrying {
        /// First event that will be re-sent.
        seq: EventSeq,
        /// Episode number since the last ack, from 1.
        retry: u32,
        /// Wait before re-sending.
        delay: Duration,
        /// Why.
        reason: String,
    },
    /// The breaker changed state.
    Breaker(BreakerEvent),
    /// Chaining found another writer on the stream; the outbox switched modes.
    OrderingFallback {
        /// Mode in force from now on.
        to: OrderingMode,
        /// The evidence.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Pending,
    /// `tx` numbers transmissions across the outbox, to tell a burst sent before a window
    /// reduction from one sent after it.
    InFlight {
        attempt: u32,
        tx: u64,
    },
    /// Stored. `links`: the stream's last message id became this event's id when it was stored
    /// (false for a re-emitted event whose original is older than the stream's tail: the broker
    /// answered `duplicate` and left its last id alone). `dup`: the ack said `duplicate`, so
    /// whether later messages (ours from before a restart, or another writer's) follow it in the
    /// stream is unknown.
    Acked {
        links: bool,
        dup: bool,
    },
}

impl EntryState {
    fn is_acked(self) -> bool {
        matches!(self, EntryState::Acked { .. })
    }
}

#[derive(Debug, Clone)]
struct Entry {
    seq: EventSeq,
    message: Message,
    unix_ms: u64,
    state: EntryState,
    attempts: u32,
    /// Its message id was pushed before (recently): a re-emitted event, most likely answered
    /// `duplicate`. Chained mode sends nothing after it until its answer is in.
    reemit: bool,
}

/// Message ids of the last pushes, so a re-emitted event is recognised when it is pushed.
///
/// Bounded: it remembers [`RECENT_IDS`] pushes. A re-emit of an older event is still handled
/// correctly, by re-linking the chain when the broker names the real last id (one rewind).
#[derive(Debug, Default)]
struct RecentIds {
    /// Id -> number of the last push that carried it.
    last_push: HashMap<MsgId, u64>,
    order: VecDeque<(MsgId, u64)>,
    pushes: u64,
}

impl RecentIds {
    /// Records a push of `id`; returns whether it was seen before.
    fn record(&mut self, id: &MsgId) -> bool {
        self.pushes += 1;
        let seen = self.last_push.insert(id.clone(), self.pushes).is_some();
        self.order.push_back((id.clone(), self.pushes));
        if self.order.len() > RECENT_IDS {
            if let Some((old, n)) = self.order.pop_front() {
                if self.last_push.get(&old) == Some(&n) {
                    self.last_push.remove(&old);
                }
            }
        }
        seen
    }
}

/// How many recent pushes [`Outbox`] remembers to recognise a re-emitted event (chained mode).
pub const RECENT_IDS: usize = 16_384;

/// First re-send delay after a 10158 "in process" answer.
pub const IN_PROCESS_FIRST_DELAY: Duration = Duration::from_millis(100);

/// Longest re-send delay after repeated 10158 answers. A replicated stream keeps an id blocked
/// for up to its duplicate window, so the re-sends go on at this pace until it is decided.
pub const IN_PROCESS_MAX_DELAY: Duration = Duration::from_secs(2);

/// An event handed back by [`Outbox::abandon`]: never confirmed stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    /// Which event.
    pub seq: EventSeq,
    /// The message.
    pub message: Message,
    /// When it was accepted (unix millis, as passed to `push`).
    pub unix_ms: u64,
    /// Whether it had been transmitted at least once (it may then be stored after all).
    pub transmitted: bool,
}

/// What holds every transmission back, whatever the ordering mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Nothing: transmit up to the window.
    Open,
    /// A failure episode (or an "in process" answer): nothing goes out before this instant.
    RetryAt(Instant),
    /// Chained: nothing goes out until this event's transmission is answered (or no longer in
    /// flight). A retry delay takes precedence over a hold.
    HoldBehind(EventSeq),
}

/// How the next event to send is chosen, with the state only that mode needs. A new ordering mode
/// is a new variant here and in [`Outbox::find_sendable`] / [`Outbox::next_transmit`].
#[derive(Debug)]
enum Scheduler {
    /// Pipelined, each publish naming its predecessor's id.
    Chained(Chain),
    /// One publish in flight per ordering key.
    PerKeySerial(KeyLocks),
    /// Pipelined, no order under faults.
    Unordered,
}

/// Chained mode's state.
#[derive(Debug, Default)]
struct Chain {
    /// The last event released after an ack that moved the stream's last id: what the first held
    /// event follows.
    anchor: Option<Anchor>,
    /// The first event not yet stored goes next without an expected-last id, and nothing after it
    /// until it is answered. Set whenever the stream's last id is not known to be our
    /// predecessor's while every earlier event is stored: after a failure episode or a
    /// reconnect (a restart makes the stream forget its last id; on a replicated stream a failed
    /// check is worse, see `crate::capability`), and when the broker named a last id the chain
    /// cannot follow.
    reanchor: bool,
    /// Stream sequence of the newest message this sink stored: the stream's tail as far as this
    /// sink can tell.
    tail_seq: Option<u64>,
    /// That message's id.
    tail_id: Option<MsgId>,
    /// Recent message ids, to recognise re-emitted events.
    recent: RecentIds,
}

/// The chain's anchor.
#[derive(Debug, Clone)]
struct Anchor {
    id: MsgId,
    /// Its ack said `duplicate` (see [`EntryState::Acked`]).
    dup: bool,
}

/// Per-key-serial mode's state.
#[derive(Debug, Default)]
struct KeyLocks {
    /// Publishes in flight per key.
    in_flight: HashMap<String, usize>,
    /// Pending entries per key, so a scan can stop once every key with pending entries is blocked.
    pending: HashMap<String, usize>,
}

impl KeyLocks {
    fn add(map: &mut HashMap<String, usize>, key: &str) {
        match map.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                map.insert(key.to_owned(), 1);
            }
        }
    }

    fn remove(map: &mut HashMap<String, usize>, key: &str) {
        if let Some(n) = map.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

/// The queue bounds and breaker policy every event queue of this crate admits by (the outbox and
/// the fast-batch lane).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub(crate) max_events: usize,
    pub(crate) max_bytes: usize,
    pub(crate) when_breaker_open: BreakerOpenPolicy,
}

impl Bounds {
    fn of(config: &OutboxConfig) -> Self {
        Bounds {
            max_events: config.max_events,
            max_bytes: config.max_bytes,
            when_breaker_open: config.when_breaker_open,
        }
    }

    /// Whether `size` more bytes fit beside `held` (events, bytes).
    pub(crate) fn has_room(self, held: (usize, usize), size: usize) -> bool {
        held.0 < self.max_events && held.1 + size <= self.max_bytes
    }
}

/// Whether a queue holding `held` (events, bytes) accepts an event of `size` bytes now: the
/// breaker policy first, then an event that could never fit, then the bounds.
pub(crate) fn admit(
    bounds: Bounds,
    held: (usize, usize),
    size: usize,
    breaker_open: bool,
) -> Result<(), Refused> {
    if bounds.when_breaker_open == BreakerOpenPolicy::FailFast && breaker_open {
        return Err(Refused::BreakerOpen);
    }
    if size > bounds.max_bytes {
        return Err(Refused::TooLarge {
            size,
            max_bytes: bounds.max_bytes,
        });
    }
    if !bounds.has_room(held, size) {
        return Err(Refused::QueueFull {
            events: held.0,
            bytes: held.1,
            max_events: bounds.max_events,
            max_bytes: bounds.max_bytes,
        });
    }
    Ok(())
}

/// Index of the entry with sequence `seq` in a queue ordered by sequence. Sequences are
/// consecutive unless an entry was removed from the middle (a rejection), so the offset from the
/// front is right almost always; a binary search covers the rest.
pub(crate) fn position_of<E>(
    entries: &VecDeque<E>,
    seq: EventSeq,
    seq_of: impl Fn(&E) -> EventSeq,
) -> Option<usize> {
    let front = seq_of(entries.front()?);
    let guess = usize::try_from(seq.checked_sub(front)?).ok()?;
    if entries.get(guess).is_some_and(|e| seq_of(e) == seq) {
        return Some(guess);
    }
    let i = entries.partition_point(|e| seq_of(e) < seq);
    (seq_of(entries.get(i)?) == seq).then_some(i)
}

/// Scans for a sendable entry stop after this many entries past the cursor (per-key-serial mode), so
/// one blocked key at the head of a long queue costs bounded work per poll.
const SCAN_LIMIT: usize = 4096;

/// Most entries reserved when an outbox is made (more grow on demand).
pub const RESERVE_LIMIT: usize = 1 << 17;

/// The ordered delivery machine. See the module docs.
#[derive(Debug)]
pub struct Outbox {
    config: OutboxConfig,
    scheduler: Scheduler,
    gate: Gate,
    entries: VecDeque<Entry>,
    bytes: usize,
    next_seq: EventSeq,
    /// Index into `entries` of the first entry that may be pending.
    cursor: usize,
    in_flight: usize,
    /// Ack deadlines in transmission order (lazily cleaned).
    timers: VecDeque<(Instant, EventSeq, u32)>,
    retries: u32,
    /// Consecutive "in process" (10158) answers since the last ack, for the re-send delay.
    in_process_retries: u32,
    breaker: Breaker,
    outputs: VecDeque<Output>,
    /// The window in force: `config.window`, less after overload (see [`Failure::Overloaded`]).
    window: usize,
    /// Number of the next transmission.
    next_tx: u64,
    /// Transmissions numbered below this were sent before the last window reduction.
    shrink_mark: u64,
}

impl Scheduler {
    fn for_mode(mode: OrderingMode) -> Self {
        match mode {
            // The stream's last id is unknown until the first ack (it may even be a re-emit of
            // the stream's last message from an earlier run): the first event goes alone.
            OrderingMode::Chained => Scheduler::Chained(Chain {
                reanchor: true,
                ..Chain::default()
            }),
            OrderingMode::PerKeySerial => Scheduler::PerKeySerial(KeyLocks::default()),
            OrderingMode::Unordered => Scheduler::Unordered,
        }
    }

    fn mode(&self) -> OrderingMode {
        match self {
            Scheduler::Chained(_) => OrderingMode::Chained,
            Scheduler::PerKeySerial(_) => OrderingMode::PerKeySerial,
            Scheduler::Unordered => OrderingMode::Unordered,
        }
    }
}

impl Outbox {
    /// A new, empty outbox.
    pub fn new(config: OutboxConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let reserve = config.max_events.min(RESERVE_LIMIT);
        Ok(Self {
            scheduler: Scheduler::for_mode(config.ordering),
            gate: Gate::Open,
            breaker: Breaker::new(config.breaker.clone()),
            window: config.window,
            config,
            // Reserved up front (address space; pages are touched as the queue fills) so a burst
            // does not pay for doubling copies of a deque of ~150-byte entries.
            entries: VecDeque::with_capacity(reserve),
            bytes: 0,
            next_seq: 1,
            cursor: 0,
            in_flight: 0,
            timers: VecDeque::new(),
            retries: 0,
            in_process_retries: 0,
            outputs: VecDeque::new(),
            next_tx: 0,
            shrink_mark: 0,
        })
    }

    /// The config.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// The ordering mode in force (may differ from the config after a fallback).
    pub fn ordering(&self) -> OrderingMode {
        self.scheduler.mode()
    }

    /// Events held (queued, in flight, or acked but not yet released behind an earlier one).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Publishes awaiting an ack.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The window in force: the configured one, or less while recovering from overload.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The breaker's state.
    pub fn breaker(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Whether a push of `size` bytes would fit now.
    pub fn has_room(&self, size: usize) -> bool {
        Bounds::of(&self.config).has_room((self.entries.len(), self.bytes), size)
    }

    /// The message of a held event.
    pub fn message(&self, seq: EventSeq) -> Option<&Message> {
        self.index_of(seq).map(|i| &self.entries[i].message)
    }

    /// The unix millis a held event was accepted at.
    pub fn accepted_at(&self, seq: EventSeq) -> Option<u64> {
        self.index_of(seq).map(|i| self.entries[i].unix_ms)
    }

    /// Accepts an event. `unix_ms` is the wall time to persist with it.
    pub fn push(
        &mut self,
        message: Message,
        unix_ms: u64,
        _now: Instant,
    ) -> Result<EventSeq, Refused> {
        let size = message.size();
        admit(
            Bounds::of(&self.config),
            (self.entries.len(), self.bytes),
            size,
            self.breaker.is_open(),
        )?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += size;
        // Only chaining needs to know: elsewhere a duplicate answer changes nothing.
        let reemit = match &mut self.scheduler {
            // The stream's newest message of ours counts even when it is older than the memory:
            // a successor chained to a re-emit of it would pass the check before anything the
            // re-emit was queued behind.
            Scheduler::Chained(chain) => {
                let newest = chain.tail_id.as_ref() == Some(&message.msg_id);
                chain.recent.record(&message.msg_id) || newest
            }
            _ => false,
        };
        self.entries.push_back(Entry {
            seq,
            message,
            unix_ms,
            state: EntryState::Pending,
            attempts: 0,
            reemit,
        });
        self.pending_enter(self.entries.len() - 1);
        Ok(seq)
    }

    /// Takes over an event another delivery machine gave up on ([`Abandoned`], e.g. from a lane
    /// whose stream stopped allowing batches), keeping its sequence so its caller's bookkeeping
    /// stays valid. Events must be adopted in order and above every sequence held; later pushes
    /// continue after the highest adopted. A transmitted event may be stored already: its
    /// re-send carries the same message id, so the stream's duplicate window absorbs it.
    pub fn adopt(&mut self, moved: Abandoned, now: Instant) -> Result<EventSeq, Refused> {
        self.next_seq = self.next_seq.max(moved.seq);
        self.push(moved.message, moved.unix_ms, now)
    }

    /// The next command or event; `None` when there is nothing to do until an input or the deadline.
    pub fn poll_output(&mut self, now: Instant) -> Option<Output> {
        if let Some(out) = self.outputs.pop_front() {
            return Some(out);
        }
        self.next_transmit(now).map(Output::Transmit)
    }

    /// The next event (delivered, rejected, retrying, breaker, fallback) without starting any
    /// transmission: for a driver that must not publish for now (its stream became unsafe) but
    /// still reports the outcomes of what is already in flight. Events stay queued.
    pub fn poll_event(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next deadline (ack timeout, retry delay, breaker), if any. Early calls to
    /// [`handle_timeout`](Self::handle_timeout) are harmless.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.timers.front().map(|t| t.0);
        let retry_at = match self.gate {
            Gate::RetryAt(at) => Some(at),
            _ => None,
        };
        for t in [retry_at, self.breaker.poll_timeout()]
            .into_iter()
            .flatten()
        {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next
    }

    /// The clock reached (or passed) a deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.gate, Gate::RetryAt(at) if now >= at) {
            self.gate = Gate::Open;
        }
        if let Some(event) = self.breaker.handle(BreakerInput::Timeout, now) {
            self.outputs.push_back(Output::Breaker(event));
        }
        while let Some(&(deadline, seq, attempt)) = self.timers.front() {
            if deadline > now {
                break;
            }
            self.timers.pop_front();
            if self.in_flight_attempt(seq) == Some(attempt) {
                self.fail(seq, "no ack within the ack timeout (ambiguous)".into(), now);
            }
        }
    }

    /// The broker stored event `seq` (from any transmission of it).
    pub fn handle_ack(&mut self, seq: EventSeq, ack: Ack, now: Instant) {
        let Some(i) = self.index_of(seq) else { return };
        let state = self.entries[i].state;
        match state {
            EntryState::Acked { .. } => return,
            EntryState::InFlight { .. } => self.release_flight(i),
            EntryState::Pending => self.pending_leave(i),
        }
        // A fresh store is the stream's new tail. A `duplicate` answer names the original's
        // sequence and leaves the stream's last id alone: the chain goes on from this id only
        // if that original is the newest message this sink knows of (a retry whose first ack was
        // lost), not when it is older (a re-emitted event).
        // A `duplicate` answer can only be trusted as the stream's end when nothing of ours
        // before it is missing: a re-emit's original may sit in the stream before events this
        // sink has not stored yet, and a successor chained to it would overtake them.
        let all_before_stored = ack.duplicate && self.all_before_acked(i);
        let links = match &mut self.scheduler {
            Scheduler::Chained(chain) => {
                let links = !ack.duplicate
                    || (all_before_stored && chain.tail_seq.is_none_or(|t| ack.sequence > t));
                if links {
                    chain.tail_seq = Some(ack.sequence);
                    chain.tail_id = Some(self.entries[i].message.msg_id.clone());
                }
                links
            }
            _ => true,
        };
        self.entries[i].state = EntryState::Acked {
            links,
            dup: ack.duplicate,
        };
        self.retries = 0;
        self.in_process_retries = 0;
        if self.window < self.config.window {
            self.window += 1;
        }
        self.release_hold_on(seq);
        if let Some(event) = self.breaker.handle(BreakerInput::Success, now) {
            self.outputs.push_back(Output::Breaker(event));
        }
        self.outputs.push_back(Output::Delivered { seq, ack });
        self.release_acked_prefix();
        self.drop_stale_timers();
    }

    /// A transmission of event `seq` (its `attempt`) failed.
    pub fn handle_failure(&mut self, seq: EventSeq, attempt: u32, failure: Failure, now: Instant) {
        if self.in_flight_attempt(seq) != Some(attempt) {
            return; // stale: that transmission was already given up on
        }
        match failure {
            Failure::Terminal(rejection) => {
                self.broker_answered(now);
                self.reject(seq, rejection);
            }
            Failure::Retryable { reason } => self.fail(seq, reason, now),
            Failure::Overloaded { reason } => {
                if self.shrink_window(seq) {
                    self.fail(seq, reason, now);
                } else if let Some(i) = self.index_of(seq) {
                    // Same burst as an overload already handled: wait with it, no new episode.
                    self.rewind(i);
                    self.drop_stale_timers();
                }
            }
            Failure::Timeout => self.fail(seq, "ack timeout (ambiguous)".into(), now),
            Failure::InProcess => self.in_process(seq, now),
            Failure::WrongLastMsgId { actual } => self.wrong_last(seq, actual, now),
        }
    }

    /// The connection dropped: every in-flight publish is in doubt. One failure episode.
    pub fn handle_connection_lost(&mut self, now: Instant) {
        // Even an idle sink must not trust the stream's last id after this: a restart forgets it,
        // and on a replicated stream a failed expected-last check is far worse than a re-anchor.
        self.set_reanchor();
        let Some(first) = self
            .entries
            .iter()
            .position(|e| matches!(e.state, EntryState::InFlight { .. }))
        else {
            return;
        };
        // Every in-flight reply went with the connection, in every mode. `fail` rewinds only the
        // failed event outside chained mode; the others would each wait out the ack timeout and
        // start an episode of their own, so one loss could exhaust the retries and open the breaker.
        for i in first..self.entries.len() {
            if let EntryState::InFlight { .. } = self.entries[i].state {
                self.release_flight(i);
                self.entries[i].state = EntryState::Pending;
                self.pending_enter(i);
            }
        }
        self.cursor = self.cursor.min(first);
        let seq = self.entries[first].seq;
        self.fail(seq, "connection lost".into(), now);
    }

    /// The client (re)connected to the broker. An open breaker moves to half-open at once, so the
    /// probe goes out now instead of at the end of a reconnect backoff that may be minutes long;
    /// a pending retry delay ends too.
    pub fn handle_reconnected(&mut self, now: Instant) {
        // No re-anchor here: the first connection is no reason for one, and every reconnect
        // follows a `handle_connection_lost`, which sets it.
        if let Gate::RetryAt(_) = self.gate {
            self.gate = Gate::Open;
        }
        if let Some(event) = self.breaker.handle(BreakerInput::Reconnected, now) {
            self.outputs.push_back(Output::Breaker(event));
        }
    }

    /// Gives up on everything held (for a close whose deadline passed): hands back every event that
    /// has no outcome yet, in order, and empties the outbox.
    pub fn abandon(&mut self) -> Vec<Abandoned> {
        let out = self
            .entries
            .drain(..)
            .filter(|e| !e.state.is_acked())
            .map(|e| Abandoned {
                seq: e.seq,
                transmitted: e.attempts > 0,
                message: e.message,
                unix_ms: e.unix_ms,
            })
            .collect();
        self.bytes = 0;
        self.cursor = 0;
        self.in_flight = 0;
        if let Scheduler::PerKeySerial(locks) = &mut self.scheduler {
            *locks = KeyLocks::default();
        }
        if let Scheduler::Chained(chain) = &mut self.scheduler {
            chain.reanchor = false;
        }
        self.timers.clear();
        self.gate = Gate::Open;
        out
    }

    /// Chained mode: re-anchor the first event not yet stored (see [`Chain::reanchor`]).
    fn set_reanchor(&mut self) {
        if let Scheduler::Chained(chain) = &mut self.scheduler {
            chain.reanchor = true;
        }
    }

    /// Chained mode: transmission waits for `seq`'s answer, unless a retry delay is running.
    fn hold_behind(&mut self, seq: EventSeq) {
        if !matches!(self.gate, Gate::RetryAt(_)) {
            self.gate = Gate::HoldBehind(seq);
        }
    }

    /// Ends a hold, whichever event it waits for.
    fn release_hold(&mut self) {
        if let Gate::HoldBehind(_) = self.gate {
            self.gate = Gate::Open;
        }
    }

    /// Ends a hold that waits for `seq`.
    fn release_hold_on(&mut self, seq: EventSeq) {
        if self.gate == Gate::HoldBehind(seq) {
            self.gate = Gate::Open;
        }
    }

    /// A retry delay until `at` (the later of two, if one runs already).
    fn retry_at(&mut self, at: Instant) {
        self.gate = match self.gate {
            Gate::RetryAt(t) => Gate::RetryAt(t.max(at)),
            _ => Gate::RetryAt(at),
        };
    }

    fn index_of(&self, seq: EventSeq) -> Option<usize> {
        position_of(&self.entries, seq, |e| e.seq)
    }

    fn in_flight_attempt(&self, seq: EventSeq) -> Option<u32> {
        match self.entries[self.index_of(seq)?].state {
            EntryState::InFlight { attempt, .. } => Some(attempt),
            _ => None,
        }
    }

    fn release_flight(&mut self, i: usize) {
        self.in_flight -= 1;
        if let Scheduler::PerKeySerial(locks) = &mut self.scheduler {
            KeyLocks::remove(&mut locks.in_flight, &self.entries[i].message.key);
        }
    }

    /// An overload answer to event `seq`: halve the window, unless the failed transmission went
    /// out before the last reduction (one reduction per burst, not one per refused publish).
    /// Returns whether this answer starts a new reduction (and so a failure episode).
    fn shrink_window(&mut self, seq: EventSeq) -> bool {
        let Some(i) = self.index_of(seq) else {
            return false;
        };
        match self.entries[i].state {
            EntryState::InFlight { tx, .. } if tx >= self.shrink_mark => {
                self.window = (self.window / 2).max(1);
                self.shrink_mark = self.next_tx;
                true
            }
            _ => false,
        }
    }

    /// Entry `i` became pending.
    fn pending_enter(&mut self, i: usize) {
        if let Scheduler::PerKeySerial(locks) = &mut self.scheduler {
            KeyLocks::add(&mut locks.pending, &self.entries[i].message.key);
        }
    }

    /// Entry `i` stops being pending.
    fn pending_leave(&mut self, i: usize) {
        if let Scheduler::PerKeySerial(locks) = &mut self.scheduler {
            KeyLocks::remove(&mut locks.pending, &self.entries[i].message.key);
        }
    }

    fn release_acked_prefix(&mut self) {
        while self.entries.front().is_some_and(|e| e.state.is_acked()) {
            let e = self.entries.pop_front().expect("front exists");
            self.bytes -= e.message.size();
            if let (EntryState::Acked { links: true, dup }, Scheduler::Chained(chain)) =
                (e.state, &mut self.scheduler)
            {
                chain.anchor = Some(Anchor {
                    id: e.message.msg_id,
                    dup,
                });
            }
            self.cursor = self.cursor.saturating_sub(1);
        }
    }

    fn drop_stale_timers(&mut self) {
        while let Some(&(_, seq, attempt)) = self.timers.front() {
            if self.in_flight_attempt(seq) == Some(attempt) {
                break;
            }
            self.timers.pop_front();
        }
    }

    /// The id that event at index `i` must follow in the chain: its predecessor's, skipping
    /// re-emitted events that the broker answered `duplicate` without moving its last id.
    fn predecessor_id(&self, i: usize) -> Option<MsgId> {
        let mut j = i;
        while j > 0 {
            let e = &self.entries[j - 1];
            if !matches!(e.state, EntryState::Acked { links: false, .. }) {
                return Some(e.message.msg_id.clone());
            }
            j -= 1;
        }
        match &self.scheduler {
            Scheduler::Chained(chain) => chain.anchor.as_ref().map(|a| a.id.clone()),
            _ => None,
        }
    }

    /// Whether the stream's last id may legitimately differ from [`predecessor_id`](Self::predecessor_id)
    /// while every event before index `i` is stored: the link was confirmed only by a `duplicate`
    /// answer, or re-emitted events were skipped. A mismatch is then no evidence of another writer.
    fn link_uncertain(&self, i: usize) -> bool {
        match i.checked_sub(1).map(|j| self.entries[j].state) {
            None => match &self.scheduler {
                Scheduler::Chained(chain) => chain.anchor.as_ref().is_some_and(|a| a.dup),
                _ => false,
            },
            Some(EntryState::Acked { links: false, .. }) => true,
            Some(EntryState::Acked { dup, .. }) => dup,
            Some(_) => false,
        }
    }

    /// Index `i` is the first event not yet stored (everything before it is acked).
    fn all_before_acked(&self, i: usize) -> bool {
        self.entries.iter().take(i).all(|e| e.state.is_acked())
    }

    /// Turns in-flight entries back into pending: from index `from` on (chained), or only `from`.
    fn rewind(&mut self, from: usize) {
        let end = match self.scheduler {
            Scheduler::Chained(_) => self.entries.len(),
            _ => from + 1,
        };
        for i in from..end {
            if let EntryState::InFlight { .. } = self.entries[i].state {
                self.release_flight(i);
                self.entries[i].state = EntryState::Pending;
                self.pending_enter(i);
            }
        }
        self.cursor = self.cursor.min(from);
    }

    /// A failure episode for the event `seq`: rewind, then wait or trip the breaker.
    fn fail(&mut self, seq: EventSeq, reason: String, now: Instant) {
        let Some(i) = self.index_of(seq) else { return };
        self.release_hold();
        if let Scheduler::Chained(chain) = &mut self.scheduler {
            chain.reanchor = false;
        }
        let probe = matches!(
            self.breaker.state(),
            BreakerState::HalfOpen {
                probe_in_flight: true,
                ..
            }
        );
        self.rewind(i);
        self.drop_stale_timers();
        self.reanchor_if_first(i);
        if probe {
            if let Some(event) = self.breaker.handle(BreakerInput::Failure, now) {
                self.outputs.push_back(Output::Breaker(event));
            }
            return;
        }
        if self.breaker.is_open() {
            return;
        }
        match self.config.retry.delay(self.retries) {
            Some(delay) => {
                self.retries += 1;
                self.retry_at(deadline_after(now, delay));
                self.outputs.push_back(Output::Retrying {
                    seq,
                    retry: self.retries,
                    delay,
                    reason,
                });
            }
            None => {
                self.retries = 0;
                if let Gate::RetryAt(_) = self.gate {
                    self.gate = Gate::Open;
                }
                if let Some(event) = self.breaker.handle(BreakerInput::Failure, now) {
                    self.outputs.push_back(Output::Breaker(event));
                }
            }
        }
    }

    /// Chained mode, after a failure: if index `i` is the first event not stored, send it next
    /// without an expected-last id. Every event before it is stored, so nothing can be stored out
    /// of order; and the stream's last id is not to be trusted (a restart forgets it, an election
    /// may have lost a publish). Chaining it would risk a 10070 that, on a replicated stream
    /// (2.11+), blocks its id as "in process" for the whole duplicate window.
    fn reanchor_if_first(&mut self, i: usize) {
        if i < self.entries.len() && self.all_before_acked(i) {
            self.set_reanchor();
        }
    }

    /// A 10158 "in process" answer: re-send the same id after a growing delay (capped at
    /// [`IN_PROCESS_MAX_DELAY`]), without an episode and without rejecting anything.
    fn in_process(&mut self, seq: EventSeq, now: Instant) {
        let Some(i) = self.index_of(seq) else { return };
        self.broker_answered(now);
        self.rewind(i);
        self.drop_stale_timers();
        self.reanchor_if_first(i);
        let delay = IN_PROCESS_FIRST_DELAY
            .saturating_mul(1u32 << self.in_process_retries.min(8))
            .min(IN_PROCESS_MAX_DELAY);
        self.in_process_retries = self.in_process_retries.saturating_add(1);
        self.retry_at(deadline_after(now, delay));
        self.outputs.push_back(Output::Retrying {
            seq,
            retry: self.in_process_retries,
            delay,
            reason: "duplicate message id is in process (10158): not decided yet, re-sending \
                     the same id"
                .into(),
        });
    }

    fn reject(&mut self, seq: EventSeq, rejection: Rejection) {
        let Some(i) = self.index_of(seq) else { return };
        self.release_flight(i);
        let e = self.entries.remove(i).expect("index is valid");
        self.bytes -= e.message.size();
        if i < self.cursor {
            self.cursor -= 1;
        }
        // Successors were chained to the rejected id; re-link them (no episode: nothing is wrong
        // with the broker). Their old transmissions fail with 10070 and are ignored as stale.
        if matches!(self.scheduler, Scheduler::Chained(_)) && i < self.entries.len() {
            self.rewind(i);
        }
        self.release_hold_on(seq);
        self.release_acked_prefix();
        self.drop_stale_timers();
        self.outputs.push_back(Output::Rejected { seq, rejection });
    }

    /// The broker processed a publish and answered with a per-event verdict (terminal, or 10070
    /// handled without an episode): it is reachable. Without this, such an answer to the half-open
    /// probe would leave the probe outstanding forever and nothing would be transmitted again.
    fn broker_answered(&mut self, now: Instant) {
        if let Some(event) = self.breaker.handle(BreakerInput::Success, now) {
            self.outputs.push_back(Output::Breaker(event));
        }
    }

    fn wrong_last(&mut self, seq: EventSeq, actual: Option<String>, now: Instant) {
        let i = self.index_of(seq).expect("in flight entries are held");
        // Not only the direct predecessor: a re-emitted event before this one may be acked as a
        // duplicate while an event before it is still unconfirmed.
        let unstored_before = (0..i).rev().find(|&j| !self.entries[j].state.is_acked());
        if let Some(j) = unstored_before {
            // An earlier event is not stored yet (lost, or still on its way): wait for it. Its own
            // ack or failure decides what happens next, so this is no episode.
            let pred = self.entries[j].seq;
            self.rewind(i);
            self.drop_stale_timers();
            self.hold_behind(pred);
            self.broker_answered(now);
            return;
        }
        // The stream's last message is one of our *later* events: it was stored before a fault
        // whose acks were lost, and this re-send comes after the duplicate window expired (within
        // it the broker would have answered `duplicate`). A chained event is stored only right
        // after its predecessor, so everything from here to that event is stored; the chain
        // cannot continue from our predecessor's id. Re-anchor here, as for a stream that forgot
        // its last id: those events are stored a second time (RELIABILITY.md F3 allows copies
        // beyond the window) and nothing is stored out of order. Failing instead would retry
        // the same answer forever.
        let chained = matches!(self.scheduler, Scheduler::Chained(_));
        if chained {
            let link = self.predecessor_id(i);
            if actual.is_some() && actual.as_deref() == link.as_ref().map(MsgId::as_str) {
                // The stream's last message is the one this event now follows: a re-emitted
                // predecessor was answered `duplicate` after this event had been sent. Re-send
                // it with the right link; nothing is wrong with the broker.
                self.rewind(i);
                self.drop_stale_timers();
                self.release_hold();
                self.broker_answered(now);
                return;
            }
            if self.link_uncertain(i) {
                // The link rests on a `duplicate` answer, so the stream may end in messages this
                // sink never saw acked (its own from before a restart, or a re-emit's original
                // being older than the tail). Everything before this event is stored: re-anchor.
                self.rewind(i);
                self.drop_stale_timers();
                self.release_hold();
                self.set_reanchor();
                self.broker_answered(now);
                return;
            }
        }
        let later_of_ours = chained
            && actual.as_deref().is_some_and(|a| {
                self.entries
                    .iter()
                    .skip(i + 1)
                    .any(|e| e.message.msg_id.as_str() == a)
            });
        if later_of_ours || (actual.as_deref().is_none_or(str::is_empty) && chained) {
            // The predecessor is stored but the stream reports no last id (it does not keep it
            // across a restart): nothing can be out of order before this event, so send it once
            // without the check to re-anchor the chain.
            // A successor's 10070 may have put transmission on hold behind this very event; the
            // rewind above made every hold from here on obsolete, and this event must go next.
            self.rewind(i);
            self.drop_stale_timers();
            self.release_hold();
            self.set_reanchor();
            self.broker_answered(now);
            return;
        }
        let ours = actual.as_deref().is_some_and(|a| {
            self.entries.iter().any(|e| e.message.msg_id.as_str() == a)
                || self.predecessor_id(0).is_some_and(|m| m.as_str() == a)
        });
        if ours || !chained {
            self.fail(seq, format!("wrong last msg id {actual:?}"), now);
            return;
        }
        // Our predecessor is stored and the stream's last message is someone else's.
        self.broker_answered(now);
        self.use_per_key_serial(format!(
            "stream's last message id is {:?}, not this sink's; another writer shares the stream",
            actual.unwrap_or_default()
        ));
    }

    /// Switches a chained outbox to per-key-serial for good, announcing it with `reason`
    /// ([`Output::OrderingFallback`]); other modes are left alone. Nothing fails: publishes in
    /// flight are re-sent the new way (their chained answers become stale). The adapter calls it
    /// when the stream makes chaining unsafe (see [`crate::capability::chaining_hazard`]); the
    /// outbox itself when another writer shows up.
    pub fn use_per_key_serial(&mut self, reason: String) {
        if !matches!(self.scheduler, Scheduler::Chained(_)) {
            return;
        }
        self.scheduler = Scheduler::PerKeySerial(KeyLocks::default());
        self.release_hold();
        let first_unacked = self
            .entries
            .iter()
            .position(|e| !e.state.is_acked())
            .unwrap_or(0);
        for j in first_unacked..self.entries.len() {
            if let EntryState::InFlight { .. } = self.entries[j].state {
                self.release_flight(j);
                self.entries[j].state = EntryState::Pending;
            }
        }
        self.cursor = self.cursor.min(first_unacked);
        for j in 0..self.entries.len() {
            if self.entries[j].state == EntryState::Pending {
                self.pending_enter(j);
            }
        }
        self.drop_stale_timers();
        self.outputs.push_back(Output::OrderingFallback {
            to: OrderingMode::PerKeySerial,
            reason,
        });
    }

    fn next_transmit(&mut self, now: Instant) -> Option<Transmit> {
        match self.gate {
            Gate::Open => {}
            Gate::RetryAt(at) if now >= at => self.gate = Gate::Open,
            Gate::RetryAt(_) => return None,
            // A hold waits for the predecessor's answer. Once that transmission is no longer in
            // flight (rewound by a rejection or a re-anchor, acked, or gone) there is nothing
            // left to wait for, and the predecessor itself may need re-sending.
            Gate::HoldBehind(h) if self.in_flight_attempt(h).is_none() => self.gate = Gate::Open,
            Gate::HoldBehind(_) => return None,
        }
        let probe = match self.breaker.admission() {
            Admission::Nothing => return None,
            Admission::Probe => true,
            Admission::Window => false,
        };
        if self.in_flight >= self.window {
            return None;
        }
        let i = self.find_sendable()?;
        let seq = self.entries[i].seq;
        // A re-anchored event and a re-emitted one are answered in a way the next event's link
        // depends on (stored or not; `duplicate` or not): nothing follows them until then.
        let reanchor_here = matches!(&self.scheduler, Scheduler::Chained(c) if c.reanchor)
            && self.all_before_acked(i);
        let (expected_last_msg_id, hold) = match &mut self.scheduler {
            Scheduler::Chained(chain) if reanchor_here => {
                chain.reanchor = false;
                (None, true)
            }
            Scheduler::Chained(_) => (self.predecessor_id(i), self.entries[i].reemit),
            _ => (None, false),
        };
        if hold {
            self.gate = Gate::HoldBehind(seq);
        }
        self.pending_leave(i);
        let entry = &mut self.entries[i];
        entry.attempts += 1;
        let attempt = entry.attempts;
        entry.state = EntryState::InFlight {
            attempt,
            tx: self.next_tx,
        };
        self.next_tx += 1;
        if let Scheduler::PerKeySerial(locks) = &mut self.scheduler {
            KeyLocks::add(&mut locks.in_flight, &entry.message.key);
        }
        self.in_flight += 1;
        self.timers
            .push_back((deadline_after(now, self.config.ack_timeout), seq, attempt));
        if probe {
            self.breaker.handle(BreakerInput::ProbeSent, now);
        }
        Some(Transmit {
            seq,
            attempt,
            expected_last_msg_id,
            probe,
        })
    }

    fn find_sendable(&mut self) -> Option<usize> {
        while self
            .entries
            .get(self.cursor)
            .is_some_and(|e| e.state != EntryState::Pending)
        {
            self.cursor += 1;
        }
        match &self.scheduler {
            Scheduler::Chained(_) | Scheduler::Unordered => {
                (self.cursor < self.entries.len()).then_some(self.cursor)
            }
            Scheduler::PerKeySerial(locks) => {
                let mut blocked: Vec<&str> = Vec::new();
                let end = self.entries.len().min(self.cursor + SCAN_LIMIT);
                for i in self.cursor..end {
                    let e = &self.entries[i];
                    let key = e.message.key.as_str();
                    if e.state != EntryState::Pending || blocked.contains(&key) {
                        continue;
                    }
                    if !locks.in_flight.contains_key(key) {
                        return Some(i);
                    }
                    blocked.push(key);
                    if blocked.len() >= locks.pending.len() {
                        break; // every key with pending events waits for its ack
                    }
                }
                None
            }
        }
    }
}
