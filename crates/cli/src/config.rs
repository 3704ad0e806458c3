//! Configuration layering, resolved in one place: defaults < `fleetbox.toml` < environment < flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fleetbox_proto::{ByteSize, Limits, Millis, env};
use fleetbox_sandbox::docker::DockerConfig;
use serde::Deserialize;

/// `fleetbox.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub review: ReviewSection,
}

/// `[review]`: the coordinator's code review (flags override it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewSection {
    /// How many points the model reviewer may lower the rules' risk by (0: only raise it).
    pub llm_max_lowering: Option<u32>,
}

/// `[agent]`: an agent's policy, what it lets a job ask of this machine (flags override it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub max_timeout: Option<Millis>,
    pub max_memory: Option<ByteSize>,
    pub max_output: Option<ByteSize>,
    pub max_cpus: Option<f64>,
    pub max_processes: Option<u32>,
    pub max_file_size: Option<ByteSize>,
    pub max_open_files: Option<u32>,
    pub max_tmp_size: Option<ByteSize>,
    pub max_workspace_size: Option<ByteSize>,
    pub max_workspace_files: Option<u64>,
    pub max_listed_files: Option<u32>,
    pub max_hashed_bytes: Option<ByteSize>,
    pub allow_network: Option<bool>,
}

/// `[run]`: defaults for `fleetbox run` (and, later, for agents' sandboxes).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub backend: Option<String>,
    pub timeout: Option<Millis>,
    pub cpu_time: Option<Millis>,
    pub memory: Option<ByteSize>,
    pub max_output: Option<ByteSize>,
    pub max_processes: Option<u32>,
    pub max_file_size: Option<ByteSize>,
    pub workspace_size: Option<ByteSize>,
    pub python: Option<PathBuf>,
    pub work_root: Option<PathBuf>,
    /// `docker` backend: the image (env `DOCKER_IMAGE`).
    pub docker_image: Option<String>,
    /// `docker` backend: the OCI runtime, e.g. `runsc` (env `DOCKER_RUNTIME`).
    pub docker_runtime: Option<String>,
}

impl FileConfig {
    /// Load the explicit file (must exist) or `./fleetbox.toml` (optional).
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<FileConfig> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from("fleetbox.toml"), false),
        };
        let text = match fs_err::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FileConfig::default());
            }
            Err(e) => return Err(e).context("reading the configuration file"),
        };
        toml::from_str(&text)
            .with_context(|| format!("invalid configuration in `{}`", path.display()))
    }
}

/// Read an environment variable, treating empty as unset.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Parse an environment value, naming the variable on failure.
fn env_parse<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("invalid `{name}={v}`: {e}")),
    }
}

/// Flags of `fleetbox run` that take part in layering.
#[derive(Debug, Default)]
pub struct RunFlags {
    pub backend: Option<String>,
    pub timeout: Option<Millis>,
    pub cpu_time: Option<Millis>,
    pub memory: Option<ByteSize>,
    pub max_output: Option<ByteSize>,
    pub workspace_size: Option<ByteSize>,
    pub docker_image: Option<String>,
    pub docker_runtime: Option<String>,
}

/// The resolved settings for one `fleetbox run`.
#[derive(Debug)]
pub struct RunSettings {
    pub backend: String,
    pub limits: Limits,
    pub python: Option<PathBuf>,
    pub work_root: PathBuf,
    pub use_cgroups: bool,
    /// `FLEETBOX_CGROUP_ROOT`: the parent cgroup for runs.
    pub cgroup_root: Option<PathBuf>,
    /// `FLEETBOX_JAIL_TRACE=1`: the jail's start-up phases in each report.
    pub trace: bool,
    pub docker: DockerConfig,
}

/// The seed's `docker` settings: image, runtime and daemon (`flags < env < file < default`
/// as everywhere else: flag first).
pub fn resolve_docker(
    file: &RunSection,
    image: Option<String>,
    runtime: Option<String>,
) -> DockerConfig {
    DockerConfig {
        image: image
            .or_else(|| var(env::DOCKER_IMAGE))
            .or_else(|| file.docker_image.clone())
            .unwrap_or_else(|| fleetbox_sandbox::docker::DEFAULT_IMAGE.to_string()),
        runtime: runtime
            .or_else(|| var(env::DOCKER_RUNTIME))
            .or_else(|| file.docker_runtime.clone()),
        host: var(env::DOCKER_HOST),
    }
}

/// The seed's `DOCKER_NETWORK_ENABLED`: `true`/`1`/`yes` or `false`/`0`/`no`.
fn env_bool(name: &str) -> anyhow::Result<Option<bool>> {
    match var(name) {
        None => Ok(None),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "0" | "false" | "no" | "off" => Ok(Some(false)),
            _ => bail!("invalid `{name}={v}`: expected true or false"),
        },
    }
}

