//! Behaviour of the loopback fault proxy: against a tiny tokio echo server, then against real
//! nats-server 2.9 and 2.15 with an async-nats client connected through it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sink_testkit::proxy::{Direction, FaultProxy, ProxyMode};
use sink_testkit::{NatsServer, ServerOptions, ServerVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

/// An echo server that counts every byte it receives.
struct Echo {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            counter.fetch_add(n as u64, Ordering::SeqCst);
                            if sock.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Echo {
        addr,
        received,
        task,
    }
}

async fn read_exact_within(sock: &mut TcpStream, n: usize, within: Duration) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(within, sock.read_exact(&mut buf))
        .await
        .expect("reply did not arrive in time")
        .expect("read failed");
    buf
}

/// Waits until `cond` holds, polling, or panics after `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads until EOF or error; returns the bytes read before it and whether it ended within `within`.
async fn read_to_end_within(sock: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, sock.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn pass_through_echoes_in_order() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    assert!(proxy.url().starts_with("nats://127.0.0.1:"));
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = client.split();
    let (_, got) = tokio::join!(async { w.write_all(&payload).await.unwrap() }, async {
        let mut got = vec![0u8; payload.len()];
        timeout(Duration::from_secs(5), r.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        got
    });
    assert_eq!(got, payload);
    assert_eq!(proxy.connections(), 1);
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.bytes_up, payload.len() as u64);
    assert_eq!(stats.bytes_down, payload.len() as u64);
    drop(client);
    eventually(Duration::from_secs(2), "connection closed", || {
        proxy.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn latency_delays_each_chunk_without_reordering() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    // Warm the connection so connect time is not measured.
    client.write_all(b"x").await.unwrap();
    read_exact_within(&mut client, 1, Duration::from_secs(2)).await;

    proxy.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    client.write_all(b"hello").await.unwrap();
    let got = read_exact_within(&mut client, 5, Duration::from_secs(3)).await;
    let rtt = started.elapsed();
    assert_eq!(got, b"hello");
    // 150 ms each way.
    assert!(rtt >= Duration::from_millis(300), "round trip {rtt:?}");
    assert!(rtt < Duration::from_millis(1500), "round trip {rtt:?}");

    // Many small writes while delayed still come back in order.
    let mut sent = Vec::new();
    for i in 0..50u8 {
        client.write_all(&[i]).await.unwrap();
        sent.push(i);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let got = read_exact_within(&mut client, sent.len(), Duration::from_secs(3)).await;
    assert_eq!(got, sent);

    proxy.set_latency(Duration::ZERO);
    let started = Instant::now();
    client.write_all(b"fast").await.unwrap();
    read_exact_within(&mut client, 4, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn blackhole_one_direction_stops_replies_but_keeps_the_connection() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    read_exact_within(&mut client, 4, Duration::from_secs(2)).await;

    proxy.set_mode(ProxyMode::Blackhole(Direction::ServerToClient));
    client.write_all(b"lost").await.unwrap();
    // The server still gets the bytes (only replies vanish).
    eventually(Duration::from_secs(2), "server received", || {
        echo.received.load(Ordering::SeqCst) == 8
    })
    .await;
    let mut buf = [0u8; 16];
    let read = timeout(Duration::from_millis(300), client.read(&mut buf)).await;
    assert!(read.is_err(), "expected silence, got {read:?}");
    // Writes keep succeeding: no reset, the connection stays open.
    for _ in 0..10 {
        client.write_all(b"more").await.unwrap();
    }
    assert_eq!(proxy.connections(), 1);
    eventually(Duration::from_secs(2), "discarded counted", || {
        proxy.stats().bytes_discarded == 44
    })
    .await;

    proxy.set_mode(ProxyMode::PassThrough);
    client.write_all(b"back").await.unwrap();
    let got = read_exact_within(&mut client, 4, Duration::from_secs(2)).await;
    assert_eq!(got, b"back");
}

#[tokio::test]
async fn blackhole_client_to_server_swallows_requests() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    read_exact_within(&mut client, 4, Duration::from_secs(2)).await;
    proxy.set_mode(ProxyMode::Blackhole(Direction::ClientToServer));
    client.write_all(b"gone").await.unwrap();
    let mut buf = [0u8; 16];
    assert!(timeout(Duration::from_millis(300), client.read(&mut buf))
        .await
        .is_err());
    assert_eq!(echo.received.load(Ordering::SeqCst), 4);
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test]
async fn reset_all_drops_every_connection_quickly() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    for sock in [&mut a, &mut b] {
        sock.write_all(b"hi").await.unwrap();
        read_exact_within(sock, 2, Duration::from_secs(2)).await;
    }
    assert_eq!(proxy.connections(), 2);
    proxy.reset_all();
    for sock in [&mut a, &mut b] {
        let ended = read_to_end_within(sock, Duration::from_millis(500)).await;
        assert_eq!(ended, Some(Vec::new()), "connection not closed");
    }
    eventually(Duration::from_secs(1), "no live connections", || {
        proxy.connections() == 0
    })
    .await;
    assert_eq!(proxy.stats().resets, 2);
    // The proxy keeps serving new connections.
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"again").await.unwrap();
    assert_eq!(
        read_exact_within(&mut c, 5, Duration::from_secs(2)).await,
        b"again"
    );
}

#[tokio::test]
async fn refuse_new_closes_new_connections_only() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
    old.write_all(b"a").await.unwrap();
    read_exact_within(&mut old, 1, Duration::from_secs(2)).await;
    proxy.set_mode(ProxyMode::RefuseNew);
    let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
    let _ = new.write_all(b"b").await;
    let ended = read_to_end_within(&mut new, Duration::from_secs(1)).await;
    assert_eq!(ended, Some(Vec::new()));
    assert_eq!(proxy.stats().refused, 1);
    old.write_all(b"c").await.unwrap();
    assert_eq!(
        read_exact_within(&mut old, 1, Duration::from_secs(2)).await,
        b"c"
    );
}

