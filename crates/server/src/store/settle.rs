//! The state machine of a task (shard): every change of a task's state goes through here.
//!
//! Each transition is a guarded `UPDATE` that changes a row only if it is still in the state
//! (and, where it matters, under the lease) the transition comes from; its row count says
//! whether it happened. What happened is counted in a [`Tally`], and the tally moves the job's
//! per-state shard counters (`job_counts`) in the same transaction, last: the counters are
//! the truth the job view and the fold read, O(1) per job.
//!
//! On PostgreSQL a concurrent transaction that changed a row first makes the guard fail once
//! it commits (READ COMMITTED re-checks the `WHERE` on the new row version); on SQLite there
//! is one writer. Lock order, which keeps PostgreSQL free of deadlocks: job rows (sorted,
//! [`lock_jobs`]), then task rows, then `job_counts` rows (sorted, [`Tally::apply`]). A lease
//! takes no job row; every transaction touches the counters last.

use std::collections::BTreeMap;

use fleetbox_proto::{AgentState, TaskState};
use sqlx::Row;

use super::sql::Sql;
use super::{DbKind, Doing, StoreError};

pub(super) type Tx = super::tx::WriteTx;

/// Column of `job_counts` for each task state, in [`TaskState::ALL`] order.
const COUNT_COLUMNS: [&str; 6] = [
    "queued", "leased", "reported", "accepted", "rejected", "dead",
];

fn slot(state: TaskState) -> usize {
    match state {
        TaskState::Queued => 0,
        TaskState::Leased => 1,
        TaskState::Reported => 2,
        TaskState::Accepted => 3,
        TaskState::Rejected => 4,
        TaskState::Dead => 5,
    }
}

/// The counter changes of one transaction, per job.
#[derive(Debug, Default)]
pub(super) struct Tally {
    by_job: BTreeMap<String, [i64; 6]>,
}

impl Tally {
    /// `n` shards of `job` went from `from` to `to`.
    pub(super) fn moved(&mut self, job: &str, from: TaskState, to: TaskState, n: i64) {
        if n == 0 || from == to {
            return;
        }
        let counts = self.by_job.entry(job.to_string()).or_default();
        counts[slot(from)] -= n;
        counts[slot(to)] += n;
    }

    /// Apply the changes, job by job in id order. Returns the jobs whose last unsettled
    /// shard settled in this transaction (they are ready to fold).
    pub(super) async fn apply(self, tx: &mut Tx) -> Result<Vec<String>, StoreError> {
        let mut ready = Vec::new();
        for (job, delta) in self.by_job {
            if delta.iter().all(|d| *d == 0) {
                continue;
            }
            let mut sql = Sql::new("UPDATE job_counts SET ");
            for (i, (column, d)) in COUNT_COLUMNS.iter().zip(delta).enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.push(column)
                    .push(" = ")
                    .push(column)
                    .push(" + ")
                    .bind(d);
            }
            sql.push(" WHERE job_id = ")
                .bind(job.as_str())
                .push(" RETURNING queued + leased + reported AS unsettled");
            let row = sql
                .build()
                .fetch_optional(&mut **tx)
                .await
                .doing("counting shards")?
                .ok_or_else(|| StoreError::Corrupt {
                    what: "shard counters",
                    detail: format!("job `{job}` has no counters row"),
                })?;
            let unsettled: i64 = row.try_get("unsettled").doing("counting shards")?;
            if unsettled < 0 {
                return Err(StoreError::Corrupt {
                    what: "shard counters",
                    detail: format!("job `{job}` would have {unsettled} unsettled shards"),
                });
            }
            let settled_now: i64 = TaskState::SETTLED.iter().map(|s| delta[slot(*s)]).sum();
            if unsettled == 0 && settled_now > 0 {
                ready.push(job);
            }
        }
        Ok(ready)
    }
}

/// The counters row of a new job of `tenant` with `shards` queued shards.
pub(super) async fn create_counts(
    tx: &mut Tx,
    tenant: &str,
    job: &str,
    shards: i64,
) -> Result<(), StoreError> {
    Sql::new("INSERT INTO job_counts (tenant_id, job_id, queued) VALUES (")
        .bind(tenant)
        .push(", ")
        .bind(job)
        .push(", ")
        .bind(shards)
        .push(")")
        .build()
        .execute(&mut **tx)
        .await
        .doing("creating shard counters")?;
    Ok(())
}

