//! `jetsink demo`: deliver CloudEvents through a broker crash (kill -9 + restart) and audit the stream.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{FuturesUnordered, StreamExt};
use sink_nats::audit::{compare, read_stream, Expected};
use sink_nats::sink_core::event::{CloudEvent, MsgId};
use sink_nats::{
    EmitError, JetStreamSink, Mechanism, OrderingKey, Pending, Receipt, SinkBuilder, StreamPolicy,
};
use sink_testkit::{FaultProxy, NatsServer, ProxyMode, ServerOptions, ServerVersion};
use tokio::sync::{mpsc, oneshot};

/// Stream the demo writes to.
const DEMO_STREAM: &str = "DEMO_EVENTS";
/// Subject template the demo's events are published under.
const DEMO_SUBJECTS: &str = "demo.events.{tenantId}.v1";

/// Arguments of `jetsink demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of CloudEvents to publish.
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// Number of tenants the events are spread over (each tenant is one ordering key).
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// Events offered per second (the broker is killed while they keep coming).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Kill the broker once this share of the events has been sent (0.0-1.0).
    #[arg(long, default_value_t = 0.4)]
    pub kill_at: f64,
    /// How long the broker stays down, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub outage_ms: u64,
    /// nats-server release for the local broker (`2.9` or `2.15`); ignored with an explicit `--url`.
    #[arg(long, default_value = "2.9", value_parser = parse_version)]
    pub server: ServerVersion,
}

fn parse_version(s: &str) -> Result<ServerVersion, String> {
    match s {
        "2.9" | "2.9.10" => Ok(ServerVersion::V2_9),
        "2.15" | "2.15.1" => Ok(ServerVersion::V2_15),
        other => Err(format!("unknown server version `{other}`; use 2.9 or 2.15")),
    }
}

/// The broker the demo runs against and how it takes it down.
enum Broker {
    /// A nats-server the demo started: killed with SIGKILL and restarted on the same port and store.
    Local(Box<NatsServer>),
    /// Someone else's server: the outage is simulated by a loopback proxy that resets every
    /// connection and refuses new ones.
    External(FaultProxy),
}

/// What the kill/restart task measured.
struct OutageTimes {
    /// From the kill until the broker answered again.
    down: Duration,
}

