//! The spool machine: appends, group commit, acknowledgements and segment reuse as IO commands and events, without IO.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;

use super::record::{
    data_record_len, encode_data, RecordSeq, SegmentHeader, SegmentId, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};

/// Spool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Size of each segment file in bytes (default 64 MiB; at most 4 GiB).
    pub segment_size: u64,
    /// Bound on record bytes (headers included) held in live segments; an append past it is
    /// refused with [`Refused::Full`] and the sink's when-full policy decides. Default 1 GiB.
    pub max_bytes: u64,
    /// Largest payload accepted (default 8 MiB); must fit in a segment with its header.
    pub max_record: u32,
    /// Prepared segments kept ready so a roll never waits for a file to be created (>= 1,
    /// default 1). Acknowledged segments beyond this many are deleted.
    pub spare_segments: usize,
    /// Random seed for segment salts: fresh per process (the adapter draws it from the OS).
    pub seed: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            segment_size: 64 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            max_record: 8 * 1024 * 1024,
            spare_segments: 1,
            seed: 0,
        }
    }
}

/// A spool setting it cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolConfigError {
    /// A bound that must be at least 1 is 0.
    #[error("spool {field} is 0; it must be at least 1")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// The segment size is outside what the format allows.
    #[error("spool segment_size {found} is outside {min}..={max} bytes")]
    SegmentSize {
        /// The value.
        found: u64,
        /// The smallest size (a header and one smallest record).
        min: u64,
        /// The largest size (record lengths are 32-bit).
        max: u64,
    },
    /// The largest record does not fit in a segment.
    #[error("spool max_record {max_record} does not fit a segment of {segment_size} bytes (at most {fits}); raise segment_size or lower max_record")]
    RecordAboveSegment {
        /// The payload bound.
        max_record: u32,
        /// The segment size.
        segment_size: u64,
        /// The largest payload a segment holds.
        fits: u64,
    },
}

impl SpoolConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), SpoolConfigError> {
        let min = (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 1) as u64;
        let max = u64::from(u32::MAX);
        if !(min..=max).contains(&self.segment_size) {
            return Err(SpoolConfigError::SegmentSize {
                found: self.segment_size,
                min,
                max,
            });
        }
        if self.max_bytes == 0 {
            return Err(SpoolConfigError::Zero { field: "max_bytes" });
        }
        if self.max_record == 0 {
            return Err(SpoolConfigError::Zero {
                field: "max_record",
            });
        }
        if self.spare_segments == 0 {
            return Err(SpoolConfigError::Zero {
                field: "spare_segments",
            });
        }
        let fits = self.segment_size - (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64;
        if u64::from(self.max_record) > fits {
            return Err(SpoolConfigError::RecordAboveSegment {
                max_record: self.max_record,
                segment_size: self.segment_size,
                fits,
            });
        }
        Ok(())
    }
}

/// Names one IO command, so its completion can be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(pub u64);

/// Bytes to write at an offset of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentWrite {
    /// The segment file.
    pub segment: SegmentId,
    /// Byte offset in the file.
    pub offset: u64,
    /// What to write.
    pub bytes: Bytes,
}

