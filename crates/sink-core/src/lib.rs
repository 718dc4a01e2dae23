//! Sans-IO core of jetsink: CloudEvent model and wire encodings, subject templates, backoff, breaker,
//! the ordered delivery (outbox) machine and stream-requirement checks.
//!
//! No async, no clock, no sockets, no files: time comes in as `now: Instant` (last argument), wall
//! time as explicit unix milliseconds, randomness as a seed.

pub mod backoff;
pub mod breaker;
pub mod encoding;
pub mod event;
pub mod outbox;
pub mod stream;
pub mod subject;
