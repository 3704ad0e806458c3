//! Jobs: submission (job + its tasks), views, results, cancellation.

use std::collections::HashMap;

use fleetbox_proto::api::{
    AttemptView, JobResult, JobSummary, JobView, ShardCounts, ShardDetail, ShardView, job_state,
    task_state,
};
use fleetbox_proto::{Limits, Reducer};
use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::agents::{json, parse};
use super::{Doing, Store, StoreError, now_ms, placeholders, settle};

/// A validated job ready to store.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub spec: Value,
    pub code: String,
    pub code_sha256: String,
    pub limits: Limits,
    pub reducer: Reducer,
    pub priority: i32,
    pub max_attempts: u32,
    pub inputs: Vec<Value>,
}

/// Which shards to list: from an index, at most `limit`, optionally one state.
#[derive(Debug, Clone)]
pub struct ShardPage {
    pub from: u64,
    pub limit: u32,
    pub state: Option<String>,
}

/// What the scheduler and aggregator need of a job.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub tenant_id: String,
    pub state: String,
    pub code: String,
    pub code_sha256: String,
    pub limits: Limits,
    pub reducer: Reducer,
    pub shard_count: u64,
    pub created_at: i64,
}

/// One accepted shard value with its run facts, for aggregation.
#[derive(Debug, Clone)]
pub struct AcceptedValue {
    pub shard_index: u64,
    pub output: Option<String>,
    pub output_blob: Option<String>,
}

/// Attempt facts for the job summary.
#[derive(Debug, Clone, Default)]
pub struct AttemptFacts {
    pub attempts: u64,
    pub bytes_out: u64,
    pub chosen_wall_ms: Vec<f64>,
    pub chosen_peak_memory: Vec<f64>,
}

