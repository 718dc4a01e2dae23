//! Shared helpers for the `jetsink` binary's integration tests: running it with a clean environment, reading its output and its two-column tables.
#![allow(dead_code)] // each test binary uses a different subset

use std::process::{Command, Output};

/// Variables that would leak the caller's environment into a test run.
pub const ENV: [&str; 10] = [
    "NATS_URL",
    "JETSINK_STREAM",
    "JETSINK_SUBJECT_TEMPLATE",
    "NATS_TOKEN",
    "NATS_USER",
    "NATS_PASSWORD",
    "JETSINK_CONFIG",
    "RUST_LOG",
    "NATS_CREDS",
    "COLUMNS",
];

/// Runs `jetsink` with `args` and none of [`ENV`].
pub fn jetsink(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jetsink"));
    for var in ENV {
        cmd.env_remove(var);
    }
    cmd.args(args).output().expect("run jetsink")
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited with a code")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        stdout(out),
        stderr(out)
    )
}

/// The value column of a two-column table row, e.g. `messages  500`.
pub fn row_value(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.starts_with("  ").then(|| rest.trim().to_owned())
    })
}
