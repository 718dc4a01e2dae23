//! Server URLs: the address the client dials, the credentials in the userinfo, and the redacted
//! form that is the only way the sink ever shows a URL.
//!
//! The `url` crate parses everything after the userinfo (host, IPv4/IPv6, port, path). The
//! userinfo itself is split off first, by one rule: **it is everything between `scheme://` and
//! the last `@`**. A real parser ends the authority at the first `/`, `?` or `#`, so a raw
//! password such as `p@ss/w?rd` in `nats://user:p@ss/w?rd@host:4222` would parse as host `ss`
//! with path `/w` and query `rd@host:4222`: the wrong server, and half the password in what a
//! parser-based redaction prints. With the rule that URL means user `user`, password
//! `p@ss/w?rd`, host `host:4222`, which is what its author meant. Consequences, documented in the
//! README:
//!
//! - `@`, `/`, `?`, `#`, `:` (in the password), spaces and `%` may appear raw in the userinfo.
//!   Percent-encoded forms (`%40` for `@`) are decoded before the credentials reach the client,
//!   so both ways of writing a secret work.
//! - An `@` after the host (a websocket path) must be written `%40`.
//! - A `,` separates servers, so a `,` in a secret must be written `%2C`.
//! - The user name ends at the first `:`; a token (userinfo without `:`) holding a `:` must write
//!   it `%3A`.
//! - A scheme-less URL whose token holds `://` reads as `scheme://`; give the scheme.
//!
//! Nothing in the userinfo is ever shown: the redacted form is `scheme://***@host:port`, with
//! the port the client will use (4222 for `nats` and `tls` when none is given), `?***` for a
//! query and `#***` for a fragment. A URL that does not parse is shown fully redacted
//! (`nats://***`), since which part of it is secret cannot be told: in `nats://svc:pa@ss:wo rd`
//! (host forgotten) the part after the last `@` is the end of the password.

use std::fmt;

use async_nats::ServerAddr;
use percent_encoding::percent_decode_str;

use crate::secret::Secret;

/// Schemes the client dials.
const SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];

/// Credentials found in a URL's userinfo, percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlCredentials {
    /// `token@host`.
    Token(Secret),
    /// `user:password@host`.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: Secret,
    },
}

/// One server URL, parsed: what the client dials, the credentials of its userinfo, and its
/// redacted form. Its `Display` and `Debug` show the redacted form only.
///
/// ```
/// use sink_nats::ServerUrl;
///
/// let url = ServerUrl::parse("nats://svc:p@ss/w?rd@nats.internal:4222")?;
/// assert_eq!(url.to_string(), "nats://***@nats.internal:4222");
/// assert_eq!((url.host(), url.port()), ("nats.internal", 4222));
/// assert!(url.has_credentials());
/// # Ok::<(), sink_nats::UrlError>(())
/// ```
#[derive(Clone)]
pub struct ServerUrl {
    shown: String,
    /// The host as the URL serialises it (IPv6 in brackets).
    host: String,
    addr: ServerAddr,
    credentials: Option<UrlCredentials>,
    /// The userinfo as written, and its user and password as written and decoded: the strings
    /// to scrub from any text the client library hands back.
    secrets: Vec<Secret>,
}

/// Why a server URL is refused. Messages show the redacted URL only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// The URL is empty.
    #[error("a server URL is empty; give e.g. nats://127.0.0.1:4222 (in a list, no empty entry)")]
    Empty,
    /// The URL does not parse; it is shown fully redacted.
    #[error("server URL {shown} does not parse ({reason}); the URL is hidden because a secret in it cannot be told apart; write it as nats://host:port or nats://user:password@host:port")]
    Malformed {
        /// The URL, fully redacted.
        shown: String,
        /// The parser's reason (it never quotes the input).
        reason: String,
    },
    /// The scheme is not one the client dials.
    #[error("server URL {shown}: scheme `{scheme}` is not supported; use nats://, tls://, ws:// or wss://")]
    Scheme {
        /// The URL, redacted.
        shown: String,
        /// The scheme found.
        scheme: String,
    },
    /// Nothing after the userinfo.
    #[error("server URL {shown} has no host; use e.g. nats://127.0.0.1:4222")]
    NoHost {
        /// The URL, redacted.
        shown: String,
    },
    /// `:password@` without a user.
    #[error("server URL {shown} has a password but no user name; write user:password@host, or token@host for a token")]
    PasswordWithoutUser {
        /// The URL, redacted.
        shown: String,
    },
}

/// The pieces of a raw URL under the userinfo rule.
struct Split<'a> {
    /// The scheme as written, when the URL has one.
    scheme: Option<&'a str>,
    /// Everything between `scheme://` and the last `@`.
    userinfo: Option<&'a str>,
    /// Everything after the userinfo.
    rest: &'a str,
}

