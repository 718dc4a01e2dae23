//! A scripted, sans-IO model of one stream that accepts fast batches (nats-server 2.14+): per-batch cursors, gaps, duplicates, flow acks, idle drop, leader change, restart, 429.
//!
//! The model follows `processJetStreamFastBatchMsg` (`server/stream.go`) and `fastBatchInit` /
//! `checkFlowControl` / `fastBatchRegisterSequences` (`server/jetstream_batching.go`), as read in
//! `notes/fast-batch.md`. It reads the batch state from the publish's reply subject with the core's
//! own parser and answers with the server's JSON on that reply subject; replies are scheduled on
//! virtual time and collected with [`poll_reply`](FastBroker::poll_reply). Messages are applied
//! (persisted) as they arrive, so a batch's persisted sequence always equals its last received one.
//!
//! What it models:
//! - one cursor per batch id (`lseq`); a message whose sequence is not `lseq + 1` is a gap: a
//!   gap notice if it is ahead, then (gap mode `fail`) a commit at `lseq` with the final PubAck
//!   `{"stream","seq","batch","count"}`; the batch is then gone, and later messages of it get 10208;
//! - `Nats-Msg-Id` duplicates (within the duplicate window) are skipped silently and the batch
//!   goes on;
//! - flow acks every `N` messages with `N = min(client flow, 500 / batches on the stream)`; a
//!   batch that is not alone starts at 1, and `N` doubles (or halves) towards the target at each
//!   ack; the first message of a batch is answered with a flow ack for sequence 0;
//! - ping (op 4): a gap if its sequence is ahead of the cursor, else the last flow ack again;
//! - a batch idle for `batch_timeout` is dropped silently (the next message gets 10208);
//! - [`FastFault::LeaderChange`]: publishes in flight to the old leader vanish, then every batch is
//!   reset to its last applied sequence and a flow ack is sent to its last reply subject;
//! - [`FastFault::Restart`]: every batch is dropped and the connection with it;
//! - [`FastFault::Overloaded`]: a full ingest queue refuses the message with a 429 before the batch
//!   sees it, so the next message of that batch shows a gap;
//! - [`FastFault::Terminal`]: the message fails a check: an ordinary error for a batch's first
//!   message (the batch is removed), else an `err` notice and a commit before it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use serde_json::json;
use sink_core::event::MsgId;
use sink_core::fastbatch::{BatchOp, GapMode, ReplySubject, WireError};

use crate::broker::StoredRecord;

/// One publish as it reaches the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastPublish {
    /// The subject.
    pub subject: String,
    /// The reply subject (with the fast-batch state).
    pub reply: String,
    /// `Nats-Msg-Id`, for a message (none for a control message).
    pub msg_id: Option<MsgId>,
}

/// One injected misbehaviour, applied at one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FastFault {
    /// 429: the ingest queue is full; the message is refused before its batch sees it.
    Overloaded,
    /// The message fails a check with this JetStream error code; nothing is stored.
    Terminal {
        /// The `err_code`.
        code: u16,
    },
    /// The reply to this publish is lost.
    LoseReply,
    /// The replies to this publish come this much later.
    DelayReply(Duration),
    /// The stream leader changes: this publish and the next `lost - 1` reach the old leader and
    /// vanish; then the new leader resets every batch to its last applied sequence.
    LeaderChange {
        /// Publishes lost (at least 1).
        lost: u32,
    },
    /// The server restarts as this publish arrives: it is lost, every batch is dropped, the
    /// connection drops (outstanding replies vanish).
    Restart,
}

impl fmt::Display for FastFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FastFault::Overloaded => f.write_str("429"),
            FastFault::Terminal { code } => write!(f, "terminal {code}"),
            FastFault::LoseReply => f.write_str("lose-reply"),
            FastFault::DelayReply(d) => write!(f, "delay-reply {}ms", d.as_millis()),
            FastFault::LeaderChange { lost } => write!(f, "leader-change lost {lost}"),
            FastFault::Restart => f.write_str("restart"),
        }
    }
}

