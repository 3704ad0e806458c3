//! The supervision loop shared by every backend: one thread, one `poll` over the child's pidfd,
//! its stdout/stderr pipes and any backend-specific descriptors (the jail's seccomp listener).
//!
//! Waiting on a pidfd with the remaining time as the poll timeout is what keeps the timeout
//! overshoot in the low milliseconds: there is no sleep-and-check loop.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use fleetbox_proto::StreamCapture;
use sha2::{Digest, Sha256};

use crate::sys::{self, Exit};

/// Kills every process a run started.
pub trait TreeKiller {
    fn kill_tree(&self);
}

/// CPU time used by every process of a run together (its cgroup's accounting).
pub trait CpuMeter {
    fn cpu_used_ms(&self) -> Option<u64>;
}

impl CpuMeter for crate::cgroup::RunCgroup {
    fn cpu_used_ms(&self) -> Option<u64> {
        crate::cgroup::RunCgroup::cpu_used_ms(self)
    }
}

/// How often the run's total CPU time is read against its limit (`RLIMIT_CPU` holds each
/// process on its own; only the group's count holds them together).
const CPU_CHECK_EVERY: Duration = Duration::from_millis(20);

/// Descriptors a backend wants polled alongside the child.
pub trait Extras {
    fn fds(&self) -> Vec<RawFd>;
    fn on_ready(&mut self, fd: RawFd, revents: i16);
    /// Why the run must end now (e.g. a flood of denied syscalls costing the supervisor CPU).
    fn stop_reason(&self) -> Option<String> {
        None
    }
}

/// The spawned top process of a run.
pub struct Child {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

pub struct Outcome {
    pub exit: Exit,
    pub wall: Duration,
    pub timed_out: bool,
    /// Why the run was stopped from outside.
    pub cancelled: Option<String>,
    /// The stream that passed its cap when the run was stopped for it.
    pub output_limited: Option<&'static str>,
    /// Why the supervisor's extras ended the run ([`Extras::stop_reason`]).
    pub stopped: Option<String>,
    /// CPU time of all the run's processes together when it was stopped for passing its CPU
    /// limit (ms).
    pub cpu_limited: Option<u64>,
    pub stdout: StreamCapture,
    pub stderr: StreamCapture,
}

impl Outcome {
    /// Whether the supervisor ended the run (a limit, a cancel, its extras), rather than the
    /// program ending on its own.
    pub fn stopped_by_supervisor(&self) -> bool {
        self.timed_out
            || self.output_limited.is_some()
            || self.cancelled.is_some()
            || self.stopped.is_some()
            || self.cpu_limited.is_some()
    }
}

/// Keeps the first `cap` bytes of a stream and counts the rest.
pub(crate) struct Capture {
    kept: Vec<u8>,
    total: u64,
    cap: usize,
}

impl Capture {
    pub(crate) fn new(cap: u64) -> Self {
        Capture {
            kept: Vec::new(),
            total: 0,
            cap: usize::try_from(cap).unwrap_or(usize::MAX),
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&chunk[..room.min(chunk.len())]);
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    pub(crate) fn over(&self) -> bool {
        self.total > self.cap as u64
    }

    pub(crate) fn finish(self) -> StreamCapture {
        let truncated = self.over();
        StreamCapture {
            sha256: hex::encode(Sha256::digest(&self.kept)),
            kept: self.kept,
            bytes: self.total,
            truncated,
        }
    }
}

pub struct Supervision<'a> {
    pub timeout: Duration,
    pub max_output: u64,
    pub continue_past_output_limit: bool,
    pub killer: &'a dyn TreeKiller,
    pub extras: Option<&'a mut dyn Extras>,
    pub cancel: Option<&'a crate::Cancel>,
    /// The run's CPU time limit in ms, held over all its processes together by `cpu`.
    pub cpu_limit_ms: u64,
    pub cpu: Option<&'a dyn CpuMeter>,
}

impl<'a> Supervision<'a> {
    /// Supervision as a run's limits (and its cancel token) ask for it.
    pub fn for_request(
        req: &'a crate::RunRequest,
        killer: &'a dyn TreeKiller,
        extras: Option<&'a mut dyn Extras>,
    ) -> Self {
        let limits = &req.limits;
        Supervision {
            cancel: req.cancel.as_ref(),
            timeout: limits.timeout.as_duration(),
            max_output: limits.max_output.0,
            continue_past_output_limit: limits.continue_past_output_limit,
            killer,
            extras,
            cpu_limit_ms: limits.cpu_time.0,
            cpu: None,
        }
    }

