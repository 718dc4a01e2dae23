//! Lane scenarios on virtual time: one fast-batch behaviour per test, driven through the testkit's LaneSim and scripted fast-batch broker.

use std::time::Duration;

use sink_core::lane::LaneConfig;
use sink_testkit::fastbroker::{FastBroker, FastBrokerConfig, FastFault, FastFaults};
use sink_testkit::lanesim::LaneSim;

const IDLE: Duration = Duration::from_secs(600);

fn config(flow: u16) -> LaneConfig {
    LaneConfig {
        flow,
        max_events: 1000,
        max_bytes: 1 << 20,
        ack_timeout: Duration::from_secs(1),
        id_seed: 7,
        ..LaneConfig::default()
    }
}

fn sim(config: LaneConfig, producers: usize, faults: FastFaults) -> LaneSim {
    LaneSim::new(
        config,
        producers,
        FastBroker::new(FastBrokerConfig::default(), faults),
    )
    .expect("valid lane config")
}

/// Lets the scripted faults play out, then stops them and checks I1-I5.
fn finish(sim: &mut LaneSim) {
    if let Err(e) = sim.run_until_idle(IDLE).and_then(|()| sim.finish(IDLE)) {
        panic!("{e}\ntrace:\n{}", sim.trace_text());
    }
}

fn stored_ids(sim: &LaneSim) -> Vec<String> {
    sim.broker()
        .stored()
        .iter()
        .map(|r| r.msg_id.as_str().to_owned())
        .collect()
}

#[test]
fn start_waits_for_the_first_reply_then_pipelines_and_commits_when_dry() {
    let mut sim = sim(config(2), 1, FastFaults::none());
    for _ in 0..7 {
        sim.push(0, 8).expect("room");
    }
    finish(&mut sim);
    assert_eq!(stored_ids(&sim).len(), 7);
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 push #3 p0-m3
    +0.000s p0 push #4 p0-m4
    +0.000s p0 push #5 p0-m5
    +0.000s p0 push #6 p0-m6
    +0.000s p0 push #7 p0-m7
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":2,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +0.001s p0 send #3 p0-m3 batch 0-1 seq 3 op Append
    +0.001s p0 send #4 p0-m4 batch 0-1 seq 4 op Append
    +0.002s p0 reply batch 0-1 seq 2: {"msgs":2,"seq":2,"type":"ack"}
    +0.002s p0 delivered #1 batch 0-1 seq 1
    +0.002s p0 delivered #2 batch 0-1 seq 2
    +0.002s p0 send #5 p0-m5 batch 0-1 seq 5 op Append
    +0.002s p0 send #6 p0-m6 batch 0-1 seq 6 op Append
    +0.002s p0 reply batch 0-1 seq 4: {"msgs":2,"seq":4,"type":"ack"}
    +0.002s p0 delivered #3 batch 0-1 seq 3
    +0.002s p0 delivered #4 batch 0-1 seq 4
    +0.002s p0 send #7 p0-m7 batch 0-1 seq 7 op Append
    +0.002s p0 send control batch 0-1 seq 8 op CommitEob
    +0.003s p0 reply batch 0-1 seq 6: {"msgs":2,"seq":6,"type":"ack"}
    +0.003s p0 delivered #5 batch 0-1 seq 5
    +0.003s p0 delivered #6 batch 0-1 seq 6
    +0.003s p0 reply batch 0-1 seq 8: {"batch":"63cbe1e459320dd7-0-1","count":7,"seq":7,"stream":"EVENTS"}
    +0.003s p0 delivered #7 batch 0-1 seq 7
    +0.003s p0 batch 0-1 ended at 7: committed
    "#);
}

