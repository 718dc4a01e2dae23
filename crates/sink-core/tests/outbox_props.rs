//! Property tests (proptest-state-machine): the outbox and breaker, driven through the testkit Sim under scripted faults, against a pure reference model.
//!
//! Transitions push events (a few keys), re-emit an event pushed earlier (same message id: a
//! service retrying after its own timeout, a replayed job), advance virtual time, inject a fault
//! for the next publish, drop the connection, and (in the foreign-writer property only) let
//! another producer publish to the stream. One property runs against the replicated-stream model
//! of 2.11+ (an id whose publish failed 10070 stays "in process", 10158, for the duplicate window). After every transition the Sim's invariant check runs (I1-I4, window
//! and queue bounds, at most one outcome per event, no transmission while the breaker is open or
//! its probe is out). At the end the faults stop, the run must go idle within bounded virtual
//! time with an outcome for every event (I5), and the stream must hold, per key, exactly the
//! reference model's accepted events minus the rejected ones, in push order.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use sink_core::outbox::{OrderingMode, OutboxConfig, Refused};
use sink_testkit::strategies::{fault, fault_script};
use sink_testkit::{BrokerConfig, Fault, FaultScript, Outcome, ScriptedBroker, Sim};

const KEYS: u8 = 3;
const MAX_BODY: usize = 64;
const FINISH_WITHIN: Duration = Duration::from_secs(3600);

/// Which property: the ordering mode, whether a foreign writer shares the stream, and whether the
/// broker models a replicated 2.11+ stream.
trait Variant: Clone + std::fmt::Debug + 'static {
    const ORDERING: OrderingMode;
    const FOREIGN: bool;
    const REPLICATED: bool = false;
}

#[derive(Clone, Debug)]
struct Chained;
impl Variant for Chained {
    const ORDERING: OrderingMode = OrderingMode::Chained;
    const FOREIGN: bool = false;
}

#[derive(Clone, Debug)]
struct PerKeySerial;
impl Variant for PerKeySerial {
    const ORDERING: OrderingMode = OrderingMode::PerKeySerial;
    const FOREIGN: bool = false;
}

#[derive(Clone, Debug)]
struct Unordered;
impl Variant for Unordered {
    const ORDERING: OrderingMode = OrderingMode::Unordered;
    const FOREIGN: bool = false;
}

#[derive(Clone, Debug)]
struct ChainedWithForeignWriter;
impl Variant for ChainedWithForeignWriter {
    const ORDERING: OrderingMode = OrderingMode::Chained;
    const FOREIGN: bool = true;
}

#[derive(Clone, Debug)]
struct ChainedReplicated;
impl Variant for ChainedReplicated {
    const ORDERING: OrderingMode = OrderingMode::Chained;
    const FOREIGN: bool = false;
    const REPLICATED: bool = true;
}

#[derive(Clone, Debug)]
struct ChainedReplicatedWithForeignWriter;
impl Variant for ChainedReplicatedWithForeignWriter {
    const ORDERING: OrderingMode = OrderingMode::Chained;
    const FOREIGN: bool = true;
    const REPLICATED: bool = true;
}

#[derive(Clone, Debug)]
enum Transition {
    Push {
        key: u8,
        body_len: usize,
    },
    /// Push again the accepted event picked by this index (nothing if none was accepted yet).
    Reemit(prop::sample::Index),
    Advance(Duration),
    Inject(Fault),
    ConnectionLoss,
    Foreign,
}

/// The reference: what was asked of the sink, independent of how it got done.
#[derive(Clone, Debug)]
struct RefState {
    /// The outbox window of this run.
    window: usize,
    /// The broker's initial fault script (faults by publish index and a seeded random rate).
    script: FaultScript,
    /// Key of every push attempt, in order; attempt `n` (from 1) carries message id `m<n>`.
    pushes: Vec<String>,
    /// Virtual time the transitions asked for.
    elapsed: Duration,
    /// Faults injected by transitions.
    injected: usize,
    foreign: u32,
}

impl RefState {
    fn msg_id(attempt: usize) -> String {
        format!("m{attempt}")
    }
}

struct Model<V>(PhantomData<V>);

impl<V: Variant> ReferenceStateMachine for Model<V> {
    type State = RefState;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<RefState> {
        (1usize..=6, fault_script(40, 6, Duration::from_millis(1500)))
            .prop_map(|(window, script)| RefState {
                window,
                script,
                pushes: Vec::new(),
                elapsed: Duration::ZERO,
                injected: 0,
                foreign: 0,
            })
            .boxed()
    }

