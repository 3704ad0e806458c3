//! Server checks in the store: the shards waiting in `reported` for the coordinator's own run,
//! claimed by one coordinator at a time, and settled by what the run found
//! ([`Store::finish_check`]): the shard's new state, the server's runs, the verdicts, the
//! job's flags, the review queue, the agent's trust and the audit entries, together.

use fleetbox_proto::{FlagKind, Status, TaskState, Verdict, VerifySpec};
use sqlx::Row;

use super::audit::{Action, Entry};
use super::settle::{self, Tally};
use super::sql::Sql;
use super::verify::policy;
use super::{DbKind, Doing, Store, StoreError, now_ms};

/// `: <the agent's message>` of a failure under check, when its report has one.
fn reason_of(result: &super::replicas::Replica) -> String {
    result
        .message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default()
}

/// Whether a replicated shard's results under check already form a quorum (they reached the
/// server because the job re-checks everything, not because they disagree).
fn replicas_agree(subject: &CheckSubject) -> bool {
    let all: Vec<super::replicas::Replica> = std::iter::once(subject.result.clone())
        .chain(subject.others.iter().cloned())
        .collect();
    matches!(
        super::replicas::decide(
            &all,
            subject.verify.compare,
            subject.verify.replicas,
            subject.verify.quorum
        ),
        super::replicas::Decision::Quorum(_)
    )
}

/// The shard a claimed check is about, and the agent's result to check.
#[derive(Debug, Clone)]
pub struct CheckSubject {
    pub task_id: i64,
    pub tenant_id: String,
    pub job_id: String,
    pub shard_index: u64,
    pub input: String,
    pub verify: VerifySpec,
    /// The result under check: the shard's latest unchecked agent success.
    pub result: super::replicas::Replica,
    /// The shard's other agent results still open to judgement (replicas that disagreed):
    /// the server's run judges them too.
    pub others: Vec<super::replicas::Replica>,
    /// Runs so far and allowed: a replicated shard the server cannot judge gets one more
    /// replica while attempts remain.
    pub attempts: u32,
    pub max_attempts: u32,
}

/// One run of the shard in the coordinator's own sandbox, as stored.
#[derive(Debug, Clone)]
pub struct ServerRun {
    pub status: Status,
    pub output: Option<String>,
    pub output_blob: Option<String>,
    pub output_sha256: Option<String>,
    pub stdout_sha256: String,
    pub report_json: String,
    pub wall_ms: i64,
    pub cpu_ms: i64,
    pub peak_memory: i64,
    pub bytes_out: i64,
    pub reason: Option<String>,
}

/// What the check found.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// The server's run agrees with the agent's: valid, accepted as verified.
    Agrees,
    /// The server's runs agree with each other and not with the agent: the agent's result is
    /// invalid; the server's value is accepted.
    Differs,
    /// The program fails on the server, twice alike, where the agent claimed success: the
    /// agent's result is invalid and the shard is rejected with the server's reason.
    FailsOnServer { reason: String },
    /// The server's own runs differ: the program is not deterministic. Inconclusive, flagged;
    /// the agent's value is accepted (nothing shows it wrong).
    Nondeterministic,
    /// The server could not run it (its stricter limits, its sandbox): inconclusive, flagged;
    /// the agent's value is accepted.
    Unverifiable { why: String },
    /// The server's runs agree with each other, and the agent's value differs from theirs only
    /// in floating-point rounding (largest relative difference `worst`): a machine-dependent
    /// result (BLAS kernels, summation order), inconclusive and flagged, never a strike; the
    /// agent's value is accepted.
    MachineDependent { worst: f64 },
    /// The agent reported a failure and the server's run fails alike (the same status): the
    /// agent's report is valid, the shard rejected; a reproduced violation holds the job.
    FailureConfirmed,
    /// The agent reported a failure; the server's runs succeed, twice alike: the agent's
    /// report is invalid and the server's value is accepted.
    SucceedsOnServer,
}

