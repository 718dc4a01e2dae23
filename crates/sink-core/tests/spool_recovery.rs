//! Spool recovery on the simulated disk: power loss in the middle of a group commit, injected corruption (flipped bit, zeroed length, truncated record, damaged segment header), repairs that hold across the next recovery, and refusal of a newer format.

use std::collections::BTreeMap;

use sink_core::spool::{
    IoCommand, RecordSeq, RecoverError, Recovered, Recovery, Refused, SegmentId, Spool,
    SpoolConfig, SpoolOutput, FORMAT_VERSION,
};
use sink_testkit::simdisk::RecordAt;
use sink_testkit::{Corruption, CrashModel, DiskOp, SimDisk};

fn config(seed: u64) -> SpoolConfig {
    SpoolConfig {
        segment_size: 400,
        max_bytes: 1 << 20,
        max_record: 128,
        spare_segments: 1,
        seed,
    }
}

fn payload(n: u64) -> Vec<u8> {
    let mut p = n.to_le_bytes().to_vec();
    p.extend(std::iter::repeat_n(n as u8, (n as usize * 7) % 40 + 1));
    p
}

/// Performs every command the spool has, reporting each; returns the events.
fn drain(spool: &mut Spool, disk: &mut SimDisk) -> Vec<SpoolOutput> {
    let mut events = Vec::new();
    while let Some(output) = spool.poll_output() {
        match output {
            SpoolOutput::Io { id, command } => match disk.perform(&command) {
                Ok(()) => spool.handle_done(id),
                Err(error) => spool.handle_failed(id, error),
            },
            event => events.push(event),
        }
    }
    events
}

/// A spool holding records 1..=n, all durable, none acknowledged.
fn spool_with(n: u64) -> (Spool, SimDisk, BTreeMap<RecordSeq, Vec<u8>>) {
    let mut spool = Spool::new(config(1)).unwrap();
    let mut disk = SimDisk::new(3);
    drain(&mut spool, &mut disk);
    let mut appended = BTreeMap::new();
    for i in 1..=n {
        let p = payload(i);
        let seq = loop {
            match spool.append(&p) {
                Ok(seq) => break seq,
                Err(Refused::NotReady { .. }) => {
                    drain(&mut spool, &mut disk);
                }
                Err(other) => panic!("{other}"),
            }
        };
        appended.insert(seq, p);
    }
    let events = drain(&mut spool, &mut disk);
    assert!(events.contains(&SpoolOutput::Durable { through: n }));
    (spool, disk, appended)
}

/// The replayed records: sequence and payload, in order.
type Replay = Vec<(RecordSeq, Vec<u8>)>;

fn recover(disk: &SimDisk, seed: u64) -> Result<(Recovered, Replay), RecoverError> {
    let mut recovery = Recovery::new(config(seed))?;
    for (segment, bytes) in disk.segments() {
        recovery.add_segment(segment, &bytes)?;
    }
    let recovered = recovery.finish()?;
    let mut replay = Vec::new();
    for plan in &recovered.replay {
        for record in plan.records(disk.file(plan.segment).unwrap()) {
            let record = record.expect("replay reads what recovery found");
            replay.push((record.seq, record.payload.to_vec()));
        }
    }
    Ok((recovered, replay))
}

/// The live segments' records in sequence order, with their segment.
fn records(disk: &SimDisk) -> Vec<(SegmentId, RecordAt)> {
    let mut all: Vec<(SegmentId, RecordAt)> = disk
        .segments()
        .into_iter()
        .flat_map(|(id, _)| disk.records(id).into_iter().map(move |r| (id, r)))
        .filter(|(_, r)| r.data)
        .collect();
    all.sort_by_key(|(_, r)| r.seq);
    all
}

fn seqs(replay: &[(RecordSeq, Vec<u8>)]) -> Vec<RecordSeq> {
    replay.iter().map(|(s, _)| *s).collect()
}

/// Runs the repairs, then recovers again: the second recovery must find nothing new to repair
/// and replay the same records.
fn repair_and_recover_again(
    recovered: Recovered,
    disk: &mut SimDisk,
    replay: &[(RecordSeq, Vec<u8>)],
) {
    let mut spool = recovered.spool;
    drain(&mut spool, disk);
    let (again, replay_again) = recover(disk, 99).unwrap();
    assert_eq!(replay_again, replay, "the same records after the repairs");
    assert_eq!(again.report.quarantined, vec![], "quarantine happens once");
    assert_eq!(again.report.torn_tail, None, "the torn tail is gone");
    assert!(again.report.previously_quarantined <= recovered.report.quarantined.len() as u64);
    assert_eq!(again.report.torn_tail, None);
}

