//! Circuit breaker: Closed / Open { until, attempt } / HalfOpen with a single-flight probe, as pure transitions.
//!
//! The breaker counts failure *episodes* (a per-publish retry schedule that ran out), not single failed
//! publishes: the outbox decides what an episode is. Terminal per-event errors never count as failures
//! (the outbox reports such an answer as a success: the broker is reachable).
//! Every transition is a pure function of (state, input, now): [`step`]. [`Breaker`] wraps it with the
//! config and keeps the state.

use std::time::{Duration, Instant};

use crate::backoff::{deadline_after, Backoff};

/// Breaker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failure episodes that open the breaker (>= 1). Default 1: an episode already holds
    /// the whole per-publish retry schedule.
    pub failures_to_open: u32,
    /// How long the breaker stays open before probing: `reconnect.delay(attempt)`. Default: the seed's
    /// 100 ms * 2^n capped at 180 s.
    pub reconnect: Backoff,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures_to_open: 1,
            reconnect: Backoff::reconnect_default(),
        }
    }
}

/// The breaker's state; each variant carries its own data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Publishing normally; `failures` consecutive failure episodes so far.
    Closed {
        /// Consecutive failure episodes since the last success.
        failures: u32,
    },
    /// Not publishing until `until`; `attempt` counts the opens since the last success (0 = first).
    Open {
        /// When the breaker turns half-open.
        until: Instant,
        /// Opens since the last success; indexes the reconnect backoff.
        attempt: u32,
    },
    /// One probe may be sent; its outcome closes or re-opens the breaker.
    HalfOpen {
        /// The `attempt` of the open state this came from.
        attempt: u32,
        /// Whether the single probe is outstanding.
        probe_in_flight: bool,
    },
}

/// Facts the breaker reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerInput {
    /// A publish was acknowledged.
    Success,
    /// A failure episode ended (retries exhausted, or the probe failed).
    Failure,
    /// The clock reached a deadline (harmless when early).
    Timeout,
    /// The client (re)connected: an open breaker lets its probe go now rather than at the end of
    /// its reconnect delay (which grows to minutes), so delivery resumes as soon as the broker is back.
    Reconnected,
    /// The single half-open probe was transmitted.
    ProbeSent,
}

/// What a transition announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerEvent {
    /// The breaker opened until `until`.
    Opened {
        /// When it will turn half-open.
        until: Instant,
        /// Opens since the last success.
        attempt: u32,
    },
    /// The breaker turned half-open: one probe may go.
    HalfOpened,
    /// The breaker closed after a success.
    Closed,
}

/// The pure transition function.
pub fn step(
    state: BreakerState,
    input: BreakerInput,
    config: &BreakerConfig,
    now: Instant,
) -> (BreakerState, Option<BreakerEvent>) {
    use BreakerInput as I;
    use BreakerState as S;
    let open = |attempt: u32| {
        let until = deadline_after(now, config.reconnect.delay(attempt));
        (
            S::Open { until, attempt },
            Some(BreakerEvent::Opened { until, attempt }),
        )
    };
    match (state, input) {
        (S::Closed { failures: 0 }, I::Success) => (state, None),
        (S::Closed { .. }, I::Success) => (S::Closed { failures: 0 }, None),
        (S::Closed { failures }, I::Failure) => {
            let failures = failures.saturating_add(1);
            if failures >= config.failures_to_open.max(1) {
                open(0)
            } else {
                (S::Closed { failures }, None)
            }
        }
        (S::Open { until, attempt }, I::Timeout) if now >= until => (
            S::HalfOpen {
                attempt,
                probe_in_flight: false,
            },
            Some(BreakerEvent::HalfOpened),
        ),
        (S::Open { attempt, .. }, I::Reconnected) => (
            S::HalfOpen {
                attempt,
                probe_in_flight: false,
            },
            Some(BreakerEvent::HalfOpened),
        ),
        // A late success (an ack from before the outage) is real evidence the broker works.
        (S::Open { .. } | S::HalfOpen { .. }, I::Success) => {
            (S::Closed { failures: 0 }, Some(BreakerEvent::Closed))
        }
        (S::HalfOpen { attempt, .. }, I::Failure) => open(attempt.saturating_add(1)),
        (S::HalfOpen { attempt, .. }, I::ProbeSent) => (
            S::HalfOpen {
                attempt,
                probe_in_flight: true,
            },
            None,
        ),
        // Failures while open are already accounted for; everything else changes nothing.
        (s, _) => (s, None),
    }
}

/// What the breaker allows to be transmitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: up to the in-flight window.
    Window,
    /// Half-open with no probe outstanding: exactly one transmission.
    Probe,
    /// Open, or a probe is outstanding: nothing.
    Nothing,
}

/// A breaker: config plus state, driven by `handle_*` and read with `poll_timeout` / `admission`.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// The config.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Feeds one input; returns the announced event, if any.
    pub fn handle(&mut self, input: BreakerInput, now: Instant) -> Option<BreakerEvent> {
        let (state, event) = step(self.state, input, &self.config, now);
        self.state = state;
        event
    }

    /// What may be transmitted now.
    pub fn admission(&self) -> Admission {
        match self.state {
            BreakerState::Closed { .. } => Admission::Window,
            BreakerState::HalfOpen {
                probe_in_flight: false,
                ..
            } => Admission::Probe,
            _ => Admission::Nothing,
        }
    }

    /// The next deadline: when an open breaker turns half-open.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open { until, .. } => Some(until),
            _ => None,
        }
    }

    /// Whether the breaker is open (not admitting anything until its deadline).
    pub fn is_open(&self) -> bool {
        matches!(self.state, BreakerState::Open { .. })
    }

    /// How long the breaker stays open on its `attempt`-th consecutive open.
    pub fn open_for(&self, attempt: u32) -> Duration {
        self.config.reconnect.delay(attempt)
    }
}
