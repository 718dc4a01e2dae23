//! What the connected server and the stream allow: the server version, which ordering mechanism is safe on a replicated stream, and whether fast-batch publishing exists.
//!
//! Read in nats-server's source and measured on a 3-node cluster (see the tests in
//! `crates/sink-nats/tests/cluster.rs`): on a replicated stream (more than one replica) the
//! `Nats-Expected-Last-Msg-Id` check is made when the message is *applied*, after it was
//! replicated, not when it arrives. What a failed check does depends on the version:
//!
//! - up to 2.10: the message is refused (10070) and nothing else happens;
//! - 2.11 to 2.13: the leader had reserved the message id before replicating and keeps it
//!   reserved after the failure: every later publish of that id is answered 10158 "duplicate
//!   message id is in process" until the duplicate window passes or the leader changes, while
//!   other message ids are stored as usual (seen on 2.12.8 with a 3 s window: 10158 for about
//!   3.3 s, then the id is stored);
//! - 2.14 and later: the failure is treated as a write error of the stream (`Error applying
//!   stream entries ... critical write error: last msgid mismatch`) and the stream stops
//!   answering publishes altogether, for every producer (seen on 2.15.1: no reply to any publish
//!   after one failed check, until the servers restart).
//!
//! Chaining provokes that failure by design (a lost or foreign message makes the next chained
//! publish fail), so on a replicated stream of 2.11 or later the sink keeps order with
//! per-key-serial delivery instead, which sends no expected-last header.
//!
//! Fast-batch publishing (ADR-50, the stream setting `allow_batched`) came with 2.14
//! ([`fast_batch_supported`]). Older servers do not merely ignore the setting; seen on the real
//! servers, a `STREAM.CREATE` carrying `"allow_batched": true` is refused by 2.12.8 (10025
//! `invalid JSON: json: unknown field "allow_batched"`, no stream is made) and accepted by 2.9.10,
//! which drops the field and makes the stream without it. So the setting is sent only to 2.14+.

use std::fmt;

/// A `major.minor.patch` nats-server version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl ServerVersion {
    /// A version from its parts.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `2.15.1`, `v2.11.0-RC.1` (the suffix is ignored); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let text = text.strip_prefix('v').unwrap_or(text);
        let mut parts = text.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch_text = parts.next()?;
        let end = patch_text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(patch_text.len());
        let patch = patch_text[..end].parse().ok()?;
        Some(Self::new(major, minor, patch))
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The first version that reserves message ids on replicated streams (10158 after a failed apply).
pub const RESERVES_IDS: ServerVersion = ServerVersion::new(2, 11, 0);

/// The first version that stops a replicated stream after a failed expected-last check.
pub const STOPS_STREAM: ServerVersion = ServerVersion::new(2, 14, 0);

/// The first version with fast-batch publishing (ADR-50) and the stream setting `allow_batched`.
pub const FAST_BATCH: ServerVersion = ServerVersion::new(2, 14, 0);

/// Whether a server of `version` has fast-batch publishing, i.e. knows the stream setting
/// `allow_batched` (2.14 and later). Older servers refuse the setting (2.12) or drop it silently
/// (2.9), see the module docs.
pub fn fast_batch_supported(version: &ServerVersion) -> bool {
    *version >= FAST_BATCH
}

/// Why chaining by `Nats-Expected-Last-Msg-Id` must not be used on a stream with `replicas`
/// replicas on a server of `version`, or `None` when it is safe. An unreadable version counts as
/// the newest (the safe side).
pub fn chaining_hazard(version: Option<ServerVersion>, replicas: u32) -> Option<String> {
    if replicas <= 1 {
        return None;
    }
    let shown = version.map_or_else(|| "an unknown version".to_owned(), |v| v.to_string());
    match version {
        Some(v) if v < RESERVES_IDS => None,
        Some(v) if v < STOPS_STREAM => Some(format!(
            "the stream has {replicas} replicas on nats-server {shown}: a chained publish that \
             fails its expected-last check there keeps its message id blocked (10158) for the \
             duplicate window"
        )),
        _ => Some(format!(
            "the stream has {replicas} replicas on nats-server {shown}: a chained publish that \
             fails its expected-last check there stops the stream from answering any publish"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_the_server_prints_them() {
        for (text, want) in [
            ("2.9.10", Some(ServerVersion::new(2, 9, 10))),
            ("v2.15.1", Some(ServerVersion::new(2, 15, 1))),
            ("2.11.0-RC.1", Some(ServerVersion::new(2, 11, 0))),
            (" 2.12.8 ", Some(ServerVersion::new(2, 12, 8))),
            ("2.12", None),
            ("", None),
            ("x.y.z", None),
        ] {
            assert_eq!(ServerVersion::parse(text), want, "{text:?}");
        }
    }

    #[test]
    fn chaining_hazard_table() {
        let v = |t| ServerVersion::parse(t);
        assert_eq!(chaining_hazard(v("2.15.1"), 1), None, "R1 is standalone");
        assert_eq!(chaining_hazard(v("2.9.10"), 3), None);
        assert_eq!(chaining_hazard(v("2.10.29"), 3), None);
        let blocked = chaining_hazard(v("2.12.8"), 3).expect("2.12 R3");
        assert!(blocked.contains("10158"), "{blocked}");
        let stops = chaining_hazard(v("2.15.1"), 3).expect("2.15 R3");
        assert!(stops.contains("stops the stream"), "{stops}");
        assert!(chaining_hazard(v("2.14.0"), 2).is_some());
        assert!(chaining_hazard(None, 3).is_some(), "unknown: the safe side");
    }

    #[test]
    fn fast_batch_starts_at_2_14() {
        for (text, want) in [
            ("2.9.10", false),
            ("2.12.8", false),
            ("2.13.99", false),
            ("2.14.0-RC.1", true),
            ("2.14.0", true),
            ("2.15.1", true),
            ("3.0.0", true),
        ] {
            let version = ServerVersion::parse(text).expect("parses");
            assert_eq!(fast_batch_supported(&version), want, "{text}");
        }
    }
}
