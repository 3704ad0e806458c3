//! `fleetbox image build`: a small Python image for the `docker` backend, made from this host's
//! interpreter and imported through the Docker Engine API (no registry needed).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use fleetbox_sandbox::docker::{self, image};

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build an image from this host's Python (its standard library and the libraries it links),
    /// optionally with packages from the package index, and import it into the local daemon.
    Build {
        /// The image's `name:tag`; runs use it with `--docker-image` / `DOCKER_IMAGE`.
        #[arg(long, default_value = docker::BUILT_IMAGE)]
        name: String,
        /// Packages to install into the image, comma-separated (`numpy,pandas==2.2.3`).
        #[arg(long = "with", value_delimiter = ',')]
        with: Vec<String>,
        /// The host interpreter to copy.
        #[arg(long, default_value = "/usr/bin/python3")]
        python: PathBuf,
        /// Fleetbox's own image: this `fleetbox` binary in it as the entry point
        /// (`docker run IMAGE server ...`, `docker run IMAGE agent ...`).
        #[arg(long)]
        fleetbox: bool,
        /// Build only when the daemon has no image of this name made by this version of
        /// Fleetbox (for provisioning scripts that run on every boot).
        #[arg(long, conflicts_with = "with")]
        if_outdated: bool,
    },
}

pub fn image(args: ImageArgs) -> anyhow::Result<ExitCode> {
    let ImageCommand::Build {
        name,
        with,
        python,
        fleetbox,
        if_outdated,
    } = args.command;
    let fleetbox = if fleetbox {
        Some(std::env::current_exe().context("finding this binary")?)
    } else {
        None
    };
    let packages: Vec<String> = with
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    for p in &packages {
        fleetbox_proto::environment::check_requirement(p)
            .map_err(|why| anyhow::anyhow!("`--with {p}`: {why}"))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let built = rt.block_on(async {
        // `DOCKER_HOST` when set, else the local socket.
        let host = std::env::var(fleetbox_proto::env::DOCKER_HOST).ok();
        let d = docker::connect(host.as_deref()).await?;
        let spec = image::ImageSpec {
            name,
            python,
            packages,
            fleetbox,
        };
        if if_outdated && image::is_current(&d, &spec.name).await {
            return anyhow::Ok(None);
        }
        let started = std::time::Instant::now();
        let built = image::build(&d, &spec, &|step| eprintln!("fleetbox: {step}")).await?;
        anyhow::Ok(Some((built, started.elapsed())))
    })?;
    let Some((built, took)) = built else {
        println!("the image is current: nothing built");
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "{} ({}) Python {}: {} files, {} MB, built in {:.1} s",
        built.name,
        built
            .id
            .trim_start_matches("sha256:")
            .get(..12)
            .unwrap_or(&built.id),
        built.python_version,
        built.files,
        built.bytes / 1_000_000,
        took.as_secs_f64()
    );
    if built.packages.is_empty() {
        println!(
            "packages: none beyond the standard library (numpy, pandas and the rest are not in it; add them with `--with numpy,pandas`, or let jobs ask with `[environment]`)"
        );
    } else {
        println!("packages: {}", built.packages.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
