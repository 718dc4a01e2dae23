//! Maps broker replies (JetStream publish acks, API errors, NATS status messages) to outbox inputs.
//!
//! Classes (DESIGN.md): retryable (503 / no responders, stream unavailable, store failed on a
//! full disk, another stream capturing the subject), overloaded (429: retryable, and the outbox shrinks
//! its window), ambiguous (timeout, handled by the outbox; 10158 "duplicate message id is in
//! process" on replicated streams), wrong-last-msg-id (the ordering chain), and
//! terminal for one event (too large, stream limits with discard-new, sealed, anything else 4xx).

use serde::Deserialize;
use sink_core::outbox::{Ack, Failure, Rejection};

/// JetStream: the expected last message id did not match.
pub const WRONG_LAST_MSG_ID: u16 = 10070;
/// JetStream: the subject is captured by a stream other than `Nats-Expected-Stream` (our stream
/// was replaced by another one on the same subjects). Retryable: events wait for the right stream.
pub const EXPECTED_STREAM_MISMATCH: u16 = 10060;
/// JetStream: message larger than the stream's max message size.
pub const MESSAGE_EXCEEDS_MAXIMUM: u16 = 10054;
/// JetStream: the stream could not store the message (limits, disk).
pub const STREAM_STORE_FAILED: u16 = 10077;
/// JetStream: not enough storage resources.
pub const INSUFFICIENT_RESOURCES: u16 = 10023;
/// JetStream: stream not found.
pub const STREAM_NOT_FOUND: u16 = 10059;
/// JetStream (replicated streams, 2.11+): "duplicate message id is in process". The leader holds
/// the id as undecided: a transmission of it is still being replicated, or one failed when it was
/// applied and the id stays blocked until the duplicate window passes. Ambiguous, never terminal.
pub const DUPLICATE_IN_PROCESS: u16 = 10158;

#[derive(Debug, Deserialize)]
struct PubAckJson {
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<ApiErrorJson>,
}

#[derive(Debug, Deserialize)]
struct ApiErrorJson {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

/// What one reply means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stored.
    Ack(Ack),
    /// Not stored (or in doubt), with its class.
    Fail(Failure),
}

/// Classifies a reply: `status` is the NATS status code of a header-only reply (e.g. 503 no
/// responders), `body` the payload.
pub fn classify(status: Option<u16>, status_description: Option<&str>, body: &[u8]) -> Verdict {
    if let Some(code) = status {
        if code == 503 {
            return Verdict::Fail(Failure::Retryable {
                reason: "no responders: no stream captures this subject, or JetStream is \
                         restarting or electing a leader"
                    .into(),
            });
        }
        if code == 429 {
            return Verdict::Fail(Failure::Overloaded {
                reason: format!(
                    "broker status 429: {}",
                    status_description.unwrap_or("Too Many Requests")
                ),
            });
        }
        if code >= 300 {
            let what = status_description.unwrap_or("status reply");
            return Verdict::Fail(Failure::Retryable {
                reason: format!("broker status {code}: {what}"),
            });
        }
    }
    let parsed: PubAckJson = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => {
            return Verdict::Fail(Failure::Retryable {
                reason: format!("unreadable publish ack ({e})"),
            })
        }
    };
    if let Some(err) = parsed.error {
        return Verdict::Fail(classify_api_error(err.code, err.err_code, &err.description));
    }
    match (parsed.stream, parsed.seq) {
        (Some(stream), Some(sequence)) if sequence > 0 => Verdict::Ack(Ack {
            stream,
            sequence,
            duplicate: parsed.duplicate,
        }),
        _ => Verdict::Fail(Failure::Retryable {
            reason: "publish ack without stream and sequence".into(),
        }),
    }
}