impl Finding {
    fn agent_verdict(&self) -> Verdict {
        match self {
            Finding::Agrees | Finding::FailureConfirmed => Verdict::Valid,
            Finding::Differs | Finding::FailsOnServer { .. } | Finding::SucceedsOnServer => {
                Verdict::Invalid
            }
            Finding::Nondeterministic
            | Finding::Unverifiable { .. }
            | Finding::MachineDependent { .. } => Verdict::Inconclusive,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Finding::Agrees => "agrees",
            Finding::Differs => "differs",
            Finding::FailsOnServer { .. } => "fails_on_server",
            Finding::Nondeterministic => "nondeterministic",
            Finding::Unverifiable { .. } => "unverifiable",
            Finding::MachineDependent { .. } => "machine_dependent",
            Finding::FailureConfirmed => "failure_confirmed",
            Finding::SucceedsOnServer => "succeeds_on_server",
        }
    }
}

/// What [`Store::finish_check`] did.
#[derive(Debug, Clone, Default)]
pub struct CheckSettled {
    /// Jobs whose last shard just settled.
    pub ready: Vec<String>,
    /// The agents this check put in quarantine.
    pub quarantined: Vec<String>,
    /// The job held for a person by a violation the server reproduced.
    pub held: Option<String>,
}

impl Store {
    /// Claim up to `max` shards waiting for a check (or whose checker died) for `owner` until
    /// `now + hold_ms`.
    pub async fn claim_checks(
        &self,
        owner: &str,
        hold_ms: i64,
        max: usize,
    ) -> Result<Vec<i64>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // Read first: the checker's poll writes nothing while nothing waits.
        let waiting = super::sql::exists_at(
            &self.read,
            "SELECT 1 FROM tasks WHERE state = $1 AND check_expires < $2 LIMIT 1",
            TaskState::Reported.as_str(),
            now,
            "looking for checks",
        )
        .await?;
        if !waiting {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("UPDATE tasks SET check_owner = ");
        sql.bind(owner)
            .push(", check_expires = ")
            .bind(now + hold_ms)
            .push(" WHERE state = ")
            .bind(TaskState::Reported.as_str())
            .push(" AND check_expires < ")
            .bind(now)
            .push(" AND id IN (SELECT id FROM tasks WHERE state = ")
            .bind(TaskState::Reported.as_str())
            .push(" AND check_expires < ")
            .bind(now)
            .push(" ORDER BY updated_at, id LIMIT ")
            .bind(max as i64);
        if self.kind == DbKind::Postgres {
            sql.push(" FOR UPDATE SKIP LOCKED");
        }
        sql.push(") RETURNING id");
        let mut tx = self.begin_write().await.doing("claiming checks")?;
        let ids: Vec<(i64,)> = sql
            .build_as()
            .fetch_all(&mut *tx)
            .await
            .doing("claiming checks")?;
        tx.commit().await.doing("claiming checks")?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// Extend `owner`'s hold on a check it is running. `false`: it no longer holds it.
    pub async fn renew_check(
        &self,
        owner: &str,
        task_id: i64,
        hold_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await.doing("renewing a check")?;
        let n = Sql::new("UPDATE tasks SET check_expires = ")
            .bind(now_ms() + hold_ms)
            .push(" WHERE id = ")
            .bind(task_id)
            .push(" AND check_owner = ")
            .bind(owner)
            .push(" AND state = ")
            .bind(TaskState::Reported.as_str())
            .build()
            .execute(&mut *tx)
            .await
            .doing("renewing a check")?
            .rows_affected();
        tx.commit().await.doing("renewing a check")?;
        Ok(n == 1)
    }

    /// A claimed check failed (the coordinator's sandbox, its environment): counted, and tried
    /// again after `retry_ms` by whichever coordinator claims it. Returns the failures so far
    /// (0: `owner` no longer holds the check).
    pub async fn check_failed(
        &self,
        owner: &str,
        task_id: i64,
        retry_ms: i64,
    ) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await.doing("counting a failed check")?;
        let n: Option<(i64,)> =
            Sql::new("UPDATE tasks SET check_failures = check_failures + 1, check_expires = ")
                .bind(now_ms() + retry_ms)
                .push(" WHERE id = ")
                .bind(task_id)
                .push(" AND check_owner = ")
                .bind(owner)
                .push(" AND state = ")
                .bind(TaskState::Reported.as_str())
                .push(" RETURNING check_failures")
                .build_as()
                .fetch_optional(&mut *tx)
                .await
                .doing("counting a failed check")?;
        tx.commit().await.doing("counting a failed check")?;
        Ok(n.map_or(0, |(n,)| n))
    }

