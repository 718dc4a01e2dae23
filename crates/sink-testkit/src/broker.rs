//! A scripted, sans-IO model of one JetStream stream: dedup window, expected-last-msg-id checks and a fault script.
//!
//! The model follows what nats-server does (measured, see DESIGN.md): a publish is first checked
//! against the duplicate window (a duplicate is acknowledged with `duplicate: true` and its
//! *original* sequence, whatever its expected-last header says), then against the
//! `Nats-Expected-Last-Msg-Id` header, compared with the stream-wide last stored message id
//! (mismatch: error 10070 `"wrong last msg ID: <actual>"`), then stored. Replies are not returned
//! directly: they are scheduled on virtual time and collected with
//! [`poll_reply`](ScriptedBroker::poll_reply), so latency, delayed, lost and duplicated replies
//! interleave the way they do on a real connection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use sink_core::event::MsgId;
use sink_core::outbox::{Ack, EventSeq, Failure, Rejection};

/// One publish as it reaches the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    /// The `Nats-Msg-Id` header.
    pub msg_id: MsgId,
    /// The `Nats-Expected-Last-Msg-Id` header, if sent.
    pub expected_last_msg_id: Option<MsgId>,
    /// The subject published to.
    pub subject: String,
    /// Body size in bytes (the model keeps no payloads).
    pub body_len: usize,
    /// The client's tag for this publish (the outbox's event sequence), echoed in the reply.
    pub seq: EventSeq,
    /// The client's transmission count, echoed in the reply.
    pub attempt: u32,
}

/// The broker's answer to one publish, in the outbox's own input types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A publish ack: feed to `Outbox::handle_ack`.
    Ack(Ack),
    /// An error reply: feed to `Outbox::handle_failure`.
    Fail(Failure),
}

/// One message held by the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Stream sequence, from 1.
    pub stream_seq: u64,
    /// The message id it was stored under.
    pub msg_id: MsgId,
    /// The subject it was published to.
    pub subject: String,
    /// When (virtual time) it was stored: a second copy of an id is allowed only after the
    /// first left the duplicate window.
    pub stored_at: Instant,
}

/// One injected misbehaviour, applied to one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The request vanishes on its way: not stored, no reply (the client times out).
    DropRequest,
    /// The reply arrives this much later than the normal latency.
    DelayReply(Duration),
    /// The message is processed (stored if it passes the checks) but the reply is lost.
    LoseAck,
    /// The reply arrives twice.
    DuplicateAck,
    /// 503 no responders (a restart or leader election): retryable, not stored.
    NoResponders,
    /// 429 too many requests (server overload): retryable, not stored.
    TooManyRequests,
    /// A terminal per-message error with this JetStream error code (e.g. a stream limit with
    /// discard-new): not stored. A message already stored is still acknowledged as a duplicate.
    Terminal {
        /// The JetStream `err_code`.
        code: u16,
    },
    /// The stream is unavailable from this publish on, for this long: every publish in the window
    /// fails as retryable "no stream". Stored messages are kept.
    StreamMissing(Duration),
    /// The connection drops as this publish is sent: the request and every outstanding reply
    /// vanish. The harness learns of it through [`ScriptedBroker::take_connection_lost`].
    ConnectionLoss,
    /// Before this publish, the stream forgets its last message id (a server restart: the
    /// messages and the duplicate window survive, the last id does not).
    ForgetLastId,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::DropRequest => f.write_str("drop-request"),
            Fault::DelayReply(d) => write!(f, "delay-reply {}ms", d.as_millis()),
            Fault::LoseAck => f.write_str("lose-ack"),
            Fault::DuplicateAck => f.write_str("duplicate-ack"),
            Fault::NoResponders => f.write_str("503"),
            Fault::TooManyRequests => f.write_str("429"),
            Fault::Terminal { code } => write!(f, "terminal {code}"),
            Fault::StreamMissing(d) => write!(f, "stream-missing {}ms", d.as_millis()),
            Fault::ConnectionLoss => f.write_str("connection-loss"),
            Fault::ForgetLastId => f.write_str("forget-last-id"),
        }
    }
}

/// Faults drawn at random: each publish gets one fault from `menu` with probability
/// `per_mille / 1000`, from a deterministic generator seeded with `seed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomFaults {
    /// Seed of the generator.
    pub seed: u64,
    /// Chance of a fault per publish, in thousandths.
    pub per_mille: u16,
    /// The faults to draw from (uniformly).
    pub menu: Vec<Fault>,
}

