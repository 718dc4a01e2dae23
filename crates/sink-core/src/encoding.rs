//! Pure CloudEvent <-> NATS message mapping: structured and binary content modes of the CloudEvents
//! NATS protocol binding.
//!
//! # Structured mode (the default)
//!
//! The body is the event in the CloudEvents JSON format, with the single header
//! `Content-Type: application/cloudevents+json`. Every valid event survives it exactly.
//!
//! # Binary mode
//!
//! The body is the data; every attribute except `datacontenttype` is a `ce-<name>` header whose value
//! is percent-encoded (every byte of the UTF-8 form outside `!`..`~`, plus `"` and `%`, becomes
//! `%XX`), so header values are always printable ASCII. `datacontenttype` travels unencoded as
//! `Content-Type` (validation guarantees it is printable ASCII).
//!
//! Headers carry no type for the body, so decoding follows one rule:
//!
//! - an empty body means no data;
//! - when `Content-Type` is absent or JSON (`application/json`, `text/json`, `*/*+json`), a body that
//!   parses as JSON becomes [`Data::Json`], any other body [`Data::Binary`];
//! - with any other `Content-Type` the body is [`Data::Binary`].
//!
//! [`encode`] in binary mode refuses, with a typed error, the two kinds of events this rule would not
//! give back unchanged: JSON data under a non-JSON `datacontenttype`, and binary data that happens to
//! parse as JSON under an absent or JSON `datacontenttype`. Structured mode carries both.
//! For every other valid event `decode(encode(e)) == e` in both modes (property-tested below).
//!
//! ```
//! use sink_core::encoding::{decode, encode, Encoding};
//! use sink_core::event::CloudEvent;
//!
//! let event = CloudEvent::new("evt 1", "/orders", "order.created")
//!     .with_data_json(serde_json::json!({"tenantId": "acme"}));
//! let wire = encode(&event, Encoding::Binary)?;
//! assert!(wire.headers.contains(&("ce-id".to_owned(), "evt%201".to_owned())));
//! assert_eq!(&wire.body[..], br#"{"tenantId":"acme"}"#);
//! assert_eq!(decode(&wire.headers, &wire.body)?, event);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use bytes::Bytes;

use crate::event::{is_json_content_type, preview, CloudEvent, Data, EventError};

/// The media type of a structured-mode CloudEvents JSON body.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The media type of a batch of CloudEvents (not supported by this binding).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Name of the header holding the body's media type.
pub const CONTENT_TYPE: &str = "Content-Type";

/// Prefix of the attribute headers in binary mode.
pub const ATTRIBUTE_PREFIX: &str = "ce-";

/// How an event is laid out in a NATS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// JSON body holding the whole event (`application/cloudevents+json`).
    #[default]
    Structured,
    /// Data as the body, attributes as `ce-` headers.
    Binary,
}

impl Encoding {
    /// The name used in configuration: `structured` or `binary`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Structured => "structured",
            Encoding::Binary => "binary",
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configuration value that names no [`Encoding`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("encoding \"{value}\" is unknown; use `structured` or `binary`")]
pub struct UnknownEncoding {
    /// The value given (escaped preview).
    pub value: String,
}

impl std::str::FromStr for Encoding {
    type Err = UnknownEncoding;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "structured" => Ok(Encoding::Structured),
            "binary" => Ok(Encoding::Binary),
            other => Err(UnknownEncoding {
                value: preview(other),
            }),
        }
    }
}

/// A NATS message without its subject: headers in order, then the body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wire {
    /// Header name/value pairs, in the order they are to be sent.
    pub headers: Vec<(String, String)>,
    /// The message payload.
    pub body: Bytes,
}

