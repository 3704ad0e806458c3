//! `fleetbox run --backend jail` on `pass` against bare `python3`, `bwrap --unshare-all` with
//! equivalent binds, and `docker run --rm --network none` when a daemon answers; plus the
//! timeout overshoot. Targets: under 5 ms over bare Python, no slower than bwrap, 20x faster
//! than docker run, overshoot under 10 ms.

use std::process::{Command, Stdio};

use crate::util::{Cmd, fleetbox_bin, interleaved_medians, median_of, ms, which};

pub fn run(runs: usize) -> Result<(), String> {
    let bin = fleetbox_bin()?;
    let bin = bin.to_str().ok_or("non-UTF-8 path")?;
    let dir = std::env::temp_dir().join(format!("fleetbox-bench-jail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pass = dir.join("pass.py");
    std::fs::write(&pass, "pass\n").map_err(|e| e.to_string())?;
    let pass = pass.to_str().ok_or("non-UTF-8 path")?;

    let bwrap = which("bwrap").map(|p| p.to_string_lossy().into_owned());
    // bwrap with the binds the jail makes (the interpreter's prefix, the merged-/usr links, a
    // fresh /proc, a minimal /dev, a private /tmp), and every namespace.
    let bwrap_argv: Vec<&str> = match &bwrap {
        Some(b) => vec![
            b.as_str(),
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--symlink",
            "usr/bin",
            "/bin",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--chdir",
            "/tmp",
            "/usr/bin/python3",
            "-I",
            "-B",
            "-c",
            "pass",
        ],
        None => Vec::new(),
    };
    let mut cmds = vec![
        Cmd::new(&["/usr/bin/python3", "-I", "-B", "-c", "pass"]),
        Cmd::new(&[bin, "run", "--backend", "jail", pass]),
        // bwrap sets no resource limits; the like-for-like comparison is a jail without cgroups.
        Cmd::new(&[bin, "run", "--backend", "jail", pass]).env("FLEETBOX_NO_CGROUPS", "1"),
    ];
    if bwrap.is_some() {
        cmds.push(Cmd::new(&bwrap_argv));
    }
    let m = interleaved_medians(&cmds, runs)?;
    let (bare, jail, jail_nocg) = (m[0], m[1], m[2]);
    println!("jail: median of {runs} interleaved runs of `pass`");
    println!("  bare python3 -I -B        {:8.2} ms", ms(bare));
    println!(
        "  fleetbox run --backend jail {:6.2} ms   overhead {:+.2} ms   bare/jail {:.2}",
        ms(jail),
        ms(jail) - ms(bare),
        ms(bare) / ms(jail)
    );
    println!(
        "  ... without cgroups       {:8.2} ms   overhead {:+.2} ms   (the cgroups cost {:+.2} ms)",
        ms(jail_nocg),
        ms(jail_nocg) - ms(bare),
        ms(jail) - ms(jail_nocg)
    );
    match m.get(3) {
        Some(&b) => println!(
            "  bwrap --unshare-all         {:6.2} ms   overhead {:+.2} ms   bwrap/jail {:.2}   bwrap/jail-without-cgroups {:.2}",
            ms(b),
            ms(b) - ms(bare),
            ms(b) / ms(jail),
            ms(b) / ms(jail_nocg)
        ),
        None => println!("  bwrap: not installed (apt-get install bubblewrap)"),
    }
    let docker_up = which("docker").is_some()
        && Command::new("docker")
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    match (docker_up, std::env::var("FLEETBOX_BENCH_DOCKER_IMAGE")) {
        (true, Ok(image)) => {
            let d = median_of(
                &[
                    "docker",
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    &image,
                    "/usr/bin/python3",
                    "-I",
                    "-B",
                    "-c",
                    "pass",
                ],
                runs.min(20),
            )?;
            println!(
                "  docker run --rm --network none {:6.2} ms   docker/jail {:.1}",
                ms(d),
                ms(d) / ms(jail)
            );
        }
        (true, Err(_)) => println!(
            "  docker: daemon up; set FLEETBOX_BENCH_DOCKER_IMAGE to a local Python image to compare"
        ),
        (false, _) => println!("  docker: no daemon answering `docker info`; skipped"),
    }

    // Timeout overshoot: `sleep` past a 200 ms timeout, wall time reported minus the limit.
    let sleep = dir.join("sleep.py");
    std::fs::write(&sleep, "import time\ntime.sleep(60)\n").map_err(|e| e.to_string())?;
    let sleep = sleep.to_str().ok_or("non-UTF-8 path")?;
    for backend in ["process", "jail"] {
        let mut over = Vec::new();
        for _ in 0..20 {
            let out = Command::new(bin)
                .args([
                    "run",
                    "--json",
                    "--backend",
                    backend,
                    "--timeout",
                    "200ms",
                    sleep,
                ])
                .stderr(Stdio::null())
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            let wall: u64 = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("\"wall_ms\": "))
                .and_then(|v| v.trim_end_matches(',').parse().ok())
                .ok_or("no wall_ms in report")?;
            over.push(wall.saturating_sub(200));
        }
        over.sort();
        println!(
            "  timeout overshoot ({backend:7}) median {} ms, max {} ms over 20 runs",
            over[over.len() / 2],
            over[over.len() - 1]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
