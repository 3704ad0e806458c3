//! Inside the jail. Three processes, each doing one thing:
//!
//! - the **helper** (`fleetbox __jail-init`, started by the supervisor, still on the host): reads
//!   its [`InitConfig`] from stdin, `clone`s the namespace init into new user/PID/mount/net/IPC/UTS
//!   namespaces, writes its uid/gid maps, then waits for it;
//! - the **namespace init** (PID 1 inside): moves itself into the run's cgroup (still as the
//!   host uid, before anything else runs), builds the new root (read-only binds of what Python
//!   needs, fresh `/proc`, minimal `/dev`, tmpfs `/tmp`, the workspace), `pivot_root`s into it,
//!   brings up loopback, forks the program and reaps until it exits; when PID 1 exits the kernel
//!   kills everything left in the namespace;
//! - the **program**: drops to the unprivileged uid, sheds every capability, sets
//!   `no_new_privs`, applies rlimits, Landlock and seccomp, hands the seccomp listener to the
//!   supervisor, and `exec`s Python.
//!
//! The helper is a fresh single-threaded process, so the raw `clone` (which skips libc's fork
//! handlers) is safe and the children may allocate. A supervisor that is itself single-threaded
//! (`fleetbox run`) skips the helper: it clones the namespace init directly ([`start_init`]),
//! which saves a process start and an exit hop; a multi-threaded one (an agent) cannot, and
//! executes the helper. Progress and errors go to the supervisor as
//! JSON lines on fd 3.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::JailError;
use super::seccomp;

/// The hidden subcommand that turns the `fleetbox` binary into the helper.
pub const INIT_ARG: &str = "__jail-init";
/// Events to the supervisor.
pub const STATUS_FD: i32 = 3;
/// Where the program sends its seccomp listener.
pub const SECCOMP_FD: i32 = 4;
/// In a warm jail, the unix socket on which the boot script says it is ready and reads the
/// run's environment (the program's stdin until then).
pub const WARM_FD: i32 = 6;
/// The warm jail's boot script (`python3 -I -B -c BOOT`): waits for the run, then runs
/// `/code/main.py` as `__main__`.
pub const BOOT: &str = include_str!("boot.py");

/// Everything the helper needs, sent as JSON on its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub root: PathBuf,
    pub work: PathBuf,
    pub code: PathBuf,
    pub python: PathBuf,
    /// Host directories/files bound read-only at the same path.
    pub ro_binds: Vec<PathBuf>,
    /// More host paths at the same path, `(path, writable)`: an environment, or one being
    /// built. Bound last, so they show even under the jail's own `/tmp`.
    #[serde(default)]
    pub extra_binds: Vec<(PathBuf, bool)>,
    /// `(path, target)` symlinks recreated in the new root (`/lib -> usr/lib`).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    pub host_uid: u32,
    pub host_gid: u32,
    pub ns_uid: u32,
    pub ns_gid: u32,
    /// We are root on the host: may map any uid, must drop root's supplementary groups.
    pub privileged: bool,
    /// The run cgroup's join files ([`crate::cgroup::RunCgroup::join_files`]); the namespace
    /// init writes `"0"` into each before it forks anything.
    pub cgroup_join: Vec<PathBuf>,
    pub rlimits: Vec<(u32, u64, u64)>,
    /// The seccomp filters, compiled once by the supervisor.
    pub seccomp: seccomp::Compiled,
    pub env: Vec<(String, String)>,
    pub tmp_size: u64,
    /// Share the host's network (`network = true`).
    pub network: bool,
    /// `network = { allow = [...] }`: listen on the egress proxy's port inside the jail's
    /// namespace and hand the socket to the supervisor, which serves it from outside.
    #[serde(default)]
    pub egress: bool,
    /// Send a `phase` event with a monotonic timestamp at each start-up step.
    #[serde(default)]
    pub trace: bool,
    /// A warm jail: Python starts [`BOOT`] with [`WARM_FD`] as stdin, and waits there for the
    /// program (written to `/code/main.py` later) and its environment.
    #[serde(default)]
    pub warm: bool,
}