pub fn resolve_run(file: &FileConfig, flags: RunFlags) -> anyhow::Result<RunSettings> {
    let f = &file.run;
    let mut limits = Limits::default();

    let backend = flags
        .backend
        .or_else(|| var(env::SANDBOX_TYPE))
        .or_else(|| f.backend.clone());
    let backend = match backend {
        Some(b) => b,
        None => fleetbox_sandbox::Backend::default_for_host().to_string(),
    };

    // SANDBOX_TIMEOUT_SEC: a bare number is seconds (the seed's meaning); `500ms` also works.
    let env_timeout: Option<Millis> = env_parse(env::SANDBOX_TIMEOUT_SEC)?;
    if let Some(t) = flags.timeout.or(env_timeout).or(f.timeout) {
        limits.timeout = t;
    }
    let env_cpu: Option<Millis> = env_parse(env::FLEETBOX_CPU_TIME)?;
    match flags.cpu_time.or(env_cpu).or(f.cpu_time) {
        Some(c) => limits.cpu_time = c,
        // CPU time defaults to the wall timeout: a single-threaded program cannot use more.
        None => limits.cpu_time = limits.timeout,
    }
    let docker = backend.trim().eq_ignore_ascii_case("docker");
    let env_memory: Option<ByteSize> = env_parse(env::FLEETBOX_MEMORY)?;
    // The seed's docker variables apply to docker runs only, in the seed's units (`256m`, `0.5`).
    let docker_memory: Option<ByteSize> = if docker {
        env_parse(env::DOCKER_MEMORY_LIMIT)?
    } else {
        None
    };
    if let Some(m) = flags.memory.or(env_memory).or(docker_memory).or(f.memory) {
        limits.memory = m;
    }
    if docker {
        let cpus: Option<f64> = env_parse(env::DOCKER_CPU_LIMIT)?;
        limits.cpus = cpus.unwrap_or(0.5);
        if !(limits.cpus > 0.0 && limits.cpus.is_finite()) {
            bail!(
                "`{}` must be a positive number of cores",
                env::DOCKER_CPU_LIMIT
            );
        }
        if env_bool(env::DOCKER_NETWORK_ENABLED)?.unwrap_or(false) {
            limits.network = fleetbox_proto::Network::Host;
        }
    }
    // SANDBOX_MAX_OUTPUT_KB: a bare number is KiB (the seed's meaning); `1MiB` also works.
    let env_output =
        match var(env::SANDBOX_MAX_OUTPUT_KB) {
            None => None,
            Some(v) if v.trim().chars().all(|c| c.is_ascii_digit()) => {
                let kib: u64 = v.trim().parse().map_err(|e| {
                    anyhow::anyhow!("invalid `{}={v}`: {e}", env::SANDBOX_MAX_OUTPUT_KB)
                })?;
                Some(ByteSize::kib(kib))
            }
            Some(v) => Some(v.parse::<ByteSize>().map_err(|e| {
                anyhow::anyhow!("invalid `{}={v}`: {e}", env::SANDBOX_MAX_OUTPUT_KB)
            })?),
        };
    if let Some(o) = flags.max_output.or(env_output).or(f.max_output) {
        limits.max_output = o;
    }
    if let Some(p) = f.max_processes {
        limits.max_processes = p;
    }
    if let Some(s) = f.max_file_size {
        limits.max_file_size = s;
    }
    if let Some(s) = flags.workspace_size.or(f.workspace_size) {
        limits.workspace_size = s;
    }
    if limits.timeout.0 == 0 {
        bail!("the timeout must be greater than zero");
    }
    if limits.memory.0 < ByteSize::mib(16).0 {
        bail!(
            "the memory limit `{}` is too small for Python (at least 16MiB)",
            limits.memory
        );
    }
    let python = var(env::FLEETBOX_PYTHON)
        .map(PathBuf::from)
        .or_else(|| f.python.clone());
    let work_root = var(env::FLEETBOX_WORK_ROOT)
        .map(PathBuf::from)
        .or_else(|| f.work_root.clone())
        .unwrap_or_else(std::env::temp_dir);
    let use_cgroups = var(env::FLEETBOX_NO_CGROUPS).is_none_or(|v| v == "0");
    let docker = resolve_docker(f, flags.docker_image, flags.docker_runtime);
    Ok(RunSettings {
        backend,
        limits,
        python,
        work_root,
        use_cgroups,
        cgroup_root: var(env::FLEETBOX_CGROUP_ROOT).map(PathBuf::from),
        trace: var(env::FLEETBOX_JAIL_TRACE).is_some_and(|v| v == "1"),
        docker,
    })
}

/// `--timeout 5s`-style flags (clap's `value_parser`).
pub(crate) fn parse_millis(s: &str) -> Result<fleetbox_proto::Millis, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// `--memory 256MiB`-style flags (clap's `value_parser`).
pub(crate) fn parse_size(s: &str) -> Result<fleetbox_proto::ByteSize, String> {
    s.parse().map_err(|e| format!("{e}"))
}
