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
