//! The driver on virtual time: the real sink runs against the test kit's scripted broker on
//! tokio's paused clock, so schedules of seconds to hours are checked exactly, in milliseconds.

mod common;

use std::time::Duration;

use common::scripted::{scripted, Line, Sent};
use common::{event, STREAM, TEMPLATE};
use sink_nats::{BreakerStatus, EmitError, JetStreamSink, StreamPolicy};
use sink_testkit::{BrokerConfig, Fault, FaultScript, ScriptedBroker};
use tokio::time::Instant;

const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// A sink on a scripted broker with `script`, connected; the broker answers in 1 ms.
fn sink_on(script: FaultScript) -> (JetStreamSink, Line) {
    let broker = ScriptedBroker::new(
        BrokerConfig {
            stream: STREAM.into(),
            ..BrokerConfig::default()
        },
        script,
    );
    let (transport, line, events) = scripted(broker);
    let sink = JetStreamSink::builder("nats://scripted:4222")
        .subject_template(TEMPLATE)
        .stream(STREAM)
        .stream_policy(StreamPolicy::Off)
        .ack_timeout(ACK_TIMEOUT)
        .start_on(transport, events)
        .expect("valid config");
    (sink, line)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// When each publish left, in virtual milliseconds since the sink started.
fn times(sent: &[Sent]) -> Vec<u128> {
    sent.iter().map(|s| s.at.as_millis()).collect()
}

/// Fails a test that took a real second: virtual time must do the waiting.
struct WallClock(std::time::Instant);

impl WallClock {
    fn start() -> Self {
        Self(std::time::Instant::now())
    }
}

impl Drop for WallClock {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let took = self.0.elapsed();
            assert!(took < Duration::from_secs(1), "took {took:?} of wall time");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_publish_is_re_sent_after_the_ack_timeout_then_100_ms_then_400_ms() {
    let _wall = WallClock::start();
    let script = FaultScript::none()
        .at(0, Fault::DropRequest)
        .at(1, Fault::DropRequest);
    let (sink, line) = sink_on(script);
    let receipt = sink.emit(&event("retry", 0, 1)).await.expect("delivered");
    assert_eq!((receipt.sequence, receipt.duplicate), (Some(1), false));
    // Ack timeout, then the retry schedule's 100 ms; ack timeout, then its 400 ms.
    assert_eq!(times(&line.sent()), [0, 2_100, 4_500]);
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_when_retries_run_out_probes_on_its_backoff_and_closes_on_an_ack() {
    let _wall = WallClock::start();
    let script = (0..4).fold(FaultScript::none(), |s, i| s.at(i, Fault::DropRequest));
    let (sink, line) = sink_on(script);
    let start = Instant::now();
    let pending = sink.send(event("breaker", 0, 1)).await.expect("accepted");
    tokio::time::sleep_until(start + ms(6_550)).await;
    assert_eq!(sink.health().breaker, BreakerStatus::Open);
    let receipt = pending.await.expect("delivered");
    assert_eq!(receipt.sequence, Some(1));
    assert_eq!(sink.health().breaker, BreakerStatus::Closed);
    // Three transmissions time out (the retry schedule), the breaker opens: a probe after
    // 100 ms times out too, the next one after 200 ms is acked.
    assert_eq!(times(&line.sent()), [0, 2_100, 4_500, 6_600, 8_800]);
}

#[tokio::test(start_paused = true)]
async fn close_gives_up_at_its_deadline_and_names_every_event_not_delivered() {
    let _wall = WallClock::start();
    let (sink, line) = sink_on(FaultScript::none());
    line.disconnect();
    let mut pending = Vec::new();
    for i in 0..3 {
        pending.push(sink.send(event("close", i, 1)).await.expect("accepted"));
    }
    let start = Instant::now();
    let report = sink.close(Duration::from_secs(5)).await;
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(report.delivered, 0);
    assert_eq!(report.not_delivered.len(), 3);
    for (i, p) in pending.into_iter().enumerate() {
        assert!(
            matches!(p.await, Err(EmitError::NotDelivered { .. })),
            "event {i}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_hour_long_outage_delivers_everything_in_order_once_the_server_is_back() {
    let _wall = WallClock::start();
    let (sink, line) = sink_on(FaultScript::none());
    line.disconnect();
    let mut pending = Vec::new();
    for i in 0..100 {
        pending.push(sink.send(event("outage", i, 4)).await.expect("accepted"));
    }
    tokio::time::sleep(Duration::from_secs(3_600)).await;
    let during_outage = times(&line.sent());
    line.reconnect();
    for (i, p) in pending.into_iter().enumerate() {
        let receipt = p.await.expect("delivered after the outage");
        assert_eq!(receipt.sequence, Some(i as u64 + 1));
    }
    // Probes while the server is away follow the breaker's backoff, doubling from 100 ms up to
    // its 180 s cap (plus the probe's 2 s ack timeout): a few dozen in an hour, not one per ack
    // timeout.
    let gaps: Vec<u128> = during_outage.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.iter().max(), Some(&182_000), "{during_outage:?}");
    assert_eq!(during_outage.len(), 32, "{during_outage:?}");
    assert_eq!(line.broker(|b| b.stored().len()), 100);
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_ends_the_breakers_wait_at_once() {
    let _wall = WallClock::start();
    let (sink, line) = sink_on(FaultScript::none());
    line.disconnect();
    let pending = sink.send(event("reconnect", 0, 1)).await.expect("accepted");
    // Long enough for the breaker's wait to reach its cap (180 s between probes).
    tokio::time::sleep(Duration::from_secs(1_200)).await;
    assert_eq!(sink.health().breaker, BreakerStatus::Open);
    let back = Instant::now();
    line.reconnect();
    pending.await.expect("delivered");
    // The probe goes at once and the broker answers in 1 ms.
    assert!(
        back.elapsed() <= ms(5),
        "delivered {:?} after the reconnect",
        back.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_re_emitted_event_gets_a_duplicate_receipt_naming_the_first_sequence() {
    let _wall = WallClock::start();
    let (sink, line) = sink_on(FaultScript::none());
    let e = event("reemit", 0, 1);
    let first = sink.emit(&e).await.expect("stored");
    let other = sink.emit(&event("reemit", 1, 1)).await.expect("stored");
    let again = sink.emit(&e).await.expect("acknowledged");
    assert_eq!((first.sequence, first.duplicate), (Some(1), false));
    assert_eq!(other.sequence, Some(2));
    assert_eq!((again.sequence, again.duplicate), (Some(1), true));
    assert_eq!(again.msg_id, first.msg_id);
    assert_eq!(line.broker(|b| b.stored().len()), 2);
}

#[tokio::test(start_paused = true)]
async fn a_connection_lost_mid_window_re_sends_what_was_in_flight_and_stores_each_event_once() {
    let _wall = WallClock::start();
    let (sink, line) = sink_on(FaultScript::none().at(20, Fault::ConnectionLoss));
    let mut pending = Vec::new();
    for i in 0..50 {
        pending.push(sink.send(event("cut", i, 1)).await.expect("accepted"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sink.health().queued > 0, "{:?}", sink.health());
    line.reconnect();
    for (i, p) in pending.into_iter().enumerate() {
        let receipt = p.await.expect("delivered after the reconnect");
        assert_eq!(receipt.sequence, Some(i as u64 + 1), "event {i}");
    }
    let stored = line.broker(|b| b.stored().len());
    assert_eq!(stored, 50, "each event stored once");
    assert!(line.sent().len() > 50, "what was in flight was re-sent");
}
