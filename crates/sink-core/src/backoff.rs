//! Pure backoff schedules: exponential reconnect backoff with seeded jitter, and the per-publish retry schedule.
//!
//! Nothing here reads a clock or a global random number generator. A [`Backoff`] maps an attempt
//! number to a delay; jitter is a deterministic function of the configured `seed` and the attempt,
//! so a schedule can be replayed exactly in tests. The caller owns the attempt counter (and resets
//! it on the first success).

use std::time::{Duration, Instant};

use thiserror::Error;

/// How far ahead a deadline goes when `now + delay` does not fit in an [`Instant`]: far enough to
/// mean "never" for any process, small enough to add to any real clock reading.
pub const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + delay`, saturating: a delay too large for the clock (`Duration::MAX` as "never") gives a
/// deadline [`FAR_FUTURE`] ahead instead of panicking.
pub fn deadline_after(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// How a [`Backoff`] spreads its delays around the exponential curve.
///
/// Let `d` be the un-jittered delay for an attempt ([`Backoff::nominal_delay`]). The jittered delay
/// never exceeds `d`, so jitter can only shorten a wait, never stretch it past the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Jitter {
    /// No jitter: the delay is exactly `d`.
    #[default]
    None,
    /// Full jitter: the delay lies in `[0, d]`.
    Full,
    /// Proportional jitter: the delay lies in `[d * (100 - percent) / 100, d]` (integer nanoseconds,
    /// rounded down). `percent` must be at most 100 ([`Backoff::validate`] rejects more; `delay`
    /// treats a larger value as 100 so it stays within `[0, d]`).
    Proportional {
        /// How far below `d` the delay may fall, in percent of `d` (0..=100).
        percent: u8,
    },
}

/// Exponential backoff: `min(cap, base * factor^attempt)`, optionally jittered.
///
/// The default ([`Backoff::reconnect_default`]) is the reconnect schedule of the system jetsink
/// replaces: 100 ms doubling per attempt, capped at 180 s, no jitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    /// Delay for attempt 0. Must be positive.
    pub base: Duration,
    /// Multiplier per attempt. Must be at least 1 (1 gives a constant delay).
    pub factor: u32,
    /// Upper bound of every delay. Must be at least `base`.
    pub cap: Duration,
    /// How delays are spread below the exponential curve.
    pub jitter: Jitter,
    /// Seed of the deterministic jitter; irrelevant with [`Jitter::None`].
    pub seed: u64,
}

impl Backoff {
    /// The default reconnect schedule: 100 ms * 2^attempt capped at 180 s, no jitter, seed 0.
    pub fn reconnect_default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            factor: 2,
            cap: Duration::from_secs(180),
            jitter: Jitter::None,
            seed: 0,
        }
    }

    /// Checks the configuration: `base > 0`, `factor >= 1`, `cap >= base`, jitter percent <= 100.
    ///
    /// `delay` is total even for an invalid configuration (it never panics), but its result is then
    /// not meaningful; call this when accepting user configuration.
    pub fn validate(&self) -> Result<(), BackoffError> {
        if self.base.is_zero() {
            return Err(BackoffError::ZeroBase);
        }
        if self.factor == 0 {
            return Err(BackoffError::ZeroFactor);
        }
        if self.cap < self.base {
            return Err(BackoffError::CapBelowBase {
                base: self.base,
                cap: self.cap,
            });
        }
        if let Jitter::Proportional { percent } = self.jitter {
            if percent > 100 {
                return Err(BackoffError::JitterPercentAbove100 { percent });
            }
        }
        Ok(())
    }

    /// The un-jittered delay before attempt `attempt` (0-based): `min(cap, base * factor^attempt)`.
    ///
    /// Saturating: never overflows, also for `attempt == u32::MAX`. This is the upper bound of
    /// [`Backoff::delay`].
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let base = self.base.as_nanos();
        let cap = self.cap.as_nanos();
        let nanos = u128::from(self.factor)
            .checked_pow(attempt)
            .and_then(|growth| base.checked_mul(growth))
            .map_or(cap, |n| n.min(cap));
        duration_from_nanos(nanos)
    }

    /// The delay before attempt `attempt` (0-based; attempt 0 gives `base` without jitter).
    ///
    /// Within the bounds documented on [`Jitter`]; a pure function of `self` and `attempt`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sink_core::backoff::{Backoff, Jitter};
    ///
    /// let b = Backoff::reconnect_default();
    /// assert_eq!(b.delay(0), Duration::from_millis(100));
    /// assert_eq!(b.delay(3), Duration::from_millis(800));
    /// assert_eq!(b.delay(u32::MAX), Duration::from_secs(180));
    ///
    /// let jittered = Backoff { jitter: Jitter::Proportional { percent: 20 }, seed: 7, ..b };
    /// let d = jittered.delay(3);
    /// assert!(d >= Duration::from_millis(640) && d <= Duration::from_millis(800));
    /// assert_eq!(d, jittered.delay(3)); // same seed and attempt, same delay
    /// ```
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self.nominal_delay(attempt).as_nanos();
        let percent = match self.jitter {
            Jitter::None => return duration_from_nanos(nominal),
            Jitter::Full => 100,
            Jitter::Proportional { percent } => u128::from(percent.min(100)),
        };
        let low = nominal * (100 - percent) / 100;
        let span = nominal - low;
        let offset = scale(span, mix(self.seed, attempt));
        duration_from_nanos(low + offset)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::reconnect_default()
    }
}

