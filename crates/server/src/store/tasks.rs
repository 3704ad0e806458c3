//! Tasks (shards): leasing, heartbeats, reports, expiry and retries.
//!
//! Each lease call and each report batch is one transaction with a constant number of
//! statements, whatever the batch size: that is what makes thousands of tasks a second
//! possible on a single SQLite writer.

use std::collections::{BTreeMap, HashMap, HashSet};

use fleetbox_proto::Status;
use fleetbox_proto::api::task_state;
use sqlx::Row;

use super::settle::{self, storable_text};
use super::{DbKind, Doing, Store, StoreError, now_ms, placeholders};

/// One task handed out by [`Store::lease`].
#[derive(Debug, Clone)]
pub struct LeaseGrant {
    pub lease_id: String,
    pub task_id: i64,
    pub job_id: String,
    pub shard_index: u64,
    pub attempt: u32,
    pub input: String,
}

/// A report as the store keeps it (blobs already written by the caller).
#[derive(Debug, Clone)]
pub struct ReportInput {
    pub lease_id: String,
    pub task_id: i64,
    pub status: Status,
    /// Why it failed, for the shard's `last_error`.
    pub reason: Option<String>,
    pub output: Option<String>,
    pub output_blob: Option<String>,
    pub output_sha256: Option<String>,
    /// The report as JSON, large streams moved to blobs.
    pub report_json: String,
    pub stdout_blob: Option<String>,
    pub stderr_blob: Option<String>,
    pub wall_ms: i64,
    pub peak_memory: i64,
    pub bytes_out: i64,
}

/// What happened to one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Stored and applied to its shard.
    Accepted,
    /// Stored as an extra attempt; the shard was settled or re-leased meanwhile.
    Late,
    /// Already stored (the same lease reported twice).
    Duplicate,
    /// No such lease for this agent: dropped.
    Unknown,
}

impl SettleOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            SettleOutcome::Accepted => "accepted",
            SettleOutcome::Late => "late",
            SettleOutcome::Duplicate => "duplicate",
            SettleOutcome::Unknown => "unknown",
        }
    }
}

/// A task put back in the queue (or killed) by expiry.
#[derive(Debug, Clone)]
pub struct Requeued {
    pub task_id: i64,
    pub job_id: String,
    pub dead: bool,
}

/// Retry delay after `attempts` executions: `base * 2^(attempts-1)`, at most a minute.
pub fn backoff_ms(base_ms: u64, attempts: u32) -> i64 {
    let factor = 1u64 << attempts.saturating_sub(1).min(16);
    base_ms.saturating_mul(factor).min(60_000) as i64
}

/// What a report's status means for its shard.
enum Disposition {
    Accept,
    /// The program failed on its own: final.
    Reject,
    /// The infrastructure failed (sandbox error, killed from outside): run it again.
    Retry,
}

fn disposition(status: Status) -> Disposition {
    match status {
        Status::Ok => Disposition::Accept,
        Status::SandboxError | Status::Killed => Disposition::Retry,
        _ => Disposition::Reject,
    }
}

struct TaskState {
    job_id: String,
    lease_id: Option<String>,
    attempts: u32,
    max_attempts: u32,
}

impl Store {
    /// Lease up to `max` ready tasks of `tenant_id` to `agent_id` until `expires`.
    pub async fn lease(
        &self,
        tenant_id: &str,
        agent_id: &str,
        max: u32,
        expires: i64,
        lease_prefix: &str,
    ) -> Result<Vec<LeaseGrant>, StoreError> {
        self.lease_at(tenant_id, agent_id, max, expires, lease_prefix, now_ms())
            .await
    }

