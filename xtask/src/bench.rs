//! `cargo xtask bench`: release build, a private nats-server with JetStream, `jetsink bench` against it.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use crate::nats_server;

/// Outage length `jetsink bench` is given unless the caller passes `--outage-secs`.
const DEFAULT_OUTAGE_SECS: &str = "60";

/// Which server line to benchmark against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    V2_9,
    V2_15,
}

/// Command-line options of `cargo xtask bench`.
#[derive(Debug)]
pub struct Options {
    line: Line,
    /// Passed to `jetsink bench` unchanged.
    passthrough: Vec<String>,
}

impl Options {
    /// Parses the arguments after `bench`: `--server 2.9|2.15`, everything else goes to `jetsink bench`.
    pub fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut line = Line::V2_9;
        let mut passthrough = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let server = if arg == "--server" {
                Some(
                    it.next()
                        .context("`--server` needs a value: 2.9 or 2.15")?
                        .as_str(),
                )
            } else {
                arg.strip_prefix("--server=")
            };
            match server {
                Some("2.9" | "2.9.10") => line = Line::V2_9,
                Some("2.15" | "2.15.1") => line = Line::V2_15,
                Some(other) => bail!("`--server` takes 2.9 or 2.15, got `{other}`"),
                None => passthrough.push(arg.clone()),
            }
        }
        Ok(Options { line, passthrough })
    }
}

/// A nats-server child process and its store directory; killed and removed on drop, so an error
/// anywhere in the bench does not leave it running.
struct ServerChild {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Builds, starts the server, runs the bench, stops the server.
pub fn run(sh: &Shell, root: &Path, options: Options) -> anyhow::Result<()> {
    let servers = nats_server::discover(sh, root)?;
    let binary = match options.line {
        Line::V2_9 => servers.v2_9,
        Line::V2_15 => servers.v2_15,
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // `bench` exists only in a `lab` build: its outage test blackholes the broker with the test
    // kit's fault proxy.
    cmd!(sh, "{cargo} build --release -p sink-cli --features lab")
        .run()
        .map_err(|e| anyhow::anyhow!("release build failed: {e}"))?;

    let server = start_server(&binary, &root.join("target"))?;
    let url = format!("nats://127.0.0.1:{}", server.port);
    println!(
        "xtask bench: nats-server {} (pid {}) at {url}, store {}",
        binary.display(),
        server.child.id(),
        server.dir.display()
    );
    let jetsink = root.join("target/release/jetsink");
    let mut args = options.passthrough;
    if !args
        .iter()
        .any(|a| a == "--outage-secs" || a.starts_with("--outage-secs="))
    {
        args.extend(["--outage-secs".to_owned(), DEFAULT_OUTAGE_SECS.to_owned()]);
    }
    args.extend(["--server-pid".to_owned(), server.child.id().to_string()]);
    let result = cmd!(sh, "{jetsink} --url {url} bench {args...}")
        .env_remove("NATS_URL")
        .run()
        .map_err(|e| anyhow::anyhow!("`jetsink bench` failed: {e}"));
    drop(server);
    result
}

/// Starts `binary` with JetStream on a free loopback port and a fresh store under `target_dir`,
/// and waits until it accepts connections.
fn start_server(binary: &Path, target_dir: &Path) -> anyhow::Result<ServerChild> {
    let port = free_port()?;
    let dir = target_dir.join(format!("xtask-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::File::create(dir.join("server.log"))
        .with_context(|| format!("creating {}/server.log", dir.display()))?;
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.join("store"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut server = ServerChild { child, dir, port };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = server.child.try_wait()? {
            let log = std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
            bail!("nats-server exited at start ({status}):\n{log}");
        }
        if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(server);
        }
        if Instant::now() > deadline {
            bail!("nats-server did not accept connections on port {port} within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port nobody listens on now (never 4222, the shared server's).
fn free_port() -> anyhow::Result<u16> {
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding a probe socket")?
            .local_addr()?
            .port();
        if port != 4222 {
            return Ok(port);
        }
    }
}
