//! The fast-batch half of the driver's delivery: the lanes ([`sink_core::lane::Lane`]), which
//! ordering key goes to which, their reply-subject prefixes, and the bytes of their publishes and
//! replies. The lanes decide; this routes and translates.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use std::time::Instant;

use async_nats::HeaderMap;
use bytes::Bytes;
use sink_core::breaker::{BreakerConfig, BreakerState};
use sink_core::fastbatch::{decode_reply, BatchAnswer, ReplySubject, SUFFIX};
use sink_core::lane::{Lane, LaneConfig, LaneConfigError, LaneOutput, LaneTransmit, Payload};
use sink_core::outbox::{Abandoned, EventSeq, Failure, Message, Refused};

use crate::classify::{classify, classify_api_error, Verdict};
use crate::config::{OrderingKey, SinkConfig, StreamPolicy};
use crate::wire::base_headers;

/// The longest a lane waits for an expected answer before it pings (then gives the batch up one
/// more such wait later). The sink's `ack_timeout` applies when it is shorter: an open batch must
/// be answered well within the server's 10 s batch timeout, so a lane never waits longer.
pub(crate) const LANE_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Lanes made by this process, so two lanes never share a batch id even with the same seed.
static LANES: AtomicU32 = AtomicU32::new(0);

/// A lane, the prefix of its reply subjects, and what its publishes need from the config.
pub(crate) struct LaneEngine {
    lane: Lane,
    /// `<driver inbox>.b<tag>`: replies arrive on `<prefix>.<batch>.<flow>.<gap>.<seq>.<op>.$FI`,
    /// under the driver's one wildcard subscription.
    prefix: String,
    /// `Nats-Expected-Stream` for the first message of each batch (a batch lives in one stream:
    /// a later message reaching another stream is an unknown batch there).
    expected_stream: Option<String>,
}

impl LaneEngine {
    /// A lane for a sink with `config`, replying under `inbox`.
    pub(crate) fn new(config: &SinkConfig, inbox: &str) -> Result<Self, LaneConfigError> {
        let tag = LANES.fetch_add(1, Ordering::Relaxed);
        let lane = Lane::new(LaneConfig {
            max_events: config.max_events,
            max_bytes: config.max_bytes,
            ack_timeout: config.ack_timeout.min(LANE_ACK_TIMEOUT),
            retry: config.retry.clone(),
            breaker: BreakerConfig {
                failures_to_open: 1,
                reconnect: config.reconnect.clone(),
            },
            when_breaker_open: config.when_breaker_open,
            id_seed: random_seed(),
            lane_tag: tag,
            ..LaneConfig::default()
        })?;
        Ok(Self {
            lane,
            prefix: format!("{inbox}.b{tag}"),
            expected_stream: (config.stream_policy != StreamPolicy::Off)
                .then(|| config.stream.clone()),
        })
    }

    pub(crate) fn lane_mut(&mut self) -> &mut Lane {
        &mut self.lane
    }

    /// Subject, reply subject, headers and body of one transmission; `None` when the event is no
    /// longer held.
    pub(crate) fn publish_parts(
        &self,
        t: &LaneTransmit,
    ) -> Option<(String, String, HeaderMap, Bytes)> {
        let reply = t.reply.format(&self.prefix);
        match &t.payload {
            Payload::Event(seq) => {
                let msg = self.lane.message(*seq)?;
                let expected = (t.reply.seq == 1)
                    .then_some(self.expected_stream.as_deref())
                    .flatten();
                Some((
                    msg.subject.clone(),
                    reply,
                    base_headers(msg, expected),
                    msg.body.clone(),
                ))
            }
            Payload::Control { subject } => {
                Some((subject.clone(), reply, HeaderMap::new(), Bytes::new()))
            }
        }
    }
}

