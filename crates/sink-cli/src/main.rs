//! The `jetsink` operator CLI: publish, stream ensure/verify, audit, doctor, spool status/drain (plus bench and demo).
//!
//! `bench` and `demo` exist only with the `lab` feature (`cargo xtask demo | bench` turn it on):
//! they start nats-servers and inject outages with the test kit, which the shipped binary does not
//! link.
//!
//! Exit codes: 0 success; 1 the command ran and found a problem (an event not delivered, a stream
//! violation, an audit finding, a failed doctor check); 2 usage, configuration or connection errors.

mod audit;
#[cfg(feature = "lab")]
mod bench;
mod config;
#[cfg(feature = "lab")]
mod demo;
mod doctor;
mod output;
mod publish;
mod spool;
mod stream;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::Common;

/// mimalloc rather than the system allocator. An event is allocated on the caller's thread and
/// freed on the driver's or the client's; glibc malloc serialises such frees on the allocating
/// thread's arena lock, which `jetsink bench` measured at about 40% of this process's CPU and at
/// send p99 ~35 us. Services embedding `sink-nats` choose their own allocator; the README says
/// what this one changes; without the default `mimalloc` feature the binary keeps the system
/// allocator (`cargo xtask bench --system-alloc` measures that).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Durable, ordered, exactly-once CloudEvent delivery into NATS JetStream.
#[derive(Parser, Debug)]
#[command(
    name = "jetsink",
    version,
    after_help = "Settings come from flags, then the environment (NATS_URL, JETSINK_STREAM, \
                  JETSINK_SUBJECT_TEMPLATE, NATS_TOKEN, NATS_USER, NATS_PASSWORD, JETSINK_CONFIG), \
                  then the --config TOML file, then the defaults.\n\
                  Exit codes: 0 ok, 1 a problem was found (undelivered events, violations, audit \
                  findings, failed checks), 2 usage, configuration or connection error."
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish CloudEvents (NDJSON from a file or stdin, or generated) through the sink
    Publish(publish::PublishArgs),
    /// Create or verify the stream the sink writes to
    #[command(subcommand)]
    Stream(stream::StreamCommand),
    /// Read a stream back: count, gaps, duplicates, per-key counts; compare with what was sent
    Audit(audit::AuditArgs),
    /// Side-by-side throughput benchmark: fire-and-forget, serial ack, raw pipelined, jetsink modes
    #[cfg(feature = "lab")]
    Bench(bench::BenchArgs),
    /// Start a local JetStream, publish through a broker kill -9 and restart, audit the stream
    #[cfg(feature = "lab")]
    Demo(demo::DemoArgs),
    /// Check connectivity, auth, server capabilities, JetStream account limits and the stream
    Doctor(doctor::DoctorArgs),
    /// Inspect a local spool directory, or deliver what it holds
    #[command(subcommand)]
    Spool(spool::SpoolCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.common.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        install_metrics(&cli.common)?;
        match cli.command {
            Command::Publish(args) => publish::run(args, &cli.common).await,
            Command::Stream(command) => stream::run(command, &cli.common).await,
            Command::Audit(args) => audit::run(args, &cli.common).await,
            #[cfg(feature = "lab")]
            Command::Bench(args) => bench::run(args, &cli.common).await,
            #[cfg(feature = "lab")]
            Command::Demo(args) => demo::run(args, &cli.common).await,
            Command::Doctor(args) => doctor::run(args, &cli.common).await,
            Command::Spool(command) => spool::run(command, &cli.common).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Retries counted by the CLI's metrics recorder (the progress bar shows them).
pub static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Installs the CLI's recorder: it counts `jetsink_retries_total` for the progress bar and, with
/// `--metrics-addr`, forwards everything to a Prometheus exporter served at that address.
fn install_metrics(common: &Common) -> anyhow::Result<()> {
    let addr = match common.resolve() {
        Ok(r) => r.metrics_addr,
        // Subcommands report configuration errors themselves, with their own context.
        Err(_) => common.metrics_addr,
    };
    let inner = match addr {
        Some(addr) => {
            let (recorder, exporter) = metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .build()
                .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::warn!("metrics exporter stopped: {e:?}");
                }
            });
            Some(recorder)
        }
        None => None,
    };
    metrics::set_global_recorder(CliRecorder { inner })
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))
}

struct CliRecorder {
    inner: Option<metrics_exporter_prometheus::PrometheusRecorder>,
}

struct CountingCounter {
    inner: metrics::Counter,
}

impl metrics::CounterFn for CountingCounter {
    fn increment(&self, value: u64) {
        RETRIES.fetch_add(value, Ordering::Relaxed);
        self.inner.increment(value);
    }

    fn absolute(&self, value: u64) {
        RETRIES.fetch_max(value, Ordering::Relaxed);
        self.inner.absolute(value);
    }
}

impl metrics::Recorder for CliRecorder {
    fn describe_counter(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        if let Some(r) = &self.inner {
            r.describe_counter(key, unit, description);
        }
    }

    fn describe_gauge(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        if let Some(r) = &self.inner {
            r.describe_gauge(key, unit, description);
        }
    }

    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        if let Some(r) = &self.inner {
            r.describe_histogram(key, unit, description);
        }
    }

    fn register_counter(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Counter {
        let inner = match &self.inner {
            Some(r) => r.register_counter(key, metadata),
            None => metrics::Counter::noop(),
        };
        if key.name() == "jetsink_retries_total" {
            metrics::Counter::from_arc(Arc::new(CountingCounter { inner }))
        } else {
            inner
        }
    }

    fn register_gauge(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Gauge {
        match &self.inner {
            Some(r) => r.register_gauge(key, metadata),
            None => metrics::Gauge::noop(),
        }
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        match &self.inner {
            Some(r) => r.register_histogram(key, metadata),
            None => metrics::Histogram::noop(),
        }
    }
}
