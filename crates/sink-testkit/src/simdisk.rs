//! A simulated disk for the spool: performs the spool machine's IO commands in memory, one primitive operation at a time, and models what a crash leaves.
//!
//! [`SimDisk::plan`] turns an [`IoCommand`] into the primitive operations a real adapter would
//! issue (create, set length, pwrite, fdatasync, directory fsync, unlink, copy aside), and
//! [`SimDisk::apply`] performs one of them, so a test can stop a command half-way and crash.
//!
//! # What a crash keeps ([`SimDisk::crash`])
//!
//! Each file has a *durable* image (what its last fdatasync made durable) and the writes issued
//! since, which so far live only in the page cache ([`SimDisk::segments`] shows the page-cache
//! view, which is what a process that restarts without a power loss reads). A crash keeps the
//! durable image and, per [`CrashModel`], some of the unsynced writes:
//!
//! - [`CrashModel::Ordered`]: unsynced writes reached the disk in the order they were issued, up
//!   to an arbitrary byte of one of them (a prefix, the last write torn).
//! - [`CrashModel::Blocks`]: the kernel writes dirty pages back independently and at any moment,
//!   so each `block`-sized block touched by unsynced writes holds the result of some prefix of
//!   the writes to it (none, some, all), chosen per block. With a block of 1 byte every byte is
//!   on its own: the most adversarial tear. 512 models sector-atomic devices, 4096 pages.
//!
//! Metadata: a created file whose directory entry was never made durable (no directory fsync
//! since) may be gone after the crash, and an unlinked file whose unlink was not followed by a
//! directory fsync may come back (with its durable content at the time of the unlink). A length
//! change not followed by an fdatasync may or may not survive.
//!
//! Simplifications, stated: copies to the quarantine directory and moves into it are durable
//! at once (the real adapter fsyncs the side file and both directories before reporting the
//! command done, and the spool only relies on that); a failed fdatasync ([`SimDisk::fail_next_sync`])
//! resolves the file's unsynced writes as a crash of that file would and drops the rest from the
//! page cache too (Linux marks the pages clean after a failed writeback, so what a later read
//! shows is not what was written).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use sink_core::spool::record::{decode_record, Record, SEGMENT_HEADER_LEN};
use sink_core::spool::{IoCommand, IoError, IoErrorKind, RecordSeq, SegmentHeader, SegmentId};

/// One primitive operation of the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// Create a new file of `len` zero bytes (`open(O_CREAT|O_EXCL)` + preallocation).
    Create {
        /// The file.
        segment: SegmentId,
        /// Its length.
        len: u64,
    },
    /// Set the length of an existing file (`ftruncate` / `fallocate`).
    SetLen {
        /// The file.
        segment: SegmentId,
        /// Its length.
        len: u64,
    },
    /// `pwrite`.
    Write {
        /// The file.
        segment: SegmentId,
        /// Where.
        offset: u64,
        /// What.
        bytes: Bytes,
    },
    /// `fdatasync` of one file.
    Sync {
        /// The file.
        segment: SegmentId,
    },
    /// `fsync` of the spool directory.
    SyncDir,
    /// `unlink`.
    Unlink {
        /// The file.
        segment: SegmentId,
    },
    /// Copy a region into the quarantine directory (durable at once, see the module docs).
    CopyAside {
        /// The file.
        segment: SegmentId,
        /// Start of the region.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Move a whole file into the quarantine directory (durable at once).
    MoveAside {
        /// The file.
        segment: SegmentId,
    },
}

/// How unsynced writes survive a crash; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashModel {
    /// In issue order, up to an arbitrary byte.
    Ordered,
    /// Per block of this many bytes, an arbitrary prefix of the writes to it.
    Blocks(usize),
}

/// Damage to inject into a file (on disk: the durable image and the page-cache view alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// Flip one bit.
    FlipBit {
        /// Byte offset.
        offset: u64,
        /// Bit, 0..8.
        bit: u8,
    },
    /// Overwrite with zeros.
    Zero {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Cut the file to `len` bytes.
    Truncate {
        /// The new length.
        len: u64,
    },
}