    /// [`Store::lease`] as of `now` (tests move the clock).
    pub async fn lease_at(
        &self,
        tenant_id: &str,
        agent_id: &str,
        max: u32,
        expires: i64,
        lease_prefix: &str,
        now: i64,
    ) -> Result<Vec<LeaseGrant>, StoreError> {
        let lock = match self.kind {
            DbKind::Postgres => " FOR UPDATE SKIP LOCKED",
            DbKind::Sqlite => "",
        };
        let sql = format!(
            "UPDATE tasks SET state = 'leased', lease_id = $1 || '.' || CAST(id AS TEXT), agent_id = $2, \
             lease_expires = $3, attempts = attempts + 1, updated_at = $4 \
             WHERE id IN (SELECT id FROM tasks WHERE state = 'queued' AND tenant_id = $5 AND not_before <= $4 \
             ORDER BY priority DESC, id LIMIT $6{lock}) \
             RETURNING id, job_id, shard_index, attempts, input, lease_id"
        );
        let mut tx = self.begin_write().await.doing("leasing tasks")?;
        let rows = sqlx::query(&sql)
            .bind(lease_prefix)
            .bind(agent_id)
            .bind(expires)
            .bind(now)
            .bind(tenant_id)
            .bind(i64::from(max))
            .fetch_all(&mut *tx)
            .await
            .doing("leasing tasks")?;
        let mut grants = Vec::with_capacity(rows.len());
        for r in &rows {
            let d = "reading leased tasks";
            grants.push(LeaseGrant {
                lease_id: r.try_get("lease_id").doing(d)?,
                task_id: r.try_get("id").doing(d)?,
                job_id: r.try_get("job_id").doing(d)?,
                shard_index: r.try_get::<i64, _>("shard_index").doing(d)? as u64,
                attempt: r.try_get::<i64, _>("attempts").doing(d)? as u32,
                input: r.try_get("input").doing(d)?,
            });
        }
        grants.sort_by_key(|g| g.task_id);
        for chunk in grants.chunks(self.rows_per_statement(3)) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let b = 4 + i * 3;
                    format!("(${}, $1, ${}, $2, ${}, $3)", b, b + 1, b + 2)
                })
                .collect();
            let sql = format!(
                "INSERT INTO leases (id, tenant_id, task_id, agent_id, attempt, issued_at) VALUES {}",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(tenant_id).bind(agent_id).bind(now);
            for g in chunk {
                q = q
                    .bind(&g.lease_id)
                    .bind(g.task_id)
                    .bind(i64::from(g.attempt));
            }
            q.execute(&mut *tx).await.doing("recording leases")?;
        }
        // Asking for work is a sign of life: recorded in the same transaction.
        sqlx::query("UPDATE agents SET last_seen = $1, state = 'online' WHERE id = $2")
            .bind(now)
            .bind(agent_id)
            .execute(&mut *tx)
            .await
            .doing("recording an agent's lease call")?;
        tx.commit().await.doing("leasing tasks")?;
        Ok(grants)
    }

    /// Extend `agent_id`'s leases in `running`; returns those it no longer holds.
    pub async fn extend_leases(
        &self,
        agent_id: &str,
        running: &[String],
        expires: i64,
    ) -> Result<Vec<String>, StoreError> {
        if running.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "UPDATE tasks SET lease_expires = $1 WHERE state = 'leased' AND agent_id = $2 AND lease_id IN ({}) \
             RETURNING lease_id",
            placeholders(3, running.len())
        );
        let mut q = sqlx::query(&sql).bind(expires).bind(agent_id);
        for l in running {
            q = q.bind(l);
        }
        let rows = q.fetch_all(&self.write).await.doing("extending leases")?;
        let held: HashSet<String> = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>("lease_id").ok())
            .collect();
        Ok(running
            .iter()
            .filter(|l| !held.contains(*l))
            .cloned()
            .collect())
    }

    /// Leases given back unrun: queued again, the attempt not counted.
    pub async fn return_leases(
        &self,
        agent_id: &str,
        leases: &[String],
    ) -> Result<u64, StoreError> {
        if leases.is_empty() {
            return Ok(0);
        }
        self.requeue_leases(agent_id, leases.to_vec(), true).await
    }

    /// An agent restarted in place: every lease it still holds except `keep` (those whose
    /// reports wait in its outbox) died with its previous run. They are queued at once
    /// (the attempt counts: a shard that crashed its agent must not retry for ever).
    pub async fn return_lost_runs(
        &self,
        agent_id: &str,
        keep: &[String],
    ) -> Result<u64, StoreError> {
        let rows =
            sqlx::query("SELECT lease_id FROM tasks WHERE state = 'leased' AND agent_id = $1")
                .bind(agent_id)
                .fetch_all(&self.write)
                .await
                .doing("finding an agent's leases")?;
        let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
        let mut lost = Vec::new();
        for r in rows {
            let lease: Option<String> = r.try_get("lease_id").doing("finding an agent's leases")?;
            if let Some(l) = lease.filter(|l| !keep.contains(l.as_str())) {
                lost.push(l);
            }
        }
        if lost.is_empty() {
            return Ok(0);
        }
        self.requeue_leases(agent_id, lost, false).await
    }

    /// Queue the tasks `agent_id` holds under `leases` again and close those leases, in one
    /// transaction: a report that still arrives for one settles nothing. `unrun`: the attempt
    /// is not counted.
    async fn requeue_leases(
        &self,
        agent_id: &str,
        leases: Vec<String>,
        unrun: bool,
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let (attempts, why) = if unrun {
            ("attempts - 1", "NULL")
        } else {
            ("attempts", "'its agent restarted while running it'")
        };
        let mut tx = self.begin_write().await.doing("returning leases")?;
        let mut returned = 0;
        for chunk in leases.chunks(self.rows_per_statement(1)) {
            let sql = format!(
                "UPDATE tasks SET state = 'queued', attempts = {attempts}, lease_id = NULL, agent_id = NULL, \
                 lease_expires = NULL, not_before = 0, last_error = COALESCE({why}, last_error), updated_at = $1 \
                 WHERE state = 'leased' AND agent_id = $2 AND lease_id IN ({})",
                placeholders(3, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(now).bind(agent_id);
            for l in chunk {
                q = q.bind(l);
            }
            returned += q
                .execute(&mut *tx)
                .await
                .doing("returning leases")?
                .rows_affected();
            let sql = format!(
                "UPDATE leases SET closed = 1 WHERE agent_id = $1 AND id IN ({})",
                placeholders(2, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(agent_id);
            for l in chunk {
                q = q.bind(l);
            }
            q.execute(&mut *tx).await.doing("closing returned leases")?;
        }
        tx.commit().await.doing("returning leases")?;
        Ok(returned)
    }

    /// Store a batch of reports from `agent_id` and settle their shards. Returns each report's
    /// outcome and the jobs whose last shard just settled.
    pub async fn report(
        &self,
        tenant_id: &str,
        agent_id: &str,
        reports: &[ReportInput],
        backoff_base_ms: u64,
    ) -> Result<(Vec<SettleOutcome>, Vec<String>), StoreError> {
        let mut outcomes = vec![SettleOutcome::Unknown; reports.len()];
        if reports.is_empty() {
            return Ok((outcomes, Vec::new()));
        }
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("storing reports")?;

        // 1. Which leases are real and this agent's.
        let sql = format!(
            "SELECT id, task_id, agent_id, attempt FROM leases WHERE closed = 0 AND id IN ({})",
            placeholders(1, reports.len())
        );
        let mut q = sqlx::query(&sql);
        for r in reports {
            q = q.bind(&r.lease_id);
        }
        let mut leases: HashMap<String, (i64, u32)> = HashMap::new();
        for row in q.fetch_all(&mut *tx).await.doing("checking leases")? {
            let d = "checking leases";
            let owner: String = row.try_get("agent_id").doing(d)?;
            if owner != agent_id {
                continue;
            }
            leases.insert(
                row.try_get("id").doing(d)?,
                (
                    row.try_get("task_id").doing(d)?,
                    row.try_get::<i64, _>("attempt").doing(d)? as u32,
                ),
            );
        }
        let valid: Vec<usize> = (0..reports.len())
            .filter(|&i| {
                leases
                    .get(&reports[i].lease_id)
                    .is_some_and(|(task, _)| *task == reports[i].task_id)
            })
            .collect();
        if valid.is_empty() {
            tx.commit().await.doing("storing reports")?;
            return Ok((outcomes, Vec::new()));
        }

        // 2. The shards they are for.
        let task_ids: Vec<i64> = {
            let set: HashSet<i64> = valid.iter().map(|&i| reports[i].task_id).collect();
            set.into_iter().collect()
        };
        let sql = format!(
            "SELECT id, job_id, lease_id, attempts, max_attempts FROM tasks WHERE id IN ({})",
            placeholders(1, task_ids.len())
        );
        let mut q = sqlx::query(&sql);
        for id in &task_ids {
            q = q.bind(*id);
        }
        let mut tasks: HashMap<i64, TaskState> = HashMap::new();
        for row in q.fetch_all(&mut *tx).await.doing("reading shards")? {
            let d = "reading shards";
            tasks.insert(
                row.try_get("id").doing(d)?,
                TaskState {
                    job_id: row.try_get("job_id").doing(d)?,
                    lease_id: row.try_get("lease_id").doing(d)?,
                    attempts: row.try_get::<i64, _>("attempts").doing(d)? as u32,
                    max_attempts: row.try_get::<i64, _>("max_attempts").doing(d)? as u32,
                },
            );
        }

        let jobs: Vec<String> = tasks.values().map(|t| t.job_id.clone()).collect();
        settle::lock_jobs(&mut tx, self.kind, &jobs).await?;

        // 3. Store every attempt once; a conflict on the lease id means a duplicate.
        let mut inserted: HashMap<String, i64> = HashMap::new();
        let valid_rows: Vec<usize> = valid
            .iter()
            .copied()
            .filter(|i| tasks.contains_key(&reports[*i].task_id))
            .collect();
        for chunk in valid_rows.chunks(self.rows_per_statement(17)) {
            const COLS: usize = 17;
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let b = 2 + i * COLS;
                    format!("($1, {})", placeholders(b, COLS))
                })
                .collect();
            let sql = format!(
                "INSERT INTO attempts (tenant_id, task_id, job_id, lease_id, agent_id, attempt, status, late, \
                 output, output_blob, output_sha256, report, stdout_blob, stderr_blob, wall_ms, peak_memory, \
                 bytes_out, received_at) VALUES {} ON CONFLICT (lease_id) DO NOTHING RETURNING id, lease_id",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(tenant_id);
            for &i in chunk {
                let r = &reports[i];
                let task = &tasks[&r.task_id];
                let late = task.lease_id.as_deref() != Some(r.lease_id.as_str());
                q = q
                    .bind(r.task_id)
                    .bind(&task.job_id)
                    .bind(&r.lease_id)
                    .bind(agent_id)
                    .bind(i64::from(leases[&r.lease_id].1))
                    .bind(r.status.as_str())
                    .bind(i64::from(late))
                    .bind(&r.output)
                    .bind(&r.output_blob)
                    .bind(&r.output_sha256)
                    .bind(&r.report_json)
                    .bind(&r.stdout_blob)
                    .bind(&r.stderr_blob)
                    .bind(r.wall_ms)
                    .bind(r.peak_memory)
                    .bind(r.bytes_out)
                    .bind(now);
            }
            for row in q.fetch_all(&mut *tx).await.doing("storing attempts")? {
                inserted.insert(
                    row.try_get("lease_id").doing("storing attempts")?,
                    row.try_get("id").doing("storing attempts")?,
                );
            }
        }

        // 4. Settle shards, in report order. Each transition is a guarded update whose row
        // count says whether it happened: two transactions racing for one shard (a late and
        // the current report, a report and an expiry, a report and a cancel) cannot both win,
        // and only a transition that happened moves the job's counter.
        let mut chosen_attempts = Vec::new();
        let mut settled_per_job: BTreeMap<String, i64> = BTreeMap::new();
        for &i in &valid_rows {
            let r = &reports[i];
            let Some(&attempt_id) = inserted.get(&r.lease_id) else {
                outcomes[i] = SettleOutcome::Duplicate;
                continue;
            };
            let task = &tasks[&r.task_id];
            // Only labels the outcome; the guards below decide.
            let current = task.lease_id.as_deref() == Some(r.lease_id.as_str());
            let reason = r
                .reason
                .as_deref()
                .map(storable_text)
                .unwrap_or_else(|| r.status.as_str().to_string());
            let outcome = match disposition(r.status) {
                // A late success still settles a shard nobody settled: nothing is run twice
                // for nothing.
                Disposition::Accept => settle::accept(&mut tx, r.task_id, now).await?.then(|| {
                    chosen_attempts.push(attempt_id);
                    current
                }),
                Disposition::Reject => {
                    settle::reject(&mut tx, r.task_id, &r.lease_id, &reason, now)
                        .await?
                        .then_some(true)
                }
                Disposition::Retry => {
                    let dead = task.attempts >= task.max_attempts;
                    let (to, why) = if dead {
                        (
                            task_state::DEAD,
                            format!("{reason} (after {} attempts)", task.attempts),
                        )
                    } else {
                        (task_state::QUEUED, reason)
                    };
                    let at = now + backoff_ms(backoff_base_ms, task.attempts);
                    let done =
                        settle::release(&mut tx, r.task_id, &r.lease_id, to, at, &why, now).await?;
                    // A retried shard is not settled: its job keeps counting it.
                    if done && !dead {
                        outcomes[i] = SettleOutcome::Accepted;
                        continue;
                    }
                    done.then_some(true)
                }
            };
            outcomes[i] = match outcome {
                Some(current) => {
                    *settled_per_job.entry(task.job_id.clone()).or_default() += 1;
                    if current {
                        SettleOutcome::Accepted
                    } else {
                        SettleOutcome::Late
                    }
                }
                None => SettleOutcome::Late,
            };
        }
        for chunk in chosen_attempts.chunks(self.rows_per_statement(1)) {
            let sql = format!(
                "UPDATE attempts SET chosen = 1 WHERE id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut *tx).await.doing("choosing attempts")?;
        }
        let ready = settle_jobs(&mut tx, &settled_per_job).await?;
        tx.commit().await.doing("storing reports")?;
        Ok((outcomes, ready))
    }

    /// Requeue (or kill, past `max_attempts`) the tasks whose lease expired or whose agent was
    /// lost. Returns what changed and the jobs whose last shard just settled.
    pub async fn expire_leases(
        &self,
        now: i64,
        lost_agents: &[String],
        backoff_base_ms: u64,
    ) -> Result<(Vec<Requeued>, Vec<String>), StoreError> {
        let mut tx = self.begin_write().await.doing("expiring leases")?;
        let sql = if lost_agents.is_empty() {
            "SELECT id, job_id, attempts, max_attempts, lease_id, agent_id FROM tasks \
             WHERE state = 'leased' AND lease_expires < $1"
                .to_string()
        } else {
            format!(
                "SELECT id, job_id, attempts, max_attempts, lease_id, agent_id FROM tasks \
                 WHERE state = 'leased' AND (lease_expires < $1 OR agent_id IN ({}))",
                placeholders(2, lost_agents.len())
            )
        };
        let mut q = sqlx::query(&sql).bind(now);
        for a in lost_agents {
            q = q.bind(a);
        }
        let rows = q
            .fetch_all(&mut *tx)
            .await
            .doing("finding expired leases")?;
        struct Expired {
            id: i64,
            job_id: String,
            attempts: u32,
            max: u32,
            lease: String,
            agent: String,
        }
        let mut expired = Vec::with_capacity(rows.len());
        for row in rows {
            let d = "reading expired leases";
            let lease: Option<String> = row.try_get("lease_id").doing(d)?;
            let agent: Option<String> = row.try_get("agent_id").doing(d)?;
            expired.push(Expired {
                id: row.try_get("id").doing(d)?,
                job_id: row.try_get("job_id").doing(d)?,
                attempts: row.try_get::<i64, _>("attempts").doing(d)? as u32,
                max: row.try_get::<i64, _>("max_attempts").doing(d)? as u32,
                lease: lease.unwrap_or_default(),
                agent: agent.unwrap_or_default(),
            });
        }
        let jobs: Vec<String> = expired.iter().map(|e| e.job_id.clone()).collect();
        settle::lock_jobs(&mut tx, self.kind, &jobs).await?;
        let mut changed = Vec::new();
        let mut settled: BTreeMap<String, i64> = BTreeMap::new();
        for e in expired {
            let why = if lost_agents.contains(&e.agent) {
                format!("agent `{}` stopped heartbeating", e.agent)
            } else {
                format!("lease on agent `{}` expired", e.agent)
            };
            let dead = e.attempts >= e.max;
            let (to, reason) = if dead {
                (
                    task_state::DEAD,
                    format!("{why} (after {} attempts)", e.attempts),
                )
            } else {
                (task_state::QUEUED, why)
            };
            let at = now + backoff_ms(backoff_base_ms, e.attempts);
            // A report (or another coordinator's sweep) may have settled it since the read.
            if settle::release(&mut tx, e.id, &e.lease, to, at, &reason, now).await? {
                if dead {
                    *settled.entry(e.job_id.clone()).or_default() += 1;
                }
                changed.push(Requeued {
                    task_id: e.id,
                    job_id: e.job_id,
                    dead,
                });
            }
        }
        let ready = settle_jobs(&mut tx, &settled).await?;
        tx.commit().await.doing("expiring leases")?;
        Ok((changed, ready))
    }
}

/// Count settled shards against their jobs; returns the jobs with none left.
async fn settle_jobs(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    settled: &BTreeMap<String, i64>,
) -> Result<Vec<String>, StoreError> {
    let mut ready = Vec::new();
    for (job, n) in settled {
        let row = sqlx::query(
            "UPDATE jobs SET unsettled = unsettled - $1 WHERE id = $2 AND state = 'running' RETURNING unsettled",
        )
        .bind(*n)
        .bind(job)
        .fetch_optional(&mut **tx)
        .await
        .doing("counting settled shards")?;
        if let Some(row) = row
            && row
                .try_get::<i64, _>("unsettled")
                .doing("counting settled shards")?
                <= 0
        {
            ready.push(job.clone());
        }
    }
    Ok(ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_ms(500, 1), 500);
        assert_eq!(backoff_ms(500, 2), 1000);
        assert_eq!(backoff_ms(500, 3), 2000);
        assert_eq!(backoff_ms(500, 40), 60_000);
    }
}

#[cfg(test)]
mod store_tests {
    use fleetbox_proto::{Limits, Reducer};

    use super::*;
    use crate::store::{NewJob, ShardPage};

    async fn store_with_job(max_attempts: u32) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Store::sqlite_url(dir.path())).await.unwrap();
        store
            .insert_job(&NewJob {
                id: "job_t".into(),
                tenant_id: "default".into(),
                name: "t".into(),
                spec: serde_json::json!({}),
                code: "pass".into(),
                code_sha256: "x".into(),
                limits: Limits::default(),
                reducer: Reducer::Collect,
                priority: 0,
                max_attempts,
                inputs: vec![serde_json::json!(1), serde_json::json!(2)],
            })
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn expired_leases_are_requeued_then_dead_after_max_attempts() {
        let (_dir, store) = store_with_job(2).await;
        let now = now_ms();
        let first = store
            .lease("default", "agt_a", 10, now + 50, "p1")
            .await
            .unwrap();
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|g| g.attempt == 1));

        // Past the expiry: both go back to the queue, after a back-off.
        let (changed, ready) = store.expire_leases(now + 100, &[], 1000).await.unwrap();
        assert_eq!(changed.len(), 2);
        assert!(changed.iter().all(|c| !c.dead));
        assert!(ready.is_empty());
        // Not before the back-off has passed.
        assert!(
            store
                .lease("default", "agt_b", 10, now + 10_000, "p2")
                .await
                .unwrap()
                .is_empty()
        );
        let shards = store
            .shards(
                "default",
                "job_t",
                &ShardPage {
                    from: 0,
                    limit: 10,
                    state: None,
                },
            )
            .await
            .unwrap();
        assert!(
            shards
                .iter()
                .all(|s| s.state == "queued" && s.attempts == 1)
        );
        assert!(
            shards[0]
                .error
                .as_deref()
                .unwrap()
                .contains("lease on agent `agt_a` expired")
        );

        // Second attempt (the back-off has passed by then), lost again: out of attempts.
        let later = now + 5_000;
        let second = store
            .lease_at("default", "agt_b", 10, later + 50, "p3", later)
            .await
            .unwrap();
        assert_eq!(second.len(), 2);
        assert!(second.iter().all(|g| g.attempt == 2));
        let (changed, ready) = store.expire_leases(later + 100, &[], 1000).await.unwrap();
        assert!(changed.iter().all(|c| c.dead));
        assert_eq!(
            ready,
            vec!["job_t".to_string()],
            "the last shard settling makes the job ready"
        );

        // A report for the first, long-expired lease is kept but changes nothing.
        let report = ReportInput {
            lease_id: first[0].lease_id.clone(),
            task_id: first[0].task_id,
            status: Status::Ok,
            reason: None,
            output: Some("1".into()),
            output_blob: None,
            output_sha256: None,
            report_json: "{}".into(),
            stdout_blob: None,
            stderr_blob: None,
            wall_ms: 1,
            peak_memory: 1,
            bytes_out: 0,
        };
        let (outcomes, ready) = store
            .report("default", "agt_a", &[report], 1000)
            .await
            .unwrap();
        assert_eq!(outcomes, vec![SettleOutcome::Late]);
        assert!(ready.is_empty());
    }

    #[tokio::test]
    async fn lost_agents_lose_their_leases_at_once() {
        let (_dir, store) = store_with_job(3).await;
        let now = now_ms();
        store
            .lease("default", "agt_a", 1, now + 60_000, "p1")
            .await
            .unwrap();
        store
            .lease("default", "agt_b", 1, now + 60_000, "p2")
            .await
            .unwrap();
        let (changed, _) = store
            .expire_leases(now, &["agt_a".to_string()], 0)
            .await
            .unwrap();
        assert_eq!(changed.len(), 1, "only the lost agent's lease returns");
        let shards = store
            .shards(
                "default",
                "job_t",
                &ShardPage {
                    from: 0,
                    limit: 10,
                    state: Some("leased".into()),
                },
            )
            .await
            .unwrap();
        assert_eq!(shards.len(), 1);
        assert_eq!(shards[0].agent_id.as_deref(), Some("agt_b"));
    }
}
