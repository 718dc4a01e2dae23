//! Outbox scenarios on virtual time: one behaviour per test, driven through the testkit's Sim and scripted broker.

use std::time::Duration;

use sink_core::backoff::RetrySchedule;
use sink_core::breaker::BreakerState;
use sink_core::outbox::{BreakerOpenPolicy, OrderingMode, OutboxConfig, Refused, Rejection};
use sink_testkit::{BrokerConfig, Fault, FaultScript, Outcome, ScriptedBroker, Sim};

const IDLE: Duration = Duration::from_secs(600);

fn config(ordering: OrderingMode, window: usize) -> OutboxConfig {
    OutboxConfig {
        window,
        max_events: 64,
        max_bytes: 64 * 1024,
        ordering,
        ack_timeout: Duration::from_secs(1),
        ..OutboxConfig::default()
    }
}

fn sim(config: OutboxConfig, script: FaultScript) -> Sim {
    Sim::new(config, ScriptedBroker::new(BrokerConfig::default(), script))
        .expect("valid outbox config")
}

fn push_n(sim: &mut Sim, keys: &[&str]) {
    for key in keys {
        sim.push(key, 10).expect("room in the outbox");
    }
}

fn stored_ids(sim: &Sim) -> Vec<String> {
    sim.broker()
        .stored()
        .iter()
        .map(|r| r.msg_id.as_str().to_owned())
        .collect()
}

fn delivered(sim: &Sim, seq: u64) -> (u64, bool) {
    match sim.outcomes().get(&seq) {
        Some(Outcome::Delivered(ack)) => (ack.sequence, ack.duplicate),
        other => panic!("#{seq} not delivered: {other:?}"),
    }
}

/// Lets the scripted faults play out, then stops them and checks I1-I5.
fn finish(sim: &mut Sim) {
    if let Err(e) = sim.run_until_idle(IDLE).and_then(|()| sim.finish(IDLE)) {
        panic!("{e}\ntrace:\n{}", sim.trace_text());
    }
}

#[test]
fn lost_publish_blocks_successors_until_resent() {
    // The first event goes alone (anchor unknown); #2 is lost and #3, chained to it, is refused.
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none().at(1, Fault::DropRequest),
    );
    push_n(&mut sim, &["a", "a", "b"]);
    sim.run_for(Duration::from_millis(999));
    assert_eq!(stored_ids(&sim), ["m1"], "nothing may overtake the lost #2");
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3"]);
    insta::assert_snapshot!(sim.trace_text(), @r"
    +0.000s push #1 m1 key=a
    +0.000s push #2 m2 key=a
    +0.000s push #3 m3 key=b
    +0.000s transmit #1 m1 attempt 1 expect -
    +0.001s ack #1 attempt 1: seq 1
    +0.001s delivered #1 as 1
    +0.001s transmit #2 m2 attempt 1 expect m1
    +0.001s transmit #3 m3 attempt 1 expect m2
    +0.002s error #3 attempt 1: 10070 wrong last msg ID: m1
    +1.001s retrying from #2 (retry 1) in 100ms: no ack within the ack timeout (ambiguous)
    +1.101s transmit #2 m2 attempt 2 expect -
    +1.102s ack #2 attempt 2: seq 2
    +1.102s delivered #2 as 2
    +1.102s transmit #3 m3 attempt 2 expect m2
    +1.103s ack #3 attempt 2: seq 3
    +1.103s delivered #3 as 3
    ");
}

#[test]
fn ack_lost_but_stored_is_reported_delivered_with_original_sequence() {
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none().at(0, Fault::LoseAck),
    );
    push_n(&mut sim, &["a"]);
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1"]);
    assert_eq!(delivered(&sim, 1), (1, true));
    assert_eq!(sim.stats().transmits, 2);
}

