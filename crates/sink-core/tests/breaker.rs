//! Breaker transitions: the literal table and the open-duration schedule, on virtual time.
#![allow(clippy::disallowed_methods)] // one clock read: the arbitrary origin of virtual time

use std::time::{Duration, Instant};

use sink_core::breaker::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn transition_table() {
    let t0 = Instant::now();
    let cfg = BreakerConfig {
        failures_to_open: 2,
        ..BreakerConfig::default()
    };
    use BreakerInput as I;
    use BreakerState as S;
    let open0 = S::Open {
        until: t0 + ms(100),
        attempt: 0,
    };
    let half = |attempt, probe_in_flight| S::HalfOpen {
        attempt,
        probe_in_flight,
    };
    let opened = |until, attempt| Some(BreakerEvent::Opened { until, attempt });
    // (from, input, at ms) -> (to, event)
    #[rustfmt::skip]
    let table: Vec<(S, I, u64, S, Option<BreakerEvent>)> = vec![
        (S::Closed { failures: 0 }, I::Success, 0, S::Closed { failures: 0 }, None),
        (S::Closed { failures: 1 }, I::Success, 0, S::Closed { failures: 0 }, None),
        (S::Closed { failures: 0 }, I::Failure, 0, S::Closed { failures: 1 }, None),
        (S::Closed { failures: 1 }, I::Failure, 0, open0, opened(t0 + ms(100), 0)),
        (S::Closed { failures: 0 }, I::Timeout, 50, S::Closed { failures: 0 }, None),
        (open0, I::Timeout, 99, open0, None),
        (open0, I::Failure, 50, open0, None),
        (open0, I::Timeout, 100, half(0, false), Some(BreakerEvent::HalfOpened)),
        (half(0, false), I::ProbeSent, 100, half(0, true), None),
        (half(0, true), I::Failure, 150, S::Open { until: t0 + ms(350), attempt: 1 }, opened(t0 + ms(350), 1)),
        (half(3, true), I::Success, 150, S::Closed { failures: 0 }, Some(BreakerEvent::Closed)),
        (open0, I::Success, 10, S::Closed { failures: 0 }, Some(BreakerEvent::Closed)),
    ];
    for (i, (from, input, at, to, event)) in table.into_iter().enumerate() {
        let got = step(from, input, &cfg, t0 + ms(at));
        assert_eq!(got, (to, event), "row {i}: {from:?} + {input:?} @ {at} ms");
    }
}

#[test]
fn open_durations_follow_the_reconnect_backoff_and_reset_on_success() {
    let t0 = Instant::now();
    let mut b = Breaker::new(BreakerConfig::default());
    let mut now = t0;
    assert_eq!(
        b.handle(BreakerInput::Failure, now),
        Some(BreakerEvent::Opened {
            until: now + ms(100),
            attempt: 0
        })
    );
    let mut opens = Vec::new();
    for _ in 0..5 {
        let until = b.poll_timeout().expect("an open breaker has a deadline");
        opens.push(until - now);
        now = until;
        assert_eq!(
            b.handle(BreakerInput::Timeout, now),
            Some(BreakerEvent::HalfOpened)
        );
        assert_eq!(b.admission(), Admission::Probe);
        b.handle(BreakerInput::ProbeSent, now);
        assert_eq!(b.admission(), Admission::Nothing);
        b.handle(BreakerInput::Failure, now);
    }
    assert_eq!(opens, vec![ms(100), ms(200), ms(400), ms(800), ms(1600)]);
    let later = now + ms(3200);
    assert_eq!(
        b.handle(BreakerInput::Timeout, later),
        Some(BreakerEvent::HalfOpened)
    );
    assert_eq!(
        b.handle(BreakerInput::Success, later),
        Some(BreakerEvent::Closed)
    );
    assert_eq!(b.admission(), Admission::Window);
    assert_eq!(
        b.handle(BreakerInput::Failure, later + ms(1)),
        Some(BreakerEvent::Opened {
            until: later + ms(101),
            attempt: 0
        })
    );
}