/// Work for the adapter. It performs commands one at a time, in the order it polls them, and
/// reports each with [`Spool::handle_done`] or [`Spool::handle_failed`]. Each command is
/// complete only when everything it lists is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoCommand {
    /// Make `segment` an empty, prepared segment: create its file when `create` (it must not
    /// exist), make it `size` bytes long with its blocks allocated (writing zeros over a new
    /// file, or `fallocate`), write `header` at offset 0, fdatasync the file, and when `create`
    /// fsync the directory. When this fails after creating the file, the adapter removes it.
    Prepare {
        /// The segment.
        segment: SegmentId,
        /// Its length in bytes.
        size: u64,
        /// The 64 header bytes.
        header: Bytes,
        /// Whether the file is new.
        create: bool,
    },
    /// A group commit: write every chunk, then fdatasync every segment written. When it
    /// completes, every record in it is durable.
    Commit {
        /// The chunks, in file order.
        writes: Vec<SegmentWrite>,
    },
    /// fdatasync each listed segment (possibly none), then fsync the directory. Issued once
    /// when a recovered spool opens: after a process crash (no power loss) recovery reads
    /// records, and lists files, that were only in the page cache; they are durable only once
    /// this completes ([`SpoolOutput::Durable`] follows when segments are listed).
    Sync {
        /// The live segments.
        segments: Vec<SegmentId>,
    },
    /// Truncate a torn tail: write `len` zero bytes at `offset` and fdatasync. Appends continue
    /// from `offset`.
    Zero {
        /// The segment.
        segment: SegmentId,
        /// Where the torn record starts.
        offset: u64,
        /// How many bytes to zero.
        len: u64,
    },
    /// Quarantine a damaged region: copy bytes `offset..offset + len` of the segment to a side
    /// file in the spool's quarantine directory (named after the segment and offset) and fsync
    /// it; then, when `mark` is given, write it at `offset` and fdatasync the segment. The mark
    /// is a skip record: later recoveries step over the region without counting it again.
    Quarantine {
        /// The segment.
        segment: SegmentId,
        /// Start of the region.
        offset: u64,
        /// Its length.
        len: u64,
        /// First missing sequence, when known.
        first_missing: Option<RecordSeq>,
        /// How many sequences are missing.
        missing: u64,
        /// What to write at `offset` once the copy is durable: a skip record header, or zeros
        /// for a region too short to hold one.
        mark: Option<Bytes>,
    },
    /// Move a whole segment file into the quarantine directory and fsync both directories: its
    /// header is unreadable, so none of its records can be trusted.
    QuarantineSegment {
        /// The segment.
        segment: SegmentId,
        /// Why, for the operator.
        reason: String,
    },
    /// Delete a segment: zero its first 64 bytes (its header), fdatasync, then unlink. No
    /// directory sync is needed: a file that comes back after a crash has no header and is
    /// treated as free.
    Delete {
        /// The segment.
        segment: SegmentId,
    },
}

/// What kind of IO failure the adapter saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorKind {
    /// ENOSPC / EDQUOT: the disk or quota is full.
    NoSpace,
    /// Anything else (EIO, permissions, ...).
    Other,
}

/// An IO failure as the adapter reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct IoError {
    /// The class.
    pub kind: IoErrorKind,
    /// The OS error, for the operator.
    pub message: String,
}

/// What the spool tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolOutput {
    /// Perform this, then report it.
    Io {
        /// Report with this id.
        id: IoId,
        /// The work.
        command: IoCommand,
    },
    /// Every record up to `through` is durable: its append may be confirmed.
    Durable {
        /// The highest durable sequence.
        through: RecordSeq,
    },
    /// A commit failed: records `from..=through` are not durable and never will be through this
    /// machine (they may still be found on disk by the next recovery). The spool is broken:
    /// appends are refused until the adapter reopens it (recovery reads what the disk holds).
    Failed {
        /// First record affected.
        from: RecordSeq,
        /// Last record affected.
        through: RecordSeq,
        /// The IO error.
        error: IoError,
    },
    /// A segment could not be prepared (disk full, most likely). Appends that need a new
    /// segment are refused with [`Refused::NotReady`] until one is; each such refusal retries.
    PrepareFailed {
        /// The segment.
        segment: SegmentId,
        /// The IO error.
        error: IoError,
    },
    /// Appends were refused for want of a segment, and one is ready now.
    Ready,
}

