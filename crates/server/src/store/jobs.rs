//! Jobs: submission (job + its tasks), views, results, cancellation, folds.

use std::collections::BTreeMap;

use fleetbox_proto::api::{
    AttemptView, JobResult, JobSummary, JobView, ShardCounts, ShardDetail, ShardView,
};
use fleetbox_proto::{
    EnvironmentSpec, JobState, Limits, Lineage, Reducer, RerunOf, Status, TaskState, Verdict,
};
use serde_json::Value;

use super::agents::{json, parse};
use super::audit::{Action, Entry};
use super::settle::{self, Tally};
use super::sql::Sql;
use super::{Doing, Store, StoreError, now_ms};

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
    /// The share of shards that must succeed for it to complete ([`JobSpec::success_needed`]).
    pub success_needed: f64,
    pub inputs: Vec<Value>,
    /// Who submitted it, for the audit log (`admin:<token id>`).
    pub actor: String,
    pub verify: fleetbox_proto::VerifySpec,
    pub environment: Option<EnvironmentSpec>,
    /// Attached files (name → base64).
    pub files: BTreeMap<String, String>,
    /// The backend its shards must run in.
    pub backend: Option<String>,
    /// The pool its shards must run in (`None`: any its tenant may use).
    pub pool: Option<String>,
    /// What the code review found (recorded with the submission).
    pub review: Option<fleetbox_proto::CodeReview>,
    /// Whether it has follow-up rules (the planner evaluates them once it is final).
    pub has_rules: bool,
    /// Where a follow-up job came from, and the rule that made it.
    pub lineage: Option<(Lineage, String)>,
    /// A `rerun_failed` child: the parent's shards it runs again.
    pub rerun_of: Option<RerunOf>,
    /// The W3C trace context it belongs to (its trace id names it in spans, logs and audit
    /// entries).
    pub traceparent: Option<String>,
    /// A call in a session: its shard goes only to agents that keep sessions, and to the
    /// session's agent once it has one.
    pub session: Option<JobSession>,
}

/// A session call's job: the session as the agent is told of it, and the agent holding it.
#[derive(Debug, Clone)]
pub struct JobSession {
    pub leased: fleetbox_proto::api::LeasedSession,
    pub only_agent: Option<String>,
}

/// Which shards to list: from an index, at most `limit`, optionally one state.
#[derive(Debug, Clone)]
pub struct ShardPage {
    pub from: u64,
    pub limit: u32,
    pub state: Option<TaskState>,
}

/// What the scheduler and aggregator need of a job.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub tenant_id: String,
    pub state: JobState,
    pub code: String,
    pub code_sha256: String,
    pub limits: Limits,
    pub reducer: Reducer,
    pub shard_count: u64,
    pub created_at: i64,
    pub environment: Option<EnvironmentSpec>,
    pub files: BTreeMap<String, String>,
    /// A `rerun_failed` child: the parent's shards it runs again.
    pub rerun_of: Option<RerunOf>,
    /// `[verify]`, defaults filled in.
    pub verify: fleetbox_proto::VerifySpec,
    /// The W3C trace context it belongs to.
    pub traceparent: Option<String>,
    /// The share of shards that must succeed for it to complete.
    pub success_needed: f64,
    /// A session call's session.
    pub session: Option<fleetbox_proto::api::LeasedSession>,
}

/// [`JobRow`] as stored (JSON columns as text).
#[derive(sqlx::FromRow)]
struct JobRecord {
    id: String,
    tenant_id: String,
    #[sqlx(try_from = "String")]
    state: JobState,
    code: String,
    code_sha256: String,
    limits: String,
    reducer: String,
    #[sqlx(try_from = "i64")]
    shard_count: u64,
    created_at: i64,
    environment: Option<String>,
    files: Option<String>,
    rerun_of: Option<String>,
    verify: Option<String>,
    traceparent: Option<String>,
    success_needed: f64,
    session: Option<String>,
}

impl JobRecord {
    fn decode(self) -> Result<JobRow, StoreError> {
        Ok(JobRow {
            id: self.id,
            tenant_id: self.tenant_id,
            state: self.state,
            code: self.code,
            code_sha256: self.code_sha256,
            limits: parse(&self.limits, "job limits")?,
            reducer: parse(&self.reducer, "job reducer")?,
            shard_count: self.shard_count,
            created_at: self.created_at,
            environment: self
                .environment
                .as_deref()
                .map(|e| parse(e, "job environment"))
                .transpose()?,
            files: self
                .files
                .as_deref()
                .map(|f| parse(f, "job files"))
                .transpose()?
                .unwrap_or_default(),
            rerun_of: self
                .rerun_of
                .as_deref()
                .map(|r| parse(r, "job rerun_of"))
                .transpose()?,
            verify: super::verify::policy(self.verify.as_deref()),
            traceparent: self.traceparent,
            success_needed: self.success_needed,
            session: self
                .session
                .as_deref()
                .map(|s| parse(s, "job session"))
                .transpose()?,
        })
    }
}

const JOB_ROW_SELECT: &str = "SELECT id, tenant_id, state, code, code_sha256, limits, reducer, \
     shard_count, created_at, environment, files, rerun_of, verify, traceparent, success_needed, session \
     FROM jobs";