/// The lanes of one sink. With [`OrderingKey::Sink`] there is one, holding every event. With a
/// tenant or subject key there are up to [`SinkConfig::lanes`], opened as keys arrive: a key
/// stays on its lane while that lane holds any of its events (so its order is the lane's), and is
/// free to move once the lane has emptied. A new key takes an empty lane, else opens one while
/// under the bound, else shares the least loaded. A lane with nothing to send commits its batch,
/// so an idle lane holds nothing on the server.
pub(crate) struct LaneSet {
    lanes: Vec<LaneEngine>,
    max_lanes: usize,
    /// The lane of each key with events held (more than one lane allowed only).
    keys: HashMap<String, usize>,
    /// The lane of each held event (more than one lane allowed only).
    owner: HashMap<EventSeq, usize>,
    /// The next event's sequence, across lanes (increasing, as the driver's waiters need).
    next_seq: EventSeq,
    /// Where the next poll starts, so every lane gets its turn.
    cursor: usize,
    config: SinkConfig,
    inbox: String,
}

impl LaneSet {
    /// The lanes of a sink with `config`, replying under `inbox` (one lane opened now).
    pub(crate) fn new(config: &SinkConfig, inbox: &str) -> Result<Self, LaneConfigError> {
        let max_lanes = match config.ordering_key {
            OrderingKey::Sink => 1,
            OrderingKey::Tenant | OrderingKey::Subject => config.lanes.max(1),
        };
        Ok(Self {
            lanes: vec![LaneEngine::new(config, inbox)?],
            max_lanes,
            keys: HashMap::new(),
            owner: HashMap::new(),
            next_seq: 1,
            cursor: 0,
            config: config.clone(),
            inbox: inbox.to_owned(),
        })
    }

    pub(crate) fn lane_mut(&mut self, i: usize) -> Option<&mut LaneEngine> {
        self.lanes.get_mut(i)
    }

    /// Lanes open now.
    pub(crate) fn open(&self) -> usize {
        self.lanes.len()
    }

    fn single(&self) -> bool {
        self.max_lanes == 1
    }

