//! The driver task: owns the client, the clock and the outbox; turns outbox commands into publishes
//! and broker replies into outbox inputs.
//!
//! Publishes are core NATS publishes with a per-message reply subject under one wildcard inbox
//! subscription (`<inbox>.<seq>.<attempt>`), so an ack costs one message on one subscription and no
//! task per publish. The ack timeout is the outbox's, not the client's.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::header::{NATS_EXPECTED_LAST_MESSAGE_ID, NATS_EXPECTED_STREAM, NATS_MESSAGE_ID};
use async_nats::jetstream;
use async_nats::{ConnectOptions, HeaderMap};
use futures::StreamExt;
use sink_core::backoff::{deadline_after, FAR_FUTURE};
use sink_core::breaker::{BreakerEvent, BreakerState};
use sink_core::capability::{chaining_hazard, ServerVersion};
use sink_core::outbox::{Ack, Message, OrderingMode, Outbox, OutboxConfig, Output};
use sink_core::stream::{verify, StreamFacts, StreamRequirements, Violation};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit};

use crate::classify::{classify, Verdict};
use crate::config::{Auth, SinkConfig, StreamPolicy};
use crate::error::{EmitError, StartError};
use crate::facts::{new_stream_config, read_stream_facts, StreamInfoError};
use crate::metrics as m;
use crate::server_url::{redacted_servers, ServerUrl, UrlCredentials};
use crate::sink::{CloseReport, Receipt, Shared};
use crate::stream_watch::{watch_stream, StreamCheck};
use crate::subjects::Subjects;

/// Queue admission held by an event until its outcome; dropping it makes room.
#[derive(Debug)]
#[allow(dead_code)] // held for their Drop, never read
pub(crate) struct Permits {
    pub event: OwnedSemaphorePermit,
    pub bytes: OwnedSemaphorePermit,
}

/// Every header of a publish except `Nats-Expected-Last-Msg-Id`, which depends on the attempt.
fn base_headers(message: &Message, expected_stream: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (k, v) in &message.headers {
        headers.insert(k.as_str(), v.as_str());
    }
    headers.insert(NATS_MESSAGE_ID, message.msg_id.as_str());
    if let Some(stream) = expected_stream {
        headers.insert(NATS_EXPECTED_STREAM, stream);
    }
    headers
}

/// `NATS/1.0\r\n` before a header block and the blank line after it.
const HEADER_BLOCK_FRAME: usize = "NATS/1.0\r\n".len() + "\r\n".len();

/// One `Name: value\r\n` line of a header block.
fn header_line_len(name: impl AsRef<str>, value: &str) -> usize {
    name.as_ref().len() + ": ".len() + value.len() + "\r\n".len()
}

/// The bytes the server counts against `max_payload` for a publish: the header block as sent
/// plus the body. The subject and reply subject are not counted (nats-server `client.go`
/// `processHeaderPub` compares `HPUB`'s total size, headers + payload, with `max_payload`; the
/// subject's bound is the 4096-byte control line, far above our 255-byte subjects).
fn wire_size(headers: &HeaderMap, body: usize) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| header_line_len(name, v.as_str()))
                .sum::<usize>()
        })
        .sum();
    HEADER_BLOCK_FRAME + lines + body
}

/// The most [`wire_size`] can be for `message`, whichever headers a transmission of it carries:
/// its own (content type, `ce-` attributes), `Nats-Msg-Id`, `Nats-Expected-Stream` (whenever the
/// stream policy is on: first event, probe, re-anchor, unchained modes) and
/// `Nats-Expected-Last-Msg-Id`. An event that fits this always fits when it is sent, so `send`
/// refuses what could not be sent instead of accepting it into a retry that can never succeed.
pub(crate) fn worst_case_wire_size(message: &Message, expected_stream: Option<&str>) -> usize {
    let id = message.msg_id.as_str();
    let own: usize = message
        .headers
        .iter()
        .map(|(k, v)| header_line_len(k, v))
        .sum();
    // The predecessor's id is another `MsgId::for_event`: the same fixed length as this one.
    let expected_last = header_line_len(NATS_EXPECTED_LAST_MESSAGE_ID, id);
    let stream = expected_stream.map_or(0, |s| header_line_len(NATS_EXPECTED_STREAM, s));
    HEADER_BLOCK_FRAME
        + own
        + header_line_len(NATS_MESSAGE_ID, id)
        + stream
        + expected_last
        + message.body.len()
}

pub(crate) enum Command {
    Emit {
        message: Message,
        event_id: String,
        permits: Permits,
        span: tracing::Span,
        reply: oneshot::Sender<Result<Receipt, EmitError>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    Close {
        deadline: Instant,
        reply: oneshot::Sender<CloseReport>,
    },
}

/// What `start` hands to the driver.
pub(crate) struct Started {
    client: async_nats::Client,
    events: mpsc::UnboundedReceiver<async_nats::Event>,
    pub server_version: String,
    pub max_payload: usize,
    duplicate_window: Option<Duration>,
    /// The stream's replica count, when the stream was checked at start.
    replicas: Option<u32>,
    /// Whether the stream policy has been applied (always, except when the server stayed down
    /// through a retry-on-initial-connect start: then the driver checks after it connects).
    stream_checked: bool,
}

/// Builds the client options from the config (credentials go only to the client).
pub(crate) async fn connect_options(config: &SinkConfig) -> Result<ConnectOptions, StartError> {
    let mut opts = match &config.auth {
        // async-nats ignores a URL's userinfo, so hand it over as explicit credentials.
        Auth::None => match url_credentials(&server_urls(config)?) {
            Some(UrlCredentials::UserPassword { user, password }) => {
                ConnectOptions::with_user_and_password(user, password.expose().to_owned())
            }
            Some(UrlCredentials::Token(token)) => {
                ConnectOptions::with_token(token.expose().to_owned())
            }
            None => ConnectOptions::new(),
        },
        Auth::Token(t) => ConnectOptions::with_token(t.expose().to_owned()),
        Auth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned())
        }
        Auth::NkeySeed(seed) => ConnectOptions::with_nkey(seed.expose().to_owned()),
        Auth::CredsFile(path) => ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| StartError::File {
                what: "creds file",
                path: path.display().to_string(),
                reason: e.kind().to_string(),
            })?,
    };
    if let Some(ca) = &config.tls.root_ca {
        check_readable("TLS root CA", ca)?;
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &config.tls.client_cert {
        check_readable("TLS client certificate", cert)?;
        check_readable("TLS client key", key)?;
        opts = opts
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if config.tls.required {
        opts = opts.require_tls(true);
    }
    let backoff = config.reconnect.clone();
    Ok(opts
        .name(&config.name)
        // The driver awaits each publish's hand-off to the client; while the client reconnects it
        // stops draining that channel, so size it for several windows of re-sends rather than
        // let the driver block on it.
        .client_capacity((config.window * 16).max(8192))
        // The client's ping timer adds the interval to the clock (and panics past its end):
        // "never" becomes a century.
        .ping_interval(config.ping_interval.min(FAR_FUTURE))
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.ack_timeout))
        // The client's own reconnect attempts follow the schedule only up to
        // CLIENT_RECONNECT_CAP: the breaker may wait minutes between probes, but the client must
        // notice a returning server within a second, and its Connected event ends the breaker's
        // wait (issue #9 item 6). An attempt against a server that is down costs one refused
        // TCP connect.
        .reconnect_delay_callback(move |attempts| {
            backoff
                .delay(u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX))
                .min(CLIENT_RECONNECT_CAP)
        }))
}

