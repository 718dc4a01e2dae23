//! Metrics through the `metrics` facade: whatever recorder the service installs receives them.
//!
//! Names: `jetsink_published_total{retry}`, `jetsink_acked_total`, `jetsink_duplicates_total`,
//! `jetsink_retries_total`, `jetsink_retries_beyond_dedup_window_total`, `jetsink_rejected_total`,
//! `jetsink_queue_depth`, `jetsink_in_flight`, `jetsink_breaker_state` (0 closed, 1 open, 2 half-open),
//! `jetsink_stream_violations{stream}` (what the last re-verification of the running stream found
//! wrong; 0 when it meets every requirement), `jetsink_fast_batch` (1 while fast-batch lanes deliver,
//! 0 with per-event acks), `jetsink_spool_unreadable_total` (spooled events this build could not
//! read back, reported and dropped), `jetsink_batches_total{end}` (fast batches by how they ended:
//! `committed`, `gap`, `refused`, `unknown_batch`, `no_answer`, `connection_lost`).

use sink_core::breaker::BreakerEvent;
use sink_core::lane::BatchEnd;

use crate::handle::Mechanism;

pub(crate) fn published(retry: bool) {
    metrics::counter!("jetsink_published_total", "retry" => if retry { "true" } else { "false" })
        .increment(1);
}

pub(crate) fn acked(duplicate: bool) {
    metrics::counter!("jetsink_acked_total").increment(1);
    if duplicate {
        metrics::counter!("jetsink_duplicates_total").increment(1);
    }
}

pub(crate) fn retry() {
    metrics::counter!("jetsink_retries_total").increment(1);
}

pub(crate) fn retry_beyond_window() {
    metrics::counter!("jetsink_retries_beyond_dedup_window_total").increment(1);
}

pub(crate) fn rejected() {
    metrics::counter!("jetsink_rejected_total").increment(1);
}

pub(crate) fn breaker(event: &BreakerEvent) {
    let v = match event {
        BreakerEvent::Closed => 0.0,
        BreakerEvent::Opened { .. } => 1.0,
        BreakerEvent::HalfOpened => 2.0,
    };
    metrics::gauge!("jetsink_breaker_state").set(v);
}

pub(crate) fn gauges(queued: usize, in_flight: usize, window: usize) {
    metrics::gauge!("jetsink_queue_depth").set(queued as f64);
    metrics::gauge!("jetsink_in_flight").set(in_flight as f64);
    metrics::gauge!("jetsink_window").set(window as f64);
}

pub(crate) fn stream_violations(stream: &str, count: usize) {
    metrics::gauge!("jetsink_stream_violations", "stream" => stream.to_owned()).set(count as f64);
}

pub(crate) fn mechanism(mechanism: Mechanism) {
    let lanes = if mechanism == Mechanism::FastBatch {
        1.0
    } else {
        0.0
    };
    metrics::gauge!("jetsink_fast_batch").set(lanes);
}

pub(crate) fn batch_ended(end: &BatchEnd) {
    let end = match end {
        BatchEnd::Committed => "committed",
        BatchEnd::Gap => "gap",
        BatchEnd::Refused(_) => "refused",
        BatchEnd::UnknownBatch => "unknown_batch",
        BatchEnd::NoAnswer => "no_answer",
        BatchEnd::ConnectionLost => "connection_lost",
    };
    metrics::counter!("jetsink_batches_total", "end" => end).increment(1);
}

pub(crate) fn spool_unreadable() {
    metrics::counter!("jetsink_spool_unreadable_total").increment(1);
}
