//! Stream audit, the pure half: compare what a sink reported with what a stream holds, event by
//! event (invariants I1-I4 of DESIGN.md), or summarise a stream alone (gaps, duplicates, per key).
//!
//! The messages come in already read (`sink_nats::audit::read_stream` does that over JetStream; the
//! test kit's scripted broker stores them in memory), so the verdicts are tested as literal tables.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use bytes::Bytes;

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

/// One event as the sink reported it, listed in send order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The `Nats-Msg-Id` the event was published with.
    pub msg_id: String,
    /// Its ordering key (events of one key must be stored in send order).
    pub key: String,
    /// The sink's report: `Some(seq)` delivered at that stream sequence, `None` failed or not
    /// delivered. `Some(`[`SEQUENCE_NOT_REPORTED`]`)` is delivered without a stream sequence (a
    /// fast-batch confirmation names none): its presence and order are checked, not its position.
    pub reported_sequence: Option<u64>,
}

/// The reported sequence of an event confirmed stored without a stream sequence (stream
/// sequences start at 1, so 0 is never a real one).
pub const SEQUENCE_NOT_REPORTED: u64 = 0;

impl Expected {
    /// An event sent with `msg_id` on ordering key `key`, reported delivered at
    /// `reported_sequence` (`None`: reported failed or never resolved).
    pub fn new(
        msg_id: impl Into<String>,
        key: impl Into<String>,
        reported_sequence: Option<u64>,
    ) -> Expected {
        Expected {
            msg_id: msg_id.into(),
            key: key.into(),
            reported_sequence,
        }
    }
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
                if reported != SEQUENCE_NOT_REPORTED && !seqs.contains(&reported) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, id: Option<&str>) -> StoredMessage {
        StoredMessage {
            stream_sequence: seq,
            subject: "ev.a".to_owned(),
            msg_id: id.map(str::to_owned),
            payload: Bytes::from(format!("payload {seq}")),
            headers: id
                .map(|id| vec![("Nats-Msg-Id".to_owned(), id.to_owned())])
                .unwrap_or_default(),
        }
    }

    /// Five events on keys k1/k2, all delivered at 1..=5 as reported.
    fn five() -> (Vec<Expected>, Vec<StoredMessage>) {
        let keys = ["k1", "k2", "k1", "k2", "k1"];
        let expected = (1..=5)
            .map(|i| Expected::new(format!("m{i}"), keys[i - 1], Some(i as u64)))
            .collect();
        let stored = (1..=5)
            .map(|i| msg(i as u64, Some(&format!("m{i}"))))
            .collect();
        (expected, stored)
    }

    #[test]
    fn compare_all_good_passes() {
        let (expected, stored) = five();
        let report = compare(&expected, &stored);
        assert!(report.passed(), "{report}");
        report.assert_passed();
        assert_eq!(report.expected, 5);
        assert_eq!(report.stored, 5);
        assert_eq!(report.delivered_reported, 5);
        assert!(report.to_string().starts_with("audit PASSED"));
    }

    #[test]
    fn compare_finds_a_gap_reported_delivered_but_missing() {
        let (expected, mut stored) = five();
        stored.remove(2); // m3 never stored
        let report = compare(&expected, &stored);
        assert!(!report.passed());
        assert_eq!(report.missing, vec!["m3".to_owned()]);
        assert!(report.duplicates.is_empty());
        assert!(report.out_of_order.is_empty());
        assert!(report.sequence_mismatch.is_empty());
        let text = report.to_string();
        assert!(text.starts_with("audit FAILED"), "{text}");
        assert!(
            text.contains("I1 missing (reported delivered, not stored): 1\n    - m3"),
            "{text}"
        );
    }

    #[test]
    fn compare_finds_a_duplicate() {
        let (expected, mut stored) = five();
        stored.push(msg(6, Some("m2")));
        let report = compare(&expected, &stored);
        assert!(!report.passed());
        assert_eq!(report.duplicates, vec![("m2".to_owned(), vec![2, 6])]);
        assert!(report.missing.is_empty());
        assert!(report.sequence_mismatch.is_empty());
        assert!(report.unexpected.is_empty());
    }

    #[test]
    fn compare_finds_reordering_within_a_key_only() {
        // Sent m1..m5; stored m1 m4 m3 m2 m5 (k1: m1 m3 m5 keep order; k2: m4 stored before m2).
        let (expected, _) = five();
        let stored_ids = ["m1", "m4", "m3", "m2", "m5"];
        let stored: Vec<StoredMessage> = stored_ids
            .iter()
            .enumerate()
            .map(|(i, id)| msg(i as u64 + 1, Some(id)))
            .collect();
        let expected: Vec<Expected> = expected
            .into_iter()
            .map(|mut e| {
                e.reported_sequence = stored
                    .iter()
                    .find(|m| m.msg_id.as_deref() == Some(&e.msg_id))
                    .map(|m| m.stream_sequence);
                e
            })
            .collect();
        let report = compare(&expected, &stored);
        assert_eq!(
            report.out_of_order,
            vec![OrderViolation {
                key: "k2".to_owned(),
                sent_first: "m2".to_owned(),
                sent_first_sequence: 4,
                sent_later: "m4".to_owned(),
                sent_later_sequence: 2,
            }]
        );
        assert!(report.sequence_mismatch.is_empty());
        assert!(!report.passed());
        assert!(report.to_string().contains(
            "I3 out of order (per key): 1\n    - key k2: m2 (sent first) stored at 4 after m4 (sent later) at 2"
        ));
    }

    #[test]
    fn compare_finds_sequence_mismatch_and_false_failures() {
        let (mut expected, stored) = five();
        expected[1].reported_sequence = Some(9); // m2 said 9, stored at 2
        expected[3].reported_sequence = None; // m4 said failed, but stored
        expected.push(Expected::new("m6", "k1", None)); // honest failure
        let report = compare(&expected, &stored);
        assert_eq!(report.sequence_mismatch, vec![("m2".to_owned(), 9, 2)]);
        assert_eq!(report.stored_but_reported_failed, vec!["m4".to_owned()]);
        assert_eq!(report.not_delivered, vec!["m6".to_owned()]);
        assert_eq!(report.delivered_reported, 4);
        assert!(!report.passed());
    }

    #[test]
    fn honest_failures_alone_pass() {
        let (mut expected, stored) = five();
        expected.push(Expected::new("m6", "k1", None));
        let report = compare(&expected, &stored);
        assert!(report.passed(), "{report}");
        assert_eq!(report.not_delivered, vec!["m6".to_owned()]);
    }

    #[test]
    fn foreign_messages_fail_unless_tolerated() {
        let (expected, mut stored) = five();
        stored.push(msg(6, Some("other-producer-1")));
        stored.push(msg(7, None));
        let strict = compare(&expected, &stored);
        assert_eq!(strict.unexpected, vec![6, 7]);
        assert!(!strict.passed());
        let shared = compare_with(&expected, &stored, CompareOptions { foreign_ok: true });
        assert_eq!(shared.unexpected, vec![6, 7]);
        assert!(shared.passed(), "{shared}");
    }

    #[test]
    fn display_shows_at_most_ten_per_list() {
        let expected: Vec<Expected> = (0..25)
            .map(|i| Expected::new(format!("id{i}"), "k", Some(i + 1)))
            .collect();
        let report = compare(&expected, &[]);
        assert_eq!(report.missing.len(), 25);
        let text = report.to_string();
        assert!(text.contains("    - id9\n"), "{text}");
        assert!(!text.contains("id10"), "{text}");
        assert!(text.contains("... and 15 more"), "{text}");
    }

    #[test]
    fn analyze_reports_gaps_duplicates_and_keys() {
        let mut messages = vec![
            msg(1, Some("a")),
            msg(2, Some("b")),
            msg(5, Some("a")),
            msg(6, None),
            msg(8, Some("c")),
        ];
        messages[1].subject = "ev.b".to_owned();
        let summary = analyze(&messages, |m| m.subject.clone());
        assert_eq!(summary.count, 5);
        assert_eq!(summary.first_sequence, 1);
        assert_eq!(summary.last_sequence, 8);
        assert_eq!(summary.gaps, vec![(3, 4), (7, 7)]);
        assert_eq!(summary.duplicates, vec![("a".to_owned(), vec![1, 5])]);
        assert_eq!(summary.without_msg_id, 1);
        assert_eq!(summary.per_key.get("ev.a"), Some(&4));
        assert_eq!(summary.per_key.get("ev.b"), Some(&1));
        assert!(!summary.clean());
        let text = summary.to_string();
        assert!(
            text.contains("sequence gaps: 2\n    - 3..=4\n    - 7\n"),
            "{text}"
        );

        let empty = analyze(&[], |m| m.subject.clone());
        assert_eq!(empty.count, 0);
        assert!(empty.clean());
    }
}
