//! The `process` backend (the seed's `local`): a scrubbed `python3 -I -B` in its own session,
//! held by rlimits and, where the host allows, a cgroup.
//!
//! It shares the host's filesystem view and network: use it for trusted code or where namespaces
//! are unavailable. When we are root the program runs as an unprivileged uid of its own (see
//! [`run_uid`]) with `no_new_privs`, so it cannot read root-only files, keep root's
//! capabilities, or signal other runs.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use fleetbox_proto::{AppliedLimits, ExecutionReport};

use crate::cgroup::{self, RunCgroup};
use crate::report::{Observed, RunContext};
use crate::supervise::{self, Child, Supervision, TreeKiller};
use crate::workspace::RunDir;
use crate::{Backend, RunRequest, Sandbox, SandboxConfig, python, sys};

/// First of the uids given to runs when the supervisor is root. Each run gets its own uid so
/// that runs cannot signal each other and `RLIMIT_NPROC` (counted per uid, host-wide) is per run.
pub const RUN_UID_BASE: u32 = 1_500_000_000;
const RUN_UID_SLOTS: u32 = 1 << 20;

/// Where every supervisor on a host takes its runs' uids: one lock file per uid in use.
pub const RUN_UID_LOCKS: &str = "/run/fleetbox/uids";

/// An unprivileged uid (= gid) for one run, unique on this host for as long as the lease lives:
/// an exclusive `flock` on `RUN_UID_LOCKS/<uid>` that every Fleetbox supervisor takes before
/// using the uid (two agents' per-process counters collided once one was 768 runs ahead). The
/// kernel drops the lock when the holder dies, so a killed agent leaves nothing to clean.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    _lock: std::fs::File,
}

pub fn run_uid() -> std::io::Result<UidLease> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Start apart so that concurrent agents rarely try the same uid first.
    take_uid(std::process::id().wrapping_mul(4099).wrapping_add(n))
}

