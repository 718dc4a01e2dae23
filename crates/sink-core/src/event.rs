//! The CloudEvents 1.0 event model, its validation, its structured JSON form and the deterministic `Nats-Msg-Id`.
//!
//! # Model
//!
//! [`CloudEvent`] holds the four required context attributes, the four optional ones, extension
//! attributes and the data. Every attribute is kept as a string: `time` is the RFC 3339 text exactly
//! as received (checked syntactically by [`CloudEvent::validate`], never re-formatted), so that an
//! event survives any number of encode/decode round trips unchanged.
//!
//! Extension attribute values are strings too. The CloudEvents type system requires every attribute
//! value to be representable as a string, and binary content mode (headers) only carries strings, so
//! a typed value could not survive a binary round trip. When structured JSON carries an extension as a
//! JSON boolean or integer, it is read as its canonical string form (`true`, `42`).
//!
//! # Structured JSON
//!
//! `Serialize`/`Deserialize` implement the CloudEvents JSON format: attributes are top-level members,
//! JSON data goes in `data`, binary data in `data_base64` (standard base64 with padding). Unknown
//! top-level members become extension attributes. A `null` member counts as absent.
//! Deserialization only checks the shape (types of members); [`CloudEvent::validate`] checks the
//! rules of the specification, and [`CloudEvent::from_json_line`] does both.
//!
//! Two values the JSON format cannot tell apart from "no data" are rejected by `validate`:
//! `Data::Json(Value::Null)` and empty `Data::Binary`. Omit the data instead.
//!
//! ```
//! use sink_core::event::{CloudEvent, MsgId};
//!
//! let line = r#"{"specversion":"1.0","id":"evt-1","source":"cellos://supervisor/host-a","type":"cellos.cell.started","data":{"tenantId":"acme"},"traceparent":"00-ab-cd-01"}"#;
//! let event = CloudEvent::from_json_line(line)?;
//! assert_eq!(event.tenant_id(), Some("acme"));
//! assert_eq!(event.extensions["traceparent"], "00-ab-cd-01");
//! assert_eq!(MsgId::for_event(&event).as_str(), "ce1-030e8cf0079457d13b331a74aad8afdd");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::de::Error as _;
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The only `specversion` this crate accepts.
pub const SPEC_VERSION: &str = "1.0";

/// Names of the context attributes defined by CloudEvents 1.0, plus the two data members of the JSON
/// format. An extension attribute may not use any of them.
pub const RESERVED_NAMES: [&str; 10] = [
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// Longest extension attribute name this crate accepts.
///
/// The specification recommends at most 20 characters (a SHOULD); names between 21 and this bound are
/// accepted for interoperability, longer ones are rejected to keep headers bounded.
pub const MAX_EXTENSION_NAME_LEN: usize = 64;

/// Longest value preview put into an error message.
pub(crate) const PREVIEW_MAX_CHARS: usize = 32;

/// Escaped, length-bounded preview of a value for error messages (never longer than 32 chars).
pub(crate) fn preview(value: &str) -> String {
    let escaped: String = value.chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() <= PREVIEW_MAX_CHARS {
        return escaped;
    }
    let mut out: String = escaped.chars().take(PREVIEW_MAX_CHARS - 3).collect();
    out.push_str("...");
    out
}

/// The data of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// JSON data: structured mode puts it in the `data` member; binary mode sends its compact JSON text.
    Json(Value),
    /// Opaque bytes: structured mode puts them base64-encoded in `data_base64`; binary mode sends them
    /// as the message body.
    Binary(Bytes),
}

/// A CloudEvents 1.0 event.
///
/// Fields are public so tests and adapters can build any event, including invalid ones; call
/// [`CloudEvent::validate`] before trusting one (the encoders do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    /// `id`: identifies the event; `source` + `id` is unique per distinct event.
    pub id: String,
    /// `source`: the context in which the event happened (a URI-reference).
    pub source: String,
    /// `specversion`: must be `1.0`.
    pub specversion: String,
    /// `type`: the kind of occurrence, e.g. `com.example.object.created`.
    pub ty: String,
    /// `datacontenttype`: media type of the data (RFC 2046), e.g. `application/json`.
    pub datacontenttype: Option<String>,
    /// `dataschema`: URI of the schema the data adheres to.
    pub dataschema: Option<String>,
    /// `subject`: the subject of the event in the context of the producer.
    pub subject: Option<String>,
    /// `time`: RFC 3339 timestamp, kept as received.
    pub time: Option<String>,
    /// Extension attributes (e.g. `traceparent`, `tenantid`), by name.
    pub extensions: BTreeMap<String, String>,
    /// The event data.
    pub data: Option<Data>,
}

