//! Run one Python program under hard limits and describe what happened.
//!
//! A [`Sandbox`] takes a [`RunRequest`] (code, optional JSON input, shard-contract environment,
//! [`Limits`]) and always returns an [`ExecutionReport`], whose `status` says how the run ended;
//! failures of the sandbox itself are `sandbox_error` reports, never panics. Backends:
//!
//! - [`Backend::Process`] (the seed's `local`): scrubbed environment, own session, rlimits,
//!   a cgroup where the host allows, runs as `nobody` when started as root.
//! - [`Backend::Jail`]: namespaces, a new root, seccomp, Landlock and cgroups (Linux).
//! - [`Backend::Docker`]: one container per run through the Docker Engine API, optionally under
//!   gVisor (`runsc`); see [`docker`].
//!
//! This crate knows nothing of jobs, HTTP or databases.

mod cancel;
pub mod cgroup;
pub mod docker;
pub mod doctor;
pub mod egress;
pub mod environment;
pub mod jail;
mod process;
pub mod python;
pub mod remove;
mod report;
pub mod session;
mod supervise;
mod sys;
pub mod traceback;
mod walk;
pub mod workspace;

use std::path::PathBuf;
use std::str::FromStr;

pub use cancel::Cancel;
pub use fleetbox_proto::{ExecutionReport, Limits, Status};
pub use jail::seccomp::Mode as SeccompMode;
pub use process::ProcessSandbox;

/// Environment variable names, re-exported for the modules of this crate.
pub(crate) use fleetbox_proto::env;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Python source.
    pub code: Vec<u8>,
    /// This shard's JSON input, written to `input.json` in the workspace.
    pub input: Option<Vec<u8>>,
    /// Files put in the workspace before the program starts (relative name, content); not
    /// listed as created unless the program changes them.
    pub files: Vec<(String, Vec<u8>)>,
    /// Extra environment (the shard contract's `FLEETBOX_*` variables).
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// Leave the run directory in place and name it in the report.
    pub keep_workspace: bool,
    /// Who runs it, for the report's `runner.id` (`local`, `server`, an agent id).
    pub runner_id: String,
    /// Stops the run from outside; it then ends `killed` with the reason given.
    pub cancel: Option<Cancel>,
    /// A virtual environment to run in: its interpreter runs the program, and a jail binds its
    /// directory read-only at the same path. Made by [`environment::Environments`].
    pub environment: Option<Environment>,
    /// Host paths a jail shows at the same path (read-only unless `writable`); `process` runs
    /// see the host anyway. Only for the sandbox's own work (building an environment): a run
    /// with a writable mount never uses a warm jail.
    pub mounts: Vec<Mount>,
    /// The program's stdin (a session's channel, see [`session`]); `/dev/null` when absent.
    pub stdin: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Told the run directory's host path once it exists (`process` runs; a session reads its
    /// calls' files from it).
    pub workspace_to: Option<std::sync::mpsc::SyncSender<PathBuf>>,
}

/// A ready virtual environment, as a run uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// Its directory (the virtual environment's prefix).
    pub dir: PathBuf,
    /// Its interpreter, `dir/bin/python`.
    pub python: PathBuf,
    /// Hash and resolved packages, for the report.
    pub info: fleetbox_proto::EnvironmentInfo,
}

/// One extra path a jail shows at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mount {
    pub path: PathBuf,
    pub writable: bool,
}

impl RunRequest {
    /// A request with the shard contract's variables set (`FLEETBOX_INPUT` only with an input).
    pub fn new(code: impl Into<Vec<u8>>, input: Option<Vec<u8>>, limits: Limits) -> Self {
        let mut env = Vec::new();
        if input.is_some() {
            env.push((
                env::FLEETBOX_INPUT.to_string(),
                workspace::INPUT_FILE.to_string(),
            ));
        }
        RunRequest {
            code: code.into(),
            input,
            files: Vec::new(),
            env,
            limits,
            keep_workspace: false,
            runner_id: "local".into(),
            cancel: None,
            environment: None,
            mounts: Vec::new(),
            stdin: None,
            workspace_to: None,
        }
    }
}

/// Host-level settings shared by every run of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Interpreter; `None` searches `/usr/bin/python3`, `/usr/local/bin/python3`, `PATH`.
    pub python: Option<PathBuf>,
    /// Where run directories are created.
    pub work_root: PathBuf,
    /// Use cgroups when the host has them (off: rlimits, process-group kill and a subreaper).
    pub use_cgroups: bool,
    /// The binary that serves `__jail-init` (default: the current executable).
    pub jail_helper: Option<PathBuf>,
    /// `jail` only: how many jails to keep built ahead of the runs (0: none). A warm jail has
    /// everything a run gets, its namespaces, root, cgroup, limits, Landlock, seccomp, and a
    /// started interpreter, and waits for the program; each one serves one run. For long-lived
    /// callers (agents, the coordinator) that run many programs with the same limits.
    pub warm: usize,
    /// `jail`: the seccomp policy, the deny list (default) or the allow-list. Containers
    /// (`docker`) always get the allow-list's profile, `resources/seccomp/docker.json`: with no
    /// listener to report refusals, the deny list would leave Docker's default in charge.
    pub seccomp: SeccompMode,
    /// `docker` only: image, OCI runtime and daemon address.
    pub docker: docker::DockerConfig,
    /// The parent cgroup for runs (v2: an absolute path; v1: a path inside each hierarchy);
    /// `None`: `fleetbox` at the root, else beside this process's own delegated group. The
    /// first sandbox a process opens decides it for the process.
    pub cgroup_root: Option<PathBuf>,
    /// `jail`: time the start-up phases and list them in each report's `notes`.
    pub trace: bool,
    /// The egress proxy's pinned names (a hosts file), looked up before the system resolver.
    pub egress_hosts: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            python: None,
            work_root: std::env::temp_dir(),
            use_cgroups: true,
            jail_helper: None,
            warm: 0,
            seccomp: SeccompMode::Deny,
            docker: docker::DockerConfig::default(),
            cgroup_root: None,
            trace: false,
            egress_hosts: None,
        }
    }
}