#[test]
fn power_loss_during_a_group_commit_keeps_the_durable_prefix_and_truncates_or_quarantines_the_rest()
{
    let mut torn = 0;
    let mut quarantined = 0;
    let mut partial = 0;
    for model in [
        CrashModel::Ordered,
        CrashModel::Blocks(16),
        CrashModel::Blocks(64),
        CrashModel::Blocks(512),
    ] {
        for seed in 0..300u64 {
            let durable = 3 + seed % 9;
            let (mut spool, mut disk, mut appended) = spool_with(durable);
            // Stage a group, perform its writes but not its fdatasync, then lose power.
            for i in 0..(2 + seed % 7) {
                let n = 1000 + i + seed * 16;
                let p = payload(n);
                if let Ok(seq) = spool.append(&p) {
                    appended.insert(seq, p);
                }
            }
            // Housekeeping first (a roll queues the next spare's preparation), then the commit.
            let command = loop {
                match spool.poll_output() {
                    Some(SpoolOutput::Io { command, .. })
                        if matches!(command, IoCommand::Commit { .. }) =>
                    {
                        break command
                    }
                    Some(SpoolOutput::Io { id, command }) => {
                        disk.perform(&command).unwrap();
                        spool.handle_done(id);
                    }
                    Some(_) => {}
                    None => panic!("a commit is due"),
                }
            };
            for op in SimDisk::plan(&command) {
                if matches!(op, DiskOp::Sync { .. }) {
                    break;
                }
                disk.apply(&op).unwrap();
            }
            let mut crashed = disk.crash(seed, model);
            let (recovered, replay) = recover(&crashed, seed + 2).unwrap();

            let got = seqs(&replay);
            assert_eq!(
                &got[..durable as usize],
                &(1..=durable).collect::<Vec<_>>()[..],
                "{model:?} seed {seed}: the durable prefix, in order"
            );
            for pair in got.windows(2) {
                assert!(pair[0] < pair[1], "{model:?} seed {seed}: order {got:?}");
            }
            for (seq, p) in &replay {
                assert_eq!(
                    appended.get(seq),
                    Some(p),
                    "{model:?} seed {seed}: record {seq}"
                );
            }
            if got.len() < appended.len() {
                partial += 1;
            }
            torn += u64::from(recovered.report.torn_tail.is_some());
            quarantined += recovered.report.quarantined.len() as u64;
            // Every region's missing sequences are among the never-confirmed ones.
            for q in &recovered.report.quarantined {
                assert!(q.first_missing.is_none_or(|f| f > durable), "{q:?}");
            }
            repair_and_recover_again(recovered, &mut crashed, &replay);
        }
    }
    // The sweep reaches every outcome (so the assertions above were exercised).
    assert!(partial > 100, "groups partly lost: {partial}");
    assert!(torn > 50, "torn tails: {torn}");
    assert!(quarantined > 10, "quarantined regions: {quarantined}");
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// A bit of the payload.
    PayloadBit,
    /// A bit of the stored checksum.
    CrcBit,
    /// A bit of the length field.
    LengthBit,
    /// The length field zeroed.
    ZeroLength,
    /// The whole record zeroed.
    ZeroRecord,
}

fn damage(disk: &mut SimDisk, segment: SegmentId, r: &RecordAt, how: Damage) {
    let c = match how {
        Damage::PayloadBit => Corruption::FlipBit {
            offset: r.offset + r.len - 1,
            bit: 3,
        },
        Damage::CrcBit => Corruption::FlipBit {
            offset: r.offset + 1,
            bit: 0,
        },
        Damage::LengthBit => Corruption::FlipBit {
            offset: r.offset + 8,
            bit: 2,
        },
        Damage::ZeroLength => Corruption::Zero {
            offset: r.offset + 8,
            len: 4,
        },
        Damage::ZeroRecord => Corruption::Zero {
            offset: r.offset,
            len: r.len,
        },
    };
    disk.corrupt(segment, c);
}

