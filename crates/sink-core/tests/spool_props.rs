//! Property tests (proptest-state-machine): the spool machine over the testkit's simulated disk, through appends, IO, acks, power losses, process kills, failed syncs and a full disk, against a model of what was confirmed.
//!
//! The model remembers every appended payload by sequence (payloads are unique across lives),
//! which appends were confirmed durable by a `Durable` event, and which were acknowledged.
//! After every power loss (a crash of the simulated disk at an arbitrary point, even half-way
//! through a command, under an ordered or a per-block write-back model) and every process kill
//! (the page cache survives), the spool is recovered from the disk and the replay must hold:
//! every durable, unacknowledged record exactly once, in sequence order, with its payload, and
//! nothing that was never appended (records that were never confirmed, or were acknowledged,
//! may or may not come back). Recovery never fails and never panics here.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use sink_core::spool::{
    IoError, IoErrorKind, RecordSeq, Recovery, Refused, Spool, SpoolConfig, SpoolOutput,
};
use sink_testkit::{CrashModel, SimDisk};

#[derive(Clone, Debug)]
enum Transition {
    /// Append a payload of this many filler bytes (plus an 8-byte unique tag).
    Append(usize),
    /// Let the adapter perform up to this many IO commands.
    Io(usize),
    /// Acknowledge the held record picked by this index.
    Ack(prop::sample::Index),
    /// Power loss after performing `ops` primitive operations of the next command.
    PowerLoss {
        seed: u64,
        model: CrashModel,
        ops: usize,
    },
    /// kill -9 after `ops` operations of the next command: the page cache survives.
    Kill { ops: usize },
    /// The next fdatasync fails (EIO).
    FailSync,
    /// The disk fills up (no file may be created or grown) or is freed.
    DiskFull(bool),
}

/// The reference: only the transitions asked for (what happened is checked against `Model`).
#[derive(Clone, Debug, Default)]
struct RefState {
    steps: usize,
}

struct Steps;

impl ReferenceStateMachine for Steps {
    type State = RefState;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<RefState> {
        Just(RefState::default()).boxed()
    }

    fn transitions(_state: &RefState) -> BoxedStrategy<Transition> {
        let model = prop_oneof![
            Just(CrashModel::Ordered),
            Just(CrashModel::Blocks(1)),
            Just(CrashModel::Blocks(16)),
            Just(CrashModel::Blocks(512)),
        ];
        prop_oneof![
            12 => (1usize..=56).prop_map(Transition::Append),
            4 => (1usize..=4).prop_map(Transition::Io),
            4 => any::<prop::sample::Index>().prop_map(Transition::Ack),
            3 => (any::<u64>(), model, 1usize..3)
                .prop_map(|(seed, model, ops)| Transition::PowerLoss { seed, model, ops }),
            1 => (0usize..4).prop_map(|ops| Transition::Kill { ops }),
            1 => Just(Transition::FailSync),
            1 => any::<bool>().prop_map(Transition::DiskFull),
        ]
        .boxed()
    }

    fn apply(mut state: RefState, _transition: &Transition) -> RefState {
        state.steps += 1;
        state
    }
}

/// What the adapter was told.
#[derive(Debug, Default)]
struct Model {
    /// Records this spool holds (appended in this life, or replayed into it), by sequence.
    appended: BTreeMap<RecordSeq, Vec<u8>>,
    /// Confirmed durable.
    durable: BTreeSet<RecordSeq>,
    /// Acknowledged.
    acked: BTreeSet<RecordSeq>,
    /// The last `Durable` through.
    durable_through: RecordSeq,
}

struct Rig {
    config: SpoolConfig,
    spool: Spool,
    disk: SimDisk,
    model: Model,
    /// Records acknowledged in earlier lives, with their payloads.
    acked_before: BTreeMap<RecordSeq, Vec<u8>>,
    /// Unique payload tags across lives.
    tag: u64,
    lives: u64,
    recoveries: u64,
    quarantined: u64,
    torn: u64,
}

fn config(seed: u64) -> SpoolConfig {
    SpoolConfig {
        segment_size: 320,
        max_bytes: 1400,
        max_record: 64,
        spare_segments: 1,
        seed,
    }
}