/// Messages to the supervisor, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    SetupError {
        message: String,
    },
    Landlock {
        status: String,
    },
    Note {
        message: String,
    },
    /// A start-up step reached, at `at_us` on `CLOCK_MONOTONIC` (comparable across processes).
    Phase {
        name: String,
        at_us: u64,
    },
    /// Connections the program tried around the egress proxy (refused: no route out).
    Egress {
        direct_refused: u64,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        user_ms: u64,
        sys_ms: u64,
        maxrss_bytes: u64,
    },
}

fn send(event: &Event) {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    // SAFETY: writing a buffer we own to fd 3, which the supervisor gave us (or is closed, in
    // which case the write fails harmlessly).
    unsafe { libc::write(STATUS_FD, line.as_ptr().cast(), line.len()) };
}

/// Microseconds on `CLOCK_MONOTONIC`, the clock every process of a run shares.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn phase(cfg: &InitConfig, name: &str) {
    if cfg.trace {
        send(&Event::Phase {
            name: name.into(),
            at_us: monotonic_us(),
        });
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Entry point of `fleetbox __jail-init`. Never returns.
pub fn helper_main() -> ! {
    // Whatever else the supervisor's process had open without close-on-exec (a parent's
    // jobserver pipe, a stray /dev/null) must not reach the jail.
    close_from(WARM_FD + 1);
    let mut raw = Vec::new();
    let code = match std::io::stdin().read_to_end(&mut raw) {
        Err(e) => fail(JailError::os("reading the jail configuration", e)),
        Ok(_) => match serde_json::from_slice::<InitConfig>(&raw) {
            Err(e) => fail(JailError::Config(e)),
            Ok(cfg) => match helper(&cfg) {
                Ok(code) => code,
                Err(msg) => fail(msg),
            },
        },
    };
    std::process::exit(code)
}

/// Tell the supervisor why setup failed (this process is not the supervisor's, so the error
/// crosses as its message) and give the exit code.
fn fail(error: JailError) -> i32 {
    send(&Event::SetupError {
        message: error.to_string(),
    });
    1
}

fn helper(cfg: &InitConfig) -> Result<i32, JailError> {
    phase(cfg, "helper_start");
    // SAFETY: the helper is a freshly executed process that starts no threads.
    let pid = unsafe { start_init(cfg, None) }?;
    // SAFETY: closing the seccomp socket, which only the program needs.
    unsafe { libc::close(SECCOMP_FD) };
    let mut status = 0;
    loop {
        // SAFETY: `status` is valid for writes.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if errno().kind() != std::io::ErrorKind::Interrupted {
            return Err(JailError::last_os("waiting for the namespace init failed"));
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// Where the namespace init finds its descriptors when the supervisor clones it directly (no
/// helper exec arranged them): each is moved to its fixed number in the child, stdin becomes
/// `null`, and every other descriptor is closed.
pub struct DirectFds {
    pub null: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub status: RawFd,
    pub seccomp: RawFd,
}

/// The `go` pipe's read end in a directly cloned init.
const GO_FD: i32 = 5;

/// Clone the namespace init into its new namespaces, write its uid/gid maps and let it go on;
/// returns its pid (a child of the caller).
///
/// # Safety
///
/// The caller must be single-threaded: the child continues with a copy of the caller's address
/// space and allocates, which is only sound when no other thread can hold a lock (malloc's)
/// at the moment of the clone. The helper is; a supervisor checks with [`single_threaded`].
pub unsafe fn start_init(cfg: &InitConfig, direct: Option<&DirectFds>) -> Result<i32, JailError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::last_os("pipe"));
    }
    // SAFETY: pipe2 returned two fresh descriptors.
    let (go_r, go_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    if !cfg.network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: a fork-like clone (no new stack): the child continues here with a copy of our
    // single-threaded address space (the caller's promise), so it may allocate and use std.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        let e = errno();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::ENOSPC) | Some(libc::EINVAL) => {
                JailError::unsupported(format!(
                    "the host does not allow creating user namespaces ({e}); enable them \
                 (`sysctl -w kernel.unprivileged_userns_clone=1`, `user.max_user_namespaces > 0`, \
                 or on Ubuntu `kernel.apparmor_restrict_unprivileged_userns=0`) or use `--backend process`"
                ))
            }
            _ => JailError::os("clone into new namespaces", e),
        });
    }
    if pid == 0 {
        drop(go_w);
        let go = match direct {
            None => Ok(go_r),
            Some(fds) => arrange_direct_fds(fds, go_r),
        };
        let code = match go.and_then(|go| namespace_init(cfg, go)) {
            Ok(code) => code,
            Err(msg) => fail(msg),
        };
        // SAFETY: leave without running the parent's atexit handlers or unwinding its stack.
        unsafe { libc::_exit(code) };
    }
    let pid = pid as i32;
    // Only the helper owns STATUS_FD; in a supervisor that number is someone else's descriptor.
    if direct.is_none() {
        phase(cfg, "namespaces_created");
    }
    drop(go_r);
    if let Err(e) = write_maps(pid, cfg) {
        // SAFETY: kill/waitpid on our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(e);
    }
    // The namespace init may go on now: it joins the cgroup itself, then builds the root.
    let mut go = std::fs::File::from(go_w);
    let _ = go.write_all(b"1");
    Ok(pid)
}

