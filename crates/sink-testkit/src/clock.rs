//! Virtual time for sans-IO tests: a shared fake clock that only moves when told to, and stamps log lines.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A clock that starts at one real [`Instant`] (its origin, the testkit's single clock read) and
/// advances only through [`advance`](FakeClock::advance) / [`advance_to`](FakeClock::advance_to).
///
/// Clones share the same time, so a harness and the code it drives see the same `now`.
#[derive(Clone)]
pub struct FakeClock {
    origin: Instant,
    elapsed: Arc<Mutex<Duration>>,
}

impl FakeClock {
    /// A clock whose origin is the current real instant; virtual time starts at zero elapsed.
    #[allow(clippy::disallowed_methods)] // the one permitted clock read: the origin of virtual time
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            elapsed: Arc::new(Mutex::new(Duration::ZERO)),
        }
    }

    /// The origin: virtual time zero.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// The current virtual instant.
    pub fn now(&self) -> Instant {
        self.origin + self.elapsed()
    }

    /// Virtual time passed since the origin.
    pub fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut elapsed = self.elapsed.lock().unwrap_or_else(PoisonError::into_inner);
        *elapsed += by;
    }

    /// Moves the clock to `to`; an instant in the past leaves it where it is (time never goes back).
    pub fn advance_to(&self, to: Instant) {
        let target = to.saturating_duration_since(self.origin);
        let mut elapsed = self.elapsed.lock().unwrap_or_else(PoisonError::into_inner);
        if target > *elapsed {
            *elapsed = target;
        }
    }

    /// `at` as an offset from the origin, formatted like `+1.250s` (millisecond precision).
    pub fn stamp_at(&self, at: Instant) -> String {
        format_offset(at.saturating_duration_since(self.origin))
    }

    /// The current virtual time formatted like `+1.250s`, to prefix log and trace lines.
    pub fn stamp(&self) -> String {
        format_offset(self.elapsed())
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FakeClock({})", self.stamp())
    }
}

fn format_offset(d: Duration) -> String {
    format!("+{}.{:03}s", d.as_secs(), d.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_time_and_time_never_goes_back() {
        let clock = FakeClock::new();
        let other = clock.clone();
        assert_eq!(clock.now(), clock.origin());
        clock.advance(Duration::from_millis(1250));
        assert_eq!(other.elapsed(), Duration::from_millis(1250));
        assert_eq!(other.stamp(), "+1.250s");
        other.advance_to(clock.origin() + Duration::from_millis(500));
        assert_eq!(clock.elapsed(), Duration::from_millis(1250));
        other.advance_to(clock.origin() + Duration::from_secs(61));
        assert_eq!(clock.stamp(), "+61.000s");
        assert_eq!(
            clock.stamp_at(clock.origin() + Duration::from_micros(1999)),
            "+0.001s"
        );
    }
}
