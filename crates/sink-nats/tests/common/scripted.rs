//! The test kit's scripted broker behind sink-nats's `Transport` seam: the real driver runs
//! in-process against it on tokio's paused clock.
//!
//! Publishes reach the broker with the headers the driver wrote (`Nats-Msg-Id`,
//! `Nats-Expected-Last-Msg-Id`); its replies come back as the NATS messages a server sends (a
//! JSON ack or API error, or a 503/429 status), so the driver's own classification runs too. While
//! the connection is down (`Line::disconnect`, or a scripted `Fault::ConnectionLoss`, until
//! `Line::reconnect`), publishes vanish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::header::{NATS_EXPECTED_LAST_MESSAGE_ID, NATS_MESSAGE_ID};
use async_nats::{Event, HeaderMap, Message, StatusCode};
use bytes::Bytes;
use futures::channel::mpsc as stream_channel;
use sink_core::event::MsgId;
use sink_core::outbox::Failure;
use sink_nats::{Transport, TransportError};
use sink_testkit::{PublishRequest, Reply, ScriptedBroker};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// One publish as the broker saw it, stamped with virtual time since the transport started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub at: Duration,
    pub msg_id: String,
    pub expected_last: Option<String>,
    /// False when the connection was down and the publish vanished.
    pub reached_broker: bool,
}

struct State {
    broker: ScriptedBroker,
    up: bool,
    /// Publish tag (the broker's `seq`) -> the reply subject to answer on.
    reply_to: HashMap<u64, String>,
    next_tag: u64,
    replies: Option<stream_channel::UnboundedSender<Message>>,
    sent: Vec<Sent>,
}

/// The transport the sink owns.
pub struct ScriptedTransport {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    origin: Instant,
    /// For a connection the broker's script drops ([`sink_testkit::Fault::ConnectionLoss`]).
    events: mpsc::UnboundedSender<Event>,
}

/// The test's side of the same connection: faults, outages, what was sent.
#[derive(Clone)]
pub struct Line {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    events: mpsc::UnboundedSender<Event>,
}

