//! The `docker` backend on `pass`: `docker run` from the CLI (as the seed's example runs code),
//! our cold backend (a container per run, through the Engine API), our warm backend (a started
//! container waiting per slot), the same two under gVisor (`runsc`), a warm jail, and bare
//! `python3`, all in one run. Target: warm docker under 30 ms per shard.

use std::time::{Duration, Instant};

use fleetbox_proto::Limits;
use fleetbox_sandbox::docker::{DockerConfig, DockerSandbox};
use fleetbox_sandbox::jail::JailSandbox;
use fleetbox_sandbox::{RunRequest, Sandbox, SandboxConfig, Status};

use crate::util::{median_of, ms};

const IMAGE: &str = fleetbox_sandbox::docker::BUILT_IMAGE;

fn config(runtime: Option<&str>, warm: usize) -> SandboxConfig {
    SandboxConfig {
        warm,
        docker: DockerConfig {
            image: std::env::var("DOCKER_IMAGE").unwrap_or_else(|_| IMAGE.into()),
            runtime: runtime.map(str::to_string),
            host: None,
        },
        ..SandboxConfig::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median time of `run` on `pass`; with `warm`, each run first waits for its container.
fn time_runs(
    sb: &dyn Sandbox,
    warm: Option<&DockerSandbox>,
    runs: usize,
) -> Result<Duration, String> {
    let req = RunRequest::new(b"pass\n".to_vec(), None, Limits::default());
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        if let Some(d) = warm
            && !d.wait_warm(&req, Duration::from_secs(30))
        {
            return Err("no warm container came within 30 s".into());
        }
        let t = Instant::now();
        let r = sb.run(&req);
        times.push(t.elapsed());
        if r.status != Status::Ok {
            return Err(format!("`pass` ended {:?}: {:?}", r.status, r.message));
        }
    }
    Ok(median(times))
}

pub fn run(runs: usize) -> Result<(), String> {
    let image = std::env::var("DOCKER_IMAGE").unwrap_or_else(|_| IMAGE.into());
    let runs = runs.max(5);
    let bare = median_of(&["/usr/bin/python3", "-I", "-B", "-c", "pass"], runs)?;
    let cli = median_of(
        &[
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-m",
            "256m",
            "--pids-limit",
            "64",
            "--cpus",
            "0.5",
            "--user",
            "65534:65534",
            "--tmpfs",
            "/tmp",
            &image,
            "python3",
            "-I",
            "-B",
            "-c",
            "pass",
        ],
        runs,
    )?;
    let cold = DockerSandbox::new(config(None, 0)).map_err(|e| e.to_string())?;
    time_runs(&cold, None, 1)?; // the image's interpreter is asked once per process
    let cold_t = time_runs(&cold, None, runs)?;
    let warm = DockerSandbox::new(config(None, 1)).map_err(|e| e.to_string())?;
    warm.prewarm(&RunRequest::new(
        b"pass\n".to_vec(),
        None,
        Limits::default(),
    ));
    let warm_t = time_runs(&warm, Some(&warm), runs)?;
    let b2b_start = Instant::now();
    for _ in 0..runs {
        let r = warm.run(&RunRequest::new(
            b"pass\n".to_vec(),
            None,
            Limits::default(),
        ));
        if r.status != Status::Ok {
            return Err(format!("back to back: {:?}", r.message));
        }
    }
    let b2b = b2b_start.elapsed() / runs as u32;
    let gv_cold = DockerSandbox::new(config(Some("runsc"), 0)).map_err(|e| e.to_string())?;
    time_runs(&gv_cold, None, 1)?;
    let gv_cold_t = time_runs(&gv_cold, None, runs)?;
    let gv_warm = DockerSandbox::new(config(Some("runsc"), 1)).map_err(|e| e.to_string())?;
    gv_warm.prewarm(&RunRequest::new(
        b"pass\n".to_vec(),
        None,
        Limits::default(),
    ));
    let gv_warm_t = time_runs(&gv_warm, Some(&gv_warm), runs)?;
    let jail = JailSandbox::new(SandboxConfig {
        warm: 1,
        ..SandboxConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let jail_req = RunRequest::new(b"pass\n".to_vec(), None, Limits::default());
    let mut jail_times = Vec::new();
    for _ in 0..runs {
        jail.wait_warm(&jail_req.limits, Duration::from_secs(10));
        let t = Instant::now();
        jail.run(&jail_req);
        jail_times.push(t.elapsed());
    }
    let jail_t = median(jail_times);

    println!("docker: median of {runs} runs of `pass` (image {image})");
    println!("  bare python3 -I -B              {:8.2} ms", ms(bare));
    println!("  docker run (CLI, seed's flags)  {:8.2} ms", ms(cli));
    println!(
        "  docker backend, cold            {:8.2} ms   docker-run/cold {:.2}",
        ms(cold_t),
        ms(cli) / ms(cold_t)
    );
    println!(
        "  docker backend, warm            {:8.2} ms   docker-run/warm {:.2}   (target < 30 ms)",
        ms(warm_t),
        ms(cli) / ms(warm_t)
    );
    println!(
        "  ... warm, back to back          {:8.2} ms per run (the next container starts while one runs)",
        ms(b2b)
    );
    println!(
        "  docker + runsc (gVisor), cold   {:8.2} ms   docker-run/runsc-cold {:.2}",
        ms(gv_cold_t),
        ms(cli) / ms(gv_cold_t)
    );
    println!(
        "  docker + runsc (gVisor), warm   {:8.2} ms   docker-run/runsc-warm {:.2}",
        ms(gv_warm_t),
        ms(cli) / ms(gv_warm_t)
    );
    println!(
        "  warm jail                       {:8.2} ms   warm-docker/warm-jail {:.2}",
        ms(jail_t),
        ms(warm_t) / ms(jail_t)
    );
    Ok(())
}
