//! Recovery: rebuilds the spool machine from the segment files a directory holds, plans the replay, and lists the repairs (torn tail, quarantine).

use std::collections::BTreeSet;

use bytes::Bytes;

use super::machine::{IoCommand, LiveSegment, RestoredState, Spool, SpoolConfig, SpoolConfigError};
use super::record::{
    claimed, decode_record, encode_skip, Claimed, DecodeError, HeaderError, Record, RecordSeq,
    SegmentHeader, SegmentId, RECORD_HEADER_LEN, RECORD_MAGIC, RECORD_VERSION, SEGMENT_HEADER_LEN,
};

/// Why a spool cannot be opened. Damage is never an error (it is repaired and counted); only
/// what must not be touched is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// A segment written by a newer jetsink: refusing it keeps its data intact.
    #[error("spool segment {segment} has format version {found}, newer than this build reads ({supported}); open the spool with the jetsink version that wrote it (or a newer one), or drain it with that version first")]
    NewerFormat {
        /// The segment.
        segment: SegmentId,
        /// The version in the file.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// The same segment was added twice (an adapter bug).
    #[error("segment {segment} was added to the recovery twice")]
    DuplicateSegment {
        /// The segment.
        segment: SegmentId,
    },
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] SpoolConfigError),
}

/// A damaged region found by recovery; the adapter copies it aside ([`IoCommand::Quarantine`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRegion {
    /// The segment.
    pub segment: SegmentId,
    /// Start of the region.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The first sequence lost with it, when known (not known for damage at the very start of
    /// the oldest segment).
    pub first_missing: Option<RecordSeq>,
    /// How many sequences were lost.
    pub missing: u64,
}

/// A torn record at the end of the log, zeroed by [`IoCommand::Zero`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub segment: SegmentId,
    /// Where the torn record starts (and appends continue).
    pub offset: u64,
    /// Bytes zeroed.
    pub len: u64,
    /// The sequence it claimed.
    pub seq: RecordSeq,
}

/// What recovery found, for the operator (`jetsink spool status`) and for the logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records to replay (not acknowledged).
    pub records: u64,
    /// Record bytes held in live segments.
    pub bytes: u64,
    /// Live segments.
    pub segments: usize,
    /// Segments without live records (reused as spares or deleted).
    pub free_segments: usize,
    /// The first record to replay.
    pub oldest: Option<RecordSeq>,
    /// The sequence the next append gets.
    pub next_seq: RecordSeq,
    /// Every record up to this one was acknowledged before the spool closed.
    pub acked_through: RecordSeq,
    /// Damaged regions found now.
    pub quarantined: Vec<QuarantinedRegion>,
    /// Regions quarantined by an earlier recovery (skip records met).
    pub previously_quarantined: u64,
    /// Sequences absent for no region this recovery can point at (between segments, with no
    /// leftover bytes to copy).
    pub unexplained_missing: u64,
    /// The torn tail, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Segment files whose header is unreadable, moved aside whole.
    pub damaged_segments: Vec<(SegmentId, String)>,
}

/// The result of a recovery.
#[derive(Debug)]
pub struct Recovered {
    /// The machine, with the repairs as its first IO commands.
    pub spool: Spool,
    /// What to deliver again, in order.
    pub replay: Vec<ReplaySegment>,
    /// What was found.
    pub report: RecoveryReport,
}