/// A shard as a transition needs it: its row and its job (for the counters).
#[derive(Debug, Clone, Copy)]
pub(super) struct Shard<'a> {
    pub id: i64,
    /// Named in each statement about the shard: with a schema per tenant, the planner then
    /// looks at its tenant's partition alone.
    pub tenant: &'a str,
    pub job_id: &'a str,
}

/// One guarded update of one task from `from` (with `lease_id` when the lease matters) to
/// `to`, setting `extra` columns too. Counted in `tally` when it happened.
async fn transition(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    from: TaskState,
    lease_id: Option<&str>,
    to: TaskState,
    set: Fields<'_>,
) -> Result<bool, StoreError> {
    let mut sql = Sql::new("UPDATE tasks SET state = ");
    sql.bind(to.as_str())
        .push(", lease_id = NULL, lease_expires = NULL, updated_at = ")
        .bind(set.now)
        .push(", last_error = ");
    match set.reason {
        Some(r) => sql.bind(storable_text(r)),
        None => sql.push("NULL"),
    };
    if let Some(at) = set.not_before {
        sql.push(", not_before = ");
        held_or(&mut sql, at);
    }
    sql.push(" WHERE tenant_id = ")
        .bind(shard.tenant)
        .push(" AND id = ")
        .bind(shard.id)
        .push(" AND state = ")
        .bind(from.as_str());
    if let Some(lease) = lease_id {
        sql.push(" AND lease_id = ").bind(lease);
    }
    let done = sql
        .build()
        .execute(&mut **tx)
        .await
        .doing("settling a shard")?
        .rows_affected()
        == 1;
    if done {
        tally.moved(shard.job_id, from, to, 1);
    }
    Ok(done)
}

/// What a transition writes besides the state.
#[derive(Debug, Clone, Copy)]
struct Fields<'a> {
    now: i64,
    reason: Option<&'a str>,
    not_before: Option<i64>,
}

/// `leased` | `queued` → `accepted`: a report of success for a shard nobody settled. A late
/// success still settles a shard that was re-queued: nothing runs twice for nothing.
pub(super) async fn accept(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    now: i64,
) -> Result<bool, StoreError> {
    take_success(tx, tally, shard, TaskState::Accepted, now).await
}

/// `leased` | `queued` → `reported`: a success to be checked by the coordinator's own run
/// before it is accepted (see `store::verify`). Whoever checks it claims it afresh.
pub(super) async fn hold_for_check(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    now: i64,
) -> Result<bool, StoreError> {
    let held = take_success(tx, tally, shard, TaskState::Reported, now).await?;
    if held {
        queue_check(tx, shard, None).await?;
    }
    Ok(held)
}

/// `leased` under `lease_id` (or `queued`) → `reported`: an agent's failure (`attempt`) to be
/// checked by the coordinator's own run before the shard is rejected on its word. `reason`
/// is the agent's, kept as the shard's error meanwhile.
pub(super) async fn hold_failure_for_check(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    lease_id: &str,
    attempt: i64,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let held = settle_lease(tx, tally, shard, lease_id, TaskState::Reported, reason, now).await?;
    if held {
        queue_check(tx, shard, Some(attempt)).await?;
    }
    Ok(held)
}

/// A shard just put in `reported`: unclaimed, about `attempt` (a failure) or, with `None`, its
/// latest unchecked success.
async fn queue_check(
    tx: &mut Tx,
    shard: Shard<'_>,
    attempt: Option<i64>,
) -> Result<(), StoreError> {
    Sql::new("UPDATE tasks SET check_owner = NULL, check_expires = 0, check_attempt = ")
        .bind(attempt)
        .push(" WHERE tenant_id = ")
        .bind(shard.tenant)
        .push(" AND id = ")
        .bind(shard.id)
        .build()
        .execute(&mut **tx)
        .await
        .doing("queueing a check")?;
    Ok(())
}

