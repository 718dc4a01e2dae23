//! The public sink: builder, `emit` / `send` / `flush` / `close` / `health`, and the `EventSink` trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sink_core::backoff::{deadline_after, Backoff, RetrySchedule};
use sink_core::encoding::{self, Encoding};
use sink_core::event::{CloudEvent, MsgId};
use sink_core::outbox::{BreakerOpenPolicy, Message, OrderingMode};
use sink_core::spool::payload::SpooledEvent;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

use crate::clock;
use crate::config::{Auth, Batching, OrderingKey, SinkConfig, StreamPolicy, Tls, WhenFull};
use crate::connect::{connect_error, connect_options, server_addrs, validate};
use crate::driver::{self, Started};
use crate::error::{EmitError, StartError};
use crate::handle::{
    permit_count, CloseReport, Command, Health, Permits, Receipt, Shared, SPOOL_CLOSE_MARK,
};
use crate::provision::{check_stream, Provisioner};
use crate::server_url::redacted_servers;
use crate::spool::{DiskSpool, Durability, RecordSeq, Replay, SpoolConfig, SpoolError};
use crate::subjects::Subjects;
use crate::transport::Transport;
use crate::wire::worst_case_wire_size;

/// A handle to one event's outcome; resolves to its [`Receipt`] once stored.
#[derive(Debug)]
pub struct Pending {
    rx: oneshot::Receiver<Result<Receipt, EmitError>>,
}

impl Future for Pending {
    type Output = Result<Receipt, EmitError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(EmitError::Closed)))
    }
}

/// An event [`JetStreamSink::stage`] has queued, in call order, but whose spool record may not be
/// on disk yet: `durable` resolves when it is (at once without a spool); `pending` resolves
/// when the stream has stored the event.
#[derive(Debug)]
pub struct Staged {
    /// Resolves once the event is durable in the spool: only then is it accepted.
    pub durable: Durable,
    /// The event's outcome.
    pub pending: Pending,
}

/// Resolves once a staged event is durable in the spool (see [`Staged`]).
#[derive(Debug)]
#[must_use = "a staged event is accepted only once this resolves"]
pub struct Durable {
    inner: Option<(Durability, String)>,
}

impl Future for Durable {
    type Output = Result<(), EmitError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some((durability, event_id)) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        Pin::new(durability).poll(cx).map(|r| {
            r.map(drop).map_err(|error| EmitError::Spool {
                event_id: event_id.clone(),
                error,
            })
        })
    }
}

/// A durable, ordered CloudEvent sink into one JetStream stream.
///
/// Cheap to clone; all clones feed the same driver task. See the crate docs for an example.
#[derive(Clone)]
pub struct JetStreamSink {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    subjects: Subjects,
    encoding: Encoding,
    ordering_key: OrderingKey,
    /// The tenant token of events without one (their per-tenant ordering key, as their subject).
    default_tenant: String,
    /// The `Nats-Expected-Stream` value publishes may carry.
    expected_stream: Option<String>,
    events: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_events: usize,
    max_bytes: usize,
    when_full: WhenFull,
    fail_fast: bool,
    /// The local spool, when configured: `send` accepts an event once it is durable there.
    spool: Option<DiskSpool>,
}

impl std::fmt::Debug for JetStreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSink")
            .field("health", &self.health())
            .finish()
    }
}

impl JetStreamSink {
    /// A builder for `servers` (one URL or a comma-separated list).
    pub fn builder(servers: impl Into<String>) -> SinkBuilder {
        SinkBuilder::new(servers)
    }

    /// Sends one event and waits until it is stored (or definitely failed).
    pub async fn emit(&self, event: &CloudEvent) -> Result<Receipt, EmitError> {
        self.send(event.clone()).await?.await
    }

