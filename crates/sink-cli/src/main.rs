//! The `jetsink` operator CLI (publish, stream ensure/verify, audit, bench, doctor).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("jetsink: no subcommands yet; see the README")
}
