//! The `jail` backend: a strict Linux sandbox built from namespaces, `pivot_root`, seccomp,
//! Landlock, cgroups and rlimits — no external binary, no libseccomp.
//!
//! The supervisor (this module, in the caller's process) prepares the run directory and cgroup,
//! starts the helper (`fleetbox __jail-init`, see [`init`]) and supervises it with the same
//! poll loop as the `process` backend, also serving seccomp notifications: each denied syscall
//! is answered `EPERM` and recorded, so the report names it. When the host cannot build the jail
//! the run ends as `sandbox_error` saying what is missing: never a silent weaker fallback.

mod error;
pub mod init;
mod landlock;
pub mod seccomp;
#[cfg(target_arch = "x86_64")]
mod syscall_names;
pub(crate) mod syscalls;
mod warm;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use fleetbox_proto::{AppliedLimits, ExecutionReport, Limits, Violation};

pub use error::JailError;

use crate::cgroup::{self, RunCgroup};
use crate::process::{RlimitPlan, base_env, run_uid};
use crate::report::{Observed, RunContext};
use crate::supervise::{self, Child, Extras, Supervision, TreeKiller};
use crate::sys::{self, Exit};
use crate::workspace::RunDir;
use crate::{Backend, RunRequest, Sandbox, SandboxConfig, python};

use init::{Event, InitConfig};
use seccomp::Policy;

/// uid/gid of the program inside the jail.
pub const SANDBOX_ID: u32 = 1000;

pub struct JailSandbox {
    builder: Arc<Builder>,
    /// Jails built ahead of the runs that will use them (`SandboxConfig::warm` > 0).
    pool: Option<warm::Pool>,
}

/// What makes two jails interchangeable: a warm jail serves a run of the same shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shape {
    pub limits: Limits,
    /// The interpreter, when not the sandbox's own (a virtual environment's).
    pub python: Option<PathBuf>,
    /// Extra host paths bound read-only at the same path.
    pub ro: Vec<PathBuf>,
    /// Extra host paths bound read-write at the same path (never warm).
    pub rw: Vec<PathBuf>,
}

impl Shape {
    fn of(req: &RunRequest) -> Shape {
        let mut shape = Shape::plain(req.limits.clone());
        if let Some(env) = &req.environment {
            shape.python = Some(env.python.clone());
            shape.ro.push(env.dir.clone());
        }
        for m in &req.mounts {
            if m.writable {
                shape.rw.push(m.path.clone());
            } else {
                shape.ro.push(m.path.clone());
            }
        }
        shape
    }

    pub fn plain(limits: Limits) -> Shape {
        Shape {
            limits,
            python: None,
            ro: Vec::new(),
            rw: Vec::new(),
        }
    }
}

/// What building a jail needs; shared with the pool's builder thread.
struct Builder {
    config: SandboxConfig,
    helper: PathBuf,
    policy: Policy,
    filters: seccomp::Compiled,
}

/// Refuse an interpreter the jail cannot see: one under a directory the jail mounts its own
/// over (`/tmp`, `/dev/shm`) or under the work root (every run failed with "No such file or
/// directory" before).
fn visible_interpreter(config: &SandboxConfig) -> Result<(), crate::SandboxError> {
    let real = crate::python::resolve(config.python.as_deref())?.real;
    let work_root =
        std::fs::canonicalize(&config.work_root).unwrap_or_else(|_| config.work_root.clone());
    let hidden = [
        Path::new("/tmp"),
        Path::new("/dev/shm"),
        work_root.as_path(),
    ]
    .into_iter()
    .find(|dir| real.starts_with(dir));
    match hidden {
        Some(dir) => Err(crate::SandboxError::PythonHidden {
            path: real.clone(),
            hidden: dir.to_path_buf(),
        }),
        None => Ok(()),
    }
}