    /// The shard and the agent result a claimed check is about (`None`: nothing to check any
    /// more).
    pub async fn check_subject(&self, task_id: i64) -> Result<Option<CheckSubject>, StoreError> {
        let task = Sql::new(
            "SELECT t.tenant_id, t.job_id, t.shard_index, t.input, t.attempts, t.max_attempts, \
             t.check_attempt, j.verify FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id = ",
        )
        .bind(task_id)
        .build()
        .fetch_optional(&self.read)
        .await
        .doing("reading a shard to check")?;
        let Some(task) = task else { return Ok(None) };
        let mut conn = self
            .read
            .acquire()
            .await
            .doing("reading the result to check")?;
        let get = |e| StoreError::Query {
            doing: "reading a shard to check",
            source: e,
        };
        let mut results = super::replicas::pending(&mut conn, task_id).await?;
        // An agent's failure under check, or the latest unchecked success.
        let result = match task
            .try_get::<Option<i64>, _>("check_attempt")
            .map_err(get)?
        {
            Some(failure) => match super::replicas::unchecked(&mut conn, task_id, failure).await? {
                Some(failure) => failure,
                None => return Ok(None),
            },
            None => {
                let Some(latest) = results
                    .iter()
                    .rposition(|r| r.verdict == Verdict::Unchecked)
                else {
                    return Ok(None);
                };
                results.remove(latest)
            }
        };
        let verify: Option<String> = task.try_get("verify").map_err(get)?;
        Ok(Some(CheckSubject {
            task_id,
            tenant_id: task.try_get("tenant_id").map_err(get)?,
            job_id: task.try_get("job_id").map_err(get)?,
            shard_index: task.try_get::<i64, _>("shard_index").map_err(get)? as u64,
            input: task.try_get("input").map_err(get)?,
            verify: policy(verify.as_deref()),
            result,
            others: results,
            attempts: task.try_get::<i64, _>("attempts").map_err(get)? as u32,
            max_attempts: task.try_get::<i64, _>("max_attempts").map_err(get)? as u32,
        }))
    }

    /// Settle a checked shard held by `owner`: store the server's runs, the verdicts, the
    /// shard's new state, the agent's trust (and quarantine at `strikes_limit`), the job's
    /// flags and the audit entries, together. `None`: the claim was lost (another coordinator
    /// settled it), nothing written.
    pub async fn finish_check(
        &self,
        owner: &str,
        subject: &CheckSubject,
        runs: &[ServerRun],
        finding: &Finding,
        others: &[Verdict],
        strikes_limit: i64,
    ) -> Result<Option<CheckSettled>, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("settling a check")?;
        settle::lock_jobs(&mut tx, self.kind, std::slice::from_ref(&subject.job_id)).await?;
        let mut tally = Tally::default();
        let outcome = Outcome::of(subject, finding);
        let Some(reason) = move_checked_shard(&mut tx, owner, subject, &outcome, now).await? else {
            return Ok(None);
        };
        tally.moved(&subject.job_id, TaskState::Reported, outcome.to, 1);
        let server_ids = store_server_runs(&mut tx, subject, runs, &outcome, now).await?;
        Sql::new("UPDATE attempts SET verdict = ")
            .bind(outcome.agent_verdict.as_str())
            .push(", chosen = ")
            .bind(i64::from(outcome.agent_chosen()))
            .push(" WHERE id = ")
            .bind(subject.result.attempt_id)
            .build()
            .execute(&mut *tx)
            .await
            .doing("recording a verdict")?;
        let flag = job_flag(subject, finding);
        if let Some((kind, detail)) = &flag {
            add_job_flag(&mut tx, subject, kind, detail).await?;
        }
        let flag_entry = queue_for_review(&mut tx, subject, finding, flag.as_ref(), now).await?;
        let ready = tally.apply(&mut tx).await?;
        let (held, hold_entry) = hold_if_reproduced(&mut tx, subject, finding, runs, now).await?;

