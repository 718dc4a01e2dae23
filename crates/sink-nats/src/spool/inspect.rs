//! A read-only look at a spool directory (`jetsink spool status`): what recovery would find and repair, without writing anything.

use std::path::{Path, PathBuf};

use sink_core::spool::{RecoveryReport, SpoolConfig, FORMAT_VERSION};

use crate::spool::disk::{self, DirLock};
use crate::spool::error::SpoolError;

/// Another process holds the spool open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InUse {
    /// Its process id, as its lock file says.
    pub pid: Option<u32>,
}

/// What a spool directory holds, read without changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// What recovery finds: records to replay, bytes, oldest sequence, segments, the torn tail
    /// and damaged regions it would repair.
    pub report: RecoveryReport,
    /// The segment format version of this build (every segment read has it or an older one:
    /// a newer one is refused with [`SpoolError::NewerFormat`]).
    pub format_version: u16,
    /// Segment files in the directory.
    pub segment_files: usize,
    /// Their total size on disk (preallocated: full segments whatever they hold).
    pub segment_file_bytes: u64,
    /// The largest segment file's size (0 without any): the segment size the spool was
    /// written with, for an open that should prepare spares of the same size.
    pub largest_segment_file: u64,
    /// Files in the quarantine directory (copies of damaged regions, whole damaged segments).
    pub quarantine_files: usize,
    /// Their total size.
    pub quarantine_bytes: u64,
    /// A process has the spool open: what was read is a snapshot that may be changing.
    pub in_use: Option<InUse>,
}

impl Inspection {
    /// Whether opening the spool would change what is on disk beyond the opening sync: a torn
    /// tail to zero, damaged regions or segments to move into quarantine.
    pub fn needs_repair(&self) -> bool {
        let r = &self.report;
        r.torn_tail.is_some() || !r.quarantined.is_empty() || !r.damaged_segments.is_empty()
    }

    /// Whether damage was found (records lost, or whole segments unreadable); a torn tail is
    /// not damage (it was never confirmed durable).
    pub fn damaged(&self) -> bool {
        let r = &self.report;
        !r.quarantined.is_empty() || !r.damaged_segments.is_empty() || r.unexplained_missing > 0
    }
}

/// Reads the spool directory `dir` as recovery would, changing nothing (no lock file is
/// created, no repair is made; see [`Inspection::needs_repair`]). While no process holds the
/// spool, a shared lock keeps one from opening it during the read.
///
/// Errors: [`SpoolError::NewerFormat`] for a segment of a newer format, [`SpoolError::Io`]
/// (with [`std::io::ErrorKind::NotFound`] for a missing directory),
/// [`SpoolError::PermissionDenied`].
pub fn inspect(dir: impl AsRef<Path>) -> Result<Inspection, SpoolError> {
    let dir = dir.as_ref();
    let meta = std::fs::metadata(dir).map_err(|e| SpoolError::io(dir, dir, "open", &e))?;
    if !meta.is_dir() {
        return Err(SpoolError::Io {
            path: dir.to_path_buf(),
            op: "open",
            kind: std::io::ErrorKind::NotADirectory,
            message: "not a directory".into(),
        });
    }
    let (_lock, in_use) = match DirLock::shared(dir)? {
        Ok(lock) => (lock, None),
        Err(pid) => (None, Some(InUse { pid })),
    };
    let found = disk::recover(dir, SpoolConfig::default())?;
    let (quarantine_files, quarantine_bytes) = disk::quarantine_contents(dir)?;
    Ok(Inspection {
        dir: dir.to_path_buf(),
        report: found.recovered.report,
        format_version: FORMAT_VERSION,
        segment_files: found.segment_files,
        segment_file_bytes: found.segment_bytes,
        largest_segment_file: found.largest,
        quarantine_files,
        quarantine_bytes,
        in_use,
    })
}