/// A way of running programs. Every call returns a report; it never panics on bad programs.
pub trait Sandbox: Send + Sync {
    fn backend(&self) -> Backend;
    fn run(&self, req: &RunRequest) -> ExecutionReport;
    /// Open a session (see [`session`]): `req`'s limits hold for the whole session except
    /// `timeout` (each call has its own) and `max_output` (per call); it ends after `lifetime`.
    fn open_session(
        &self,
        req: RunRequest,
        lifetime: std::time::Duration,
    ) -> Result<session::Session, session::SessionError> {
        let _ = (req, lifetime);
        Err(session::SessionError(format!(
            "the {} backend keeps no sessions (the jail and process backends do)",
            self.backend()
        )))
    }
    /// Sandboxes built ahead of the runs and waiting for one (warm jails, started
    /// containers); 0 for backends that keep none.
    fn warm_waiting(&self) -> usize {
        0
    }
    /// The interpreter runs use when it is not the host's (a container image's), as a key for
    /// the environments built for it; `None` for the host's own interpreter.
    fn interpreter_key(&self) -> Option<Result<String, String>> {
        None
    }
}

/// The available backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Process,
    Jail,
    Docker,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Process => "process",
            Backend::Jail => "jail",
            Backend::Docker => "docker",
        }
    }

    /// The backend to use when none is asked for: `jail` where the host can build one.
    pub fn default_for_host() -> Backend {
        if jail::host_supports_jail().is_ok() {
            Backend::Jail
        } else {
            Backend::Process
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = SandboxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "process" | "local" => Ok(Backend::Process),
            "jail" => Ok(Backend::Jail),
            "docker" => Ok(Backend::Docker),
            other => Err(SandboxError::UnknownBackend(other.to_string())),
        }
    }
}

/// How long a leftover must have existed before [`sweep_stale`] removes it.
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Remove what runs of dead processes left behind: run directories under the work root and
/// empty run cgroups whose owning pid is gone (and older than [`STALE_AFTER`]). A process killed
/// with SIGKILL cannot clean up after its runs, or after the warm jails it kept; long-lived
/// callers (agents, the coordinator) call this when they start. Returns (directories, cgroups).
pub fn sweep_stale(config: &SandboxConfig) -> (usize, usize) {
    let dirs = workspace::sweep_stale(&config.work_root, STALE_AFTER);
    let groups = match cgroup::Cgroups::detect(config.cgroup_root.as_deref()) {
        Ok(cg) if config.use_cgroups => cg.sweep_stale(STALE_AFTER),
        _ => 0,
    };
    if dirs + groups > 0 {
        tracing::info!(
            dirs,
            cgroups = groups,
            "removed what sandbox runs of dead processes left behind"
        );
    }
    (dirs, groups)
}

/// Build a sandbox for `backend`.
pub fn open(backend: Backend, config: SandboxConfig) -> Result<Box<dyn Sandbox>, SandboxError> {
    match backend {
        Backend::Process => Ok(Box::new(ProcessSandbox::new(config))),
        Backend::Jail => Ok(Box::new(jail::JailSandbox::new(config)?)),
        Backend::Docker => Ok(Box::new(docker::DockerSandbox::new(config)?)),
    }
}

/// Failures of the sandbox itself (not of the program), turned into `sandbox_error` reports.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("unknown backend `{0}` (expected `process`/`local`, `jail` or `docker`)")]
    UnknownBackend(String),
    #[error(
        "no Python interpreter found (looked at {looked}); install one with `apt-get install python3` or point `FLEETBOX_PYTHON` at it"
    )]
    PythonMissing { looked: String },
    #[error(
        "the interpreter `{}` is under `{}`, which the jail covers with its own: a run could not \
         see it; install it elsewhere (e.g. under `/opt` or `/usr/local`) or choose another with \
         `FLEETBOX_PYTHON`",
        path.display(),
        hidden.display()
    )]
    PythonHidden { path: PathBuf, hidden: PathBuf },
    #[error(transparent)]
    Docker(#[from] docker::DockerError),
    #[error(transparent)]
    Policy(#[from] jail::seccomp::PolicyError),
    #[error("could not {what} `{}`: {source}", path.display())]
    Workspace {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
