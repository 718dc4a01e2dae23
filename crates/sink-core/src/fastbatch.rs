//! Fast-batch wire vocabulary (nats-server 2.14+, ADR-50 "fast ingest"): the reply subject that carries a batch's state, and the decoded forms of the server's replies.
//!
//! A fast batch has no batch headers: its state travels in the reply subject of every publish,
//! `<prefix>.<batchId>.<flow>.<gap>.<seq>.<op>.$FI` ([`ReplySubject`]). The server answers on that
//! same subject with a flow ack `{"type":"ack","seq":S,"msgs":N}`, a gap notice, a per-message
//! error, the final PubAck with `count`, or an ordinary PubAck error ([`ServerReply`]).
//!
//! Where the bytes are handled: the adapter only moves them. It formats the subject with
//! [`ReplySubject::format`], and for each reply hands the subject it arrived on to
//! [`ReplySubject::parse`] and the body to [`decode_reply`]. JSON decoding lives here, not in the
//! adapter, because the shapes are protocol facts the core's tests pin down (and the scripted broker
//! speaks the same JSON); the core already depends on serde_json. What the core does *not* decide
//! is how an arbitrary JetStream error code is classified (retryable or terminal): the adapter passes
//! its classifier to [`ServerReply::into_answer`]. The codes that drive the batch protocol itself
//! (10205, 10208, 10211) are recognised here.
//!
//! The parser follows the server's `getFastBatch` (`server/stream.go`): it reads from the end, the
//! op must be 0-4, the sequence must not be 0 or `u64::MAX`, a start carries sequence 1, an append
//! more than 1, an end-of-batch commit more than 1, and a flow that is not a positive number is read
//! as 10 (more than 65535 as 65535).

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::outbox::{Failure, Rejection};

/// The suffix token that marks a fast-batch reply subject.
pub const SUFFIX: &str = "$FI";

/// Longest batch id the server accepts (longer ids get error 10207).
pub const MAX_BATCH_ID_LEN: usize = 64;

/// The flow the server assumes when the subject's flow is not a positive number.
pub const DEFAULT_FLOW: u16 = 10;

/// JetStream error: batch publish is not enabled on the stream (`allow_batched` is off).
pub const ERR_BATCH_DISABLED: u16 = 10205;
/// JetStream error: malformed fast-batch reply subject.
pub const ERR_INVALID_PATTERN: u16 = 10206;
/// JetStream error: batch id longer than 64 characters.
pub const ERR_INVALID_BATCH_ID: u16 = 10207;
/// JetStream error: unknown batch id (timed out, dropped by a restart, or already ended).
pub const ERR_UNKNOWN_BATCH: u16 = 10208;
/// JetStream error: too many batches in flight (per stream or per server), a 429.
pub const ERR_TOO_MANY_BATCHES: u16 = 10211;

/// A batch id: 1 to 64 characters, one NATS subject token (no `.`, `*`, `>`, whitespace or
/// control characters). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(Arc<str>);

impl BatchId {
    /// Checks and wraps `id`.
    pub fn new(id: &str) -> Result<Self, WireError> {
        if id.is_empty() {
            return Err(WireError::EmptyBatchId);
        }
        if id.len() > MAX_BATCH_ID_LEN {
            return Err(WireError::BatchIdTooLong { len: id.len() });
        }
        if let Some(c) = id
            .chars()
            .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
        {
            return Err(WireError::BatchIdNotAToken { found: c });
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id of batch number `counter` of lane `lane` in the process whose random seed is `seed`:
    /// `<16 hex digits from the seed>-<lane>-<counter>` (at most 16 + 1 + 10 + 1 + 13 = 41
    /// characters). Unique per lane (counter) and process (lane); across processes and restarts as
    /// long as each process passes a fresh random seed.
    pub fn generate(seed: u64, lane: u32, counter: u64) -> Self {
        let id = format!("{:016x}-{lane}-{counter:x}", splitmix64(seed));
        Self(Arc::from(id.as_str()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the server does when a message's sequence is not the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapMode {
    /// `fail`: nothing after a gap is stored; the batch commits at the last good sequence. The
    /// only mode that keeps order, and the only one the lane uses.
    Fail,
    /// `ok`: the gap is reported and the batch goes on.
    Ok,
}

impl GapMode {
    fn token(self) -> &'static str {
        match self {
            GapMode::Fail => "fail",
            GapMode::Ok => "ok",
        }
    }
}

/// The operation of one fast-batch publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    /// 0: the first message (sequence 1); the server answers with a flow ack for sequence 0.
    Start,
    /// 1: a message after the first.
    Append,
    /// 2: store this message and commit the batch; answered by the final PubAck.
    Commit,
    /// 3: commit without storing this message (end of batch, sequence > 1).
    CommitEob,
    /// 4: ping: re-sends the last flow ack, or reports a gap if the sequence is ahead of the
    /// server's; resets the server's idle timer.
    Ping,
}

impl BatchOp {
    /// The op's number on the wire.
    pub fn code(self) -> u8 {
        match self {
            BatchOp::Start => 0,
            BatchOp::Append => 1,
            BatchOp::Commit => 2,
            BatchOp::CommitEob => 3,
            BatchOp::Ping => 4,
        }
    }

    fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => BatchOp::Start,
            1 => BatchOp::Append,
            2 => BatchOp::Commit,
            3 => BatchOp::CommitEob,
            4 => BatchOp::Ping,
            _ => return None,
        })
    }