/// Why an event is invalid or could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The input is not valid JSON.
    #[error("event is not valid JSON ({message}); send one JSON object per line")]
    Json {
        /// The parser's message, with line and column.
        message: String,
    },
    /// The input is JSON but not an object.
    #[error("event is a JSON {found}, not an object; send a JSON object with the CloudEvents attributes")]
    NotAnObject {
        /// The JSON type found.
        found: &'static str,
    },
    /// A required attribute is absent (or `null`).
    #[error("attribute `{attribute}` is missing; it is required by CloudEvents 1.0")]
    MissingAttribute {
        /// The attribute name.
        attribute: &'static str,
    },
    /// A required attribute is the empty string.
    #[error("attribute `{attribute}` is empty; set it to a non-empty string")]
    EmptyAttribute {
        /// The attribute name.
        attribute: &'static str,
    },
    /// A member has the wrong JSON type.
    #[error("attribute `{attribute}` is a JSON {found}; it must be {expected}")]
    WrongType {
        /// The attribute or member name (escaped preview).
        attribute: String,
        /// What is accepted there.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// `specversion` is not `1.0`.
    #[error("attribute `specversion` is \"{found}\"; only \"1.0\" is supported")]
    UnsupportedSpecVersion {
        /// The value found (escaped preview).
        found: String,
    },
    /// An extension attribute name breaks the naming rule.
    #[error("extension attribute name \"{name}\" is invalid: {reason}; use 1 to 64 characters from a-z and 0-9")]
    InvalidExtensionName {
        /// The name (escaped preview).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An extension attribute uses the name of a context attribute or data member.
    #[error("extension attribute name \"{name}\" is reserved by CloudEvents; set the context attribute itself or pick another name")]
    ReservedExtensionName {
        /// The name.
        name: String,
    },
    /// A string value contains a character the CloudEvents type system forbids.
    #[error("attribute `{attribute}` contains forbidden character U+{code_point:04X} at character {position}; remove control characters, surrogates and noncharacters")]
    ForbiddenCharacter {
        /// The attribute name (escaped preview).
        attribute: String,
        /// Index (in characters) of the offending character.
        position: usize,
        /// Its code point.
        code_point: u32,
    },
    /// `time` is not an RFC 3339 timestamp.
    #[error("attribute `time` is \"{value}\", not an RFC 3339 timestamp ({reason}); use e.g. 2024-05-01T12:00:00Z")]
    MalformedTime {
        /// The value (escaped preview).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `datacontenttype` is not a plausible media type.
    #[error("attribute `datacontenttype` is \"{value}\" ({reason}); use an RFC 2046 media type such as application/json")]
    InvalidDataContentType {
        /// The value (escaped preview).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An optional URI attribute is present but empty.
    #[error("attribute `{attribute}` is present but empty; omit it or set a non-empty value")]
    EmptyOptionalAttribute {
        /// The attribute name.
        attribute: &'static str,
    },
    /// Both `data` and `data_base64` are present.
    #[error("both `data` and `data_base64` are present; keep exactly one")]
    BothDataMembers,
    /// `data_base64` is not valid base64.
    #[error("member `data_base64` is not valid base64 at byte {position}; use the standard alphabet with padding")]
    InvalidBase64 {
        /// Byte offset of the first offending character.
        position: usize,
    },
    /// `data` is JSON `null`, which the JSON format cannot tell apart from no data.
    #[error("`data` is JSON null, which reads back as no data; omit `data` instead")]
    NullData,
    /// Binary data is empty, which binary content mode cannot tell apart from no data.
    #[error("`data` is empty binary data, which reads back as no data; omit `data` instead")]
    EmptyBinaryData,
}

impl CloudEvent {
    /// A new event with the three required attributes, `specversion` 1.0 and nothing else.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            source: source.into(),
            specversion: SPEC_VERSION.to_owned(),
            ty: ty.into(),
            datacontenttype: None,
            dataschema: None,
            subject: None,
            time: None,
            extensions: BTreeMap::new(),
            data: None,
        }
    }

    /// Sets JSON data and, when no `datacontenttype` is set yet, `datacontenttype: application/json`.
    #[must_use]
    pub fn with_data_json(mut self, data: Value) -> Self {
        self.data = Some(Data::Json(data));
        if self.datacontenttype.is_none() {
            self.datacontenttype = Some("application/json".to_owned());
        }
        self
    }

    /// Sets binary data with its media type.
    #[must_use]
    pub fn with_data_binary(
        mut self,
        data: impl Into<Bytes>,
        content_type: impl Into<String>,
    ) -> Self {
        self.data = Some(Data::Binary(data.into()));
        self.datacontenttype = Some(content_type.into());
        self
    }

    /// Sets `datacontenttype`.
    #[must_use]
    pub fn with_datacontenttype(mut self, value: impl Into<String>) -> Self {
        self.datacontenttype = Some(value.into());
        self
    }

    /// Sets `dataschema`.
    #[must_use]
    pub fn with_dataschema(mut self, value: impl Into<String>) -> Self {
        self.dataschema = Some(value.into());
        self
    }

    /// Sets `subject`.
    #[must_use]
    pub fn with_subject(mut self, value: impl Into<String>) -> Self {
        self.subject = Some(value.into());
        self
    }

    /// Sets `time` (an RFC 3339 timestamp, kept verbatim).
    #[must_use]
    pub fn with_time(mut self, value: impl Into<String>) -> Self {
        self.time = Some(value.into());
        self
    }

    /// Sets an extension attribute (replacing any previous value of that name).
    #[must_use]
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// The tenant of the event: `data.tenantId` when data is a JSON object holding a string there,
    /// else the `tenantid` extension attribute.
    pub fn tenant_id(&self) -> Option<&str> {
        if let Some(Data::Json(Value::Object(map))) = &self.data {
            if let Some(Value::String(tenant)) = map.get("tenantId") {
                return Some(tenant);
            }
        }
        self.extensions.get("tenantid").map(String::as_str)
    }

    /// Checks the event against CloudEvents 1.0; the error names the first offending attribute.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.specversion != SPEC_VERSION {
            return Err(EventError::UnsupportedSpecVersion {
                found: preview(&self.specversion),
            });
        }
        for (attribute, value) in [
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.ty),
        ] {
            if value.is_empty() {
                return Err(EventError::EmptyAttribute { attribute });
            }
            check_chars(attribute, value)?;
        }
        if let Some(value) = &self.datacontenttype {
            check_content_type(value)?;
        }
        for (attribute, value) in [("dataschema", &self.dataschema), ("subject", &self.subject)] {
            if let Some(value) = value {
                if attribute == "dataschema" && value.is_empty() {
                    return Err(EventError::EmptyOptionalAttribute { attribute });
                }
                check_chars(attribute, value)?;
            }
        }
        if let Some(time) = &self.time {
            check_rfc3339(time).map_err(|reason| EventError::MalformedTime {
                value: preview(time),
                reason,
            })?;
        }
        for (name, value) in &self.extensions {
            check_extension_name(name)?;
            check_chars(name, value)?;
        }
        match &self.data {
            Some(Data::Json(Value::Null)) => Err(EventError::NullData),
            Some(Data::Binary(bytes)) if bytes.is_empty() => Err(EventError::EmptyBinaryData),
            _ => Ok(()),
        }
    }

    /// Parses one line of structured JSON (NDJSON) and validates the event.
    pub fn from_json_line(line: &str) -> Result<CloudEvent, EventError> {
        Self::from_json_slice(line.as_bytes())
    }

    /// Parses structured JSON bytes and validates the event.
    pub fn from_json_slice(bytes: &[u8]) -> Result<CloudEvent, EventError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|err| EventError::Json {
            message: err.to_string(),
        })?;
        let event = Self::from_json_value(value)?;
        event.validate()?;
        Ok(event)
    }

    /// Reads the structured JSON shape (member types only; no validation).
    pub fn from_json_value(value: Value) -> Result<CloudEvent, EventError> {
        match value {
            Value::Object(map) => Self::from_json_map(map),
            other => Err(EventError::NotAnObject {
                found: json_type(&other),
            }),
        }
    }

    fn from_json_map(mut map: Map<String, Value>) -> Result<CloudEvent, EventError> {
        let specversion = take_required(&mut map, "specversion")?;
        let id = take_required(&mut map, "id")?;
        let source = take_required(&mut map, "source")?;
        let ty = take_required(&mut map, "type")?;
        let datacontenttype = take_optional(&mut map, "datacontenttype")?;
        let dataschema = take_optional(&mut map, "dataschema")?;
        let subject = take_optional(&mut map, "subject")?;
        let time = take_optional(&mut map, "time")?;
        let data = map.remove("data").filter(|v| !v.is_null());
        let data_base64 = take_optional(&mut map, "data_base64")?;
        let data = match (data, data_base64) {
            (Some(_), Some(_)) => return Err(EventError::BothDataMembers),
            (Some(json), None) => Some(Data::Json(json)),
            (None, Some(text)) => {
                let bytes = base64_decode(&text)
                    .map_err(|position| EventError::InvalidBase64 { position })?;
                // An empty `data_base64` carries no data; reading it as absent keeps such events valid.
                (!bytes.is_empty()).then(|| Data::Binary(Bytes::from(bytes)))
            }
            (None, None) => None,
        };
        let mut extensions = BTreeMap::new();
        for (name, value) in map {
            let text = match value {
                Value::Null => continue,
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                other => {
                    return Err(EventError::WrongType {
                        attribute: preview(&name),
                        expected: "a string, boolean or integer (extension attribute)",
                        found: json_type(&other),
                    })
                }
            };
            extensions.insert(name, text);
        }
        Ok(CloudEvent {
            id,
            source,
            specversion,
            ty,
            datacontenttype,
            dataschema,
            subject,
            time,
            extensions,
            data,
        })
    }

    /// The structured JSON form as a `serde_json::Value`.
    pub fn to_json_value(&self) -> Value {
        let mut map = Map::new();
        let done: Result<(), std::convert::Infallible> = self.for_each_member(|name, member| {
            let value = match member {
                Member::Text(text) => Value::String(text.to_owned()),
                Member::Json(value) => value.clone(),
                Member::Base64(text) => Value::String(text),
            };
            map.insert(name.to_owned(), value);
            Ok(())
        });
        match done {
            Ok(()) => Value::Object(map),
            Err(never) => match never {},
        }
    }

    /// Calls `f` with every member of the structured JSON form, in a stable order, borrowing
    /// instead of cloning so that serializing an event copies its data once.
    fn for_each_member<E>(
        &self,
        mut f: impl FnMut(&str, Member<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        f("specversion", Member::Text(&self.specversion))?;
        f("id", Member::Text(&self.id))?;
        f("source", Member::Text(&self.source))?;
        f("type", Member::Text(&self.ty))?;
        let optional = [
            ("datacontenttype", &self.datacontenttype),
            ("dataschema", &self.dataschema),
            ("subject", &self.subject),
            ("time", &self.time),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                f(name, Member::Text(value))?;
            }
        }
        for (name, value) in &self.extensions {
            f(name, Member::Text(value))?;
        }
        match &self.data {
            Some(Data::Json(value)) => f("data", Member::Json(value)),
            Some(Data::Binary(bytes)) => f("data_base64", Member::Base64(base64_encode(bytes))),
            None => Ok(()),
        }
    }
}

