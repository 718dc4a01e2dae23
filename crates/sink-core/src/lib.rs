//! Sans-IO core of jetsink: CloudEvent model and wire encodings, subject templates, backoff, breaker,
//! the ordered delivery (outbox) machine, the fast-batch lane machine ([`lane`], nats-server 2.14+)
//! and its wire vocabulary ([`fastbatch`]), the durable local spool's decisions ([`spool`]),
//! stream-requirement checks and the stream audit's verdicts.
//!
//! No async, no clock, no sockets, no files: time comes in as `now: Instant` (last argument), wall
//! time as explicit unix milliseconds, randomness as a seed. Any broker adapter drives the machines
//! the same way: push events, drain outputs until there are none, feed replies, and sleep until
//! [`Outbox::poll_timeout`](outbox::Outbox::poll_timeout).
//!
//! # The driving loop
//!
//! ```
//! use std::time::{Duration, Instant};
//! use sink_core::encoding::{encode, Encoding};
//! use sink_core::event::{CloudEvent, MsgId};
//! use sink_core::outbox::{Ack, Message, Outbox, OutboxConfig, Output};
//! use sink_core::subject::{SubjectConfig, SubjectTemplate};
//!
//! let subjects = SubjectConfig::new(SubjectTemplate::parse("cellos.events.{tenantId}.v1")?);
//! let mut outbox = Outbox::new(OutboxConfig::default())?;
//! let mut now = Instant::now(); // the adapter owns the clock; the core only receives it
//!
//! for i in 0..3 {
//!     let event = CloudEvent::new(format!("evt-{i}"), "/svc/demo", "com.example.demo")
//!         .with_data_json(serde_json::json!({ "tenantId": "acme", "n": i }));
//!     let wire = encode(&event, Encoding::Structured)?;
//!     let message = Message {
//!         subject: subjects.render(&event)?,
//!         msg_id: MsgId::for_event(&event),
//!         headers: wire.headers,
//!         body: wire.body,
//!         key: String::new(),
//!     };
//!     outbox.push(message, 1_764_000_000_000, now)?;
//! }
//!
//! // A stand-in broker that stores whatever it is sent, in order.
//! let mut stored = Vec::new();
//! let mut delivered = 0;
//! loop {
//!     while let Some(output) = outbox.poll_output(now) {
//!         match output {
//!             Output::Transmit(t) => {
//!                 // An adapter publishes here, with `Nats-Msg-Id` and, in chained mode,
//!                 // `Nats-Expected-Last-Msg-Id: t.expected_last_msg_id`.
//!                 let msg = outbox.message(t.seq).expect("held until its outcome");
//!                 stored.push(msg.msg_id.clone());
//!                 let ack = Ack { stream: "EVENTS".into(), sequence: stored.len() as u64, duplicate: false };
//!                 outbox.handle_ack(t.seq, ack, now);
//!             }
//!             Output::Delivered { .. } => delivered += 1,
//!             other => println!("{other:?}"),
//!         }
//!     }
//!     match outbox.poll_timeout() {
//!         _ if outbox.is_empty() => break,
//!         Some(deadline) => {
//!             now = now.max(deadline); // a real adapter sleeps until the deadline
//!             outbox.handle_timeout(now);
//!         }
//!         None => now += Duration::from_millis(1),
//!     }
//! }
//! assert_eq!(delivered, 3);
//! assert_eq!(stored.len(), 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod audit;
pub mod backoff;
pub mod breaker;
pub mod capability;
pub mod encoding;
pub mod event;
pub mod fastbatch;
pub mod lane;
pub mod outbox;
pub mod spool;
pub mod stream;
pub mod subject;

pub use encoding::{decode, encode, Encoding, Wire};
pub use event::{CloudEvent, Data, MsgId};
pub use outbox::{Ack, Failure, Message, OrderingMode, Outbox, OutboxConfig, Output};
pub use stream::{verify, StreamFacts, StreamRequirements, Violation};
pub use subject::{SubjectConfig, SubjectTemplate, TokenRule};
