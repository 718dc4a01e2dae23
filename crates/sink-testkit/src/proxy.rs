//! Loopback TCP fault proxy: sits between a client and a server and injects latency, blackholes,
//! resets, refused connections and mid-frame cuts on command.
//!
//! Each accepted connection runs one task holding both sockets: per direction a reader stamps every
//! chunk with its due time and a writer delivers chunks in order once they are due, so latency never
//! reorders bytes and does not throttle throughput. Faults are applied by the writer at delivery
//! time, so a mode change also affects bytes already read but not yet delivered.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Size of one read from either socket.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks buffered per direction between reader and writer (bounds memory under latency).
const CHUNKS_IN_FLIGHT: usize = 256;

/// A direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes the client sends to the server.
    ClientToServer,
    /// Bytes the server sends to the client.
    ServerToClient,
    /// Both directions.
    Both,
}

impl Direction {
    /// Whether a fault aimed at `self` applies to traffic flowing in `flow`.
    fn covers(self, flow: Direction) -> bool {
        self == Direction::Both || self == flow
    }
}

/// How the proxy treats traffic and new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyMode {
    /// Forward everything (after the configured latency).
    #[default]
    PassThrough,
    /// Read and discard bytes flowing in the given direction. The connection stays open and the
    /// sender's writes keep succeeding, with no reset: this is how a dead network looks.
    Blackhole(Direction),
    /// Accept new connections and close them at once; live connections are untouched.
    RefuseNew,
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Bytes delivered from clients to the server.
    pub bytes_up: u64,
    /// Bytes delivered from the server to clients.
    pub bytes_down: u64,
    /// Bytes swallowed by a blackhole or dropped after a cut, either direction.
    pub bytes_discarded: u64,
    /// Connections accepted and forwarded to the upstream.
    pub accepted: u64,
    /// Connections accepted and closed at once because of [`ProxyMode::RefuseNew`] or because the
    /// upstream could not be reached.
    pub refused: u64,
    /// Connections closed abruptly by [`FaultProxy::reset_all`] (or a storm).
    pub resets: u64,
    /// Connections closed by a [`FaultProxy::cut_after`] budget running out.
    pub cuts: u64,
}

impl fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "up {} B, down {} B, discarded {} B, accepted {}, refused {}, resets {}, cuts {}",
            self.bytes_up,
            self.bytes_down,
            self.bytes_discarded,
            self.accepted,
            self.refused,
            self.resets,
            self.cuts
        )
    }
}

/// A pending [`FaultProxy::cut_after`] budget.
#[derive(Debug, Clone, Copy)]
struct CutPlan {
    direction: Direction,
    remaining: u64,
}

/// State shared by the handle, the listener and every connection.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    mode: Mutex<ProxyMode>,
    latency_nanos: AtomicU64,
    cut: Mutex<Option<CutPlan>>,
    /// Bumped by `reset_all`; every connection resets when it changes.
    reset_epoch: watch::Sender<u64>,
    live: AtomicUsize,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    bytes_discarded: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    resets: AtomicU64,
    cuts: AtomicU64,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the state stays valid:
/// every critical section is a single assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *lock(&self.mode)
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    fn delivered(&self, flow: Direction) -> &AtomicU64 {
        match flow {
            Direction::ServerToClient => &self.bytes_down,
            _ => &self.bytes_up,
        }
    }
}

