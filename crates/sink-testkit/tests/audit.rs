//! Stream audit: literal tables for the pure `compare`/`analyze`, then reading real streams back
//! from nats-server 2.9 and 2.15 and catching planted gaps, duplicates and reorderings.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use sink_testkit::audit::{
    analyze, compare, compare_with, read_stream, AuditError, CompareOptions, Expected,
    OrderViolation, StoredMessage,
};
use sink_testkit::{NatsServer, ServerOptions, ServerVersion};

fn msg(seq: u64, id: Option<&str>) -> StoredMessage {
    StoredMessage {
        stream_sequence: seq,
        subject: "ev.a".to_owned(),
        msg_id: id.map(str::to_owned),
        payload: Bytes::from(format!("payload {seq}")),
        headers: id
            .map(|id| vec![("Nats-Msg-Id".to_owned(), id.to_owned())])
            .unwrap_or_default(),
    }
}

fn exp(id: &str, key: &str, reported: Option<u64>) -> Expected {
    Expected {
        msg_id: id.to_owned(),
        key: key.to_owned(),
        reported_sequence: reported,
    }
}

/// Five events on keys k1/k2, all delivered at 1..=5 as reported.
fn five() -> (Vec<Expected>, Vec<StoredMessage>) {
    let keys = ["k1", "k2", "k1", "k2", "k1"];
    let expected = (1..=5)
        .map(|i| exp(&format!("m{i}"), keys[i - 1], Some(i as u64)))
        .collect();
    let stored = (1..=5)
        .map(|i| msg(i as u64, Some(&format!("m{i}"))))
        .collect();
    (expected, stored)
}

#[test]
fn compare_all_good_passes() {
    let (expected, stored) = five();
    let report = compare(&expected, &stored);
    assert!(report.passed(), "{report}");
    report.assert_passed();
    assert_eq!(report.expected, 5);
    assert_eq!(report.stored, 5);
    assert_eq!(report.delivered_reported, 5);
    assert!(report.to_string().starts_with("audit PASSED"));
}

#[test]
fn compare_finds_a_gap_reported_delivered_but_missing() {
    let (expected, mut stored) = five();
    stored.remove(2); // m3 never stored
    let report = compare(&expected, &stored);
    assert!(!report.passed());
    assert_eq!(report.missing, vec!["m3".to_owned()]);
    assert!(report.duplicates.is_empty());
    assert!(report.out_of_order.is_empty());
    assert!(report.sequence_mismatch.is_empty());
    let text = report.to_string();
    assert!(text.starts_with("audit FAILED"), "{text}");
    assert!(
        text.contains("I1 missing (reported delivered, not stored): 1\n    - m3"),
        "{text}"
    );
}

#[test]
fn compare_finds_a_duplicate() {
    let (expected, mut stored) = five();
    stored.push(msg(6, Some("m2")));
    let report = compare(&expected, &stored);
    assert!(!report.passed());
    assert_eq!(report.duplicates, vec![("m2".to_owned(), vec![2, 6])]);
    assert!(report.missing.is_empty());
    assert!(report.sequence_mismatch.is_empty());
    assert!(report.unexpected.is_empty());
}

#[test]
fn compare_finds_reordering_within_a_key_only() {
    // Sent m1..m5; stored m1 m4 m3 m2 m5 (k1: m1 m3 m5 keep order; k2: m4 stored before m2).
    let (expected, _) = five();
    let stored_ids = ["m1", "m4", "m3", "m2", "m5"];
    let stored: Vec<StoredMessage> = stored_ids
        .iter()
        .enumerate()
        .map(|(i, id)| msg(i as u64 + 1, Some(id)))
        .collect();
    let expected: Vec<Expected> = expected
        .into_iter()
        .map(|mut e| {
            e.reported_sequence = stored
                .iter()
                .find(|m| m.msg_id.as_deref() == Some(&e.msg_id))
                .map(|m| m.stream_sequence);
            e
        })
        .collect();
    let report = compare(&expected, &stored);
    assert_eq!(
        report.out_of_order,
        vec![OrderViolation {
            key: "k2".to_owned(),
            sent_first: "m2".to_owned(),
            sent_first_sequence: 4,
            sent_later: "m4".to_owned(),
            sent_later_sequence: 2,
        }]
    );
    assert!(report.sequence_mismatch.is_empty());
    assert!(!report.passed());
    assert!(report.to_string().contains(
        "I3 out of order (per key): 1\n    - key k2: m2 (sent first) stored at 4 after m4 (sent later) at 2"
    ));
}