/// The first free uid from slot `first` on.
pub fn take_uid(first: u32) -> std::io::Result<UidLease> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(RUN_UID_LOCKS)?;
    for i in 0..4096u32 {
        let uid = RUN_UID_BASE + first.wrapping_add(i) % RUN_UID_SLOTS;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(format!("{RUN_UID_LOCKS}/{uid}"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0
        {
            return Ok(UidLease { uid, _lock: lock });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
    }
    Err(std::io::Error::other(format!(
        "no free run uid: 4096 in a row are held under {RUN_UID_LOCKS}"
    )))
}

pub struct ProcessSandbox {
    config: SandboxConfig,
}

impl ProcessSandbox {
    pub fn new(config: SandboxConfig) -> Self {
        ProcessSandbox { config }
    }
}

/// Main pids of runs in flight; the no-cgroup fallback must not kill another run's process.
static ACTIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());

impl Sandbox for ProcessSandbox {
    fn backend(&self) -> Backend {
        Backend::Process
    }

    fn open_session(
        &self,
        req: RunRequest,
        lifetime: std::time::Duration,
    ) -> Result<crate::session::Session, crate::session::SessionError> {
        let (limits, runner) = (req.limits.clone(), req.runner_id.clone());
        let (mut req, chan, cancel) = crate::session::session_request(req, lifetime, true)?;
        let chan = chan.expect("a process session has its channel");
        let (tell, told) = std::sync::mpsc::sync_channel(1);
        req.workspace_to = Some(tell);
        let sandbox = ProcessSandbox::new(self.config.clone());
        let run = std::thread::Builder::new()
            .name("fleetbox-session".into())
            .spawn(move || sandbox.run(&req))
            .map_err(|e| crate::session::SessionError(format!("a session's thread: {e}")))?;
        // Told before the interpreter starts; a run that fails first drops the sender.
        let workspace = told.recv().ok();
        let opening = crate::session::Opening {
            limits,
            backend: "process",
            runner_id: runner,
            workspace,
            egress: None,
        };
        crate::session::Session::start(chan, cancel, run, opening)
    }

    fn run(&self, req: &RunRequest) -> ExecutionReport {
        let started_at = SystemTime::now();
        let mut ctx = RunContext {
            req,
            backend: "process",
            python: None,
            started_at,
            applied: AppliedLimits::new(req.limits.clone()),
            notes: Vec::new(),
        };
        if !req.limits.network.rules().is_empty() {
            return ctx.sandbox_error(crate::egress::NEEDS_JAIL);
        }
        let interpreter = match &req.environment {
            Some(env) => Some(env.python.as_path()),
            None => self.config.python.as_deref(),
        };
        let py = match python::resolve(interpreter) {
            Ok(p) => p,
            Err(e) => return ctx.sandbox_error(e.to_string()),
        };
        let lease = match sys::is_root().then(run_uid).transpose() {
            Ok(l) => l,
            Err(e) => return ctx.sandbox_error(format!("taking a run uid: {e}")),
        };
        let owner = lease.as_ref().map(|l| (l.uid, l.uid));
        let dir = match RunDir::create(
            &self.config.work_root,
            &req.code,
            req.input.as_deref(),
            owner,
            Some(crate::workspace::Quota::of(&req.limits)),
        )
        .and_then(|mut d| d.add_files(&req.files, owner).map(|()| d))
        {
            Ok(mut d) => {
                d.hold_uid(lease);
                if let Some(tell) = &req.workspace_to {
                    let _ = tell.send(d.path().to_path_buf());
                }
                d
            }
            Err(e) => {
                let ctx = RunContext {
                    python: Some(&py),
                    ..ctx
                };
                return ctx.sandbox_error(e.to_string());
            }
        };
        if dir.quota.is_some() {
            ctx.applied.enforced("workspace_size", "tmpfs");
            ctx.applied.enforced("workspace_files", "tmpfs");
        }
        let cgroup = cgroup::for_run(&self.config, &req.limits, &mut ctx.notes);
        if cgroup.is_none() {
            sys::set_child_subreaper();
        }
        let plan = RlimitPlan::new(&req.limits, cgroup.as_ref(), &mut ctx.applied);
        ctx.applied.enforced("timeout", "supervisor_pidfd_poll");
        ctx.applied.enforced("max_output", "supervisor_capture");
        if let Some((uid, _)) = owner {
            ctx.notes.push(format!(
                "running as unprivileged per-run uid {uid} with no_new_privs"
            ));
        }
        ctx.python = Some(&py);

        let mut cmd = Command::new(&py.path);
        cmd.arg("-I").arg("-B").arg(dir.code());
        cmd.current_dir(dir.work());
        cmd.env_clear();
        for (k, v) in base_env(
            &dir.tmp().display().to_string(),
            &dir.tmp().display().to_string(),
        ) {
            cmd.env(k, v);
        }
        for (k, v) in &req.env {
            cmd.env(k, v);
        }
        let (out_r, out_w) = match sys::pipe() {
            Ok(p) => p,
            Err(e) => return ctx.sandbox_error(format!("creating a pipe failed: {e}")),
        };
        let (err_r, err_w) = match sys::pipe() {
            Ok(p) => p,
            Err(e) => return ctx.sandbox_error(format!("creating a pipe failed: {e}")),
        };
        let stdin = match req.stdin.as_deref().map(OwnedFd::try_clone).transpose() {
            Ok(fd) => fd.map_or_else(Stdio::null, Stdio::from),
            Err(e) => return ctx.sandbox_error(format!("the program's stdin: {e}")),
        };
        cmd.stdin(stdin)
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w));
        let procs: Vec<CString> = cgroup
            .as_ref()
            .map(|c| c.join_files().to_vec())
            .unwrap_or_default();
        let parent = std::process::id() as i32;
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // syscalls (setsid, open/write/close, setrlimit, prctl, set*id, getppid) on data
        // prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || child_setup(&procs, &plan, owner, parent));
        }
        let started = Instant::now();
        let spawned = cmd.spawn();
        // Drop our copies of the pipes' write ends, or EOF never comes.
        drop(cmd);
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                return ctx.sandbox_error(format!("starting `{}` failed: {e}", py.path.display()));
            }
        };
        let pid = child.id() as i32;
        ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                sys::kill(-pid, libc::SIGKILL);
                let _ = sys::wait4(pid);
                forget_active(pid);
                return ctx.sandbox_error(format!(
                    "pidfd_open failed ({e}); Linux 5.3 or newer is required"
                ));
            }
        };
        let killer = ProcessTree {
            pgid: pid,
            cgroup: cgroup.as_ref(),
        };
        let outcome = supervise::supervise(
            Child {
                pid,
                pidfd,
                stdout: out_r,
                stderr: err_r,
            },
            started,
            Supervision::for_request(req, &killer, None)
                .with_cpu(cgroup.as_ref().map(|c| c as &dyn supervise::CpuMeter)),
        );
        forget_active(pid);
        let stats = cgroup.as_ref().map(RunCgroup::stats);
        drop(cgroup);
        ctx.finish(
            Observed {
                outcome,
                cgroup: stats,
                violations: Vec::new(),
                setup_error: None,
            },
            dir,
        )
    }
}

