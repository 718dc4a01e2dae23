//! The spool on a real directory: append/ack/reopen round trip, group commit sharing fdatasyncs between concurrent appenders, damage on disk quarantined or cut on reopen, a newer format and a locked directory refused, and kill -9 of a child process at random points losing no record it saw durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt as _};
use sink_nats::spool::{
    inspect, DiskSpool, Opened, RecordSeq, SpoolConfig, SpoolError, FORMAT_VERSION, QUARANTINE_DIR,
};

/// A fresh directory under cargo's per-target temp dir (a real file system, where fdatasync
/// does its work), removed when dropped.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir(path)
    }

    fn spool(&self) -> PathBuf {
        self.0.join("spool")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config() -> SpoolConfig {
    SpoolConfig {
        segment_size: 32 * 1024,
        max_bytes: 8 << 20,
        max_record: 4096,
        spare_segments: 1,
        seed: 0,
    }
}

/// A payload that names its index, of a length that varies with it.
fn payload(n: u64) -> Vec<u8> {
    let mut p = format!("record {n} ").into_bytes();
    p.extend(std::iter::repeat_n(
        b'a' + (n % 26) as u8,
        (n as usize * 37) % 300,
    ));
    p
}

fn replay(opened: Opened) -> (DiskSpool, Vec<(RecordSeq, Vec<u8>)>) {
    let records = opened
        .replay
        .map(|r| {
            let r = r.expect("replay");
            (r.seq, r.payload.to_vec())
        })
        .collect();
    (opened.spool, records)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// Appends 1..=n (each awaited) and closes.
fn spool_with(dir: &Path, config: SpoolConfig, n: u64) {
    let opened = DiskSpool::open(dir, config).expect("open");
    let spool = opened.spool;
    block_on(async {
        for i in 1..=n {
            assert_eq!(spool.append(&payload(i)).await.expect("append"), i);
        }
        spool.close().await.expect("close");
    });
}

fn segment_file(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.jspool"))
}

#[test]
fn appended_records_come_back_in_order_after_reopen_without_the_acknowledged_ones() {
    let t = TestDir::new("roundtrip");
    let dir = t.spool();
    let opened = DiskSpool::open(&dir, config()).expect("open an empty directory");
    assert_eq!(opened.report.records, 0);
    let (spool, replayed) = replay(opened);
    assert!(replayed.is_empty());
    // 600 records of up to ~350 bytes: several 32 KiB segments, appended 8 at a time.
    block_on(async {
        let mut next = 1u64;
        while next <= 600 {
            let batch: Vec<u64> = (next..(next + 8).min(601)).collect();
            let mut pending = FuturesUnordered::new();
            for &i in &batch {
                let (spool, p) = (&spool, payload(i));
                pending.push(async move { spool.append(&p).await.map(|seq| (i, seq)) });
            }
            while let Some(r) = pending.next().await {
                let (i, seq) = r.expect("append");
                assert!(seq >= 1);
                let _ = i;
            }
            next += batch.len() as u64;
        }
    });
    let stats = spool.stats();
    assert_eq!(stats.spool.records, 600);
    assert!(stats.spool.segments >= 3, "{stats:?}");
    // The broker stored the first 250; one more append carries the watermark to disk.
    for seq in 1..=250 {
        assert!(spool.ack(seq));
    }
    assert!(!spool.ack(250), "acknowledged twice");
    let last = block_on(spool.append(b"after the acks")).expect("append");
    assert_eq!(last, 601);
    let stats = spool.stats();
    assert_eq!(stats.spool.records, 351);
    assert_eq!(stats.spool.oldest, Some(251));
    block_on(spool.close()).expect("close");

    let opened = DiskSpool::open(&dir, config()).expect("reopen");
    assert_eq!(opened.report.records, 351);
    assert_eq!(opened.report.oldest, Some(251));
    assert!(opened.report.quarantined.is_empty() && opened.report.torn_tail.is_none());
    let (spool, replayed) = replay(opened);
    let seqs: Vec<RecordSeq> = replayed.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (251..=601).collect::<Vec<_>>());
    // Appends were concurrent within each batch of 8: a record's payload names its index,
    // and sequences were assigned in the order the appends reached the spool.
    let mut indices = BTreeSet::new();
    for (seq, p) in &replayed[..replayed.len() - 1] {
        let text = String::from_utf8_lossy(p);
        let i: u64 = text.split(' ').nth(1).unwrap().parse().unwrap();
        assert_eq!(p, &payload(i), "record {seq}");
        assert!(indices.insert(i), "index {i} twice");
    }
    assert_eq!(replayed.last().unwrap().1, b"after the acks");
    // Appending continues after the replayed records.
    assert_eq!(block_on(spool.append(b"next")).expect("append"), 602);
    block_on(spool.close()).expect("close");
}

/// Runs `appenders` tasks that append `each` records, at most `window` in flight per task;
/// returns the spool's stats after.
fn run_appenders(dir: &Path, appenders: u64, each: u64, window: usize) -> (u64, u64) {
    let opened = DiskSpool::open(dir, config()).expect("open");
    let spool = opened.spool;
    let before = spool.stats();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut tasks = Vec::new();
        for a in 0..appenders {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let mut in_flight = std::collections::VecDeque::new();
                let mut last = 0;
                for i in 0..each {
                    let d = spool.submit(&payload(a * each + i)).await.expect("submit");
                    in_flight.push_back(d);
                    if in_flight.len() >= window {
                        let seq = in_flight.pop_front().unwrap().await.expect("durable");
                        assert!(seq > last, "one appender's records are durable in order");
                        last = seq;
                    }
                }
                for d in in_flight {
                    let seq = d.await.expect("durable");
                    assert!(seq > last);
                    last = seq;
                }
            }));
        }
        for t in tasks {
            t.await.expect("appender");
        }
    });
    let after = spool.stats();
    block_on(spool.close()).expect("close");
    assert_eq!(after.spool.durable_through, appenders * each);
    (
        after.commits - before.commits,
        after.data_syncs - before.data_syncs,
    )
}