/// Which publishes misbehave: by index (from 0, every publish counted), queued for the next
/// ones, and at random (`per_mille` per publish, from `menu`, seeded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FastFaults {
    /// Faults by publish index.
    pub at: BTreeMap<u64, Vec<FastFault>>,
    /// Faults for the next publishes, one each.
    pub next: VecDeque<FastFault>,
    /// Seed of the random faults.
    pub seed: u64,
    /// Chance of a random fault per publish, in thousandths.
    pub per_mille: u16,
    /// What random faults are drawn from.
    pub menu: Vec<FastFault>,
}

impl FastFaults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds `fault` at publish `index` (builder style).
    pub fn at(mut self, index: u64, fault: FastFault) -> Self {
        self.at.entry(index).or_default().push(fault);
        self
    }
}

/// Settings of the modelled stream and server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastBrokerConfig {
    /// Stream name.
    pub stream: String,
    /// The duplicate window.
    pub duplicate_window: Duration,
    /// Time from a publish to its reply.
    pub latency: Duration,
    /// Idle time after which a batch is dropped silently (server default 10 s).
    pub batch_timeout: Duration,
    /// Most fast batches on the stream (server default 1000); more get 10211.
    pub max_batches: usize,
    /// Whether the stream allows batch publishing (`allow_batched`); if not, 10205.
    pub allow_batched: bool,
}

impl Default for FastBrokerConfig {
    fn default() -> Self {
        Self {
            stream: "EVENTS".into(),
            duplicate_window: Duration::from_secs(120),
            latency: Duration::from_millis(1),
            batch_timeout: Duration::from_secs(10),
            max_batches: 1000,
            allow_batched: true,
        }
    }
}

/// One applied fault, for traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFastFault {
    /// Publish index.
    pub publish: u64,
    /// The fault.
    pub fault: FastFault,
}

#[derive(Debug, Clone)]
struct BatchState {
    /// Last received (= persisted) batch sequence.
    lseq: u64,
    /// Last flow-acked sequence.
    fseq: u64,
    /// Stream sequence of the last message the batch stored.
    sseq: u64,
    ack_messages: u16,
    max_ack: u16,
    reply: String,
    last_activity: Instant,
}

/// The scripted fast-batch stream. See the module docs.
#[derive(Debug)]
pub struct FastBroker {
    config: FastBrokerConfig,
    faults: FastFaults,
    rng: u64,
    publishes: u64,
    stored: Vec<StoredRecord>,
    dedup: HashMap<MsgId, (u64, Instant)>,
    batches: HashMap<String, BatchState>,
    /// Publishes still to vanish on their way to a deposed leader.
    lost_to_old_leader: u32,
    replies: BTreeMap<(Instant, u64), (String, Vec<u8>)>,
    reply_counter: u64,
    connection_lost: bool,
    applied: Vec<AppliedFastFault>,
    /// Batches dropped by the idle timeout so far.
    timed_out: u64,
}