fn forget_active(pid: i32) {
    ACTIVE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| *p != pid);
}

/// The environment a program sees: the shard contract's variables (added by the caller) and a
/// minimal `PATH`/`LANG`/`HOME`/`TMPDIR`. Nothing of the host's environment. `HOME` is the
/// run's temporary directory, not the workspace: caches written under `~` (matplotlib's font
/// list, pip's) are not files the program "created".
pub fn base_env(home: &str, tmp: &str) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOME".into(), home.into()),
        ("TMPDIR".into(), tmp.into()),
        // Nothing can be shown: `plt.show()` must return, and figures go to files.
        ("MPLBACKEND".into(), "Agg".into()),
    ]
}

/// rlimits to apply in the child, computed before the fork.
#[derive(Clone, Copy)]
pub struct RlimitPlan {
    pub limits: [(libc::__rlimit_resource_t, u64, u64); 6],
    pub count: usize,
}

impl RlimitPlan {
    pub fn new(
        limits: &fleetbox_proto::Limits,
        cgroup: Option<&RunCgroup>,
        applied: &mut AppliedLimits,
    ) -> Self {
        let mut plan = RlimitPlan {
            limits: [(0, 0, 0); 6],
            count: 0,
        };
        let mut push = |res, soft: u64, hard: u64| {
            plan.limits[plan.count] = (res, soft, hard);
            plan.count += 1;
        };
        // RLIMIT_CPU counts whole seconds: round up, SIGXCPU at the soft limit, SIGKILL a second later.
        let cpu_s = limits.cpu_time.0.div_ceil(1000).max(1);
        push(libc::RLIMIT_CPU, cpu_s, cpu_s + 1);
        applied.enforced("cpu_time", "rlimit_cpu");
        // With a cgroup holding resident memory, the address-space limit only has to stop absurd
        // reservations; without one it is the memory limit.
        let mem = limits.memory.0;
        let as_limit = match cgroup {
            Some(cg) if cg.has_memory() => {
                applied.enforced("memory", cg.version());
                mem.saturating_add(1 << 30)
            }
            _ => mem,
        };
        push(libc::RLIMIT_AS, as_limit, as_limit);
        applied.enforced("memory", "rlimit_as");
        push(
            libc::RLIMIT_FSIZE,
            limits.max_file_size.0,
            limits.max_file_size.0,
        );
        applied.enforced("max_file_size", "rlimit_fsize");
        let nofile = u64::from(limits.max_open_files);
        push(libc::RLIMIT_NOFILE, nofile, nofile);
        applied.enforced("max_open_files", "rlimit_nofile");
        push(libc::RLIMIT_CORE, 0, 0);
        match cgroup {
            Some(cg) if cg.has_pids() => applied.enforced("max_processes", cg.version()),
            _ => {
                // RLIMIT_NPROC counts every process of the uid, host-wide: only a fallback.
                let n = u64::from(limits.max_processes);
                push(libc::RLIMIT_NPROC, n, n);
                applied.enforced("max_processes", "rlimit_nproc");
            }
        }
        if let Some(cg) = cgroup
            && cg.has_cpu()
        {
            applied.enforced("cpus", cg.version());
        }
        plan
    }

    /// `(resource, soft, hard)` triples, for the jail helper's configuration.
    pub fn entries(&self) -> Vec<(u32, u64, u64)> {
        self.limits[..self.count]
            .iter()
            .map(|&(r, s, h)| (r as _, s, h))
            .collect()
    }

