//! The lane: ordered, pipelined delivery of one ordering key through fast batches (nats-server 2.14+), as a sans-IO machine.
//!
//! One lane holds the events of one ordering key and runs **one fast batch at a time** in gap mode
//! `fail` (see [`crate::fastbatch`] for the wire vocabulary). Its interface is the outbox's:
//! [`push`](Lane::push) events, drain [`poll_output`](Lane::poll_output) for [`LaneOutput::Transmit`]
//! commands and outcome events, feed each server reply to [`handle_reply`](Lane::handle_reply)
//! with the reply subject it arrived on, call [`handle_timeout`](Lane::handle_timeout) at
//! [`poll_timeout`](Lane::poll_timeout), and report [`handle_connection_lost`](Lane::handle_connection_lost)
//! / [`handle_reconnected`](Lane::handle_reconnected). Time is always the last parameter; the
//! machine reads no clock and does no IO. Batch ids come from an injected seed.
//!
//! # A batch's life
//!
//! 1. **Start.** The first unconfirmed event goes out as batch sequence 1 with op 0, and nothing
//!    else until the first reply: the server answers a start with a flow ack for sequence 0 that
//!    carries the ack interval `N` in force (the server picks it: `min(flow, 500 / batches on the
//!    stream)`, 1 for a batch that is not alone, doubling per ack). A lone event (the only one
//!    queued, and [`LaneConfig::commit_linger`] passed) starts with op 2 instead: store and commit
//!    at once, answered by the final PubAck within one round trip.
//! 2. **Pipeline.** Events go out with op 1 while fewer than `N * outstanding_acks` are
//!    unconfirmed. Each flow ack `{"type":"ack","seq":S}` confirms every event up to `S`
//!    (persisted, in order, on the stream leader): they leave the lane as [`LaneOutput::Delivered`].
//! 3. **Commit when dry.** Flow acks only confirm whole multiples of `N`; when every queued event
//!    has been sent and nothing new arrived for `commit_linger` (default 0), the lane sends an
//!    end-of-batch commit (op 3). The final PubAck's `count` confirms the rest. So at a low rate a
//!    receipt comes about one round trip after the event is sent, and a lane with nothing to send
//!    holds no batch open on the server (an open batch costs every other producer on the stream
//!    flow share, and the server drops it silently after 10 s idle).
//! 4. **End on trouble.** A gap notice, a per-message error, a refusal of one publish (429 from a
//!    full ingest queue, 503), 10208 (the server forgot the batch: idle timeout, restart), a lost
//!    connection, or no answer end the batch. In `fail` mode the server stores nothing after the
//!    gap and answers with the final PubAck whose `count` is the last persisted sequence `P`; when
//!    that PubAck cannot come (10208, connection lost, silence) `P` is the last flow-acked sequence.
//! 5. **Resume.** A new batch (new id) starts from `P + 1`, re-sending the same events with the
//!    same `Nats-Msg-Id`s. An event that was persisted after all (its ack lost) is skipped by the
//!    server's duplicate window and confirmed like any other.
//!
//! While a batch is open and nothing goes out, the lane pings (op 4) every
//! [`LaneConfig::keepalive`] (below the server's 10 s timeout). While it waits for an answer
//! (the first reply, a flow ack with the window full, the final PubAck) it acts after
//! [`LaneConfig::ack_timeout`]: a ping, or for an overdue PubAck the commit again (the commit may
//! have been lost on its way to a deposed leader, and pings are only answered with flow acks); if
//! that is not answered within one more `ack_timeout` the batch is given up (its fate on the
//! server does not matter: the next batch re-sends from the last confirmed event, same ids).
//!
//! # The guarantee
//!
//! - **Order, per lane, exact.** The server stores message `k` of a `fail`-mode batch only right
//!   after `k - 1` was stored or found to be a duplicate, and every batch of a lane starts at the
//!   first event not confirmed. So no event of the lane is stored before an earlier one of the same
//!   lane, whatever is lost, delayed, refused or re-sent. Other producers' messages interleave.
//! - **Exactly once within the duplicate window.** Every re-send carries the event's message id;
//!   the server skips a duplicate inside a batch and confirms it. An event re-sent after the
//!   stream's duplicate window has passed may be stored twice (RELIABILITY.md F3).
//! - **Receipts.** [`LaneOutput::Delivered`] means persisted (in `fail` mode a flow ack and the
//!   final PubAck confirm only persisted messages). Flow acks carry no stream sequence: a receipt
//!   names the batch and the batch sequence; the final PubAck's stream sequence is reported once per
//!   batch in [`LaneOutput::BatchEnded`].
//! - **Failures.** A terminal error for one event (an `err` reply, or an ordinary error to a
//!   message) rejects that event once the PubAck confirms everything before it, and the lane goes on
//!   with the next. Retryable trouble (gap, 429, 503, silence, lost connection) is a failure episode,
//!   as in the outbox: re-send after `retry.delay(n)`, then count one breaker failure; an open
//!   breaker starts no batch until its deadline, then one probe batch. Any confirmation resets the
//!   episode. 10208 is not an episode (the server answered; the batch is simply gone). 10205 (the
//!   stream does not allow batches) stops the lane with [`LaneOutput::Disabled`]: the events stay
//!   queued for the owner to [`abandon`](Lane::abandon) into another mode.
//! - **Bounded.** At most `max_events` / `max_bytes` held, at most `flow * outstanding_acks`
//!   unconfirmed in a batch, one batch at a time.
//!
//! # What the adapter does
//!
//! - Gives each lane its own inbox prefix (an old-style inbox, ADR-50), subscribes `<prefix>.>`
//!   once, and publishes every [`LaneTransmit`] with the reply subject
//!   `t.reply.format(prefix)`: an event with its `Nats-Msg-Id` (and the headers of its
//!   [`Message`]), a [`Payload::Control`] with an empty body and no headers.
//! - Never adds `Nats-Expected-Last-Msg-Id` (the server checks it when the message is applied,
//!   and a failure there does not reach the batch's gap check) nor batch headers.
//! - For each message on the inbox: [`ReplySubject::parse`] its subject (the reply subject it
//!   answers, so it names the batch and the message), [`decode_reply`](crate::fastbatch::decode_reply)
//!   its body, [`into_answer`](crate::fastbatch::ServerReply::into_answer) with the adapter's
//!   JetStream error classifier, then [`Lane::handle_reply`]. A no-responders status (503, empty
//!   body) is `BatchAnswer::Refused(Failure::Retryable { .. })`.
//! - Maps [`LaneReceipt`] to its own receipt type: flow acks carry no stream sequence.
//! - On [`LaneOutput::Disabled`] moves the events ([`Lane::abandon`]) to another ordering mode.
//! - Draws [`LaneConfig::id_seed`] from the OS once per process and numbers its lanes
//!   ([`LaneConfig::lane_tag`]).
//!
//! # Driving a lane
//!
//! ```
//! use std::time::{Duration, Instant};
//! use bytes::Bytes;
//! use sink_core::event::MsgId;
//! use sink_core::fastbatch::{BatchAnswer, BatchOp};
//! use sink_core::lane::{Lane, LaneConfig, LaneOutput, Payload};
//! use sink_core::outbox::Message;
//!
//! let mut lane = Lane::new(LaneConfig { id_seed: 42, ..LaneConfig::default() })?;
//! let mut now = Instant::now(); // the adapter's clock; the machine only receives it
//! for i in 0..5 {
//!     let message = Message {
//!         subject: "events.acme".into(),
//!         msg_id: MsgId::from_raw(format!("evt-{i}")),
//!         headers: Vec::new(),
//!         body: Bytes::from_static(b"{}"),
//!         key: String::new(),
//!     };
//!     lane.push(message, 1_764_000_000_000, now)?;
//! }
//!
//! // A stand-in server that persists every message at once and answers on the reply subject.
//! let (mut stored, mut delivered, mut replies) = (0u64, 0, Vec::new());
//! while delivered < 5 {
//!     while let Some(output) = lane.poll_output(now) {
//!         match output {
//!             LaneOutput::Transmit(t) => {
//!                 // The adapter publishes to the event's subject (or, for a control message,
//!                 // `Payload::Control`'s subject, empty body) with the reply subject
//!                 // `t.reply.format(inbox_prefix)`, and `Nats-Msg-Id` for an event.
//!                 if let Payload::Event(seq) = t.payload {
//!                     assert!(lane.message(seq).is_some());
//!                     stored += 1;
//!                 }
//!                 let answer = match t.reply.op {
//!                     BatchOp::Start => BatchAnswer::Flow { seq: 0, msgs: 500 },
//!                     BatchOp::Append | BatchOp::Ping => continue, // acks come every 500
//!                     BatchOp::Commit => BatchAnswer::Committed {
//!                         stream: "EVENTS".into(), stream_seq: stored, count: t.reply.seq },
//!                     BatchOp::CommitEob => BatchAnswer::Committed {
//!                         stream: "EVENTS".into(), stream_seq: stored, count: t.reply.seq - 1 },
//!                 };
//!                 replies.push((t.reply, answer));
//!             }
//!             LaneOutput::Delivered { .. } => delivered += 1,
//!             other => println!("{other:?}"),
//!         }
//!     }
//!     now += Duration::from_millis(1); // a round trip later, the replies arrive
//!     for (reply_to, answer) in replies.drain(..) {
//!         lane.handle_reply(&reply_to, answer, now);
//!     }
//!     if lane.poll_timeout().is_some_and(|t| t <= now) {
//!         lane.handle_timeout(now);
//!     }
//! }
//! assert_eq!(stored, 5);
//! assert!(lane.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::backoff::{deadline_after, RetrySchedule};
use crate::breaker::{Admission, Breaker, BreakerConfig, BreakerEvent, BreakerInput, BreakerState};
use crate::fastbatch::{BatchAnswer, BatchId, BatchOp, GapMode, ReplySubject};
use crate::outbox::{
    admit, position_of, Abandoned, Bounds, BreakerOpenPolicy, EventSeq, Failure, Message, Refused,
    Rejection,
};