/// A job with its shard counters, as the API shows it.
#[derive(sqlx::FromRow)]
pub(super) struct JobViewRecord {
    id: String,
    tenant_id: String,
    name: String,
    #[sqlx(try_from = "String")]
    state: JobState,
    #[sqlx(try_from = "i64")]
    priority: i32,
    #[sqlx(try_from = "i64")]
    max_attempts: u32,
    reducer: String,
    code_sha256: String,
    created_at: i64,
    finished_at: Option<i64>,
    error: Option<String>,
    #[sqlx(try_from = "i64")]
    shard_count: u64,
    #[sqlx(try_from = "i64")]
    queued: u64,
    #[sqlx(try_from = "i64")]
    leased: u64,
    #[sqlx(try_from = "i64")]
    reported: u64,
    #[sqlx(try_from = "i64")]
    accepted: u64,
    #[sqlx(try_from = "i64")]
    rejected: u64,
    #[sqlx(try_from = "i64")]
    dead: u64,
    planned: i64,
    parent_job_id: Option<String>,
    root_job_id: Option<String>,
    depth: i64,
    followup_rule: Option<String>,
    traceparent: Option<String>,
    paused: i64,
}

impl JobViewRecord {
    pub(super) fn decode(self) -> Result<JobView, StoreError> {
        let reducer: Reducer = parse(&self.reducer, "job reducer")?;
        Ok(JobView {
            id: self.id,
            tenant_id: self.tenant_id,
            name: self.name,
            state: self.state,
            priority: self.priority,
            max_attempts: self.max_attempts,
            reducer: reducer.name().to_string(),
            code_sha256: self.code_sha256,
            shards: ShardCounts {
                total: self.shard_count,
                queued: self.queued,
                leased: self.leased,
                reported: self.reported,
                accepted: self.accepted,
                rejected: self.rejected,
                dead: self.dead,
            },
            created_at: self.created_at,
            finished_at: self.finished_at,
            error: self.error,
            planning: self.planned == 0,
            paused: self.paused != 0,
            trace_id: self
                .traceparent
                .as_deref()
                .and_then(fleetbox_proto::trace::TraceParent::parse)
                .map(|t| t.trace_id),
            lineage: match (self.parent_job_id, self.followup_rule) {
                (Some(parent), Some(rule)) => {
                    let rule: RuleRef = parse(&rule, "job followup rule")?;
                    Some(Lineage {
                        root_job_id: self.root_job_id.unwrap_or_else(|| parent.clone()),
                        parent_job_id: parent,
                        depth: self.depth.max(0) as u32,
                        rule_index: rule.index,
                        rule: rule.name,
                    })
                }
                _ => None,
            },
        })
    }
}

/// The parent's rule a follow-up job was made by, as stored in `jobs.followup_rule`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuleRef {
    pub index: u32,
    pub name: String,
    pub action: String,
}

/// One O(1) read per job: the row and its counters.
pub(super) const JOB_VIEW_SELECT: &str = "SELECT j.id, j.tenant_id, j.name, j.state, j.priority, \
     j.max_attempts, j.reducer, j.code_sha256, j.created_at, j.finished_at, j.error, j.shard_count, \
     c.queued, c.leased, c.reported, c.accepted, c.rejected, c.dead, \
     j.planned, j.parent_job_id, j.root_job_id, j.depth, j.followup_rule, j.traceparent, j.paused \
     FROM jobs j JOIN job_counts c ON c.job_id = j.id";

/// A job whose shards have all settled (`c` is its `job_counts` row).
const ALL_SETTLED: &str = "(SELECT c.queued + c.leased + c.reported FROM job_counts c \
     WHERE c.job_id = jobs.id) = 0";

/// One accepted shard value, for aggregation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AcceptedValue {
    #[sqlx(try_from = "i64")]
    pub shard_index: u64,
    pub output: Option<String>,
    pub output_blob: Option<String>,
}

/// One settled shard for result review (see [`Store::result_facts`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ResultFact {
    pub shard_index: i64,
    pub state: String,
    pub agent_id: Option<String>,
    /// The settling attempt's status.
    pub status: Option<String>,
    pub wall_ms: Option<i64>,
    pub cpu_ms: Option<i64>,
    pub peak_memory: Option<i64>,
    pub bytes_out: Option<i64>,
}

/// Attempt facts for the job summary.
#[derive(Debug, Clone, Default)]
pub struct AttemptFacts {
    /// Executions by agents.
    pub attempts: u64,
    /// The coordinator's own re-runs (verification).
    pub server_runs: u64,
    pub bytes_out: u64,
    pub chosen_wall_ms: Vec<f64>,
    pub chosen_peak_memory: Vec<f64>,
}

/// A shard with the attempt that settled it (or its latest).
#[derive(sqlx::FromRow)]
struct ShardRecord {
    #[sqlx(try_from = "i64")]
    shard_index: u64,
    #[sqlx(try_from = "String")]
    state: TaskState,
    #[sqlx(try_from = "i64")]
    attempts: u32,
    agent_id: Option<String>,
    last_error: Option<String>,
    status: Option<String>,
    wall_ms: Option<i64>,
    output: Option<String>,
    a_agent: Option<String>,
}