impl JailSandbox {
    pub fn new(config: SandboxConfig) -> Result<Self, crate::SandboxError> {
        visible_interpreter(&config)?;
        let helper = match &config.jail_helper {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| crate::SandboxError::Workspace {
                what: "locate the jail helper (current executable)",
                path: PathBuf::from("/proc/self/exe"),
                source: e,
            })?,
        };
        let policy = Policy::shipped().map_err(crate::SandboxError::Policy)?;
        let allow = match config.seccomp {
            seccomp::Mode::Deny => None,
            seccomp::Mode::Allow => {
                Some(seccomp::AllowList::shipped().map_err(crate::SandboxError::Policy)?)
            }
        };
        let filters =
            seccomp::Compiled::new(&policy, allow.as_ref()).map_err(crate::SandboxError::Policy)?;
        let warm = config.warm;
        let builder = Arc::new(Builder {
            config,
            helper,
            policy,
            filters,
        });
        let pool = (warm > 0).then(|| warm::Pool::start(builder.clone(), warm));
        Ok(JailSandbox { builder, pool })
    }

    /// Wait up to `timeout` for a warm jail with these limits whose interpreter is waiting for
    /// its program; false when there is no pool or none came. Runs never need this (without
    /// one they start cold); benchmarks and tests use it to measure and check the warm path.
    pub fn wait_warm(&self, limits: &Limits, timeout: std::time::Duration) -> bool {
        self.wait_warm_shape(&Shape::plain(limits.clone()), timeout)
    }

    /// [`JailSandbox::wait_warm`] for a jail that can serve `req` (its limits and environment).
    pub fn wait_warm_for(&self, req: &RunRequest, timeout: std::time::Duration) -> bool {
        self.wait_warm_shape(&Shape::of(req), timeout)
    }

    fn wait_warm_shape(&self, shape: &Shape, timeout: std::time::Duration) -> bool {
        let Some(pool) = &self.pool else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        loop {
            if pool.ready(shape) > 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Can this host run the jail? Checks the cheap preconditions without starting anything.
pub fn host_supports_jail() -> Result<(), JailError> {
    if !cfg!(target_os = "linux") {
        return Err(JailError::unsupported("the jail backend needs Linux"));
    }
    if !Path::new("/proc/self/ns/user").exists() {
        return Err(JailError::unsupported("the kernel has no user namespaces"));
    }
    if let Ok(v) = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        && v.trim() == "0"
    {
        return Err(JailError::unsupported(
            "user namespaces are disabled (`user.max_user_namespaces = 0`)",
        ));
    }
    if !sys::is_root()
        && let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
        && v.trim() == "0"
    {
        return Err(JailError::unsupported(
            "unprivileged user namespaces are disabled (`kernel.unprivileged_userns_clone = 0`)",
        ));
    }
    Ok(())
}

impl Sandbox for JailSandbox {
    fn backend(&self) -> Backend {
        Backend::Jail
    }

    fn run(&self, req: &RunRequest) -> ExecutionReport {
        let shape = Shape::of(req);
        // A run through the egress proxy is never warm: its proxy is the run's own.
        if let Some(pool) = &self.pool
            && shape.rw.is_empty()
            && shape.limits.network.rules().is_empty()
        {
            let warm = pool.take(&shape);
            // Whether this run found one or not, the next run of this shape should.
            pool.refill(&shape);
            if let Some(warm) = warm {
                return self.run_warm(warm, req);
            }
        }
        self.run_cold(req)
    }

    fn warm_waiting(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.waiting())
    }

    /// A session's jail is built like a warm one (its interpreter waiting on a stream socket),
    /// then given the session's environment; the socket stays its channel.
    fn open_session(
        &self,
        req: RunRequest,
        lifetime: std::time::Duration,
    ) -> Result<crate::session::Session, crate::session::SessionError> {
        use crate::session::SessionError;
        let (limits, runner) = (req.limits.clone(), req.runner_id.clone());
        let (req, _, cancel) = crate::session::session_request(req, lifetime, false)?;
        let egress = self.egress_setup(&req).map_err(SessionError)?;
        let egress_log = egress.as_ref().map(|e| e.log.clone());
        let mut applied = AppliedLimits::new(req.limits.clone());
        let mut notes = Vec::new();
        let mut built = self
            .builder
            .build(
                &Shape::of(&req),
                &req.code,
                req.input.as_deref(),
                &req.files,
                base_env("/tmp", "/tmp"),
                true,
                &mut applied,
                &mut notes,
            )
            .map_err(|e| SessionError(e.error.to_string()))?;
        let go = built.spawned.go.take();
        let Some(mut chan) = go.map(std::os::unix::net::UnixStream::from) else {
            discard(built);
            return Err(SessionError("the session's jail has no channel".into()));
        };
        // The boot script says it is ready (one byte), then reads the environment.
        let mut ready = [0u8; 1];
        let handed = chan
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .and_then(|()| std::io::Read::read_exact(&mut chan, &mut ready))
            .and_then(|()| chan.write_all(&env_message(&program_env(&req))));
        if let Err(e) = handed {
            discard(built);
            return Err(SessionError(format!(
                "the session's jail did not start its interpreter: {e}"
            )));
        }
        let workspace = Some(built.dir.path().to_path_buf());
        let sandbox = JailSandbox {
            builder: self.builder.clone(),
            pool: None,
        };
        let run = Supervised {
            applied,
            notes,
            started_at: SystemTime::now(),
            started: Instant::now(),
            egress,
        };
        let run = std::thread::Builder::new()
            .name("fleetbox-session".into())
            .spawn(move || sandbox.supervise_built(built, &req, run))
            .map_err(|e| SessionError(format!("a session's thread: {e}")))?;
        let opening = crate::session::Opening {
            limits,
            backend: "jail",
            runner_id: runner,
            workspace,
            egress: egress_log,
        };
        crate::session::Session::start(chan, cancel, run, opening)
    }
}

/// Kill a built jail that will not run, and remove what it left.
fn discard(built: Built) {
    let pid = built.spawned.child.pid;
    sys::kill(pid, libc::SIGKILL);
    if let Some(cg) = &built.cgroup {
        cg.kill_all();
    }
    let _ = sys::wait4(pid);
}

/// A jail built up to the program: the run directory, cgroup, namespaces and new root exist and
/// the helper (or the namespace init) is running. What is left is supervising it.
struct Built {
    dir: RunDir,
    cgroup: Option<RunCgroup>,
    py: python::Python,
    spawned: Spawned,
    /// When building began (trace phases count from here) and when the spawn began.
    t0: u64,
    spawn_started: Instant,
    phases: Vec<(String, u64)>,
    trace: bool,
    host_ids: Option<(u32, u32)>,
}

impl JailSandbox {
    fn run_cold(&self, req: &RunRequest) -> ExecutionReport {
        let mut ctx = RunContext {
            req,
            backend: "jail",
            python: None,
            started_at: SystemTime::now(),
            applied: AppliedLimits::new(req.limits.clone()),
            notes: Vec::new(),
        };
        let egress = match self.egress_setup(req) {
            Ok(e) => e,
            Err(why) => return ctx.sandbox_error(why),
        };
        let built = match self.builder.build(
            &Shape::of(req),
            &req.code,
            req.input.as_deref(),
            &req.files,
            program_env(req),
            false,
            &mut ctx.applied,
            &mut ctx.notes,
        ) {
            Ok(b) => b,
            Err(BuildError { error, python }) => {
                ctx.python = python.as_deref();
                return ctx.sandbox_error(error.to_string());
            }
        };
        let started = built.spawn_started;
        let run = Supervised {
            applied: ctx.applied,
            notes: ctx.notes,
            started_at: ctx.started_at,
            started,
            egress,
        };
        self.supervise_built(built, req, run)
    }

    /// The proxy's rules and resolver for a run that asks for named hosts.
    fn egress_setup(&self, req: &RunRequest) -> Result<Option<EgressSetup>, String> {
        let rules = req.limits.network.rules();
        if rules.is_empty() {
            return Ok(None);
        }
        let resolver = match &self.builder.config.egress_hosts {
            Some(path) => crate::egress::Resolver::from_hosts_file(path)?,
            None => crate::egress::Resolver::default(),
        };
        Ok(Some(EgressSetup {
            rules: rules.to_vec(),
            resolver,
            log: Default::default(),
        }))
    }

    /// Hand the program to a jail that is already up: write the code and the input where the
    /// jail sees them, send the environment, and supervise from that moment on.
    fn run_warm(&self, mut warm: warm::Warm, req: &RunRequest) -> ExecutionReport {
        let ready = warm.ready();
        let warm::Warm {
            mut built,
            applied,
            mut notes,
            go,
            built_at,
            ..
        } = warm;
        let code_path = built.dir.code();
        let delivered = (|| -> Result<(), JailError> {
            // In place: the jail has this very inode bound read-only at /code/main.py.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&code_path)
                .map_err(|e| {
                    JailError::os(
                        format!("writing the program to `{}`", code_path.display()),
                        e,
                    )
                })?;
            f.write_all(&req.code).map_err(|e| {
                JailError::os(
                    format!("writing the program to `{}`", code_path.display()),
                    e,
                )
            })?;
            if let Some(input) = &req.input {
                built.dir.input_sha256 = Some(crate::workspace::sha256_hex(input));
                let path = built.dir.work().join(crate::workspace::INPUT_FILE);
                // Nothing has run in the workspace yet, so nothing can be waiting there; still,
                // never follow or reuse an entry that exists.
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| {
                        JailError::os(format!("writing the input to `{}`", path.display()), e)
                    })?;
                f.write_all(input).map_err(|e| {
                    JailError::os(format!("writing the input to `{}`", path.display()), e)
                })?;
                if let Some((uid, gid)) = built.host_ids {
                    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(|e| {
                        JailError::os(format!("handing over `{}`", path.display()), e)
                    })?;
                }
            }
            built.dir.add_files(&req.files, built.host_ids)?;
            Ok(())
        })();
        let started_at = SystemTime::now();
        let started = Instant::now();
        if let Err(error) = delivered {
            let ctx = RunContext {
                req,
                backend: "jail",
                python: Some(&built.py),
                started_at,
                applied,
                notes,
            };
            return ctx.sandbox_error(error.to_string());
        }
        let message = env_message(&program_env(req));
        // A dead boot (EPIPE) shows up in the supervision below; nothing to add here.
        let mut go = std::fs::File::from(go);
        let _ = go.write_all(&message);
        // EOF for the boot script, but keep our end open until the run is over: closing a unix
        // socket with its ready byte still unread would reset the boot's read (ECONNRESET).
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(go.as_raw_fd(), libc::SHUT_WR) };
        if built.trace {
            built
                .phases
                .push(("code_delivered".into(), init::monotonic_us()));
        }
        notes.push(format!(
            "warm start: the jail was built {} ms before the program arrived, its interpreter {}",
            started.saturating_duration_since(built_at).as_millis(),
            if ready { "waiting" } else { "still starting" }
        ));
        let run = Supervised {
            applied,
            notes,
            started_at,
            started,
            egress: None,
        };
        let report = self.supervise_built(built, req, run);
        drop(go);
        report
    }

    fn supervise_built(&self, built: Built, req: &RunRequest, run: Supervised) -> ExecutionReport {
        let Built {
            dir,
            cgroup,
            py,
            spawned,
            t0,
            mut phases,
            trace,
            ..
        } = built;
        let Supervised {
            applied,
            notes,
            started_at,
            started,
            egress,
        } = run;
        let mut ctx = RunContext {
            req,
            backend: "jail",
            python: Some(&py),
            started_at,
            applied,
            notes,
        };
        let Spawned {
            child,
            status_r,
            seccomp_sock,
            ..
        } = spawned;
        let helper_pid = child.pid;
        let killer = JailTree {
            helper: helper_pid,
            cgroup: cgroup.as_ref(),
        };
        let mut extras = JailExtras {
            status: Some(status_r),
            status_buf: Vec::new(),
            sock: Some(seccomp_sock),
            listener: None,
            policy: &self.builder.policy,
            violations: Vec::new(),
            denials: 0,
            egress: egress.map(|e| (e, started)),
            proxy: None,
            proxy_error: None,
        };
        let mut outcome = supervise::supervise(
            child,
            started,
            Supervision::for_request(req, &killer, Some(&mut extras))
                .with_cpu(cgroup.as_ref().map(|c| c as &dyn supervise::CpuMeter)),
        );
        let sup_done = init::monotonic_us();
        extras.drain_status();
        let events = extras.events();
        let proxy = extras.proxy.take();
        if let Some(e) = extras.proxy_error.take() {
            ctx.notes.push(e);
        }
        let mut direct_refused = 0;
        let stats = cgroup.as_ref().map(RunCgroup::stats);
        drop(cgroup);

        let mut setup_error = None;
        let mut program_exit = None;
        for ev in events {
            match ev {
                Event::SetupError { message } => setup_error = Some(message),
                Event::Landlock { status } => {
                    if status == "fully_enforced" {
                        ctx.applied.enforced("filesystem", "landlock");
                    } else {
                        ctx.notes.push(format!("landlock: {status}"));
                        if status == "partially_enforced" {
                            ctx.applied.enforced("filesystem", "landlock_partial");
                        }
                    }
                }
                Event::Note { message } => ctx.notes.push(message),
                Event::Egress { direct_refused: n } => direct_refused = n,
                Event::Phase { name, at_us } => phases.push((name, at_us)),
                Event::Exit {
                    code,
                    signal,
                    user_ms,
                    sys_ms,
                    maxrss_bytes,
                } => {
                    program_exit = Some(Exit {
                        code,
                        signal,
                        user_ms,
                        sys_ms,
                        maxrss_bytes,
                    })
                }
            }
        }
        ctx.applied
            .enforced("filesystem", "pivot_root_readonly_binds");
        ctx.applied.enforced(
            "syscalls",
            match self.builder.config.seccomp {
                seccomp::Mode::Deny => "seccomp_deny_list",
                seccomp::Mode::Allow => "seccomp_allow_list",
            },
        );
        let stopped_by_us = outcome.stopped_by_supervisor();
        match program_exit {
            Some(e) if !stopped_by_us => outcome.exit = e,
            Some(e) => {
                // Stopped by us: the helper's own exit status means nothing to the user.
                outcome.exit.code = None;
                outcome.exit.signal = Some(libc::SIGKILL);
                outcome.exit.user_ms = e.user_ms;
                outcome.exit.sys_ms = e.sys_ms;
                outcome.exit.maxrss_bytes = e.maxrss_bytes;
            }
            None if setup_error.is_none() && !stopped_by_us => {
                setup_error = Some(format!(
                    "the jail ended without reporting the program's exit (helper exit: {:?}, signal: {:?})",
                    outcome.exit.code, outcome.exit.signal
                ));
            }
            None => {
                if outcome.timed_out
                    || outcome.output_limited.is_some()
                    || outcome.cpu_limited.is_some()
                {
                    outcome.exit.code = None;
                    outcome.exit.signal = Some(libc::SIGKILL);
                }
            }
        }
        // Violations are what the supervisor was notified of, never inferred from how the
        // program ended (a program can kill itself with SIGSYS).
        let violations = extras.violations;
        if trace {
            // Start-up phases, in ms since this run began (monotonic clock, all processes).
            let exit_seen = init::monotonic_us();
            phases.push(("supervise_done".into(), sup_done));
            phases.push(("exit_seen".into(), exit_seen));
            phases.sort_by_key(|(_, at)| *at);
            let line: Vec<String> = phases
                .iter()
                .map(|(name, at)| format!("{name} {:.2}", at.saturating_sub(t0) as f64 / 1000.0))
                .collect();
            ctx.notes.push(format!("phases (ms): {}", line.join(", ")));
        }
        let mut report = ctx.finish(
            Observed {
                outcome,
                cgroup: stats,
                violations,
                setup_error,
            },
            dir,
        );
        if let Some(proxy) = proxy {
            let (connections, unlisted) = proxy.finish();
            report.egress = connections;
            if unlisted > 0 {
                report.notes.push(format!(
                    "egress: {unlisted} more connections than the {} listed",
                    fleetbox_proto::MAX_EGRESS_LISTED
                ));
            }
        }
        report.egress_direct_refused = direct_refused;
        report
    }
}

