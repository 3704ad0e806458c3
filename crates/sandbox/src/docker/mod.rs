//! The `docker` backend: one container per run, through the Docker Engine API (`bollard`).
//!
//! Every run gets a container built from [`DockerConfig::image`] with no network (unless the
//! run's limits allow it), a read-only root, every capability dropped, `no-new-privileges`, a
//! non-root user, a pids limit, memory with swap equal to it, a CPU quota, a size-capped tmpfs
//! `/tmp`, the run's workspace as the only writable bind at `/work`, and the program read-only at
//! `/code/main.py`. The interpreter starts the jail's boot script (`jail/boot.py`) and waits on
//! stdin; the run hands over its environment there and the clock starts. A warm pool keeps such
//! containers started ahead of the runs that take them, as the jail keeps warm jails.
//!
//! The workspace is made on the host exactly as for the other backends (its tmpfs quota, the
//! files listed and hashed afterwards), so the report is the same `ExecutionReport`. Peak memory
//! and CPU are read from the container's cgroup while it runs (it is gone once it exits).
//! Containers carry the labels [`LABEL_OWNER`] and [`LABEL_HOST`]; [`sweep_stale`] removes the
//! ones whose owner died.

mod end;
pub mod image;
mod sample;
pub mod seccomp;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, ResourcesUlimits};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use fleetbox_proto::{AppliedLimits, ExecutionReport, Limits};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::process::{base_env, run_uid};
use crate::python::Python;
use crate::report::{Observed, RunContext};
use crate::supervise::{Capture, Outcome};
use crate::sys::{self, Exit};
use crate::workspace::{self, RunDir};
use crate::{Backend, RunRequest, Sandbox, SandboxConfig};

/// Label naming the process that made a container (`<pid>`).
pub const LABEL_OWNER: &str = "fleetbox.owner";
/// Label naming the host that made it (its hostname), so a sweep on one host never touches
/// another's containers on a shared daemon.
pub const LABEL_HOST: &str = "fleetbox.host";
/// The image the seed names as the default.
pub const DEFAULT_IMAGE: &str = "python:3.11-slim";
/// The image `fleetbox image build` makes by default.
pub const BUILT_IMAGE: &str = "fleetbox-python:3.11";

const BOOT: &str = include_str!("boot.py");
/// A warm container left unused this long is removed.
const IDLE_MAX: Duration = Duration::from_secs(60);
/// How long a container's interpreter may take to start.
const BOOT_MAX: Duration = Duration::from_secs(60);
/// How often the cgroup is read while a run goes on.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// How long to keep reading output after the container has exited, or after the end record
/// for output the record says was forwarded but has not come yet.
const DRAIN: Duration = Duration::from_millis(300);

/// Host-level settings of the `docker` backend (the seed's `DOCKER_*` variables; limits such as
/// `DOCKER_MEMORY_LIMIT` and `DOCKER_CPU_LIMIT` are the run's [`Limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// `DOCKER_IMAGE`: any local image with `python3` on its `PATH`.
    pub image: String,
    /// `DOCKER_RUNTIME`: the OCI runtime (`runsc` for gVisor); `None` is the daemon's default.
    pub runtime: Option<String>,
    /// `DOCKER_HOST` (`unix:///var/run/docker.sock` when unset).
    pub host: Option<String>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            image: DEFAULT_IMAGE.into(),
            runtime: None,
            host: None,
        }
    }
}

/// Failures to reach the daemon or use an image, as messages that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "Docker daemon not available: no socket at `{0}`; start it (`systemctl start docker`, or `dockerd &`) or point DOCKER_HOST at it"
    )]
    NoDaemon(String),
    #[error(
        "permission denied on the Docker socket `{0}`: run as root or add this user to the `docker` group (`usermod -aG docker $USER`, then log in again)"
    )]
    PermissionDenied(String),
    #[error(
        "image `{0}` is not on this host (no registry is reachable from it): build one with `fleetbox image build --name {0}`, or set DOCKER_IMAGE to a local image"
    )]
    NoImage(String),
    #[error(
        "OCI runtime `{0}` is not registered with the Docker daemon: add it to /etc/docker/daemon.json (`runtimes`) and reload the daemon"
    )]
    NoRuntime(String),
    #[error("Docker daemon: {0}")]
    Api(String),
}

impl DockerError {
    fn from_api(e: bollard::errors::Error, image: &str, runtime: Option<&str>) -> DockerError {
        use bollard::errors::Error as E;
        match &e {
            E::DockerResponseServerError {
                status_code: 404,
                message,
            } if message.contains("image") || message.contains(image) => {
                DockerError::NoImage(image.to_string())
            }
            E::DockerResponseServerError { message, .. }
                if message.contains("unknown or invalid runtime") =>
            {
                DockerError::NoRuntime(runtime.unwrap_or("?").to_string())
            }
            _ => DockerError::from_connect(e),
        }
    }