        // Trust, then the agent row (the lock order's agent step).
        let mut entries = vec![
            verified_entry(subject, finding, &outcome, runs, &server_ids),
            shard_entry(subject, &outcome, reason.as_deref()),
        ];
        let quarantined = record_verdicts(
            &mut tx,
            subject,
            outcome.agent_verdict,
            others,
            &server_ids,
            strikes_limit,
            now,
            &mut entries,
        )
        .await?;
        entries.extend(flag_entry);
        entries.extend(hold_entry);
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("settling a check")?;
        Ok(Some(CheckSettled {
            ready,
            quarantined,
            held,
        }))
    }
}

/// What a finding does to the shard and the attempts, decided before anything is written.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    /// The shard's new state.
    to: TaskState,
    /// Its error, when the finding gives one (`None` on a rejection: the agent's, kept).
    reason: Option<String>,
    /// Someone other than the reporter judged it.
    verified: bool,
    /// The value is the server's run (the agent's was shown wrong).
    chosen_server: bool,
    /// The verdict on the server's own runs.
    server_verdict: Verdict,
    /// The verdict on the agent's result under check.
    agent_verdict: Verdict,
}

impl Outcome {
    fn of(subject: &CheckSubject, finding: &Finding) -> Outcome {
        // A failure under check that nothing disproved stands: the shard keeps the agent's
        // reason (written when it was held).
        let failure = subject.result.status != Status::Ok;
        let (to, reason) = match finding {
            Finding::FailsOnServer { reason } => (TaskState::Rejected, Some(reason.clone())),
            Finding::SucceedsOnServer => (TaskState::Accepted, None),
            _ if failure => (TaskState::Rejected, None),
            // Replicas that disagree and a server that cannot judge them: one more replica
            // while attempts remain, else no quorum.
            Finding::Unverifiable { why }
                if subject.verify.replicas > 1 && !replicas_agree(subject) =>
            {
                if subject.attempts < subject.max_attempts {
                    (
                        TaskState::Queued,
                        Some(
                            "replicas disagree and the server cannot judge: one more replica"
                                .to_string(),
                        ),
                    )
                } else {
                    (
                        TaskState::Rejected,
                        Some(format!(
                            "no quorum after {} attempts: the replicas disagree and the server cannot judge ({why})",
                            subject.attempts
                        )),
                    )
                }
            }
            _ => (TaskState::Accepted, None),
        };
        let verified = matches!(
            finding,
            Finding::Agrees
                | Finding::Differs
                | Finding::FailsOnServer { .. }
                | Finding::FailureConfirmed
                | Finding::SucceedsOnServer
        );
        let server_verdict = match finding {
            Finding::Nondeterministic | Finding::Unverifiable { .. } => Verdict::Inconclusive,
            _ => Verdict::Valid,
        };
        Outcome {
            to,
            reason,
            verified,
            chosen_server: matches!(finding, Finding::Differs | Finding::SucceedsOnServer),
            server_verdict,
            agent_verdict: finding.agent_verdict(),
        }
    }

    /// The agent's attempt is the shard's value.
    fn agent_chosen(&self) -> bool {
        self.to == TaskState::Accepted && !self.chosen_server
    }
}

/// `reported` (held by `owner`) → the outcome's state. `None`: the claim was lost; else the
/// shard's error as it stands now.
async fn move_checked_shard(
    tx: &mut settle::Tx,
    owner: &str,
    subject: &CheckSubject,
    outcome: &Outcome,
    now: i64,
) -> Result<Option<Option<String>>, StoreError> {
    let mut sql = Sql::new("UPDATE tasks SET state = ");
    sql.bind(outcome.to.as_str())
        .push(", check_owner = NULL, check_expires = 0, check_attempt = NULL, verified = ")
        .bind(i64::from(outcome.verified));
    if outcome.reason.is_some() || outcome.to != TaskState::Rejected {
        sql.push(", last_error = ")
            .bind(outcome.reason.as_deref().map(settle::storable_text));
    }
    let moved: Option<(Option<String>,)> = sql
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE id = ")
        .bind(subject.task_id)
        .push(" AND state = ")
        .bind(TaskState::Reported.as_str())
        .push(" AND check_owner = ")
        .bind(owner)
        .push(" RETURNING last_error")
        .build_as()
        .fetch_optional(&mut **tx)
        .await
        .doing("settling a checked shard")?;
    Ok(moved.map(|(last_error,)| outcome.reason.clone().or(last_error)))
}