/// A success moves a shard from `leased` (under any lease), else from `queued`, to `to`.
async fn take_success(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    to: TaskState,
    now: i64,
) -> Result<bool, StoreError> {
    let set = Fields {
        now,
        reason: None,
        not_before: None,
    };
    for from in [TaskState::Leased, TaskState::Queued] {
        if transition(tx, tally, shard, from, None, to, set).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `leased` under `lease_id` (or `queued`: nobody holds it) → `rejected`: the program failed
/// on its own. A shard leased to someone else meanwhile is left to them.
pub(super) async fn reject(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    lease_id: &str,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    settle_lease(tx, tally, shard, lease_id, TaskState::Rejected, reason, now).await
}

/// `queued` → `rejected` with `reason` (a shard no agent left would run); false when it was
/// no longer queued.
pub(super) async fn reject_queued(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let set = Fields {
        now,
        reason: Some(reason),
        not_before: None,
    };
    transition(
        tx,
        tally,
        shard,
        TaskState::Queued,
        None,
        TaskState::Rejected,
        set,
    )
    .await
}

/// `leased` under `lease_id` (or `queued`: nobody holds it) → `to`, `reason` the shard's
/// error. A shard leased to someone else meanwhile is left to them.
async fn settle_lease(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    lease_id: &str,
    to: TaskState,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let set = Fields {
        now,
        reason: Some(reason),
        not_before: None,
    };
    Ok(
        transition(tx, tally, shard, TaskState::Leased, Some(lease_id), to, set).await?
            || transition(tx, tally, shard, TaskState::Queued, None, to, set).await?,
    )
}

/// How a lease ended without a value: back to the queue (not before `not_before`) or `dead`.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseEnd<'a> {
    pub to: TaskState,
    pub not_before: i64,
    pub reason: &'a str,
}

/// `leased` under `lease_id` → `queued` or `dead` as `end` says: the lease ended without a
/// value (infrastructure failure, expiry, lost agent). The attempt count cannot change while
/// the lease holds, so the caller's choice of `to` stays right.
pub(super) async fn release(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    lease_id: &str,
    end: LeaseEnd<'_>,
    now: i64,
) -> Result<bool, StoreError> {
    debug_assert!(matches!(end.to, TaskState::Queued | TaskState::Dead));
    let set = Fields {
        now,
        reason: Some(end.reason),
        not_before: Some(end.not_before),
    };
    transition(
        tx,
        tally,
        shard,
        TaskState::Leased,
        Some(lease_id),
        end.to,
        set,
    )
    .await
}

/// `leased` under `lease_id` → `queued` at once, the attempt not counted: its agent refused to
/// run it (its own policy, not a claim about the program). The lease is marked refused, so
/// [`lease`] never offers the shard to that agent again.
pub(super) async fn refused(
    tx: &mut Tx,
    tally: &mut Tally,
    shard: Shard<'_>,
    lease_id: &str,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let mut sql = Sql::new("UPDATE tasks SET state = ");
    sql.bind(TaskState::Queued.as_str())
        .push(", attempts = attempts - 1, refusals = refusals + 1, last_error = ")
        .bind(storable_text(reason))
        .push(", lease_id = NULL, agent_id = NULL, lease_expires = NULL, not_before = ");
    held_or(&mut sql, 0);
    sql.push(", updated_at = ")
        .bind(now)
        .push(" WHERE tenant_id = ")
        .bind(shard.tenant)
        .push(" AND id = ")
        .bind(shard.id)
        .push(" AND state = ")
        .bind(TaskState::Leased.as_str())
        .push(" AND lease_id = ")
        .bind(lease_id);
    let moved = sql
        .build()
        .execute(&mut **tx)
        .await
        .doing("giving a refused shard back")?
        .rows_affected()
        == 1;
    if moved {
        Sql::new("UPDATE leases SET refused = 1 WHERE id = ")
            .bind(lease_id)
            .build()
            .execute(&mut **tx)
            .await
            .doing("marking a refused lease")?;
        tally.moved(shard.job_id, TaskState::Leased, TaskState::Queued, 1);
    }
    Ok(moved)
}

/// Whether an agent other than those that refused `task` could still take it: in a pool that
/// serves the shard's tenant (and the pool it names, if any), online, not quarantined,
/// marked `hardened` when the shard is server-only (an ordinary agent never gets it), and not
/// one that asks for server-only shards alone when it is not (the coordinator's own server
/// agents never lease it). A refusal rejects its shard only when none could.
pub(super) async fn anyone_else_would_run(
    tx: &mut Tx,
    task: i64,
    refuser: &str,
) -> Result<bool, StoreError> {
    let row: Option<(i64,)> = Sql::new(
        "SELECT 1 FROM agents a JOIN pools p ON p.name = a.pool, tasks s WHERE s.id = ",
    )
    .bind(task)
    .push(
        " AND (p.shared = 1 OR p.tenant_id = s.tenant_id) AND (s.pool IS NULL OR s.pool = a.pool)",
    )
    .push(" AND a.state = ")
    .bind(AgentState::Online.as_str())
    .push(" AND a.quarantined_at IS NULL AND a.id <> ")
    .bind(refuser)
    .push(" AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = ")
    .bind(task)
    .push(" AND l.agent_id = a.id AND l.refused = 1)")
    .push(" AND (a.hardened = 1 OR s.hardened = 0) AND (a.only_hardened = 0 OR s.hardened = 1)")
    // A session call: an agent that keeps sessions, and the session's own once it has one.
    .push(" AND (s.session = 0 OR a.keeps_sessions = 1)")
    .push(" AND (s.only_agent IS NULL OR s.only_agent = a.id)")
    .push(" LIMIT 1")
    .build_as()
    .fetch_optional(&mut **tx)
    .await
    .doing("looking for an agent that has not refused a shard")?;
    Ok(row.is_some())
}

/// One task handed out by [`lease`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeaseGrant {
    pub lease_id: String,
    /// The shard's tenant (in a shared pool, not the agent's).
    pub tenant_id: String,
    #[sqlx(rename = "id")]
    pub task_id: i64,
    pub job_id: String,
    #[sqlx(try_from = "i64")]
    pub shard_index: u64,
    #[sqlx(rename = "attempts", try_from = "i64")]
    pub attempt: u32,
    pub input: String,
}