#[test]
fn a_damaged_record_in_the_middle_is_quarantined_counted_and_the_rest_replayed() {
    let (_spool, disk, appended) = spool_with(30);
    let all = records(&disk);
    assert!(
        all.iter()
            .map(|(s, _)| s)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 3,
        "the spool spans several segments"
    );
    for how in [
        Damage::PayloadBit,
        Damage::CrcBit,
        Damage::LengthBit,
        Damage::ZeroLength,
        Damage::ZeroRecord,
    ] {
        // Every record but the very last one is "in the middle": a valid record follows it,
        // in its segment or in the next.
        for (segment, r) in &all[..all.len() - 1] {
            let mut disk = disk.clone();
            damage(&mut disk, *segment, r, how);
            let (recovered, replay) = recover(&disk, 5).unwrap();
            let expected: Vec<RecordSeq> = (1..=30).filter(|&s| s != r.seq).collect();
            assert_eq!(seqs(&replay), expected, "{how:?} on record {}", r.seq);
            for (seq, p) in &replay {
                assert_eq!(&appended[seq], p);
            }
            let report = &recovered.report;
            assert_eq!(report.torn_tail, None, "{how:?} on {}", r.seq);
            let unknown = r.seq == 1 && matches!(how, Damage::ZeroRecord);
            assert_eq!(recovered.spool.stats().missing, u64::from(!unknown));
            if report.quarantined.is_empty() {
                // A record zeroed whole at the end of its segment leaves no bytes to copy:
                // the loss is counted as missing between the segments.
                assert!(
                    matches!(how, Damage::ZeroRecord),
                    "{how:?} on {}: {report:?}",
                    r.seq
                );
                assert_eq!(report.unexplained_missing, 1);
                continue;
            }
            assert_eq!(
                report.quarantined.len(),
                1,
                "{how:?} on {}: {report:?}",
                r.seq
            );
            let q = report.quarantined[0].clone();
            // Damage that wipes the very first record's header leaves its sequence unknown.
            assert_eq!(
                (q.segment, q.offset, q.first_missing, q.missing),
                if unknown {
                    (*segment, r.offset, None, 0)
                } else {
                    (*segment, r.offset, Some(r.seq), 1)
                },
                "{how:?} on {}",
                r.seq
            );
            assert_eq!(recovered.spool.stats().quarantined, 1);
            // The quarantine copy holds the damaged bytes; the skip mark makes it count once.
            let before = disk.quarantined().len();
            repair_and_recover_again(recovered, &mut disk, &replay);
            let copy = &disk.quarantined()[before];
            assert_eq!((copy.segment, copy.offset), (*segment, r.offset));
            assert!(copy.bytes.len() as u64 >= r.len.min(q.len));
        }
    }
}

#[test]
fn a_damaged_last_record_is_a_torn_tail_zeroed_and_counted() {
    let (_spool, disk, _) = spool_with(12);
    let (segment, last) = *records(&disk).last().unwrap();
    for how in [Damage::PayloadBit, Damage::CrcBit, Damage::LengthBit] {
        let mut disk = disk.clone();
        damage(&mut disk, segment, &last, how);
        let (recovered, replay) = recover(&disk, 5).unwrap();
        assert_eq!(seqs(&replay), (1..=11).collect::<Vec<_>>(), "{how:?}");
        let torn = recovered.report.torn_tail.expect("torn tail reported");
        assert_eq!(
            (torn.segment, torn.offset, torn.seq),
            (segment, last.offset, 12)
        );
        assert_eq!(recovered.spool.stats().torn_tails, 1);
        // Appends continue where the torn record was, with its sequence.
        let mut spool = recovered.spool;
        drain(&mut spool, &mut disk);
        assert_eq!(spool.append(b"after the repair"), Ok(12));
        drain(&mut spool, &mut disk);
        let (again, replay) = recover(&disk, 6).unwrap();
        assert_eq!(seqs(&replay), (1..=12).collect::<Vec<_>>());
        assert_eq!(replay.last().unwrap().1, b"after the repair");
        assert_eq!(again.report.torn_tail, None);
    }
}

#[test]
fn a_truncated_segment_file_is_a_torn_tail_when_last_and_quarantined_when_not() {
    let (_spool, disk, _) = spool_with(30);
    let all = records(&disk);
    // The last segment cut inside its last record: a torn tail.
    let (last_segment, last) = *all.last().unwrap();
    let mut cut = disk.clone();
    cut.corrupt(
        last_segment,
        Corruption::Truncate {
            len: last.offset + last.len - 3,
        },
    );
    let (recovered, replay) = recover(&cut, 5).unwrap();
    assert_eq!(seqs(&replay), (1..=29).collect::<Vec<_>>());
    assert_eq!(recovered.report.torn_tail.map(|t| t.seq), Some(30));

    // An earlier segment cut inside one of its records: the records from there to the segment's
    // end are gone, the later segments are replayed, and the loss is counted.
    let (first_segment, r) = all
        .iter()
        .find(|(s, r)| *s == all[0].0 && r.seq > 1 && r.seq == 2)
        .copied()
        .unwrap();
    let lost_from = r.seq;
    let lost_to = all
        .iter()
        .filter(|(s, _)| *s == first_segment)
        .map(|(_, r)| r.seq)
        .max()
        .unwrap();
    let mut cut = disk.clone();
    cut.corrupt(first_segment, Corruption::Truncate { len: r.offset + 10 });
    let (recovered, replay) = recover(&cut, 5).unwrap();
    let expected: Vec<RecordSeq> = (1..=30)
        .filter(|s| !(lost_from..=lost_to).contains(s))
        .collect();
    assert_eq!(seqs(&replay), expected);
    let report = &recovered.report;
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert_eq!(
        (
            report.quarantined[0].first_missing,
            report.quarantined[0].missing
        ),
        (Some(lost_from), lost_to - lost_from + 1)
    );
    assert_eq!(recovered.spool.stats().missing, lost_to - lost_from + 1);
}

