//! Stream audit through the test kit's paths: reading real streams back from nats-server 2.9 and
//! 2.15 and catching planted gaps, duplicates and reorderings. The pure `compare`/`analyze` tables
//! live next to the code in `sink_core::audit`.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use sink_testkit::audit::{analyze, compare, read_stream, AuditError, Expected, OrderViolation};
use sink_testkit::{NatsServer, ServerOptions, ServerVersion};

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
        .map(|i| Expected::new(format!("e{i}"), if i % 2 == 0 { "a" } else { "b" }, Some(i)))
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
            Expected::new(&e.msg_id, &e.key, seq)
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
        expected.push(Expected::new(
            format!("id-{i}"),
            format!("big.k{}", i % 7),
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