/// Runs the demo; exit code 0 only if nothing was lost, duplicated or reordered.
pub async fn run(args: DemoArgs, common: &crate::config::Common) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(
        (1..=1000).contains(&args.tenants),
        "--tenants must be between 1 and 1000"
    );
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.kill_at),
        "--kill-at must be between 0.0 and 1.0"
    );
    let total_start = Instant::now();

    // A broker named by flag or NATS_URL is used as is; otherwise the demo brings its own.
    let (broker, builder) = if common.url.is_some() {
        let mut config = common.sink_config()?;
        let url = config.servers.first().cloned().context("no server URL")?;
        let upstream = host_port(&url)?;
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .with_context(|| format!("starting a loopback proxy to {upstream}"))?;
        println!(
            "demo: using the server at {} through a loopback proxy {} (the outage resets and refuses connections)",
            sink_nats::redact_url(&url),
            proxy.url()
        );
        config.servers = vec![proxy.url()];
        (Broker::External(proxy), SinkBuilder::from_config(config))
    } else {
        let server = NatsServer::start(ServerOptions::version(args.server))
            .await
            .context("starting a local nats-server (set JETSINK_NATS_SERVER_2_9 or run `cargo xtask demo`)")?;
        println!(
            "demo: started nats-server {} (pid {}) at {}, store {}",
            args.server.as_str(),
            server.pid().map_or_else(|| "?".into(), |p| p.to_string()),
            server.url(),
            server.store_dir().display()
        );
        let url = server.url();
        (Broker::Local(Box::new(server)), JetStreamSink::builder(url))
    };

    // A stream left by an earlier demo would show up as unexpected messages in the audit.
    let mut config = builder.config().clone();
    config.subject_template = DEMO_SUBJECTS.into();
    config.stream = DEMO_STREAM.into();
    config.stream_policy = StreamPolicy::Create;
    config.ordering_key = OrderingKey::Tenant;
    config.max_events = config.max_events.max(args.events);
    let client = sink_nats::connect_client(&config).await?;
    let js = async_nats::jetstream::new(client);
    if js.delete_stream(DEMO_STREAM).await.is_ok() {
        println!("demo: deleted the {DEMO_STREAM} stream of an earlier run");
    }

    let lanes = config.lanes;
    let sink = SinkBuilder::from_config(config)
        .connect()
        .await
        .context("connecting the sink")?;
    let health = sink.health();
    let delivery = match health.mechanism {
        Mechanism::FastBatch => format!("{} per tenant, up to {lanes} lanes", health.mechanism),
        _ => format!(
            "{}, ordering {} per tenant",
            health.mechanism, health.ordering
        ),
    };
    println!(
        "demo: sink connected (server {}, {delivery}), stream {DEMO_STREAM} created",
        health.server_version,
    );

    // The kill/restart runs beside the sender, so events keep arriving while the broker is down.
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let outage = Duration::from_millis(args.outage_ms);
    let broker_task = tokio::spawn(outage_task(broker, kill_rx, outage));

    // Outcomes are collected as they arrive so progress can show deliveries during the outage.
    let delivered = Arc::new(AtomicUsize::new(0));
    let (pending_tx, pending_rx) = mpsc::unbounded_channel::<(usize, Pending)>();
    let collector = tokio::spawn(collect(pending_rx, args.events, Arc::clone(&delivered)));

    let run_id = unix_millis();
    let kill_index = ((args.events as f64) * args.kill_at).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let progress_every = (args.events / 10).max(1);
    let mut expected = Vec::with_capacity(args.events);
    let mut kill_tx = Some(kill_tx);
    let send_start = Instant::now();
    for i in 0..args.events {
        if i == kill_index {
            if let Some(tx) = kill_tx.take() {
                println!(
                    "demo: {i} sent -> killing the broker (kill -9), restart in {:.1} s",
                    outage.as_secs_f64()
                );
                let _ = tx.send(());
            }
        }
        let tenant = format!("tenant-{}", i % args.tenants);
        let event = CloudEvent::new(
            format!("demo-{run_id}-{i}"),
            "/jetsink/demo",
            "io.jetsink.demo.tick",
        )
        .with_data_json(serde_json::json!({ "tenantId": tenant, "n": i }));
        expected.push((MsgId::for_event(&event).as_str().to_owned(), tenant));
        let pending = sink
            .send(event)
            .await
            .with_context(|| format!("event {i} was not accepted"))?;
        let _ = pending_tx.send((i, pending));
        if (i + 1) % progress_every == 0 {
            let h = sink.health();
            println!(
                "demo: sent {:>6}/{}  delivered {:>6}  queued {:>6}  in flight {:>4}  breaker {:?}",
                i + 1,
                args.events,
                delivered.load(Ordering::Relaxed),
                h.queued,
                h.in_flight,
                h.breaker
            );
        }
        // Pace against the schedule, not the previous send, so a slow send is caught up.
        let due = send_start + interval * (i as u32 + 1);
        tokio::time::sleep_until(due.into()).await;
    }
    if let Some(tx) = kill_tx.take() {
        let _ = tx.send(());
    }
    drop(pending_tx);
    let sent_time = send_start.elapsed();
    println!(
        "demo: all {} sent in {:.2} s; waiting for every outcome",
        args.events,
        sent_time.as_secs_f64()
    );

    let (broker, times) = broker_task.await.context("the broker task panicked")??;
    let outcomes = collector.await.context("the outcome collector panicked")?;
    let report = sink.close(Duration::from_secs(30)).await;
    let total = total_start.elapsed();

    let stored = read_stream(&js, DEMO_STREAM, Duration::from_secs(60))
        .await
        .context("reading the stream back")?;
    let expected: Vec<Expected> = expected
        .into_iter()
        .zip(&outcomes)
        .map(|((msg_id, key), outcome)| Expected {
            msg_id,
            key,
            reported_sequence: outcome.as_ref().and_then(|r| r.as_ref().ok()).map(|r| {
                r.sequence
                    .unwrap_or(sink_nats::sink_core::audit::SEQUENCE_NOT_REPORTED)
            }),
        })
        .collect();
    let audit = compare(&expected, &stored);

    let delivered = outcomes.iter().filter(|o| matches!(o, Some(Ok(_)))).count();
    let acked_duplicates = outcomes
        .iter()
        .filter(|o| matches!(o, Some(Ok(r)) if r.duplicate))
        .count();
    let failed: Vec<&EmitError> = outcomes
        .iter()
        .filter_map(|o| match o {
            Some(Err(e)) => Some(e),
            _ => None,
        })
        .collect();
    let unresolved = outcomes.iter().filter(|o| o.is_none()).count();
    let stored_ids: std::collections::HashSet<&str> =
        stored.iter().filter_map(|m| m.msg_id.as_deref()).collect();
    let lost = expected
        .iter()
        .filter(|e| !stored_ids.contains(e.msg_id.as_str()))
        .count();
    let stored_duplicates: usize = audit
        .duplicates
        .iter()
        .map(|(_, seqs)| seqs.len() - 1)
        .sum();
    let reordered = audit.out_of_order.len();

    let rows: Vec<(&str, String)> = vec![
        ("sent", args.events.to_string()),
        ("delivered (acked)", delivered.to_string()),
        ("stored in stream", stored.len().to_string()),
        (
            "duplicates acked (retries deduplicated)",
            acked_duplicates.to_string(),
        ),
        ("stored duplicates", stored_duplicates.to_string()),
        ("out of order", reordered.to_string()),
        ("lost", lost.to_string()),
        ("failed (reported)", failed.len().to_string()),
        ("without outcome at close", unresolved.to_string()),
        ("total time", format!("{:.2} s", total.as_secs_f64())),
        (
            "outage (kill -> broker back)",
            format!("{:.2} s", times.down.as_secs_f64()),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!();
    println!("{:<width$}  {:>10}", "jetsink demo", "", width = width);
    println!("{}", "-".repeat(width + 12));
    for (k, v) in &rows {
        println!("{k:<width$}  {v:>10}");
    }
    for e in failed.iter().take(5) {
        println!("failed: {e}");
    }
    if !report.complete() {
        println!(
            "close: {} events not delivered by the deadline",
            report.not_delivered.len()
        );
    }
    let ok = lost == 0
        && stored_duplicates == 0
        && reordered == 0
        && failed.is_empty()
        && unresolved == 0
        && audit.passed();
    if !audit.passed() {
        println!("\naudit:\n{audit}");
    }
    println!(
        "\n{}",
        if ok {
            "PASS: every event stored exactly once, in order per tenant, despite the broker crash"
        } else {
            "FAIL: see the table above"
        }
    );
    drop(broker);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Waits for the signal, takes the broker down for `outage`, brings it back; returns it for the audit.
async fn outage_task(
    mut broker: Broker,
    kill: oneshot::Receiver<()>,
    outage: Duration,
) -> anyhow::Result<(Broker, OutageTimes)> {
    let _ = kill.await;
    let start = Instant::now();
    match &mut broker {
        Broker::Local(server) => {
            server.kill().await.context("kill -9 of the broker")?;
            println!("demo: broker killed");
            tokio::time::sleep(outage).await;
            server.restart().await.context("restarting the broker")?;
        }
        Broker::External(proxy) => {
            proxy.set_mode(ProxyMode::RefuseNew);
            proxy.reset_all();
            println!("demo: connections reset, new ones refused");
            tokio::time::sleep(outage).await;
            proxy.set_mode(ProxyMode::PassThrough);
        }
    }
    let down = start.elapsed();
    println!("demo: broker back after {:.2} s", down.as_secs_f64());
    Ok((broker, OutageTimes { down }))
}

/// Awaits every outcome; slot `i` holds event `i`'s result (`None`: the handle was dropped).
async fn collect(
    mut rx: mpsc::UnboundedReceiver<(usize, Pending)>,
    n: usize,
    delivered: Arc<AtomicUsize>,
) -> Vec<Option<Result<Receipt, EmitError>>> {
    let mut out: Vec<Option<Result<Receipt, EmitError>>> = (0..n).map(|_| None).collect();
    let mut waiting = FuturesUnordered::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        tokio::select! {
            next = rx.recv(), if open => match next {
                Some((i, pending)) => waiting.push(async move { (i, pending.await) }),
                None => open = false,
            },
            Some((i, result)) = waiting.next(), if !waiting.is_empty() => {
                if result.is_ok() {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                out[i] = Some(result);
            }
        }
    }
    out
}

/// `host:port` of a NATS URL (`nats://user:pass@host:port` -> `host:port`), for the proxy upstream.
pub(crate) fn host_port(url: &str) -> anyhow::Result<String> {
    let first = sink_nats::ServerUrl::parse(url.split(',').next().unwrap_or(url))?;
    Ok(format!("{}:{}", first.host(), first.port()))
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