    /// Queues one event and returns once it is accepted; the returned [`Pending`] resolves when it
    /// is stored. Waits for room only under [`WhenFull::Block`].
    ///
    /// Each event gets a `jetsink.event` tracing span (level DEBUG) carrying its CloudEvent id,
    /// source and type; the driver's per-event records (transmit, retry, delivered with the stream
    /// sequence, rejected, not delivered) are emitted inside it.
    ///
    /// With a [spool](SinkBuilder::spool), accepted means durable on local disk: `send` returns
    /// once the event's record is fdatasync'd, about a broker round trip. A producer that needs
    /// speed [`stage`](Self::stage)s events one after another and awaits their durability in a
    /// window: every record staged during one fdatasync shares the next. (Sends polled
    /// concurrently, as in `FuturesOrdered`, are not ordered among themselves.)
    pub async fn send(&self, event: CloudEvent) -> Result<Pending, EmitError> {
        let span = event_span(&event);
        let (message, event_id) = self.prepare(&event)?;
        let started = clock::now();
        let staged = self
            .stage_prepared(message, event_id, span, started)
            .await?;
        staged.durable.await?;
        Ok(staged.pending)
    }

    /// Queues one event, in call order, without waiting for its spool record to reach the disk:
    /// for a producer that keeps many events in flight through a spooled sink. Each `stage`
    /// returns once the event has its place in the spool and in the delivery queue (awaited one
    /// after another they keep their order); [`Staged::durable`] resolves when the record is
    /// fdatasync'd (every record staged during one fdatasync shares the next), and only then is
    /// the event accepted. Without a spool it is [`send`](Self::send) with `durable` ready at
    /// once. If `durable` fails, the event was not accepted (it may still be delivered: sending
    /// it again is deduplicated by its message id).
    pub async fn stage(&self, event: CloudEvent) -> Result<Staged, EmitError> {
        let span = event_span(&event);
        let (message, event_id) = self.prepare(&event)?;
        self.stage_prepared(message, event_id, span, clock::now())
            .await
    }

    async fn stage_prepared(
        &self,
        message: Message,
        event_id: String,
        span: tracing::Span,
        started: std::time::Instant,
    ) -> Result<Staged, EmitError> {
        let permits = self.admit(message.size()).instrument(span.clone()).await?;
        let Some(spool) = &self.inner.spool else {
            let pending = self.enqueue(message, event_id, permits, span, None)?;
            return Ok(Staged {
                durable: Durable { inner: None },
                pending,
            });
        };
        // The event takes its place in the spool and in the delivery queue in one step (no
        // await between), so both orders are the call order.
        let durability = self
            .spool_submit(spool, &message, &event_id, started)
            .instrument(span.clone())
            .await?;
        let seq = durability.seq();
        let pending = self.enqueue(message, event_id.clone(), permits, span, Some(seq))?;
        Ok(Staged {
            durable: Durable {
                inner: Some((durability, event_id)),
            },
            pending,
        })
    }

    /// Gives the event its place in the spool (its record is written with the next group
    /// commit). A full spool is waited out (or not) as a full queue is, per [`WhenFull`].
    async fn spool_submit(
        &self,
        spool: &DiskSpool,
        message: &Message,
        event_id: &str,
        started: std::time::Instant,
    ) -> Result<Durability, EmitError> {
        let payload = SpooledEvent {
            message: message.clone(),
            event_id: event_id.to_owned(),
            unix_ms: clock::unix_ms(),
        }
        .encode()
        // Only a field past 4 GiB (or 65,535 headers) does not fit the payload form.
        .map_err(|_| EmitError::Spool {
            event_id: event_id.to_owned(),
            error: SpoolError::TooLarge {
                len: message.size(),
                max: u32::MAX,
            },
        })?;
        let deadline = match self.inner.when_full {
            WhenFull::Block { deadline } => deadline_after(started, deadline),
            WhenFull::Reject => started,
        };
        loop {
            match spool.submit(&payload).await {
                Ok(durability) => return Ok(durability),
                Err(SpoolError::Full { .. }) if clock::now() < deadline => {
                    // Room comes back as the broker acks what the spool holds.
                    tokio::time::sleep(SPOOL_FULL_RETRY).await;
                }
                Err(error) => {
                    return Err(EmitError::Spool {
                        event_id: event_id.to_owned(),
                        error,
                    })
                }
            }
        }
    }

