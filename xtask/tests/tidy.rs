//! House rules checked over the whole repository as ordinary tests ("tidy", after rust-analyzer).
//!
//! Each failure lists every offending `file:line`, so one run shows everything to fix.

use std::fs;
use std::path::{Path, PathBuf};

/// Attribute needles, assembled so that this file does not contain them literally.
const BANNED_ATTRIBUTES: [&str; 2] = [concat!("#[", "ignore"), concat!("#[", "should_panic")];

/// Crates that would give sink-core IO, an executor or sockets.
const BANNED_CORE_DEPENDENCIES: [&str; 6] = [
    "tokio",
    "async-nats",
    "mio",
    "reqwest",
    "futures",
    "socket2",
];

/// Source fragments that mean sink-core reads a clock or does IO (assembled, see above).
const BANNED_CORE_SOURCE: [&str; 5] = [
    concat!("Instant", "::now"),
    concat!("SystemTime", "::now"),
    concat!("std", "::net"),
    concat!("std", "::fs"),
    concat!("tokio", "::"),
];

/// The workspace root: the parent of the xtask crate.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, skipping build output and hidden directories.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = fs::read_dir(&current)
            .unwrap_or_else(|err| panic!("cannot list {}: {err}", current.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    pending.push(path);
                }
            } else if name.ends_with(".rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Rust files in the workspace members (`crates/` and `xtask/`).
fn workspace_rust_files() -> Vec<PathBuf> {
    let root = project_root();
    let mut files = rust_files(&root.join("crates"));
    files.extend(rust_files(&root.join("xtask")));
    files
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// `path` relative to the repository root, for messages.
fn shown(path: &Path) -> String {
    let root = project_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Fails with every violation, one per line, when there are any.
fn assert_none(rule: &str, violations: &[String]) {
    assert!(
        violations.is_empty(),
        "{rule}; {} violation(s):\n  {}",
        violations.len(),
        violations.join("\n  ")
    );
}

/// Returns each line's code with comments removed (`//` to end of line and `/* .. */`, nested),
/// so that a rule about code is not tripped by prose. String literals are not tracked: a `//` inside
/// one cuts the rest of that line, which can only hide a violation after it on the same line.
fn code_lines(text: &str) -> Vec<String> {
    let mut depth = 0usize;
    text.lines()
        .map(|line| {
            let mut code = String::new();
            let mut rest = line;
            while !rest.is_empty() {
                if depth > 0 {
                    match (rest.find("/*"), rest.find("*/")) {
                        (Some(open), Some(close)) if open < close => {
                            depth += 1;
                            rest = &rest[open + 2..];
                        }
                        (_, Some(close)) => {
                            depth -= 1;
                            rest = &rest[close + 2..];
                        }
                        _ => rest = "",
                    }
                } else {
                    match (rest.find("//"), rest.find("/*")) {
                        (Some(line_comment), block) if block.is_none_or(|b| line_comment < b) => {
                            code.push_str(&rest[..line_comment]);
                            rest = "";
                        }
                        (_, Some(open)) => {
                            code.push_str(&rest[..open]);
                            depth += 1;
                            rest = &rest[open + 2..];
                        }
                        _ => {
                            code.push_str(rest);
                            rest = "";
                        }
                    }
                }
            }
            code
        })
        .collect()
}

#[test]
fn every_rust_file_starts_with_a_module_doc_line() {
    let violations: Vec<String> = workspace_rust_files()
        .iter()
        .filter(|path| !read(path).starts_with("//!"))
        .map(|path| format!("{}:1: first line is not a `//!` doc line", shown(path)))
        .collect();
    assert_none("every .rs file must start with a `//!` line", &violations);
}

#[test]
fn no_ignored_or_should_panic_tests() {
    let mut violations = Vec::new();
    for path in rust_files(&project_root()) {
        for (index, line) in code_lines(&read(&path)).iter().enumerate() {
            for needle in BANNED_ATTRIBUTES {
                if line.contains(needle) {
                    violations.push(format!("{}:{}: {needle}]", shown(&path), index + 1));
                }
            }
        }
    }
    assert_none(
        "tests are never ignored and never expect a panic",
        &violations,
    );
}

#[test]
fn sink_core_has_no_io_or_async_dependencies() {
    let manifest = project_root().join("crates/sink-core/Cargo.toml");
    let text = read(&manifest);
    let mut violations = Vec::new();
    // Which section each line is in: `[dependencies]`, `[target.'..'.dependencies]` and
    // `[dependencies.<name>]` all add normal dependencies.
    let mut section = String::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
            if let Some(name) = section.strip_prefix("dependencies.") {
                if BANNED_CORE_DEPENDENCIES.contains(&name.trim_matches('"')) {
                    violations.push(format!("{}:{}: {line}", shown(&manifest), index + 1));
                }
            }
            continue;
        }
        let in_dependencies = section == "dependencies" || section.ends_with(".dependencies");
        if !in_dependencies || line.is_empty() {
            continue;
        }
        // `name = ..`, `name.workspace = true`, `"name" = ..`
        let name = line
            .split(['=', '.'])
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        // A renamed dependency (`rt = { package = "tokio", .. }`) counts under its real name.
        let renamed_to_banned = BANNED_CORE_DEPENDENCIES
            .iter()
            .any(|banned| line.contains(&format!("package = \"{banned}\"")));
        if BANNED_CORE_DEPENDENCIES.contains(&name) || renamed_to_banned {
            violations.push(format!("{}:{}: {line}", shown(&manifest), index + 1));
        }
    }
    assert_none(
        "sink-core is sans-IO: no tokio, async-nats, mio, reqwest, futures or socket2",
        &violations,
    );
}

#[test]
fn sink_core_source_reads_no_clock_and_does_no_io() {
    let mut violations = Vec::new();
    for path in rust_files(&project_root().join("crates/sink-core/src")) {
        for (index, line) in code_lines(&read(&path)).iter().enumerate() {
            for needle in BANNED_CORE_SOURCE {
                if line.contains(needle) {
                    violations.push(format!("{}:{}: {needle}", shown(&path), index + 1));
                }
            }
        }
    }
    assert_none(
        "sink-core takes time as a parameter and does no IO",
        &violations,
    );
}

#[test]
fn sink_core_clippy_config_bans_clocks() {
    let config = project_root().join("crates/sink-core/clippy.toml");
    assert!(
        config.is_file(),
        "{} is missing; it must ban reading clocks in sink-core",
        shown(&config)
    );
    let text = read(&config);
    let code: String = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let missing: Vec<String> = ["std::time::Instant::now", "std::time::SystemTime::now"]
        .iter()
        .filter(|path| !code.contains(&format!("\"{path}\"")))
        .map(|path| format!("{}: does not ban {path}", shown(&config)))
        .collect();
    let mut violations = missing;
    if !code.contains("disallowed-methods") {
        violations.push(format!(
            "{}: has no disallowed-methods list",
            shown(&config)
        ));
    }
    assert_none(
        "sink-core's clippy.toml must ban reading clocks",
        &violations,
    );
}

#[test]
fn comment_stripping_keeps_code_and_drops_prose() {
    let text = "let a = 1; // Instant::now\n/* std::fs\n still comment */ let b = 2;\nlet c = 3; /* x */ let d;";
    assert_eq!(
        code_lines(text),
        vec!["let a = 1; ", "", " let b = 2;", "let c = 3;  let d;"]
    );
}