    /// Whether a publish with this op carries a message to store.
    pub fn carries_message(self) -> bool {
        matches!(self, BatchOp::Start | BatchOp::Append | BatchOp::Commit)
    }
}

/// The batch state in a reply subject, without the inbox prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplySubject {
    /// The batch.
    pub batch_id: BatchId,
    /// The largest ack interval the client allows (the server acks every `min(flow, its target)`).
    pub flow: u16,
    /// The gap mode.
    pub gap: GapMode,
    /// The batch sequence of this publish (for a ping: the last one sent; for an end-of-batch
    /// commit: one past the last message).
    pub seq: u64,
    /// The operation.
    pub op: BatchOp,
}

impl ReplySubject {
    /// `<prefix>.<batchId>.<flow>.<gap>.<seq>.<op>.$FI`.
    pub fn format(&self, prefix: &str) -> String {
        let mut out = String::with_capacity(prefix.len() + self.batch_id.as_str().len() + 40);
        self.write(prefix, &mut out);
        out
    }

    /// Appends the subject to `out` (for a caller that reuses one buffer).
    pub fn write(&self, prefix: &str, out: &mut String) {
        use fmt::Write as _;
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "{prefix}.{}.{}.{}.{}.{}.{SUFFIX}",
            self.batch_id,
            self.flow,
            self.gap.token(),
            self.seq,
            self.op.code()
        );
    }

    /// Reads a reply subject the way the server does; returns the prefix and the batch state.
    pub fn parse(subject: &str) -> Result<(&str, ReplySubject), WireError> {
        let malformed = |why: &'static str| WireError::Malformed { why };
        let rest = subject
            .strip_suffix(SUFFIX)
            .and_then(|r| r.strip_suffix('.'))
            .ok_or(WireError::NotFastBatch)?;
        let (rest, op) = rest.rsplit_once('.').ok_or(malformed("no op token"))?;
        let op = BatchOp::from_code(parse_i64(op)).ok_or(malformed("op is not 0-4"))?;
        let (rest, seq) = rest
            .rsplit_once('.')
            .ok_or(malformed("no sequence token"))?;
        let seq = match parse_u64(seq) {
            Some(s) if s != 0 && s != u64::MAX => s,
            _ => return Err(malformed("sequence is not a number in 1..u64::MAX")),
        };
        match op {
            BatchOp::CommitEob if seq == 1 => {
                return Err(malformed("end-of-batch commit at sequence 1"))
            }
            BatchOp::Start if seq != 1 => {
                return Err(malformed("start at a sequence other than 1"))
            }
            BatchOp::Append if seq <= 1 => return Err(malformed("append at sequence 1")),
            _ => {}
        }
        let (rest, gap) = rest.rsplit_once('.').ok_or(malformed("no gap token"))?;
        let gap = match gap {
            "fail" => GapMode::Fail,
            "ok" => GapMode::Ok,
            _ => return Err(malformed("gap mode is neither ok nor fail")),
        };
        let (rest, flow) = rest.rsplit_once('.').ok_or(malformed("no flow token"))?;
        let flow = match parse_i64(flow) {
            f if f <= 0 => DEFAULT_FLOW,
            f => u16::try_from(f).unwrap_or(u16::MAX),
        };
        let (prefix, id) = rest.rsplit_once('.').ok_or(malformed("no prefix"))?;
        let batch_id = BatchId::new(id)?;
        Ok((
            prefix,
            ReplySubject {
                batch_id,
                flow,
                gap,
                seq,
                op,
            },
        ))
    }
}