/// Why an append was refused. Nothing was spooled; the caller still owns the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// An empty payload (the record format reserves length 0).
    #[error("empty payload; a spooled record carries at least one byte")]
    Empty,
    /// One payload larger than `max_record`.
    #[error("payload of {len} bytes exceeds the spool's max_record of {max}; raise max_record")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The bound.
        max: u32,
    },
    /// The spool holds `max_bytes`: wait for deliveries (acknowledged segments are freed) or
    /// raise the bound.
    #[error("spool full: {bytes} bytes held, this record needs {record}, bound {max_bytes}; wait for deliveries or raise max_bytes")]
    Full {
        /// Record bytes held.
        bytes: u64,
        /// Bytes this record needs.
        record: u64,
        /// The bound.
        max_bytes: u64,
    },
    /// No segment to write into: the spool is opening, or the next segment is being prepared,
    /// or preparing it failed (`last_error`, e.g. the disk is full). Wait for
    /// [`SpoolOutput::Ready`].
    #[error("spool not ready: no prepared segment{}", match last_error { Some(e) => format!(" (last attempt failed: {e})"), None => String::new() })]
    NotReady {
        /// Why the last preparation failed, if it did.
        last_error: Option<IoError>,
    },
    /// A commit failed; reopen the spool.
    #[error("spool broken by an IO error ({error}); reopen it to recover what the disk holds")]
    Broken {
        /// The failure.
        error: IoError,
    },
}

/// Counts for `health()` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records not yet acknowledged.
    pub records: u64,
    /// Record bytes held in live segments (counted against `max_bytes`).
    pub bytes: u64,
    /// Live segments (holding records not yet freed).
    pub segments: usize,
    /// Prepared, empty segments.
    pub spares: usize,
    /// The oldest record not acknowledged.
    pub oldest: Option<RecordSeq>,
    /// The sequence the next append gets.
    pub next_seq: RecordSeq,
    /// Every record up to this one is durable.
    pub durable_through: RecordSeq,
    /// Every record up to this one is acknowledged.
    pub acked_through: RecordSeq,
    /// Damaged regions quarantined by the recovery that opened this spool.
    pub quarantined: u64,
    /// Sequences missing because of damage, found by that recovery.
    pub missing: u64,
    /// Whole segment files quarantined (unreadable header) by that recovery.
    pub damaged_segments: u64,
    /// Torn tails truncated by that recovery (0 or 1).
    pub torn_tails: u64,
}

/// A live segment: holds records, some maybe not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveSegment {
    pub(crate) id: SegmentId,
    pub(crate) salt: u64,
    pub(crate) size: u64,
    pub(crate) last: RecordSeq,
    /// Where the next record goes.
    pub(crate) end: u64,
    /// Record bytes, headers included (skips and quarantined regions too).
    pub(crate) bytes: u64,
}

/// A prepared, empty segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spare {
    id: SegmentId,
    salt: u64,
    size: u64,
}

/// What recovery found, for [`Spool::restore`].
#[derive(Debug, Clone, Default)]
pub(crate) struct RestoredState {
    /// Live segments in sequence order.
    pub(crate) live: Vec<LiveSegment>,
    /// Segments without live records, with their current salt (0 when none): re-prepared as
    /// spares or deleted.
    pub(crate) free: Vec<(SegmentId, u64)>,
    /// Sequence ranges (inclusive) above `acked_through` that hold no record.
    pub(crate) gaps: Vec<(RecordSeq, RecordSeq)>,
    pub(crate) acked_through: RecordSeq,
    pub(crate) next_seq: RecordSeq,
    pub(crate) next_segment: u64,
    /// Unacknowledged records.
    pub(crate) held: u64,
    /// Repairs to run first (zero a torn tail, quarantine).
    pub(crate) repairs: Vec<IoCommand>,
    pub(crate) quarantined: u64,
    pub(crate) missing: u64,
    pub(crate) damaged_segments: u64,
    pub(crate) torn_tails: u64,
}

/// Acknowledged sequences above the contiguous watermark, as disjoint inclusive ranges keyed by
/// their start (acks arrive out of order across ordering keys; quarantine leaves whole ranges).
#[derive(Debug, Clone, Default)]
struct SeqRanges(BTreeMap<RecordSeq, RecordSeq>);

