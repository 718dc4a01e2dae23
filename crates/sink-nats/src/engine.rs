//! The delivery machine a driver runs: the outbox (one publish and ack per event) or a fast-batch
//! lane, behind one interface for what both do (queue, deadlines, connection events, health), and
//! the decision between them.

use std::time::Instant;

use sink_core::breaker::BreakerState;
use sink_core::capability::{fast_batch_supported, ServerVersion, FAST_BATCH};
use sink_core::lane::LaneOutput;
use sink_core::outbox::{Abandoned, EventSeq, Message, OrderingMode, Outbox, Output, Refused};

use crate::config::{Batching, SinkConfig, StreamPolicy};
use crate::handle::Mechanism;
use crate::lanes::LaneSet;

/// One delivery machine.
pub(crate) enum Engine {
    /// Per-event publishes and acks.
    PerEvent(Outbox),
    /// Fast batches.
    Lanes(LaneSet),
}

/// One output of either machine.
pub(crate) enum Out {
    PerEvent(Output),
    /// An output of lane `.0`.
    Lane(usize, LaneOutput),
}

/// Which mechanism a sink with `config` uses, and why, given the server it is connected to and,
/// when the stream was checked, whether the stream allows batches.
pub(crate) fn choose(
    config: &SinkConfig,
    server_version: &str,
    allow_batched: Option<bool>,
) -> (Mechanism, String) {
    let stream = &config.stream;
    let per_event = |why: String| (Mechanism::PerEvent, why);
    if config.batching == Batching::Off {
        return per_event("batching is off in the sink's config".into());
    }
    if config.stream_policy == StreamPolicy::Off {
        return per_event("stream policy Off: whether the stream allows batches is unknown".into());
    }
    match ServerVersion::parse(server_version) {
        Some(v) if fast_batch_supported(&v) => {}
        Some(v) => {
            return per_event(format!(
                "nats-server {v} has no fast-batch publishing (it needs {FAST_BATCH} or later)"
            ))
        }
        None => {
            return per_event(format!(
                "the server's version {server_version:?} is unknown, so fast batches may not exist"
            ))
        }
    }
    match allow_batched {
        Some(true) => (
            Mechanism::FastBatch,
            format!("nats-server {server_version} and stream {stream} with allow_batched"),
        ),
        Some(false) => per_event(format!(
            "stream {stream} does not allow batches (allow_batched is off); set \
             allow_batched: true on it for pipelined ordered delivery through fast batches"
        )),
        None => per_event(format!("stream {stream} has not been checked yet")),
    }
}

impl Engine {
    /// The outbox, when per-event delivery is in force.
    pub(crate) fn outbox_mut(&mut self) -> Option<&mut Outbox> {
        match self {
            Engine::PerEvent(o) => Some(o),
            Engine::Lanes(_) => None,
        }
    }

    /// The ordering mode in force (a lane keeps the order of the whole sink, which is what the
    /// configured mode is reported as).
    pub(crate) fn ordering(&self, configured: OrderingMode) -> OrderingMode {
        match self {
            Engine::PerEvent(o) => o.ordering(),
            Engine::Lanes(_) => configured,
        }
    }