#[test]
fn concurrent_appenders_share_each_fdatasync() {
    let t = TestDir::new("group");
    // Four appenders each waiting for its own record before the next: while one commit's
    // fdatasync runs the others append, and the next commit takes them all.
    let appends = 4 * 150;
    let (commits, syncs) = run_appenders(&t.0.join("one-at-a-time"), 4, 150, 1);
    eprintln!(
        "4 appenders, 1 in flight each: {appends} appends, {commits} commits, {syncs} fdatasyncs"
    );
    // How many share a sync depends on scheduling (about 2 on an idle machine); one commit
    // per append would mean none is ever shared.
    assert!(
        commits < appends,
        "{commits} commits for {appends} appends: syncs are not shared"
    );
    // With 32 in flight each, a commit covers many records.
    let appends = 4 * 1000;
    let (commits, syncs) = run_appenders(&t.0.join("windowed"), 4, 1000, 32);
    eprintln!(
        "4 appenders, 32 in flight each: {appends} appends, {commits} commits, {syncs} fdatasyncs"
    );
    assert!(
        commits * 8 <= appends,
        "{commits} commits for {appends} appends with 128 in flight"
    );
    // fdatasyncs: one per segment a commit touches (two when it rolls), plus one per segment
    // prepared (~24 of 32 KiB here); still far fewer than appends.
    assert!(
        syncs * 8 <= appends,
        "{syncs} fdatasyncs ({commits} commits) for {appends} appends"
    );
}

/// Offset of record `k` (1-based) in the first segment of a spool written by [`spool_with`].
fn record_offset(k: u64) -> u64 {
    64 + (1..k).map(|i| 28 + payload(i).len() as u64).sum::<u64>()
}