impl Store {
    /// Store a job and all its tasks in one transaction.
    pub async fn insert_job(&self, job: &NewJob) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("submitting a job")?;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, name, state, spec, code, code_sha256, limits, reducer, \
             priority, max_attempts, shard_count, unsettled, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13)",
        )
        .bind(&job.id)
        .bind(&job.tenant_id)
        .bind(&job.name)
        .bind(job_state::RUNNING)
        .bind(json(&job.spec))
        .bind(&job.code)
        .bind(&job.code_sha256)
        .bind(json(&job.limits))
        .bind(json(&job.reducer))
        .bind(i64::from(job.priority))
        .bind(i64::from(job.max_attempts))
        .bind(job.inputs.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await
        .doing("inserting a job")?;
        let rows = self.rows_per_statement(2);
        for (chunk_no, chunk) in job.inputs.chunks(rows).enumerate() {
            let mut sql = String::from(
                "INSERT INTO tasks (tenant_id, job_id, shard_index, state, priority, input, max_attempts, updated_at) VALUES ",
            );
            // Constant columns are bound once; each row adds its index and input.
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let base = 7 + i * 2;
                    format!("($1, $2, ${}, $3, $4, ${}, $5, $6)", base, base + 1)
                })
                .collect();
            sql.push_str(&values.join(", "));
            let mut q = sqlx::query(&sql)
                .bind(&job.tenant_id)
                .bind(&job.id)
                .bind(task_state::QUEUED)
                .bind(i64::from(job.priority))
                .bind(i64::from(job.max_attempts))
                .bind(now);
            for (i, input) in chunk.iter().enumerate() {
                q = q.bind((chunk_no * rows + i) as i64).bind(json(input));
            }
            q.execute(&mut *tx).await.doing("inserting tasks")?;
        }
        tx.commit().await.doing("submitting a job")?;
        Ok(())
    }

    pub async fn job(&self, tenant_id: &str, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, state, code, code_sha256, limits, reducer, shard_count, created_at \
             FROM jobs WHERE id = $1 AND tenant_id = $2",
        )
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&self.read)
        .await
        .doing("reading a job")?;
        row.map(|r| job_row(&r)).transpose()
    }

    /// A job by id alone (internal: the aggregator and the lease path).
    pub async fn job_any_tenant(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, state, code, code_sha256, limits, reducer, shard_count, created_at \
             FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.read)
        .await
        .doing("reading a job")?;
        row.map(|r| job_row(&r)).transpose()
    }

    pub async fn job_view(&self, tenant_id: &str, id: &str) -> Result<Option<JobView>, StoreError> {
        let row = sqlx::query(&format!(
            "{JOB_VIEW_SELECT} WHERE id = $1 AND tenant_id = $2"
        ))
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&self.read)
        .await
        .doing("reading a job")?;
        let Some(row) = row else { return Ok(None) };
        let mut view = job_view(&row)?;
        let counts = self.shard_counts(std::slice::from_ref(&view.id)).await?;
        view.shards = counts.get(&view.id).cloned().unwrap_or_default();
        Ok(Some(view))
    }

    pub async fn list_jobs(
        &self,
        tenant_id: &str,
        state: Option<&str>,
        limit: u32,
    ) -> Result<Vec<JobView>, StoreError> {
        let with_state = format!(
            "{JOB_VIEW_SELECT} WHERE tenant_id = $1 AND state = $2 ORDER BY created_at DESC, id LIMIT $3"
        );
        let all =
            format!("{JOB_VIEW_SELECT} WHERE tenant_id = $1 ORDER BY created_at DESC, id LIMIT $2");
        let rows = match state {
            Some(state) => sqlx::query(&with_state)
                .bind(tenant_id)
                .bind(state)
                .bind(i64::from(limit)),
            None => sqlx::query(&all).bind(tenant_id).bind(i64::from(limit)),
        }
        .fetch_all(&self.read)
        .await
        .doing("listing jobs")?;
        let mut views: Vec<JobView> = rows.iter().map(job_view).collect::<Result<_, _>>()?;
        let ids: Vec<String> = views.iter().map(|v| v.id.clone()).collect();
        let counts = self.shard_counts(&ids).await?;
        for view in &mut views {
            view.shards = counts.get(&view.id).cloned().unwrap_or_default();
        }
        Ok(views)
    }

    async fn shard_counts(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, ShardCounts>, StoreError> {
        let mut out: HashMap<String, ShardCounts> = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let sql = format!(
            "SELECT job_id, state, COUNT(*) AS n FROM tasks WHERE job_id IN ({}) GROUP BY job_id, state",
            placeholders(1, ids.len())
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(id);
        }
        for row in q.fetch_all(&self.read).await.doing("counting shards")? {
            let job: String = row.try_get("job_id").doing("counting shards")?;
            let state: String = row.try_get("state").doing("counting shards")?;
            let n = row.try_get::<i64, _>("n").doing("counting shards")? as u64;
            let c = out.entry(job).or_default();
            c.total += n;
            match state.as_str() {
                task_state::QUEUED => c.queued += n,
                task_state::LEASED | task_state::REPORTED => c.leased += n,
                task_state::ACCEPTED => c.accepted += n,
                task_state::REJECTED => c.rejected += n,
                _ => c.dead += n,
            }
        }
        Ok(out)
    }

    pub async fn job_result(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<(JobResult, Option<String>)>, StoreError> {
        let row = sqlx::query(
            "SELECT id, state, result, result_blob, summary, error FROM jobs WHERE id = $1 AND tenant_id = $2",
        )
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&self.read)
        .await
        .doing("reading a job result")?;
        let Some(row) = row else { return Ok(None) };
        let result: Option<String> = row.try_get("result").doing("reading a job result")?;
        let summary: Option<String> = row.try_get("summary").doing("reading a job result")?;
        let blob: Option<String> = row.try_get("result_blob").doing("reading a job result")?;
        let view = JobResult {
            id: row.try_get("id").doing("reading a job result")?,
            state: row.try_get("state").doing("reading a job result")?,
            result: result.map(|r| parse(&r, "job result")).transpose()?,
            summary: summary
                .map(|s| parse::<JobSummary>(&s, "job summary"))
                .transpose()?,
            error: row.try_get("error").doing("reading a job result")?,
        };
        Ok(Some((view, blob)))
    }

    /// A page of a job's shards in index order, optionally only those in `state`.
    pub async fn shards(
        &self,
        tenant_id: &str,
        job_id: &str,
        page: &ShardPage,
    ) -> Result<Vec<ShardView>, StoreError> {
        // The settling attempt if there is one, else the latest.
        let mut sql = String::from(
            "SELECT t.shard_index, t.state, t.attempts, t.agent_id, t.last_error, \
             a.status, a.wall_ms, a.output, a.agent_id AS a_agent \
             FROM tasks t LEFT JOIN attempts a ON a.id = ( \
               SELECT a2.id FROM attempts a2 WHERE a2.task_id = t.id ORDER BY a2.chosen DESC, a2.id DESC LIMIT 1) \
             WHERE t.job_id = $1 AND t.tenant_id = $2 AND t.shard_index >= $3",
        );
        if page.state.is_some() {
            sql.push_str(" AND t.state = $5");
        }
        sql.push_str(" ORDER BY t.shard_index LIMIT $4");
        let mut q = sqlx::query(&sql)
            .bind(job_id)
            .bind(tenant_id)
            .bind(page.from as i64)
            .bind(i64::from(page.limit));
        if let Some(state) = &page.state {
            q = q.bind(state);
        }
        let rows = q.fetch_all(&self.read).await.doing("listing shards")?;
        rows.iter()
            .map(|r| {
                let d = "listing shards";
                let output: Option<String> = r.try_get("output").doing(d)?;
                let agent: Option<String> = r.try_get("a_agent").doing(d)?;
                let task_agent: Option<String> = r.try_get("agent_id").doing(d)?;
                Ok(ShardView {
                    index: r.try_get::<i64, _>("shard_index").doing(d)? as u64,
                    state: r.try_get("state").doing(d)?,
                    attempts: r.try_get::<i64, _>("attempts").doing(d)? as u32,
                    agent_id: agent.or(task_agent),
                    status: r.try_get("status").doing(d)?,
                    wall_ms: r
                        .try_get::<Option<i64>, _>("wall_ms")
                        .doing(d)?
                        .map(|v| v as u64),
                    output: output.map(|o| parse(&o, "shard output")).transpose()?,
                    error: r.try_get("last_error").doing(d)?,
                })
            })
            .collect()
    }

    /// One shard with its input and every execution of it, oldest first.
    pub async fn shard_detail(
        &self,
        tenant_id: &str,
        job_id: &str,
        index: u64,
    ) -> Result<Option<ShardDetail>, StoreError> {
        let page = ShardPage {
            from: index,
            limit: 1,
            state: None,
        };
        let Some(shard) = self
            .shards(tenant_id, job_id, &page)
            .await?
            .into_iter()
            .find(|s| s.index == index)
        else {
            return Ok(None);
        };
        let d = "reading a shard";
        let task =
            sqlx::query("SELECT id, input FROM tasks WHERE job_id = $1 AND shard_index = $2")
                .bind(job_id)
                .bind(index as i64)
                .fetch_one(&self.read)
                .await
                .doing(d)?;
        let task_id: i64 = task.try_get("id").doing(d)?;
        let input: String = task.try_get("input").doing(d)?;
        let rows = sqlx::query(
            "SELECT lease_id, agent_id, attempt, status, verdict, chosen, late, received_at, report, \
             output, output_sha256, stdout_blob, stderr_blob FROM attempts WHERE task_id = $1 ORDER BY id",
        )
        .bind(task_id)
        .fetch_all(&self.read)
        .await
        .doing(d)?;
        let mut attempts = Vec::with_capacity(rows.len());
        for r in rows {
            let report: String = r.try_get("report").doing(d)?;
            let mut report: Value = parse(&report, "attempt report")?;
            let output: Option<String> = r.try_get("output").doing(d)?;
            if let (Some(o), Some(obj)) = (output, report.as_object_mut()) {
                obj.insert("output".into(), parse(&o, "attempt output")?);
            }
            attempts.push(AttemptView {
                lease_id: r.try_get("lease_id").doing(d)?,
                agent_id: r.try_get("agent_id").doing(d)?,
                attempt: r.try_get::<i64, _>("attempt").doing(d)? as u32,
                status: r.try_get("status").doing(d)?,
                verdict: r.try_get("verdict").doing(d)?,
                chosen: r.try_get::<i64, _>("chosen").doing(d)? == 1,
                late: r.try_get::<i64, _>("late").doing(d)? == 1,
                received_at: r.try_get("received_at").doing(d)?,
                output_sha256: r.try_get("output_sha256").doing(d)?,
                report,
                stdout_blob: r.try_get("stdout_blob").doing(d)?,
                stderr_blob: r.try_get("stderr_blob").doing(d)?,
            });
        }
        Ok(Some(ShardDetail {
            shard,
            input: parse(&input, "shard input")?,
            attempts,
        }))
    }

    /// Cancel a job: unsettled shards become `dead`. Returns false when it was already final.
    pub async fn cancel_job(&self, tenant_id: &str, id: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("cancelling a job")?;
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, error = $2, finished_at = $3, unsettled = 0 \
             WHERE id = $4 AND tenant_id = $5 AND state NOT IN ('completed', 'failed', 'cancelled') RETURNING id",
        )
        .bind(job_state::CANCELLED)
        .bind("cancelled by request")
        .bind(now)
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&mut *tx)
        .await
        .doing("cancelling a job")?;
        if done.is_none() {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE tasks SET state = $1, last_error = $2, lease_id = NULL, lease_expires = NULL, updated_at = $3 \
             WHERE job_id = $4 AND state IN ('queued', 'leased', 'reported')",
        )
        .bind(task_state::DEAD)
        .bind("job cancelled")
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .doing("cancelling a job's shards")?;
        tx.commit().await.doing("cancelling a job")?;
        Ok(true)
    }

    /// Jobs whose fold can be claimed now: settled `running` jobs, and `aggregating` jobs whose
    /// fold lease ran out (its coordinator died) or whose failed fold's back-off has passed.
    pub async fn jobs_to_aggregate(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE (state = $1 AND unsettled <= 0) \
             OR (state = $2 AND fold_expires < $3 AND fold_after <= $3)",
        )
        .bind(job_state::RUNNING)
        .bind(job_state::AGGREGATING)
        .bind(now)
        .fetch_all(&self.read)
        .await
        .doing("finding jobs to aggregate")?;
        rows.iter()
            .map(|r| {
                r.try_get::<String, _>("id")
                    .doing("finding jobs to aggregate")
            })
            .collect()
    }

    /// Claim a job's fold for `owner` until `expires`: a settled `running` job, or an
    /// `aggregating` one whose fold lease ran out. Returns the try number (1 for the first),
    /// or `None` when the job is not claimable (another coordinator holds it, or it is done).
    pub async fn claim_fold(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        expires: i64,
    ) -> Result<Option<u32>, StoreError> {
        let row = sqlx::query(
            "UPDATE jobs SET state = $1, fold_owner = $2, fold_expires = $3, fold_tries = fold_tries + 1 \
             WHERE id = $4 AND ((state = $5 AND unsettled <= 0) \
             OR (state = $1 AND fold_expires < $6 AND fold_after <= $6)) RETURNING fold_tries",
        )
        .bind(job_state::AGGREGATING)
        .bind(owner)
        .bind(expires)
        .bind(id)
        .bind(job_state::RUNNING)
        .bind(now)
        .fetch_optional(&self.write)
        .await
        .doing("claiming a fold")?;
        row.map(|r| {
            r.try_get::<i64, _>("fold_tries")
                .doing("claiming a fold")
                .map(|n| n as u32)
        })
        .transpose()
    }

    /// Extend `owner`'s fold lease; false when it lost it.
    pub async fn renew_fold(
        &self,
        id: &str,
        owner: &str,
        expires: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET fold_expires = $1 WHERE id = $2 AND state = $3 AND fold_owner = $4",
        )
        .bind(expires)
        .bind(id)
        .bind(job_state::AGGREGATING)
        .bind(owner)
        .execute(&self.write)
        .await
        .doing("renewing a fold")?;
        Ok(done.rows_affected() == 1)
    }

    /// Give a failed fold back, to be claimed again from `after` (by any coordinator).
    pub async fn release_fold(
        &self,
        id: &str,
        owner: &str,
        after: i64,
        error: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET fold_owner = NULL, fold_expires = 0, fold_after = $1, error = $2 \
             WHERE id = $3 AND state = $4 AND fold_owner = $5",
        )
        .bind(after)
        .bind(settle::storable_text(error))
        .bind(id)
        .bind(job_state::AGGREGATING)
        .bind(owner)
        .execute(&self.write)
        .await
        .doing("releasing a fold")?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn accepted_values(&self, job_id: &str) -> Result<Vec<AcceptedValue>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.shard_index, a.output, a.output_blob FROM attempts a JOIN tasks t ON t.id = a.task_id \
             WHERE a.job_id = $1 AND a.chosen = 1 AND t.state = 'accepted' ORDER BY t.shard_index",
        )
        .bind(job_id)
        .fetch_all(&self.read)
        .await
        .doing("reading shard values")?;
        rows.iter()
            .map(|r| {
                let d = "reading shard values";
                Ok(AcceptedValue {
                    shard_index: r.try_get::<i64, _>("shard_index").doing(d)? as u64,
                    output: r.try_get("output").doing(d)?,
                    output_blob: r.try_get("output_blob").doing(d)?,
                })
            })
            .collect()
    }

    pub async fn attempt_facts(&self, job_id: &str) -> Result<AttemptFacts, StoreError> {
        let rows = sqlx::query(
            "SELECT chosen, wall_ms, peak_memory, bytes_out FROM attempts WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_all(&self.read)
        .await
        .doing("reading attempt facts")?;
        let mut facts = AttemptFacts::default();
        for r in rows {
            let d = "reading attempt facts";
            facts.attempts += 1;
            facts.bytes_out += r.try_get::<i64, _>("bytes_out").doing(d)? as u64;
            if r.try_get::<i64, _>("chosen").doing(d)? == 1 {
                facts
                    .chosen_wall_ms
                    .push(r.try_get::<i64, _>("wall_ms").doing(d)? as f64);
                facts
                    .chosen_peak_memory
                    .push(r.try_get::<i64, _>("peak_memory").doing(d)? as f64);
            }
        }
        Ok(facts)
    }

    /// The first few failure reasons of a job's unsuccessful shards.
    pub async fn failure_reasons(
        &self,
        job_id: &str,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT shard_index, last_error FROM tasks WHERE job_id = $1 AND state IN ('rejected', 'dead') \
             ORDER BY shard_index LIMIT $2",
        )
        .bind(job_id)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .doing("reading failures")?;
        rows.iter()
            .map(|r| {
                let d = "reading failures";
                let err: Option<String> = r.try_get("last_error").doing(d)?;
                Ok((
                    r.try_get::<i64, _>("shard_index").doing(d)? as u64,
                    err.unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Store the aggregation's outcome and settle the job, if `owner` still holds its fold.
    /// The result is inline JSON in `result`, or the hash of a blob holding it in
    /// `result_blob`: never a marker inside the value.
    pub async fn finish_job(
        &self,
        id: &str,
        owner: &str,
        outcome: &FoldOutcome<'_>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, result = $2, result_blob = $3, summary = $4, error = $5, \
             finished_at = $6, fold_owner = NULL WHERE id = $7 AND state = $8 AND fold_owner = $9",
        )
        .bind(outcome.state)
        .bind(outcome.result)
        .bind(outcome.result_blob)
        .bind(json(outcome.summary))
        .bind(outcome.error.map(settle::storable_text))
        .bind(now_ms())
        .bind(id)
        .bind(job_state::AGGREGATING)
        .bind(owner)
        .execute(&self.write)
        .await
        .doing("storing a job result")?;
        Ok(done.rows_affected() == 1)
    }
}

/// What a fold ends with, for [`Store::finish_job`].
#[derive(Debug)]
pub struct FoldOutcome<'a> {
    pub state: &'a str,
    /// The result as JSON text, when small enough to keep in the row.
    pub result: Option<&'a str>,
    /// The blob holding the result's JSON, when it is not in the row.
    pub result_blob: Option<&'a str>,
    pub summary: &'a JobSummary,
    pub error: Option<&'a str>,
}

const JOB_VIEW_SELECT: &str = "SELECT id, tenant_id, name, state, priority, max_attempts, reducer, \
     code_sha256, created_at, finished_at, error FROM jobs";

fn job_view(row: &AnyRow) -> Result<JobView, StoreError> {
    let d = "reading a job";
    let reducer: String = row.try_get("reducer").doing(d)?;
    let reducer: Reducer = parse(&reducer, "job reducer")?;
    Ok(JobView {
        id: row.try_get("id").doing(d)?,
        tenant_id: row.try_get("tenant_id").doing(d)?,
        name: row.try_get("name").doing(d)?,
        state: row.try_get("state").doing(d)?,
        priority: row.try_get::<i64, _>("priority").doing(d)? as i32,
        max_attempts: row.try_get::<i64, _>("max_attempts").doing(d)? as u32,
        reducer: reducer.name().to_string(),
        code_sha256: row.try_get("code_sha256").doing(d)?,
        shards: ShardCounts::default(),
        created_at: row.try_get("created_at").doing(d)?,
        finished_at: row.try_get("finished_at").doing(d)?,
        error: row.try_get("error").doing(d)?,
    })
}

fn job_row(row: &AnyRow) -> Result<JobRow, StoreError> {
    let d = "reading a job";
    let limits: String = row.try_get("limits").doing(d)?;
    let reducer: String = row.try_get("reducer").doing(d)?;
    Ok(JobRow {
        id: row.try_get("id").doing(d)?,
        tenant_id: row.try_get("tenant_id").doing(d)?,
        state: row.try_get("state").doing(d)?,
        code: row.try_get("code").doing(d)?,
        code_sha256: row.try_get("code_sha256").doing(d)?,
        limits: parse(&limits, "job limits")?,
        reducer: parse(&reducer, "job reducer")?,
        shard_count: row.try_get::<i64, _>("shard_count").doing(d)? as u64,
        created_at: row.try_get("created_at").doing(d)?,
    })
}
