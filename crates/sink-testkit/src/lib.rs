//! Test kit for jetsink: virtual time, a scripted sans-IO broker, proptest strategies, and (IO half)
//! a real nats-server harness, a loopback fault proxy and a stream audit.

pub mod proxy;
pub use proxy::{Direction, FaultProxy, ProxyMode, ProxyStats};
pub mod audit;
pub use audit::{
    analyze, compare, compare_with, read_stream, AuditError, AuditReport, CompareOptions, Expected,
    OrderViolation, StoredMessage, StreamSummary,
};
pub mod cluster;
pub mod server;
pub mod tls;
pub use cluster::Cluster;
pub use server::{HarnessError, NatsServer, ServerAuth, ServerOptions, ServerVersion};
pub mod broker;
pub mod clock;
pub mod sim;
pub mod strategies;
pub use broker::{
    AppliedFault, BrokerConfig, Fault, FaultScript, PublishRequest, RandomFaults, Reply,
    ScriptedBroker, StoredRecord,
};
pub use clock::FakeClock;
pub use sim::{Outcome, PushedEvent, Sim, SimStats, Step};
