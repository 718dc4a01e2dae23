//! Behaviour of the real nats-server harness on both supported releases: kill -9 and restart keep
//! the store, SIGSTOP stalls requests, lame duck exits, auth and TLS work, drop cleans up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectErrorKind, ConnectOptions};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use sink_testkit::server::generate_user_nkey;
use sink_testkit::{tls, HarnessError, NatsServer, ServerAuth, ServerOptions, ServerVersion};

fn process_exists(pid: u32) -> bool {
    // Signal 0 checks existence without delivering anything.
    kill(Pid::from_raw(i32::try_from(pid).expect("pid fits")), None).is_ok()
}

async fn create_stream(js: &jetstream::Context, name: &str) {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream");
}

#[tokio::test]
async fn killed_server_restarts_on_same_port_and_keeps_stored_messages() {
    for version in ServerVersion::all() {
        let mut server = NatsServer::start(ServerOptions::version(version))
            .await
            .expect("start");
        assert_ne!(server.port(), 4222);
        assert!(server.url().starts_with("nats://127.0.0.1:"));
        assert_eq!(server.version(), version);
        let port = server.port();
        let store = server.store_dir().to_path_buf();

        let js = jetstream::new(server.connect().await.expect("connect"));
        create_stream(&js, "KEEP").await;
        for i in 0..20u32 {
            js.publish(format!("KEEP.{i}"), i.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
        drop(js);

        let pid = server.pid().expect("running");
        server.kill().await.expect("kill");
        assert_eq!(server.pid(), None);
        assert!(!process_exists(pid), "{version}: pid {pid} still exists");
        assert!(
            server.connect().await.is_err(),
            "{version}: a killed server must refuse clients"
        );

        server.restart().await.expect("restart");
        assert_eq!(server.port(), port);
        assert_eq!(server.store_dir(), store);
        assert_ne!(server.pid(), Some(pid));

        let js = jetstream::new(server.connect().await.expect("reconnect"));
        let mut keep = js.get_stream("KEEP").await.expect("stream survives");
        let info = keep.info().await.expect("info");
        assert_eq!(info.state.messages, 20, "{version}");
        let last = keep
            .get_last_raw_message_by_subject("KEEP.19")
            .await
            .expect("last");
        assert_eq!(&last.payload[..], b"19");
    }
}

#[tokio::test]
async fn paused_server_stalls_requests_until_resumed() {
    for version in ServerVersion::all() {
        let server = NatsServer::start(ServerOptions::version(version))
            .await
            .expect("start");
        let mut js = jetstream::new(server.connect().await.expect("connect"));
        js.set_timeout(Duration::from_millis(500));
        create_stream(&js, "PAUSE").await;
        let publish = |n: u32| {
            let js = js.clone();
            async move {
                js.publish(format!("PAUSE.{n}"), n.to_string().into())
                    .await
                    .expect("queue publish")
                    .await
            }
        };
        publish(0).await.expect("ack before pause");

        server.pause().expect("pause");
        let started = Instant::now();
        let stalled = publish(1).await.expect_err("a paused server acked");
        assert_eq!(
            stalled.kind(),
            jetstream::context::PublishErrorKind::TimedOut,
            "{version}: {stalled}"
        );
        assert!(started.elapsed() >= Duration::from_millis(400));

        server.resume().expect("resume");
        let ack = publish(2).await.expect("ack after resume");
        assert_eq!(ack.stream, "PAUSE");
        // The stalled publish reached the server before the pause took hold or after it
        // ended; either way the stream holds 2 or 3 messages, never fewer.
        let mut stream = js.get_stream("PAUSE").await.expect("stream");
        let stored = stream.info().await.expect("info").state.messages;
        assert!((2..=3).contains(&stored), "{version}: {stored} stored");
    }
}

#[tokio::test]
async fn lame_duck_server_exits_within_its_lame_duck_duration() {
    for version in ServerVersion::all() {
        let mut server = NatsServer::start(ServerOptions {
            lame_duck_duration: Some(Duration::from_secs(30)),
            // The grace period (default 10 s) delays closing clients; keep the test short.
            extra_config: "lame_duck_grace_period: \"1s\"\n".to_owned(),
            ..ServerOptions::version(version)
        })
        .await
        .expect("start");
        let notified = Arc::new(AtomicBool::new(false));
        let seen = notified.clone();
        let client = server
            .connect_options()
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if matches!(event, async_nats::Event::LameDuckMode) {
                        seen.store(true, Ordering::SeqCst);
                    }
                }
            })
            .connect(server.url())
            .await
            .expect("connect");

        let started = Instant::now();
        server.lame_duck().await.expect("lame duck");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "returns at once"
        );
        server
            .wait_exit(Duration::from_secs(31))
            .await
            .expect("exits within the lame duck duration");
        assert_eq!(server.pid(), None);
        assert!(
            notified.load(Ordering::SeqCst),
            "{version}: the client was not told about lame duck mode"
        );
        drop(client);
    }
}

