//! A spooled sink (issue #12) on real servers: events whose `send` returned are delivered after the producer is killed with SIGKILL at random points (sometimes with the broker down too), exactly once and in order, by the next process on the same spool; and a clean close leaves nothing to send again.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sink_core::event::MsgId;
use sink_nats::{EmitError, JetStreamSink, Mechanism};
use sink_testkit::{read_stream, ServerVersion};

/// Set in the child: the spool directory, the server URL and the run number.
const CHILD_DIR: &str = "JETSINK_SPOOLED_SINK_DIR";
const CHILD_URL: &str = "JETSINK_SPOOLED_SINK_URL";
const CHILD_RUN: &str = "JETSINK_SPOOLED_SINK_RUN";
const RUNS: u64 = 8;

fn spool_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("jetsink-spool-sink-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The child: a spooled sink that sends the events of its run one after another and prints
/// `accepted <run> <i>` once `send` returned (the event is durable in the spool), until killed.
async fn child(dir: &Path, url: &str, run: u64) {
    let sink = builder(url)
        .spool(dir)
        .reconnect(fast_reconnect())
        .retry_initial_connect(true)
        .connect()
        .await
        .expect("child connects");
    println!("ready");
    for i in 0.. {
        let e = event(&format!("run{run}"), i, 3);
        match sink.send(e).await {
            Ok(_pending) => println!("accepted {run} {i}"),
            Err(e) => panic!("child send {i}: {e}"),
        }
    }
}

/// What was stored, per run, in stream order: the event indexes.
fn stored_by_run(
    stored: &[sink_testkit::StoredMessage],
    ids: &HashMap<String, (u64, usize)>,
) -> BTreeMap<u64, Vec<usize>> {
    let mut by_run: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for m in stored {
        let id = m.msg_id.as_deref().expect("every message has a msg id");
        let (run, i) = ids
            .get(id)
            .unwrap_or_else(|| panic!("stored message {id} is no event of any run"));
        by_run.entry(*run).or_default().push(*i);
    }
    by_run
}

/// `test_name`: the calling test's name, which the child process runs.
async fn killed_producers_lose_nothing(version: ServerVersion, test_name: &str) {
    if let (Ok(dir), Ok(url), Ok(run)) = (
        std::env::var(CHILD_DIR),
        std::env::var(CHILD_URL),
        std::env::var(CHILD_RUN),
    ) {
        child(Path::new(&dir), &url, run.parse().expect("run")).await;
        return;
    }
    let mut server = server(version).await;
    let dir = spool_dir(version.as_str());
    // Accepted (printed) indexes per run.
    let mut accepted: BTreeMap<u64, usize> = BTreeMap::new();
    let mut state = 0x5EED_u64 ^ u64::from(version.as_str().len() as u32);
    for run in 0..RUNS {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
            .env(CHILD_DIR, &dir)
            .env(CHILD_URL, server.url())
            .env(CHILD_RUN, run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        // Kill after a random number of accepted events; every other run with the broker down
        // for the second half, so accepted events pile up in the spool undelivered.
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let kill_after = 20 + (state >> 33) as usize % 200;
        let broker_down = run % 2 == 1;
        let mut count = 0;
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while count < kill_after {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("run {run}: the child printed nothing for too long"));
            if let Some(rest) = line.strip_prefix("accepted ") {
                let mut parts = rest.split(' ');
                let r: u64 = parts.next().unwrap().parse().unwrap();
                let i: usize = parts.next().unwrap().parse().unwrap();
                assert_eq!(r, run);
                accepted.insert(run, i);
                count += 1;
                if broker_down && count == kill_after / 2 {
                    server.kill().await.expect("kill the broker");
                }
            }
        }
        child.kill().expect("SIGKILL the child");
        let _ = child.wait();
        // Lines already written before the kill count too.
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(rest) = line.strip_prefix("accepted ") {
                let i: usize = rest.split(' ').nth(1).unwrap().parse().unwrap();
                accepted.insert(run, i);
            }
        }
        let _ = reader.join();
        if broker_down {
            server.restart().await.expect("restart the broker");
        }
    }
    // The last process: delivers what the killed ones left, then closes cleanly. Its queue holds
    // 16 events, far fewer than are left: the replay has to wait for room as it goes.
    let sink = builder(&server.url())
        .queue_bound(16, 1 << 20)
        .window(16)
        .spool(&dir)
        .reconnect(fast_reconnect())
        .connect()
        .await
        .expect("connect");
    // New events sent at once wait behind the replay, holding the 16 queue permits: the replay
    // must not need them (it takes room in the delivery machine instead).
    let fresh = spawn_send_all(&sink, &format!("run{RUNS}"), 100, 3);
    let fresh = tokio::time::timeout(Duration::from_secs(120), fresh)
        .await
        .expect("new events are delivered after the replay")
        .expect("sender");
    assert_all_ok(&fresh);
    accepted.insert(RUNS, 99);
    // A flush waits behind the replay: when it returns, everything left is delivered.
    if tokio::time::timeout(Duration::from_secs(120), sink.flush())
        .await
        .is_err()
    {
        panic!("the spool did not drain: {:?}", sink.health());
    }
    // The spool's count is live (the rest of health is the driver's last snapshot).
    let h = sink.health();
    assert_eq!(h.spool.map(|s| s.spool.records), Some(0), "{h:?}");
    let mechanism = sink.health().mechanism;
    assert_eq!(
        mechanism == Mechanism::FastBatch,
        version == ServerVersion::V2_15
    );
    let report = sink.close(Duration::from_secs(10)).await;
    assert!(report.complete(), "{report:?}");

    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stored = read_stream(&js, STREAM, Duration::from_secs(30))
        .await
        .expect("read back");
    let mut ids = HashMap::new();
    for (&run, &last) in &accepted {
        // One more than the last printed may be durable (its `send` had not returned yet).
        for i in 0..=last + 1 {
            let e = event(&format!("run{run}"), i, 3);
            ids.insert(MsgId::for_event(&e).as_str().to_owned(), (run, i));
        }
    }
    let by_run = stored_by_run(&stored, &ids);
    for (&run, &last) in &accepted {
        let got = by_run.get(&run).cloned().unwrap_or_default();
        let want: Vec<usize> = (0..=last).collect();
        let prefix: Vec<usize> = got.iter().copied().take(last + 1).collect();
        assert_eq!(
            prefix, want,
            "run {run}: every accepted event stored once, in order (stored: {got:?})"
        );
        assert!(
            got.len() <= last + 2 && got.get(last + 1).is_none_or(|&i| i == last + 1),
            "run {run}: only the event in flight at the kill may follow: {got:?}"
        );
    }
    eprintln!(
        "{version}: {RUNS} kills, {} events accepted, {} stored",
        accepted.values().map(|l| l + 1).sum::<usize>(),
        stored.len()
    );
    // A clean close left nothing to send again.
    let again = builder(&server.url())
        .spool(&dir)
        .connect()
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = again.health();
    assert_eq!(h.spool.map(|s| s.spool.records), Some(0), "{h:?}");
    assert!(again.close(Duration::from_secs(5)).await.complete());
    assert_eq!(
        read_stream(&js, STREAM, Duration::from_secs(30))
            .await
            .expect("read back")
            .len(),
        stored.len(),
        "nothing was sent twice after the clean close"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_producers_lose_nothing_on_2_9() {
    killed_producers_lose_nothing(ServerVersion::V2_9, "killed_producers_lose_nothing_on_2_9")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_producers_lose_nothing_on_2_15() {
    killed_producers_lose_nothing(
        ServerVersion::V2_15,
        "killed_producers_lose_nothing_on_2_15",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_sink_refuses_try_send_and_a_second_process_on_its_directory() {
    let server = server(ServerVersion::V2_9).await;
    let dir = spool_dir("locked");
    let sink: JetStreamSink = builder(&server.url())
        .spool(&dir)
        .connect()
        .await
        .expect("connect");
    let refused = sink.try_send(event("locked", 0, 1));
    assert!(
        matches!(&refused, Err(EmitError::SpoolNeedsSend { .. })),
        "{refused:?}"
    );
    let second = builder(&server.url()).spool(&dir).connect().await;
    match second {
        Err(e) => assert!(e.to_string().contains("spool"), "{e}"),
        Ok(_) => panic!("a second sink on a held spool directory must not start"),
    }
    sink.emit(&event("locked", 1, 1)).await.expect("delivered");
    assert!(sink.close(Duration::from_secs(5)).await.complete());
    let _ = std::fs::remove_dir_all(&dir);
}