    /// Like [`send`](Self::send) but never waits: a full queue fails at once.
    pub fn try_send(&self, event: CloudEvent) -> Result<Pending, EmitError> {
        if self.inner.spool.is_some() {
            return Err(EmitError::SpoolNeedsSend { event_id: event.id });
        }
        let span = event_span(&event);
        let (message, event_id) = self.prepare(&event)?;
        let permits = self.try_admit(message.size(), Duration::ZERO)?;
        self.enqueue(message, event_id, permits, span, None)
    }

    /// Waits until every event accepted before this call has an outcome.
    pub async fn flush(&self) -> Result<(), EmitError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Flush { reply })
            .map_err(|_| EmitError::Closed)?;
        rx.await.map_err(|_| EmitError::Closed)
    }

    /// Stops accepting events, waits up to `deadline` for the queue to drain, and reports exactly
    /// which events were not confirmed. `Duration::MAX` waits for as long as it takes.
    ///
    /// Every call gets the same report, however many there are and whenever they come: a close
    /// after the sink ended (an earlier close) returns at once with the report of that end.
    /// While a close is under way, a second one with an earlier deadline ends it sooner.
    pub async fn close(&self, deadline: Duration) -> CloseReport {
        let report = self.close_driver(deadline).await;
        if let Some(spool) = &self.inner.spool {
            close_spool(spool).await;
        }
        report
    }

    async fn close_driver(&self, deadline: Duration) -> CloseReport {
        let (reply, rx) = oneshot::channel();
        let deadline = deadline_after(clock::now(), deadline);
        if self
            .inner
            .tx
            .send(Command::Close { deadline, reply })
            .is_ok()
        {
            if let Ok(report) = rx.await {
                return report;
            }
        }
        // The driver has ended, and leaves its report behind before it stops taking commands
        // (or, at the latest, as it is dropped).
        let mut ended = self.inner.shared.final_report.subscribe();
        let report = ended.wait_for(Option::is_some).await;
        report.ok().and_then(|r| r.clone()).unwrap_or_default()
    }

    /// A snapshot of the sink's state, as the driver last published it.
    pub fn health(&self) -> Health {
        let mut health = self.inner.shared.health.borrow().clone();
        health.spool = self.inner.spool.as_ref().map(DiskSpool::stats);
        health
    }

    fn prepare(&self, event: &CloudEvent) -> Result<(Message, String), EmitError> {
        let inner = &self.inner;
        // `encode` validates the event first; validating here as well would double the cost.
        let wire = encoding::encode(event, inner.encoding).map_err(|error| match error {
            encoding::EncodeError::InvalidEvent(e) => EmitError::InvalidEvent(e),
            error => EmitError::Encode {
                event_id: event.id.clone(),
                error,
            },
        })?;
        let subject = inner
            .subjects
            .render(event)
            .map_err(|error| EmitError::Subject {
                event_id: event.id.clone(),
                error,
            })?;
        let msg_id = MsgId::for_event(event);
        let key = match inner.ordering_key {
            OrderingKey::Sink => String::new(),
            // An event without a tenant renders to the default token (or was refused above), so
            // it is ordered with the events that name that tenant explicitly.
            OrderingKey::Tenant => event
                .tenant_id()
                .unwrap_or(&inner.default_tenant)
                .to_owned(),
            OrderingKey::Subject => subject.clone(),
        };
        let message = Message {
            subject,
            msg_id,
            headers: wire.headers,
            body: wire.body,
            key,
        };
        // What the server will count, with every header any transmission of it may carry, against
        // the limit of the server connected now (the driver refreshes it on every connect).
        let size = worst_case_wire_size(&message, inner.expected_stream.as_deref());
        let max_payload = inner.shared.max_payload();
        if size > max_payload {
            return Err(EmitError::TooLarge {
                event_id: event.id.clone(),
                size,
                max_payload,
            });
        }
        // A message larger than the whole byte bound would wait for room forever.
        let queued = message.size();
        if queued > inner.max_bytes {
            return Err(EmitError::ExceedsQueue {
                event_id: event.id.clone(),
                size: queued,
                max_bytes: inner.max_bytes,
            });
        }
        Ok((message, event.id.clone()))
    }

    async fn admit(&self, size: usize) -> Result<Permits, EmitError> {
        let inner = &self.inner;
        let deadline = match inner.when_full {
            WhenFull::Reject => return self.try_admit(size, Duration::ZERO),
            WhenFull::Block { deadline } => deadline,
        };
        if inner.fail_fast && inner.shared.breaker_open() {
            return Err(EmitError::BreakerOpen);
        }
        let started = clock::now();
        let full = || EmitError::QueueFull {
            max_events: inner.max_events,
            max_bytes: inner.max_bytes,
            waited: clock::now().saturating_duration_since(started),
        };
        let acquire = async {
            let event = inner.events.clone().acquire_owned().await;
            let bytes = inner
                .bytes
                .clone()
                .acquire_many_owned(permit_count(size))
                .await;
            match (event, bytes) {
                (Ok(event), Ok(bytes)) => Ok(Permits { event, bytes }),
                _ => Err(EmitError::Closed),
            }
        };
        match tokio::time::timeout(deadline, acquire).await {
            Ok(r) => r,
            Err(_) => Err(full()),
        }
    }

    fn try_admit(&self, size: usize, waited: Duration) -> Result<Permits, EmitError> {
        let inner = &self.inner;
        if inner.fail_fast && inner.shared.breaker_open() {
            return Err(EmitError::BreakerOpen);
        }
        let full = EmitError::QueueFull {
            max_events: inner.max_events,
            max_bytes: inner.max_bytes,
            waited,
        };
        let event: OwnedSemaphorePermit = inner
            .events
            .clone()
            .try_acquire_owned()
            .map_err(|_| full.clone())?;
        let bytes = inner
            .bytes
            .clone()
            .try_acquire_many_owned(permit_count(size))
            .map_err(|_| full)?;
        Ok(Permits { event, bytes })
    }

    fn enqueue(
        &self,
        message: Message,
        event_id: String,
        permits: Permits,
        span: tracing::Span,
        spool_seq: Option<RecordSeq>,
    ) -> Result<Pending, EmitError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Emit {
                message,
                event_id,
                permits,
                span,
                reply,
                spool_seq,
            })
            .map_err(|_| EmitError::Closed)?;
        Ok(Pending { rx })
    }
}