    fn transitions(_state: &RefState) -> BoxedStrategy<Transition> {
        let push =
            (0..KEYS, 0..=MAX_BODY).prop_map(|(key, body_len)| Transition::Push { key, body_len });
        let advance = prop_oneof![1u64..50, 50u64..1500, 1500u64..5000]
            .prop_map(|ms| Transition::Advance(Duration::from_millis(ms)));
        let inject = fault(Duration::from_millis(1500)).prop_map(Transition::Inject);
        let reemit = any::<prop::sample::Index>().prop_map(Transition::Reemit);
        if V::FOREIGN {
            prop_oneof![
                6 => push,
                2 => reemit,
                4 => advance,
                2 => inject,
                1 => Just(Transition::ConnectionLoss),
                2 => Just(Transition::Foreign),
            ]
            .boxed()
        } else {
            prop_oneof![
                6 => push,
                2 => reemit,
                4 => advance,
                3 => inject,
                1 => Just(Transition::ConnectionLoss),
            ]
            .boxed()
        }
    }

    fn apply(mut state: RefState, transition: &Transition) -> RefState {
        match transition {
            Transition::Push { key, .. } => state.pushes.push(format!("k{key}")),
            Transition::Reemit(_) => {}
            Transition::Advance(d) => state.elapsed += *d,
            Transition::Inject(_) => state.injected += 1,
            Transition::ConnectionLoss => {}
            Transition::Foreign => state.foreign += 1,
        }
        state
    }
}

fn outbox_config(ordering: OrderingMode, window: usize) -> OutboxConfig {
    OutboxConfig {
        window,
        max_events: 12,
        max_bytes: 600,
        ordering,
        ack_timeout: Duration::from_secs(1),
        ..OutboxConfig::default()
    }
}

fn broker_config(replicated: bool) -> BrokerConfig {
    BrokerConfig {
        // Covers every run (I2 is promised within the window; F3 covers outages beyond it). The
        // replicated model keeps the server's default (2 minutes): an id blocked "in process"
        // must be waited out within the run.
        duplicate_window: if replicated {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(2 * 3600)
        },
        replicated,
        ..BrokerConfig::default()
    }
}

struct OutboxUnderFaults<V>(PhantomData<V>);

fn fail_with_trace(sim: &Sim, what: &str) -> ! {
    let trace = sim.trace();
    let tail = &trace[trace.len().saturating_sub(120)..];
    panic!("{what}\nlast trace lines:\n{}", tail.join("\n"));
}

impl<V: Variant> StateMachineTest for OutboxUnderFaults<V> {
    type SystemUnderTest = Sim;
    type Reference = Model<V>;

    fn init_test(ref_state: &RefState) -> Sim {
        let broker = ScriptedBroker::new(broker_config(V::REPLICATED), ref_state.script.clone());
        Sim::new(outbox_config(V::ORDERING, ref_state.window), broker).expect("valid config")
    }

