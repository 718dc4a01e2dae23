//! Broker-neutral stream facts, the requirements the sink places on a stream, and a pure `verify`.
//!
//! The adapter reads a stream's configuration into [`StreamFacts`]; [`verify`] compares it with
//! [`StreamRequirements`] and lists every [`Violation`], each naming the stream, the field, the
//! value found and the value required (or the fix). Subject coverage follows NATS wildcard rules
//! ([`subject_covers`], [`subjects_cover`]).
//!
//! Besides retention, deduplication and durability, `verify` refuses every setting that lets the
//! broker delete, rewrite or refuse our events behind the sink's back, or acknowledge them before
//! storing them (per-subject limits, rollup headers, message schedules, subject transforms,
//! asynchronous persistence, message counters, mirrors). [`Violation::blocks_delivery`] says which
//! of them make publishing unsafe right now, for a driver that finds them at run time.
//!
//! What works but costs speed is advice, not a violation: [`advise`] lists each [`Advice`] for a
//! stream on a given server version (today one: a 2.14+ server whose stream does not allow
//! fast-batch publishing).

use std::fmt;
use std::time::Duration;

pub use crate::backoff::fmt_duration;
use crate::backoff::RetrySchedule;
use crate::capability::{chaining_hazard, fast_batch_supported, ServerVersion};

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

/// When a stream acknowledges a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PersistMode {
    /// After the message is written to the store (the broker's default).
    Default,
    /// Before the message is written (server 2.12+ `persist_mode: async`): an acknowledged message
    /// can be lost when the broker dies.
    Async,
}

/// A transform the stream applies to the subject of every incoming message before storing it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectTransform {
    /// The subjects it applies to (`src`).
    pub source: String,
    /// What they become (`dest`).
    pub destination: String,
}

impl fmt::Display for PersistMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PersistMode::Default => "default",
            PersistMode::Async => "async",
        })
    }
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
    /// Maximum number of messages kept per subject; `<= 0` means unlimited.
    pub max_msgs_per_subject: i64,
    /// True when a subject at `max_msgs_per_subject` refuses new messages instead of deleting its
    /// oldest.
    pub discard_new_per_subject: bool,
    /// True when a `Nats-Rollup` header may purge the stream or a subject (`allow_rollup_hdrs`).
    pub allow_rollup: bool,
    /// True when messages may schedule other messages (server 2.12+ `allow_msg_schedules`).
    pub allow_msg_schedules: bool,
    /// How long the delete markers left when a subject's last message expires are kept; zero when
    /// the stream leaves none (server 2.11+ `subject_delete_marker_ttl`).
    pub subject_delete_marker_ttl: Duration,
    /// The subject transform applied before storing, if any.
    pub subject_transform: Option<SubjectTransform>,
    /// When publishes are acknowledged (server 2.12+ `persist_mode`).
    pub persist_mode: PersistMode,
    /// True when the stream is a counter stream (server 2.12+ `allow_msg_counter`).
    pub allow_msg_counter: bool,
    /// The origin stream when this stream is a mirror.
    pub mirror: Option<String>,
    /// True when the stream accepts fast-batch publishing (server 2.14+ `allow_batched`); false
    /// when the server does not report it.
    pub allow_batched: bool,
}

