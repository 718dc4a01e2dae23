//! The callers waiting for outcomes, by outbox sequence: a ring, since sequences are consecutive.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::EmitError;
use crate::handle::{Permits, Receipt};

/// One accepted event the driver still owes an outcome (or, once delivered, still holds the
/// queue room of).
pub(crate) struct Waiter {
    pub(crate) event_id: String,
    pub(crate) msg_id: sink_core::event::MsgId,
    /// The event's `jetsink.event` span: the parent of every per-event record.
    pub(crate) span: tracing::Span,
    /// Taken when the outcome is sent. A delivered event's waiter stays (with its permits) until
    /// the outbox lets go of the entry, which it does only once every earlier event is settled:
    /// the queue's room is the outbox's room, so `WhenFull::Block` waits where the outbox is full.
    pub(crate) reply: Option<oneshot::Sender<Result<Receipt, EmitError>>>,
    pub(crate) _permits: Permits,
    pub(crate) first_sent: Option<Instant>,
    /// Transmissions so far.
    pub(crate) transmits: u32,
    /// Reported as possibly stored twice (beyond the duplicate window) already.
    pub(crate) span_warned: bool,
    /// Refused at send time as larger than the server's `max_payload`: (wire size, limit). Its
    /// rejection is reported as [`EmitError::TooLarge`].
    pub(crate) too_large: Option<(usize, usize)>,
    /// Its spool record, acknowledged there once the event has an outcome.
    pub(crate) spool_seq: Option<crate::spool::RecordSeq>,
}

/// The callers waiting for outcomes, by outbox sequence. Sequences are handed out consecutively
/// and mostly settle in order, so this is a ring indexed by offset rather than a tree.
#[derive(Default)]
pub(crate) struct Waiters {
    /// Sequence of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<Waiter>>,
}

impl Waiters {
    /// An empty ring with room for `capacity` waiters, reserved up front.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            base: 0,
            slots: VecDeque::with_capacity(capacity),
        }
    }

    /// Adds the waiter of `seq`, which is above every sequence added before.
    pub(crate) fn insert(&mut self, seq: u64, waiter: Waiter) {
        if self.slots.is_empty() {
            self.base = seq;
        }
        let Some(offset) = seq
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
        else {
            debug_assert!(false, "waiter sequences increase");
            return;
        };
        while self.slots.len() < offset {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(waiter));
    }

    fn offset(&self, seq: u64) -> Option<usize> {
        usize::try_from(seq.checked_sub(self.base)?).ok()
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut Waiter> {
        let i = self.offset(seq)?;
        self.slots.get_mut(i)?.as_mut()
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<Waiter> {
        let i = self.offset(seq)?;
        let waiter = self.slots.get_mut(i)?.take();
        while self.slots.front().is_some_and(Option::is_none) {
            self.slots.pop_front();
            self.base += 1;
        }
        waiter
    }

    /// The lowest sequence still waiting.
    pub(crate) fn lowest(&self) -> Option<u64> {
        // remove() keeps the front occupied.
        (!self.slots.is_empty()).then_some(self.base)
    }

    /// The highest sequence still waiting.
    pub(crate) fn highest(&self) -> Option<u64> {
        let last = self.slots.iter().rposition(Option::is_some)?;
        Some(self.base + last as u64)
    }
}
