//! jetsink's NATS JetStream adapter: the only crate with a clock, an executor and a socket.
//!
//! One driver task per sink runs the [`sink_core`] machines over async-nats and tokio. The public API
//! is filled in by the sink-nats issue; until then this crate only re-exports the core.

pub use sink_core;