#[test]
fn a_gap_from_a_429_ends_the_batch_and_the_next_resumes_after_the_last_persisted() {
    // Publish 2 (event #3) is refused by a full ingest queue; #4 then shows the server a gap.
    let mut sim = sim(
        config(500),
        1,
        FastFaults::none().at(2, FastFault::Overloaded),
    );
    for _ in 0..4 {
        sim.push(0, 8).expect("room");
    }
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["p0-m1", "p0-m2", "p0-m3", "p0-m4"]);
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 push #3 p0-m3
    +0.000s p0 push #4 p0-m4
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +0.001s p0 send #3 p0-m3 batch 0-1 seq 3 op Append
    +0.001s p0 send #4 p0-m4 batch 0-1 seq 4 op Append
    +0.001s p0 send control batch 0-1 seq 5 op CommitEob
    +0.002s p0 reply batch 0-1 seq 3: {"error":{"code":429,"description":"ingest queue full"},"seq":0,"stream":"EVENTS"}
    +0.002s p0 reply batch 0-1 seq 4: {"last_seq":3,"seq":4,"type":"gap"}
    +0.002s p0 reply batch 0-1 seq 4: {"batch":"63cbe1e459320dd7-0-1","count":2,"seq":2,"stream":"EVENTS"}
    +0.002s p0 delivered #1 batch 0-1 seq 1
    +0.002s p0 delivered #2 batch 0-1 seq 2
    +0.002s p0 batch 0-1 ended at 2: refused: ingest queue full
    +0.002s p0 retrying from #3 in 100ms: refused: ingest queue full
    +0.002s p0 reply batch 0-1 seq 5: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.102s p0 send #3 p0-m3 batch 0-2 seq 1 op Start
    +0.103s p0 reply batch 0-2 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.103s p0 send #4 p0-m4 batch 0-2 seq 2 op Append
    +0.103s p0 send control batch 0-2 seq 3 op CommitEob
    +0.104s p0 reply batch 0-2 seq 3: {"batch":"63cbe1e459320dd7-0-2","count":2,"seq":4,"stream":"EVENTS"}
    +0.104s p0 delivered #3 batch 0-2 seq 1
    +0.104s p0 delivered #4 batch 0-2 seq 2
    +0.104s p0 batch 0-2 ended at 2: committed
    "#);
}

#[test]
fn a_lone_event_is_confirmed_within_one_round_trip() {
    let mut sim = sim(config(500), 1, FastFaults::none());
    sim.push(0, 8).expect("room");
    sim.run_for(Duration::from_millis(1));
    assert!(
        sim.producer(0).lane().is_empty(),
        "confirmed after one 1 ms round trip"
    );
    sim.run_for(Duration::from_millis(500));
    // Events trickling in while a batch is open are committed when the queue runs dry.
    sim.push(0, 8).expect("room");
    sim.push(0, 8).expect("room");
    sim.run_for(Duration::from_millis(2));
    assert!(
        sim.producer(0).lane().is_empty(),
        "start + first reply + commit"
    );
    finish(&mut sim);
    assert_eq!(sim.broker().open_batches(), 0, "no batch left open");
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Commit
    +0.001s p0 reply batch 0-1 seq 1: {"batch":"63cbe1e459320dd7-0-1","count":1,"seq":1,"stream":"EVENTS"}
    +0.001s p0 delivered #1 batch 0-1 seq 1
    +0.001s p0 batch 0-1 ended at 1: committed
    +0.501s p0 push #2 p0-m2
    +0.501s p0 push #3 p0-m3
    +0.501s p0 send #2 p0-m2 batch 0-2 seq 1 op Start
    +0.502s p0 reply batch 0-2 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.502s p0 send #3 p0-m3 batch 0-2 seq 2 op Append
    +0.502s p0 send control batch 0-2 seq 3 op CommitEob
    +0.503s p0 reply batch 0-2 seq 3: {"batch":"63cbe1e459320dd7-0-2","count":2,"seq":3,"stream":"EVENTS"}
    +0.503s p0 delivered #2 batch 0-2 seq 1
    +0.503s p0 delivered #3 batch 0-2 seq 2
    +0.503s p0 batch 0-2 ended at 2: committed
    "#);
}