#[tokio::test]
async fn cut_after_server_to_client_delivers_exactly_n_bytes() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    client.write_all(b"warm").await.unwrap();
    read_exact_within(&mut client, 4, Duration::from_secs(2)).await;

    proxy.cut_after(10, Direction::ServerToClient);
    assert!(proxy.cut_pending());
    client.write_all(b"0123456789abcdefghij").await.unwrap();
    let got = read_to_end_within(&mut client, Duration::from_secs(2))
        .await
        .expect("connection was not cut");
    assert_eq!(got, b"0123456789");
    assert!(!proxy.cut_pending());
    assert_eq!(proxy.stats().cuts, 1);
    eventually(Duration::from_secs(1), "no live connections", || {
        proxy.connections() == 0
    })
    .await;
}

#[tokio::test]
async fn cut_after_client_to_server_spans_chunks() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.cut_after(7, Direction::ClientToServer);
    // Two writes; the cut falls inside the second one.
    client.write_all(b"abcd").await.unwrap();
    assert_eq!(
        read_exact_within(&mut client, 4, Duration::from_secs(2)).await,
        b"abcd"
    );
    client.write_all(b"efghij").await.unwrap();
    let got = read_to_end_within(&mut client, Duration::from_secs(2))
        .await
        .expect("connection was not cut");
    // The echo may or may not get its reply out before the close; never beyond the cut.
    assert!(b"efg".starts_with(&got), "got {got:?}");
    eventually(
        Duration::from_secs(1),
        "server got the allowed bytes",
        || echo.received.load(Ordering::SeqCst) == 7,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(echo.received.load(Ordering::SeqCst), 7);
    assert_eq!(proxy.stats().bytes_up, 7);
}