/// Fixed per-publish retry delays: retry `i` waits `delays[i]`; after the last one the publish has
/// used its retries.
///
/// The default is the seed's per-publish retry: 100 ms, then 400 ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    /// A schedule with the given delays, in order. An empty schedule means "no retries".
    ///
    /// Rejects a zero delay (it would retry in a hot loop against a struggling broker) and a
    /// schedule whose total does not fit in a `Duration`.
    pub fn new(delays: Vec<Duration>) -> Result<Self, BackoffError> {
        if let Some(index) = delays.iter().position(Duration::is_zero) {
            return Err(BackoffError::ZeroRetryDelay { index });
        }
        if u32::try_from(delays.len()).is_err() {
            return Err(BackoffError::TooManyRetries { len: delays.len() });
        }
        delays
            .iter()
            .try_fold(Duration::ZERO, |sum, d| sum.checked_add(*d))
            .ok_or(BackoffError::RetrySpanOverflow)?;
        Ok(RetrySchedule { delays })
    }

    /// The delay before retry `retry` (0-based: retry 0 is the first resend), or `None` when the
    /// schedule is exhausted.
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        usize::try_from(retry)
            .ok()
            .and_then(|i| self.delays.get(i))
            .copied()
    }

    /// Number of retries in the schedule.
    pub fn len(&self) -> usize {
        self.delays.len()
    }

    /// True when the schedule allows no retry at all.
    pub fn is_empty(&self) -> bool {
        self.delays.is_empty()
    }

    /// The sum of all delays: the span over which one publish may be resent. The stream's
    /// duplicate window must cover it so that every resend is deduplicated.
    pub fn total(&self) -> Duration {
        self.delays
            .iter()
            .fold(Duration::ZERO, |sum, d| sum.saturating_add(*d))
    }

    /// The delays, in order.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule {
            delays: vec![Duration::from_millis(100), Duration::from_millis(400)],
        }
    }
}

/// Invalid backoff or retry configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BackoffError {
    /// `Backoff::base` is zero.
    #[error("backoff base is 0s; set base to a positive duration (e.g. 100ms)")]
    ZeroBase,
    /// `Backoff::factor` is zero.
    #[error("backoff factor is 0; set factor to 1 (constant delay) or more (e.g. 2)")]
    ZeroFactor,
    /// `Backoff::cap` is below `Backoff::base`.
    #[error(
        "backoff cap is {} but base is {}; set cap to at least base",
        fmt_duration(*cap),
        fmt_duration(*base)
    )]
    CapBelowBase {
        /// The configured base.
        base: Duration,
        /// The configured cap.
        cap: Duration,
    },
    /// `Jitter::Proportional::percent` is above 100.
    #[error("backoff jitter percent is {percent}; set percent to a value in 0..=100")]
    JitterPercentAbove100 {
        /// The configured percent.
        percent: u8,
    },
    /// A retry delay is zero.
    #[error("retry delay #{index} is 0s; set every retry delay to a positive duration")]
    ZeroRetryDelay {
        /// Position of the zero delay in the schedule.
        index: usize,
    },
    /// The retry schedule has more entries than a `u32` retry counter can address.
    #[error("retry schedule has {len} delays; use at most 4294967295")]
    TooManyRetries {
        /// Number of delays given.
        len: usize,
    },
    /// The sum of the retry delays overflows a `Duration`.
    #[error("retry delays sum beyond the largest duration; shorten the retry delays")]
    RetrySpanOverflow,
}

/// splitmix64 over (seed, attempt): a pure mixing function, so the jitter of attempt `n` is the same
/// every time it is asked for and independent of any other attempt.
fn mix(seed: u64, attempt: u32) -> u64 {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut z = seed.wrapping_add(GAMMA.wrapping_mul(u64::from(attempt).wrapping_add(1)));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `floor(span * r / 2^64)`: maps 64 random bits onto `[0, span)` (or 0 when `span` is 0).
///
/// `span` is at most a `Duration`'s nanosecond count (< 2^94), so `span * r` may not fit in u128;
/// splitting `span` at 2^64 keeps both partial products in range.
fn scale(span: u128, r: u64) -> u128 {
    let r = u128::from(r);
    let hi = span >> 64;
    let lo = span & u128::from(u64::MAX);
    hi * r + ((lo * r) >> 64)
}

/// `nanos` is always at most some `Duration`'s nanosecond count here, so the seconds fit in u64.
fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9, which fits in u32.
    let sub = (nanos % NANOS_PER_SEC) as u32;
    Duration::new(secs, sub)
}