#[test]
fn an_open_batch_waiting_to_commit_is_pinged_before_the_servers_idle_timeout() {
    // A lane told to linger 7 s before committing holds its batch open for 12 s in all (the
    // third event comes at 5 s), longer than the server's 10 s idle timeout. It pings whenever
    // it has sent nothing for a keepalive (3.333 s): at 3.333, 8.333 and 11.666 s.
    let config = LaneConfig {
        commit_linger: Duration::from_secs(7),
        ..config(500)
    };
    let mut sim = sim(config, 1, FastFaults::none());
    sim.push(0, 8).expect("room");
    sim.push(0, 8).expect("room");
    sim.run_for(Duration::from_secs(5));
    sim.push(0, 8).expect("room");
    finish(&mut sim);
    assert_eq!(sim.broker().timed_out_batches(), 0);
    assert_eq!(sim.stats().pings, 3);
    assert_eq!(sim.stats().batches_ended, 1, "one batch for all three");
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +3.334s p0 send control batch 0-1 seq 2 op Ping
    +3.335s p0 reply batch 0-1 seq 2: {"msgs":500,"seq":0,"type":"ack"}
    +5.000s p0 push #3 p0-m3
    +5.000s p0 send #3 p0-m3 batch 0-1 seq 3 op Append
    +8.333s p0 send control batch 0-1 seq 3 op Ping
    +8.334s p0 reply batch 0-1 seq 3: {"msgs":500,"seq":0,"type":"ack"}
    +11.666s p0 send control batch 0-1 seq 3 op Ping
    +11.667s p0 reply batch 0-1 seq 3: {"msgs":500,"seq":0,"type":"ack"}
    +12.000s p0 send control batch 0-1 seq 4 op CommitEob
    +12.001s p0 reply batch 0-1 seq 4: {"batch":"63cbe1e459320dd7-0-1","count":3,"seq":3,"stream":"EVENTS"}
    +12.001s p0 delivered #1 batch 0-1 seq 1
    +12.001s p0 delivered #2 batch 0-1 seq 2
    +12.001s p0 delivered #3 batch 0-1 seq 3
    +12.001s p0 batch 0-1 ended at 3: committed
    "#);
}