#[test]
fn a_flipped_byte_in_a_middle_record_is_quarantined_on_reopen_and_counted_once() {
    let t = TestDir::new("flip");
    let dir = t.spool();
    spool_with(&dir, config(), 9);
    let segment = segment_file(&dir, 1);
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = record_offset(5) + 28 + 3;
    bytes[at as usize] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();

    let before = inspect(&dir).expect("inspect");
    assert_eq!(before.report.quarantined.len(), 1);
    assert!(before.needs_repair() && before.damaged());
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "inspect writes nothing"
    );

    let opened = DiskSpool::open(&dir, config()).expect("reopen");
    let region = opened.report.quarantined.clone();
    assert_eq!(region.len(), 1, "{:?}", opened.report);
    assert_eq!(region[0].first_missing, Some(5));
    assert_eq!(region[0].missing, 1);
    assert_eq!(region[0].offset, record_offset(5));
    let (spool, replayed) = replay(opened);
    let seqs: Vec<RecordSeq> = replayed.iter().map(|r| r.0).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 6, 7, 8, 9]);
    for (seq, p) in &replayed {
        assert_eq!(p, &payload(*seq));
    }
    let stats = spool.stats();
    assert_eq!((stats.spool.quarantined, stats.spool.missing), (1, 1));
    block_on(spool.close()).expect("close");

    // The damaged bytes were copied aside before the region was marked.
    let side: Vec<PathBuf> = std::fs::read_dir(dir.join(QUARANTINE_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(side.len(), 1, "{side:?}");
    let copied = std::fs::read(&side[0]).unwrap();
    let start = record_offset(5) as usize;
    assert_eq!(copied, bytes[start..start + copied.len()]);
    assert_eq!(copied.len() as u64, record_offset(6) - record_offset(5));

    // The next recovery steps over the mark: nothing new is quarantined.
    let opened = DiskSpool::open(&dir, config()).expect("reopen again");
    assert!(opened.report.quarantined.is_empty(), "{:?}", opened.report);
    assert_eq!(opened.report.previously_quarantined, 1);
    let (spool, replayed) = replay(opened);
    assert_eq!(replayed.len(), 8);
    block_on(spool.close()).expect("close");
    let after = inspect(&dir).expect("inspect");
    assert!(!after.needs_repair() && !after.damaged());
    assert_eq!(after.quarantine_files, 1);
}

#[test]
fn a_truncated_tail_is_cut_and_counted_and_appends_continue_there() {
    let t = TestDir::new("torn");
    let dir = t.spool();
    spool_with(&dir, config(), 6);
    let segment = segment_file(&dir, 1);
    // Cut the file in the middle of record 6's payload.
    let cut = record_offset(6) + 28 + 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let opened = DiskSpool::open(&dir, config()).expect("reopen");
    let torn = opened.report.torn_tail.expect("a torn tail");
    assert_eq!((torn.seq, torn.offset), (6, record_offset(6)));
    let (spool, replayed) = replay(opened);
    assert_eq!(
        replayed,
        (1..=5).map(|i| (i, payload(i))).collect::<Vec<_>>()
    );
    assert_eq!(spool.stats().spool.torn_tails, 1);
    assert_eq!(block_on(spool.append(b"again")).expect("append"), 6);
    block_on(spool.close()).expect("close");

    let opened = DiskSpool::open(&dir, config()).expect("reopen");
    assert!(opened.report.torn_tail.is_none());
    let (spool, replayed) = replay(opened);
    assert_eq!(replayed.len(), 6);
    assert_eq!(replayed[5], (6, b"again".to_vec()));
    block_on(spool.close()).expect("close");
}

#[test]
fn a_segment_of_a_newer_format_is_refused_and_left_untouched() {
    let t = TestDir::new("newer");
    let dir = t.spool();
    spool_with(&dir, config(), 3);
    let segment = segment_file(&dir, 1);
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&segment, &bytes).unwrap();

    let err = DiskSpool::open(&dir, config()).expect_err("a newer format");
    assert_eq!(
        err,
        SpoolError::NewerFormat {
            file: segment.clone(),
            found: FORMAT_VERSION + 1,
            supported: FORMAT_VERSION,
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("0000000000000001.jspool") && text.contains("jetsink version that wrote it"),
        "{text}"
    );
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);
    assert!(matches!(
        inspect(&dir),
        Err(SpoolError::NewerFormat { found, .. }) if found == FORMAT_VERSION + 1
    ));
    // The refused open released the directory.
    bytes[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    std::fs::write(&segment, &bytes).unwrap();
    let (spool, replayed) = replay(DiskSpool::open(&dir, config()).expect("open"));
    assert_eq!(replayed.len(), 3);
    drop(spool);
}

#[test]
fn a_directory_in_use_is_refused_and_free_again_after_close() {
    let t = TestDir::new("locked");
    let dir = t.spool();
    let first = DiskSpool::open(&dir, config()).expect("open").spool;
    let err = DiskSpool::open(&dir, config()).expect_err("second open");
    assert_eq!(
        err,
        SpoolError::Locked {
            dir: dir.clone(),
            pid: Some(std::process::id()),
        }
    );
    assert!(
        err.to_string().contains(&format!(
            "is in use: its lock is held by pid {}",
            std::process::id()
        )),
        "{err}"
    );
    let seen = inspect(&dir).expect("inspect while in use");
    assert_eq!(seen.in_use.map(|u| u.pid), Some(Some(std::process::id())));
    block_on(first.close()).expect("close");
    let again = DiskSpool::open(&dir, config())
        .expect("open after close")
        .spool;
    // Dropping the last handle releases the directory too (the IO thread stops).
    drop(again);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match DiskSpool::open(&dir, config()) {
            Ok(opened) => break drop(opened),
            Err(SpoolError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn closing_and_reopening_while_another_thread_spawns_processes_is_never_refused() {
    let t = TestDir::new("spawning");
    let dir = t.spool();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut spawned = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = Command::new("true").status();
                spawned += 1;
            }
            spawned
        })
    };
    // A child being spawned holds a copy of every descriptor until it execs, the lock file's
    // too: without the retry about one reopen in sixteen met the lock still taken.
    for round in 0..150 {
        let opened = DiskSpool::open(&dir, config())
            .unwrap_or_else(|e| panic!("reopen {round} while processes are spawned: {e}"));
        block_on(opened.spool.close()).expect("close");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let spawned = spawner.join().expect("spawner");
    assert!(spawned > 10, "only {spawned} processes spawned meanwhile");
}

#[test]
fn appends_past_max_bytes_and_bad_payloads_are_refused_and_a_closed_spool_takes_none() {
    let t = TestDir::new("full");
    let dir = t.spool();
    let config = SpoolConfig {
        max_bytes: 4 * 1024,
        ..config()
    };
    let spool = DiskSpool::open(&dir, config).expect("open").spool;
    block_on(async {
        // Records of 28 + 996 bytes: four fill the bound exactly.
        let p = [7u8; 996];
        for seq in 1..=4 {
            assert_eq!(spool.append(&p).await.expect("append"), seq);
        }
        let err = spool.append(&p).await.expect_err("full");
        assert!(
            matches!(
                err,
                SpoolError::Full {
                    max_bytes: 4096,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(spool.append(&[]).await, Err(SpoolError::Empty)));
        assert!(matches!(
            spool.append(&[1; 5000]).await,
            Err(SpoolError::TooLarge {
                len: 5000,
                max: 4096
            })
        ));
        spool.close().await.expect("close");
        assert!(matches!(
            spool.append(&p).await,
            Err(SpoolError::Closed { .. })
        ));
    });
}

// ---------------------------------------------------------------------------------------------
// kill -9

/// Set in the child: the spool directory it appends to.
const CHILD_DIR: &str = "JETSINK_SPOOL_CRASH_DIR";
/// Set in the child: its run number (payloads name it).
const CHILD_RUN: &str = "JETSINK_SPOOL_CRASH_RUN";
/// Overrides the seed of the kill points.
const SEED_VAR: &str = "JETSINK_SPOOL_CRASH_SEED";
const CRASH_TEST: &str = "kill_9_at_random_points_loses_no_record_the_child_saw_durable";
const RUNS: u64 = 30;
/// Appending tasks in the child.
const CHILD_APPENDERS: u64 = 4;
/// The child acknowledges a record once this many later ones are durable.
const ACK_LAG: usize = 150;

fn crash_config() -> SpoolConfig {
    SpoolConfig {
        segment_size: 16 * 1024,
        max_bytes: 64 << 20,
        max_record: 1024,
        spare_segments: 1,
        seed: 0,
    }
}

/// What run `run`'s appender `task` appends as its `i`th record.
fn crash_payload(run: u64, task: u64, i: u64) -> Vec<u8> {
    let mut p = format!("r{run} t{task} i{i} ").into_bytes();
    let fill = b'a' + ((run + task + i) % 26) as u8;
    p.extend(std::iter::repeat_n(
        fill,
        ((i * 37 + task * 11) % 300) as usize,
    ));
    p
}

/// The (run, task, i) a payload names, when it is one [`crash_payload`] makes.
fn parse_crash_payload(p: &[u8]) -> Option<(u64, u64, u64)> {
    let text = std::str::from_utf8(p).ok()?;
    let mut parts = text.splitn(4, ' ');
    let run = parts.next()?.strip_prefix('r')?.parse().ok()?;
    let task = parts.next()?.strip_prefix('t')?.parse().ok()?;
    let i = parts.next()?.strip_prefix('i')?.parse().ok()?;
    (crash_payload(run, task, i) == p).then_some((run, task, i))
}

/// The child: opens the spool, acknowledges what it replays (as if delivered), then appends
/// from four tasks and prints `durable <seq> <run> <task> <i>` once each append resolved, and
/// `ack <seq>` before each acknowledgement, until it is killed.
fn crash_child(dir: &Path, run: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let opened = DiskSpool::open(dir, crash_config()).expect("child open");
        let spool = opened.spool;
        let replayed: Vec<RecordSeq> = opened.replay.map(|r| r.expect("replay").seq).collect();
        println!("ready {}", replayed.len());
        for seq in replayed {
            println!("ack {seq}");
            spool.ack(seq);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for task in 0..CHILD_APPENDERS {
            let spool = spool.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let seq = spool
                        .append(&crash_payload(run, task, i))
                        .await
                        .expect("child append");
                    println!("durable {seq} {run} {task} {i}");
                    let _ = tx.send(seq);
                }
            });
        }
        let mut durable = std::collections::VecDeque::new();
        let stop = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                Some(seq) = rx.recv() => {
                    durable.push_back(seq);
                    if durable.len() > ACK_LAG {
                        let seq = durable.pop_front().unwrap();
                        println!("ack {seq}");
                        spool.ack(seq);
                    }
                }
                () = &mut stop => break,
            }
        }
    });
    panic!("the child was not killed within 30 s");
}

