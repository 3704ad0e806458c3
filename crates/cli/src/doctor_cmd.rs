//! `fleetbox doctor`: whether this host can run a backend, and for each miss the one-line fix.

use std::path::PathBuf;
use std::process::ExitCode;

use fleetbox_sandbox::doctor::{self, Check, Target};

use crate::jobs_cmd::runtime;
use crate::term;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The backend to check for: `jail`, `docker`, `gvisor` (docker on `runsc`) or `process`.
    #[arg(long, default_value = "jail", value_parser = ["jail", "docker", "gvisor", "process"])]
    pub backend: String,
    /// The interpreter runs use (default: `python3` on `PATH`).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// The `docker` backend's image.
    #[arg(long, env = fleetbox_proto::env::DOCKER_IMAGE, default_value = fleetbox_sandbox::docker::DEFAULT_IMAGE)]
    pub docker_image: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Exit 0 when the backend can run here (misses that only weaken a limit are warnings), 1
/// when it cannot.
pub fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let target = Target::parse(&args.backend).unwrap_or(Target::Jail);
    let docker = fleetbox_sandbox::docker::DockerConfig {
        image: args.docker_image.clone(),
        runtime: (target == Target::Gvisor).then(|| "runsc".to_string()),
        host: std::env::var(fleetbox_proto::env::DOCKER_HOST).ok(),
    };
    let checks = runtime()?.block_on(doctor::examine(target, args.python.as_deref(), &docker));
    let can = doctor::can_run(&checks);
    if args.json {
        let out = serde_json::json!({
            "backend": target.as_str(),
            "can_run": can,
            "checks": checks,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_checks(target, &checks, can);
    }
    Ok(if can {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_checks(target: Target, checks: &[Check], can: bool) {
    println!(
        "fleetbox doctor: the {} backend on this host",
        target.as_str()
    );
    for c in checks {
        let mark = match (c.ok, c.required) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        println!("  {mark}  {:<28} {}", c.name, term::for_stdout(&c.detail));
        if let Some(fix) = &c.fix {
            println!("        {:<28} fix: {fix}", "");
        }
    }
    let warnings = checks.iter().filter(|c| !c.ok && !c.required).count();
    if can {
        println!(
            "the {} backend can run here{}",
            target.as_str(),
            match warnings {
                0 => String::new(),
                n => format!(" ({n} warning(s): limits weaker than they could be)"),
            }
        );
    } else {
        println!(
            "the {} backend cannot run here: fix the FAIL lines",
            target.as_str()
        );
    }
}