#[test]
fn a_batch_the_server_forgot_is_answered_10208_and_resumed_in_a_new_batch() {
    // The server drops its batches (a restart the connection did not notice, a stream reset).
    let mut sim = sim(config(2), 1, FastFaults::none());
    for _ in 0..10 {
        sim.push(0, 8).expect("room");
    }
    // At 1 ms events 2-4 went out (window 2 x 2); the server forgets the batch before their
    // flow acks arrive (at 2 ms), so event 5 is answered 10208.
    sim.run_for(Duration::from_micros(1500));
    sim.broker_mut().forget_batches();
    finish(&mut sim);
    assert_eq!(
        stored_ids(&sim).len(),
        10,
        "each once: re-sent ones are duplicates"
    );
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 push #3 p0-m3
    +0.000s p0 push #4 p0-m4
    +0.000s p0 push #5 p0-m5
    +0.000s p0 push #6 p0-m6
    +0.000s p0 push #7 p0-m7
    +0.000s p0 push #8 p0-m8
    +0.000s p0 push #9 p0-m9
    +0.000s p0 push #10 p0-m10
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":2,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +0.001s p0 send #3 p0-m3 batch 0-1 seq 3 op Append
    +0.001s p0 send #4 p0-m4 batch 0-1 seq 4 op Append
    +0.002s p0 reply batch 0-1 seq 2: {"msgs":2,"seq":2,"type":"ack"}
    +0.002s p0 delivered #1 batch 0-1 seq 1
    +0.002s p0 delivered #2 batch 0-1 seq 2
    +0.002s p0 send #5 p0-m5 batch 0-1 seq 5 op Append
    +0.002s p0 send #6 p0-m6 batch 0-1 seq 6 op Append
    +0.002s p0 reply batch 0-1 seq 4: {"msgs":2,"seq":4,"type":"ack"}
    +0.002s p0 delivered #3 batch 0-1 seq 3
    +0.002s p0 delivered #4 batch 0-1 seq 4
    +0.002s p0 send #7 p0-m7 batch 0-1 seq 7 op Append
    +0.002s p0 send #8 p0-m8 batch 0-1 seq 8 op Append
    +0.003s p0 reply batch 0-1 seq 5: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.003s p0 batch 0-1 ended at 4: unknown batch (10208)
    +0.003s p0 send #5 p0-m5 batch 0-2 seq 1 op Start
    +0.003s p0 reply batch 0-1 seq 6: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.003s p0 reply batch 0-1 seq 7: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.003s p0 reply batch 0-1 seq 8: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.004s p0 reply batch 0-2 seq 1: {"msgs":2,"seq":0,"type":"ack"}
    +0.004s p0 send #6 p0-m6 batch 0-2 seq 2 op Append
    +0.004s p0 send #7 p0-m7 batch 0-2 seq 3 op Append
    +0.004s p0 send #8 p0-m8 batch 0-2 seq 4 op Append
    +0.005s p0 reply batch 0-2 seq 2: {"msgs":2,"seq":2,"type":"ack"}
    +0.005s p0 delivered #5 batch 0-2 seq 1
    +0.005s p0 delivered #6 batch 0-2 seq 2
    +0.005s p0 send #9 p0-m9 batch 0-2 seq 5 op Append
    +0.005s p0 send #10 p0-m10 batch 0-2 seq 6 op Append
    +0.005s p0 send control batch 0-2 seq 7 op CommitEob
    +0.005s p0 reply batch 0-2 seq 4: {"msgs":2,"seq":4,"type":"ack"}
    +0.005s p0 delivered #7 batch 0-2 seq 3
    +0.005s p0 delivered #8 batch 0-2 seq 4
    +0.006s p0 reply batch 0-2 seq 6: {"msgs":2,"seq":6,"type":"ack"}
    +0.006s p0 delivered #9 batch 0-2 seq 5
    +0.006s p0 delivered #10 batch 0-2 seq 6
    +0.006s p0 reply batch 0-2 seq 7: {"batch":"63cbe1e459320dd7-0-2","count":6,"seq":10,"stream":"EVENTS"}
    +0.006s p0 batch 0-2 ended at 6: committed
    "#);
}