/// Why an event cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The event is not a valid CloudEvent.
    #[error("invalid event: {0}")]
    InvalidEvent(EventError),
    /// Binary mode would read JSON data back as bytes.
    #[error("binary mode cannot carry JSON data under datacontenttype \"{content_type}\" (it would decode as bytes); use structured mode, a JSON datacontenttype, or binary data")]
    JsonDataUnderNonJsonContentType {
        /// The event's `datacontenttype` (escaped preview).
        content_type: String,
    },
    /// Binary mode would read binary data back as JSON.
    #[error("binary mode cannot carry binary data that parses as JSON without a non-JSON datacontenttype (found {content_type}); use structured mode or set e.g. application/octet-stream")]
    BinaryDataLooksLikeJson {
        /// The event's `datacontenttype`, or `none` (escaped preview).
        content_type: String,
    },
    /// Serializing the event to JSON failed.
    #[error("event could not be serialized to JSON ({message}); report this as a bug")]
    Serialize {
        /// The serializer's message.
        message: String,
    },
}

/// Why a NATS message is not a readable CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Neither a structured `Content-Type` nor any `ce-` header.
    #[error("message is not a CloudEvent: no `Content-Type: application/cloudevents+json` and no `ce-` headers; publish with a CloudEvents encoding")]
    NotACloudEvent,
    /// A CloudEvents format other than JSON, or a batch.
    #[error("header `Content-Type` is \"{content_type}\"; only single events in application/cloudevents+json are supported")]
    UnsupportedFormat {
        /// The `Content-Type` value (escaped preview).
        content_type: String,
    },
    /// The same attribute header appears twice.
    #[error("header `{name}` appears more than once; send each attribute once")]
    DuplicateHeader {
        /// The header name (escaped preview).
        name: String,
    },
    /// A `ce-` header value has a malformed percent escape.
    #[error(
        "header `{name}` has a malformed percent escape at byte {position}; encode `%` as %25"
    )]
    PercentEncoding {
        /// The header name (escaped preview).
        name: String,
        /// Byte offset of the `%`.
        position: usize,
    },
    /// A percent-decoded `ce-` header value is not UTF-8.
    #[error(
        "header `{name}` does not decode to UTF-8; percent-encode the UTF-8 bytes of the value"
    )]
    InvalidUtf8 {
        /// The header name (escaped preview).
        name: String,
    },
    /// Both `Content-Type` and `ce-datacontenttype` are present.
    #[error("both `Content-Type` and `ce-datacontenttype` are present; binary mode carries datacontenttype in `Content-Type` only")]
    ConflictingContentType,
    /// A `ce-` header uses a name that is not an attribute (`ce-data`, `ce-data_base64`).
    #[error("header `{name}` is not an attribute; binary mode carries data in the body")]
    DataHeader {
        /// The header name.
        name: String,
    },
    /// The event read from the message is invalid.
    #[error("invalid event: {0}")]
    InvalidEvent(EventError),
}

/// Initial size of the per-thread buffer structured bodies are serialised into.
const STRUCTURED_INITIAL_CAPACITY: usize = 1024;

/// A buffer larger than this is not kept for the next event (one huge event should not pin its
/// memory to the thread).
const SCRATCH_KEEP_LIMIT: usize = 64 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(STRUCTURED_INITIAL_CAPACITY));
}

/// Encodes a valid event as a NATS message.
pub fn encode(event: &CloudEvent, encoding: Encoding) -> Result<Wire, EncodeError> {
    event.validate().map_err(EncodeError::InvalidEvent)?;
    match encoding {
        Encoding::Structured => {
            // Serialised into this thread's reusable buffer, then copied once into an exact-size
            // body: one allocation per event instead of a growing Vec plus the shared header
            // `Bytes` adds for a Vec whose capacity exceeds its length.
            let body = SCRATCH.with(|scratch| {
                let mut buf = scratch.borrow_mut();
                buf.clear();
                let body =
                    serde_json::to_writer(&mut *buf, event).map(|()| Bytes::copy_from_slice(&buf));
                if buf.capacity() > SCRATCH_KEEP_LIMIT {
                    *buf = Vec::with_capacity(STRUCTURED_INITIAL_CAPACITY);
                }
                body
            });
            let body = body.map_err(|err| EncodeError::Serialize {
                message: err.to_string(),
            })?;
            Ok(Wire {
                headers: vec![(CONTENT_TYPE.to_owned(), STRUCTURED_CONTENT_TYPE.to_owned())],
                body,
            })
        }
        Encoding::Binary => encode_binary(event),
    }
}