impl SeqRanges {
    fn contains(&self, seq: RecordSeq) -> bool {
        self.0
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| seq <= end)
    }

    /// Adds `from..=to`, which must not overlap what is there.
    fn insert(&mut self, from: RecordSeq, to: RecordSeq) {
        let mut from = from;
        let mut to = to;
        if let Some((&start, &end)) = self.0.range(..from).next_back() {
            if end + 1 == from {
                self.0.remove(&start);
                from = start;
            }
        }
        if let Some(end) = self.0.remove(&(to + 1)) {
            to = end;
        }
        self.0.insert(from, to);
    }

    /// Moves `watermark` over the range starting right after it, if any.
    fn advance(&mut self, watermark: &mut RecordSeq) {
        if let Some(end) = self.0.remove(&(*watermark + 1)) {
            *watermark = end;
        }
    }
}

/// Why an IO command was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Issued {
    Prepare { spare: Spare, create: bool },
    Commit { from: RecordSeq, through: RecordSeq },
    Repair,
    Delete,
}

/// The spool machine. See the [module docs](crate::spool).
#[derive(Debug)]
pub struct Spool {
    config: SpoolConfig,
    /// Oldest first; the last one is the active segment appends go to.
    live: VecDeque<LiveSegment>,
    spares: VecDeque<Spare>,
    preparing: usize,
    /// Why the last preparation failed; automatic preparation waits for a refused append.
    prepare_error: Option<IoError>,
    /// An append was refused for want of a segment: say [`SpoolOutput::Ready`] when one is.
    waiting: bool,
    next_seq: RecordSeq,
    next_segment: u64,
    salts_drawn: u64,
    acked_through: RecordSeq,
    acked_above: SeqRanges,
    held: u64,
    used_bytes: u64,
    /// Appended records not yet handed out in a commit: contiguous chunks per segment.
    staged: Vec<(SegmentId, u64, Vec<u8>)>,
    staged_from: Option<RecordSeq>,
    committing: bool,
    durable_through: RecordSeq,
    commands: VecDeque<(IoId, IoCommand)>,
    issued: HashMap<IoId, Issued>,
    next_io: u64,
    events: VecDeque<SpoolOutput>,
    broken: Option<IoError>,
    stats: SpoolStats,
}

impl Spool {
    /// A new, empty spool (an empty directory). Its first outputs prepare segments; appends are
    /// refused with [`Refused::NotReady`] until [`SpoolOutput::Ready`].
    pub fn new(config: SpoolConfig) -> Result<Spool, SpoolConfigError> {
        config.validate()?;
        Ok(Spool::restore(config, RestoredState::default()))
    }

    /// The machine over what recovery found; `config` was validated by the caller.
    pub(crate) fn restore(config: SpoolConfig, state: RestoredState) -> Spool {
        let mut acked_above = SeqRanges::default();
        for &(from, to) in &state.gaps {
            acked_above.insert(from, to);
        }
        let next_seq = state.next_seq.max(1);
        let mut spool = Spool {
            live: state.live.into(),
            spares: VecDeque::new(),
            preparing: 0,
            prepare_error: None,
            waiting: false,
            next_seq,
            next_segment: state.next_segment.max(1),
            salts_drawn: 0,
            acked_through: state.acked_through,
            acked_above,
            held: state.held,
            used_bytes: 0,
            staged: Vec::new(),
            staged_from: None,
            committing: false,
            // What recovery read may have been in the page cache only: durable once the
            // opening sync completes.
            durable_through: state.acked_through,
            commands: VecDeque::new(),
            issued: HashMap::new(),
            next_io: 0,
            events: VecDeque::new(),
            broken: None,
            stats: SpoolStats {
                quarantined: state.quarantined,
                missing: state.missing,
                damaged_segments: state.damaged_segments,
                torn_tails: state.torn_tails,
                ..SpoolStats::default()
            },
            config,
        };
        spool.used_bytes = spool.live.iter().map(|s| s.bytes).sum();
        spool.acked_above.advance(&mut spool.acked_through);
        for repair in state.repairs {
            spool.issue(repair, Issued::Repair);
        }
        spool.durable_through = spool.acked_through;
        let segments: Vec<SegmentId> = spool.live.iter().map(|s| s.id).collect();
        if segments.is_empty() {
            spool.durable_through = next_seq - 1;
        }
        if !segments.is_empty() || !state.free.is_empty() {
            // Also makes the directory entries durable: after a process crash a file may be
            // listed that was created without a directory sync, and it is about to be reused.
            let why = if segments.is_empty() {
                Issued::Repair
            } else {
                spool.committing = true;
                Issued::Commit {
                    from: spool.durable_through + 1,
                    through: next_seq - 1,
                }
            };
            spool.issue(IoCommand::Sync { segments }, why);
        }
        for (id, old_salt) in state.free {
            spool.recycle(id, old_salt);
        }
        spool.retire_acked();
        spool.ensure_spares();
        spool.waiting = !spool.is_ready();
        spool
    }