/// How often a `send` blocked by a full spool tries again.
const SPOOL_FULL_RETRY: Duration = Duration::from_millis(10);

/// Persists the acknowledgements with a close mark, then closes the spool.
async fn close_spool(spool: &DiskSpool) {
    match spool.append(SPOOL_CLOSE_MARK).await {
        Ok(seq) => {
            spool.ack(seq);
        }
        Err(SpoolError::Closed { .. }) => return,
        Err(e) => {
            tracing::warn!(error = %e, "spool: could not record the acknowledgements at close; events the broker stored may be sent again at the next start")
        }
    }
    if let Err(e) = spool.close().await {
        tracing::warn!(error = %e, "spool close");
    }
}

/// The per-event span; disabled (and nearly free) unless a subscriber wants DEBUG for this crate.
fn event_span(event: &CloudEvent) -> tracing::Span {
    tracing::debug_span!(
        "jetsink.event",
        ce.id = %event.id,
        ce.source = %event.source,
        ce.type = %event.ty,
        stream_seq = tracing::field::Empty,
    )
}

/// An async sink of CloudEvents, so services can swap implementations (a test double, another
/// broker).
pub trait EventSink: Send + Sync {
    /// Delivers one event durably; resolves once it is stored.
    fn emit(&self, event: &CloudEvent) -> impl Future<Output = Result<Receipt, EmitError>> + Send;
}

impl EventSink for JetStreamSink {
    fn emit(&self, event: &CloudEvent) -> impl Future<Output = Result<Receipt, EmitError>> + Send {
        JetStreamSink::emit(self, event)
    }
}

