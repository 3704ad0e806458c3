//! Reading a running container's cgroup from the host (v1 and v2).
//!
//! The daemon removes a container's cgroup as soon as its process ends, so the backend reads it
//! while the run goes on (every few milliseconds) and keeps the last values: CPU is exact to the
//! last read, peak memory is the kernel's own high-water mark as of then.

use std::path::{Path, PathBuf};

use crate::cgroup::CgroupStats;

/// The container's cgroup directories, found from its process's `/proc/PID/cgroup`.
#[derive(Debug, Clone)]
pub(super) struct Paths {
    v2: Option<PathBuf>,
    memory: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    pids: Option<PathBuf>,
}

/// One read of the counters.
#[derive(Debug, Clone, Default)]
pub(super) struct Reading {
    cpu_user_ns: Option<u64>,
    cpu_sys_ns: Option<u64>,
    peak_bytes: Option<u64>,
    limit_hits: u64,
    /// Processes the OOM killer took in the group (any of them, not only the main one).
    oom_kills: u64,
    pids_max: u64,
}

impl Paths {
    pub fn of_pid(pid: i32) -> Option<Paths> {
        if pid <= 0 {
            return None;
        }
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let root = Path::new("/sys/fs/cgroup");
        let mut p = Paths {
            v2: None,
            memory: None,
            cpuacct: None,
            pids: None,
        };
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if controllers.is_empty() {
                let dir = root.join(rel);
                if dir.join("cgroup.procs").exists() && dir.join("memory.current").exists() {
                    p.v2 = Some(dir);
                }
                continue;
            }
            for c in controllers.split(',') {
                let dir = root.join(controllers).join(rel);
                match c {
                    "memory" => p.memory = Some(dir),
                    "cpuacct" => p.cpuacct = Some(dir),
                    "pids" => p.pids = Some(dir),
                    _ => {}
                }
            }
        }
        (p.v2.is_some() || p.memory.is_some() || p.cpuacct.is_some()).then_some(p)
    }

    /// cgroup v1 charges socket buffers to a group only when told to: cap the container's TCP
    /// buffer memory at its memory limit, as the jail does (v2 charges them to `memory.max`
    /// already). Docker 20.10 sets no such limit, and its API no longer has the field. False
    /// when v1 accounting is there and the write failed.
    pub fn limit_tcp_memory(&self, bytes: u64) -> bool {
        match (&self.v2, &self.memory) {
            (None, Some(dir)) => std::fs::write(
                dir.join("memory.kmem.tcp.limit_in_bytes"),
                bytes.to_string(),
            )
            .is_ok(),
            _ => true,
        }
    }

    pub fn read(&self) -> Reading {
        let num = |dir: &Path, file: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(file))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let field = |dir: &Path, file: &str, key: &str| -> Option<u64> {
            let text = std::fs::read_to_string(dir.join(file)).ok()?;
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        };
        let mut r = Reading::default();
        if let Some(dir) = &self.v2 {
            r.cpu_user_ns = field(dir, "cpu.stat", "user_usec").map(|u| u * 1000);
            r.cpu_sys_ns = field(dir, "cpu.stat", "system_usec").map(|u| u * 1000);
            r.peak_bytes = num(dir, "memory.peak").or_else(|| num(dir, "memory.current"));
            r.limit_hits = field(dir, "memory.events", "max").unwrap_or(0);
            r.oom_kills = field(dir, "memory.events", "oom_kill").unwrap_or(0);
            r.pids_max = field(dir, "pids.events", "max").unwrap_or(0);
            return r;
        }
        if let Some(dir) = &self.cpuacct {
            r.cpu_user_ns = num(dir, "cpuacct.usage_user");
            r.cpu_sys_ns = num(dir, "cpuacct.usage_sys");
        }
        if let Some(dir) = &self.memory {
            r.peak_bytes = num(dir, "memory.max_usage_in_bytes");
            r.limit_hits = num(dir, "memory.failcnt").unwrap_or(0);
            r.oom_kills = field(dir, "memory.oom_control", "oom_kill").unwrap_or(0);
        }
        if let Some(dir) = &self.pids {
            r.pids_max = field(dir, "pids.events", "max").unwrap_or(0);
        }
        r
    }
}

impl Reading {
    /// Keep the latest of each counter (a read after the cgroup is gone finds nothing).
    pub fn merge(&mut self, newer: &Reading) {
        let later = |a: &mut Option<u64>, b: Option<u64>| {
            if let Some(b) = b {
                *a = Some(a.map_or(b, |a| a.max(b)));
            }
        };
        later(&mut self.cpu_user_ns, newer.cpu_user_ns);
        later(&mut self.cpu_sys_ns, newer.cpu_sys_ns);
        later(&mut self.peak_bytes, newer.peak_bytes);
        self.limit_hits = self.limit_hits.max(newer.limit_hits);
        self.oom_kills = self.oom_kills.max(newer.oom_kills);
        self.pids_max = self.pids_max.max(newer.pids_max);
    }

    /// What the run used after `base` (read when the program was handed over).
    pub fn since(&self, base: &Reading) -> CgroupStats {
        let ms = |now: Option<u64>, then: Option<u64>| {
            now.map(|n| n.saturating_sub(then.unwrap_or(0)) / 1_000_000)
        };
        CgroupStats {
            peak_memory_bytes: self.peak_bytes,
            oom_killed: self.oom_kills > base.oom_kills,
            memory_limit_hit: self.limit_hits > base.limit_hits || self.oom_kills > base.oom_kills,
            pids_limit_hit: self.pids_max > base.pids_max,
            cpu_user_ms: ms(self.cpu_user_ns, base.cpu_user_ns),
            cpu_sys_ms: ms(self.cpu_sys_ns, base.cpu_sys_ns),
        }
    }
}