fn encode_binary(event: &CloudEvent) -> Result<Wire, EncodeError> {
    let json_type = event
        .datacontenttype
        .as_deref()
        .is_none_or(is_json_content_type);
    let body = match &event.data {
        None => Bytes::new(),
        Some(Data::Json(value)) => {
            if !json_type {
                return Err(EncodeError::JsonDataUnderNonJsonContentType {
                    content_type: preview(event.datacontenttype.as_deref().unwrap_or_default()),
                });
            }
            let text = serde_json::to_vec(value).map_err(|err| EncodeError::Serialize {
                message: err.to_string(),
            })?;
            Bytes::from(text)
        }
        Some(Data::Binary(bytes)) => {
            if json_type && serde_json::from_slice::<serde_json::Value>(bytes).is_ok() {
                return Err(EncodeError::BinaryDataLooksLikeJson {
                    content_type: preview(event.datacontenttype.as_deref().unwrap_or("none")),
                });
            }
            bytes.clone()
        }
    };
    let mut headers = Vec::with_capacity(8 + event.extensions.len());
    let mut attribute = |name: &str, value: &str| {
        headers.push((format!("{ATTRIBUTE_PREFIX}{name}"), percent_encode(value)));
    };
    attribute("specversion", &event.specversion);
    attribute("id", &event.id);
    attribute("source", &event.source);
    attribute("type", &event.ty);
    for (name, value) in [
        ("dataschema", &event.dataschema),
        ("subject", &event.subject),
        ("time", &event.time),
    ] {
        if let Some(value) = value {
            attribute(name, value);
        }
    }
    for (name, value) in &event.extensions {
        attribute(name, value);
    }
    if let Some(content_type) = &event.datacontenttype {
        headers.push((CONTENT_TYPE.to_owned(), content_type.clone()));
    }
    Ok(Wire { headers, body })
}

/// Decodes a NATS message (headers + body) into a valid event, detecting the content mode:
/// `Content-Type: application/cloudevents+json` means structured, otherwise any `ce-` header means
/// binary.
pub fn decode(headers: &[(String, String)], body: &[u8]) -> Result<CloudEvent, DecodeError> {
    let mut content_type: Option<&str> = None;
    let mut has_attribute_header = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            if content_type.is_some() {
                return Err(DecodeError::DuplicateHeader {
                    name: preview(name),
                });
            }
            content_type = Some(value);
        } else if has_prefix_ignore_case(name, ATTRIBUTE_PREFIX) {
            has_attribute_header = true;
        }
    }
    if let Some(content_type) = content_type {
        let essence = crate::event::media_type_essence(content_type);
        if essence == STRUCTURED_CONTENT_TYPE {
            return CloudEvent::from_json_slice(body).map_err(DecodeError::InvalidEvent);
        }
        if essence.starts_with("application/cloudevents") {
            return Err(DecodeError::UnsupportedFormat {
                content_type: preview(content_type),
            });
        }
    }
    if !has_attribute_header {
        return Err(DecodeError::NotACloudEvent);
    }
    decode_binary(headers, content_type, body)
}

