//! Stream audit: read a whole JetStream stream back with an ordered consumer and compare it, event by
//! event, with what a sink reported (invariants I1-I4 of DESIGN.md), or summarise a stream alone.
//!
//! Reading is the only IO here ([`read_stream`]); [`compare`] and [`analyze`] are pure functions over
//! the stored messages so their tables can be tested without a server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

/// The header carrying the publisher's deduplication id.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// How many entries of each problem list [`AuditReport`]'s `Display` shows.
const SHOWN_PER_LIST: usize = 10;

/// One message as stored in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The stream sequence it was stored under.
    pub stream_sequence: u64,
    /// The subject it was published to.
    pub subject: String,
    /// The `Nats-Msg-Id` header, if any.
    pub msg_id: Option<String>,
    /// The body.
    pub payload: Bytes,
    /// Every header as (name, value), sorted by name; repeated names keep their stored order.
    pub headers: Vec<(String, String)>,
}

impl StoredMessage {
    /// The first value of header `name` (exact, case-sensitive match), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a stream could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The stream's info could not be fetched.
    #[error(
        "could not look up stream {stream}: {detail}; check the stream name and that JetStream is \
         enabled on the server the context points at"
    )]
    StreamLookup {
        /// Stream name.
        stream: String,
        /// The client's error, rendered.
        detail: String,
    },
    /// The ordered consumer could not be created or started.
    #[error(
        "could not start an ordered consumer on stream {stream}: {detail}; check that the account \
         may create consumers and that the server is reachable"
    )]
    Consumer {
        /// Stream name.
        stream: String,
        /// The client's error, rendered.
        detail: String,
    },
    /// The consumer failed while delivering messages.
    #[error(
        "reading stream {stream} failed after {read} messages: {detail}; retry the audit once the \
         server is healthy"
    )]
    Read {
        /// Stream name.
        stream: String,
        /// Messages read before the failure.
        read: usize,
        /// The client's error, rendered.
        detail: String,
    },
    /// Not every message up to the last sequence arrived in time.
    #[error(
        "reading stream {stream} timed out after {timeout:?}: got {read} messages, up to sequence \
         {reached} of {last_sequence}; raise the timeout for large streams or check the server"
    )]
    Timeout {
        /// Stream name.
        stream: String,
        /// The timeout that ran out.
        timeout: Duration,
        /// Messages read before it ran out.
        read: usize,
        /// Highest stream sequence read.
        reached: u64,
        /// The stream's last sequence when the read started.
        last_sequence: u64,
    },
}

/// Reads every message of `stream`, in stream order, up to the stream's last sequence at the time of
/// the call, with an ephemeral ordered pull consumer (deliver all, no acks). Fails if that does not
/// finish within `timeout`.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
    timeout: Duration,
) -> Result<Vec<StoredMessage>, AuditError> {
    let deadline = Instant::now() + timeout;
    let lookup = |detail: String| AuditError::StreamLookup {
        stream: stream.to_owned(),
        detail,
    };
    let mut handle = tokio::time::timeout_at(deadline, js.get_stream(stream))
        .await
        .map_err(|_| lookup(format!("no reply within {timeout:?}")))?
        .map_err(|e| lookup(e.to_string()))?;
    let state = tokio::time::timeout_at(deadline, handle.info())
        .await
        .map_err(|_| lookup(format!("no reply within {timeout:?}")))?
        .map_err(|e| lookup(e.to_string()))?
        .state
        .clone();
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let last_sequence = state.last_sequence;

    let consumer_err = |detail: String| AuditError::Consumer {
        stream: stream.to_owned(),
        detail,
    };
    let config = OrderedConfig {
        deliver_policy: DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = tokio::time::timeout_at(deadline, handle.create_consumer(config))
        .await
        .map_err(|_| consumer_err(format!("no reply within {timeout:?}")))?
        .map_err(|e| consumer_err(e.to_string()))?;
    let mut messages = tokio::time::timeout_at(deadline, consumer.messages())
        .await
        .map_err(|_| consumer_err(format!("no reply within {timeout:?}")))?
        .map_err(|e| consumer_err(e.to_string()))?;

    let mut stored: Vec<StoredMessage> = Vec::with_capacity(state.messages.min(1 << 20) as usize);
    loop {
        let read_err = |read: usize, detail: String| AuditError::Read {
            stream: stream.to_owned(),
            read,
            detail,
        };
        let next = match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(next) => next,
            Err(_) => {
                return Err(AuditError::Timeout {
                    stream: stream.to_owned(),
                    timeout,
                    read: stored.len(),
                    reached: stored.last().map_or(0, |m| m.stream_sequence),
                    last_sequence,
                })
            }
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(read_err(stored.len(), e.to_string())),
            None => {
                return Err(read_err(
                    stored.len(),
                    "the consumer's message stream ended early".to_owned(),
                ))
            }
        };
        let (sequence, pending) = match message.info() {
            Ok(info) => (info.stream_sequence, info.pending),
            Err(e) => {
                return Err(read_err(
                    stored.len(),
                    format!("unparsable delivery metadata: {e}"),
                ))
            }
        };
        if sequence > last_sequence {
            break;
        }
        stored.push(to_stored(&message.message, sequence));
        // `pending == 0` covers a stream whose last message was deleted after the info call.
        if sequence == last_sequence || pending == 0 {
            break;
        }
    }
    Ok(stored)
}

