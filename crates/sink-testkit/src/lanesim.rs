//! A deterministic simulation of several producers, each with its own fast-batch lane, writing one scripted fast-batch stream, with invariant checks I1-I5 per producer.
//!
//! [`LaneSim`] plays every producer's adapter without IO: it drains each lane's outputs, formats
//! each `Transmit`'s reply subject under the producer's inbox prefix and hands the publish to the
//! [`FastBroker`]; it routes each due reply back by prefix, parses the subject and decodes the JSON
//! with the core's own functions, and feeds the answer to the lane. Otherwise it moves virtual time
//! to the earliest deadline. It keeps a readable trace and checks the delivery invariants of
//! DESIGN.md for each producer against the stream's content.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sink_core::breaker::BreakerState;
use sink_core::event::MsgId;
use sink_core::fastbatch::{decode_reply, ApiError, BatchOp, ReplySubject};
use sink_core::lane::{Lane, LaneConfig, LaneConfigError, LaneOutput, LaneReceipt, Payload};
use sink_core::outbox::{EventSeq, Failure, Message, Refused, Rejection};

use crate::clock::FakeClock;
use crate::fastbroker::{FastBroker, FastPublish};

/// Upper bound on loop iterations at one virtual instant before the run counts as stuck.
const STEPS_PER_INSTANT: usize = 100_000;

/// The final word on one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneOutcome {
    /// Reported persisted.
    Delivered(LaneReceipt),
    /// Reported rejected for good.
    Rejected(Rejection),
}

/// Counters over a run, for all producers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneSimStats {
    /// Publishes carrying an event.
    pub events_sent: u64,
    /// Control publishes (end-of-batch commits, pings).
    pub controls_sent: u64,
    /// Pings.
    pub pings: u64,
    /// Batches ended.
    pub batches_ended: u64,
    /// `Retrying` outputs.
    pub retrying: u64,
    /// Connection losses passed to the lanes.
    pub connection_losses: u64,
}

/// One producer: a lane and what was asked of it.
#[derive(Debug)]
pub struct Producer {
    lane: Lane,
    prefix: String,
    /// Message id of every accepted push.
    pushed: BTreeMap<EventSeq, MsgId>,
    by_msg_id: HashMap<MsgId, Vec<EventSeq>>,
    outcomes: BTreeMap<EventSeq, LaneOutcome>,
    /// When each accepted push happened and when its outcome was reported.
    times: BTreeMap<EventSeq, (Instant, Option<Instant>)>,
    next_id: u64,
}

impl Producer {
    /// The lane under test.
    pub fn lane(&self) -> &Lane {
        &self.lane
    }

    /// Every accepted push's message id.
    pub fn pushed(&self) -> &BTreeMap<EventSeq, MsgId> {
        &self.pushed
    }

    /// Every outcome reported so far.
    pub fn outcomes(&self) -> &BTreeMap<EventSeq, LaneOutcome> {
        &self.outcomes
    }

    /// Virtual time from the push of event `seq` to its outcome, once it has one.
    pub fn latency(&self, seq: EventSeq) -> Option<Duration> {
        let (pushed, done) = self.times.get(&seq)?;
        done.map(|d| d.saturating_duration_since(*pushed))
    }
}

/// Lanes + scripted fast-batch broker + fake clock. See the module docs.
#[derive(Debug)]
pub struct LaneSim {
    clock: FakeClock,
    broker: FastBroker,
    producers: Vec<Producer>,
    stats: LaneSimStats,
    trace: Vec<String>,
    violations: Vec<String>,
    trace_enabled: bool,
}

/// How the simulated adapter classifies a JetStream error that is not part of the batch protocol.
pub fn classify(e: &ApiError) -> Failure {
    match e.code {
        503 => Failure::Retryable {
            reason: e.description.clone(),
        },
        429 => Failure::Overloaded {
            reason: e.description.clone(),
        },
        _ => Failure::Terminal(Rejection {
            code: Some(e.err_code),
            reason: e.description.clone(),
        }),
    }
}

