//! Turning what the supervisor observed into an [`ExecutionReport`].

use std::time::SystemTime;

use fleetbox_proto::{AppliedLimits, ExecutionReport, Runner, Status, StreamCapture, Violation};

use crate::cgroup::CgroupStats;
use crate::python::Python;
use crate::supervise::Outcome;
use crate::workspace::{self, OutputFile, RunDir};
use crate::{RunRequest, sys, traceback};

/// Everything known about a run before it starts.
pub struct RunContext<'a> {
    pub req: &'a RunRequest,
    pub backend: &'static str,
    pub python: Option<&'a Python>,
    pub started_at: SystemTime,
    pub applied: AppliedLimits,
    pub notes: Vec<String>,
}

/// Everything observed during a run.
pub struct Observed {
    pub outcome: Outcome,
    pub cgroup: Option<CgroupStats>,
    pub violations: Vec<Violation>,
    /// Set when the sandbox (not the program) failed after starting, e.g. a jail setup step.
    pub setup_error: Option<String>,
}

impl RunContext<'_> {
    fn runner(&self) -> Runner {
        Runner {
            id: self.req.runner_id.clone(),
            python: self.python.map(|p| p.version.clone()).unwrap_or_default(),
            python_executable: self
                .python
                .map(|p| p.path.display().to_string())
                .unwrap_or_default(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
        }
    }

    fn empty_report(&self, status: Status, message: Option<String>) -> ExecutionReport {
        let empty = workspace::sha256_hex(b"");
        let mut r = ExecutionReport::unmeasured(status, None);
        r.message = message;
        r.exit_code = None;
        r.started_at = humantime::format_rfc3339_millis(self.started_at).to_string();
        r.stdout_sha256 = empty.clone();
        r.stderr_sha256 = empty;
        r.limits = self.applied.clone();
        r.backend = self.backend.to_string();
        r.code_sha256 = workspace::sha256_hex(&self.req.code);
        r.input_sha256 = self.req.input.as_deref().map(workspace::sha256_hex);
        r.runner = self.runner();
        r.environment = self.req.environment.as_ref().map(|e| e.info.clone());
        r.notes = self.notes.clone();
        r
    }

    /// A report for a run that never started.
    pub fn sandbox_error(&self, message: impl Into<String>) -> ExecutionReport {
        self.empty_report(Status::SandboxError, Some(message.into()))
    }

    pub fn finish(self, obs: Observed, mut dir: RunDir) -> ExecutionReport {
        let limits = &self.applied.limits;
        let Outcome {
            exit,
            wall,
            timed_out,
            cancelled,
            output_limited,
            stopped,
            cpu_limited,
            stdout,
            stderr,
        } = obs.outcome;
        let mut report = self.empty_report(Status::Ok, None);
        report.exit_code = exit.code;
        report.signal = exit.signal;
        report.signal_name = exit.signal.map(sys::signal_name);
        report.wall_ms = wall.as_millis() as u64;
        let cg = obs.cgroup.unwrap_or_default();
        report.cpu_user_ms = cg.cpu_user_ms.unwrap_or(exit.user_ms);
        report.cpu_sys_ms = cg.cpu_sys_ms.unwrap_or(exit.sys_ms);
        // v1 does not charge shared pages (the interpreter's libraries) to the group; the largest of
        // the group's peak and the biggest process's RSS is the honest figure.
        report.peak_memory_bytes = cg.peak_memory_bytes.unwrap_or(0).max(exit.maxrss_bytes);
        fill_stream(&stdout, &mut report.stdout, &mut report.stdout_bytes);
        report.stdout_truncated = stdout.truncated;
        report.stdout_sha256 = stdout.sha256.clone();
        fill_stream(&stderr, &mut report.stderr, &mut report.stderr_bytes);
        report.stderr_truncated = stderr.truncated;
        report.stderr_sha256 = stderr.sha256.clone();
        report.exception = traceback::parse(&report.stderr);
        report.violations = obs.violations;

        let work = dir.work();
        let listed_at = std::time::Instant::now();
        let listing = workspace::list_files(
            &work,
            dir.input_sha256.as_deref(),
            &dir.given,
            limits.max_listed_files,
            limits.max_hashed_bytes,
            limits.max_file_size.0,
            limits.workspace_files,
        );
        report.listing_ms = listed_at.elapsed().as_millis() as u64;
        report.files = listing.files;
        report.files_truncated = listing.truncated;
        report.notes.extend(listing.note);

        let mut output_too_large = None;
        match workspace::read_output_file(&work, limits.max_output.0) {
            OutputFile::Json(v) => set_output(&mut report, v, "file"),
            OutputFile::NotJson(text) => {
                report
                    .notes
                    .push("`output.json` is not valid JSON; kept as a string".into());
                set_output(&mut report, serde_json::Value::String(text), "file");
            }
            OutputFile::TooLarge(n) => output_too_large = Some(n),
            OutputFile::Absent if !stdout.truncated => {
                match serde_json::from_slice::<serde_json::Value>(&stdout.kept) {
                    Ok(v) => set_output(&mut report, v, "stdout_json"),
                    Err(_) => {
                        let text = report.stdout.clone();
                        set_output(&mut report, serde_json::Value::String(text), "stdout_text")
                    }
                }
            }
            OutputFile::Absent => {}
        }

        // Statuses that claim a limit or a violation come from what the supervisor observed
        // (cgroup counters, seccomp notifications, its own timers and kills, sizes it measured),
        // never from what the program printed or how it chose to die: the parsed exception
        // stays in the report as data.
        let exited_badly = exit.code != Some(0);
        // Measured on the workspace's own filesystem, whatever the program printed.
        let workspace_full = dir.workspace_full();
        if let Some(what) = workspace_full {
            report.violations.push(Violation {
                kind: "workspace_limit".into(),
                syscall: None,
                syscall_nr: None,
                count: 1,
                detail: format!(
                    "the workspace reached its limit of {}",
                    workspace_limit_text(limits, what)
                ),
            });
        }
        let peak = report.peak_memory_bytes;
        // A MemoryError is the memory limit only with evidence: the cgroup hit its limit, or
        // the run's memory came near it (RLIMIT_AS refusals leave no counter).
        let near_memory_limit = cg.memory_limit_hit || peak >= limits.memory.0 / 2;
        let cpu_ms = report.cpu_user_ms + report.cpu_sys_ms;
        let oom = cg.oom_killed
            || (exit.signal == Some(libc::SIGKILL) && cg.memory_limit_hit && !timed_out);
        let (status, message) = if oom {
            // Whatever task the OOM killer picked (the jail's init included), the run hit its
            // memory limit: not a sandbox failure to retry.
            (
                Status::MemoryLimit,
                Some(format!("memory limit of {} reached", limits.memory)),
            )
        } else if let Some(e) = obs.setup_error {
            (Status::SandboxError, Some(e))
        } else if let Some(reason) = cancelled {
            (Status::Killed, Some(format!("cancelled: {reason}")))
        } else if report
            .violations
            .iter()
            .any(|v| matches!(v.kind.as_str(), "syscall" | "non_native_syscall"))
        {
            let names: Vec<String> = report
                .violations
                .iter()
                .filter_map(|v| v.syscall.clone().or_else(|| Some(v.kind.clone())))
                .collect();
            let mut message = format!("forbidden: {}", names.join(", "));
            if let Some(why) = &stopped {
                message.push_str(&format!(" ({why})"));
            }
            (Status::SandboxViolation, Some(message))
        } else if let Some(which) = output_limited {
            (
                Status::OutputLimit,
                Some(format!(
                    "{which} passed the output limit of {} and the run was stopped",
                    limits.max_output
                )),
            )
        } else if exited_badly
            && near_memory_limit
            && report
                .exception
                .as_ref()
                .is_some_and(|e| e.kind == "MemoryError")
        {
            (
                Status::MemoryLimit,
                Some(format!("memory limit of {} reached", limits.memory)),
            )
        } else if timed_out {
            (
                Status::Timeout,
                Some(format!("wall-clock timeout of {} reached", limits.timeout)),
            )
        } else if let Some(used) = cpu_limited {
            (
                Status::Timeout,
                Some(format!(
                    "CPU time limit of {} reached by all the run's processes together ({used} ms)",
                    limits.cpu_time
                )),
            )
        } else if exit.signal == Some(libc::SIGXCPU) && cpu_ms + 50 >= limits.cpu_time.0 {
            (
                Status::Timeout,
                Some(format!("CPU time limit of {} reached", limits.cpu_time)),
            )
        } else if let (true, Some(file)) = (exited_badly, listing.at_file_size_limit.as_ref()) {
            report.violations.push(Violation {
                kind: "file_size_limit".into(),
                syscall: None,
                syscall_nr: None,
                count: 1,
                detail: format!("`{file}` reached the file size limit"),
            });
            (
                Status::OutputLimit,
                Some(format!(
                    "`{file}` reached the file size limit of {}",
                    limits.max_file_size
                )),
            )
        } else if let (true, Some(what)) = (exited_badly, workspace_full) {
            (
                Status::OutputLimit,
                Some(format!(
                    "the workspace is full: its limit of {} reached",
                    workspace_limit_text(limits, what)
                )),
            )
        } else if let Some(n) = output_too_large {
            (
                Status::OutputLimit,
                Some(format!(
                    "`output.json` is {n} bytes, over the output limit of {}",
                    limits.max_output
                )),
            )
        } else if let Some(sig) = exit.signal {
            // Not a kill the sandbox made (those are timeouts, limits and cancels, above): the
            // program's own doing, or the host's. `killed` is kept for the supervisor's kills,
            // which the coordinator retries as infrastructure failures.
            (
                Status::Error,
                Some(format!(
                    "died of {} (not sent by the sandbox)",
                    sys::signal_name(sig)
                )),
            )
        } else if exited_badly {
            let msg = match &report.exception {
                Some(e) => format!("{}: {}", e.kind, e.message),
                None => format!("exited with code {}", exit.code.unwrap_or(-1)),
            };
            (Status::Error, Some(msg))
        } else {
            (Status::Ok, None)
        };
        if cg.pids_limit_hit {
            report.violations.push(Violation {
                kind: "pids_limit".into(),
                syscall: None,
                syscall_nr: None,
                count: 1,
                detail: format!(
                    "the process limit of {} was reached (fork/clone failed)",
                    limits.max_processes
                ),
            });
        }
        report.status = status;
        report.message = message;
        if self.req.keep_workspace {
            report.workspace = Some(dir.keep().display().to_string());
        }
        report
    }
}

fn workspace_limit_text(limits: &fleetbox_proto::Limits, what: &str) -> String {
    if what == "files" {
        format!("{} files", limits.workspace_files)
    } else {
        limits.workspace_size.to_string()
    }
}

fn fill_stream(cap: &StreamCapture, text: &mut String, bytes: &mut u64) {
    *text = String::from_utf8_lossy(&cap.kept).into_owned();
    *bytes = cap.bytes;
}

fn set_output(report: &mut ExecutionReport, value: serde_json::Value, source: &str) {
    // serde_json's map keeps keys sorted, so this serialization is canonical.
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    report.output_sha256 = Some(workspace::sha256_hex(&bytes));
    report.output = Some(value);
    report.output_source = Some(source.to_string());
}