/// Which shards an agent asks for, beyond its tenant's ready ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want<'a> {
    /// Its sandbox backend: shards of jobs that ask for another are left for others (`None`:
    /// only shards of jobs that ask for none).
    pub backend: Option<&'a str>,
    /// Server-only shards and nothing else (the coordinator's own server agents).
    pub hardened_only: bool,
    /// Session calls too: the agent keeps sessions and has room for another.
    pub sessions: bool,
}

/// One lease call, as [`lease`] takes it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked<'a> {
    pub tenant: &'a str,
    /// The agent's pool: shards that name another pool are not for it.
    pub pool: &'a str,
    pub agent: &'a str,
    pub want: Want<'a>,
    pub max: u32,
    pub expires: i64,
    pub lease_prefix: &'a str,
}

/// `queued` (ready, of `tenant`) → `leased` to `agent` until `expires`, at most `max`, by
/// priority then age. On PostgreSQL `SKIP LOCKED` lets concurrent leases take disjoint rows.
pub(super) async fn lease(
    tx: &mut Tx,
    tally: &mut Tally,
    kind: DbKind,
    asked: &Asked<'_>,
    now: i64,
) -> Result<Vec<LeaseGrant>, StoreError> {
    let agent = asked.agent;
    let mut sql = Sql::new("UPDATE tasks SET state = ");
    sql.bind(TaskState::Leased.as_str())
        .push(", lease_id = ")
        .bind(asked.lease_prefix)
        .push(" || '.' || CAST(id AS TEXT), agent_id = ")
        .bind(agent)
        .push(", lease_expires = ")
        .bind(asked.expires)
        .push(", attempts = attempts + 1, updated_at = ")
        .bind(now)
        // The tenant here too: with a schema per tenant, only its partition is planned.
        .push(" WHERE tenant_id = ")
        .bind(asked.tenant)
        // On PostgreSQL the picked ids are an array made once: `IN (SELECT ... LIMIT n FOR
        // UPDATE SKIP LOCKED)` may be planned as a join that runs the pick again and skips
        // to other rows, leasing more than `n`.
        .push(match kind {
            DbKind::Postgres => " AND id = ANY(ARRAY(SELECT id FROM tasks WHERE state = ",
            DbKind::Sqlite => " AND id IN (SELECT id FROM tasks WHERE state = ",
        })
        .bind(TaskState::Queued.as_str())
        .push(" AND tenant_id = ")
        .bind(asked.tenant)
        .push(" AND (pool IS NULL OR pool = ")
        .bind(asked.pool)
        .push(")");
    runnable_by(&mut sql, agent, asked.tenant, &asked.want, now);
    sql.push(" ORDER BY priority DESC, id LIMIT ")
        .bind(i64::from(asked.max));
    sql.push(match kind {
        DbKind::Postgres => " FOR UPDATE SKIP LOCKED))",
        DbKind::Sqlite => ")",
    });
    sql.push(" RETURNING id, tenant_id, job_id, shard_index, attempts, input, lease_id");
    let mut grants: Vec<LeaseGrant> = sql
        .build_as()
        .fetch_all(&mut **tx)
        .await
        .doing("leasing tasks")?;
    grants.sort_by_key(|g| g.task_id);
    for g in &grants {
        tally.moved(&g.job_id, TaskState::Queued, TaskState::Leased, 1);
    }
    Ok(grants)
}

