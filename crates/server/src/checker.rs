//! Server re-checks: shards held in `reported` are re-run in the coordinator's own sandbox,
//! stricter than an agent's (a fresh sandbox per run, never a warm one; no network; at most
//! [`SERVER_MEMORY`] and [`SERVER_PROCESSES`]), and settled by what the runs show.
//!
//! The checks run in a pool of `ServerConfig::check_workers` on the blocking threads, fed from
//! the database (the queue is the `reported` shards, so it survives restarts and is shared by
//! every coordinator on the database). When the pool is full, shards wait in `reported`: none
//! is accepted unchecked for want of a worker.

use std::sync::Arc;
use std::time::Duration;

use fleetbox_proto::{ExecutionReport, Outcome, Status, Verdict, env};
use fleetbox_sandbox::Environment;
use fleetbox_sandbox::RunRequest;
use fleetbox_sandbox::environment::{EnvError, EnvGuard};
use serde_json::Value;
use tokio::sync::{Semaphore, watch};

use crate::State;
use crate::store::StoreError;
use crate::store::checks::{CheckSubject, Finding, ServerRun};

/// Why a server check could not finish: it is tried again later, then settled `unverifiable`.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("job {job}: {why}")]
    Job { job: String, why: String },
    #[error("the coordinator's sandbox could not run the check ({status}): {why}")]
    Sandbox { status: Status, why: String },
    #[error("could not open the `{backend}` sandbox: {why}")]
    Open {
        backend: fleetbox_sandbox::Backend,
        why: String,
    },
    #[error("the job's environment: {0}")]
    Environment(String),
    #[error("the job's files: {0}")]
    Files(String),
    #[error("storing the server's output: {0}")]
    Output(String),
    #[error("the re-check's thread failed: {0}")]
    Thread(String),
}

/// The memory a server re-run may use at most (the job may ask for less).
pub const SERVER_MEMORY: u64 = 512 << 20;
/// The processes a server re-run may start at most.
pub const SERVER_PROCESSES: u32 = 32;
/// How long a claimed check is this coordinator's before another may take it over (a dead
/// coordinator's checks are taken over after this); renewed while the check runs.
const HOLD_MS: i64 = 15_000;
/// How often the queue is looked at when nothing wakes the checker.
const POLL: Duration = Duration::from_millis(500);
/// Failed tries of one check (the coordinator's sandbox, its environment) before the shard is
/// settled `inconclusive` with a flag, rather than retried forever.
pub const MAX_CHECK_FAILURES: i64 = 5;