/// The server's idle timeout for a batch (nats-server's `streamMaxBatchTimeout`).
pub const SERVER_BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Lane settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneConfig {
    /// The largest ack interval this lane allows (1..=65535; the server acks every
    /// `min(flow, 500 / batches on the stream)` messages). Default 500.
    pub flow: u16,
    /// How many ack intervals may be unconfirmed at once (1..=3; ADR-50 recommends 2).
    pub outstanding_acks: u16,
    /// Maximum events held (>= 1).
    pub max_events: usize,
    /// Maximum bytes held, per [`Message::size`] (>= 1).
    pub max_bytes: usize,
    /// How long to wait for an expected answer before pinging; the batch is given up one more
    /// `ack_timeout` after the ping. Must be below half of `server_batch_timeout`.
    pub ack_timeout: Duration,
    /// The server's idle timeout for a batch (10 s unless the server's `batch { timeout }` says
    /// otherwise).
    pub server_batch_timeout: Duration,
    /// Ping an open batch that has sent nothing for this long. Must be below
    /// `server_batch_timeout`. Default: a third of it.
    pub keepalive: Duration,
    /// Commit when the queue has been dry this long (default 0: at once). Must be below
    /// `server_batch_timeout`.
    pub commit_linger: Duration,
    /// Delays between batches within one failure episode.
    pub retry: RetrySchedule,
    /// The breaker.
    pub breaker: BreakerConfig,
    /// What `push` does while the breaker is open.
    pub when_breaker_open: BreakerOpenPolicy,
    /// Random seed for batch ids: fresh per process (the adapter draws it from the OS).
    pub id_seed: u64,
    /// This lane's number within the process, so lanes sharing a seed never share a batch id.
    pub lane_tag: u32,
}

