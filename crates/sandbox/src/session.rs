//! Sessions: one interpreter kept across calls, so names defined in one call exist in the next.
//!
//! A session is one long run of the backend's ordinary sandbox (same jail, same limits, same
//! supervision) whose program is `session.py`, with a stream socket as its stdin: the channel
//! calls go down and answers come back on, framed as a 4-byte big-endian length and JSON. The
//! run's wall-clock limit is the session's lifetime, its memory and process limits hold for the
//! whole session; each call has its own time limit and output cap.
//!
//! A call past its time limit is interrupted inside (SIGALRM raises `KeyboardInterrupt`) and the
//! session lives on; a call that does not answer [`GRACE`] after its limit (it caught the
//! interrupt, or hangs in C code) ends the session: the whole sandbox is killed, as a run past
//! its timeout is. What the interpreter answers is the program's own claim (the session's code
//! runs in the same interpreter): the supervisor bounds what it reads and measures the wall
//! time itself.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fleetbox_proto::{
    ExecutionReport, FileEntry, Limits, MAX_EGRESS_LISTED, Millis, SessionCall, SessionOutcome,
    Status,
};
use serde::Deserialize;
use serde_json::Value;

use crate::Cancel;
use crate::egress::EgressLog;
use crate::workspace::sha256_hex;

/// The session's interpreter (written as the run's program).
pub const SESSION_PY: &str = include_str!("session.py");
/// Set in a session's environment: the jail's boot script leaves the channel on stdin.
pub const SESSION_ENV: &str = "FLEETBOX_SESSION";
/// How long a call may run past its limit before the session is ended.
pub const GRACE: Duration = Duration::from_secs(2);
/// How long a call's end waits for its connections through the egress proxy to be logged
/// (one the program keeps open longer is listed with the call it ends in).
const EGRESS_SETTLE: Duration = Duration::from_secs(1);
/// How long the interpreter may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A live session: its channel and the thread supervising its run.
pub struct Session {
    chan: UnixStream,
    cancel: Cancel,
    run: Option<JoinHandle<ExecutionReport>>,
    /// The run's report, once it ended.
    ended: Option<ExecutionReport>,
    calls: u64,
    limits: Limits,
    backend: &'static str,
    python: String,
    runner_id: String,
    opened: Instant,
    last_used: Instant,
    /// The run's directory on the host (its `work` holds the files a call lists).
    workspace: Option<PathBuf>,
    /// The egress proxy's log, taken after each call.
    egress: Option<Arc<EgressLog>>,
}

/// What a backend tells a session about the run it opened.
pub(crate) struct Opening {
    pub limits: Limits,
    pub backend: &'static str,
    pub runner_id: String,
    pub workspace: Option<PathBuf>,
    pub egress: Option<Arc<EgressLog>>,
}

/// The interpreter's answer to a call (see `session.py`).
#[derive(Debug, Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    exit_code: Option<i64>,
    stdout: Stream,
    stderr: Stream,
    #[serde(default)]
    cpu_user_ms: u64,
    #[serde(default)]
    cpu_sys_ms: u64,
    #[serde(default)]
    peak_memory_bytes: u64,
    #[serde(default)]
    files: Vec<FileEntry>,
    #[serde(default)]
    files_truncated: bool,
}

#[derive(Debug, Deserialize)]
struct Stream {
    text: String,
    bytes: u64,
    truncated: bool,
    sha256: String,
}

/// Why a session could not be opened or used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SessionError(pub String);