#[test]
fn a_leader_change_loses_a_suffix_that_is_resent_in_order() {
    // Publishes 3 and 4 (events #4, #5) go to a deposed leader and vanish; the new leader
    // flow-acks 3, and #6 shows it a gap.
    let mut sim = sim(
        config(500),
        1,
        FastFaults::none().at(3, FastFault::LeaderChange { lost: 2 }),
    );
    for _ in 0..6 {
        sim.push(0, 8).expect("room");
    }
    finish(&mut sim);
    assert_eq!(
        stored_ids(&sim),
        ["p0-m1", "p0-m2", "p0-m3", "p0-m4", "p0-m5", "p0-m6"]
    );
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 push #3 p0-m3
    +0.000s p0 push #4 p0-m4
    +0.000s p0 push #5 p0-m5
    +0.000s p0 push #6 p0-m6
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +0.001s p0 send #3 p0-m3 batch 0-1 seq 3 op Append
    +0.001s p0 send #4 p0-m4 batch 0-1 seq 4 op Append
    +0.001s p0 send #5 p0-m5 batch 0-1 seq 5 op Append
    +0.001s p0 send #6 p0-m6 batch 0-1 seq 6 op Append
    +0.001s p0 send control batch 0-1 seq 7 op CommitEob
    +0.002s p0 reply batch 0-1 seq 3: {"msgs":500,"seq":3,"type":"ack"}
    +0.002s p0 delivered #1 batch 0-1 seq 1
    +0.002s p0 delivered #2 batch 0-1 seq 2
    +0.002s p0 delivered #3 batch 0-1 seq 3
    +0.002s p0 reply batch 0-1 seq 6: {"last_seq":4,"seq":6,"type":"gap"}
    +0.002s p0 reply batch 0-1 seq 6: {"batch":"63cbe1e459320dd7-0-1","count":3,"seq":3,"stream":"EVENTS"}
    +0.002s p0 batch 0-1 ended at 3: gap
    +0.002s p0 retrying from #4 in 100ms: gap
    +0.002s p0 reply batch 0-1 seq 7: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.102s p0 send #4 p0-m4 batch 0-2 seq 1 op Start
    +0.103s p0 reply batch 0-2 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.103s p0 send #5 p0-m5 batch 0-2 seq 2 op Append
    +0.103s p0 send #6 p0-m6 batch 0-2 seq 3 op Append
    +0.103s p0 send control batch 0-2 seq 4 op CommitEob
    +0.104s p0 reply batch 0-2 seq 4: {"batch":"63cbe1e459320dd7-0-2","count":3,"seq":6,"stream":"EVENTS"}
    +0.104s p0 delivered #4 batch 0-2 seq 1
    +0.104s p0 delivered #5 batch 0-2 seq 2
    +0.104s p0 delivered #6 batch 0-2 seq 3
    +0.104s p0 batch 0-2 ended at 3: committed
    "#);
}

#[test]
fn a_restart_drops_the_connection_and_the_batch_and_nothing_is_lost_or_reordered() {
    let mut sim = sim(config(500), 2, FastFaults::none().at(4, FastFault::Restart));
    for _ in 0..3 {
        sim.push(0, 8).expect("room");
        sim.push(1, 8).expect("room");
    }
    finish(&mut sim);
    assert_eq!(stored_ids(&sim).len(), 6);
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p1 push #1 p1-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p1 push #2 p1-m2
    +0.000s p0 push #3 p0-m3
    +0.000s p1 push #3 p1-m3
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.000s p1 send #1 p1-m1 batch 1-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +0.001s p0 send #3 p0-m3 batch 0-1 seq 3 op Append
    +0.001s p0 send control batch 0-1 seq 4 op CommitEob
    +0.001s connection lost
    +0.001s p0 batch 0-1 ended at 0: connection lost
    +0.001s p0 retrying from #1 in 100ms: connection lost
    +0.001s p1 batch 1-1 ended at 0: connection lost
    +0.001s p1 retrying from #1 in 100ms: connection lost
    +0.101s p0 send #1 p0-m1 batch 0-2 seq 1 op Start
    +0.101s p1 send #1 p1-m1 batch 1-2 seq 1 op Start
    +0.102s p0 reply batch 0-2 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.102s p0 send #2 p0-m2 batch 0-2 seq 2 op Append
    +0.102s p0 send #3 p0-m3 batch 0-2 seq 3 op Append
    +0.102s p0 send control batch 0-2 seq 4 op CommitEob
    +0.102s p1 reply batch 1-2 seq 1: {"msgs":1,"seq":0,"type":"ack"}
    +0.102s p1 send #2 p1-m2 batch 1-2 seq 2 op Append
    +0.102s p1 reply batch 1-2 seq 1: {"msgs":2,"seq":1,"type":"ack"}
    +0.102s p1 delivered #1 batch 1-2 seq 1
    +0.102s p1 send #3 p1-m3 batch 1-2 seq 3 op Append
    +0.102s p1 send control batch 1-2 seq 4 op CommitEob
    +0.103s p0 reply batch 0-2 seq 4: {"batch":"63cbe1e459320dd7-0-2","count":3,"seq":0,"stream":"EVENTS"}
    +0.103s p0 delivered #1 batch 0-2 seq 1
    +0.103s p0 delivered #2 batch 0-2 seq 2
    +0.103s p0 delivered #3 batch 0-2 seq 3
    +0.103s p0 batch 0-2 ended at 3: committed
    +0.103s p1 reply batch 1-2 seq 3: {"msgs":4,"seq":3,"type":"ack"}
    +0.103s p1 delivered #2 batch 1-2 seq 2
    +0.103s p1 delivered #3 batch 1-2 seq 3
    +0.103s p1 reply batch 1-2 seq 4: {"batch":"63cbe1e459320dd7-1-2","count":3,"seq":6,"stream":"EVENTS"}
    +0.103s p1 batch 1-2 ended at 3: committed
    "#);
}

