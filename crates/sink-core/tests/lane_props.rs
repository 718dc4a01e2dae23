//! Property tests (proptest-state-machine): several fast-batch lanes writing one scripted fast-batch stream under random faults, against a pure reference model.
//!
//! Transitions push events to one of the producers, re-emit an event a producer pushed earlier
//! (same message id), advance virtual time, inject a fault for the next publish (429, a failed
//! check, a lost or delayed reply, a leader change losing what is in flight, a restart), drop the
//! connection, make the server forget its batches, or change the leader without loss. The broker
//! also draws random faults from a seeded menu. After every transition the LaneSim's invariant
//! check runs (I1-I4 per producer, bounds, one outcome per event, no batch started while the
//! breaker is open). At the end the faults stop, the run must go idle within bounded virtual time
//! with an outcome for every event (I5), and for each producer the stream must hold exactly the
//! events reported delivered, each once, in push order.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use sink_core::lane::LaneConfig;
use sink_core::outbox::Refused;
use sink_testkit::fastbroker::{FastBroker, FastBrokerConfig, FastFault, FastFaults};
use sink_testkit::lanesim::{LaneOutcome, LaneSim};

const MAX_PRODUCERS: usize = 4;
const FINISH_WITHIN: Duration = Duration::from_secs(3600);

fn fast_fault() -> impl Strategy<Value = FastFault> {
    prop_oneof![
        3 => Just(FastFault::Overloaded),
        1 => Just(FastFault::Terminal { code: 10054 }),
        3 => Just(FastFault::LoseReply),
        2 => (1u64..3000).prop_map(|ms| FastFault::DelayReply(Duration::from_millis(ms))),
        2 => (1u32..5).prop_map(|lost| FastFault::LeaderChange { lost }),
        1 => Just(FastFault::Restart),
    ]
}

#[derive(Clone, Debug)]
enum Transition {
    Push {
        producer: usize,
        body_len: usize,
    },
    Reemit {
        producer: usize,
        pick: prop::sample::Index,
    },
    Advance(Duration),
    Inject(FastFault),
    ConnectionLoss,
    ForgetBatches,
    LeaderChange,
}

/// The reference: what was asked of the producers.
#[derive(Clone, Debug)]
struct RefState {
    producers: usize,
    flow: u16,
    faults: FastFaults,
    /// Pushes asked of each producer.
    pushes: Vec<usize>,
    elapsed: Duration,
}

struct Model;

impl ReferenceStateMachine for Model {
    type State = RefState;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<RefState> {
        (
            1..=MAX_PRODUCERS,
            prop::sample::select(vec![1u16, 2, 4, 500]),
            any::<u64>(),
            0u16..80,
            prop::collection::vec(fast_fault(), 1..4),
        )
            .prop_map(|(producers, flow, seed, per_mille, menu)| RefState {
                producers,
                flow,
                faults: FastFaults {
                    seed,
                    per_mille,
                    menu,
                    ..FastFaults::none()
                },
                pushes: vec![0; producers],
                elapsed: Duration::ZERO,
            })
            .boxed()
    }

    fn transitions(state: &RefState) -> BoxedStrategy<Transition> {
        let n = state.producers;
        let push = (0..n, 0usize..32)
            .prop_map(|(producer, body_len)| Transition::Push { producer, body_len });
        let reemit = (0..n, any::<prop::sample::Index>())
            .prop_map(|(producer, pick)| Transition::Reemit { producer, pick });
        let advance = prop_oneof![1u64..5, 5u64..1500, 1500u64..12_000]
            .prop_map(|ms| Transition::Advance(Duration::from_millis(ms)));
        prop_oneof![
            8 => push,
            2 => reemit,
            4 => advance,
            3 => fast_fault().prop_map(Transition::Inject),
            1 => Just(Transition::ConnectionLoss),
            1 => Just(Transition::ForgetBatches),
            1 => Just(Transition::LeaderChange),
        ]
        .boxed()
    }

    fn preconditions(state: &RefState, transition: &Transition) -> bool {
        // Shrinking may lower the producer count under a transition picked for a higher one.
        match transition {
            Transition::Push { producer, .. } | Transition::Reemit { producer, .. } => {
                *producer < state.producers
            }
            _ => true,
        }
    }