#[test]
fn duplicate_ack_gives_one_outcome() {
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none().at(0, Fault::DuplicateAck),
    );
    push_n(&mut sim, &["a", "a"]);
    finish(&mut sim);
    let acks_of_1 = sim.trace().iter().filter(|l| l.contains("ack #1 ")).count();
    assert_eq!(acks_of_1, 2, "the broker did answer twice");
    assert_eq!(sim.outcomes().len(), 2);
    assert_eq!(delivered(&sim, 1), (1, false));
    assert_eq!(delivered(&sim, 2), (2, false));
}

#[test]
fn terminal_error_fails_one_event_and_relinks_the_chain() {
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none().at(1, Fault::Terminal { code: 10077 }),
    );
    push_n(&mut sim, &["a", "a", "a"]);
    finish(&mut sim);
    assert_eq!(
        sim.outcomes().get(&2),
        Some(&Outcome::Rejected(Rejection {
            code: Some(10077),
            reason: "message m2 rejected by the stream".into()
        }))
    );
    assert_eq!(stored_ids(&sim), ["m1", "m3"]);
    assert_eq!(delivered(&sim, 3), (2, false));
    assert_eq!(
        sim.stats().retrying,
        0,
        "a terminal error is no failure episode"
    );
    assert_eq!(sim.stats().breaker_events, 0);
    assert_eq!(sim.outbox().breaker(), BreakerState::Closed { failures: 0 });
}

#[test]
fn breaker_opens_after_retries_and_probes_single_flight() {
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none().at(0, Fault::StreamMissing(Duration::from_secs(3))),
    );
    push_n(&mut sim, &["a", "b", "a", "b"]);
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3", "m4"]);
    // Between HalfOpened and the next breaker change exactly one transmission goes out: the probe.
    let mut half_open = false;
    let mut sent = 0;
    let mut windows = Vec::new();
    for line in sim.trace() {
        if line.contains("breaker") {
            if half_open {
                windows.push(sent);
            }
            half_open = line.contains("HalfOpened");
            sent = 0;
        } else if half_open && line.contains(" transmit ") {
            assert!(line.ends_with("(probe)"), "{line}");
            sent += 1;
        }
    }
    assert!(windows.len() >= 3, "several probes: {windows:?}");
    assert!(windows.iter().all(|&n| n == 1), "{windows:?}");
    assert_eq!(sim.stats().probes, windows.len() as u64);
    assert_eq!(sim.outbox().breaker(), BreakerState::Closed { failures: 0 });
}

#[test]
fn queue_full_refuses_with_typed_error() {
    let mut cfg = config(OrderingMode::Chained, 2);
    cfg.max_events = 3;
    cfg.max_bytes = 100;
    let mut sim = sim(cfg, FaultScript::none());
    push_n(&mut sim, &["a", "a", "a"]);
    let bytes = sim.outbox().bytes();
    assert_eq!(
        sim.push("a", 10),
        Err(Refused::QueueFull {
            events: 3,
            bytes,
            max_events: 3,
            max_bytes: 100
        })
    );
    assert_eq!(
        sim.push("a", 200),
        Err(Refused::TooLarge {
            size: 200 + "events.a".len() + "m5".len() + "a".len(),
            max_bytes: 100
        })
    );
    finish(&mut sim);
    assert_eq!(sim.outcomes().len(), 3);
    // Room again once delivered; a byte bound refuses too.
    sim.push("a", 60).expect("room after delivery");
    assert!(matches!(
        sim.push("a", 60),
        Err(Refused::QueueFull { events: 1, .. })
    ));
}

#[test]
fn fail_fast_policy_refuses_while_open() {
    let mut cfg = config(OrderingMode::Chained, 4);
    cfg.when_breaker_open = BreakerOpenPolicy::FailFast;
    cfg.retry = RetrySchedule::new(vec![]).expect("empty schedule is valid");
    let mut sim = sim(
        cfg,
        FaultScript::none().at(0, Fault::StreamMissing(Duration::from_secs(1))),
    );
    push_n(&mut sim, &["a"]);
    sim.run_for(Duration::from_millis(50));
    assert!(matches!(sim.outbox().breaker(), BreakerState::Open { .. }));
    assert_eq!(sim.push("a", 10), Err(Refused::BreakerOpen));
    finish(&mut sim);
    assert_eq!(sim.outbox().breaker(), BreakerState::Closed { failures: 0 });
    sim.push("a", 10).expect("accepted again once closed");
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m3"]);
}

