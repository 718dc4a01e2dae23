//! A deterministic simulation: an outbox, a scripted broker and a fake clock in one loop, with invariant checks I1-I5.
//!
//! [`Sim`] plays the adapter's part without IO: it drains the outbox's outputs, turns each
//! `Transmit` into a [`PublishRequest`], hands due broker replies back to the outbox, and
//! otherwise moves virtual time to the earliest deadline of either side. It records every outcome,
//! counts transmissions, keeps a readable trace with virtual timestamps, and checks the delivery
//! invariants of DESIGN.md against the scripted stream's content.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sink_core::breaker::BreakerState;
use sink_core::event::MsgId;
use sink_core::outbox::{
    Ack, ConfigError, EventSeq, Failure, Message, OrderingMode, Outbox, OutboxConfig, Output,
    Refused, Rejection,
};

use crate::broker::{PublishRequest, Reply, ScriptedBroker};
use crate::clock::FakeClock;

/// Upper bound on loop iterations at one virtual instant before the run counts as stuck.
const STEPS_PER_INSTANT: usize = 100_000;

/// The final word on one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Reported stored, with this ack.
    Delivered(Ack),
    /// Reported rejected for good.
    Rejected(Rejection),
}

/// What the simulation remembers about an accepted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedEvent {
    /// Its message id.
    pub msg_id: MsgId,
    /// Its ordering key.
    pub key: String,
    /// Its subject.
    pub subject: String,
    /// Its body size.
    pub body_len: usize,
}

/// Counters over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// `Transmit` outputs.
    pub transmits: u64,
    /// Transmits with `attempt > 1`.
    pub retransmits: u64,
    /// Transmits flagged as the breaker's probe.
    pub probes: u64,
    /// `Retrying` outputs.
    pub retrying: u64,
    /// `Breaker` outputs.
    pub breaker_events: u64,
    /// `OrderingFallback` outputs.
    pub fallbacks: u64,
    /// Connection losses passed to the outbox.
    pub connection_losses: u64,
    /// Highest in-flight count seen.
    pub max_in_flight: usize,
}

/// Result of one [`Sim::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Something happened at the current instant.
    Progress,
    /// Nothing was due; the clock moved to the next deadline.
    Advanced,
    /// Nothing is due and nothing is scheduled (the clock did not move).
    Idle,
    /// The limit was reached before the next deadline (the clock is now at the limit).
    Limit,
}

/// Outbox + scripted broker + fake clock. See the module docs.
#[derive(Debug)]
pub struct Sim {
    clock: FakeClock,
    outbox: Outbox,
    broker: ScriptedBroker,
    pushed: BTreeMap<EventSeq, PushedEvent>,
    /// Every accepted push of each message id (more than one for a re-emitted event), in order.
    by_msg_id: HashMap<MsgId, Vec<EventSeq>>,
    outcomes: BTreeMap<EventSeq, Outcome>,
    stats: SimStats,
    trace: Vec<String>,
    violations: Vec<String>,
    next_id: u64,
    trace_enabled: bool,
}

impl Sim {
    /// A simulation of a fresh outbox against `broker`, on a new clock.
    pub fn new(config: OutboxConfig, broker: ScriptedBroker) -> Result<Self, ConfigError> {
        Self::with_clock(config, broker, FakeClock::new())
    }