#[test]
fn compare_finds_sequence_mismatch_and_false_failures() {
    let (mut expected, stored) = five();
    expected[1].reported_sequence = Some(9); // m2 said 9, stored at 2
    expected[3].reported_sequence = None; // m4 said failed, but stored
    expected.push(exp("m6", "k1", None)); // honest failure
    let report = compare(&expected, &stored);
    assert_eq!(report.sequence_mismatch, vec![("m2".to_owned(), 9, 2)]);
    assert_eq!(report.stored_but_reported_failed, vec!["m4".to_owned()]);
    assert_eq!(report.not_delivered, vec!["m6".to_owned()]);
    assert_eq!(report.delivered_reported, 4);
    assert!(!report.passed());
}

#[test]
fn honest_failures_alone_pass() {
    let (mut expected, stored) = five();
    expected.push(exp("m6", "k1", None));
    let report = compare(&expected, &stored);
    assert!(report.passed(), "{report}");
    assert_eq!(report.not_delivered, vec!["m6".to_owned()]);
}

#[test]
fn foreign_messages_fail_unless_tolerated() {
    let (expected, mut stored) = five();
    stored.push(msg(6, Some("other-producer-1")));
    stored.push(msg(7, None));
    let strict = compare(&expected, &stored);
    assert_eq!(strict.unexpected, vec![6, 7]);
    assert!(!strict.passed());
    let shared = compare_with(&expected, &stored, CompareOptions { foreign_ok: true });
    assert_eq!(shared.unexpected, vec![6, 7]);
    assert!(shared.passed(), "{shared}");
}

#[test]
fn display_shows_at_most_ten_per_list() {
    let expected: Vec<Expected> = (0..25)
        .map(|i| exp(&format!("id{i}"), "k", Some(i + 1)))
        .collect();
    let report = compare(&expected, &[]);
    assert_eq!(report.missing.len(), 25);
    let text = report.to_string();
    assert!(text.contains("    - id9\n"), "{text}");
    assert!(!text.contains("id10"), "{text}");
    assert!(text.contains("... and 15 more"), "{text}");
}

#[test]
fn analyze_reports_gaps_duplicates_and_keys() {
    let mut messages = vec![
        msg(1, Some("a")),
        msg(2, Some("b")),
        msg(5, Some("a")),
        msg(6, None),
        msg(8, Some("c")),
    ];
    messages[1].subject = "ev.b".to_owned();
    let summary = analyze(&messages, |m| m.subject.clone());
    assert_eq!(summary.count, 5);
    assert_eq!(summary.first_sequence, 1);
    assert_eq!(summary.last_sequence, 8);
    assert_eq!(summary.gaps, vec![(3, 4), (7, 7)]);
    assert_eq!(summary.duplicates, vec![("a".to_owned(), vec![1, 5])]);
    assert_eq!(summary.without_msg_id, 1);
    assert_eq!(summary.per_key.get("ev.a"), Some(&4));
    assert_eq!(summary.per_key.get("ev.b"), Some(&1));
    assert!(!summary.clean());
    let text = summary.to_string();
    assert!(
        text.contains("sequence gaps: 2\n    - 3..=4\n    - 7\n"),
        "{text}"
    );

    let empty = analyze(&[], |m| m.subject.clone());
    assert_eq!(empty.count, 0);
    assert!(empty.clean());
}

