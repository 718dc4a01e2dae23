//! Project tooling entry point: `cargo xtask test | demo | bench | nats-server`.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("xtask: not yet")
}