impl FastBroker {
    /// An empty stream with this fault script.
    pub fn new(config: FastBrokerConfig, faults: FastFaults) -> Self {
        Self {
            rng: faults.seed,
            config,
            faults,
            publishes: 0,
            stored: Vec::new(),
            dedup: HashMap::new(),
            batches: HashMap::new(),
            lost_to_old_leader: 0,
            replies: BTreeMap::new(),
            reply_counter: 0,
            connection_lost: false,
            applied: Vec::new(),
            timed_out: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &FastBrokerConfig {
        &self.config
    }

    /// The stream's content, in stream order.
    pub fn stored(&self) -> &[StoredRecord] {
        &self.stored
    }

    /// Publishes received so far.
    pub fn publishes(&self) -> u64 {
        self.publishes
    }

    /// Faults applied so far.
    pub fn applied_faults(&self) -> &[AppliedFastFault] {
        &self.applied
    }

    /// Batches open on the stream now (idle ones not yet noticed count).
    pub fn open_batches(&self) -> usize {
        self.batches.len()
    }

    /// Batches the idle timeout dropped so far (noticed when the next publish arrives).
    pub fn timed_out_batches(&self) -> u64 {
        self.timed_out
    }

    /// Stops all faults (scripted, queued and random).
    pub fn stop_faults(&mut self) {
        self.faults = FastFaults::none();
    }

    /// Queues `fault` for the next publish.
    pub fn inject_next(&mut self, fault: FastFault) {
        self.faults.next.push_back(fault);
    }

    /// The connection drops now: outstanding replies vanish.
    pub fn lose_connection(&mut self) {
        self.replies.clear();
        self.connection_lost = true;
    }

    /// Whether the connection dropped since the last call.
    pub fn take_connection_lost(&mut self) -> bool {
        std::mem::take(&mut self.connection_lost)
    }

    /// The server forgets every batch now (a restart without the connection noticing, e.g. a
    /// stream reset): the next message of each gets 10208.
    pub fn forget_batches(&mut self) {
        self.batches.clear();
    }

    /// A leader change now, losing nothing in flight: every batch is reset and flow-acked.
    pub fn leader_change(&mut self, now: Instant) {
        self.take_over(now);
    }

    /// Another producer stores `msg_id` with a plain publish; returns its stream sequence.
    pub fn foreign_publish(&mut self, msg_id: MsgId, now: Instant) -> u64 {
        if let Some(seq) = self.duplicate_of(&msg_id, now) {
            return seq;
        }
        self.store(msg_id, "foreign".into(), now)
    }

    /// The next reply due at or before `now`: (reply subject, body).
    pub fn poll_reply(&mut self, now: Instant) -> Option<(String, Vec<u8>)> {
        let (&(due, _), _) = self.replies.first_key_value()?;
        if due > now {
            return None;
        }
        self.replies.pop_first().map(|(_, r)| r)
    }

    /// When the next reply is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.replies.first_key_value().map(|(&(due, _), _)| due)
    }

    /// Handles one publish arriving at `now`.
    pub fn receive(&mut self, publish: FastPublish, now: Instant) {
        let index = self.publishes;
        self.publishes += 1;
        let faults = self.faults_for(index);
        let mut out = Out {
            lose: false,
            delay: Duration::ZERO,
            replies: Vec::new(),
        };
        let mut terminal = None;
        let mut overloaded = false;
        for fault in faults {
            match &fault {
                FastFault::Overloaded => overloaded = true,
                FastFault::Terminal { code } => terminal = Some(*code),
                FastFault::LoseReply => out.lose = true,
                FastFault::DelayReply(d) => out.delay += *d,
                FastFault::LeaderChange { lost } => {
                    self.lost_to_old_leader = self.lost_to_old_leader.max((*lost).max(1));
                }
                FastFault::Restart => {
                    self.batches.clear();
                    self.lose_connection();
                    self.applied.push(AppliedFastFault {
                        publish: index,
                        fault,
                    });
                    return;
                }
            }
            self.applied.push(AppliedFastFault {
                publish: index,
                fault,
            });
        }
        if self.lost_to_old_leader > 0 {
            // The old leader is no longer leader: it drops the message without an answer.
            self.lost_to_old_leader -= 1;
            if self.lost_to_old_leader == 0 {
                self.take_over(now);
            }
            return;
        }
        let reply = publish.reply.clone();
        if overloaded {
            out.replies
                .push(error_body(&self.config.stream, 429, 0, "ingest queue full"));
        } else {
            self.process(publish, terminal, now, &mut out);
        }
        if out.lose {
            return;
        }
        let due = now + self.config.latency + out.delay;
        for body in out.replies {
            self.schedule(due, reply.clone(), body);
        }
    }

    fn process(
        &mut self,
        publish: FastPublish,
        terminal: Option<u16>,
        now: Instant,
        out: &mut Out,
    ) {
        let stream = self.config.stream.clone();
        if !self.config.allow_batched {
            out.replies
                .push(error_body(&stream, 400, 10205, "batch publish is disabled"));
            return;
        }
        let rs = match ReplySubject::parse(&publish.reply) {
            Ok((_, rs)) => rs,
            Err(WireError::BatchIdTooLong { .. }) => {
                out.replies.push(error_body(
                    &stream,
                    400,
                    10207,
                    "batch publish ID is invalid",
                ));
                return;
            }
            Err(_) => {
                out.replies.push(error_body(
                    &stream,
                    400,
                    10206,
                    "batch publish invalid pattern used",
                ));
                return;
            }
        };
        self.expire_idle(now);
        let id = rs.batch_id.as_str().to_owned();
        if !self.batches.contains_key(&id) {
            if rs.seq != 1 {
                out.replies
                    .push(error_body(&stream, 404, 10208, "batch publish ID unknown"));
                return;
            }
            if self.batches.len() + 1 > self.config.max_batches {
                out.replies.push(error_body(
                    &stream,
                    429,
                    10211,
                    "too many batch publishes in flight",
                ));
                return;
            }
            let ack_messages = if self.batches.is_empty() {
                rs.flow.min(500)
            } else {
                1
            };
            self.batches.insert(
                id.clone(),
                BatchState {
                    lseq: 0,
                    fseq: 0,
                    sseq: 0,
                    ack_messages,
                    max_ack: rs.flow,
                    reply: publish.reply.clone(),
                    last_activity: now,
                },
            );
        }
        let gap_ok = rs.gap == GapMode::Ok;
        let b = self.batches.get_mut(&id).expect("inserted above");
        b.last_activity = now;
        if rs.op == BatchOp::Ping {
            if rs.seq > b.lseq {
                out.replies.push(
                    json!({"type": "gap", "last_seq": b.lseq + 1, "seq": rs.seq + 1})
                        .to_string()
                        .into_bytes(),
                );
                if !gap_ok {
                    self.commit(&id, out);
                    return;
                }
                b.lseq = rs.seq;
            }
            let b = &self.batches[&id];
            out.replies.push(flow_body(b.fseq, b.ack_messages));
            return;
        }
        let expected = b.lseq + 1;
        if rs.seq != expected {
            if rs.seq > expected {
                out.replies.push(
                    json!({"type": "gap", "last_seq": expected, "seq": rs.seq})
                        .to_string()
                        .into_bytes(),
                );
            }
            if !(gap_ok && rs.seq > expected) {
                self.commit(&id, out);
                return;
            }
        }
        if rs.op == BatchOp::CommitEob {
            self.commit(&id, out);
            return;
        }
        let commit = rs.op == BatchOp::Commit;
        if rs.seq == 1 && !commit {
            out.replies.push(flow_body(0, b.ack_messages));
        }
        let msg_id = publish
            .msg_id
            .unwrap_or_else(|| MsgId::from_raw(String::new()));
        // The server checks the msg id before the checks on content and limits
        // (`checkMsgHeadersPreClusteredProposal`): a duplicate is skipped, not refused.
        let duplicate = self.duplicate_of(&msg_id, now);
        let first = self.batches.get(&id).is_some_and(|b| b.lseq == 0);
        if let (Some(code), None) = (terminal, duplicate) {
            if first {
                self.batches.remove(&id);
                out.replies.push(error_body(
                    &stream,
                    400,
                    code,
                    "message rejected by the stream",
                ));
            } else {
                out.replies.push(
                    json!({"type": "err", "seq": rs.seq,
                           "error": {"code": 400, "err_code": code, "description": "message rejected by the stream"}})
                    .to_string()
                    .into_bytes(),
                );
                self.commit(&id, out);
            }
            return;
        }
        let sseq = match duplicate {
            Some(_) => None,
            None => Some(self.store(msg_id, publish.subject, now)),
        };
        let b = self.batches.get_mut(&id).expect("still open");
        b.lseq = rs.seq;
        b.reply = publish.reply;
        if let Some(s) = sseq {
            b.sseq = s;
        }
        if commit {
            if let (Some(dseq), 1) = (duplicate, rs.seq) {
                self.batches.remove(&id);
                out.replies.push(
                    json!({"stream": stream, "seq": dseq, "duplicate": true, "batch": id, "count": 1})
                        .to_string()
                        .into_bytes(),
                );
                return;
            }
            self.commit(&id, out);
            return;
        }
        self.check_flow_control(&id, out);
    }

    /// Ends batch `id` at its cursor with the final PubAck.
    fn commit(&mut self, id: &str, out: &mut Out) {
        if let Some(b) = self.batches.remove(id) {
            out.replies.push(
                json!({"stream": self.config.stream, "seq": b.sseq, "batch": id, "count": b.lseq})
                    .to_string()
                    .into_bytes(),
            );
        }
    }

    fn check_flow_control(&mut self, id: &str, out: &mut Out) {
        let open = self.batches.len();
        let Some(b) = self.batches.get_mut(id) else {
            return;
        };
        let am = u64::from(b.ack_messages);
        if b.lseq < b.fseq + am {
            return;
        }
        b.fseq += (b.lseq - b.fseq) / am * am;
        let target = u16::try_from(500 / open.max(1))
            .unwrap_or(u16::MAX)
            .max(1)
            .min(b.max_ack);
        if b.ack_messages < target {
            b.ack_messages = b.ack_messages.saturating_mul(2).min(target);
        } else if b.ack_messages > target {
            b.ack_messages = (b.ack_messages / 2).max(target);
        }
        out.replies.push(flow_body(b.fseq, b.ack_messages));
    }

    /// A new leader: every batch back to its last applied sequence, flow-acked on its last reply.
    fn take_over(&mut self, now: Instant) {
        let alone = self.batches.len() <= 1;
        let mut acks = Vec::new();
        for b in self.batches.values_mut() {
            b.ack_messages = if alone { b.max_ack.min(500) } else { 1 };
            b.fseq = b.lseq;
            acks.push((b.reply.clone(), flow_body(b.fseq, b.ack_messages)));
        }
        acks.sort();
        for (reply, body) in acks {
            self.schedule(now + self.config.latency, reply, body);
        }
    }

    fn expire_idle(&mut self, now: Instant) {
        let timeout = self.config.batch_timeout;
        let before = self.batches.len();
        self.batches
            .retain(|_, b| now.saturating_duration_since(b.last_activity) < timeout);
        self.timed_out += (before - self.batches.len()) as u64;
    }

    fn schedule(&mut self, due: Instant, reply: String, body: Vec<u8>) {
        self.reply_counter += 1;
        self.replies
            .insert((due, self.reply_counter), (reply, body));
    }

    fn duplicate_of(&self, msg_id: &MsgId, now: Instant) -> Option<u64> {
        let &(sequence, at) = self.dedup.get(msg_id)?;
        (now.saturating_duration_since(at) < self.config.duplicate_window).then_some(sequence)
    }

    fn store(&mut self, msg_id: MsgId, subject: String, now: Instant) -> u64 {
        let stream_seq = self.stored.len() as u64 + 1;
        self.dedup.insert(msg_id.clone(), (stream_seq, now));
        self.stored.push(StoredRecord {
            stream_seq,
            msg_id,
            subject,
            stored_at: now,
        });
        stream_seq
    }

    fn faults_for(&mut self, index: u64) -> Vec<FastFault> {
        let mut faults = self.faults.at.remove(&index).unwrap_or_default();
        faults.extend(self.faults.next.pop_front());
        if !self.faults.menu.is_empty() && self.faults.per_mille > 0 {
            let roll = splitmix64(&mut self.rng);
            if roll % 1000 < u64::from(self.faults.per_mille) {
                let pick = splitmix64(&mut self.rng) % self.faults.menu.len() as u64;
                faults.push(self.faults.menu[pick as usize].clone());
            }
        }
        faults
    }
}

struct Out {
    lose: bool,
    delay: Duration,
    replies: Vec<Vec<u8>>,
}

fn flow_body(seq: u64, msgs: u16) -> Vec<u8> {
    json!({"type": "ack", "seq": seq, "msgs": msgs})
        .to_string()
        .into_bytes()
}

fn error_body(stream: &str, code: u16, err_code: u16, description: &str) -> Vec<u8> {
    let mut error = json!({"code": code, "description": description});
    if err_code != 0 {
        error["err_code"] = json!(err_code);
    }
    json!({"stream": stream, "seq": 0, "error": error})
        .to_string()
        .into_bytes()
}

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
    use sink_core::fastbatch::{decode_reply, BatchId, ServerReply};