impl ShardRecord {
    fn decode(self) -> Result<ShardView, StoreError> {
        Ok(ShardView {
            index: self.shard_index,
            state: self.state,
            attempts: self.attempts,
            agent_id: self.a_agent.or(self.agent_id),
            status: self.status.as_deref().map(status).transpose()?,
            wall_ms: self.wall_ms.map(|v| v.max(0) as u64),
            output: self.output.map(|o| parse(&o, "shard output")).transpose()?,
            error: self.last_error,
        })
    }
}

/// One stored attempt.
#[derive(sqlx::FromRow)]
struct AttemptRecord {
    lease_id: String,
    agent_id: String,
    #[sqlx(try_from = "i64")]
    attempt: u32,
    status: String,
    #[sqlx(try_from = "String")]
    verdict: Verdict,
    chosen: i64,
    late: i64,
    received_at: i64,
    report: String,
    output: Option<String>,
    output_sha256: Option<String>,
    stdout_blob: Option<String>,
    stderr_blob: Option<String>,
}

impl AttemptRecord {
    fn decode(self) -> Result<AttemptView, StoreError> {
        let mut report: Value = parse(&self.report, "attempt report")?;
        if let (Some(o), Some(obj)) = (self.output, report.as_object_mut()) {
            obj.insert("output".into(), parse(&o, "attempt output")?);
        }
        Ok(AttemptView {
            lease_id: self.lease_id,
            agent_id: self.agent_id,
            attempt: self.attempt,
            status: status(&self.status)?,
            verdict: self.verdict,
            chosen: self.chosen == 1,
            late: self.late == 1,
            received_at: self.received_at,
            output_sha256: self.output_sha256,
            report,
            stdout_blob: self.stdout_blob,
            stderr_blob: self.stderr_blob,
        })
    }
}

/// Stored JSON text kept as it is (a result's integers may be past what a `Value` holds).
pub(crate) fn raw_json(text: String) -> Result<Box<serde_json::value::RawValue>, StoreError> {
    serde_json::value::RawValue::from_string(text).map_err(|e| StoreError::Corrupt {
        what: "job result",
        detail: e.to_string(),
    })
}

/// A run status as stored.
pub(super) fn status(name: &str) -> Result<Status, StoreError> {
    Status::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| StoreError::Corrupt {
            what: "attempt status",
            detail: format!("unknown status `{name}`"),
        })
}