fn decode_binary(
    headers: &[(String, String)],
    content_type: Option<&str>,
    body: &[u8],
) -> Result<CloudEvent, DecodeError> {
    let mut attributes = std::collections::BTreeMap::new();
    for (name, value) in headers {
        if !has_prefix_ignore_case(name, ATTRIBUTE_PREFIX) {
            continue;
        }
        let attribute = name[ATTRIBUTE_PREFIX.len()..].to_ascii_lowercase();
        if attribute == "data" || attribute == "data_base64" {
            return Err(DecodeError::DataHeader {
                name: preview(name),
            });
        }
        let decoded = percent_decode(name, value)?;
        if attributes.insert(attribute, decoded).is_some() {
            return Err(DecodeError::DuplicateHeader {
                name: preview(name),
            });
        }
    }
    let datacontenttype = match (content_type, attributes.remove("datacontenttype")) {
        (Some(_), Some(_)) => return Err(DecodeError::ConflictingContentType),
        (Some(header), None) => Some(header.to_owned()),
        (None, attribute) => attribute,
    };
    let mut required = |attribute: &'static str| {
        attributes
            .remove(attribute)
            .ok_or(DecodeError::InvalidEvent(EventError::MissingAttribute {
                attribute,
            }))
    };
    let specversion = required("specversion")?;
    let id = required("id")?;
    let source = required("source")?;
    let ty = required("type")?;
    let data = if body.is_empty() {
        None
    } else if datacontenttype.as_deref().is_none_or(is_json_content_type) {
        match serde_json::from_slice(body) {
            Ok(value) => Some(Data::Json(value)),
            Err(_) => Some(Data::Binary(Bytes::copy_from_slice(body))),
        }
    } else {
        Some(Data::Binary(Bytes::copy_from_slice(body)))
    };
    let event = CloudEvent {
        id,
        source,
        specversion,
        ty,
        datacontenttype,
        dataschema: attributes.remove("dataschema"),
        subject: attributes.remove("subject"),
        time: attributes.remove("time"),
        extensions: attributes,
        data,
    };
    event.validate().map_err(DecodeError::InvalidEvent)?;
    Ok(event)
}

fn has_prefix_ignore_case(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Whether a byte goes into a header value as is (printable ASCII except `"` and `%`).
fn is_unreserved(byte: u8) -> bool {
    (0x21..=0x7E).contains(&byte) && byte != b'"' && byte != b'%'
}

/// Percent-encodes a `ce-` header value: every UTF-8 byte outside printable ASCII (space included),
/// `"` and `%` become `%XX` with uppercase hex digits.
pub fn percent_encode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xF)]));
        }
    }
    out
}