/// The environment as the boot script reads it: `KEY=VALUE` entries each ended by a NUL, then an
/// empty entry.
fn env_message(env: &[(String, String)]) -> Vec<u8> {
    let mut message = Vec::new();
    for (k, v) in env {
        message.extend_from_slice(k.as_bytes());
        message.push(b'=');
        message.extend_from_slice(v.as_bytes());
        message.push(0);
    }
    message.push(0);
    message
}

/// The program's whole environment: the jail's base, the egress proxy's address when the run
/// has one, and the run's (shard contract) variables.
fn program_env(req: &RunRequest) -> Vec<(String, String)> {
    let mut env = base_env("/tmp", "/tmp");
    if !req.limits.network.rules().is_empty() {
        env.extend(crate::egress::program_env());
    }
    env.extend(req.env.iter().cloned());
    env
}

/// What supervising a built jail starts from.
struct Supervised {
    applied: AppliedLimits,
    notes: Vec<String>,
    started_at: SystemTime,
    started: Instant,
    egress: Option<EgressSetup>,
}

/// The run's allow list and how its proxy resolves names.
struct EgressSetup {
    rules: Vec<fleetbox_proto::EgressRule>,
    resolver: crate::egress::Resolver,
    /// Where the proxy logs (a session takes its calls' connections from it).
    log: std::sync::Arc<crate::egress::EgressLog>,
}