impl StreamFacts {
    /// The configuration the sink creates a missing stream with (the `Create` policy): file
    /// storage, `max_age` 90 days, duplicate window 2 minutes, limits retention, discard old,
    /// 1 replica, acks on, no count or size limits.
    ///
    /// Delete and purge stay allowed (the broker's default) so that operators keep their tools;
    /// the floor is about what the broker removes by itself. Everything [`verify`] refuses is off:
    /// no per-subject limit, no rollups, schedules, delete markers, transform, counters or mirror,
    /// and acknowledgements after storing.
    ///
    /// `allow_batched` is false here, as every server accepts it; the adapter's `Create` turns it
    /// on where the server has fast-batch publishing ([`fast_batch_supported`]).
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
            max_msgs_per_subject: -1,
            discard_new_per_subject: false,
            allow_rollup: false,
            allow_msg_schedules: false,
            subject_delete_marker_ttl: Duration::ZERO,
            subject_transform: None,
            persist_mode: PersistMode::Default,
            allow_msg_counter: false,
            mirror: None,
            allow_batched: false,
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
    /// A per-subject message limit: each subject (each tenant) keeps only its newest `limit`
    /// events, or with `discard_new_per_subject` refuses every event past `limit`.
    MaxMsgsPerSubject {
        /// Stream name.
        stream: String,
        /// The configured limit.
        limit: i64,
        /// Whether a full subject refuses new events (rather than deleting its oldest).
        discard_new_per_subject: bool,
    },
    /// Rollup headers are allowed: one message with `Nats-Rollup: all` (or `sub`) from any
    /// publisher purges the whole stream (or that subject).
    RollupAllowed {
        /// Stream name.
        stream: String,
        /// Whether `subject_delete_marker_ttl` is set, which keeps rollups on.
        delete_markers: bool,
    },
    /// Message schedules are allowed (2.12+): a scheduled message can target our subjects with
    /// `Nats-Schedule-Rollup: sub` and purge a tenant's events; the server also keeps rollups on.
    MessageSchedules {
        /// Stream name.
        stream: String,
    },
    /// A subject transform whose source matches subjects we publish: it rewrites their subject
    /// before storing them.
    SubjectTransform {
        /// Stream name.
        stream: String,
        /// The transform.
        transform: SubjectTransform,
    },
    /// `persist_mode: async` (2.12+): publishes are acknowledged before they are written.
    AsyncPersist {
        /// Stream name.
        stream: String,
    },
    /// A counter stream (2.12+): it refuses every message without a `Nats-Incr` header.
    MessageCounter {
        /// Stream name.
        stream: String,
    },
    /// The stream is a mirror: it stores only what it copies from its origin.
    Mirror {
        /// Stream name.
        stream: String,
        /// The origin stream.
        origin: String,
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
            Violation::MaxMsgsPerSubject { .. } => "max_msgs_per_subject",
            Violation::RollupAllowed { .. } => "allow_rollup_hdrs",
            Violation::MessageSchedules { .. } => "allow_msg_schedules",
            Violation::SubjectTransform { .. } => "subject_transform",
            Violation::AsyncPersist { .. } => "persist_mode",
            Violation::MessageCounter { .. } => "allow_msg_counter",
            Violation::Mirror { .. } => "mirror",
        }
    }

    /// Whether publishing into the stream now would lose events or lie about them: the event
    /// would not be stored at all (subjects not captured, sealed, mirror, counter stream), not
    /// be kept once acknowledged (interest or work-queue retention, memory storage where file is
    /// required, acknowledgement before writing), or not be acknowledged (`no_ack`).
    ///
    /// A driver that finds such a violation at run time holds events queued until it is fixed.
    /// The other violations (a short `max_age`, evicting limits, rollups, transforms, ...) put
    /// events at risk later, not at the moment they are stored: the sink reports them and keeps
    /// delivering.
    pub fn blocks_delivery(&self) -> bool {
        match self {
            Violation::SubjectNotCaptured { .. }
            | Violation::Storage { .. }
            | Violation::Sealed { .. }
            | Violation::AcksDisabled { .. }
            | Violation::RetentionPolicy { .. }
            | Violation::AsyncPersist { .. }
            | Violation::MessageCounter { .. }
            | Violation::Mirror { .. } => true,
            Violation::RetentionBelowFloor { .. }
            | Violation::DuplicateWindowTooShort { .. }
            | Violation::Replicas { .. }
            | Violation::LimitEvictsOld { .. }
            | Violation::MaxMsgsPerSubject { .. }
            | Violation::RollupAllowed { .. }
            | Violation::MessageSchedules { .. }
            | Violation::SubjectTransform { .. } => false,
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
            | Violation::LimitEvictsOld { stream, .. }
            | Violation::MaxMsgsPerSubject { stream, .. }
            | Violation::RollupAllowed { stream, .. }
            | Violation::MessageSchedules { stream }
            | Violation::SubjectTransform { stream, .. }
            | Violation::AsyncPersist { stream }
            | Violation::MessageCounter { stream }
            | Violation::Mirror { stream, .. } => stream,
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
            Violation::MaxMsgsPerSubject {
                stream,
                limit,
                discard_new_per_subject: false,
            } => write!(
                f,
                "stream {stream} {field} is {limit}; each subject (each tenant) keeps only its \
                 newest {limit} events and older ones are deleted, whatever the retention floor: \
                 set {field} to -1 (unlimited)"
            ),
            Violation::MaxMsgsPerSubject {
                stream,
                limit,
                discard_new_per_subject: true,
            } => write!(
                f,
                "stream {stream} {field} is {limit} with discard_new_per_subject; a subject (a \
                 tenant) holding {limit} events refuses every further event: set {field} to -1 \
                 (unlimited) and discard_new_per_subject to false"
            ),
            Violation::RollupAllowed {
                stream,
                delete_markers,
            } => write!(
                f,
                "stream {stream} {field} is true; one message with a Nats-Rollup header from any \
                 publisher purges the whole stream or a subject, deleting our events: set {field} \
                 to false{}",
                if *delete_markers {
                    " (and subject_delete_marker_ttl to 0 first: it keeps rollups on)"
                } else {
                    ""
                }
            ),
            Violation::MessageSchedules { stream } => write!(
                f,
                "stream {stream} {field} is true; a scheduled message can target our subjects \
                 with Nats-Schedule-Rollup and purge a tenant's events, and it keeps rollups on: \
                 schedules cannot be turned off once on, so use a stream without {field}"
            ),
            Violation::SubjectTransform { stream, transform } => write!(
                f,
                "stream {stream} {field} maps {:?} to {:?}; events are stored under another \
                 subject than the one they were sent to: remove the subject transform",
                transform.source, transform.destination
            ),
            Violation::AsyncPersist { stream } => write!(
                f,
                "stream {stream} {field} is async; publishes are acknowledged before they are \
                 written, so an acknowledged event can be lost when the server dies: {field} \
                 cannot be changed, so use a stream with {field} default"
            ),
            Violation::MessageCounter { stream } => write!(
                f,
                "stream {stream} {field} is true; a counter stream refuses every message without \
                 a Nats-Incr header: {field} cannot be changed, so use a stream without counters"
            ),
            Violation::Mirror { stream, origin } => write!(
                f,
                "stream {stream} {field} is {origin:?}; a mirror stores only what it copies from \
                 its origin and accepts no publishes: use a stream that is not a mirror (e.g. its \
                 origin {origin})"
            ),
        }
    }
}