/// Reverses [`percent_encode`] (hex digits of either case); characters that are not escapes are kept.
fn percent_decode(name: &str, value: &str) -> Result<String, DecodeError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |offset: usize| {
                bytes
                    .get(i + offset)
                    .and_then(|&b| char::from(b).to_digit(16))
            };
            match (hex(1), hex(2)) {
                (Some(high), Some(low)) => {
                    // Two hex digits always fit a byte.
                    out.push(u8::try_from(high * 16 + low).unwrap_or_default());
                    i += 3;
                }
                _ => {
                    return Err(DecodeError::PercentEncoding {
                        name: preview(name),
                        position: i,
                    })
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::InvalidUtf8 {
        name: preview(name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn header<'a>(wire: &'a Wire, name: &str) -> Option<&'a str> {
        wire.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn sample() -> CloudEvent {
        CloudEvent::new("evt 1", "cellos://host-a/\"x\"", "cellos.cell.started")
            .with_subject("caf\u{e9} 100%")
            .with_time("2024-05-01T12:00:00Z")
            .with_extension("traceparent", "00-ab-cd-01")
            .with_data_json(json!({"tenantId": "acme", "n": 1.5}))
    }

    #[test]
    fn structured_mode_layout() {
        let wire = encode(&sample(), Encoding::default()).unwrap();
        assert_eq!(
            wire.headers,
            vec![(
                "Content-Type".to_owned(),
                "application/cloudevents+json".to_owned()
            )]
        );
        let body: Value = serde_json::from_slice(&wire.body).unwrap();
        assert_eq!(body["data"], json!({"tenantId": "acme", "n": 1.5}));
        assert_eq!(decode(&wire.headers, &wire.body), Ok(sample()));
    }

    #[test]
    fn binary_mode_layout_snapshot() {
        let wire = encode(&sample(), Encoding::Binary).unwrap();
        assert_eq!(header(&wire, "Content-Type"), Some("application/json"));
        assert_eq!(header(&wire, "ce-id"), Some("evt%201"));
        assert_eq!(header(&wire, "ce-subject"), Some("caf%C3%A9%20100%25"));
        assert_eq!(&wire.body[..], br#"{"n":1.5,"tenantId":"acme"}"#);
        insta::assert_debug_snapshot!(wire.headers);
        assert_eq!(decode(&wire.headers, &wire.body), Ok(sample()));
    }

    #[test]
    fn binary_data_rule_table() {
        let base = || CloudEvent::new("1", "/s", "t");
        let text = base().with_data_binary(&b"hello"[..], "text/plain");
        let json_looking = base().with_data_binary(&b"[1,2]"[..], "application/octet-stream");
        let raw_no_type = CloudEvent {
            data: Some(Data::Binary(Bytes::from_static(b"\xff\x00"))),
            ..base()
        };
        let json_no_type = CloudEvent {
            data: Some(Data::Json(json!("s"))),
            ..base()
        };
        for event in [text, json_looking, raw_no_type, json_no_type] {
            let wire = encode(&event, Encoding::Binary).unwrap();
            assert_eq!(decode(&wire.headers, &wire.body), Ok(event));
        }
        let json_as_text = base()
            .with_datacontenttype("text/plain")
            .with_data_json(json!("hi"));
        assert_eq!(
            encode(&json_as_text, Encoding::Binary),
            Err(EncodeError::JsonDataUnderNonJsonContentType {
                content_type: "text/plain".into()
            })
        );
        let bytes_as_json = base().with_data_binary(&b"123"[..], "application/json");
        assert_eq!(
            encode(&bytes_as_json, Encoding::Binary),
            Err(EncodeError::BinaryDataLooksLikeJson {
                content_type: "application/json".into()
            })
        );
        // Structured mode carries both.
        for event in [json_as_text, bytes_as_json] {
            let wire = encode(&event, Encoding::Structured).unwrap();
            assert_eq!(decode(&wire.headers, &wire.body), Ok(event));
        }
    }

    #[test]
    fn encoding_names() {
        for encoding in [Encoding::Structured, Encoding::Binary] {
            assert_eq!(encoding.to_string().parse(), Ok(encoding));
        }
        assert_eq!(
            "Binary".parse::<Encoding>(),
            Err(UnknownEncoding {
                value: "Binary".into()
            })
        );
    }

    #[test]
    fn invalid_events_are_not_encoded() {
        assert_eq!(
            encode(&CloudEvent::new("", "/s", "t"), Encoding::Structured),
            Err(EncodeError::InvalidEvent(EventError::EmptyAttribute {
                attribute: "id"
            }))
        );
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn decode_accepts_foreign_spellings() {
        let headers = h(&[
            ("CE-SpecVersion", "1.0"),
            ("Ce-Id", "a%2fb"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-datacontenttype", "text/plain"),
            ("Nats-Msg-Id", "ignored"),
        ]);
        let event = decode(&headers, b"hi").unwrap();
        assert_eq!(event.id, "a/b");
        assert_eq!(event.specversion, "1.0");
        assert_eq!(event.datacontenttype.as_deref(), Some("text/plain"));
        assert_eq!(event.data, Some(Data::Binary(Bytes::from_static(b"hi"))));
        assert!(event.extensions.is_empty());
        let structured = h(&[(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )]);
        let event = decode(
            &structured,
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#,
        )
        .unwrap();
        assert_eq!(event, CloudEvent::new("1", "/s", "t"));
    }

    #[test]
    fn decode_error_table() {
        let base = [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            h(&all)
        };
        type Case = (Vec<(String, String)>, &'static [u8], DecodeError);
        let cases: Vec<Case> = vec![
            (h(&[]), b"{}", DecodeError::NotACloudEvent),
            (
                h(&[("Content-Type", "application/json")]),
                b"{}",
                DecodeError::NotACloudEvent,
            ),
            (
                h(&[("Content-Type", "application/cloudevents-batch+json")]),
                b"[]",
                DecodeError::UnsupportedFormat {
                    content_type: "application/cloudevents-batch...".into(),
                },
            ),
            (
                with(&[("ce-id", "2")]),
                b"",
                DecodeError::DuplicateHeader {
                    name: "ce-id".into(),
                },
            ),
            (
                with(&[("ce-x", "50%")]),
                b"",
                DecodeError::PercentEncoding {
                    name: "ce-x".into(),
                    position: 2,
                },
            ),
            (
                with(&[("ce-x", "%zz")]),
                b"",
                DecodeError::PercentEncoding {
                    name: "ce-x".into(),
                    position: 0,
                },
            ),
            (
                with(&[("ce-x", "%FF")]),
                b"",
                DecodeError::InvalidUtf8 {
                    name: "ce-x".into(),
                },
            ),
            (
                with(&[("ce-datacontenttype", "a/b"), ("Content-Type", "a/b")]),
                b"",
                DecodeError::ConflictingContentType,
            ),
            (
                with(&[("ce-data", "x")]),
                b"",
                DecodeError::DataHeader {
                    name: "ce-data".into(),
                },
            ),
            (
                h(&base[1..]),
                b"",
                DecodeError::InvalidEvent(EventError::MissingAttribute {
                    attribute: "specversion",
                }),
            ),
            (
                with(&[("ce-Bad_Name", "x")]),
                b"",
                DecodeError::InvalidEvent(EventError::InvalidExtensionName {
                    name: "bad_name".into(),
                    reason: "it contains a character other than a-z and 0-9",
                }),
            ),
            (
                with(&[("ce-x", "a%0Ab")]),
                b"",
                DecodeError::InvalidEvent(EventError::ForbiddenCharacter {
                    attribute: "x".into(),
                    position: 1,
                    code_point: 0x0A,
                }),
            ),
            (
                h(&[("Content-Type", "application/cloudevents+json")]),
                b"{",
                DecodeError::InvalidEvent(EventError::Json {
                    message: "EOF while parsing an object at line 1 column 1".into(),
                }),
            ),
        ];
        for (headers, body, expected) in cases {
            assert_eq!(decode(&headers, body), Err(expected), "{headers:?}");
        }
    }

    #[test]
    fn percent_encoding_table() {
        let cases = [
            ("plain-token_1.2~", "plain-token_1.2~"),
            ("a b", "a%20b"),
            ("\"q\"", "%22q%22"),
            ("100%", "100%25"),
            ("tab\there", "tab%09here"),
            ("\u{7f}", "%7F"),
            ("é", "%C3%A9"),
            ("🦀", "%F0%9F%A6%80"),
            ("a:b/c?d=e&f", "a:b/c?d=e&f"),
        ];
        for (raw, encoded) in cases {
            assert_eq!(percent_encode(raw), encoded);
            assert_eq!(percent_decode("ce-x", encoded).as_deref(), Ok(raw));
        }
        assert_eq!(percent_decode("ce-x", "%c3%a9").as_deref(), Ok("é"));
    }

    #[test]
    fn error_messages_snapshot() {
        let messages: Vec<String> = [
            DecodeError::NotACloudEvent.to_string(),
            EncodeError::BinaryDataLooksLikeJson {
                content_type: "none".into(),
            }
            .to_string(),
            DecodeError::PercentEncoding {
                name: "ce-id".into(),
                position: 4,
            }
            .to_string(),
        ]
        .to_vec();
        insta::assert_debug_snapshot!(messages);
    }

    /// Strings mixing arbitrary non-control unicode with the characters the encodings escape.
    fn text(min: usize) -> impl Strategy<Value = String> {
        let max = min + 16;
        prop_oneof![
            proptest::string::string_regex(&format!("\\PC{{{min},{max}}}")).unwrap(),
            proptest::string::string_regex(&format!("[ %\"a-z0-9:/.*>$\\\\é🦀=+&]{{{min},{max}}}"))
                .unwrap(),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn data() -> impl Strategy<Value = Option<Data>> {
        prop_oneof![
            Just(None),
            json_value()
                .prop_filter("null is no data", |v| !v.is_null())
                .prop_map(|v| Some(Data::Json(v))),
            proptest::collection::vec(any::<u8>(), 1..48)
                .prop_map(|b| Some(Data::Binary(Bytes::from(b)))),
            json_value()
                .prop_filter("null is no data", |v| !v.is_null())
                .prop_map(|v| Some(Data::Binary(Bytes::from(v.to_string())))),
        ]
    }

    fn event() -> impl Strategy<Value = CloudEvent> {
        let content_type = proptest::option::of(prop_oneof![
            Just("application/json".to_owned()),
            Just("text/plain; charset=utf-8".to_owned()),
            Just("application/octet-stream".to_owned()),
            Just("application/vnd.acme+json".to_owned()),
        ]);
        let time = proptest::option::of(prop_oneof![
            Just("2024-05-01T12:00:00Z".to_owned()),
            Just("2000-02-29t23:59:60.123456789-08:30".to_owned()),
        ]);
        let extensions = proptest::collection::btree_map(
            "[a-z0-9]{1,20}".prop_filter("reserved", |n| {
                !crate::event::RESERVED_NAMES.contains(&n.as_str())
            }),
            text(0),
            0..4,
        );
        (
            (text(1), text(1), text(1)),
            (
                content_type,
                proptest::option::of(text(1)),
                proptest::option::of(text(0)),
                time,
            ),
            extensions,
            data(),
        )
            .prop_map(
                |(
                    (id, source, ty),
                    (datacontenttype, dataschema, subject, time),
                    extensions,
                    data,
                )| {
                    CloudEvent {
                        datacontenttype,
                        dataschema,
                        subject,
                        time,
                        extensions,
                        data,
                        ..CloudEvent::new(id, source, ty)
                    }
                },
            )
    }

    fn header_is_nats_safe((name, value): &(String, String)) -> bool {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| (0x21..=0x7E).contains(&b) && b != b':')
            && value.bytes().all(|b| (0x20..=0x7E).contains(&b))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn generated_events_are_valid(event in event()) {
            prop_assert_eq!(event.validate(), Ok(()));
        }

        #[test]
        fn structured_round_trip_is_exact(event in event()) {
            let wire = encode(&event, Encoding::Structured).unwrap();
            prop_assert!(wire.headers.iter().all(header_is_nats_safe));
            prop_assert_eq!(decode(&wire.headers, &wire.body), Ok(event));
        }

        #[test]
        fn binary_round_trip_is_exact_or_refused_by_the_rule(event in event()) {
            let json_type = event.datacontenttype.as_deref().is_none_or(is_json_content_type);
            let refused = match &event.data {
                Some(Data::Json(_)) => !json_type,
                Some(Data::Binary(b)) => {
                    json_type && serde_json::from_slice::<Value>(b).is_ok()
                }
                None => false,
            };
            match encode(&event, Encoding::Binary) {
                Ok(wire) => {
                    prop_assert!(!refused, "rule says refuse: {:?}", event);
                    prop_assert!(wire.headers.iter().all(header_is_nats_safe), "{:?}", wire.headers);
                    prop_assert_eq!(decode(&wire.headers, &wire.body), Ok(event));
                }
                Err(err) => {
                    prop_assert!(refused, "unexpected {:?} for {:?}", err, event);
                    let is_data_error = matches!(
                        err,
                        EncodeError::JsonDataUnderNonJsonContentType { .. }
                            | EncodeError::BinaryDataLooksLikeJson { .. }
                    );
                    prop_assert!(is_data_error, "{:?}", err);
                }
            }
        }

        #[test]
        fn percent_round_trip(value in any::<String>()) {
            let encoded = percent_encode(&value);
            prop_assert!(encoded.bytes().all(|b| (0x21..=0x7E).contains(&b) && b != b'"'));
            prop_assert_eq!(percent_decode("ce-x", &encoded), Ok(value));
        }

        #[test]
        fn decode_never_panics(
            headers in proptest::collection::vec(("(ce-|Content-Type|x)[a-z]{0,4}", ".{0,12}"), 0..6),
            body in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            // Whatever arrives, the result is typed, and an event that decodes is valid.
            if let Ok(event) = decode(&headers, &body) {
                prop_assert_eq!(event.validate(), Ok(()));
            }
        }
    }
}