#[test]
fn foreign_writer_switches_to_per_key_serial_without_failing_events() {
    let mut sim = sim(config(OrderingMode::Chained, 4), FaultScript::none());
    push_n(&mut sim, &["a", "b"]);
    sim.run_until_idle(IDLE).expect("idle");
    sim.foreign_publish("other-1");
    push_n(&mut sim, &["a", "b", "a", "b"]);
    finish(&mut sim);
    assert_eq!(sim.outbox().ordering(), OrderingMode::PerKeySerial);
    assert_eq!(sim.stats().fallbacks, 1);
    assert!(sim
        .outcomes()
        .values()
        .all(|o| matches!(o, Outcome::Delivered(_))));
    assert_eq!(
        stored_ids(&sim),
        ["m1", "m2", "other-1", "m3", "m4", "m5", "m6"]
    );
    assert_eq!(sim.stats().retrying, 0);
}

#[test]
fn restart_forgets_last_id_and_chain_reanchors() {
    let mut sim = sim(config(OrderingMode::Chained, 4), FaultScript::none());
    push_n(&mut sim, &["a", "a"]);
    sim.run_until_idle(IDLE).expect("idle");
    sim.broker_mut().forget_last_id();
    push_n(&mut sim, &["a", "a", "a"]);
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(sim.outbox().ordering(), OrderingMode::Chained);
    assert_eq!(sim.stats().fallbacks, 0);
    assert_eq!(sim.stats().retrying, 0);
    assert!(
        sim.trace()
            .iter()
            .any(|l| l.ends_with("transmit #3 m3 attempt 2 expect -")),
        "#3 re-sent once without the check:\n{}",
        sim.trace_text()
    );
}