impl LaneSim {
    /// `producers` lanes with `config` (each with its own `lane_tag`, same seed) against `broker`.
    pub fn new(
        config: LaneConfig,
        producers: usize,
        broker: FastBroker,
    ) -> Result<Self, LaneConfigError> {
        let producers = (0..producers)
            .map(|i| {
                let tag = u32::try_from(i).unwrap_or(u32::MAX);
                Ok(Producer {
                    lane: Lane::new(LaneConfig {
                        lane_tag: tag,
                        ..config.clone()
                    })?,
                    prefix: format!("_INBOX.p{i}"),
                    pushed: BTreeMap::new(),
                    by_msg_id: HashMap::new(),
                    outcomes: BTreeMap::new(),
                    times: BTreeMap::new(),
                    next_id: 1,
                })
            })
            .collect::<Result<Vec<_>, LaneConfigError>>()?;
        Ok(Self {
            clock: FakeClock::new(),
            broker,
            producers,
            stats: LaneSimStats::default(),
            trace: Vec::new(),
            violations: Vec::new(),
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

    /// The broker.
    pub fn broker(&self) -> &FastBroker {
        &self.broker
    }

    /// The broker, to inject faults.
    pub fn broker_mut(&mut self) -> &mut FastBroker {
        &mut self.broker
    }

    /// Producer `p`.
    pub fn producer(&self, p: usize) -> &Producer {
        &self.producers[p]
    }

    /// Number of producers.
    pub fn producers(&self) -> usize {
        self.producers.len()
    }

    /// Counters.
    pub fn stats(&self) -> LaneSimStats {
        self.stats
    }

    /// The trace joined with newlines.
    pub fn trace_text(&self) -> String {
        self.trace.join("\n")
    }

    /// The last `n` trace lines.
    pub fn trace_tail(&self, n: usize) -> String {
        self.trace[self.trace.len().saturating_sub(n)..].join("\n")
    }

    /// Producer `p` pushes a new event (message id `p<p>-m<n>`, subject `events.p<p>`).
    pub fn push(&mut self, p: usize, body_len: usize) -> Result<EventSeq, Refused> {
        let producer = &mut self.producers[p];
        let id = MsgId::from_raw(format!("p{p}-m{}", producer.next_id));
        producer.next_id += 1;
        self.push_id(p, id, body_len)
    }

    /// Producer `p` pushes its event `of` again (same message id).
    pub fn push_reemit(&mut self, p: usize, of: EventSeq) -> Result<EventSeq, Refused> {
        let id = self.producers[p].pushed[&of].clone();
        self.push_id(p, id, 8)
    }

    fn push_id(&mut self, p: usize, id: MsgId, body_len: usize) -> Result<EventSeq, Refused> {
        let now = self.clock.now();
        let message = Message {
            subject: format!("events.p{p}"),
            msg_id: id.clone(),
            headers: Vec::new(),
            body: Bytes::from(vec![b'x'; body_len]),
            key: format!("p{p}"),
        };
        let producer = &mut self.producers[p];
        match producer.lane.push(message, 1_700_000_000_000, now) {
            Ok(seq) => {
                producer.pushed.insert(seq, id.clone());
                producer.times.insert(seq, (now, None));
                producer.by_msg_id.entry(id.clone()).or_default().push(seq);
                self.note(format!("p{p} push #{seq} {id}"));
                Ok(seq)
            }
            Err(refused) => {
                self.note(format!("p{p} refused {id}: {refused}"));
                Err(refused)
            }
        }
    }

    /// The connection of every producer drops now (one shared server).
    pub fn lose_connection(&mut self) {
        self.broker.lose_connection();
        self.broker.take_connection_lost();
        self.connection_lost();
    }

    /// One step: a due lane deadline, else one lane output, else one due reply, else move the
    /// clock to the next deadline (not past `limit`). Returns whether something happened at the
    /// current instant, and whether the clock moved or could not.
    fn step(&mut self, limit: Instant) -> Step {
        let now = self.clock.now();
        for p in 0..self.producers.len() {
            if self.producers[p]
                .lane
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.producers[p].lane.handle_timeout(now);
            }
            let breaker = self.producers[p].lane.breaker();
            if let Some(output) = self.producers[p].lane.poll_output(now) {
                self.on_output(p, output, breaker, now);
                return Step::Progress;
            }
        }
        if let Some((subject, body)) = self.broker.poll_reply(now) {
            self.on_reply(subject, body, now);
            return Step::Progress;
        }
        let lanes = self.producers.iter().filter_map(|p| p.lane.poll_timeout());
        let next = lanes.chain(self.broker.poll_timeout()).min();
        match next {
            None => Step::Idle,
            Some(next) if next <= now => {
                self.violation(format!(
                    "a deadline at {} is due and nothing happens",
                    self.clock.stamp_at(next)
                ));
                Step::Idle
            }
            Some(next) if next > limit => {
                self.clock.advance_to(limit);
                Step::Limit
            }
            Some(next) => {
                self.clock.advance_to(next);
                Step::Advanced
            }
        }
    }

    /// Handles everything due now without moving the clock.
    pub fn settle(&mut self) {
        let now = self.clock.now();
        for _ in 0..STEPS_PER_INSTANT {
            if self.step(now) != Step::Progress {
                return;
            }
        }
        self.violation(format!("no quiescence at {}", self.clock.stamp()));
    }

    /// Runs for `d` of virtual time (the clock ends exactly `d` later).
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.clock.now() + d;
        let _ = self.run_to(limit, false);
    }

    fn run_to(&mut self, limit: Instant, until_idle: bool) -> Result<(), String> {
        let mut at_instant = 0;
        loop {
            match self.step(limit) {
                Step::Progress => {
                    at_instant += 1;
                    if at_instant > STEPS_PER_INSTANT {
                        let msg = format!("no quiescence at {}", self.clock.stamp());
                        self.violation(msg.clone());
                        return Err(msg);
                    }
                }
                Step::Advanced => at_instant = 0,
                Step::Idle if until_idle => return Ok(()),
                Step::Idle | Step::Limit => {
                    if until_idle {
                        return Err("I5: not idle within the bound".into());
                    }
                    self.clock.advance_to(limit);
                    return Ok(());
                }
            }
        }
    }

    /// Runs until nothing is due or scheduled, faults still on; I5: fails if that takes more than
    /// `max_virtual`.
    pub fn run_until_idle(&mut self, max_virtual: Duration) -> Result<(), String> {
        let limit = self.clock.now() + max_virtual;
        self.run_to(limit, true)
    }

    /// Stops the faults, runs until nothing is due or scheduled within `max_virtual` (I5), then
    /// checks that every accepted event has an outcome, every lane is empty, and I1-I4.
    pub fn finish(&mut self, max_virtual: Duration) -> Result<(), String> {
        self.broker.stop_faults();
        let limit = self.clock.now() + max_virtual;
        self.run_to(limit, true).map_err(|e| {
            let held: Vec<usize> = self.producers.iter().map(|p| p.lane.len()).collect();
            format!("{e}: held per producer {held:?}")
        })?;
        for (i, p) in self.producers.iter().enumerate() {
            let missing: Vec<EventSeq> = p
                .pushed
                .keys()
                .filter(|s| !p.outcomes.contains_key(s))
                .copied()
                .collect();
            if !missing.is_empty() {
                return Err(format!("I5: p{i} events without an outcome: {missing:?}"));
            }
            if !p.lane.is_empty() {
                return Err(format!("I5: p{i} lane holds {} events", p.lane.len()));
            }
        }
        self.check_invariants()?;
        // I4 at rest: every stored message of a producer was reported delivered (some push of it).
        for r in self.broker.stored() {
            for (i, p) in self.producers.iter().enumerate() {
                if let Some(seqs) = p.by_msg_id.get(&r.msg_id) {
                    let delivered = seqs
                        .iter()
                        .any(|s| matches!(p.outcomes.get(s), Some(LaneOutcome::Delivered(_))));
                    if !delivered {
                        return Err(format!(
                            "I4: p{i} {} stored as {} but reported {:?}",
                            r.msg_id,
                            r.stream_seq,
                            seqs.iter().map(|s| p.outcomes.get(s)).collect::<Vec<_>>()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks I1-I4 and the bounds now, per producer; the first violation as text.
    ///
    /// - I1: every delivered event's message id is stored.
    /// - I2: no message id is stored twice within the duplicate window.
    /// - I3: per producer, the first copies of its messages are stored in push order (a re-emitted
    ///   id stands for any of its pushes).
    /// - I4: a rejected event is not stored (unless another push of its id was delivered).
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(v) = self.violations.first() {
            return Err(v.clone());
        }
        let window = self.broker.config().duplicate_window;
        let mut first: HashMap<&MsgId, u64> = HashMap::new();
        let mut latest: HashMap<&MsgId, (u64, Instant)> = HashMap::new();
        for r in self.broker.stored() {
            if let Some((seq, at)) = latest.insert(&r.msg_id, (r.stream_seq, r.stored_at)) {
                if r.stored_at.duration_since(at) < window {
                    return Err(format!(
                        "I2: {} stored twice within the duplicate window, as {seq} and {}",
                        r.msg_id, r.stream_seq
                    ));
                }
            }
            first.entry(&r.msg_id).or_insert(r.stream_seq);
        }
        for (i, p) in self.producers.iter().enumerate() {
            for (seq, outcome) in &p.outcomes {
                let id = &p.pushed[seq];
                match outcome {
                    LaneOutcome::Delivered(_) if !first.contains_key(id) => {
                        return Err(format!("I1: p{i} #{seq} ({id}) delivered but not stored"));
                    }
                    LaneOutcome::Rejected(_) if first.contains_key(id) => {
                        let other = p.by_msg_id[id].iter().any(|s| {
                            s != seq && !matches!(p.outcomes.get(s), Some(LaneOutcome::Rejected(_)))
                        });
                        if !other {
                            return Err(format!("I4: p{i} #{seq} ({id}) rejected but stored"));
                        }
                    }
                    _ => {}
                }
            }
            let mut last: Option<EventSeq> = None;
            for r in self.broker.stored() {
                if first.get(&r.msg_id) != Some(&r.stream_seq) {
                    continue;
                }
                let Some(seqs) = p.by_msg_id.get(&r.msg_id) else {
                    continue;
                };
                match seqs.iter().copied().find(|s| last.is_none_or(|l| *s > l)) {
                    Some(s) => last = Some(s),
                    None => {
                        return Err(format!(
                            "I3: p{i} {} (pushed as {seqs:?}) stored as {} after #{}",
                            r.msg_id,
                            r.stream_seq,
                            last.unwrap_or_default()
                        ))
                    }
                }
            }
            let config = p.lane.config();
            let window = usize::from(config.flow) * usize::from(config.outstanding_acks);
            if p.lane.in_flight() > window {
                return Err(format!(
                    "bound: p{i} {} in flight, window {window}",
                    p.lane.in_flight()
                ));
            }
            if p.lane.len() > config.max_events || p.lane.bytes() > config.max_bytes {
                return Err(format!("bound: p{i} holds {} events", p.lane.len()));
            }
        }
        Ok(())
    }

    fn on_output(&mut self, p: usize, output: LaneOutput, breaker: BreakerState, now: Instant) {
        match output {
            LaneOutput::Transmit(t) => {
                if matches!(breaker, BreakerState::Open { .. })
                    && matches!(t.reply.op, BatchOp::Start | BatchOp::Commit)
                    && t.reply.seq == 1
                {
                    self.violation(format!("p{p} started a batch while the breaker was open"));
                }
                let producer = &self.producers[p];
                let reply = t.reply.format(&producer.prefix);
                let (subject, msg_id, what) = match &t.payload {
                    Payload::Event(seq) => {
                        let Some(m) = producer.lane.message(*seq) else {
                            self.violation(format!("p{p} transmit of #{seq}, not held"));
                            return;
                        };
                        self.stats.events_sent += 1;
                        (
                            m.subject.clone(),
                            Some(m.msg_id.clone()),
                            format!("#{seq} {}", m.msg_id),
                        )
                    }
                    Payload::Control { subject } => {
                        self.stats.controls_sent += 1;
                        if t.reply.op == BatchOp::Ping {
                            self.stats.pings += 1;
                        }
                        (subject.clone(), None, "control".to_owned())
                    }
                };
                self.note(format!(
                    "p{p} send {what} batch {} seq {} op {:?}{}",
                    short(t.reply.batch_id.as_str()),
                    t.reply.seq,
                    t.reply.op,
                    if t.probe { " (probe)" } else { "" }
                ));
                self.broker.receive(
                    FastPublish {
                        subject,
                        reply,
                        msg_id,
                    },
                    now,
                );
                if self.broker.take_connection_lost() {
                    self.connection_lost();
                }
            }
            LaneOutput::Delivered { seq, receipt } => {
                self.note(format!(
                    "p{p} delivered #{seq} batch {} seq {}",
                    short(receipt.batch.as_str()),
                    receipt.batch_seq
                ));
                self.record(p, seq, LaneOutcome::Delivered(receipt));
            }
            LaneOutput::Rejected { seq, rejection } => {
                self.note(format!("p{p} rejected #{seq}: {rejection}"));
                self.record(p, seq, LaneOutcome::Rejected(rejection));
            }
            LaneOutput::BatchEnded {
                batch,
                persisted,
                end,
                ..
            } => {
                self.stats.batches_ended += 1;
                self.note(format!(
                    "p{p} batch {} ended at {persisted}: {end}",
                    short(batch.as_str())
                ));
            }
            LaneOutput::Retrying {
                seq, delay, reason, ..
            } => {
                self.stats.retrying += 1;
                self.note(format!(
                    "p{p} retrying from #{seq} in {}ms: {reason}",
                    delay.as_millis()
                ));
            }
            LaneOutput::Breaker(event) => {
                let text = match event {
                    sink_core::breaker::BreakerEvent::Opened { until, attempt } => format!(
                        "opened until {} (attempt {attempt})",
                        self.clock.stamp_at(until)
                    ),
                    other => format!("{other:?}"),
                };
                self.note(format!("p{p} breaker {text}"));
            }
            LaneOutput::Disabled(r) => self.note(format!("p{p} disabled: {r}")),
        }
    }

    fn on_reply(&mut self, subject: String, body: Vec<u8>, now: Instant) {
        let parsed = ReplySubject::parse(&subject);
        let Ok((prefix, reply_to)) = parsed else {
            self.violation(format!(
                "reply on an unreadable subject {subject}: {parsed:?}"
            ));
            return;
        };
        let Some(p) = self.producers.iter().position(|x| x.prefix == prefix) else {
            self.violation(format!("reply for no producer: {subject}"));
            return;
        };
        let reply = match decode_reply(&body) {
            Ok(r) => r,
            Err(e) => {
                self.violation(format!("undecodable reply {e}"));
                return;
            }
        };
        self.note(format!(
            "p{p} reply batch {} seq {}: {}",
            short(reply_to.batch_id.as_str()),
            reply_to.seq,
            String::from_utf8_lossy(&body)
        ));
        let answer = reply.into_answer(classify);
        self.producers[p].lane.handle_reply(&reply_to, answer, now);
    }

    fn connection_lost(&mut self) {
        self.stats.connection_losses += 1;
        self.note("connection lost".into());
        let now = self.clock.now();
        for p in &mut self.producers {
            p.lane.handle_connection_lost(now);
        }
    }

    fn record(&mut self, p: usize, seq: EventSeq, outcome: LaneOutcome) {
        let producer = &mut self.producers[p];
        if !producer.pushed.contains_key(&seq) {
            self.violation(format!("p{p} outcome for unknown #{seq}"));
            return;
        }
        if let Some(first) = producer.outcomes.get(&seq) {
            let text = format!("I4: p{p} #{seq} second outcome {outcome:?} after {first:?}");
            self.violation(text);
            return;
        }
        producer.outcomes.insert(seq, outcome);
        let now = self.clock.now();
        if let Some(t) = producer.times.get_mut(&seq) {
            t.1 = Some(now);
        }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Progress,
    Advanced,
    Idle,
    Limit,
}

/// A batch id without its random part: `<lane>-<counter>`, for readable traces.
fn short(id: &str) -> &str {
    id.split_once('-').map_or(id, |(_, rest)| rest)
}