/// One member value of the structured JSON form.
enum Member<'a> {
    Text(&'a str),
    Json(&'a Value),
    Base64(String),
}

impl Serialize for Member<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Member::Text(text) => serializer.serialize_str(text),
            Member::Json(value) => value.serialize(serializer),
            Member::Base64(text) => serializer.serialize_str(text),
        }
    }
}

impl Serialize for CloudEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        self.for_each_member(|name, member| map.serialize_entry(name, &member))?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for CloudEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(deserializer)?;
        CloudEvent::from_json_map(map).map_err(D::Error::custom)
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn take_optional(
    map: &mut Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, EventError> {
    match map.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(EventError::WrongType {
            attribute: name.to_owned(),
            expected: "a string",
            found: json_type(&other),
        }),
    }
}

fn take_required(map: &mut Map<String, Value>, name: &'static str) -> Result<String, EventError> {
    take_optional(map, name)?.ok_or(EventError::MissingAttribute { attribute: name })
}

/// Whether the CloudEvents type system forbids `ch` in a String value.
fn is_forbidden_char(ch: char) -> bool {
    let cp = ch as u32;
    // Control characters, then the Unicode noncharacters (U+FDD0..U+FDEF and the last two code
    // points of every plane). Surrogates cannot occur in a Rust `str`.
    cp <= 0x1F
        || (0x7F..=0x9F).contains(&cp)
        || (0xFDD0..=0xFDEF).contains(&cp)
        || (cp & 0xFFFE) == 0xFFFE
}