/// Rebuilds a spool from its segment files, one at a time (a segment's bytes are needed only
/// while it is added, so memory stays at one segment): [`Recovery::add_segment`] for every
/// `*.jspool` file of the directory, in any order, then [`Recovery::finish`].
///
/// # What recovery decides
///
/// - Records are valid when their checksum (seeded with the segment's salt) matches and their
///   sequence is above the previous record's. Segments are ordered by their first valid record.
/// - A **torn tail**: after the last valid record of the last segment, a record of ours with
///   the next sequence that does not check out (short, or bad checksum). It was being written
///   at the crash and never confirmed durable: it is zeroed and appends continue there.
///   Anything else after the last record (zeros, leftovers of the file's previous life, an
///   unrecognisable partial header) is simply overwritten by the next appends. When the torn
///   record is the first of a freshly rolled segment, that segment (valid header, no valid
///   record) becomes the empty last segment.
/// - A **damaged region**: bytes that are not a valid record, followed by a valid record (in
///   the same segment, or, at the end of a segment, a later segment that starts past the next
///   expected sequence). It is copied to the quarantine side file, marked with a skip record,
///   and counted with the sequences it lost; the records after it are replayed. A crash can
///   also produce such a region (writes not yet synced reach the disk in any order), so a
///   region covers records that were lost *or* never confirmed; it is never skipped silently.
/// - A segment with an unreadable header is moved aside whole; one from a newer format version
///   stops the recovery with [`RecoverError::NewerFormat`].
/// - Records up to the highest acked-through value written in any record are not replayed.
#[derive(Debug)]
pub struct Recovery {
    config: SpoolConfig,
    scanned: Vec<Scanned>,
    /// Segments with a header and no valid record: free, or the torn start of the tail.
    empty: Vec<Scanned>,
    free: Vec<(SegmentId, u64)>,
    damaged: Vec<(SegmentId, String)>,
    seen: BTreeSet<SegmentId>,
}

/// Bytes that are not records, between two valid records of one segment.
#[derive(Debug, Clone)]
struct Region {
    offset: u64,
    len: u64,
    /// The sequence after the last valid record before it, when one is in this segment.
    first_missing: Option<RecordSeq>,
    /// The first sequence the valid record after it accounts for.
    resumes_at: RecordSeq,
    /// The sequence its first header still names, when readable and plausible.
    claimed: Option<RecordSeq>,
}

/// What follows the last valid record of a segment.
#[derive(Debug, Clone)]
struct Trailing {
    offset: u64,
    /// Bytes up to the last non-zero one.
    extent: u64,
    /// The header fields there, when they look like one of our records.
    claimed: Option<Claimed>,
}

/// One segment as scanned.
#[derive(Debug, Clone)]
struct Scanned {
    id: SegmentId,
    salt: u64,
    size: u64,
    /// Data sequences held, as contiguous inclusive runs.
    runs: Vec<(RecordSeq, RecordSeq)>,
    /// First sequence accounted for (data, or the start of a skip).
    first: RecordSeq,
    /// Last sequence accounted for.
    last: RecordSeq,
    acked_max: RecordSeq,
    /// Offset after the last valid record.
    end: u64,
    regions: Vec<Region>,
    trailing: Option<Trailing>,
    skips: u64,
}

impl Recovery {
    /// Starts a recovery (or the opening of an empty directory).
    pub fn new(config: SpoolConfig) -> Result<Recovery, RecoverError> {
        config.validate()?;
        Ok(Recovery {
            config,
            scanned: Vec::new(),
            empty: Vec::new(),
            free: Vec::new(),
            damaged: Vec::new(),
            seen: BTreeSet::new(),
        })
    }

    /// Adds one segment file: its id (from its name) and its whole content.
    pub fn add_segment(&mut self, segment: SegmentId, bytes: &[u8]) -> Result<(), RecoverError> {
        if !self.seen.insert(segment) {
            return Err(RecoverError::DuplicateSegment { segment });
        }
        let header = match SegmentHeader::decode(bytes) {
            Ok(Some(header)) => header,
            Ok(None) => {
                self.free.push((segment, 0));
                return Ok(());
            }
            Err(HeaderError::NewerVersion { found, supported }) => {
                return Err(RecoverError::NewerFormat {
                    segment,
                    found,
                    supported,
                })
            }
            Err(error) => {
                self.damaged.push((segment, error.to_string()));
                return Ok(());
            }
        };
        if header.segment != segment {
            self.damaged.push((
                segment,
                format!("its header names segment {}", header.segment),
            ));
            return Ok(());
        }
        let scanned = scan(segment, &header, bytes);
        if scanned.runs.is_empty() && scanned.last == 0 {
            self.empty.push(scanned);
        } else {
            self.scanned.push(scanned);
        }
        Ok(())
    }