/// The conditions, after `WHERE state = 'queued' ...`, under which `agent` may take a shard
/// as of `now` (its tenant's pool and fair share aside). The statement's tasks are `tenant`'s,
/// and each look into another per-tenant table names it too, so that with a schema per tenant
/// the planner reads that tenant's partitions rather than every tenant's.
pub(super) fn runnable_by<'a>(
    sql: &mut Sql<'a>,
    agent: &'a str,
    tenant: &'a str,
    want: &Want<'a>,
    now: i64,
) {
    sql.push(" AND not_before <= ").bind(now);
    match want.backend {
        Some(b) => sql
            .push(" AND (backend IS NULL OR backend = ")
            .bind(b)
            .push(")"),
        None => sql.push(" AND backend IS NULL"),
    };
    server_only(sql, agent, want.hardened_only);
    distinct_replicas(sql, agent, tenant);
    // A session's calls go to agents that keep sessions, and once it is open to its agent.
    if !want.sessions {
        sql.push(" AND session = 0");
    }
    sql.push(" AND (only_agent IS NULL OR only_agent = ")
        .bind(agent)
        .push(")");
    // Never back to an agent that refused it.
    sql.push(
        " AND (refusals = 0 OR NOT EXISTS (SELECT 1 FROM leases r WHERE r.task_id = tasks.id \
         AND r.refused = 1",
    );
    same_tenant(sql, "r", tenant);
    sql.push(" AND r.agent_id = ").bind(agent).push("))");
    // A paused job's shards wait (its running shards finish; their retries wait too).
    sql.push(" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = tasks.job_id AND j.paused = 1");
    same_tenant(sql, "j", tenant);
    sql.push(")");
}

/// ` AND alias.tenant_id = tenant`.
fn same_tenant<'a>(sql: &mut Sql<'a>, alias: &'static str, tenant: &'a str) {
    sql.push(" AND ")
        .push(alias)
        .push(".tenant_id = ")
        .bind(tenant);
}

/// Server-only shards (`tasks.hardened`) go only to agents marked for them (an operator's
/// mark, or the coordinator's own server agents); an agent asking for `hardened_only` gets
/// nothing else.
fn server_only<'a>(sql: &mut Sql<'a>, agent: &'a str, hardened_only: bool) {
    if hardened_only {
        sql.push(" AND hardened = 1");
    }
    sql.push(
        " AND (hardened = 0 OR EXISTS (SELECT 1 FROM agents h WHERE h.hardened = 1 AND h.id = ",
    )
    .bind(agent)
    .push("))");
}

/// A shard with replicas never goes to an agent that already ran it, nor to one on a machine
/// that already ran it while an online agent on a machine that has not could take it.
fn distinct_replicas<'a>(sql: &mut Sql<'a>, agent: &'a str, tenant: &'a str) {
    let online = AgentState::Online.as_str();
    sql.push(
        " AND (replicas = 1 OR (NOT EXISTS (SELECT 1 FROM leases l WHERE l.task_id = tasks.id",
    );
    same_tenant(sql, "l", tenant);
    sql.push(" AND l.agent_id = ").bind(agent).push(
        ") AND (NOT EXISTS (SELECT 1 FROM leases l JOIN agents a ON a.id = l.agent_id \
         WHERE l.task_id = tasks.id",
    );
    same_tenant(sql, "l", tenant);
    sql.push(" AND a.machine_id = (SELECT m.machine_id FROM agents m WHERE m.id = ")
        .bind(agent)
        .push(
        ")) OR NOT EXISTS (SELECT 1 FROM agents o JOIN pools op ON op.name = o.pool \
         WHERE (op.shared = 1 OR op.tenant_id = tasks.tenant_id) \
         AND (tasks.pool IS NULL OR tasks.pool = o.pool) AND o.state = ",
    )
    .bind(online)
    .push(" AND o.quarantined_at IS NULL AND o.machine_id <> (SELECT m.machine_id FROM agents m WHERE m.id = ")
    .bind(agent)
    .push(
        ") AND NOT EXISTS (SELECT 1 FROM leases l JOIN agents a ON a.id = l.agent_id \
         WHERE l.task_id = tasks.id",
    );
    same_tenant(sql, "l", tenant);
    sql.push(" AND a.machine_id = o.machine_id)))))");
}