fn to_stored(message: &async_nats::Message, stream_sequence: u64) -> StoredMessage {
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|map| map.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.as_str().to_owned()))
        })
        .collect();
    // HeaderMap iterates in hash order; a stable sort by name keeps per-name value order.
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let msg_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(MSG_ID_HEADER))
        .map(|v| v.as_str().to_owned());
    StoredMessage {
        stream_sequence,
        subject: message.subject.to_string(),
        msg_id,
        payload: message.payload.clone(),
        headers,
    }
}

/// One event as the sink reported it, listed in send order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The `Nats-Msg-Id` the event was published with.
    pub msg_id: String,
    /// Its ordering key (events of one key must be stored in send order).
    pub key: String,
    /// The sink's report: `Some(seq)` delivered at that stream sequence, `None` failed or not
    /// delivered.
    pub reported_sequence: Option<u64>,
}

/// Two events of one key stored in the opposite order to the one they were sent in (I3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderViolation {
    /// The ordering key.
    pub key: String,
    /// The event sent first.
    pub sent_first: String,
    /// Where the event sent first was stored (its lowest sequence).
    pub sent_first_sequence: u64,
    /// The event sent later but stored earlier.
    pub sent_later: String,
    /// Where that later event was stored (its lowest sequence).
    pub sent_later_sequence: u64,
}

impl fmt::Display for OrderViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {}: {} (sent first) stored at {} after {} (sent later) at {}",
            self.key,
            self.sent_first,
            self.sent_first_sequence,
            self.sent_later,
            self.sent_later_sequence
        )
    }
}

/// Options for [`compare_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompareOptions {
    /// The stream is shared with other producers: stored messages that match no expected event are
    /// still listed in [`AuditReport::unexpected`] but do not fail the audit.
    pub foreign_ok: bool,
}

/// The result of comparing a sink's reports with the stream, event by event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditReport {
    /// Number of expected events.
    pub expected: usize,
    /// Number of stored messages examined.
    pub stored: usize,
    /// Number of events the sink reported delivered.
    pub delivered_reported: usize,
    /// I1: reported delivered but not in the stream.
    pub missing: Vec<String>,
    /// I2: expected msg ids stored more than once, with every sequence they are stored at.
    pub duplicates: Vec<(String, Vec<u64>)>,
    /// I3: per key, stored order disagrees with send order.
    pub out_of_order: Vec<OrderViolation>,
    /// I4: (msg id, reported sequence, stored sequence) where the sink's sequence is wrong.
    pub sequence_mismatch: Vec<(String, u64, u64)>,
    /// Sequences of stored messages with no matching expected event (no msg id, or an unknown one).
    pub unexpected: Vec<u64>,
    /// I4: the sink reported failure but the event is stored.
    pub stored_but_reported_failed: Vec<String>,
    /// Reported failed and not stored: honest failures, not a violation.
    pub not_delivered: Vec<String>,
    /// Whether `unexpected` messages are tolerated (see [`CompareOptions::foreign_ok`]).
    pub foreign_ok: bool,
}

impl AuditReport {
    /// Whether every invariant holds.
    pub fn passed(&self) -> bool {
        self.duplicates.is_empty() && self.passed_allowing_copies()
    }

    /// Whether every invariant holds except I2: for an outage longer than the stream's duplicate
    /// window, where copies stored again after the window are allowed (RELIABILITY.md F3).
    pub fn passed_allowing_copies(&self) -> bool {
        self.missing.is_empty()
            && self.out_of_order.is_empty()
            && self.sequence_mismatch.is_empty()
            && self.stored_but_reported_failed.is_empty()
            && (self.foreign_ok || self.unexpected.is_empty())
    }

