//! Re-verifies the sink's stream while it runs (an operator may edit it): on every reconnect and every re-verify interval.
//!
//! A task of its own, so that the driver's hot path never waits on an info request: it reads the
//! stream's facts, runs sink-core's `verify`, and hands the driver a [`StreamCheck`]. What to do
//! about it (report, hold events) is the driver's decision. Whether the stream allows fast batches
//! (`allow_batched`) is not a violation; the watcher publishes it beside the checks, in the
//! provisioner's `allow_batched` cell.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sink_core::stream::{verify, StreamRequirements, Violation};
use tokio::sync::{mpsc, watch, Notify};

use crate::clock;
use crate::facts::{read_stream_facts, StreamInfoError};

/// How soon the stream is read again while a violation blocks delivery, whatever the interval:
/// held events go out within this long of the fix.
pub(crate) const HELD_RECHECK: Duration = Duration::from_secs(1);

/// What one re-verification found.
#[derive(Debug)]
pub(crate) enum StreamCheck {
    /// The stream exists; every violation it has now (empty when it is fit).
    Verified(Vec<Violation>),
    /// The stream does not exist.
    Missing,
    /// The stream could not be read (timeout, connection lost): nothing is known.
    Unreadable(StreamInfoError),
}

/// Reads and verifies `stream` whenever `recheck` is notified, every `interval` (never when it is
/// zero or too large for the clock), and every [`HELD_RECHECK`] while a violation blocks
/// delivery. Each read that finds the stream stores its `allow_batched` in `allow_batched` before
/// the [`StreamCheck::Verified`] goes out. Ends when the driver drops its receiver.
pub(crate) async fn watch_stream(
    client: async_nats::Client,
    stream: String,
    req: StreamRequirements,
    interval: Duration,
    recheck: Arc<Notify>,
    checks: mpsc::Sender<StreamCheck>,
    allow_batched: watch::Sender<Option<bool>>,
) {
    let js = jetstream::new(client);
    let mut wait = periodic(interval);
    loop {
        tokio::select! {
            () = checks.closed() => return,
            () = recheck.notified() => {}
            () = sleep_for(wait) => {}
        }
        let check = match read_stream_facts(&js, &stream).await {
            Ok(Some(facts)) => {
                allow_batched.send_replace(Some(facts.allow_batched));
                StreamCheck::Verified(verify(&facts, &req))
            }
            Ok(None) => StreamCheck::Missing,
            Err(e) => StreamCheck::Unreadable(e),
        };
        let held =
            matches!(&check, StreamCheck::Verified(v) if v.iter().any(Violation::blocks_delivery));
        wait = if held {
            Some(periodic(interval).map_or(HELD_RECHECK, |w| w.min(HELD_RECHECK)))
        } else {
            periodic(interval)
        };
        if checks.send(check).await.is_err() {
            return;
        }
    }
}

/// The periodic wait, or `None` for never: zero turns it off, and so does a duration no clock
/// deadline can hold (`Duration::MAX`).
fn periodic(interval: Duration) -> Option<Duration> {
    (!interval.is_zero() && clock::now().checked_add(interval).is_some()).then_some(interval)
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_waits_saturate_instead_of_panicking() {
        assert_eq!(periodic(Duration::ZERO), None);
        assert_eq!(periodic(Duration::MAX), None);
        assert_eq!(
            periodic(Duration::from_secs(60)),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            periodic(Duration::from_millis(1)),
            Some(Duration::from_millis(1))
        );
    }
}
