//! Behaviour of the 3-node cluster harness on both releases: an R3 stream survives the loss of its
//! leader, a new leader is elected, publishing works again, and the killed node rejoins.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use sink_testkit::{Cluster, HarnessError, ServerVersion};

/// Publishes `payload` and waits for the ack, retrying transient failures (leader election, lost
/// connection) for up to 20 s. Returns the stream sequence.
async fn publish_acked(js: &jetstream::Context, subject: &str, payload: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut headers = async_nats::HeaderMap::new();
    // A stable message id makes a retry after an ambiguous failure idempotent.
    headers.insert("Nats-Msg-Id", format!("{subject}-{payload}").as_str());
    loop {
        let attempt = async {
            js.publish_with_headers(
                subject.to_owned(),
                headers.clone(),
                payload.to_owned().into(),
            )
            .await?
            .await
            .map_err(|e| e.into())
        };
        let result: Result<_, Box<dyn std::error::Error + Send + Sync>> = attempt.await;
        match result {
            Ok(ack) => return ack.sequence,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying publish of {payload}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("publish {payload} never acked: {e}"),
        }
    }
}

async fn leader_failover(version: ServerVersion) {
    let started = Instant::now();
    let mut cluster = Cluster::start(version).await.expect("start cluster");
    assert_eq!(cluster.urls().len(), 3);
    for i in 0..3 {
        assert_ne!(cluster.node(i).port(), 4222);
        assert!(cluster.node(i).pid().is_some());
    }
    eprintln!("{version}: cluster up after {:?}", started.elapsed());

    let client = cluster.connect().await.expect("connect");
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js.create_stream(stream::Config {
        name: "R3".to_owned(),
        subjects: vec!["r3.>".to_owned()],
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create R3 stream");
    for i in 0..10 {
        publish_acked(&js, "r3.events", &format!("before-{i}")).await;
    }

    let old = cluster.stream_leader("R3").await.expect("leader");
    assert!(old < 3);
    cluster.kill_node(old).await.expect("kill leader");
    assert_eq!(cluster.node(old).pid(), None);

    let new = cluster
        .wait_stream_leader("R3", Some(old), Duration::from_secs(20))
        .await
        .expect("a new leader is elected");
    assert_ne!(new, old);
    eprintln!(
        "{version}: leader n{} -> n{} after {:?}",
        old + 1,
        new + 1,
        started.elapsed()
    );
    for i in 0..10 {
        publish_acked(&js, "r3.events", &format!("after-{i}")).await;
    }
    let mut r3 = js.get_stream("R3").await.expect("stream");
    assert_eq!(r3.info().await.expect("info").state.messages, 20);

    cluster.restart_node(old).await.expect("restart old leader");
    assert!(cluster.node(old).pid().is_some());
    // The rejoined node catches up: all three replicas report current.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = r3.info().await.expect("info").clone();
        let replicas = info.cluster.expect("clustered").replicas;
        if replicas.len() == 2 && replicas.iter().all(|r| r.current) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{version}: replicas never caught up: {replicas:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{version}: done after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_elects_a_new_leader_after_kill_on_2_9() {
    leader_failover(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_elects_a_new_leader_after_kill_on_2_15() {
    leader_failover(ServerVersion::V2_15).await;
}

#[tokio::test]
async fn node_index_out_of_range_is_an_error() {
    let mut cluster = Cluster::start(ServerVersion::V2_15)
        .await
        .expect("start cluster");
    match cluster.kill_node(3).await {
        Err(HarnessError::NoSuchNode { index: 3, len: 3 }) => {}
        other => panic!("expected NoSuchNode, got {other:?}"),
    }
    match cluster.stream_leader("NO_SUCH_STREAM").await {
        Err(HarnessError::JetStream { .. }) => {}
        other => panic!("expected a JetStream error, got {other:?}"),
    }
}
