//! Broker-neutral stream facts, the requirements the sink places on a stream, and a pure `verify`.
//!
//! The adapter reads a stream's configuration into [`StreamFacts`]; [`verify`] compares it with
//! [`StreamRequirements`] and lists every [`Violation`], each naming the stream, the field, the
//! value found and the value required. Subject coverage follows NATS wildcard rules
//! ([`subject_covers`], [`subjects_cover`]).

use std::fmt;
use std::time::Duration;

use crate::backoff::RetrySchedule;

const SECS_PER_DAY: u64 = 86_400;

/// The default retention floor: 90 days.
pub const RETENTION_FLOOR: Duration = Duration::from_secs(90 * SECS_PER_DAY);

/// The duplicate window of a stream created by the sink ([`StreamFacts::recommended`]): 2 minutes.
pub const RECOMMENDED_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageKind {
    /// On disk: survives a broker restart.
    File,
    /// In memory: lost when the broker restarts.
    Memory,
}

/// When a stream deletes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetentionKind {
    /// Only by its limits (age, count, size): the only kind that can hold a retention floor.
    Limits,
    /// Once every interested consumer has acknowledged a message.
    Interest,
    /// Once one consumer has acknowledged a message.
    WorkQueue,
}

/// What a stream does when a size or count limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiscardKind {
    /// Delete the oldest messages to make room.
    Old,
    /// Reject new messages.
    New,
}

impl fmt::Display for StorageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageKind::File => "file",
            StorageKind::Memory => "memory",
        })
    }
}

impl fmt::Display for RetentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RetentionKind::Limits => "limits",
            RetentionKind::Interest => "interest",
            RetentionKind::WorkQueue => "workqueue",
        })
    }
}

impl fmt::Display for DiscardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiscardKind::Old => "old",
            DiscardKind::New => "new",
        })
    }
}

/// The configuration of an existing stream, as far as the sink's promises depend on it.
///
/// Numeric limits use the broker's convention: `-1` (or any value `<= 0`) means unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFacts {
    /// Stream name, e.g. `CELLOS_EVENTS`.
    pub name: String,
    /// Subjects the stream captures (NATS wildcards allowed).
    pub subjects: Vec<String>,
    /// Maximum message age; zero means unlimited.
    pub max_age: Duration,
    /// Window within which a repeated `Nats-Msg-Id` is recognised as a duplicate.
    pub duplicate_window: Duration,
    /// Storage backend.
    pub storage: StorageKind,
    /// Retention policy.
    pub retention: RetentionKind,
    /// Discard policy when a limit is reached.
    pub discard: DiscardKind,
    /// Number of replicas.
    pub replicas: u32,
    /// True when the stream accepts no new messages and no deletes.
    pub sealed: bool,
    /// True when the stream does not acknowledge publishes.
    pub no_ack: bool,
    /// Maximum number of messages; `<= 0` means unlimited.
    pub max_msgs: i64,
    /// Maximum total size in bytes; `<= 0` means unlimited.
    pub max_bytes: i64,
    /// Maximum size of one message in bytes; `<= 0` means unlimited.
    pub max_msg_size: i32,
    /// True when individual messages cannot be deleted.
    pub deny_delete: bool,
    /// True when the stream cannot be purged.
    pub deny_purge: bool,
}

impl StreamFacts {
    /// The configuration the sink creates a missing stream with (the `Create` policy): file
    /// storage, `max_age` 90 days, duplicate window 2 minutes, limits retention, discard old,
    /// 1 replica, acks on, no count or size limits.
    ///
    /// Delete and purge stay allowed (the broker's default) so that operators keep their tools;
    /// the floor is about what the broker removes by itself.
    pub fn recommended(name: &str, subjects: Vec<String>) -> StreamFacts {
        StreamFacts {
            name: name.to_owned(),
            subjects,
            max_age: RETENTION_FLOOR,
            duplicate_window: RECOMMENDED_DUPLICATE_WINDOW,
            storage: StorageKind::File,
            retention: RetentionKind::Limits,
            discard: DiscardKind::Old,
            replicas: 1,
            sealed: false,
            no_ack: false,
            max_msgs: -1,
            max_bytes: -1,
            max_msg_size: -1,
            deny_delete: false,
            deny_purge: false,
        }
    }
}