fn split(raw: &str) -> Split<'_> {
    let (scheme, after) = match raw.split_once("://") {
        Some((scheme, after)) if is_scheme_name(scheme) => (Some(scheme), after),
        _ => (None, raw),
    };
    let (userinfo, rest) = match after.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, after),
    };
    Split {
        scheme,
        userinfo,
        rest,
    }
}

/// RFC 3986: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme_name(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The form shown for a URL that does not parse: the scheme (when it is one the client dials)
/// and nothing else.
fn fully_redacted(scheme: Option<&str>) -> String {
    match scheme {
        Some(s) if SCHEMES.contains(&s.to_ascii_lowercase().as_str()) => {
            format!("{}://***", s.to_ascii_lowercase())
        }
        _ => "***".to_owned(),
    }
}

fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

impl ServerUrl {
    /// Parses one server URL (`nats://host:port`, `tls://user:password@host`, `token@host`, ...;
    /// no scheme means `nats://`).
    pub fn parse(raw: &str) -> Result<ServerUrl, UrlError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(UrlError::Empty);
        }
        let parts = split(raw);
        let scheme = parts.scheme.unwrap_or("nats");
        let url = url::Url::parse(&format!("{scheme}://{}", parts.rest)).map_err(|e| {
            let shown = fully_redacted(parts.scheme);
            match e {
                url::ParseError::EmptyHost => UrlError::NoHost { shown },
                e => UrlError::Malformed {
                    shown,
                    reason: e.to_string(),
                },
            }
        })?;
        let shown = shown(&parts, &url);
        if url.host_str().is_none_or(str::is_empty) {
            return Err(UrlError::NoHost { shown });
        }
        let addr = ServerAddr::from_url(url.clone()).map_err(|_| UrlError::Scheme {
            shown: shown.clone(),
            scheme: url.scheme().to_owned(),
        })?;
        let mut secrets = Vec::new();
        let credentials = match parts.userinfo.filter(|u| !u.is_empty()) {
            None => None,
            Some(userinfo) => {
                secrets.push(Secret::new(userinfo));
                let (user, password) = match userinfo.split_once(':') {
                    Some((user, password)) if !password.is_empty() => (user, Some(password)),
                    Some((user, _)) => (user, None),
                    None => (userinfo, None),
                };
                match password {
                    Some(password) => {
                        if user.is_empty() {
                            return Err(UrlError::PasswordWithoutUser { shown });
                        }
                        let decoded = decode(password);
                        secrets.push(Secret::new(password));
                        secrets.push(Secret::new(decoded.clone()));
                        Some(UrlCredentials::UserPassword {
                            user: decode(user),
                            password: Secret::new(decoded),
                        })
                    }
                    None if user.is_empty() => None,
                    None => {
                        let decoded = decode(user);
                        secrets.push(Secret::new(user));
                        secrets.push(Secret::new(decoded.clone()));
                        Some(UrlCredentials::Token(Secret::new(decoded)))
                    }
                }
            }
        };
        Ok(ServerUrl {
            shown,
            host: url.host_str().unwrap_or_default().to_owned(),
            addr,
            credentials,
            secrets,
        })
    }

    /// The host (IPv6 in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port the client dials (4222 for `nats`/`tls` without one, 80/443 for `ws`/`wss`).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Whether the userinfo carries credentials.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// The address for the client, without userinfo (the client logs its addresses).
    pub(crate) fn addr(&self) -> &ServerAddr {
        &self.addr
    }

    /// The credentials of the userinfo, percent-decoded.
    pub(crate) fn credentials(&self) -> Option<&UrlCredentials> {
        self.credentials.as_ref()
    }

    /// Every form of the userinfo's secrets, as written and decoded.
    pub(crate) fn secrets(&self) -> impl Iterator<Item = &str> {
        self.secrets.iter().map(Secret::expose)
    }
}

/// `scheme://***@host:port/path?***#***` from a parsed URL; the scheme is left out when the
/// input had none.
fn shown(parts: &Split<'_>, url: &url::Url) -> String {
    let mut out = String::new();
    if parts.scheme.is_some() {
        out.push_str(url.scheme());
        out.push_str("://");
    }
    if parts.userinfo.is_some() {
        out.push_str("***@");
    }
    let host = url.host_str().unwrap_or_default();
    out.push_str(host);
    let port = url
        .port_or_known_default()
        .or_else(|| SCHEMES[..2].contains(&url.scheme()).then_some(4222));
    if let Some(port) = port.filter(|_| !host.is_empty()) {
        out.push_str(&format!(":{port}"));
    }
    if !matches!(url.path(), "" | "/") {
        out.push_str(url.path());
    }
    if url.query().is_some() {
        out.push_str("?***");
    }
    if url.fragment().is_some() {
        out.push_str("#***");
    }
    out
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServerUrl").field(&self.shown).finish()
    }
}