impl Rig {
    fn new() -> Rig {
        let config = config(1);
        Rig {
            spool: Spool::new(config.clone()).expect("valid config"),
            config,
            disk: SimDisk::new(7),
            model: Model::default(),
            acked_before: BTreeMap::new(),
            tag: 0,
            lives: 1,
            recoveries: 0,
            quarantined: 0,
            torn: 0,
        }
    }

    fn on_event(&mut self, output: SpoolOutput) {
        match output {
            SpoolOutput::Durable { through } => {
                assert!(
                    through >= self.model.durable_through,
                    "durable went back: {through} after {}",
                    self.model.durable_through
                );
                assert!(
                    through < self.spool.stats().next_seq,
                    "durable past appends"
                );
                self.model.durable_through = through;
                let covered: Vec<RecordSeq> = self
                    .model
                    .appended
                    .range(..=through)
                    .map(|(s, _)| *s)
                    .collect();
                self.model.durable.extend(covered);
            }
            SpoolOutput::Failed { from, through, .. } => {
                assert!(from > self.model.durable_through && from <= through);
                assert!(self.spool.broken().is_some());
            }
            SpoolOutput::PrepareFailed { .. } => {}
            SpoolOutput::Ready => assert!(self.spool.is_ready()),
            SpoolOutput::Io { .. } => unreachable!("handled by the caller"),
        }
    }

    /// Performs up to `commands` IO commands; reopens a broken spool as a restarted process
    /// would.
    fn pump(&mut self, commands: usize) {
        let mut done = 0;
        while let Some(output) = self.spool.poll_output() {
            match output {
                SpoolOutput::Io { id, command } => match self.disk.perform(&command) {
                    Ok(()) => self.spool.handle_done(id),
                    Err(error) => self.spool.handle_failed(id, error),
                },
                event => self.on_event(event),
            }
            done += 1;
            if done >= commands {
                break;
            }
        }
        if self.spool.broken().is_some() {
            while let Some(output) = self.spool.poll_output() {
                self.on_event(output);
            }
            self.recover();
        }
    }

    /// Performs `ops` primitive operations of the next command (if any) and stops there.
    fn start_next_command(&mut self, ops: usize) {
        while let Some(output) = self.spool.poll_output() {
            if let SpoolOutput::Io { command, .. } = output {
                for op in SimDisk::plan(&command).iter().take(ops) {
                    if self.disk.apply(op).is_err() {
                        break;
                    }
                }
                return;
            }
            self.on_event(output);
        }
    }