/// Which publishes misbehave, and how.
///
/// Publishes are counted from 0 in arrival order (every `receive`, re-sends included). For one
/// publish the broker applies the faults scheduled at its index, then the next queued fault, then
/// possibly a random one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultScript {
    /// Faults by publish index.
    pub at: BTreeMap<u64, Vec<Fault>>,
    /// Faults for the next publishes, one each, in order.
    pub next: VecDeque<Fault>,
    /// Random faults, if any.
    pub random: Option<RandomFaults>,
}

impl FaultScript {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds `fault` at publish `index` (builder style).
    pub fn at(mut self, index: u64, fault: Fault) -> Self {
        self.at.entry(index).or_default().push(fault);
        self
    }

    /// Queues `fault` for the next publish not yet given a queued fault (builder style).
    pub fn then(mut self, fault: Fault) -> Self {
        self.next.push_back(fault);
        self
    }

    /// Adds random faults (builder style).
    pub fn random(mut self, random: RandomFaults) -> Self {
        self.random = Some(random);
        self
    }

    /// Whether any fault may still happen.
    pub fn is_quiet(&self) -> bool {
        self.at.is_empty()
            && self.next.is_empty()
            && self
                .random
                .as_ref()
                .is_none_or(|r| r.per_mille == 0 || r.menu.is_empty())
    }
}

/// Settings of the modelled stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Stream name reported in acks.
    pub stream: String,
    /// The duplicate window (nats-server default: 2 minutes).
    pub duplicate_window: Duration,
    /// Time from a publish to its reply when nothing goes wrong.
    pub latency: Duration,
    /// Model a replicated stream on nats-server 2.11+ (read in `checkMsgHeadersPreClusteredProposal`
    /// and `processJetStreamMsg`): the leader stages a message id "in process" before the
    /// message is replicated, and when the message then fails its `Nats-Expected-Last-Msg-Id`
    /// check (10070, decided when applied) the staged id is not removed. Any later publish of
    /// that id is answered 10158 "duplicate message id is in process" until the duplicate window
    /// passes or the leader changes (a restart, [`Fault::ForgetLastId`], elects one).
    pub replicated: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            stream: "EVENTS".into(),
            duplicate_window: Duration::from_secs(120),
            latency: Duration::from_millis(1),
            replicated: false,
        }
    }
}

/// One applied fault, for traces: which publish, which event, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFault {
    /// Publish index (from 0).
    pub publish: u64,
    /// The client's tag of that publish (`u64::MAX` for a foreign publish).
    pub seq: EventSeq,
    /// The fault.
    pub fault: Fault,
}

/// The scripted stream. See the module docs.
#[derive(Debug)]
pub struct ScriptedBroker {
    config: BrokerConfig,
    script: FaultScript,
    rng: u64,
    publishes: u64,
    stored: Vec<StoredRecord>,
    /// Message id -> (stream sequence, when stored), for the duplicate window.
    dedup: HashMap<MsgId, (u64, Instant)>,
    /// Replicated model: ids blocked "in process" since a failed apply, and since when.
    in_process: HashMap<MsgId, Instant>,
    last_msg_id: Option<MsgId>,
    missing_until: Option<Instant>,
    /// Scheduled replies by (due time, order of scheduling).
    replies: BTreeMap<(Instant, u64), (EventSeq, u32, Reply)>,
    reply_counter: u64,
    connection_lost: bool,
    applied: Vec<AppliedFault>,
}

impl ScriptedBroker {
    /// An empty stream with this fault script.
    pub fn new(config: BrokerConfig, script: FaultScript) -> Self {
        let rng = script.random.as_ref().map_or(0, |r| r.seed);
        Self {
            config,
            script,
            rng,
            publishes: 0,
            stored: Vec::new(),
            dedup: HashMap::new(),
            in_process: HashMap::new(),
            last_msg_id: None,
            missing_until: None,
            replies: BTreeMap::new(),
            reply_counter: 0,
            connection_lost: false,
            applied: Vec::new(),
        }
    }

    /// The config.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Queues `fault` for the next publish.
    pub fn inject_next(&mut self, fault: Fault) {
        self.script.next.push_back(fault);
    }

    /// Ends all scripted and random faults (pending delayed replies still arrive; a stream-missing
    /// window in force ends too).
    pub fn stop_faults(&mut self) {
        self.script = FaultScript::none();
        self.missing_until = None;
    }

    /// Whether no fault can happen any more.
    pub fn is_quiet(&self) -> bool {
        self.script.is_quiet() && self.missing_until.is_none()
    }

    /// Publishes received so far.
    pub fn publishes(&self) -> u64 {
        self.publishes
    }

    /// The faults applied so far.
    pub fn applied_faults(&self) -> &[AppliedFault] {
        &self.applied
    }

