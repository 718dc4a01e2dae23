//! `jetsink doctor`: connectivity, auth, server version and capabilities, JetStream account limits
//! and the stream, one `PASS`/`WARN`/`FAIL` line per check.

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream;
use clap::Args;
use serde_json::Value;
use sink_core::capability::ServerVersion;
use sink_core::stream::{advise, verify};
use sink_nats::{connect_client, stream_requirements, Auth, ServerUrl, SinkConfig, StartError};

use crate::config::Common;
use crate::output::duration;
use crate::stream::{lookup, Lookup};

/// Options of `doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Seconds allowed for each request to the server
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub timeout: u64,
}

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works, with a limitation worth knowing.
    Warn,
    /// Broken: the sink will not work (or not as promised).
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        })
    }
}

#[derive(Default)]
struct Checks {
    failed: bool,
}

impl Checks {
    fn line(&mut self, verdict: Verdict, check: &str, detail: impl fmt::Display) {
        if verdict == Verdict::Fail {
            self.failed = true;
        }
        println!("{verdict}  {check:<13} {detail}");
    }
}

/// Optional server features the sink can use, and the version that brought them.
const FEATURES: [(&str, (u64, u64)); 5] = [
    ("Nats-Expected-Last-Msg-Id chaining", (2, 2)),
    ("subject transforms, stream compression", (2, 10)),
    ("per-message TTL", (2, 11)),
    ("atomic batch publish", (2, 12)),
    ("fast-batch publish (allow_batched)", (2, 14)),
];

/// Runs `doctor`.
pub async fn run(args: DoctorArgs, common: &Common) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut checks = Checks::default();
    let resolved = match common.resolve() {
        Ok(r) => r,
        Err(e) => {
            checks.line(Verdict::Fail, "config", format!("{e:#}"));
            return Ok(ExitCode::from(1));
        }
    };
    let config = common.sink_config()?;
    checks.line(
        Verdict::Pass,
        "config",
        format!(
            "url {}, stream {}, subject template {}",
            resolved.redacted_url(),
            config.stream,
            config.subject_template
        ),
    );

    let client = match tokio::time::timeout(timeout * 2, connect_client(&config)).await {
        Err(_) => {
            checks.line(
                Verdict::Fail,
                "connectivity",
                format!(
                    "no connection to {} within {timeout:?}",
                    resolved.redacted_url()
                ),
            );
            return Ok(ExitCode::from(1));
        }
        Ok(Err(e @ StartError::Authorization { .. })) => {
            checks.line(Verdict::Pass, "connectivity", "the server answered");
            checks.line(
                Verdict::Fail,
                "auth",
                format!("{e} ({})", auth_method(&config)),
            );
            return Ok(ExitCode::from(1));
        }
        Ok(Err(e)) => {
            checks.line(Verdict::Fail, "connectivity", e);
            checks.line(Verdict::Warn, "auth", "not checked: no connection");
            return Ok(ExitCode::from(1));
        }
        Ok(Ok(client)) => client,
    };
    checks.line(
        Verdict::Pass,
        "connectivity",
        format!("connected to {}", resolved.redacted_url()),
    );
    checks.line(
        Verdict::Pass,
        "auth",
        format!("accepted ({})", auth_method(&config)),
    );

    let info = client.server_info();
    match parse_version(&info.version) {
        Some(v) if v >= (2, 9) => checks.line(
            Verdict::Pass,
            "server",
            format!("nats-server {} (supported: 2.9 and later)", info.version),
        ),
        Some(_) => checks.line(
            Verdict::Fail,
            "server",
            format!(
                "nats-server {} is older than 2.9; upgrade the server",
                info.version
            ),
        ),
        None => checks.line(
            Verdict::Warn,
            "server",
            format!(
                "version {:?} does not parse; capabilities unknown",
                info.version
            ),
        ),
    }
    if info.headers {
        checks.line(
            Verdict::Pass,
            "capability",
            "headers: yes (Nats-Msg-Id deduplication)",
        );
    } else {
        checks.line(
            Verdict::Fail,
            "capability",
            "headers: no; the sink needs message headers (Nats-Msg-Id)",
        );
    }
    let version = parse_version(&info.version).unwrap_or((0, 0));
    for (feature, (major, minor)) in FEATURES {
        if version >= (major, minor) {
            checks.line(
                Verdict::Pass,
                "capability",
                format!("{feature}: yes ({major}.{minor}+)"),
            );
        } else {
            checks.line(
                Verdict::Warn,
                "capability",
                format!("{feature}: no (needs {major}.{minor})"),
            );
        }
    }

    let js_ok = account_check(&client, timeout, &mut checks).await;
    if js_ok {
        stream_check(&client, &config, timeout, &mut checks).await;
    } else {
        checks.line(
            Verdict::Warn,
            "stream",
            "not checked: JetStream is not available",
        );
    }

    Ok(if checks.failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn auth_method(config: &SinkConfig) -> &'static str {
    let in_url = config
        .servers
        .iter()
        .any(|s| ServerUrl::parse(s).is_ok_and(|u| u.has_credentials()));
    match &config.auth {
        Auth::Token(_) => "token",
        Auth::UserPassword { .. } => "user/password",
        Auth::NkeySeed(_) => "nkey",
        Auth::CredsFile(_) => "creds file",
        Auth::None if in_url => "credentials in the URL",
        _ => "no credentials",
    }
}