/// A connected transport over `broker`, the test's handle to it, and the connection events the
/// sink reads (give them to `SinkBuilder::start_on`).
pub fn scripted(
    broker: ScriptedBroker,
) -> (ScriptedTransport, Line, mpsc::UnboundedReceiver<Event>) {
    let state = Arc::new(Mutex::new(State {
        broker,
        up: true,
        reply_to: HashMap::new(),
        next_tag: 0,
        replies: None,
        sent: Vec::new(),
    }));
    let wake = Arc::new(Notify::new());
    let (events, events_rx) = mpsc::unbounded_channel();
    let transport = ScriptedTransport {
        state: state.clone(),
        wake: wake.clone(),
        origin: Instant::now(),
        events: events.clone(),
    };
    (
        transport,
        Line {
            state,
            wake,
            events,
        },
        events_rx,
    )
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Line {
    /// The connection drops: outstanding replies vanish, later publishes too, until `reconnect`.
    pub fn disconnect(&self) {
        let mut s = lock(&self.state);
        s.up = false;
        s.broker.lose_connection();
        s.broker.take_connection_lost();
        let _ = self.events.send(Event::Disconnected);
    }

    /// The connection is back.
    pub fn reconnect(&self) {
        lock(&self.state).up = true;
        let _ = self.events.send(Event::Connected);
    }

    /// Runs `f` on the broker (inject faults, read what is stored).
    pub fn broker<R>(&self, f: impl FnOnce(&mut ScriptedBroker) -> R) -> R {
        let r = f(&mut lock(&self.state).broker);
        self.wake.notify_one();
        r
    }

    /// Every publish so far.
    pub fn sent(&self) -> Vec<Sent> {
        lock(&self.state).sent.clone()
    }
}

impl Transport for ScriptedTransport {
    type Replies = stream_channel::UnboundedReceiver<Message>;

    fn new_inbox(&self) -> String {
        "_INBOX.scripted".to_owned()
    }

    async fn subscribe(&self, _subject: String) -> Result<Self::Replies, TransportError> {
        let (tx, rx) = stream_channel::unbounded();
        lock(&self.state).replies = Some(tx);
        tokio::spawn(deliver_replies(self.state.clone(), self.wake.clone()));
        Ok(rx)
    }

    async fn publish(
        &self,
        subject: String,
        reply: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), TransportError> {
        let header = |name| headers.get(name).map(|v| v.as_str().to_owned());
        let msg_id = header(NATS_MESSAGE_ID).expect("every publish carries Nats-Msg-Id");
        let expected_last = header(NATS_EXPECTED_LAST_MESSAGE_ID);
        let mut s = lock(&self.state);
        let reached_broker = s.up;
        s.sent.push(Sent {
            at: self.origin.elapsed(),
            msg_id: msg_id.clone(),
            expected_last: expected_last.clone(),
            reached_broker,
        });
        if !s.up {
            return Ok(());
        }
        let tag = s.next_tag;
        s.next_tag += 1;
        s.reply_to.insert(tag, reply);
        let request = PublishRequest {
            msg_id: MsgId::from_raw(msg_id),
            expected_last_msg_id: expected_last.map(MsgId::from_raw),
            subject,
            body_len: body.len(),
            seq: tag,
            attempt: 1,
        };
        s.broker.receive(request, Instant::now().into_std());
        if s.broker.take_connection_lost() {
            // Down until the test calls `Line::reconnect`.
            s.up = false;
            let _ = self.events.send(Event::Disconnected);
        }
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    fn max_payload(&self) -> usize {
        1024 * 1024
    }

    fn server_version(&self) -> String {
        "2.10.22".to_owned()
    }
}

/// Hands each reply to the driver when the broker has it due, sleeping on tokio's (paused) clock
/// in between. Ends when the driver drops its subscription.
async fn deliver_replies(state: Arc<Mutex<State>>, wake: Arc<Notify>) {
    loop {
        let next = {
            let mut s = lock(&state);
            let now = Instant::now().into_std();
            while let Some((tag, _, reply)) = s.broker.poll_reply(now) {
                let Some(subject) = s.reply_to.get(&tag).cloned() else {
                    continue;
                };
                let Some(tx) = &s.replies else { return };
                if tx.unbounded_send(message(subject, &reply)).is_err() {
                    return;
                }
            }
            s.broker.poll_timeout()
        };
        match next {
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(Instant::from_std(due)) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// The NATS message a server sends for `reply`.
fn message(subject: String, reply: &Reply) -> Message {
    let (status, payload) = match reply {
        Reply::Ack(ack) => (
            None,
            serde_json::json!({
                "stream": ack.stream,
                "seq": ack.sequence,
                "duplicate": ack.duplicate,
            }),
        ),
        Reply::Fail(Failure::Retryable { .. } | Failure::Timeout) => {
            (Some(StatusCode::NO_RESPONDERS), serde_json::Value::Null)
        }
        Reply::Fail(Failure::Overloaded { .. }) => (
            Some(StatusCode::from_u16(429).expect("valid status")),
            serde_json::Value::Null,
        ),
        Reply::Fail(Failure::WrongLastMsgId { actual }) => (
            None,
            api_error(
                10070,
                &format!("wrong last msg ID: {}", actual.as_deref().unwrap_or("")),
            ),
        ),
        Reply::Fail(Failure::InProcess) => {
            (None, api_error(10158, "duplicate message id is in process"))
        }
        Reply::Fail(Failure::Terminal(rejection)) => (
            None,
            api_error(rejection.code.unwrap_or(0), &rejection.reason),
        ),
    };
    let payload = if payload.is_null() {
        Bytes::new()
    } else {
        Bytes::from(payload.to_string())
    };
    Message {
        subject: subject.into(),
        reply: None,
        length: payload.len(),
        payload,
        headers: None,
        status,
        description: None,
    }
}

fn api_error(err_code: u16, description: &str) -> serde_json::Value {
    serde_json::json!({
        "error": { "code": 400, "err_code": err_code, "description": description }
    })
}
