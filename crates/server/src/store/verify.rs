//! Verification policy in the store: which reports wait for a server check (the reporter's
//! trust and the job's `recheck`), each agent's trust and quarantine, and what a quarantine
//! sends back to be checked. The checks themselves are `store::checks`.
//!
//! A report that needs a check goes `leased` → `reported` (in the report's transaction); a
//! coordinator claims it, re-runs the shard in its own sandbox and settles it with
//! `Store::finish_check`.

use std::collections::HashMap;

use fleetbox_proto::{JobState, Recheck, Status, TaskState, VerifySpec};

use super::audit::{Action, Entry};
use super::reports::ReportInput;
use super::settle::{self, Tally, Tx};
use super::sql::Sql;
use super::{Doing, Store, StoreError, now_ms};

/// Consecutive valid results after which an agent is trusted (the default of
/// `--trusted-after`). BOINC uses 10; at 10 a liar on 2% of its results passes its untrusted
/// phase 82% of the time and is then caught only by the floor's sample, after a median of
/// about 2,000 of its results (p95 about 8,800). At 250 it passes 0.6% of the time: it is
/// quarantined within 400 of its results in 99% of cases (simulated; see
/// `docs/SANDBOX_DISTRIBUTED.md`), for 250 server runs per new agent, interpreter and backend.
pub const TRUSTED_AFTER: i64 = 250;
/// The smallest share of a trusted agent's results still re-checked: a sleeper is caught.
pub const TRUSTED_RATE_FLOOR: f64 = 0.02;
/// An agent whose results are infrastructure failures more often than this is not trusted,
/// whatever its run of valid results (once it has reported [`ERROR_RATE_AFTER`]).
pub const MAX_ERROR_RATE: f64 = 0.10;
pub const ERROR_RATE_AFTER: i64 = 20;

/// `errors / results`, or 0 before [`ERROR_RATE_AFTER`] results.
pub fn error_rate(results: i64, errors: i64) -> f64 {
    if results < ERROR_RATE_AFTER {
        0.0
    } else {
        errors as f64 / results as f64
    }
}

/// The consecutive valid results an agent needs to be trusted with `strikes` on record: the
/// threshold, doubled for each strike (at most 16 times). A liar caught once and not yet
/// quarantined must not be trusted as soon as an agent never caught: at 250, a 2% liar
/// passes 250 in a row after its first strike 0.6% of the time, 500 in a row 0.004%.
pub fn warm_up(trusted_after: i64, strikes: i64) -> i64 {
    trusted_after.saturating_mul(1 << strikes.clamp(0, 4))
}

/// The share of an agent's results re-checked under `adaptive`, from its consecutive valid
/// results: all of them until it is trusted (`trusted_after`, see [`warm_up`]), then
/// `1/consecutive`, never under the floor.
pub fn adaptive_rate(consecutive_valid: i64, trusted_after: i64) -> f64 {
    if consecutive_valid < trusted_after {
        1.0
    } else {
        (1.0 / consecutive_valid as f64).max(TRUSTED_RATE_FLOOR)
    }
}