    fn apply(mut sim: Sim, ref_state: &RefState, transition: Transition) -> Sim {
        match transition {
            Transition::Push { key, body_len } => {
                let key = format!("k{key}");
                let held = (sim.outbox().len(), sim.outbox().bytes());
                match sim.push(&key, body_len) {
                    Ok(seq) => {
                        let event = &sim.pushed()[&seq];
                        assert_eq!(
                            event.msg_id.as_str(),
                            RefState::msg_id(ref_state.pushes.len())
                        );
                        assert_eq!(&event.key, ref_state.pushes.last().expect("pushed"));
                    }
                    Err(Refused::QueueFull {
                        events,
                        bytes,
                        max_events,
                        max_bytes,
                    }) => {
                        assert_eq!((events, bytes), held);
                        let size = "events.k0".len()
                            + RefState::msg_id(ref_state.pushes.len()).len()
                            + body_len
                            + 2;
                        assert!(
                            events >= max_events || bytes + size > max_bytes,
                            "refused with room: {events}/{max_events} events, {bytes}+{size}/{max_bytes} bytes"
                        );
                    }
                    Err(other) => fail_with_trace(&sim, &format!("unexpected refusal {other:?}")),
                }
                sim.settle();
            }
            Transition::Reemit(pick) => {
                let accepted: Vec<u64> = sim.pushed().keys().copied().collect();
                if !accepted.is_empty() {
                    let of = accepted[pick.index(accepted.len())];
                    let held = (sim.outbox().len(), sim.outbox().bytes());
                    match sim.push_reemit(of) {
                        Ok(seq) => {
                            assert_eq!(sim.pushed()[&seq].msg_id, sim.pushed()[&of].msg_id);
                        }
                        Err(Refused::QueueFull { events, bytes, .. }) => {
                            assert_eq!((events, bytes), held);
                        }
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
            Transition::Foreign => {
                sim.foreign_publish(&format!("foreign-{}", ref_state.foreign));
                sim.settle();
            }
        }
        assert_eq!(
            sim.clock().elapsed(),
            ref_state.elapsed,
            "virtual time is the transitions' sum"
        );
        sim
    }

    fn check_invariants(sim: &Sim, _ref_state: &RefState) {
        if let Err(e) = sim.check_invariants() {
            fail_with_trace(sim, &e);
        }
    }

    fn teardown(mut sim: Sim, ref_state: RefState) {
        if let Err(e) = sim.finish(FINISH_WITHIN) {
            fail_with_trace(&sim, &e);
        }
        // Per key, the stream holds exactly the accepted, non-rejected events, in push order; a
        // re-emitted event counts once, at its first push that was reported delivered.
        let accepted: BTreeMap<&str, u64> = sim
            .pushed()
            .iter()
            .rev()
            .map(|(seq, e)| (e.msg_id.as_str(), *seq))
            .collect();
        // Every accepted push (fresh or re-emitted) is one the reference asked for, with its key.
        for event in sim.pushed().values() {
            let n: usize = event.msg_id.as_str()[1..].parse().expect("m<n> ids");
            assert_eq!(Some(&event.key), ref_state.pushes.get(n - 1));
        }
        let mut expected: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (seq, event) in sim.pushed() {
            if matches!(sim.outcomes().get(seq), Some(Outcome::Delivered(_))) {
                let ids = expected.entry(event.key.as_str()).or_default();
                if !ids.iter().any(|id| id == event.msg_id.as_str()) {
                    ids.push(event.msg_id.as_str().to_owned());
                }
            }
        }
        let mut stored: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for r in sim.broker().stored() {
            if let Some(seq) = accepted.get(r.msg_id.as_str()) {
                let ids = stored.entry(sim.pushed()[seq].key.as_str()).or_default();
                // Copies beyond the duplicate window are the Sim's business (I2); order and
                // completeness are about first copies.
                if !ids.iter().any(|id| id == r.msg_id.as_str()) {
                    ids.push(r.msg_id.as_str().to_owned());
                }
            }
        }
        if V::ORDERING == OrderingMode::Unordered {
            for ids in expected.values_mut().chain(stored.values_mut()) {
                ids.sort();
            }
        }
        if stored != expected {
            fail_with_trace(
                &sim,
                &format!("stream per key {stored:?}\nexpected {expected:?}"),
            );
        }
        let rejected = sim
            .outcomes()
            .values()
            .filter(|o| matches!(o, Outcome::Rejected(_)))
            .count();
        let terminal_faults = sim
            .broker()
            .applied_faults()
            .iter()
            .filter(|f| matches!(f.fault, Fault::Terminal { .. }))
            .count();
        assert!(
            rejected <= terminal_faults,
            "rejections only from terminal faults"
        );
        if !V::FOREIGN {
            assert_eq!(
                sim.stats().fallbacks,
                0,
                "no fallback without another writer"
            );
            assert_eq!(sim.outbox().ordering(), V::ORDERING);
        }
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
    fn chained_outbox_keeps_invariants_under_faults(sequential 1..60 => OutboxUnderFaults<Chained>);

    #[test]
    fn per_key_serial_outbox_keeps_invariants_under_faults(sequential 1..60 => OutboxUnderFaults<PerKeySerial>);

    #[test]
    fn unordered_outbox_keeps_invariants_under_faults(sequential 1..60 => OutboxUnderFaults<Unordered>);

    #[test]
    fn chained_outbox_falls_back_safely_with_a_foreign_writer(sequential 1..60 => OutboxUnderFaults<ChainedWithForeignWriter>);

    #[test]
    fn chained_outbox_on_a_replicated_stream_waits_out_ids_in_process(sequential 1..60 => OutboxUnderFaults<ChainedReplicated>);

    #[test]
    fn chained_outbox_on_a_replicated_stream_with_a_foreign_writer(sequential 1..60 => OutboxUnderFaults<ChainedReplicatedWithForeignWriter>);
}
