//! House rules checked over the whole repository as ordinary tests ("tidy", after rust-analyzer).
//!
//! Each failure lists every offending `file:line`, so one run shows everything to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Where sink-nats may read std's clocks: its one clock module. Everywhere else time comes from
/// `clock::now()` (tokio's clock, which a paused test runtime moves together with every sleep),
/// or from tokio's `Instant` directly.
const SINK_NATS_CLOCK: &str = "crates/sink-nats/src/clock.rs";

#[test]
fn sink_nats_reads_std_clocks_only_in_its_clock_module() {
    let mut violations = Vec::new();
    for path in rust_files(&project_root().join("crates/sink-nats/src")) {
        if shown(&path) == SINK_NATS_CLOCK {
            continue;
        }
        for (i, line) in code_lines(&read(&path)).iter().enumerate() {
            if std_clock_read(line) {
                violations.push(format!("{}:{}: {}", shown(&path), i + 1, line.trim()));
            }
        }
    }
    assert_none(
        &format!("sink-nats reads time through {SINK_NATS_CLOCK} (clock::now)"),
        &violations,
    );
}

/// Whether a line of code reads std's monotonic or wall clock, or blocks a thread on it.
fn std_clock_read(line: &str) -> bool {
    let tokio_now = concat!("tokio::time::", "Instant::now");
    let needles = [
        concat!("SystemTime", "::now"),
        concat!("std::thread", "::sleep"),
        concat!(".elapsed", "()"),
    ];
    needles.iter().any(|n| line.contains(n))
        || line
            .replace(tokio_now, "")
            .contains(concat!("Instant", "::now"))
}

#[test]
fn std_clock_check_tells_tokios_clock_from_stds() {
    assert!(std_clock_read("let t = Instant::now();"));
    assert!(std_clock_read("let t = std::time::SystemTime::now();"));
    assert!(std_clock_read("let waited = started.elapsed();"));
    assert!(!std_clock_read("let t = tokio::time::Instant::now() + d;"));
    assert!(!std_clock_read("let t = clock::now();"));
}

#[test]
fn comment_stripping_keeps_code_and_drops_prose() {
    let text = "let a = 1; // Instant::now\n/* std::fs\n still comment */ let b = 2;\nlet c = 3; /* x */ let d;";
    assert_eq!(
        code_lines(text),
        vec!["let a = 1; ", "", " let b = 2;", "let c = 3;  let d;"]
    );
}

/// The workspace crates and the workspace crates each may depend on through a normal or build
/// dependency (dev-dependencies are free). Dependencies point down: cli -> nats -> core; the test
/// kit sits above the adapter it tests and is a normal dependency of no product crate, except
/// through sink-cli's `lab` feature ([`LAB_FEATURE`]). A new crate is refused until it is added here.
const LAYERS: [(&str, &[&str]); 5] = [
    ("sink-core", &[]),
    ("sink-nats", &["sink-core"]),
    ("sink-testkit", &["sink-core", "sink-nats"]),
    ("sink-cli", &["sink-core", "sink-nats", "sink-testkit"]),
    ("xtask", &[]),
];

/// The test kit: never linked into a product unless [`LAB_FEATURE`] asks for it.
const TEST_KIT: &str = "sink-testkit";

/// Crates that are product code (shipped in the `jetsink` binary or embedded by services).
const PRODUCT_CRATES: [&str; 3] = ["sink-core", "sink-nats", "sink-cli"];

/// (crate, feature): the only switch that may turn the test kit on in a product crate, for
/// `jetsink demo` and `jetsink bench`; never on by default.
const LAB_FEATURE: (&str, &str) = ("sink-cli", "lab");

/// Crates that may not appear in `cargo tree -p sink-cli -e normal` (default features): the test
/// kit and what only tests need.
const TEST_ONLY_CRATES: [&str; 6] = [
    "sink-testkit",
    "proptest",
    "proptest-state-machine",
    "rcgen",
    "nix",
    "insta",
];

/// How a dependency is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    Build,
    Dev,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::Build => "build",
            Kind::Dev => "dev",
        }
    }
}