    /// Fast-batch lanes open (0 with per-event acks).
    pub(crate) fn lanes(&self) -> usize {
        match self {
            Engine::PerEvent(_) => 0,
            Engine::Lanes(l) => l.open(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Engine::PerEvent(o) => o.len(),
            Engine::Lanes(l) => l.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether an event of `size` bytes fits now.
    pub(crate) fn has_room(&self, size: usize) -> bool {
        match self {
            Engine::PerEvent(o) => o.has_room(size),
            Engine::Lanes(l) => l.has_room(size),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        match self {
            Engine::PerEvent(o) => o.in_flight(),
            Engine::Lanes(l) => l.in_flight(),
        }
    }

    pub(crate) fn window(&self) -> usize {
        match self {
            Engine::PerEvent(o) => o.window(),
            Engine::Lanes(l) => l.window(),
        }
    }

    pub(crate) fn breaker(&self) -> BreakerState {
        match self {
            Engine::PerEvent(o) => o.breaker(),
            Engine::Lanes(l) => l.breaker(),
        }
    }

    pub(crate) fn message(&self, seq: EventSeq) -> Option<&Message> {
        match self {
            Engine::PerEvent(o) => o.message(seq),
            Engine::Lanes(l) => l.message(seq),
        }
    }

    pub(crate) fn push(
        &mut self,
        message: Message,
        unix_ms: u64,
        now: Instant,
    ) -> Result<EventSeq, Refused> {
        match self {
            Engine::PerEvent(o) => o.push(message, unix_ms, now),
            Engine::Lanes(l) => l.push(message, unix_ms, now),
        }
    }

    pub(crate) fn poll_output(&mut self, now: Instant) -> Option<Out> {
        match self {
            Engine::PerEvent(o) => o.poll_output(now).map(Out::PerEvent),
            Engine::Lanes(l) => l.poll(Some(now)).map(|(i, o)| Out::Lane(i, o)),
        }
    }

    pub(crate) fn poll_event(&mut self) -> Option<Out> {
        match self {
            Engine::PerEvent(o) => o.poll_event().map(Out::PerEvent),
            Engine::Lanes(l) => l.poll(None).map(|(i, o)| Out::Lane(i, o)),
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Engine::PerEvent(o) => o.poll_timeout(),
            Engine::Lanes(l) => l.poll_timeout(),
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        match self {
            Engine::PerEvent(o) => o.handle_timeout(now),
            Engine::Lanes(l) => l.handle_timeout(now),
        }
    }

    pub(crate) fn handle_connection_lost(&mut self, now: Instant) {
        match self {
            Engine::PerEvent(o) => o.handle_connection_lost(now),
            Engine::Lanes(l) => l.handle_connection_lost(now),
        }
    }

    pub(crate) fn handle_reconnected(&mut self, now: Instant) {
        match self {
            Engine::PerEvent(o) => o.handle_reconnected(now),
            Engine::Lanes(l) => l.handle_reconnected(now),
        }
    }

    /// Everything held, in order, for another machine to adopt.
    pub(crate) fn abandon(&mut self) -> Vec<Abandoned> {
        match self {
            Engine::PerEvent(o) => o.abandon(),
            Engine::Lanes(l) => l.abandon(),
        }
    }

    /// Replaces this machine with `next`, moving every held event over with its sequence.
    /// Both are configured from the same sink bounds, so what one held the other admits.
    pub(crate) fn switch_to(&mut self, mut next: Engine, now: Instant) {
        for moved in self.abandon() {
            let seq = moved.seq;
            let adopted = match &mut next {
                Engine::PerEvent(o) => o.adopt(moved, now),
                Engine::Lanes(l) => l.adopt(moved, now),
            };
            debug_assert_eq!(adopted, Ok(seq), "same bounds, same sequence");
        }
        *self = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_need_auto_batching_a_checked_stream_that_allows_them_and_2_14() {
        let config = SinkConfig::default();
        assert_eq!(
            choose(&config, "2.15.1", Some(true)).0,
            Mechanism::FastBatch
        );
        for (version, allowed) in [
            ("2.15.1", Some(false)),
            ("2.15.1", None),
            ("2.13.9", Some(true)),
            ("2.9.10", Some(true)),
            ("", Some(true)),
        ] {
            let (mechanism, why) = choose(&config, version, allowed);
            assert_eq!(
                mechanism,
                Mechanism::PerEvent,
                "{version} {allowed:?}: {why}"
            );
        }
        let off = SinkConfig {
            batching: Batching::Off,
            ..SinkConfig::default()
        };
        assert_eq!(choose(&off, "2.15.1", Some(true)).0, Mechanism::PerEvent);
        let unchecked = SinkConfig {
            stream_policy: StreamPolicy::Off,
            ..SinkConfig::default()
        };
        let (mechanism, why) = choose(&unchecked, "2.15.1", Some(true));
        assert_eq!(mechanism, Mechanism::PerEvent);
        assert!(why.contains("Off"), "{why}");
    }
}