    /// The stream's content, in stream order.
    pub fn stored(&self) -> &[StoredRecord] {
        &self.stored
    }

    /// The stream-wide last message id (`None` when empty or forgotten).
    pub fn last_msg_id(&self) -> Option<&MsgId> {
        self.last_msg_id.as_ref()
    }

    /// Forgets the last message id now (a restart), outside the fault script.
    pub fn forget_last_id(&mut self) {
        self.restart();
    }

    /// A restart: the stream forgets its last message id, and (replicated model) the new leader
    /// starts with no id in process.
    fn restart(&mut self) {
        self.last_msg_id = None;
        self.in_process.clear();
    }

    /// Whether `msg_id` is blocked "in process" now (replicated model).
    pub fn is_in_process(&self, msg_id: &MsgId, now: Instant) -> bool {
        self.in_process
            .get(msg_id)
            .is_some_and(|&at| now.saturating_duration_since(at) < self.config.duplicate_window)
    }

    /// Another producer stores `msg_id` (deduplicated like any publish, no expected-last header).
    /// Returns its stream sequence.
    pub fn foreign_publish(&mut self, msg_id: MsgId, now: Instant) -> u64 {
        if let Some(seq) = self.duplicate_of(&msg_id, now) {
            return seq;
        }
        self.store(msg_id, "foreign".into(), now)
    }

    /// The connection drops now: every outstanding reply vanishes.
    pub fn lose_connection(&mut self) {
        self.replies.clear();
        self.connection_lost = true;
    }

    /// Whether the connection dropped since the last call (then the harness must tell the outbox).
    pub fn take_connection_lost(&mut self) -> bool {
        std::mem::take(&mut self.connection_lost)
    }

    /// Handles one publish arriving at `now`: applies its faults, decides its fate, schedules replies.
    pub fn receive(&mut self, req: PublishRequest, now: Instant) {
        let index = self.publishes;
        self.publishes += 1;
        let faults = self.faults_for(index);
        let mut drop_request = false;
        let mut lose_reply = false;
        let mut duplicate_reply = false;
        let mut delay = Duration::ZERO;
        let mut refusal: Option<Failure> = None;
        let mut terminal: Option<u16> = None;
        for fault in faults {
            match &fault {
                Fault::DropRequest => drop_request = true,
                Fault::DelayReply(d) => delay += *d,
                Fault::LoseAck => lose_reply = true,
                Fault::DuplicateAck => duplicate_reply = true,
                Fault::NoResponders => {
                    refusal.get_or_insert(Failure::Retryable {
                        reason: "503 no responders".into(),
                    });
                }
                Fault::TooManyRequests => {
                    refusal.get_or_insert(Failure::Overloaded {
                        reason: "429 too many requests".into(),
                    });
                }
                Fault::Terminal { code } => terminal = Some(*code),
                Fault::StreamMissing(d) => {
                    let until = now + *d;
                    self.missing_until = Some(self.missing_until.map_or(until, |u| u.max(until)));
                }
                Fault::ConnectionLoss => {
                    drop_request = true;
                    self.lose_connection();
                }
                Fault::ForgetLastId => self.restart(),
            }
            self.applied.push(AppliedFault {
                publish: index,
                seq: req.seq,
                fault,
            });
        }
        if self.missing_until.is_some_and(|until| now >= until) {
            self.missing_until = None;
        }
        if drop_request {
            return;
        }
        let reply = if self.missing_until.is_some() {
            Reply::Fail(Failure::Retryable {
                reason: "no stream captures the subject (stream unavailable)".into(),
            })
        } else if let Some(failure) = refusal {
            Reply::Fail(failure)
        } else if let Some(sequence) = self.duplicate_of(&req.msg_id, now) {
            Reply::Ack(self.ack(sequence, true))
        } else if self.is_in_process(&req.msg_id, now) {
            Reply::Fail(Failure::InProcess)
        } else if req
            .expected_last_msg_id
            .as_ref()
            .is_some_and(|e| self.last_msg_id.as_ref() != Some(e))
        {
            if self.config.replicated {
                self.in_process.insert(req.msg_id.clone(), now);
            }
            let actual = self.last_msg_id.as_ref().map_or("", |m| m.as_str());
            // Error 10070, "wrong last msg ID: <actual>"; the actual id is empty when the stream
            // has none (empty, or forgotten after a restart).
            Reply::Fail(Failure::WrongLastMsgId {
                actual: Some(actual.to_owned()),
            })
        } else if let Some(code) = terminal {
            Reply::Fail(Failure::Terminal(Rejection {
                code: Some(code),
                reason: format!("message {} rejected by the stream", req.msg_id),
            }))
        } else {
            let sequence = self.store(req.msg_id, req.subject, now);
            Reply::Ack(self.ack(sequence, false))
        };
        if lose_reply {
            return;
        }
        let due = now + self.config.latency + delay;
        self.schedule(due, req.seq, req.attempt, reply.clone());
        if duplicate_reply {
            self.schedule(due + self.config.latency, req.seq, req.attempt, reply);
        }
    }