/// One declared dependency of a workspace crate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Declared {
    /// The package depended on.
    package: String,
    /// The name features refer to it by (the `rename`, else the package name).
    alias: String,
    kind: Kind,
    optional: bool,
}

/// A workspace crate's manifest, as far as the layer rules need it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manifest {
    name: String,
    dependencies: Vec<Declared>,
    features: BTreeMap<String, Vec<String>>,
}

/// Runs cargo in the workspace root and returns its stdout; panics with stderr if it fails.
fn cargo_output(args: &[&str]) -> String {
    // `cargo test` tells its tests which cargo runs them; keep to that one (and its toolchain).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(&cargo)
        .args(args)
        .current_dir(project_root())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {cargo} {}: {err}", args.join(" ")));
    assert!(
        out.status.success(),
        "{cargo} {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo prints UTF-8")
}

/// The workspace crates of `cargo metadata --format-version 1 --no-deps` output.
fn parse_metadata(json: &str) -> Vec<Manifest> {
    let metadata: serde_json::Value = serde_json::from_str(json).expect("cargo metadata is JSON");
    let text = |value: &serde_json::Value, what: &str| -> String {
        value
            .as_str()
            .unwrap_or_else(|| panic!("cargo metadata: {what} is not a string: {value}"))
            .to_owned()
    };
    metadata["packages"]
        .as_array()
        .expect("cargo metadata has a packages list")
        .iter()
        .map(|package| {
            let dependencies = package["dependencies"]
                .as_array()
                .expect("a package has a dependencies list")
                .iter()
                .map(|dep| {
                    let name = text(&dep["name"], "dependency name");
                    let alias = dep["rename"]
                        .as_str()
                        .map_or_else(|| name.clone(), str::to_owned);
                    let kind = match dep["kind"].as_str() {
                        None => Kind::Normal,
                        Some("build") => Kind::Build,
                        Some("dev") => Kind::Dev,
                        Some(other) => panic!("cargo metadata: unknown dependency kind {other}"),
                    };
                    Declared {
                        package: name,
                        alias,
                        kind,
                        optional: dep["optional"].as_bool().unwrap_or(false),
                    }
                })
                .collect();
            let features = package["features"]
                .as_object()
                .expect("a package has a features map")
                .iter()
                .map(|(feature, values)| {
                    let values = values
                        .as_array()
                        .expect("a feature lists what it enables")
                        .iter()
                        .map(|v| text(v, "feature value"))
                        .collect();
                    (feature.clone(), values)
                })
                .collect();
            Manifest {
                name: text(&package["name"], "package name"),
                dependencies,
                features,
            }
        })
        .collect()
}