/// In a directly cloned init: what the helper's `pre_exec` and `exec` do for it. The
/// descriptors land on their fixed numbers, everything else the supervisor had open is closed,
/// and signal handling starts from the defaults in a session of its own.
fn arrange_direct_fds(fds: &DirectFds, go: OwnedFd) -> Result<OwnedFd, JailError> {
    let go = go.into_raw_fd();
    let moves = [
        (fds.null, 0),
        (fds.stdout, 1),
        (fds.stderr, 2),
        (fds.status, STATUS_FD),
        (fds.seccomp, SECCOMP_FD),
        (go, GO_FD),
    ];
    // SAFETY: descriptor and signal syscalls on values we own; each result is checked.
    unsafe {
        // Everything above the targets first, so that no move clobbers a source still needed.
        let mut high = [0; 6];
        for (i, (from, _)) in moves.iter().enumerate() {
            high[i] = libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, 16);
            if high[i] < 0 {
                return Err(JailError::last_os("dup"));
            }
        }
        for (i, (_, to)) in moves.iter().enumerate() {
            if libc::dup2(high[i], *to) < 0 {
                return Err(JailError::last_os("dup2"));
            }
        }
        close_from(GO_FD + 1);
        libc::fcntl(GO_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::setsid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        Ok(OwnedFd::from_raw_fd(GO_FD))
    }
}

/// Close every descriptor numbered `first` or above.
fn close_from(first: i32) {
    // SAFETY: closing descriptors this process owns; nothing refers to them afterwards.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0) == 0 {
            return;
        }
        // Before Linux 5.9: one by one, up to the descriptor limit.
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        for fd in first..rl.rlim_cur.min(1 << 20) as i32 {
            libc::close(fd);
        }
    }
}

/// Whether the calling process has exactly one thread (`Threads:` in `/proc/self/status`).
pub fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
        == Some(1)
}

fn write_maps(pid: i32, cfg: &InitConfig) -> Result<(), JailError> {
    let w = |file: &str, text: &str| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, text)
            .map_err(|e| JailError::os(format!("writing `{path}` ({text:?}) failed"), e))
    };
    if !cfg.privileged {
        // An unprivileged process may only map its own ids, and only after giving up setgroups.
        w("setgroups", "deny")?;
    }
    w("uid_map", &format!("{} {} 1\n", cfg.ns_uid, cfg.host_uid))?;
    w("gid_map", &format!("{} {} 1\n", cfg.ns_gid, cfg.host_gid))?;
    Ok(())
}