    /// The next reply due at or before `now`: (client tag, attempt, reply).
    pub fn poll_reply(&mut self, now: Instant) -> Option<(EventSeq, u32, Reply)> {
        let (&(due, _), _) = self.replies.first_key_value()?;
        if due > now {
            return None;
        }
        self.replies.pop_first().map(|(_, reply)| reply)
    }

    /// When the next reply is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.replies.first_key_value().map(|(&(due, _), _)| due)
    }

    /// Replies scheduled but not yet delivered.
    pub fn pending_replies(&self) -> usize {
        self.replies.len()
    }

    fn schedule(&mut self, due: Instant, seq: EventSeq, attempt: u32, reply: Reply) {
        self.reply_counter += 1;
        self.replies
            .insert((due, self.reply_counter), (seq, attempt, reply));
    }

    fn ack(&self, sequence: u64, duplicate: bool) -> Ack {
        Ack {
            stream: self.config.stream.clone(),
            sequence,
            duplicate,
        }
    }

    fn duplicate_of(&self, msg_id: &MsgId, now: Instant) -> Option<u64> {
        let &(sequence, at) = self.dedup.get(msg_id)?;
        (now.saturating_duration_since(at) < self.config.duplicate_window).then_some(sequence)
    }

    fn store(&mut self, msg_id: MsgId, subject: String, now: Instant) -> u64 {
        let stream_seq = self.stored.len() as u64 + 1;
        self.dedup.insert(msg_id.clone(), (stream_seq, now));
        self.last_msg_id = Some(msg_id.clone());
        self.stored.push(StoredRecord {
            stream_seq,
            msg_id,
            subject,
            stored_at: now,
        });
        stream_seq
    }

    fn faults_for(&mut self, index: u64) -> Vec<Fault> {
        let mut faults = self.script.at.remove(&index).unwrap_or_default();
        faults.extend(self.script.next.pop_front());
        if let Some(random) = &self.script.random {
            if !random.menu.is_empty() && random.per_mille > 0 {
                let roll = splitmix64(&mut self.rng);
                if roll % 1000 < u64::from(random.per_mille) {
                    let pick = splitmix64(&mut self.rng) % random.menu.len() as u64;
                    faults.push(random.menu[pick as usize].clone());
                }
            }
        }
        faults
    }
}