/// A shard going back to the queue waits until `at`, or, while its job is held for review
/// (`pending_review`: a sandbox violation, say), until the hold is lifted: a retry must not
/// slip past the hold.
fn held_or(sql: &mut Sql<'_>, at: i64) {
    sql.push("CASE WHEN (SELECT j.state FROM jobs j WHERE j.id = tasks.job_id) = ")
        .bind(fleetbox_proto::JobState::PendingReview.as_str())
        .push(" THEN ")
        .bind(super::review::HELD_UNTIL)
        .push(" ELSE ")
        .bind(at)
        .push(" END");
}

/// `leased` by `agent` under one of `leases` → `queued` at once, and those leases closed: a
/// report that still arrives for one settles nothing. Returns the shards moved, with their
/// tenants. `why` is `None` when the agent gave
/// them back unrun (the attempt is not counted), else what became of the run (it counts).
pub(super) async fn requeue(
    tx: &mut Tx,
    tally: &mut Tally,
    agent: &str,
    leases: &[String],
    why: Option<&str>,
    now: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut sql = Sql::new("UPDATE tasks SET state = ");
    sql.bind(TaskState::Queued.as_str());
    match why {
        None => sql.push(", attempts = attempts - 1"),
        Some(why) => sql.push(", last_error = ").bind(why),
    };
    sql.push(", lease_id = NULL, agent_id = NULL, lease_expires = NULL, not_before = ");
    held_or(&mut sql, 0);
    sql.push(", updated_at = ")
        .bind(now)
        .push(" WHERE id IN (SELECT id FROM tasks WHERE state = ")
        .bind(TaskState::Leased.as_str())
        .push(" AND agent_id = ")
        .bind(agent)
        .push(" AND lease_id IN (")
        .bind_list(leases.iter().map(String::as_str))
        .push(")")
        .push(in_id_order(tx.kind()))
        .push(" RETURNING id, tenant_id, job_id");
    let rows = sql
        .build()
        .fetch_all(&mut **tx)
        .await
        .doing("returning leases")?;
    let mut returned = Vec::with_capacity(rows.len());
    for r in &rows {
        let job: String = r.try_get("job_id").doing("returning leases")?;
        tally.moved(&job, TaskState::Leased, TaskState::Queued, 1);
        returned.push((
            r.try_get("tenant_id").doing("returning leases")?,
            r.try_get("id").doing("returning leases")?,
        ));
    }
    Sql::new("UPDATE leases SET closed = 1 WHERE agent_id = ")
        .bind(agent)
        .push(" AND id IN (")
        .bind_list(leases.iter().map(String::as_str))
        .push(")")
        .build()
        .execute(&mut **tx)
        .await
        .doing("closing returned leases")?;
    Ok(returned)
}