impl Default for LaneConfig {
    fn default() -> Self {
        Self {
            flow: 500,
            outstanding_acks: 2,
            max_events: 100_000,
            max_bytes: 64 * 1024 * 1024,
            ack_timeout: Duration::from_secs(2),
            server_batch_timeout: SERVER_BATCH_TIMEOUT,
            keepalive: SERVER_BATCH_TIMEOUT / 3,
            commit_linger: Duration::ZERO,
            retry: RetrySchedule::default(),
            breaker: BreakerConfig::default(),
            when_breaker_open: BreakerOpenPolicy::Queue,
            id_seed: 0,
            lane_tag: 0,
        }
    }
}

/// A lane setting it cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LaneConfigError {
    /// A bound that must be at least 1 is 0.
    #[error("lane {field} is 0; it must be at least 1")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `outstanding_acks` outside 1..=3.
    #[error("lane outstanding_acks is {found}; use 1 to 3 (ADR-50 recommends 2)")]
    OutstandingAcks {
        /// The value found.
        found: u16,
    },
    /// A duration that must be positive is zero.
    #[error("lane {field} is 0s; give it a positive duration")]
    ZeroDuration {
        /// The field.
        field: &'static str,
    },
    /// A duration that must stay below the server's batch timeout does not.
    #[error("lane {field} ({found:?}) must be below {limit:?} (derived from server_batch_timeout), or the server drops the idle batch first; lower it")]
    NotBelowBatchTimeout {
        /// The field.
        field: &'static str,
        /// Its value.
        found: Duration,
        /// The bound.
        limit: Duration,
    },
}

impl LaneConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), LaneConfigError> {
        if self.flow == 0 {
            return Err(LaneConfigError::Zero { field: "flow" });
        }
        for (field, v) in [
            ("max_events", self.max_events),
            ("max_bytes", self.max_bytes),
        ] {
            if v == 0 {
                return Err(LaneConfigError::Zero { field });
            }
        }
        if !(1..=3).contains(&self.outstanding_acks) {
            return Err(LaneConfigError::OutstandingAcks {
                found: self.outstanding_acks,
            });
        }
        for (field, d) in [
            ("ack_timeout", self.ack_timeout),
            ("server_batch_timeout", self.server_batch_timeout),
            ("keepalive", self.keepalive),
        ] {
            if d.is_zero() {
                return Err(LaneConfigError::ZeroDuration { field });
            }
        }
        let t = self.server_batch_timeout;
        for (field, found, limit) in [
            ("ack_timeout", self.ack_timeout, t / 2),
            ("keepalive", self.keepalive, t),
            ("commit_linger", self.commit_linger, t),
        ] {
            if found >= limit {
                return Err(LaneConfigError::NotBelowBatchTimeout {
                    field,
                    found,
                    limit,
                });
            }
        }
        Ok(())
    }
}

/// What to publish for a [`LaneTransmit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The event's message ([`Lane::message`]), with its `Nats-Msg-Id`.
    Event(EventSeq),
    /// A control message (end-of-batch commit, ping): an empty body, no headers, published to
    /// this subject (one the stream captures: the subject of the batch's first event).
    Control {
        /// Where to publish it.
        subject: String,
    },
}

/// The command to publish one fast-batch message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneTransmit {
    /// What to publish.
    pub payload: Payload,
    /// The batch state; the reply subject is `reply.format(<the lane's inbox prefix>)`.
    pub reply: ReplySubject,
    /// Whether this starts the breaker's single half-open probe batch.
    pub probe: bool,
}

/// Proof of persistence for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneReceipt {
    /// The batch that confirmed it.
    pub batch: BatchId,
    /// Its sequence in that batch.
    pub batch_seq: u64,
}

/// Why a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEnd {
    /// Committed as planned: everything sent is persisted.
    Committed,
    /// The server saw a gap (a lost message: 429, leader change) and committed before it.
    Gap,
    /// A message failed a check, or one publish was refused.
    Refused(String),
    /// 10208: the server no longer knew the batch.
    UnknownBatch,
    /// No answer within the ack timeout, nor to the ping after it.
    NoAnswer,
    /// The connection dropped.
    ConnectionLost,
}

impl fmt::Display for BatchEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchEnd::Committed => f.write_str("committed"),
            BatchEnd::Gap => f.write_str("gap"),
            BatchEnd::Refused(reason) => write!(f, "refused: {reason}"),
            BatchEnd::UnknownBatch => f.write_str("unknown batch (10208)"),
            BatchEnd::NoAnswer => f.write_str("no answer"),
            BatchEnd::ConnectionLost => f.write_str("connection lost"),
        }
    }
}

/// What the lane tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneOutput {
    /// Publish this now.
    Transmit(LaneTransmit),
    /// The event is persisted.
    Delivered {
        /// Which event.
        seq: EventSeq,
        /// Where it was confirmed.
        receipt: LaneReceipt,
    },
    /// The event can never be stored; it has left the lane.
    Rejected {
        /// Which event.
        seq: EventSeq,
        /// Why.
        rejection: Rejection,
    },
    /// A batch ended; the next one (if events are held) starts from the first unconfirmed event.
    BatchEnded {
        /// The batch.
        batch: BatchId,
        /// Last persisted batch sequence as far as the lane knows.
        persisted: u64,
        /// The stream and the stream sequence of the batch's last stored message, when the final
        /// PubAck came.
        stream: Option<(String, u64)>,
        /// Why it ended.
        end: BatchEnd,
    },
    /// A failure episode: the next batch starts from `seq` after `delay`.
    Retrying {
        /// First event that will be re-sent.
        seq: EventSeq,
        /// Episode number since the last confirmation, from 1.
        retry: u32,
        /// Wait before re-sending.
        delay: Duration,
        /// Why.
        reason: String,
    },
    /// The breaker changed state.
    Breaker(BreakerEvent),
    /// The stream refused batch publishing (10205): the lane sends nothing more; its events stay
    /// queued for [`Lane::abandon`].
    Disabled(Rejection),
}

#[derive(Debug, Clone)]
struct Entry {
    seq: EventSeq,
    message: Message,
    unix_ms: u64,
    transmitted: bool,
}

