//! The driver task: owns the transport, the clock and the delivery machine (the outbox, or a
//! fast-batch lane: [`crate::engine`]); turns its commands into publishes and broker replies
//! into its inputs.
//!
//! Publishes carry a per-message reply subject under one wildcard inbox subscription
//! (`<inbox>.<seq>.<attempt>`), so an ack costs one message on one subscription and no task per
//! publish. The ack timeout is the outbox's, not the client's.
//!
//! The loop ([`Driver::run`]) is a few named steps, after quinn's `ConnectionDriver`: handle
//! whatever deadline is due (compared with the clock on every pass, whichever event woke the
//! loop), drain the outbox's outputs, publish the health snapshot, then wait for the next reply,
//! command, connection event, stream check or deadline.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID;
use futures::StreamExt;
use sink_core::backoff::deadline_after;
use sink_core::breaker::{BreakerEvent, BreakerState};
use sink_core::event::MsgId;
use sink_core::fastbatch::BatchAnswer;
use sink_core::lane::{BatchEnd, LaneOutput, LaneReceipt, LaneTransmit};
use sink_core::outbox::{
    Ack, Failure, Message, OrderingMode, Outbox, Output, Refused, Rejection, Transmit,
};
use sink_core::spool::payload::SpooledEvent;
use sink_core::stream::Violation;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use crate::classify::{classify, Verdict};
use crate::clock;
use crate::config::{SinkConfig, StreamPolicy};
use crate::engine::{choose, Engine, Out};
use crate::error::EmitError;
use crate::handle::{
    BatchReceipt, BreakerStatus, CloseReport, Command, Mechanism, Permits, Receipt, Shared,
    SPOOL_CLOSE_MARK,
};
use crate::lanes::{batch_answer, LaneSet};
use crate::metrics as m;
use crate::provision::{chaining_guard, Provisioner, StreamChecked};
use crate::spool::{DiskSpool, RecordSeq, Replay};
use crate::stream_watch::StreamCheck;
use crate::transport::{Transport, TransportError};
use crate::waiters::{Waiter, Waiters};
use crate::wire::{base_headers, parse_reply_subject, reply_subject, wire_size};

/// What the driver starts from: a connection, its events, and what the start check learned.
pub(crate) struct Started<T> {
    pub transport: T,
    pub events: mpsc::UnboundedReceiver<async_nats::Event>,
    /// The stream work the running sink does (`None` with `StreamPolicy::Off`).
    pub provision: Option<Provisioner>,
    /// What the start check found, when the stream was checked at start.
    pub checked: Option<StreamChecked>,
    /// Whether the stream policy has been applied (always, except when the server stayed down
    /// through a retry-on-initial-connect start: then the driver checks after it connects).
    pub stream_checked: bool,
    /// The sink's spool and what an earlier process left in it, when configured.
    pub spool: Option<(DiskSpool, Replay)>,
}

/// How long the driver waits before repeating a deferred stream check that failed.
const STREAM_RECHECK: Duration = Duration::from_secs(1);

/// Messages handled per wake-up before the loop takes another pass (its deadlines, its outputs).
const BATCH: usize = 1024;

struct Driver<T: Transport> {
    config: SinkConfig,
    transport: T,
    engine: Engine,
    waiters: Waiters,
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    inbox: String,
    shared: Arc<Shared>,
    duplicate_window: Option<Duration>,
    delivered: u64,
    rejected: u64,
    /// Calls of `send`, `flush` and `close`.
    commands: mpsc::UnboundedReceiver<Command>,
    /// False once every handle is gone.
    commands_open: bool,
    /// Connected, disconnected, lame duck.
    events: mpsc::UnboundedReceiver<async_nats::Event>,
    /// A close is under way: give up on what is left at this deadline (the earliest any caller
    /// of `close` asked for).
    closing: Option<Instant>,
    /// Every caller of `close` waiting for the report.
    closers: Vec<oneshot::Sender<CloseReport>>,
    /// Events `send` accepted that arrived after the close began: not delivered, and reported so.
    refused_at_close: Vec<(String, MsgId, bool)>,
    /// Whether [`Driver::end`] ran.
    ended: bool,
    /// The stream work (check, re-create, re-verify); `None` with `StreamPolicy::Off`.
    provision: Option<Provisioner>,
    stream_recreate_at: Option<Instant>,
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
    /// Wakes the stream watcher (on reconnect, after a rejection).
    stream_recheck: Arc<Notify>,
    /// The stream's replica count, once known (1 until then).
    replicas: u32,
    /// The spool, when configured: records are acknowledged as their events get outcomes.
    spool: Option<DiskSpool>,
    /// What an earlier process left in the spool, until all of it is queued.
    replay: Option<Replay>,
    /// The replayed event waiting for queue room.
    replay_next: Option<(RecordSeq, SpooledEvent)>,
    /// Events `send` accepted while the replay runs: queued after it, in order.
    deferred: VecDeque<Command>,
    /// Stands in for the queue permits of replayed events (unbounded: the delivery machine's
    /// own bound limits the replay).
    replay_room: Arc<Semaphore>,
}

