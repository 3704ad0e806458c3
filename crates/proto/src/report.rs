//! The `ExecutionReport`: what every sandboxed run returns, whichever backend ran it.

use serde::{Deserialize, Serialize};

use crate::AppliedLimits;

/// How a run ended. The names are the contract shared by API, UI, metrics and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Exit code 0, no limit hit.
    Ok,
    /// The program exited with a non-zero code (usually an uncaught exception).
    Error,
    /// Wall-clock or CPU time ran out; the whole process tree was killed.
    Timeout,
    /// The memory limit was hit (OOM kill or `MemoryError`).
    MemoryLimit,
    /// An output stream, `output.json` or a written file passed its cap.
    OutputLimit,
    /// Killed by a signal that is not one of the limits above.
    Killed,
    /// The program tried something the sandbox forbids (e.g. a denied syscall); see `violations`.
    SandboxViolation,
    /// The sandbox itself failed (our fault or the host's), see `message`.
    SandboxError,
    /// Not run: the runner's policy refuses what the job asks (e.g. the network on an agent
    /// started without `--allow-network`), see `message`. Final, like a program's own failure.
    Refused,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::Error,
        Status::Timeout,
        Status::MemoryLimit,
        Status::OutputLimit,
        Status::Killed,
        Status::SandboxViolation,
        Status::SandboxError,
        Status::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::MemoryLimit => "memory_limit",
            Status::OutputLimit => "output_limit",
            Status::Killed => "killed",
            Status::SandboxViolation => "sandbox_violation",
            Status::SandboxError => "sandbox_error",
            Status::Refused => "refused",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame of a Python traceback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Frame {
    pub file: String,
    pub line: u32,
    pub function: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The uncaught Python exception, parsed from stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExceptionInfo {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub traceback: Vec<Frame>,
}

/// A file the program left in its workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    /// Absent when the hashing budget (`max_hashed_bytes`) ran out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Something the program tried that the sandbox stopped or a limit it ran into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Violation {
    /// `syscall`, `non_native_syscall`, `pids_limit`, `file_size_limit`, ...
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall_nr: Option<i64>,
    pub count: u32,
    pub detail: String,
}

/// Who ran the code and with what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct Runner {
    /// `server`, `local`, or the agent's id.
    pub id: String,
    pub python: String,
    pub python_executable: String,
    pub os: String,
    pub arch: String,
}

/// A captured output stream (internal helper shape; the report flattens it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamCapture {
    pub kept: Vec<u8>,
    pub bytes: u64,
    pub truncated: bool,
    pub sha256: String,
}

/// What every sandboxed run returns. Field names follow `DESIGN.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecutionReport {
    pub status: Status,
    /// A human explanation when the status alone does not say enough (limits, sandbox errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal_name: Option<String>,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub wall_ms: u64,
    pub cpu_user_ms: u64,
    pub cpu_sys_ms: u64,
    pub peak_memory_bytes: u64,
    pub stdout: String,
    pub stdout_bytes: u64,
    pub stdout_truncated: bool,
    pub stdout_sha256: String,
    pub stderr: String,
    pub stderr_bytes: u64,
    pub stderr_truncated: bool,
    pub stderr_sha256: String,
    /// `output.json` if written, else stdout as JSON, else stdout as a string.
    pub output: Option<serde_json::Value>,
    pub output_sha256: Option<String>,
    /// `file`, `stdout_json` or `stdout_text`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_source: Option<String>,
    pub exception: Option<ExceptionInfo>,
    pub files: Vec<FileEntry>,
    pub files_truncated: bool,
    /// Time the supervisor spent listing and hashing the workspace after the program ended
    /// (outside the run's limits, so reported on its own).
    #[serde(default)]
    pub listing_ms: u64,
    pub violations: Vec<Violation>,
    pub limits: AppliedLimits,
    pub backend: String,
    /// `docker` only: the OCI runtime the container ran under (`runc`, `runsc` for gVisor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    pub code_sha256: String,
    pub input_sha256: Option<String>,
    pub runner: Runner,
    /// The job's environment (hash and resolved packages), when it asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<crate::EnvironmentInfo>,
    /// Isolation facts worth knowing (e.g. a layer the kernel lacks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Where the workspace was kept, if asked to keep it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// `network = { allow = [...] }`: every connection through the egress proxy, allowed or
    /// refused (at most [`MAX_EGRESS_LISTED`]; the rest are counted in a note).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<crate::EgressConnection>,
    /// Packets the program sent around the proxy (connections and datagrams to anywhere but
    /// loopback): refused, since no route leads out of the jail.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub egress_direct_refused: u64,
    /// A call in a session: which one, and whether the session's interpreter lives on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionCall>,
}

