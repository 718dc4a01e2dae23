//! Connection settings shared by every subcommand: flags > environment > TOML file > defaults.
//!
//! Clap fills a setting from its flag, else from its environment variable. What is still unset is
//! taken from the TOML file named by `--config` (or `JETSINK_CONFIG`), then from the defaults.
//! The TOML keys are the long flag names with `_` for `-`:
//!
//! ```toml
//! url = "nats://127.0.0.1:4222"          # one URL or a comma-separated list
//! stream = "CELLOS_EVENTS"
//! subject_template = "cellos.events.{tenantId}.v1"
//! require_tenant = false                 # true: refuse events without data.tenantId
//! creds = "/etc/jetsink/svc.creds"
//! token = "..."                          # or user + password, or nkey_seed_file
//! user = "svc"
//! password = "..."
//! nkey_seed_file = "/etc/jetsink/svc.nk"
//! tls_ca = "/etc/jetsink/ca.pem"
//! tls_cert = "/etc/jetsink/client.pem"   # with tls_key: mutual TLS
//! tls_key = "/etc/jetsink/client-key.pem"
//! metrics_addr = "127.0.0.1:9898"
//! ```
//!
//! Unknown keys are an error, so a typo does not silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Deserialize;
use sink_core::subject::SubjectTemplate;
use sink_nats::{redact_url, Auth, Secret, ServerUrl, SinkConfig, Tls};

/// Default server URL.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// Default stream name.
pub const DEFAULT_STREAM: &str = "CELLOS_EVENTS";
/// Default subject template.
pub const DEFAULT_SUBJECT_TEMPLATE: &str = "cellos.events.{tenantId}.v1";

/// Connection, auth, TLS and stream settings accepted by every subcommand.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Global options")]
pub struct Common {
    /// NATS server URL, or a comma-separated list [default: nats://127.0.0.1:4222]
    #[arg(long, global = true, env = "NATS_URL", hide_env_values = true)]
    pub url: Option<String>,
    /// JetStream stream the events go to [default: CELLOS_EVENTS]
    #[arg(long, global = true, env = "JETSINK_STREAM", hide_env_values = true)]
    pub stream: Option<String>,
    /// Subject template; placeholders {tenantId}, {subject}, {type} [default: cellos.events.{tenantId}.v1]
    #[arg(
        long,
        global = true,
        env = "JETSINK_SUBJECT_TEMPLATE",
        hide_env_values = true
    )]
    pub subject_template: Option<String>,
    /// Refuse events without a tenant (data.tenantId) instead of sending them to the default tenant `single`
    #[arg(long, global = true)]
    pub require_tenant: bool,
    /// Credentials file (JWT + nkey seed)
    #[arg(long, global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// Auth token
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// User name (with --password)
    #[arg(long, global = true, env = "NATS_USER", hide_env_values = true)]
    pub user: Option<String>,
    /// Password (with --user)
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// File holding an nkey seed (SU...)
    #[arg(long, global = true, value_name = "FILE")]
    pub nkey_seed_file: Option<PathBuf>,
    /// PEM file with the CA that signed the server certificate
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --tls-key
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS, with --tls-cert
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// TOML file with any of these settings (flags and environment take precedence)
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "JETSINK_CONFIG",
        hide_env_values = true
    )]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9898)
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The TOML file's shape: every key optional, unknown keys rejected.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    url: Option<String>,
    stream: Option<String>,
    subject_template: Option<String>,
    require_tenant: Option<bool>,
    creds: Option<PathBuf>,
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    nkey_seed_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
}

/// Settings after flags, environment, file and defaults were merged.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Server URLs (may contain credentials: print only through `redact_url`).
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subject template.
    pub subject_template: String,
    /// Refuse events without a tenant.
    pub require_tenant: bool,
    /// Authentication.
    pub auth: Auth,
    /// TLS.
    pub tls: Tls,
    /// Prometheus listener.
    pub metrics_addr: Option<SocketAddr>,
}