/// Starts the driver task of one sink.
pub(crate) fn spawn<T: Transport>(
    config: SinkConfig,
    started: Started<T>,
    commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
) {
    let outbox = Outbox::new(config.outbox_config()).expect("validated in start");
    let reserve = config.max_events.min(sink_core::outbox::RESERVE_LIMIT);
    let inbox = started.transport.new_inbox();
    let stream_recheck = Arc::new(Notify::new());
    let stream_checks = started
        .provision
        .as_ref()
        .map(|p| p.watch(stream_recheck.clone()));
    let mut driver = Driver {
        config,
        transport: started.transport,
        engine: Engine::PerEvent(outbox),
        waiters: Waiters::with_capacity(reserve),
        flushes: Vec::new(),
        inbox,
        shared,
        duplicate_window: started.checked.map(|c| c.duplicate_window),
        delivered: 0,
        rejected: 0,
        commands,
        commands_open: true,
        events: started.events,
        closing: None,
        closers: Vec::new(),
        refused_at_close: Vec::new(),
        ended: false,
        provision: started.provision,
        stream_recreate_at: None,
        stream_checked: started.stream_checked,
        stream_check_at: (!started.stream_checked).then(clock::now),
        stream_violations: Vec::new(),
        stream_checks,
        stream_recheck,
        replicas: 1,
        spool: started.spool.as_ref().map(|(spool, _)| spool.clone()),
        replay: started.spool.map(|(_, replay)| replay),
        replay_next: None,
        deferred: VecDeque::new(),
        replay_room: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
    };
    match started.checked {
        Some(checked) => driver.stream_known(checked.replicas, Some(checked.allow_batched)),
        None if !driver.stream_checked => {}
        // Stream policy Off: nothing is known of the stream.
        None => driver.stream_known(1, None),
    }
    tokio::spawn(driver.run());
}

impl<T: Transport> Driver<T> {
    async fn run(mut self) {
        let mut replies = self.subscribe_replies().await;
        loop {
            self.handle_due_deadlines().await;
            self.feed_replay();
            // Deliveries among the outputs make room for more of the replay.
            loop {
                self.drain_outputs().await;
                if !self.feed_replay() {
                    break;
                }
            }
            self.publish_state();
            if self.close_is_done() {
                break;
            }
            if !self.wait(&mut replies).await {
                break;
            }
        }
        self.end();
    }