#[test]
fn a_message_failing_a_check_is_rejected_and_the_lane_goes_on_at_once() {
    // Publish 2 (event #3) fails a check (error 10054); the server commits at 2.
    let mut sim = sim(
        config(500),
        1,
        FastFaults::none().at(2, FastFault::Terminal { code: 10054 }),
    );
    for _ in 0..4 {
        sim.push(0, 8).expect("room");
    }
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["p0-m1", "p0-m2", "p0-m4"]);
    assert_eq!(sim.stats().retrying, 0, "a rejection is no failure episode");
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 push #3 p0-m3
    +0.000s p0 push #4 p0-m4
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +0.001s p0 send #3 p0-m3 batch 0-1 seq 3 op Append
    +0.001s p0 send #4 p0-m4 batch 0-1 seq 4 op Append
    +0.001s p0 send control batch 0-1 seq 5 op CommitEob
    +0.002s p0 reply batch 0-1 seq 3: {"error":{"code":400,"description":"message rejected by the stream","err_code":10054},"seq":3,"type":"err"}
    +0.002s p0 reply batch 0-1 seq 3: {"batch":"63cbe1e459320dd7-0-1","count":2,"seq":2,"stream":"EVENTS"}
    +0.002s p0 delivered #1 batch 0-1 seq 1
    +0.002s p0 delivered #2 batch 0-1 seq 2
    +0.002s p0 rejected #3: message rejected by the stream (error 10054)
    +0.002s p0 batch 0-1 ended at 2: refused: message rejected by the stream (error 10054)
    +0.002s p0 send #4 p0-m4 batch 0-2 seq 1 op Commit
    +0.002s p0 reply batch 0-1 seq 4: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.002s p0 reply batch 0-1 seq 5: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +0.003s p0 reply batch 0-2 seq 1: {"batch":"63cbe1e459320dd7-0-2","count":1,"seq":3,"stream":"EVENTS"}
    +0.003s p0 delivered #4 batch 0-2 seq 1
    +0.003s p0 batch 0-2 ended at 1: committed
    "#);
}

