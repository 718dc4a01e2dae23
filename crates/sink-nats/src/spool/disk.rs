//! The spool's real-disk IO: the directory lock, reading segment files, and performing each of the machine's `IoCommand`s on files exactly as sink-core documents it.
//!
//! Every command is complete only when what it lists is durable: data written with positioned
//! writes is followed by `fdatasync` (`File::sync_data`) of each file touched, and every change
//! to a directory entry (a created file, a rename into the quarantine directory, the quarantine
//! directory itself) by an fsync of the directory. The operations are the ones the test kit's
//! `SimDisk::plan` lists for the same command, in the same order.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sink_core::spool::record::SEGMENT_HEADER_LEN;
use sink_core::spool::{
    IoCommand, IoError, IoErrorKind, RecoverError, Recovered, Recovery, SegmentId, SpoolConfig,
};

use crate::clock;
use crate::spool::error::{no_space, SpoolError};

/// Name of the lock file in a spool directory; it holds its holder's process id.
pub const LOCK_FILE: &str = "jetsink.lock";
/// Name of the directory, inside the spool directory, that damaged bytes are copied into.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Bytes written per `pwrite` when a segment is filled with zeros.
const ZERO_CHUNK: usize = 1 << 20;

/// How often, and how long apart, a lock found taken is tried again before it counts as held
/// (250 ms in all). A lock is briefly kept after its holder closed it when another thread of
/// that process was spawning a child: the child holds a copy of every descriptor until it
/// execs (close-on-exec descriptors included), and the `flock` goes with the last copy. A
/// measurement here saw 6% of close-then-reopen cycles refused while a thread spawned
/// processes in a loop.
const LOCK_TRIES: u32 = 125;
const LOCK_RETRY: Duration = Duration::from_millis(2);

/// Tries `attempt` until it does not find the lock taken, at most [`LOCK_TRIES`] times.
fn retry_lock(mut attempt: impl FnMut() -> Result<(), TryLockError>) -> Result<(), TryLockError> {
    let mut tries = 1;
    loop {
        match attempt() {
            Err(TryLockError::WouldBlock) if tries < LOCK_TRIES => {
                tries += 1;
                clock::pause_blocking(LOCK_RETRY);
            }
            other => return other,
        }
    }
}

/// Counters of the IO performed, shared with the spool's handle for its stats.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) data_syncs: AtomicU64,
    pub(crate) dir_syncs: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

/// The lock on a spool directory: an exclusive `flock` (through `File::try_lock`) on its lock
/// file, released when the file is closed (also when the process dies).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the directory's lock, or says who holds it.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, SpoolError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| SpoolError::io(dir, &path, "create the lock file", &e))?;
        match retry_lock(|| file.try_lock()) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked {
                    dir: dir.to_path_buf(),
                    pid: holder(&path),
                })
            }
            Err(TryLockError::Error(e)) => return Err(SpoolError::io(dir, &path, "lock", &e)),
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
            .map_err(|e| SpoolError::io(dir, &path, "write the lock file", &e))?;
        Ok(DirLock { _file: file })
    }

    /// A shared lock for reading the directory without changing it, when nobody holds the
    /// exclusive one: `Ok(Err(pid))` when a process does (the directory may change while it is
    /// read). A directory without a lock file was never opened as a spool: no lock is taken.
    pub(crate) fn shared(dir: &Path) -> Result<Result<Option<DirLock>, Option<u32>>, SpoolError> {
        let path = dir.join(LOCK_FILE);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Ok(None)),
            Err(e) => return Err(SpoolError::io(dir, &path, "open the lock file", &e)),
        };
        match retry_lock(|| file.try_lock_shared()) {
            Ok(()) => Ok(Ok(Some(DirLock { _file: file }))),
            Err(TryLockError::WouldBlock) => Ok(Err(holder(&path))),
            Err(TryLockError::Error(e)) => Err(SpoolError::io(dir, &path, "lock", &e)),
        }
    }
}

/// The process id a lock file names, when readable.
fn holder(path: &Path) -> Option<u32> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Creates `dir` and any missing parent, each made durable by an fsync of the directory that
/// holds it: records confirmed in a new spool must not vanish with its directory entry after a
/// power loss. An existing directory is left as it is.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<(), SpoolError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && fs::symlink_metadata(a).is_err())
        .collect();
    fs::create_dir_all(dir).map_err(|e| SpoolError::io(dir, dir, "create", &e))?;
    for created in missing.iter().rev() {
        let parent = match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| SpoolError::io(dir, parent, "fsync", &e))?;
    }
    Ok(())
}