/// A region copied into the quarantine directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineCopy {
    /// The segment it came from.
    pub segment: SegmentId,
    /// Its offset there.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Where a valid record sits in a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAt {
    /// Its sequence (for a skip record: the first sequence it skips).
    pub seq: RecordSeq,
    /// Offset of its header.
    pub offset: u64,
    /// Bytes it takes.
    pub len: u64,
    /// Whether it is a data record (not a skip).
    pub data: bool,
}

/// Counters over the disk's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// `pwrite`s.
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// `fdatasync`s.
    pub syncs: u64,
    /// Directory fsyncs.
    pub dir_syncs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Unsynced {
    /// Global issue order.
    order: u64,
    offset: u64,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SimFile {
    durable: Vec<u8>,
    view: Vec<u8>,
    unsynced: Vec<Unsynced>,
    /// Whether the file's directory entry is durable.
    entry_durable: bool,
    /// Whether the view's length differs from the durable length without a sync since.
    len_dirty: bool,
}

/// The simulated disk. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    files: BTreeMap<SegmentId, SimFile>,
    /// Unlinked files whose unlink is not durable: (id, durable content).
    ghosts: Vec<(SegmentId, Vec<u8>)>,
    quarantined: Vec<QuarantineCopy>,
    moved_aside: Vec<(SegmentId, Vec<u8>)>,
    capacity: Option<u64>,
    fail_next_sync: Option<IoError>,
    order: u64,
    rng: u64,
    stats: DiskStats,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `0..=max`.
fn upto(state: &mut u64, max: u64) -> u64 {
    if max == u64::MAX {
        return splitmix(state);
    }
    splitmix(state) % (max + 1)
}

fn write_at(buf: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let end = offset as usize + bytes.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[offset as usize..end].copy_from_slice(bytes);
}

fn no_such(segment: SegmentId) -> IoError {
    IoError {
        kind: IoErrorKind::Other,
        message: format!("{segment}: no such file"),
    }
}

impl SimDisk {
    /// An empty disk; `seed` drives the random choices of failed syncs.
    pub fn new(seed: u64) -> SimDisk {
        SimDisk {
            rng: seed,
            ..SimDisk::default()
        }
    }

    /// The primitive operations a real adapter performs for `command`, in order (see the
    /// command's docs in sink-core).
    pub fn plan(command: &IoCommand) -> Vec<DiskOp> {
        match command {
            IoCommand::Prepare {
                segment,
                size,
                header,
                create,
            } => {
                let mut ops = vec![if *create {
                    DiskOp::Create {
                        segment: *segment,
                        len: *size,
                    }
                } else {
                    DiskOp::SetLen {
                        segment: *segment,
                        len: *size,
                    }
                }];
                ops.push(DiskOp::Write {
                    segment: *segment,
                    offset: 0,
                    bytes: header.clone(),
                });
                ops.push(DiskOp::Sync { segment: *segment });
                if *create {
                    ops.push(DiskOp::SyncDir);
                }
                ops
            }
            IoCommand::Commit { writes } => {
                let mut ops: Vec<DiskOp> = writes
                    .iter()
                    .map(|w| DiskOp::Write {
                        segment: w.segment,
                        offset: w.offset,
                        bytes: w.bytes.clone(),
                    })
                    .collect();
                let mut synced = BTreeSet::new();
                for w in writes {
                    if synced.insert(w.segment) {
                        ops.push(DiskOp::Sync { segment: w.segment });
                    }
                }
                ops
            }
            IoCommand::Sync { segments } => {
                let mut ops: Vec<DiskOp> = segments
                    .iter()
                    .map(|&segment| DiskOp::Sync { segment })
                    .collect();
                ops.push(DiskOp::SyncDir);
                ops
            }
            IoCommand::Zero {
                segment,
                offset,
                len,
            } => vec![
                DiskOp::Write {
                    segment: *segment,
                    offset: *offset,
                    bytes: Bytes::from(vec![0u8; *len as usize]),
                },
                DiskOp::Sync { segment: *segment },
            ],
            IoCommand::Quarantine {
                segment,
                offset,
                len,
                mark,
                ..
            } => {
                let mut ops = vec![DiskOp::CopyAside {
                    segment: *segment,
                    offset: *offset,
                    len: *len,
                }];
                if let Some(mark) = mark {
                    ops.push(DiskOp::Write {
                        segment: *segment,
                        offset: *offset,
                        bytes: mark.clone(),
                    });
                    ops.push(DiskOp::Sync { segment: *segment });
                }
                ops
            }
            IoCommand::QuarantineSegment { segment, .. } => {
                vec![DiskOp::MoveAside { segment: *segment }, DiskOp::SyncDir]
            }
            IoCommand::Delete { segment } => vec![
                DiskOp::Write {
                    segment: *segment,
                    offset: 0,
                    bytes: Bytes::from(vec![0u8; SEGMENT_HEADER_LEN]),
                },
                DiskOp::Sync { segment: *segment },
                DiskOp::Unlink { segment: *segment },
            ],
        }
    }

    /// Performs every operation of `command`, stopping at the first failure. A failed
    /// preparation of a new file removes the file, as the command's contract asks.
    pub fn perform(&mut self, command: &IoCommand) -> Result<(), IoError> {
        for op in SimDisk::plan(command) {
            if let Err(error) = self.apply(&op) {
                if let IoCommand::Prepare {
                    segment,
                    create: true,
                    ..
                } = command
                {
                    if self.files.contains_key(segment) {
                        self.apply(&DiskOp::Unlink { segment: *segment })?;
                    }
                }
                return Err(error);
            }
        }
        Ok(())
    }

    /// Performs one primitive operation.
    pub fn apply(&mut self, op: &DiskOp) -> Result<(), IoError> {
        match op {
            DiskOp::Create { segment, len } => {
                if self.files.contains_key(segment) {
                    return Err(IoError {
                        kind: IoErrorKind::Other,
                        message: format!("{segment}: file exists"),
                    });
                }
                self.check_space(*len)?;
                self.files.insert(
                    *segment,
                    SimFile {
                        durable: Vec::new(),
                        view: vec![0; *len as usize],
                        unsynced: Vec::new(),
                        entry_durable: false,
                        len_dirty: true,
                    },
                );
            }
            DiskOp::SetLen { segment, len } => {
                let current = self.files.get(segment).ok_or_else(|| no_such(*segment))?;
                let grow = len.saturating_sub(current.view.len() as u64);
                self.check_space(grow)?;
                let file = self.files.get_mut(segment).expect("checked");
                if file.view.len() as u64 != *len {
                    file.view.resize(*len as usize, 0);
                    file.len_dirty = true;
                }
            }
            DiskOp::Write {
                segment,
                offset,
                bytes,
            } => {
                self.order += 1;
                let order = self.order;
                let file = self
                    .files
                    .get_mut(segment)
                    .ok_or_else(|| no_such(*segment))?;
                write_at(&mut file.view, *offset, bytes);
                file.unsynced.push(Unsynced {
                    order,
                    offset: *offset,
                    bytes: bytes.to_vec(),
                });
                self.stats.writes += 1;
                self.stats.bytes_written += bytes.len() as u64;
            }
            DiskOp::Sync { segment } => {
                self.stats.syncs += 1;
                if let Some(error) = self.fail_next_sync.take() {
                    let mut rng = self.rng;
                    let file = self
                        .files
                        .get_mut(segment)
                        .ok_or_else(|| no_such(*segment))?;
                    let image = resolve(file, CrashModel::Blocks(1), &mut rng, &BTreeMap::new());
                    self.rng = rng;
                    file.durable = image.clone();
                    file.view = image;
                    file.unsynced.clear();
                    file.len_dirty = false;
                    return Err(error);
                }
                let file = self
                    .files
                    .get_mut(segment)
                    .ok_or_else(|| no_such(*segment))?;
                file.durable = file.view.clone();
                file.unsynced.clear();
                file.len_dirty = false;
            }
            DiskOp::SyncDir => {
                self.stats.dir_syncs += 1;
                for file in self.files.values_mut() {
                    file.entry_durable = true;
                }
                self.ghosts.clear();
            }
            DiskOp::Unlink { segment } => {
                let file = self
                    .files
                    .remove(segment)
                    .ok_or_else(|| no_such(*segment))?;
                if file.entry_durable {
                    self.ghosts.push((*segment, file.durable));
                }
            }
            DiskOp::CopyAside {
                segment,
                offset,
                len,
            } => {
                let file = self.files.get(segment).ok_or_else(|| no_such(*segment))?;
                let start = (*offset as usize).min(file.view.len());
                let end = (*offset as usize + *len as usize).min(file.view.len());
                self.quarantined.push(QuarantineCopy {
                    segment: *segment,
                    offset: *offset,
                    bytes: file.view[start..end].to_vec(),
                });
            }
            DiskOp::MoveAside { segment } => {
                let file = self
                    .files
                    .remove(segment)
                    .ok_or_else(|| no_such(*segment))?;
                self.moved_aside.push((*segment, file.view));
            }
        }
        Ok(())
    }

    fn check_space(&self, more: u64) -> Result<(), IoError> {
        if let Some(capacity) = self.capacity {
            let used: u64 = self.files.values().map(|f| f.view.len() as u64).sum();
            if used + more > capacity {
                return Err(IoError {
                    kind: IoErrorKind::NoSpace,
                    message: format!(
                        "No space left on device ({used} of {capacity} bytes used, {more} more asked)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The disk after a power loss now: every file reduced to what survived (see the module
    /// docs), all of it durable. `seed` picks the survivors.
    pub fn crash(&self, seed: u64, model: CrashModel) -> SimDisk {
        let mut rng = seed ^ 0x5EED_C0A5_0000_0000;
        // For the ordered model: one global cut through all unsynced writes.
        let mut cuts = BTreeMap::new();
        if model == CrashModel::Ordered {
            let total: Vec<u64> = self
                .files
                .values()
                .flat_map(|f| f.unsynced.iter().map(|w| w.order))
                .collect();
            if let Some(&max) = total.iter().max() {
                let min = *total.iter().min().expect("non-empty");
                let cut_order = min + upto(&mut rng, max - min + 1);
                cuts.insert(u64::MAX, cut_order);
            }
        }
        let mut files = BTreeMap::new();
        for (&id, file) in &self.files {
            if !file.entry_durable && upto(&mut rng, 1) == 0 {
                continue;
            }
            let image = resolve(file, model, &mut rng, &cuts);
            files.insert(
                id,
                SimFile {
                    durable: image.clone(),
                    view: image,
                    unsynced: Vec::new(),
                    entry_durable: true,
                    len_dirty: false,
                },
            );
        }
        for (id, content) in &self.ghosts {
            if !files.contains_key(id) && upto(&mut rng, 1) == 0 {
                files.insert(
                    *id,
                    SimFile {
                        durable: content.clone(),
                        view: content.clone(),
                        unsynced: Vec::new(),
                        entry_durable: true,
                        len_dirty: false,
                    },
                );
            }
        }
        SimDisk {
            files,
            ghosts: Vec::new(),
            quarantined: self.quarantined.clone(),
            moved_aside: self.moved_aside.clone(),
            capacity: self.capacity,
            fail_next_sync: None,
            order: self.order,
            rng: splitmix(&mut rng),
            stats: self.stats,
        }
    }

    /// Every segment file with its content as a reader sees it now (the page cache), in id
    /// order: what recovery reads after a process restart.
    pub fn segments(&self) -> Vec<(SegmentId, Vec<u8>)> {
        self.files
            .iter()
            .map(|(&id, f)| (id, f.view.clone()))
            .collect()
    }

    /// One file's content as a reader sees it now.
    pub fn file(&self, segment: SegmentId) -> Option<&[u8]> {
        self.files.get(&segment).map(|f| f.view.as_slice())
    }

    /// Damages a file on disk (durable image and view alike; unsynced writes are dropped first,
    /// as if synced).
    pub fn corrupt(&mut self, segment: SegmentId, corruption: Corruption) {
        let file = self
            .files
            .get_mut(&segment)
            .unwrap_or_else(|| panic!("no file {segment} to corrupt"));
        let mut image = file.view.clone();
        match corruption {
            Corruption::FlipBit { offset, bit } => image[offset as usize] ^= 1 << bit,
            Corruption::Zero { offset, len } => {
                let end = (offset + len).min(image.len() as u64) as usize;
                image[offset as usize..end].fill(0);
            }
            Corruption::Truncate { len } => image.truncate(len as usize),
        }
        file.durable = image.clone();
        file.view = image;
        file.unsynced.clear();
        file.len_dirty = false;
    }

    /// Overwrites bytes on disk (durable at once), e.g. to plant a header of a newer format.
    pub fn overwrite(&mut self, segment: SegmentId, offset: u64, bytes: &[u8]) {
        let file = self
            .files
            .get_mut(&segment)
            .unwrap_or_else(|| panic!("no file {segment} to overwrite"));
        write_at(&mut file.view, offset, bytes);
        file.durable = file.view.clone();
        file.unsynced.clear();
    }

    /// The valid records of a segment in file order, read with the salt in its header (for
    /// tests that aim damage at a record). Stops at the first invalid bytes.
    pub fn records(&self, segment: SegmentId) -> Vec<RecordAt> {
        let Some(bytes) = self.file(segment) else {
            return Vec::new();
        };
        let Ok(Some(header)) = SegmentHeader::decode(bytes) else {
            return Vec::new();
        };
        let limit = (header.size as usize).min(bytes.len());
        let mut offset = SEGMENT_HEADER_LEN;
        let mut found = Vec::new();
        let mut prev = 0;
        while offset < limit {
            match decode_record(&bytes[offset..limit], header.salt) {
                Ok(record) => {
                    let (seq, data) = match record {
                        Record::Data { seq, .. } => (seq, true),
                        Record::Skip { first_missing, .. } => (first_missing, false),
                    };
                    if seq <= prev && data {
                        break;
                    }
                    prev = seq;
                    found.push(RecordAt {
                        seq,
                        offset: offset as u64,
                        len: record.encoded_len() as u64,
                        data,
                    });
                    offset += record.encoded_len();
                }
                Err(_) => break,
            }
        }
        found
    }

    /// Regions copied into the quarantine directory so far.
    pub fn quarantined(&self) -> &[QuarantineCopy] {
        &self.quarantined
    }

    /// Whole files moved into the quarantine directory so far.
    pub fn moved_aside(&self) -> &[(SegmentId, Vec<u8>)] {
        &self.moved_aside
    }

    /// Limits the bytes all files may take (creations and growth past it fail with
    /// [`IoErrorKind::NoSpace`]); `None` for no limit.
    pub fn set_capacity(&mut self, capacity: Option<u64>) {
        self.capacity = capacity;
    }

    /// Bytes all files take now.
    pub fn used(&self) -> u64 {
        self.files.values().map(|f| f.view.len() as u64).sum()
    }

    /// Makes the next fdatasync fail with `error` (see the module docs for what it does to the
    /// file's unsynced writes).
    pub fn fail_next_sync(&mut self, error: IoError) {
        self.fail_next_sync = Some(error);
    }

    /// Whether any file holds writes not yet synced (or a length change, or an entry not yet
    /// durable).
    pub fn has_unsynced(&self) -> bool {
        !self.ghosts.is_empty()
            || self
                .files
                .values()
                .any(|f| !f.unsynced.is_empty() || f.len_dirty || !f.entry_durable)
    }

    /// Counters.
    pub fn stats(&self) -> DiskStats {
        self.stats
    }
}

/// What of `file` survives a crash: its durable image with some of its unsynced writes applied.
fn resolve(file: &SimFile, model: CrashModel, rng: &mut u64, cuts: &BTreeMap<u64, u64>) -> Vec<u8> {
    let mut image = file.durable.clone();
    if file.len_dirty && upto(rng, 1) == 1 {
        image.resize(file.view.len(), 0);
    }
    match model {
        CrashModel::Ordered => {
            let cut = cuts.get(&u64::MAX).copied().unwrap_or(0);
            for w in &file.unsynced {
                if w.order < cut {
                    write_at(&mut image, w.offset, &w.bytes);
                } else if w.order == cut {
                    let keep = upto(rng, w.bytes.len() as u64) as usize;
                    write_at(&mut image, w.offset, &w.bytes[..keep]);
                }
            }
        }
        CrashModel::Blocks(block) => {
            let block = block.max(1) as u64;
            // For each block touched: the writes touching it, in order.
            let mut touching: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for (i, w) in file.unsynced.iter().enumerate() {
                if w.bytes.is_empty() {
                    continue;
                }
                let first = w.offset / block;
                let last = (w.offset + w.bytes.len() as u64 - 1) / block;
                for b in first..=last {
                    touching.entry(b).or_default().push(i);
                }
            }
            for (b, writes) in touching {
                let keep = upto(rng, writes.len() as u64) as usize;
                let (lo, hi) = (b * block, (b + 1) * block);
                for &i in &writes[..keep] {
                    let w = &file.unsynced[i];
                    let start = w.offset.max(lo);
                    let end = (w.offset + w.bytes.len() as u64).min(hi);
                    let part = &w.bytes[(start - w.offset) as usize..(end - w.offset) as usize];
                    write_at(&mut image, start, part);
                }
            }
        }
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SegmentId = SegmentId(1);

    fn disk_with_file() -> SimDisk {
        let mut disk = SimDisk::new(1);
        disk.apply(&DiskOp::Create {
            segment: A,
            len: 64,
        })
        .unwrap();
        disk.apply(&DiskOp::Sync { segment: A }).unwrap();
        disk.apply(&DiskOp::SyncDir).unwrap();
        disk
    }

    fn write(disk: &mut SimDisk, offset: u64, bytes: &[u8]) {
        disk.apply(&DiskOp::Write {
            segment: A,
            offset,
            bytes: Bytes::copy_from_slice(bytes),
        })
        .unwrap();
    }

    #[test]
    fn synced_writes_survive_every_crash() {
        let mut disk = disk_with_file();
        write(&mut disk, 0, b"durable");
        disk.apply(&DiskOp::Sync { segment: A }).unwrap();
        for seed in 0..50 {
            for model in [
                CrashModel::Ordered,
                CrashModel::Blocks(1),
                CrashModel::Blocks(16),
            ] {
                let after = disk.crash(seed, model);
                assert_eq!(&after.file(A).unwrap()[..7], b"durable");
                assert!(!after.has_unsynced());
            }
        }
    }

    #[test]
    fn unsynced_writes_are_sometimes_lost_sometimes_kept_sometimes_torn() {
        let mut disk = disk_with_file();
        write(&mut disk, 0, &[0xAA; 32]);
        let mut outcomes = BTreeSet::new();
        for seed in 0..200 {
            let after = disk.crash(seed, CrashModel::Ordered);
            let kept = after.file(A).unwrap()[..32]
                .iter()
                .filter(|&&b| b == 0xAA)
                .count();
            outcomes.insert(match kept {
                0 => "lost",
                32 => "kept",
                _ => "torn",
            });
        }
        assert_eq!(outcomes, BTreeSet::from(["kept", "lost", "torn"]));
    }

    #[test]
    fn ordered_crashes_keep_a_prefix_of_the_writes() {
        let mut disk = disk_with_file();
        write(&mut disk, 0, &[1; 8]);
        write(&mut disk, 8, &[2; 8]);
        for seed in 0..200 {
            let after = disk.crash(seed, CrashModel::Ordered);
            let f = after.file(A).unwrap();
            if f[8] == 2 {
                assert_eq!(
                    &f[..8],
                    &[1; 8],
                    "seed {seed}: a later write without the earlier one"
                );
            }
        }
    }

    #[test]
    fn block_crashes_can_keep_a_later_write_without_an_earlier_one() {
        let mut disk = disk_with_file();
        write(&mut disk, 0, &[1; 8]);
        write(&mut disk, 8, &[2; 8]);
        let out_of_order = (0..200).any(|seed| {
            let after = disk.crash(seed, CrashModel::Blocks(8));
            let f = after.file(A).unwrap();
            f[8] == 2 && f[0] == 0
        });
        assert!(out_of_order, "page write-back order is arbitrary");
    }

    #[test]
    fn a_block_holds_a_prefix_of_its_writes_in_order() {
        let mut disk = disk_with_file();
        write(&mut disk, 0, &[1; 4]);
        write(&mut disk, 0, &[2; 4]);
        for seed in 0..100 {
            let after = disk.crash(seed, CrashModel::Blocks(4));
            let f = &after.file(A).unwrap()[..4];
            assert!(f == [0; 4] || f == [1; 4] || f == [2; 4], "{f:?}");
        }
    }

    #[test]
    fn a_file_created_without_a_directory_sync_may_vanish_and_an_unlink_may_be_undone() {
        let mut disk = SimDisk::new(1);
        disk.apply(&DiskOp::Create { segment: A, len: 8 }).unwrap();
        disk.apply(&DiskOp::Sync { segment: A }).unwrap();
        let vanished = (0..50).filter(|&s| disk.crash(s, CrashModel::Ordered).file(A).is_none());
        assert!(vanished.count() > 0);
        disk.apply(&DiskOp::SyncDir).unwrap();
        assert!((0..50).all(|s| disk.crash(s, CrashModel::Ordered).file(A).is_some()));

        disk.apply(&DiskOp::Unlink { segment: A }).unwrap();
        let back = (0..50).filter(|&s| disk.crash(s, CrashModel::Ordered).file(A).is_some());
        assert!(back.count() > 0);
        disk.apply(&DiskOp::SyncDir).unwrap();
        assert!((0..50).all(|s| disk.crash(s, CrashModel::Ordered).file(A).is_none()));
    }

    #[test]
    fn creation_fails_when_the_disk_is_full() {
        let mut disk = SimDisk::new(1);
        disk.set_capacity(Some(100));
        let op = |segment, len| DiskOp::Create {
            segment: SegmentId(segment),
            len,
        };
        disk.apply(&op(1, 60)).unwrap();
        let err = disk.apply(&op(2, 60)).unwrap_err();
        assert_eq!(err.kind, IoErrorKind::NoSpace);
        assert_eq!(disk.used(), 60);
    }

    #[test]
    fn a_failed_sync_reports_the_error_and_leaves_an_arbitrary_subset() {
        let mut disk = disk_with_file();
        write(&mut disk, 0, &[7; 16]);
        disk.fail_next_sync(IoError {
            kind: IoErrorKind::Other,
            message: "EIO".into(),
        });
        assert!(disk.apply(&DiskOp::Sync { segment: A }).is_err());
        assert!(!disk.has_unsynced());
        // The next sync works.
        assert!(disk.apply(&DiskOp::Sync { segment: A }).is_ok());
    }
}
