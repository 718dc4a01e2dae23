//! The durable local spool on a real directory: opens and locks it, recovers what it holds, and runs sink-core's spool machine with its IO on a dedicated thread, so that many producers share each fdatasync.
//!
//! [`DiskSpool::open`] creates the directory if needed, takes its lock, reads every segment
//! file through [`Recovery`](sink_core::spool::Recovery), performs the repairs recovery asked
//! for (a torn tail zeroed, damaged regions copied into `quarantine/` and marked, unreadable
//! segments moved there) and the opening sync, and returns the spool with the records to
//! deliver again ([`Replay`]) and what recovery found ([`RecoveryReport`]).
//!
//! Appends then go through the machine: [`DiskSpool::append`] resolves once its record is
//! durable. All IO runs on one thread per spool (`jetsink-spool`), which performs the machine's
//! commands one at a time, in order, exactly as sink-core documents them (see the private
//! `disk` module and the test kit's `SimDisk::plan`, which lists the same operations). While
//! one group commit's fdatasync runs, every append from every producer is staged, and the next
//! commit writes them all with one fdatasync: with `n` appends outstanding a sync covers up to
//! `n` records. [`DiskSpool::ack`] tells the machine a record was stored by the broker; whole
//! acknowledged segments are reused or deleted.
//!
//! # Choices
//!
//! - **Lock**: an exclusive `flock` on `jetsink.lock` in the directory through
//!   [`std::fs::File::try_lock`] (stable since Rust 1.89; no `libc` and no `unsafe`). The
//!   kernel drops it when the process dies, so a crash never leaves a stale lock. The file
//!   holds the holder's pid, which [`SpoolError::Locked`] names. `flock` locks conflict between
//!   two opens in one process too, so a second [`DiskSpool::open`] of the same directory is
//!   refused like another process would be. A lock found taken is tried again for 250 ms: a
//!   child process being spawned by any thread holds a copy of every descriptor until it execs,
//!   so a spool closed at that instant stays locked a little longer (measured: 6% of
//!   close-then-reopen cycles while a thread spawned processes in a loop). (Over NFS `flock`
//!   may be local to one client.)
//! - **Preallocation**: a new segment is filled with zeros (1 MiB writes) before its header,
//!   not `fallocate`d (std has no fallocate, and fallocated extents are *unwritten*: the first
//!   write into each would make its fdatasync commit file-system metadata). Writing into blocks
//!   the file already owns makes each group commit's fdatasync flush data only: measured with
//!   `jetsink bench --spool-only`, a raw log in a zero-filled file did 449k records/s at 64 per
//!   fdatasync against 262k in a sparse one (1.39M against 1.06M at 512). During an outage the
//!   spool pays for it (every new 64 MiB segment is written twice, and its rows run about as
//!   fast as the sparse raw log); once acknowledgements flow, segments are reused without it.
//! - **A thread, not `spawn_blocking`**: the IO loop runs for the spool's whole life and blocks
//!   on a condition variable between commands; the futures it resolves need no runtime.
//! - **Seeds**: segment salts are drawn from `config.seed` mixed with a value from the OS's
//!   random source (std's `RandomState`), fresh per open.
//!
//! # Example
//!
//! ```
//! use sink_nats::spool::{DiskSpool, SpoolConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("jetsink-spool-doc-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! let config = SpoolConfig { segment_size: 1 << 20, max_record: 4096, ..SpoolConfig::default() };
//! let opened = DiskSpool::open(&dir, config.clone())?;
//! let spool = opened.spool;
//! futures::executor::block_on(async {
//!     let first = spool.append(b"event 1").await?; // durable on disk when this returns
//!     assert!(spool.ack(first)); // the broker stored it
//!     // The acknowledgement reaches the disk with the next append.
//!     spool.append(b"event 2").await?;
//!     spool.close().await
//! })?;
//!
//! // After a restart (or a crash) what was not acknowledged is delivered again, in order.
//! let reopened = DiskSpool::open(&dir, config)?;
//! let replayed: Vec<_> = reopened.replay.map(|r| r.map(|r| r.payload)).collect::<Result<_, _>>()?;
//! assert_eq!(replayed, [&b"event 2"[..]]);
//! # drop(reopened.spool);
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```

mod disk;
mod error;
mod inspect;

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{BuildHasher as _, RandomState};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use sink_core::spool::{IoError, Refused, ReplaySegment, Spool, SpoolOutput, SpoolStats};
use tokio::sync::{oneshot, watch};

use self::disk::{Counters, DirLock, Disk};

pub use self::disk::{LOCK_FILE, QUARANTINE_DIR};
pub use self::error::SpoolError;
pub use self::inspect::{inspect, InUse, Inspection};
pub use sink_core::spool::{RecordSeq, RecoveryReport, SpoolConfig, FORMAT_VERSION};

/// A spool directory opened for writing; cheap to clone (every clone is the same spool). The
/// spool closes when the last clone is dropped (the IO thread finishes the commands it has,
/// then releases the directory's lock) or when [`DiskSpool::close`] is called.
#[derive(Debug, Clone)]
pub struct DiskSpool {
    handle: Arc<Handle>,
}

/// What [`DiskSpool::open`] returns.
#[derive(Debug)]
pub struct Opened {
    /// The spool, ready for appends.
    pub spool: DiskSpool,
    /// The records to deliver again, in order; acknowledge each with [`DiskSpool::ack`] once
    /// the broker stored it (read them before acknowledging: an acknowledged segment is reused).
    pub replay: Replay,
    /// What recovery found.
    pub report: RecoveryReport,
}

/// Counts for health and metrics: the machine's, and the IO performed since the spool opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskSpoolStats {
    /// Records, bytes, oldest sequence, segments, spares, quarantined regions, torn tails, ...
    pub spool: SpoolStats,
    /// Group commits performed (each one write per segment touched, then fdatasync).
    pub commits: u64,
    /// fdatasyncs (commits, preparations, repairs) and fsyncs of quarantine side files.
    pub data_syncs: u64,
    /// fsyncs of directories.
    pub dir_syncs: u64,
    /// Bytes written (records, headers, zeros of preallocation, marks).
    pub bytes_written: u64,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.request_close();
    }
}

#[derive(Debug)]
struct Shared {
    dir: Arc<Path>,
    state: Mutex<State>,
    /// Wakes the IO thread.
    wake: Condvar,
    counters: Arc<Counters>,
    /// Becomes true when the IO thread has stopped and released the directory.
    stopped: watch::Sender<bool>,
}

type DurableSender = oneshot::Sender<Result<RecordSeq, SpoolError>>;

#[derive(Debug)]
struct State {
    machine: Spool,
    /// Appends waiting for durability, in sequence order.
    waiters: VecDeque<(RecordSeq, DurableSender)>,
    /// Appends waiting for a prepared segment: told the preparation's error if it failed.
    ready: Vec<oneshot::Sender<Option<IoError>>>,
    /// The IO thread waits on `wake` (appenders notify only then).
    io_idle: bool,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn request_close(&self) {
        let mut state = self.lock();
        state.closing = true;
        self.wake.notify_one();
    }
}

impl State {
    /// Wakes the IO thread when it waits for work.
    fn nudge(&self, shared: &Shared) {
        if self.io_idle {
            shared.wake.notify_one();
        }
    }

    /// Handles the machine's events, returning its next IO command.
    fn next_io(
        &mut self,
        dir: &Path,
    ) -> Option<(sink_core::spool::IoId, sink_core::spool::IoCommand)> {
        while let Some(output) = self.machine.poll_output() {
            match output {
                SpoolOutput::Io { id, command } => return Some((id, command)),
                SpoolOutput::Durable { through } => {
                    while self.waiters.front().is_some_and(|(seq, _)| *seq <= through) {
                        let (seq, tx) = self.waiters.pop_front().expect("checked");
                        let _ = tx.send(Ok(seq));
                    }
                }
                SpoolOutput::Failed { through, error, .. } => {
                    while self.waiters.front().is_some_and(|(seq, _)| *seq <= through) {
                        let (seq, tx) = self.waiters.pop_front().expect("checked");
                        let _ = tx.send(Err(SpoolError::NotDurable {
                            dir: dir.to_path_buf(),
                            seq,
                            error: error.clone(),
                        }));
                    }
                    for tx in self.ready.drain(..) {
                        let _ = tx.send(None);
                    }
                }
                SpoolOutput::PrepareFailed { error, segment } => {
                    tracing::warn!(%segment, %error, "spool segment could not be prepared");
                    for tx in self.ready.drain(..) {
                        let _ = tx.send(Some(error.clone()));
                    }
                }
                SpoolOutput::Ready => {
                    for tx in self.ready.drain(..) {
                        let _ = tx.send(None);
                    }
                }
            }
        }
        None
    }
}

/// A random value from the OS (std seeds `RandomState` from it), fresh per call.
fn os_seed() -> u64 {
    RandomState::new().hash_one(std::process::id())
}

impl DiskSpool {
    /// Opens (creating it if needed) and locks the spool directory `dir`, recovers what its
    /// segment files hold, performs the repairs and the opening sync, and starts the IO
    /// thread. Blocking: from async code call it in `spawn_blocking`.
    ///
    /// Errors: [`SpoolError::Locked`] when another process (or another open) holds the
    /// directory, [`SpoolError::NewerFormat`] for a segment of a newer format (nothing is
    /// changed), [`SpoolError::PermissionDenied`], [`SpoolError::NoSpace`], [`SpoolError::Io`],
    /// [`SpoolError::Broken`] when a repair failed, [`SpoolError::Config`].
    pub fn open(dir: impl AsRef<Path>, config: SpoolConfig) -> Result<Opened, SpoolError> {
        let dir = dir.as_ref();
        disk::create_dir_durably(dir)?;
        let lock = DirLock::acquire(dir)?;
        let config = SpoolConfig {
            seed: config.seed ^ os_seed(),
            ..config
        };
        let recovered = disk::recover(dir, config)?.recovered;
        let counters = Arc::new(Counters::default());
        let mut disk = Disk::new(dir, lock, counters.clone())?;
        let mut machine = recovered.spool;
        // The repairs and the opening sync run here, before anything is replayed or appended.
        while let Some(output) = machine.poll_output() {
            if let SpoolOutput::Io { id, command } = output {
                match disk.perform(&command) {
                    Ok(()) => machine.handle_done(id),
                    Err(error) => machine.handle_failed(id, error),
                }
            }
        }
        if let Some(error) = machine.broken() {
            return Err(SpoolError::Broken {
                dir: dir.to_path_buf(),
                error: error.clone(),
            });
        }
        let dir: Arc<Path> = Arc::from(dir);
        let (stopped, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            state: Mutex::new(State {
                machine,
                waiters: VecDeque::new(),
                ready: Vec::new(),
                io_idle: false,
                closing: false,
            }),
            wake: Condvar::new(),
            counters,
            stopped,
        });
        let running = Running {
            shared: shared.clone(),
            disk: Some(disk),
        };
        std::thread::Builder::new()
            .name("jetsink-spool".into())
            .spawn(move || running.run())
            .map_err(|e| SpoolError::io(&dir, &dir, "start the IO thread for", &e))?;
        Ok(Opened {
            spool: DiskSpool {
                handle: Arc::new(Handle { shared }),
            },
            replay: Replay {
                dir: dir.to_path_buf(),
                plans: recovered.replay.into(),
                records: VecDeque::new(),
            },
            report: recovered.report,
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.handle.shared.dir
    }

    /// Appends `payload` as the next record and resolves with its sequence once it is durable
    /// (written and fdatasync'd, with whatever else was appended meanwhile). Waits while the
    /// next segment is being prepared.
    ///
    /// Errors: [`SpoolError::Full`] at `max_bytes` (nothing is spooled: apply the when-full
    /// policy and retry), [`SpoolError::NoSpace`] when no segment could be prepared (each such
    /// append retries the preparation once), [`SpoolError::TooLarge`], [`SpoolError::Empty`],
    /// [`SpoolError::NotDurable`] / [`SpoolError::Broken`] after an IO failure,
    /// [`SpoolError::Closed`].
    pub async fn append(&self, payload: &[u8]) -> Result<RecordSeq, SpoolError> {
        self.submit(payload).await?.await
    }

    /// Appends `payload` as the next record and returns as soon as it has its sequence (staged
    /// for the next group commit), with a future that resolves once it is durable: a producer
    /// can keep several records in flight. Errors as [`DiskSpool::append`].
    pub async fn submit(&self, payload: &[u8]) -> Result<Durability, SpoolError> {
        let shared = &self.handle.shared;
        loop {
            let ready = {
                let mut state = shared.lock();
                if state.closing {
                    return Err(SpoolError::Closed {
                        dir: shared.dir.to_path_buf(),
                    });
                }
                match state.machine.append(payload) {
                    Ok(seq) => {
                        let (tx, rx) = oneshot::channel();
                        state.waiters.push_back((seq, tx));
                        state.nudge(shared);
                        return Ok(Durability {
                            seq,
                            rx,
                            dir: shared.dir.clone(),
                        });
                    }
                    Err(Refused::NotReady { last_error: None }) => {
                        let (tx, rx) = oneshot::channel();
                        state.ready.push(tx);
                        state.nudge(shared);
                        rx
                    }
                    Err(refused) => {
                        // A refusal for want of a segment re-issues the failed preparation.
                        state.nudge(shared);
                        return Err(refusal(&shared.dir, refused));
                    }
                }
            };
            match ready.await {
                Ok(Some(error)) => return Err(SpoolError::from_machine(&shared.dir, error)),
                Ok(None) => {}
                Err(_) => {
                    return Err(SpoolError::Closed {
                        dir: shared.dir.to_path_buf(),
                    })
                }
            }
        }
    }

    /// The broker stored record `seq` (acks may come in any order). Returns whether `seq` was
    /// held and not yet acknowledged. Whole acknowledged segments are reused or deleted; the
    /// acknowledgement reaches the disk with the next append (records acknowledged after the
    /// last append are delivered again after a restart, and the broker's duplicate window
    /// absorbs them).
    pub fn ack(&self, seq: RecordSeq) -> bool {
        let shared = &self.handle.shared;
        let mut state = shared.lock();
        let held = state.machine.ack(seq);
        state.nudge(shared);
        held
    }

    /// Counts for health and metrics.
    pub fn stats(&self) -> DiskSpoolStats {
        let shared = &self.handle.shared;
        let spool = shared.lock().machine.stats();
        let c = &shared.counters;
        DiskSpoolStats {
            spool,
            commits: c.commits.load(Ordering::Relaxed),
            data_syncs: c.data_syncs.load(Ordering::Relaxed),
            dir_syncs: c.dir_syncs.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Stops taking appends, waits until the IO thread has committed what was appended and has
    /// released the directory, and says whether an IO error had broken the spool.
    pub async fn close(&self) -> Result<(), SpoolError> {
        let shared = &self.handle.shared;
        shared.request_close();
        let mut stopped = shared.stopped.subscribe();
        // The sender lives in `shared`, which this handle keeps alive: no error possible.
        let _ = stopped.wait_for(|s| *s).await;
        match shared.lock().machine.broken() {
            Some(error) => Err(SpoolError::Broken {
                dir: shared.dir.to_path_buf(),
                error: error.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// The error for an append the machine refused.
fn refusal(dir: &Path, refused: Refused) -> SpoolError {
    let dir_buf = || dir.to_path_buf();
    match refused {
        Refused::Full {
            bytes,
            record,
            max_bytes,
        } => SpoolError::Full {
            dir: dir_buf(),
            bytes,
            record,
            max_bytes,
        },
        Refused::TooLarge { len, max } => SpoolError::TooLarge { len, max },
        Refused::Empty => SpoolError::Empty,
        Refused::NotReady {
            last_error: Some(error),
        } => SpoolError::from_machine(dir, error),
        Refused::Broken { error } => SpoolError::Broken {
            dir: dir_buf(),
            error,
        },
        // `NotReady` without an error is waited for by the caller; any other refusal a newer
        // sink-core adds is reported as the machine words it.
        other => SpoolError::Prepare {
            dir: dir_buf(),
            error: IoError {
                kind: sink_core::spool::IoErrorKind::Other,
                message: other.to_string(),
            },
        },
    }
}

/// Resolves once an appended record is durable (see [`DiskSpool::submit`]).
#[derive(Debug)]
#[must_use = "the record is durable only once this resolves"]
pub struct Durability {
    seq: RecordSeq,
    rx: oneshot::Receiver<Result<RecordSeq, SpoolError>>,
    dir: Arc<Path>,
}

impl Durability {
    /// The record's sequence.
    pub fn seq(&self) -> RecordSeq {
        self.seq
    }
}

impl Future for Durability {
    type Output = Result<RecordSeq, SpoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(SpoolError::Closed {
                    dir: self.dir.to_path_buf(),
                })
            })
        })
    }
}

/// The IO thread: performs the machine's commands and resolves appends.
struct Running {
    shared: Arc<Shared>,
    disk: Option<Disk>,
}

impl Running {
    fn run(mut self) {
        let shared = self.shared.clone();
        let mut disk = self.disk.take().expect("the disk, until the thread ends");
        let mut state = shared.lock();
        loop {
            match state.next_io(&shared.dir) {
                Some((id, command)) => {
                    drop(state);
                    let result = disk.perform(&command);
                    state = shared.lock();
                    match result {
                        Ok(()) => state.machine.handle_done(id),
                        Err(error) => {
                            state.machine.handle_failed(id, error);
                            if state.machine.broken().is_some() {
                                // Appends waiting for a segment retry and meet the error (a
                                // failure with no record in flight emits no `Failed`).
                                for tx in state.ready.drain(..) {
                                    let _ = tx.send(None);
                                }
                            }
                        }
                    }
                }
                None if state.closing => break,
                None => {
                    state.io_idle = true;
                    state = shared
                        .wake
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                    state.io_idle = false;
                }
            }
        }
        drop(state);
        // Releases the directory's lock before `close` returns.
        drop(disk);
    }
}

impl Drop for Running {
    /// Runs when the thread ends, also by a panic: the directory is released (the disk, with
    /// its lock, is dropped first) and every caller still waiting is told the spool closed.
    fn drop(&mut self) {
        drop(self.disk.take());
        let mut state = self.shared.lock();
        state.closing = true;
        let dir = self.shared.dir.to_path_buf();
        for (_, tx) in state.waiters.drain(..) {
            let _ = tx.send(Err(SpoolError::Closed { dir: dir.clone() }));
        }
        state.ready.clear();
        drop(state);
        self.shared.stopped.send_replace(true);
    }
}

/// One record to deliver again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedRecord {
    /// Its sequence: acknowledge it with [`DiskSpool::ack`] once the broker stored it.
    pub seq: RecordSeq,
    /// The payload, as appended.
    pub payload: Bytes,
}

/// The records recovery found unacknowledged, in sequence order. Reads one segment file at a
/// time, so memory stays at one segment however much is spooled.
#[derive(Debug)]
pub struct Replay {
    dir: PathBuf,
    plans: VecDeque<ReplaySegment>,
    records: VecDeque<ReplayedRecord>,
}

impl Replay {
    fn load(&mut self, plan: &ReplaySegment) -> Result<(), SpoolError> {
        let file = self.dir.join(plan.segment.file_name());
        let bytes = Bytes::from(disk::read_segment(&self.dir, &file)?);
        let records = plan
            .records(&bytes)
            .map(|record| {
                record
                    .map(|r| ReplayedRecord {
                        seq: r.seq,
                        payload: bytes.slice_ref(r.payload),
                    })
                    .map_err(|error| SpoolError::ReplayChanged {
                        file: file.clone(),
                        error,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.records.extend(records);
        Ok(())
    }
}

impl Iterator for Replay {
    type Item = Result<ReplayedRecord, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.records.pop_front() {
                return Some(Ok(record));
            }
            let plan = self.plans.pop_front()?;
            if let Err(error) = self.load(&plan) {
                self.plans.clear();
                return Some(Err(error));
            }
        }
    }
}