/// Every unsettled shard of a cancelled job → `dead`, the counters moved by the states the
/// shards were locked in (a lease racing the cancel skips the locked rows, or commits first
/// and its row is then locked as `leased`; on SQLite the one writer orders them).
pub(super) async fn kill_unsettled(
    tx: &mut Tx,
    tally: &mut Tally,
    job: &str,
    reason: &str,
    now: i64,
) -> Result<(), StoreError> {
    let unsettled = TaskState::UNSETTLED.map(TaskState::as_str);
    // Every unsettled shard's lock in one pass, in id order (see [`in_id_order`]): a statement
    // per state would take the queued ones' locks before the leased ones', against the order
    // a heartbeat takes them in.
    let mut lock = Sql::new("SELECT state FROM tasks WHERE job_id = ");
    lock.bind(job)
        .push(" AND state IN (")
        .bind_list(unsettled)
        .push(") ORDER BY id");
    if tx.kind() == DbKind::Postgres {
        lock.push(" FOR UPDATE");
    }
    let states: Vec<(String,)> = lock
        .build_as()
        .fetch_all(&mut **tx)
        .await
        .doing("cancelling a job's shards")?;
    Sql::new("UPDATE tasks SET state = ")
        .bind(TaskState::Dead.as_str())
        .push(", last_error = ")
        .bind(reason)
        .push(", lease_id = NULL, lease_expires = NULL, updated_at = ")
        .bind(now)
        .push(" WHERE job_id = ")
        .bind(job)
        .push(" AND state IN (")
        .bind_list(unsettled)
        .push(")")
        .build()
        .execute(&mut **tx)
        .await
        .doing("cancelling a job's shards")?;
    for from in TaskState::UNSETTLED {
        let n = states.iter().filter(|(s,)| s == from.as_str()).count();
        tally.moved(job, from, TaskState::Dead, n as i64);
    }
    Ok(())
}

/// The end of `WHERE id IN (SELECT id FROM tasks WHERE ...`: on PostgreSQL the rows are
/// locked in id order before they are updated. Every statement that updates several tasks
/// takes their locks this way (the order a plan happens to visit rows in is not one order:
/// a cancel of 20,000 shards and a heartbeat extending some of them deadlocked otherwise).
pub(super) fn in_id_order(kind: DbKind) -> &'static str {
    match kind {
        DbKind::Postgres => " ORDER BY id FOR UPDATE)",
        DbKind::Sqlite => ")",
    }
}

/// Take the row locks of `tasks` in id order (PostgreSQL), after their jobs' (see
/// [`in_id_order`]): a report settles its shards in report order, which is not id order.
pub(super) async fn lock_tasks(tx: &mut Tx, tasks: &[i64]) -> Result<(), StoreError> {
    if tx.kind() != DbKind::Postgres || tasks.is_empty() {
        return Ok(());
    }
    let mut sorted = tasks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    Sql::new("SELECT id FROM tasks WHERE id IN (")
        .bind_list(sorted)
        .push(") ORDER BY id FOR UPDATE")
        .build()
        .fetch_all(&mut **tx)
        .await
        .doing("locking shards")?;
    Ok(())
}

/// Take the row locks of `jobs` in id order (PostgreSQL), before any of their tasks'.
pub(super) async fn lock_jobs(
    tx: &mut Tx,
    kind: DbKind,
    jobs: &[String],
) -> Result<(), StoreError> {
    if kind != DbKind::Postgres || jobs.is_empty() {
        return Ok(());
    }
    let mut sorted = jobs.to_vec();
    sorted.sort();
    sorted.dedup();
    Sql::new("SELECT id FROM jobs WHERE id IN (")
        .bind_list(sorted.iter().map(String::as_str))
        .push(") ORDER BY id FOR UPDATE")
        .build()
        .fetch_all(&mut **tx)
        .await
        .doing("locking jobs")?;
    Ok(())
}

/// Text as both databases can hold it: PostgreSQL's `TEXT` cannot hold NUL, so NUL becomes
/// U+2400 (␀) on both. Only for free text the coordinator derives (reasons); the reports
/// themselves are stored as JSON, where NUL is escaped and kept exactly.
pub fn storable_text(text: &str) -> String {
    text.replace('\0', "\u{2400}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_made_visible_not_dropped() {
        assert_eq!(super::storable_text("a\0b"), "a\u{2400}b");
    }

    #[test]
    fn count_columns_follow_the_task_states() {
        for (i, s) in TaskState::ALL.iter().enumerate() {
            assert_eq!(slot(*s), i);
            assert_eq!(COUNT_COLUMNS[i], s.as_str());
        }
    }

    #[test]
    fn a_tally_nets_out_and_skips_non_moves() {
        let mut t = Tally::default();
        t.moved("j", TaskState::Queued, TaskState::Leased, 2);
        t.moved("j", TaskState::Leased, TaskState::Accepted, 1);
        t.moved("j", TaskState::Leased, TaskState::Leased, 5);
        assert_eq!(t.by_job["j"], [-2, 1, 0, 1, 0, 0]);
    }
}