/// What the sink needs from the stream it writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRequirements {
    /// Subjects the sink produces, wildcards allowed (e.g. `cellos.events.*.v1`); each must be
    /// captured by the stream.
    pub subject_filters: Vec<String>,
    /// Minimum `max_age` (a `max_age` of zero, unlimited, always satisfies it). Default 90 days.
    pub retention_floor: Duration,
    /// Minimum duplicate window: the span over which one event may be resent.
    pub min_duplicate_window: Duration,
    /// Required storage, or `None` to accept any. Default `Some(File)`.
    pub storage: Option<StorageKind>,
    /// Minimum number of replicas. Default 1.
    pub min_replicas: u32,
}

impl StreamRequirements {
    /// Requirements for a sink producing subjects matching `filter`, whose resends of one event
    /// span at most `retry_span`.
    ///
    /// The duplicate window must cover the retry span: a resend that arrives after the window has
    /// passed is stored a second time. So `min_duplicate_window = retry_span`; everything else is
    /// the default.
    pub fn for_subject_filter(filter: impl Into<String>, retry_span: Duration) -> Self {
        StreamRequirements {
            subject_filters: vec![filter.into()],
            min_duplicate_window: retry_span,
            ..StreamRequirements::default()
        }
    }
}

impl Default for StreamRequirements {
    /// No subject filters, 90-day floor, duplicate window covering the default per-publish retry
    /// span (500 ms), file storage, 1 replica.
    fn default() -> Self {
        StreamRequirements {
            subject_filters: Vec::new(),
            retention_floor: RETENTION_FLOOR,
            min_duplicate_window: RetrySchedule::default().total(),
            storage: Some(StorageKind::File),
            min_replicas: 1,
        }
    }
}

/// One way a stream fails the sink's requirements.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// No stream subject covers a subject filter of the sink: those events would not be stored.
    SubjectNotCaptured {
        /// Stream name.
        stream: String,
        /// The sink's subject filter that is not captured.
        filter: String,
        /// The stream's subjects.
        stream_subjects: Vec<String>,
    },
    /// `max_age` is non-zero and below the retention floor.
    RetentionBelowFloor {
        /// Stream name.
        stream: String,
        /// The stream's `max_age`.
        found: Duration,
        /// The retention floor.
        required: Duration,
    },
    /// The duplicate window is shorter than the retry span.
    DuplicateWindowTooShort {
        /// Stream name.
        stream: String,
        /// The stream's duplicate window.
        found: Duration,
        /// The minimum window.
        required: Duration,
    },
    /// The storage kind differs from the required one.
    Storage {
        /// Stream name.
        stream: String,
        /// The stream's storage.
        found: StorageKind,
        /// The required storage.
        required: StorageKind,
    },
    /// The stream is sealed: it accepts no new messages.
    Sealed {
        /// Stream name.
        stream: String,
    },
    /// The stream does not acknowledge publishes, so delivery cannot be confirmed.
    AcksDisabled {
        /// Stream name.
        stream: String,
    },
    /// Fewer replicas than required.
    Replicas {
        /// Stream name.
        stream: String,
        /// The stream's replica count.
        found: u32,
        /// The minimum replica count.
        required: u32,
    },
    /// Interest or work-queue retention deletes messages once consumed, regardless of the floor.
    RetentionPolicy {
        /// Stream name.
        stream: String,
        /// The stream's retention policy.
        found: RetentionKind,
    },
    /// A count or size limit with discard `old`: the broker silently deletes the oldest events
    /// when the limit is reached, possibly before the retention floor.
    LimitEvictsOld {
        /// Stream name.
        stream: String,
        /// `"max_msgs"` or `"max_bytes"`.
        field: &'static str,
        /// The configured limit.
        limit: i64,
    },
}

