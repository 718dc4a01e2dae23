//! The spool's errors: each names the directory or file involved and what the operator can do.

use std::io;
use std::path::{Path, PathBuf};

use sink_core::spool::{IoError, IoErrorKind, RecordSeq, ReplayError, SpoolConfigError};

/// Why a spool could not be opened, or an append not made durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// Another process (or another open in this one) holds the spool directory's lock file.
    #[error("spool directory {} is in use: its lock is held{}; stop the process holding it, or give each process its own spool directory", dir.display(), match pid { Some(pid) => format!(" by pid {pid}"), None => String::new() })]
    Locked {
        /// The spool directory.
        dir: PathBuf,
        /// The process id written in the lock file by its holder, when readable.
        pid: Option<u32>,
    },
    /// The operating system refused access.
    #[error("permission denied: cannot {op} {}; give the user running jetsink read and write access to the spool directory and its files", path.display())]
    PermissionDenied {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`create`, `read`, `lock`, ...).
        op: &'static str,
    },
    /// The device holding the spool is full (or the user's quota is reached).
    #[error("no space left for spool {}: {detail}; free disk space or lower the spool's max_bytes (records already spooled are intact)", dir.display())]
    NoSpace {
        /// The spool directory.
        dir: PathBuf,
        /// The operating system's error, with the file.
        detail: String,
    },
    /// A segment file written by a newer jetsink: it is left untouched.
    #[error("spool segment {} has format version {found}, newer than this build reads ({supported}); open the spool with the jetsink version that wrote it (or a newer one), or drain it with that version first", file.display())]
    NewerFormat {
        /// The segment file.
        file: PathBuf,
        /// The version in the file.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// Any other IO failure while opening or inspecting the spool.
    #[error("cannot {op} {}: {message}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error's class.
        kind: io::ErrorKind,
        /// The operating system's error.
        message: String,
    },
    /// The spool holds its `max_bytes` of unacknowledged records.
    #[error("spool {} is full: {bytes} bytes held, this record needs {record}, bound {max_bytes}; wait for deliveries to free segments or raise max_bytes", dir.display())]
    Full {
        /// The spool directory.
        dir: PathBuf,
        /// Record bytes held.
        bytes: u64,
        /// Bytes this record needs.
        record: u64,
        /// The bound.
        max_bytes: u64,
    },
    /// One payload larger than the spool's `max_record`.
    #[error("payload of {len} bytes exceeds the spool's max_record of {max}; raise max_record")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The bound.
        max: u32,
    },
    /// An empty payload (the record format reserves length 0).
    #[error("empty payload; a spooled record carries at least one byte")]
    Empty,
    /// A segment could not be prepared for a reason other than a full disk.
    #[error("spool {} cannot prepare a segment: {error}", dir.display())]
    Prepare {
        /// The spool directory.
        dir: PathBuf,
        /// The IO error.
        error: IoError,
    },
    /// Writing or syncing this record failed: it is not durable. The spool takes no more appends
    /// until it is reopened (after a failed fdatasync the page cache no longer tells what the
    /// disk holds; recovery reads the disk).
    #[error("spool {} could not make record {seq} durable: {error}; reopen the spool (what the disk holds is recovered)", dir.display())]
    NotDurable {
        /// The spool directory.
        dir: PathBuf,
        /// The record.
        seq: RecordSeq,
        /// The IO error.
        error: IoError,
    },
    /// An earlier IO failure stopped the spool.
    #[error("spool {} stopped after an IO error ({error}); reopen it to recover what the disk holds", dir.display())]
    Broken {
        /// The spool directory.
        dir: PathBuf,
        /// The failure.
        error: IoError,
    },
    /// A segment file changed under the replay (another process wrote the directory).
    #[error("spool segment {} changed after recovery ({error}); make sure no other process writes the spool directory", file.display())]
    ReplayChanged {
        /// The segment file.
        file: PathBuf,
        /// What was found.
        error: ReplayError,
    },
    /// The spool was closed (or its IO thread stopped).
    #[error("spool {} is closed", dir.display())]
    Closed {
        /// The spool directory.
        dir: PathBuf,
    },
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] SpoolConfigError),
}

impl SpoolError {
    /// The error for an OS failure of `op` on `path`, with full disks and permission problems
    /// given their own variants.
    pub(crate) fn io(dir: &Path, path: &Path, op: &'static str, error: &io::Error) -> SpoolError {
        match error.kind() {
            io::ErrorKind::PermissionDenied => SpoolError::PermissionDenied {
                path: path.to_path_buf(),
                op,
            },
            kind if no_space(kind) => SpoolError::NoSpace {
                dir: dir.to_path_buf(),
                detail: format!("{op} {}: {error}", path.display()),
            },
            kind => SpoolError::Io {
                path: path.to_path_buf(),
                op,
                kind,
                message: error.to_string(),
            },
        }
    }

    /// The error for an IO failure the machine reported (a failed preparation or commit).
    pub(crate) fn from_machine(dir: &Path, error: IoError) -> SpoolError {
        match error.kind {
            IoErrorKind::NoSpace => SpoolError::NoSpace {
                dir: dir.to_path_buf(),
                detail: error.message,
            },
            IoErrorKind::Other => SpoolError::Prepare {
                dir: dir.to_path_buf(),
                error,
            },
        }
    }
}

/// Whether an error kind means the device or quota is full.
pub(crate) fn no_space(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