    /// Decides what the spool holds and builds the machine.
    pub fn finish(self) -> Result<Recovered, RecoverError> {
        let Recovery {
            config,
            mut scanned,
            empty,
            mut free,
            mut damaged,
            seen,
        } = self;
        scanned.sort_by_key(|s| (s.first, s.id));
        // Two segments claiming the same sequences cannot both be right; the later file is
        // moved aside rather than guessed at.
        let mut live: Vec<Scanned> = Vec::new();
        for s in scanned {
            match live.last() {
                Some(prev) if s.first <= prev.last => damaged.push((
                    s.id,
                    format!(
                        "its records {}..={} overlap segment {}",
                        s.first, s.last, prev.id
                    ),
                )),
                _ => live.push(s),
            }
        }

        let mut report = RecoveryReport::default();
        let mut repairs = Vec::new();
        for (segment, reason) in &damaged {
            repairs.push(IoCommand::QuarantineSegment {
                segment: *segment,
                reason: reason.clone(),
            });
        }
        report.damaged_segments = damaged;

        let mut previous: Option<&Scanned> = None;
        for s in &live {
            let before = previous.map(|p| p.last);
            // Whether the sequences missing before this segment are already accounted for.
            let mut gap_taken = false;
            if let (Some(p), Some(last)) = (previous, before) {
                if s.first > last + 1 {
                    // Sequences are missing between two segments: the damage sits at the end
                    // of the earlier one, or at the start of this one. When both hold damaged
                    // bytes the split is unknown: the earlier one carries the count.
                    let leading = s.regions.first().is_some_and(|r| r.first_missing.is_none());
                    match &p.trailing {
                        Some(t) if t.extent > 0 => {
                            quarantine(
                                &mut report,
                                &mut repairs,
                                p,
                                Damaged {
                                    offset: t.offset,
                                    len: t.extent,
                                    // Nothing valid follows in that segment: the mark may
                                    // reach past the damaged bytes.
                                    room: p.size - t.offset,
                                    first_missing: Some(last + 1),
                                    resumes_at: s.first,
                                },
                            );
                            gap_taken = true;
                        }
                        _ if leading => {}
                        _ => report.unexplained_missing += s.first - last - 1,
                    }
                }
            }
            report.previously_quarantined += s.skips;
            for r in &s.regions {
                let first_missing = match r.first_missing {
                    Some(f) => Some(f),
                    None if gap_taken => None,
                    None => before.map(|b| b + 1).or(r.claimed),
                };
                quarantine(
                    &mut report,
                    &mut repairs,
                    s,
                    Damaged {
                        offset: r.offset,
                        len: r.len,
                        room: r.len,
                        first_missing,
                        resumes_at: r.resumes_at,
                    },
                );
            }
            previous = Some(s);
        }

        // The tail may have rolled into a segment whose first record is torn: that segment
        // (valid header, no valid record, a record of ours with the next sequence at its
        // start) becomes the last, empty, live segment. Other empty segments are free.
        let expected = live.last().map_or(0, |s| s.last) + 1;
        let mut tail_found = false;
        for mut e in empty {
            let torn_start = expected > 1
                && e.trailing
                    .as_ref()
                    .and_then(|t| t.claimed)
                    .is_some_and(|c| c.seq == expected);
            if torn_start && !tail_found {
                tail_found = true;
                e.last = expected - 1;
                e.first = expected;
                live.push(e);
            } else {
                free.push((e.id, e.salt));
            }
        }

        // The tail: a torn record of ours right after the last valid one is zeroed.
        let mut active_end = None;
        if let Some(last) = live.last() {
            if let Some(t) = &last.trailing {
                if let Some(c) = t.claimed.filter(|c| c.seq == last.last + 1) {
                    let len = c.len.min(last.size - t.offset);
                    repairs.push(IoCommand::Zero {
                        segment: last.id,
                        offset: t.offset,
                        len,
                    });
                    report.torn_tail = Some(TornTail {
                        segment: last.id,
                        offset: t.offset,
                        len,
                        seq: c.seq,
                    });
                }
            }
            active_end = Some(last.end);
        }

        let first_data = live.iter().flat_map(|s| s.runs.first()).map(|r| r.0).min();
        let acked_through = live
            .iter()
            .map(|s| s.acked_max)
            .chain(first_data.map(|f| f - 1))
            .max()
            .unwrap_or(0);
        let last_seq = live.last().map_or(0, |s| s.last);
        let next_seq = last_seq.max(acked_through) + 1;

        // Sequences above the watermark that hold no data record count as acknowledged.
        let mut gaps = Vec::new();
        let mut held = 0;
        let mut cursor = acked_through + 1;
        for &(from, to) in live.iter().flat_map(|s| &s.runs) {
            if to < cursor {
                continue;
            }
            let from = from.max(cursor);
            if from > cursor {
                gaps.push((cursor, from - 1));
            }
            held += to - from + 1;
            cursor = to + 1;
        }
        if cursor < next_seq {
            gaps.push((cursor, next_seq - 1));
        }

        let replay = live
            .iter()
            .map(|s| ReplaySegment {
                segment: s.id,
                salt: s.salt,
                start: SEGMENT_HEADER_LEN as u64,
                end: s.end,
                regions: s.regions.iter().map(|r| (r.offset, r.len)).collect(),
                after: acked_through,
            })
            .collect();

        let live_segments: Vec<LiveSegment> = live
            .iter()
            .map(|s| LiveSegment {
                id: s.id,
                salt: s.salt,
                size: s.size,
                last: s.last,
                end: s.end,
                bytes: s.end - SEGMENT_HEADER_LEN as u64,
            })
            .collect();
        debug_assert!(active_end.is_none_or(|e| live_segments.last().is_some_and(|l| l.end == e)));

        report.records = held;
        report.bytes = live_segments.iter().map(|s| s.bytes).sum();
        report.segments = live_segments.len();
        report.free_segments = free.len();
        report.oldest = (held > 0).then_some(acked_through + 1);
        report.next_seq = next_seq;
        report.acked_through = acked_through;

        let state = RestoredState {
            live: live_segments,
            free,
            gaps,
            acked_through,
            next_seq,
            next_segment: seen.last().map_or(1, |id| id.0 + 1),
            held,
            repairs,
            quarantined: report.quarantined.len() as u64,
            missing: report.quarantined.iter().map(|q| q.missing).sum::<u64>()
                + report.unexplained_missing,
            damaged_segments: report.damaged_segments.len() as u64,
            torn_tails: u64::from(report.torn_tail.is_some()),
        };
        Ok(Recovered {
            spool: Spool::restore(config, state),
            replay,
            report,
        })
    }
}

