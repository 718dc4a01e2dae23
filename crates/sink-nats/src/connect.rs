//! Connecting: the client options from the config (auth, URL credentials, TLS, timeouts), config
//! validation, and connect errors with every secret scrubbed.

use std::time::Duration;

use async_nats::ConnectOptions;
use sink_core::backoff::FAR_FUTURE;

use crate::config::{Auth, SinkConfig};
use crate::error::StartError;
use crate::server_url::{redacted_servers, ServerUrl, UrlCredentials};

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

/// Most fast-batch lanes one sink may open.
const MAX_LANES: usize = 64;

/// Refuses a config no sink can run with, naming the field and the fix.
pub(crate) fn validate(config: &SinkConfig) -> Result<(), StartError> {
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
    config
        .outbox_config()
        .validate()
        .map_err(|e| StartError::Config {
            field: "outbox",
            problem: e.to_string(),
        })?;
    if !(1..=MAX_LANES).contains(&config.lanes) {
        return bad(
            "lanes",
            "must be 1 to 64 (default 4): each lane is a batch the server keeps open",
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

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
}