/// Why a jail could not be built, with the interpreter when it was found (for the report).
struct BuildError {
    error: JailError,
    python: Option<Box<python::Python>>,
}

impl<E: Into<JailError>> From<E> for BuildError {
    fn from(error: E) -> Self {
        BuildError {
            error: error.into(),
            python: None,
        }
    }
}

impl Builder {
    /// Everything up to the program: the run directory (with `code` and `input`), the cgroup,
    /// the rlimit plan, and the started jail. With `warm`, the code is empty for now and the
    /// program is the boot script waiting for it.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        shape: &Shape,
        code: &[u8],
        input: Option<&[u8]>,
        files: &[(String, Vec<u8>)],
        env: Vec<(String, String)>,
        warm: bool,
        applied: &mut AppliedLimits,
        notes: &mut Vec<String>,
    ) -> Result<Built, BuildError> {
        let trace = self.config.trace;
        let t0 = init::monotonic_us();
        let mut phases: Vec<(String, u64)> = Vec::new();
        host_supports_jail().map_err(|error| JailError::HostCannotJail {
            error: Box::new(error),
        })?;
        let limits = &shape.limits;
        let py = python::resolve(shape.python.as_deref().or(self.config.python.as_deref()))?;
        let with_py = |error: JailError| BuildError {
            error,
            python: Some(Box::new(py.clone())),
        };
        let privileged = sys::is_root();
        let lease = privileged
            .then(run_uid)
            .transpose()
            .map_err(|e| with_py(JailError::os("taking a run uid".to_string(), e)))?;
        let (host_uid, host_gid) = if let Some(l) = &lease {
            (l.uid, l.uid)
        } else {
            // SAFETY: getuid/getgid have no preconditions.
            unsafe { (libc::getuid(), libc::getgid()) }
        };
        let host_ids = privileged.then_some((host_uid, host_gid));
        let quota = Some(crate::workspace::Quota::of(limits));
        let dir = RunDir::create(&self.config.work_root, code, input, host_ids, quota)
            .and_then(|mut d| d.add_files(files, host_ids).map(|()| d))
            .map_err(|e| with_py(e.into()))?;
        let mut dir = dir;
        dir.hold_uid(lease);
        if dir.quota.is_some() {
            applied.enforced("workspace_size", "tmpfs");
            applied.enforced("workspace_files", "tmpfs");
        }
        let root = dir.path().join("root");
        std::fs::create_dir(&root)
            .map_err(|e| with_py(JailError::os(format!("creating `{}`", root.display()), e)))?;
        if trace {
            phases.push(("workspace_ready".into(), init::monotonic_us()));
        }
        let cgroup = cgroup::for_run(&self.config, limits, notes);
        let plan = RlimitPlan::new(limits, cgroup.as_ref(), applied);
        applied.enforced("timeout", "supervisor_pidfd_poll");
        applied.enforced("timeout", "pid_namespace");
        applied.enforced("max_output", "supervisor_capture");
        applied.enforced("tmp_size", "tmpfs");
        applied.enforced(
            "network",
            match &limits.network {
                fleetbox_proto::Network::Off => "netns_loopback_only",
                fleetbox_proto::Network::Host => "host_network_shared",
                fleetbox_proto::Network::Allow(_) => "netns_egress_proxy_allow_list",
            },
        );

        let (ro_binds, symlinks) = root_layout(&py.prefix);
        let extra_binds = (shape.ro.iter().map(|p| (p.clone(), false)))
            .chain(shape.rw.iter().map(|p| (p.clone(), true)))
            .collect();
        let cfg = InitConfig {
            root,
            work: dir.work(),
            code: dir.code(),
            python: py.path.clone(),
            ro_binds,
            extra_binds,
            symlinks,
            host_uid,
            host_gid,
            ns_uid: SANDBOX_ID,
            ns_gid: SANDBOX_ID,
            privileged,
            cgroup_join: cgroup
                .as_ref()
                .map(|c| {
                    c.join_files()
                        .iter()
                        .map(|p| PathBuf::from(p.to_string_lossy().into_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            rlimits: plan.entries(),
            seccomp: self.filters.clone(),
            env,
            tmp_size: limits.tmp_size.0,
            network: limits.network.is_host(),
            egress: !limits.network.rules().is_empty(),
            trace,
            warm,
        };

        let spawn_started = Instant::now();
        if trace {
            phases.push(("supervisor_ready".into(), init::monotonic_us()));
        }
        let spawned = self.spawn(&cfg).map_err(with_py)?;
        if trace {
            phases.push(("spawned".into(), init::monotonic_us()));
            if let Some(at) = spawned.namespaces_at {
                phases.push(("namespaces_created".into(), at));
            }
        }
        Ok(Built {
            dir,
            cgroup,
            py,
            spawned,
            t0,
            spawn_started,
            phases,
            trace,
            host_ids,
        })
    }
}

struct Spawned {
    child: Child,
    status_r: OwnedFd,
    seccomp_sock: OwnedFd,
    /// When a direct clone returned (the helper reports its own as a phase event).
    namespaces_at: Option<u64>,
    /// A warm jail's [`init::WARM_FD`], our end: the run's environment goes here.
    go: Option<OwnedFd>,
}

impl Builder {
    fn spawn(&self, cfg: &InitConfig) -> Result<Spawned, JailError> {
        let (out_r, out_w) = sys::pipe().map_err(|e| JailError::os("pipe", e))?;
        let (err_r, err_w) = sys::pipe().map_err(|e| JailError::os("pipe", e))?;
        let (status_r, status_w) = sys::pipe().map_err(|e| JailError::os("pipe", e))?;
        let (sock_parent, sock_child) =
            socketpair(libc::SOCK_SEQPACKET).map_err(|e| JailError::os("socketpair", e))?;
        sys::set_nonblocking(sock_parent.as_raw_fd())
            .map_err(|e| JailError::os("making the seccomp socket non-blocking", e))?;
        // A warm jail is built by the pool's thread, so never on the single-threaded path.
        if !cfg.warm && self.config.jail_helper.is_none() && init::single_threaded() {
            let null =
                std::fs::File::open("/dev/null").map_err(|e| JailError::os("/dev/null", e))?;
            let fds = init::DirectFds {
                null: null.as_raw_fd(),
                stdout: out_w.as_raw_fd(),
                stderr: err_w.as_raw_fd(),
                status: status_w.as_raw_fd(),
                seccomp: sock_child.as_raw_fd(),
            };
            // SAFETY: checked just above: this process has a single thread, and nothing between
            // the check and the clone starts one.
            let pid = unsafe { init::start_init(cfg, Some(&fds)) }?;
            let namespaces_at = init::monotonic_us();
            drop((null, out_w, err_w, status_w, sock_child));
            return spawned(
                pid,
                [out_r, err_r, status_r, sock_parent],
                Some(namespaces_at),
                None,
            );
        }
        let helper = &self.helper;
        let payload = serde_json::to_vec(cfg)?;
        let mut cmd = Command::new(helper);
        cmd.arg(init::INIT_ARG)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w));
        let status_raw = status_w.as_raw_fd();
        let sock_raw = sock_child.as_raw_fd();
        let (go_r, go_w) = if cfg.warm {
            // A stream socket: the boot script says it is ready on it, then reads the run.
            let (ours, theirs) =
                socketpair(libc::SOCK_STREAM).map_err(|e| JailError::os("socketpair", e))?;
            (Some(theirs), Some(ours))
        } else {
            (None, None)
        };
        let go_raw = go_r.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        // SAFETY: between fork and exec only async-signal-safe calls on descriptors prepared
        // before the fork (fcntl, dup2, setsid, prctl); nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                // Move both above the target numbers first so one cannot clobber the other.
                let s = libc::fcntl(status_raw, libc::F_DUPFD_CLOEXEC, 10);
                let k = libc::fcntl(sock_raw, libc::F_DUPFD_CLOEXEC, 10);
                let g = if go_raw >= 0 {
                    libc::fcntl(go_raw, libc::F_DUPFD_CLOEXEC, 10)
                } else {
                    0
                };
                if s < 0
                    || k < 0
                    || g < 0
                    || libc::dup2(s, init::STATUS_FD) < 0
                    || libc::dup2(k, init::SECCOMP_FD) < 0
                    || (go_raw >= 0 && libc::dup2(g, init::WARM_FD) < 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsid();
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            JailError::os(
                format!("starting the jail helper `{}`", helper.display()),
                e,
            )
        })?;
        drop(cmd);
        drop(status_w);
        drop(sock_child);
        drop(go_r);
        let pid = child.id() as i32;
        if let Some(mut stdin) = child.stdin.take() {
            // The helper reads the whole configuration before doing anything, so this cannot
            // deadlock on a full pipe.
            if let Err(e) = stdin.write_all(&payload) {
                sys::kill(pid, libc::SIGKILL);
                let _ = sys::wait4(pid);
                return Err(JailError::os("sending the jail configuration", e));
            }
        }
        spawned(pid, [out_r, err_r, status_r, sock_parent], None, go_w)
    }
}