/// A small deterministic generator (SplitMix64): enough for fault rolls, no dependency.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    fn req(id: &str, expected: Option<&str>, seq: EventSeq) -> PublishRequest {
        PublishRequest {
            msg_id: MsgId::from_raw(id.into()),
            expected_last_msg_id: expected.map(|e| MsgId::from_raw(e.into())),
            subject: "s".into(),
            body_len: 1,
            seq,
            attempt: 1,
        }
    }

    fn drain(b: &mut ScriptedBroker, clock: &FakeClock) -> Vec<(EventSeq, Reply)> {
        let mut out = Vec::new();
        while let Some(t) = b.poll_timeout() {
            clock.advance_to(t);
            while let Some((seq, _, r)) = b.poll_reply(clock.now()) {
                out.push((seq, r));
            }
        }
        out
    }

    fn ack(sequence: u64, duplicate: bool) -> Reply {
        Reply::Ack(Ack {
            stream: "EVENTS".into(),
            sequence,
            duplicate,
        })
    }

    #[test]
    fn dedup_is_checked_before_expected_last_and_returns_the_original_sequence() {
        let clock = FakeClock::new();
        let mut b = ScriptedBroker::new(BrokerConfig::default(), FaultScript::none());
        b.receive(req("m1", None, 1), clock.now());
        b.receive(req("m2", Some("m1"), 2), clock.now());
        b.receive(req("m1", Some("zzz"), 1), clock.now());
        b.receive(req("m3", Some("m1"), 3), clock.now());
        assert_eq!(
            drain(&mut b, &clock),
            vec![
                (1, ack(1, false)),
                (2, ack(2, false)),
                (1, ack(1, true)),
                (
                    3,
                    Reply::Fail(Failure::WrongLastMsgId {
                        actual: Some("m2".into())
                    })
                ),
            ]
        );
        assert_eq!(b.stored().len(), 2);
    }

    #[test]
    fn duplicate_window_expires_in_virtual_time() {
        let clock = FakeClock::new();
        let config = BrokerConfig {
            duplicate_window: Duration::from_secs(5),
            ..BrokerConfig::default()
        };
        let mut b = ScriptedBroker::new(config, FaultScript::none());
        b.receive(req("m1", None, 1), clock.now());
        clock.advance(Duration::from_secs(5));
        b.receive(req("m1", None, 1), clock.now());
        assert_eq!(
            drain(&mut b, &clock),
            vec![(1, ack(1, false)), (1, ack(2, false))]
        );
    }

    #[test]
    fn scripted_faults_apply_by_index_and_queue() {
        let clock = FakeClock::new();
        let script = FaultScript::none()
            .at(0, Fault::LoseAck)
            .then(Fault::DuplicateAck)
            .then(Fault::DropRequest)
            .at(3, Fault::Terminal { code: 10077 })
            .at(4, Fault::ForgetLastId)
            .at(5, Fault::ConnectionLoss);
        let mut b = ScriptedBroker::new(BrokerConfig::default(), script);
        b.receive(req("m1", None, 1), clock.now()); // stored, ack lost (and a duplicate of a lost ack)
        b.receive(req("m2", Some("m1"), 2), clock.now()); // dropped
        b.receive(req("m3", Some("m1"), 3), clock.now()); // stored
        b.receive(req("m4", Some("m3"), 4), clock.now()); // terminal
        b.receive(req("m5", Some("m3"), 5), clock.now()); // last id forgotten
        let replies = drain(&mut b, &clock);
        assert_eq!(
            replies,
            vec![
                (3, ack(2, false)),
                (
                    4,
                    Reply::Fail(Failure::Terminal(Rejection {
                        code: Some(10077),
                        reason: "message m4 rejected by the stream".into()
                    }))
                ),
                (
                    5,
                    Reply::Fail(Failure::WrongLastMsgId {
                        actual: Some(String::new())
                    })
                ),
            ]
        );
        b.receive(req("m5", None, 5), clock.now()); // connection loss at publish 5
        assert!(b.take_connection_lost());
        assert!(!b.take_connection_lost());
        assert_eq!(b.pending_replies(), 0);
        assert_eq!(b.stored().len(), 2);
        assert!(b.is_quiet());
    }

    #[test]
    fn stream_missing_window_refuses_then_recovers() {
        let clock = FakeClock::new();
        let script = FaultScript::none().at(0, Fault::StreamMissing(Duration::from_secs(1)));
        let mut b = ScriptedBroker::new(BrokerConfig::default(), script);
        b.receive(req("m1", None, 1), clock.now());
        clock.advance(Duration::from_millis(999));
        b.receive(req("m1", None, 1), clock.now());
        clock.advance(Duration::from_millis(1));
        b.receive(req("m1", None, 1), clock.now());
        let replies = drain(&mut b, &clock);
        assert!(matches!(
            replies[0].1,
            Reply::Fail(Failure::Retryable { .. })
        ));
        assert!(matches!(
            replies[1].1,
            Reply::Fail(Failure::Retryable { .. })
        ));
        assert_eq!(replies[2].1, ack(1, false));
    }

    #[test]
    fn random_faults_are_deterministic_per_seed() {
        let run = |seed| {
            let clock = FakeClock::new();
            let script = FaultScript::none().random(RandomFaults {
                seed,
                per_mille: 300,
                menu: vec![Fault::DropRequest, Fault::NoResponders],
            });
            let mut b = ScriptedBroker::new(BrokerConfig::default(), script);
            for i in 0..200 {
                b.receive(req(&format!("m{i}"), None, i), clock.now());
            }
            b.applied_faults().to_vec()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let n = run(7).len();
        assert!((30..100).contains(&n), "about 30% of 200 publishes: {n}");
    }

    #[test]
    fn foreign_publish_moves_the_last_id() {
        let clock = FakeClock::new();
        let mut b = ScriptedBroker::new(BrokerConfig::default(), FaultScript::none());
        b.receive(req("m1", None, 1), clock.now());
        assert_eq!(
            b.foreign_publish(MsgId::from_raw("other-1".into()), clock.now()),
            2
        );
        b.receive(req("m2", Some("m1"), 2), clock.now());
        let replies = drain(&mut b, &clock);
        assert_eq!(
            replies[1].1,
            Reply::Fail(Failure::WrongLastMsgId {
                actual: Some("other-1".into())
            })
        );
        assert_eq!(b.last_msg_id().map(MsgId::as_str), Some("other-1"));
    }
}