/// A uniform draw in [0, 1) the agent cannot predict (not derived from anything it sees).
fn draw() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.0; // no randomness: check
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A job's `[verify]` as stored (JSON; `None` = the defaults).
pub fn policy(stored: Option<&str>) -> VerifySpec {
    stored
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// What the report transaction knows of the reporting agent's trust.
pub(super) struct ReporterTrust {
    quarantined: bool,
    /// Started by the coordinator's own process (`fleetbox up`): trusted from the start.
    own: bool,
    /// The warm-up for this agent: `--trusted-after` doubled for each strike on record.
    trusted_after: i64,
    /// Consecutive valid results and error rate per (python, backend).
    consecutive: HashMap<(String, String), (i64, f64)>,
}

impl ReporterTrust {
    /// Count a batch's results and infrastructure failures per (python, backend), in the
    /// report's transaction.
    pub(super) async fn count(
        tx: &mut Tx,
        agent_id: &str,
        reports: &[&ReportInput],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut by: std::collections::BTreeMap<(&str, &str), (i64, i64)> = Default::default();
        for r in reports {
            let e = by
                .entry((r.python.as_str(), r.backend.as_str()))
                .or_default();
            e.0 += 1;
            e.1 += i64::from(matches!(r.status, Status::SandboxError | Status::Killed));
        }
        for ((python, backend), (n, errors)) in by {
            Sql::new(
                "INSERT INTO agent_trust (agent_id, python, backend, updated_at, results, errors) \
                 VALUES (",
            )
            .bind(agent_id)
            .push(", ")
            .bind(python)
            .push(", ")
            .bind(backend)
            .push(", ")
            .bind(now)
            .push(", ")
            .bind(n)
            .push(", ")
            .bind(errors)
            .push(
                ") ON CONFLICT (agent_id, python, backend) DO UPDATE SET \
                 results = agent_trust.results + excluded.results, \
                 errors = agent_trust.errors + excluded.errors",
            )
            .build()
            .execute(&mut **tx)
            .await
            .doing("counting an agent's results")?;
        }
        Ok(())
    }

    pub(super) async fn read(
        tx: &mut Tx,
        agent_id: &str,
        trusted_after: i64,
    ) -> Result<Self, StoreError> {
        let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT python, backend, consecutive_valid, results, errors FROM agent_trust \
             WHERE agent_id = $1",
        )
        .bind(agent_id)
        .fetch_all(&mut **tx)
        .await
        .doing("reading an agent's trust")?;
        let agent: Option<(Option<i64>, i64, i64)> =
            sqlx::query_as("SELECT quarantined_at, own, strikes FROM agents WHERE id = $1")
                .bind(agent_id)
                .fetch_optional(&mut **tx)
                .await
                .doing("reading an agent's quarantine")?;
        Ok(ReporterTrust {
            quarantined: matches!(agent, Some((Some(_), _, _))),
            own: matches!(agent, Some((_, 1, _))),
            trusted_after: warm_up(trusted_after, agent.map_or(0, |a| a.2)),
            consecutive: rows
                .into_iter()
                .map(|(p, b, c, n, e)| ((p, b), (c, error_rate(n, e))))
                .collect(),
        })
    }

    /// Why this report must be checked by the server before it settles its shard, or `None`.
    ///
    /// An agent's failures are checked like its successes (a liar could otherwise fail shards
    /// at will): `error`, `timeout`, the limits and `sandbox_violation`. A violation from an
    /// agent that is not trusted is checked whatever the job's `recheck`, since it holds the
    /// job for a person: only a reproduced violation, or a trusted agent's, may do that. Not
    /// checked: infrastructure failures (`sandbox_error`, `killed`: the shard runs again) and
    /// refusals (the agent's own policy, not a claim about the program: the shard goes to
    /// another agent).
    pub(super) fn check_reason(
        &self,
        verify: Option<&str>,
        r: &ReportInput,
    ) -> Option<&'static str> {
        if matches!(
            r.status,
            Status::SandboxError | Status::Killed | Status::Refused
        ) {
            return None;
        }
        if self.quarantined {
            return Some("the agent is quarantined");
        }
        let recheck = policy(verify).recheck;
        if r.status == Status::SandboxViolation && recheck != Recheck::All && !self.trusted(r) {
            return Some("a violation reported by an agent not trusted");
        }
        match recheck {
            // Checked, if at all, when the job's results are reviewed before its fold.
            Recheck::None | Recheck::OnAnomaly => None,
            Recheck::All => Some("recheck = all"),
            Recheck::Sample(p) => (draw() < p).then_some("sampled"),
            // The coordinator's own agents (`fleetbox up`) run on its machine, under its user:
            // re-running their results there would check the machine against itself.
            Recheck::Adaptive if self.own => None,
            Recheck::Adaptive => {
                let (cv, errors) = self.standing(r);
                if cv < self.trusted_after {
                    Some("the agent is not trusted yet")
                } else if errors > MAX_ERROR_RATE {
                    Some("the agent's error rate is high")
                } else {
                    (draw() < adaptive_rate(cv, self.trusted_after))
                        .then_some("sampled from a trusted agent")
                }
            }
        }
    }

    /// The agent's consecutive valid results and error rate for the report's interpreter and
    /// backend.
    fn standing(&self, r: &ReportInput) -> (i64, f64) {
        let key = (r.python.clone(), r.backend.clone());
        self.consecutive.get(&key).copied().unwrap_or((0, 0.0))
    }

    /// Whether the agent is trusted for this report's interpreter and backend.
    fn trusted(&self, r: &ReportInput) -> bool {
        let (cv, errors) = self.standing(r);
        self.own || (cv >= self.trusted_after && errors <= MAX_ERROR_RATE)
    }
}