impl Store {
    /// Store a job, all its tasks and its shard counters in one transaction.
    pub async fn insert_job(&self, job: &NewJob) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("submitting a job")?;
        let entry = insert_job_in(&mut tx, self.rows_per_statement(TASK_COLUMNS), job, now).await?;
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("submitting a job")?;
        Ok(())
    }

    pub async fn job(&self, tenant_id: &str, id: &str) -> Result<Option<JobRow>, StoreError> {
        Sql::new(JOB_ROW_SELECT)
            .push(" WHERE id = ")
            .bind(id)
            .push(" AND tenant_id = ")
            .bind(tenant_id)
            .build_as::<JobRecord>()
            .fetch_optional(&self.read)
            .await
            .doing("reading a job")?
            .map(JobRecord::decode)
            .transpose()
    }

    /// A job by id alone (internal: the aggregator and the lease path).
    pub async fn job_any_tenant(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        Sql::new(JOB_ROW_SELECT)
            .push(" WHERE id = ")
            .bind(id)
            .build_as::<JobRecord>()
            .fetch_optional(&self.read)
            .await
            .doing("reading a job")?
            .map(JobRecord::decode)
            .transpose()
    }

    /// A job's shards in `[from, to)` counted by state in tiles of `size` consecutive shards:
    /// `(tile, state, shards)`, tile 0 starting at `from` (the panel's grid, whatever the job's
    /// size: one grouped read).
    pub async fn shard_tiles(
        &self,
        tenant_id: &str,
        job_id: &str,
        from: u64,
        to: u64,
        size: u64,
    ) -> Result<Vec<(u64, TaskState, u64)>, StoreError> {
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let rows: Vec<(i64, String, i64)> = Sql::new("SELECT (shard_index - ")
            .bind(from)
            .push(") / ")
            .bind(i64::try_from(size.max(1)).unwrap_or(i64::MAX))
            .push(" AS tile, state, COUNT(*) FROM tasks WHERE tenant_id = ")
            .bind(tenant_id)
            .push(" AND job_id = ")
            .bind(job_id)
            .push(" AND shard_index >= ")
            .bind(from)
            .push(" AND shard_index < ")
            .bind(i64::try_from(to).unwrap_or(i64::MAX))
            .push(" GROUP BY 1, 2")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("counting a job's shards by tile")?;
        rows.into_iter()
            .map(|(tile, state, n)| {
                let state = state.parse().map_err(|e: fleetbox_proto::UnknownState| {
                    StoreError::Corrupt {
                        what: "task state",
                        detail: e.to_string(),
                    }
                })?;
                Ok((tile.max(0) as u64, state, n.max(0) as u64))
            })
            .collect()
    }

    pub async fn job_view(&self, tenant_id: &str, id: &str) -> Result<Option<JobView>, StoreError> {
        Sql::new(JOB_VIEW_SELECT)
            .push(" WHERE j.id = ")
            .bind(id)
            .push(" AND j.tenant_id = ")
            .bind(tenant_id)
            .build_as::<JobViewRecord>()
            .fetch_optional(&self.read)
            .await
            .doing("reading a job")?
            .map(JobViewRecord::decode)
            .transpose()
    }

    pub async fn list_jobs(
        &self,
        tenant_id: &str,
        state: Option<JobState>,
        limit: u32,
    ) -> Result<Vec<JobView>, StoreError> {
        let mut sql = Sql::new(JOB_VIEW_SELECT);
        sql.push(" WHERE j.tenant_id = ").bind(tenant_id);
        if let Some(state) = state {
            sql.push(" AND j.state = ").bind(state.as_str());
        }
        sql.push(" ORDER BY j.created_at DESC, j.id LIMIT ")
            .bind(i64::from(limit));
        sql.build_as::<JobViewRecord>()
            .fetch_all(&self.read)
            .await
            .doing("listing jobs")?
            .into_iter()
            .map(JobViewRecord::decode)
            .collect()
    }

    pub async fn job_result(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<(JobResult, Option<String>)>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct ResultRecord {
            id: String,
            #[sqlx(try_from = "String")]
            state: JobState,
            result: Option<String>,
            result_blob: Option<String>,
            summary: Option<String>,
            error: Option<String>,
        }
        let Some(r) =
            Sql::new("SELECT id, state, result, result_blob, summary, error FROM jobs WHERE id = ")
                .bind(id)
                .push(" AND tenant_id = ")
                .bind(tenant_id)
                .build_as::<ResultRecord>()
                .fetch_optional(&self.read)
                .await
                .doing("reading a job result")?
        else {
            return Ok(None);
        };
        let view = JobResult {
            id: r.id,
            state: r.state,
            result: r.result.map(raw_json).transpose()?,
            summary: r
                .summary
                .map(|s| parse::<JobSummary>(&s, "job summary"))
                .transpose()?,
            error: r.error,
            metrics: None,
        };
        Ok(Some((view, r.result_blob)))
    }

    /// A page of a job's shards in index order, optionally only those in `state`.
    pub async fn shards(
        &self,
        tenant_id: &str,
        job_id: &str,
        page: &ShardPage,
    ) -> Result<Vec<ShardView>, StoreError> {
        // The settling attempt if there is one, else the latest.
        let mut sql = Sql::new(
            "SELECT t.shard_index, t.state, t.attempts, t.agent_id, t.last_error, \
             a.status, a.wall_ms, a.output, a.agent_id AS a_agent \
             FROM tasks t LEFT JOIN attempts a ON a.id = ( \
               SELECT a2.id FROM attempts a2 WHERE a2.task_id = t.id ORDER BY a2.chosen DESC, a2.id DESC LIMIT 1) \
             WHERE t.job_id = ",
        );
        sql.bind(job_id)
            .push(" AND t.tenant_id = ")
            .bind(tenant_id)
            .push(" AND t.shard_index >= ")
            // Past `i64::MAX` no shard can be (`as` would wrap to a negative, the first page).
            .bind(i64::try_from(page.from).unwrap_or(i64::MAX));
        if let Some(state) = page.state {
            sql.push(" AND t.state = ").bind(state.as_str());
        }
        sql.push(" ORDER BY t.shard_index LIMIT ")
            .bind(i64::from(page.limit));
        sql.build_as::<ShardRecord>()
            .fetch_all(&self.read)
            .await
            .doing("listing shards")?
            .into_iter()
            .map(ShardRecord::decode)
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
        let (task_id, input): (i64, String) =
            Sql::new("SELECT id, input FROM tasks WHERE job_id = ")
                .bind(job_id)
                .push(" AND shard_index = ")
                .bind(index as i64)
                .build_as()
                .fetch_one(&self.read)
                .await
                .doing(d)?;
        let attempts = Sql::new(
            "SELECT lease_id, agent_id, attempt, status, verdict, chosen, late, received_at, report, \
             output, output_sha256, stdout_blob, stderr_blob FROM attempts WHERE task_id = ",
        )
        .bind(task_id)
        .push(" ORDER BY id")
        .build_as::<AttemptRecord>()
        .fetch_all(&self.read)
        .await
        .doing(d)?
        .into_iter()
        .map(AttemptRecord::decode)
        .collect::<Result<_, _>>()?;
        Ok(Some(ShardDetail {
            shard,
            input: parse(&input, "shard input")?,
            attempts,
        }))
    }

    /// Cancel a job: unsettled shards become `dead`. Returns false when it was already final.
    pub async fn cancel_job(
        &self,
        tenant_id: &str,
        id: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("cancelling a job")?;
        if !cancel_in(&mut tx, tenant_id, id, "cancelled by request", now).await? {
            return Ok(false);
        }
        let entry = Entry::new(tenant_id, actor, Action::JobCancelled).job(id);
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("cancelling a job")?;
        Ok(true)
    }

    /// Pause (`true`) or resume job `id`: a paused job's queued shards are not leased. `None`
    /// when there is no such job, `Some(false)` when it is final (nothing to pause).
    pub async fn pause_job(
        &self,
        tenant_id: &str,
        id: &str,
        paused: bool,
        actor: &str,
    ) -> Result<Option<bool>, StoreError> {
        self.job_control(tenant_id, id, actor, |sql| {
            sql.push("paused = ").bind(i64::from(paused));
            (
                if paused {
                    Action::JobPaused
                } else {
                    Action::JobResumed
                },
                Value::Null,
            )
        })
        .await
    }

    /// Set job `id`'s priority, and its unsettled shards' (the queue orders by it).
    pub async fn set_priority(
        &self,
        tenant_id: &str,
        id: &str,
        priority: i32,
        actor: &str,
    ) -> Result<Option<bool>, StoreError> {
        let now = now_ms();
        let changed = self
            .job_control(tenant_id, id, actor, |sql| {
                sql.push("priority = ").bind(i64::from(priority));
                (
                    Action::JobPriorityChanged,
                    serde_json::json!({ "priority": priority }),
                )
            })
            .await?;
        if changed == Some(true) {
            Sql::new("UPDATE tasks SET priority = ")
                .bind(i64::from(priority))
                .push(", updated_at = ")
                .bind(now)
                .push(" WHERE id IN (SELECT id FROM tasks WHERE job_id = ")
                .bind(id)
                .push(" AND state IN (")
                .bind_list(
                    [TaskState::Queued, TaskState::Leased, TaskState::Reported]
                        .map(TaskState::as_str),
                )
                .push(")")
                .push(settle::in_id_order(self.kind))
                .build()
                .execute(self.writer())
                .await
                .doing("re-prioritising a job's shards")?;
        }
        Ok(changed)
    }

    /// Change an unfinished job's row (`set` writes the assignment and names the audit entry).
    async fn job_control(
        &self,
        tenant_id: &str,
        id: &str,
        actor: &str,
        set: impl for<'s> FnOnce(&mut Sql<'s>) -> (Action, Value),
    ) -> Result<Option<bool>, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("changing a job")?;
        let state: Option<(String,)> = Sql::new("SELECT state FROM jobs WHERE id = ")
            .bind(id)
            .push(" AND tenant_id = ")
            .bind(tenant_id)
            .build_as()
            .fetch_optional(&mut *tx)
            .await
            .doing("changing a job")?;
        let Some((state,)) = state else {
            return Ok(None);
        };
        if state.parse::<JobState>().is_ok_and(|s| s.is_final()) {
            return Ok(Some(false));
        }
        let mut sql = Sql::new("UPDATE jobs SET ");
        let (action, details) = set(&mut sql);
        sql.push(" WHERE id = ").bind(id);
        sql.build()
            .execute(&mut *tx)
            .await
            .doing("changing a job")?;
        let entry = Entry::new(tenant_id, actor, action)
            .job(id)
            .details(details);
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("changing a job")?;
        Ok(Some(true))
    }

    /// Jobs whose fold can be claimed now: settled `running` jobs, and `aggregating` jobs whose
    /// fold lease ran out (its coordinator died) or whose failed fold's back-off has passed.
    pub async fn jobs_to_aggregate(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = Sql::new("SELECT id FROM jobs WHERE (state = ")
            .bind(JobState::Running.as_str())
            .push(" AND ")
            .push(ALL_SETTLED)
            .push(") OR (state = ")
            .bind(JobState::Aggregating.as_str())
            .push(" AND fold_expires < ")
            .bind(now)
            .push(" AND fold_after <= ")
            .bind(now)
            .push(")")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("finding jobs to aggregate")?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Claim a job's fold for `owner` until `expires`: a settled `running` job, or an
    /// `aggregating` one whose fold lease ran out. Returns the try number: 1 + the folds that
    /// failed before (a fold whose coordinator stopped or died is no failure), or `None` when the job is not claimable (another coordinator holds it, or it is done).
    pub async fn claim_fold(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        expires: i64,
    ) -> Result<Option<u32>, StoreError> {
        let row: Option<(i64,)> = Sql::new("UPDATE jobs SET state = ")
            .bind(JobState::Aggregating.as_str())
            .push(", fold_owner = ")
            .bind(owner)
            .push(", fold_expires = ")
            .bind(expires)
            .push(" WHERE id = ")
            .bind(id)
            .push(" AND ((state = ")
            .bind(JobState::Running.as_str())
            .push(" AND ")
            .push(ALL_SETTLED)
            .push(") OR (state = ")
            .bind(JobState::Aggregating.as_str())
            .push(" AND fold_expires < ")
            .bind(now)
            .push(" AND fold_after <= ")
            .bind(now)
            .push(")) RETURNING fold_tries")
            .build_as()
            .fetch_optional(self.writer())
            .await
            .doing("claiming a fold")?;
        // Failed folds so far, and this one: a fold whose coordinator died is not a failure.
        Ok(row.map(|(failed,)| failed as u32 + 1))
    }

    /// Extend `owner`'s fold lease; false when it lost it.
    pub async fn renew_fold(
        &self,
        id: &str,
        owner: &str,
        expires: i64,
    ) -> Result<bool, StoreError> {
        let done = Sql::new("UPDATE jobs SET fold_expires = ")
            .bind(expires)
            .push(" WHERE id = ")
            .bind(id)
            .push(" AND state = ")
            .bind(JobState::Aggregating.as_str())
            .push(" AND fold_owner = ")
            .bind(owner)
            .build()
            .execute(self.writer())
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
        let done = Sql::new(
            "UPDATE jobs SET fold_tries = fold_tries + 1, fold_owner = NULL, fold_expires = 0, \
             fold_after = ",
        )
        .bind(after)
        .push(", error = ")
        .bind(settle::storable_text(error))
        .push(" WHERE id = ")
        .bind(id)
        .push(" AND state = ")
        .bind(JobState::Aggregating.as_str())
        .push(" AND fold_owner = ")
        .bind(owner)
        .build()
        .execute(self.writer())
        .await
        .doing("releasing a fold")?;
        Ok(done.rows_affected() == 1)
    }

    /// A job's accepted values. The reads of a job's facts name its tenant on every table, so
    /// that with a schema per tenant they are planned on its partitions alone.
    pub async fn accepted_values(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<Vec<AcceptedValue>, StoreError> {
        Sql::new(
            "SELECT t.shard_index, a.output, a.output_blob FROM attempts a \
             JOIN tasks t ON t.id = a.task_id WHERE a.tenant_id = ",
        )
        .bind(tenant)
        .push(" AND t.tenant_id = ")
        .bind(tenant)
        .push(" AND a.job_id = ")
        .bind(job_id)
        .push(" AND a.chosen = 1 AND t.state = ")
        .bind(TaskState::Accepted.as_str())
        .push(" ORDER BY t.shard_index")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading shard values")
    }

    /// Each settled shard of a job with the attempt that settled it (accepted: the chosen one;
    /// failed: the last), for result review: (shard, failed, agent, wall, cpu, memory, bytes).
    pub async fn result_facts(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<Vec<ResultFact>, StoreError> {
        Sql::new(
            "SELECT t.shard_index, t.state, a.agent_id, a.status, a.wall_ms, a.cpu_ms, \
             a.peak_memory, a.bytes_out FROM tasks t LEFT JOIN attempts a ON a.tenant_id = ",
        )
        .bind(tenant)
        .push(" AND a.id = (CASE WHEN t.state = ")
        .bind(TaskState::Accepted.as_str())
        .push(" THEN (SELECT MAX(x.id) FROM attempts x WHERE x.tenant_id = ")
        .bind(tenant)
        .push(" AND x.task_id = t.id AND x.chosen = 1) ELSE (SELECT MAX(x.id) FROM attempts x WHERE x.tenant_id = ")
        .bind(tenant)
        .push(" AND x.task_id = t.id) END) WHERE t.tenant_id = ")
        .bind(tenant)
        .push(" AND t.job_id = ")
        .bind(job_id)
        .push(" AND t.state IN (")
        .bind_list([
            TaskState::Accepted.as_str(),
            TaskState::Rejected.as_str(),
            TaskState::Dead.as_str(),
        ])
        .push(") ORDER BY t.shard_index")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading result facts")
    }

    pub async fn attempt_facts(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<AttemptFacts, StoreError> {
        let rows: Vec<(i64, i64, i64, i64, String)> = Sql::new(
            "SELECT chosen, wall_ms, peak_memory, bytes_out, runner FROM attempts WHERE tenant_id = ",
        )
        .bind(tenant)
        .push(" AND job_id = ")
        .bind(job_id)
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading attempt facts")?;
        let mut facts = AttemptFacts::default();
        for (chosen, wall_ms, peak_memory, bytes_out, runner) in rows {
            if runner == "server" {
                facts.server_runs += 1;
            } else {
                facts.attempts += 1;
            }
            facts.bytes_out += bytes_out.max(0) as u64;
            if chosen == 1 {
                facts.chosen_wall_ms.push(wall_ms as f64);
                facts.chosen_peak_memory.push(peak_memory as f64);
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
        let rows: Vec<(i64, Option<String>)> =
            Sql::new("SELECT shard_index, last_error FROM tasks WHERE job_id = ")
                .bind(job_id)
                .push(" AND state IN (")
                .bind_list([TaskState::Rejected.as_str(), TaskState::Dead.as_str()])
                .push(") ORDER BY shard_index LIMIT ")
                .bind(i64::from(limit))
                .build_as()
                .fetch_all(&self.read)
                .await
                .doing("reading failures")?;
        Ok(rows
            .into_iter()
            .map(|(i, e)| (i as u64, e.unwrap_or_default()))
            .collect())
    }

    /// Store the aggregation's outcome and settle the job, if `owner` still holds its fold.
    /// The result is inline JSON in `result`, or the hash of a blob holding it in
    /// `result_blob`: never a marker inside the value.
    /// Store a fold's outcome if `owner` still holds it, with its review-queue entries and
    /// audit entries in the same transaction. `None`: the fold was lost; else the ids of the
    /// queue entries, in `outcome.queue`'s order.
    pub async fn finish_job(
        &self,
        id: &str,
        owner: &str,
        outcome: &FoldOutcome<'_>,
    ) -> Result<Option<Vec<i64>>, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("storing a job result")?;
        let done: Option<(String,)> = Sql::new("UPDATE jobs SET state = ")
            .bind(outcome.state.as_str())
            .push(", result = ")
            .bind(outcome.result)
            .push(", result_blob = ")
            .bind(outcome.result_blob)
            .push(", summary = ")
            .bind(json(outcome.summary))
            .push(", error = ")
            .bind(outcome.error.map(settle::storable_text))
            .push(", finished_at = ")
            .bind(now)
            .push(", fold_owner = NULL WHERE id = ")
            .bind(id)
            .push(" AND state = ")
            .bind(JobState::Aggregating.as_str())
            .push(" AND fold_owner = ")
            .bind(owner)
            .push(" RETURNING tenant_id")
            .build_as()
            .fetch_optional(&mut *tx)
            .await
            .doing("storing a job result")?;
        let Some((tenant,)) = done else {
            return Ok(None);
        };
        let mut entries = Vec::new();
        let mut queued = Vec::new();
        for (kind, details) in &outcome.queue {
            let flag =
                super::review::insert_flag(&mut tx, &tenant, id, *kind, details, now).await?;
            entries.push(
                Entry::new(&tenant, "reviewer", Action::ReviewFlagged)
                    .job(id)
                    .details(serde_json::json!({ "flag": flag, "kind": kind, "details": details })),
            );
            queued.push(flag);
        }
        let action = match outcome.state {
            JobState::Completed => Action::JobCompleted,
            JobState::NeedsReview => Action::JobNeedsReview,
            _ => Action::JobFailed,
        };
        let s = outcome.summary;
        let entry = Entry::new(&tenant, "server", action)
            .job(id)
            .details(serde_json::json!({
                "state": outcome.state.as_str(),
                "error": outcome.error,
                "shards_accepted": s.shards_accepted,
                "shards_failed": s.shards_failed,
                "shards_dead": s.shards_dead,
                "attempts": s.attempts,
                "result_blob": outcome.result_blob,
                // What a receipt's result must hash to: the blob's name is its sha256.
                "result_sha256": outcome.result_blob.map(str::to_string).or_else(|| {
                    outcome.result.map(|text| {
                        use sha2::Digest;
                        hex::encode(sha2::Sha256::digest(text.as_bytes()))
                    })
                }),
                // What verification and result review found: [kind, metric, shard, score].
                "flags": s.flags.iter().take(50).map(|f| serde_json::json!([f.kind, f.metric, f.shard, f.score])).collect::<Vec<_>>(),
            }));
        entries.push(entry);
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("storing a job result")?;
        Ok(Some(queued))
    }
}

/// What a fold ends with, for [`Store::finish_job`].
#[derive(Debug)]
pub struct FoldOutcome<'a> {
    pub state: JobState,
    /// The result as JSON text, when small enough to keep in the row.
    pub result: Option<&'a str>,
    /// The blob holding the result's JSON, when it is not in the row.
    pub result_blob: Option<&'a str>,
    pub summary: &'a JobSummary,
    pub error: Option<&'a str>,
    /// Entries for the review queue (kind, details) raised by the fold, queued with its result.
    pub queue: Vec<(fleetbox_proto::FlagKind, serde_json::Value)>,
}

/// Cancel job `id` of `tenant` within `tx` because of `reason` (its `error`): unsettled shards
/// become `dead`. False when it was already final.
pub(super) async fn cancel_in(
    tx: &mut settle::Tx,
    tenant: &str,
    id: &str,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    // The job row first (it is locked from here on), then its tasks, then its counters.
    let done = Sql::new("UPDATE jobs SET state = ")
        .bind(JobState::Cancelled.as_str())
        .push(", error = ")
        .bind(reason)
        .push(", finished_at = ")
        .bind(now)
        .push(" WHERE id = ")
        .bind(id)
        .push(" AND tenant_id = ")
        .bind(tenant)
        .push(" AND state NOT IN (")
        .bind_list(JobState::FINAL.iter().map(|s| s.as_str()))
        .push(")")
        .build()
        .execute(&mut **tx)
        .await
        .doing("cancelling a job")?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let mut tally = Tally::default();
    settle::kill_unsettled(tx, &mut tally, id, "job cancelled", now).await?;
    tally.apply(tx).await?;
    Ok(true)
}

/// Store `job` (row, tasks, counters, review hold) within `tx`; the audit entry to append with it.
/// Columns bound per row when a job's tasks are inserted (see [`insert_job_in`]).
pub(super) const TASK_COLUMNS: usize = 14;

pub(super) async fn insert_job_in(
    tx: &mut settle::Tx,
    per_statement: usize,
    job: &NewJob,
    now: i64,
) -> Result<Entry, StoreError> {
    let held = job
        .review
        .as_ref()
        .is_some_and(|r| r.decision == fleetbox_proto::Decision::Hold);
    insert_job_row(tx, job, held, now).await?;
    insert_tasks(tx, per_statement, job, now).await?;
    settle::create_counts(tx, &job.tenant_id, &job.id, job.inputs.len() as i64).await?;
    if let Some(review) = job.review.as_ref().filter(|_| held) {
        let details = serde_json::to_value(review).unwrap_or_default();
        super::review::hold(tx, &job.tenant_id, &job.id, &details, now).await?;
    }
    Ok(submitted_entry(job))
}

/// The job's row: `pending_review` when its code review holds it, else `running`.
async fn insert_job_row(
    tx: &mut settle::Tx,
    job: &NewJob,
    held: bool,
    now: i64,
) -> Result<(), StoreError> {
    let shards = job.inputs.len() as i64;
    let spec = json(&job.spec);
    let limits = json(&job.limits);
    let reducer = json(&job.reducer);
    let environment = job.environment.as_ref().map(json);
    let files = (!job.files.is_empty()).then(|| json(&job.files));
    let root = job
        .lineage
        .as_ref()
        .map_or(job.id.as_str(), |(l, _)| l.root_job_id.as_str());
    let rule = job.lineage.as_ref().map(|(l, action)| {
        json(&RuleRef {
            index: l.rule_index,
            name: l.rule.clone(),
            action: action.clone(),
        })
    });
    let rerun_of = job.rerun_of.as_ref().map(json);
    let session = job.session.as_ref().map(|s| json(&s.leased));
    let state = if held {
        JobState::PendingReview
    } else {
        JobState::Running
    };
    let mut sql = Sql::new(
        "INSERT INTO jobs (id, tenant_id, name, state, spec, code, code_sha256, limits, reducer, \
         priority, max_attempts, shard_count, created_at, verify, environment, files, planned, \
         parent_job_id, root_job_id, depth, followup_rule, rerun_of, traceparent, success_needed, \
         session) VALUES ",
    );
    sql.push_rows([job], |row, job| {
        row.bind(job.id.as_str())
            .bind(job.tenant_id.as_str())
            .bind(job.name.as_str())
            .bind(state.as_str())
            .bind(spec.as_str())
            .bind(job.code.as_str())
            .bind(job.code_sha256.as_str())
            .bind(limits.as_str())
            .bind(reducer.as_str())
            .bind(i64::from(job.priority))
            .bind(i64::from(job.max_attempts))
            .bind(shards)
            .bind(now)
            .bind(serde_json::to_string(&job.verify).unwrap_or_default())
            .bind(environment.as_deref())
            .bind(files.as_deref())
            .bind(i64::from(!job.has_rules))
            .bind(job.lineage.as_ref().map(|(l, _)| l.parent_job_id.as_str()))
            .bind(root)
            .bind(job.lineage.as_ref().map_or(0, |(l, _)| i64::from(l.depth)))
            .bind(rule.as_deref())
            .bind(rerun_of.as_deref())
            .bind(job.traceparent.as_deref())
            .bind(job.success_needed)
            .bind(session.as_deref());
    });
    sql.build()
        .execute(&mut **tx)
        .await
        .doing("inserting a job")?;
    Ok(())
}

/// The job's shards, `per_statement` rows an `INSERT`; code the review decided server-only,
/// or held for a person, is never leased to an ordinary agent (`hardened`).
async fn insert_tasks(
    tx: &mut settle::Tx,
    per_statement: usize,
    job: &NewJob,
    now: i64,
) -> Result<(), StoreError> {
    let server_only = job.review.as_ref().is_some_and(|r| {
        matches!(
            r.decision,
            fleetbox_proto::Decision::RunOnServerOnly | fleetbox_proto::Decision::Hold
        )
    });
    // Serialised a statement at a time: a million shards' inputs are never all text at once.
    for (chunk_no, values) in job.inputs.chunks(per_statement).enumerate() {
        let chunk: Vec<String> = values.iter().map(json).collect();
        let mut sql = Sql::new(
            "INSERT INTO tasks (tenant_id, job_id, shard_index, state, priority, input, \
             max_attempts, updated_at, backend, replicas, hardened, pool, session, only_agent) \
             VALUES ",
        );
        sql.push_rows(chunk.iter().enumerate(), |row, (i, input)| {
            row.bind(job.tenant_id.as_str())
                .bind(job.id.as_str())
                .bind((chunk_no * per_statement + i) as i64)
                .bind(TaskState::Queued.as_str())
                .bind(i64::from(job.priority))
                .bind(input.as_str())
                .bind(i64::from(job.max_attempts))
                .bind(now)
                .bind(job.backend.as_deref())
                .bind(i64::from(job.verify.replicas))
                .bind(i64::from(server_only))
                .bind(job.pool.as_deref())
                .bind(i64::from(job.session.is_some()))
                .bind(job.session.as_ref().and_then(|s| s.only_agent.as_deref()));
        });
        sql.build()
            .execute(&mut **tx)
            .await
            .doing("inserting tasks")?;
    }
    Ok(())
}

/// The job's `job.submitted` audit entry, with its code review.
fn submitted_entry(job: &NewJob) -> Entry {
    let shards = job.inputs.len() as i64;
    let mut details = serde_json::json!({
            "parent_job_id": job.lineage.as_ref().map(|(l, _)| &l.parent_job_id),
            "name": job.name,
            "shards": shards,
            "code_sha256": job.code_sha256,
            "priority": job.priority,
            "max_attempts": job.max_attempts,
            "review": job.review.as_ref().map(|r| serde_json::json!({
                "reviewer": r.reviewer,
                "risk": r.risk,
                "decision": r.decision,
                "findings": r.findings.iter().map(|f| serde_json::json!([f.rule, f.line, f.column])).collect::<Vec<_>>(),
            })),
    });
    // A session's call names its session.
    if let (Some(s), Some(obj)) = (&job.session, details.as_object_mut()) {
        obj.insert("session_id".into(), s.leased.id.clone().into());
        obj.insert("call".into(), s.leased.call.into());
    }
    Entry::new(&job.tenant_id, job.actor.as_str(), Action::JobSubmitted)
        .job(&job.id)
        .details(details)
}