async fn assert_authorization_violation(url: &str, options: ConnectOptions, what: &str) {
    let err = options
        .connection_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .err()
        .unwrap_or_else(|| panic!("{what}: connected with wrong credentials"));
    assert_eq!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{what}: {err}"
    );
}

async fn assert_works(client: async_nats::Client) {
    sink_testkit::server::jetstream_answers(&client)
        .await
        .expect("JetStream answers an authorized client");
}

#[tokio::test]
async fn token_and_user_password_auth_reject_wrong_credentials() {
    for version in ServerVersion::all() {
        let server = NatsServer::start(ServerOptions {
            auth: ServerAuth::Token("s3cret-token".to_owned()),
            ..ServerOptions::version(version)
        })
        .await
        .expect("start with token");
        let url = server.url();
        assert_authorization_violation(&url, ConnectOptions::new(), "no token").await;
        assert_authorization_violation(
            &url,
            ConnectOptions::new().token("wrong".to_owned()),
            "wrong token",
        )
        .await;
        let client = ConnectOptions::new()
            .token("s3cret-token".to_owned())
            .connect(&url)
            .await
            .expect("right token connects");
        assert_works(client).await;
        assert_works(server.connect().await.expect("harness connect")).await;

        let server = NatsServer::start(ServerOptions {
            auth: ServerAuth::UserPassword {
                user: "alice".to_owned(),
                password: "correct horse".to_owned(),
            },
            ..ServerOptions::version(version)
        })
        .await
        .expect("start with user/password");
        let url = server.url();
        assert_authorization_violation(
            &url,
            ConnectOptions::new().user_and_password("alice".to_owned(), "wrong".to_owned()),
            "wrong password",
        )
        .await;
        assert_authorization_violation(
            &url,
            ConnectOptions::new().user_and_password("bob".to_owned(), "correct horse".to_owned()),
            "wrong user",
        )
        .await;
        let client = ConnectOptions::new()
            .user_and_password("alice".to_owned(), "correct horse".to_owned())
            .connect(&url)
            .await
            .expect("right password connects");
        assert_works(client).await;
    }
}

#[tokio::test]
async fn nkey_auth_accepts_only_the_configured_key() {
    for version in ServerVersion::all() {
        let (seed, public_key) = generate_user_nkey();
        assert!(public_key.starts_with('U'));
        assert!(seed.starts_with("SU"));
        let server = NatsServer::start(ServerOptions {
            auth: ServerAuth::Nkey { public_key },
            ..ServerOptions::version(version)
        })
        .await
        .expect("start with nkey");
        let url = server.url();
        let (other_seed, _) = generate_user_nkey();
        assert_authorization_violation(
            &url,
            ConnectOptions::new().nkey(other_seed),
            "unknown nkey",
        )
        .await;
        assert_authorization_violation(&url, ConnectOptions::new(), "no nkey").await;
        let client = ConnectOptions::new()
            .nkey(seed)
            .connect(&url)
            .await
            .expect("configured nkey connects");
        assert_works(client).await;
    }
}

#[tokio::test]
async fn tls_and_mutual_tls_need_the_generated_ca_and_client_cert() {
    let files = tls::generate().expect("generate TLS files");
    for version in ServerVersion::all() {
        let server = NatsServer::start(ServerOptions {
            tls: Some(files.clone()),
            ..ServerOptions::version(version)
        })
        .await
        .expect("start with TLS");
        let url = server.url();
        assert!(url.starts_with("tls://127.0.0.1:"), "{url}");
        let client = ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(files.ca_cert.clone())
            .connect(&url)
            .await
            .expect("TLS with the generated CA connects");
        assert_works(client).await;
        let untrusted = ConnectOptions::new()
            .require_tls(true)
            .connection_timeout(Duration::from_secs(2))
            .connect(&url)
            .await;
        assert!(
            untrusted.is_err(),
            "{version}: a client without the CA must not trust the server"
        );

        let server = NatsServer::start(ServerOptions {
            tls: Some(files.clone()),
            require_client_cert: true,
            ..ServerOptions::version(version)
        })
        .await
        .expect("start with mTLS");
        let url = server.url();
        let client = ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(files.ca_cert.clone())
            .add_client_certificate(files.client_cert.clone(), files.client_key.clone())
            .connect(&url)
            .await
            .expect("mTLS with the client certificate connects");
        assert_works(client).await;
        let anonymous = ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(files.ca_cert.clone())
            .connection_timeout(Duration::from_secs(2))
            .connect(&url)
            .await;
        assert!(
            anonymous.is_err(),
            "{version}: mTLS accepted a client without a certificate"
        );
    }
}