/// PID 1 of the new namespaces.
fn namespace_init(cfg: &InitConfig, go: OwnedFd) -> Result<i32, JailError> {
    let mut byte = [0u8; 1];
    let mut go = std::fs::File::from(go);
    if go
        .read(&mut byte)
        .map_err(|e| JailError::os("waiting for the namespaces", e))?
        != 1
    {
        return Err(JailError::protocol(
            "the jail helper went away before the namespaces were ready",
        ));
    }
    drop(go);
    // Into the run's cgroup first, while our credentials are still the host uid that owns the
    // cgroup files, and before the cgroup namespace below, so that it is rooted at the run's
    // cgroup. Everything forked from here on starts inside it.
    join_cgroup(cfg)?;
    phase(cfg, "cgroup_joined");
    become_sandbox_user_keeping_caps(cfg)?;
    // SAFETY: prctl with integer arguments. Die with the helper; and be undumpable (after the
    // uid change, which resets it), so the program, which shares our uid, cannot reach our
    // descriptors through /proc/1/fd.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    // SAFETY: unshare with a flag constant; failure only means no cgroup namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        send(&Event::Note {
            message: format!("no cgroup namespace: {}", errno()),
        });
    }
    phase(cfg, "init_start");
    build_root(cfg)?;
    phase(cfg, "root_built");
    let host = b"fleetbox";
    // SAFETY: `host` is a valid buffer of the given length.
    unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) };
    if !cfg.network {
        loopback_up()?;
    }
    if cfg.egress {
        hand_over_proxy_socket()?;
    }
    enter_root(&cfg.root)?;
    phase(cfg, "root_entered");

    // SAFETY: fork in the single-threaded namespace init.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(JailError::last_os("fork"));
    }
    if child == 0 {
        let msg = match exec_program(cfg) {
            Err(msg) => msg,
            Ok(never) => match never {},
        };
        send(&Event::SetupError {
            message: msg.to_string(),
        });
        // SAFETY: leave the failed child immediately.
        unsafe { libc::_exit(127) };
    }
    // Reap everything; stop when the program itself has exited.
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointers for the duration of the call.
        let r = unsafe { libc::wait4(-1, &mut status, 0, &mut ru) };
        if r < 0 {
            if errno().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(JailError::last_os("wait"));
        }
        if r == child {
            phase(cfg, "program_reaped");
            if cfg.egress {
                send(&Event::Egress {
                    direct_refused: no_route_count(),
                });
            }
            let ms = |tv: libc::timeval| tv.tv_sec as u64 * 1000 + tv.tv_usec as u64 / 1000;
            send(&Event::Exit {
                code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
                signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                user_ms: ms(ru.ru_utime),
                sys_ms: ms(ru.ru_stime),
                maxrss_bytes: ru.ru_maxrss.max(0) as u64 * 1024,
            });
            return Ok(0);
        }
    }
}

fn join_cgroup(cfg: &InitConfig) -> Result<(), JailError> {
    for file in &cfg.cgroup_join {
        std::fs::write(file, b"0")
            .map_err(|e| JailError::os(format!("joining cgroup `{}` failed", file.display()), e))?;
    }
    Ok(())
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src_c = src.map(cstr);
    let dst_c = cstr(dst);
    let fs_c = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    // SAFETY: every pointer is either null or a valid NUL-terminated string living until return.
    let r = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            dst_c.as_ptr(),
            fs_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    if r != 0 {
        return Err(JailError::last_os(format!(
            "mount {} on `{}` ({})",
            src.map(|s| format!("`{}`", s.display()))
                .unwrap_or_else(|| fstype.unwrap_or("-").to_string()),
            dst.display(),
            fstype.unwrap_or("bind"),
        )));
    }
    Ok(())
}

/// Flags the kernel locks on a mount made in a less privileged namespace; a remount must keep them.
fn locked_flags(path: &Path) -> libc::c_ulong {
    // SAFETY: statvfs is plain data the call fills; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(cstr(path).as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let mut f = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            f |= ms_flag;
        }
    }
    f
}