/// The server's `parseInt64`: digits only, else -1.
fn parse_i64(s: &str) -> i64 {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return -1;
    }
    s.parse().unwrap_or(i64::MAX)
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A subject or reply the fast-batch vocabulary cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The subject does not end in `.$FI`.
    #[error("subject does not end in .$FI; it is not a fast-batch reply subject")]
    NotFastBatch,
    /// The subject ends in `.$FI` but does not follow the pattern (the server answers 10206).
    #[error("malformed fast-batch reply subject ({why}); expected <prefix>.<batchId>.<flow>.<ok|fail>.<seq>.<op>.$FI")]
    Malformed {
        /// What is wrong.
        why: &'static str,
    },
    /// An empty batch id.
    #[error("batch id is empty; use 1 to 64 token characters")]
    EmptyBatchId,
    /// A batch id over 64 characters (the server answers 10207).
    #[error("batch id is {len} characters; the server accepts at most 64")]
    BatchIdTooLong {
        /// Its length.
        len: usize,
    },
    /// A batch id that is not one subject token.
    #[error("batch id contains {found:?}; a batch id is one subject token (no '.', '*', '>', whitespace)")]
    BatchIdNotAToken {
        /// The offending character.
        found: char,
    },
    /// A reply body that is not one of the server's fast-batch replies.
    #[error("fast-batch reply is not valid: {reason}")]
    BadReply {
        /// What failed to decode.
        reason: String,
    },
}

/// A JetStream API error as the server sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    /// The HTTP-like status (400, 404, 429, 503, ...).
    pub code: u16,
    /// The JetStream error code (10208, ...); 0 when absent.
    #[serde(default)]
    pub err_code: u16,
    /// The server's text.
    #[serde(default)]
    pub description: String,
}

/// One reply from the server to a fast-batch publish, decoded but not yet classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerReply {
    /// `{"type":"ack","seq":S,"msgs":N}`: in `fail` mode every message up to `seq` is persisted;
    /// acks come every `msgs` messages from now on.
    Flow {
        /// Persisted up to here (batch sequence).
        seq: u64,
        /// The ack interval in force.
        msgs: u16,
    },
    /// `{"type":"gap","last_seq":E,"seq":C}`: messages from `expected` up to (not including)
    /// `seq` never arrived.
    Gap {
        /// The sequence the server expected.
        expected: u64,
        /// The sequence that arrived.
        seq: u64,
    },
    /// `{"type":"err","seq":S,"error":{..}}`: message `seq` failed a check and was not stored.
    Err {
        /// The failed message's batch sequence.
        seq: u64,
        /// Why.
        error: ApiError,
    },
    /// A PubAck: the final one of a batch carries `batch` and `count` (the last persisted batch
    /// sequence); `seq` is the stream sequence of the last message the batch stored.
    PubAck {
        /// The stream.
        stream: String,
        /// A stream sequence.
        seq: u64,
        /// The batch id, on a batch's final PubAck.
        batch: Option<String>,
        /// The last persisted batch sequence, on a batch's final PubAck.
        count: Option<u64>,
        /// The message was a duplicate.
        duplicate: bool,
    },
    /// An ordinary PubAck error (`{"error":{..}}`), e.g. 10208 unknown batch.
    Error(ApiError),
}

#[derive(Deserialize)]
struct RawReply {
    #[serde(rename = "type")]
    kind: Option<String>,
    seq: Option<u64>,
    msgs: Option<u16>,
    last_seq: Option<u64>,
    error: Option<ApiError>,
    stream: Option<String>,
    batch: Option<String>,
    count: Option<u64>,
    #[serde(default)]
    duplicate: bool,
}