    fn apply(mut state: RefState, transition: &Transition) -> RefState {
        match transition {
            Transition::Push { producer, .. } => state.pushes[*producer] += 1,
            Transition::Advance(d) => state.elapsed += *d,
            _ => {}
        }
        state
    }
}

fn lane_config(flow: u16) -> LaneConfig {
    LaneConfig {
        flow,
        max_events: 16,
        max_bytes: 1200,
        ack_timeout: Duration::from_secs(1),
        id_seed: 11,
        ..LaneConfig::default()
    }
}

struct LanesUnderFaults;

fn fail_with_trace(sim: &LaneSim, what: &str) -> ! {
    panic!("{what}\nlast trace lines:\n{}", sim.trace_tail(150));
}

impl StateMachineTest for LanesUnderFaults {
    type SystemUnderTest = LaneSim;
    type Reference = Model;

    fn init_test(ref_state: &RefState) -> LaneSim {
        let broker = FastBroker::new(
            FastBrokerConfig {
                // Covers every run: I2 is promised within the window.
                duplicate_window: Duration::from_secs(4 * 3600),
                ..FastBrokerConfig::default()
            },
            ref_state.faults.clone(),
        );
        LaneSim::new(lane_config(ref_state.flow), ref_state.producers, broker)
            .expect("valid config")
    }

    fn apply(mut sim: LaneSim, ref_state: &RefState, transition: Transition) -> LaneSim {
        match transition {
            Transition::Push { producer, body_len } => {
                let held = sim.producer(producer).lane().len();
                match sim.push(producer, body_len) {
                    Ok(seq) => {
                        let id = &sim.producer(producer).pushed()[&seq];
                        assert!(id.as_str().starts_with(&format!("p{producer}-m")));
                    }
                    Err(Refused::QueueFull {
                        events,
                        bytes,
                        max_events,
                        max_bytes,
                    }) => {
                        assert_eq!(events, held);
                        let id = format!("p{producer}-m{}", ref_state.pushes[producer]);
                        let size = "events.p0".len() + id.len() + body_len + "p0".len();
                        assert!(
                            events >= max_events || bytes + size > max_bytes,
                            "refused with room: {events}/{max_events}, {bytes}+{size}/{max_bytes}"
                        );
                    }
                    Err(other) => fail_with_trace(&sim, &format!("unexpected refusal {other:?}")),
                }
                sim.settle();
            }
            Transition::Reemit { producer, pick } => {
                let accepted: Vec<u64> = sim.producer(producer).pushed().keys().copied().collect();
                if !accepted.is_empty() {
                    let of = accepted[pick.index(accepted.len())];
                    match sim.push_reemit(producer, of) {
                        Ok(_) | Err(Refused::QueueFull { .. }) => {}
                        Err(other) => {
                            fail_with_trace(&sim, &format!("unexpected refusal {other:?}"))
                        }
                    }
                    sim.settle();
                }
            }
            Transition::Advance(d) => sim.run_for(d),
            Transition::Inject(fault) => sim.broker_mut().inject_next(fault),
            Transition::ConnectionLoss => {
                sim.lose_connection();
                sim.settle();
            }
            Transition::ForgetBatches => sim.broker_mut().forget_batches(),
            Transition::LeaderChange => {
                let now = sim.clock().now();
                sim.broker_mut().leader_change(now);
                sim.settle();
            }
        }
        assert_eq!(sim.clock().elapsed(), ref_state.elapsed);
        sim
    }

    fn check_invariants(sim: &LaneSim, _ref_state: &RefState) {
        if let Err(e) = sim.check_invariants() {
            fail_with_trace(sim, &e);
        }
    }