#[tokio::test]
async fn reconnect_storm_resets_repeatedly() {
    let echo = echo_server().await;
    let proxy = Arc::new(FaultProxy::start(echo.addr).await.unwrap());
    let storm = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            proxy
                .reconnect_storm(Duration::from_millis(100), Duration::from_millis(650))
                .await
        })
    };
    // A client that reconnects whenever it is reset and counts its connections.
    let mut sessions = 0;
    let end = Instant::now() + Duration::from_millis(900);
    while Instant::now() < end {
        let Ok(mut sock) = TcpStream::connect(proxy.addr()).await else {
            continue;
        };
        sessions += 1;
        loop {
            if sock.write_all(b"p").await.is_err() {
                break;
            }
            let mut b = [0u8; 1];
            match timeout(Duration::from_millis(200), sock.read(&mut b)).await {
                Ok(Ok(1)) => tokio::time::sleep(Duration::from_millis(5)).await,
                _ => break,
            }
            if Instant::now() >= end {
                break;
            }
        }
    }
    storm.await.unwrap();
    let resets = proxy.stats().resets;
    assert!(resets >= 4, "resets {resets}");
    assert!(sessions >= 5, "sessions {sessions}");
}

#[tokio::test]
async fn drop_stops_listener_and_connections() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let addr = proxy.addr();
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"x").await.unwrap();
    read_exact_within(&mut client, 1, Duration::from_secs(2)).await;
    drop(proxy);
    let ended = read_to_end_within(&mut client, Duration::from_secs(1)).await;
    assert_eq!(ended, Some(Vec::new()));
    // The listener task stops asynchronously; under load that can take more than a few ms.
    let deadline = Instant::now() + Duration::from_secs(3);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the proxy still accepts connections 3 s after drop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client connected to `server` through `proxy`, with its connection events on a channel.
async fn nats_through(
    server: &NatsServer,
    proxy: &FaultProxy,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = server
        .connect_options()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        })
        .connect(proxy.url())
        .await
        .expect("connect through the proxy");
    (client, rx)
}

/// Waits for an event matching `want`; returns the events skipped on the way, or None on timeout.
async fn wait_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
    within: Duration,
    want: impl Fn(&async_nats::Event) -> bool,
) -> Option<Vec<String>> {
    let end = Instant::now() + within;
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(event)) if want(&event) => return Some(skipped),
            Ok(Some(event)) => skipped.push(event.to_string()),
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn start_server(version: ServerVersion) -> (NatsServer, FaultProxy) {
    let server = NatsServer::start(ServerOptions {
        version,
        ..Default::default()
    })
    .await
    .expect("start nats-server");
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", server.port()))
        .await
        .expect("start proxy");
    (server, proxy)
}

async fn blackhole_makes_jetstream_requests_time_out(version: ServerVersion) {
    let (server, proxy) = start_server(version).await;
    let (client, mut events) = nats_through(&server, &proxy).await;
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_millis(800));
    js.create_stream(jetstream::stream::Config {
        name: "PX".to_owned(),
        subjects: vec!["px.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream through the proxy");
    assert!(proxy.stats().bytes_down > 0);

    proxy.set_mode(ProxyMode::Blackhole(Direction::Both));
    let started = Instant::now();
    let result = timeout(Duration::from_secs(5), js.get_stream("PX"))
        .await
        .expect("the JetStream request must fail on its own timeout, not hang");
    assert!(result.is_err(), "request answered through a blackhole");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(700),
        "failed after {waited:?}"
    );
    // Silence, not a reset: the client does not notice a disconnect.
    assert_eq!(proxy.connections(), 1);
    assert!(
        wait_event(&mut events, Duration::from_millis(200), |e| matches!(
            e,
            async_nats::Event::Disconnected
        ))
        .await
        .is_none(),
        "blackhole caused a disconnect"
    );
    assert!(proxy.stats().bytes_discarded > 0);

    proxy.set_mode(ProxyMode::PassThrough);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match js.get_stream("PX").await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < end, "no recovery after blackhole: {e}"),
        }
    }
}

#[tokio::test]
async fn blackhole_makes_jetstream_requests_time_out_v2_9() {
    blackhole_makes_jetstream_requests_time_out(ServerVersion::V2_9).await;
}