/// Whether the feature value `value` turns on the dependency called `alias` (`dep:x`, the implicit
/// feature `x`, or `x/feature`; `x?/feature` does not turn it on by itself).
fn enables(value: &str, alias: &str) -> bool {
    value.strip_prefix("dep:") == Some(alias)
        || value == alias
        || value
            .strip_prefix(alias)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Every feature that `default` turns on, itself included.
fn default_closure(features: &BTreeMap<String, Vec<String>>) -> BTreeSet<&str> {
    let mut on: BTreeSet<&str> = BTreeSet::new();
    let mut pending = vec!["default"];
    while let Some(feature) = pending.pop() {
        if !on.insert(feature) {
            continue;
        }
        for value in features.get(feature).into_iter().flatten() {
            if features.contains_key(value.as_str()) {
                pending.push(value.as_str());
            }
        }
    }
    on
}

/// Violations of [`LAYERS`] and of the test-kit rule, one line each.
fn check_layers(manifests: &[Manifest]) -> Vec<String> {
    let workspace: BTreeSet<&str> = manifests.iter().map(|m| m.name.as_str()).collect();
    let mut violations = Vec::new();
    for manifest in manifests {
        let name = manifest.name.as_str();
        let Some((_, allowed)) = LAYERS.iter().find(|(layer, _)| *layer == name) else {
            violations.push(format!(
                "{name}: not in LAYERS of xtask/tests/tidy.rs; add it with the workspace crates \
                 it may depend on"
            ));
            continue;
        };
        for dep in &manifest.dependencies {
            let target = dep.package.as_str();
            if dep.kind == Kind::Dev || !workspace.contains(target) {
                continue;
            }
            if !allowed.contains(&target) {
                violations.push(format!(
                    "{name} -> {target} ({} dependency): {name} may depend only on {allowed:?}",
                    dep.kind.as_str()
                ));
                continue;
            }
            if target == TEST_KIT && PRODUCT_CRATES.contains(&name) {
                violations.extend(check_lab_feature(manifest, dep));
            }
        }
    }
    violations
}

/// The test kit in product crate `manifest` (declared as `dep`): optional, turned on only by
/// [`LAB_FEATURE`], which `default` does not turn on.
fn check_lab_feature(manifest: &Manifest, dep: &Declared) -> Vec<String> {
    let name = manifest.name.as_str();
    let (lab_crate, lab) = LAB_FEATURE;
    let mut violations = Vec::new();
    if name != lab_crate {
        violations.push(format!(
            "{name} -> {TEST_KIT}: only {lab_crate}'s `{lab}` feature may link the test kit into a \
             product crate; make it a dev-dependency"
        ));
        return violations;
    }
    if !dep.optional {
        violations.push(format!(
            "{name} -> {TEST_KIT} is not optional: the shipped binary would link it; declare it \
             `optional = true` and enable it from the `{lab}` feature only"
        ));
    }
    let enablers: Vec<&str> = manifest
        .features
        .iter()
        .filter(|(_, values)| values.iter().any(|v| enables(v, &dep.alias)))
        .map(|(feature, _)| feature.as_str())
        .collect();
    for feature in enablers.iter().filter(|f| **f != lab) {
        violations.push(format!(
            "{name}: feature `{feature}` turns on {TEST_KIT}; only `{lab}` may"
        ));
    }
    let on_by_default = default_closure(&manifest.features);
    for feature in enablers.iter().filter(|f| on_by_default.contains(**f)) {
        violations.push(format!(
            "{name}: `default` turns on `{feature}` and with it {TEST_KIT}; the shipped binary \
             must build without it"
        ));
    }
    violations
}

/// Test-only crates named in `cargo tree --prefix none --format {p}` output, one line each.
fn check_shipped_tree(tree: &str) -> Vec<String> {
    let present: BTreeSet<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    TEST_ONLY_CRATES
        .iter()
        .filter(|name| present.contains(**name))
        .map(|name| {
            format!(
                "{name} is linked into the default `jetsink` binary; \
                 `cargo tree -p sink-cli -e normal -i {name}` shows the edge"
            )
        })
        .collect()
}

#[test]
fn workspace_crates_depend_only_down_the_layers() {
    let json = cargo_output(&["metadata", "--format-version", "1", "--no-deps"]);
    let manifests = parse_metadata(&json);
    let names: BTreeSet<&str> = manifests.iter().map(|m| m.name.as_str()).collect();
    // Guards the check itself: it must have seen the crates it is about.
    for (layer, _) in LAYERS {
        assert!(names.contains(layer), "cargo metadata lists no {layer}");
    }
    assert_none(
        "dependencies point down: cli -> nats -> core, the test kit only as a dev-dependency or \
         behind sink-cli's `lab` feature",
        &check_layers(&manifests),
    );
}

#[test]
fn shipped_binary_links_no_test_kit() {
    let tree = cargo_output(&[
        "tree", "-p", "sink-cli", "-e", "normal", "--prefix", "none", "--format", "{p}",
    ]);
    // Guards the check itself: an empty or unexpected listing would pass vacuously.
    assert!(
        tree.lines().any(|l| l.starts_with("sink-nats ")),
        "unexpected cargo tree output:\n{tree}"
    );
    assert_none(
        "the default `jetsink` binary links no test kit and no test-only crate",
        &check_shipped_tree(&tree),
    );
}

/// A manifest for the checker tests: `deps` as (package, kind, optional), `features` as
/// (feature, values).
fn manifest(name: &str, deps: &[(&str, Kind, bool)], features: &[(&str, &[&str])]) -> Manifest {
    Manifest {
        name: name.to_owned(),
        dependencies: deps
            .iter()
            .map(|&(package, kind, optional)| Declared {
                package: package.to_owned(),
                alias: package.to_owned(),
                kind,
                optional,
            })
            .collect(),
        features: features
            .iter()
            .map(|(f, values)| {
                (
                    (*f).to_owned(),
                    values.iter().map(|v| (*v).to_owned()).collect(),
                )
            })
            .collect(),
    }
}

/// The documented layout: what the checker must accept.
fn good_workspace() -> Vec<Manifest> {
    vec![
        manifest(
            "sink-core",
            &[("bytes", Kind::Normal, false), (TEST_KIT, Kind::Dev, false)],
            &[],
        ),
        manifest(
            "sink-nats",
            &[
                ("sink-core", Kind::Normal, false),
                (TEST_KIT, Kind::Dev, false),
            ],
            &[],
        ),
        manifest(
            TEST_KIT,
            &[
                ("sink-core", Kind::Normal, false),
                ("sink-nats", Kind::Normal, false),
                ("proptest", Kind::Normal, false),
            ],
            &[],
        ),
        manifest(
            "sink-cli",
            &[
                ("sink-nats", Kind::Normal, false),
                (TEST_KIT, Kind::Normal, true),
                (TEST_KIT, Kind::Dev, false),
            ],
            &[("lab", &["dep:sink-testkit"])],
        ),
        manifest("xtask", &[("anyhow", Kind::Normal, false)], &[]),
    ]
}

/// `good_workspace` with `name`'s manifest replaced.
fn with(replacement: Manifest) -> Vec<Manifest> {
    let mut workspace = good_workspace();
    let slot = workspace
        .iter_mut()
        .find(|m| m.name == replacement.name)
        .expect("replaces a crate of the good workspace");
    *slot = replacement;
    workspace
}

#[test]
fn layer_check_accepts_the_documented_layout() {
    assert_eq!(check_layers(&good_workspace()), Vec::<String>::new());
}

#[test]
fn layer_check_flags_an_upward_edge_and_an_unlisted_crate() {
    let mut workspace = with(manifest(
        "sink-core",
        &[("sink-nats", Kind::Build, false)],
        &[],
    ));
    workspace.push(manifest("sink-spool", &[], &[]));
    assert_eq!(
        check_layers(&workspace),
        vec![
            "sink-core -> sink-nats (build dependency): sink-core may depend only on []",
            "sink-spool: not in LAYERS of xtask/tests/tidy.rs; add it with the workspace crates \
             it may depend on",
        ]
    );
}

#[test]
fn layer_check_flags_the_test_kit_as_a_normal_dependency_of_a_product_crate() {
    let nats = with(manifest(
        "sink-nats",
        &[
            ("sink-core", Kind::Normal, false),
            (TEST_KIT, Kind::Normal, true),
        ],
        &[("lab", &["dep:sink-testkit"])],
    ));
    assert_eq!(
        check_layers(&nats),
        vec!["sink-nats -> sink-testkit (normal dependency): sink-nats may depend only on [\"sink-core\"]"]
    );

    let cli = with(manifest(
        "sink-cli",
        &[(TEST_KIT, Kind::Normal, false)],
        &[("lab", &[])],
    ));
    assert_eq!(
        check_layers(&cli),
        vec![
            "sink-cli -> sink-testkit is not optional: the shipped binary would link it; declare \
             it `optional = true` and enable it from the `lab` feature only"
        ]
    );
}

#[test]
fn layer_check_flags_the_test_kit_on_by_default_or_behind_another_feature() {
    let workspace = with(manifest(
        "sink-cli",
        &[(TEST_KIT, Kind::Normal, true)],
        &[
            ("default", &["extras"]),
            ("extras", &["lab"]),
            ("lab", &["dep:sink-testkit"]),
            ("fuzz", &["sink-testkit/serde"]),
            ("weak", &["sink-testkit?/serde"]),
        ],
    ));
    assert_eq!(
        check_layers(&workspace),
        vec![
            "sink-cli: feature `fuzz` turns on sink-testkit; only `lab` may",
            "sink-cli: `default` turns on `lab` and with it sink-testkit; the shipped binary must \
             build without it",
        ]
    );
}

#[test]
fn metadata_parser_reads_kinds_renames_and_features() {
    let json = r#"{"packages": [{
        "name": "sink-cli",
        "dependencies": [
            {"name": "sink-nats", "kind": null, "rename": null, "optional": false},
            {"name": "sink-testkit", "kind": null, "rename": "kit", "optional": true},
            {"name": "sink-testkit", "kind": "dev", "rename": null, "optional": false},
            {"name": "cc", "kind": "build", "rename": null, "optional": false}
        ],
        "features": {"lab": ["dep:kit"]}
    }]}"#;
    let parsed = parse_metadata(json);
    assert_eq!(
        parsed,
        vec![manifest_with_alias(
            manifest(
                "sink-cli",
                &[
                    ("sink-nats", Kind::Normal, false),
                    (TEST_KIT, Kind::Normal, true),
                    (TEST_KIT, Kind::Dev, false),
                    ("cc", Kind::Build, false),
                ],
                &[("lab", &["dep:kit"])],
            ),
            1,
            "kit"
        )]
    );
    // A renamed test kit turned on by another feature is still found.
    let mut renamed = parsed[0].clone();
    renamed
        .features
        .insert("fuzz".to_owned(), vec!["kit/serde".to_owned()]);
    assert_eq!(
        check_layers(&with(renamed)),
        vec!["sink-cli: feature `fuzz` turns on sink-testkit; only `lab` may"]
    );
}