    /// Panics with the readable report unless [`passed_allowing_copies`](Self::passed_allowing_copies).
    #[track_caller]
    pub fn assert_passed_allowing_copies(&self) {
        assert!(self.passed_allowing_copies(), "I1, I3, I4: {self}");
    }

    /// Panics with the readable report if any invariant is violated.
    #[track_caller]
    pub fn assert_passed(&self) {
        assert!(self.passed(), "{self}");
    }
}

/// Writes one problem list: a header with the count, then at most [`SHOWN_PER_LIST`] entries.
fn write_list<T>(
    f: &mut fmt::Formatter<'_>,
    title: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    writeln!(f, "  {title}: {}", items.len())?;
    for item in items.iter().take(SHOWN_PER_LIST) {
        writeln!(f, "    - {}", show(item))?;
    }
    if items.len() > SHOWN_PER_LIST {
        writeln!(f, "    ... and {} more", items.len() - SHOWN_PER_LIST)?;
    }
    Ok(())
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "audit {}: expected {}, stored {}, reported delivered {}, honest failures {}",
            if self.passed() { "PASSED" } else { "FAILED" },
            self.expected,
            self.stored,
            self.delivered_reported,
            self.not_delivered.len()
        )?;
        write_list(
            f,
            "I1 missing (reported delivered, not stored)",
            &self.missing,
            |id| id.clone(),
        )?;
        write_list(
            f,
            "I2 duplicates (msg id stored more than once)",
            &self.duplicates,
            |(id, seqs)| format!("{id} at {seqs:?}"),
        )?;
        write_list(
            f,
            "I3 out of order (per key)",
            &self.out_of_order,
            ToString::to_string,
        )?;
        write_list(
            f,
            "I4 sequence mismatch",
            &self.sequence_mismatch,
            |(id, reported, stored)| format!("{id}: reported {reported}, stored {stored}"),
        )?;
        write_list(
            f,
            "I4 stored but reported failed",
            &self.stored_but_reported_failed,
            |id| id.clone(),
        )?;
        let unexpected_title = if self.foreign_ok {
            "unexpected stored messages (tolerated: foreign producers)"
        } else {
            "unexpected stored messages (no matching event)"
        };
        write_list(f, unexpected_title, &self.unexpected, |seq| {
            format!("sequence {seq}")
        })?;
        write_list(
            f,
            "honest failures (reported failed, not stored)",
            &self.not_delivered,
            |id| id.clone(),
        )
    }
}

/// Compares the sink's reports (in send order) with the stored messages; any stored message without
/// a matching expected event fails the audit. See [`compare_with`].
pub fn compare(expected: &[Expected], stored: &[StoredMessage]) -> AuditReport {
    compare_with(expected, stored, CompareOptions::default())
}

/// Compares the sink's reports (in send order) with the stored messages, event by event.
///
/// An event's stored position is the lowest sequence its msg id is stored at; a reported sequence
/// matches if the id is stored there (duplicates are reported separately). If one msg id appears
/// twice in `expected`, the first occurrence counts.
pub fn compare_with(
    expected: &[Expected],
    stored: &[StoredMessage],
    options: CompareOptions,
) -> AuditReport {
    let mut stored_at: HashMap<&str, Vec<u64>> = HashMap::new();
    for m in stored {
        if let Some(id) = &m.msg_id {
            stored_at
                .entry(id.as_str())
                .or_default()
                .push(m.stream_sequence);
        }
    }
    for seqs in stored_at.values_mut() {
        seqs.sort_unstable();
    }

    let mut report = AuditReport {
        expected: expected.len(),
        stored: stored.len(),
        foreign_ok: options.foreign_ok,
        ..AuditReport::default()
    };
    let mut seen: HashSet<&str> = HashSet::new();
    // Per key: (highest first-stored sequence so far, the event that had it).
    let mut order: HashMap<&str, (u64, &str)> = HashMap::new();
    for e in expected {
        if !seen.insert(e.msg_id.as_str()) {
            continue;
        }
        let seqs = stored_at.get(e.msg_id.as_str());
        match (e.reported_sequence, seqs) {
            (Some(_), None) => report.missing.push(e.msg_id.clone()),
            (Some(reported), Some(seqs)) => {
                if !seqs.contains(&reported) {
                    report
                        .sequence_mismatch
                        .push((e.msg_id.clone(), reported, seqs[0]));
                }
            }
            (None, Some(_)) => report.stored_but_reported_failed.push(e.msg_id.clone()),
            (None, None) => report.not_delivered.push(e.msg_id.clone()),
        }
        if e.reported_sequence.is_some() {
            report.delivered_reported += 1;
        }
        let Some(seqs) = seqs else { continue };
        if seqs.len() > 1 {
            report.duplicates.push((e.msg_id.clone(), seqs.clone()));
        }
        let first = seqs[0];
        match order.get_mut(e.key.as_str()) {
            Some((max_seq, max_id)) if first < *max_seq => {
                report.out_of_order.push(OrderViolation {
                    key: e.key.clone(),
                    sent_first: (*max_id).to_owned(),
                    sent_first_sequence: *max_seq,
                    sent_later: e.msg_id.clone(),
                    sent_later_sequence: first,
                });
            }
            Some(entry) => *entry = (first, e.msg_id.as_str()),
            None => {
                order.insert(e.key.as_str(), (first, e.msg_id.as_str()));
            }
        }
    }
    report.unexpected = stored
        .iter()
        .filter(|m| m.msg_id.as_deref().is_none_or(|id| !seen.contains(id)))
        .map(|m| m.stream_sequence)
        .collect();
    report
}

