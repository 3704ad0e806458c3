//! Per-run cgroups: memory, pids and CPU limits, peak memory, OOM detection and killing a tree.
//!
//! Detected once per process. cgroup v2 (one unified hierarchy, what most hosts run) is used when
//! `/sys/fs/cgroup/cgroup.controllers` exists; otherwise the v1 controllers are located through
//! `/proc/self/mounts` (this is how hybrid hosts such as ours look). Runs live under a
//! `fleetbox` parent group. When nothing usable is found (no root, no delegation), runs go without
//! a cgroup and every report says so in `limits.enforcement` and `notes`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
enum Layout {
    V2 {
        parent: PathBuf,
    },
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
}

static DETECTED: OnceLock<Result<Cgroups, String>> = OnceLock::new();

impl Cgroups {
    /// The host's cgroup layout, or why runs go without cgroups; runs go under `root` when
    /// given (`SandboxConfig::cgroup_root`). Detected once per process.
    pub fn detect(root: Option<&Path>) -> Result<&'static Cgroups, &'static str> {
        DETECTED
            .get_or_init(|| detect(root))
            .as_ref()
            .map_err(|e| e.as_str())
    }

    pub fn version(&self) -> &'static str {
        match self.layout {
            Layout::V2 { .. } => "cgroup_v2",
            Layout::V1 { .. } => "cgroup_v1",
        }
    }

    /// Remove the empty run cgroups (`run-<pid>-<n>`) of processes that are gone: an agent
    /// killed with SIGKILL leaves its runs' (and warm jails') groups behind. Only groups older
    /// than `min_age` are touched, and `rmdir` never removes a group that still has members.
    pub fn sweep_stale(&self, min_age: std::time::Duration) -> usize {
        let bases: Vec<&PathBuf> = match &self.layout {
            Layout::V2 { parent } => vec![parent],
            Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => [memory, pids, cpu, cpuacct].into_iter().flatten().collect(),
        };
        let mut removed = 0;
        for base in bases {
            let Ok(entries) = std::fs::read_dir(base) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = crate::workspace::stale_owner(&name.to_string_lossy(), "run-")
                else {
                    continue;
                };
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
                if old && !crate::sys::alive(pid) && std::fs::remove_dir(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Create a cgroup for one run and apply the limits.
    pub fn create_run(&self, limits: &CgroupLimits) -> std::io::Result<RunCgroup> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "run-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut run = RunCgroup {
            version: self.version(),
            dirs: Vec::new(),
            memory: None,
            pids: None,
            cpuacct: None,
            join_files: Vec::new(),
        };
        match &self.layout {
            Layout::V2 { parent } => {
                let dir = parent.join(&name);
                mkdir_fresh(&dir)?;
                run.dirs.push(dir.clone());
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("pids.max"), &limits.max_pids.to_string())?;
                let period = 100_000u64;
                let quota = (limits.cpus * period as f64).round().max(1000.0) as u64;
                let _ = write(&dir.join("cpu.max"), &format!("{quota} {period}"));
                run.memory = Some(dir.clone());
                run.pids = Some(dir.clone());
                run.cpuacct = Some(dir.clone());
            }
            Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => {
                if let Some(base) = memory {
                    let dir = base.join(&name);
                    mkdir_fresh(&dir)?;
                    run.dirs.push(dir.clone());
                    write(
                        &dir.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                    // Count swap too where the kernel accounts it; absent without swap accounting.
                    let _ = write(
                        &dir.join("memory.memsw.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    );
                    // v1 does not charge socket buffers to the memory limit (v2 does): data
                    // queued in loopback TCP connections nobody reads would pin kernel memory
                    // far past it. Cap TCP buffer memory at the memory limit; absent on
                    // kernels without kmem accounting.
                    let _ = write(
                        &dir.join("memory.kmem.tcp.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    );
                    run.memory = Some(dir);
                }
                if let Some(base) = pids {
                    let dir = base.join(&name);
                    mkdir_fresh(&dir)?;
                    run.dirs.push(dir.clone());
                    write(&dir.join("pids.max"), &limits.max_pids.to_string())?;
                    run.pids = Some(dir);
                }
                if let Some(base) = cpu {
                    let dir = base.join(&name);
                    mkdir_fresh(&dir)?;
                    run.dirs.push(dir.clone());
                    let period = 100_000u64;
                    let quota = (limits.cpus * period as f64).round().max(1000.0) as u64;
                    let _ = write(&dir.join("cpu.cfs_period_us"), &period.to_string());
                    let _ = write(&dir.join("cpu.cfs_quota_us"), &quota.to_string());
                    if cpuacct.as_deref() == Some(base.as_path()) {
                        run.cpuacct = Some(dir);
                    }
                }
                if let Some(base) = cpuacct
                    && run.cpuacct.is_none()
                {
                    let dir = base.join(&name);
                    mkdir_fresh(&dir)?;
                    run.dirs.push(dir.clone());
                    run.cpuacct = Some(dir);
                }
            }
        }
        let join = match self.layout {
            Layout::V2 { .. } => "cgroup.procs",
            Layout::V1 { .. } => "tasks",
        };
        run.join_files = run
            .dirs
            .iter()
            .map(|d| CString::new(d.join(join).as_os_str().as_bytes()).unwrap())
            .collect();
        Ok(run)
    }
}

/// A cgroup for one run with `limits` applied, or `None` with the reason pushed to `notes`
/// (the run then goes on under rlimits alone, and its report says so).
pub fn for_run(
    config: &crate::SandboxConfig,
    limits: &fleetbox_proto::Limits,
    notes: &mut Vec<String>,
) -> Option<RunCgroup> {
    if !config.use_cgroups {
        notes.push("no cgroup: disabled in the configuration; rlimits only".into());
        return None;
    }
    let cg = match Cgroups::detect(config.cgroup_root.as_deref()) {
        Ok(cg) => cg,
        Err(why) => {
            notes.push(format!("no cgroup: {why}; rlimits only"));
            return None;
        }
    };
    match cg.create_run(&CgroupLimits {
        memory_bytes: limits.memory.0,
        max_pids: limits.max_processes,
        cpus: limits.cpus,
    }) {
        Ok(run) => Some(run),
        Err(e) => {
            notes.push(format!("cgroup could not be created ({e}); rlimits only"));
            None
        }
    }
}

/// The limits a run's cgroup applies.
#[derive(Debug, Clone, Copy)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub max_pids: u32,
    pub cpus: f64,
}

/// What a run's cgroup measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct CgroupStats {
    pub peak_memory_bytes: Option<u64>,
    pub oom_killed: bool,
    pub memory_limit_hit: bool,
    pub pids_limit_hit: bool,
    pub cpu_user_ms: Option<u64>,
    pub cpu_sys_ms: Option<u64>,
}

/// One run's cgroup (one directory per v1 hierarchy, one in total on v2). Removed on drop.
#[derive(Debug)]
pub struct RunCgroup {
    version: &'static str,
    dirs: Vec<PathBuf>,
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    join_files: Vec<CString>,
}

impl RunCgroup {
    pub fn version(&self) -> &'static str {
        self.version
    }
    pub fn has_memory(&self) -> bool {
        self.memory.is_some()
    }
    pub fn has_pids(&self) -> bool {
        self.pids.is_some()
    }
    pub fn has_cpu(&self) -> bool {
        self.cpuacct.is_some()
    }

    /// The files a *single-threaded* process writes `"0"` into to move itself (and so every
    /// child it forks afterwards) into this cgroup; prepared before `fork` so a child can join
    /// with no allocation.
    ///
    /// On v1 these are the `tasks` files: moving only the calling thread is the one migration
    /// for which the kernel skips the global `cgroup_threadgroup_rwsem`, whose write side waits
    /// for an RCU grace period. Here that is 0.17 ms per join against 7.5 ms (up to 20 ms) for
    /// the same write to `cgroup.procs`. For a single-threaded process it moves the same thing.
    /// On v2 (no `tasks`; `cgroup.threads` needs a threaded subtree) it is `cgroup.procs`.
    pub fn join_files(&self) -> &[CString] {
        &self.join_files
    }

    /// The pids currently in the group.
    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = self.pids.as_ref().or(self.dirs.first()) else {
            return Vec::new();
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILL everything in the group and wait (briefly) until it is empty.
    pub fn kill_all(&self) {
        if self.version == "cgroup_v2"
            && let Some(dir) = self.dirs.first()
            && write(&dir.join("cgroup.kill"), "1").is_ok()
        {
            self.wait_empty(Duration::from_millis(500));
            return;
        }
        // v1 has no cgroup.kill: kill until empty. pids.max bounds how fast a bomb can refill it.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn wait_empty(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// CPU time every process of the group has used so far, in ms (`None` without CPU
    /// accounting). Cheap: one small file read.
    pub fn cpu_used_ms(&self) -> Option<u64> {
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
        if self.version == "cgroup_v2" {
            let st = read(self.dirs.first()?, "cpu.stat")?;
            return st.lines().find_map(|l| {
                let usec: u64 = l.strip_prefix("usage_usec ")?.trim().parse().ok()?;
                Some(usec / 1000)
            });
        }
        let ns: u64 = read(self.cpuacct.as_ref()?, "cpuacct.usage")?
            .trim()
            .parse()
            .ok()?;
        Some(ns / 1_000_000)
    }

    pub fn stats(&self) -> CgroupStats {
        let mut s = CgroupStats::default();
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
        let field = |text: &str, key: &str| -> Option<u64> {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        };
        if self.version == "cgroup_v2" {
            let Some(dir) = self.dirs.first() else {
                return s;
            };
            s.peak_memory_bytes = read(dir, "memory.peak").and_then(|t| t.trim().parse().ok());
            if let Some(ev) = read(dir, "memory.events") {
                s.oom_killed = field(&ev, "oom_kill").unwrap_or(0) > 0;
                s.memory_limit_hit = field(&ev, "max").unwrap_or(0) > 0 || s.oom_killed;
            }
            if let Some(ev) = read(dir, "pids.events") {
                s.pids_limit_hit = field(&ev, "max").unwrap_or(0) > 0;
            }
            if let Some(st) = read(dir, "cpu.stat") {
                s.cpu_user_ms = field(&st, "user_usec").map(|u| u / 1000);
                s.cpu_sys_ms = field(&st, "system_usec").map(|u| u / 1000);
            }
            return s;
        }
        if let Some(dir) = &self.memory {
            s.peak_memory_bytes =
                read(dir, "memory.max_usage_in_bytes").and_then(|t| t.trim().parse().ok());
            if let Some(oc) = read(dir, "memory.oom_control") {
                s.oom_killed = field(&oc, "oom_kill").unwrap_or(0) > 0;
            }
            let failcnt: u64 = read(dir, "memory.failcnt")
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            s.memory_limit_hit = failcnt > 0 || s.oom_killed;
        }
        if let Some(dir) = &self.pids
            && let Some(ev) = read(dir, "pids.events")
        {
            s.pids_limit_hit = field(&ev, "max").unwrap_or(0) > 0;
        }
        if let Some(dir) = &self.cpuacct {
            let ns = |f: &str| read(dir, f).and_then(|t| t.trim().parse::<u64>().ok());
            s.cpu_user_ms = ns("cpuacct.usage_user").map(|n| n / 1_000_000);
            s.cpu_sys_ms = ns("cpuacct.usage_sys").map(|n| n / 1_000_000);
        }
        s
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        self.kill_all();
        for dir in &self.dirs {
            // rmdir fails with EBUSY until the last (zombie) member is reaped; retry briefly.
            let deadline = Instant::now() + Duration::from_millis(200);
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn mkdir_fresh(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        let _ = std::fs::remove_dir(dir);
    }
    std::fs::create_dir(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

fn detect(custom: Option<&Path>) -> Result<Cgroups, String> {
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers");
    if unified.exists() {
        return detect_v2(custom).map(|parent| Cgroups {
            layout: Layout::V2 { parent },
        });
    }
    detect_v1(custom)
}

fn detect_v2(custom: Option<&Path>) -> Result<PathBuf, String> {
    let root = Path::new("/sys/fs/cgroup");
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
        })
        .unwrap_or_default();
    let mut candidates = Vec::new();
    if let Some(p) = custom {
        candidates.push(p.to_path_buf());
    }
    candidates.push(root.join("fleetbox"));
    if !own.is_empty() && own != "/" {
        // A delegated subtree (systemd `Delegate=yes`): runs go under our own group's sibling.
        let own_dir = root.join(own.trim_start_matches('/'));
        if let Some(parent) = own_dir.parent() {
            candidates.push(parent.join("fleetbox"));
        }
    }
    let mut errors = Vec::new();
    for parent in candidates {
        match prepare_v2_parent(&parent) {
            Ok(()) => return Ok(parent),
            Err(e) => errors.push(format!("{}: {e}", parent.display())),
        }
    }
    Err(format!(
        "cgroup v2 is mounted but no writable parent group was found ({})",
        errors.join("; ")
    ))
}

fn prepare_v2_parent(parent: &Path) -> std::io::Result<()> {
    if !parent.exists() {
        std::fs::create_dir(parent)?;
    }
    let wanted = ["memory", "pids", "cpu"];
    let enable = |dir: &Path| -> std::io::Result<()> {
        let line: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
        std::fs::write(dir.join("cgroup.subtree_control"), line.join(" "))
    };
    if let Some(grand) = parent.parent() {
        let _ = enable(grand);
    }
    enable(parent)?;
    let have = std::fs::read_to_string(parent.join("cgroup.subtree_control"))?;
    for c in ["memory", "pids"] {
        if !have.split_whitespace().any(|x| x == c) {
            return Err(std::io::Error::other(format!(
                "controller `{c}` not delegated"
            )));
        }
    }
    Ok(())
}

fn detect_v1(custom: Option<&Path>) -> Result<Cgroups, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    let find = |controller: &str| -> Option<PathBuf> {
        mounts.lines().find_map(|l| {
            let mut parts = l.split_whitespace();
            let (_, dir, kind, opts) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            (kind == "cgroup" && opts.split(',').any(|o| o == controller))
                .then(|| PathBuf::from(dir))
        })
    };
    let prepare = |controller: &str| -> Option<PathBuf> {
        let mount = find(controller)?;
        let parent = match &custom {
            Some(rel) => mount.join(rel.strip_prefix("/").unwrap_or(rel)),
            None => mount.join("fleetbox"),
        };
        // Only in a real cgroup hierarchy (every group has `cgroup.procs`): a mount listed
        // but hidden, say by a tmpfs over /sys/fs/cgroup, would take limits as plain files.
        if !mount.join("cgroup.procs").exists() {
            return None;
        }
        if !parent.exists() {
            std::fs::create_dir_all(&parent).ok()?;
        }
        if !parent.join("cgroup.procs").exists() {
            return None;
        }
        // Can we create groups here (root, or a delegated hierarchy)? `access` answers without
        // the mkdir + rmdir probe, which cost ~0.3 ms per hierarchy on every run. If creation
        // fails anyway, the run says so in its notes and falls back to rlimits.
        let c_parent = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: `c_parent` is a valid NUL-terminated path that outlives the call.
        if unsafe { libc::access(c_parent.as_ptr(), libc::W_OK) } != 0 {
            return None;
        }
        if controller == "cpuset" {
            return None;
        }
        Some(parent)
    };
    let memory = prepare("memory");
    let pids = prepare("pids");
    if memory.is_none() && pids.is_none() {
        return Err(
            "no writable cgroup v1 memory or pids hierarchy (run as root or delegate one)".into(),
        );
    }
    let cpu = prepare("cpu");
    let cpuacct = if find("cpuacct") == find("cpu") {
        cpu.clone()
    } else {
        prepare("cpuacct")
    };
    Ok(Cgroups {
        layout: Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        },
    })
}