fn bind(src: &Path, dst: &Path, read_only: bool, extra: libc::c_ulong) -> Result<(), JailError> {
    if src.is_dir() {
        std::fs::create_dir_all(dst)
            .map_err(|e| JailError::os(format!("mkdir `{}`", dst.display()), e))?;
    } else {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| JailError::os(format!("mkdir `{}`", parent.display()), e))?;
        }
        std::fs::write(dst, b"")
            .map_err(|e| JailError::os(format!("create `{}`", dst.display()), e))?;
    }
    mount(Some(src), dst, None, libc::MS_BIND | libc::MS_REC, None)?;
    if read_only || extra != 0 {
        let ro = if read_only { libc::MS_RDONLY } else { 0 };
        mount(
            None,
            dst,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | ro | extra | locked_flags(src),
            None,
        )?;
    }
    Ok(())
}

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// What of the host's `/etc` the jail shows (read-only), each because installed packages read
/// it; nothing else of the host's configuration is visible.
const HOST_ETC: &[&str] = &[
    // The dynamic linker's index of `/usr/lib`.
    "/etc/ld.so.cache",
    // Debian reaches shared libraries through it (numpy's `libblas.so.3` →
    // `/etc/alternatives/libblas.so.3-x86_64-linux-gnu` → `/usr/lib/...`): symbolic links only,
    // into the read-only `/usr` the jail already has.
    "/etc/alternatives",
    // Debian's matplotlib refuses to import without its rc file.
    "/etc/matplotlibrc",
    // fontconfig's configuration (matplotlib and Pillow find fonts through it).
    "/etc/fonts",
    // `mimetypes` (and the libraries that guess a file's type with it).
    "/etc/mime.types",
];

fn build_root(cfg: &InitConfig) -> Result<(), JailError> {
    let root = &cfg.root;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=4m,mode=755"),
    )?;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    for path in &cfg.ro_binds {
        bind(path, &inside(root, path), true, nosuid_nodev)?;
    }
    for (link, target) in &cfg.symlinks {
        std::os::unix::fs::symlink(target, inside(root, link))
            .map_err(|e| JailError::os(format!("symlink `{}`", link.display()), e))?;
    }
    // A minimal /etc: who we are, localhost; no shadow, no host configuration.
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(|e| JailError::os("mkdir /etc", e))?;
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0::/:/bin/false\nsandbox:x:{}:{}::/tmp:/bin/false\nnobody:x:65534:65534::/:/bin/false\n",
                cfg.ns_uid, cfg.ns_gid
            ),
        ),
        (
            "group",
            format!("root:x:0:\nsandbox:x:{}:\nnogroup:x:65534:\n", cfg.ns_gid),
        ),
        ("hosts", "127.0.0.1 localhost\n::1 localhost\n".to_string()),
        ("hostname", "fleetbox\n".to_string()),
    ];
    for (name, text) in files {
        std::fs::write(etc.join(name), text)
            .map_err(|e| JailError::os(format!("write /etc/{name}"), e))?;
    }
    for path in HOST_ETC {
        let path = Path::new(path);
        if path.exists() {
            bind(path, &inside(root, path), true, nosuid_nodev)?;
        }
    }

    // With the host's network: name resolution and the trusted certificates, nothing else.
    // Through the egress proxy: the certificates (the proxy resolves names).
    let network_files: &[&str] = match (cfg.network, cfg.egress) {
        (true, _) => &["/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/ssl/certs"],
        (false, true) => &["/etc/ssl/certs"],
        (false, false) => &[],
    };
    for path in network_files {
        let path = Path::new(path);
        if path.exists() {
            bind(path, &inside(root, path), true, nosuid_nodev)?;
        }
    }

    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(|e| JailError::os("mkdir /proc", e))?;
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;

    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(|e| JailError::os("mkdir /dev", e))?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=64k,mode=755"),
    )?;
    for node in ["null", "zero", "full", "urandom", "random"] {
        let host = Path::new("/dev").join(node);
        bind(&host, &dev.join(node), false, 0)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(|e| JailError::os(format!("symlink /dev/{link}"), e))?;
    }
    let tmpfs_opts = format!("size={},mode=1777", cfg.tmp_size.max(4096));
    for dir in [dev.join("shm"), root.join("tmp")] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| JailError::os(format!("mkdir `{}`", dir.display()), e))?;
        mount(
            Some(Path::new("tmpfs")),
            &dir,
            Some("tmpfs"),
            nosuid_nodev,
            Some(&tmpfs_opts),
        )?;
    }
    bind(&cfg.work, &root.join("work"), false, nosuid_nodev)?;
    bind(&cfg.code, &root.join("code/main.py"), true, nosuid_nodev)?;
    for (path, writable) in &cfg.extra_binds {
        bind(path, &inside(root, path), !writable, nosuid_nodev)?;
    }
    Ok(())
}