/// Builds a [`JetStreamSink`]; every setting has a documented default (see [`SinkConfig`]).
#[derive(Debug, Clone)]
pub struct SinkBuilder {
    config: SinkConfig,
}

impl SinkBuilder {
    /// Starts from the defaults with these servers (comma-separated list allowed).
    pub fn new(servers: impl Into<String>) -> Self {
        let servers: String = servers.into();
        Self {
            config: SinkConfig {
                servers: servers
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
                ..SinkConfig::default()
            },
        }
    }

    /// Starts from a full config.
    pub fn from_config(config: SinkConfig) -> Self {
        Self { config }
    }

    /// The config as built so far.
    pub fn config(&self) -> &SinkConfig {
        &self.config
    }

    /// Subject template (default `cellos.events.{tenantId}.v1`).
    pub fn subject_template(mut self, template: impl Into<String>) -> Self {
        self.config.subject_template = template.into();
        self
    }
    /// Token for `{tenantId}` when an event has none (default `single`, as the seed
    /// `cellos-sink-jetstream`). It must be a valid token (`connect` fails naming it otherwise).
    /// An event whose tenant is present but invalid still fails alone; it never falls back here.
    pub fn default_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.config.default_tenant = tenant.into();
        self
    }
    /// Refuse events without a tenant instead of sending them to the default tenant (default
    /// off). Such an event fails alone with [`EmitError::Subject`] carrying
    /// [`sink_core::subject::SubjectError::MissingTenant`]; the events after it are delivered.
    ///
    /// ```no_run
    /// use sink_nats::{EmitError, JetStreamSink};
    /// use sink_nats::sink_core::event::CloudEvent;
    /// use sink_nats::sink_core::subject::SubjectError;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let untenanted = CloudEvent::new("evt-1", "/svc/billing", "com.example.invoice.paid");
    ///
    /// // As the seed: no tenant means the default token, `single`.
    /// let sink = JetStreamSink::builder("nats://127.0.0.1:4222").connect().await?;
    /// sink.emit(&untenanted).await?; // stored under cellos.events.single.v1
    ///
    /// // Strict: that event fails alone, naming the missing field.
    /// let strict = JetStreamSink::builder("nats://127.0.0.1:4222")
    ///     .require_tenant(true)
    ///     .connect()
    ///     .await?;
    /// let refused = strict.emit(&untenanted).await;
    /// assert!(matches!(
    ///     refused,
    ///     Err(EmitError::Subject { error: SubjectError::MissingTenant, .. })
    /// ));
    /// # Ok(()) }
    /// ```
    pub fn require_tenant(mut self, required: bool) -> Self {
        self.config.require_tenant = required;
        self
    }
    /// Stream name (default `CELLOS_EVENTS`).
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.config.stream = name.into();
        self
    }
    /// Stream policy (default Verify).
    pub fn stream_policy(mut self, policy: StreamPolicy) -> Self {
        self.config.stream_policy = policy;
        self
    }
    /// Retention floor (default 90 days).
    pub fn retention_floor(mut self, floor: Duration) -> Self {
        self.config.retention_floor = floor;
        self
    }
    /// How often the running sink re-verifies its stream (default 60 s); it also does on every
    /// reconnect. `Duration::ZERO` or `Duration::MAX` turns the periodic check off. See
    /// [`Health::stream_violations`] for what a drift does.
    pub fn reverify_interval(mut self, interval: Duration) -> Self {
        self.config.reverify_interval = interval;
        self
    }
    /// Ordering mode (default chained).
    pub fn ordering(mut self, mode: OrderingMode) -> Self {
        self.config.ordering = mode;
        self
    }
    /// Whether fast-batch lanes may be used (default [`Batching::Auto`]: on nats-server 2.14+
    /// when the stream allows batches).
    pub fn batching(mut self, batching: Batching) -> Self {
        self.config.batching = batching;
        self
    }
    /// Most fast-batch lanes with a tenant or subject ordering key (1 to 64, default 4); see
    /// [`SinkConfig::lanes`].
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.config.lanes = lanes;
        self
    }
    /// A local spool directory (see [`SinkConfig::spool`]): `send` accepts an event only once
    /// it is durable there, and what an earlier process left is delivered first, in order.
    pub fn spool(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.config.spool = Some(dir.into());
        self
    }
    /// Bytes the spool may hold (default 1 GiB).
    pub fn spool_max_bytes(mut self, bytes: u64) -> Self {
        self.config.spool_max_bytes = bytes;
        self
    }
    /// Ordering key (default: the whole sink).
    pub fn ordering_key(mut self, key: OrderingKey) -> Self {
        self.config.ordering_key = key;
        self
    }
    /// Publishes in flight (default 1024).
    pub fn window(mut self, window: usize) -> Self {
        self.config.window = window;
        self
    }
    /// Queue bounds (default 100 000 events, 64 MiB).
    pub fn queue_bound(mut self, max_events: usize, max_bytes: usize) -> Self {
        self.config.max_events = max_events;
        self.config.max_bytes = max_bytes;
        self
    }
    /// When-full policy (default: block up to 30 s).
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.config.when_full = policy;
        self
    }
    /// Breaker-open policy (default: queue).
    pub fn when_breaker_open(mut self, policy: BreakerOpenPolicy) -> Self {
        self.config.when_breaker_open = policy;
        self
    }
    /// Ack timeout (default 5 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.config.ack_timeout = timeout;
        self
    }
    /// Per-publish retry delays (default 100 ms, 400 ms).
    pub fn retry(mut self, schedule: RetrySchedule) -> Self {
        self.config.retry = schedule;
        self
    }
    /// Breaker backoff between probes while the broker fails (default 100 ms * 2^n capped at
    /// 180 s, as the seed). The client's own reconnect attempts follow it too but are never more
    /// than 1 s apart, and a reconnect sends the probe at once: delivery resumes within about a
    /// second of the server's return however long the outage was.
    pub fn reconnect(mut self, backoff: Backoff) -> Self {
        self.config.reconnect = backoff;
        self
    }
    /// Wire encoding (default structured).
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.config.encoding = encoding;
        self
    }
    /// Keep retrying the first connect in the background instead of failing.
    pub fn retry_initial_connect(mut self, on: bool) -> Self {
        self.config.retry_initial_connect = on;
        self
    }
    /// Authentication.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.config.auth = auth;
        self
    }
    /// TLS.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.config.tls = tls;
        self
    }
    /// Client ping interval (default 2 s; must be positive).
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.config.ping_interval = interval;
        self
    }
    /// Timeout of one connection attempt (default 5 s; must be positive).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }
    /// Client connection name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Connects, checks the stream per policy, and starts the driver task.
    pub async fn connect(self) -> Result<JetStreamSink, StartError> {
        let config = self.config;
        let subjects = Subjects::new(&config)?;
        validate(&config)?;
        // The spool first: a directory another process holds, or of a newer format, stops the
        // start before anything connects.
        let spool = open_spool(&config).await?;
        let mut started = start(&config, &subjects).await?;
        started.spool = spool;
        Ok(JetStreamSink::spawn(config, subjects, started))
    }

    /// Starts the driver over another [`Transport`] than async-nats (the test kit's scripted
    /// broker): the same driver, fed connection events on `events`. There is no JetStream API
    /// behind such a transport, so the config must say `stream_policy(StreamPolicy::Off)`.
    pub fn start_on<T: Transport>(
        self,
        transport: T,
        events: mpsc::UnboundedReceiver<async_nats::Event>,
    ) -> Result<JetStreamSink, StartError> {
        let config = self.config;
        if config.stream_policy != StreamPolicy::Off {
            return Err(StartError::Config {
                field: "stream_policy",
                problem: "a sink on a custom transport cannot check its stream; \
                          set StreamPolicy::Off"
                    .to_owned(),
            });
        }
        if config.spool.is_some() {
            return Err(StartError::Config {
                field: "spool",
                problem: "a sink on a custom transport runs without a spool; unset it".to_owned(),
            });
        }
        let subjects = Subjects::new(&config)?;
        validate(&config)?;
        let started = Started {
            transport,
            events,
            provision: None,
            checked: None,
            stream_checked: true,
            spool: None,
        };
        Ok(JetStreamSink::spawn(config, subjects, started))
    }
}