/// Checks `facts` against `req` and lists every violation (empty when the stream is fit), in a
/// fixed order: subjects (one per uncaptured filter), max_age, retention, duplicate window,
/// storage, sealed, acks, replicas, count/size limits, per-subject limit, rollups, schedules,
/// subject transform, persist mode, counters, mirror.
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
    if facts.max_msgs_per_subject > 0 {
        out.push(Violation::MaxMsgsPerSubject {
            stream: stream(),
            limit: facts.max_msgs_per_subject,
            discard_new_per_subject: facts.discard_new_per_subject,
        });
    }
    if facts.allow_rollup {
        out.push(Violation::RollupAllowed {
            stream: stream(),
            delete_markers: !facts.subject_delete_marker_ttl.is_zero(),
        });
    }
    if facts.allow_msg_schedules {
        out.push(Violation::MessageSchedules { stream: stream() });
    }
    // A transform of other subjects leaves ours alone; an empty source means every subject.
    if let Some(transform) = facts.subject_transform.as_ref().filter(|t| {
        let source = if t.source.is_empty() { ">" } else { &t.source };
        req.subject_filters
            .iter()
            .any(|filter| subjects_collide(source, filter))
    }) {
        out.push(Violation::SubjectTransform {
            stream: stream(),
            transform: transform.clone(),
        });
    }
    if facts.persist_mode == PersistMode::Async {
        out.push(Violation::AsyncPersist { stream: stream() });
    }
    if facts.allow_msg_counter {
        out.push(Violation::MessageCounter { stream: stream() });
    }
    if let Some(origin) = &facts.mirror {
        out.push(Violation::Mirror {
            stream: stream(),
            origin: origin.clone(),
        });
    }
    out
}

