//! What a publish looks like on the wire: its headers, its reply subject, and the size the server counts.

use std::fmt::Write as _;

use async_nats::header::{NATS_EXPECTED_LAST_MESSAGE_ID, NATS_EXPECTED_STREAM, NATS_MESSAGE_ID};
use async_nats::HeaderMap;
use sink_core::outbox::Message;

/// Every header of a publish except `Nats-Expected-Last-Msg-Id`, which depends on the attempt.
pub(crate) fn base_headers(message: &Message, expected_stream: Option<&str>) -> HeaderMap {
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
pub(crate) fn wire_size(headers: &HeaderMap, body: usize) -> usize {
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

/// The reply subject of one transmission: `<inbox>.<seq>.<attempt>`, under the driver's one
/// wildcard subscription, so the reply names the event and the attempt it answers.
pub(crate) fn reply_subject(inbox: &str, seq: u64, attempt: u32) -> String {
    let mut reply = String::with_capacity(inbox.len() + 24);
    reply.push_str(inbox);
    let _ = write!(reply, ".{seq}.{attempt}");
    reply
}

/// The (event sequence, attempt) a reply subject under `inbox` names.
pub(crate) fn parse_reply_subject(subject: &str, inbox: &str) -> Option<(u64, u32)> {
    let rest = subject.strip_prefix(inbox)?.strip_prefix('.')?;
    let (seq, attempt) = rest.split_once('.')?;
    Some((seq.parse().ok()?, attempt.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sink_core::encoding::{encode, Encoding};
    use sink_core::event::{CloudEvent, MsgId};

    #[test]
    fn reply_subjects_round_trip() {
        assert_eq!(
            parse_reply_subject("_INBOX.ab.17.3", "_INBOX.ab"),
            Some((17, 3))
        );
        assert_eq!(parse_reply_subject("_INBOX.ab.x.3", "_INBOX.ab"), None);
        assert_eq!(parse_reply_subject("_INBOX.other.1.1", "_INBOX.ab"), None);
    }
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
}