    /// Hold the run's processes together to its CPU limit through `meter`.
    pub fn with_cpu(mut self, meter: Option<&'a dyn CpuMeter>) -> Self {
        self.cpu = meter;
        self
    }
}

/// How long to keep reading pipes after the main process is gone (its tree has been killed by
/// then, so EOF normally arrives at once; this bounds a leaked write end).
const DRAIN: Duration = Duration::from_millis(300);

pub fn supervise(child: Child, started: Instant, mut sup: Supervision<'_>) -> Outcome {
    let deadline = started + sup.timeout;
    let mut out = Capture::new(sup.max_output);
    let mut err = Capture::new(sup.max_output);
    let mut out_open = true;
    let mut err_open = true;
    let mut exit: Option<(Exit, Instant)> = None;
    let mut timed_out = false;
    let mut output_limited = None;
    let mut killed = false;
    let mut cancelled = None;
    let mut stopped = None;
    let mut cpu_limited = None;
    // CPU used before the program started (a warm jail's interpreter) is not the run's.
    let cpu = sup.cpu.and_then(|m| Some((m, m.cpu_used_ms()?)));
    let mut buf = vec![0u8; 64 * 1024];

    loop {
        let now = Instant::now();
        let mut fds = Vec::with_capacity(6);
        let main_alive = exit.is_none();
        if main_alive {
            fds.push(child.pidfd.as_raw_fd());
        }
        if out_open {
            fds.push(child.stdout.as_raw_fd());
        }
        if err_open {
            fds.push(child.stderr.as_raw_fd());
        }
        let cancel_fd = match sup.cancel {
            Some(c) if main_alive && cancelled.is_none() => {
                fds.push(c.fd());
                Some(c.fd())
            }
            _ => None,
        };
        if let Some(extras) = sup.extras.as_deref() {
            fds.extend(extras.fds());
        }
        if !main_alive && !out_open && !err_open {
            break;
        }
        let until = match &exit {
            None => deadline,
            Some((_, at)) => *at + DRAIN,
        };
        if now >= until {
            if main_alive {
                timed_out = true;
                sup.killer.kill_tree();
                killed = true;
                let e = sys::wait4(child.pid).unwrap_or(Exit {
                    code: None,
                    signal: Some(libc::SIGKILL),
                    user_ms: 0,
                    sys_ms: 0,
                    maxrss_bytes: 0,
                });
                exit = Some((e, Instant::now()));
                continue;
            }
            break;
        }
        // The CPU limit is read every few ms while the program runs.
        let until = match cpu {
            Some(_) if main_alive && cpu_limited.is_none() => until.min(now + CPU_CHECK_EVERY),
            _ => until,
        };
        // Round up so we never wake a hair early and spin.
        let wait_ms = (until - now)
            .as_micros()
            .div_ceil(1000)
            .min(i32::MAX as u128) as i32;
        let revents = match sys::poll(&fds, wait_ms) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "poll failed; killing the run");
                sup.killer.kill_tree();
                killed = true;
                if main_alive && let Ok(e) = sys::wait4(child.pid) {
                    exit = Some((e, Instant::now()));
                }
                break;
            }
        };
        for (fd, rev) in fds.iter().copied().zip(revents) {
            if rev == 0 {
                continue;
            }
            if Some(fd) == cancel_fd {
                cancelled = Some(sup.cancel.and_then(|c| c.reason()).unwrap_or_default());
                sup.killer.kill_tree();
                killed = true;
            } else if main_alive && fd == child.pidfd.as_raw_fd() {
                let e = sys::wait4(child.pid).unwrap_or(Exit {
                    code: None,
                    signal: None,
                    user_ms: 0,
                    sys_ms: 0,
                    maxrss_bytes: 0,
                });
                exit = Some((e, Instant::now()));
                // Whatever the program left running (double-forked daemons) dies with it.
                sup.killer.kill_tree();
                killed = true;
            } else if out_open && fd == child.stdout.as_raw_fd() {
                out_open = drain(fd, &mut out, &mut buf);
            } else if err_open && fd == child.stderr.as_raw_fd() {
                err_open = drain(fd, &mut err, &mut buf);
            } else if let Some(extras) = sup.extras.as_deref_mut() {
                extras.on_ready(fd, rev);
            }
        }
        if exit.is_none()
            && cpu_limited.is_none()
            && let Some((meter, base)) = cpu
            && let Some(used) = meter.cpu_used_ms().map(|u| u.saturating_sub(base))
            && used >= sup.cpu_limit_ms
        {
            cpu_limited = Some(used);
            sup.killer.kill_tree();
            killed = true;
        }
        if exit.is_none()
            && stopped.is_none()
            && let Some(why) = sup.extras.as_deref().and_then(|e| e.stop_reason())
        {
            stopped = Some(why);
            sup.killer.kill_tree();
            killed = true;
        }
        if output_limited.is_none() && !sup.continue_past_output_limit {
            let which = if out.over() {
                Some("stdout")
            } else if err.over() {
                Some("stderr")
            } else {
                None
            };
            if let Some(which) = which
                && exit.is_none()
            {
                output_limited = Some(which);
                sup.killer.kill_tree();
                killed = true;
            }
        }
    }
    if !killed {
        sup.killer.kill_tree();
    }
    let (exit, ended) = exit.unwrap_or((
        Exit {
            code: None,
            signal: Some(libc::SIGKILL),
            user_ms: 0,
            sys_ms: 0,
            maxrss_bytes: 0,
        },
        Instant::now(),
    ));
    Outcome {
        exit,
        wall: ended.saturating_duration_since(started),
        timed_out,
        cancelled,
        output_limited,
        stopped,
        cpu_limited,
        stdout: out.finish(),
        stderr: err.finish(),
    }
}

/// Read what is available; returns whether the stream is still open.
fn drain(fd: RawFd, cap: &mut Capture, buf: &mut [u8]) -> bool {
    // Bounded so a flood on one stream cannot starve the pidfd and the timeout.
    for _ in 0..16 {
        match sys::read(fd, buf) {
            Ok(Some(0)) => return false,
            Ok(Some(n)) => cap.push(&buf[..n]),
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
    true
}