/// splitmix64, for the kill points.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the parent knows from every child's output so far.
#[derive(Default)]
struct Seen {
    /// Records a child printed durable: their (run, task, i).
    durable: BTreeMap<RecordSeq, (u64, u64, u64)>,
    /// Records a child was about to acknowledge.
    acked: BTreeSet<RecordSeq>,
    /// Where each (run, task, i) was found, by any replay: it must never move.
    found_at: HashMap<(u64, u64, u64), RecordSeq>,
    /// What each record found by a replay held: once found it is durable, and its sequence
    /// is never reused.
    found: HashMap<RecordSeq, (u64, u64, u64)>,
    replayed_total: u64,
}

#[test]
fn kill_9_at_random_points_loses_no_record_the_child_saw_durable() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let run = std::env::var(CHILD_RUN).unwrap().parse().unwrap();
        crash_child(Path::new(&dir), run);
        return;
    }
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0012);
    eprintln!("kill points from seed {seed} (set {SEED_VAR} to repeat another)");
    let mut rng = seed;
    let t = TestDir::new("kill9");
    let dir = t.spool();
    let mut seen = Seen::default();
    let started = Instant::now();
    let mut killed_mid_append = 0;
    for run in 0..RUNS {
        let early = next_random(&mut rng).is_multiple_of(5);
        let delay = if early {
            Duration::from_millis(next_random(&mut rng) % 40)
        } else {
            Duration::from_millis(20 + next_random(&mut rng) % 400)
        };
        let lines = run_child(&dir, run, early, delay);
        let mut printed = 0;
        for line in &lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["durable", seq, r, task, i] => {
                    let ident = (
                        r.parse().unwrap(),
                        task.parse().unwrap(),
                        i.parse().unwrap(),
                    );
                    seen.durable.insert(seq.parse().unwrap(), ident);
                    printed += 1;
                }
                ["ack", seq] => {
                    seen.acked.insert(seq.parse().unwrap());
                }
                _ => {}
            }
        }
        if printed > 0 {
            killed_mid_append += 1;
        }
        verify(&dir, &mut seen, run);
        eprintln!(
            "run {run}: killed after {delay:?}{}, {printed} durable printed",
            if early { " from spawn" } else { " from ready" }
        );
    }
    eprintln!(
        "{RUNS} kills in {:?}: {} records printed durable, {} acknowledged, {} replayed in all",
        started.elapsed(),
        seen.durable.len(),
        seen.acked.len(),
        seen.replayed_total
    );
    assert!(
        killed_mid_append >= RUNS / 2,
        "only {killed_mid_append} runs were killed while appending"
    );
    assert!(seen.durable.len() > 500, "{} durable", seen.durable.len());
}