fn enter_root(root: &Path) -> Result<(), JailError> {
    let dot = c".";
    // SAFETY: chdir/pivot_root/umount2 with valid C strings; errors are reported.
    unsafe {
        if libc::chdir(cstr(root).as_ptr()) != 0 {
            return Err(JailError::last_os("chdir to the new root"));
        }
        // pivot_root(".", "."): the old root ends up stacked on the new one, then is detached.
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(JailError::last_os("pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(JailError::last_os("detaching the old root"));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(JailError::last_os("chdir /"));
        }
    }
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// Listen on `127.0.0.1:PROXY_PORT` in the jail's network namespace and send the socket to the
/// supervisor (tagged [`TAG_EGRESS`]); this process keeps no copy, so the program gets none.
fn hand_over_proxy_socket() -> Result<(), JailError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", crate::egress::PROXY_PORT))
        .map_err(|e| JailError::os("listening for the egress proxy", e))?;
    send_fd(SECCOMP_FD, listener.as_raw_fd(), TAG_EGRESS)
        .map_err(|e| JailError::os("handing over the egress proxy's socket", e))
}

/// Packets this network namespace could not route (IPv4 and IPv6): with only loopback, every
/// connection or datagram to anywhere else. Read from the jail's own `/proc`.
fn no_route_count() -> u64 {
    let field = |file: &str, table: &str, name: &str| -> u64 {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if table.is_empty() {
            // snmp6: `Name value` lines.
            return text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0);
        }
        // snmp: a header line of names, then a line of values, per table.
        let mut rows = text.lines().filter(|l| l.starts_with(table));
        let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
            return 0;
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    field("/proc/self/net/snmp", "Ip:", "OutNoRoutes")
        + field("/proc/self/net/snmp6", "", "Ip6OutNoRoutes")
}

fn loopback_up() -> Result<(), JailError> {
    // SAFETY: socket/ioctl on an ifreq we own; the name fits (`lo` plus NUL).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(JailError::last_os("socket for loopback setup"));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            libc::close(fd);
            return Err(JailError::last_os("reading loopback flags"));
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        libc::close(fd);
        if r != 0 {
            return Err(JailError::last_os("bringing loopback up"));
        }
    }
    Ok(())
}