#[test]
fn retry_schedule_is_100ms_then_400ms() {
    let mut sim = sim(
        config(OrderingMode::Chained, 1),
        FaultScript::none()
            .at(0, Fault::NoResponders)
            .at(1, Fault::NoResponders)
            .at(2, Fault::NoResponders),
    );
    push_n(&mut sim, &["a"]);
    finish(&mut sim);
    insta::assert_snapshot!(sim.trace_text(), @r"
    +0.000s push #1 m1 key=a
    +0.000s transmit #1 m1 attempt 1 expect -
    +0.001s error #1 attempt 1: retryable (503 no responders)
    +0.001s retrying from #1 (retry 1) in 100ms: 503 no responders
    +0.101s transmit #1 m1 attempt 2 expect -
    +0.102s error #1 attempt 2: retryable (503 no responders)
    +0.102s retrying from #1 (retry 2) in 400ms: 503 no responders
    +0.502s transmit #1 m1 attempt 3 expect -
    +0.503s error #1 attempt 3: retryable (503 no responders)
    +0.503s breaker opened until +0.603s (attempt 0)
    +0.603s breaker HalfOpened
    +0.603s transmit #1 m1 attempt 4 expect - (probe)
    +0.604s ack #1 attempt 4: seq 1
    +0.604s breaker Closed
    +0.604s delivered #1 as 1
    ");
}

#[test]
fn connection_lost_rewinds_once() {
    for mode in [
        OrderingMode::Chained,
        OrderingMode::PerKeySerial,
        OrderingMode::Unordered,
    ] {
        let mut sim = sim(
            config(mode, 4),
            FaultScript::none().at(3, Fault::ConnectionLoss),
        );
        push_n(&mut sim, &["a", "b", "c", "d"]);
        finish(&mut sim);
        let stats = sim.stats();
        assert_eq!(stats.connection_losses, 1, "{mode}");
        assert_eq!(
            stats.retrying,
            1,
            "{mode}: one connection loss is one episode\n{}",
            sim.trace_text()
        );
        assert_eq!(stats.breaker_events, 0, "{mode}\n{}", sim.trace_text());
        assert_eq!(stored_ids(&sim), ["m1", "m2", "m3", "m4"], "{mode}");
        // Chained: the first event goes alone (the stream's last id is unknown) and is acked
        // before the others go out; they are stored, lose their acks with the connection and
        // come back `duplicate` when re-sent.
        let first_dup = mode != OrderingMode::Chained;
        assert_eq!(delivered(&sim, 1), (1, first_dup), "{mode}");
        for seq in 2..=3 {
            assert_eq!(delivered(&sim, seq), (seq, true), "{mode}");
        }
        assert_eq!(delivered(&sim, 4), (4, false), "{mode}");
    }
}

#[test]
fn window_limits_in_flight() {
    for mode in [
        OrderingMode::Chained,
        OrderingMode::PerKeySerial,
        OrderingMode::Unordered,
    ] {
        let mut sim = sim(config(mode, 3), FaultScript::none());
        // A first event settles the chain's anchor (chained mode sends its first event alone).
        sim.push("k", 10).expect("room");
        sim.run_for(Duration::from_millis(5));
        let keys: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
        for key in &keys {
            sim.push(key, 10).expect("room");
        }
        sim.settle();
        assert_eq!(sim.outbox().in_flight(), 3, "{mode}");
        assert_eq!(sim.stats().transmits, 4, "{mode}");
        finish(&mut sim);
        assert_eq!(sim.stats().max_in_flight, 3, "{mode}");
        assert_eq!(sim.outcomes().len(), 10, "{mode}");
    }
}

#[test]
fn per_key_serial_keeps_one_publish_per_key_in_flight() {
    let mut sim = sim(config(OrderingMode::PerKeySerial, 8), FaultScript::none());
    push_n(&mut sim, &["a", "a", "a", "b", "b"]);
    sim.settle();
    assert_eq!(sim.outbox().in_flight(), 2, "one per key");
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m4", "m2", "m5", "m3"]);
}

/// Found by the property suite: a terminal answer to the half-open probe left the probe
/// outstanding forever, so nothing was ever transmitted again.
#[test]
fn terminal_answer_to_the_probe_closes_the_breaker() {
    for mode in [
        OrderingMode::Chained,
        OrderingMode::PerKeySerial,
        OrderingMode::Unordered,
    ] {
        let mut sim = sim(
            config(mode, 1),
            FaultScript::none()
                .at(0, Fault::NoResponders)
                .at(1, Fault::NoResponders)
                .at(2, Fault::NoResponders)
                .at(3, Fault::Terminal { code: 10054 }),
        );
        push_n(&mut sim, &["a", "a"]);
        finish(&mut sim);
        assert!(
            sim.trace()
                .iter()
                .any(|l| l.ends_with("transmit #1 m1 attempt 4 expect - (probe)")),
            "{mode}: the probe got the terminal answer\n{}",
            sim.trace_text()
        );
        assert!(matches!(sim.outcomes().get(&1), Some(Outcome::Rejected(_))));
        assert_eq!(delivered(&sim, 2), (1, false), "{mode}");
        assert_eq!(sim.outbox().breaker(), BreakerState::Closed { failures: 0 });
    }
}

/// Found by the property suite: a 10070 answer to the probe (the stream forgot its last id during
/// the outage) re-anchored the chain but left the probe outstanding: delivery stopped for good.
#[test]
fn wrong_last_id_answer_to_the_probe_reanchors_and_closes_the_breaker() {
    let mut sim = sim(config(OrderingMode::Chained, 1), FaultScript::none());
    push_n(&mut sim, &["a"]);
    sim.run_until_idle(IDLE).expect("idle");
    let script = [
        Fault::NoResponders,
        Fault::NoResponders,
        Fault::NoResponders,
        Fault::ForgetLastId,
    ];
    for fault in script {
        sim.broker_mut().inject_next(fault);
    }
    push_n(&mut sim, &["a", "a"]);
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3"]);
    assert_eq!(sim.outbox().ordering(), OrderingMode::Chained);
    assert_eq!(sim.outbox().breaker(), BreakerState::Closed { failures: 0 });
    assert!(sim.stats().probes >= 1);
}

/// Found by the property suite: after a restart, a successor's 10070 arrived first and put
/// transmission on hold behind its predecessor; the predecessor's own 10070 then re-anchored the
/// chain but left the hold in place, so nothing was transmitted again.
#[test]
fn reanchor_releases_a_hold_placed_by_a_successor() {
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none()
            .at(1, Fault::ForgetLastId)
            .at(1, Fault::DelayReply(Duration::from_millis(5))),
    );
    push_n(&mut sim, &["a"]);
    sim.run_until_idle(IDLE).expect("idle");
    push_n(&mut sim, &["a", "a"]);
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3"]);
    assert_eq!(sim.stats().retrying, 0);
    assert!(
        sim.trace()
            .iter()
            .any(|l| l.ends_with("transmit #2 m2 attempt 2 expect -")),
        "{}",
        sim.trace_text()
    );
}