/// The server's runs, as attempts of their own (runner `server`); their ids.
async fn store_server_runs(
    tx: &mut settle::Tx,
    subject: &CheckSubject,
    runs: &[ServerRun],
    outcome: &Outcome,
    now: i64,
) -> Result<Vec<i64>, StoreError> {
    let mut ids = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO attempts (tenant_id, task_id, job_id, lease_id, agent_id, attempt, \
             status, verdict, chosen, output, output_blob, output_sha256, report, wall_ms, \
             peak_memory, bytes_out, received_at, runner, stdout_sha256, cpu_ms) VALUES \
             ($1, $2, $3, $4, 'server', 0, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             'server', $16, $17) RETURNING id",
        )
        .bind(subject.tenant_id.as_str())
        .bind(subject.task_id)
        .bind(subject.job_id.as_str())
        .bind(format!(
            "server.{}.{}.{now}.{i}",
            subject.task_id, subject.result.attempt_id
        ))
        .bind(run.status.as_str())
        .bind(outcome.server_verdict.as_str())
        .bind(i64::from(outcome.chosen_server && i == 0))
        .bind(run.output.as_deref())
        .bind(run.output_blob.as_deref())
        .bind(run.output_sha256.as_deref())
        .bind(run.report_json.as_str())
        .bind(run.wall_ms)
        .bind(run.peak_memory)
        .bind(run.bytes_out)
        .bind(now)
        .bind(run.stdout_sha256.as_str())
        .bind(run.cpu_ms)
        .fetch_one(&mut **tx)
        .await
        .doing("storing a server run")?;
        ids.push(id);
    }
    Ok(ids)
}

/// What the job's summary names about this check: `(kind, detail)`, or nothing.
fn job_flag(subject: &CheckSubject, finding: &Finding) -> Option<(&'static str, String)> {
    let agent = &subject.result.agent_id;
    match finding {
        Finding::Agrees | Finding::FailureConfirmed => None,
        Finding::SucceedsOnServer => Some((
            "agent_result_invalid",
            format!(
                "agent {agent} reported `{}`{}; on the server the program succeeds; the server's value was taken",
                subject.result.status,
                reason_of(&subject.result)
            ),
        )),
        Finding::Differs => Some((
            "agent_result_invalid",
            format!(
                "agent {agent} returned a value the server's runs do not reproduce; the server's value was taken"
            ),
        )),
        Finding::FailsOnServer { reason } => Some((
            "agent_result_invalid",
            format!("agent {agent} reported success; on the server the program fails: {reason}"),
        )),
        Finding::Nondeterministic => Some((
            "nondeterministic",
            "the server's two runs of this shard differ: its result cannot be verified".to_string(),
        )),
        Finding::Unverifiable { why } => Some(("unverified", why.clone())),
        Finding::MachineDependent { worst } => Some((
            "machine_dependent",
            format!(
                "agent {agent}'s value differs from the server's only in floating-point rounding (at most {worst:.1e} relative): a machine-dependent result, not held against the agent"
            ),
        )),
    }
}

