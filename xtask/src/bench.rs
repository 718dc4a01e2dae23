//! `cargo xtask bench`: release build, a private nats-server with JetStream, `jetsink bench` against it.
//!
//! With `--server 2.15` the bench also starts a 3-node 2.15 cluster of its own (through the test
//! kit, which finds the binary through the variables exported here) for the R3 many-producer rows;
//! `--no-cluster` skips it. `--system-alloc` builds the binary without mimalloc.

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
    /// Build without the `mimalloc` feature: the bench runs on the system allocator, as a service
    /// embedding `sink-nats` may.
    system_alloc: bool,
    /// Skip the 3-node cluster rows `--server 2.15` adds.
    no_cluster: bool,
    /// Passed to `jetsink bench` unchanged.
    passthrough: Vec<String>,
}

impl Options {
    /// Parses the arguments after `bench`: `--server 2.9|2.15`, `--system-alloc`, `--no-cluster`;
    /// everything else goes to `jetsink bench`.
    pub fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut line = Line::V2_9;
        let mut system_alloc = false;
        let mut no_cluster = false;
        let mut passthrough = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--system-alloc" => {
                    system_alloc = true;
                    continue;
                }
                "--no-cluster" => {
                    no_cluster = true;
                    continue;
                }
                _ => {}
            }
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
        Ok(Options {
            line,
            system_alloc,
            no_cluster,
            passthrough,
        })
    }

    /// The arguments for `jetsink bench`: the passthrough, the default outage, and on 2.15 the
    /// cluster rows (unless `--no-cluster` or an explicit `--cluster`).
    fn jetsink_args(&self, server_pid: u32) -> Vec<String> {
        let mut args = self.passthrough.clone();
        let given = |flag: &str| {
            args.iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let outage = !given("--outage-secs");
        let cluster = self.line == Line::V2_15 && !self.no_cluster && !given("--cluster");
        if outage {
            args.extend(["--outage-secs".to_owned(), DEFAULT_OUTAGE_SECS.to_owned()]);
        }
        if cluster {
            args.extend(["--cluster".to_owned(), "2.15".to_owned()]);
        }
        args.extend(["--server-pid".to_owned(), server_pid.to_string()]);
        args
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
        Line::V2_9 => servers.v2_9.clone(),
        Line::V2_15 => servers.v2_15.clone(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // `bench` exists only in a `lab` build: its outage test blackholes the broker with the test
    // kit's fault proxy.
    let allocator: &[&str] = if options.system_alloc {
        &["--no-default-features"]
    } else {
        &[]
    };
    cmd!(
        sh,
        "{cargo} build --release -p sink-cli --features lab {allocator...}"
    )
    .run()
    .map_err(|e| anyhow::anyhow!("release build failed: {e}"))?;
    // The cluster rows start their nodes through the test kit, which looks for these.
    sh.set_var(crate::demo::SERVER_2_9_ENV, &servers.v2_9);
    sh.set_var("JETSINK_NATS_SERVER_2_12", &servers.v2_12);
    sh.set_var(crate::demo::SERVER_2_15_ENV, &servers.v2_15);

    let server = start_server(&binary, &root.join("target"))?;
    let url = format!("nats://127.0.0.1:{}", server.port);
    println!(
        "xtask bench: nats-server {} (pid {}) at {url}, store {}",
        binary.display(),
        server.child.id(),
        server.dir.display()
    );
    let jetsink = root.join("target/release/jetsink");
    let args = options.jetsink_args(server.child.id());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Options::parse(&args).expect("parses")
    }

    #[test]
    fn the_newer_server_adds_the_cluster_rows_unless_told_not_to() {
        let args = parse(&["--server", "2.15", "--rounds", "1"]).jetsink_args(7);
        assert_eq!(
            args,
            [
                "--rounds",
                "1",
                "--outage-secs",
                "60",
                "--cluster",
                "2.15",
                "--server-pid",
                "7"
            ]
        );
        let args = parse(&["--server=2.15", "--no-cluster", "--outage-secs", "0"]).jetsink_args(7);
        assert_eq!(args, ["--outage-secs", "0", "--server-pid", "7"]);
        let args = parse(&["--server", "2.15", "--cluster=2.12"]).jetsink_args(7);
        assert_eq!(
            args,
            ["--cluster=2.12", "--outage-secs", "60", "--server-pid", "7"]
        );
        let args = parse(&[]).jetsink_args(7);
        assert_eq!(args, ["--outage-secs", "60", "--server-pid", "7"]);
    }

    #[test]
    fn system_alloc_is_taken_by_xtask() {
        let options = parse(&["--system-alloc", "--only", "producer"]);
        assert!(options.system_alloc);
        assert_eq!(options.passthrough, ["--only", "producer"]);
        assert!(!parse(&[]).system_alloc);
    }
}