/// A server URL with its userinfo replaced by `***`, for logs and errors. Works on any text: a
/// URL that does not parse comes back fully redacted (`nats://***`).
pub fn redact_url(url: &str) -> String {
    match ServerUrl::parse(url) {
        Ok(parsed) => parsed.shown,
        Err(
            UrlError::Scheme { shown, .. }
            | UrlError::NoHost { shown }
            | UrlError::PasswordWithoutUser { shown }
            | UrlError::Malformed { shown, .. },
        ) => shown,
        Err(UrlError::Empty) => String::new(),
    }
}

/// Every server URL, redacted, comma-separated.
pub fn redacted_servers(servers: &[String]) -> String {
    servers
        .iter()
        .map(|s| redact_url(s))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_table() {
        for (url, want) in [
            ("nats://u:hunter2@h:4222", "nats://***@h:4222"),
            ("nats://tok3n@h:4222", "nats://***@h:4222"),
            ("tls://a:b@c@h", "tls://***@h:4222"),
            ("nats://h:4222", "nats://h:4222"),
            ("nats://h", "nats://h:4222"),
            ("h:4222", "h:4222"),
            ("u:p@h:4222", "***@h:4222"),
            ("nats://user:p@ss/w?rd@host:4222", "nats://***@host:4222"),
            ("nats://u:p%40ss%2Fw@[::1]:5", "nats://***@[::1]:5"),
            ("ws://u:p@h/nats?tok=x#f", "ws://***@h:80/nats?***#***"),
            ("wss://h", "wss://h:443"),
            ("NATS://H:1", "nats://H:1"),
            ("http://u:s3cret@h:8080", "http://***@h:8080"),
            // Does not parse: which part is secret cannot be told, so nothing but the scheme.
            ("nats://user:pass", "nats://***"),
            ("nats://u:s3cret@h:99999", "nats://***"),
            // The host forgotten: what follows the last `@` is part of the password.
            ("nats://svc:pa@ss:wo rd", "nats://***"),
            ("u:pass", "***"),
            ("gopher://u:pass", "***"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn userinfo_becomes_decoded_credentials() {
        let creds = |url: &str| ServerUrl::parse(url).expect(url).credentials;
        assert_eq!(creds("nats://h:4222"), None);
        assert_eq!(creds("nats://@h:4222"), None);
        assert_eq!(
            creds("nats://svc:p%40ss@h:2"),
            Some(UrlCredentials::UserPassword {
                user: "svc".into(),
                password: Secret::new("p@ss"),
            })
        );
        assert_eq!(
            creds("nats://svc:p@ss/w?rd:x #@h:2"),
            Some(UrlCredentials::UserPassword {
                user: "svc".into(),
                password: Secret::new("p@ss/w?rd:x #"),
            })
        );
        assert_eq!(
            creds("t0k%2Fen@h:1"),
            Some(UrlCredentials::Token(Secret::new("t0k/en")))
        );
        // A `%` that starts no escape is kept as written.
        assert_eq!(
            creds("tls://svc:100%sure@h"),
            Some(UrlCredentials::UserPassword {
                user: "svc".into(),
                password: Secret::new("100%sure"),
            })
        );
    }

    #[test]
    fn the_address_for_the_client_has_no_userinfo() {
        let url = ServerUrl::parse("nats://svc:p@ss/w?rd@127.0.0.1:4333").expect("parses");
        assert_eq!(url.addr().as_url_str(), "nats://127.0.0.1:4333");
        assert_eq!((url.host(), url.port()), ("127.0.0.1", 4333));
        let v6 = ServerUrl::parse("tls://t@[fe80::1]").expect("parses");
        assert_eq!((v6.host(), v6.port()), ("[fe80::1]", 4222));
        assert!(v6.addr().tls_required());
    }

    #[test]
    fn refusals_are_typed_and_redacted() {
        let err = |url: &str| ServerUrl::parse(url).expect_err(url);
        assert_eq!(err(" "), UrlError::Empty);
        assert_eq!(
            err("http://u:s3cret@h:4222"),
            UrlError::Scheme {
                shown: "http://***@h:4222".into(),
                scheme: "http".into()
            }
        );
        assert_eq!(
            err("nats://u:s3cret@"),
            UrlError::NoHost {
                shown: "nats://***@".into()
            }
        );
        assert_eq!(
            err("nats://:s3cret@h"),
            UrlError::PasswordWithoutUser {
                shown: "nats://***@h:4222".into()
            }
        );
        assert_eq!(
            err("nats://u:s3cret@h:99999"),
            UrlError::Malformed {
                shown: "nats://***".into(),
                reason: "invalid port number".into()
            }
        );
        for e in [err("nats://u:s3cret@h:99999"), err("nats://u:s3cret@")] {
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }
}
