//! What a spool record holds for one accepted event: the message as it will be published (subject, `Nats-Msg-Id`, headers, body, ordering key), the CloudEvent id for reports, and the acceptance time; a versioned, length-prefixed binary form.
//!
//! Layout (all integers little-endian): `u8` payload version (1), `u64` acceptance time in unix
//! milliseconds, then the strings subject, msg id, ordering key and event id, each as `u32`
//! length + UTF-8 bytes, a `u16` header count and that many name/value string pairs, and the
//! body as `u32` length + bytes. The record around it carries its own length and checksum, so
//! this form only has to be unambiguous; decoding still checks every length against what is
//! there and refuses a payload of a newer version by name.

use bytes::Bytes;

use crate::event::MsgId;
use crate::outbox::Message;

/// The payload version this build writes and reads.
pub const PAYLOAD_VERSION: u8 = 1;

/// One spooled event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledEvent {
    /// The message to publish.
    pub message: Message,
    /// The CloudEvent id (for outcomes and reports).
    pub event_id: String,
    /// When `send` accepted it, in unix milliseconds.
    pub unix_ms: u64,
}

/// Why a payload could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// Written by a newer build.
    #[error("spooled event payload version {found} is newer than this build reads ({PAYLOAD_VERSION}); deliver the spool with the jetsink version that wrote it")]
    NewerVersion {
        /// The version found.
        found: u8,
    },
    /// Shorter than its own lengths say.
    #[error("spooled event payload ends inside its {field}")]
    Truncated {
        /// What was being read.
        field: &'static str,
    },
    /// A string field is not UTF-8.
    #[error("spooled event payload: {field} is not UTF-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// Bytes after the body.
    #[error("spooled event payload has {extra} bytes after its body")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// More headers than the form can count, or a field longer than `u32::MAX` bytes.
    #[error("spooled event {field} is too large for the payload form")]
    TooLarge {
        /// Which field.
        field: &'static str,
    },
}

impl SpooledEvent {
    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>, PayloadError> {
        let m = &self.message;
        let headers: usize = m.headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(
            1 + 8
                + 4 * 5
                + 2
                + m.subject.len()
                + m.msg_id.as_str().len()
                + m.key.len()
                + self.event_id.len()
                + headers
                + m.body.len(),
        );
        out.push(PAYLOAD_VERSION);
        out.extend_from_slice(&self.unix_ms.to_le_bytes());
        put_bytes(&mut out, m.subject.as_bytes(), "subject")?;
        put_bytes(&mut out, m.msg_id.as_str().as_bytes(), "msg id")?;
        put_bytes(&mut out, m.key.as_bytes(), "ordering key")?;
        put_bytes(&mut out, self.event_id.as_bytes(), "event id")?;
        let count = u16::try_from(m.headers.len())
            .map_err(|_| PayloadError::TooLarge { field: "headers" })?;
        out.extend_from_slice(&count.to_le_bytes());
        for (k, v) in &m.headers {
            put_bytes(&mut out, k.as_bytes(), "header name")?;
            put_bytes(&mut out, v.as_bytes(), "header value")?;
        }
        put_bytes(&mut out, &m.body, "body")?;
        Ok(out)
    }

    /// Reads a payload written by [`encode`](Self::encode).
    pub fn decode(payload: &[u8]) -> Result<Self, PayloadError> {
        let mut r = Reader { rest: payload };
        let version = r.take(1, "version")?[0];
        if version > PAYLOAD_VERSION {
            return Err(PayloadError::NewerVersion { found: version });
        }
        let unix_ms = u64::from_le_bytes(r.take(8, "time")?.try_into().expect("8 bytes"));
        let subject = r.string("subject")?;
        let msg_id = MsgId::from_raw(r.string("msg id")?);
        let key = r.string("ordering key")?;
        let event_id = r.string("event id")?;
        let count = u16::from_le_bytes(r.take(2, "header count")?.try_into().expect("2 bytes"));
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name = r.string("header name")?;
            let value = r.string("header value")?;
            headers.push((name, value));
        }
        let body = Bytes::copy_from_slice(r.bytes("body")?);
        if !r.rest.is_empty() {
            return Err(PayloadError::TrailingBytes {
                extra: r.rest.len(),
            });
        }
        Ok(SpooledEvent {
            message: Message {
                subject,
                msg_id,
                headers,
                body,
                key,
            },
            event_id,
            unix_ms,
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8], field: &'static str) -> Result<(), PayloadError> {
    let len = u32::try_from(bytes.len()).map_err(|_| PayloadError::TooLarge { field })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], PayloadError> {
        if self.rest.len() < n {
            return Err(PayloadError::Truncated { field });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], PayloadError> {
        let len = u32::from_le_bytes(self.take(4, field)?.try_into().expect("4 bytes"));
        let len = usize::try_from(len).map_err(|_| PayloadError::TooLarge { field })?;
        self.take(len, field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, PayloadError> {
        let bytes = self.bytes(field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| PayloadError::NotUtf8 { field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(body: &[u8], headers: Vec<(String, String)>) -> SpooledEvent {
        SpooledEvent {
            message: Message {
                subject: "cellos.events.acme.v1".into(),
                msg_id: MsgId::from_raw("ce1-0123456789abcdef".into()),
                headers,
                body: Bytes::copy_from_slice(body),
                key: "acme".into(),
            },
            event_id: "evt-1".into(),
            unix_ms: 1_764_000_000_000,
        }
    }

    proptest! {
        #[test]
        fn every_event_reads_back_as_written(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            headers in proptest::collection::vec(("[a-z-]{1,12}", "\\PC{0,24}"), 0..6),
        ) {
            let e = event(&body, headers);
            let bytes = e.encode().expect("encodes");
            prop_assert_eq!(SpooledEvent::decode(&bytes).expect("decodes"), e);
        }

        #[test]
        fn every_cut_is_refused_never_misread(cut in 0usize..200) {
            let e = event(b"{\"a\":1}", vec![("content-type".into(), "application/json".into())]);
            let bytes = e.encode().expect("encodes");
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(SpooledEvent::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn a_newer_version_and_trailing_bytes_are_named() {
        let mut bytes = event(b"x", Vec::new()).encode().expect("encodes");
        bytes.push(0);
        assert_eq!(
            SpooledEvent::decode(&bytes),
            Err(PayloadError::TrailingBytes { extra: 1 })
        );
        bytes[0] = PAYLOAD_VERSION + 1;
        let err = SpooledEvent::decode(&bytes).expect_err("newer");
        assert_eq!(err, PayloadError::NewerVersion { found: 2 });
        assert!(
            err.to_string().contains("jetsink version that wrote it"),
            "{err}"
        );
    }
}