#[test]
fn repeated_refusals_run_the_retry_schedule_then_the_breaker_then_one_probe_batch() {
    // The first four publishes (each a batch start) meet a full ingest queue.
    let faults = (0..4).fold(FastFaults::none(), |f, i| f.at(i, FastFault::Overloaded));
    let mut sim = sim(config(500), 1, faults);
    sim.push(0, 8).expect("room");
    sim.push(0, 8).expect("room");
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["p0-m1", "p0-m2"]);
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"error":{"code":429,"description":"ingest queue full"},"seq":0,"stream":"EVENTS"}
    +0.001s p0 batch 0-1 ended at 0: refused: ingest queue full
    +0.001s p0 retrying from #1 in 100ms: refused: ingest queue full
    +0.101s p0 send #1 p0-m1 batch 0-2 seq 1 op Start
    +0.102s p0 reply batch 0-2 seq 1: {"error":{"code":429,"description":"ingest queue full"},"seq":0,"stream":"EVENTS"}
    +0.102s p0 batch 0-2 ended at 0: refused: ingest queue full
    +0.102s p0 retrying from #1 in 400ms: refused: ingest queue full
    +0.502s p0 send #1 p0-m1 batch 0-3 seq 1 op Start
    +0.503s p0 reply batch 0-3 seq 1: {"error":{"code":429,"description":"ingest queue full"},"seq":0,"stream":"EVENTS"}
    +0.503s p0 batch 0-3 ended at 0: refused: ingest queue full
    +0.503s p0 breaker opened until +0.603s (attempt 0)
    +0.603s p0 breaker HalfOpened
    +0.603s p0 send #1 p0-m1 batch 0-4 seq 1 op Start (probe)
    +0.604s p0 reply batch 0-4 seq 1: {"error":{"code":429,"description":"ingest queue full"},"seq":0,"stream":"EVENTS"}
    +0.604s p0 batch 0-4 ended at 0: refused: ingest queue full
    +0.604s p0 breaker opened until +0.804s (attempt 1)
    +0.804s p0 breaker HalfOpened
    +0.804s p0 send #1 p0-m1 batch 0-5 seq 1 op Start (probe)
    +0.805s p0 reply batch 0-5 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.805s p0 breaker Closed
    +0.805s p0 send #2 p0-m2 batch 0-5 seq 2 op Append
    +0.805s p0 send control batch 0-5 seq 3 op CommitEob
    +0.806s p0 reply batch 0-5 seq 3: {"batch":"63cbe1e459320dd7-0-5","count":2,"seq":2,"stream":"EVENTS"}
    +0.806s p0 delivered #1 batch 0-5 seq 1
    +0.806s p0 delivered #2 batch 0-5 seq 2
    +0.806s p0 batch 0-5 ended at 2: committed
    "#);
}

#[test]
fn a_stream_without_allow_batched_disables_the_lane_and_keeps_its_events() {
    let broker = FastBroker::new(
        FastBrokerConfig {
            allow_batched: false,
            ..FastBrokerConfig::default()
        },
        FastFaults::none(),
    );
    let mut sim = LaneSim::new(config(500), 1, broker).expect("valid lane config");
    for _ in 0..3 {
        sim.push(0, 8).expect("room");
    }
    sim.run_for(Duration::from_secs(60));
    let lane = sim.producer(0).lane();
    assert!(lane.is_disabled());
    assert_eq!(
        lane.len(),
        3,
        "held for the owner to abandon into another mode"
    );
    assert!(sim.broker().stored().is_empty());
    assert_eq!(sim.broker().publishes(), 1, "nothing after the 10205");
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 push #3 p0-m3
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"error":{"code":400,"description":"batch publish is disabled","err_code":10205},"seq":0,"stream":"EVENTS"}
    +0.001s p0 batch 0-1 ended at 0: refused: batch publish is disabled (error 10205)
    +0.001s p0 disabled: batch publish is disabled (error 10205)
    "#);
}

#[test]
fn a_commit_lost_to_a_leader_change_is_sent_again_when_its_pubak_is_overdue() {
    // Publish 2, the end-of-batch commit, reaches a deposed leader. The new leader flow-acks
    // both events but, never having seen the commit, answers pings with flow acks only: the
    // lane re-sends the commit after the ack timeout. (Found by the property test: the lane
    // pinged such a batch forever.)
    let mut sim = sim(
        config(500),
        1,
        FastFaults::none().at(2, FastFault::LeaderChange { lost: 1 }),
    );
    sim.push(0, 8).expect("room");
    sim.push(0, 8).expect("room");
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["p0-m1", "p0-m2"]);
    assert_eq!(sim.broker().open_batches(), 0);
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +0.001s p0 send control batch 0-1 seq 3 op CommitEob
    +0.002s p0 reply batch 0-1 seq 2: {"msgs":500,"seq":2,"type":"ack"}
    +0.002s p0 delivered #1 batch 0-1 seq 1
    +0.002s p0 delivered #2 batch 0-1 seq 2
    +1.002s p0 send control batch 0-1 seq 3 op CommitEob
    +1.003s p0 reply batch 0-1 seq 3: {"batch":"63cbe1e459320dd7-0-1","count":2,"seq":2,"stream":"EVENTS"}
    +1.003s p0 batch 0-1 ended at 2: committed
    "#);
}

