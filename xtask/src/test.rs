//! `cargo xtask test`: every check CI runs, as named stages that stop at the first failure.
//!
//! Cargo's own output streams straight to the terminal so CI logs keep the `test result:` lines; each
//! stage then prints one summary line, and the summary is repeated as a table at the end.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use xshell::{cmd, Shell};

use crate::nats_server;

/// Environment variable the testkit harness reads for the 2.9.x server binary.
const SERVER_2_9_ENV: &str = "JETSINK_NATS_SERVER_2_9";
/// Environment variable the testkit harness reads for the 2.12.x server binary.
const SERVER_2_12_ENV: &str = "JETSINK_NATS_SERVER_2_12";
/// Environment variable the testkit harness reads for the 2.15.x server binary.
const SERVER_2_15_ENV: &str = "JETSINK_NATS_SERVER_2_15";

/// Command-line options of `cargo xtask test`.
#[derive(Debug, Default)]
pub struct Options {
    /// Skip fmt, clippy and doc (tests and doctests still run).
    quick: bool,
}

impl Options {
    /// Parses the arguments after `test`.
    pub fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut options = Options::default();
        for arg in args {
            match arg.as_str() {
                "--quick" => options.quick = true,
                other => bail!("`test` accepts only `--quick`, got `{other}`"),
            }
        }
        Ok(options)
    }
}

/// What happened to one stage.
enum Status {
    Ok,
    Failed(String),
    SkippedQuick,
    NotRun,
}

/// One stage: a name, whether `--quick` keeps it, and what it does.
struct Stage<'a> {
    name: &'static str,
    in_quick: bool,
    action: Box<dyn Fn() -> anyhow::Result<()> + 'a>,
}

/// A stage's summary line.
struct Report {
    name: &'static str,
    status: Status,
    elapsed: Duration,
}

impl Report {
    fn without_running(name: &'static str, status: Status) -> Report {
        Report {
            name,
            status,
            elapsed: Duration::ZERO,
        }
    }

    fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        match &self.status {
            Status::Ok => format!("stage {}: ok ({secs:.1} s)", self.name),
            Status::Failed(why) => format!("stage {}: FAILED ({secs:.1} s): {why}", self.name),
            Status::SkippedQuick => format!("stage {}: skipped (--quick)", self.name),
            Status::NotRun => format!("stage {}: not run (an earlier stage failed)", self.name),
        }
    }
}

/// Runs the stages in order, stopping at the first failure.
pub fn run(sh: &Shell, root: &Path, options: Options) -> anyhow::Result<()> {
    sh.set_var("RUST_BACKTRACE", "1");
    // PROPTEST_CASES is passed through when the caller set it and never set here: each property test
    // picks its own case count (>= 256), which an exported default would only make confusing.
    if let Some(cases) = std::env::var_os("PROPTEST_CASES") {
        println!(
            "PROPTEST_CASES={} (from the environment)",
            cases.to_string_lossy()
        );
    }
    // Use the cargo that started us, so a `cargo +toolchain xtask test` stays on that toolchain.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());

    let stages = [
        Stage {
            name: "nats-server",
            in_quick: true,
            action: Box::new(|| {
                let servers = nats_server::discover(sh, root)?;
                servers.print_table();
                // Set on the shell, so every later stage (and the tests it runs) sees them.
                sh.set_var(SERVER_2_9_ENV, &servers.v2_9);
                sh.set_var(SERVER_2_12_ENV, &servers.v2_12);
                sh.set_var(SERVER_2_15_ENV, &servers.v2_15);
                println!(
                    "{SERVER_2_9_ENV}={}\n{SERVER_2_12_ENV}={}\n{SERVER_2_15_ENV}={}",
                    servers.v2_9.display(),
                    servers.v2_12.display(),
                    servers.v2_15.display()
                );
                Ok(())
            }),
        },
        Stage {
            name: "fmt",
            in_quick: false,
            action: Box::new(|| Ok(cmd!(sh, "{cargo} fmt --all -- --check").run()?)),
        },
        Stage {
            name: "clippy",
            in_quick: false,
            action: Box::new(|| {
                cmd!(
                    sh,
                    "{cargo} clippy --workspace --all-targets --all-features -- -D warnings"
                )
                .run()?;
                // The shipped binary is built without `lab`: its cfg'd-out code must be clean too.
                Ok(cmd!(
                    sh,
                    "{cargo} clippy -p sink-cli --all-targets -- -D warnings"
                )
                .run()?)
            }),
        },
        Stage {
            name: "test",
            in_quick: true,
            action: Box::new(|| {
                cmd!(sh, "{cargo} test --workspace --all-targets --all-features").run()?;
                // Again without `lab`, as shipped: the CLI's help lists no demo or bench there.
                Ok(cmd!(sh, "{cargo} test -p sink-cli --all-targets").run()?)
            }),
        },
        Stage {
            name: "doctest",
            in_quick: true,
            action: Box::new(|| {
                Ok(cmd!(sh, "{cargo} test --workspace --doc --all-features").run()?)
            }),
        },
        Stage {
            name: "doc",
            in_quick: false,
            action: Box::new(|| {
                Ok(cmd!(sh, "{cargo} doc --workspace --no-deps")
                    .env("RUSTDOCFLAGS", "-Dwarnings")
                    .run()?)
            }),
        },
    ];

    let mut reports = Vec::with_capacity(stages.len());
    let mut failed: Option<&'static str> = None;
    for stage in &stages {
        let report = if failed.is_some() {
            Report::without_running(stage.name, Status::NotRun)
        } else if options.quick && !stage.in_quick {
            Report::without_running(stage.name, Status::SkippedQuick)
        } else {
            let report = run_stage(stage, &cargo);
            println!("{}", report.line());
            if matches!(report.status, Status::Failed(_)) {
                failed = Some(stage.name);
            }
            report
        };
        reports.push(report);
    }

    println!("\nsummary:");
    for report in &reports {
        println!("  {}", report.line());
    }
    if let Some(name) = failed {
        bail!("stage {name} failed");
    }
    println!("all stages passed");
    Ok(())
}

/// Runs one stage with its output streaming to the terminal, and times it.
fn run_stage(stage: &Stage<'_>, cargo: &str) -> Report {
    println!("==> stage {}", stage.name);
    let started = Instant::now();
    let result = (stage.action)();
    let elapsed = started.elapsed();
    let status = match result {
        Ok(()) => Status::Ok,
        // One line per stage: flatten the error chain, and shorten the toolchain's cargo path.
        Err(err) => Status::Failed(
            format!("{err:#}")
                .replace('\n', " ")
                .replace(cargo, "cargo"),
        ),
    };
    Report {
        name: stage.name,
        status,
        elapsed,
    }
}