/// Found by the property suite: a successor's 10070 put transmission on hold behind #2 (lost);
/// then #1 was rejected, which rewound #2 to pending, but the hold stayed: #2 could never be
/// re-sent and its ack could never come.
#[test]
fn rejection_releases_a_hold_on_a_rewound_event() {
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none()
            .at(0, Fault::Terminal { code: 10054 })
            .at(0, Fault::DelayReply(Duration::from_millis(5)))
            .at(1, Fault::DropRequest),
    );
    push_n(&mut sim, &["a", "a", "a"]);
    finish(&mut sim);
    assert!(matches!(sim.outcomes().get(&1), Some(Outcome::Rejected(_))));
    assert_eq!(stored_ids(&sim), ["m2", "m3"]);
    assert!(
        sim.trace()
            .iter()
            .any(|l| l.ends_with("error #3 attempt 1: 10070 wrong last msg ID: ")),
        "the hold was placed\n{}",
        sim.trace_text()
    );
}

#[test]
fn wrong_last_naming_a_later_event_of_ours_reanchors_instead_of_retrying_forever() {
    // The acks of #2-#5 are lost after the broker stored them, and the duplicate window (500 ms)
    // is over before the ack timeout (1 s) re-sends #2. The broker then answers 10070 naming m5,
    // a later event of ours: #2-#5 are stored, so the chain re-anchors at #2 and stores copies
    // (allowed beyond the window) instead of failing the same way on every retry.
    let broker = ScriptedBroker::new(
        BrokerConfig {
            duplicate_window: Duration::from_millis(500),
            ..BrokerConfig::default()
        },
        FaultScript::none()
            .at(1, Fault::LoseAck)
            .at(2, Fault::LoseAck)
            .at(3, Fault::LoseAck)
            .at(4, Fault::LoseAck),
    );
    let mut sim = Sim::new(config(OrderingMode::Chained, 4), broker).expect("valid config");
    push_n(&mut sim, &["a"]);
    sim.run_until_idle(IDLE).expect("idle");
    push_n(&mut sim, &["a", "a", "a", "a"]);
    finish(&mut sim);
    assert_eq!(
        stored_ids(&sim),
        ["m1", "m2", "m3", "m4", "m5", "m2", "m3", "m4", "m5"]
    );
    for seq in 2..=5 {
        let (sequence, duplicate) = delivered(&sim, seq);
        assert_eq!((sequence, duplicate), (seq + 4, false), "#{seq}");
    }
    assert_eq!(sim.outbox().ordering(), OrderingMode::Chained);
    assert_eq!(sim.stats().fallbacks, 0);
    assert_eq!(sim.outbox().breaker(), BreakerState::Closed { failures: 0 });
}

