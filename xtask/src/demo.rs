//! `cargo xtask demo`: run `jetsink demo` (release build with the `lab` feature) with the discovered
//! nats-server binaries.

use std::path::Path;

use xshell::{cmd, Shell};

use crate::nats_server;

/// Environment variable the testkit harness reads for the 2.9.x server binary.
pub const SERVER_2_9_ENV: &str = "JETSINK_NATS_SERVER_2_9";
/// Environment variable the testkit harness reads for the 2.15.x server binary.
pub const SERVER_2_15_ENV: &str = "JETSINK_NATS_SERVER_2_15";

/// Discovers the servers, exports their paths for the harness and runs the demo; `args` go to
/// `jetsink demo` unchanged (e.g. `--events 20000`, `--server 2.15`).
pub fn run(sh: &Shell, root: &Path, args: &[String]) -> anyhow::Result<()> {
    let servers = nats_server::discover(sh, root)?;
    sh.set_var(SERVER_2_9_ENV, &servers.v2_9);
    sh.set_var(SERVER_2_15_ENV, &servers.v2_15);
    println!(
        "{SERVER_2_9_ENV}={}\n{SERVER_2_15_ENV}={}",
        servers.v2_9.display(),
        servers.v2_15.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // The demo starts its own broker; a NATS_URL from the caller's shell would point it elsewhere.
    // `demo` exists only in a `lab` build: it needs the test kit's server launcher and fault proxy.
    cmd!(
        sh,
        "{cargo} run --release -p sink-cli --features lab -- demo {args...}"
    )
    .env_remove("NATS_URL")
    .run()
    .map_err(|e| anyhow::anyhow!("`jetsink demo` failed: {e}"))?;
    Ok(())
}