pub async fn run(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let pool = Arc::new(Semaphore::new(state.config.check_workers.max(1)));
    loop {
        let free = pool.available_permits();
        match state
            .store
            .claim_checks(&state.instance, HOLD_MS, free)
            .await
        {
            Ok(ids) => {
                for id in ids {
                    let Ok(permit) = pool.clone().acquire_owned().await else {
                        return;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let renew = tokio::spawn(renew_hold(state.clone(), id));
                        let checked = check(&state, id).await;
                        renew.abort();
                        if let Err(e) = checked {
                            failed(&state, id, &e.to_string()).await;
                        }
                        drop(permit);
                        state.checks.notify_one();
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "claiming checks"),
        }
        tokio::select! {
            _ = state.checks.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A check that could not finish: tried again later, or, past [`MAX_CHECK_FAILURES`], settled
/// `unverifiable` (inconclusive, flagged, audited, counted) so that its job can finish.
async fn failed(state: &Arc<State>, task_id: i64, error: &str) {
    let tries = match state
        .store
        .check_failed(
            &state.instance,
            task_id,
            i64::try_from(state.config.check_retry_ms).unwrap_or(i64::MAX),
        )
        .await
    {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(task = task_id, error = %e, "could not count a failed check");
            return;
        }
    };
    if tries < MAX_CHECK_FAILURES {
        tracing::error!(
            task = task_id,
            tries,
            error,
            "server re-check failed; another try later"
        );
        return;
    }
    tracing::error!(
        task = task_id,
        tries,
        error,
        "server re-check failed for good: settled inconclusive"
    );
    state.metrics.check_abandoned();
    let subject = match state.store.check_subject(task_id).await {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(task = task_id, error = %e, "reading an abandoned check");
            return;
        }
    };
    let finding = Finding::Unverifiable {
        why: format!("the server's check failed {tries} times; the last: {error}"),
    };
    let others = vec![Verdict::Inconclusive; subject.others.len()];
    if let Err(e) = settle(state, &subject, &[], &finding, &others).await {
        tracing::error!(task = task_id, error = %e, "settling an abandoned check");
    }
}

/// Keep a claimed check this coordinator's while it runs.
async fn renew_hold(state: Arc<State>, task_id: i64) {
    loop {
        tokio::time::sleep(Duration::from_millis(HOLD_MS as u64 / 3)).await;
        match state
            .store
            .renew_check(&state.instance, task_id, HOLD_MS)
            .await
        {
            Ok(true) => {}
            Ok(false) => return, // settled, or taken over
            Err(e) => tracing::warn!(task = task_id, error = %e, "could not renew a check"),
        }
    }
}

/// Check one claimed shard and settle it.
async fn check(state: &Arc<State>, task_id: i64) -> Result<(), CheckError> {
    let Some(subject) = state.store.check_subject(task_id).await? else {
        tracing::warn!(
            task = task_id,
            "a shard in `reported` has no result to check"
        );
        return Ok(());
    };
    let job = state
        .job_info(&subject.job_id)
        .await
        .map_err(|e| CheckError::Job {
            job: subject.job_id.clone(),
            why: e.message,
        })?;
    let agent_output = output_of(
        state,
        &subject.tenant_id,
        subject.result.output.as_deref(),
        subject.result.output_blob.as_deref(),
    );
    let agent = Outcome {
        output: agent_output.as_ref(),
        output_sha256: subject.result.output_sha256.as_deref(),
        stdout_sha256: subject.result.stdout_sha256.as_deref().unwrap_or(""),
    };
    let compare = subject.verify.compare;

    // The job's environment, built here as on the agents: the check compares like with like.
    let held = match &job.environment {
        None => None,
        Some(spec) => match server_environment(state, spec).await {
            Ok(held) => Some(held),
            Err(EnvError::Cache(why)) => return Err(CheckError::Environment(why)),
            Err(e @ EnvError::Build { .. }) => {
                let finding = Finding::Unverifiable {
                    why: format!("the coordinator could not get the job's environment: {e}"),
                };
                let others = vec![Verdict::Inconclusive; subject.others.len()];
                return settle(state, &subject, &[], &finding, &others).await;
            }
        },
    };
    let environment = held.as_ref().map(|h| h.environment.clone());
    let (runs, finding) = if subject.result.status == Status::Ok {
        judge_success(state, &subject, &job, &agent, environment).await?
    } else {
        judge_failure(state, &subject, &job, environment).await?
    };
    // The shard's other replicas, judged by the same run.
    let others: Vec<Verdict> = subject
        .others
        .iter()
        .map(|other| match &finding {
            Finding::Agrees | Finding::Differs | Finding::SucceedsOnServer => {
                let value = output_of(
                    state,
                    &subject.tenant_id,
                    other.output.as_deref(),
                    other.output_blob.as_deref(),
                );
                let outcome = Outcome {
                    output: value.as_ref(),
                    output_sha256: other.output_sha256.as_deref(),
                    stdout_sha256: other.stdout_sha256.as_deref().unwrap_or(""),
                };
                if compare.agrees(&outcome, &runs[0].outcome()) {
                    Verdict::Valid
                } else {
                    Verdict::Invalid
                }
            }
            Finding::FailsOnServer { .. } => Verdict::Invalid,
            // One server run of a failure: not enough to strike another agent's success.
            Finding::FailureConfirmed
            | Finding::Nondeterministic
            | Finding::Unverifiable { .. }
            | Finding::MachineDependent { .. } => Verdict::Inconclusive,
        })
        .collect();
    let stored: Vec<ServerRun> = runs.into_iter().map(|s| s.run).collect();
    tracing::info!(
        task = task_id,
        job = %subject.job_id,
        agent = %subject.result.agent_id,
        reported = %subject.result.status,
        finding = ?finding,
        "server re-check"
    );
    settle(state, &subject, &stored, &finding, &others).await
}

/// A run of the coordinator's own sandbox that says something about the program: not its
/// sandbox failing, nor it stopping. Otherwise the shard stays in `reported` and is checked
/// again later; it is never settled for want of a working check.
async fn usable_run(
    state: &Arc<State>,
    subject: &CheckSubject,
    job: &crate::JobInfo,
    environment: Option<Environment>,
) -> Result<(ExecutionReport, Stored), CheckError> {
    let run = run_on_server(state, subject, job, environment).await?;
    if matches!(run.0.status, Status::SandboxError | Status::Killed) {
        return Err(CheckError::Sandbox {
            status: run.0.status,
            why: run.0.failure_reason().unwrap_or_default(),
        });
    }
    Ok(run)
}

/// An agent's success against the server's run (and a second run when they disagree).
async fn judge_success(
    state: &Arc<State>,
    subject: &CheckSubject,
    job: &crate::JobInfo,
    agent: &Outcome<'_>,
    environment: Option<Environment>,
) -> Result<(Vec<Stored>, Finding), CheckError> {
    let compare = subject.verify.compare;
    let first = usable_run(state, subject, job, environment.clone()).await?;
    let finding = match first.0.status {
        Status::Ok if compare.agrees(agent, &first.1.outcome()) => Finding::Agrees,
        Status::Ok | Status::Error => {
            // A disagreement is settled by the server's own second run: if it reproduces its
            // first, the agent's result is wrong; if not, nothing here is deterministic.
            let second = usable_run(state, subject, job, environment).await?;
            let same = second.0.status == first.0.status
                && (second.0.status != Status::Ok
                    || compare.agrees(&first.1.outcome(), &second.1.outcome()));
            let rounding = || {
                let server = first.1.output.as_ref()?;
                fleetbox_proto::rounding_only(agent.output?, server)
            };
            let finding = match (same, first.0.status) {
                (false, _) => Finding::Nondeterministic,
                (true, Status::Ok)
                    if matches!(
                        compare,
                        fleetbox_proto::Compare::Exact | fleetbox_proto::Compare::Json
                    ) =>
                {
                    match rounding() {
                        Some(worst) => Finding::MachineDependent { worst },
                        None => Finding::Differs,
                    }
                }
                (true, Status::Ok) => Finding::Differs,
                (true, _) => Finding::FailsOnServer {
                    reason: first.0.failure_reason().unwrap_or_else(|| "error".into()),
                },
            };
            return Ok((vec![first.1, second.1], finding));
        }
        other => Finding::Unverifiable {
            why: format!(
                "the server's stricter sandbox could not run this shard ({}): {}",
                other.as_str(),
                first.0.failure_reason().unwrap_or_default()
            ),
        },
    };
    Ok((vec![first.1], finding))
}

/// An agent's failure against the server's run: the same failure confirms it; a success,
/// reproduced by a second run, shows it false.
async fn judge_failure(
    state: &Arc<State>,
    subject: &CheckSubject,
    job: &crate::JobInfo,
    environment: Option<Environment>,
) -> Result<(Vec<Stored>, Finding), CheckError> {
    let reported = subject.result.status;
    let backend = state.config.sandbox_backend;
    if reported == Status::SandboxViolation && backend != fleetbox_sandbox::Backend::Jail {
        // Only the jail sees a denied call; elsewhere a violation can be neither reproduced
        // nor shown false.
        let why = format!(
            "the agent reported a sandbox violation; the coordinator's `{backend}` sandbox cannot see violations, so it is neither confirmed nor held"
        );
        return Ok((Vec::new(), Finding::Unverifiable { why }));
    }
    let first = usable_run(state, subject, job, environment.clone()).await?;
    let finding = match first.0.status {
        status if status == reported => Finding::FailureConfirmed,
        Status::Ok => {
            let second = usable_run(state, subject, job, environment).await?;
            let compare = subject.verify.compare;
            let finding = if second.0.status == Status::Ok
                && compare.agrees(&first.1.outcome(), &second.1.outcome())
            {
                Finding::SucceedsOnServer
            } else {
                Finding::Nondeterministic
            };
            return Ok((vec![first.1, second.1], finding));
        }
        other => Finding::Unverifiable {
            why: format!(
                "the agent reported `{reported}`; in the server's stricter sandbox the run ended `{other}`: {}",
                first.0.failure_reason().unwrap_or_default()
            ),
        },
    };
    Ok((vec![first.1], finding))
}

/// Record what a check found; quarantine follow-up and folds.
async fn settle(
    state: &Arc<State>,
    subject: &CheckSubject,
    stored: &[ServerRun],
    finding: &Finding,
    others: &[Verdict],
) -> Result<(), CheckError> {
    let settled = state
        .store
        .finish_check(
            &state.instance,
            subject,
            stored,
            finding,
            others,
            state.config.quarantine_strikes.max(1) as i64,
        )
        .await?;
    let Some(settled) = settled else {
        return Ok(()); // another coordinator settled it meanwhile
    };
    if let Some(job) = &settled.held {
        tracing::warn!(job = %job, task = subject.task_id, "a sandbox violation reproduced by the server: the job's remaining shards wait for review");
    }
    for agent in &settled.quarantined {
        after_quarantine(state, agent).await?;
    }
    for job in settled.ready {
        state.aggregate(job);
    }
    Ok(())
}

/// After `agent` was quarantined: its unchecked values in running jobs are checked by the
/// server, and the finished jobs that folded them wait for review.
pub async fn after_quarantine(state: &Arc<State>, agent: &str) -> Result<(), StoreError> {
    tracing::warn!(
        agent,
        "agent quarantined: its unchecked results are checked again"
    );
    let n = state.store.recheck_unverified_of(agent).await?;
    if n > 0 {
        tracing::warn!(
            agent,
            shards = n,
            "shards of running jobs held for a re-check"
        );
        state.checks.notify_one();
    }
    let tainted = state.store.taint_finished_jobs_of(agent).await?;
    for job in tainted {
        tracing::warn!(
            agent,
            job = %job,
            "a finished job folded unchecked values of a quarantined agent: needs_review"
        );
    }
    Ok(())
}

/// A server run with what comparing it needs.
struct Stored {
    run: ServerRun,
    output: Option<Value>,
}

impl Stored {
    fn outcome(&self) -> Outcome<'_> {
        Outcome {
            output: self.output.as_ref(),
            output_sha256: self.run.output_sha256.as_deref(),
            stdout_sha256: &self.run.stdout_sha256,
        }
    }
}

/// The job's environment on this coordinator, built if needed (off the async threads).
async fn server_environment(
    state: &Arc<State>,
    spec: &fleetbox_proto::EnvironmentSpec,
) -> Result<EnvGuard, EnvError> {
    let Some(envs) = state.environments.clone() else {
        return Err(EnvError::Build {
            hash: spec.hash(),
            message: "the coordinator has no sandbox to build it in".into(),
        });
    };
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || envs.get(&spec))
        .await
        .map_err(|e| EnvError::Cache(format!("the environment's thread failed: {e}")))?
}

/// Run the shard once in a fresh server sandbox.
async fn run_on_server(
    state: &Arc<State>,
    subject: &CheckSubject,
    job: &crate::JobInfo,
    environment: Option<Environment>,
) -> Result<(ExecutionReport, Stored), CheckError> {
    let mut limits = job.limits.clone();
    limits.network = fleetbox_proto::Network::Off;
    limits.memory.0 = limits.memory.0.min(SERVER_MEMORY);
    limits.max_processes = limits.max_processes.min(SERVER_PROCESSES);
    let mut req = RunRequest::new(
        job.code.clone().into_bytes(),
        Some(subject.input.clone().into_bytes()),
        limits,
    );
    req.runner_id = "server".into();
    req.environment = environment;
    req.files = fleetbox_proto::job::decode_files(&job.files)
        .map_err(|e| CheckError::Files(e.to_string()))?;
    req.env.extend([
        (
            env::FLEETBOX_SHARD_INDEX.to_string(),
            subject.shard_index.to_string(),
        ),
        (
            env::FLEETBOX_SHARD_COUNT.to_string(),
            job.shard_count.to_string(),
        ),
        (env::FLEETBOX_JOB_ID.to_string(), subject.job_id.clone()),
    ]);
    let backend = state.config.sandbox_backend;
    let config = state.config.sandbox.clone();
    let report = tokio::task::spawn_blocking(move || {
        fleetbox_sandbox::open(backend, config).map(|sandbox| sandbox.run(&req))
    })
    .await
    .map_err(|e| CheckError::Thread(e.to_string()))?
    .map_err(|e| CheckError::Open {
        backend,
        why: e.to_string(),
    })?;
    let (output, output_blob, output_sha256) = match &report.output {
        None => (None, None, None),
        Some(v) => {
            let owner = Some(subject.tenant_id.as_str());
            let stored = crate::outputs::store(&state.blobs, owner, v, v.to_string())
                .map_err(|e| CheckError::Output(e.to_string()))?;
            if let Some(b) = &stored.blob {
                let bytes = state.blobs.size(owner, b).unwrap_or_default();
                state
                    .store
                    .own_blobs(&subject.tenant_id, &subject.job_id, &[(b, bytes)])
                    .await?;
            }
            (stored.text, stored.blob, Some(stored.hash))
        }
    };
    let measures = crate::outputs::Measures::of(&report);
    let mut kept = report.clone();
    if backend == fleetbox_sandbox::Backend::Process {
        kept.notes.push(crate::WEAK_SANDBOX_WARNING.to_string());
    }
    kept.output = None; // stored on its own, as for agents' attempts
    let run = ServerRun {
        status: report.status,
        output,
        output_blob,
        output_sha256,
        stdout_sha256: report.stdout_sha256.clone(),
        report_json: serde_json::to_string(&kept).unwrap_or_default(),
        wall_ms: measures.wall_ms,
        cpu_ms: measures.cpu_ms,
        peak_memory: measures.peak_memory,
        bytes_out: measures.bytes_out,
        reason: report.failure_reason(),
    };
    let output = report.output.clone();
    Ok((report, Stored { run, output }))
}

/// A result's output value: inline, or read back from its blob.
fn output_of(
    state: &Arc<State>,
    tenant: &str,
    text: Option<&str>,
    blob: Option<&str>,
) -> Option<Value> {
    match (text, blob) {
        (Some(text), _) => serde_json::from_str::<Value>(text).ok(),
        (None, Some(blob)) => state
            .blobs
            .get(Some(tenant), blob)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
        (None, None) => None,
    }
}