/// A stream setting that keeps every promise but costs delivery speed: reported (logged at
/// start, shown by the CLI), never refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Advice {
    /// The server has fast-batch publishing (2.14+) and the stream does not allow it
    /// (`allow_batched` is false): the sink cannot pipeline through fast batches and falls back to
    /// one acknowledgement per event.
    BatchedNotAllowed {
        /// Stream name.
        stream: String,
        /// The connected server's version.
        server: ServerVersion,
        /// The stream's replica count, which decides the fallback: chaining on one replica,
        /// per-key-serial on more (chaining is unsafe on a replicated stream of 2.11+).
        replicas: u32,
    },
}

impl Advice {
    /// The stream configuration field concerned, as named in the NATS stream configuration.
    pub fn field(&self) -> &'static str {
        match self {
            Advice::BatchedNotAllowed { .. } => "allow_batched",
        }
    }

    /// The name of the stream concerned.
    pub fn stream(&self) -> &str {
        match self {
            Advice::BatchedNotAllowed { stream, .. } => stream,
        }
    }
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.field();
        match self {
            Advice::BatchedNotAllowed {
                stream,
                server,
                replicas,
            } => {
                let fallback = if chaining_hazard(Some(*server), *replicas).is_some() {
                    format!(
                        "per-key-serial on this {replicas}-replica stream (chaining is unsafe on \
                         replicated streams of 2.11+): one publish in flight per ordering key, far \
                         slower"
                    )
                } else {
                    "chained on this single-replica stream: pipelined while the sink is the \
                     stream's only writer, one publish in flight per ordering key once other \
                     producers write (far slower)"
                        .to_owned()
                };
                write!(
                    f,
                    "stream {stream} {field} is false on nats-server {server}; without fast-batch \
                     publishing the sink falls back to one acknowledgement per event, {fallback}: \
                     set {field} to true in the stream config (with the nats CLI: `nats stream \
                     edit {stream} --allow-fast`)"
                )
            }
        }
    }
}