    pub(crate) fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.lane.len()).sum()
    }

    /// Whether an event of `size` bytes fits now: the sink's bound counts every lane's events
    /// (a lane's own bound, its bytes included, is checked again when the event is pushed).
    pub(crate) fn has_room(&self, size: usize) -> bool {
        self.len() < self.config.max_events && self.lanes.iter().all(|l| l.lane.has_room(size))
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.lanes.iter().map(|l| l.lane.in_flight()).sum()
    }

    pub(crate) fn window(&self) -> usize {
        self.lanes.iter().map(|l| l.lane.window()).sum()
    }

    /// The most troubled lane's breaker: open if any is, else half-open if any is.
    pub(crate) fn breaker(&self) -> BreakerState {
        let rank = |s: &BreakerState| match s {
            BreakerState::Closed { .. } => 0,
            BreakerState::HalfOpen { .. } => 1,
            BreakerState::Open { .. } => 2,
        };
        self.lanes
            .iter()
            .map(|l| l.lane.breaker())
            .max_by_key(rank)
            .expect("a set has at least one lane")
    }

    fn lane_of(&self, seq: EventSeq) -> Option<usize> {
        if self.single() {
            Some(0)
        } else {
            self.owner.get(&seq).copied()
        }
    }

    pub(crate) fn message(&self, seq: EventSeq) -> Option<&Message> {
        self.lanes[self.lane_of(seq)?].lane.message(seq)
    }

    /// The lane for an event of `key` (see the type's docs); opens one when that is the choice.
    fn lane_for(&mut self, key: &str) -> usize {
        if let Some(&i) = self.keys.get(key) {
            return i;
        }
        let i = match self.lanes.iter().position(|l| l.lane.is_empty()) {
            Some(i) => i,
            None if self.lanes.len() < self.max_lanes => {
                let lane = LaneEngine::new(&self.config, &self.inbox)
                    .expect("the first lane was made from the same settings");
                self.lanes.push(lane);
                self.lanes.len() - 1
            }
            None => (0..self.lanes.len())
                .min_by_key(|&i| self.lanes[i].lane.len())
                .expect("a set has at least one lane"),
        };
        self.keys.insert(key.to_owned(), i);
        i
    }

    pub(crate) fn push(
        &mut self,
        message: Message,
        unix_ms: u64,
        now: Instant,
    ) -> Result<EventSeq, Refused> {
        let seq = self.next_seq;
        self.adopt(
            Abandoned {
                seq,
                message,
                unix_ms,
                transmitted: false,
            },
            now,
        )
    }

    /// Takes an event with its sequence (above every one held), on its key's lane.
    pub(crate) fn adopt(&mut self, moved: Abandoned, now: Instant) -> Result<EventSeq, Refused> {
        if self.single() {
            let seq = self.lanes[0].lane.adopt(moved, now)?;
            self.next_seq = seq + 1;
            return Ok(seq);
        }
        let i = self.lane_for(&moved.message.key);
        let seq = self.lanes[i].lane.adopt(moved, now)?;
        self.next_seq = seq + 1;
        self.owner.insert(seq, i);
        Ok(seq)
    }

    /// The next output of any lane, with the lane's index. Without `now`, events only (no
    /// transmission starts; see [`Lane::poll_event`]).
    pub(crate) fn poll(&mut self, now: Option<Instant>) -> Option<(usize, LaneOutput)> {
        let n = self.lanes.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let lane = &mut self.lanes[i].lane;
            let out = match now {
                Some(now) => lane.poll_output(now),
                None => lane.poll_event(),
            };
            let Some(out) = out else { continue };
            self.cursor = i;
            if let LaneOutput::Delivered { seq, .. } | LaneOutput::Rejected { seq, .. } = &out {
                self.settled(i, *seq);
            }
            return Some((i, out));
        }
        // Everyone had a turn with nothing to do: start with the next lane next time.
        self.cursor = (self.cursor + 1) % n;
        None
    }

    /// An event of lane `i` left it: forget where it was, and free the lane's keys once it is empty.
    fn settled(&mut self, i: usize, seq: EventSeq) {
        if self.single() {
            return;
        }
        self.owner.remove(&seq);
        if self.lanes[i].lane.is_empty() {
            self.keys.retain(|_, lane| *lane != i);
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|l| l.lane.poll_timeout())
            .min()
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        for l in &mut self.lanes {
            if l.lane.poll_timeout().is_some_and(|t| now >= t) {
                l.lane.handle_timeout(now);
            }
        }
    }

    pub(crate) fn handle_connection_lost(&mut self, now: Instant) {
        for l in &mut self.lanes {
            l.lane.handle_connection_lost(now);
        }
    }

    pub(crate) fn handle_reconnected(&mut self, now: Instant) {
        for l in &mut self.lanes {
            l.lane.handle_reconnected(now);
        }
    }

    /// Everything held, in sequence order, for another machine to adopt.
    pub(crate) fn abandon(&mut self) -> Vec<Abandoned> {
        let mut all: Vec<Abandoned> = self
            .lanes
            .iter_mut()
            .flat_map(|l| l.lane.abandon())
            .collect();
        all.sort_by_key(|a| a.seq);
        self.keys.clear();
        self.owner.clear();
        all
    }

    /// The lane a reply subject belongs to, with the batch state it names.
    pub(crate) fn parse_reply_to(&self, subject: &str) -> Option<(usize, ReplySubject)> {
        if !subject.ends_with(SUFFIX) {
            return None;
        }
        let (prefix, reply) = ReplySubject::parse(subject).ok()?;
        let i = self.lanes.iter().position(|l| l.prefix == prefix)?;
        Some((i, reply))
    }
}