/// A damaged region to quarantine.
struct Damaged {
    offset: u64,
    /// The damaged bytes (copied aside).
    len: u64,
    /// Bytes the skip mark may cover (at least `len`).
    room: u64,
    first_missing: Option<RecordSeq>,
    resumes_at: RecordSeq,
}

/// Queues the quarantine of a damaged region and reports it. The skip mark covers the region,
/// or a whole record header's worth when the region is shorter and room allows; a region too
/// short for any mark is zeroed after the copy (its loss then shows as missing sequences).
fn quarantine(report: &mut RecoveryReport, repairs: &mut Vec<IoCommand>, s: &Scanned, d: Damaged) {
    let missing = d
        .first_missing
        .map_or(0, |f| d.resumes_at.saturating_sub(f));
    let covered = d.len.max(RECORD_HEADER_LEN as u64);
    let mark = if covered <= d.room {
        encode_skip(s.salt, d.first_missing.unwrap_or(0), missing, covered).to_vec()
    } else {
        vec![0; d.len as usize]
    };
    repairs.push(IoCommand::Quarantine {
        segment: s.id,
        offset: d.offset,
        len: d.len,
        first_missing: d.first_missing,
        missing,
        mark: Some(Bytes::from(mark)),
    });
    report.quarantined.push(QuarantinedRegion {
        segment: s.id,
        offset: d.offset,
        len: d.len,
        first_missing: d.first_missing,
        missing,
    });
}