    fn publish(id: &str, seq: u64, op: BatchOp, msg: Option<&str>, flow: u16) -> FastPublish {
        let rs = ReplySubject {
            batch_id: BatchId::new(id).expect("id"),
            flow,
            gap: GapMode::Fail,
            seq,
            op,
        };
        FastPublish {
            subject: "events.a".into(),
            reply: rs.format("_INBOX.t"),
            msg_id: msg.map(|m| MsgId::from_raw(m.into())),
        }
    }

    fn drain(b: &mut FastBroker, clock: &FakeClock) -> Vec<ServerReply> {
        let mut out = Vec::new();
        while let Some(t) = b.poll_timeout() {
            clock.advance_to(t);
            while let Some((_, body)) = b.poll_reply(clock.now()) {
                out.push(decode_reply(&body).expect("the broker speaks the server's JSON"));
            }
        }
        out
    }

    fn flow(seq: u64, msgs: u16) -> ServerReply {
        ServerReply::Flow { seq, msgs }
    }

    fn committed(seq: u64, id: &str, count: u64) -> ServerReply {
        ServerReply::PubAck {
            stream: "EVENTS".into(),
            seq,
            batch: Some(id.into()),
            count: Some(count),
            duplicate: false,
        }
    }

    #[test]
    fn a_batch_is_acked_every_n_and_committed_by_eob() {
        let clock = FakeClock::new();
        let mut b = FastBroker::new(FastBrokerConfig::default(), FastFaults::none());
        b.receive(publish("b", 1, BatchOp::Start, Some("m1"), 2), clock.now());
        for seq in 2..=5 {
            b.receive(
                publish("b", seq, BatchOp::Append, Some(&format!("m{seq}")), 2),
                clock.now(),
            );
        }
        b.receive(publish("b", 6, BatchOp::CommitEob, None, 2), clock.now());
        assert_eq!(
            drain(&mut b, &clock),
            vec![flow(0, 2), flow(2, 2), flow(4, 2), committed(5, "b", 5)]
        );
        assert_eq!(b.stored().len(), 5);
        assert_eq!(b.open_batches(), 0);
    }