impl Resolved {
    /// The server list with credentials replaced by `***`.
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(|s| redact_url(s.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Common {
    /// Merges flags/environment with the TOML file and the defaults, and checks every value that
    /// can be checked without a server (URLs, template, readable files).
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let file = match &self.config {
            Some(path) => read_file_settings(path)?,
            None => FileSettings::default(),
        };
        let url = pick(self.url.clone(), file.url, DEFAULT_URL);
        let stream = pick(self.stream.clone(), file.stream, DEFAULT_STREAM);
        let subject_template = pick(
            self.subject_template.clone(),
            file.subject_template,
            DEFAULT_SUBJECT_TEMPLATE,
        );
        check_urls(&url)?;
        if stream.is_empty() || stream.contains(['.', '*', '>', ' ', '/', '\\']) {
            bail!("stream name {stream:?} is invalid: use letters, digits, `-` and `_` only");
        }
        SubjectTemplate::parse(&subject_template)
            .with_context(|| format!("subject template {subject_template:?} is invalid"))?;

        let creds = self.creds.clone().or(file.creds);
        let token = self.token.clone().or(file.token);
        let user = self.user.clone().or(file.user);
        let password = self.password.clone().or(file.password);
        let nkey_seed_file = self.nkey_seed_file.clone().or(file.nkey_seed_file);
        let mut methods = Vec::new();
        if creds.is_some() {
            methods.push("--creds");
        }
        if token.is_some() {
            methods.push("--token");
        }
        if user.is_some() || password.is_some() {
            methods.push("--user/--password");
        }
        if nkey_seed_file.is_some() {
            methods.push("--nkey-seed-file");
        }
        if methods.len() > 1 {
            bail!(
                "more than one auth method given ({}); pick one",
                methods.join(", ")
            );
        }
        let auth = if let Some(path) = creds {
            check_readable(&path, "creds file")?;
            Auth::CredsFile(path)
        } else if let Some(token) = token {
            Auth::Token(Secret::new(token))
        } else if user.is_some() || password.is_some() {
            let (Some(user), Some(password)) = (user, password) else {
                bail!(
                    "--user and --password go together; give both (or NATS_USER and NATS_PASSWORD)"
                );
            };
            Auth::UserPassword {
                user,
                password: Secret::new(password),
            }
        } else if let Some(path) = nkey_seed_file {
            let seed = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read nkey seed file {}", path.display()))?;
            let seed = seed.trim();
            if !seed.starts_with('S') {
                bail!(
                    "nkey seed file {} does not hold a seed (it should start with `S`, e.g. SU...)",
                    path.display()
                );
            }
            Auth::NkeySeed(Secret::new(seed))
        } else {
            Auth::None
        };

        let root_ca = self.tls_ca.clone().or(file.tls_ca);
        let cert = self.tls_cert.clone().or(file.tls_cert);
        let key = self.tls_key.clone().or(file.tls_key);
        if let Some(path) = &root_ca {
            check_readable(path, "TLS CA file")?;
        }
        let client_cert = match (cert, key) {
            (Some(cert), Some(key)) => {
                check_readable(&cert, "TLS client certificate")?;
                check_readable(&key, "TLS client key")?;
                Some((cert, key))
            }
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together; give both for mutual TLS"),
        };
        let required = client_cert.is_some()
            || url
                .split(',')
                .any(|u| u.trim().to_ascii_lowercase().starts_with("tls://"));
        Ok(Resolved {
            url,
            stream,
            subject_template,
            require_tenant: self.require_tenant || file.require_tenant.unwrap_or(false),
            auth,
            tls: Tls {
                required,
                root_ca,
                client_cert,
            },
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
        })
    }

    /// The sink configuration these settings describe (other settings at their defaults).
    pub fn sink_config(&self) -> anyhow::Result<SinkConfig> {
        let r = self.resolve()?;
        Ok(SinkConfig {
            servers: r.url.split(',').map(|s| s.trim().to_owned()).collect(),
            stream: r.stream,
            subject_template: r.subject_template,
            require_tenant: r.require_tenant,
            auth: r.auth,
            tls: r.tls,
            ..SinkConfig::default()
        })
    }
}

fn pick(flag_or_env: Option<String>, file: Option<String>, default: &str) -> String {
    flag_or_env.or(file).unwrap_or_else(|| default.to_owned())
}

fn read_file_settings(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message quotes the offending line, which may hold a secret: keep the location and
        // the reason only.
        let what = e.message().to_owned();
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                anyhow::anyhow!("config file {}:{line}: {what}", path.display())
            }
            None => anyhow::anyhow!("config file {}: {what}", path.display()),
        }
    })
}

