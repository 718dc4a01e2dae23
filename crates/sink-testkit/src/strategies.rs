//! Proptest strategies: hostile tenant strings, fault scripts for the scripted broker, and event batches for the outbox.

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use sink_core::event::MsgId;
use sink_core::outbox::Message;

use crate::broker::{Fault, FaultScript, RandomFaults};

/// Tenant values that must never become (part of) a subject: separators, wildcards, empty,
/// whitespace, `$SYS`, over-long, control characters, non-ASCII, and arbitrary strings.
pub fn hostile_tenant() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "a.b",
            "evil.other-tenant",
            "*",
            ">",
            "a.*",
            "a.>",
            "",
            " ",
            "\t",
            "a b",
            "$SYS",
            "$JS.API",
            "a\nb",
            "\0",
            "\u{7f}",
            "ü",
            "日本",
            "tenant\u{200b}",
            ".",
            "..",
            "a.",
        ])
        .prop_map(str::to_owned),
        "[A-Za-z0-9_-]{65,300}",
        Just("x".repeat(300)),
        "[a-z]{0,4}[.*> \t\r\n\u{0}-\u{1f}][a-z]{0,4}",
        "\\PC{1,8}[^A-Za-z0-9_-]\\PC{0,8}",
        any::<String>().prop_filter("not a valid token", |s| !is_valid_token(s)),
    ]
}

/// Tenant values that are single, safe NATS tokens (`^[A-Za-z0-9_-]{1,64}$`).
pub fn valid_tenant() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

/// Whether `s` matches the default token rule `^[A-Za-z0-9_-]{1,64}$`.
pub fn is_valid_token(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One fault of any kind, with durations up to `max_delay`.
pub fn fault(max_delay: Duration) -> impl Strategy<Value = Fault> {
    let max_ms = max_delay.as_millis().max(1) as u64;
    prop_oneof![
        Just(Fault::DropRequest),
        (1..=max_ms).prop_map(|ms| Fault::DelayReply(Duration::from_millis(ms))),
        Just(Fault::LoseAck),
        Just(Fault::DuplicateAck),
        Just(Fault::NoResponders),
        Just(Fault::TooManyRequests),
        prop::sample::select(vec![10054u16, 10077, 10039])
            .prop_map(|code| Fault::Terminal { code }),
        (1..=max_ms).prop_map(|ms| Fault::StreamMissing(Duration::from_millis(ms))),
        Just(Fault::ConnectionLoss),
        Just(Fault::ForgetLastId),
    ]
}

/// A fault script over the first `publishes` publishes: up to `max_faults` faults at random
/// indexes, and sometimes a seeded random fault rate (up to 20%).
pub fn fault_script(
    publishes: u64,
    max_faults: usize,
    max_delay: Duration,
) -> impl Strategy<Value = FaultScript> {
    let at = prop::collection::vec((0..publishes.max(1), fault(max_delay)), 0..=max_faults);
    let random = prop::option::of((
        any::<u64>(),
        0u16..=200,
        prop::collection::vec(fault(max_delay), 1..4),
    ));
    (at, random).prop_map(|(at, random)| {
        let mut script = at
            .into_iter()
            .fold(FaultScript::none(), |s, (i, f)| s.at(i, f));
        if let Some((seed, per_mille, menu)) = random {
            script = script.random(RandomFaults {
                seed,
                per_mille,
                menu,
            });
        }
        script
    })
}

/// What the outbox needs of one event in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    /// Ordering key (also the subject's tenant token).
    pub key: String,
    /// Body size in bytes.
    pub body_len: usize,
}

/// Batches of up to `max_len` events over `keys` distinct keys (`k0`, `k1`, ...) with bodies of
/// up to `max_body` bytes.
pub fn event_batch(
    keys: usize,
    max_len: usize,
    max_body: usize,
) -> impl Strategy<Value = Vec<EventSpec>> {
    let key = (0..keys.max(1)).prop_map(|k| format!("k{k}"));
    prop::collection::vec(
        (key, 0..=max_body).prop_map(|(key, body_len)| EventSpec { key, body_len }),
        0..=max_len,
    )
}

/// The outbox message for the `n`-th event of a batch: id `m<n>`, subject `events.<key>`.
pub fn message_for(n: u64, spec: &EventSpec) -> Message {
    Message {
        subject: format!("events.{}", spec.key),
        msg_id: MsgId::from_raw(format!("m{n}")),
        headers: Vec::new(),
        body: Bytes::from(vec![b'x'; spec.body_len]),
        key: spec.key.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #[test]
        fn hostile_tenants_are_never_valid_tokens(t in hostile_tenant()) {
            prop_assert!(!is_valid_token(&t), "{t:?}");
        }

        #[test]
        fn valid_tenants_are_valid_tokens(t in valid_tenant()) {
            prop_assert!(is_valid_token(&t));
        }

        #[test]
        fn batches_respect_their_bounds(b in event_batch(3, 20, 50)) {
            prop_assert!(b.len() <= 20);
            for (i, e) in b.iter().enumerate() {
                prop_assert!(["k0", "k1", "k2"].contains(&e.key.as_str()));
                prop_assert!(e.body_len <= 50);
                let m = message_for(i as u64, e);
                prop_assert_eq!(m.body.len(), e.body_len);
                prop_assert_eq!(m.msg_id.as_str(), format!("m{i}"));
            }
        }
    }
}