/// Decodes one reply body.
pub fn decode_reply(body: &[u8]) -> Result<ServerReply, WireError> {
    let raw: RawReply = serde_json::from_slice(body).map_err(|e| WireError::BadReply {
        reason: e.to_string(),
    })?;
    let missing = |field: &str, kind: &str| WireError::BadReply {
        reason: format!("{kind} reply without {field:?}"),
    };
    match raw.kind.as_deref() {
        Some("ack") => Ok(ServerReply::Flow {
            seq: raw.seq.ok_or_else(|| missing("seq", "ack"))?,
            msgs: raw.msgs.ok_or_else(|| missing("msgs", "ack"))?,
        }),
        Some("gap") => Ok(ServerReply::Gap {
            expected: raw.last_seq.ok_or_else(|| missing("last_seq", "gap"))?,
            seq: raw.seq.ok_or_else(|| missing("seq", "gap"))?,
        }),
        Some("err") => Ok(ServerReply::Err {
            seq: raw.seq.ok_or_else(|| missing("seq", "err"))?,
            error: raw.error.ok_or_else(|| missing("error", "err"))?,
        }),
        Some(other) => Err(WireError::BadReply {
            reason: format!("unknown reply type {other:?}"),
        }),
        None => match raw.error {
            Some(error) => Ok(ServerReply::Error(error)),
            None => Ok(ServerReply::PubAck {
                stream: raw.stream.ok_or_else(|| missing("stream", "PubAck"))?,
                seq: raw.seq.unwrap_or(0),
                batch: raw.batch,
                count: raw.count,
                duplicate: raw.duplicate,
            }),
        },
    }
}

/// A reply as the lane machine takes it: the protocol's codes recognised, every other error
/// classified by the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchAnswer {
    /// Everything up to `seq` is persisted; acks come every `msgs` messages.
    Flow {
        /// Persisted up to here.
        seq: u64,
        /// The ack interval.
        msgs: u16,
    },
    /// A gap: in `fail` mode the batch ends and its final PubAck follows.
    Gap {
        /// The sequence the server expected.
        expected: u64,
        /// The sequence that arrived.
        seq: u64,
    },
    /// Message `seq` failed a check and was not stored; the batch ends at `seq - 1`, PubAck follows.
    Err {
        /// The failed message.
        seq: u64,
        /// The adapter's classification of the error.
        failure: Failure,
    },
    /// The final PubAck: the batch ended with everything up to `count` persisted.
    Committed {
        /// The stream.
        stream: String,
        /// Stream sequence of the last message the batch stored.
        stream_seq: u64,
        /// The last persisted batch sequence.
        count: u64,
    },
    /// 10208: the server does not know the batch (idle timeout, restart, or it already ended).
    UnknownBatch,
    /// 10205: the stream does not allow batch publishing.
    Disabled(Rejection),
    /// Any other refusal of one publish (an ordinary PubAck error, 503, 429, 10211): that message
    /// was not stored.
    Refused(Failure),
}

impl ServerReply {
    /// Classifies the reply: 10208, 10205 and 10211 here, every other error with `classify`
    /// (the adapter's mapping of JetStream errors to retryable / terminal).
    pub fn into_answer(self, classify: impl FnOnce(&ApiError) -> Failure) -> BatchAnswer {
        match self {
            ServerReply::Flow { seq, msgs } => BatchAnswer::Flow { seq, msgs },
            ServerReply::Gap { expected, seq } => BatchAnswer::Gap { expected, seq },
            ServerReply::Err { seq, error } => BatchAnswer::Err {
                seq,
                failure: classify(&error),
            },
            ServerReply::PubAck {
                stream,
                seq,
                count: Some(count),
                ..
            } => BatchAnswer::Committed {
                stream,
                stream_seq: seq,
                count,
            },
            ServerReply::PubAck { .. } => BatchAnswer::Refused(Failure::Retryable {
                reason: "PubAck without a batch count: not a fast-batch answer".into(),
            }),
            ServerReply::Error(e) => match e.err_code {
                ERR_UNKNOWN_BATCH => BatchAnswer::UnknownBatch,
                ERR_BATCH_DISABLED => BatchAnswer::Disabled(Rejection {
                    code: Some(e.err_code),
                    reason: e.description,
                }),
                ERR_TOO_MANY_BATCHES => BatchAnswer::Refused(Failure::Overloaded {
                    reason: format!("{} (error {})", e.description, e.err_code),
                }),
                _ if e.code == 429 => BatchAnswer::Refused(Failure::Overloaded {
                    reason: e.description,
                }),
                _ => BatchAnswer::Refused(classify(&e)),
            },
        }
    }
}