fn check_readable(path: &Path, what: &str) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Checks that every URL parses as a NATS server address; messages show redacted URLs only.
fn check_urls(urls: &str) -> anyhow::Result<()> {
    for url in urls.split(',') {
        ServerUrl::parse(url)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_fills_only_what_flags_and_env_left_unset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jetsink.toml");
        std::fs::write(
            &path,
            "url = \"nats://file-host:4333\"\nstream = \"FROM_FILE\"\nsubject_template = \"a.{tenantId}\"\n",
        )
        .expect("write");
        let common = Common {
            stream: Some("FROM_FLAG".into()),
            config: Some(path),
            ..Common::default()
        };
        let r = common.resolve().expect("resolves");
        assert_eq!(r.url, "nats://file-host:4333");
        assert_eq!(r.stream, "FROM_FLAG");
        assert_eq!(r.subject_template, "a.{tenantId}");
    }

    #[test]
    fn require_tenant_comes_from_the_flag_or_the_file() {
        assert!(
            !Common::default()
                .sink_config()
                .expect("resolves")
                .require_tenant
        );
        let flag = Common {
            require_tenant: true,
            ..Common::default()
        };
        assert!(flag.sink_config().expect("resolves").require_tenant);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jetsink.toml");
        std::fs::write(&path, "require_tenant = true\n").expect("write");
        let file = Common {
            config: Some(path),
            ..Common::default()
        };
        assert!(file.sink_config().expect("resolves").require_tenant);
    }

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let r = Common::default().resolve().expect("resolves");
        assert_eq!(r.url, DEFAULT_URL);
        assert_eq!(r.stream, DEFAULT_STREAM);
        assert_eq!(r.subject_template, DEFAULT_SUBJECT_TEMPLATE);
        assert_eq!(r.auth, Auth::None);
    }

    #[test]
    fn unknown_toml_key_is_named_without_echoing_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "password = \"hunter2\"\npasword = \"hunter2\"\n").expect("write");
        let common = Common {
            config: Some(path),
            ..Common::default()
        };
        let err = format!("{:#}", common.resolve().expect_err("typo rejected"));
        assert!(err.contains("bad.toml:2"), "{err}");
        assert!(err.contains("pasword"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn bad_urls_are_named_redacted() {
        for (url, want) in [
            ("nats://u:s3cret@host:99999", "invalid port number"),
            ("http://u:s3cret@host:4222", "scheme `http`"),
            ("nats://u:s3cret@", "no host"),
            ("nats://u:s3/cr@et@host:4222,", "empty"),
            ("nats://:s3cret@host", "no user name"),
        ] {
            let common = Common {
                url: Some(url.into()),
                ..Common::default()
            };
            let err = format!("{:#}", common.resolve().expect_err(url));
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains("s3cret"), "{url}: {err}");
        }
    }

    #[test]
    fn half_given_auth_pairs_are_rejected() {
        let common = Common {
            user: Some("svc".into()),
            ..Common::default()
        };
        let err = format!("{:#}", common.resolve().expect_err("user alone"));
        assert!(err.contains("--password"), "{err}");
        let common = Common {
            token: Some("t".into()),
            user: Some("svc".into()),
            password: Some("p".into()),
            ..Common::default()
        };
        let err = format!("{:#}", common.resolve().expect_err("two methods"));
        assert!(err.contains("more than one auth method"), "{err}");
    }
}