/// `m` with dependency `index` known to features as `alias`.
fn manifest_with_alias(mut m: Manifest, index: usize, alias: &str) -> Manifest {
    m.dependencies[index].alias = alias.to_owned();
    m
}

#[test]
fn shipped_tree_check_flags_test_only_crates() {
    let clean = "sink-cli v0.1.0 (/w/crates/sink-cli)\nsink-nats v0.1.0 (/w/crates/sink-nats)\n\
                 tokio v1.47.0\ntokio v1.47.0 (*)\n";
    assert_eq!(check_shipped_tree(clean), Vec::<String>::new());
    let linked = format!(
        "{clean}sink-testkit v0.1.0 (/w/crates/sink-testkit)\nproptest v1.12.0\nnix v0.30.1 (*)\n"
    );
    assert_eq!(
        check_shipped_tree(&linked),
        vec![
            "sink-testkit is linked into the default `jetsink` binary; `cargo tree -p sink-cli -e \
             normal -i sink-testkit` shows the edge",
            "proptest is linked into the default `jetsink` binary; `cargo tree -p sink-cli -e \
             normal -i proptest` shows the edge",
            "nix is linked into the default `jetsink` binary; `cargo tree -p sink-cli -e normal -i \
             nix` shows the edge",
        ]
    );
}