impl Violation {
    /// The stream configuration field at fault, as named in the NATS stream configuration
    /// (e.g. `"max_age"`).
    pub fn field(&self) -> &'static str {
        match self {
            Violation::SubjectNotCaptured { .. } => "subjects",
            Violation::RetentionBelowFloor { .. } => "max_age",
            Violation::DuplicateWindowTooShort { .. } => "duplicate_window",
            Violation::Storage { .. } => "storage",
            Violation::Sealed { .. } => "sealed",
            Violation::AcksDisabled { .. } => "no_ack",
            Violation::Replicas { .. } => "num_replicas",
            Violation::RetentionPolicy { .. } => "retention",
            Violation::LimitEvictsOld { field, .. } => field,
        }
    }

    /// The name of the stream at fault.
    pub fn stream(&self) -> &str {
        match self {
            Violation::SubjectNotCaptured { stream, .. }
            | Violation::RetentionBelowFloor { stream, .. }
            | Violation::DuplicateWindowTooShort { stream, .. }
            | Violation::Storage { stream, .. }
            | Violation::Sealed { stream }
            | Violation::AcksDisabled { stream }
            | Violation::Replicas { stream, .. }
            | Violation::RetentionPolicy { stream, .. }
            | Violation::LimitEvictsOld { stream, .. } => stream,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.field();
        match self {
            Violation::SubjectNotCaptured {
                stream,
                filter,
                stream_subjects,
            } => {
                let list: Vec<String> = stream_subjects.iter().map(|s| format!("{s:?}")).collect();
                write!(
                    f,
                    "stream {stream} {field} are [{}]; none captures {filter:?}: \
                     add a subject that covers it (e.g. {filter:?})",
                    list.join(", ")
                )
            }
            Violation::RetentionBelowFloor {
                stream,
                found,
                required,
            } => write!(
                f,
                "stream {stream} {field} is {}; the retention floor requires >= {} or 0 (unlimited)",
                fmt_duration(*found),
                fmt_duration(*required)
            ),
            Violation::DuplicateWindowTooShort {
                stream,
                found,
                required,
            } => write!(
                f,
                "stream {stream} {field} is {}; deduplicating retries requires >= {} (the retry span)",
                fmt_duration(*found),
                fmt_duration(*required)
            ),
            Violation::Storage {
                stream,
                found,
                required,
            } => write!(
                f,
                "stream {stream} {field} is {found}; {required} storage is required"
            ),
            Violation::Sealed { stream } => write!(
                f,
                "stream {stream} {field} is true; it accepts no new messages: use an unsealed stream"
            ),
            Violation::AcksDisabled { stream } => write!(
                f,
                "stream {stream} {field} is true; publishes are not acknowledged so delivery \
                 cannot be confirmed: set no_ack to false"
            ),
            Violation::Replicas {
                stream,
                found,
                required,
            } => write!(
                f,
                "stream {stream} {field} is {found}; >= {required} replicas are required"
            ),
            Violation::RetentionPolicy { stream, found } => write!(
                f,
                "stream {stream} {field} is {found}; it deletes events once consumed, so the \
                 retention floor cannot hold: limits retention is required"
            ),
            Violation::LimitEvictsOld {
                stream,
                field,
                limit,
            } => write!(
                f,
                "stream {stream} {field} is {limit} with discard old; the oldest events are \
                 deleted when it is reached, maybe before the retention floor: set {field} to -1 \
                 (unlimited) or discard to new"
            ),
        }
    }
}