async fn publish(js: &jetstream::Context, subject: &str, msg_id: &str, body: &str) -> u64 {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    headers.insert("ce-source", "audit-test");
    js.publish_with_headers(subject.to_owned(), headers, Bytes::from(body.to_owned()))
        .await
        .expect("publish")
        .await
        .expect("publish ack")
        .sequence
}

async fn plants_are_detected_on_a_real_stream(version: ServerVersion) {
    let server = NatsServer::start(ServerOptions {
        version,
        ..Default::default()
    })
    .await
    .expect("start nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "AUDIT".to_owned(),
        subjects: vec!["audit.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream");

    let empty = read_stream(&js, "AUDIT", Duration::from_secs(5))
        .await
        .expect("read empty stream");
    assert!(empty.is_empty());

    // The sink's view: e1..e20 on keys a/b, all reported delivered at 1..=20.
    let n = 20u64;
    let expected: Vec<Expected> = (1..=n)
        .map(|i| {
            exp(
                &format!("e{i}"),
                if i % 2 == 0 { "a" } else { "b" },
                Some(i),
            )
        })
        .collect();
    // What actually reaches the stream: e5 omitted (gap), e8 and e6 swapped (both key a), and e12
    // stored again under a different broker-level id that the producer maps back to e12
    // (a duplicate the server's dedup cannot catch).
    let mut plan: Vec<String> = (1..=n).map(|i| format!("e{i}")).collect();
    plan.retain(|id| id != "e5");
    let i6 = plan.iter().position(|id| id == "e6").unwrap();
    let i8 = plan.iter().position(|id| id == "e8").unwrap();
    plan.swap(i6, i8);
    for id in &plan {
        let subject = format!(
            "audit.{}",
            &expected.iter().find(|e| &e.msg_id == id).unwrap().key
        );
        publish(&js, &subject, id, &format!("body of {id}")).await;
    }
    let dup_seq = publish(&js, "audit.a", "e12#again", "body of e12").await;
    // Server-side dedup: the same id again is not stored twice.
    publish(&js, "audit.b", "e1", "body of e1").await;

    let mut read = read_stream(&js, "AUDIT", Duration::from_secs(10))
        .await
        .expect("read stream");
    assert_eq!(read.len(), plan.len() + 1);
    assert_eq!(
        read.iter().map(|m| m.stream_sequence).collect::<Vec<_>>(),
        (1..=read.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(read[0].msg_id.as_deref(), Some("e1"));
    assert_eq!(read[0].subject, "audit.b");
    assert_eq!(read[0].payload, Bytes::from("body of e1"));
    assert_eq!(read[0].header("ce-source"), Some("audit-test"));
    // The producer's mapping of broker ids back to event ids.
    for m in &mut read {
        if let Some(id) = m.msg_id.as_mut() {
            if let Some(base) = id.strip_suffix("#again") {
                *id = base.to_owned();
            }
        }
    }

    let report = compare(&expected, &read);
    assert!(!report.passed());
    assert_eq!(report.missing, vec!["e5".to_owned()]);
    assert_eq!(
        report.duplicates,
        vec![("e12".to_owned(), vec![11, dup_seq])]
    );
    assert_eq!(
        report.out_of_order,
        vec![OrderViolation {
            key: "a".to_owned(),
            sent_first: "e6".to_owned(),
            sent_first_sequence: 7,
            sent_later: "e8".to_owned(),
            sent_later_sequence: 5,
        }]
    );
    // Everything after the gap sits one sequence lower than the sink claimed, and the swap
    // moves e6/e8: each is a reported-vs-stored mismatch.
    let mismatched: Vec<&str> = report
        .sequence_mismatch
        .iter()
        .map(|(id, _, _)| id.as_str())
        .collect();
    let want: Vec<String> = (6..=n).map(|i| format!("e{i}")).collect();
    assert_eq!(
        mismatched,
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(report.unexpected.is_empty());
    assert!(report.stored_but_reported_failed.is_empty());

    // Reporting the truth (stored sequences, e5 failed) passes apart from the planted I2/I3.
    let truthful: Vec<Expected> = expected
        .iter()
        .map(|e| {
            let seq = read
                .iter()
                .find(|m| m.msg_id.as_deref() == Some(&e.msg_id))
                .map(|m| m.stream_sequence);
            exp(&e.msg_id, &e.key, seq)
        })
        .collect();
    let report = compare(&truthful, &read);
    assert!(report.missing.is_empty());
    assert!(report.sequence_mismatch.is_empty());
    assert_eq!(report.not_delivered, vec!["e5".to_owned()]);
    assert_eq!(report.duplicates.len(), 1);
    assert_eq!(report.out_of_order.len(), 1);

    let summary = analyze(&read, |m| m.subject.clone());
    assert_eq!(summary.count, read.len());
    assert!(summary.gaps.is_empty());
    assert_eq!(
        summary.duplicates,
        vec![("e12".to_owned(), vec![11, dup_seq])]
    );

    // A deleted message shows up as a sequence gap; reading stops at the last sequence.
    let stream = js.get_stream("AUDIT").await.expect("get stream");
    stream.delete_message(3).await.expect("delete message 3");
    let after = read_stream(&js, "AUDIT", Duration::from_secs(10))
        .await
        .expect("read after delete");
    assert_eq!(after.len(), read.len() - 1);
    assert_eq!(analyze(&after, |m| m.subject.clone()).gaps, vec![(3, 3)]);

    let missing = read_stream(&js, "NO_SUCH_STREAM", Duration::from_secs(5)).await;
    assert!(
        matches!(missing, Err(AuditError::StreamLookup { ref stream, .. }) if stream == "NO_SUCH_STREAM"),
        "{missing:?}"
    );
}

#[tokio::test]
async fn plants_are_detected_on_a_real_stream_v2_9() {
    plants_are_detected_on_a_real_stream(ServerVersion::V2_9).await;
}

#[tokio::test]
async fn plants_are_detected_on_a_real_stream_v2_15() {
    plants_are_detected_on_a_real_stream(ServerVersion::V2_15).await;
}

async fn reads_a_larger_stream_in_order(version: ServerVersion) {
    let server = NatsServer::start(ServerOptions {
        version,
        ..Default::default()
    })
    .await
    .expect("start nats-server");
    let js = jetstream::new(server.connect().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "BIG".to_owned(),
        subjects: vec!["big.*".to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    let n = 3000u64;
    let mut acks = Vec::new();
    for i in 1..=n {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("id-{i}").as_str());
        acks.push(
            js.publish_with_headers(
                format!("big.k{}", i % 7),
                headers,
                Bytes::from(vec![0u8; 200]),
            )
            .await
            .expect("publish"),
        );
    }
    let mut expected = Vec::new();
    for (i, ack) in acks.into_iter().enumerate() {
        let seq = ack.await.expect("ack").sequence;
        let i = i as u64 + 1;
        expected.push(exp(
            &format!("id-{i}"),
            &format!("big.k{}", i % 7),
            Some(seq),
        ));
    }
    let read = read_stream(&js, "BIG", Duration::from_secs(20))
        .await
        .expect("read stream");
    assert_eq!(read.len() as u64, n);
    compare(&expected, &read).assert_passed();
    assert!(analyze(&read, |m| m.subject.clone()).clean());
}

#[tokio::test]
async fn reads_a_larger_stream_in_order_v2_9() {
    reads_a_larger_stream_in_order(ServerVersion::V2_9).await;
}

#[tokio::test]
async fn reads_a_larger_stream_in_order_v2_15() {
    reads_a_larger_stream_in_order(ServerVersion::V2_15).await;
}