/// A shard of a job: by its task id or its index.
#[derive(Debug, Clone, Copy)]
enum Which {
    Task(i64),
    Index(i64),
}

/// `accepted` and never verified → `reported`, its attempts no longer chosen: the server
/// checks it and chooses again. Counted in `tally`; false when the shard was not in that state.
async fn recheck_shard(
    tx: &mut Tx,
    tally: &mut Tally,
    job_id: &str,
    which: Which,
    now: i64,
) -> Result<bool, StoreError> {
    let mut sql = Sql::new("UPDATE tasks SET state = ");
    sql.bind(TaskState::Reported.as_str())
        .push(", check_owner = NULL, check_expires = 0, updated_at = ")
        .bind(now)
        .push(" WHERE job_id = ")
        .bind(job_id);
    match which {
        Which::Task(id) => sql.push(" AND id = ").bind(id),
        Which::Index(i) => sql.push(" AND shard_index = ").bind(i),
    };
    sql.push(" AND verified = 0 AND state = ")
        .bind(TaskState::Accepted.as_str())
        .push(" RETURNING id");
    let moved: Option<(i64,)> = sql
        .build_as()
        .fetch_optional(&mut **tx)
        .await
        .doing("sending a shard to be checked")?;
    let Some((task,)) = moved else {
        return Ok(false);
    };
    // The chosen value is chosen again only once the check agrees.
    Sql::new("UPDATE attempts SET chosen = 0 WHERE task_id = ")
        .bind(task)
        .build()
        .execute(&mut **tx)
        .await
        .doing("sending a shard to be checked")?;
    tally.moved(job_id, TaskState::Accepted, TaskState::Reported, 1);
    Ok(true)
}

/// An agent's trust for one interpreter and backend, as `fleetbox agents` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrustRow {
    pub agent_id: String,
    pub python: String,
    pub backend: String,
    pub consecutive_valid: i64,
    pub valid: i64,
    pub invalid: i64,
    pub results: i64,
    pub errors: i64,
}

