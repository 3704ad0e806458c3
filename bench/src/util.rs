//! Timing helpers shared by the benchmarks.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn flag(args: &[String], name: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

/// The release `fleetbox` binary next to this benchmark (build it first: `cargo build --release`).
pub fn fleetbox_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("fleetbox");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "`{}` not found: run `cargo build --release -p fleetbox` first",
            bin.display()
        ))
    }
}

/// Median wall time of `runs` executions of `argv` (after 3 warm-up runs).
pub fn median_of(argv: &[&str], runs: usize) -> Result<Duration, String> {
    median_of_env(argv, &[], runs)
}

/// [`median_of`] with extra environment variables.
pub fn median_of_env(argv: &[&str], env: &[(&str, &str)], runs: usize) -> Result<Duration, String> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
        let start = Instant::now();
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("running `{}`: {e}", argv[0]))?;
        let elapsed = start.elapsed();
        if !status.success() {
            return Err(format!("`{}` failed: {status}", argv.join(" ")));
        }
        if i >= 3 {
            times.push(elapsed);
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