/// Longest wait between two of the client's reconnect attempts.
pub(crate) const CLIENT_RECONNECT_CAP: Duration = Duration::from_secs(1);

/// Credentials from the first server URL that carries userinfo, percent-decoded.
fn url_credentials(urls: &[ServerUrl]) -> Option<UrlCredentials> {
    urls.iter().find_map(|u| u.credentials().cloned())
}

/// Every server URL, parsed; a refusal names `servers` and shows the URL redacted.
fn server_urls(config: &SinkConfig) -> Result<Vec<ServerUrl>, StartError> {
    config
        .servers
        .iter()
        .map(|s| {
            ServerUrl::parse(s).map_err(|e| StartError::Config {
                field: "servers",
                problem: e.to_string(),
            })
        })
        .collect()
}

fn check_readable(what: &'static str, path: &std::path::Path) -> Result<(), StartError> {
    std::fs::metadata(path)
        .and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a file"))
            }
        })
        .map_err(|e| StartError::File {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// The server list as client addresses, without userinfo: the credentials went into the options,
/// and the client logs its addresses.
pub(crate) fn server_addrs(config: &SinkConfig) -> Result<Vec<async_nats::ServerAddr>, StartError> {
    Ok(server_urls(config)?
        .iter()
        .map(|u| u.addr().clone())
        .collect())
}

/// A client connect error as a start error, credentials scrubbed.
pub(crate) fn connect_error(e: &async_nats::ConnectError, config: &SinkConfig) -> StartError {
    let servers = redacted_servers(&config.servers);
    let text = e.to_string().to_ascii_lowercase();
    if text.contains("authorization") || text.contains("authentication") {
        StartError::Authorization { servers }
    } else {
        StartError::Connect {
            servers,
            reason: scrub(&e.to_string(), config),
        }
    }
}

/// Connects and checks the stream per policy.
pub(crate) async fn start(config: &SinkConfig, subjects: &Subjects) -> Result<Started, StartError> {
    validate(config)?;
    let servers = redacted_servers(&config.servers);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let mut opts = connect_options(config).await?.event_callback(move |e| {
        let tx = ev_tx.clone();
        async move {
            let _ = tx.send(e);
        }
    });
    if config.retry_initial_connect {
        opts = opts.retry_on_initial_connect();
    }
    let addrs = server_addrs(config)?;
    let client = opts
        .connect(addrs)
        .await
        .map_err(|e| connect_error(&e, config))?;
    if config.retry_initial_connect {
        // With retry-on-initial-connect the client returns before its first connection (always,
        // even when the server is up) and knows no server info yet. Give that connection one
        // connect timeout so a reachable server still gets its stream checked and its
        // max_payload read; only a server that stays down starts the sink unchecked.
        let deadline = deadline_after(Instant::now(), config.connect_timeout);
        while client.server_info().server_id.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let info = client.server_info();
    let mut checked = None;
    let mut stream_checked = config.stream_policy == StreamPolicy::Off;
    if !stream_checked && !info.server_id.is_empty() {
        checked = Some(check_stream(&client, config, subjects, &servers).await?);
        stream_checked = true;
    }
    Ok(Started {
        server_version: info.version.clone(),
        // From the server's INFO when connected, else the client's assumption (1 MiB) until
        // the first INFO; the driver refreshes it on every connect.
        max_payload: client.max_payload(),
        client,
        events: ev_rx,
        duplicate_window: checked.map(|c| c.duplicate_window),
        replicas: checked.map(|c| c.replicas),
        stream_checked,
    })
}

fn validate(config: &SinkConfig) -> Result<(), StartError> {
    let bad = |field, problem: &str| {
        Err(StartError::Config {
            field,
            problem: problem.to_owned(),
        })
    };
    if config.servers.is_empty() {
        return bad(
            "servers",
            "no server URL given; pass e.g. nats://127.0.0.1:4222",
        );
    }
    if config.stream.is_empty()
        || config
            .stream
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return bad(
            "stream",
            "stream name must be non-empty without whitespace, '.', '*', '>', '/' or '\\'",
        );
    }
    outbox_config(config)
        .validate()
        .map_err(|e| StartError::Config {
            field: "outbox",
            problem: e.to_string(),
        })?;
    if config.max_bytes > u32::MAX as usize {
        return bad("max_bytes", "at most 4 GiB");
    }
    if config.ping_interval.is_zero() {
        return bad(
            "ping_interval",
            "is 0; give a positive interval (default 2 s) or Duration::MAX for no pings",
        );
    }
    if config.connect_timeout.is_zero() {
        return bad(
            "connect_timeout",
            "is 0, so no connection attempt could succeed; give a positive timeout (default 5 s)",
        );
    }
    config.reconnect.validate().map_err(|e| StartError::Config {
        field: "reconnect",
        problem: e.to_string(),
    })
}

/// Removes anything credential-like the client library might echo: the configured secret and
/// every form (as written, decoded) of each URL's userinfo.
fn scrub(text: &str, config: &SinkConfig) -> String {
    let mut secrets: Vec<&str> = match &config.auth {
        Auth::Token(t) => vec![t.expose()],
        Auth::UserPassword { password, .. } => vec![password.expose()],
        Auth::NkeySeed(s) => vec![s.expose()],
        _ => vec![],
    };
    let urls: Vec<ServerUrl> = config
        .servers
        .iter()
        .filter_map(|s| ServerUrl::parse(s).ok())
        .collect();
    secrets.extend(urls.iter().flat_map(ServerUrl::secrets));
    // Longest first, so a secret that contains another is not left half-replaced.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for s in secrets.into_iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out
}

pub(crate) fn requirements(config: &SinkConfig, subjects: &Subjects) -> StreamRequirements {
    let attempts = u32::try_from(config.retry.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    // Saturating: an ack timeout of `Duration::MAX` ("never") asks for a window no stream has,
    // which Verify reports, rather than a panic.
    let retry_span = config
        .ack_timeout
        .saturating_mul(attempts)
        .saturating_add(config.retry.total());
    let mut req = StreamRequirements::for_subject_filter(subjects.filter(), retry_span);
    req.retention_floor = config.retention_floor;
    req
}

/// Verifies (and with `Create`, creates) the stream; returns its duplicate window.
async fn check_stream(
    client: &async_nats::Client,
    config: &SinkConfig,
    subjects: &Subjects,
    servers: &str,
) -> Result<StreamChecked, StartError> {
    let js = jetstream::new(client.clone());
    let api = |reason: String| StartError::StreamApi {
        stream: config.stream.clone(),
        reason,
    };
    let read = |e: StreamInfoError| start_error(e, servers);
    let facts: StreamFacts = match read_stream_facts(&js, &config.stream).await.map_err(read)? {
        Some(facts) => facts,
        None if config.stream_policy != StreamPolicy::Create => {
            return Err(StartError::StreamMissing {
                stream: config.stream.clone(),
            });
        }
        None => {
            js.create_stream(new_stream_config(&config.stream, vec![subjects.filter()]))
                .await
                .map_err(|e| api(format!("create failed: {e}")))?;
            tracing::info!(stream = %config.stream, "created stream");
            read_stream_facts(&js, &config.stream)
                .await
                .map_err(read)?
                .ok_or_else(|| api("created, then not found: deleted at once?".to_owned()))?
        }
    };
    let violations = verify(&facts, &requirements(config, subjects));
    if !violations.is_empty() {
        return Err(StartError::StreamViolations {
            stream: config.stream.clone(),
            violations,
        });
    }
    Ok(StreamChecked {
        duplicate_window: facts.duplicate_window,
        replicas: facts.replicas,
    })
}

/// What the driver keeps from a passed stream check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamChecked {
    duplicate_window: Duration,
    replicas: u32,
}

/// A failed stream read at start as a start error.
fn start_error(e: StreamInfoError, servers: &str) -> StartError {
    match e {
        StreamInfoError::Unavailable { reason, .. } => StartError::JetStreamUnavailable {
            servers: servers.to_owned(),
            reason,
        },
        StreamInfoError::Api {
            stream,
            code,
            description,
        } => StartError::StreamApi {
            stream,
            reason: format!("JetStream error {code}: {description}"),
        },
        StreamInfoError::Request { stream, reason } => StartError::StreamApi { stream, reason },
        StreamInfoError::Malformed { stream, reason } => StartError::StreamApi {
            stream,
            reason: format!("the info reply cannot be read: {reason}"),
        },
    }
}

pub(crate) fn outbox_config(config: &SinkConfig) -> OutboxConfig {
    OutboxConfig {
        window: config.window,
        max_events: config.max_events,
        max_bytes: config.max_bytes,
        ordering: config.ordering,
        ack_timeout: config.ack_timeout,
        retry: config.retry.clone(),
        breaker: sink_core::breaker::BreakerConfig {
            failures_to_open: 1,
            reconnect: config.reconnect.clone(),
        },
        when_breaker_open: config.when_breaker_open,
    }
}

struct Waiter {
    event_id: String,
    msg_id: sink_core::event::MsgId,
    /// The event's `jetsink.event` span: the parent of every per-event record.
    span: tracing::Span,
    /// Taken when the outcome is sent. A delivered event's waiter stays (with its permits) until
    /// the outbox lets go of the entry, which it does only once every earlier event is settled:
    /// the queue's room is the outbox's room, so `WhenFull::Block` waits where the outbox is full.
    reply: Option<oneshot::Sender<Result<Receipt, EmitError>>>,
    _permits: Permits,
    first_sent: Option<Instant>,
    /// Transmissions so far.
    transmits: u32,
    /// Reported as possibly stored twice (beyond the duplicate window) already.
    span_warned: bool,
    /// Refused at send time as larger than the server's `max_payload`: (wire size, limit). Its
    /// rejection is reported as [`EmitError::TooLarge`].
    too_large: Option<(usize, usize)>,
}

/// The callers waiting for outcomes, by outbox sequence. Sequences are handed out consecutively
/// and mostly settle in order, so this is a ring indexed by offset rather than a tree.
#[derive(Default)]
struct Waiters {
    /// Sequence of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<Waiter>>,
}

impl Waiters {
    /// Adds the waiter of `seq`, which is above every sequence added before.
    fn insert(&mut self, seq: u64, waiter: Waiter) {
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

    fn get_mut(&mut self, seq: u64) -> Option<&mut Waiter> {
        let i = self.offset(seq)?;
        self.slots.get_mut(i)?.as_mut()
    }

    fn remove(&mut self, seq: u64) -> Option<Waiter> {
        let i = self.offset(seq)?;
        let waiter = self.slots.get_mut(i)?.take();
        while self.slots.front().is_some_and(Option::is_none) {
            self.slots.pop_front();
            self.base += 1;
        }
        waiter
    }

    /// The lowest sequence still waiting.
    fn lowest(&self) -> Option<u64> {
        // remove() keeps the front occupied.
        (!self.slots.is_empty()).then_some(self.base)
    }

    /// The highest sequence still waiting.
    fn highest(&self) -> Option<u64> {
        let last = self.slots.iter().rposition(Option::is_some)?;
        Some(self.base + last as u64)
    }
}

struct Driver {
    config: SinkConfig,
    client: async_nats::Client,
    outbox: Outbox,
    waiters: Waiters,
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    inbox: String,
    shared: Arc<Shared>,
    duplicate_window: Option<Duration>,
    delivered: u64,
    rejected: u64,
    /// Calls of `send`, `flush` and `close`.
    commands: mpsc::UnboundedReceiver<Command>,
    /// A close is under way: give up on what is left at this deadline (the earliest any caller
    /// of `close` asked for).
    closing: Option<Instant>,
    /// Every caller of `close` waiting for the report.
    closers: Vec<oneshot::Sender<CloseReport>>,
    /// Events `send` accepted that arrived after the close began: not delivered, and reported so.
    refused_at_close: Vec<(String, sink_core::event::MsgId, bool)>,
    /// Whether [`Driver::end`] ran.
    ended: bool,
    stream_recreate_at: Option<Instant>,
    /// The subject template, for checking and re-creating the stream.
    subjects: Subjects,
    /// False until the stream policy has been applied; nothing is transmitted before.
    stream_checked: bool,
    /// When to (re)try the deferred stream check.
    stream_check_at: Option<Instant>,
    /// What the running stream's last re-verification found wrong. While one of these blocks
    /// delivery nothing is transmitted: events stay queued, outcomes of what is in flight are
    /// still reported.
    stream_violations: Vec<Violation>,
    /// Re-verifications from the stream watcher (`None` with `StreamPolicy::Off`).
    stream_checks: Option<mpsc::Receiver<StreamCheck>>,
    /// Wakes the stream watcher (on reconnect).
    stream_recheck: Arc<Notify>,
}

/// How long the driver waits before repeating a deferred stream check that failed.
const STREAM_RECHECK: Duration = Duration::from_secs(1);

pub(crate) fn spawn(
    config: SinkConfig,
    subjects: Subjects,
    started: Started,
    commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
) {
    let outbox = Outbox::new(outbox_config(&config)).expect("validated in start");
    let reserve = config.max_events.min(sink_core::outbox::RESERVE_LIMIT);
    let inbox = started.client.new_inbox();
    let stream_recheck = Arc::new(Notify::new());
    let stream_checks = (config.stream_policy != StreamPolicy::Off).then(|| {
        let (tx, rx) = mpsc::channel(4);
        m::stream_violations(&config.stream, 0);
        tokio::spawn(watch_stream(
            started.client.clone(),
            config.stream.clone(),
            requirements(&config, &subjects),
            config.reverify_interval,
            stream_recheck.clone(),
            tx,
        ));
        rx
    });
    let mut driver = Driver {
        config,
        client: started.client,
        outbox,
        waiters: Waiters {
            base: 0,
            slots: VecDeque::with_capacity(reserve),
        },
        flushes: Vec::new(),
        inbox,
        shared,
        duplicate_window: started.duplicate_window,
        delivered: 0,
        rejected: 0,
        commands,
        closing: None,
        closers: Vec::new(),
        refused_at_close: Vec::new(),
        ended: false,
        stream_recreate_at: None,
        subjects,
        stream_checked: started.stream_checked,
        stream_check_at: (!started.stream_checked).then(Instant::now),
        stream_violations: Vec::new(),
        stream_checks,
        stream_recheck,
    };
    if let Some(replicas) = started.replicas {
        driver.guard_chaining(replicas);
    }
    tokio::spawn(driver.run(started.events));
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Driver {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<async_nats::Event>) {
        let mut replies = loop {
            match self.client.subscribe(format!("{}.>", self.inbox)).await {
                Ok(s) => break s,
                Err(e) => {
                    self.shared.set_error(format!("reply subscription: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let mut commands_open = true;
        let mut stream_checks = self.stream_checks.take();
        loop {
            if self.stream_check_at.is_some_and(|t| Instant::now() >= t) {
                self.deferred_stream_check().await;
            }
            let now = Instant::now();
            // Until the stream policy has been applied, and while the running stream has a
            // violation that blocks delivery, nothing goes out: events stay queued, and what was
            // in flight still gets its outcome.
            loop {
                let out = if self.stream_checked && !self.stream_held() {
                    self.outbox.poll_output(now)
                } else {
                    self.outbox.poll_event()
                };
                let Some(out) = out else {
                    break;
                };
                self.apply(out, now).await;
            }
            self.publish_state();
            if let Some(deadline) = self.closing {
                if self.outbox.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            let timeout = [
                self.outbox.poll_timeout(),
                self.closing,
                self.stream_recreate_at,
                self.stream_check_at,
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                biased;
                msg = replies.next() => {
                    let Some(msg) = msg else { break };
                    self.on_reply(msg);
                    // Drain what is already there without another trip through select.
                    for _ in 0..1024 {
                        match futures::FutureExt::now_or_never(replies.next()) {
                            Some(Some(msg)) => self.on_reply(msg),
                            _ => break,
                        }
                    }
                }
                cmd = self.commands.recv(), if commands_open => {
                    match cmd {
                        Some(cmd) => {
                            self.on_command(cmd);
                            for _ in 0..1024 {
                                match self.commands.try_recv() {
                                    Ok(cmd) => self.on_command(cmd),
                                    Err(_) => break,
                                }
                            }
                        }
                        None => {
                            commands_open = false;
                            if self.closing.is_none() {
                                // Every handle is gone: drain for as long as an ack timeout
                                // cycle allows, then stop.
                                let drain = self.config.ack_timeout.saturating_mul(4);
                                self.closing = Some(deadline_after(Instant::now(), drain));
                            }
                        }
                    }
                }
                ev = events.recv() => {
                    if let Some(ev) = ev { self.on_event(ev) }
                }
                check = recv_some(&mut stream_checks) => match check {
                    Some(check) => self.on_stream_check(check),
                    None => stream_checks = None,
                },
                _ = sleep_until(timeout) => {
                    let now = Instant::now();
                    self.outbox.handle_timeout(now);
                    if self.stream_recreate_at.is_some_and(|t| now >= t) {
                        self.stream_recreate_at = None;
                        self.recreate_stream().await;
                    }
                }
            }
        }
        self.end();
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Emit {
                message,
                event_id,
                permits,
                span,
                reply,
            } => {
                if self.closing.is_some() {
                    // `send` accepted it, so the close report lists it.
                    tracing::debug!(parent: &span, "not delivered: the sink is closing");
                    let _ = reply.send(Err(EmitError::NotDelivered {
                        event_id: event_id.clone(),
                        transmitted: false,
                    }));
                    self.refused_at_close
                        .push((event_id, message.msg_id, false));
                    return;
                }
                let msg_id = message.msg_id.clone();
                match self.outbox.push(message, unix_ms(), Instant::now()) {
                    Ok(seq) => {
                        self.waiters.insert(
                            seq,
                            Waiter {
                                event_id,
                                msg_id,
                                span,
                                reply: Some(reply),
                                _permits: permits,
                                first_sent: None,
                                transmits: 0,
                                span_warned: false,
                                too_large: None,
                            },
                        );
                    }
                    Err(refused) => {
                        // `send` holds queue permits for exactly what the outbox holds, so the
                        // outbox has room for what it admitted; this is a backstop.
                        let err = match refused {
                            sink_core::outbox::Refused::BreakerOpen => EmitError::BreakerOpen,
                            sink_core::outbox::Refused::TooLarge { size, max_bytes } => {
                                EmitError::ExceedsQueue {
                                    event_id,
                                    size,
                                    max_bytes,
                                }
                            }
                            _ => EmitError::QueueFull {
                                max_events: self.config.max_events,
                                max_bytes: self.config.max_bytes,
                                waited: Duration::ZERO,
                            },
                        };
                        let _ = reply.send(Err(err));
                    }
                }
            }
            Command::Flush { reply } => match self.waiters.highest() {
                Some(mark) => self.flushes.push((mark, reply)),
                None => {
                    let _ = reply.send(());
                }
            },
            Command::Close { deadline, reply } => {
                self.closing = Some(self.closing.map_or(deadline, |d| d.min(deadline)));
                self.closers.push(reply);
            }
        }
    }

    async fn apply(&mut self, out: Output, now: Instant) {
        match out {
            Output::Transmit(t) => {
                let Some(msg) = self.outbox.message(t.seq) else {
                    return;
                };
                // Nats-Expected-Stream pins a publish to our stream. A chained publish that names
                // its predecessor is pinned already: only a stream whose last message is our
                // predecessor can store it, and that is ours. So the header goes only where the
                // chain does not hold (the first event, a re-anchor, a probe, the other modes);
                // on the hot path it cost the broker ~0.4 us and us ~0.3 us per event in
                // `jetsink bench`.
                let pinned_by_chain = self.outbox.ordering() == OrderingMode::Chained
                    && t.expected_last_msg_id.is_some()
                    && !t.probe;
                let stream = (self.config.stream_policy != StreamPolicy::Off && !pinned_by_chain)
                    .then_some(self.config.stream.as_str());
                let mut headers = base_headers(msg, stream);
                let subject = msg.subject.clone();
                if let Some(last) = &t.expected_last_msg_id {
                    headers.insert(NATS_EXPECTED_LAST_MESSAGE_ID, last.as_str());
                }
                let body = msg.body.clone();
                // The limit of the server connected now (or last): it may be smaller than the one
                // this event was accepted under.
                let max_payload = self.client.max_payload();
                self.note_max_payload(max_payload);
                let size = wire_size(&headers, body.len());
                if size > max_payload {
                    self.too_large(t.seq, t.attempt, size, max_payload);
                    return;
                }
                let mut reply = String::with_capacity(self.inbox.len() + 24);
                reply.push_str(&self.inbox);
                let _ = write!(reply, ".{}.{}", t.seq, t.attempt);
                m::published(t.attempt > 1);
                if let Some(w) = self.waiters.get_mut(t.seq) {
                    w.transmits += 1;
                    tracing::trace!(
                        parent: &w.span,
                        attempt = t.attempt,
                        expected_last = t.expected_last_msg_id.as_ref().map(|m| m.as_str()),
                        "transmit"
                    );
                    match w.first_sent {
                        None => w.first_sent = Some(now),
                        Some(first) => {
                            if let Some(window) = self.duplicate_window {
                                if now.duration_since(first) > window {
                                    beyond_window(
                                        w,
                                        &self.shared,
                                        now.duration_since(first),
                                        window,
                                        "retrying beyond the stream's duplicate window: \
                                         a copy stored earlier would no longer be deduplicated",
                                    );
                                }
                            }
                        }
                    }
                }
                if let Err(e) = self
                    .client
                    .publish_with_reply_and_headers(subject, reply, headers, body)
                    .await
                {
                    if e.kind() == async_nats::PublishErrorKind::MaxPayloadExceeded {
                        // The limit changed between our check and the client's (a reconnect).
                        let max_payload = self.client.max_payload();
                        self.note_max_payload(max_payload);
                        self.too_large(t.seq, t.attempt, size, max_payload);
                        return;
                    }
                    self.shared.set_error(format!("publish: {e}"));
                    self.outbox.handle_failure(
                        t.seq,
                        t.attempt,
                        sink_core::outbox::Failure::Retryable {
                            reason: format!("publish: {e}"),
                        },
                        Instant::now(),
                    );
                }
            }
            Output::Delivered { seq, ack } => {
                self.delivered += 1;
                m::acked(ack.duplicate);
                if let Some(w) = self.waiters.get_mut(seq) {
                    // A re-send issued within the window can still reach the broker after it,
                    // when the client held it through a reconnect: judge by the ack too.
                    if let (Some(first), Some(window)) = (w.first_sent, self.duplicate_window) {
                        let waited = now.duration_since(first);
                        if !ack.duplicate && w.transmits > 1 && waited > window {
                            beyond_window(
                                w,
                                &self.shared,
                                waited,
                                window,
                                "stored as new more than the duplicate window after its first \
                                 transmission: a copy stored earlier may also be in the stream",
                            );
                        }
                    }
                    w.span.record("stream_seq", ack.sequence);
                    tracing::debug!(
                        parent: &w.span,
                        ce.id = %w.event_id,
                        seq = ack.sequence,
                        duplicate = ack.duplicate,
                        "delivered"
                    );
                    if let Some(reply) = w.reply.take() {
                        let _ = reply.send(Ok(receipt(ack, w.msg_id.clone())));
                    }
                }
                self.release_settled();
                self.settle_flushes();
            }
            Output::Rejected { seq, rejection } => {
                self.rejected += 1;
                m::rejected();
                // A refusal may mean the stream was just edited (sealed, a per-subject limit):
                // re-verify now rather than at the next interval.
                self.stream_recheck.notify_one();
                if let Some(w) = self.waiters.remove(seq) {
                    let error = match w.too_large {
                        Some((size, max_payload)) => {
                            tracing::warn!(parent: &w.span, ce.id = %w.event_id, size, max_payload, "larger than the server's max_payload");
                            EmitError::TooLarge {
                                event_id: w.event_id,
                                size,
                                max_payload,
                            }
                        }
                        None => {
                            tracing::warn!(parent: &w.span, ce.id = %w.event_id, %rejection, "rejected by the broker");
                            EmitError::Rejected {
                                event_id: w.event_id,
                                rejection,
                            }
                        }
                    };
                    if let Some(reply) = w.reply {
                        let _ = reply.send(Err(error));
                    }
                }
                self.release_settled();
                self.settle_flushes();
            }
            Output::Retrying {
                seq,
                retry,
                delay,
                reason,
            } => {
                m::retry();
                match self.waiters.get_mut(seq) {
                    Some(w) => {
                        tracing::debug!(parent: &w.span, ce.id = %w.event_id, retry, ?delay, %reason, "retrying from this event")
                    }
                    None => tracing::debug!(seq, retry, ?delay, %reason, "retrying"),
                }
                self.shared.set_error(reason);
            }
            Output::Breaker(event) => {
                m::breaker(&event);
                match event {
                    BreakerEvent::Opened { attempt, .. } => {
                        tracing::warn!(attempt, "breaker opened; events stay queued");
                        if self.config.stream_policy == StreamPolicy::Create {
                            self.stream_recreate_at = Some(now);
                        }
                    }
                    BreakerEvent::HalfOpened => tracing::debug!("breaker half-open: probing"),
                    BreakerEvent::Closed => tracing::info!("breaker closed"),
                }
            }
            Output::OrderingFallback { to, reason } => {
                tracing::warn!(%to, %reason, "ordering fallback");
                self.shared.set_error(reason);
            }
        }
    }

    /// Drops the waiters (and so the queue permits) of delivered events the outbox no longer
    /// holds. The outbox lets go of acked entries in order, so only the front can be due.
    fn release_settled(&mut self) {
        while let Some(seq) = self.waiters.lowest() {
            let delivered = self.waiters.get_mut(seq).is_some_and(|w| w.reply.is_none());
            if !delivered || self.outbox.message(seq).is_some() {
                break;
            }
            self.waiters.remove(seq);
        }
    }

    /// Keeps `send`'s size check at the limit of the server connected now.
    fn note_max_payload(&self, max_payload: usize) {
        if self.shared.max_payload.swap(max_payload, Ordering::Relaxed) != max_payload {
            tracing::info!(max_payload, "server max_payload");
        }
    }

    /// A transmission of `seq` does not fit the server's `max_payload` (it shrank after the event
    /// was accepted, across a reconnect): the event fails alone, with [`EmitError::TooLarge`];
    /// the events after it go on. Nothing was sent.
    fn too_large(&mut self, seq: u64, attempt: u32, size: usize, max_payload: usize) {
        if let Some(w) = self.waiters.get_mut(seq) {
            w.too_large = Some((size, max_payload));
        }
        self.outbox.handle_failure(
            seq,
            attempt,
            sink_core::outbox::Failure::Terminal(sink_core::outbox::Rejection {
                code: None,
                reason: format!(
                    "{size} bytes on the wire; the server's max_payload is {max_payload}"
                ),
            }),
            Instant::now(),
        );
    }

    fn settle_flushes(&mut self) {
        let lowest = self.waiters.lowest();
        let mut i = 0;
        while i < self.flushes.len() {
            if lowest.is_none_or(|l| l > self.flushes[i].0) {
                let (_, reply) = self.flushes.swap_remove(i);
                let _ = reply.send(());
            } else {
                i += 1;
            }
        }
    }

    fn on_reply(&mut self, msg: async_nats::Message) {
        let Some((seq, attempt)) = parse_reply_subject(&msg.subject, &self.inbox) else {
            return;
        };
        let status = msg.status.map(|s| s.as_u16());
        let verdict = classify(status, msg.description.as_deref(), &msg.payload);
        let now = Instant::now();
        match verdict {
            Verdict::Ack(ack) => self.outbox.handle_ack(seq, ack, now),
            Verdict::Fail(failure) => {
                if let sink_core::outbox::Failure::Retryable { reason }
                | sink_core::outbox::Failure::Overloaded { reason } = &failure
                {
                    self.shared.set_error(reason.clone());
                }
                self.outbox.handle_failure(seq, attempt, failure, now);
            }
        }
    }

    fn on_event(&mut self, ev: async_nats::Event) {
        match ev {
            async_nats::Event::Disconnected => {
                tracing::warn!("disconnected from the server; in-flight publishes will be re-sent");
                self.shared.set_error("disconnected");
                self.outbox.handle_connection_lost(Instant::now());
            }
            async_nats::Event::Connected => {
                tracing::info!("connected");
                // `send` checks sizes against the server connected now; each transmit re-reads it
                // too (the client may store the new INFO just after announcing the connection).
                self.note_max_payload(self.client.max_payload());
                // The breaker's reconnect delay may have grown to minutes during a long outage;
                // the client is back now, so the probe goes at once (issue #9 item 6).
                self.outbox.handle_reconnected(Instant::now());
                if !self.stream_checked {
                    self.stream_check_at = Some(Instant::now());
                } else {
                    // The stream may have been edited while we were away.
                    self.stream_recheck.notify_one();
                }
            }
            async_nats::Event::LameDuckMode => {
                tracing::info!("server entered lame duck mode")
            }
            other => tracing::debug!(event = %other, "client event"),
        }
    }

    /// Chaining is not used where the server makes it unsafe (a replicated stream on 2.11+, see
    /// [`sink_core::capability`]): the outbox switches to per-key-serial before sending anything,
    /// and the log, `health().ordering` and `last_error` say why.
    fn guard_chaining(&mut self, replicas: u32) {
        let version = ServerVersion::parse(&self.client.server_info().version);
        if let Some(hazard) = chaining_hazard(version, replicas) {
            self.outbox.use_per_key_serial(format!(
                "{hazard}; keeping order with per-key-serial delivery (one publish in flight per \
                 ordering key) instead of chaining"
            ));
        }
    }

    /// Applies the stream policy once the client is connected (the server was down at start).
    /// Until it passes, events stay queued and `health().last_error` says why.
    async fn deferred_stream_check(&mut self) {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            self.stream_check_at = None; // the Connected event brings it back
            return;
        }
        let servers = redacted_servers(&self.config.servers);
        match check_stream(&self.client, &self.config, &self.subjects, &servers).await {
            Ok(checked) => {
                tracing::info!(stream = %self.config.stream, "stream checked after the first connection");
                self.duplicate_window = Some(checked.duplicate_window);
                self.guard_chaining(checked.replicas);
                self.stream_checked = true;
                self.stream_check_at = None;
            }
            Err(e) => {
                let text = format!("{e}; events stay queued until the stream check passes");
                tracing::warn!(error = %text, "stream check failed");
                self.shared.set_error(text);
                self.stream_check_at = Some(Instant::now() + STREAM_RECHECK);
            }
        }
    }

    /// Whether a violation of the running stream makes publishing unsafe now.
    fn stream_held(&self) -> bool {
        self.stream_violations
            .iter()
            .any(Violation::blocks_delivery)
    }

    /// Takes in a re-verification of the running stream: reports what changed (ERROR per new
    /// violation, with field, value found and fix), and holds or releases delivery.
    fn on_stream_check(&mut self, check: StreamCheck) {
        if !self.stream_checked {
            return; // the start policy is still being applied: its check decides
        }
        let stream = &self.config.stream;
        let violations = match check {
            StreamCheck::Verified(violations) => violations,
            StreamCheck::Unreadable(e) => {
                tracing::debug!(%stream, error = %e, "stream re-verification could not read the stream");
                return;
            }
            // Publishing reports that (no stream captures the subject) and, under Create,
            // re-creates it; holding would keep both from happening.
            StreamCheck::Missing => {
                if !self.stream_violations.is_empty() {
                    tracing::warn!(%stream, "stream is gone; its earlier violations no longer apply");
                }
                Vec::new()
            }
        };
        if violations == self.stream_violations {
            return;
        }
        let was_held = self.stream_held();
        for v in violations
            .iter()
            .filter(|v| !self.stream_violations.contains(v))
        {
            tracing::error!(
                %stream,
                field = v.field(),
                blocks_delivery = v.blocks_delivery(),
                "stream changed while the sink runs: {v}"
            );
        }
        self.stream_violations = violations;
        let held = self.stream_held();
        if held {
            let why: Vec<String> = self
                .stream_violations
                .iter()
                .filter(|v| v.blocks_delivery())
                .map(ToString::to_string)
                .collect();
            let text = format!("{}; events stay queued until it is fixed", why.join("; "));
            if !was_held {
                tracing::error!(%stream, "delivery held: {text}");
            }
            self.shared.set_error(text);
        } else if was_held {
            tracing::warn!(%stream, "delivery resumes: the stream no longer blocks it");
        }
        if self.stream_violations.is_empty() {
            tracing::info!(%stream, "stream meets every requirement again");
        }
        m::stream_violations(stream, self.stream_violations.len());
        if let Ok(mut g) = self.shared.stream_violations.lock() {
            g.clone_from(&self.stream_violations);
        }
    }

    async fn recreate_stream(&mut self) {
        let js = jetstream::new(self.client.clone());
        if js.get_stream(&self.config.stream).await.is_ok() {
            return;
        }
        match js
            .create_stream(new_stream_config(
                &self.config.stream,
                vec![self.subjects.filter()],
            ))
            .await
        {
            Ok(_) => {
                tracing::warn!(stream = %self.config.stream, "stream was missing; re-created it (policy Create)")
            }
            Err(e) => self.shared.set_error(format!("re-create stream: {e}")),
        }
    }

    fn publish_state(&self) {
        let s = &self.shared;
        s.queued.store(self.outbox.len(), Ordering::Relaxed);
        s.in_flight
            .store(self.outbox.in_flight(), Ordering::Relaxed);
        s.window.store(self.outbox.window(), Ordering::Relaxed);
        s.breaker.store(
            match self.outbox.breaker() {
                BreakerState::Closed { .. } => 0,
                BreakerState::Open { .. } => 1,
                BreakerState::HalfOpen { .. } => 2,
            },
            Ordering::Relaxed,
        );
        s.ordering.store(
            match self.outbox.ordering() {
                OrderingMode::Chained => 0,
                OrderingMode::PerKeySerial => 1,
                OrderingMode::Unordered => 2,
            },
            Ordering::Relaxed,
        );
        m::gauges(
            self.outbox.len(),
            self.outbox.in_flight(),
            self.outbox.window(),
        );
    }

    /// Ends the sink: takes no more commands, fails every event still owed an outcome with
    /// `NotDelivered`, leaves the final report in [`Shared`] (every later `close` returns it) and
    /// hands it to every caller of `close` waiting. Runs once: when the loop ends, or when the
    /// task is dropped (runtime shutdown, a panic), so no caller waits for a report that never
    /// comes and no accepted event goes unreported.
    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        // Mid-panic only what cannot panic: no logging.
        let quiet = std::thread::panicking();
        self.commands.close();
        let mut unqueued = Vec::new();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Emit {
                    message,
                    event_id,
                    reply,
                    ..
                } => {
                    let _ = reply.send(Err(EmitError::NotDelivered {
                        event_id: event_id.clone(),
                        transmitted: false,
                    }));
                    unqueued.push((event_id, message.msg_id, false));
                }
                Command::Flush { reply } => {
                    let _ = reply.send(());
                }
                Command::Close { reply, .. } => self.closers.push(reply),
            }
        }
        let mut not_delivered = Vec::new();
        while let Some(seq) = self.waiters.lowest() {
            let Some(mut w) = self.waiters.remove(seq) else {
                break;
            };
            // Without a reply it was delivered (held only for the order of the queue).
            let Some(reply) = w.reply.take() else {
                continue;
            };
            let transmitted = w.transmits > 0;
            if !quiet {
                tracing::warn!(
                    parent: &w.span,
                    ce.id = %w.event_id,
                    transmitted,
                    "not delivered before the close deadline"
                );
            }
            let _ = reply.send(Err(EmitError::NotDelivered {
                event_id: w.event_id.clone(),
                transmitted,
            }));
            not_delivered.push((w.event_id, w.msg_id, transmitted));
        }
        not_delivered.append(&mut self.refused_at_close);
        not_delivered.append(&mut unqueued);
        for (_, reply) in self.flushes.drain(..) {
            let _ = reply.send(());
        }
        let report = CloseReport {
            delivered: self.delivered,
            rejected: self.rejected,
            not_delivered,
        };
        self.shared.final_report.send_replace(Some(report.clone()));
        for closer in self.closers.drain(..) {
            let _ = closer.send(report.clone());
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.end();
    }
}

/// Counts (once per event) and reports an event whose copies may escape deduplication.
fn beyond_window(
    w: &mut Waiter,
    shared: &Shared,
    waited: Duration,
    window: Duration,
    what: &'static str,
) {
    if w.span_warned {
        return;
    }
    w.span_warned = true;
    m::retry_beyond_window();
    shared.retried_beyond_window.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(parent: &w.span, ce.id = %w.event_id, ?waited, ?window, "{what}");
}

fn receipt(ack: Ack, msg_id: sink_core::event::MsgId) -> Receipt {
    Receipt {
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
        msg_id,
    }
}

/// The next message of `rx`, or never when there is none.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

fn parse_reply_subject(subject: &str, inbox: &str) -> Option<(u64, u32)> {
    let rest = subject.strip_prefix(inbox)?.strip_prefix('.')?;
    let (seq, attempt) = rest.split_once('.')?;
    Some((seq.parse().ok()?, attempt.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn url_userinfo_becomes_credentials_of_the_first_url_that_has_some() {
        let urls = |s: &[&str]| {
            let config = SinkConfig {
                servers: s.iter().map(|s| s.to_string()).collect(),
                ..SinkConfig::default()
            };
            server_urls(&config).expect("valid URLs")
        };
        assert_eq!(url_credentials(&urls(&["nats://h:4222"])), None);
        assert_eq!(
            url_credentials(&urls(&[
                "nats://h:1",
                "nats://svc:p%40ss@h:2",
                "nats://t@h:3"
            ])),
            Some(UrlCredentials::UserPassword {
                user: "svc".into(),
                password: Secret::new("p@ss")
            })
        );
        assert_eq!(
            url_credentials(&urls(&["nats://t0k/en@h:1"])),
            Some(UrlCredentials::Token(Secret::new("t0k/en")))
        );
    }

    #[test]
    fn scrub_removes_every_form_of_a_url_secret() {
        let config = SinkConfig {
            servers: vec!["nats://svc:p%40ss/w?rd@h:1".into()],
            ..SinkConfig::default()
        };
        let text = "a p%40ss/w?rd b p@ss/w?rd c svc:p%40ss/w?rd d";
        assert_eq!(scrub(text, &config), "a *** b *** c *** d");
    }

    #[test]
    fn reply_subjects_round_trip() {
        assert_eq!(
            parse_reply_subject("_INBOX.ab.17.3", "_INBOX.ab"),
            Some((17, 3))
        );
        assert_eq!(parse_reply_subject("_INBOX.ab.x.3", "_INBOX.ab"), None);
        assert_eq!(parse_reply_subject("_INBOX.other.1.1", "_INBOX.ab"), None);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use sink_core::encoding::{encode, Encoding};
    use sink_core::event::{CloudEvent, MsgId};

    fn message(encoding: Encoding) -> Message {
        let event = CloudEvent::new("evt-1", "/svc/billing", "com.example.invoice.paid")
            .with_time("2026-11-27T06:00:00Z")
            .with_data_json(serde_json::json!({ "tenantId": "acme", "note": "x".repeat(40) }));
        let wire = encode(&event, encoding).expect("valid");
        Message {
            subject: "cellos.events.acme.v1".into(),
            msg_id: MsgId::for_event(&event),
            headers: wire.headers,
            body: wire.body,
            key: String::new(),
        }
    }

    /// The fullest publish (a probe that names its predecessor: `Nats-Expected-Stream` and
    /// `Nats-Expected-Last-Msg-Id` both) is exactly the worst case `send` checks; every other
    /// publish is smaller.
    #[test]
    fn worst_case_is_the_fullest_publish_exactly() {
        let stream = "EVENTS_".to_owned() + &"L".repeat(93);
        let predecessor = MsgId::for_event(&CloudEvent::new("evt-0", "/svc/billing", "t"));
        for encoding in [Encoding::Structured, Encoding::Binary] {
            let msg = message(encoding);
            let worst = worst_case_wire_size(&msg, Some(&stream));
            let mut fullest = base_headers(&msg, Some(&stream));
            fullest.insert(NATS_EXPECTED_LAST_MESSAGE_ID, predecessor.as_str());
            assert_eq!(wire_size(&fullest, msg.body.len()), worst, "{encoding:?}");
            let chained = {
                let mut h = base_headers(&msg, None);
                h.insert(NATS_EXPECTED_LAST_MESSAGE_ID, predecessor.as_str());
                h
            };
            for smaller in [base_headers(&msg, Some(&stream)), chained] {
                assert!(wire_size(&smaller, msg.body.len()) < worst, "{encoding:?}");
            }
            // Without a stream policy no publish names the stream.
            let unpinned = worst_case_wire_size(&msg, None);
            assert_eq!(
                worst - unpinned,
                "Nats-Expected-Stream: \r\n".len() + stream.len()
            );
        }
    }

    /// The header block as the server reads it: `NATS/1.0\r\n`, one `Name: value\r\n` per value,
    /// a blank line.
    #[test]
    fn wire_size_counts_the_header_block_as_written() {
        let mut headers = HeaderMap::new();
        headers.insert("A", "bc");
        headers.insert("Nats-Msg-Id", "x");
        let block = "NATS/1.0\r\nA: bc\r\nNats-Msg-Id: x\r\n\r\n";
        assert_eq!(wire_size(&headers, 7), block.len() + 7);
    }

    /// Durations at their extremes saturate instead of overflowing.
    #[test]
    fn requirements_saturate_at_duration_max() {
        let config = SinkConfig {
            ack_timeout: Duration::MAX,
            ..SinkConfig::default()
        };
        let subjects = Subjects::new(&config).expect("default template");
        assert_eq!(
            requirements(&config, &subjects).min_duplicate_window,
            Duration::MAX
        );
    }
}