    /// As [`Sim::new`], on a given clock.
    pub fn with_clock(
        config: OutboxConfig,
        broker: ScriptedBroker,
        clock: FakeClock,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            outbox: Outbox::new(config)?,
            broker,
            clock,
            pushed: BTreeMap::new(),
            by_msg_id: HashMap::new(),
            outcomes: BTreeMap::new(),
            stats: SimStats::default(),
            trace: Vec::new(),
            violations: Vec::new(),
            next_id: 1,
            trace_enabled: true,
        })
    }

    /// Turns the trace off (long property runs) or on.
    pub fn set_trace(&mut self, enabled: bool) {
        self.trace_enabled = enabled;
    }

    /// The clock.
    pub fn clock(&self) -> &FakeClock {
        &self.clock
    }

    /// Current virtual time.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The outbox under test.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The scripted broker.
    pub fn broker(&self) -> &ScriptedBroker {
        &self.broker
    }

    /// The scripted broker, to inject faults or foreign publishes.
    pub fn broker_mut(&mut self) -> &mut ScriptedBroker {
        &mut self.broker
    }

    /// Every accepted event by sequence.
    pub fn pushed(&self) -> &BTreeMap<EventSeq, PushedEvent> {
        &self.pushed
    }

    /// Every outcome reported so far, by sequence.
    pub fn outcomes(&self) -> &BTreeMap<EventSeq, Outcome> {
        &self.outcomes
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// The trace: one line per output, reply and injected connection loss, stamped in virtual time.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    /// The trace joined with newlines (for snapshots).
    pub fn trace_text(&self) -> String {
        self.trace.join("\n")
    }

    /// Forgets the trace so far.
    pub fn clear_trace(&mut self) {
        self.trace.clear();
    }

    /// Pushes an event with key `key`, a generated message id (`m1`, `m2`, ... per push attempt),
    /// subject `events.<key>` and a body of `body_len` bytes.
    pub fn push(&mut self, key: &str, body_len: usize) -> Result<EventSeq, Refused> {
        let id = self.next_id;
        self.next_id += 1;
        let message = Message {
            subject: format!("events.{key}"),
            msg_id: MsgId::from_raw(format!("m{id}")),
            headers: Vec::new(),
            body: Bytes::from(vec![b'x'; body_len]),
            key: key.to_owned(),
        };
        self.push_message(message)
    }

    /// Pushes event `of` again: same message id, key, subject and body size (a service re-emitting
    /// an event, e.g. after its own timeout or in a replayed job). The broker should answer it as a
    /// duplicate while the original is in the duplicate window; the invariants treat all pushes of
    /// one id as one event.
    pub fn push_reemit(&mut self, of: EventSeq) -> Result<EventSeq, Refused> {
        let original = self.pushed[&of].clone();
        let message = Message {
            subject: original.subject,
            msg_id: original.msg_id,
            headers: Vec::new(),
            body: Bytes::from(vec![b'x'; original.body_len]),
            key: original.key,
        };
        self.push_message(message)
    }

    /// Pushes a prepared message. Pushing an id again is a re-emit (see [`Sim::push_reemit`]).
    pub fn push_message(&mut self, message: Message) -> Result<EventSeq, Refused> {
        let now = self.clock.now();
        let unix_ms = 1_700_000_000_000 + self.clock.elapsed().as_millis() as u64;
        let event = PushedEvent {
            msg_id: message.msg_id.clone(),
            key: message.key.clone(),
            subject: message.subject.clone(),
            body_len: message.body.len(),
        };
        match self.outbox.push(message, unix_ms, now) {
            Ok(seq) => {
                self.by_msg_id
                    .entry(event.msg_id.clone())
                    .or_default()
                    .push(seq);
                self.note(format!("push #{seq} {} key={}", event.msg_id, event.key));
                self.pushed.insert(seq, event);
                Ok(seq)
            }
            Err(refused) => {
                self.note(format!("refused {}: {refused:?}", event.msg_id));
                Err(refused)
            }
        }
    }

    /// The connection drops now: outstanding replies vanish and the outbox is told.
    pub fn lose_connection(&mut self) {
        self.broker.lose_connection();
        self.broker.take_connection_lost();
        self.connection_lost();
    }

    /// The client reconnected now (after [`Sim::lose_connection`] or an outage): the outbox is told.
    pub fn reconnect(&mut self) {
        self.note("reconnected".into());
        let now = self.clock.now();
        self.outbox.handle_reconnected(now);
    }

    /// Another producer publishes `msg_id` to the same stream now.
    pub fn foreign_publish(&mut self, msg_id: &str) -> u64 {
        let now = self.clock.now();
        let seq = self
            .broker
            .foreign_publish(MsgId::from_raw(msg_id.into()), now);
        self.note(format!("foreign {msg_id} stored as {seq}"));
        seq
    }

    /// One step: a due outbox deadline, else one outbox output, else one due broker reply, else
    /// move the clock to the next deadline (not past `limit`).
    pub fn step(&mut self, limit: Option<Instant>) -> Step {
        let now = self.clock.now();
        if self.outbox.poll_timeout().is_some_and(|t| t <= now) {
            self.outbox.handle_timeout(now);
            if self.outbox.poll_timeout().is_some_and(|t| t <= now) {
                self.violation("outbox deadline still due after handle_timeout".into());
                return Step::Idle;
            }
            return Step::Progress;
        }
        let breaker_before = self.outbox.breaker();
        if let Some(output) = self.outbox.poll_output(now) {
            self.on_output(output, breaker_before, now);
            return Step::Progress;
        }
        if let Some((seq, attempt, reply)) = self.broker.poll_reply(now) {
            self.on_reply(seq, attempt, reply, now);
            return Step::Progress;
        }
        let next = [self.outbox.poll_timeout(), self.broker.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        match (next, limit) {
            (None, _) => Step::Idle,
            (Some(next), Some(limit)) if next > limit => {
                self.clock.advance_to(limit);
                Step::Limit
            }
            (Some(next), _) => {
                self.clock.advance_to(next);
                Step::Advanced
            }
        }
    }

    /// Handles everything due at the current instant without moving the clock.
    pub fn settle(&mut self) {
        let now = self.clock.now();
        for _ in 0..STEPS_PER_INSTANT {
            if self.step(Some(now)) != Step::Progress {
                return;
            }
        }
        self.violation(format!("no quiescence at {}", self.clock.stamp()));
    }

    /// Runs for `d` of virtual time (the clock ends exactly `d` later).
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.clock.now() + d;
        let mut at_instant = 0;
        loop {
            match self.step(Some(limit)) {
                Step::Progress => {
                    at_instant += 1;
                    if at_instant > STEPS_PER_INSTANT {
                        self.violation(format!("no quiescence at {}", self.clock.stamp()));
                        return;
                    }
                }
                Step::Advanced => at_instant = 0,
                Step::Idle | Step::Limit => {
                    self.clock.advance_to(limit);
                    return;
                }
            }
        }
    }

    /// Runs until nothing is due or scheduled; I5: fails if that takes more than `max_virtual`.
    pub fn run_until_idle(&mut self, max_virtual: Duration) -> Result<(), String> {
        let start = self.clock.now();
        let limit = start + max_virtual;
        let mut at_instant = 0;
        loop {
            match self.step(Some(limit)) {
                Step::Progress => {
                    at_instant += 1;
                    if at_instant > STEPS_PER_INSTANT {
                        let msg = format!("no quiescence at {}", self.clock.stamp());
                        self.violation(msg.clone());
                        return Err(msg);
                    }
                }
                Step::Advanced => at_instant = 0,
                Step::Idle => return Ok(()),
                Step::Limit => {
                    return Err(format!(
                    "I5: not idle after {max_virtual:?} of virtual time: {} held, {} in flight, \
                         {} without outcome, breaker {:?}",
                    self.outbox.len(),
                    self.outbox.in_flight(),
                    self.pushed.len() - self.outcomes.len(),
                    self.outbox.breaker()
                ))
                }
            }
        }
    }

    /// Stops the broker's faults, runs to idle within `max_virtual`, then checks that every
    /// accepted event has an outcome and the outbox is empty (I5), and I1-I4.
    pub fn finish(&mut self, max_virtual: Duration) -> Result<(), String> {
        self.broker.stop_faults();
        self.run_until_idle(max_virtual)?;
        let missing: Vec<EventSeq> = self
            .pushed
            .keys()
            .filter(|s| !self.outcomes.contains_key(s))
            .copied()
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "I5: events without an outcome after idle: {missing:?}\noutbox: {:?}",
                self.outbox
            ));
        }
        if !self.outbox.is_empty() {
            return Err(format!(
                "I5: outbox holds {} events after idle",
                self.outbox.len()
            ));
        }
        self.check_invariants()?;
        // I4 at rest: every event of ours in the stream was reported delivered.
        // A re-emitted id counts once: some push of it must be reported delivered (a push
        // rejected before a later re-emit got it stored told the truth about that push).
        for r in self.broker.stored() {
            if let Some(seqs) = self.by_msg_id.get(&r.msg_id) {
                let delivered = seqs
                    .iter()
                    .any(|s| matches!(self.outcomes.get(s), Some(Outcome::Delivered(_))));
                if !delivered {
                    let reported: Vec<_> = seqs.iter().map(|s| self.outcomes.get(s)).collect();
                    return Err(format!(
                        "I4: {seqs:?} ({}) is stored as {} but reported {reported:?}",
                        r.msg_id, r.stream_seq
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks I1-I4 and the outbox's bounds on the current state; the first violation as text.
    ///
    /// - I1: every delivered event's message id is stored.
    /// - I2: no message id is stored twice within the duplicate window (a copy stored after the
    ///   window expired is what RELIABILITY.md F3 allows; order checks look at first copies).
    /// - I3 (chained and per-key-serial modes): per ordering key, stored order is push order; while
    ///   chaining is in force, also no gaps (an event is stored only after every earlier
    ///   non-rejected event).
    /// - I4: a delivered ack names the stored record's stream and sequence, an event has at most
    ///   one outcome (recorded as it happens), rejected events are not stored.
    /// - bounds: in flight <= window, held <= max_events, bytes <= max_bytes; no transmission
    ///   while the breaker is open or its probe is outstanding (recorded as it happens).
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(v) = self.violations.first() {
            return Err(v.clone());
        }
        let stored = self.broker.stored();
        let window = self.broker.config().duplicate_window;
        // First copy of each id, and every copy's sequence.
        let mut by_id: HashMap<&MsgId, u64> = HashMap::with_capacity(stored.len());
        let mut copies: HashMap<&MsgId, Vec<u64>> = HashMap::with_capacity(stored.len());
        let mut latest: HashMap<&MsgId, (u64, Instant)> = HashMap::with_capacity(stored.len());
        for r in stored {
            if let Some((seq, at)) = latest.insert(&r.msg_id, (r.stream_seq, r.stored_at)) {
                if r.stored_at.duration_since(at) <= window {
                    return Err(format!(
                        "I2: {} stored twice within the duplicate window, as {seq} and {}",
                        r.msg_id, r.stream_seq
                    ));
                }
            }
            by_id.entry(&r.msg_id).or_insert(r.stream_seq);
            copies.entry(&r.msg_id).or_default().push(r.stream_seq);
        }
        let first_copies = stored
            .iter()
            .filter(|r| by_id.get(&r.msg_id) == Some(&r.stream_seq));
        for (seq, outcome) in &self.outcomes {
            let event = &self.pushed[seq];
            let at = by_id.get(&event.msg_id);
            match outcome {
                Outcome::Delivered(ack) => {
                    let Some(&stream_seq) = at else {
                        return Err(format!(
                            "I1: #{seq} ({}) delivered but not stored",
                            event.msg_id
                        ));
                    };
                    let names_a_copy = copies
                        .get(&event.msg_id)
                        .is_some_and(|c| c.contains(&ack.sequence));
                    if !names_a_copy || ack.stream != self.broker.config().stream {
                        return Err(format!(
                            "I4: #{seq} acked as {}/{} but stored as {}/{stream_seq}",
                            ack.stream,
                            ack.sequence,
                            self.broker.config().stream
                        ));
                    }
                }
                Outcome::Rejected(_) => {
                    // A later re-emit of a rejected event may be what got the id stored.
                    let other_push_delivered = self.by_msg_id[&event.msg_id].iter().any(|s| {
                        s != seq && !matches!(self.outcomes.get(s), Some(Outcome::Rejected(_)))
                    });
                    if let Some(stream_seq) = at.filter(|_| !other_push_delivered) {
                        return Err(format!(
                            "I4: #{seq} ({}) reported rejected but stored as {stream_seq}",
                            event.msg_id
                        ));
                    }
                }
            }
        }
        if self.outbox.config().ordering != OrderingMode::Unordered {
            let mut last_per_key: HashMap<&str, EventSeq> = HashMap::new();
            let mut max_stored: Option<EventSeq> = None;
            for r in first_copies {
                let Some(seqs) = self.by_msg_id.get(&r.msg_id) else {
                    continue; // another producer's message
                };
                // A re-emitted id stands for any of its pushes: take the earliest one that keeps
                // the key in push order (greedy is enough: later records only need a later push).
                let key = self.pushed[&seqs[0]].key.as_str();
                let prev = last_per_key.get(key).copied();
                let Some(seq) = seqs.iter().copied().find(|s| prev.is_none_or(|p| *s > p)) else {
                    return Err(format!(
                        "I3: key {key:?}: {} (pushed as {seqs:?}) stored (as {}) after #{}",
                        r.msg_id,
                        r.stream_seq,
                        prev.unwrap_or_default()
                    ));
                };
                last_per_key.insert(key, seq);
                max_stored = max_stored.max(Some(seq));
            }
            if self.outbox.ordering() == OrderingMode::Chained {
                if let Some(max) = max_stored {
                    for (seq, event) in self.pushed.range(..max) {
                        let rejected = matches!(self.outcomes.get(seq), Some(Outcome::Rejected(_)));
                        if !rejected && !by_id.contains_key(&event.msg_id) {
                            return Err(format!(
                                "I3 (chained): #{max} is stored but earlier #{seq} is neither stored nor rejected"
                            ));
                        }
                    }
                }
            }
        }
        let config = self.outbox.config();
        if self.outbox.in_flight() > config.window {
            return Err(format!(
                "bound: {} in flight, window {}",
                self.outbox.in_flight(),
                config.window
            ));
        }
        if self.outbox.len() > config.max_events || self.outbox.bytes() > config.max_bytes {
            return Err(format!(
                "bound: {} events / {} bytes held, bounds {} / {}",
                self.outbox.len(),
                self.outbox.bytes(),
                config.max_events,
                config.max_bytes
            ));
        }
        Ok(())
    }

    fn on_output(&mut self, output: Output, breaker_before: BreakerState, now: Instant) {
        match output {
            Output::Transmit(t) => {
                self.stats.transmits += 1;
                if t.attempt > 1 {
                    self.stats.retransmits += 1;
                }
                if t.probe {
                    self.stats.probes += 1;
                }
                match breaker_before {
                    BreakerState::Open { .. }
                    | BreakerState::HalfOpen {
                        probe_in_flight: true,
                        ..
                    } => self.violation(format!(
                        "breaker: #{} transmitted while the breaker was {breaker_before:?}",
                        t.seq
                    )),
                    BreakerState::HalfOpen { .. } if !t.probe => self.violation(format!(
                        "breaker: #{} transmitted half-open without the probe flag",
                        t.seq
                    )),
                    _ => {}
                }
                let Some(message) = self.outbox.message(t.seq) else {
                    self.violation(format!(
                        "Transmit of #{} which the outbox does not hold",
                        t.seq
                    ));
                    return;
                };
                let req = PublishRequest {
                    msg_id: message.msg_id.clone(),
                    expected_last_msg_id: t.expected_last_msg_id.clone(),
                    subject: message.subject.clone(),
                    body_len: message.body.len(),
                    seq: t.seq,
                    attempt: t.attempt,
                };
                self.note(format!(
                    "transmit #{} {} attempt {} expect {}{}",
                    t.seq,
                    req.msg_id,
                    t.attempt,
                    t.expected_last_msg_id.as_ref().map_or("-", |m| m.as_str()),
                    if t.probe { " (probe)" } else { "" }
                ));
                self.stats.max_in_flight = self.stats.max_in_flight.max(self.outbox.in_flight());
                self.broker.receive(req, now);
                if self.broker.take_connection_lost() {
                    self.connection_lost();
                }
            }
            Output::Delivered { seq, ack } => {
                self.note(format!(
                    "delivered #{seq} as {}{}",
                    ack.sequence,
                    if ack.duplicate { " (duplicate)" } else { "" }
                ));
                self.record(seq, Outcome::Delivered(ack));
            }
            Output::Rejected { seq, rejection } => {
                self.note(format!("rejected #{seq}: {rejection}"));
                self.record(seq, Outcome::Rejected(rejection));
            }
            Output::Retrying {
                seq,
                retry,
                delay,
                reason,
            } => {
                self.stats.retrying += 1;
                self.note(format!(
                    "retrying from #{seq} (retry {retry}) in {}ms: {reason}",
                    delay.as_millis()
                ));
            }
            Output::Breaker(event) => {
                self.stats.breaker_events += 1;
                let text = match event {
                    sink_core::breaker::BreakerEvent::Opened { until, attempt } => format!(
                        "breaker opened until {} (attempt {attempt})",
                        self.clock.stamp_at(until)
                    ),
                    other => format!("breaker {other:?}"),
                };
                self.note(text);
            }
            Output::OrderingFallback { to, reason } => {
                self.stats.fallbacks += 1;
                self.note(format!("ordering fallback to {to}: {reason}"));
            }
        }
    }

    fn on_reply(&mut self, seq: EventSeq, attempt: u32, reply: Reply, now: Instant) {
        match reply {
            Reply::Ack(ack) => {
                self.note(format!(
                    "ack #{seq} attempt {attempt}: seq {}{}",
                    ack.sequence,
                    if ack.duplicate { " duplicate" } else { "" }
                ));
                self.outbox.handle_ack(seq, ack, now);
            }
            Reply::Fail(failure) => {
                let text = match &failure {
                    Failure::Retryable { reason } => format!("retryable ({reason})"),
                    Failure::Overloaded { reason } => format!("overloaded ({reason})"),
                    Failure::Timeout => "timeout".into(),
                    Failure::InProcess => "10158 duplicate message id is in process".into(),
                    Failure::WrongLastMsgId { actual } => {
                        format!(
                            "10070 wrong last msg ID: {}",
                            actual.as_deref().unwrap_or("")
                        )
                    }
                    Failure::Terminal(r) => format!("terminal ({r})"),
                };
                self.note(format!("error #{seq} attempt {attempt}: {text}"));
                self.outbox.handle_failure(seq, attempt, failure, now);
            }
        }
    }

    fn connection_lost(&mut self) {
        self.stats.connection_losses += 1;
        self.note("connection lost".into());
        let now = self.clock.now();
        self.outbox.handle_connection_lost(now);
    }

    fn record(&mut self, seq: EventSeq, outcome: Outcome) {
        if !self.pushed.contains_key(&seq) {
            self.violation(format!("outcome for unknown event #{seq}: {outcome:?}"));
            return;
        }
        if let Some(first) = self.outcomes.get(&seq) {
            self.violation(format!(
                "I4: #{seq} has a second outcome {outcome:?} after {first:?}"
            ));
            return;
        }
        self.outcomes.insert(seq, outcome);
    }

    fn violation(&mut self, text: String) {
        self.note(format!("VIOLATION {text}"));
        self.violations
            .push(format!("{} {text}", self.clock.stamp()));
    }

    fn note(&mut self, line: String) {
        if self.trace_enabled {
            self.trace.push(format!("{} {line}", self.clock.stamp()));
        }
    }
}
