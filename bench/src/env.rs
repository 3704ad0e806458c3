//! Job environments (`[environment] requirements`): what the first shard that needs a small
//! environment pays (building it, with uv and with pip), and what every shard after it pays,
//! against a shard without an environment in the same warm-jail pool. Target: after the first
//! build, no slower than a shard without an environment, within noise.
//!
//! Builds reach the package index the machine is configured with (PyPI by default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetbox_proto::{EnvironmentSpec, Limits};
use fleetbox_sandbox::environment::{EnvConfig, Environments, Installer};
use fleetbox_sandbox::jail::JailSandbox;
use fleetbox_sandbox::{RunRequest, Sandbox, SandboxConfig, Status};

use crate::util::{fleetbox_bin, ms};

pub fn run(runs: usize, builds: usize) -> Result<(), String> {
    let bin = fleetbox_bin()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = |warm: usize| SandboxConfig {
        jail_helper: Some(bin.clone()),
        warm,
        work_root: dir.path().join("work"),
        ..SandboxConfig::default()
    };
    let spec = EnvironmentSpec {
        requirements: vec!["six==1.16.0".into()],
        requirements_file: None,
    };
    let uv = match Installer::parse("uv") {
        Ok(i) => Some(i),
        Err(_) => std::env::var_os("FLEETBOX_TEST_UV").map(|p| Installer::Uv(p.into())),
    };

    println!(
        "env: a small environment ({}), jail backend",
        spec.requirements.join(", ")
    );
    println!("first use: building it in a fresh cache (median of {builds})");
    let builder: Arc<dyn Sandbox> =
        Arc::new(JailSandbox::new(config(0)).map_err(|e| e.to_string())?);
    let mut installers = vec![("pip", Installer::Pip)];
    if let Some(uv) = uv.clone() {
        installers.insert(0, ("uv", uv));
    }
    for (name, installer) in installers {
        let mut times = Vec::new();
        for i in 0..builds {
            let mut c = EnvConfig::new(dir.path().join(format!("cache-{name}-{i}")));
            c.installer = installer.clone();
            let envs = Environments::new(c, builder.clone(), None);
            let start = Instant::now();
            envs.get(&spec).map_err(|e| e.to_string())?;
            times.push(start.elapsed());
        }
        times.sort();
        println!("  {name:<4} {:8.1} ms", ms(times[times.len() / 2]));
    }

    // Every shard after the first: the same warm pool serves both kinds of runs.
    let sandbox = Arc::new(JailSandbox::new(config(2)).map_err(|e| e.to_string())?);
    let mut c = EnvConfig::new(dir.path().join("cache-shards"));
    if let Some(uv) = uv {
        c.installer = uv;
    }
    let envs = Environments::new(c, sandbox.clone(), None);
    drop(envs.get(&spec).map_err(|e| e.to_string())?);
    // No imports: the host interpreter's `site` (Debian's `.pth` files) already imported
    // `re`, `enum` and friends before a warm jail's program arrives, and a venv's does not, so a
    // program importing them would measure that, not the environment.
    let code = b"print(1)\n".to_vec();
    let plain = RunRequest::new(code.clone(), None, Limits::default());
    let with_env = |held: &fleetbox_sandbox::environment::EnvGuard| {
        let mut req = RunRequest::new(code.clone(), None, Limits::default());
        req.environment = Some(held.environment.clone());
        req
    };
    let check = |r: &fleetbox_proto::ExecutionReport, warm: bool| -> Result<(), String> {
        if r.status != Status::Ok {
            return Err(format!("run failed: {:?} {:?}", r.status, r.message));
        }
        if warm && !r.notes.iter().any(|n| n.starts_with("warm start")) {
            return Err("the run did not start warm".into());
        }
        Ok(())
    };
    // One of each first, so the pool has built both shapes.
    check(&sandbox.run(&plain), false)?;
    {
        let held = envs.get(&spec).map_err(|e| e.to_string())?;
        check(&sandbox.run(&with_env(&held)), false)?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let env_req = {
        let held = envs.get(&spec).map_err(|e| e.to_string())?;
        with_env(&held)
    };
    // Before each timed run both kinds of jail are waiting, so no build competes with it.
    let both_ready = || -> Result<(), String> {
        for req in [&plain, &env_req] {
            if !sandbox.wait_warm_for(req, Duration::from_secs(10)) {
                return Err("no warm jail came within 10 s".into());
            }
        }
        Ok(())
    };
    for round in 0..runs + 3 {
        both_ready()?;
        let start = Instant::now();
        check(&sandbox.run(&plain), true)?;
        let t_plain = start.elapsed();
        both_ready()?;
        // Timed as a shard pays it: taking the environment from the cache, then the run.
        let start = Instant::now();
        let held = envs.get(&spec).map_err(|e| e.to_string())?;
        check(&sandbox.run(&with_env(&held)), true)?;
        let t_env = start.elapsed();
        drop(held);
        if round >= 3 {
            a.push(t_plain);
            b.push(t_env);
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (plain_ms, env_ms) = (ms(median(a)), ms(median(b)));
    let start = Instant::now();
    for _ in 0..1000 {
        drop(envs.get(&spec).map_err(|e| e.to_string())?);
    }
    let get_us = start.elapsed().as_secs_f64() * 1e6 / 1000.0;
    println!("every shard after it: warm jail, median of {runs} interleaved rounds");
    println!("  taking it from the cache {get_us:8.1} us (mean of 1000)");
    println!("  no environment        {plain_ms:8.2} ms");
    println!(
        "  with the environment  {env_ms:8.2} ms   env/none {:.2}",
        env_ms / plain_ms
    );
    // Cold jails (no pool), for the record: the environment's extra bind mount.
    let cold = JailSandbox::new(config(0)).map_err(|e| e.to_string())?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..runs + 3 {
        let start = Instant::now();
        check(&cold.run(&plain), false)?;
        let t_plain = start.elapsed();
        let start = Instant::now();
        let held = envs.get(&spec).map_err(|e| e.to_string())?;
        check(&cold.run(&with_env(&held)), false)?;
        let t_env = start.elapsed();
        if round >= 3 {
            a.push(t_plain);
            b.push(t_env);
        }
    }
    let (plain_ms, env_ms) = (ms(median(a)), ms(median(b)));
    println!("cold jails (no pool), median of {runs} interleaved rounds");
    println!("  no environment        {plain_ms:8.2} ms");
    println!(
        "  with the environment  {env_ms:8.2} ms   env/none {:.2}",
        env_ms / plain_ms
    );
    Ok(())
}