#[test]
fn overload_halves_the_window_once_per_burst_and_acks_grow_it_back() {
    // A window of 8 goes out; the broker refuses the whole burst with 429. One reduction (to 4),
    // not one per refused publish; the re-sends then go out at most 4 at a time, and each ack
    // grows the window by one until it is back at 8.
    let script = (0..8).fold(FaultScript::none(), |s, i| s.at(i, Fault::TooManyRequests));
    let mut sim = sim(config(OrderingMode::Unordered, 8), script);
    push_n(&mut sim, &["a"; 8]);
    sim.run_for(Duration::from_millis(5));
    assert_eq!(sim.outbox().window(), 4, "{}", sim.trace_text());
    assert!(sim.outbox().in_flight() <= 4, "{}", sim.trace_text());
    push_n(&mut sim, &["a"; 16]);
    finish(&mut sim);
    assert_eq!(sim.outbox().window(), 8, "{}", sim.trace_text());
    assert!(sim.stats().max_in_flight <= 8);
    assert_eq!(stored_ids(&sim).len(), 24);
    // The other seven refusals of the burst wait with the first one instead of each starting an
    // episode of its own, which would have run out the retries and opened the breaker.
    assert_eq!(sim.stats().retrying, 1, "{}", sim.trace_text());
    assert_eq!(sim.outbox().breaker(), BreakerState::Closed { failures: 0 });
}

/// A driver that must not publish (its stream became unsafe) still learns the outcome of what is
/// in flight, and nothing new goes out until it polls for outputs again.
#[test]
fn poll_event_reports_outcomes_without_transmitting() {
    use sink_core::outbox::{Ack, Message, Outbox, Output};
    let start = sink_testkit::FakeClock::new().now();
    let mut outbox = Outbox::new(config(OrderingMode::Chained, 4)).expect("valid");
    let message = |n: u32| Message {
        subject: "s.a".to_owned(),
        msg_id: sink_core::event::MsgId::from_raw(format!("m{n}")),
        headers: Vec::new(),
        body: bytes::Bytes::from_static(b"x"),
        key: String::new(),
    };
    let first = outbox.push(message(1), 0, start).expect("room");
    let Some(Output::Transmit(t)) = outbox.poll_output(start) else {
        panic!("the first event goes out");
    };
    assert_eq!(t.seq, first);
    let second = outbox.push(message(2), 0, start).expect("room");
    outbox.handle_ack(
        first,
        Ack {
            stream: "S".to_owned(),
            sequence: 1,
            duplicate: false,
        },
        start,
    );
    assert!(
        matches!(outbox.poll_event(), Some(Output::Delivered { seq, .. }) if seq == first),
        "the ack of what was in flight is reported"
    );
    assert_eq!(
        outbox.poll_event(),
        None,
        "the queued event is not transmitted"
    );
    assert_eq!(outbox.len(), 1);
    assert!(
        matches!(outbox.poll_output(start), Some(Output::Transmit(t)) if t.seq == second),
        "once the driver polls outputs again it goes out"
    );
}

