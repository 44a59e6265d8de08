//! What one commit's `fdatasync` costs on this disk, by write size and file state: appending
//! to a growing file, overwriting space preallocated with `fallocate` (unwritten extents),
//! and overwriting space zero-filled ahead of time (what the commit log does). The three
//! files are written in turn, one write each per round, so they see the same disk weather.
//!
//! `BATOS_BENCH_DIR=/tmp cargo run --release -p batos-store --example fsync_latency -- 200 4096,98304,262144`

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Grow,
    Fallocate,
    ZeroFilled,
}

fn open(dir: &std::path::Path, mode: Mode, bytes: u64) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(format!("{mode:?}")))?;
    match mode {
        Mode::Grow => {}
        Mode::Fallocate => fs4::fs_std::FileExt::allocate(&f, bytes)?,
        Mode::ZeroFilled => {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < bytes {
                f.write_all_at(&zeros, at)?;
                at += zeros.len() as u64;
            }
        }
    }
    f.sync_all()?;
    Ok(f)
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let sizes: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "4096,98304,262144".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let base = std::env::var_os("BATOS_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base)?;
    for size in sizes {
        let total = (size * rounds) as u64 + (1 << 20);
        let modes = [Mode::Grow, Mode::Fallocate, Mode::ZeroFilled];
        let files = modes
            .iter()
            .map(|&m| open(dir.path(), m, total))
            .collect::<std::io::Result<Vec<_>>>()?;
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let mut times = vec![Vec::with_capacity(rounds); modes.len()];
        for r in 0..rounds {
            for (f, t) in files.iter().zip(times.iter_mut()) {
                f.write_all_at(&data, (r * size) as u64)?;
                let start = Instant::now();
                f.sync_data()?;
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        for (m, mut t) in modes.iter().zip(times) {
            t.sort_by(f64::total_cmp);
            let mean = t.iter().sum::<f64>() / t.len() as f64;
            println!(
                "{size:>7} B {:<11} fdatasync ms: p10 {:.2}  median {:.2}  p90 {:.2}  mean {mean:.2}",
                format!("{m:?}"),
                t[t.len() / 10],
                t[t.len() / 2],
                t[t.len() * 9 / 10],
            );
        }
    }
    Ok(())
}