    fn from_connect(e: bollard::errors::Error) -> DockerError {
        let text = e.to_string();
        let socket = default_socket();
        if let bollard::errors::Error::SocketNotFoundError(path) = &e {
            return DockerError::NoDaemon(path.clone());
        }
        if text.contains("Permission denied") || text.contains("permission denied") {
            return DockerError::PermissionDenied(socket);
        }
        if text.contains("Connection refused")
            || text.contains("No such file")
            || text.contains("(Connect)")
        {
            return DockerError::NoDaemon(socket);
        }
        DockerError::Api(text)
    }
}

/// The daemon's socket when the caller names none (`DockerConfig::host`).
fn default_socket() -> String {
    "/var/run/docker.sock".into()
}

/// Connect to the daemon and agree on an API version (this Debian's daemon speaks 1.41).
pub async fn connect(host: Option<&str>) -> Result<Docker, DockerError> {
    let path = host
        .map(|h| h.trim_start_matches("unix://").to_string())
        .unwrap_or_else(default_socket);
    if !std::path::Path::new(&path).exists() {
        return Err(DockerError::NoDaemon(path));
    }
    let docker = Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION)
        .map_err(DockerError::from_connect)?;
    docker
        .negotiate_version()
        .await
        .map_err(DockerError::from_connect)
}

/// Everything about a run that a warm container is built for.
#[derive(Debug, Clone, PartialEq)]
struct Shape {
    limits: Limits,
    environment: Option<PathBuf>,
    /// Host paths bound in (`RunRequest::mounts`), with whether they are writable.
    mounts: Vec<(PathBuf, bool)>,
}

impl Shape {
    fn of(req: &RunRequest) -> Shape {
        let mut limits = req.limits.clone();
        // Per-run measures a container does not depend on.
        limits.timeout = Default::default();
        limits.max_output = Default::default();
        limits.continue_past_output_limit = false;
        limits.max_listed_files = 0;
        limits.max_hashed_bytes = Default::default();
        Shape {
            limits,
            environment: req.environment.as_ref().map(|e| e.dir.clone()),
            mounts: req
                .mounts
                .iter()
                .map(|m| (m.path.clone(), m.writable))
                .collect(),
        }
    }
}

type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;
type Input = Pin<Box<dyn AsyncWrite + Send>>;

/// A started container whose interpreter waits for its program.
struct Ready {
    id: String,
    dir: RunDir,
    owner: Option<(u32, u32)>,
    input: Input,
    output: Output,
    cgroup: Option<sample::Paths>,
    applied: AppliedLimits,
    notes: Vec<String>,
    shape: Shape,
    built_at: Instant,
}

struct Inner {
    config: SandboxConfig,
    docker: tokio::sync::OnceCell<Docker>,
    warm: Mutex<Vec<Ready>>,
    /// Warm containers being built and containers being removed; dropping the sandbox waits
    /// for them.
    pending: std::sync::atomic::AtomicUsize,
    /// Set when the sandbox is dropped: containers finished after that are removed at once.
    closing: std::sync::atomic::AtomicBool,
}

pub struct DockerSandbox {
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
}

impl DockerSandbox {
    pub fn new(config: SandboxConfig) -> Result<DockerSandbox, crate::SandboxError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleetbox-docker")
            .enable_all()
            .build()
            .map_err(|e| crate::SandboxError::Docker(DockerError::Api(e.to_string())))?;
        let inner = Arc::new(Inner {
            config,
            docker: tokio::sync::OnceCell::new(),
            warm: Mutex::new(Vec::new()),
            pending: Default::default(),
            closing: Default::default(),
        });
        let sandbox = DockerSandbox {
            inner: inner.clone(),
            rt: Some(rt),
        };
        // Leftovers of dead processes go now; a daemon that is down is said at the first run.
        let swept = sandbox.block_on(async move {
            match inner.client().await {
                Ok(d) => sweep_stale(d).await,
                Err(_) => 0,
            }
        });
        if swept > 0 {
            tracing::info!(
                containers = swept,
                "removed containers left by dead Fleetbox processes"
            );
        }
        if sandbox.inner.config.warm > 0 {
            let inner = sandbox.inner.clone();
            sandbox.rt().spawn(async move {
                loop {
                    tokio::time::sleep(IDLE_MAX / 4).await;
                    let old: Vec<Ready> = {
                        let mut pool = inner.warm.lock().unwrap_or_else(|p| p.into_inner());
                        let (old, keep) = pool
                            .drain(..)
                            .partition(|r| r.built_at.elapsed() > IDLE_MAX);
                        *pool = keep;
                        old
                    };
                    for r in old {
                        inner.discard(r).await;
                    }
                }
            });
        }
        Ok(sandbox)
    }

    /// Start building a warm container for runs shaped like `req` (runs do this themselves;
    /// for callers that know their next run before it comes).
    pub fn prewarm(&self, req: &RunRequest) {
        if self.inner.config.warm > 0 {
            let inner = self.inner.clone();
            let req = req.clone();
            self.rt().spawn(async move { inner.refill(&req).await });
        }
    }

    /// Wait until a warm container for runs shaped like `req` is ready (false past `within`).
    pub fn wait_warm(&self, req: &RunRequest, within: Duration) -> bool {
        let shape = Shape::of(req);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let pool = self.inner.warm.lock().unwrap_or_else(|p| p.into_inner());
            if pool.iter().any(|r| r.shape == shape) {
                return true;
            }
            drop(pool);
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    /// Run a future to completion from synchronous code, also from a thread of another runtime.
    fn block_on<F: std::future::Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.rt().block_on(f))
                    .join()
                    .expect("docker run thread")
            })
        } else {
            self.rt().block_on(f)
        }
    }
}

