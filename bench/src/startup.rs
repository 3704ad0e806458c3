//! `fleetbox run` on `pass` against bare `python3 -I -B -c pass`: the sandbox's start-to-exit
//! overhead. Target: under 5 ms, ratio under 1.5.

use crate::util::{Cmd, fleetbox_bin, interleaved_medians, ms};

pub fn run(runs: usize) -> Result<(), String> {
    let bin = fleetbox_bin()?;
    let bin = bin.to_str().ok_or("non-UTF-8 path")?;
    let dir = std::env::temp_dir().join(format!("fleetbox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pass = dir.join("pass.py");
    std::fs::write(&pass, "pass\n").map_err(|e| e.to_string())?;
    let pass = pass.to_str().ok_or("non-UTF-8 path")?;

    let python = "/usr/bin/python3";
    let m = interleaved_medians(
        &[
            Cmd::new(&[python, "-I", "-B", "-c", "pass"]),
            Cmd::new(&[bin, "run", "--backend", "process", pass]),
        ],
        runs,
    )?;
    let (bare, process) = (m[0], m[1]);
    println!("startup: median of {runs} interleaved runs of `pass`");
    println!("  bare python3 -I -B      {:8.2} ms", ms(bare));
    println!(
        "  fleetbox run process    {:8.2} ms   overhead {:+.2} ms   ratio {:.2}",
        ms(process),
        ms(process) - ms(bare),
        ms(process) / ms(bare)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