/// Checks `facts` against `req` and lists every violation (empty when the stream is fit), in a
/// fixed order: subjects (one per uncaptured filter), max_age, retention, duplicate window,
/// storage, sealed, acks, replicas, count/size limits.
///
/// ```
/// use std::time::Duration;
/// use sink_core::stream::{verify, StreamFacts, StreamRequirements};
///
/// let req = StreamRequirements::for_subject_filter("cellos.events.*.v1", Duration::from_millis(500));
/// let mut facts = StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".into()]);
/// assert!(verify(&facts, &req).is_empty());
///
/// facts.max_age = Duration::from_secs(30 * 86_400);
/// let found = verify(&facts, &req);
/// assert_eq!(found.len(), 1);
/// assert_eq!(found[0].field(), "max_age");
/// assert_eq!(
///     found[0].to_string(),
///     "stream CELLOS_EVENTS max_age is 30d; the retention floor requires >= 90d or 0 (unlimited)"
/// );
/// ```
pub fn verify(facts: &StreamFacts, req: &StreamRequirements) -> Vec<Violation> {
    let stream = || facts.name.clone();
    let mut out = Vec::new();
    for filter in &req.subject_filters {
        if !subjects_cover(&facts.subjects, filter) {
            out.push(Violation::SubjectNotCaptured {
                stream: stream(),
                filter: filter.clone(),
                stream_subjects: facts.subjects.clone(),
            });
        }
    }
    if !facts.max_age.is_zero() && facts.max_age < req.retention_floor {
        out.push(Violation::RetentionBelowFloor {
            stream: stream(),
            found: facts.max_age,
            required: req.retention_floor,
        });
    }
    if facts.retention != RetentionKind::Limits {
        out.push(Violation::RetentionPolicy {
            stream: stream(),
            found: facts.retention,
        });
    }
    if facts.duplicate_window < req.min_duplicate_window {
        out.push(Violation::DuplicateWindowTooShort {
            stream: stream(),
            found: facts.duplicate_window,
            required: req.min_duplicate_window,
        });
    }
    if let Some(required) = req.storage {
        if facts.storage != required {
            out.push(Violation::Storage {
                stream: stream(),
                found: facts.storage,
                required,
            });
        }
    }
    if facts.sealed {
        out.push(Violation::Sealed { stream: stream() });
    }
    if facts.no_ack {
        out.push(Violation::AcksDisabled { stream: stream() });
    }
    if facts.replicas < req.min_replicas {
        out.push(Violation::Replicas {
            stream: stream(),
            found: facts.replicas,
            required: req.min_replicas,
        });
    }
    if facts.discard == DiscardKind::Old {
        for (field, limit) in [("max_msgs", facts.max_msgs), ("max_bytes", facts.max_bytes)] {
            if limit > 0 {
                out.push(Violation::LimitEvictsOld {
                    stream: stream(),
                    field,
                    limit,
                });
            }
        }
    }
    out
}