impl Store {
    /// After `agent` was quarantined: its accepted values that were never checked, in jobs
    /// still running, go back to `reported` to be checked by the server. Returns how many.
    pub async fn recheck_unverified_of(&self, agent_id: &str) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut tx = self
            .begin_write()
            .await
            .doing("re-checking an agent's results")?;
        let candidates: Vec<(i64, String)> = Sql::new(
            "SELECT t.id, t.job_id FROM tasks t JOIN attempts a ON a.task_id = t.id AND a.chosen = 1 \
             JOIN jobs j ON j.id = t.job_id WHERE a.agent_id = ",
        )
        .bind(agent_id)
        .push(" AND a.runner = 'agent' AND t.verified = 0 AND t.state = ")
        .bind(TaskState::Accepted.as_str())
        .push(" AND j.state = 'running'")
        .build_as()
        .fetch_all(&mut *tx)
        .await
        .doing("finding an agent's unchecked results")?;
        if candidates.is_empty() {
            tx.commit().await.doing("re-checking an agent's results")?;
            return Ok(0);
        }
        let jobs: Vec<String> = candidates.iter().map(|(_, j)| j.clone()).collect();
        settle::lock_jobs(&mut tx, self.kind, &jobs).await?;
        let mut tally = Tally::default();
        let mut n = 0;
        for (task, job) in &candidates {
            n += u64::from(recheck_shard(&mut tx, &mut tally, job, Which::Task(*task), now).await?);
        }
        tally.apply(&mut tx).await?;
        tx.commit().await.doing("re-checking an agent's results")?;
        Ok(n)
    }

    /// `recheck = "on_anomaly"`: during `owner`'s fold of `job_id`, the accepted shards among
    /// `shards` that no server run confirmed go to the server (`reported`), and the fold is
    /// given up: the job runs again and folds once the checks settle, with those shards
    /// verified. Returns how many went; with none, the fold goes on.
    pub async fn recheck_anomalies(
        &self,
        job_id: &str,
        owner: &str,
        shards: &[u64],
        why: &str,
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("re-checking anomalies")?;
        settle::lock_jobs(&mut tx, self.kind, &[job_id.to_string()]).await?;
        let job: Option<(String,)> = Sql::new("SELECT tenant_id FROM jobs WHERE id = ")
            .bind(job_id)
            .push(" AND state = ")
            .bind(JobState::Aggregating.as_str())
            .push(" AND fold_owner = ")
            .bind(owner)
            .build_as()
            .fetch_optional(&mut *tx)
            .await
            .doing("re-checking anomalies")?;
        let Some((tenant,)) = job else {
            return Ok(0);
        };
        let mut tally = Tally::default();
        let mut entries = Vec::new();
        for &shard in shards {
            let which = Which::Index(shard as i64);
            if recheck_shard(&mut tx, &mut tally, job_id, which, now).await? {
                entries.push(
                    Entry::new(&tenant, "reviewer", Action::ShardChecking)
                        .job(job_id)
                        .details(serde_json::json!({
                            "shard": shard,
                            "why": format!("recheck = on_anomaly: {why}"),
                        })),
                );
            }
        }
        if entries.is_empty() {
            return Ok(0);
        }
        // The fold is given up, not failed: it starts over once the checks settle.
        Sql::new("UPDATE jobs SET state = ")
            .bind(JobState::Running.as_str())
            .push(", fold_owner = NULL, fold_expires = 0, fold_tries = 0 WHERE id = ")
            .bind(job_id)
            .build()
            .execute(&mut *tx)
            .await
            .doing("re-checking anomalies")?;
        tally.apply(&mut tx).await?;
        let n = entries.len() as u64;
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("re-checking anomalies")?;
        Ok(n)
    }

    /// For a job's summary: its accepted shards a server run confirmed, and its flags.
    pub async fn verification_facts(
        &self,
        job_id: &str,
    ) -> Result<(u64, Vec<fleetbox_proto::api::JobFlag>), StoreError> {
        let (verified,): (i64,) =
            Sql::new("SELECT COUNT(*) FROM tasks WHERE verified = 1 AND job_id = ")
                .bind(job_id)
                .push(" AND state = ")
                .bind(TaskState::Accepted.as_str())
                .build_as()
                .fetch_one(&self.read)
                .await
                .doing("counting verified shards")?;
        let flags: Option<(String,)> = Sql::new("SELECT flags FROM jobs WHERE id = ")
            .bind(job_id)
            .build_as()
            .fetch_optional(&self.read)
            .await
            .doing("reading a job's flags")?;
        let flags = flags
            .and_then(|(f,)| serde_json::from_str(&f).ok())
            .unwrap_or_default();
        Ok((verified.max(0) as u64, flags))
    }

    /// After `agent_id` was quarantined: jobs past `running` (folding, folded, or waiting for a
    /// person) that hold values of it nobody checked are `needs_review`, each such shard
    /// flagged `tainted` (`rerun_tainted` redoes them). Returns the jobs flagged.
    pub async fn taint_finished_jobs_of(&self, agent_id: &str) -> Result<Vec<String>, StoreError> {
        // Every state a job holds accepted values in past `running` (whose shards
        // `recheck_unverified_of` sends back to be checked): folding, folded, or waiting for a
        // person. `completed`/`failed` only missed values in the other two.
        const TAINTABLE: [JobState; 4] = [
            JobState::Aggregating,
            JobState::NeedsReview,
            JobState::Completed,
            JobState::Failed,
        ];
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("flagging tainted jobs")?;
        let rows: Vec<(String, String, i64)> = Sql::new(
            "SELECT t.job_id, j.tenant_id, t.shard_index FROM tasks t \
             JOIN attempts a ON a.task_id = t.id AND a.chosen = 1 AND a.runner = 'agent' \
             JOIN jobs j ON j.id = t.job_id WHERE a.agent_id = ",
        )
        .bind(agent_id)
        .push(" AND t.verified = 0 AND t.state = ")
        .bind(TaskState::Accepted.as_str())
        .push(" AND j.state IN (")
        .bind_list(TAINTABLE.map(JobState::as_str))
        .push(") ORDER BY t.job_id, t.shard_index")
        .build_as()
        .fetch_all(&mut *tx)
        .await
        .doing("finding tainted jobs")?;
        let mut by_job: std::collections::BTreeMap<String, (String, Vec<i64>)> = Default::default();
        for (job, tenant, shard) in rows {
            by_job
                .entry(job)
                .or_insert_with(|| (tenant, Vec::new()))
                .1
                .push(shard);
        }
        let jobs: Vec<String> = by_job.keys().cloned().collect();
        settle::lock_jobs(&mut tx, self.kind, &jobs).await?;
        let mut entries = Vec::new();
        let mut flagged = Vec::new();
        for (job, (tenant, shards)) in by_job {
            // A fold in progress is abandoned (its result would hold the value); the job
            // folds again once `--rerun-tainted` has the shards checked.
            let current: Option<(String,)> = Sql::new("UPDATE jobs SET state = ")
                .bind(JobState::NeedsReview.as_str())
                .push(", fold_owner = NULL WHERE id = ")
                .bind(job.as_str())
                .push(" AND state IN (")
                .bind_list(TAINTABLE.map(JobState::as_str))
                .push(") RETURNING flags")
                .build_as()
                .fetch_optional(&mut *tx)
                .await
                .doing("flagging a tainted job")?;
            let Some((flags,)) = current else { continue };
            let mut flags: Vec<serde_json::Value> =
                serde_json::from_str(&flags).unwrap_or_default();
            for shard in &shards {
                flags.push(serde_json::json!({
                    "kind": "tainted",
                    "shard": shard,
                    "detail": format!(
                        "its value came unchecked from agent {agent_id}, since quarantined; \
                         `fleetbox job {job} --rerun-tainted` checks it again"
                    ),
                }));
            }
            Sql::new("UPDATE jobs SET flags = ")
                .bind(serde_json::Value::Array(flags).to_string())
                .push(" WHERE id = ")
                .bind(job.as_str())
                .build()
                .execute(&mut *tx)
                .await
                .doing("flagging a tainted job")?;
            entries.push(
                Entry::new(&tenant, "server", Action::JobNeedsReview)
                    .job(&job)
                    .agent(agent_id)
                    .details(serde_json::json!({ "tainted_shards": shards })),
            );
            flagged.push(job);
        }
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("flagging tainted jobs")?;
        Ok(flagged)
    }

    /// `needs_review` → `running`: the shards flagged `tainted` go back to `reported`, to be
    /// checked by the server, and the job folds again when they settle. Returns how many, or
    /// `None` when the job is not `needs_review` (or not `tenant`'s).
    pub async fn rerun_tainted(
        &self,
        tenant_id: &str,
        job_id: &str,
        actor: &str,
    ) -> Result<Option<u64>, StoreError> {
        let now = now_ms();
        let mut tx = self
            .begin_write()
            .await
            .doing("re-running tainted shards")?;
        settle::lock_jobs(&mut tx, self.kind, &[job_id.to_string()]).await?;
        let job: Option<(String,)> = Sql::new("SELECT flags FROM jobs WHERE id = ")
            .bind(job_id)
            .push(" AND tenant_id = ")
            .bind(tenant_id)
            .push(" AND state = ")
            .bind(JobState::NeedsReview.as_str())
            .build_as()
            .fetch_optional(&mut *tx)
            .await
            .doing("reading a job to re-run")?;
        let Some((flags,)) = job else {
            return Ok(None);
        };
        let flags: Vec<serde_json::Value> = serde_json::from_str(&flags).unwrap_or_default();
        let mut shards: Vec<i64> = flags
            .iter()
            .filter(|f| f["kind"] == "tainted")
            .filter_map(|f| f["shard"].as_i64())
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let mut tally = Tally::default();
        let mut n = 0u64;
        for shard in &shards {
            let which = Which::Index(*shard);
            n += u64::from(recheck_shard(&mut tx, &mut tally, job_id, which, now).await?);
        }
        // Back to `running`: it folds again once the checks settle (with nothing to re-check,
        // at once).
        Sql::new("UPDATE jobs SET state = ")
            .bind(JobState::Running.as_str())
            .push(", result = NULL, result_blob = NULL, finished_at = NULL WHERE id = ")
            .bind(job_id)
            .build()
            .execute(&mut *tx)
            .await
            .doing("re-running a job")?;
        tally.apply(&mut tx).await?;
        let entry = Entry::new(tenant_id, actor, Action::JobRerunTainted)
            .job(job_id)
            .details(serde_json::json!({ "shards": shards, "rechecked": n }));
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("re-running tainted shards")?;
        Ok(Some(n))
    }

    /// Whether `agent_id` is quarantined (it gets no leases).
    pub async fn agent_quarantined(&self, agent_id: &str) -> Result<bool, StoreError> {
        let row: Option<(Option<i64>,)> = Sql::new("SELECT quarantined_at FROM agents WHERE id = ")
            .bind(agent_id)
            .build_as()
            .fetch_optional(&self.read)
            .await
            .doing("reading an agent's quarantine")?;
        Ok(matches!(row, Some((Some(_),))))
    }

    /// Quarantine `agent_id` by an operator's decision: no leases until released. False when
    /// there is no such agent or it is quarantined already.
    pub async fn quarantine_agent(
        &self,
        tenant_id: &str,
        agent_id: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let why = format!("quarantined by an operator ({actor})");
        let mut tx = self.begin_write().await.doing("quarantining an agent")?;
        let done = Sql::new("UPDATE agents SET quarantined_at = ")
            .bind(now)
            .push(", quarantine_reason = ")
            .bind(why.as_str())
            .push(" WHERE quarantined_at IS NULL AND id = ")
            .bind(agent_id)
            .push(" AND tenant_id = ")
            .bind(tenant_id)
            .build()
            .execute(&mut *tx)
            .await
            .doing("quarantining an agent")?
            .rows_affected()
            == 1;
        if done {
            let entry = Entry::new(tenant_id, actor, Action::AgentQuarantined)
                .agent(agent_id)
                .details(serde_json::json!({ "why": why }));
            self.append_audit(&mut tx, vec![entry], now).await?;
        }
        tx.commit().await.doing("quarantining an agent")?;
        Ok(done)
    }

    /// An admin releases a quarantined agent: strikes and trust start over. `false`: no such
    /// agent in `tenant`, or not quarantined.
    pub async fn release_agent(
        &self,
        tenant_id: &str,
        agent_id: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("releasing an agent")?;
        let released = Sql::new(
            "UPDATE agents SET quarantined_at = NULL, quarantine_reason = NULL, strikes = 0 \
             WHERE quarantined_at IS NOT NULL AND id = ",
        )
        .bind(agent_id)
        .push(" AND tenant_id = ")
        .bind(tenant_id)
        .build()
        .execute(&mut *tx)
        .await
        .doing("releasing an agent")?
        .rows_affected()
            == 1;
        if released {
            Sql::new("UPDATE agent_trust SET consecutive_valid = 0 WHERE agent_id = ")
                .bind(agent_id)
                .build()
                .execute(&mut *tx)
                .await
                .doing("releasing an agent")?;
            let entry = Entry::new(tenant_id, actor, Action::AgentReleased).agent(agent_id);
            self.append_audit(&mut tx, vec![entry], now).await?;
        }
        tx.commit().await.doing("releasing an agent")?;
        Ok(released)
    }

    /// Trust rows of every agent of `tenant`.
    pub async fn trust_of_tenant(&self, tenant_id: &str) -> Result<Vec<TrustRow>, StoreError> {
        Sql::new(
            "SELECT t.agent_id, t.python, t.backend, t.consecutive_valid, t.valid, t.invalid, \
             t.results, t.errors FROM agent_trust t JOIN agents a ON a.id = t.agent_id WHERE a.tenant_id = ",
        )
        .bind(tenant_id)
        .push(" ORDER BY t.agent_id, t.python, t.backend")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading trust")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A strike on record doubles the warm-up: a liar caught once is not trusted again after
    /// the run that trusts a clean agent.
    #[test]
    fn a_strike_doubles_the_warm_up() {
        assert_eq!(warm_up(TRUSTED_AFTER, 0), TRUSTED_AFTER);
        assert_eq!(warm_up(TRUSTED_AFTER, 1), 2 * TRUSTED_AFTER);
        assert_eq!(warm_up(10, 99), 160);
        assert_eq!(warm_up(i64::MAX, 1), i64::MAX);
        assert_eq!(adaptive_rate(300, warm_up(TRUSTED_AFTER, 1)), 1.0);
    }

    #[test]
    fn new_agents_are_always_checked_and_trusted_ones_rarely_but_never_never() {
        assert_eq!(adaptive_rate(0, 10), 1.0);
        assert_eq!(adaptive_rate(9, 10), 1.0);
        assert!((adaptive_rate(10, 10) - 0.1).abs() < 1e-12);
        assert!((adaptive_rate(40, 10) - 0.025).abs() < 1e-12);
        assert_eq!(adaptive_rate(1_000_000, 10), TRUSTED_RATE_FLOOR);
        // The default threshold is past the floor: trusted agents are sampled at the floor.
        assert_eq!(adaptive_rate(TRUSTED_AFTER - 1, TRUSTED_AFTER), 1.0);
        assert_eq!(
            adaptive_rate(TRUSTED_AFTER, TRUSTED_AFTER),
            TRUSTED_RATE_FLOOR
        );
        // An agent that fails often is not trusted, whatever its run of valid results.
        assert_eq!(error_rate(ERROR_RATE_AFTER - 1, ERROR_RATE_AFTER - 1), 0.0);
        assert!((error_rate(20, 3) - 0.15).abs() < 1e-12);
        let report = ReportInput {
            blobs: Vec::new(),
            lease_id: "l".into(),
            task_id: 1,
            attempt: 1,
            python: "3.11".into(),
            backend: "jail".into(),
            stdout_sha256: String::new(),
            signature: None,
            status: Status::Ok,
            reason: None,
            output: None,
            output_blob: None,
            output_sha256: None,
            report_json: "{}".into(),
            stdout_blob: None,
            stderr_blob: None,
            wall_ms: 1,
            cpu_ms: 1,
            peak_memory: 1,
            bytes_out: 0,
            audit: serde_json::Value::Null,
        };
        let key = ("3.11".to_string(), "jail".to_string());
        let flaky = ReporterTrust {
            quarantined: false,
            own: false,
            trusted_after: TRUSTED_AFTER,
            consecutive: [(key.clone(), (1000, 0.2))].into_iter().collect(),
        };
        assert_eq!(
            flaky.check_reason(None, &report),
            Some("the agent's error rate is high")
        );
        let quarantined = ReporterTrust {
            quarantined: true,
            own: true,
            trusted_after: TRUSTED_AFTER,
            consecutive: [(key, (1000, 0.0))].into_iter().collect(),
        };
        assert!(
            quarantined.check_reason(None, &report).is_some(),
            "quarantine outranks being the coordinator's own"
        );
        // The coordinator's own agent: trusted from its first result under `adaptive`, still
        // checked when the job asks for every result.
        let own = ReporterTrust {
            quarantined: false,
            own: true,
            trusted_after: TRUSTED_AFTER,
            consecutive: Default::default(),
        };
        assert_eq!(own.check_reason(None, &report), None);
        assert_eq!(
            own.check_reason(Some(r#"{"recheck":"all"}"#), &report),
            Some("recheck = all")
        );
        let none = r#"{"recheck":"none"}"#;
        assert_eq!(flaky.check_reason(Some(none), &report), None);

        // Failures are claims like successes; infrastructure failures and refusals are not.
        let new = ReporterTrust {
            quarantined: false,
            own: false,
            trusted_after: TRUSTED_AFTER,
            consecutive: Default::default(),
        };
        let with = |status| ReportInput {
            status,
            ..report.clone()
        };
        for status in [
            Status::Error,
            Status::Timeout,
            Status::MemoryLimit,
            Status::OutputLimit,
        ] {
            assert_eq!(
                new.check_reason(None, &with(status)),
                Some("the agent is not trusted yet"),
                "{status}"
            );
        }
        for status in [Status::SandboxError, Status::Killed, Status::Refused] {
            assert_eq!(new.check_reason(None, &with(status)), None, "{status}");
        }
        // A violation holds a job: an untrusted agent's is checked whatever the job says; a
        // trusted agent's (here the coordinator's own) is taken on its word.
        assert_eq!(new.check_reason(Some(none), &with(Status::Error)), None);
        for verify in [None, Some(none)] {
            assert_eq!(
                new.check_reason(verify, &with(Status::SandboxViolation)),
                Some("a violation reported by an agent not trusted")
            );
        }
        assert_eq!(
            new.check_reason(
                Some(r#"{"recheck":"all"}"#),
                &with(Status::SandboxViolation)
            ),
            Some("recheck = all")
        );
        assert_eq!(
            own.check_reason(Some(none), &with(Status::SandboxViolation)),
            None
        );
        assert_eq!(
            own.check_reason(None, &with(Status::SandboxViolation)),
            None
        );
        let draws: Vec<f64> = (0..1000).map(|_| draw()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }
}