/// Add `(kind, detail)` about the subject's shard to its job's flags.
async fn add_job_flag(
    tx: &mut settle::Tx,
    subject: &CheckSubject,
    kind: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let (current,): (String,) = sqlx::query_as("SELECT flags FROM jobs WHERE id = $1")
        .bind(subject.job_id.as_str())
        .fetch_one(&mut **tx)
        .await
        .doing("reading a job's flags")?;
    let mut flags: Vec<serde_json::Value> = serde_json::from_str(&current).unwrap_or_default();
    flags.push(serde_json::json!({
        "kind": kind, "shard": subject.shard_index, "detail": detail,
    }));
    sqlx::query("UPDATE jobs SET flags = $1 WHERE id = $2")
        .bind(serde_json::Value::Array(flags).to_string())
        .bind(subject.job_id.as_str())
        .execute(&mut **tx)
        .await
        .doing("flagging a job")?;
    Ok(())
}

/// The review-queue kind of a finding: anything but agreement goes to a person.
fn review_kind(subject: &CheckSubject, finding: &Finding) -> Option<FlagKind> {
    match finding {
        Finding::Agrees | Finding::FailureConfirmed => None,
        Finding::Differs | Finding::FailsOnServer { .. } | Finding::SucceedsOnServer => {
            Some(FlagKind::Mismatch)
        }
        // Every violation is a flag a person can find, reproduced or not.
        _ if subject.result.status == Status::SandboxViolation => Some(FlagKind::Violation),
        Finding::Nondeterministic
        | Finding::Unverifiable { .. }
        | Finding::MachineDependent { .. } => Some(FlagKind::Inconclusive),
    }
}