    #[test]
    fn a_gap_commits_at_the_cursor_and_stores_nothing_after_it() {
        let clock = FakeClock::new();
        let mut b = FastBroker::new(FastBrokerConfig::default(), FastFaults::none());
        b.receive(
            publish("b", 1, BatchOp::Start, Some("m1"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 3, BatchOp::Append, Some("m3"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 4, BatchOp::Append, Some("m4"), 500),
            clock.now(),
        );
        assert_eq!(
            drain(&mut b, &clock),
            vec![
                flow(0, 500),
                ServerReply::Gap {
                    expected: 2,
                    seq: 3
                },
                committed(1, "b", 1),
                ServerReply::Error(sink_core::fastbatch::ApiError {
                    code: 404,
                    err_code: 10208,
                    description: "batch publish ID unknown".into()
                }),
            ]
        );
        assert_eq!(b.stored().len(), 1);
    }

    #[test]
    fn duplicates_are_skipped_and_the_batch_goes_on() {
        let clock = FakeClock::new();
        let mut b = FastBroker::new(FastBrokerConfig::default(), FastFaults::none());
        b.foreign_publish(MsgId::from_raw("m2".into()), clock.now());
        b.receive(publish("b", 1, BatchOp::Start, Some("m1"), 1), clock.now());
        b.receive(publish("b", 2, BatchOp::Append, Some("m2"), 1), clock.now());
        b.receive(publish("b", 3, BatchOp::Commit, Some("m3"), 1), clock.now());
        assert_eq!(
            drain(&mut b, &clock),
            vec![flow(0, 1), flow(1, 1), flow(2, 1), committed(3, "b", 3)]
        );
        let ids: Vec<&str> = b.stored().iter().map(|r| r.msg_id.as_str()).collect();
        assert_eq!(ids, ["m2", "m1", "m3"]);
    }

    #[test]
    fn a_second_batch_starts_at_one_and_doubles_towards_its_share() {
        let clock = FakeClock::new();
        let mut b = FastBroker::new(FastBrokerConfig::default(), FastFaults::none());
        b.receive(
            publish("a", 1, BatchOp::Start, Some("a1"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 1, BatchOp::Start, Some("b1"), 500),
            clock.now(),
        );
        for seq in 2..=4 {
            b.receive(
                publish("b", seq, BatchOp::Append, Some(&format!("b{seq}")), 500),
                clock.now(),
            );
        }
        let replies = drain(&mut b, &clock);
        assert_eq!(
            replies,
            vec![flow(0, 500), flow(0, 1), flow(1, 2), flow(3, 4)]
        );
    }

    #[test]
    fn an_idle_batch_is_dropped_silently_and_a_ping_keeps_it() {
        let clock = FakeClock::new();
        let mut b = FastBroker::new(FastBrokerConfig::default(), FastFaults::none());
        b.receive(
            publish("a", 1, BatchOp::Start, Some("a1"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 1, BatchOp::Start, Some("b1"), 500),
            clock.now(),
        );
        clock.advance(Duration::from_secs(6));
        b.receive(publish("a", 1, BatchOp::Ping, None, 500), clock.now());
        clock.advance(Duration::from_secs(6));
        b.receive(
            publish("a", 2, BatchOp::Append, Some("a2"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 2, BatchOp::Append, Some("b2"), 500),
            clock.now(),
        );
        let replies = drain(&mut b, &clock);
        assert_eq!(replies[3], flow(0, 500), "the ping re-sends the last ack");
        assert!(
            matches!(&replies[4..], [ServerReply::Error(e)] if e.err_code == 10208),
            "{replies:?}"
        );
        assert_eq!(b.timed_out_batches(), 1);
        assert_eq!(b.stored().len(), 3);
    }

    #[test]
    fn a_leader_change_loses_the_messages_in_flight_and_resets_the_cursor() {
        let clock = FakeClock::new();
        let faults = FastFaults::none().at(2, FastFault::LeaderChange { lost: 2 });
        let mut b = FastBroker::new(FastBrokerConfig::default(), faults);
        for (seq, op) in [
            (1, BatchOp::Start),
            (2, BatchOp::Append),
            (3, BatchOp::Append),
        ] {
            b.receive(
                publish("a", seq, op, Some(&format!("a{seq}")), 500),
                clock.now(),
            );
        }
        b.receive(
            publish("a", 4, BatchOp::Append, Some("a4"), 500),
            clock.now(),
        );
        b.receive(
            publish("a", 5, BatchOp::Append, Some("a5"), 500),
            clock.now(),
        );
        assert_eq!(
            drain(&mut b, &clock),
            vec![
                flow(0, 500),
                flow(2, 500),
                ServerReply::Gap {
                    expected: 3,
                    seq: 5
                },
                committed(2, "a", 2),
            ]
        );
        assert_eq!(b.stored().len(), 2);
    }

    #[test]
    fn a_429_refuses_one_message_and_the_next_shows_the_gap() {
        let clock = FakeClock::new();
        let faults = FastFaults::none().at(1, FastFault::Overloaded);
        let mut b = FastBroker::new(FastBrokerConfig::default(), faults);
        b.receive(
            publish("a", 1, BatchOp::Start, Some("a1"), 500),
            clock.now(),
        );
        b.receive(
            publish("a", 2, BatchOp::Append, Some("a2"), 500),
            clock.now(),
        );
        b.receive(
            publish("a", 3, BatchOp::Append, Some("a3"), 500),
            clock.now(),
        );
        let replies = drain(&mut b, &clock);
        assert!(matches!(&replies[1], ServerReply::Error(e) if e.code == 429));
        assert_eq!(replies[3], committed(1, "a", 1));
        assert_eq!(b.stored().len(), 1);
    }

    #[test]
    fn a_failed_check_ends_the_batch_before_the_message() {
        let clock = FakeClock::new();
        let faults = FastFaults::none()
            .at(0, FastFault::Terminal { code: 10054 })
            .at(3, FastFault::Terminal { code: 10054 });
        let mut b = FastBroker::new(FastBrokerConfig::default(), faults);
        b.receive(
            publish("a", 1, BatchOp::Start, Some("a1"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 1, BatchOp::Start, Some("b1"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 2, BatchOp::Append, Some("b2"), 500),
            clock.now(),
        );
        b.receive(
            publish("b", 3, BatchOp::Append, Some("b3"), 500),
            clock.now(),
        );
        let replies = drain(&mut b, &clock);
        assert!(matches!(&replies[1], ServerReply::Error(e) if e.err_code == 10054));
        assert!(matches!(&replies[3], ServerReply::Err { seq: 3, .. }));
        assert_eq!(replies[4], committed(2, "b", 2));
    }
}