/// The segment files of a spool directory, in id order (other files are not the spool's).
pub(crate) fn segment_files(dir: &Path) -> Result<Vec<(SegmentId, PathBuf)>, SpoolError> {
    let entries = fs::read_dir(dir).map_err(|e| SpoolError::io(dir, dir, "list", &e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SpoolError::io(dir, dir, "list", &e))?;
        let name = entry.file_name();
        if let Some(id) = name.to_str().and_then(SegmentId::from_file_name) {
            found.push((id, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Reads a whole segment file.
pub(crate) fn read_segment(dir: &Path, path: &Path) -> Result<Vec<u8>, SpoolError> {
    fs::read(path).map_err(|e| SpoolError::io(dir, path, "read", &e))
}

/// Files in the quarantine directory and their total size (none when it does not exist).
pub(crate) fn quarantine_contents(dir: &Path) -> Result<(usize, u64), SpoolError> {
    let qdir = dir.join(QUARANTINE_DIR);
    let entries = match fs::read_dir(&qdir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(SpoolError::io(dir, &qdir, "list", &e)),
    };
    let (mut files, mut bytes) = (0, 0);
    for entry in entries {
        let entry = entry.map_err(|e| SpoolError::io(dir, &qdir, "list", &e))?;
        let meta = entry
            .metadata()
            .map_err(|e| SpoolError::io(dir, &entry.path(), "stat", &e))?;
        if meta.is_file() {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

/// Performs IO commands in one spool directory. Holds the directory's lock.
#[derive(Debug)]
pub(crate) struct Disk {
    dir: PathBuf,
    /// The directory itself, opened for fsync.
    dir_handle: File,
    files: HashMap<SegmentId, File>,
    zeros: Vec<u8>,
    counters: Arc<Counters>,
    _lock: DirLock,
}

/// An OS error of one operation, as the machine takes it.
fn machine_error(op: &str, path: &Path, error: &io::Error) -> IoError {
    let kind = if no_space(error.kind()) {
        IoErrorKind::NoSpace
    } else {
        IoErrorKind::Other
    };
    let advice = if error.kind() == io::ErrorKind::PermissionDenied {
        "; give the user running jetsink write access to the spool directory"
    } else {
        ""
    };
    IoError {
        kind,
        message: format!("{op} {}: {error}{advice}", path.display()),
    }
}

impl Disk {
    /// IO in `dir` (which exists) under `lock`.
    pub(crate) fn new(
        dir: &Path,
        lock: DirLock,
        counters: Arc<Counters>,
    ) -> Result<Disk, SpoolError> {
        let dir_handle = File::open(dir).map_err(|e| SpoolError::io(dir, dir, "open", &e))?;
        Ok(Disk {
            dir: dir.to_path_buf(),
            dir_handle,
            files: HashMap::new(),
            zeros: Vec::new(),
            counters,
            _lock: lock,
        })
    }

    fn path(&self, segment: SegmentId) -> PathBuf {
        self.dir.join(segment.file_name())
    }

    /// The open file of an existing segment.
    fn file(&mut self, segment: SegmentId) -> Result<&File, IoError> {
        if !self.files.contains_key(&segment) {
            let path = self.path(segment);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| machine_error("open", &path, &e))?;
            self.files.insert(segment, file);
        }
        Ok(&self.files[&segment])
    }

    fn write_at(&mut self, segment: SegmentId, offset: u64, bytes: &[u8]) -> Result<(), IoError> {
        let path = self.path(segment);
        self.file(segment)?
            .write_all_at(bytes, offset)
            .map_err(|e| machine_error("write", &path, &e))?;
        self.counters
            .bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// fdatasync of one segment.
    fn sync(&mut self, segment: SegmentId) -> Result<(), IoError> {
        let path = self.path(segment);
        self.file(segment)?
            .sync_data()
            .map_err(|e| machine_error("fdatasync", &path, &e))?;
        self.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// fsync of a directory: makes the entries created, renamed or removed in it durable.
    fn sync_dir(&self, dir: &Path, handle: Option<&File>) -> Result<(), IoError> {
        let opened;
        let handle = match handle {
            Some(h) => h,
            None => {
                opened = File::open(dir).map_err(|e| machine_error("open", dir, &e))?;
                &opened
            }
        };
        handle
            .sync_all()
            .map_err(|e| machine_error("fsync directory", dir, &e))?;
        self.counters.dir_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_spool_dir(&self) -> Result<(), IoError> {
        self.sync_dir(&self.dir, Some(&self.dir_handle))
    }

    /// Writes zeros over `from..to` of a segment: its blocks become allocated and written, so
    /// later overwrites need no metadata in their fdatasync.
    fn fill_zeros(&mut self, segment: SegmentId, from: u64, to: u64) -> Result<(), IoError> {
        if self.zeros.is_empty() {
            self.zeros = vec![0; ZERO_CHUNK];
        }
        let zeros = std::mem::take(&mut self.zeros);
        let mut at = from;
        let mut result = Ok(());
        while at < to && result.is_ok() {
            let n = (to - at).min(zeros.len() as u64) as usize;
            result = self.write_at(segment, at, &zeros[..n]);
            at += n as u64;
        }
        self.zeros = zeros;
        result
    }

    /// Performs one command; it is durable when this returns `Ok`.
    pub(crate) fn perform(&mut self, command: &IoCommand) -> Result<(), IoError> {
        match command {
            IoCommand::Prepare {
                segment,
                size,
                header,
                create,
            } => {
                if *create {
                    let result = self.create(*segment, *size, header);
                    if result.is_err() {
                        // The contract: a failed preparation of a new file leaves no file.
                        self.files.remove(segment);
                        let _ = fs::remove_file(self.path(*segment));
                    }
                    result
                } else {
                    self.reprepare(*segment, *size, header)
                }
            }
            IoCommand::Commit { writes } => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                let mut touched: Vec<SegmentId> = Vec::with_capacity(2);
                for w in writes {
                    self.write_at(w.segment, w.offset, &w.bytes)?;
                    if !touched.contains(&w.segment) {
                        touched.push(w.segment);
                    }
                }
                for segment in touched {
                    self.sync(segment)?;
                }
                Ok(())
            }
            IoCommand::Sync { segments } => {
                for &segment in segments {
                    self.sync(segment)?;
                }
                self.sync_spool_dir()
            }
            IoCommand::Zero {
                segment,
                offset,
                len,
            } => {
                self.fill_zeros(*segment, *offset, offset + len)?;
                self.sync(*segment)
            }
            IoCommand::Quarantine {
                segment,
                offset,
                len,
                mark,
                ..
            } => {
                self.copy_aside(*segment, *offset, *len)?;
                if let Some(mark) = mark {
                    self.write_at(*segment, *offset, mark)?;
                    self.sync(*segment)?;
                }
                Ok(())
            }
            IoCommand::QuarantineSegment { segment, .. } => self.move_aside(*segment),
            IoCommand::Delete { segment } => {
                self.write_at(*segment, 0, &[0; SEGMENT_HEADER_LEN])?;
                self.sync(*segment)?;
                self.files.remove(segment);
                let path = self.path(*segment);
                fs::remove_file(&path).map_err(|e| machine_error("unlink", &path, &e))
            }
        }
    }

    /// A new segment file: created, filled with zeros, header written, synced, entry synced.
    fn create(&mut self, segment: SegmentId, size: u64, header: &[u8]) -> Result<(), IoError> {
        let path = self.path(segment);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| machine_error("create", &path, &e))?;
        self.files.insert(segment, file);
        self.fill_zeros(segment, 0, size)?;
        self.write_at(segment, 0, header)?;
        self.sync(segment)?;
        self.sync_spool_dir()
    }

    /// An existing segment made `size` bytes long (growth written as zeros) with a new header.
    fn reprepare(&mut self, segment: SegmentId, size: u64, header: &[u8]) -> Result<(), IoError> {
        let path = self.path(segment);
        let len = self
            .file(segment)?
            .metadata()
            .map_err(|e| machine_error("stat", &path, &e))?
            .len();
        if len < size {
            self.fill_zeros(segment, len, size)?;
        } else if len > size {
            self.file(segment)?
                .set_len(size)
                .map_err(|e| machine_error("truncate", &path, &e))?;
        }
        self.write_at(segment, 0, header)?;
        self.sync(segment)
    }

    /// The quarantine directory, created (and its entry made durable) when missing.
    fn quarantine_dir(&self) -> Result<PathBuf, IoError> {
        let qdir = self.dir.join(QUARANTINE_DIR);
        match fs::create_dir(&qdir) {
            Ok(()) => self.sync_spool_dir()?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(machine_error("create", &qdir, &e)),
        }
        Ok(qdir)
    }

    /// A name in the quarantine directory not taken yet: `base`, else `base.1`, `base.2`, ...
    /// (a segment id can come back after its file was moved aside, and a region can be damaged
    /// again in a later life of its segment).
    fn free_name(qdir: &Path, base: &str) -> PathBuf {
        let mut candidate = qdir.join(base);
        let mut n = 0;
        while candidate.symlink_metadata().is_ok() {
            n += 1;
            candidate = qdir.join(format!("{base}.{n}"));
        }
        candidate
    }

    /// Copies bytes `offset..offset + len` of a segment (as far as the file reaches) into a new
    /// side file in the quarantine directory, durably.
    fn copy_aside(&mut self, segment: SegmentId, offset: u64, len: u64) -> Result<(), IoError> {
        let path = self.path(segment);
        let file_len = self
            .file(segment)?
            .metadata()
            .map_err(|e| machine_error("stat", &path, &e))?
            .len();
        let end = offset.saturating_add(len).min(file_len);
        let mut bytes = vec![0; end.saturating_sub(offset) as usize];
        self.file(segment)?
            .read_exact_at(&mut bytes, offset)
            .map_err(|e| machine_error("read", &path, &e))?;
        let qdir = self.quarantine_dir()?;
        let side = Disk::free_name(&qdir, &format!("{}.{offset}.damaged", segment.file_name()));
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&side)
            .map_err(|e| machine_error("create", &side, &e))?;
        out.write_all_at(&bytes, 0)
            .map_err(|e| machine_error("write", &side, &e))?;
        out.sync_all()
            .map_err(|e| machine_error("fsync", &side, &e))?;
        self.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_dir(&qdir, None)
    }

    /// Moves a whole segment file into the quarantine directory, durably in both directories.
    fn move_aside(&mut self, segment: SegmentId) -> Result<(), IoError> {
        self.files.remove(&segment);
        let qdir = self.quarantine_dir()?;
        let from = self.path(segment);
        let to = Disk::free_name(&qdir, &segment.file_name());
        fs::rename(&from, &to).map_err(|e| machine_error("move aside", &from, &e))?;
        self.sync_dir(&qdir, None)?;
        self.sync_spool_dir()
    }
}

/// What recovery found in a directory, with the segment files it read.
#[derive(Debug)]
pub(crate) struct DirRecovery {
    pub(crate) recovered: Recovered,
    /// Segment files read.
    pub(crate) segment_files: usize,
    /// Their total size.
    pub(crate) segment_bytes: u64,
    /// The largest one's size.
    pub(crate) largest: u64,
}

/// Reads every segment file of `dir`, one at a time, through sink-core's recovery. Changes
/// nothing: the repairs are the returned machine's first commands.
pub(crate) fn recover(dir: &Path, config: SpoolConfig) -> Result<DirRecovery, SpoolError> {
    let mut recovery = Recovery::new(config).map_err(|e| recover_error(dir, e))?;
    let files = segment_files(dir)?;
    let (mut segment_bytes, mut largest) = (0, 0);
    for (segment, path) in &files {
        let bytes = read_segment(dir, path)?;
        segment_bytes += bytes.len() as u64;
        largest = largest.max(bytes.len() as u64);
        recovery
            .add_segment(*segment, &bytes)
            .map_err(|e| recover_error(path, e))?;
    }
    let recovered = recovery.finish().map_err(|e| recover_error(dir, e))?;
    Ok(DirRecovery {
        recovered,
        segment_files: files.len(),
        segment_bytes,
        largest,
    })
}

fn recover_error(path: &Path, error: RecoverError) -> SpoolError {
    match error {
        RecoverError::NewerFormat {
            found, supported, ..
        } => SpoolError::NewerFormat {
            file: path.to_path_buf(),
            found,
            supported,
        },
        RecoverError::Config(e) => SpoolError::Config(e),
        other => SpoolError::Io {
            path: path.to_path_buf(),
            op: "recover",
            kind: io::ErrorKind::Other,
            message: other.to_string(),
        },
    }
}