/// A started jail's supervisor side: a pidfd for `pid` (the helper, or the namespace init when
/// cloned directly) and the parent ends of its stdout, stderr, status pipe and seccomp socket.
fn spawned(
    pid: i32,
    [stdout, stderr, status_r, seccomp_sock]: [OwnedFd; 4],
    namespaces_at: Option<u64>,
    go: Option<OwnedFd>,
) -> Result<Spawned, JailError> {
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            sys::kill(pid, libc::SIGKILL);
            let _ = sys::wait4(pid);
            return Err(JailError::unsupported(format!(
                "pidfd_open failed ({e}); Linux 5.3 or newer is required"
            )));
        }
    };
    Ok(Spawned {
        child: Child {
            pid,
            pidfd,
            stdout,
            stderr,
        },
        status_r,
        seccomp_sock,
        namespaces_at,
        go,
    })
}

fn socketpair(kind: libc::c_int) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for socketpair to fill.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the new root contains: the interpreter's prefix and the top-level library directories
/// (bound when real directories, recreated when symlinks as on merged-/usr systems).
fn root_layout(prefix: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, PathBuf)>) {
    let mut binds = vec![PathBuf::from("/usr")];
    let mut links = Vec::new();
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let p = Path::new(top);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(p) {
                    links.push((p.to_path_buf(), target));
                }
            }
            Ok(m) if m.is_dir() => binds.push(p.to_path_buf()),
            _ => {}
        }
    }
    if !prefix.starts_with("/usr") && prefix != Path::new("/") {
        binds.push(prefix.to_path_buf());
    }
    (binds, links)
}