/// A child process, killed (SIGKILL) and reaped when dropped, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the child, kills it with SIGKILL after `delay` (from spawn when `early`, else from
/// its `ready` line) and returns the complete lines it printed.
fn run_child(dir: &Path, run: u64, early: bool, delay: Duration) -> Vec<String> {
    let mut child = Killed(
        Command::new(std::env::current_exe().unwrap())
            .args([CRASH_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir)
            .env(CHILD_RUN, run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                // A line cut by the kill has no newline: not printed, as far as the test goes.
                Ok(_) if line.ends_with(b"\n") => {
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    // libtest starts the first line with `test <name> ... `.
                    let line = match line.rsplit_once(" ... ") {
                        Some((_, rest)) => rest.to_owned(),
                        None => line,
                    };
                    if line.starts_with("ready") {
                        let _ = tx.send(());
                    }
                    lines.push(line);
                }
                Ok(_) => break,
            }
        }
        lines
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    if !early {
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("run {run}: the child never became ready"));
    }
    std::thread::sleep(delay);
    let exited = child.0.try_wait().expect("child status");
    child.0.kill().expect("SIGKILL the child");
    let status = child.0.wait().expect("reap the child");
    let lines = reader.join().expect("stdout reader");
    let errors = errors.join().expect("stderr reader");
    assert!(
        exited.is_none(),
        "run {run}: the child exited by itself ({status}):\n{errors}"
    );
    lines
}