impl Drop for DockerSandbox {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let inner = self.inner.clone();
        inner.closing.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while inner.pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready: Vec<Ready> = inner
            .warm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        if let Some(rt) = self.rt.take() {
            let _ = std::thread::spawn(move || {
                rt.block_on(async {
                    for r in ready {
                        inner.discard(r).await;
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .join();
        }
    }
}

impl Sandbox for DockerSandbox {
    fn backend(&self) -> Backend {
        Backend::Docker
    }

    fn run(&self, req: &RunRequest) -> ExecutionReport {
        let inner = self.inner.clone();
        let handle = self.rt().handle().clone();
        self.block_on(async move { inner.run(req, &handle).await })
    }

    fn warm_waiting(&self) -> usize {
        self.inner
            .warm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The image's interpreter: environments are built for it, not for the host's.
    fn interpreter_key(&self) -> Option<Result<String, String>> {
        let inner = self.inner.clone();
        let python = self.block_on(async move { inner.python().await });
        Some(python.map_err(|e| e.to_string()).map(|p| {
            format!(
                "docker image {} python {} {}",
                self.inner.config.docker.image,
                p.path.display(),
                p.version
            )
        }))
    }
}

impl Inner {
    async fn client(&self) -> Result<&Docker, DockerError> {
        self.docker
            .get_or_try_init(|| connect(self.config.docker.host.as_deref()))
            .await
    }

    fn context<'a>(&self, req: &'a RunRequest, python: Option<&'a Python>) -> RunContext<'a> {
        RunContext {
            req,
            backend: "docker",
            python,
            started_at: SystemTime::now(),
            applied: AppliedLimits::new(req.limits.clone()),
            notes: Vec::new(),
        }
    }

    fn runtime_name(&self) -> String {
        self.config
            .docker
            .runtime
            .clone()
            .unwrap_or_else(|| "runc".into())
    }

    async fn run(
        self: &Arc<Self>,
        req: &RunRequest,
        rt: &tokio::runtime::Handle,
    ) -> ExecutionReport {
        if !req.limits.network.rules().is_empty() {
            let mut r = self
                .context(req, None)
                .sandbox_error(crate::egress::NEEDS_JAIL);
            r.runtime = Some(self.runtime_name());
            return r;
        }
        let python = match self.python().await {
            Ok(p) => p,
            Err(e) => {
                let mut r = self.context(req, None).sandbox_error(e.to_string());
                r.runtime = Some(self.runtime_name());
                return r;
            }
        };
        let shape = Shape::of(req);
        let warm = (self.config.warm > 0)
            .then(|| {
                let mut pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
                let i = pool.iter().position(|r| r.shape == shape)?;
                Some(pool.swap_remove(i))
            })
            .flatten();
        if self.config.warm > 0 {
            // Build the next one for this shape while this run goes on.
            let me = self.clone();
            let req = req.clone();
            rt.spawn(async move { me.refill(&req).await });
        }
        let ready = match warm {
            Some(mut r) => {
                r.notes.push(format!(
                    "warm start: the container was started {} ms before the program came",
                    r.built_at.elapsed().as_millis()
                ));
                Ok(r)
            }
            None => self.prepare(&template(req), &python).await,
        };
        let mut report = match ready {
            Ok(ready) => self.hand_over(req, &python, ready).await,
            Err(e) => self.context(req, Some(&python)).sandbox_error(e),
        };
        report.runtime = Some(self.runtime_name());
        report
    }

    /// Keep one container of this run's shape waiting (the pool holds at most `warm`).
    async fn refill(self: &Arc<Self>, req: &RunRequest) {
        use std::sync::atomic::Ordering;
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.build_one(req).await;
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    async fn build_one(self: &Arc<Self>, req: &RunRequest) {
        let Ok(python) = self.python().await else {
            return;
        };
        let shape = Shape::of(req);
        {
            let pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
            if pool.iter().filter(|r| r.shape == shape).count() >= self.config.warm {
                return;
            }
        }
        match self.prepare(&template(req), &python).await {
            Ok(ready) if self.closing.load(std::sync::atomic::Ordering::SeqCst) => {
                self.discard(ready).await;
            }
            Ok(ready) => {
                let evicted = {
                    let mut pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
                    pool.push(ready);
                    (pool.len() > self.config.warm.max(1) * 2).then(|| pool.remove(0))
                };
                if let Some(old) = evicted {
                    self.discard(old).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not build a warm container"),
        }
    }

    /// Remove a finished run's container in the background (dropping the sandbox waits).
    fn remove_soon(self: &Arc<Self>, d: &Docker, id: &str) {
        use std::sync::atomic::Ordering;
        self.pending.fetch_add(1, Ordering::SeqCst);
        let (me, d, id) = (self.clone(), d.clone(), id.to_string());
        tokio::spawn(async move {
            remove(&d, &id).await;
            me.pending.fetch_sub(1, Ordering::SeqCst);
        });
    }

    async fn discard(&self, ready: Ready) {
        if let Ok(d) = self.client().await {
            remove(d, &ready.id).await;
        }
    }

    /// The image's interpreter: its version and path, asked once per image and runtime in
    /// this process (a coordinator opens a sandbox per re-check).
    async fn python(&self) -> Result<Python, DockerError> {
        static KNOWN: Mutex<Vec<(String, Option<String>, Python)>> = Mutex::new(Vec::new());
        let image = &self.config.docker.image;
        let runtime = self.config.docker.runtime.as_deref();
        let known = |k: &Vec<(String, Option<String>, Python)>| {
            k.iter()
                .find(|(i, r, _)| i == image && r.as_deref() == runtime)
                .map(|(_, _, p)| p.clone())
        };
        if let Some(p) = known(&KNOWN.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(p);
        }
        let d = self.client().await?;
        let out = image::run_once(
            d,
            image,
            runtime,
            &[
                "python3",
                "-I",
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)",
            ],
        )
        .await?;
        let mut lines = out.lines();
        let version = lines.next().unwrap_or("unknown").trim().to_string();
        let path = PathBuf::from(lines.next().unwrap_or("python3").trim());
        let python = Python {
            real: path.clone(),
            prefix: PathBuf::from("/usr"),
            path,
            version,
        };
        KNOWN.lock().unwrap_or_else(|p| p.into_inner()).push((
            image.clone(),
            runtime.map(str::to_string),
            python.clone(),
        ));
        Ok(python)
    }

    /// Whether the `runsc` runtime is registered with `--oci-seccomp` (without it gVisor ignores
    /// a container's seccomp profile); asked once per runtime in this process.
    async fn gvisor_applies_seccomp(&self, d: &Docker) -> bool {
        static KNOWN: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());
        let name = self.runtime_name();
        if let Some((_, v)) = KNOWN
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(n, _)| *n == name)
        {
            return *v;
        }
        let Ok(info) = d.info().await else {
            return false;
        };
        let applies = info
            .runtimes
            .and_then(|r| r.get(&name).cloned())
            .and_then(|r| r.runtime_args)
            .is_some_and(|args| {
                args.iter().any(|a| {
                    let (name, value) = a
                        .trim_start_matches('-')
                        .split_once('=')
                        .unwrap_or((a.trim_start_matches('-'), "true"));
                    name == "oci-seccomp" && value != "false"
                })
            });
        KNOWN
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, applies));
        applies
    }

    /// Make the workspace, create, attach and start the container; it waits for its program.
    async fn prepare(&self, req: &RunRequest, python: &Python) -> Result<Ready, String> {
        let d = self.client().await.map_err(|e| e.to_string())?;
        let limits = &req.limits;
        let mut applied = AppliedLimits::new(limits.clone());
        let mut notes = Vec::new();
        let lease = sys::is_root()
            .then(run_uid)
            .transpose()
            .map_err(|e| format!("taking a run uid: {e}"))?;
        let owner = lease.as_ref().map(|l| (l.uid, l.uid));
        let user = match owner {
            Some((u, g)) => format!("{u}:{g}"),
            // SAFETY: getuid/getgid have no preconditions.
            None => unsafe { format!("{}:{}", libc::getuid(), libc::getgid()) },
        };
        let mut dir = RunDir::create(
            &self.config.work_root,
            &req.code,
            req.input.as_deref(),
            owner,
            Some(workspace::Quota::of(limits)),
        )
        .map_err(|e| e.to_string())?;
        dir.add_files(&req.files, owner)
            .map_err(|e| e.to_string())?;
        dir.hold_uid(lease);
        if dir.quota.is_some() {
            applied.enforced("workspace_size", "tmpfs");
            applied.enforced("workspace_files", "tmpfs");
        }
        let mut binds = vec![
            format!("{}:/work:rw", dir.work().display()),
            format!("{}:/code/main.py:ro", dir.code().display()),
        ];
        if let Some(env) = &req.environment {
            binds.push(format!("{0}:{0}:ro", env.dir.display()));
        }
        // What the run asks to see at its host path (an environment being built, the installer).
        for m in &req.mounts {
            let mode = if m.writable { "rw" } else { "ro" };
            binds.push(format!("{0}:{0}:{mode}", m.path.display()));
        }
        let runtime_name = self.config.docker.runtime.as_deref();
        let gvisor = runtime_name.is_some_and(|r| r.contains("runsc"));
        let ceiling = container_memory(limits, runtime_name);
        let memory = i64::try_from(ceiling).unwrap_or(i64::MAX);
        if ceiling > limits.memory.0 {
            // What holds is the container's ceiling: the report says that one.
            applied.limits.memory = fleetbox_proto::ByteSize(ceiling);
            notes.push(format!(
                "gVisor: the memory that holds is the container's, the limit plus {} MiB for gVisor's own kernel and one host stub per process",
                (ceiling - limits.memory.0) >> 20
            ));
        }
        // The container's seccomp profile (Fleetbox's allow-list, `resources/seccomp/docker.json`).
        if gvisor {
            applied.enforced("syscalls", "gvisor");
            if self.gvisor_applies_seccomp(d).await {
                applied.enforced("syscalls", "docker_seccomp_allow_list");
            } else {
                notes.push(
                    "gVisor ignores the container's seccomp profile: add `--oci-seccomp` to the runtime's `runtimeArgs` in /etc/docker/daemon.json"
                        .into(),
                );
            }
        } else {
            applied.enforced("syscalls", "docker_seccomp_allow_list");
        }
        let cpu_s = i64::try_from(limits.cpu_time.0.div_ceil(1000).max(1)).unwrap_or(i64::MAX);
        let ulimit = |name: &str, soft: i64, hard: i64| ResourcesUlimits {
            name: Some(name.into()),
            soft: Some(soft),
            hard: Some(hard),
        };
        let fsize = i64::try_from(limits.max_file_size.0).unwrap_or(i64::MAX);
        let nofile = i64::from(limits.max_open_files);
        let mut ulimits = vec![
            ulimit("cpu", cpu_s, cpu_s + 1),
            ulimit("fsize", fsize, fsize),
            ulimit("nofile", nofile, nofile),
            ulimit("core", 0, 0),
        ];
        if gvisor {
            // gVisor's pids limit has headroom for its own threads ([`pids_limit`]): the
            // program's count is held inside. Under runc the cgroup holds it alone, so that
            // reaching it shows in `pids.events` and is reported (RLIMIT_NPROC refused first,
            // silently).
            let n = i64::from(limits.max_processes);
            ulimits.push(ulimit("nproc", n, n));
        }
        let host_config = HostConfig {
            binds: Some(binds),
            network_mode: Some(
                if limits.network.is_host() {
                    "bridge"
                } else {
                    "none"
                }
                .into(),
            ),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec![
                "no-new-privileges".into(),
                format!("seccomp={}", seccomp::inline()),
            ]),
            pids_limit: Some(pids_limit(limits, self.config.docker.runtime.as_deref())),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some((limits.cpus * 1e9).round() as i64),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                format!(
                    "rw,nosuid,nodev,mode=1777,size={}",
                    limits.tmp_size.0.max(4096)
                ),
            )])),
            ulimits: Some(ulimits),
            runtime: self.config.docker.runtime.clone(),
            // The boot script is the container's PID 1 (`boot.py`): the program is its child
            // with ordinary signal semantics, orphans are reaped, the container ends when the
            // program does, and no init runs as the program's uid where it could be read or
            // traced (docker-init did, and was dumpable).
            init: Some(false),
            auto_remove: Some(false),
            // Fleetbox reads the output through the attach stream and caps it itself; the
            // daemon's default json-file log would write all of it to the host's disk, outside
            // every quota (newlines amplified it ~70x).
            log_config: Some(bollard::models::HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        };
        if gvisor {
            applied.enforced("max_processes", "rlimit_nproc");
        } else {
            applied.enforced("max_processes", "docker_pids_limit");
        }
        for (limit, by) in [
            ("memory", "docker_memory"),
            ("cpus", "docker_nano_cpus"),
            ("cpu_time", "rlimit_cpu"),
            ("max_file_size", "rlimit_fsize"),
            ("max_open_files", "rlimit_nofile"),
            ("tmp_size", "tmpfs"),
            ("timeout", "supervisor_kill"),
            ("max_output", "supervisor_capture"),
        ] {
            applied.enforced(limit, by);
        }
        applied.enforced(
            "network",
            if limits.network.is_host() {
                "docker_bridge"
            } else {
                "docker_network_none"
            },
        );
        let interpreter = match &req.environment {
            Some(env) => env.python.display().to_string(),
            None => python.path.display().to_string(),
        };
        let body = ContainerCreateBody {
            image: Some(self.config.docker.image.clone()),
            cmd: Some(vec![
                interpreter,
                "-I".into(),
                "-B".into(),
                "-c".into(),
                BOOT.into(),
            ]),
            user: Some(user),
            working_dir: Some("/work".into()),
            env: Some(
                base_env("/tmp", "/tmp")
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            network_disabled: Some(!limits.network.is_host()),
            labels: Some(HashMap::from([
                (LABEL_OWNER.to_string(), std::process::id().to_string()),
                (LABEL_HOST.to_string(), hostname()),
            ])),
            host_config: Some(host_config),
            ..Default::default()
        };
        let image = self.config.docker.image.as_str();
        let runtime = self.config.docker.runtime.as_deref();
        let created = d
            .create_container(Some(CreateContainerOptionsBuilder::new().build()), body)
            .await
            .map_err(|e| DockerError::from_api(e, image, runtime).to_string())?;
        let id = created.id;
        let started = async {
            let attached = d
                .attach_container(
                    &id,
                    Some(
                        AttachContainerOptionsBuilder::new()
                            .stream(true)
                            .stdin(true)
                            .stdout(true)
                            .stderr(true)
                            .build(),
                    ),
                )
                .await
                .map_err(|e| DockerError::from_api(e, image, runtime).to_string())?;
            d.start_container(&id, None)
                .await
                .map_err(|e| DockerError::from_api(e, image, runtime).to_string())?;
            let mut attached = attached;
            booted(&mut attached.output).await?;
            let pid = d
                .inspect_container(&id, None)
                .await
                .ok()
                .and_then(|i| i.state?.pid)
                .unwrap_or(0);
            let cgroup = sample::Paths::of_pid(pid as i32);
            if let Some(c) = &cgroup
                && !gvisor
            {
                // Before the program comes: its sockets are the ones accounted.
                if c.limit_tcp_memory(ceiling) {
                    applied.enforced("memory", "cgroup_socket_buffers");
                } else {
                    notes.push(
                        "socket buffers are not held to the memory limit: the container's memory.kmem.tcp.limit_in_bytes could not be set"
                            .into(),
                    );
                }
            }
            if cgroup.is_none() {
                notes.push(
                    "the container's cgroup is not readable from here: CPU and peak memory are not measured"
                        .into(),
                );
            }
            Ok::<_, String>((attached, cgroup))
        }
        .await;
        match started {
            Ok((attached, cgroup)) => Ok(Ready {
                id,
                dir,
                owner,
                input: attached.input,
                output: attached.output,
                cgroup,
                applied,
                notes,
                shape: Shape::of(req),
                built_at: Instant::now(),
            }),
            Err(e) => {
                remove(d, &id).await;
                Err(e)
            }
        }
    }