/// Where an open batch is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Sequence 1 went out with op 0; nothing more until the first reply.
    Starting,
    /// Pipelining within the window.
    Streaming,
    /// A commit (op 2 or 3) went out; waiting for the final PubAck.
    Committing,
    /// The server ends the batch (gap, error, refusal); waiting for the final PubAck.
    Ending(BatchEnd),
}

#[derive(Debug, Clone)]
struct Batch {
    id: BatchId,
    /// Batch sequence of `entries[0]`.
    base: u64,
    /// Last batch sequence sent.
    sent: u64,
    /// Everything up to here is confirmed persisted.
    acked: u64,
    /// The ack interval in force (known after the first reply).
    interval: u16,
    stage: Stage,
    /// Where control messages go.
    subject: String,
    last_tx: Instant,
    /// Last answer in this batch (or its start).
    last_rx: Instant,
    /// A ping went out at this instant and has not been answered.
    pinged: Option<Instant>,
    /// A terminal refusal of this batch sequence: reject that event once everything before it
    /// is confirmed.
    reject: Option<(u64, Rejection)>,
    /// A publish of this batch was refused for overload (429); the lane's cap shrank once for it.
    overloaded: bool,
}

impl Batch {
    /// A control message of this batch (ping or end-of-batch commit): no body, the batch state in
    /// the reply subject.
    fn control(&self, flow: u16, seq: u64, op: BatchOp) -> LaneTransmit {
        LaneTransmit {
            payload: Payload::Control {
                subject: self.subject.clone(),
            },
            reply: ReplySubject {
                batch_id: self.id.clone(),
                flow,
                gap: GapMode::Fail,
                seq,
                op,
            },
            probe: false,
        }
    }
}

/// What holds the next batch back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    RetryAt(Instant),
    /// 10205: nothing is sent again.
    Disabled,
}

/// The lane machine. See the module docs.
#[derive(Debug)]
pub struct Lane {
    config: LaneConfig,
    entries: VecDeque<Entry>,
    bytes: usize,
    next_seq: EventSeq,
    batch: Option<Batch>,
    batches: u64,
    gate: Gate,
    retries: u32,
    breaker: Breaker,
    outputs: VecDeque<LaneOutput>,
    last_push: Option<Instant>,
    /// Overload backoff: at most this many unconfirmed events per batch (`None`: the server's
    /// window). Halved once per batch that meets a 429, grown by what is confirmed after it.
    overload_cap: Option<u64>,
}

impl Lane {
    /// A new, empty lane.
    pub fn new(config: LaneConfig) -> Result<Self, LaneConfigError> {
        config.validate()?;
        Ok(Self {
            breaker: Breaker::new(config.breaker.clone()),
            config,
            entries: VecDeque::new(),
            bytes: 0,
            next_seq: 1,
            batch: None,
            batches: 0,
            gate: Gate::Open,
            retries: 0,
            outputs: VecDeque::new(),
            last_push: None,
            overload_cap: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &LaneConfig {
        &self.config
    }

    /// Events held (unconfirmed).
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

    /// Events sent in the open batch and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| {
            usize::try_from(b.sent.saturating_sub(b.acked)).unwrap_or(usize::MAX)
        })
    }

    /// Events the open batch may have unconfirmed now: the server's ack interval times
    /// `outstanding_acks`, or less while the lane backs off from overload (429); with no batch
    /// open, the most the next batch could reach.
    pub fn window(&self) -> usize {
        let window = match &self.batch {
            Some(b) => self.batch_window(b),
            None => {
                let full = u64::from(self.config.flow) * u64::from(self.config.outstanding_acks);
                self.overload_cap.map_or(full, |cap| cap.min(full))
            }
        };
        usize::try_from(window).unwrap_or(usize::MAX)
    }

    /// The open batch's id, if one is open.
    pub fn batch_id(&self) -> Option<&BatchId> {
        self.batch.as_ref().map(|b| &b.id)
    }

    /// Batches started so far.
    pub fn batches_started(&self) -> u64 {
        self.batches
    }