/// Lists what the stream `facts` could do better on a server of version `server` (empty when
/// nothing, or when the version is unknown: then nothing can be promised about it). Nothing here
/// is a [`Violation`]: the sink works with the stream as it is.
///
/// ```
/// use sink_core::capability::ServerVersion;
/// use sink_core::stream::{advise, StreamFacts};
///
/// let facts = StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".into()]);
/// assert!(advise(&facts, ServerVersion::parse("2.12.8")).is_empty());
/// let advice = advise(&facts, ServerVersion::parse("2.15.1"));
/// assert_eq!(advice.len(), 1);
/// assert_eq!(advice[0].field(), "allow_batched");
/// ```
pub fn advise(facts: &StreamFacts, server: Option<ServerVersion>) -> Vec<Advice> {
    let mut out = Vec::new();
    if let Some(server) = server.filter(fast_batch_supported) {
        if !facts.allow_batched {
            out.push(Advice::BatchedNotAllowed {
                stream: facts.name.clone(),
                server,
                replicas: facts.replicas,
            });
        }
    }
    out
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

/// True iff some concrete subject matches both `a` and `b` (wildcards allowed); false when either
/// is not a valid subject.
pub fn subjects_collide(a: &str, b: &str) -> bool {
    let (Some(a), Some(b)) = (tokens(a), tokens(b)) else {
        return false;
    };
    for (x, y) in a.iter().zip(&b) {
        // Both have a token here, and `>` matches one or more.
        if *x == ">" || *y == ">" {
            return true;
        }
        if *x != "*" && *y != "*" && x != y {
            return false;
        }
    }
    a.len() == b.len()
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
            (
                StreamFacts {
                    max_msgs_per_subject: 1,
                    ..ok.clone()
                },
                vec!["max_msgs_per_subject"],
            ),
            (
                StreamFacts {
                    max_msgs_per_subject: 10,
                    discard: DiscardKind::New,
                    discard_new_per_subject: true,
                    ..ok.clone()
                },
                vec!["max_msgs_per_subject"],
            ),
            (
                StreamFacts {
                    max_msgs_per_subject: 0,
                    ..ok.clone()
                },
                vec![],
            ),
            (
                StreamFacts {
                    allow_rollup: true,
                    ..ok.clone()
                },
                vec!["allow_rollup_hdrs"],
            ),
            (
                // The server turns rollups on with delete markers; the markers alone evict nothing.
                StreamFacts {
                    allow_rollup: true,
                    subject_delete_marker_ttl: Duration::from_secs(60),
                    ..ok.clone()
                },
                vec!["allow_rollup_hdrs"],
            ),
            (
                StreamFacts {
                    allow_msg_schedules: true,
                    allow_rollup: true,
                    ..ok.clone()
                },
                vec!["allow_rollup_hdrs", "allow_msg_schedules"],
            ),
            (
                StreamFacts {
                    subject_transform: Some(SubjectTransform {
                        source: "cellos.events.>".to_owned(),
                        destination: "archive.>".to_owned(),
                    }),
                    ..ok.clone()
                },
                vec!["subject_transform"],
            ),
            (
                StreamFacts {
                    subject_transform: Some(SubjectTransform {
                        source: String::new(),
                        destination: "x.>".to_owned(),
                    }),
                    ..ok.clone()
                },
                vec!["subject_transform"],
            ),
            (
                StreamFacts {
                    subject_transform: Some(SubjectTransform {
                        source: "cellos.events.acme.v1".to_owned(),
                        destination: "cellos.events.acme.v2".to_owned(),
                    }),
                    ..ok.clone()
                },
                vec!["subject_transform"],
            ),
            (
                // Transforms of subjects the sink never produces leave its events alone.
                StreamFacts {
                    subjects: vec!["cellos.events.>".to_owned(), "legacy.>".to_owned()],
                    subject_transform: Some(SubjectTransform {
                        source: "legacy.>".to_owned(),
                        destination: "cellos.events.legacy.>".to_owned(),
                    }),
                    ..ok.clone()
                },
                vec![],
            ),
            (
                StreamFacts {
                    persist_mode: PersistMode::Async,
                    ..ok.clone()
                },
                vec!["persist_mode"],
            ),
            (
                StreamFacts {
                    allow_msg_counter: true,
                    ..ok.clone()
                },
                vec!["allow_msg_counter"],
            ),
            (
                // A mirror has no subjects of its own.
                StreamFacts {
                    subjects: vec![],
                    mirror: Some("ORIGIN".to_owned()),
                    ..ok.clone()
                },
                vec!["subjects", "mirror"],
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
    fn lossy_settings_each_named_with_value_and_fix() {
        let facts = StreamFacts {
            max_msgs_per_subject: 5,
            allow_rollup: true,
            allow_msg_schedules: true,
            subject_delete_marker_ttl: Duration::from_secs(60),
            subject_transform: Some(SubjectTransform {
                source: "cellos.events.*.v1".to_owned(),
                destination: "cellos.archive.{{wildcard(1)}}".to_owned(),
            }),
            persist_mode: PersistMode::Async,
            allow_msg_counter: true,
            mirror: Some("ORIGIN".to_owned()),
            ..StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".to_owned()])
        };
        let report: Vec<String> = verify(&facts, &req())
            .iter()
            .map(|v| format!("{}: {v}", v.field()))
            .collect();
        insta::assert_snapshot!(report.join("\n"), @r#"
        max_msgs_per_subject: stream CELLOS_EVENTS max_msgs_per_subject is 5; each subject (each tenant) keeps only its newest 5 events and older ones are deleted, whatever the retention floor: set max_msgs_per_subject to -1 (unlimited)
        allow_rollup_hdrs: stream CELLOS_EVENTS allow_rollup_hdrs is true; one message with a Nats-Rollup header from any publisher purges the whole stream or a subject, deleting our events: set allow_rollup_hdrs to false (and subject_delete_marker_ttl to 0 first: it keeps rollups on)
        allow_msg_schedules: stream CELLOS_EVENTS allow_msg_schedules is true; a scheduled message can target our subjects with Nats-Schedule-Rollup and purge a tenant's events, and it keeps rollups on: schedules cannot be turned off once on, so use a stream without allow_msg_schedules
        subject_transform: stream CELLOS_EVENTS subject_transform maps "cellos.events.*.v1" to "cellos.archive.{{wildcard(1)}}"; events are stored under another subject than the one they were sent to: remove the subject transform
        persist_mode: stream CELLOS_EVENTS persist_mode is async; publishes are acknowledged before they are written, so an acknowledged event can be lost when the server dies: persist_mode cannot be changed, so use a stream with persist_mode default
        allow_msg_counter: stream CELLOS_EVENTS allow_msg_counter is true; a counter stream refuses every message without a Nats-Incr header: allow_msg_counter cannot be changed, so use a stream without counters
        mirror: stream CELLOS_EVENTS mirror is "ORIGIN"; a mirror stores only what it copies from its origin and accepts no publishes: use a stream that is not a mirror (e.g. its origin ORIGIN)
        "#);
        let refusing = StreamFacts {
            max_msgs_per_subject: 5,
            discard: DiscardKind::New,
            discard_new_per_subject: true,
            allow_rollup: true,
            ..StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".to_owned()])
        };
        let report: Vec<String> = verify(&refusing, &req())
            .iter()
            .map(|v| format!("{}: {v}", v.field()))
            .collect();
        insta::assert_snapshot!(report.join("\n"), @r#"
        max_msgs_per_subject: stream CELLOS_EVENTS max_msgs_per_subject is 5 with discard_new_per_subject; a subject (a tenant) holding 5 events refuses every further event: set max_msgs_per_subject to -1 (unlimited) and discard_new_per_subject to false
        allow_rollup_hdrs: stream CELLOS_EVENTS allow_rollup_hdrs is true; one message with a Nats-Rollup header from any publisher purges the whole stream or a subject, deleting our events: set allow_rollup_hdrs to false
        "#);
    }

    #[test]
    fn which_violations_block_delivery() {
        let ok = StreamFacts::recommended("S", vec!["cellos.events.>".to_owned()]);
        let cases: Vec<(StreamFacts, bool)> = vec![
            (
                StreamFacts {
                    subjects: vec!["other.>".to_owned()],
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    storage: StorageKind::Memory,
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    sealed: true,
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    no_ack: true,
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    retention: RetentionKind::Interest,
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    retention: RetentionKind::WorkQueue,
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    persist_mode: PersistMode::Async,
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    allow_msg_counter: true,
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    mirror: Some("O".to_owned()),
                    ..ok.clone()
                },
                true,
            ),
            (
                StreamFacts {
                    max_age: DAY * 30,
                    ..ok.clone()
                },
                false,
            ),
            (
                StreamFacts {
                    duplicate_window: Duration::ZERO,
                    ..ok.clone()
                },
                false,
            ),
            (
                StreamFacts {
                    replicas: 0,
                    ..ok.clone()
                },
                false,
            ),
            (
                StreamFacts {
                    max_msgs: 10,
                    ..ok.clone()
                },
                false,
            ),
            (
                StreamFacts {
                    max_msgs_per_subject: 10,
                    ..ok.clone()
                },
                false,
            ),
            (
                StreamFacts {
                    allow_rollup: true,
                    ..ok.clone()
                },
                false,
            ),
            (
                StreamFacts {
                    allow_msg_schedules: true,
                    ..ok.clone()
                },
                false,
            ),
            (
                StreamFacts {
                    subject_transform: Some(SubjectTransform {
                        source: ">".to_owned(),
                        destination: "x.>".to_owned(),
                    }),
                    ..ok.clone()
                },
                false,
            ),
        ];
        for (facts, blocks) in cases {
            let found = verify(&facts, &req());
            assert_eq!(found.len(), 1, "{facts:?}: {found:?}");
            assert_eq!(found[0].blocks_delivery(), blocks, "{}", found[0]);
        }
    }

    #[test]
    fn subjects_collide_table() {
        let table = [
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.*", "a.b", true),
            ("a.*", "*.b", true),
            ("a.>", "a.b.c", true),
            ("a.>", "a", false),
            (">", "a", true),
            ("a.*", "a.b.c", false),
            ("a.*.c", "a.b.>", true),
            ("x.>", "a.>", false),
            ("", "a", false),
            ("a..b", "a.*.b", false),
        ];
        for (a, b, expected) in table {
            assert_eq!(subjects_collide(a, b), expected, "{a:?} collides {b:?}");
            assert_eq!(subjects_collide(b, a), expected, "{b:?} collides {a:?}");
        }
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

    #[test]
    fn batched_advice_only_on_2_14_and_later_without_allow_batched() {
        let v = |t| ServerVersion::parse(t);
        let off = StreamFacts::recommended("S", vec!["a.>".to_owned()]);
        let on = StreamFacts {
            allow_batched: true,
            ..off.clone()
        };
        let table = [
            (&off, v("2.9.10"), false),
            (&off, v("2.12.8"), false),
            (&off, None, false),
            (&off, v("2.14.0"), true),
            (&off, v("2.15.1"), true),
            (&on, v("2.15.1"), false),
            // A 2.12 server drops nothing it reports, but it cannot batch anyway.
            (&on, v("2.12.8"), false),
        ];
        for (facts, server, advised) in table {
            let found = advise(facts, server);
            assert_eq!(
                !found.is_empty(),
                advised,
                "{server:?} {}",
                facts.allow_batched
            );
            assert!(found
                .iter()
                .all(|a| a.field() == "allow_batched" && a.stream() == "S"));
        }
    }

    #[test]
    fn batched_advice_names_fix_and_cost_for_each_replica_count() {
        let report: Vec<String> = [1, 3]
            .into_iter()
            .flat_map(|replicas| {
                let facts = StreamFacts {
                    replicas,
                    ..StreamFacts::recommended("CELLOS_EVENTS", vec!["cellos.events.>".to_owned()])
                };
                assert!(verify(&facts, &req()).is_empty(), "not a violation");
                advise(&facts, ServerVersion::parse("2.15.1"))
            })
            .map(|a| a.to_string())
            .collect();
        insta::assert_snapshot!(report.join("\n"), @r"
        stream CELLOS_EVENTS allow_batched is false on nats-server 2.15.1; without fast-batch publishing the sink falls back to one acknowledgement per event, chained on this single-replica stream: pipelined while the sink is the stream's only writer, one publish in flight per ordering key once other producers write (far slower): set allow_batched to true in the stream config (with the nats CLI: `nats stream edit CELLOS_EVENTS --allow-fast`)
        stream CELLOS_EVENTS allow_batched is false on nats-server 2.15.1; without fast-batch publishing the sink falls back to one acknowledgement per event, per-key-serial on this 3-replica stream (chaining is unsafe on replicated streams of 2.11+): one publish in flight per ordering key, far slower: set allow_batched to true in the stream config (with the nats CLI: `nats stream edit CELLOS_EVENTS --allow-fast`)
        ");
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
        fn subjects_collide_agrees_with_brute_force(
            a in small_subject(),
            b in small_subject(),
        ) {
            let ta: Vec<&str> = a.split('.').collect();
            let tb: Vec<&str> = b.split('.').collect();
            let reference = concrete_subjects()
                .iter()
                .any(|c| matches(&ta, c) && matches(&tb, c));
            prop_assert_eq!(subjects_collide(&a, &b), reference, "{} collides {}", a, b);
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