/// Last capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn exec_program(cfg: &InitConfig) -> Result<std::convert::Infallible, JailError> {
    phase(cfg, "program_forked");
    let last = last_cap();
    // SAFETY: process-attribute syscalls with integer arguments; each result is checked.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        for cap in 0..=last {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && errno().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(JailError::last_os(
                    "dropping capability {cap} from the bounding set",
                ));
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if cfg.privileged && libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(JailError::last_os("setgroups"));
        }
        if libc::setresgid(cfg.ns_gid, cfg.ns_gid, cfg.ns_gid) != 0 {
            return Err(JailError::last_os(format!("setresgid({})", cfg.ns_gid)));
        }
        if libc::setresuid(cfg.ns_uid, cfg.ns_uid, cfg.ns_uid) != 0 {
            return Err(JailError::last_os(format!("setresuid({})", cfg.ns_uid)));
        }
    }
    drop_all_capabilities()?;
    for &(res, soft, hard) in &cfg.rlimits {
        let rl = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `rl` is valid for the call.
        if unsafe { libc::setrlimit(res as _, &rl) } != 0 {
            return Err(JailError::last_os("setrlimit({res})"));
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::last_os("no_new_privs"));
    }
    std::env::set_current_dir("/work").map_err(|e| JailError::os("chdir /work", e))?;
    phase(cfg, "privileges_dropped");
    let writable: Vec<&Path> = cfg
        .extra_binds
        .iter()
        .filter(|(_, w)| *w)
        .map(|(p, _)| p.as_path())
        .collect();
    let landlock = super::landlock::restrict(&writable);
    send(&Event::Landlock { status: landlock });
    phase(cfg, "landlock_applied");

    // Keep the event and seccomp descriptors away from the program.
    for fd in [STATUS_FD, SECCOMP_FD] {
        // SAFETY: fcntl on descriptors we inherited.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let listener = cfg
        .seccomp
        .install()
        .map_err(|e| JailError::os("installing the seccomp filter", e))?;
    send_fd(SECCOMP_FD, listener.as_raw_fd(), TAG_SECCOMP)
        .map_err(|e| JailError::os("handing over the seccomp listener", e))?;
    drop(listener);
    phase(cfg, "seccomp_installed");

    let mut cmd = std::process::Command::new(&cfg.python);
    cmd.env_clear().envs(cfg.env.iter().map(|(k, v)| (k, v)));
    if cfg.warm {
        // SAFETY: WARM_FD was arranged by the supervisor for a warm jail and is ours alone; it
        // becomes the program's stdin and is closed on exec at its own number.
        unsafe { libc::fcntl(WARM_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: as above; ownership moves to the command, which dups it onto stdin.
        let go = unsafe { OwnedFd::from_raw_fd(WARM_FD) };
        cmd.args(["-I", "-B", "-c", BOOT]).stdin(go);
    } else {
        cmd.args(["-I", "-B", "/code/main.py"])
            .stdin(std::process::Stdio::null());
    }
    let err = cmd.exec();
    Err(JailError::os(
        format!("executing `{}` inside the jail", cfg.python.display()),
        err,
    ))
}

/// The namespace init starts as the host uid that created the namespace, which has no mapping
/// inside when that is root, so it could not even create files. Switch to the sandbox ids while
/// keeping the namespace capabilities (needed for mounts); the files it creates then belong to
/// the run's unprivileged host uid.
fn become_sandbox_user_keeping_caps(cfg: &InitConfig) -> Result<(), JailError> {
    // SAFETY: process-attribute syscalls with integer arguments; each result is checked.
    unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if cfg.privileged && libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(JailError::last_os("setgroups in the namespace init"));
        }
        if libc::setresgid(cfg.ns_gid, cfg.ns_gid, cfg.ns_gid) != 0
            || libc::setresuid(cfg.ns_uid, cfg.ns_uid, cfg.ns_uid) != 0
        {
            return Err(JailError::last_os(
                "switching the namespace init to the sandbox ids",
            ));
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
    }
    let (header, mut data) = cap_structs();
    // SAFETY: capget/capset with a v3 header and two data words.
    unsafe {
        if libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) != 0 {
            return Err(JailError::last_os("capget"));
        }
        for d in &mut data {
            d.effective = d.permitted;
        }
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return Err(JailError::last_os("raising namespace capabilities"));
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn cap_structs() -> (CapHeader, [CapData; 2]) {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    (
        CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        },
        [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2],
    )
}

fn drop_all_capabilities() -> Result<(), JailError> {
    let (header, data) = cap_structs();
    // SAFETY: capset with a v3 header and the two data words it expects.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(JailError::last_os("capset"));
    }
    Ok(())
}

/// What a descriptor sent on [`SECCOMP_FD`] is: the program's seccomp listener, or the egress
/// proxy's listening socket.
pub const TAG_SECCOMP: u8 = 0;
pub const TAG_EGRESS: u8 = b'E';

fn send_fd(sock: i32, fd: i32, tag: u8) -> std::io::Result<()> {
    let byte = [tag; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut cmsg_buf = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is CMSG_SPACE(sizeof(int)) bytes, enough for one header + fd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(sock, &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receive one descriptor sent with [`send_fd`], with its tag.
pub fn recv_fd(sock: i32) -> std::io::Result<Option<(u8, OwnedFd)>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut cmsg_buf = vec![0u8; space];
    // SAFETY: msghdr is plain data; pointers set below outlive recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: recvmsg into buffers we own; CMSG_* walk the control buffer the kernel filled.
    unsafe {
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Ok(None);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        Ok(Some((byte[0], OwnedFd::from_raw_fd(fd))))
    }
}