    /// Opens the spool again from what the disk shows and checks the replay against the model.
    fn recover(&mut self) {
        self.lives += 1;
        self.recoveries += 1;
        self.config.seed = self.lives;
        let mut recovery = Recovery::new(self.config.clone()).expect("valid config");
        for (segment, bytes) in self.disk.segments() {
            recovery
                .add_segment(segment, &bytes)
                .unwrap_or_else(|e| panic!("recovery refused {segment}: {e}"));
        }
        let recovered = recovery.finish().expect("recovery finishes");
        let mut replay: Vec<(RecordSeq, Vec<u8>)> = Vec::new();
        for plan in &recovered.replay {
            let bytes = self
                .disk
                .file(plan.segment)
                .expect("planned segment exists");
            for record in plan.records(bytes) {
                let record = record.expect("replay reads what recovery found");
                replay.push((record.seq, record.payload.to_vec()));
            }
        }
        for pair in replay.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "replay out of order or duplicated: {} then {}",
                pair[0].0,
                pair[1].0
            );
        }
        for (seq, payload) in &replay {
            // A record of this life, or one acknowledged earlier: the watermark that hid it
            // lived in records a crash took (the broker's duplicate window absorbs it).
            let known = match self.model.appended.get(seq) {
                Some(current) => current == payload,
                None => self.acked_before.get(seq) == Some(payload),
            };
            assert!(
                known,
                "replayed record {seq} was never appended with this payload"
            );
        }
        let replayed: BTreeSet<RecordSeq> = replay.iter().map(|(s, _)| *s).collect();
        let lost: Vec<&RecordSeq> = self
            .model
            .durable
            .difference(&self.model.acked)
            .filter(|s| !replayed.contains(s))
            .collect();
        assert!(
            lost.is_empty(),
            "durable records lost: {lost:?}; report {:?}",
            recovered.report
        );
        assert_eq!(recovered.report.records, replay.len() as u64);
        assert_eq!(recovered.spool.stats().records, replay.len() as u64);
        self.quarantined += recovered.report.quarantined.len() as u64;
        self.torn += u64::from(recovered.report.torn_tail.is_some());
        for seq in &self.model.acked {
            self.acked_before
                .insert(*seq, self.model.appended[seq].clone());
        }
        self.spool = recovered.spool;
        self.model = Model {
            appended: replay.into_iter().collect(),
            ..Model::default()
        };
    }

    fn append(&mut self, filler: usize) {
        self.tag += 1;
        let mut payload = self.tag.to_le_bytes().to_vec();
        payload.extend(std::iter::repeat_n((self.tag % 251) as u8, filler));
        let before = self.spool.stats();
        match self.spool.append(&payload) {
            Ok(seq) => {
                assert_eq!(seq, before.next_seq);
                self.model.appended.insert(seq, payload);
            }
            Err(Refused::Full {
                bytes,
                record,
                max_bytes,
            }) => {
                assert_eq!(bytes, before.bytes);
                assert!(bytes + record > max_bytes);
            }
            Err(Refused::NotReady { .. }) => assert_eq!(before.spares, 0),
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
}

impl StateMachineTest for Rig {
    type SystemUnderTest = Rig;
    type Reference = Steps;

    fn init_test(_ref_state: &RefState) -> Rig {
        Rig::new()
    }

    fn apply(mut rig: Rig, _ref_state: &RefState, transition: Transition) -> Rig {
        match transition {
            Transition::Append(filler) => rig.append(filler),
            Transition::Io(n) => rig.pump(n),
            Transition::Ack(pick) => {
                let held: Vec<RecordSeq> = rig
                    .model
                    .appended
                    .keys()
                    .filter(|s| !rig.model.acked.contains(s))
                    .copied()
                    .collect();
                if !held.is_empty() {
                    let seq = held[pick.index(held.len())];
                    assert!(rig.spool.ack(seq), "ack of held record {seq} refused");
                    assert!(!rig.spool.ack(seq), "second ack of {seq} accepted");
                    rig.model.acked.insert(seq);
                }
            }
            Transition::PowerLoss { seed, model, ops } => {
                rig.start_next_command(ops);
                rig.disk = rig.disk.crash(seed, model);
                rig.recover();
            }
            Transition::Kill { ops } => {
                rig.start_next_command(ops);
                rig.recover();
            }
            Transition::FailSync => rig.disk.fail_next_sync(IoError {
                kind: IoErrorKind::Other,
                message: "Input/output error".into(),
            }),
            Transition::DiskFull(full) => rig.disk.set_capacity(full.then(|| rig.disk.used())),
        }
        rig
    }

    fn check_invariants(rig: &Rig, _ref_state: &RefState) {
        let stats = rig.spool.stats();
        let held = rig.model.appended.len() - rig.model.acked.len();
        assert_eq!(stats.records, held as u64, "held records");
        assert!(stats.bytes <= rig.config.max_bytes);
        assert_eq!(
            stats.oldest,
            rig.model
                .appended
                .keys()
                .find(|s| !rig.model.acked.contains(s))
                .copied()
                .filter(|_| held > 0)
                .map(|first| first.min(stats.acked_through + 1)),
        );
    }

    fn teardown(mut rig: Rig, _ref_state: RefState) {
        // The faults stop: the disk has room, everything appended gets written.
        rig.disk.set_capacity(None);
        rig.pump(usize::MAX);
        rig.pump(usize::MAX);
        assert!(
            rig.spool.broken().is_none() && rig.spool.poll_output().is_none(),
            "idle at the end"
        );
        let confirmed = rig.model.appended.len();
        let durable = rig.model.durable.len();
        assert_eq!(confirmed, durable, "every append confirmed once IO ran");
        // A last power loss keeps everything.
        rig.disk = rig.disk.crash(0, CrashModel::Blocks(1));
        rig.recover();
    }
}

fn proptest_config() -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: default.cases.max(256),
        max_shrink_iters: 4096,
        ..default
    }
}

prop_state_machine! {
    #![proptest_config(proptest_config())]

    #[test]
    fn spool_keeps_every_durable_record_through_crashes(sequential 1..120 => Rig);
}
