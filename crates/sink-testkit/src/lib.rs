//! Test kit for jetsink: virtual time, a scripted sans-IO broker, a simulated disk for the spool
//! ([`simdisk`]), proptest strategies, and (IO half)
//! a real nats-server harness and a loopback fault proxy. Only ever a dev-dependency, or behind
//! sink-cli's `lab` feature (`jetsink demo`, `jetsink bench`).

pub mod proxy;
pub use proxy::{Direction, FaultProxy, ProxyMode, ProxyStats};
/// The stream audit is product code (`sink_nats::audit`, its verdicts in `sink_core::audit`);
/// re-exported under the paths the tests have always used.
pub use sink_nats::audit;
pub use sink_nats::audit::{
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
pub mod fastbroker;
pub mod lanesim;
pub mod sim;
pub mod simdisk;
pub mod strategies;
pub use broker::{
    AppliedFault, BrokerConfig, Fault, FaultScript, PublishRequest, RandomFaults, Reply,
    ScriptedBroker, StoredRecord,
};
pub use clock::FakeClock;
pub use sim::{Outcome, PushedEvent, Sim, SimStats, Step};
pub use simdisk::{Corruption, CrashModel, DiskOp, SimDisk};
