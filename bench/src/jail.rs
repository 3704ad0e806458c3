//! `fleetbox run --backend jail` on `pass` against bare `python3`, `bwrap --unshare-all` with
//! equivalent binds, and `docker run --rm --network none` when a daemon answers; plus the
//! timeout overshoot. Targets: under 5 ms over bare Python, no slower than bwrap, 20x faster
//! than docker run, overshoot under 10 ms.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetbox_proto::Limits;
use fleetbox_sandbox::jail::JailSandbox;
use fleetbox_sandbox::{RunRequest, Sandbox, SandboxConfig, Status};

use crate::util::{Cmd, fleetbox_bin, interleaved_medians, median_of, ms, time_once, which};

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
    println!("cold: one `fleetbox run` process per run, as from a shell");
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
    let warm = warm(bin, runs)?;
    println!(
        "warm: the agent's path; a jail (namespaces, root, cgroup, limits, Landlock, seccomp) and its interpreter built ahead, one per run"
    );
    println!(
        "  bare python3 -I -B          {:6.2} ms   (measured in the same rounds)",
        ms(warm.bare)
    );
    println!(
        "  warm jail, program arriving {:6.2} ms   overhead {:+.2} ms   bare/warm {:.2}   bwrap/warm {}",
        ms(warm.latency),
        ms(warm.latency) - ms(warm.bare),
        ms(warm.bare) / ms(warm.latency),
        m.get(3).map_or("-".to_string(), |b| format!(
            "{:.2}",
            ms(*b) / ms(warm.latency)
        ))
    );
    println!(
        "  back to back, {runs} runs: {:.2} ms per run against {:.2} ms for bare python3 (ratio {:.2}); the next jail builds while one runs",
        ms(warm.back_to_back),
        ms(warm.bare_back_to_back),
        ms(warm.back_to_back) / ms(warm.bare_back_to_back)
    );
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
                "  docker run --rm --network none {:6.2} ms   docker/jail {:.1} (cold)   docker/jail {:.1} (warm)",
                ms(d),
                ms(d) / ms(jail),
                ms(d) / ms(warm.latency)
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

struct Warm {
    /// Median from handing `pass` to a waiting warm jail to holding its report.
    latency: Duration,
    /// Bare `python3 -I -B -c pass`, timed in the same rounds.
    bare: Duration,
    /// Mean per run of `runs` warm runs one after another (no waiting for the pool).
    back_to_back: Duration,
    bare_back_to_back: Duration,
}

/// The warm path through the library, as an agent runs it: each round waits until the pool
/// has a jail ready (untimed, as between shards arriving), then times one run.
fn warm(bin: &str, runs: usize) -> Result<Warm, String> {
    let sandbox = JailSandbox::new(SandboxConfig {
        jail_helper: Some(bin.into()),
        warm: 1,
        ..SandboxConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let limits = Limits::default();
    let req = RunRequest::new(b"pass\n".to_vec(), None, limits.clone());
    let bare_argv = ["/usr/bin/python3", "-I", "-B", "-c", "pass"];
    let run = |expect_warm: bool| -> Result<Duration, String> {
        let start = Instant::now();
        let r = sandbox.run(&req);
        let took = start.elapsed();
        if r.status != Status::Ok {
            return Err(format!(
                "warm jail run failed: {:?} {:?}",
                r.status, r.message
            ));
        }
        if expect_warm && !r.notes.iter().any(|n| n.starts_with("warm start")) {
            return Err("the run did not start warm".into());
        }
        Ok(took)
    };
    run(false)?;
    let (mut lat, mut bare) = (Vec::new(), Vec::new());
    for round in 0..runs + 3 {
        let b = time_once(&bare_argv, &[])?;
        if !sandbox.wait_warm(&limits, Duration::from_secs(10)) {
            return Err("no warm jail came within 10 s".into());
        }
        let w = run(true)?;
        if round >= 3 {
            lat.push(w);
            bare.push(b);
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    sandbox.wait_warm(&limits, Duration::from_secs(10));
    let start = Instant::now();
    for _ in 0..runs {
        run(false)?;
    }
    let back_to_back = start.elapsed() / runs as u32;
    let start = Instant::now();
    for _ in 0..runs {
        time_once(&bare_argv, &[])?;
    }
    let bare_back_to_back = start.elapsed() / runs as u32;
    Ok(Warm {
        latency: median(lat),
        bare: median(bare),
        back_to_back,
        bare_back_to_back,
    })
}