/// What a stream holds, judged without expectations (the CLI `audit` without a report file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamSummary {
    /// Messages examined.
    pub count: usize,
    /// Lowest stream sequence seen (0 if empty).
    pub first_sequence: u64,
    /// Highest stream sequence seen (0 if empty).
    pub last_sequence: u64,
    /// Holes between consecutive stored sequences, as inclusive ranges (deleted or never stored).
    pub gaps: Vec<(u64, u64)>,
    /// Msg ids stored more than once, with their sequences.
    pub duplicates: Vec<(String, Vec<u64>)>,
    /// Messages without a `Nats-Msg-Id` header (they cannot be deduplicated).
    pub without_msg_id: usize,
    /// Message count per ordering key.
    pub per_key: BTreeMap<String, usize>,
}

impl StreamSummary {
    /// Whether the stream has neither duplicates nor sequence gaps.
    pub fn clean(&self) -> bool {
        self.gaps.is_empty() && self.duplicates.is_empty()
    }
}

impl fmt::Display for StreamSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stream: {} messages, sequences {}..={}, {} keys, {} without msg id",
            self.count,
            self.first_sequence,
            self.last_sequence,
            self.per_key.len(),
            self.without_msg_id
        )?;
        write_list(f, "sequence gaps", &self.gaps, |(from, to)| {
            if from == to {
                format!("{from}")
            } else {
                format!("{from}..={to}")
            }
        })?;
        write_list(
            f,
            "duplicates (msg id stored more than once)",
            &self.duplicates,
            |(id, seqs)| format!("{id} at {seqs:?}"),
        )
    }
}

/// Summarises stored messages: count, sequence gaps, duplicate msg ids and messages per key
/// (`key_of` extracts the ordering key, e.g. from the subject or a header).
pub fn analyze(
    stored: &[StoredMessage],
    key_of: impl Fn(&StoredMessage) -> String,
) -> StreamSummary {
    let mut summary = StreamSummary {
        count: stored.len(),
        ..StreamSummary::default()
    };
    let mut sequences: Vec<u64> = stored.iter().map(|m| m.stream_sequence).collect();
    sequences.sort_unstable();
    sequences.dedup();
    summary.first_sequence = sequences.first().copied().unwrap_or(0);
    summary.last_sequence = sequences.last().copied().unwrap_or(0);
    summary.gaps = sequences
        .windows(2)
        .filter(|w| w[1] > w[0] + 1)
        .map(|w| (w[0] + 1, w[1] - 1))
        .collect();

    // Keep first-seen order of ids so the report is deterministic.
    let mut by_id: Vec<(&str, Vec<u64>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for m in stored {
        *summary.per_key.entry(key_of(m)).or_default() += 1;
        let Some(id) = m.msg_id.as_deref() else {
            summary.without_msg_id += 1;
            continue;
        };
        let i = *index.entry(id).or_insert_with(|| {
            by_id.push((id, Vec::new()));
            by_id.len() - 1
        });
        by_id[i].1.push(m.stream_sequence);
    }
    summary.duplicates = by_id
        .into_iter()
        .filter(|(_, seqs)| seqs.len() > 1)
        .map(|(id, seqs)| (id.to_owned(), seqs))
        .collect();
    summary
}
