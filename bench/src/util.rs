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
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
        let elapsed = time_once(argv, &[])?;
        if i >= 3 {
            times.push(elapsed);
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// One command of an interleaved comparison.
pub struct Cmd<'a> {
    pub argv: Vec<&'a str>,
    pub env: Vec<(&'a str, &'a str)>,
}

impl<'a> Cmd<'a> {
    pub fn new(argv: &[&'a str]) -> Self {
        Cmd {
            argv: argv.to_vec(),
            env: Vec::new(),
        }
    }
    pub fn env(mut self, key: &'a str, value: &'a str) -> Self {
        self.env.push((key, value));
        self
    }
}

/// Median wall time of each command over `runs` rounds, one run of every command per round
/// (after 3 warm-up rounds). Interleaving keeps a noisy host's slow minutes from landing on one
/// command only, which back-to-back blocks of runs do not.
pub fn interleaved_medians(cmds: &[Cmd<'_>], runs: usize) -> Result<Vec<Duration>, String> {
    let mut times = vec![Vec::with_capacity(runs); cmds.len()];
    for round in 0..runs + 3 {
        for (cmd, times) in cmds.iter().zip(times.iter_mut()) {
            let elapsed = time_once(&cmd.argv, &cmd.env)?;
            if round >= 3 {
                times.push(elapsed);
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect())
}

pub fn time_once(argv: &[&str], env: &[(&str, &str)]) -> Result<Duration, String> {
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
    Ok(elapsed)
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

/// The median of `xs` (0 for none).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