/// A crate's source files by module path (`driver`, `a::b`), from `src/`. The crate root
/// (`lib.rs`, `main.rs`) is left out: its `mod` and `pub use` lines are the crate's table of
/// contents, and a module naming a root re-export depends on the module that defines it, not on
/// the root. Binaries under `src/bin/` are crates of their own and left out too.
fn module_files(src: &Path) -> BTreeMap<String, PathBuf> {
    rust_files(src)
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(src).ok()?.with_extension("");
            let mut segments: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if segments.first().is_some_and(|s| s == "bin") {
                return None;
            }
            if segments.last().is_some_and(|s| s == "mod") {
                segments.pop();
            }
            if segments.is_empty() || segments == ["lib"] || segments == ["main"] {
                return None;
            }
            Some((segments.join("::"), path))
        })
        .collect()
}

/// Every path named after `crate::` in `code` as its leading segments, with `use crate::{a::X,
/// b}` groups expanded one level: `[a, X]`, `[b]`.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let segments = |path: &str| -> Vec<String> {
        path.split("::")
            .map(str::trim)
            .take_while(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'))
            .map(str::to_owned)
            .collect()
    };
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue; // `sink_core::` ends in `crate::`'s letters only by accident of naming
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1usize;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let mut item_depth = 0usize;
            let mut start = 0;
            for (i, c) in group[..end].char_indices().chain([(end, ',')]) {
                match c {
                    '{' => item_depth += 1,
                    '}' => item_depth -= 1,
                    ',' if item_depth == 0 => {
                        paths.push(segments(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            paths.push(segments(rest));
        }
    }
    paths.retain(|p| !p.is_empty());
    paths
}

/// The modules each module imports from, by module path: a `crate::` path counts as an edge to
/// the longest module it starts with (none when it names a root item).
fn import_edges(sources: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    sources
        .iter()
        .map(|(module, code)| {
            let targets = crate_paths(code)
                .into_iter()
                .filter_map(|path| {
                    (1..=path.len())
                        .rev()
                        .map(|n| path[..n].join("::"))
                        .find(|prefix| sources.contains_key(prefix))
                })
                .filter(|target| target != module)
                .collect();
            (module.clone(), targets)
        })
        .collect()
}

/// Every set of modules that import from each other (directly or round a longer cycle), each
/// sorted, with the edges among them: `a -> b, b -> a`.
fn import_cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let reachable = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut pending: Vec<&str> = vec![from];
        while let Some(m) = pending.pop() {
            for next in edges.get(m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    pending.push(next);
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&str, BTreeSet<String>> =
        edges.keys().map(|m| (m.as_str(), reachable(m))).collect();
    let mut reported = BTreeSet::new();
    let mut cycles = Vec::new();
    for (module, reached) in &reach {
        if !reached.contains(*module) || reported.contains(*module) {
            continue;
        }
        let members: BTreeSet<&str> = reached
            .iter()
            .map(String::as_str)
            .filter(|other| reach[other].contains(*module))
            .collect();
        let shown: Vec<String> = members
            .iter()
            .flat_map(|from| {
                edges[*from]
                    .iter()
                    .filter(|to| members.contains(to.as_str()))
                    .map(move |to| format!("{from} -> {to}"))
            })
            .collect();
        cycles.push(shown.join(", "));
        reported.extend(members.iter().map(|m| (*m).to_owned()));
    }
    cycles
}

#[test]
fn no_two_modules_of_a_crate_import_from_each_other() {
    let root = project_root();
    let mut crates: Vec<PathBuf> = fs::read_dir(root.join("crates"))
        .expect("list crates/")
        .map(|e| e.expect("directory entry").path().join("src"))
        .filter(|src| src.is_dir())
        .collect();
    crates.push(root.join("xtask/src"));
    crates.sort();
    let mut violations = Vec::new();
    for src in crates {
        let sources: BTreeMap<String, String> = module_files(&src)
            .into_iter()
            .map(|(module, path)| (module, code_lines(&read(&path)).join("\n")))
            .collect();
        for cycle in import_cycles(&import_edges(&sources)) {
            violations.push(format!("{}: {cycle}", shown(&src)));
        }
    }
    assert_none(
        "modules of a crate import one way (move what both need into a module of its own)",
        &violations,
    );
}

#[test]
fn import_check_finds_a_cycle_through_a_group_and_ignores_root_items() {
    let sources = |files: &[(&str, &str)]| -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(m, code)| ((*m).to_owned(), (*code).to_owned()))
            .collect()
    };
    let one_way = sources(&[
        (
            "sink",
            "use crate::driver::{self, Started};\nuse crate::JetStreamSink;",
        ),
        (
            "driver",
            "use crate::handle::Shared;\nlet x = sink_core::crate::y;",
        ),
        ("handle", "use crate::Receipt;"),
    ]);
    assert_eq!(import_cycles(&import_edges(&one_way)), Vec::<String>::new());

    let cyclic = sources(&[
        ("a", "use crate::b::X;"),
        ("b", "use crate::{\n    c::{Y, Z},\n    d::inner::W,\n};"),
        ("c", "fn f() { crate::a::g() }"),
        ("d", "pub use crate::d::inner::W;"),
        ("d::inner", "use crate::d::V;"),
    ]);
    let edges = import_edges(&cyclic);
    assert_eq!(
        edges["b"],
        BTreeSet::from(["c".to_owned(), "d::inner".to_owned()])
    );
    assert_eq!(
        import_cycles(&edges),
        vec![
            "a -> b, b -> c, c -> a".to_owned(),
            "d -> d::inner, d::inner -> d".to_owned()
        ]
    );
}