impl Session {
    /// Wait for the interpreter of a run that `run` supervises to say it is ready on `chan`.
    /// On failure the run is stopped and its report says why.
    pub(crate) fn start(
        chan: UnixStream,
        cancel: Cancel,
        run: JoinHandle<ExecutionReport>,
        opening: Opening,
    ) -> Result<Session, SessionError> {
        let mut session = Session {
            chan,
            cancel,
            run: Some(run),
            ended: None,
            calls: 0,
            limits: opening.limits,
            backend: opening.backend,
            python: String::new(),
            runner_id: opening.runner_id,
            opened: Instant::now(),
            last_used: Instant::now(),
            workspace: opening.workspace,
            egress: opening.egress,
        };
        match session.read_frame(Instant::now() + READY_WITHIN, 1 << 16) {
            Ok(ready) if ready["ready"] == true => {
                session.python = ready["python"].as_str().unwrap_or_default().to_string();
                Ok(session)
            }
            Ok(other) => {
                let report = session.end("the interpreter did not start the session");
                Err(SessionError(format!(
                    "the session's interpreter said {other} instead of being ready ({})",
                    why(&report)
                )))
            }
            Err(e) => {
                let report = session.end("the interpreter did not start the session");
                Err(SessionError(format!(
                    "the session's interpreter did not start ({e}): {}",
                    why(&report)
                )))
            }
        }
    }