/// A loopback TCP proxy that injects network faults between a client and a server.
///
/// Dropping it stops the listener and resets every live connection.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use sink_testkit::proxy::{Direction, FaultProxy, ProxyMode};
/// let proxy = FaultProxy::start("127.0.0.1:4222").await?;
/// let url = proxy.url(); // connect the client under test here
/// proxy.set_mode(ProxyMode::Blackhole(Direction::Both)); // the network dies silently
/// proxy.set_mode(ProxyMode::PassThrough);
/// proxy.reset_all(); // every connection gets a TCP reset
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy listening on `127.0.0.1:0` that forwards to `upstream` (a socket address or a
    /// `"host:port"` string, without a `nats://` scheme), resolved once, now.
    pub async fn start<A: ToSocketAddrs>(upstream: A) -> std::io::Result<FaultProxy> {
        let upstream = tokio::net::lookup_host(upstream)
            .await?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the proxy upstream resolved to no address; pass \"127.0.0.1:PORT\"",
                )
            })?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (reset_epoch, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(ProxyMode::PassThrough),
            latency_nanos: AtomicU64::new(0),
            cut: Mutex::new(None),
            reset_epoch,
            live: AtomicUsize::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            bytes_discarded: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
        });
        let listener = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(FaultProxy {
            addr,
            shared,
            listener,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy address as a NATS URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Switches the mode. Applies at once to live connections (including bytes already read but
    /// not yet delivered because of latency) and to new ones.
    pub fn set_mode(&self, mode: ProxyMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        self.shared.mode()
    }

    /// Delays every chunk by `latency` in both directions, without reordering. Applies to chunks
    /// read from now on.
    pub fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.shared.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Closes every live connection abruptly: both sockets get `SO_LINGER` 0, so the client and
    /// the server each see a TCP reset.
    pub fn reset_all(&self) {
        self.shared.reset_epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Lets the next `bytes` bytes flowing in `direction` pass (counted across all connections;
    /// with [`Direction::Both`] both directions draw on one budget), then closes the connection
    /// that used the last byte, mid-frame: the receiver gets exactly those bytes followed by
    /// end-of-stream. With `bytes == 0` the next chunk in that direction triggers the cut and none
    /// of it passes. Replaces any pending cut.
    pub fn cut_after(&self, bytes: u64, direction: Direction) {
        *lock(&self.shared.cut) = Some(CutPlan {
            direction,
            remaining: bytes,
        });
    }

    /// Whether a [`FaultProxy::cut_after`] budget is still pending.
    pub fn cut_pending(&self) -> bool {
        lock(&self.shared.cut).is_some()
    }

    /// Number of live proxied connections.
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Counters since start.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            bytes_up: s.bytes_up.load(Ordering::SeqCst),
            bytes_down: s.bytes_down.load(Ordering::SeqCst),
            bytes_discarded: s.bytes_discarded.load(Ordering::SeqCst),
            accepted: s.accepted.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            resets: s.resets.load(Ordering::SeqCst),
            cuts: s.cuts.load(Ordering::SeqCst),
        }
    }

    /// Calls [`FaultProxy::reset_all`] every `every` until `total` has passed (the first reset
    /// comes after one `every`). Returns when the storm is over.
    pub async fn reconnect_storm(&self, every: Duration, total: Duration) {
        let end = Instant::now() + total;
        let mut next = Instant::now() + every;
        while next <= end {
            tokio::time::sleep_until(next).await;
            self.reset_all();
            next += every;
        }
        tokio::time::sleep_until(end).await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Transient accept errors (EMFILE, ECONNABORTED) must not kill the proxy.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.mode() == ProxyMode::RefuseNew {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        // Subscribe before spawning so a reset or a drop right after accept is not missed.
        let reset = shared.reset_epoch.subscribe();
        tokio::spawn(run_connection(client, Arc::clone(&shared), reset));
    }
}

/// Decrements the live count when a connection ends, however it ends.
struct LiveGuard<'a>(&'a AtomicUsize);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a connection ended before both directions finished cleanly.
#[derive(Debug)]
enum End {
    /// An IO error on either socket: propagate it as a reset to the other peer.
    Broken,
    /// A cut budget ran out; the receiving side was already shut down after the allowed bytes.
    Cut,
}

/// One chunk on its way through the delay line; `None` data means end of stream.
struct Chunk {
    due: Instant,
    data: Option<Bytes>,
}

async fn run_connection(
    mut client: TcpStream,
    shared: Arc<Shared>,
    mut reset: watch::Receiver<u64>,
) {
    let upstream = tokio::select! {
        conn = TcpStream::connect(shared.upstream) => conn,
        _ = reset.changed() => return,
    };
    let Ok(mut server) = upstream else {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_zero_linger();
        return;
    };
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    shared.live.fetch_add(1, Ordering::SeqCst);
    let _live = LiveGuard(&shared.live);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let outcome = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let (up_tx, up_rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let (down_tx, down_rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let pumps = async {
            tokio::try_join!(
                read_side(client_read, up_tx, &shared),
                write_side(up_rx, server_write, Direction::ClientToServer, &shared),
                read_side(server_read, down_tx, &shared),
                write_side(down_rx, client_write, Direction::ServerToClient, &shared),
            )
        };
        tokio::select! {
            result = pumps => result.map(|_| ()).map_err(Some),
            _ = reset.changed() => Err(None),
        }
    };
    match outcome {
        Ok(()) => {}
        Err(None) => {
            shared.resets.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
        Err(Some(End::Broken)) => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
        Err(Some(End::Cut)) => {
            shared.cuts.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn read_side(
    mut from: ReadHalf<'_>,
    to: mpsc::Sender<Chunk>,
    shared: &Shared,
) -> Result<(), End> {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| End::Broken)?;
        let due = Instant::now() + shared.latency();
        let data = (n > 0).then(|| Bytes::copy_from_slice(&buf[..n]));
        let eof = data.is_none();
        if to.send(Chunk { due, data }).await.is_err() {
            // The writer ended (cut or error); its result decides the outcome.
            return Ok(());
        }
        if eof {
            return Ok(());
        }
    }
}

async fn write_side(
    mut from: mpsc::Receiver<Chunk>,
    mut to: WriteHalf<'_>,
    flow: Direction,
    shared: &Shared,
) -> Result<(), End> {
    while let Some(Chunk { due, data }) = from.recv().await {
        tokio::time::sleep_until(due).await;
        let blackholed = matches!(shared.mode(), ProxyMode::Blackhole(d) if d.covers(flow));
        let Some(data) = data else {
            // A dead network does not carry the FIN either.
            if !blackholed {
                to.shutdown().await.map_err(|_| End::Broken)?;
            }
            return Ok(());
        };
        let len = data.len() as u64;
        if blackholed {
            shared.bytes_discarded.fetch_add(len, Ordering::SeqCst);
            continue;
        }
        let (pass, cut) = {
            let mut plan = lock(&shared.cut);
            match *plan {
                Some(ref mut p) if p.direction.covers(flow) => {
                    let pass = p.remaining.min(len);
                    p.remaining -= pass;
                    let cut = p.remaining == 0;
                    if cut {
                        *plan = None;
                    }
                    (pass, cut)
                }
                _ => (len, false),
            }
        };
        let pass_bytes = usize::try_from(pass).unwrap_or(data.len());
        to.write_all(&data[..pass_bytes])
            .await
            .map_err(|_| End::Broken)?;
        shared.delivered(flow).fetch_add(pass, Ordering::SeqCst);
        if cut {
            shared
                .bytes_discarded
                .fetch_add(len - pass, Ordering::SeqCst);
            // FIN right after the allowed bytes, so the receiver sees exactly them, then EOF.
            let _ = to.shutdown().await;
            return Err(End::Cut);
        }
    }
    Ok(())
}