    fn teardown(mut sim: LaneSim, ref_state: RefState) {
        sim.set_trace(true);
        if let Err(e) = sim.finish(FINISH_WITHIN) {
            fail_with_trace(&sim, &e);
        }
        for p in 0..ref_state.producers {
            let producer = sim.producer(p);
            // Every fresh push the reference asked for was accepted or refused; ids are p<p>-m<n>.
            let fresh = producer
                .pushed()
                .values()
                .map(|id| id.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            assert!(fresh <= ref_state.pushes[p]);
            // The stream holds exactly this producer's delivered ids, each once, in push order.
            let mut expected: Vec<&str> = Vec::new();
            for (seq, id) in producer.pushed() {
                if matches!(
                    producer.outcomes().get(seq),
                    Some(LaneOutcome::Delivered(_))
                ) && !expected.contains(&id.as_str())
                {
                    expected.push(id.as_str());
                }
            }
            let prefix = format!("p{p}-");
            let stored: Vec<&str> = sim
                .broker()
                .stored()
                .iter()
                .map(|r| r.msg_id.as_str())
                .filter(|id| id.starts_with(&prefix))
                .collect();
            if stored != expected {
                fail_with_trace(
                    &sim,
                    &format!("p{p}: stream holds {stored:?}\nexpected {expected:?}"),
                );
            }
        }
        let rejected: usize = (0..ref_state.producers)
            .map(|p| {
                sim.producer(p)
                    .outcomes()
                    .values()
                    .filter(|o| matches!(o, LaneOutcome::Rejected(_)))
                    .count()
            })
            .sum();
        let terminal = sim
            .broker()
            .applied_faults()
            .iter()
            .filter(|f| matches!(f.fault, FastFault::Terminal { .. }))
            .count();
        assert!(rejected <= terminal, "rejections only from failed checks");
    }
}

fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: default.cases.max(256),
        max_shrink_iters: 4096,
        ..default
    }
}

prop_state_machine! {
    #![proptest_config(config())]

    #[test]
    fn lanes_on_one_stream_keep_per_producer_order_and_exactly_once_under_faults(sequential 1..80 => LanesUnderFaults);
}

#[test]
fn stream_holds_each_producers_events_in_order_with_many_producers_interleaving() {
    let mut sim = LaneSim::new(
        lane_config(500),
        4,
        FastBroker::new(FastBrokerConfig::default(), FastFaults::none()),
    )
    .expect("valid config");
    sim.set_trace(false);
    for round in 0..40 {
        for p in 0..4 {
            if sim.push(p, 8).is_err() {
                sim.run_for(Duration::from_millis(1));
            }
        }
        if round % 3 == 0 {
            sim.run_for(Duration::from_micros(300));
        }
    }
    sim.finish(FINISH_WITHIN).expect("I1-I5");
    let by_producer: BTreeMap<&str, usize> =
        sim.broker()
            .stored()
            .iter()
            .fold(BTreeMap::new(), |mut m, r| {
                *m.entry(&r.msg_id.as_str()[..2]).or_default() += 1;
                m
            });
    let delivered: usize = (0..4).map(|p| sim.producer(p).outcomes().len()).sum();
    assert_eq!(delivered, sim.broker().stored().len());
    assert_eq!(by_producer.len(), 4, "{by_producer:?}");
}

/// Runs pushes `(producer, wait before the push in microseconds)` without faults; returns the
/// largest push-to-receipt latency.
fn worst_latency(producers: usize, pushes: &[(usize, u64)]) -> Duration {
    let mut sim = LaneSim::new(
        lane_config(500),
        producers,
        FastBroker::new(FastBrokerConfig::default(), FastFaults::none()),
    )
    .expect("valid config");
    for &(p, wait) in pushes {
        sim.run_for(Duration::from_micros(wait));
        sim.push(p % producers, 8).expect("room");
        sim.settle();
    }
    if let Err(e) = sim.finish(FINISH_WITHIN) {
        fail_with_trace(&sim, &e);
    }
    (0..producers)
        .flat_map(|p| {
            let producer = sim.producer(p);
            producer
                .pushed()
                .keys()
                .map(|seq| producer.latency(*seq).expect("every event has an outcome"))
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Low rate, low latency: an event that finds its lane idle is confirmed one round trip
    /// (the broker's 1 ms) after it is pushed.
    #[test]
    fn at_a_low_rate_every_event_is_confirmed_within_one_round_trip(
        producers in 1usize..=3,
        pushes in prop::collection::vec((0usize..3, 2_000u64..50_000), 1..40),
    ) {
        prop_assert_eq!(worst_latency(producers, &pushes), Duration::from_millis(1));
    }

    /// At any rate that does not fill the window, an event waits at most for the batch being
    /// committed (1 round trip), a new batch's first reply (1) and its commit (1).
    #[test]
    fn at_a_moderate_rate_every_event_is_confirmed_within_three_round_trips(
        producers in 1usize..=3,
        pushes in prop::collection::vec((0usize..3, 0u64..1_500), 1..80),
    ) {
        let worst = worst_latency(producers, &pushes);
        prop_assert!(worst <= Duration::from_millis(3), "{worst:?}");
    }
}