    /// Stops the session from another thread (its call under way, if any, ends with it).
    pub fn stopper(&self) -> Cancel {
        self.cancel.clone()
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    pub fn opened(&self) -> Instant {
        self.opened
    }

    pub fn last_used(&self) -> Instant {
        self.last_used
    }

    /// The interpreter still runs.
    pub fn alive(&mut self) -> bool {
        if self.ended.is_none() && self.run.as_ref().is_some_and(JoinHandle::is_finished) {
            self.collect();
        }
        self.ended.is_none()
    }

    /// Run `code` in the session's interpreter, at most `timeout` (then it is interrupted;
    /// [`GRACE`] later the session is ended). Every outcome is a report.
    pub fn call(&mut self, code: &[u8], timeout: Duration) -> ExecutionReport {
        let mut report = self.exchange(code, timeout);
        // Its files are read from the workspace by whoever keeps them (the agent uploads
        // them); the workspace itself lives on with the session.
        report.workspace = self.workspace.as_ref().map(|p| p.display().to_string());
        if let Some(log) = &self.egress {
            let (connections, unlisted) = log.take(EGRESS_SETTLE, false);
            report.egress = connections;
            if unlisted > 0 {
                report.notes.push(format!(
                    "egress: {unlisted} more connections than the {MAX_EGRESS_LISTED} listed"
                ));
            }
        }
        report
    }

    fn exchange(&mut self, code: &[u8], timeout: Duration) -> ExecutionReport {
        self.calls += 1;
        self.last_used = Instant::now();
        let started_at = SystemTime::now();
        let started = Instant::now();
        let mut report = self.blank(code, started_at, timeout);
        if !self.alive() {
            return self.lost(report, "the session's interpreter has ended");
        }
        let Ok(source) = std::str::from_utf8(code) else {
            report.status = Status::Error;
            report.message = Some("the call's code is not UTF-8".into());
            report.session = Some(self.said(SessionOutcome::Kept));
            return report;
        };
        let max_output = self.limits.max_output.0;
        let frame = serde_json::json!({
            "code": source,
            "timeout_ms": timeout.as_millis() as u64,
            "max_output": max_output,
            "call": self.calls,
        });
        let deadline = started + timeout + GRACE;
        let cap = (max_output as usize)
            .saturating_mul(16)
            .saturating_add(4 << 20);
        let answer = self
            .write_frame(&frame, deadline)
            .and_then(|()| self.read_frame(deadline, cap));
        report.wall_ms = started.elapsed().as_millis() as u64;
        match answer.map(serde_json::from_value::<Answer>) {
            Ok(Ok(answer)) => {
                self.fill(&mut report, answer);
                report.session = Some(self.said(SessionOutcome::Kept));
                report
            }
            Ok(Err(e)) => self.ended_by(
                report,
                Status::SandboxError,
                format!("the session's interpreter answered nonsense ({e}); the session was ended"),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => self.ended_by(
                report,
                Status::Timeout,
                format!(
                    "the call ran past its time limit of {} and did not stop when interrupted; the session was ended",
                    Millis(timeout.as_millis() as u64)
                ),
            ),
            Err(_) => {
                // The interpreter died during the call: the run's report says how.
                let end = self.end("the interpreter ended during a call");
                report.status = match end.status {
                    Status::Ok => Status::Error,
                    s => s,
                };
                report.message = Some(format!("the session ended during this call: {}", why(&end)));
                report.stderr = end.stderr;
                report.stderr_bytes = end.stderr_bytes;
                report.stderr_truncated = end.stderr_truncated;
                report.stderr_sha256 = end.stderr_sha256;
                report.exception = end.exception;
                report.violations = end.violations;
                report.peak_memory_bytes = end.peak_memory_bytes;
                report.session = Some(self.said(SessionOutcome::Ended));
                report
            }
        }
    }

    /// End the session: its sandbox is stopped and removed. The run's report says how it ended.
    pub fn close(mut self, reason: &str) -> ExecutionReport {
        self.end(reason)
    }

    fn said(&self, outcome: SessionOutcome) -> SessionCall {
        SessionCall {
            id: String::new(),
            call: self.calls,
            outcome,
        }
    }

    fn blank(&self, code: &[u8], started_at: SystemTime, timeout: Duration) -> ExecutionReport {
        let empty = sha256_hex(b"");
        let mut r = ExecutionReport::unmeasured(Status::Ok, None);
        r.started_at = humantime::format_rfc3339_millis(started_at).to_string();
        r.stdout_sha256 = empty.clone();
        r.stderr_sha256 = empty;
        let mut limits = self.limits.clone();
        limits.timeout = Millis(timeout.as_millis() as u64);
        r.limits = fleetbox_proto::AppliedLimits::new(limits);
        r.backend = self.backend.to_string();
        r.code_sha256 = sha256_hex(code);
        r.runner = fleetbox_proto::Runner {
            id: self.runner_id.clone(),
            python: self.python.clone(),
            python_executable: String::new(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
        };
        r
    }

    fn fill(&self, r: &mut ExecutionReport, a: Answer) {
        r.status = match a.status.as_str() {
            "ok" => Status::Ok,
            "timeout" => Status::Timeout,
            _ => Status::Error,
        };
        r.exit_code = a
            .exit_code
            .map(|c| c.clamp(i32::MIN.into(), i32::MAX.into()) as i32);
        let max = self.limits.max_output.0 as usize;
        for (stream, text, bytes, truncated, sha) in [
            (
                a.stdout,
                &mut r.stdout,
                &mut r.stdout_bytes,
                &mut r.stdout_truncated,
                &mut r.stdout_sha256,
            ),
            (
                a.stderr,
                &mut r.stderr,
                &mut r.stderr_bytes,
                &mut r.stderr_truncated,
                &mut r.stderr_sha256,
            ),
        ] {
            let mut kept = stream.text;
            if kept.len() > max {
                let mut end = max;
                while !kept.is_char_boundary(end) {
                    end -= 1;
                }
                kept.truncate(end);
            }
            *truncated = stream.truncated || stream.bytes > kept.len() as u64;
            *bytes = stream.bytes.max(kept.len() as u64);
            *text = kept;
            if stream.sha256.len() == 64 && stream.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                *sha = stream.sha256;
            }
        }
        r.cpu_user_ms = a.cpu_user_ms;
        r.cpu_sys_ms = a.cpu_sys_ms;
        r.peak_memory_bytes = a.peak_memory_bytes;
        r.exception = crate::traceback::parse(&r.stderr).filter(|_| r.status != Status::Ok);
        if r.status == Status::Timeout {
            r.message = Some(format!(
                "interrupted at the call's time limit of {}; the session lives on",
                r.limits.limits.timeout
            ));
        }
        r.files = a.files.into_iter().take(100).collect();
        r.files_truncated = a.files_truncated;
        if r.status == Status::Ok && !r.stdout_truncated {
            let value = serde_json::from_str::<Value>(&r.stdout)
                .unwrap_or_else(|_| Value::String(r.stdout.clone()));
            let bytes = serde_json::to_vec(&value).unwrap_or_default();
            r.output_sha256 = Some(sha256_hex(&bytes));
            r.output = Some(value);
            r.output_source = Some("stdout".into());
        }
    }

    /// The session is gone: the call did not run.
    fn lost(&mut self, mut r: ExecutionReport, why_: &str) -> ExecutionReport {
        r.status = Status::SandboxError;
        let end = self.ended.as_ref().map(why).unwrap_or_default();
        r.message = Some(format!("{why_}: {end}"));
        r.session = Some(self.said(SessionOutcome::Ended));
        r
    }

    fn ended_by(
        &mut self,
        mut r: ExecutionReport,
        status: Status,
        message: String,
    ) -> ExecutionReport {
        let end = self.end(&message);
        r.status = match end.status {
            Status::MemoryLimit => Status::MemoryLimit,
            _ => status,
        };
        r.message = Some(message);
        r.peak_memory_bytes = end.peak_memory_bytes;
        r.session = Some(self.said(SessionOutcome::Ended));
        r
    }

    /// Stop the run (if it still runs) and keep its report.
    fn end(&mut self, reason: &str) -> ExecutionReport {
        if self.ended.is_none() {
            self.cancel.cancel(reason);
            let _ = self.chan.shutdown(std::net::Shutdown::Both);
            self.collect();
        }
        self.ended
            .clone()
            .unwrap_or_else(|| ExecutionReport::unmeasured(Status::SandboxError, None))
    }

    fn collect(&mut self) {
        if let Some(run) = self.run.take() {
            self.ended = Some(run.join().unwrap_or_else(|_| {
                let mut r = ExecutionReport::unmeasured(Status::SandboxError, None);
                r.message = Some("the session's supervisor panicked".into());
                r
            }));
        }
    }

    fn write_frame(&mut self, value: &Value, deadline: Instant) -> std::io::Result<()> {
        let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
        self.chan.set_write_timeout(Some(remaining(deadline)?))?;
        self.chan.write_all(&len.to_be_bytes())?;
        self.chan.write_all(&body)
    }

    /// One frame of at most `cap` bytes, before `deadline` (`TimedOut` after it).
    fn read_frame(&mut self, deadline: Instant, cap: usize) -> std::io::Result<Value> {
        let mut len = [0u8; 4];
        self.read_exact_by(&mut len, deadline)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > cap {
            return Err(std::io::Error::other(format!(
                "a frame of {len} bytes, over the {cap} allowed"
            )));
        }
        let mut body = vec![0u8; len];
        self.read_exact_by(&mut body, deadline)?;
        serde_json::from_slice(&body).map_err(std::io::Error::other)
    }

    fn read_exact_by(&mut self, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
        while !buf.is_empty() {
            self.chan.set_read_timeout(Some(remaining(deadline)?))?;
            match self.chan.read(buf) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.end("the session was dropped");
    }
}

fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(std::io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

/// One line of why a session's run ended.
fn why(report: &ExecutionReport) -> String {
    report
        .failure_reason()
        .unwrap_or_else(|| format!("it ended ({})", report.status.as_str()))
}

/// The run a session is: its program the session's interpreter, its wall-clock and CPU limits
/// the session's lifetime. With `channel`, its stdin is one end of a new channel and the other
/// is returned (a jail makes its own).
pub(crate) fn session_request(
    mut req: crate::RunRequest,
    lifetime: Duration,
    channel: bool,
) -> Result<(crate::RunRequest, Option<UnixStream>, Cancel), SessionError> {
    let cancel = Cancel::new().map_err(|e| SessionError(format!("a session's stop: {e}")))?;
    let mut ours = None;
    if channel {
        let (mine, theirs) =
            UnixStream::pair().map_err(|e| SessionError(format!("a session channel: {e}")))?;
        req.stdin = Some(std::sync::Arc::new(theirs.into()));
        ours = Some(mine);
    }
    req.code = SESSION_PY.as_bytes().to_vec();
    req.limits.timeout = Millis(lifetime.as_millis() as u64);
    req.limits.cpu_time = Millis(lifetime.as_millis() as u64);
    req.cancel = Some(cancel.clone());
    req.env.push((SESSION_ENV.into(), "1".into()));
    req.keep_workspace = false;
    Ok((req, ours, cancel))
}