/// What a session call's report says of the session (`POST /v1/sessions/{id}/run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionCall {
    /// The session's id (`ses_…`), as the coordinator named it.
    #[serde(default)]
    pub id: String,
    /// 1 for the session's first call (its opening), then one more per call.
    pub call: u64,
    /// `kept`: the interpreter lives on with its names (also after a call interrupted at its
    /// time limit: `status` is then `timeout`); `ended`: the interpreter is gone (a call that
    /// would not stop, the session's memory limit, its end) and the next call answers
    /// `session_lost`; `lost`: this agent does not hold the session (it restarted).
    pub outcome: SessionOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionOutcome {
    Kept,
    Ended,
    Lost,
}

impl SessionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionOutcome::Kept => "kept",
            SessionOutcome::Ended => "ended",
            SessionOutcome::Lost => "lost",
        }
    }
}

/// How many proxy connections a report lists.
pub const MAX_EGRESS_LISTED: usize = 200;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ExecutionReport {
    /// A report with nothing measured yet: the sandbox's starting point, and what executors that
    /// run no sandbox send (the throughput benchmark's fake agents, protocol tests). Callers set
    /// what they know.
    pub fn unmeasured(status: Status, output: Option<serde_json::Value>) -> Self {
        ExecutionReport {
            status,
            message: None,
            exit_code: Some(if status == Status::Ok { 0 } else { 1 }),
            signal: None,
            signal_name: None,
            started_at: String::new(),
            wall_ms: 0,
            cpu_user_ms: 0,
            cpu_sys_ms: 0,
            peak_memory_bytes: 0,
            stdout: String::new(),
            stdout_bytes: 0,
            stdout_truncated: false,
            stdout_sha256: String::new(),
            stderr: String::new(),
            stderr_bytes: 0,
            stderr_truncated: false,
            stderr_sha256: String::new(),
            output,
            output_sha256: None,
            output_source: None,
            exception: None,
            files: Vec::new(),
            files_truncated: false,
            listing_ms: 0,
            violations: Vec::new(),
            limits: AppliedLimits::default(),
            backend: "none".into(),
            runtime: None,
            code_sha256: String::new(),
            input_sha256: None,
            runner: Runner::default(),
            environment: None,
            notes: Vec::new(),
            egress: Vec::new(),
            egress_direct_refused: 0,
            workspace: None,
            session: None,
        }
    }

    /// One line saying why a run did not succeed (`None` for `ok`): its status, then the
    /// exception, the sandbox's message or the exit code; at most 500 bytes.
    pub fn failure_reason(&self) -> Option<String> {
        if self.status == Status::Ok {
            return None;
        }
        let detail = self
            .exception
            .as_ref()
            .map(|e| format!("{}: {}", e.kind, e.message))
            .or_else(|| self.message.clone())
            .or_else(|| self.exit_code.map(|c| format!("exit code {c}")))
            .unwrap_or_default();
        let mut line = format!("{}: {detail}", self.status.as_str());
        if line.len() > 500 {
            line.truncate(line.floor_char_boundary(500));
        }
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_reason_names_the_status_and_the_best_detail_there_is() {
        let mut r = ExecutionReport::unmeasured(Status::Ok, None);
        assert_eq!(r.failure_reason(), None);
        r.status = Status::Error;
        r.exit_code = Some(3);
        assert_eq!(r.failure_reason().as_deref(), Some("error: exit code 3"));
        r.message = Some("exited with code 3".into());
        assert_eq!(
            r.failure_reason().as_deref(),
            Some("error: exited with code 3")
        );
        r.exception = Some(ExceptionInfo {
            kind: "ValueError".into(),
            message: "bad item 3".into(),
            traceback: Vec::new(),
        });
        assert_eq!(
            r.failure_reason().as_deref(),
            Some("error: ValueError: bad item 3")
        );
        r.exception.as_mut().unwrap().message = "é".repeat(400);
        let long = r.failure_reason().unwrap();
        assert!(
            long.len() <= 500 && long.starts_with("error: ValueError: é"),
            "{}",
            long.len()
        );
    }

    #[test]
    fn status_names_are_the_contract() {
        for s in Status::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
    }
}