#[test]
fn reemitted_event_is_a_duplicate_receipt_not_another_writer() {
    // A, B, A again, C (issue #9, RELIABILITY.md F20). The broker answers the re-emit `duplicate`
    // with A's sequence and leaves its last id at B. Before the fix C was chained to A's id, got
    // 10070 naming B, and the outbox took B for another writer's message: fallback for good.
    let mut sim = sim(config(OrderingMode::Chained, 8), FaultScript::none());
    let a = sim.push("k", 10).expect("room");
    sim.push("k", 10).expect("room");
    let again = sim.push_reemit(a).expect("room");
    sim.push("k", 10).expect("room");
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3"]);
    assert_eq!(delivered(&sim, again), (1, true), "the original's sequence");
    assert_eq!(sim.stats().fallbacks, 0);
    assert_eq!(sim.outbox().ordering(), OrderingMode::Chained);
    assert_eq!(sim.stats().retransmits, 0, "nothing re-sent: no slowdown");
    insta::assert_snapshot!(sim.trace_text(), @r"
    +0.000s push #1 m1 key=k
    +0.000s push #2 m2 key=k
    +0.000s push #3 m1 key=k
    +0.000s push #4 m3 key=k
    +0.000s transmit #1 m1 attempt 1 expect -
    +0.001s ack #1 attempt 1: seq 1
    +0.001s delivered #1 as 1
    +0.001s transmit #2 m2 attempt 1 expect m1
    +0.001s transmit #3 m1 attempt 1 expect m2
    +0.002s ack #2 attempt 1: seq 2
    +0.002s delivered #2 as 2
    +0.002s ack #3 attempt 1: seq 1 duplicate
    +0.002s delivered #3 as 1 (duplicate)
    +0.002s transmit #4 m3 attempt 1 expect m2
    +0.003s ack #4 attempt 1: seq 3
    +0.003s delivered #4 as 3
    ");
}

#[test]
fn reemit_with_a_transient_failure_between_keeps_order_and_mode() {
    // A, B, connection lost with B in flight, A again, C: whatever the order of answers, B is
    // stored before C and nothing falls back.
    let mut sim = sim(config(OrderingMode::Chained, 8), FaultScript::none());
    let a = sim.push("k", 10).expect("room");
    sim.run_for(Duration::from_millis(5));
    sim.push("k", 10).expect("room");
    sim.lose_connection();
    sim.push_reemit(a).expect("room");
    sim.push("k", 10).expect("room");
    sim.reconnect();
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3"]);
    assert_eq!(sim.stats().fallbacks, 0);
    assert_eq!(sim.outbox().ordering(), OrderingMode::Chained);
}

#[test]
fn reemit_older_than_the_outbox_memory_relinks_the_chain() {
    // The outbox remembers the last RECENT_IDS pushes; a re-emit of an older event (or of one
    // stored by an earlier run of the service) is not recognised when pushed. The next event then
    // goes out chained to the re-emit's id, the broker names the real last id (ours), and the
    // chain re-links without an episode or a fallback.
    let mut cfg = config(OrderingMode::Chained, 8);
    cfg.max_events = 64;
    let mut sim = sim(cfg, FaultScript::none());
    sim.set_trace(false);
    let first = sim.push("k", 10).expect("room");
    for _ in 0..sink_core::outbox::RECENT_IDS {
        sim.push("k", 10).expect("room");
        sim.run_for(Duration::from_millis(1));
    }
    sim.run_for(Duration::from_millis(5));
    sim.set_trace(true);
    let again = sim.push_reemit(first).expect("room");
    sim.push("k", 10).expect("room");
    finish(&mut sim);
    let stored = stored_ids(&sim);
    assert_eq!(stored.len(), sink_core::outbox::RECENT_IDS + 2);
    assert_eq!(delivered(&sim, again), (1, true));
    assert_eq!(sim.stats().fallbacks, 0);
    assert_eq!(sim.stats().retrying, 0, "a re-link is no failure episode");
    assert_eq!(sim.outbox().ordering(), OrderingMode::Chained);
    insta::assert_snapshot!(sim.trace_text(), @r"
    +16.389s push #16386 m1 key=k
    +16.389s push #16387 m16386 key=k
    +16.389s transmit #16386 m1 attempt 1 expect m16385
    +16.389s transmit #16387 m16386 attempt 1 expect m1
    +16.390s ack #16386 attempt 1: seq 1 duplicate
    +16.390s delivered #16386 as 1 (duplicate)
    +16.390s error #16387 attempt 1: 10070 wrong last msg ID: m16385
    +16.390s transmit #16387 m16386 attempt 2 expect m16385
    +16.391s ack #16387 attempt 2: seq 16386
    +16.391s delivered #16387 as 16386
    ");
}

#[test]
fn replicated_stream_waits_out_an_id_in_process_instead_of_rejecting_it() {
    // 2.11+ replicated stream: #2 is lost, #3 and #4 fail 10070 when applied, and the leader keeps
    // their ids "in process" (10158) for the duplicate window (5 s here). Before the fix 10158 was
    // terminal: #3 and #4 were reported rejected. Now they are re-sent until the ids are free.
    let broker = ScriptedBroker::new(
        BrokerConfig {
            duplicate_window: Duration::from_secs(5),
            replicated: true,
            ..BrokerConfig::default()
        },
        FaultScript::none().at(1, Fault::DropRequest),
    );
    let mut sim = Sim::new(config(OrderingMode::Chained, 4), broker).expect("valid config");
    push_n(&mut sim, &["a", "a", "a", "a"]);
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3", "m4"]);
    assert!(sim
        .outcomes()
        .values()
        .all(|o| matches!(o, Outcome::Delivered(_))));
    assert!(
        sim.trace_text().contains("10158"),
        "the scenario exercises the in-process answer:\n{}",
        sim.trace_text()
    );
    let stored_at = sim.broker().stored()[3].stored_at;
    assert!(
        stored_at.duration_since(sim.broker().stored()[0].stored_at) < Duration::from_secs(8),
        "re-sends pace at most {:?}, so the id is stored soon after the window frees it",
        sink_core::outbox::IN_PROCESS_MAX_DELAY
    );
}

#[test]
fn reconnect_sends_the_probe_at_once_after_a_long_outage() {
    // The breaker's reconnect delay has grown to minutes; when the client reconnects the probe
    // must go now, not when that delay ends (issue #9 item 6).
    let mut sim = sim(
        config(OrderingMode::Chained, 4),
        FaultScript::none().at(0, Fault::StreamMissing(Duration::from_secs(300))),
    );
    push_n(&mut sim, &["a", "a"]);
    sim.run_for(Duration::from_secs(300));
    let BreakerState::Open { until, attempt } = sim.outbox().breaker() else {
        panic!("breaker not open after 5 min: {:?}", sim.outbox().breaker());
    };
    assert!(
        attempt >= 5,
        "the reconnect delay has grown (attempt {attempt})"
    );
    assert!(until.duration_since(sim.now()) > Duration::from_secs(2));
    sim.broker_mut().stop_faults();
    sim.reconnect();
    sim.run_for(Duration::from_millis(50));
    assert_eq!(
        stored_ids(&sim),
        ["m1", "m2"],
        "delivered within 50 ms of the reconnect"
    );
    finish(&mut sim);
}

#[test]
fn idle_sink_reanchors_after_a_reconnect_instead_of_meeting_a_forgotten_last_id() {
    // Nothing in flight while the (replicated, 2.11+) stream restarts and forgets its last id.
    // Chaining the next event to the old anchor would fail 10070 when applied and block its id
    // "in process" for the duplicate window; after a reconnect the first event goes without the
    // header instead, and the next ones chain to it.
    let broker = ScriptedBroker::new(
        BrokerConfig {
            replicated: true,
            ..BrokerConfig::default()
        },
        FaultScript::none(),
    );
    let mut sim = Sim::new(config(OrderingMode::Chained, 4), broker).expect("valid config");
    push_n(&mut sim, &["a", "a"]);
    sim.run_for(Duration::from_millis(10));
    sim.clear_trace();
    sim.lose_connection();
    sim.broker_mut().forget_last_id();
    sim.reconnect();
    push_n(&mut sim, &["a", "a"]);
    finish(&mut sim);
    assert_eq!(stored_ids(&sim), ["m1", "m2", "m3", "m4"]);
    insta::assert_snapshot!(sim.trace_text(), @r"
    +0.010s connection lost
    +0.010s reconnected
    +0.010s push #3 m3 key=a
    +0.010s push #4 m4 key=a
    +0.010s transmit #3 m3 attempt 1 expect -
    +0.011s ack #3 attempt 1: seq 3
    +0.011s delivered #3 as 3
    +0.011s transmit #4 m4 attempt 1 expect m3
    +0.012s ack #4 attempt 1: seq 4
    +0.012s delivered #4 as 4
    ");
}