/// Kills a jail: the helper (its namespace init follows through `PR_SET_PDEATHSIG`, and with it
/// the whole PID namespace) and everything in the run's cgroup.
struct JailTree<'a> {
    helper: i32,
    cgroup: Option<&'a RunCgroup>,
}

impl TreeKiller for JailTree<'_> {
    fn kill_tree(&self) {
        if let Some(cg) = self.cgroup {
            cg.kill_all();
        }
        sys::kill(self.helper, libc::SIGKILL);
    }
}

struct JailExtras<'a> {
    status: Option<OwnedFd>,
    status_buf: Vec<u8>,
    sock: Option<OwnedFd>,
    listener: Option<OwnedFd>,
    policy: &'a Policy,
    violations: Vec<Violation>,
    /// Denied calls so far; past [`MAX_DENIALS`] the run is ended.
    denials: u64,
    /// Until the jail's proxy socket arrives: what the proxy will serve, and the run's start.
    egress: Option<(EgressSetup, Instant)>,
    proxy: Option<crate::egress::Proxy>,
    proxy_error: Option<String>,
}

/// Denied syscalls a run may make before it is ended: each costs the supervisor a
/// notification round trip outside the run's CPU limit, so a flood of them is stopped.
const MAX_DENIALS: u64 = 1000;