/// Queue the finding for a person, in the verdict's own transaction (a crash between the two
/// lost the flag once); the audit entry of it.
async fn queue_for_review(
    tx: &mut settle::Tx,
    subject: &CheckSubject,
    finding: &Finding,
    flag: Option<&(&'static str, String)>,
    now: i64,
) -> Result<Option<Entry>, StoreError> {
    let Some(kind) = review_kind(subject, finding) else {
        return Ok(None);
    };
    let details = serde_json::json!({
        "shard": subject.shard_index,
        "agent": subject.result.agent_id,
        "finding": finding.name(),
        "detail": flag.map(|(_, d)| d.as_str()),
        "reported": subject.result.status.as_str(),
        "held": false,
    });
    let id =
        super::review::insert_flag(tx, &subject.tenant_id, &subject.job_id, kind, &details, now)
            .await?;
    Ok(Some(
        Entry::new(&subject.tenant_id, "reviewer", Action::ReviewFlagged)
            .job(&subject.job_id)
            .details(serde_json::json!({ "flag": id, "kind": kind, "details": details })),
    ))
}

/// A violation the server reproduced holds the rest of its job, as a trusted agent's does.
async fn hold_if_reproduced(
    tx: &mut settle::Tx,
    subject: &CheckSubject,
    finding: &Finding,
    runs: &[ServerRun],
    now: i64,
) -> Result<(Option<String>, Option<Entry>), StoreError> {
    if !matches!(finding, Finding::FailureConfirmed)
        || subject.result.status != Status::SandboxViolation
    {
        return Ok((None, None));
    }
    let why = runs.first().and_then(|r| r.reason.as_deref());
    super::review::hold_for_violation(
        tx,
        &subject.tenant_id,
        subject.task_id,
        &subject.result.agent_id,
        why,
        now,
    )
    .await
}

/// `attempt.verified` for the result under check.
fn verified_entry(
    subject: &CheckSubject,
    finding: &Finding,
    outcome: &Outcome,
    runs: &[ServerRun],
    server_ids: &[i64],
) -> Entry {
    Entry::new(&subject.tenant_id, "server", Action::AttemptVerified)
        .job(&subject.job_id)
        .task(subject.task_id)
        .agent(&subject.result.agent_id)
        .details(serde_json::json!({
            "verdict": outcome.agent_verdict.as_str(),
            "finding": finding.name(),
            "compare": subject.verify.compare.name(),
            "attempt": subject.result.attempt_id,
            "agent_output_sha256": subject.result.output_sha256,
            "server_attempts": server_ids,
            "server_output_sha256": runs.iter().map(|r| r.output_sha256.clone()).collect::<Vec<_>>(),
            "server_status": runs.iter().map(|r| r.status.as_str()).collect::<Vec<_>>(),
        }))
}

/// The shard's settle entry, naming the agent whose result was judged (`audit list --agent`
/// finds it).
fn shard_entry(subject: &CheckSubject, outcome: &Outcome, reason: Option<&str>) -> Entry {
    let action = match outcome.to {
        TaskState::Accepted => Action::ShardAccepted,
        TaskState::Queued => Action::ShardRequeued,
        _ => Action::ShardRejected,
    };
    Entry::new(&subject.tenant_id, "server", action)
        .job(&subject.job_id)
        .task(subject.task_id)
        .agent(&subject.result.agent_id)
        .details(serde_json::json!({
            "verified": outcome.verified,
            "value_from": if outcome.chosen_server { "server" } else { "agent" },
            "reason": reason,
        }))
}

/// Each judged result's verdict and its agent's trust (and quarantine at `strikes_limit`): the
/// result under check (its verdict and choice written already), then the other replicas the
/// server's run judged. The agents quarantined.
#[allow(clippy::too_many_arguments)]
async fn record_verdicts(
    tx: &mut settle::Tx,
    subject: &CheckSubject,
    agent_verdict: Verdict,
    others: &[Verdict],
    server_ids: &[i64],
    strikes_limit: i64,
    now: i64,
    entries: &mut Vec<Entry>,
) -> Result<Vec<String>, StoreError> {
    let judged = super::replicas::Judged {
        tenant_id: &subject.tenant_id,
        job_id: &subject.job_id,
        task_id: subject.task_id,
        shard_index: subject.shard_index as i64,
    };
    let mut quarantined = Vec::new();
    let judged_results = std::iter::once((subject.result.clone(), agent_verdict))
        .chain(subject.others.iter().cloned().zip(others.iter().copied()));
    for (i, (replica, verdict)) in judged_results.enumerate() {
        if i > 0 {
            entries.push(
                Entry::new(&subject.tenant_id, "server", Action::AttemptVerified)
                    .job(&subject.job_id)
                    .task(subject.task_id)
                    .agent(&replica.agent_id)
                    .details(serde_json::json!({
                        "verdict": verdict.as_str(),
                        "finding": "judged by the server's run",
                        "compare": subject.verify.compare.name(),
                        "attempt": replica.attempt_id,
                        "agent_output_sha256": replica.output_sha256,
                        "server_attempts": server_ids,
                    })),
            );
        }
        let struck = super::replicas::record_verdict(
            tx,
            &replica,
            verdict,
            &judged,
            strikes_limit,
            now,
            entries,
        )
        .await?;
        quarantined.extend(struck);
    }
    Ok(quarantined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::replicas::Replica;

    fn subject(status: Status, replicas: u32, attempts: u32) -> CheckSubject {
        let result = |id: i64, value: &str| Replica {
            attempt_id: id,
            agent_id: format!("agt_{id}"),
            status,
            message: Some("ZeroDivisionError".into()),
            verdict: Verdict::Unchecked,
            output: Some(value.into()),
            output_blob: None,
            output_sha256: Some(value.into()),
            stdout_sha256: None,
            python: "3.11".into(),
            backend: "jail".into(),
        };
        CheckSubject {
            task_id: 7,
            tenant_id: "default".into(),
            job_id: "job_x".into(),
            shard_index: 3,
            input: "{}".into(),
            verify: VerifySpec {
                replicas,
                quorum: replicas.max(1),
                ..Default::default()
            },
            result: result(1, "4"),
            others: if replicas > 1 {
                vec![result(2, "5")]
            } else {
                Vec::new()
            },
            attempts,
            max_attempts: 3,
        }
    }

    #[test]
    fn a_success_under_check_settles_as_the_finding_says() {
        let ok = subject(Status::Ok, 1, 1);
        let of = |f: &Finding| {
            let o = Outcome::of(&ok, f);
            (
                o.to,
                o.verified,
                o.chosen_server,
                o.agent_verdict,
                o.server_verdict,
            )
        };
        use TaskState::*;
        use Verdict::*;
        assert_eq!(of(&Finding::Agrees), (Accepted, true, false, Valid, Valid));
        assert_eq!(
            of(&Finding::Differs),
            (Accepted, true, true, Invalid, Valid)
        );
        let fails = Finding::FailsOnServer {
            reason: "error".into(),
        };
        assert_eq!(of(&fails), (Rejected, true, false, Invalid, Valid));
        assert_eq!(Outcome::of(&ok, &fails).reason.as_deref(), Some("error"));
        assert_eq!(
            of(&Finding::Nondeterministic),
            (Accepted, false, false, Inconclusive, Inconclusive)
        );
        let worst = Finding::MachineDependent { worst: 1e-12 };
        assert_eq!(of(&worst), (Accepted, false, false, Inconclusive, Valid));
        assert!(Outcome::of(&ok, &Finding::Agrees).agent_chosen());
        assert!(!Outcome::of(&ok, &Finding::Differs).agent_chosen());
    }

    #[test]
    fn a_failure_under_check_stands_unless_the_server_succeeds() {
        let failed = subject(Status::Error, 1, 1);
        let of = |f: &Finding| {
            let o = Outcome::of(&failed, f);
            (o.to, o.reason, o.verified, o.chosen_server, o.agent_verdict)
        };
        use TaskState::*;
        use Verdict::*;
        // Confirmed: rejected, the agent's reason kept (`None`: not overwritten).
        assert_eq!(
            of(&Finding::FailureConfirmed),
            (Rejected, None, true, false, Valid)
        );
        // Shown false: the server's value, a strike.
        assert_eq!(
            of(&Finding::SucceedsOnServer),
            (Accepted, None, true, true, Invalid)
        );
        // Nothing shows it wrong: it stands, unverified.
        assert_eq!(
            of(&Finding::Nondeterministic),
            (Rejected, None, false, false, Inconclusive)
        );
        let unverifiable = Finding::Unverifiable { why: "x".into() };
        assert_eq!(
            of(&unverifiable),
            (Rejected, None, false, false, Inconclusive)
        );
        assert!(!Outcome::of(&failed, &Finding::SucceedsOnServer).agent_chosen());
    }

    #[test]
    fn replicas_the_server_cannot_judge_get_one_more_then_no_quorum() {
        let why = Finding::Unverifiable {
            why: "timeout".into(),
        };
        let more = Outcome::of(&subject(Status::Ok, 2, 2), &why);
        assert_eq!(more.to, TaskState::Queued);
        assert!(more.reason.unwrap().contains("one more replica"));
        let out = Outcome::of(&subject(Status::Ok, 2, 3), &why);
        assert_eq!(out.to, TaskState::Rejected);
        assert!(
            out.reason
                .unwrap()
                .starts_with("no quorum after 3 attempts")
        );
        // A single result the server cannot judge stands, unverified.
        assert_eq!(
            Outcome::of(&subject(Status::Ok, 1, 3), &why).to,
            TaskState::Accepted
        );
    }

    #[test]
    fn flags_name_the_agent_and_every_violation_reaches_a_person() {
        let ok = subject(Status::Ok, 1, 1);
        assert_eq!(job_flag(&ok, &Finding::Agrees), None);
        let (kind, detail) = job_flag(&ok, &Finding::Differs).unwrap();
        assert_eq!(kind, "agent_result_invalid");
        assert!(detail.contains("agt_1"), "{detail}");
        let failed = subject(Status::Error, 1, 1);
        let (_, detail) = job_flag(&failed, &Finding::SucceedsOnServer).unwrap();
        assert!(
            detail.contains("`error`: ZeroDivisionError") && detail.contains("succeeds"),
            "{detail}"
        );
        assert_eq!(review_kind(&ok, &Finding::Agrees), None);
        assert_eq!(review_kind(&failed, &Finding::FailureConfirmed), None);
        assert_eq!(
            review_kind(&failed, &Finding::SucceedsOnServer),
            Some(FlagKind::Mismatch)
        );
        let violation = subject(Status::SandboxViolation, 1, 1);
        let unseen = Finding::Unverifiable {
            why: "no jail".into(),
        };
        assert_eq!(review_kind(&violation, &unseen), Some(FlagKind::Violation));
        assert_eq!(review_kind(&ok, &unseen), Some(FlagKind::Inconclusive));
    }
}