    /// Apply in the child. Async-signal-safe.
    pub fn apply(&self) -> std::io::Result<()> {
        for &(res, soft, hard) in &self.limits[..self.count] {
            let rl = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: `rl` is a valid rlimit for the duration of the call.
            if unsafe { libc::setrlimit(res, &rl) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Move the calling (single-threaded) process into a run's cgroup: `"0"` into each of its
/// [`RunCgroup::join_files`]. Async-signal-safe.
pub fn join_cgroups(procs: &[CString]) -> std::io::Result<()> {
    for path in procs {
        // SAFETY: `path` is a valid NUL-terminated string; the buffer passed to write is static.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if !ok {
                return Err(err);
            }
        }
    }
    Ok(())
}

fn child_setup(
    procs: &[CString],
    plan: &RlimitPlan,
    owner: Option<(u32, u32)>,
    parent: i32,
) -> std::io::Result<()> {
    // SAFETY: setsid takes no pointers; failures are reported through errno.
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    join_cgroups(procs)?;
    plan.apply()?;
    if let Some((uid, gid)) = owner {
        // SAFETY: set*id calls with integer arguments; setgroups with an empty list.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // The run dies with whoever started it. Set after the uid change, which clears it; a
    // parent already gone (the race before this line) ends the run here.
    // SAFETY: prctl/getppid with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != parent {
            libc::_exit(137);
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Kills a process-backend run: its process group, its cgroup, and (without a cgroup) the
/// orphans it left, which the subreaper bit made our children.
struct ProcessTree<'a> {
    pgid: i32,
    cgroup: Option<&'a RunCgroup>,
}

impl TreeKiller for ProcessTree<'_> {
    fn kill_tree(&self) {
        sys::kill(-self.pgid, libc::SIGKILL);
        match self.cgroup {
            Some(cg) => cg.kill_all(),
            None => kill_orphans(),
        }
    }
}

/// Without a cgroup, a double-forked daemon escapes the process group but, thanks to
/// `PR_SET_CHILD_SUBREAPER`, becomes our child. Kill and reap every child of ours that is not
/// the main process of a run in flight, until none is left.
fn kill_orphans() {
    let me = sys::getpid();
    for _ in 0..50 {
        let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let orphans: Vec<i32> = children_of(me)
            .into_iter()
            .filter(|p| !active.contains(p))
            .collect();
        if orphans.is_empty() {
            return;
        }
        for &pid in &orphans {
            sys::kill(-pid, libc::SIGKILL);
            sys::kill(pid, libc::SIGKILL);
        }
        for &pid in &orphans {
            for _ in 0..100 {
                if sys::try_reap(pid) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }
}

/// Children of `parent` that left its session: run processes call `setsid`, while helper
/// processes the host program started itself (e.g. local agents) stay in its session.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let Some((_, own_sid)) = ppid_and_sid(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            ppid_and_sid(pid).is_some_and(|(ppid, sid)| ppid == parent && sid != own_sid)
        })
        .collect()
}

fn ppid_and_sid(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may hold spaces): state ppid pgrp session.
    let mut rest = stat[stat.rfind(')')? + 2..].split_whitespace();
    let ppid = rest.nth(1)?.parse().ok()?;
    let sid = rest.nth(1)?.parse().ok()?;
    Some((ppid, sid))
}

#[cfg(test)]
mod uid_tests {
    use super::*;

    /// A uid another supervisor holds (here a Python process, the way any other process on the
    /// host would hold it) is skipped; one this process holds is not handed out twice; and a
    /// released one is free again.
    #[test]
    fn run_uids_are_unique_across_supervisors() {
        let first = 900_000 + std::process::id() % 1000;
        let held = RUN_UID_BASE + first;
        let mut other = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import fcntl, sys\nf = open('{RUN_UID_LOCKS}/{held}', 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()"
                ),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::fs::create_dir_all(RUN_UID_LOCKS).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(other.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "held");
        let a = take_uid(first).unwrap();
        assert_eq!(a.uid, held + 1, "the other supervisor's uid was handed out");
        let b = take_uid(first).unwrap();
        assert_eq!(b.uid, held + 2);
        drop(a);
        assert_eq!(take_uid(first).unwrap().uid, held + 1);
        drop(other.stdin.take());
        other.wait().unwrap();
        assert_eq!(take_uid(first).unwrap().uid, held);
        // Many at once, from threads: all different.
        let uids: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(move || {
                        (0..25)
                            .map(|_| take_uid(first).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let leases: Vec<UidLease> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
            leases.iter().map(|l| l.uid).collect()
        });
        let mut sorted = uids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), uids.len());
    }
}