/// Formats a duration exactly in human units: `90d`, `2m`, `1h30m`, `1s500ms`, `0s`.
///
/// Components are days, hours, minutes, seconds and milliseconds; a sub-millisecond remainder is
/// shown as `us` / `ns` so that no value is rounded (89d23h59m59s999ms stays distinct from 90d).
pub fn fmt_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (secs / SECS_PER_DAY, "d"),
        (secs % SECS_PER_DAY / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1_000 % 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n != 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

/// True iff every concrete subject matching `filter` also matches `stream_subject`.
///
/// NATS wildcards: a `*` token matches exactly one token, a trailing `>` token matches one or more
/// tokens. Returns false when either argument is not a valid subject (empty, an empty token,
/// whitespace, or `>` before the last token).
pub fn subject_covers(stream_subject: &str, filter: &str) -> bool {
    subjects_cover(&[stream_subject], filter)
}

/// True iff every concrete subject matching `filter` matches at least one of `stream_subjects`.
///
/// This is coverage by the union, so `["a.*", "a.*.>"]` covers `a.>` although neither alone does.
/// Invalid stream subjects cover nothing; an invalid filter is never covered.
pub fn subjects_cover<S: AsRef<str>>(stream_subjects: &[S], filter: &str) -> bool {
    let Some(filter) = tokens(filter) else {
        return false;
    };
    let mut alive: Vec<Vec<&str>> = stream_subjects
        .iter()
        .filter_map(|s| tokens(s.as_ref()))
        .collect();
    // The filter's concrete subjects are chosen adversarially. A wildcard in the filter may stand
    // for a token no stream subject names literally, so only stream wildcards survive it; every
    // other choice keeps a superset of the stream subjects alive and is easier to cover.
    for (i, tok) in filter.iter().enumerate() {
        // A `>` here in a live stream subject matches every continuation (the filter still has at
        // least one token from position i on).
        if alive.iter().any(|p| p.get(i) == Some(&">")) {
            return true;
        }
        match *tok {
            ">" => return tail_covered(&alive, i),
            "*" => alive.retain(|p| p.get(i) == Some(&"*")),
            lit => alive.retain(|p| matches!(p.get(i), Some(&"*")) || p.get(i) == Some(&lit)),
        }
    }
    alive.iter().any(|p| p.len() == filter.len())
}

/// Whether the stream subjects alive at position `i` match every run of k >= 1 tokens (any
/// content) from position `i` on, as the filter's trailing `>` demands.
fn tail_covered(alive: &[Vec<&str>], i: usize) -> bool {
    // With tokens no stream subject names, a rest of n `*` matches only k = n, and a rest of m `*`
    // followed by `>` matches every k > m; any literal in the rest matches nothing.
    let mut exact = Vec::new();
    let mut open_from: Option<usize> = None;
    for p in alive {
        let rest = &p[i.min(p.len())..];
        let stars = rest.iter().take_while(|t| **t == "*").count();
        match rest.get(stars) {
            None => exact.push(stars),
            Some(&">") if stars + 1 == rest.len() => {
                open_from = Some(open_from.map_or(stars + 1, |m| m.min(stars + 1)));
            }
            Some(_) => {}
        }
    }
    open_from.is_some_and(|from| (1..from).all(|k| exact.contains(&k)))
}

/// Splits a subject into tokens, or `None` when it is not a valid subject.
fn tokens(subject: &str) -> Option<Vec<&str>> {
    let toks: Vec<&str> = subject.split('.').collect();
    let valid = toks
        .iter()
        .all(|t| !t.is_empty() && !t.chars().any(char::is_whitespace))
        && !toks[..toks.len() - 1].contains(&">");
    valid.then_some(toks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: Duration = Duration::from_secs(SECS_PER_DAY);

    fn drifted() -> StreamFacts {
        StreamFacts {
            max_age: DAY * 30,
            duplicate_window: Duration::ZERO,
            storage: StorageKind::Memory,
            sealed: true,
            ..StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".to_owned()])
        }
    }

    fn req() -> StreamRequirements {
        StreamRequirements::for_subject_filter("cellos.events.*.v1", Duration::from_millis(500))
    }

    #[test]
    fn fmt_duration_table() {
        let table = [
            (Duration::ZERO, "0s"),
            (DAY * 90, "90d"),
            (DAY * 30, "30d"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(5_400), "1h30m"),
            (Duration::from_millis(1_500), "1s500ms"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_micros(250), "250us"),
            (Duration::from_nanos(7), "7ns"),
            (DAY * 90 - Duration::from_millis(1), "89d23h59m59s999ms"),
            (Duration::from_secs(180), "3m"),
        ];
        for (d, text) in table {
            assert_eq!(fmt_duration(d), text, "{d:?}");
        }
    }

    #[test]
    fn subject_covers_table() {
        let table = [
            ("cellos.events.>", "cellos.events.*.v1", true),
            ("cellos.events.*.v1", "cellos.events.*.v1", true),
            ("cellos.events.*.*", "cellos.events.*.v1", true),
            ("cellos.events.*.v1", "cellos.events.acme.v1", true),
            ("cellos.events.acme.v1", "cellos.events.*.v1", false),
            ("cellos.events.*", "cellos.events.*.v1", false),
            ("cellos.events.*.v2", "cellos.events.*.v1", false),
            (">", "a", true),
            (">", "a.b.>", true),
            ("*", "a", true),
            ("*", "*", true),
            ("*", ">", false),
            ("a.*", "a.>", false),
            ("a.>", "a.>", true),
            ("a.>", "a.*.>", true),
            ("a.*.>", "a.>", false),
            ("a.>", "a", false),
            ("a", "a.>", false),
            ("a", "a", true),
            ("a", "b", false),
            ("a.b", "a", false),
            // Invalid subjects never cover and are never covered.
            ("", "a", false),
            ("a", "", false),
            ("a..b", "a..b", false),
            (">.a", ">.a", false),
            ("a b", "a b", false),
        ];
        for (stream, filter, expected) in table {
            assert_eq!(
                subject_covers(stream, filter),
                expected,
                "{stream:?} covers {filter:?}"
            );
        }
    }

    #[test]
    fn union_of_stream_subjects_covers_what_no_single_one_does() {
        assert!(subjects_cover(&["a.*", "a.*.>"], "a.>"));
        assert!(!subjects_cover(&["a.*", "a.*.*.>"], "a.>"));
        assert!(subjects_cover(&["a.*", "a.*.*", "a.*.*.>"], "a.>"));
        assert!(!subjects_cover(&["a.x", "a.y"], "a.*"));
        assert!(!subjects_cover::<&str>(&[], "a"));
    }

    #[test]
    fn recommended_stream_satisfies_default_requirements() {
        let facts = StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".to_owned()]);
        assert_eq!(facts.max_age, DAY * 90);
        assert_eq!(facts.duplicate_window, Duration::from_secs(120));
        assert_eq!(facts.storage, StorageKind::File);
        assert_eq!(facts.retention, RetentionKind::Limits);
        assert_eq!(facts.discard, DiscardKind::Old);
        assert_eq!(facts.replicas, 1);
        assert!(!facts.no_ack && !facts.sealed);
        assert_eq!(verify(&facts, &req()), Vec::new());
        assert_eq!(verify(&facts, &StreamRequirements::default()), Vec::new());
    }

    #[test]
    fn requirements_defaults() {
        let d = StreamRequirements::default();
        assert_eq!(d.retention_floor, DAY * 90);
        assert_eq!(d.min_duplicate_window, Duration::from_millis(500));
        assert_eq!(d.storage, Some(StorageKind::File));
        assert_eq!(d.min_replicas, 1);
        assert!(d.subject_filters.is_empty());
        let r = StreamRequirements::for_subject_filter("x.*", Duration::from_secs(7));
        assert_eq!(r.subject_filters, vec!["x.*".to_owned()]);
        assert_eq!(r.min_duplicate_window, Duration::from_secs(7));
        assert_eq!(r.retention_floor, d.retention_floor);
    }

    #[test]
    fn verify_table_of_single_drifts() {
        let ok = StreamFacts::recommended("S", vec!["cellos.events.>".to_owned()]);
        let cases: Vec<(StreamFacts, Vec<&str>)> = vec![
            (ok.clone(), vec![]),
            (
                StreamFacts {
                    max_age: Duration::ZERO,
                    ..ok.clone()
                },
                vec![],
            ),
            (
                StreamFacts {
                    max_age: DAY * 90 - Duration::from_nanos(1),
                    ..ok.clone()
                },
                vec!["max_age"],
            ),
            (
                StreamFacts {
                    max_age: DAY * 365,
                    ..ok.clone()
                },
                vec![],
            ),
            (
                StreamFacts {
                    duplicate_window: Duration::from_millis(499),
                    ..ok.clone()
                },
                vec!["duplicate_window"],
            ),
            (
                StreamFacts {
                    duplicate_window: Duration::from_millis(500),
                    ..ok.clone()
                },
                vec![],
            ),
            (
                StreamFacts {
                    subjects: vec!["other.>".to_owned()],
                    ..ok.clone()
                },
                vec!["subjects"],
            ),
            (
                StreamFacts {
                    subjects: vec![],
                    ..ok.clone()
                },
                vec!["subjects"],
            ),
            (
                StreamFacts {
                    storage: StorageKind::Memory,
                    ..ok.clone()
                },
                vec!["storage"],
            ),
            (
                StreamFacts {
                    sealed: true,
                    ..ok.clone()
                },
                vec!["sealed"],
            ),
            (
                StreamFacts {
                    no_ack: true,
                    ..ok.clone()
                },
                vec!["no_ack"],
            ),
            (
                StreamFacts {
                    replicas: 0,
                    ..ok.clone()
                },
                vec!["num_replicas"],
            ),
            (
                StreamFacts {
                    retention: RetentionKind::WorkQueue,
                    ..ok.clone()
                },
                vec!["retention"],
            ),
            (
                StreamFacts {
                    retention: RetentionKind::Interest,
                    ..ok.clone()
                },
                vec!["retention"],
            ),
            (
                StreamFacts {
                    max_msgs: 1_000,
                    max_bytes: 0,
                    ..ok.clone()
                },
                vec!["max_msgs"],
            ),
            (
                StreamFacts {
                    max_msgs: 1_000,
                    max_bytes: 1 << 30,
                    discard: DiscardKind::New,
                    ..ok.clone()
                },
                vec![],
            ),
            (
                StreamFacts {
                    max_msg_size: 1_024,
                    deny_delete: true,
                    deny_purge: true,
                    ..ok.clone()
                },
                vec![],
            ),
        ];
        for (facts, expected) in cases {
            let fields: Vec<&str> = verify(&facts, &req())
                .iter()
                .map(Violation::field)
                .collect();
            assert_eq!(fields, expected, "{facts:?}");
        }
    }

    #[test]
    fn verify_honours_optional_storage_and_replica_floor() {
        let mem = StreamFacts {
            storage: StorageKind::Memory,
            replicas: 1,
            ..StreamFacts::recommended("S", vec![">".to_owned()])
        };
        let any_storage = StreamRequirements {
            storage: None,
            min_replicas: 3,
            ..req()
        };
        assert_eq!(
            verify(&mem, &any_storage),
            vec![Violation::Replicas {
                stream: "S".to_owned(),
                found: 1,
                required: 3
            }]
        );
        let two_filters = StreamRequirements {
            subject_filters: vec!["a.b".to_owned(), "c.d".to_owned(), "e.f".to_owned()],
            ..req()
        };
        let facts = StreamFacts::recommended("S", vec!["c.*".to_owned()]);
        let missing: Vec<Violation> = verify(&facts, &two_filters);
        assert_eq!(missing.len(), 2);
        assert!(missing
            .iter()
            .all(|v| v.field() == "subjects" && v.stream() == "S"));
    }

    #[test]
    fn drifted_stream_reports_each_violation() {
        let report: Vec<String> = verify(&drifted(), &req())
            .iter()
            .map(ToString::to_string)
            .collect();
        insta::assert_snapshot!(report.join("\n"), @r#"
        stream CELLOS_EVENTS max_age is 30d; the retention floor requires >= 90d or 0 (unlimited)
        stream CELLOS_EVENTS duplicate_window is 0s; deduplicating retries requires >= 500ms (the retry span)
        stream CELLOS_EVENTS storage is memory; file storage is required
        stream CELLOS_EVENTS sealed is true; it accepts no new messages: use an unsealed stream
        "#);
    }

    #[test]
    fn every_violation_display() {
        let facts = StreamFacts {
            subjects: vec!["cellos.audit.>".to_owned(), "cellos.events.*".to_owned()],
            retention: RetentionKind::WorkQueue,
            no_ack: true,
            replicas: 1,
            max_msgs: 10_000,
            max_bytes: 1_048_576,
            ..drifted()
        };
        let req = StreamRequirements {
            min_replicas: 3,
            ..req()
        };
        let report: Vec<String> = verify(&facts, &req)
            .iter()
            .map(|v| format!("{}: {v}", v.field()))
            .collect();
        insta::assert_snapshot!(report.join("\n"), @r#"
        subjects: stream CELLOS_EVENTS subjects are ["cellos.audit.>", "cellos.events.*"]; none captures "cellos.events.*.v1": add a subject that covers it (e.g. "cellos.events.*.v1")
        max_age: stream CELLOS_EVENTS max_age is 30d; the retention floor requires >= 90d or 0 (unlimited)
        retention: stream CELLOS_EVENTS retention is workqueue; it deletes events once consumed, so the retention floor cannot hold: limits retention is required
        duplicate_window: stream CELLOS_EVENTS duplicate_window is 0s; deduplicating retries requires >= 500ms (the retry span)
        storage: stream CELLOS_EVENTS storage is memory; file storage is required
        sealed: stream CELLOS_EVENTS sealed is true; it accepts no new messages: use an unsealed stream
        no_ack: stream CELLOS_EVENTS no_ack is true; publishes are not acknowledged so delivery cannot be confirmed: set no_ack to false
        num_replicas: stream CELLOS_EVENTS num_replicas is 1; >= 3 replicas are required
        max_msgs: stream CELLOS_EVENTS max_msgs is 10000 with discard old; the oldest events are deleted when it is reached, maybe before the retention floor: set max_msgs to -1 (unlimited) or discard to new
        max_bytes: stream CELLOS_EVENTS max_bytes is 1048576 with discard old; the oldest events are deleted when it is reached, maybe before the retention floor: set max_bytes to -1 (unlimited) or discard to new
        "#);
    }

    /// Reference matcher: does pattern `p` (wildcards allowed) match concrete subject `c`?
    fn matches(p: &[&str], c: &[&str]) -> bool {
        match (p.split_first(), c.split_first()) {
            (None, None) => true,
            (Some((&">", _)), Some(_)) => true,
            (Some((&"*", pr)), Some((_, cr))) => matches(pr, cr),
            (Some((pt, pr)), Some((ct, cr))) => pt == ct && matches(pr, cr),
            _ => false,
        }
    }

    /// All concrete subjects of 1..=4 tokens over {a, b, c}; patterns use only {a, b}, so `c` is a
    /// token no pattern names, and 4 tokens exceed every pattern (at most 3) by one.
    fn concrete_subjects() -> Vec<Vec<&'static str>> {
        let mut all: Vec<Vec<&'static str>> = vec![vec![]];
        let mut out = Vec::new();
        for _ in 0..4 {
            all = all
                .iter()
                .flat_map(|s| {
                    ["a", "b", "c"].into_iter().map(move |t| {
                        let mut n = s.clone();
                        n.push(t);
                        n
                    })
                })
                .collect();
            out.extend(all.iter().cloned());
        }
        out
    }

    fn reference_covers(stream_subjects: &[String], filter: &str) -> bool {
        let f: Vec<&str> = filter.split('.').collect();
        let ps: Vec<Vec<&str>> = stream_subjects
            .iter()
            .map(|s| s.split('.').collect())
            .collect();
        concrete_subjects()
            .iter()
            .filter(|c| matches(&f, c))
            .all(|c| ps.iter().any(|p| matches(p, c)))
    }

    fn small_subject() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("*")], 0..=2),
            prop_oneof![Just("a"), Just("b"), Just("*"), Just(">")],
        )
            .prop_map(|(mut toks, last)| {
                toks.push(last);
                toks.join(".")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn subject_covers_agrees_with_brute_force(
            stream in small_subject(),
            filter in small_subject(),
        ) {
            prop_assert_eq!(
                subject_covers(&stream, &filter),
                reference_covers(std::slice::from_ref(&stream), &filter),
                "{} covers {}", stream, filter
            );
        }

        #[test]
        fn subjects_cover_union_agrees_with_brute_force(
            streams in prop::collection::vec(small_subject(), 0..=4),
            filter in small_subject(),
        ) {
            prop_assert_eq!(
                subjects_cover(&streams, &filter),
                reference_covers(&streams, &filter),
                "{:?} cover {}", streams, filter
            );
        }
    }
}
