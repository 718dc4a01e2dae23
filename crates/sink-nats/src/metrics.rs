//! Metrics through the `metrics` facade: whatever recorder the service installs receives them.
//!
//! Names: `jetsink_published_total{retry}`, `jetsink_acked_total`, `jetsink_duplicates_total`,
//! `jetsink_retries_total`, `jetsink_retries_beyond_dedup_window_total`, `jetsink_rejected_total`,
//! `jetsink_queue_depth`, `jetsink_in_flight`, `jetsink_breaker_state` (0 closed, 1 open, 2 half-open),
//! `jetsink_stream_violations{stream}` (what the last re-verification of the running stream found
//! wrong; 0 when it meets every requirement).

use sink_core::breaker::BreakerEvent;

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