/// Reopens the spool the killed child left and checks its replay against what the children
/// printed: every record printed durable and not acknowledged comes back exactly once, in
/// order, with its payload; nothing comes back that was never appended or twice.
fn verify(dir: &Path, seen: &mut Seen, run: u64) {
    let opened = DiskSpool::open(dir, crash_config()).expect("reopen after kill -9");
    let report = opened.report.clone();
    assert!(
        report.quarantined.is_empty() && report.damaged_segments.is_empty(),
        "run {run}: a process crash left damage: {report:?}"
    );
    let (spool, replayed) = replay(opened);
    let mut idents = BTreeSet::new();
    let mut last_seq = 0;
    let mut last_i: HashMap<(u64, u64), u64> = HashMap::new();
    for (seq, p) in &replayed {
        assert!(*seq > last_seq, "run {run}: {seq} after {last_seq}");
        last_seq = *seq;
        let ident = parse_crash_payload(p).unwrap_or_else(|| {
            panic!(
                "run {run}: record {seq} holds {:?}, never appended",
                String::from_utf8_lossy(p)
            )
        });
        assert!(idents.insert(ident), "run {run}: {ident:?} replayed twice");
        if let Some(printed) = seen.durable.get(seq) {
            assert_eq!(
                *printed, ident,
                "run {run}: record {seq} holds another payload"
            );
        }
        let held = *seen.found.entry(*seq).or_insert(ident);
        assert_eq!(held, ident, "run {run}: record {seq} changed its payload");
        let at = *seen.found_at.entry(ident).or_insert(*seq);
        assert_eq!(
            at, *seq,
            "run {run}: {ident:?} moved from record {at} to {seq}"
        );
        let (r, task, i) = ident;
        if let Some(prev) = last_i.insert((r, task), i) {
            assert!(prev < i, "run {run}: appender ({r}, {task}) out of order");
        }
    }
    let replayed_seqs: BTreeSet<RecordSeq> = replayed.iter().map(|r| r.0).collect();
    let lost: Vec<RecordSeq> = seen
        .durable
        .keys()
        .filter(|s| !seen.acked.contains(s) && !replayed_seqs.contains(s))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "run {run}: {} records printed durable were not replayed: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    seen.replayed_total += replayed.len() as u64;
    block_on(spool.close()).expect("close");
}