/// `major.minor` of a server version string such as `2.9.10` or `2.12.0-beta.1`.
pub fn parse_version(text: &str) -> Option<(u64, u64)> {
    let mut parts = text.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// Asks `$JS.API.INFO` directly: async-nats 0.51's `query_account` cannot parse 2.9's reply.
async fn account_check(
    client: &async_nats::Client,
    timeout: Duration,
    checks: &mut Checks,
) -> bool {
    let reply = tokio::time::timeout(timeout, client.request("$JS.API.INFO", "".into())).await;
    let message = match reply {
        Err(_) => {
            checks.line(
                Verdict::Fail,
                "jetstream",
                format!("no reply to $JS.API.INFO within {timeout:?}"),
            );
            return false;
        }
        Ok(Err(e)) => {
            let text = e.to_string();
            let detail = if text.to_ascii_lowercase().contains("no responders") {
                "not enabled: no responders for $JS.API.INFO; start nats-server with -js".to_owned()
            } else {
                format!("$JS.API.INFO failed: {text}")
            };
            checks.line(Verdict::Fail, "jetstream", detail);
            return false;
        }
        Ok(Ok(message)) => message,
    };
    let (verdict, detail) = judge_account(&message.payload);
    checks.line(verdict, "jetstream", detail);
    verdict != Verdict::Fail
}

/// Judges a `$JS.API.INFO` reply: usage against limits, or the API error.
pub fn judge_account(payload: &[u8]) -> (Verdict, String) {
    let Ok(json) = serde_json::from_slice::<Value>(payload) else {
        return (Verdict::Fail, "account info reply is not JSON".into());
    };
    if let Some(err) = json.get("error") {
        let description = err
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        let code = err.get("err_code").and_then(Value::as_u64).unwrap_or(0);
        return (
            Verdict::Fail,
            format!(
                "account info: {description} (err_code {code}); enable JetStream for this account"
            ),
        );
    }
    let num = |v: Option<&Value>| v.and_then(Value::as_i64).unwrap_or(0);
    let limits = json.get("limits");
    let limit = |name: &str| num(limits.and_then(|l| l.get(name)));
    let used_storage = num(json.get("storage"));
    let used_memory = num(json.get("memory"));
    let streams = num(json.get("streams"));
    let consumers = num(json.get("consumers"));
    let of = |used: i64, max: i64, bytes: bool| {
        let show = |n: i64| if bytes { human_bytes(n) } else { n.to_string() };
        if max <= 0 {
            format!("{} of unlimited", show(used))
        } else {
            format!("{} of {}", show(used), show(max))
        }
    };
    let detail = format!(
        "account: storage {}, memory {}, streams {}, consumers {}",
        of(used_storage, limit("max_storage"), true),
        of(used_memory, limit("max_memory"), true),
        of(streams, limit("max_streams"), false),
        of(consumers, limit("max_consumers"), false),
    );
    let near = |used: i64, max: i64| max > 0 && used * 10 >= max * 9;
    if near(used_storage, limit("max_storage")) || near(streams, limit("max_streams")) {
        (
            Verdict::Warn,
            format!("{detail}; a limit is at 90% or more"),
        )
    } else {
        (Verdict::Pass, detail)
    }
}

fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

async fn stream_check(
    client: &async_nats::Client,
    config: &SinkConfig,
    timeout: Duration,
    checks: &mut Checks,
) {
    let req = match stream_requirements(config) {
        Ok(req) => req,
        Err(e) => {
            checks.line(Verdict::Fail, "stream", e);
            return;
        }
    };
    let js = jetstream::new(client.clone());
    match tokio::time::timeout(timeout, lookup(&js, &config.stream)).await {
        Err(_) => checks.line(
            Verdict::Fail,
            "stream",
            format!("no reply about stream {} within {timeout:?}", config.stream),
        ),
        Ok(Err(e)) => checks.line(Verdict::Fail, "stream", format!("{e:#}")),
        Ok(Ok(Lookup::Missing)) => checks.line(
            Verdict::Warn,
            "stream",
            format!(
                "stream {} does not exist; create it with `jetsink stream ensure` or publish with --stream-policy create",
                config.stream
            ),
        ),
        Ok(Ok(Lookup::Found(facts))) => {
            let violations = verify(&facts, &req);
            if violations.is_empty() {
                checks.line(
                    Verdict::Pass,
                    "stream",
                    format!(
                        "stream {} meets every requirement (subjects {}, max_age {}, duplicate window {}, {} storage)",
                        facts.name,
                        facts.subjects.join(", "),
                        if facts.max_age.is_zero() {
                            "unlimited".to_owned()
                        } else {
                            duration(facts.max_age)
                        },
                        duration(facts.duplicate_window),
                        facts.storage
                    ),
                );
            }
            for v in violations {
                checks.line(Verdict::Fail, "stream", v);
            }
            // Not a failure: the sink works, slower.
            let server = ServerVersion::parse(&client.server_info().version);
            for a in advise(&facts, server) {
                checks.line(Verdict::Warn, "stream", a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_to_major_minor() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("2.12.0-beta.1"), Some((2, 12)));
        assert_eq!(parse_version("v2.10.3"), Some((2, 10)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn account_replies_are_judged() {
        let ok = br#"{"type":"io.nats.jetstream.api.v1.account_info_response","memory":0,"storage":2048,"streams":1,"consumers":0,"limits":{"max_memory":-1,"max_storage":-1,"max_streams":-1,"max_consumers":-1}}"#;
        assert_eq!(
            judge_account(ok),
            (
                Verdict::Pass,
                "account: storage 2.0 KiB of unlimited, memory 0 B of unlimited, streams 1 of unlimited, consumers 0 of unlimited".to_owned()
            )
        );
        let full = br#"{"memory":0,"storage":950,"streams":1,"consumers":0,"limits":{"max_storage":1000}}"#;
        assert_eq!(judge_account(full).0, Verdict::Warn);
        let off = br#"{"error":{"code":503,"err_code":10039,"description":"jetstream not enabled for account"}}"#;
        let (verdict, detail) = judge_account(off);
        assert_eq!(verdict, Verdict::Fail);
        assert!(detail.contains("jetstream not enabled"), "{detail}");
    }
}