/// Formats a duration exactly in human units: `90d`, `2m`, `1h30m`, `1s500ms`, `0s`.
///
/// Components are days, hours, minutes, seconds and milliseconds; a sub-millisecond remainder is
/// shown as `us` / `ns` so that no value is rounded (89d23h59m59s999ms stays distinct from 90d).
pub fn fmt_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (secs / SECS_PER_DAY, "d"),
        (secs % SECS_PER_DAY / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1_000 % 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n != 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

/// Seconds in a day.
const SECS_PER_DAY: u64 = 86_400;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn reconnect_default_spells_out_the_seed_schedule() {
        let b = Backoff::reconnect_default();
        let table: [(u32, Duration); 15] = [
            (0, ms(100)),
            (1, ms(200)),
            (2, ms(400)),
            (3, ms(800)),
            (4, ms(1_600)),
            (5, ms(3_200)),
            (6, ms(6_400)),
            (7, ms(12_800)),
            (8, ms(25_600)),
            (9, ms(51_200)),
            (10, ms(102_400)),
            (11, ms(180_000)),
            (12, ms(180_000)),
            (64, ms(180_000)),
            (u32::MAX, ms(180_000)),
        ];
        for (attempt, expected) in table {
            assert_eq!(b.delay(attempt), expected, "attempt {attempt}");
        }
        assert_eq!(Backoff::default(), b);
        assert_eq!(b.validate(), Ok(()));
    }

    #[test]
    fn factor_one_is_constant_and_huge_values_saturate() {
        let constant = Backoff {
            factor: 1,
            ..Backoff::reconnect_default()
        };
        assert_eq!(constant.delay(0), ms(100));
        assert_eq!(constant.delay(u32::MAX), ms(100));

        let huge = Backoff {
            base: Duration::MAX,
            factor: u32::MAX,
            cap: Duration::MAX,
            jitter: Jitter::None,
            seed: 0,
        };
        assert_eq!(huge.delay(0), Duration::MAX);
        assert_eq!(huge.delay(u32::MAX), Duration::MAX);
        let huge_jitter = Backoff {
            jitter: Jitter::Full,
            ..huge
        };
        assert!(huge_jitter.delay(u32::MAX) <= Duration::MAX);
        let span = Duration::MAX.as_nanos();
        assert_eq!(scale(span, 0), 0);
        assert_eq!(scale(span, 1 << 63), span / 2);
        assert!(scale(span, u64::MAX) < span);
    }

    #[test]
    fn validate_names_each_bad_field() {
        let ok = Backoff::reconnect_default();
        let cases = [
            (
                Backoff {
                    base: Duration::ZERO,
                    ..ok.clone()
                },
                BackoffError::ZeroBase,
            ),
            (
                Backoff {
                    factor: 0,
                    ..ok.clone()
                },
                BackoffError::ZeroFactor,
            ),
            (
                Backoff {
                    cap: ms(50),
                    ..ok.clone()
                },
                BackoffError::CapBelowBase {
                    base: ms(100),
                    cap: ms(50),
                },
            ),
            (
                Backoff {
                    jitter: Jitter::Proportional { percent: 101 },
                    ..ok.clone()
                },
                BackoffError::JitterPercentAbove100 { percent: 101 },
            ),
        ];
        for (backoff, expected) in cases {
            assert_eq!(backoff.validate(), Err(expected));
        }
        assert_eq!(
            BackoffError::CapBelowBase {
                base: ms(100),
                cap: ms(50)
            }
            .to_string(),
            "backoff cap is 50ms but base is 100ms; set cap to at least base"
        );
        let edge = Backoff {
            cap: ms(100),
            jitter: Jitter::Proportional { percent: 100 },
            ..ok
        };
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn jitter_is_deterministic_per_seed_and_varies_across_attempts() {
        let b = Backoff {
            jitter: Jitter::Full,
            seed: 42,
            ..Backoff::reconnect_default()
        };
        let first: Vec<Duration> = (0..32).map(|a| b.delay(a)).collect();
        let again: Vec<Duration> = (0..32).map(|a| b.delay(a)).collect();
        assert_eq!(first, again);
        // Past the cap the nominal delay is constant, so any variation comes from the jitter.
        let capped: Vec<Duration> = (20..40).map(|a| b.delay(a)).collect();
        assert!(capped.windows(2).any(|w| w[0] != w[1]), "{capped:?}");
        let other = Backoff { seed: 43, ..b };
        let other_seq: Vec<Duration> = (0..32).map(|a| other.delay(a)).collect();
        assert_ne!(first, other_seq);
    }

    #[test]
    fn jitter_bounds_table() {
        // Full jitter of 180 s stays in [0, 180 s]; 10% proportional in [162 s, 180 s].
        for seed in 0..200 {
            let full = Backoff {
                jitter: Jitter::Full,
                seed,
                ..Backoff::reconnect_default()
            };
            assert!(full.delay(30) <= ms(180_000));
            let ten = Backoff {
                jitter: Jitter::Proportional { percent: 10 },
                ..full
            };
            let d = ten.delay(30);
            assert!(d >= ms(162_000) && d <= ms(180_000), "seed {seed}: {d:?}");
        }
        let zero = Backoff {
            jitter: Jitter::Proportional { percent: 0 },
            seed: 7,
            ..Backoff::reconnect_default()
        };
        assert_eq!(zero.delay(3), ms(800));
        let over = Backoff {
            jitter: Jitter::Proportional { percent: 255 },
            seed: 7,
            ..Backoff::reconnect_default()
        };
        assert!(over.delay(3) <= ms(800));
    }

    #[test]
    fn retry_schedule_default_is_100ms_then_400ms() {
        let s = RetrySchedule::default();
        assert_eq!(s.delay(0), Some(ms(100)));
        assert_eq!(s.delay(1), Some(ms(400)));
        assert_eq!(s.delay(2), None);
        assert_eq!(s.delay(u32::MAX), None);
        assert_eq!(s.len(), 2);
        assert!(!s.is_empty());
        assert_eq!(s.total(), ms(500));
        assert_eq!(s.delays(), &[ms(100), ms(400)]);
        assert_eq!(RetrySchedule::new(vec![ms(100), ms(400)]), Ok(s));
    }

    #[test]
    fn retry_schedule_rejects_bad_delays() {
        let empty = RetrySchedule::new(Vec::new()).expect("empty schedule is valid");
        assert!(empty.is_empty());
        assert_eq!(empty.delay(0), None);
        assert_eq!(empty.total(), Duration::ZERO);
        assert_eq!(
            RetrySchedule::new(vec![ms(1), Duration::ZERO]),
            Err(BackoffError::ZeroRetryDelay { index: 1 })
        );
        assert_eq!(
            RetrySchedule::new(vec![Duration::MAX, ms(1)]),
            Err(BackoffError::RetrySpanOverflow)
        );
        assert_eq!(
            BackoffError::ZeroRetryDelay { index: 1 }.to_string(),
            "retry delay #1 is 0s; set every retry delay to a positive duration"
        );
    }

    fn valid_backoff(jitter: impl Strategy<Value = Jitter>) -> impl Strategy<Value = Backoff> {
        (
            1u64..=10_000_000_000,
            1u32..=64,
            0u64..=1_000_000_000_000,
            jitter,
            any::<u64>(),
        )
            .prop_map(|(base, factor, extra, jitter, seed)| Backoff {
                base: Duration::from_nanos(base),
                factor,
                cap: Duration::from_nanos(base + extra),
                jitter,
                seed,
            })
    }

    fn any_jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            (0u8..=100).prop_map(|percent| Jitter::Proportional { percent }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn unjittered_delays_are_monotone_and_capped(
            b in valid_backoff(Just(Jitter::None)),
            a in prop_oneof![0u32..=100, any::<u32>()],
            step in 0u32..=70,
        ) {
            prop_assert_eq!(b.validate(), Ok(()));
            let later = a.saturating_add(step);
            prop_assert!(b.delay(a) <= b.delay(later));
            prop_assert!(b.delay(later) <= b.cap);
            prop_assert!(b.delay(a) >= b.base);
            prop_assert_eq!(b.delay(0), b.base);
        }

        #[test]
        fn jittered_delays_stay_within_documented_bounds(
            b in valid_backoff(any_jitter()),
            attempt in prop_oneof![0u32..=80, any::<u32>()],
        ) {
            prop_assert_eq!(b.validate(), Ok(()));
            let d = b.nominal_delay(attempt);
            let got = b.delay(attempt);
            let low = match b.jitter {
                Jitter::None => d,
                Jitter::Full => Duration::ZERO,
                Jitter::Proportional { percent } => {
                    duration_from_nanos(d.as_nanos() * u128::from(100 - percent) / 100)
                }
            };
            prop_assert!(low <= got && got <= d, "{:?} not in [{:?}, {:?}]", got, low, d);
            prop_assert!(got <= b.cap);
        }
    }
}