/// Whether a valid record may follow `prev` (the last sequence accounted for in this segment).
fn follows(prev: Option<RecordSeq>, record: &Record<'_>) -> bool {
    match *record {
        Record::Data { seq, .. } => seq >= 1 && prev.is_none_or(|p| seq > p),
        Record::Skip { first_missing, .. } => match prev {
            None => true,
            Some(p) => first_missing > p,
        },
    }
}

/// Scans one segment (one without a valid record has no runs).
fn scan(id: SegmentId, header: &SegmentHeader, bytes: &[u8]) -> Scanned {
    let limit = (header.size.min(bytes.len() as u64)) as usize;
    let salt = header.salt;
    let mut s = Scanned {
        id,
        salt,
        size: header.size,
        runs: Vec::new(),
        first: 0,
        last: 0,
        acked_max: 0,
        end: SEGMENT_HEADER_LEN as u64,
        regions: Vec::new(),
        trailing: None,
        skips: 0,
    };
    let mut prev: Option<RecordSeq> = None;
    let mut off = SEGMENT_HEADER_LEN.min(limit);
    let mut any = false;
    while off < limit {
        let decoded = decode_record(&bytes[off..limit], salt);
        match decoded {
            Ok(record) if follows(prev, &record) => {
                any = true;
                match record {
                    Record::Data {
                        seq, acked_through, ..
                    } => {
                        match s.runs.last_mut() {
                            Some(run) if run.1 + 1 == seq => run.1 = seq,
                            _ => s.runs.push((seq, seq)),
                        }
                        s.acked_max = s.acked_max.max(acked_through);
                        if prev.is_none() {
                            s.first = seq;
                        }
                        prev = Some(seq);
                    }
                    Record::Skip {
                        first_missing,
                        missing,
                        ..
                    } => {
                        s.skips += 1;
                        if first_missing > 0 {
                            if prev.is_none() {
                                s.first = first_missing;
                            }
                            prev = Some(first_missing + missing.max(1) - 1);
                        }
                    }
                }
                off += record.encoded_len();
                s.end = off as u64;
            }
            _ => match find_next(bytes, off + 1, limit, salt, prev) {
                Some((at, resumes_at)) => {
                    s.regions.push(Region {
                        offset: off as u64,
                        len: (at - off) as u64,
                        first_missing: prev.map(|p| p + 1),
                        resumes_at,
                        claimed: claimed(&bytes[off..limit])
                            .map(|c| c.seq)
                            .filter(|&c| c >= 1 && c < resumes_at && prev.is_none_or(|p| c > p)),
                    });
                    off = at;
                }
                None => {
                    let extent = bytes[off..limit]
                        .iter()
                        .rposition(|&b| b != 0)
                        .map_or(0, |i| i as u64 + 1);
                    s.trailing = Some(Trailing {
                        offset: off as u64,
                        extent,
                        claimed: claimed(&bytes[off..limit]),
                    });
                    break;
                }
            },
        }
    }
    s.last = prev.unwrap_or(0);
    // A segment whose only valid records are skips with unknown sequences still holds
    // nothing to order by: it is empty.
    if !(any && prev.is_some()) {
        s.runs.clear();
        s.regions.clear();
        s.end = SEGMENT_HEADER_LEN as u64;
    }
    s
}