#[tokio::test]
async fn dropping_the_handle_kills_the_process_and_removes_its_files() {
    for version in ServerVersion::all() {
        let server = NatsServer::start(ServerOptions::version(version))
            .await
            .expect("start");
        let pid = server.pid().expect("running");
        let store = server.store_dir().to_path_buf();
        assert!(process_exists(pid));
        assert!(store.exists());
        server
            .pause()
            .expect("a paused server must die on drop as well");
        drop(server);
        assert!(!process_exists(pid), "{version}: pid {pid} survived drop");
        assert!(!store.exists(), "{version}: store dir left behind");
    }
}

#[tokio::test]
async fn a_panicking_test_still_kills_its_server() {
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let server = NatsServer::start(ServerOptions::version(ServerVersion::V2_15))
            .await
            .expect("start");
        pid_tx
            .send(server.pid().expect("running"))
            .expect("send pid");
        panic!("simulated test failure while the server runs");
    });
    let outcome = task.await;
    assert!(outcome.is_err_and(|e| e.is_panic()), "the task must panic");
    let pid = pid_rx.await.expect("pid sent before the panic");
    assert!(!process_exists(pid), "pid {pid} survived the panic");
}

#[tokio::test]
async fn bad_config_fails_fast_with_the_log_tail() {
    let started = Instant::now();
    let err = NatsServer::start(ServerOptions {
        extra_config: "max_payload: \"not a size\"\n".to_owned(),
        ..ServerOptions::version(ServerVersion::V2_9)
    })
    .await
    .expect_err("an invalid config cannot start");
    assert!(started.elapsed() < Duration::from_secs(5));
    match &err {
        HarnessError::ExitedEarly { log_tail, log, .. } => {
            let conf = log.with_file_name("nats.conf");
            assert!(
                log_tail.contains(&*conf.to_string_lossy()),
                "the tail names the config error: {log_tail}"
            )
        }
        other => panic!("expected ExitedEarly, got {other}"),
    }
    assert!(err.to_string().contains("nats.conf:"), "{err}");
}

#[tokio::test]
async fn server_options_limits_reach_the_server() {
    for version in ServerVersion::all() {
        let server = NatsServer::start(ServerOptions {
            max_payload: Some(4096),
            jetstream_max_file: Some(64 * 1024 * 1024),
            jetstream_max_mem: Some(8 * 1024 * 1024),
            ..ServerOptions::version(version)
        })
        .await
        .expect("start");
        let client = server.connect().await.expect("connect");
        assert_eq!(client.server_info().max_payload, 4096, "{version}");
        let js = jetstream::new(client);
        for (storage, limit) in [
            (stream::StorageType::File, 64 * 1024 * 1024),
            (stream::StorageType::Memory, 8 * 1024 * 1024),
        ] {
            let config = |name: &str, max_bytes: i64| stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{name}.>")],
                storage,
                max_bytes,
                ..Default::default()
            };
            let over = js.create_stream(config("OVER", 2 * limit)).await;
            assert!(
                over.is_err(),
                "{version}: a {storage:?} stream above the server limit was created"
            );
            js.create_stream(config("UNDER", limit / 2))
                .await
                .expect("a stream within the limit");
            js.delete_stream("UNDER").await.expect("delete");
        }
    }
}

/// The stream ingest-queue limits land inside the `jetstream` block (next to `store_dir`, which a
/// second block would drop); 2.15 takes them, 2.9 does not know them and refuses to start.
#[tokio::test]
async fn ingest_queue_limits_reach_2_15_and_are_refused_by_2_9() {
    let options = |version| ServerOptions {
        jetstream_max_buffered_msgs: Some(8),
        jetstream_max_buffered_size: Some(1024 * 1024),
        ..ServerOptions::version(version)
    };
    let server = NatsServer::start(options(ServerVersion::V2_15))
        .await
        .expect("2.15 accepts the ingest-queue limits");
    let config = std::fs::read_to_string(server.config_path()).expect("config file");
    let block = config
        .split_once("jetstream {")
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(block, _)| block)
        .expect("a jetstream block");
    assert!(block.contains("store_dir:"), "{config}");
    assert!(block.contains("max_buffered_msgs: 8"), "{config}");
    assert!(block.contains("max_buffered_size: 1048576"), "{config}");
    jetstream::new(server.connect().await.expect("connect"))
        .create_stream(stream::Config {
            name: "LIMITED".to_owned(),
            subjects: vec!["limited.>".to_owned()],
            ..Default::default()
        })
        .await
        .expect("JetStream works with the limits");

    match NatsServer::start(options(ServerVersion::V2_9)).await {
        Err(HarnessError::ExitedEarly { log_tail, .. }) => assert!(
            log_tail.contains("max_buffered_msgs"),
            "2.9 names the unknown field: {log_tail}"
        ),
        other => panic!("2.9 must refuse max_buffered_msgs, got {other:?}"),
    }
}