    /// Give a waiting container its program and supervise the run to its end.
    async fn hand_over(
        self: &Arc<Self>,
        req: &RunRequest,
        python: &Python,
        ready: Ready,
    ) -> ExecutionReport {
        let Ready {
            id,
            mut dir,
            owner,
            mut input,
            mut output,
            cgroup,
            applied,
            notes,
            ..
        } = ready;
        let mut ctx = self.context(req, Some(python));
        ctx.applied = applied;
        ctx.notes = notes;
        let d = match self.client().await {
            Ok(d) => d,
            Err(e) => return ctx.sandbox_error(e.to_string()),
        };
        if let Err(e) = fill(&mut dir, req, owner) {
            remove(d, &id).await;
            return ctx.sandbox_error(e);
        }
        let mut env: Vec<u8> = Vec::new();
        for (k, v) in base_env("/tmp", "/tmp").iter().chain(req.env.iter()) {
            env.extend_from_slice(k.as_bytes());
            env.push(b'=');
            env.extend_from_slice(v.as_bytes());
            env.push(0);
        }
        // The boot script reads the environment, forks the program, then reads the nonce: the
        // program never has it (see `boot.py`).
        let nonce = {
            let mut b = [0u8; 16];
            let _ = getrandom::fill(&mut b);
            hex::encode(b)
        };
        let mut handed = (env.len() as u32).to_be_bytes().to_vec();
        handed.extend_from_slice(&env);
        handed.extend_from_slice(nonce.as_bytes());
        let base = cgroup.as_ref().map(sample::Paths::read).unwrap_or_default();
        let started = Instant::now();
        if let Err(e) = async {
            input.write_all(&handed).await?;
            input.shutdown().await
        }
        .await
        {
            remove(d, &id).await;
            return ctx.sandbox_error(format!("handing the program to the container failed: {e}"));
        }
        drop(input);

        let limits = &req.limits;
        let mut stdout = Capture::new(limits.max_output.0);
        let mut stderr = Capture::new(limits.max_output.0);
        let mut end = end::EndScanner::new(&nonce);
        let deadline = tokio::time::Instant::from_std(started + limits.timeout.as_duration());
        let mut wait = Box::pin(d.wait_container(&id, None));
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        let mut peak = base.clone();
        let mut timed_out = false;
        let mut cancelled = None;
        let mut output_limited = None;
        let mut cpu_limited = None;
        let mut killed = false;
        let mut output_open = true;
        let mut wall = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 86_400);
        let mut drain_until = far;
        let exit_code: Option<i64> = loop {
            tokio::select! {
                frame = output.next(), if output_open => match frame {
                    Some(Ok(LogOutput::StdOut { message })) => stdout.push(&message),
                    Some(Ok(LogOutput::StdErr { message })) => {
                        let had = end.record.is_some();
                        stderr.push(&end.push(&message));
                        if !had && end.record.is_some() {
                            wall = Some(started.elapsed());
                            drain_until = tokio::time::Instant::now() + DRAIN;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => output_open = false,
                },
                done = wait.next() => {
                    break match done {
                        Some(Ok(r)) => Some(r.status_code),
                        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Some(code),
                        _ => None,
                    };
                }
                _ = tokio::time::sleep_until(deadline), if !killed && end.record.is_none() => {
                    timed_out = true;
                    killed = true;
                    kill_soon(d, &id);
                }
                _ = tokio::time::sleep_until(drain_until), if end.record.is_some() => break None,
                _ = tick.tick() => {
                    if let Some(p) = &cgroup {
                        peak.merge(&p.read());
                        // RLIMIT_CPU holds each process alone; the cgroup holds them together.
                        let used = peak.since(&base);
                        let used = used.cpu_user_ms.unwrap_or(0) + used.cpu_sys_ms.unwrap_or(0);
                        if !killed && used >= limits.cpu_time.0 {
                            cpu_limited = Some(used);
                            killed = true;
                            kill_soon(d, &id);
                        }
                    }
                    if !killed && let Some(c) = &req.cancel && let Some(why) = c.reason() {
                        cancelled = Some(why);
                        killed = true;
                        kill_soon(d, &id);
                    }
                }
            }
            // The program has ended and everything it wrote has come: no need to wait for the
            // daemon to notice that the container ended.
            if let Some(r) = &end.record
                && !killed
                && stdout.total() >= r.stdout
                && stderr.total() >= r.stderr
            {
                break None;
            }
            if !killed && !limits.continue_past_output_limit {
                let over = if stdout.over() {
                    Some("stdout")
                } else if stderr.over() {
                    Some("stderr")
                } else {
                    None
                };
                if over.is_some() {
                    output_limited = over;
                    killed = true;
                    kill_soon(d, &id);
                }
            }
        };
        let wall = wall
            .filter(|_| !killed)
            .unwrap_or_else(|| started.elapsed());
        if let Some(p) = &cgroup {
            peak.merge(&p.read());
        }
        let record = end.record.clone().filter(|_| !killed);
        if record.is_none() {
            // What the program wrote just before it ended may still be on its way.
            let drain_until = tokio::time::Instant::now() + DRAIN;
            while output_open {
                match tokio::time::timeout_at(drain_until, output.next()).await {
                    Ok(Some(Ok(LogOutput::StdOut { message }))) => stdout.push(&message),
                    Ok(Some(Ok(LogOutput::StdErr { message }))) => stderr.push(&end.push(&message)),
                    Ok(Some(Ok(_))) => {}
                    _ => output_open = false,
                }
            }
            stderr.push(&end.flush());
        }
        let sigkill = i64::from(libc::SIGKILL);
        // Only a kill can be the OOM killer's: ask the daemon then (after the container has
        // ended), not on every run.
        let maybe_oom = match &record {
            Some(r) => r.signal == Some(libc::SIGKILL),
            None => exit_code.is_none_or(|c| c == 128 + sigkill),
        };
        let state = if maybe_oom {
            if record.is_some() {
                let _ = tokio::time::timeout(Duration::from_secs(5), wait.next()).await;
            }
            d.inspect_container(&id, None)
                .await
                .ok()
                .and_then(|i| i.state)
        } else {
            None
        };
        // Off the run's path: the report does not wait for the daemon to remove it.
        self.remove_soon(d, &id);
        let oom = state.as_ref().and_then(|s| s.oom_killed).unwrap_or(false);
        let (code, signal) = match &record {
            Some(r) => (r.code, r.signal),
            None => {
                let code = exit_code
                    .or_else(|| state.as_ref().and_then(|s| s.exit_code))
                    .unwrap_or(-1);
                let code = i32::try_from(code).unwrap_or(-1);
                // The daemon says 128+n for a process killed by signal n; the kills we made
                // are ours.
                if killed {
                    (None, Some(libc::SIGKILL))
                } else if (129..=128 + 64).contains(&code) {
                    (None, Some(code - 128))
                } else {
                    (Some(code), None)
                }
            }
        };
        let mut used = peak.since(&base);
        if let Some(r) = &record {
            // The larger of the program's own rusage and the cgroup's count since the hand-over
            // (rusage is split from ticks and misses orphans; the cgroup's is exact but read
            // every few milliseconds).
            used.cpu_user_ms = Some(used.cpu_user_ms.unwrap_or(0).max(r.utime_ms));
            used.cpu_sys_ms = Some(used.cpu_sys_ms.unwrap_or(0).max(r.stime_ms));
        }
        let outcome = Outcome {
            exit: Exit {
                code,
                signal,
                user_ms: used.cpu_user_ms.unwrap_or(0),
                sys_ms: used.cpu_sys_ms.unwrap_or(0),
                maxrss_bytes: record.as_ref().map_or(0, |r| r.maxrss_kb * 1024),
            },
            wall,
            timed_out,
            cancelled,
            output_limited,
            stopped: None,
            cpu_limited,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
        };
        let mut stats = used;
        stats.oom_killed |= oom;
        ctx.finish(
            Observed {
                outcome,
                cgroup: Some(stats),
                violations: Vec::new(),
                setup_error: None,
            },
            dir,
        )
    }
}

/// The container's pids limit. Under gVisor the limit also counts the sandbox kernel's own
/// threads and, on the ptrace platform, one host stub per guest process; with too little room
/// the sandbox itself fails to start (exit 2), so it gets headroom and the program's count is
/// held by `RLIMIT_NPROC` inside as well.
fn pids_limit(limits: &Limits, runtime: Option<&str>) -> i64 {
    let n = i64::from(limits.max_processes);
    match runtime {
        Some(r) if r.contains("runsc") => n * 2 + 128,
        _ => n,
    }
}

/// Wait until the container's interpreter says it waits for its program (`boot.py`); a
/// container that ends first (no `python3` in the image, say) is an error with what it printed.
async fn booted(output: &mut Output) -> Result<(), String> {
    const READY: &[u8] = b"\0FLEETBOX-READY\n";
    let mut seen = Vec::new();
    let waited = tokio::time::timeout(BOOT_MAX, async {
        while let Some(frame) = output.next().await {
            match frame {
                Ok(LogOutput::StdErr { message } | LogOutput::StdOut { message }) => {
                    seen.extend_from_slice(&message);
                    if seen.windows(READY.len()).any(|w| w == READY) {
                        return true;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        false
    })
    .await;
    match waited {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the container ended before its interpreter started: {}",
            String::from_utf8_lossy(&seen).trim()
        )),
        Err(_) => Err(format!(
            "the container's interpreter did not start within {} s",
            BOOT_MAX.as_secs()
        )),
    }
}

/// The container's memory limit. gVisor (the ptrace platform) charges its own kernel and a host
/// stub per guest process to the container: without room for them a fork bomb ends at the memory
/// limit before the process limit (64 Python processes need 256–384 MiB there, measured), so
/// under `runsc` the container gets 64 MiB plus 4 MiB per allowed process on top of the limit.
fn container_memory(limits: &Limits, runtime: Option<&str>) -> u64 {
    match runtime {
        Some(r) if r.contains("runsc") => limits
            .memory
            .0
            .saturating_add(64 << 20)
            .saturating_add(u64::from(limits.max_processes) << 22),
        _ => limits.memory.0,
    }
}

/// A run's request without its program, input and files: what a container is made for, cold or
/// warm alike; [`fill`] hands them over.
fn template(req: &RunRequest) -> RunRequest {
    RunRequest {
        code: Vec::new(),
        input: None,
        files: Vec::new(),
        cancel: None,
        ..req.clone()
    }
}

/// Put the run's program, input and files where the waiting container sees them.
fn fill(dir: &mut RunDir, req: &RunRequest, owner: Option<(u32, u32)>) -> Result<(), String> {
    use std::io::Write;
    let code = dir.code();
    // In place: the container has this very inode bound read-only at /code/main.py.
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&code)
        .and_then(|mut f| f.write_all(&req.code))
        .map_err(|e| format!("writing the program to `{}`: {e}", code.display()))?;
    if let Some(input) = &req.input {
        let path = dir.work().join(workspace::INPUT_FILE);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| f.write_all(input).map(|()| f))
            .map_err(|e| format!("writing the input to `{}`: {e}", path.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                .map_err(|e| format!("handing over `{}`: {e}", path.display()))?;
        }
        dir.input_sha256 = Some(workspace::sha256_hex(input));
    }
    dir.add_files(&req.files, owner)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Kill without waiting for the answer: the daemon finishes copying the container's output
/// before it reports the kill, so the caller must go on reading it meanwhile.
fn kill_soon(d: &Docker, id: &str) {
    let (d, id) = (d.clone(), id.to_string());
    tokio::spawn(async move { kill(&d, &id).await });
}

async fn kill(d: &Docker, id: &str) {
    let _ = d
        .kill_container(
            id,
            Some(KillContainerOptionsBuilder::new().signal("SIGKILL").build()),
        )
        .await;
}

/// Remove a container whatever its state.
async fn remove(d: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    if let Err(e) = d.remove_container(id, Some(opts)).await {
        tracing::warn!(container = id, error = %e, "could not remove a run's container");
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into our buffer.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    }
}

/// Remove the containers of this host whose owning process is gone (a SIGKILLed agent's runs
/// and warm containers). Returns how many were removed.
pub async fn sweep_stale(d: &Docker) -> usize {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_HOST}={}", hostname())],
    )]);
    let mut list = None;
    for _ in 0..3 {
        match d
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
        {
            Ok(l) => {
                list = Some(l);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing containers to sweep failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let Some(list) = list else {
        return 0;
    };
    let mut removed = 0;
    for c in list {
        let owner: Option<i32> = c
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_OWNER))
            .and_then(|p| p.parse().ok());
        let alive = owner.is_some_and(|pid| {
            // SAFETY: kill with signal 0 only checks that the process exists.
            pid == std::process::id() as i32 || unsafe { libc::kill(pid, 0) } == 0
        });
        if let (false, Some(id)) = (alive, c.id) {
            remove(d, &id).await;
            removed += 1;
        }
    }
    removed
}
