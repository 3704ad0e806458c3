//! The limits a run is held to, and how each one was enforced.

use serde::{Deserialize, Serialize};

use crate::{ByteSize, Millis};

/// Resource limits for one sandboxed run. Defaults are the "sane for untrusted code" values every
/// entry point starts from; callers override field by field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock time before the whole process tree is killed.
    pub timeout: Millis,
    /// CPU time (user + system). Enforced with `RLIMIT_CPU`, whose granularity is one second.
    pub cpu_time: Millis,
    /// Memory: cgroup `memory.max` when available, `RLIMIT_AS` as the second layer.
    pub memory: ByteSize,
    /// Bytes kept of stdout and of stderr (each). Also the cap on `output.json`.
    pub max_output: ByteSize,
    /// Keep running after an output stream passes `max_output` (the excess is counted, not kept).
    pub continue_past_output_limit: bool,
    /// CPU quota in cores (cgroup `cpu.max` / CFS quota).
    pub cpus: f64,
    /// Processes and threads in the run's tree.
    pub max_processes: u32,
    /// Largest file the program may write (`RLIMIT_FSIZE`).
    pub max_file_size: ByteSize,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    pub max_open_files: u32,
    /// Size of the private `/tmp` (jail backend).
    pub tmp_size: ByteSize,
    /// Bytes the workspace may hold: a size-capped tmpfs mounted for the run when the supervisor
    /// may mount (root). Its pages count against `memory` too.
    pub workspace_size: ByteSize,
    /// Files and directories the workspace may hold (the tmpfs's inodes).
    pub workspace_files: u64,
    /// How many created files are listed in the report, and how many bytes of them are hashed.
    pub max_listed_files: u32,
    pub max_hashed_bytes: ByteSize,
    /// `false` (the default): only loopback exists inside. `true`: the host's network.
    /// `{ allow = ["pkgs.example.org", "*.example.com:443"] }`: the named hosts only, through
    /// the agent's egress proxy (jail backend).
    #[schema(value_type = crate::egress::NetworkSpec)]
    pub network: crate::Network,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Millis::from_secs(10),
            cpu_time: Millis::from_secs(10),
            memory: ByteSize::mib(256),
            max_output: ByteSize::kib(64),
            continue_past_output_limit: false,
            cpus: 1.0,
            max_processes: 64,
            max_file_size: ByteSize::mib(64),
            max_open_files: 256,
            tmp_size: ByteSize::mib(64),
            workspace_size: ByteSize::mib(512),
            workspace_files: 100_000,
            max_listed_files: 1000,
            max_hashed_bytes: ByteSize::mib(256),
            network: crate::Network::Off,
        }
    }
}

/// Which mechanisms enforced one limit (e.g. `memory` by `cgroup_v1` and `rlimit_as`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Enforcement {
    pub limit: String,
    pub by: Vec<String>,
}

/// The limits as they were actually applied to a run, with the mechanisms behind each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct AppliedLimits {
    #[serde(flatten)]
    pub limits: Limits,
    pub enforcement: Vec<Enforcement>,
}

impl AppliedLimits {
    pub fn new(limits: Limits) -> Self {
        AppliedLimits {
            limits,
            enforcement: Vec::new(),
        }
    }

    /// Record that `mechanism` enforces `limit`.
    pub fn enforced(&mut self, limit: &str, mechanism: &str) {
        match self.enforcement.iter_mut().find(|e| e.limit == limit) {
            Some(e) => {
                if !e.by.iter().any(|m| m == mechanism) {
                    e.by.push(mechanism.to_string());
                }
            }
            None => self.enforcement.push(Enforcement {
                limit: limit.to_string(),
                by: vec![mechanism.to_string()],
            }),
        }
    }

    /// Mechanisms that enforced `limit` (empty if none did).
    pub fn mechanisms(&self, limit: &str) -> &[String] {
        self.enforcement
            .iter()
            .find(|e| e.limit == limit)
            .map(|e| e.by.as_slice())
            .unwrap_or(&[])
    }
}