#[test]
fn a_segment_with_a_damaged_header_is_moved_aside_and_its_records_counted_missing() {
    let (_spool, disk, _) = spool_with(30);
    let all = records(&disk);
    let middle = all[all.len() / 2].0;
    let held: Vec<RecordSeq> = all
        .iter()
        .filter(|(s, _)| *s == middle)
        .map(|(_, r)| r.seq)
        .collect();
    let mut damaged = disk.clone();
    damaged.corrupt(middle, Corruption::FlipBit { offset: 20, bit: 1 });
    let (recovered, replay) = recover(&damaged, 5).unwrap();
    let expected: Vec<RecordSeq> = (1..=30).filter(|s| !held.contains(s)).collect();
    assert_eq!(seqs(&replay), expected);
    let report = &recovered.report;
    assert_eq!(report.damaged_segments.len(), 1);
    assert_eq!(report.damaged_segments[0].0, middle);
    assert_eq!(report.unexplained_missing, held.len() as u64);
    let mut spool = recovered.spool;
    drain(&mut spool, &mut damaged);
    assert_eq!(damaged.moved_aside().len(), 1);
    assert!(damaged.file(middle).is_none());
}

#[test]
fn a_spool_from_a_newer_format_is_refused_and_left_untouched() {
    let (_spool, mut disk, _) = spool_with(5);
    let segment = records(&disk)[0].0;
    let newer = FORMAT_VERSION + 1;
    disk.overwrite(segment, 8, &newer.to_le_bytes());
    let before = disk.segments();
    assert_eq!(
        recover(&disk, 5).err(),
        Some(RecoverError::NewerFormat {
            segment,
            found: newer,
            supported: FORMAT_VERSION
        })
    );
    assert_eq!(disk.segments(), before);
    let message = RecoverError::NewerFormat {
        segment,
        found: newer,
        supported: FORMAT_VERSION,
    }
    .to_string();
    assert!(message.contains("newer than this build reads"), "{message}");
}

#[test]
fn acknowledged_segments_are_reused_and_acknowledged_records_not_replayed() {
    let (mut spool, mut disk, _) = spool_with(30);
    let segments_before = disk.segments().len();
    for seq in 1..=20 {
        assert!(spool.ack(seq));
    }
    // One more record carries the watermark.
    assert_eq!(spool.append(b"carrier"), Ok(31));
    drain(&mut spool, &mut disk);
    assert!(
        disk.segments().len() <= segments_before,
        "freed segments are reused or deleted"
    );
    let (recovered, replay) = recover(&disk, 5).unwrap();
    assert_eq!(seqs(&replay), (21..=31).collect::<Vec<_>>());
    assert_eq!(recovered.report.acked_through, 20);
    assert_eq!(recovered.spool.stats().oldest, Some(21));
}

#[test]
fn a_full_disk_refuses_appends_that_need_a_new_segment_and_loses_nothing() {
    let (mut spool, mut disk, _) = spool_with(5);
    disk.set_capacity(Some(disk.used()));
    let mut refused = None;
    let mut accepted = 5;
    for i in 0..200u64 {
        match spool.append(&payload(100 + i)) {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        drain(&mut spool, &mut disk);
    }
    let Some(Refused::NotReady {
        last_error: Some(error),
    }) = refused
    else {
        panic!("expected a not-ready refusal with the disk error, got {refused:?}");
    };
    assert_eq!(error.kind, sink_core::spool::IoErrorKind::NoSpace);
    assert!(spool.broken().is_none());
    // Everything accepted is still there.
    let (_, replay) = recover(&disk, 5).unwrap();
    assert_eq!(seqs(&replay), (1..=accepted).collect::<Vec<_>>());
    // Room again: the next refused append retries, and the spool says Ready.
    disk.set_capacity(None);
    assert!(matches!(spool.append(b"x"), Err(Refused::NotReady { .. })));
    let events = drain(&mut spool, &mut disk);
    assert!(events.contains(&SpoolOutput::Ready), "{events:?}");
    assert!(spool.append(b"x").is_ok());
}
