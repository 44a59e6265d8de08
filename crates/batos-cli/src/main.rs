//! The `batos` command-line tool.

fn main() -> anyhow::Result<()> {
    println!("batos {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