impl JetStreamSink {
    /// Starts the driver task on `started` and returns the handle to it.
    fn spawn<T: Transport>(config: SinkConfig, subjects: Subjects, started: Started<T>) -> Self {
        let shared = Arc::new(Shared::new(
            started.transport.server_version(),
            config.window,
            config.ordering,
            started.transport.max_payload(),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Inner {
            tx,
            shared: shared.clone(),
            subjects,
            encoding: config.encoding,
            ordering_key: config.ordering_key,
            default_tenant: config.default_tenant.clone(),
            // The driver sends `Nats-Expected-Stream` only with a stream policy.
            expected_stream: (config.stream_policy != StreamPolicy::Off)
                .then(|| config.stream.clone()),
            events: Arc::new(Semaphore::new(config.max_events)),
            bytes: Arc::new(Semaphore::new(config.max_bytes)),
            max_events: config.max_events,
            max_bytes: config.max_bytes,
            when_full: config.when_full,
            fail_fast: config.when_breaker_open == BreakerOpenPolicy::FailFast,
            spool: started.spool.as_ref().map(|(spool, _)| spool.clone()),
        };
        driver::spawn(config, started, rx, shared);
        JetStreamSink {
            inner: Arc::new(inner),
        }
    }
}

/// Connects and checks the stream per policy.
async fn start(
    config: &SinkConfig,
    subjects: &Subjects,
) -> Result<Started<async_nats::Client>, StartError> {
    let (ev_tx, events) = mpsc::unbounded_channel();
    let mut opts = connect_options(config).await?.event_callback(move |e| {
        let tx = ev_tx.clone();
        async move {
            let _ = tx.send(e);
        }
    });
    if config.retry_initial_connect {
        opts = opts.retry_on_initial_connect();
    }
    let client = opts
        .connect(server_addrs(config)?)
        .await
        .map_err(|e| connect_error(&e, config))?;
    if config.retry_initial_connect {
        await_first_connection(&client, config.connect_timeout).await;
    }
    let policy_on = config.stream_policy != StreamPolicy::Off;
    let connected = !client.server_info().server_id.is_empty();
    let checked = if policy_on && connected {
        let servers = redacted_servers(&config.servers);
        Some(check_stream(&client, config, subjects, &servers).await?)
    } else {
        None
    };
    Ok(Started {
        provision: policy_on
            .then(|| Provisioner::new(client.clone(), config.clone(), subjects.clone())),
        stream_checked: !policy_on || checked.is_some(),
        checked,
        transport: client,
        events,
        spool: None,
    })
}

/// Opens the configured spool (blocking IO, off the runtime's threads) and logs what recovery
/// found.
async fn open_spool(config: &SinkConfig) -> Result<Option<(DiskSpool, Replay)>, StartError> {
    let Some(dir) = config.spool.clone() else {
        return Ok(None);
    };
    let spool_config = SpoolConfig {
        max_bytes: config.spool_max_bytes,
        ..SpoolConfig::default()
    };
    let opened = tokio::task::spawn_blocking(move || DiskSpool::open(dir, spool_config))
        .await
        .map_err(|e| StartError::Config {
            field: "spool",
            problem: format!("the spool could not be opened: {e}"),
        })??;
    let report = &opened.report;
    tracing::info!(dir = %opened.spool.dir().display(), ?report, "spool opened");
    Ok(Some((opened.spool, opened.replay)))
}

/// With retry-on-initial-connect the client returns before its first connection (always, even
/// when the server is up) and knows no server info yet. Give that connection one connect timeout
/// so a reachable server still gets its stream checked and its max_payload read; only a server
/// that stays down starts the sink unchecked.
async fn await_first_connection(client: &async_nats::Client, connect_timeout: Duration) {
    let deadline = deadline_after(clock::now(), connect_timeout);
    while client.server_info().server_id.is_empty() && clock::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