/// Classifies a JetStream API error (`code` is HTTP-like, `err_code` the JetStream code).
pub fn classify_api_error(code: u16, err_code: u16, description: &str) -> Failure {
    let terminal = |code, err_code: u16| {
        Failure::Terminal(Rejection {
            code: Some(if err_code != 0 { err_code } else { code }),
            reason: description.to_owned(),
        })
    };
    match err_code {
        WRONG_LAST_MSG_ID => Failure::WrongLastMsgId {
            actual: parse_wrong_last_id(description),
        },
        DUPLICATE_IN_PROCESS => Failure::InProcess,
        MESSAGE_EXCEEDS_MAXIMUM => terminal(code, err_code),
        STREAM_STORE_FAILED if is_limit_refusal(description) => terminal(code, err_code),
        INSUFFICIENT_RESOURCES
        | STREAM_STORE_FAILED
        | STREAM_NOT_FOUND
        | EXPECTED_STREAM_MISMATCH => Failure::Retryable {
            reason: format!("{description} (error {err_code})"),
        },
        _ if code == 429 => Failure::Overloaded {
            reason: format!("{description} (error {code}/{err_code})"),
        },
        _ if code >= 500 => Failure::Retryable {
            reason: format!("{description} (error {code}/{err_code})"),
        },
        _ if is_limit_refusal(description) => terminal(code, err_code),
        _ => terminal(code, err_code),
    }
}

/// Stream limits with discard-new refuse a message for good (until an operator frees space): the
/// event fails on its own and the others continue.
fn is_limit_refusal(description: &str) -> bool {
    let d = description.to_ascii_lowercase();
    d.contains("maximum messages")
        || d.contains("maximum bytes")
        || d.contains("maximum messages per subject")
        || d.contains("sealed")
}

/// Extracts the id from `"wrong last msg ID: <id>"`. An empty id (the server forgot it) gives `None`.
pub fn parse_wrong_last_id(description: &str) -> Option<String> {
    let (_, rest) = description.split_once("ID:")?;
    let id = rest.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(v: Verdict) -> Failure {
        match v {
            Verdict::Fail(f) => f,
            Verdict::Ack(a) => panic!("expected a failure, got {a:?}"),
        }
    }

    #[test]
    fn acks_and_duplicates() {
        assert_eq!(
            classify(None, None, br#"{"stream":"S","seq":7}"#),
            Verdict::Ack(Ack {
                stream: "S".into(),
                sequence: 7,
                duplicate: false
            })
        );
        assert_eq!(
            classify(None, None, br#"{"stream":"S","seq":7,"duplicate":true}"#),
            Verdict::Ack(Ack {
                stream: "S".into(),
                sequence: 7,
                duplicate: true
            })
        );
    }

    #[test]
    fn classification_table() {
        let err = |code: u16, err_code: u16, d: &str| {
            fail(classify(
                None,
                None,
                format!(
                    r#"{{"error":{{"code":{code},"err_code":{err_code},"description":"{d}"}}}}"#
                )
                .as_bytes(),
            ))
        };
        assert_eq!(
            err(400, 10070, "wrong last msg ID: ce1-abc"),
            Failure::WrongLastMsgId {
                actual: Some("ce1-abc".into())
            }
        );
        assert_eq!(
            err(400, 10070, "wrong last msg ID: "),
            Failure::WrongLastMsgId { actual: None }
        );
        assert!(matches!(
            err(400, 10054, "message size exceeds maximum allowed"),
            Failure::Terminal(Rejection {
                code: Some(10054),
                ..
            })
        ));
        assert!(matches!(
            err(503, 10077, "maximum messages exceeded"),
            Failure::Terminal(Rejection {
                code: Some(10077),
                ..
            })
        ));
        assert!(matches!(
            err(503, 10077, "store failed: disk I/O"),
            Failure::Retryable { .. }
        ));
        assert!(matches!(
            err(429, 10167, "too many requests"),
            Failure::Overloaded { .. }
        ));
        // 2.11+ answers an overflowing stream ingest queue with a header-only status reply.
        assert!(matches!(
            fail(classify(Some(429), Some("Too Many Requests"), b"")),
            Failure::Overloaded { .. }
        ));
        assert!(matches!(
            err(400, 10060, "expected stream does not match"),
            Failure::Retryable { .. }
        ));
        assert!(matches!(
            err(503, 10023, "insufficient resources"),
            Failure::Retryable { .. }
        ));
        // A 409 would otherwise fall through to terminal: the event would be reported rejected
        // while its first transmission may still commit.
        assert_eq!(
            err(409, 10158, "duplicate message id is in process"),
            Failure::InProcess
        );
        assert!(matches!(
            err(400, 10003, "bad request"),
            Failure::Terminal(_)
        ));
        assert!(matches!(
            fail(classify(Some(503), None, b"")),
            Failure::Retryable { .. }
        ));
        assert!(matches!(
            fail(classify(None, None, b"not json")),
            Failure::Retryable { .. }
        ));
    }
}