/// What a reply to a fast-batch publish means to the lane: a status-only reply (503 no
/// responders, 429) refuses that publish; a body is one of the server's batch replies, its
/// JetStream errors classified as for per-event publishes.
pub(crate) fn batch_answer(
    status: Option<u16>,
    description: Option<&str>,
    body: &[u8],
) -> BatchAnswer {
    if status.is_some_and(|code| code >= 300) || body.is_empty() {
        return match classify(status, description, body) {
            Verdict::Fail(failure) => BatchAnswer::Refused(failure),
            Verdict::Ack(_) => BatchAnswer::Refused(Failure::Retryable {
                reason: "unexpected per-event ack to a fast-batch publish".into(),
            }),
        };
    }
    match decode_reply(body) {
        Ok(reply) => reply.into_answer(|e| classify_api_error(e.code, e.err_code, &e.description)),
        Err(e) => BatchAnswer::Refused(Failure::Retryable {
            reason: e.to_string(),
        }),
    }
}

/// A seed for batch ids, fresh per lane: the standard library's per-process random hash keys,
/// mixed with the wall clock and the process id so two processes started together differ.
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::clock::unix_ms());
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_no_responders_status_refuses_the_publish_as_retryable() {
        let answer = batch_answer(Some(503), None, b"");
        assert!(
            matches!(answer, BatchAnswer::Refused(Failure::Retryable { .. })),
            "{answer:?}"
        );
    }

    #[test]
    fn flow_acks_and_unknown_batches_decode() {
        assert_eq!(
            batch_answer(None, None, br#"{"type":"ack","seq":20,"msgs":10}"#),
            BatchAnswer::Flow { seq: 20, msgs: 10 }
        );
        let unknown = br#"{"error":{"code":400,"err_code":10208,"description":"batch publish unknown batch ID"}}"#;
        assert_eq!(batch_answer(None, None, unknown), BatchAnswer::UnknownBatch);
    }

    #[test]
    fn reply_subjects_of_another_sink_are_not_ours() {
        let config = SinkConfig::default();
        let a = LaneSet::new(&config, "_INBOX.x").expect("valid");
        let b = LaneSet::new(&config, "_INBOX.y").expect("valid");
        let subject = format!("{}.abc.500.fail.1.0.$FI", a.lanes[0].prefix);
        assert_eq!(a.parse_reply_to(&subject).map(|(i, _)| i), Some(0));
        assert!(b.parse_reply_to(&subject).is_none());
        assert!(a.parse_reply_to("_INBOX.x.12.1").is_none());
    }

    fn message(key: &str, i: usize) -> Message {
        Message {
            subject: format!("t.{key}"),
            msg_id: sink_core::event::MsgId::from_raw(format!("{key}-{i}")),
            headers: Vec::new(),
            body: Bytes::from_static(b"{}"),
            key: key.to_owned(),
        }
    }

    #[test]
    fn keys_keep_their_lane_while_it_holds_their_events_and_lanes_are_bounded() {
        let config = SinkConfig {
            ordering_key: OrderingKey::Tenant,
            lanes: 2,
            ..SinkConfig::default()
        };
        let mut set = LaneSet::new(&config, "_INBOX.z").expect("valid");
        let now = crate::clock::now();
        let a1 = set.push(message("a", 1), 0, now).expect("room");
        let b1 = set.push(message("b", 1), 0, now).expect("room");
        let c1 = set.push(message("c", 1), 0, now).expect("room");
        let a2 = set.push(message("a", 2), 0, now).expect("room");
        assert_eq!(
            (a1, b1, c1, a2),
            (1, 2, 3, 4),
            "sequences increase across lanes"
        );
        assert_eq!(set.lanes.len(), 2, "bounded");
        assert_eq!(set.lane_of(a1), set.lane_of(a2), "a key stays on its lane");
        assert_ne!(
            set.lane_of(a1),
            set.lane_of(b1),
            "a second key opens a lane"
        );
        assert_eq!(set.len(), 4);
        assert_eq!(set.message(c1).map(|m| m.key.as_str()), Some("c"));
        let back: Vec<EventSeq> = set.abandon().iter().map(|a| a.seq).collect();
        assert_eq!(back, vec![1, 2, 3, 4], "handed back in sequence order");
    }
}
