//! The sessions this agent holds: one interpreter each (see `fleetbox_sandbox::session`),
//! opened by a session's first call and used by its later calls, which the coordinator sends
//! to this agent alone.
//!
//! A call for a session this agent does not hold (it restarted, or the session ended here) is
//! answered `lost`, never with a new interpreter. Sessions end when the coordinator says so in
//! a heartbeat's answer, after their idle time or lifetime, when a call ends their interpreter,
//! and with the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetbox_proto::api::LeasedSession;
use fleetbox_proto::{ExecutionReport, SessionCall, SessionOutcome, Status};
use fleetbox_sandbox::session::Session;
use fleetbox_sandbox::{RunRequest, Sandbox};

/// Sessions an agent holds at most, unless told otherwise (`--max-sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = 8;

struct Held {
    session: Arc<Mutex<Session>>,
    stop: fleetbox_sandbox::Cancel,
    idle: Duration,
    lifetime: Duration,
}

pub struct Sessions {
    max: usize,
    held: Mutex<HashMap<String, Held>>,
}

impl Sessions {
    pub fn new(max: usize) -> Sessions {
        Sessions {
            max,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Whether session calls may come here at all.
    pub fn keeps_any(&self) -> bool {
        self.max > 0
    }

    /// The ids of the sessions held (for the heartbeat).
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .held
            .lock()
            .expect("sessions")
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// Run one call of session `s`: call 1 opens it in `sandbox` (its limits `req`'s), later
    /// calls run `req`'s code in the interpreter it opened. Always a report.
    pub fn call(
        &self,
        sandbox: &dyn Sandbox,
        s: &LeasedSession,
        req: RunRequest,
    ) -> ExecutionReport {
        let mut report = if s.call == 1 {
            self.open(sandbox, s, req)
        } else {
            self.run(s, &req)
        };
        match report.session.as_mut() {
            Some(call) => {
                call.id = s.id.clone();
                call.call = s.call;
            }
            // A refusal is no word on the session: the opening goes to another agent.
            None if report.status == Status::Refused => {}
            None => {
                report.session = Some(SessionCall {
                    id: s.id.clone(),
                    call: s.call,
                    outcome: SessionOutcome::Ended,
                })
            }
        }
        report
    }

    fn open(
        &self,
        sandbox: &dyn Sandbox,
        s: &LeasedSession,
        mut req: RunRequest,
    ) -> ExecutionReport {
        if self.held.lock().expect("sessions").len() >= self.max {
            let mut r = failed(
                &req,
                Status::Refused,
                format!(
                    "this agent holds {} sessions, its most (`--max-sessions`)",
                    self.max
                ),
            );
            r.session = None;
            return r;
        }
        req.keep_workspace = false;
        let timeout = Duration::from_millis(req.limits.timeout.0);
        let lifetime = Duration::from_millis(s.max_lifetime_ms);
        match sandbox.open_session(req.clone(), lifetime) {
            Ok(mut session) => {
                // The opening's report is its first call's: the interpreter, its limits.
                let report = session.call(&req.code, timeout);
                self.held.lock().expect("sessions").insert(
                    s.id.clone(),
                    Held {
                        stop: session.stopper(),
                        session: Arc::new(Mutex::new(session)),
                        idle: Duration::from_millis(s.idle_timeout_ms),
                        lifetime,
                    },
                );
                report
            }
            Err(e) => failed(
                &req,
                Status::SandboxError,
                format!("the session could not be opened: {e}"),
            ),
        }
    }

    fn run(&self, s: &LeasedSession, req: &RunRequest) -> ExecutionReport {
        let session = self
            .held
            .lock()
            .expect("sessions")
            .get(&s.id)
            .map(|h| h.session.clone());
        let Some(session) = session else {
            let mut r = failed(
                req,
                Status::SandboxError,
                format!(
                    "this agent does not hold session {} (it restarted, or the session ended here)",
                    s.id
                ),
            );
            r.session = Some(SessionCall {
                id: s.id.clone(),
                call: s.call,
                outcome: SessionOutcome::Lost,
            });
            return r;
        };
        let timeout = Duration::from_millis(req.limits.timeout.0);
        let report = session.lock().expect("session").call(&req.code, timeout);
        if report
            .session
            .as_ref()
            .is_some_and(|c| c.outcome != SessionOutcome::Kept)
        {
            self.held.lock().expect("sessions").remove(&s.id);
        }
        report
    }

    /// End the sessions named (the coordinator closed them), and those past their idle time or
    /// lifetime. Blocks while their sandboxes are torn down.
    pub fn close(&self, ids: &[String]) {
        let ended: Vec<(String, Held)> = {
            let mut held = self.held.lock().expect("sessions");
            let due: Vec<String> = held
                .iter()
                .filter(|(id, h)| {
                    ids.contains(id)
                        || h.session.try_lock().is_ok_and(|s| {
                            s.last_used().elapsed() >= h.idle || s.opened().elapsed() >= h.lifetime
                        })
                })
                .map(|(id, _)| id.clone())
                .collect();
            due.into_iter()
                .filter_map(|id| held.remove(&id).map(|h| (id, h)))
                .collect()
        };
        for (id, h) in ended {
            tracing::info!(session = %id, "session ended");
            // A call under way holds the session: it ends with the session's sandbox.
            h.stop.cancel("the session ended");
            if let Ok(session) = Arc::try_unwrap(h.session) {
                let _ = session.into_inner().map(|s| s.close("the session ended"));
            }
        }
    }

    /// End every session (the agent is stopping).
    pub fn close_all(&self) {
        let ids = self.ids();
        self.close(&ids);
    }
}

/// A call that did not run: its status and why.
fn failed(req: &RunRequest, status: Status, why: String) -> ExecutionReport {
    let mut report = ExecutionReport::unmeasured(status, None);
    report.exit_code = None;
    report.message = Some(why);
    report.limits = fleetbox_proto::AppliedLimits::new(req.limits.clone());
    report.code_sha256 = fleetbox_sandbox::workspace::sha256_hex(&req.code);
    report.runner.id = req.runner_id.clone();
    report
}