impl JailExtras<'_> {
    fn read_status(&mut self) -> bool {
        let Some(fd) = self.status.as_ref() else {
            return false;
        };
        let mut buf = [0u8; 4096];
        loop {
            match sys::read(fd.as_raw_fd(), &mut buf) {
                Ok(Some(0)) | Err(_) => {
                    self.status = None;
                    return false;
                }
                Ok(Some(n)) => {
                    // Bounded: the helper sends a handful of short lines.
                    if self.status_buf.len() < 1 << 20 {
                        self.status_buf.extend_from_slice(&buf[..n]);
                    }
                }
                Ok(None) => return true,
            }
        }
    }

    fn drain_status(&mut self) {
        while self.read_status() {
            if sys::poll(&[self.status.as_ref().map_or(-1, |f| f.as_raw_fd())], 50)
                .map(|r| r[0] == 0)
                .unwrap_or(true)
            {
                break;
            }
        }
    }

    fn events(&self) -> Vec<Event> {
        self.status_buf
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect()
    }

    fn record_non_native(&mut self, nr: i64, what: &str) {
        if let Some(v) = self
            .violations
            .iter_mut()
            .find(|v| v.kind == "non_native_syscall")
        {
            v.count += 1;
            return;
        }
        self.violations.push(Violation {
            kind: "non_native_syscall".into(),
            syscall: None,
            syscall_nr: Some(nr),
            count: 1,
            detail: format!("{what} was denied"),
        });
    }

    fn record(&mut self, nr: i64, args: &[u64; 6]) {
        let (name, label) = self.policy.describe(nr, args);
        if let Some(v) = self
            .violations
            .iter_mut()
            .find(|v| v.syscall.as_deref() == Some(name.as_str()) && v.detail == label)
        {
            v.count += 1;
            return;
        }
        self.violations.push(Violation {
            kind: "syscall".into(),
            syscall: Some(name),
            syscall_nr: Some(nr),
            count: 1,
            detail: label,
        });
    }
}

