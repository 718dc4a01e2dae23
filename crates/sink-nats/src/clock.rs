//! The adapter's one clock: tokio's, so that a paused runtime (`tokio::time::pause`) moves it
//! together with every sleep the driver waits on, and driver tests run on virtual time.
//!
//! Every monotonic reading in this crate goes through [`now`]; std's `Instant::now` would keep
//! running while a test's virtual clock stands still, and a deadline read from one clock and
//! slept on with the other would never be due.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Monotonic now, from tokio's clock (virtual when the runtime's time is paused).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Wall time in milliseconds since the Unix epoch, only for what gets persisted (the outbox's
/// entry stamps).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Sleeps until `deadline` on the same clock as [`now`]; never returns for `None`.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Blocks the calling thread for `d`. Only for blocking code off the driver: opening a spool
/// waits out a directory lock that is about to be released.
pub(crate) fn pause_blocking(d: Duration) {
    std::thread::sleep(d);
}