    /// The breaker's state.
    pub fn breaker(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Whether the stream refused batch publishing (10205).
    pub fn is_disabled(&self) -> bool {
        self.gate == Gate::Disabled
    }

    /// Whether a push of `size` bytes would fit now.
    pub fn has_room(&self, size: usize) -> bool {
        self.bounds()
            .has_room((self.entries.len(), self.bytes), size)
    }

    fn bounds(&self) -> Bounds {
        Bounds {
            max_events: self.config.max_events,
            max_bytes: self.config.max_bytes,
            when_breaker_open: self.config.when_breaker_open,
        }
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
        now: Instant,
    ) -> Result<EventSeq, Refused> {
        let size = message.size();
        admit(
            self.bounds(),
            (self.entries.len(), self.bytes),
            size,
            self.breaker.is_open(),
        )?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += size;
        self.entries.push_back(Entry {
            seq,
            message,
            unix_ms,
            transmitted: false,
        });
        self.last_push = Some(now);
        Ok(seq)
    }

    /// Takes over an event another delivery machine gave up on ([`Abandoned`], e.g. queued in an
    /// outbox before the stream was known to allow batches), keeping its sequence. Events must be
    /// adopted in order and above every sequence held; later pushes continue after the highest
    /// adopted.
    pub fn adopt(&mut self, moved: Abandoned, now: Instant) -> Result<EventSeq, Refused> {
        self.next_seq = self.next_seq.max(moved.seq);
        self.push(moved.message, moved.unix_ms, now)
    }

    /// The next command or event; `None` when there is nothing to do until an input or the deadline.
    pub fn poll_output(&mut self, now: Instant) -> Option<LaneOutput> {
        if let Some(out) = self.outputs.pop_front() {
            return Some(out);
        }
        self.next_transmit(now).map(LaneOutput::Transmit)
    }

    /// The next event (delivered, rejected, batch ended, retrying, breaker, disabled) without
    /// starting any transmission: for a driver that must not publish for now but still reports
    /// the outcomes of what is in flight. Control messages the lane has queued (a ping, a commit)
    /// stay queued for the next [`poll_output`](Self::poll_output).
    pub fn poll_event(&mut self) -> Option<LaneOutput> {
        let i = self
            .outputs
            .iter()
            .position(|o| !matches!(o, LaneOutput::Transmit(_)))?;
        self.outputs.remove(i)
    }

    /// The next deadline (linger, keepalive, ack timeout, retry delay, breaker), if any. Early
    /// calls to [`handle_timeout`](Self::handle_timeout) are harmless.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut add = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Gate::RetryAt(at) = self.gate {
            add(at);
        }
        if let Some(t) = self.breaker.poll_timeout() {
            add(t);
        }
        match &self.batch {
            Some(b) => {
                if let Some(t) = self.answer_deadline(b) {
                    add(t);
                }
                if b.stage == Stage::Streaming {
                    add(deadline_after(b.last_tx, self.config.keepalive));
                    if self.all_sent(b) {
                        if let Some(t) = self.linger_deadline() {
                            add(t);
                        }
                    }
                }
            }
            None if self.entries.len() == 1
                && self.gate == Gate::Open
                && self.breaker.admission() != Admission::Nothing =>
            {
                if let Some(t) = self.linger_deadline() {
                    add(t);
                }
            }
            None => {}
        }
        next
    }

    /// The clock reached (or passed) a deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.gate, Gate::RetryAt(at) if now >= at) {
            self.gate = Gate::Open;
        }
        if let Some(event) = self.breaker.handle(BreakerInput::Timeout, now) {
            self.outputs.push_back(LaneOutput::Breaker(event));
        }
        let Some(b) = &self.batch else { return };
        if self.answer_deadline(b).is_some_and(|t| now >= t) {
            if b.pinged.is_some() {
                self.end_batch(None, BatchEnd::NoAnswer, now);
            } else if matches!(b.stage, Stage::Committing | Stage::Ending(_)) {
                // The commit may never have arrived (lost on its way to a deposed leader): a
                // ping would only be answered with flow acks. Send the commit again; a server
                // already committing skips it, one that is done answers 10208.
                self.commit_again(now);
            } else {
                self.ping(now);
            }
            return;
        }
        if b.stage == Stage::Streaming && now >= deadline_after(b.last_tx, self.config.keepalive) {
            self.ping(now);
        }
    }

    /// A reply arrived on the reply subject `reply_to` (parsed with [`ReplySubject::parse`]).
    /// Replies for a batch that is no longer open are ignored.
    pub fn handle_reply(&mut self, reply_to: &ReplySubject, answer: BatchAnswer, now: Instant) {
        let Some(b) = self.batch.as_mut() else { return };
        if b.id != reply_to.batch_id {
            return;
        }
        b.last_rx = now;
        b.pinged = None;
        match answer {
            BatchAnswer::Flow { seq, msgs } => {
                // The server never acks less often than the flow asked for; a larger value
                // would take the lane past its bound.
                b.interval = msgs.clamp(1, self.config.flow);
                if b.stage == Stage::Starting {
                    b.stage = Stage::Streaming;
                }
                self.broker_answered(now);
                self.release_to(seq);
            }
            BatchAnswer::Gap { .. } => self.ending(BatchEnd::Gap),
            BatchAnswer::Err { seq, failure } => {
                self.note_overload(&failure);
                self.refused(seq, failure, now)
            }
            BatchAnswer::Committed {
                stream,
                stream_seq,
                count,
            } => {
                self.broker_answered(now);
                self.end_batch(Some((stream, stream_seq, count)), BatchEnd::Committed, now);
            }
            BatchAnswer::UnknownBatch => {
                self.broker_answered(now);
                self.end_batch(None, BatchEnd::UnknownBatch, now);
            }
            BatchAnswer::Disabled(rejection) => {
                self.broker_answered(now);
                self.gate = Gate::Disabled;
                self.end_batch(None, BatchEnd::Refused(rejection.to_string()), now);
                self.outputs.push_back(LaneOutput::Disabled(rejection));
            }
            BatchAnswer::Refused(failure) => {
                self.note_overload(&failure);
                if !reply_to.op.carries_message() {
                    // A commit or ping refused (503: no stream leader): the batch's fate is
                    // unknown. End it at what is confirmed; the same ids go again.
                    self.end_batch(None, BatchEnd::Refused(failure_text(&failure)), now);
                    return;
                }
                if reply_to.seq == 1 {
                    // The first message's refusal is an ordinary PubAck error and the server
                    // removed the batch: nothing of it is stored.
                    let end = BatchEnd::Refused(failure_text(&failure));
                    let rejected = match failure {
                        Failure::Terminal(rejection) => {
                            self.broker_answered(now);
                            Some(rejection)
                        }
                        _ => None,
                    };
                    if let Some(b) = self.batch.as_mut() {
                        b.reject = rejected.map(|r| (1, r));
                    }
                    self.end_batch(Some((String::new(), 0, 0)), end, now);
                } else {
                    self.refused(reply_to.seq, failure, now);
                }
            }
        }
    }

    /// The connection dropped: every reply in flight is gone. The batch ends at the last
    /// confirmed sequence and one failure episode starts.
    pub fn handle_connection_lost(&mut self, now: Instant) {
        if self.batch.is_some() {
            self.end_batch(None, BatchEnd::ConnectionLost, now);
        }
    }

    /// The client (re)connected: a retry delay ends, and an open breaker lets its probe go now.
    pub fn handle_reconnected(&mut self, now: Instant) {
        if let Gate::RetryAt(_) = self.gate {
            self.gate = Gate::Open;
        }
        if let Some(event) = self.breaker.handle(BreakerInput::Reconnected, now) {
            self.outputs.push_back(LaneOutput::Breaker(event));
        }
    }

    /// Gives up on everything held: hands back every unconfirmed event, in order, and empties the
    /// lane (for a close whose deadline passed, or to move the events to another mode after
    /// [`LaneOutput::Disabled`]). An open batch is forgotten; the server drops it when idle.
    pub fn abandon(&mut self) -> Vec<Abandoned> {
        self.batch = None;
        self.bytes = 0;
        self.entries
            .drain(..)
            .map(|e| Abandoned {
                seq: e.seq,
                transmitted: e.transmitted,
                message: e.message,
                unix_ms: e.unix_ms,
            })
            .collect()
    }

    fn linger_deadline(&self) -> Option<Instant> {
        self.last_push
            .map(|t| deadline_after(t, self.config.commit_linger))
    }

    fn lingered(&self, now: Instant) -> bool {
        self.linger_deadline().is_none_or(|t| now >= t)
    }

    /// Every held event of the batch has been sent.
    fn all_sent(&self, b: &Batch) -> bool {
        b.sent + 1 >= b.base + self.entries.len() as u64
    }

    /// When an expected answer is overdue (ping, then give up), if one is expected.
    fn answer_deadline(&self, b: &Batch) -> Option<Instant> {
        let window = self.batch_window(b);
        let waiting = match b.stage {
            Stage::Starting | Stage::Committing | Stage::Ending(_) => true,
            Stage::Streaming => b.sent >= b.acked + window,
        };
        if let Some(at) = b.pinged {
            return Some(deadline_after(at, self.config.ack_timeout));
        }
        waiting.then(|| deadline_after(b.last_rx.max(b.last_tx), self.config.ack_timeout))
    }

    fn ping(&mut self, now: Instant) {
        let flow = self.config.flow;
        let Some(b) = self.batch.as_mut() else { return };
        b.pinged = Some(now);
        b.last_tx = now;
        let t = b.control(flow, b.sent.max(1), BatchOp::Ping);
        self.outputs.push_back(LaneOutput::Transmit(t));
    }

    /// Re-sends the end-of-batch commit of a batch whose final PubAck is overdue.
    fn commit_again(&mut self, now: Instant) {
        let flow = self.config.flow;
        let Some(b) = self.batch.as_mut() else { return };
        b.pinged = Some(now);
        b.last_tx = now;
        let t = b.control(flow, b.sent + 1, BatchOp::CommitEob);
        self.outputs.push_back(LaneOutput::Transmit(t));
    }

    /// The server will end the batch (or has): send nothing more, and make sure the server
    /// commits by sending an end-of-batch commit past everything sent. If the batch already
    /// commits on the server, it skips it.
    fn ending(&mut self, end: BatchEnd) {
        let flow = self.config.flow;
        let Some(b) = self.batch.as_mut() else { return };
        match b.stage {
            Stage::Ending(_) => return,
            Stage::Committing => {
                b.stage = Stage::Ending(end);
                return;
            }
            Stage::Starting | Stage::Streaming => {}
        }
        b.stage = Stage::Ending(end);
        let t = b.control(flow, b.sent + 1, BatchOp::CommitEob);
        self.outputs.push_back(LaneOutput::Transmit(t));
    }

    /// Message `seq` of the open batch was not stored.
    fn refused(&mut self, seq: u64, failure: Failure, now: Instant) {
        let end = match failure {
            Failure::Terminal(rejection) => {
                self.broker_answered(now);
                let text = rejection.to_string();
                if let Some(b) = self.batch.as_mut() {
                    if b.reject.is_none() {
                        b.reject = Some((seq, rejection));
                    }
                }
                BatchEnd::Refused(text)
            }
            other => BatchEnd::Refused(failure_text(&other)),
        };
        self.ending(end);
    }

    /// Confirms every event up to batch sequence `upto`.
    fn release_to(&mut self, upto: u64) {
        let Some(b) = self.batch.as_mut() else { return };
        let upto = upto.min(b.sent);
        if upto > b.acked {
            b.acked = upto;
        }
        let mut released = false;
        let mut released_count = 0;
        while b.base <= upto {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= e.message.size();
            self.outputs.push_back(LaneOutput::Delivered {
                seq: e.seq,
                receipt: LaneReceipt {
                    batch: b.id.clone(),
                    batch_seq: b.base,
                },
            });
            b.base += 1;
            released = true;
            released_count += 1;
        }
        if released {
            self.retries = 0;
            // Only a batch that met no overload eases it: what the overloaded batch got through
            // before the 429 says nothing about the queue now.
            if !b.overloaded {
                self.overload_eased(released_count);
            }
        }
    }

    /// Events one batch may have unconfirmed: the server's window, or less under overload.
    fn batch_window(&self, b: &Batch) -> u64 {
        let full = u64::from(b.interval) * u64::from(self.config.outstanding_acks);
        self.overload_cap.map_or(full, |cap| cap.min(full))
    }

    /// A publish was refused for overload (429): once per batch, halve what a batch may have
    /// unconfirmed, so re-sends do not hit a full ingest queue with a whole window again.
    fn note_overload(&mut self, failure: &Failure) {
        if !matches!(failure, Failure::Overloaded { .. }) {
            return;
        }
        let Some(b) = self.batch.as_mut() else { return };
        if b.overloaded {
            return;
        }
        b.overloaded = true;
        let full = u64::from(self.config.flow) * u64::from(self.config.outstanding_acks);
        let current = self.overload_cap.unwrap_or(full);
        self.overload_cap = Some((current / 2).max(1));
    }

    /// `n` events were confirmed: the overload cap grows back by as many, and goes away once it
    /// reaches the largest window a batch can have.
    fn overload_eased(&mut self, n: u64) {
        let full = u64::from(self.config.flow) * u64::from(self.config.outstanding_acks);
        if let Some(cap) = self.overload_cap {
            let grown = cap.saturating_add(n);
            self.overload_cap = (grown < full).then_some(grown);
        }
    }

    /// Ends the open batch. `committed`: the final PubAck's (stream, stream sequence, count);
    /// without it the last flow-acked sequence is what is known persisted.
    fn end_batch(&mut self, committed: Option<(String, u64, u64)>, end: BatchEnd, now: Instant) {
        let Some(b) = self.batch.as_ref() else { return };
        let count = committed.as_ref().map_or(b.acked, |c| c.2);
        self.release_to(count);
        let Some(b) = self.batch.take() else { return };
        let persisted = b.acked.max(count.min(b.sent));
        // The server ends a batch for a gap or a refusal with the PubAck; that PubAck is the
        // answer to the trouble, and the trouble decides what follows.
        let end = match (&b.stage, end) {
            (Stage::Ending(cause), BatchEnd::Committed) => cause.clone(),
            (_, end) => end,
        };
        let mut rejected = false;
        if let Some((seq, rejection)) = b.reject {
            if seq == b.base && persisted + 1 == seq {
                if let Some(e) = self.entries.pop_front() {
                    self.bytes -= e.message.size();
                    self.outputs.push_back(LaneOutput::Rejected {
                        seq: e.seq,
                        rejection,
                    });
                    rejected = true;
                }
            }
        }
        let stream = committed
            .filter(|c| !c.0.is_empty())
            .map(|(stream, stream_seq, _)| (stream, stream_seq));
        let clean = match &end {
            BatchEnd::Committed => persisted >= b.sent,
            BatchEnd::UnknownBatch => true,
            BatchEnd::Refused(_) => rejected,
            _ => false,
        };
        let reason = end.to_string();
        self.outputs.push_back(LaneOutput::BatchEnded {
            batch: b.id,
            persisted,
            stream,
            end,
        });
        let probing = matches!(
            self.breaker.state(),
            BreakerState::HalfOpen {
                probe_in_flight: true,
                ..
            }
        );
        if probing && !clean {
            if let Some(event) = self.breaker.handle(BreakerInput::Failure, now) {
                self.outputs.push_back(LaneOutput::Breaker(event));
            }
            return;
        }
        if !clean && !self.entries.is_empty() && self.gate != Gate::Disabled {
            self.fail(reason, now);
        }
    }

    /// A failure episode: wait `retry.delay(n)` before the next batch, or count a breaker failure.
    fn fail(&mut self, reason: String, now: Instant) {
        if self.breaker.is_open() {
            return;
        }
        let seq = self.entries.front().map_or(0, |e| e.seq);
        match self.config.retry.delay(self.retries) {
            Some(delay) => {
                self.retries += 1;
                let at = deadline_after(now, delay);
                self.gate = match self.gate {
                    Gate::RetryAt(t) => Gate::RetryAt(t.max(at)),
                    Gate::Disabled => Gate::Disabled,
                    Gate::Open => Gate::RetryAt(at),
                };
                self.outputs.push_back(LaneOutput::Retrying {
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
                    self.outputs.push_back(LaneOutput::Breaker(event));
                }
            }
        }
    }

    /// The server answered: it is reachable (closes a half-open breaker).
    fn broker_answered(&mut self, now: Instant) {
        if let Some(event) = self.breaker.handle(BreakerInput::Success, now) {
            self.outputs.push_back(LaneOutput::Breaker(event));
        }
    }

    fn next_transmit(&mut self, now: Instant) -> Option<LaneTransmit> {
        match self.gate {
            Gate::Open => {}
            Gate::RetryAt(at) if now >= at => self.gate = Gate::Open,
            Gate::RetryAt(_) | Gate::Disabled => return None,
        }
        if self.batch.is_none() {
            return self.start_batch(now);
        }
        let flow = self.config.flow;
        let (window, capped) = {
            let b = self.batch.as_ref()?;
            let full = u64::from(b.interval) * u64::from(self.config.outstanding_acks);
            let window = self.batch_window(b);
            (window, window < full)
        };
        let held = self.entries.len() as u64;
        let lingered = self.lingered(now);
        let b = self.batch.as_mut()?;
        if b.stage != Stage::Streaming {
            return None;
        }
        let next = b.sent + 1;
        let full = b.sent >= b.acked + window;
        // At an overload cap below the ack interval no flow ack would come: commit instead.
        let commit_at_cap = full && capped;
        if next < b.base + held && !commit_at_cap {
            if full {
                return None; // wait for a flow ack
            }
            let i = usize::try_from(next - b.base).ok()?;
            let entry = &mut self.entries[i];
            entry.transmitted = true;
            b.sent = next;
            b.last_tx = now;
            return Some(LaneTransmit {
                payload: Payload::Event(entry.seq),
                reply: ReplySubject {
                    batch_id: b.id.clone(),
                    flow,
                    gap: GapMode::Fail,
                    seq: next,
                    op: BatchOp::Append,
                },
                probe: false,
            });
        }
        if !lingered && !commit_at_cap {
            return None;
        }
        // Dry, or at the overload cap (below the ack interval, so no flow ack would come): commit
        // what is sent, so it is confirmed now rather than at the next whole ack interval, and
        // the server holds no idle batch.
        b.stage = Stage::Committing;
        b.last_tx = now;
        Some(b.control(flow, next, BatchOp::CommitEob))
    }

    fn start_batch(&mut self, now: Instant) -> Option<LaneTransmit> {
        if self.entries.is_empty() {
            return None;
        }
        let lone = self.entries.len() == 1;
        if lone && !self.lingered(now) {
            return None; // a second event may come and make it a pipelined batch
        }
        let probe = match self.breaker.admission() {
            Admission::Nothing => return None,
            Admission::Probe => true,
            Admission::Window => false,
        };
        if probe {
            self.breaker.handle(BreakerInput::ProbeSent, now);
        }
        self.batches += 1;
        let id = BatchId::generate(self.config.id_seed, self.config.lane_tag, self.batches);
        let entry = &mut self.entries[0];
        entry.transmitted = true;
        let op = if lone {
            BatchOp::Commit
        } else {
            BatchOp::Start
        };
        self.batch = Some(Batch {
            id: id.clone(),
            base: 1,
            sent: 1,
            acked: 0,
            interval: 1,
            stage: if lone {
                Stage::Committing
            } else {
                Stage::Starting
            },
            subject: entry.message.subject.clone(),
            last_tx: now,
            last_rx: now,
            pinged: None,
            reject: None,
            overloaded: false,
        });
        Some(LaneTransmit {
            payload: Payload::Event(entry.seq),
            reply: ReplySubject {
                batch_id: id,
                flow: self.config.flow,
                gap: GapMode::Fail,
                seq: 1,
                op,
            },
            probe,
        })
    }

    fn index_of(&self, seq: EventSeq) -> Option<usize> {
        position_of(&self.entries, seq, |e| e.seq)
    }
}

fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Retryable { reason } | Failure::Overloaded { reason } => reason.clone(),
        Failure::Timeout => "timeout".into(),
        Failure::InProcess => "duplicate message id is in process (10158)".into(),
        Failure::WrongLastMsgId { actual } => format!("wrong last msg id {actual:?}"),
        Failure::Terminal(r) => r.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field_and_the_bound() {
        let ok = LaneConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let s = Duration::from_secs;
        let table: Vec<(LaneConfig, LaneConfigError)> = vec![
            (
                LaneConfig {
                    flow: 0,
                    ..ok.clone()
                },
                LaneConfigError::Zero { field: "flow" },
            ),
            (
                LaneConfig {
                    max_events: 0,
                    ..ok.clone()
                },
                LaneConfigError::Zero {
                    field: "max_events",
                },
            ),
            (
                LaneConfig {
                    outstanding_acks: 4,
                    ..ok.clone()
                },
                LaneConfigError::OutstandingAcks { found: 4 },
            ),
            (
                LaneConfig {
                    ack_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                LaneConfigError::ZeroDuration {
                    field: "ack_timeout",
                },
            ),
            (
                LaneConfig {
                    ack_timeout: s(5),
                    ..ok.clone()
                },
                LaneConfigError::NotBelowBatchTimeout {
                    field: "ack_timeout",
                    found: s(5),
                    limit: s(5),
                },
            ),
            (
                LaneConfig {
                    keepalive: s(10),
                    ..ok.clone()
                },
                LaneConfigError::NotBelowBatchTimeout {
                    field: "keepalive",
                    found: s(10),
                    limit: s(10),
                },
            ),
            (
                LaneConfig {
                    commit_linger: s(11),
                    ..ok.clone()
                },
                LaneConfigError::NotBelowBatchTimeout {
                    field: "commit_linger",
                    found: s(11),
                    limit: s(10),
                },
            ),
        ];
        for (config, error) in table {
            assert_eq!(config.validate(), Err(error.clone()));
            assert!(Lane::new(config).is_err());
            assert!(!error.to_string().is_empty());
        }
    }

    fn message(id: &str) -> Message {
        Message {
            subject: "events.a".into(),
            msg_id: crate::event::MsgId::from_raw(id.into()),
            headers: Vec::new(),
            body: bytes::Bytes::from_static(b"x"),
            key: String::new(),
        }
    }

    fn transmit(out: Option<LaneOutput>) -> LaneTransmit {
        match out {
            Some(LaneOutput::Transmit(t)) => t,
            other => panic!("expected a transmit, got {other:?}"),
        }
    }

    #[test]
    fn poll_event_reports_outcomes_and_sends_nothing() {
        let now = sink_testkit::FakeClock::new().now();
        let mut lane = Lane::new(LaneConfig::default()).expect("valid");
        for i in 0..3 {
            lane.push(message(&format!("m{i}")), 0, now).expect("room");
        }
        assert_eq!(
            lane.poll_event(),
            None,
            "a start is a transmission, not an event"
        );
        let start = transmit(lane.poll_output(now));
        lane.handle_reply(&start.reply, BatchAnswer::Flow { seq: 0, msgs: 1 }, now);
        let _ = transmit(lane.poll_output(now));
        lane.handle_reply(&start.reply, BatchAnswer::Flow { seq: 2, msgs: 1 }, now);
        assert!(matches!(
            lane.poll_event(),
            Some(LaneOutput::Delivered { seq: 1, .. })
        ));
        assert!(matches!(
            lane.poll_event(),
            Some(LaneOutput::Delivered { seq: 2, .. })
        ));
        assert_eq!(lane.poll_event(), None);
        assert_eq!(lane.accepted_at(3), Some(0));
        let next = transmit(lane.poll_output(now));
        assert_eq!((next.payload, next.reply.seq), (Payload::Event(3), 3));
    }

    #[test]
    fn the_window_is_the_ack_interval_times_the_outstanding_acks() {
        let now = sink_testkit::FakeClock::new().now();
        let mut lane = Lane::new(LaneConfig::default()).expect("valid");
        for i in 0..10 {
            lane.push(message(&format!("m{i}")), 0, now).expect("room");
        }
        let start = transmit(lane.poll_output(now));
        assert_eq!((start.reply.seq, start.reply.op), (1, BatchOp::Start));
        assert_eq!(
            lane.poll_output(now),
            None,
            "nothing before the first reply"
        );
        lane.handle_reply(&start.reply, BatchAnswer::Flow { seq: 0, msgs: 2 }, now);
        let seqs: Vec<u64> = std::iter::from_fn(|| lane.poll_output(now))
            .map(|o| transmit(Some(o)).reply.seq)
            .collect();
        assert_eq!(seqs, [2, 3, 4], "2 acks of 2 outstanding");
        assert_eq!(lane.in_flight(), 4);
        lane.handle_reply(&start.reply, BatchAnswer::Flow { seq: 2, msgs: 2 }, now);
        let outputs: Vec<LaneOutput> = std::iter::from_fn(|| lane.poll_output(now)).collect();
        assert!(matches!(
            &outputs[..2],
            [
                LaneOutput::Delivered { seq: 1, .. },
                LaneOutput::Delivered { seq: 2, .. }
            ]
        ));
        let sent: Vec<u64> = outputs[2..]
            .iter()
            .map(|o| transmit(Some(o.clone())).reply.seq)
            .collect();
        assert_eq!(sent, [5, 6]);
    }
}