fn check_chars(attribute: &str, value: &str) -> Result<(), EventError> {
    match value
        .chars()
        .enumerate()
        .find(|(_, ch)| is_forbidden_char(*ch))
    {
        Some((position, ch)) => Err(EventError::ForbiddenCharacter {
            attribute: preview(attribute),
            position,
            code_point: ch as u32,
        }),
        None => Ok(()),
    }
}

/// Checks an extension attribute name against the CloudEvents naming rule and the reserved names.
pub fn check_extension_name(name: &str) -> Result<(), EventError> {
    let invalid = |reason| EventError::InvalidExtensionName {
        name: preview(name),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > MAX_EXTENSION_NAME_LEN {
        return Err(invalid("it is longer than 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(invalid("it contains a character other than a-z and 0-9"));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(EventError::ReservedExtensionName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn check_content_type(value: &str) -> Result<(), EventError> {
    let invalid = |reason| EventError::InvalidDataContentType {
        value: preview(value),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("it is empty"));
    }
    // It travels as a raw `Content-Type` header in binary mode, so it must be header-safe.
    if !value.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        return Err(invalid("it contains a non-ASCII or control character"));
    }
    if value.starts_with(' ') || value.ends_with(' ') {
        return Err(invalid("it has leading or trailing spaces"));
    }
    let essence = value.split(';').next().unwrap_or_default().trim();
    match essence.split_once('/') {
        Some((kind, sub)) if !kind.is_empty() && !sub.is_empty() && !sub.contains('/') => Ok(()),
        _ => Err(invalid("it is not of the form type/subtype")),
    }
}

/// The media type without parameters, trimmed and lowercased (`Application/JSON; charset=utf-8`
/// -> `application/json`).
pub(crate) fn media_type_essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether a media type says the data is JSON (`application/json`, `text/json`, `*/*+json`).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = media_type_essence(content_type);
    essence == "application/json"
        || essence == "text/json"
        || (essence.contains('/') && essence.ends_with("+json"))
}

/// Syntactic RFC 3339 `date-time` check (`full-date "T" full-time`), with calendar-aware day ranges.
fn check_rfc3339(text: &str) -> Result<(), &'static str> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        part.iter().try_fold(0u32, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    if b.len() < 20 {
        return Err("too short");
    }
    let (year, month, day) = match (digits(0..4), digits(5..7), digits(8..10)) {
        (Some(y), Some(m), Some(d)) if b[4] == b'-' && b[7] == b'-' => (y, m, d),
        _ => return Err("date is not YYYY-MM-DD"),
    };
    if !(1..=12).contains(&month) {
        return Err("month out of range");
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day == 0 || day > days {
        return Err("day out of range");
    }
    if !matches!(b[10], b'T' | b't') {
        return Err("date and time are not separated by T");
    }
    let (hour, minute, second) = match (digits(11..13), digits(14..16), digits(17..19)) {
        (Some(h), Some(m), Some(s)) if b[13] == b':' && b[16] == b':' => (h, m, s),
        _ => return Err("time is not HH:MM:SS"),
    };
    if hour > 23 || minute > 59 || second > 60 {
        return Err("time out of range");
    }
    let mut rest = &b[19..];
    if rest.first() == Some(&b'.') {
        let frac = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if frac == 0 {
            return Err("fraction has no digits");
        }
        rest = &rest[1 + frac..];
    }
    match rest {
        [b'Z' | b'z'] => Ok(()),
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            let all_digits = [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit());
            let hours = u32::from(h1.wrapping_sub(b'0')) * 10 + u32::from(h2.wrapping_sub(b'0'));
            let minutes = u32::from(m1.wrapping_sub(b'0')) * 10 + u32::from(m2.wrapping_sub(b'0'));
            if all_digits && hours <= 23 && minutes <= 59 {
                Ok(())
            } else {
                Err("offset is not +HH:MM or -HH:MM")
            }
        }
        _ => Err("missing or malformed offset (Z or +HH:MM)"),
    }
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 section 4).
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64_ALPHABET[((n >> (18 - 6 * i)) & 0x3F) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64; the error is the byte offset of the first offending character.
pub(crate) fn base64_decode(text: &str) -> Result<Vec<u8>, usize> {
    let b = text.as_bytes();
    if !b.len().is_multiple_of(4) {
        return Err(b.len() - b.len() % 4);
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (chunk_index, chunk) in b.chunks(4).enumerate() {
        let base = chunk_index * 4;
        let last = base + 4 == b.len();
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(base + 4 - pad);
        }
        let mut n = 0u32;
        for (i, &c) in chunk[..4 - pad].iter().enumerate() {
            let v = BASE64_ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or(base + i)?;
            n |= (v as u32) << (18 - 6 * i);
        }
        let produced = 3 - pad;
        for i in 0..produced {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Ok(out)
}

/// The `Nats-Msg-Id` of an event: deterministic from its `source` and `id`, stable across processes.
///
/// `ce1-` followed by the lowercase hex of the first 16 bytes of
/// SHA-256(`len(source)` as u64 big-endian || `source` || `id`). The length prefix keeps
/// (`ab`, `c`) and (`a`, `bc`) apart. Cheap to clone (shared text): every transmit names its
/// predecessor's id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId(std::sync::Arc<str>);

impl MsgId {
    /// The message id of `event`.
    pub fn for_event(event: &CloudEvent) -> MsgId {
        let mut hasher = Sha256::new();
        hasher.update((event.source.len() as u64).to_be_bytes());
        hasher.update(event.source.as_bytes());
        hasher.update(event.id.as_bytes());
        let digest = hasher.finalize();
        let mut text = String::with_capacity(4 + 32);
        text.push_str("ce1-");
        for byte in &digest[..16] {
            text.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            text.push(char::from_digit(u32::from(byte & 0xF), 16).unwrap_or('0'));
        }
        MsgId(text.into())
    }

    /// Wraps an id read back from the wire (or made up in a test) without checking it.
    pub fn from_raw(raw: String) -> MsgId {
        MsgId(raw.into())
    }

    /// The id as sent in the `Nats-Msg-Id` header.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed_line() -> &'static str {
        r#"{"specversion":"1.0","id":"evt-1","source":"cellos://supervisor/host-a","type":"cellos.cell.started","datacontenttype":"application/json","data":{"tenantId":"acme","cell":"c1"},"time":"2024-05-01T12:00:00.123Z","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#
    }

    #[test]
    fn reads_the_seed_shape_with_traceparent_as_extension() {
        let event = CloudEvent::from_json_line(seed_line()).unwrap();
        assert_eq!(event.id, "evt-1");
        assert_eq!(event.ty, "cellos.cell.started");
        assert_eq!(event.time.as_deref(), Some("2024-05-01T12:00:00.123Z"));
        assert_eq!(
            event.extensions.get("traceparent").map(String::as_str),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            event.data,
            Some(Data::Json(json!({"tenantId":"acme","cell":"c1"})))
        );
        assert_eq!(event.tenant_id(), Some("acme"));
    }

    #[test]
    fn structured_json_round_trips_exactly() {
        let event = CloudEvent::from_json_line(seed_line()).unwrap();
        let text = serde_json::to_string(&event).unwrap();
        let back: CloudEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(back, event);
        let original: Value = serde_json::from_str(seed_line()).unwrap();
        assert_eq!(event.to_json_value(), original);
    }

    #[test]
    fn binary_data_uses_data_base64() {
        let event = CloudEvent::new("1", "/s", "t")
            .with_data_binary(vec![0u8, 1, 2, 255], "application/octet-stream");
        let value = event.to_json_value();
        assert_eq!(value["data_base64"], json!("AAEC/w=="));
        assert!(value.get("data").is_none());
        assert_eq!(CloudEvent::from_json_value(value).unwrap(), event);
    }

    #[test]
    fn extension_booleans_and_integers_become_strings_nulls_vanish() {
        let event = CloudEvent::from_json_line(
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","sampled":true,"seq":42,"gone":null,"subject":null}"#,
        )
        .unwrap();
        assert_eq!(
            event.extensions.get("sampled").map(String::as_str),
            Some("true")
        );
        assert_eq!(event.extensions.get("seq").map(String::as_str), Some("42"));
        assert!(!event.extensions.contains_key("gone"));
        assert_eq!(event.subject, None);
    }

    #[test]
    fn tenant_prefers_data_then_extension() {
        let ext_only = CloudEvent::new("1", "/s", "t").with_extension("tenantid", "ext");
        assert_eq!(ext_only.tenant_id(), Some("ext"));
        let both = ext_only.clone().with_data_json(json!({"tenantId": "data"}));
        assert_eq!(both.tenant_id(), Some("data"));
        let non_string = ext_only.with_data_json(json!({"tenantId": 7}));
        assert_eq!(non_string.tenant_id(), Some("ext"));
        assert_eq!(CloudEvent::new("1", "/s", "t").tenant_id(), None);
    }

    #[test]
    fn msg_id_is_a_stable_literal() {
        let event = CloudEvent::new("evt-1", "cellos://supervisor/host-a", "t");
        let id = MsgId::for_event(&event);
        assert_eq!(id.as_str(), "ce1-030e8cf0079457d13b331a74aad8afdd");
        assert_eq!(id.to_string(), id.as_str());
        // The length prefix separates source from id.
        let a = MsgId::for_event(&CloudEvent::new("c", "ab", "t"));
        let b = MsgId::for_event(&CloudEvent::new("bc", "a", "t"));
        assert_ne!(a, b);
        assert_eq!(MsgId::from_raw("x".into()).as_str(), "x");
    }

    #[test]
    fn msg_id_matches_an_independent_computation() {
        let source = "cellos://supervisor/host-a";
        let mut input = (source.len() as u64).to_be_bytes().to_vec();
        input.extend_from_slice(source.as_bytes());
        input.extend_from_slice(b"evt-1");
        let digest = Sha256::digest(&input);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let id = MsgId::for_event(&CloudEvent::new("evt-1", source, "t"));
        assert_eq!(id.as_str(), format!("ce1-{hex}"));
    }

    fn valid() -> CloudEvent {
        CloudEvent::new("1", "/s", "t")
    }

    #[test]
    fn validation_table() {
        let mut wrong_version = valid();
        wrong_version.specversion = "0.3".into();
        let cases: Vec<(CloudEvent, EventError)> = vec![
            (
                CloudEvent::new("", "/s", "t"),
                EventError::EmptyAttribute { attribute: "id" },
            ),
            (
                CloudEvent::new("1", "", "t"),
                EventError::EmptyAttribute {
                    attribute: "source",
                },
            ),
            (
                CloudEvent::new("1", "/s", ""),
                EventError::EmptyAttribute { attribute: "type" },
            ),
            (
                wrong_version,
                EventError::UnsupportedSpecVersion {
                    found: "0.3".into(),
                },
            ),
            (
                valid().with_extension("TraceParent", "x"),
                EventError::InvalidExtensionName {
                    name: "TraceParent".into(),
                    reason: "it contains a character other than a-z and 0-9",
                },
            ),
            (
                valid().with_extension("", "x"),
                EventError::InvalidExtensionName {
                    name: "".into(),
                    reason: "it is empty",
                },
            ),
            (
                valid().with_extension("a".repeat(65), "x"),
                EventError::InvalidExtensionName {
                    name: format!("{}...", "a".repeat(29)),
                    reason: "it is longer than 64 characters",
                },
            ),
            (
                valid().with_extension("data", "x"),
                EventError::ReservedExtensionName {
                    name: "data".into(),
                },
            ),
            (
                valid().with_extension("time", "x"),
                EventError::ReservedExtensionName {
                    name: "time".into(),
                },
            ),
            (
                valid().with_time("2024-02-30T00:00:00Z"),
                EventError::MalformedTime {
                    value: "2024-02-30T00:00:00Z".into(),
                    reason: "day out of range",
                },
            ),
            (
                valid().with_time("yesterday"),
                EventError::MalformedTime {
                    value: "yesterday".into(),
                    reason: "too short",
                },
            ),
            (
                valid().with_datacontenttype("json"),
                EventError::InvalidDataContentType {
                    value: "json".into(),
                    reason: "it is not of the form type/subtype",
                },
            ),
            (
                valid().with_dataschema(""),
                EventError::EmptyOptionalAttribute {
                    attribute: "dataschema",
                },
            ),
            (
                valid().with_subject("a\nb"),
                EventError::ForbiddenCharacter {
                    attribute: "subject".into(),
                    position: 1,
                    code_point: 0x0A,
                },
            ),
            (valid().with_data_json(Value::Null), EventError::NullData),
            (
                valid().with_data_binary(Vec::new(), "application/octet-stream"),
                EventError::EmptyBinaryData,
            ),
        ];
        for (event, expected) in cases {
            assert_eq!(event.validate(), Err(expected), "{event:?}");
        }
    }

    #[test]
    fn accepted_event_table() {
        let long_ext = "a".repeat(64);
        let ok = [
            valid().with_time("2024-02-29T23:59:60.5+05:30"),
            valid().with_time("1985-04-12t23:20:50.52z"),
            valid()
                .with_extension("traceparent", "00-ab")
                .with_extension(long_ext, ""),
            valid().with_datacontenttype("application/cloudevents+json; charset=utf-8"),
            valid().with_subject("ünïcødé \"quoted\" 100%"),
        ];
        for event in ok {
            assert_eq!(event.validate(), Ok(()), "{event:?}");
        }
    }

    #[test]
    fn rfc3339_rejections() {
        let bad = [
            ("2023-02-29T00:00:00Z", "day out of range"),
            ("2024-13-01T00:00:00Z", "month out of range"),
            (
                "2024-01-01 00:00:00Z",
                "date and time are not separated by T",
            ),
            ("2024-01-01T24:00:00Z", "time out of range"),
            ("2024-01-01T00:00:00", "too short"),
            ("2024-01-01T00:00:00.Z", "fraction has no digits"),
            (
                "2024-01-01T00:00:00+0100",
                "missing or malformed offset (Z or +HH:MM)",
            ),
            (
                "2024-01-01T00:00:00+24:00",
                "offset is not +HH:MM or -HH:MM",
            ),
        ];
        for (text, reason) in bad {
            assert_eq!(check_rfc3339(text), Err(reason), "{text}");
        }
    }

    #[test]
    fn from_json_line_names_the_field() {
        let cases = [
            ("not json", "event is not valid JSON"),
            ("[1]", "event is a JSON array, not an object"),
            (
                r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
                "attribute `id` is missing",
            ),
            (
                r#"{"specversion":"1.0","id":5,"source":"/s","type":"t"}"#,
                "attribute `id` is a JSON number",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":{"a":1}}"#,
                "attribute `ext` is a JSON object",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
                "both `data` and `data_base64`",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"A*=="}"#,
                "not valid base64 at byte 1",
            ),
            (
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                "only \"1.0\" is supported",
            ),
        ];
        for (line, expected) in cases {
            let err = CloudEvent::from_json_line(line).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn error_messages_snapshot() {
        let messages: Vec<String> = [
            EventError::MissingAttribute {
                attribute: "source",
            },
            EventError::ReservedExtensionName {
                name: "subject".into(),
            },
            EventError::ForbiddenCharacter {
                attribute: "id".into(),
                position: 3,
                code_point: 0x7F,
            },
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        insta::assert_debug_snapshot!(messages);
    }

    #[test]
    fn base64_table() {
        let cases: [(&[u8], &str); 5] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (raw, text) in cases {
            assert_eq!(base64_encode(raw), text);
            assert_eq!(base64_decode(text).as_deref(), Ok(raw));
        }
        assert_eq!(base64_decode("Zm9"), Err(0));
        assert_eq!(base64_decode("Zg==Zg=="), Err(2));
        assert_eq!(base64_decode("Z==="), Err(1));
    }

    #[test]
    fn preview_is_escaped_and_short() {
        assert_eq!(preview("a\nb"), "a\\nb");
        let exact = "y".repeat(PREVIEW_MAX_CHARS);
        assert_eq!(preview(&exact), exact);
        let long = preview(&"\u{1}".repeat(100));
        assert!(long.chars().count() <= PREVIEW_MAX_CHARS, "{long}");
        assert!(long.ends_with("..."));
    }

    #[test]
    fn json_content_types() {
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "text/json",
            "application/ld+json",
        ] {
            assert!(is_json_content_type(yes), "{yes}");
        }
        for no in [
            "text/plain",
            "application/octet-stream",
            "+json",
            "application/jsonx",
        ] {
            assert!(!is_json_content_type(no), "{no}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                prop_assert_eq!(base64_decode(&base64_encode(&bytes)), Ok(bytes));
            }

            #[test]
            fn msg_id_shape(source in ".*", id in ".*") {
                let event = CloudEvent::new(id, source, "t");
                let msg_id = MsgId::for_event(&event);
                prop_assert_eq!(msg_id.as_str().len(), 36);
                prop_assert!(msg_id.as_str().starts_with("ce1-"));
                prop_assert!(msg_id.as_str()[4..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                prop_assert_eq!(MsgId::for_event(&event.clone()), msg_id);
            }

            #[test]
            fn rfc3339_never_panics(text in ".{0,40}") {
                let _ = check_rfc3339(&text);
            }
        }
    }
}
