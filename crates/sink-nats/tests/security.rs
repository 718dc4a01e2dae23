//! Security checks: credentials (URL userinfo, password, token, nkey seed) never show in errors,
//! `Debug` output or logs; wrong credentials give an authorization error; TLS with a CA generated
//! here and mutual TLS deliver; malformed construction input fails with an error naming the field.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use sink_nats::{Auth, JetStreamSink, Secret, StartError, Tls};
use sink_testkit::server::generate_user_nkey;
use sink_testkit::{tls, NatsServer, ServerAuth, ServerOptions, ServerVersion};

/// Everything every test of this binary logged (all levels, all crates, async-nats included).
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || LogWriter(Arc::clone(&sink)))
            .try_init()
            .expect("the only tracing subscriber of this test binary");
        logs
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_text() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// A secret unique to this run, recognisable in any output.
fn secret(kind: &str) -> String {
    format!("{kind}S3cr3t{}x{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(7);
    h.finish() % 1_000_000
}

/// A loopback port with nothing listening.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

async fn server_with(version: ServerVersion, auth: ServerAuth) -> NatsServer {
    NatsServer::start(ServerOptions {
        auth,
        ..ServerOptions::version(version)
    })
    .await
    .unwrap_or_else(|e| panic!("cannot start nats-server {version}: {e}"))
}

/// Collects `Display` and `Debug` of everything the tests show, to search for secrets.
#[derive(Default)]
struct Shown(Vec<String>);

impl Shown {
    fn error(&mut self, e: &StartError) {
        self.0.push(format!("{e}"));
        self.0.push(format!("{e:?}"));
    }
    fn debug(&mut self, v: &impl std::fmt::Debug) {
        self.0.push(format!("{v:?}"));
    }
    fn assert_free_of(&self, secrets: &[&str]) {
        for text in &self.0 {
            for s in secrets {
                assert!(!text.contains(s), "a secret leaked into: {text}");
            }
        }
    }
}

/// Connects; on success delivers a few events, records what the sink shows, and closes.
async fn run_ok(builder: sink_nats::SinkBuilder, shown: &mut Shown) -> JetStreamSink {
    shown.debug(&builder);
    let sink = builder
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let sent = send_all(&sink, "secure", 20, 2).await;
    assert_eq!(delivered_count(&sent), 20);
    for s in &sent {
        shown.debug(&s.outcome);
    }
    shown.debug(&sink);
    shown.debug(&sink.health());
    sink
}

async fn expect_auth_error(builder: sink_nats::SinkBuilder, shown: &mut Shown, what: &str) {
    shown.debug(&builder);
    let err = builder.connect().await.expect_err(what);
    shown.error(&err);
    assert!(
        matches!(err, StartError::Authorization { .. }),
        "{what}: wrong credentials give an authorization error, got {err:?}"
    );
    assert!(err.to_string().contains("authorization"), "{err}");
}

async fn credentials_stay_secret(version: ServerVersion) {
    let _ = captured_logs();
    let mut shown = Shown::default();
    let password = secret("pw");
    let wrong_password = secret("wrongpw");
    let token = secret("tok");
    let wrong_token = secret("wrongtok");
    let (seed, public_key) = generate_user_nkey();
    let (wrong_seed, _) = generate_user_nkey();

    // User and password, in the URL and as Auth.
    let server = server_with(
        version,
        ServerAuth::UserPassword {
            user: "svc".into(),
            password: password.clone(),
        },
    )
    .await;
    let with_userinfo = |pw: &str| format!("nats://svc:{pw}@127.0.0.1:{}", server.port());
    expect_auth_error(
        builder(&with_userinfo(&wrong_password)),
        &mut shown,
        "wrong password in URL",
    )
    .await;
    expect_auth_error(
        builder(&server.url()).auth(Auth::UserPassword {
            user: "svc".into(),
            password: Secret::new(wrong_password.clone()),
        }),
        &mut shown,
        "wrong password",
    )
    .await;
    let sink = run_ok(builder(&with_userinfo(&password)), &mut shown).await;
    shown.debug(&sink.close(Duration::from_secs(5)).await);
    let sink = run_ok(
        builder(&server.url()).auth(Auth::UserPassword {
            user: "svc".into(),
            password: Secret::new(password.clone()),
        }),
        &mut shown,
    )
    .await;
    // The server goes away under a connected sink: the errors it logs and reports stay clean.
    drop(server);
    let gone = event("after-server-gone", 0, 1);
    let late = tokio::time::timeout(Duration::from_secs(3), sink.emit(&gone)).await;
    shown.debug(&late);
    shown.debug(&sink.health());
    shown.debug(&sink.close(Duration::from_millis(500)).await);

    // Unreachable server with credentials in the URL.
    let unreachable = format!("nats://svc:{password}@127.0.0.1:{}", closed_port());
    let err = builder(&unreachable)
        .connect()
        .await
        .expect_err("nothing listens there");
    shown.error(&err);
    assert!(matches!(err, StartError::Connect { .. }), "{err:?}");

    // Token, as Auth and in the URL.
    let server = server_with(version, ServerAuth::Token(token.clone())).await;
    expect_auth_error(
        builder(&server.url()).auth(Auth::Token(Secret::new(wrong_token.clone()))),
        &mut shown,
        "wrong token",
    )
    .await;
    expect_auth_error(
        builder(&format!("nats://{wrong_token}@127.0.0.1:{}", server.port())),
        &mut shown,
        "wrong token in URL",
    )
    .await;
    let sink = run_ok(
        builder(&server.url()).auth(Auth::Token(Secret::new(token.clone()))),
        &mut shown,
    )
    .await;
    shown.debug(&sink.close(Duration::from_secs(5)).await);
    drop(server);

    // Nkey seed.
    let server = server_with(version, ServerAuth::Nkey { public_key }).await;
    expect_auth_error(
        builder(&server.url()).auth(Auth::NkeySeed(Secret::new(wrong_seed.clone()))),
        &mut shown,
        "unknown nkey",
    )
    .await;
    let sink = run_ok(
        builder(&server.url()).auth(Auth::NkeySeed(Secret::new(seed.clone()))),
        &mut shown,
    )
    .await;
    shown.debug(&sink.close(Duration::from_secs(5)).await);

    let secrets = [
        password.as_str(),
        wrong_password.as_str(),
        token.as_str(),
        wrong_token.as_str(),
        seed.as_str(),
        wrong_seed.as_str(),
    ];
    shown.assert_free_of(&secrets);
    let logs = logs_text();
    assert!(!logs.is_empty(), "the subscriber captured the runs' logs");
    for line in logs.lines() {
        for s in &secrets {
            assert!(!line.contains(s), "a secret leaked into a log line: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_leak_and_wrong_ones_give_authorization_errors_on_2_9() {
    credentials_stay_secret(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_leak_and_wrong_ones_give_authorization_errors_on_2_15() {
    credentials_stay_secret(ServerVersion::V2_15).await;
}

async fn tls_delivers(version: ServerVersion, mutual: bool) {
    let files = tls::generate().expect("generate TLS files");
    let server = NatsServer::start(ServerOptions {
        tls: Some(files.clone()),
        require_client_cert: mutual,
        ..ServerOptions::version(version)
    })
    .await
    .unwrap_or_else(|e| panic!("cannot start nats-server {version} with TLS: {e}"));
    assert!(server.url().starts_with("tls://"));
    let settings = Tls {
        required: true,
        root_ca: Some(files.ca_cert.clone()),
        client_cert: mutual.then(|| (files.client_cert.clone(), files.client_key.clone())),
    };
    if mutual {
        // Without its certificate the client is turned away, with an error rather than a hang.
        let without_cert = Tls {
            client_cert: None,
            ..settings.clone()
        };
        let refused = tokio::time::timeout(
            Duration::from_secs(20),
            builder(&server.url()).tls(without_cert).connect(),
        )
        .await
        .expect("I5: a refused TLS handshake fails within the connect timeout");
        assert!(refused.is_err(), "mTLS requires the client certificate");
    }
    let sink = builder(&server.url())
        .tls(settings)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect over TLS: {e}"));
    let sent = send_all(&sink, "tls", 200, 2).await;
    assert_eq!(delivered_count(&sent), 200);
    let client = server.connect().await.expect("audit client over TLS");
    let report = audit_stream(client, STREAM, &sent).await;
    report.assert_passed();
    assert_eq!(report.stored, 200);
    let close = sink.close(Duration::from_secs(5)).await;
    assert!(close.complete(), "{close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_generated_in_the_test_delivers_on_2_9() {
    tls_delivers(ServerVersion::V2_9, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_generated_in_the_test_delivers_on_2_15() {
    tls_delivers(ServerVersion::V2_15, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_and_refuses_a_client_without_certificate_on_2_9() {
    tls_delivers(ServerVersion::V2_9, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_and_refuses_a_client_without_certificate_on_2_15() {
    tls_delivers(ServerVersion::V2_15, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_server_url_is_a_config_error_naming_servers() {
    let err = builder("nats://127.0.0.1:notaport")
        .connect()
        .await
        .expect_err("not a URL");
    assert!(
        matches!(
            err,
            StartError::Config {
                field: "servers",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("servers"), "{err}");
    let err = builder(" , ").connect().await.expect_err("no URL at all");
    assert!(
        matches!(
            err,
            StartError::Config {
                field: "servers",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_creds_file_is_a_file_error_naming_the_path() {
    let dir = std::env::temp_dir().join(format!("jetsink-no-such-dir-{}", std::process::id()));
    let path = dir.join("service.creds");
    let url = format!("nats://127.0.0.1:{}", closed_port());
    let err = builder(&url)
        .auth(Auth::CredsFile(path.clone()))
        .connect()
        .await
        .expect_err("the file does not exist");
    assert!(matches!(err, StartError::File { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "names the path: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_subject_template_is_a_template_error() {
    let url = format!("nats://127.0.0.1:{}", closed_port());
    for template in ["t.events.{tenantId", "t..{tenantId}", "t.{nope}.v1", ""] {
        let err = builder(&url)
            .subject_template(template)
            .connect()
            .await
            .expect_err(template);
        assert!(
            matches!(err, StartError::Template(_)),
            "template {template:?}: {err:?}"
        );
    }
}

/// URL shapes for the redaction properties: what a user may write, secrets included, and what
/// the redacted form must be.
mod url_shapes {
    use proptest::prelude::*;

    /// Userinfo as written in a URL. Every variant's value is a secret to the sink (a name alone
    /// is a token).
    #[derive(Debug, Clone)]
    pub enum Userinfo {
        None,
        UserOnly(String),
        UserPassword { user: String, password: String },
        Token(String),
    }

    #[derive(Debug, Clone)]
    pub struct Shape {
        pub scheme: Option<&'static str>,
        pub userinfo: Userinfo,
        /// Secrets percent-encoded in the URL (else written raw).
        pub encoded: bool,
        pub host: String,
        pub port: Option<u16>,
    }

    /// `%XX` for every byte that is not a letter or digit.
    pub fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    impl Shape {
        /// The secrets of this URL, each as meant and as written in the URL.
        pub fn secrets(&self) -> Vec<String> {
            let meant = match &self.userinfo {
                Userinfo::None => vec![],
                Userinfo::UserOnly(s) | Userinfo::Token(s) => vec![s.clone()],
                Userinfo::UserPassword { password, .. } => vec![password.clone()],
            };
            let written = meant.iter().map(|s| self.written(s));
            meant.iter().cloned().chain(written).collect()
        }

        fn written(&self, secret: &str) -> String {
            if self.encoded {
                encode(secret)
            } else {
                secret.to_owned()
            }
        }

        pub fn url(&self) -> String {
            let scheme = self.scheme.map(|s| format!("{s}://")).unwrap_or_default();
            let userinfo = match &self.userinfo {
                Userinfo::None => String::new(),
                Userinfo::UserOnly(s) | Userinfo::Token(s) => format!("{}@", self.written(s)),
                Userinfo::UserPassword { user, password } => {
                    format!("{user}:{}@", self.written(password))
                }
            };
            let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
            format!("{scheme}{userinfo}{}{port}", self.host)
        }

        /// What the redacted form must be: scheme as given, `***@` for any userinfo, the host,
        /// and the port the client dials.
        pub fn redacted(&self) -> String {
            let scheme = self.scheme.map(|s| format!("{s}://")).unwrap_or_default();
            let userinfo = if matches!(self.userinfo, Userinfo::None) {
                ""
            } else {
                "***@"
            };
            let port = self.port.unwrap_or(match self.scheme {
                Some("ws") => 80,
                Some("wss") => 443,
                _ => 4222,
            });
            format!("{scheme}{userinfo}{}:{port}", self.host)
        }
    }

    /// Secrets: base64 characters and every character with a meaning in a URL.
    pub fn secret() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9+/=@%:?#\\[\\] ]{4,24}",
            "[/@%:?#]{4,12}",
            "[A-Za-z0-9+/]{8,40}={0,2}",
        ]
    }

    fn user() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_]{3,8}"
    }

    pub fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z][a-z0-9]{0,8}(\\.[a-z][a-z0-9]{0,6}){0,2}",
            any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])),
            Just("[::1]".to_owned()),
            Just("[2001:db8::42]".to_owned()),
            Just("[fe80::1:2]".to_owned()),
        ]
    }

    fn userinfo() -> impl Strategy<Value = Userinfo> {
        prop_oneof![
            Just(Userinfo::None),
            user().prop_map(Userinfo::UserOnly),
            (user(), secret())
                .prop_map(|(user, password)| Userinfo::UserPassword { user, password }),
            secret().prop_map(Userinfo::Token),
        ]
    }

    pub fn shape_on(
        host: BoxedStrategy<String>,
        port: BoxedStrategy<Option<u16>>,
    ) -> impl Strategy<Value = Shape> {
        (
            prop_oneof![
                Just(None),
                Just(Some("nats")),
                Just(Some("tls")),
                Just(Some("ws")),
                Just(Some("wss")),
            ],
            userinfo(),
            any::<bool>(),
            host,
            port,
        )
            .prop_map(|(scheme, userinfo, encoded, host, port)| Shape {
                scheme,
                userinfo,
                encoded,
                host,
                port,
            })
            // Documented ambiguity: without a scheme, a raw token holding `://` reads as one.
            .prop_filter("scheme-less raw token with ://", |s| {
                s.scheme.is_some()
                    || s.encoded
                    || !s.url().split('@').next().unwrap_or("").contains("://")
            })
    }

    pub fn shape() -> impl Strategy<Value = Shape> {
        shape_on(host().boxed(), proptest::option::of(1..=u16::MAX).boxed())
    }

    /// Panics naming the window when a 4-character piece of a secret shows in `text` without
    /// also showing in `baseline` (the same output from URLs without secrets).
    pub fn assert_no_window(text: &str, baseline: &str, secrets: &[String]) {
        for secret in secrets {
            let chars: Vec<char> = secret.chars().collect();
            for window in chars.windows(4) {
                let window: String = window.iter().collect();
                assert!(
                    !text.contains(&window) || baseline.contains(&window),
                    "secret piece {window:?} of {secret:?} shows in: {text}"
                );
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Redaction is exact: `scheme://***@host:port`, whatever the secret holds and however it is
    /// written; the config's `Debug` is the one it would have without secrets.
    #[test]
    fn no_url_secret_survives_redaction_or_debug(
        shapes in proptest::collection::vec(url_shapes::shape(), 1..=3),
    ) {
        // Equality with a form built without the secrets is stronger than searching for them:
        // no piece of a secret can show, and host and port survive.
        for s in &shapes {
            proptest::prop_assert_eq!(sink_nats::redact_url(&s.url()), s.redacted(), "url {:?}", s.url());
        }
        let urls: Vec<String> = shapes.iter().map(url_shapes::Shape::url).collect();
        let redacted: Vec<String> = shapes.iter().map(url_shapes::Shape::redacted).collect();
        let config = JetStreamSink::builder(urls.join(",")).config().clone();
        let baseline = JetStreamSink::builder(redacted.join(",")).config().clone();
        proptest::prop_assert_eq!(format!("{config:?}"), format!("{baseline:?}"));
    }
}

/// A failed connect (nothing listens on the port) with secrets of every shape in the URLs: the
/// error's `Display` and `Debug` name the redacted servers and show no piece of a secret, nor do
/// the logs. Few cases: each one connects.
#[test]
fn a_failed_connect_shows_no_url_secret() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let _ = captured_logs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let port = closed_port();
    let hosts = prop_oneof![
        Just("127.0.0.1".to_owned()),
        Just("localhost".to_owned()),
        Just("[::1]".to_owned()),
    ];
    let strategy = proptest::collection::vec(
        url_shapes::shape_on(hosts.boxed(), Just(Some(port)).boxed()),
        1..=3,
    );
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    let connect = |urls: Vec<String>| {
        rt.block_on(async {
            let connecting = builder(&urls.join(",")).connect();
            tokio::time::timeout(Duration::from_secs(30), connecting)
                .await
                .expect("I5: a refused connect fails within its bound")
                .expect_err("nothing listens on the port")
        })
    };
    let long_secrets = std::sync::Mutex::new(Vec::new());
    let result = runner.run(&strategy, |shapes| {
        let secrets: Vec<String> = shapes.iter().flat_map(|s| s.secrets()).collect();
        let err = connect(shapes.iter().map(url_shapes::Shape::url).collect());
        let baseline = connect(shapes.iter().map(url_shapes::Shape::redacted).collect());
        let redacted: Vec<String> = shapes.iter().map(url_shapes::Shape::redacted).collect();
        match &err {
            StartError::Connect { servers, .. } => {
                prop_assert_eq!(servers, &redacted.join(","))
            }
            // A raw `:` first in a token reads as `:password` without a user.
            StartError::Config { field, problem } => {
                prop_assert_eq!(*field, "servers");
                prop_assert!(problem.contains("no user name"), "{}", problem);
            }
            other => prop_assert!(false, "unexpected error {other:?}"),
        }
        for (text, base) in [
            (format!("{err}"), format!("{baseline}")),
            (format!("{err:?}"), format!("{baseline:?}")),
        ] {
            url_shapes::assert_no_window(&text, &base, &secrets);
        }
        long_secrets
            .lock()
            .unwrap()
            .extend(secrets.into_iter().filter(|s| s.len() >= 8));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The logs hold every test's output: only secrets long enough not to occur by chance.
    let logs = logs_text();
    for s in long_secrets.lock().unwrap().iter() {
        assert!(!logs.contains(s.as_str()), "secret {s:?} shows in the logs");
    }
}

/// Credentials whose password holds `/`, `@`, `%`, `:` and `?`, written percent-encoded and raw:
/// correct ones authenticate and deliver, wrong ones give an authorization error; no form of
/// either shows in errors, `Debug` or logs.
async fn url_credentials_with_reserved_characters(version: ServerVersion) {
    let _ = captured_logs();
    let mut shown = Shown::default();
    let unique = secret("pw");
    let password = format!("p/a@s%s:w?{unique}");
    let wrong = format!("w/r@o%n:g?{unique}");
    let server = server_with(
        version,
        ServerAuth::UserPassword {
            user: "svc".into(),
            password: password.clone(),
        },
    )
    .await;
    let port = server.port();
    let encoded = |pw: &str| format!("nats://svc:{}@127.0.0.1:{port}", url_shapes::encode(pw));
    let raw = |pw: &str| format!("nats://svc:{pw}@127.0.0.1:{port}");
    for url in [encoded(&wrong), raw(&wrong)] {
        expect_auth_error(builder(&url), &mut shown, "wrong password with / @ % : ?").await;
    }
    for url in [encoded(&password), raw(&password)] {
        let sink = run_ok(builder(&url), &mut shown).await;
        shown.debug(&sink.close(Duration::from_secs(5)).await);
    }
    let secrets = [
        password.clone(),
        url_shapes::encode(&password),
        wrong.clone(),
        url_shapes::encode(&wrong),
        unique,
    ];
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    shown.assert_free_of(&secrets);
    for line in logs_text().lines() {
        for s in &secrets {
            assert!(!line.contains(s), "a secret leaked into a log line: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_passwords_with_reserved_characters_authenticate_and_never_show_on_2_9() {
    url_credentials_with_reserved_characters(ServerVersion::V2_9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_passwords_with_reserved_characters_authenticate_and_never_show_on_2_15() {
    url_credentials_with_reserved_characters(ServerVersion::V2_15).await;
}