    /// The settings.
    pub fn config(&self) -> &SpoolConfig {
        &self.config
    }

    /// Counts for health and metrics.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            records: self.held,
            bytes: self.used_bytes,
            segments: self.live.len(),
            spares: self.spares.len(),
            oldest: (self.held > 0).then_some(self.acked_through + 1),
            next_seq: self.next_seq,
            durable_through: self.durable_through,
            acked_through: self.acked_through,
            ..self.stats
        }
    }

    /// Whether an append of a payload of `len` bytes would fit under `max_bytes` now.
    pub fn has_room(&self, len: usize) -> bool {
        self.used_bytes + data_record_len(len) as u64 <= self.config.max_bytes
    }

    /// Whether appends can be taken now (a segment to write into, not broken).
    pub fn is_ready(&self) -> bool {
        self.broken.is_none() && (!self.spares.is_empty() || self.live.back().is_some())
    }

    /// The error that broke the spool, if one did.
    pub fn broken(&self) -> Option<&IoError> {
        self.broken.as_ref()
    }

    /// Queues `payload` as the next record. It is durable once a [`SpoolOutput::Durable`]
    /// covers its sequence; until then it is only staged or being written.
    pub fn append(&mut self, payload: &[u8]) -> Result<RecordSeq, Refused> {
        if let Some(error) = &self.broken {
            return Err(Refused::Broken {
                error: error.clone(),
            });
        }
        if payload.is_empty() {
            return Err(Refused::Empty);
        }
        if payload.len() > self.config.max_record as usize {
            return Err(Refused::TooLarge {
                len: payload.len(),
                max: self.config.max_record,
            });
        }
        let record = data_record_len(payload.len()) as u64;
        if self.used_bytes + record > self.config.max_bytes {
            return Err(Refused::Full {
                bytes: self.used_bytes,
                record,
                max_bytes: self.config.max_bytes,
            });
        }
        let fits = self
            .live
            .back()
            .is_some_and(|active| active.end + record <= active.size);
        if !fits {
            let Some(spare) = self.spares.pop_front() else {
                self.waiting = true;
                if self.preparing == 0 {
                    // Each refusal for want of a segment retries a failed preparation once.
                    let last_error = self.prepare_error.take();
                    self.ensure_spares();
                    return Err(Refused::NotReady { last_error });
                }
                return Err(Refused::NotReady {
                    last_error: self.prepare_error.clone(),
                });
            };
            self.live.push_back(LiveSegment {
                id: spare.id,
                salt: spare.salt,
                size: spare.size,
                last: 0,
                end: SEGMENT_HEADER_LEN as u64,
                bytes: 0,
            });
            self.ensure_spares();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let acked_through = self.acked_through;
        let active = self.live.back_mut().expect("a live segment to append to");
        let (id, offset, salt) = (active.id, active.end, active.salt);
        active.end += record;
        active.bytes += record;
        active.last = seq;
        self.used_bytes += record;
        self.held += 1;
        match self.staged.last_mut() {
            Some((segment, start, bytes))
                if *segment == id && *start + bytes.len() as u64 == offset =>
            {
                encode_data(bytes, salt, seq, acked_through, payload);
            }
            _ => {
                let mut bytes = Vec::with_capacity(record as usize);
                encode_data(&mut bytes, salt, seq, acked_through, payload);
                self.staged.push((id, offset, bytes));
            }
        }
        self.staged_from.get_or_insert(seq);
        Ok(seq)
    }

    /// The broker stored record `seq`. Acks may come in any order; each whole segment whose
    /// records are all acknowledged (and durable) is freed: reused as a spare or deleted.
    /// Returns whether `seq` was a record held and not yet acknowledged.
    pub fn ack(&mut self, seq: RecordSeq) -> bool {
        if seq <= self.acked_through || seq >= self.next_seq || self.acked_above.contains(seq) {
            return false;
        }
        self.acked_above.insert(seq, seq);
        self.acked_above.advance(&mut self.acked_through);
        self.held -= 1;
        self.retire_acked();
        true
    }

    /// The next output: events first, then IO commands in the order they must be performed.
    /// A group commit is issued when no other is being performed, so every append that arrives
    /// while one commit's fdatasync runs shares the next one.
    pub fn poll_output(&mut self) -> Option<SpoolOutput> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        if self.broken.is_some() {
            return None;
        }
        if let Some((id, command)) = self.commands.pop_front() {
            return Some(SpoolOutput::Io { id, command });
        }
        if !self.committing && !self.staged.is_empty() {
            let from = self
                .staged_from
                .take()
                .expect("staged records have a first sequence");
            let through = self.next_seq - 1;
            let writes = self
                .staged
                .drain(..)
                .map(|(segment, offset, bytes)| SegmentWrite {
                    segment,
                    offset,
                    bytes: Bytes::from(bytes),
                })
                .collect();
            self.committing = true;
            let id = self.next_id();
            self.issued.insert(id, Issued::Commit { from, through });
            return Some(SpoolOutput::Io {
                id,
                command: IoCommand::Commit { writes },
            });
        }
        None
    }

    /// The command `id` completed: everything it listed is durable.
    pub fn handle_done(&mut self, id: IoId) {
        match self.issued.remove(&id) {
            Some(Issued::Commit { through, .. }) => {
                self.committing = false;
                self.durable_through = through;
                self.events.push_back(SpoolOutput::Durable { through });
                self.retire_acked();
            }
            Some(Issued::Prepare { spare, .. }) => {
                self.preparing -= 1;
                self.prepare_error = None;
                self.spares.push_back(spare);
                if self.waiting && self.is_ready() {
                    self.waiting = false;
                    self.events.push_back(SpoolOutput::Ready);
                }
            }
            Some(Issued::Repair | Issued::Delete) | None => {}
        }
    }

    /// The command `id` failed. A failed preparation of a new file leaves the spool working
    /// (see [`SpoolOutput::PrepareFailed`]); any other failure breaks it: after a failed write
    /// or fdatasync the kernel's page cache no longer tells what the disk holds, so the only
    /// safe continuation is to reopen and recover from the disk.
    pub fn handle_failed(&mut self, id: IoId, error: IoError) {
        match self.issued.remove(&id) {
            Some(Issued::Prepare {
                spare,
                create: true,
            }) => {
                self.preparing -= 1;
                self.prepare_error = Some(error.clone());
                self.events.push_back(SpoolOutput::PrepareFailed {
                    segment: spare.id,
                    error,
                });
            }
            Some(
                Issued::Commit { .. } | Issued::Prepare { .. } | Issued::Repair | Issued::Delete,
            ) => {
                self.committing = false;
                self.break_with(error);
            }
            None => {}
        }
    }

    fn break_with(&mut self, error: IoError) {
        if self.broken.is_some() {
            return;
        }
        let from = self.durable_through + 1;
        let through = self.next_seq - 1;
        if from <= through {
            self.events.push_back(SpoolOutput::Failed {
                from,
                through,
                error: error.clone(),
            });
        }
        self.staged.clear();
        self.staged_from = None;
        self.commands.clear();
        self.broken = Some(error);
    }

    fn next_id(&mut self) -> IoId {
        self.next_io += 1;
        IoId(self.next_io)
    }

    fn issue(&mut self, command: IoCommand, why: Issued) {
        let id = self.next_id();
        self.issued.insert(id, why);
        self.commands.push_back((id, command));
    }

    /// A fresh salt for a new life of `segment`, never its previous one: the seed differs per
    /// process, and mixing in the previous salt keeps a re-prepared file's old records invalid
    /// even if a seed were reused.
    fn draw_salt(&mut self, segment: SegmentId, previous: u64) -> u64 {
        loop {
            self.salts_drawn += 1;
            let salt = splitmix64(
                self.config.seed
                    ^ splitmix64(segment.0)
                    ^ splitmix64(self.salts_drawn.rotate_left(32))
                    ^ previous,
            );
            if salt != previous && salt != 0 {
                return salt;
            }
        }
    }

    /// Keeps `spare_segments` spares ready or being prepared, creating files as needed unless
    /// the last creation failed (then a refused append retries).
    fn ensure_spares(&mut self) {
        while self.broken.is_none()
            && self.prepare_error.is_none()
            && self.spares.len() + self.preparing < self.config.spare_segments
        {
            let id = SegmentId(self.next_segment);
            self.next_segment += 1;
            self.prepare(id, 0, true);
        }
    }

    fn prepare(&mut self, id: SegmentId, previous_salt: u64, create: bool) {
        let spare = Spare {
            id,
            salt: self.draw_salt(id, previous_salt),
            size: self.config.segment_size,
        };
        let header = SegmentHeader {
            segment: id,
            salt: spare.salt,
            size: spare.size,
        };
        self.preparing += 1;
        self.issue(
            IoCommand::Prepare {
                segment: id,
                size: spare.size,
                header: Bytes::copy_from_slice(&header.encode()),
                create,
            },
            Issued::Prepare { spare, create },
        );
    }

    /// A segment without live records: a spare again if one is wanted, else deleted.
    fn recycle(&mut self, id: SegmentId, old_salt: u64) {
        if self.spares.len() + self.preparing < self.config.spare_segments {
            self.prepare(id, old_salt, false);
        } else {
            self.issue(IoCommand::Delete { segment: id }, Issued::Delete);
        }
    }

    /// Frees leading segments whose records are all acknowledged and durable (never the
    /// active one, which appends still go to).
    fn retire_acked(&mut self) {
        let freed = self.acked_through.min(self.durable_through);
        while self.live.len() > 1 && self.live.front().is_some_and(|s| s.last <= freed) {
            let segment = self.live.pop_front().expect("checked");
            self.used_bytes -= segment.bytes;
            if self.broken.is_none() {
                self.recycle(segment.id, segment.salt);
            }
        }
    }
}

/// splitmix64's output function: a bijective mix of 64 bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_ranges_merge_and_advance() {
        let mut r = SeqRanges::default();
        r.insert(5, 5);
        r.insert(7, 9);
        r.insert(6, 6);
        assert_eq!(r.0, BTreeMap::from([(5, 9)]));
        assert!(r.contains(8) && !r.contains(4) && !r.contains(10));
        let mut w = 3;
        r.advance(&mut w);
        assert_eq!(w, 3, "4 is not acknowledged");
        r.insert(4, 4);
        r.advance(&mut w);
        assert_eq!((w, r.0.len()), (9, 0));
    }
}