#[test]
fn a_batch_the_server_dropped_as_idle_is_resumed_after_10208() {
    // The server's batch timeout is 2 s, shorter than the lane was told (10 s): the batch,
    // lingering 5 s before its commit, is dropped silently at 2 s idle, and the keepalive ping
    // at 3.333 s learns it from 10208. Nothing is lost: the events are re-sent, same ids.
    let broker = FastBroker::new(
        FastBrokerConfig {
            batch_timeout: Duration::from_secs(2),
            ..FastBrokerConfig::default()
        },
        FastFaults::none(),
    );
    let config = LaneConfig {
        commit_linger: Duration::from_secs(5),
        ..config(500)
    };
    let mut sim = LaneSim::new(config, 1, broker).expect("valid lane config");
    sim.push(0, 8).expect("room");
    sim.push(0, 8).expect("room");
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["p0-m1", "p0-m2"]);
    assert_eq!(sim.broker().timed_out_batches(), 1);
    insta::assert_snapshot!(sim.trace_text(), @r#"
    +0.000s p0 push #1 p0-m1
    +0.000s p0 push #2 p0-m2
    +0.000s p0 send #1 p0-m1 batch 0-1 seq 1 op Start
    +0.001s p0 reply batch 0-1 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +0.001s p0 send #2 p0-m2 batch 0-1 seq 2 op Append
    +3.334s p0 send control batch 0-1 seq 2 op Ping
    +3.335s p0 reply batch 0-1 seq 2: {"error":{"code":404,"description":"batch publish ID unknown","err_code":10208},"seq":0,"stream":"EVENTS"}
    +3.335s p0 batch 0-1 ended at 0: unknown batch (10208)
    +3.335s p0 send #1 p0-m1 batch 0-2 seq 1 op Start
    +3.336s p0 reply batch 0-2 seq 1: {"msgs":500,"seq":0,"type":"ack"}
    +3.336s p0 send #2 p0-m2 batch 0-2 seq 2 op Append
    +5.000s p0 send control batch 0-2 seq 3 op CommitEob
    +5.001s p0 reply batch 0-2 seq 3: {"batch":"63cbe1e459320dd7-0-2","count":2,"seq":0,"stream":"EVENTS"}
    +5.001s p0 delivered #1 batch 0-2 seq 1
    +5.001s p0 delivered #2 batch 0-2 seq 2
    +5.001s p0 batch 0-2 ended at 2: committed
    "#);
}

#[test]
fn overload_halves_what_a_batch_sends_unconfirmed_and_confirmations_grow_it_back() {
    // Flow 4, two outstanding acks: a window of 8. Publish 3 of the first batch meets a full
    // ingest queue (429).
    let mut sim = sim(
        config(4),
        1,
        FastFaults::none().at(3, FastFault::Overloaded),
    );
    for _ in 0..40 {
        sim.push(0, 8).expect("room");
    }
    assert_eq!(sim.producer(0).lane().window(), 8);
    sim.run_for(Duration::from_millis(50));
    assert_eq!(
        sim.producer(0).lane().window(),
        4,
        "one 429 halves the window\n{}",
        sim.trace_text()
    );
    finish(&mut sim);
    assert_eq!(stored_ids(&sim).len(), 40);
    assert_eq!(
        sim.producer(0).lane().window(),
        8,
        "confirmations after the 429 grew it back\n{}",
        sim.trace_text()
    );
}