/// SplitMix64's output function: spreads a seed over all 64 bits.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> BatchId {
        BatchId::new(s).expect("valid id")
    }

    #[test]
    fn subjects_format_and_parse_back() {
        let table: [(ReplySubject, &str); 5] = [
            (
                ReplySubject {
                    batch_id: id("b1"),
                    flow: 500,
                    gap: GapMode::Fail,
                    seq: 1,
                    op: BatchOp::Start,
                },
                "_INBOX.x.b1.500.fail.1.0.$FI",
            ),
            (
                ReplySubject {
                    batch_id: id("b1"),
                    flow: 500,
                    gap: GapMode::Fail,
                    seq: 2,
                    op: BatchOp::Append,
                },
                "_INBOX.x.b1.500.fail.2.1.$FI",
            ),
            (
                ReplySubject {
                    batch_id: id("b-2"),
                    flow: 1,
                    gap: GapMode::Ok,
                    seq: 1,
                    op: BatchOp::Commit,
                },
                "_INBOX.x.b-2.1.ok.1.2.$FI",
            ),
            (
                ReplySubject {
                    batch_id: id("b1"),
                    flow: 65535,
                    gap: GapMode::Fail,
                    seq: 7,
                    op: BatchOp::CommitEob,
                },
                "_INBOX.x.b1.65535.fail.7.3.$FI",
            ),
            (
                ReplySubject {
                    batch_id: id("b1"),
                    flow: 10,
                    gap: GapMode::Fail,
                    seq: 1,
                    op: BatchOp::Ping,
                },
                "_INBOX.x.b1.10.fail.1.4.$FI",
            ),
        ];
        for (subject, text) in table {
            assert_eq!(subject.format("_INBOX.x"), text);
            assert_eq!(
                ReplySubject::parse(text),
                Ok(("_INBOX.x", subject)),
                "{text}"
            );
        }
    }

    #[test]
    fn parser_reads_flow_like_the_server() {
        let table = [
            ("p.b.0.fail.1.0.$FI", 10),
            ("p.b.-5.fail.1.0.$FI", 10),
            ("p.b.abc.fail.1.0.$FI", 10),
            ("p.b..fail.1.0.$FI", 10),
            ("p.b.70000.fail.1.0.$FI", 65535),
            ("p.b.99999999999999999999.fail.1.0.$FI", 65535),
            ("p.b.3.fail.1.0.$FI", 3),
        ];
        for (text, flow) in table {
            let (_, s) = ReplySubject::parse(text).expect(text);
            assert_eq!(s.flow, flow, "{text}");
        }
    }

    #[test]
    fn parser_refuses_what_the_server_refuses() {
        let malformed = [
            "p.b.10.fail.1.5.$FI",                    // op out of range
            "p.b.10.fail.1.x.$FI",                    // op not a number
            "p.b.10.fail.0.1.$FI",                    // seq 0
            "p.b.10.fail.18446744073709551615.1.$FI", // seq u64::MAX
            "p.b.10.fail.2.0.$FI",                    // start not at 1
            "p.b.10.fail.1.1.$FI",                    // append at 1
            "p.b.10.fail.1.3.$FI",                    // EOB at 1
            "p.b.10.maybe.2.1.$FI",                   // gap mode
            "b.10.fail.1.0.$FI",                      // no prefix
            "10.fail.1.0.$FI",                        // too few tokens
        ];
        for text in malformed {
            assert!(
                matches!(ReplySubject::parse(text), Err(WireError::Malformed { .. })),
                "{text}: {:?}",
                ReplySubject::parse(text)
            );
        }
        assert_eq!(
            ReplySubject::parse("p.b.10.fail.1.0"),
            Err(WireError::NotFastBatch)
        );
        assert_eq!(
            ReplySubject::parse(&format!("p.{}.10.fail.1.0.$FI", "x".repeat(65))),
            Err(WireError::BatchIdTooLong { len: 65 })
        );
    }

    #[test]
    fn batch_ids_are_tokens_of_at_most_64_chars_and_generated_ids_differ() {
        assert_eq!(BatchId::new(""), Err(WireError::EmptyBatchId));
        assert_eq!(
            BatchId::new("a.b"),
            Err(WireError::BatchIdNotAToken { found: '.' })
        );
        assert_eq!(
            BatchId::new("a b"),
            Err(WireError::BatchIdNotAToken { found: ' ' })
        );
        assert!(BatchId::new(&"x".repeat(64)).is_ok());
        let longest = BatchId::generate(u64::MAX, u32::MAX, u64::MAX);
        assert!(longest.as_str().len() <= MAX_BATCH_ID_LEN, "{longest}");
        assert!(BatchId::new(longest.as_str()).is_ok());
        let a = BatchId::generate(7, 0, 1);
        assert_ne!(a, BatchId::generate(7, 0, 2), "counter");
        assert_ne!(a, BatchId::generate(7, 1, 1), "lane");
        assert_ne!(a, BatchId::generate(8, 0, 1), "seed");
        assert_eq!(a, BatchId::generate(7, 0, 1), "deterministic");
    }

    #[test]
    fn replies_decode_from_the_servers_json() {
        let api = |code, err_code, d: &str| ApiError {
            code,
            err_code,
            description: d.into(),
        };
        let table: Vec<(&str, ServerReply)> = vec![
            (
                r#"{"type":"ack","seq":0,"msgs":500}"#,
                ServerReply::Flow { seq: 0, msgs: 500 },
            ),
            (
                r#"{"type":"gap","last_seq":5,"seq":7}"#,
                ServerReply::Gap {
                    expected: 5,
                    seq: 7,
                },
            ),
            (
                r#"{"type":"err","seq":4,"error":{"code":400,"err_code":10054,"description":"maximum messages exceeded"}}"#,
                ServerReply::Err {
                    seq: 4,
                    error: api(400, 10054, "maximum messages exceeded"),
                },
            ),
            (
                r#"{"stream":"EVENTS","seq":42,"batch":"b1","count":9}"#,
                ServerReply::PubAck {
                    stream: "EVENTS".into(),
                    seq: 42,
                    batch: Some("b1".into()),
                    count: Some(9),
                    duplicate: false,
                },
            ),
            (
                r#"{"stream":"EVENTS","seq":3,"duplicate": true,"batch":"b1","count":1}"#,
                ServerReply::PubAck {
                    stream: "EVENTS".into(),
                    seq: 3,
                    batch: Some("b1".into()),
                    count: Some(1),
                    duplicate: true,
                },
            ),
            (
                r#"{"stream":"EVENTS","seq":0,"error":{"code":404,"err_code":10208,"description":"batch publish ID unknown"}}"#,
                ServerReply::Error(api(404, 10208, "batch publish ID unknown")),
            ),
        ];
        for (json, reply) in table {
            assert_eq!(decode_reply(json.as_bytes()), Ok(reply), "{json}");
        }
        for bad in [
            "",
            "{",
            r#"{"type":"ack","seq":1}"#,
            r#"{"type":"nope"}"#,
            r#"{"seq":1}"#,
        ] {
            assert!(
                matches!(
                    decode_reply(bad.as_bytes()),
                    Err(WireError::BadReply { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn answers_recognise_the_protocol_codes_and_leave_the_rest_to_the_adapter() {
        let terminal = |e: &ApiError| {
            Failure::Terminal(Rejection {
                code: Some(e.err_code),
                reason: e.description.clone(),
            })
        };
        let err = |code, err_code| {
            ServerReply::Error(ApiError {
                code,
                err_code,
                description: "d".into(),
            })
        };
        assert_eq!(
            err(404, ERR_UNKNOWN_BATCH).into_answer(terminal),
            BatchAnswer::UnknownBatch
        );
        assert!(matches!(
            err(400, ERR_BATCH_DISABLED).into_answer(terminal),
            BatchAnswer::Disabled(Rejection {
                code: Some(10205),
                ..
            })
        ));
        assert!(matches!(
            err(429, ERR_TOO_MANY_BATCHES).into_answer(terminal),
            BatchAnswer::Refused(Failure::Overloaded { .. })
        ));
        assert!(matches!(
            err(429, 0).into_answer(terminal),
            BatchAnswer::Refused(Failure::Overloaded { .. })
        ));
        assert!(matches!(
            err(400, 10054).into_answer(terminal),
            BatchAnswer::Refused(Failure::Terminal(_))
        ));
        assert!(matches!(
            ServerReply::PubAck {
                stream: "S".into(),
                seq: 1,
                batch: None,
                count: None,
                duplicate: false
            }
            .into_answer(terminal),
            BatchAnswer::Refused(Failure::Retryable { .. })
        ));
    }
}