    /// The one wildcard subscription every reply arrives on; retried until the client takes it.
    async fn subscribe_replies(&mut self) -> T::Replies {
        loop {
            match self.transport.subscribe(format!("{}.>", self.inbox)).await {
                Ok(s) => return s,
                Err(e) => {
                    self.shared.set_error(format!("reply subscription: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Compares the clock with every deadline and handles those due, whatever woke the loop
    /// (quinn's timer discipline: the sleep is only a wake-up, the clock decides).
    async fn handle_due_deadlines(&mut self) {
        if self.stream_check_at.is_some_and(|t| clock::now() >= t) {
            self.deferred_stream_check().await;
        }
        let now = clock::now();
        if self.engine.poll_timeout().is_some_and(|t| now >= t) {
            self.engine.handle_timeout(now);
        }
        if self.stream_recreate_at.is_some_and(|t| now >= t) {
            self.stream_recreate_at = None;
            self.recreate_stream().await;
        }
    }

    /// Applies every output the outbox has now. Until the stream policy has been applied, and
    /// while the running stream has a violation that blocks delivery, nothing goes out: events
    /// stay queued, and what was in flight still gets its outcome.
    async fn drain_outputs(&mut self) {
        let now = clock::now();
        loop {
            let out = if self.stream_checked && !self.stream_held() {
                self.engine.poll_output(now)
            } else {
                self.engine.poll_event()
            };
            let Some(out) = out else {
                break;
            };
            match out {
                Out::PerEvent(out) => self.apply(out, now).await,
                Out::Lane(lane, out) => self.apply_lane(lane, out, now).await,
            }
        }
    }

    /// Queues what an earlier process left in the spool, oldest first, as queue room allows;
    /// events `send` accepted meanwhile wait behind it. Each replayed event is delivered with its
    /// original message id (a copy the broker stored before the crash is a duplicate there) and
    /// acknowledged in the spool once it has an outcome.
    /// Whether anything was queued.
    ///
    /// Replayed events take room in the delivery machine, not queue permits: `send`s waiting
    /// behind the replay already hold those, and would otherwise starve it.
    fn feed_replay(&mut self) -> bool {
        let mut fed = false;
        while self.replay.is_some() && self.closing.is_none() {
            if self.replay_next.is_none() {
                self.replay_next = self.next_replayed();
                if self.replay_next.is_none() {
                    continue; // the replay ended (or failed); the loop condition decides
                }
            }
            let Some((seq, spooled)) = self.replay_next.take() else {
                continue;
            };
            let size = spooled.message.size();
            let permits = match (
                self.engine.has_room(size),
                self.replay_room.clone().try_acquire_owned(),
                self.replay_room.clone().try_acquire_owned(),
            ) {
                (true, Ok(event), Ok(bytes)) => Permits { event, bytes },
                _ => {
                    self.replay_next = Some((seq, spooled));
                    return fed; // no room yet: deliveries make some
                }
            };
            // Nobody awaits a replayed event's outcome: the receiver is gone from the start.
            let (reply, _) = oneshot::channel();
            let span = tracing::debug_span!("jetsink.event", ce.id = %spooled.event_id, spool_seq = seq, stream_seq = tracing::field::Empty);
            self.accept(
                spooled.message,
                spooled.event_id,
                permits,
                span,
                reply,
                Some(seq),
            );
            fed = true;
        }
        if self.replay.is_none() && self.replay_next.is_none() {
            // What waited behind the replay, in order, as room allows.
            while let Some(cmd) = self.deferred.front() {
                if let Command::Emit { message, .. } = cmd {
                    if !self.engine.has_room(message.size()) {
                        break;
                    }
                }
                let cmd = self.deferred.pop_front().expect("a front command");
                self.execute(cmd);
                fed = true;
            }
        }
        fed
    }

    /// The next replayed event; ends the replay (`self.replay = None`) at its end or on an error.
    fn next_replayed(&mut self) -> Option<(RecordSeq, SpooledEvent)> {
        loop {
            let replay = self.replay.as_mut()?;
            let record = match replay.next() {
                None => {
                    tracing::info!("spool: everything an earlier process left is queued");
                    self.replay = None;
                    return None;
                }
                Some(Err(e)) => {
                    // What is left stays in the spool for the next start.
                    tracing::error!(error = %e, "spool: replay stopped");
                    self.shared.set_error(format!("spool replay: {e}"));
                    self.replay = None;
                    return None;
                }
                Some(Ok(record)) => record,
            };
            if record.payload.as_ref() == SPOOL_CLOSE_MARK {
                self.ack_spooled(record.seq);
                continue;
            }
            match SpooledEvent::decode(&record.payload) {
                Ok(event) => return Some((record.seq, event)),
                Err(e) => {
                    // Its record passed its checksum, so this is not damage on disk but a
                    // payload this build cannot read: reported, counted, and let go.
                    tracing::error!(seq = record.seq, error = %e, "spool: a spooled event cannot be read; dropped");
                    m::spool_unreadable();
                    self.shared
                        .set_error(format!("spool record {}: {e}", record.seq));
                    self.ack_spooled(record.seq);
                }
            }
        }
    }

    fn ack_spooled(&self, seq: RecordSeq) {
        if let Some(spool) = &self.spool {
            spool.ack(seq);
        }
    }

    /// A close ends the loop once the queue is empty or its deadline has passed.
    fn close_is_done(&self) -> bool {
        self.closing
            .is_some_and(|deadline| self.engine.is_empty() || clock::now() >= deadline)
    }

    /// The earliest deadline of the delivery machine, the close, and the stream work.
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.engine.poll_timeout(),
            self.closing,
            self.stream_recreate_at,
            self.stream_check_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Waits for the next reply, command, connection event, stream check or deadline, and takes
    /// it in. False when the reply subscription ended (the client is gone).
    async fn wait(&mut self, replies: &mut T::Replies) -> bool {
        let wake = self.next_deadline();
        tokio::select! {
            biased;
            msg = replies.next() => {
                let Some(msg) = msg else { return false };
                self.on_reply(&msg);
                // Drain what is already there without another trip through select.
                for _ in 0..BATCH {
                    match futures::FutureExt::now_or_never(replies.next()) {
                        Some(Some(msg)) => self.on_reply(&msg),
                        _ => break,
                    }
                }
            }
            cmd = self.commands.recv(), if self.commands_open => match cmd {
                Some(cmd) => {
                    self.on_command(cmd);
                    for _ in 0..BATCH {
                        match self.commands.try_recv() {
                            Ok(cmd) => self.on_command(cmd),
                            Err(_) => break,
                        }
                    }
                }
                None => self.on_handles_gone(),
            },
            ev = self.events.recv() => {
                if let Some(ev) = ev { self.on_event(ev) }
            }
            check = recv_some(&mut self.stream_checks) => match check {
                Some(check) => self.on_stream_check(check),
                None => self.stream_checks = None,
            },
            () = clock::sleep_until(wake) => {}
        }
        true
    }

    /// Every handle is gone: drain for as long as an ack timeout cycle allows, then stop.
    fn on_handles_gone(&mut self) {
        self.commands_open = false;
        if self.closing.is_none() {
            let drain = self.config.ack_timeout.saturating_mul(4);
            self.closing = Some(deadline_after(clock::now(), drain));
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            // While the replay runs (and until what waited behind it is queued), events and
            // flushes wait behind it, in order (a flush must cover the events sent before it).
            cmd @ (Command::Emit { .. } | Command::Flush { .. })
                if self.replay.is_some() || !self.deferred.is_empty() =>
            {
                self.deferred.push_back(cmd)
            }
            cmd => self.execute(cmd),
        }
    }

    fn execute(&mut self, cmd: Command) {
        match cmd {
            Command::Emit {
                message,
                event_id,
                permits,
                span,
                reply,
                spool_seq,
            } => self.accept(message, event_id, permits, span, reply, spool_seq),
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

    /// Queues one event `send` accepted, or fails it if the sink is closing.
    fn accept(
        &mut self,
        message: Message,
        event_id: String,
        permits: Permits,
        span: tracing::Span,
        reply: oneshot::Sender<Result<Receipt, EmitError>>,
        spool_seq: Option<RecordSeq>,
    ) {
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
        match self.engine.push(message, clock::unix_ms(), clock::now()) {
            Ok(seq) => self.waiters.insert(
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
                    spool_seq,
                },
            ),
            Err(refused) => {
                let _ = reply.send(Err(self.refusal(refused, event_id)));
            }
        }
    }

    /// `send` holds queue permits for exactly what the outbox holds, so the outbox has room for
    /// what it admitted; this is a backstop.
    fn refusal(&self, refused: Refused, event_id: String) -> EmitError {
        match refused {
            Refused::BreakerOpen => EmitError::BreakerOpen,
            Refused::TooLarge { size, max_bytes } => EmitError::ExceedsQueue {
                event_id,
                size,
                max_bytes,
            },
            _ => EmitError::QueueFull {
                max_events: self.config.max_events,
                max_bytes: self.config.max_bytes,
                waited: Duration::ZERO,
            },
        }
    }

    async fn apply(&mut self, out: Output, now: Instant) {
        match out {
            Output::Transmit(t) => self.transmit(t, now).await,
            Output::Delivered { seq, ack } => self.on_delivered(seq, Confirmed::Ack(ack), now),
            Output::Rejected { seq, rejection } => self.on_rejected(seq, rejection),
            Output::Retrying {
                seq,
                retry,
                delay,
                reason,
            } => self.on_retrying(seq, retry, delay, reason),
            Output::Breaker(event) => self.on_breaker(&event, now),
            Output::OrderingFallback { to, reason } => {
                tracing::warn!(%to, %reason, "ordering fallback");
                self.shared.health.send_modify(|h| {
                    h.ordering_reason = Some(reason.clone());
                    h.last_error = Some(reason);
                });
            }
        }
    }

    fn on_retrying(&mut self, seq: u64, retry: u32, delay: Duration, reason: String) {
        m::retry();
        match self.waiters.get_mut(seq) {
            Some(w) => {
                tracing::debug!(parent: &w.span, ce.id = %w.event_id, retry, ?delay, %reason, "retrying from this event")
            }
            None => tracing::debug!(seq, retry, ?delay, %reason, "retrying"),
        }
        self.shared.set_error(reason);
    }

    async fn apply_lane(&mut self, lane: usize, out: LaneOutput, now: Instant) {
        match out {
            LaneOutput::Transmit(t) => self.transmit_lane(lane, t, now).await,
            LaneOutput::Delivered { seq, receipt } => {
                self.on_delivered(seq, Confirmed::Batch(receipt), now)
            }
            LaneOutput::Rejected { seq, rejection } => self.on_rejected(seq, rejection),
            LaneOutput::BatchEnded {
                batch,
                persisted,
                stream,
                end,
            } => {
                m::batch_ended(&end);
                let stream_seq = stream.map(|(_, seq)| seq);
                if end == BatchEnd::Committed {
                    tracing::trace!(%batch, persisted, ?stream_seq, "batch committed");
                } else {
                    tracing::debug!(%batch, persisted, ?stream_seq, %end, "batch ended early");
                }
            }
            LaneOutput::Retrying {
                seq,
                retry,
                delay,
                reason,
            } => self.on_retrying(seq, retry, delay, reason),
            LaneOutput::Breaker(event) => self.on_breaker(&event, now),
            LaneOutput::Disabled(rejection) => {
                // An operator turned allow_batched off (or another stream took the subjects):
                // what the lane held goes on with per-event acks, same ids, same order.
                let reason = format!(
                    "the stream refused batch publishing ({rejection}); per-event acks from now on"
                );
                tracing::warn!(%reason, "fast-batch lane stopped");
                self.shared.set_error(reason.clone());
                let outbox = Outbox::new(self.config.outbox_config()).expect("validated in start");
                self.engine.switch_to(Engine::PerEvent(outbox), now);
                self.guard_chaining(self.replicas);
                self.set_mechanism(Mechanism::PerEvent, reason);
                self.stream_recheck.notify_one();
            }
        }
    }

    /// Sends one fast-batch message (an event, a commit or a ping).
    async fn transmit_lane(&mut self, lane: usize, t: LaneTransmit, now: Instant) {
        let Some(parts) = self.lane_mut(lane).map(|l| l.publish_parts(&t)) else {
            return;
        };
        let Some((subject, reply, headers, body)) = parts else {
            return;
        };
        let event = match t.payload {
            sink_core::lane::Payload::Event(seq) => Some(seq),
            sink_core::lane::Payload::Control { .. } => None,
        };
        let max_payload = self.transport.max_payload();
        self.note_max_payload(max_payload);
        let size = wire_size(&headers, body.len());
        if let Some(seq) = event {
            if size > max_payload {
                self.lane_too_large(lane, &t, seq, size, max_payload, now);
                return;
            }
            m::published(self.waiters.get_mut(seq).is_some_and(|w| w.transmits > 0));
            self.note_transmit(seq, &t.reply, now);
        }
        match self.transport.publish(subject, reply, headers, body).await {
            Ok(()) => {}
            Err(TransportError::MaxPayloadExceeded) => {
                let max_payload = self.transport.max_payload();
                self.note_max_payload(max_payload);
                if let Some(seq) = event {
                    self.lane_too_large(lane, &t, seq, size, max_payload, now);
                }
            }
            Err(e) => {
                // The message never left: the batch cannot go on past it. End it where it is
                // confirmed; the next one re-sends from there with the same ids.
                self.shared.set_error(format!("publish: {e}"));
                if let Some(l) = self.lane_mut(lane) {
                    l.lane_mut().handle_connection_lost(clock::now());
                }
            }
        }
    }

    /// A lane's event no longer fits `max_payload` (it shrank across a reconnect): the lane
    /// rejects it as the server would have refused it, and goes on with the next.
    fn lane_too_large(
        &mut self,
        lane: usize,
        t: &LaneTransmit,
        seq: u64,
        size: usize,
        max_payload: usize,
        now: Instant,
    ) {
        if let Some(w) = self.waiters.get_mut(seq) {
            w.too_large = Some((size, max_payload));
        }
        if let Some(l) = self.lane_mut(lane) {
            let refusal = BatchAnswer::Refused(too_large_failure(size, max_payload));
            l.lane_mut().handle_reply(&t.reply, refusal, now);
        }
    }

    /// Lane `i`, while lanes deliver.
    fn lane_mut(&mut self, i: usize) -> Option<&mut crate::lanes::LaneEngine> {
        match &mut self.engine {
            Engine::Lanes(set) => set.lane_mut(i),
            Engine::PerEvent(_) => None,
        }
    }

    /// Sends one transmission of an event, unless it no longer fits the server's `max_payload`.
    async fn transmit(&mut self, t: Transmit, now: Instant) {
        let Engine::PerEvent(outbox) = &self.engine else {
            return;
        };
        let Some(msg) = outbox.message(t.seq) else {
            return;
        };
        let mut headers = base_headers(msg, self.expected_stream(&t));
        if let Some(last) = &t.expected_last_msg_id {
            headers.insert(NATS_EXPECTED_LAST_MESSAGE_ID, last.as_str());
        }
        let subject = msg.subject.clone();
        let body = msg.body.clone();
        // The limit of the server connected now (or last): it may be smaller than the one this
        // event was accepted under.
        let max_payload = self.transport.max_payload();
        self.note_max_payload(max_payload);
        let size = wire_size(&headers, body.len());
        if size > max_payload {
            self.too_large(t.seq, t.attempt, size, max_payload);
            return;
        }
        let reply = reply_subject(&self.inbox, t.seq, t.attempt);
        m::published(t.attempt > 1);
        self.note_transmit(t.seq, &t, now);
        match self.transport.publish(subject, reply, headers, body).await {
            Ok(()) => {}
            Err(TransportError::MaxPayloadExceeded) => {
                // The limit changed between our check and the client's (a reconnect).
                let max_payload = self.transport.max_payload();
                self.note_max_payload(max_payload);
                self.too_large(t.seq, t.attempt, size, max_payload);
            }
            Err(e) => {
                self.shared.set_error(format!("publish: {e}"));
                if let Some(outbox) = self.engine.outbox_mut() {
                    outbox.handle_failure(
                        t.seq,
                        t.attempt,
                        Failure::Retryable {
                            reason: format!("publish: {e}"),
                        },
                        clock::now(),
                    );
                }
            }
        }
    }

    /// The `Nats-Expected-Stream` a transmission carries. It pins a publish to our stream. A
    /// chained publish that names its predecessor is pinned already: only a stream whose last
    /// message is our predecessor can store it, and that is ours. So the header goes only where
    /// the chain does not hold (the first event, a re-anchor, a probe, the other modes); on the
    /// hot path it cost the broker ~0.4 us and us ~0.3 us per event in `jetsink bench`.
    fn expected_stream(&self, t: &Transmit) -> Option<&str> {
        let pinned_by_chain = self.engine.ordering(self.config.ordering) == OrderingMode::Chained
            && t.expected_last_msg_id.is_some()
            && !t.probe;
        (self.config.stream_policy != StreamPolicy::Off && !pinned_by_chain)
            .then_some(self.config.stream.as_str())
    }

    /// Counts a transmission of `seq` on its waiter (`what` for the trace record), and reports a
    /// re-send beyond the duplicate window.
    fn note_transmit(&mut self, seq: u64, what: &dyn std::fmt::Debug, now: Instant) {
        let Some(w) = self.waiters.get_mut(seq) else {
            return;
        };
        w.transmits += 1;
        tracing::trace!(parent: &w.span, transmit = ?what, "transmit");
        let Some(first) = w.first_sent else {
            w.first_sent = Some(now);
            return;
        };
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

    fn on_delivered(&mut self, seq: u64, confirmed: Confirmed, now: Instant) {
        self.delivered += 1;
        let duplicate = matches!(&confirmed, Confirmed::Ack(ack) if ack.duplicate);
        m::acked(duplicate);
        if let Some(w) = self.waiters.get_mut(seq) {
            // A re-send issued within the window can still reach the broker after it, when the
            // client held it through a reconnect: judge by the ack too (a batch confirmation
            // does not say whether the stream had it, so a late re-send counts).
            if let (Some(first), Some(window)) = (w.first_sent, self.duplicate_window) {
                let waited = now.duration_since(first);
                if !duplicate && w.transmits > 1 && waited > window {
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
            let receipt = confirmed.receipt(w.msg_id.clone(), &self.config.stream);
            if let Some(sequence) = receipt.sequence {
                w.span.record("stream_seq", sequence);
            }
            tracing::debug!(
                parent: &w.span,
                ce.id = %w.event_id,
                seq = receipt.sequence,
                duplicate,
                batch = receipt.batch.as_ref().map(|b| b.id.as_str()),
                batch_seq = receipt.batch.as_ref().map(|b| b.seq),
                "delivered"
            );
            if let Some(reply) = w.reply.take() {
                let _ = reply.send(Ok(receipt));
            }
            if let (Some(spool), Some(seq)) = (&self.spool, w.spool_seq.take()) {
                spool.ack(seq);
            }
        }
        // A lane lets go of a confirmed event at once: its queue room is free now, whatever
        // another lane still holds (the outbox keeps acked entries behind an earlier one, so
        // there the front rule below applies).
        if matches!(self.engine, Engine::Lanes(_)) && self.engine.message(seq).is_none() {
            self.waiters.remove(seq);
        }
        self.release_settled();
        self.settle_flushes();
    }

    fn on_rejected(&mut self, seq: u64, rejection: Rejection) {
        self.rejected += 1;
        m::rejected();
        // A refusal may mean the stream was just edited (sealed, a per-subject limit): re-verify
        // now rather than at the next interval.
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
            // An outcome for good: the spool need not keep it for another try.
            if let (Some(spool), Some(seq)) = (&self.spool, w.spool_seq) {
                spool.ack(seq);
            }
        }
        self.release_settled();
        self.settle_flushes();
    }

    fn on_breaker(&mut self, event: &BreakerEvent, now: Instant) {
        m::breaker(event);
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

    /// Drops the waiters (and so the queue permits) of delivered events the outbox no longer
    /// holds. The outbox lets go of acked entries in order, so only the front can be due.
    fn release_settled(&mut self) {
        while let Some(seq) = self.waiters.lowest() {
            let delivered = self.waiters.get_mut(seq).is_some_and(|w| w.reply.is_none());
            if !delivered || self.engine.message(seq).is_some() {
                break;
            }
            self.waiters.remove(seq);
        }
    }

    /// Keeps `send`'s size check at the limit of the server connected now.
    fn note_max_payload(&self, max_payload: usize) {
        if self.shared.set_max_payload(max_payload) {
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
        if let Some(outbox) = self.engine.outbox_mut() {
            outbox.handle_failure(
                seq,
                attempt,
                too_large_failure(size, max_payload),
                clock::now(),
            );
        }
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

    fn on_reply(&mut self, msg: &async_nats::Message) {
        let status = msg.status.map(|s| s.as_u16());
        let now = clock::now();
        let outbox = match &mut self.engine {
            Engine::PerEvent(outbox) => outbox,
            Engine::Lanes(set) => {
                // A late ack of a per-event publish from before the switch is of no use now:
                // the lane re-sends that event with the same id.
                let Some((i, reply_to)) = set.parse_reply_to(&msg.subject) else {
                    return;
                };
                let Some(lane) = set.lane_mut(i) else { return };
                let answer = batch_answer(status, msg.description.as_deref(), &msg.payload);
                if let BatchAnswer::Refused(
                    Failure::Retryable { reason } | Failure::Overloaded { reason },
                ) = &answer
                {
                    self.shared.set_error(reason.clone());
                }
                lane.lane_mut().handle_reply(&reply_to, answer, now);
                return;
            }
        };
        let Some((seq, attempt)) = parse_reply_subject(&msg.subject, &self.inbox) else {
            return;
        };
        match classify(status, msg.description.as_deref(), &msg.payload) {
            Verdict::Ack(ack) => outbox.handle_ack(seq, ack, now),
            Verdict::Fail(failure) => {
                if let Failure::Retryable { reason } | Failure::Overloaded { reason } = &failure {
                    self.shared.set_error(reason.clone());
                }
                outbox.handle_failure(seq, attempt, failure, now);
            }
        }
    }

    fn on_event(&mut self, ev: async_nats::Event) {
        match ev {
            async_nats::Event::Disconnected => {
                tracing::warn!("disconnected from the server; in-flight publishes will be re-sent");
                self.shared.set_error("disconnected");
                self.engine.handle_connection_lost(clock::now());
            }
            async_nats::Event::Connected => {
                tracing::info!("connected");
                // `send` checks sizes against the server connected now; each transmit re-reads it
                // too (the client may store the new INFO just after announcing the connection).
                self.note_max_payload(self.transport.max_payload());
                // The breaker's reconnect delay may have grown to minutes during a long outage;
                // the client is back now, so the probe goes at once (issue #9 item 6).
                self.engine.handle_reconnected(clock::now());
                if !self.stream_checked {
                    self.stream_check_at = Some(clock::now());
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
    /// and the log, `health().ordering`, `health().ordering_reason` and `last_error` say why.
    fn guard_chaining(&mut self, replicas: u32) {
        if let Some(reason) = chaining_guard(&self.transport.server_version(), replicas) {
            if let Some(outbox) = self.engine.outbox_mut() {
                outbox.use_per_key_serial(reason);
            }
        }
    }

    /// The stream is known (checked, or not to be looked at): picks the delivery mechanism
    /// ([`crate::engine::choose`]) and moves whatever is queued to it. Per-event delivery keeps
    /// chaining off where the server makes it unsafe.
    fn stream_known(&mut self, replicas: u32, allow_batched: Option<bool>) {
        self.replicas = replicas;
        let version = self.transport.server_version();
        let (mechanism, reason) = choose(&self.config, &version, allow_batched);
        if mechanism == Mechanism::FastBatch {
            match LaneSet::new(&self.config, &self.inbox) {
                Ok(lanes) => {
                    self.engine.switch_to(Engine::Lanes(lanes), clock::now());
                }
                Err(e) => {
                    // Every lane setting derives from validated sink settings; say so if not.
                    let why = format!("fast-batch lane settings refused ({e}); per-event acks");
                    self.set_mechanism(Mechanism::PerEvent, why);
                    self.guard_chaining(replicas);
                    return;
                }
            }
        } else {
            self.guard_chaining(replicas);
        }
        self.set_mechanism(mechanism, reason);
    }

    fn set_mechanism(&self, mechanism: Mechanism, reason: String) {
        tracing::info!(%mechanism, %reason, "delivery mechanism");
        m::mechanism(mechanism);
        let lanes = self.engine.lanes();
        self.shared.health.send_modify(|h| {
            h.mechanism = mechanism;
            h.lanes = lanes;
            h.mechanism_reason = reason;
        });
    }

    /// Applies the stream policy once the client is connected (the server was down at start).
    /// Until it passes, events stay queued and `health().last_error` says why.
    async fn deferred_stream_check(&mut self) {
        let Some(provision) = self.provision.as_ref().filter(|p| p.is_connected()) else {
            self.stream_check_at = None; // the Connected event brings it back
            return;
        };
        match provision.check().await {
            Ok(checked) => {
                tracing::info!(stream = %self.config.stream, "stream checked after the first connection");
                self.duplicate_window = Some(checked.duplicate_window);
                self.stream_known(checked.replicas, Some(checked.allow_batched));
                self.stream_checked = true;
                self.stream_check_at = None;
            }
            Err(e) => {
                let text = format!("{e}; events stay queued until the stream check passes");
                tracing::warn!(error = %text, "stream check failed");
                self.shared.set_error(text);
                self.stream_check_at = Some(clock::now() + STREAM_RECHECK);
            }
        }
    }

    async fn recreate_stream(&mut self) {
        if let Some(provision) = &self.provision {
            if let Err(e) = provision.recreate().await {
                self.shared.set_error(e);
            }
        }
    }

    /// The running re-verification found that the stream allows batches now (an operator
    /// followed the start check's advice): per-event delivery hands what it holds to lanes, same
    /// ids, same order. Publishes still in flight are answered on subjects the lanes ignore; the
    /// lanes re-send those events, and the stream's duplicate window absorbs a second copy.
    fn batches_allowed_now(&mut self) {
        let allowed = self.provision.as_ref().and_then(Provisioner::allow_batched);
        if allowed != Some(true) || !matches!(self.engine, Engine::PerEvent(_)) {
            return;
        }
        let (mechanism, _) = choose(&self.config, &self.transport.server_version(), allowed);
        if mechanism == Mechanism::FastBatch {
            tracing::info!(stream = %self.config.stream, "the stream allows batches now");
            self.stream_known(self.replicas, allowed);
        }
    }

    /// Whether a violation of the running stream makes publishing unsafe now.
    fn stream_held(&self) -> bool {
        self.stream_violations
            .iter()
            .any(Violation::blocks_delivery)
    }

    fn on_stream_check(&mut self, check: StreamCheck) {
        if !self.stream_checked {
            return; // the start policy is still being applied: its check decides
        }
        if matches!(check, StreamCheck::Verified(_)) {
            self.batches_allowed_now();
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
        self.shared
            .health
            .send_modify(|h| h.stream_violations.clone_from(&self.stream_violations));
    }

    /// Publishes the health snapshot (only when something in it changed) and the gauges.
    fn publish_state(&self) {
        let queued = self.engine.len();
        let in_flight = self.engine.in_flight();
        let window = self.engine.window();
        let breaker = match self.engine.breaker() {
            BreakerState::Closed { .. } => BreakerStatus::Closed,
            BreakerState::Open { .. } => BreakerStatus::Open,
            BreakerState::HalfOpen { .. } => BreakerStatus::HalfOpen,
        };
        let ordering = self.engine.ordering(self.config.ordering);
        let lanes = self.engine.lanes();
        let replaying = self.replay.is_some() || self.replay_next.is_some();
        self.shared.health.send_if_modified(|h| {
            let changed = (
                h.queued,
                h.in_flight,
                h.window,
                h.breaker,
                h.ordering,
                h.lanes,
                h.spool_replay_pending,
            ) != (
                queued, in_flight, window, breaker, ordering, lanes, replaying,
            );
            h.lanes = lanes;
            h.spool_replay_pending = replaying;
            h.queued = queued;
            h.in_flight = in_flight;
            h.window = window;
            h.breaker = breaker;
            h.ordering = ordering;
            changed
        });
        m::gauges(queued, in_flight, window);
    }

    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let mut unqueued = self.fail_unqueued_commands();
        let mut not_delivered = self.fail_waiting_events();
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

    /// Stops taking commands and answers those still queued: events `send` accepted fail as not
    /// delivered (and are returned for the report), flushes return, closers wait for the report.
    fn fail_unqueued_commands(&mut self) -> Vec<(String, MsgId, bool)> {
        self.commands.close();
        let mut unqueued = Vec::new();
        // What waited behind an unfinished replay first, then what is still in the channel.
        let deferred: Vec<Command> = self.deferred.drain(..).collect();
        let queued = std::iter::from_fn(|| self.commands.try_recv().ok());
        for cmd in deferred.into_iter().chain(queued.collect::<Vec<_>>()) {
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
        unqueued
    }

    /// Fails every queued or in-flight event still owed an outcome as not delivered, in order.
    fn fail_waiting_events(&mut self) -> Vec<(String, MsgId, bool)> {
        // Mid-panic only what cannot panic: no logging.
        let quiet = std::thread::panicking();
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
        not_delivered
    }
}

impl<T: Transport> Drop for Driver<T> {
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
    shared.health.send_modify(|h| h.retried_beyond_window += 1);
    tracing::warn!(parent: &w.span, ce.id = %w.event_id, ?waited, ?window, "{what}");
}

/// What confirmed an event: its own publish ack, or a fast batch.
enum Confirmed {
    Ack(Ack),
    Batch(LaneReceipt),
}

impl Confirmed {
    fn receipt(self, msg_id: MsgId, stream: &str) -> Receipt {
        match self {
            Confirmed::Ack(ack) => Receipt {
                stream: ack.stream,
                sequence: Some(ack.sequence),
                duplicate: ack.duplicate,
                msg_id,
                batch: None,
            },
            Confirmed::Batch(r) => Receipt {
                stream: stream.to_owned(),
                sequence: None,
                duplicate: false,
                msg_id,
                batch: Some(BatchReceipt {
                    id: r.batch.as_str().to_owned(),
                    seq: r.batch_seq,
                }),
            },
        }
    }
}

/// A transmission that no longer fits the server's `max_payload`: that event fails alone.
fn too_large_failure(size: usize, max_payload: usize) -> Failure {
    Failure::Terminal(Rejection {
        code: None,
        reason: format!("{size} bytes on the wire; the server's max_payload is {max_payload}"),
    })
}

/// The next message of `rx`, or never when there is none.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