#[tokio::test]
async fn blackhole_makes_jetstream_requests_time_out_v2_15() {
    blackhole_makes_jetstream_requests_time_out(ServerVersion::V2_15).await;
}

async fn reset_makes_the_client_disconnect_and_reconnect(version: ServerVersion) {
    let (server, proxy) = start_server(version).await;
    let (client, mut events) = nats_through(&server, &proxy).await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "PX".to_owned(),
        subjects: vec!["px.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream through the proxy");

    proxy.reset_all();
    wait_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, async_nats::Event::Disconnected)
    })
    .await
    .expect("client did not see the reset");
    wait_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, async_nats::Event::Connected)
    })
    .await
    .expect("client did not reconnect");
    assert_eq!(proxy.stats().resets, 1);
    assert_eq!(proxy.stats().accepted, 2);
    js.get_stream("PX")
        .await
        .expect("JetStream works after reconnecting");

    // While new connections are refused, a reset leaves the client disconnected.
    proxy.set_mode(ProxyMode::RefuseNew);
    proxy.reset_all();
    wait_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, async_nats::Event::Disconnected)
    })
    .await
    .expect("client did not see the second reset");
    eventually(Duration::from_secs(5), "reconnects refused", || {
        proxy.stats().refused >= 2
    })
    .await;
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Disconnected
    );
    proxy.set_mode(ProxyMode::PassThrough);
    wait_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, async_nats::Event::Connected)
    })
    .await
    .expect("client did not reconnect once connections were accepted again");
    js.get_stream("PX")
        .await
        .expect("JetStream works after the refusal ends");
}

#[tokio::test]
async fn reset_makes_the_client_disconnect_and_reconnect_v2_9() {
    reset_makes_the_client_disconnect_and_reconnect(ServerVersion::V2_9).await;
}

#[tokio::test]
async fn reset_makes_the_client_disconnect_and_reconnect_v2_15() {
    reset_makes_the_client_disconnect_and_reconnect(ServerVersion::V2_15).await;
}

async fn cut_inside_a_frame_forces_a_reconnect(version: ServerVersion) {
    let (server, proxy) = start_server(version).await;
    let (client, mut events) = nats_through(&server, &proxy).await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "PX".to_owned(),
        subjects: vec!["px.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream through the proxy");

    let up_before = proxy.stats().bytes_up;
    // Hold reconnects back so the byte count covers only the cut connection.
    proxy.set_mode(ProxyMode::RefuseNew);
    proxy.cut_after(100, Direction::ClientToServer);
    client
        .publish("px.a", bytes::Bytes::from(vec![b'x'; 1000]))
        .await
        .expect("queue publish");
    let _ = client.flush().await;
    wait_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, async_nats::Event::Disconnected)
    })
    .await
    .expect("client did not see the cut");
    let stats = proxy.stats();
    assert_eq!(stats.cuts, 1);
    assert_eq!(stats.bytes_up, up_before + 100, "{stats}");
    assert!(!proxy.cut_pending());
    proxy.set_mode(ProxyMode::PassThrough);
    wait_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, async_nats::Event::Connected)
    })
    .await
    .expect("client did not reconnect after the cut");
    assert_eq!(proxy.stats().accepted, 2);
    // The server never stores a truncated frame: whatever is stored is the whole message.
    let mut stream = js.get_stream("PX").await.expect("get stream");
    let info = stream.info().await.expect("stream info");
    assert!(info.state.messages <= 1);
    if info.state.messages == 1 {
        let stored = stream.get_raw_message(1).await.expect("stored message");
        assert_eq!(stored.payload.len(), 1000);
    }
}

#[tokio::test]
async fn cut_inside_a_frame_forces_a_reconnect_v2_9() {
    cut_inside_a_frame_forces_a_reconnect(ServerVersion::V2_9).await;
}

#[tokio::test]
async fn cut_inside_a_frame_forces_a_reconnect_v2_15() {
    cut_inside_a_frame_forces_a_reconnect(ServerVersion::V2_15).await;
}