/// The next offset from `from` where a valid record that may follow `prev` starts, with the
/// first sequence it accounts for.
fn find_next(
    bytes: &[u8],
    from: usize,
    limit: usize,
    salt: u64,
    prev: Option<RecordSeq>,
) -> Option<(usize, RecordSeq)> {
    let mut at = from;
    while at + RECORD_HEADER_LEN <= limit {
        let rel = bytes[at + 4..limit - RECORD_HEADER_LEN + 5]
            .iter()
            .position(|&b| b == RECORD_MAGIC)?;
        at += rel;
        if bytes[at + 5] == RECORD_VERSION {
            if let Ok(record) = decode_record(&bytes[at..limit], salt) {
                if follows(prev, &record) {
                    let resumes_at = match record {
                        Record::Data { seq, .. } => seq,
                        Record::Skip { first_missing, .. } => first_missing,
                    };
                    return Some((at, resumes_at));
                }
            }
        }
        at += 1;
    }
    None
}

/// One live segment's part of the replay: decode its records again from the file with
/// [`ReplaySegment::records`]. Recovery keeps no payloads, so memory stays flat however much
/// is spooled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySegment {
    /// The segment file.
    pub segment: SegmentId,
    /// Its salt.
    pub salt: u64,
    /// Where its records start.
    pub start: u64,
    /// Where they end.
    pub end: u64,
    /// Damaged regions to step over (offset, length), in order.
    pub regions: Vec<(u64, u64)>,
    /// Records up to this sequence are acknowledged: not replayed.
    pub after: RecordSeq,
}

/// A record to deliver again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed<'a> {
    /// Its sequence (acknowledge it with [`Spool::ack`] once the broker stored it).
    pub seq: RecordSeq,
    /// The payload, as appended.
    pub payload: &'a [u8],
}

/// The segment file changed between recovery and replay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spool segment {segment} changed after recovery: at offset {offset}: {error}")]
pub struct ReplayError {
    /// The segment.
    pub segment: SegmentId,
    /// Where.
    pub offset: u64,
    /// What was found.
    pub error: DecodeError,
}

impl ReplaySegment {
    /// The records to deliver, in order, from the segment's bytes (read again from the file;
    /// repairs done since recovery do not change them).
    pub fn records<'a>(&'a self, bytes: &'a [u8]) -> ReplayRecords<'a> {
        ReplayRecords {
            plan: self,
            bytes,
            offset: self.start,
            region: 0,
            done: false,
        }
    }
}

/// Iterator over a segment's records to replay.
#[derive(Debug)]
pub struct ReplayRecords<'a> {
    plan: &'a ReplaySegment,
    bytes: &'a [u8],
    offset: u64,
    region: usize,
    done: bool,
}

impl<'a> Iterator for ReplayRecords<'a> {
    type Item = Result<Replayed<'a>, ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = self.plan.end.min(self.bytes.len() as u64);
        while !self.done && self.offset < self.plan.end {
            if let Some(&(at, len)) = self.plan.regions.get(self.region) {
                if at == self.offset {
                    self.offset += len;
                    self.region += 1;
                    continue;
                }
            }
            let slice = self
                .bytes
                .get(self.offset as usize..end as usize)
                .unwrap_or(&[]);
            match decode_record(slice, self.plan.salt) {
                Ok(record) => {
                    self.offset += record.encoded_len() as u64;
                    if let Record::Data { seq, payload, .. } = record {
                        if seq > self.plan.after {
                            return Some(Ok(Replayed { seq, payload }));
                        }
                    }
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(ReplayError {
                        segment: self.plan.segment,
                        offset: self.offset,
                        error,
                    }));
                }
            }
        }
        None
    }
}