impl Extras for JailExtras<'_> {
    fn stop_reason(&self) -> Option<String> {
        (self.denials >= MAX_DENIALS)
            .then(|| format!("the run was ended after {MAX_DENIALS} denied syscalls"))
    }

    fn fds(&self) -> Vec<RawFd> {
        [&self.status, &self.sock, &self.listener]
            .into_iter()
            .flatten()
            .map(AsRawFd::as_raw_fd)
            .collect()
    }

    fn on_ready(&mut self, fd: RawFd, revents: i16) {
        if self.status.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
            self.read_status();
        } else if self.sock.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
            match init::recv_fd(fd) {
                Ok(Some((init::TAG_EGRESS, socket))) => {
                    if let Some((setup, started)) = self.egress.take() {
                        match crate::egress::Proxy::start(
                            socket,
                            setup.rules,
                            setup.resolver,
                            started,
                            setup.log,
                        ) {
                            Ok(p) => self.proxy = Some(p),
                            Err(e) => {
                                self.proxy_error =
                                    Some(format!("egress: the proxy did not start: {e}"))
                            }
                        }
                    }
                }
                Ok(Some((_, listener))) => {
                    self.listener = Some(listener);
                    self.sock = None;
                }
                Ok(None) => {}
                Err(_) => self.sock = None,
            }
        } else if self.listener.as_ref().is_some_and(|l| l.as_raw_fd() == fd) {
            if revents & libc::POLLIN != 0 {
                match seccomp::receive_and_deny(fd) {
                    Ok(Some(n)) => {
                        self.denials += 1;
                        match n.non_native() {
                            Some(what) => self.record_non_native(n.nr, what),
                            None => self.record(n.nr, &n.args),
                        }
                    }
                    Ok(None) => {}
                    Err(_) => self.listener = None,
                }
            } else {
                // POLLHUP: every process holding the filter is gone.
                self.listener = None;
            }
        }
    }
}
