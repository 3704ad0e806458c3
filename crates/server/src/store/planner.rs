//! The planner's storage: which final jobs still have rules to evaluate, the transaction that
//! records a plan (children, webhooks, flags, audit entries, all or nothing, once), chains,
//! and the webhook outbox.

use fleetbox_proto::JobState;
use fleetbox_proto::api::JobView;
use serde_json::Value;

use super::audit::{Action, Entry};
use super::jobs::{JOB_VIEW_SELECT, JobViewRecord, NewJob, cancel_in, insert_job_in};
use super::sql::Sql;
use super::{Doing, Store, StoreError, now_ms};

/// What the planner reads of a final job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PlanFacts {
    pub tenant_id: String,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    /// The stored spec (JSON), with its rules.
    pub spec: String,
    pub depth: i64,
    pub root_job_id: Option<String>,
}

/// [`PlanFacts`] of one job: `FACTS_SELECT` + its id.
const FACTS_SELECT: &str =
    "SELECT tenant_id, name, state, spec, depth, root_job_id FROM jobs WHERE id = ";

/// A webhook POST to record with a plan.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub id: String,
    pub tenant_id: String,
    pub job_id: String,
    pub rule: String,
    pub url: String,
    pub body: Value,
}

/// A review-queue flag to raise with a plan.
#[derive(Debug, Clone)]
pub struct PlanFlag {
    pub kind: fleetbox_proto::FlagKind,
    pub details: Value,
}

/// Everything one evaluation of a job's rules decided.
#[derive(Debug, Default)]
pub struct Plan {
    pub children: Vec<NewJob>,
    pub notifications: Vec<NewNotification>,
    pub flags: Vec<PlanFlag>,
    pub entries: Vec<Entry>,
}

/// A due webhook.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Notification {
    pub id: String,
    pub tenant_id: String,
    pub job_id: String,
    pub rule: String,
    pub url: String,
    pub body: String,
    pub tries: i64,
}

/// How one webhook try went.
#[derive(Debug, Clone)]
pub enum Delivery {
    Delivered {
        status: u16,
    },
    /// Tried again from `next_at`.
    Retry {
        error: String,
        next_at: i64,
    },
    /// Out of tries.
    Failed {
        error: String,
    },
}

impl Store {
    /// Final jobs whose rules are still to be evaluated.
    pub async fn jobs_to_plan(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = Sql::new("SELECT id FROM jobs WHERE planned = 0 AND state IN (")
            .bind_list([JobState::Completed.as_str(), JobState::Failed.as_str()])
            .push(") ORDER BY finished_at LIMIT ")
            .bind(i64::from(limit))
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("finding jobs to plan")?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    pub async fn plan_facts(&self, id: &str) -> Result<Option<PlanFacts>, StoreError> {
        Sql::new(FACTS_SELECT)
            .bind(id)
            .push(" AND planned = 0")
            .build_as()
            .fetch_optional(&self.read)
            .await
            .doing("reading a job to plan")
    }

    /// What a review re-run needs of job `id` of `tenant` (planned or not).
    pub async fn lineage_facts(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<PlanFacts>, StoreError> {
        Sql::new(FACTS_SELECT)
            .bind(id)
            .push(" AND tenant_id = ")
            .bind(tenant)
            .build_as()
            .fetch_optional(&self.read)
            .await
            .doing("reading a job's lineage")
    }

    /// The inputs of a job's shards, by index; only the failed and dead ones with `failed`.
    pub async fn shard_inputs(
        &self,
        job_id: &str,
        failed: bool,
    ) -> Result<Vec<(u64, Value)>, StoreError> {
        let mut sql = Sql::new("SELECT shard_index, input FROM tasks WHERE job_id = ");
        sql.bind(job_id);
        if failed {
            sql.push(" AND state IN (")
                .bind_list([
                    fleetbox_proto::TaskState::Rejected.as_str(),
                    fleetbox_proto::TaskState::Dead.as_str(),
                ])
                .push(")");
        }
        let rows: Vec<(i64, String)> = sql
            .push(" ORDER BY shard_index")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading shard inputs")?;
        rows.into_iter()
            .map(|(i, text)| Ok((i as u64, super::agents::parse(&text, "shard input")?)))
            .collect()
    }

    /// Jobs in the chain rooted at `root` (the root included).
    pub async fn chain_size(&self, root: &str) -> Result<u64, StoreError> {
        let (n,): (i64,) = Sql::new("SELECT COUNT(*) FROM jobs WHERE root_job_id = ")
            .bind(root)
            .push(" OR id = ")
            .bind(root)
            .build_as()
            .fetch_one(&self.read)
            .await
            .doing("counting a chain")?;
        Ok(n as u64)
    }

    /// Follow-up jobs made for `tenant` since `since` (ms).
    pub async fn followups_since(&self, tenant: &str, since: i64) -> Result<u64, StoreError> {
        let (n,): (i64,) = Sql::new("SELECT COUNT(*) FROM jobs WHERE tenant_id = ")
            .bind(tenant)
            .push(" AND parent_job_id IS NOT NULL AND created_at >= ")
            .bind(since)
            .build_as()
            .fetch_one(&self.read)
            .await
            .doing("counting follow-ups")?;
        Ok(n as u64)
    }

    /// Record `plan` for job `id`: mark it planned (only if it was not: false when another
    /// coordinator got there first, and nothing is written), insert its children with their
    /// tasks, its webhooks and flags, and the audit entries, in one transaction.
    pub async fn commit_plan(
        &self,
        id: &str,
        tenant: &str,
        plan: Plan,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("recording a plan")?;
        let done = Sql::new("UPDATE jobs SET planned = 1 WHERE id = ")
            .bind(id)
            .push(" AND planned = 0")
            .build()
            .execute(&mut *tx)
            .await
            .doing("marking a job planned")?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        let mut entries = plan.entries;
        let per_statement = self.rows_per_statement(super::jobs::TASK_COLUMNS);
        for child in &plan.children {
            entries.push(insert_job_in(&mut tx, per_statement, child, now).await?);
        }
        for n in &plan.notifications {
            Sql::new(
                "INSERT INTO notifications (id, tenant_id, job_id, rule, url, body, state, next_at, created_at) VALUES (",
            )
            .bind(n.id.as_str())
            .push(", ")
            .bind(n.tenant_id.as_str())
            .push(", ")
            .bind(n.job_id.as_str())
            .push(", ")
            .bind(n.rule.as_str())
            .push(", ")
            .bind(n.url.as_str())
            .push(", ")
            .bind(n.body.to_string())
            .push(", 'pending', ")
            .bind(now)
            .push(", ")
            .bind(now)
            .push(")")
            .build()
            .execute(&mut *tx)
            .await
            .doing("queueing a webhook")?;
        }
        for f in &plan.flags {
            super::review::insert_flag(&mut tx, tenant, id, f.kind, &f.details, now).await?;
        }
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("recording a plan")?;
        Ok(true)
    }

    /// Every job of the chain job `id` belongs to, oldest first.
    pub async fn chain(&self, tenant: &str, id: &str) -> Result<Option<Vec<JobView>>, StoreError> {
        let root: Option<(Option<String>,)> = Sql::new("SELECT root_job_id FROM jobs WHERE id = ")
            .bind(id)
            .push(" AND tenant_id = ")
            .bind(tenant)
            .build_as()
            .fetch_optional(&self.read)
            .await
            .doing("reading a job's chain")?;
        let Some((root,)) = root else {
            return Ok(None);
        };
        let root = root.unwrap_or_else(|| id.to_string());
        let jobs = Sql::new(JOB_VIEW_SELECT)
            .push(" WHERE j.tenant_id = ")
            .bind(tenant)
            .push(" AND (j.root_job_id = ")
            .bind(root.as_str())
            .push(" OR j.id = ")
            .bind(root.as_str())
            .push(") ORDER BY j.depth, j.created_at, j.id")
            .build_as::<JobViewRecord>()
            .fetch_all(&self.read)
            .await
            .doing("reading a job's chain")?
            .into_iter()
            .map(JobViewRecord::decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(jobs))
    }

    /// Cancel these jobs (a chain's pending descendants) in one transaction; the ones that
    /// were still running.
    pub async fn cancel_jobs(
        &self,
        tenant: &str,
        ids: &[String],
        actor: &str,
        reason: &str,
    ) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("cancelling jobs")?;
        let mut cancelled = Vec::new();
        let mut entries = Vec::new();
        for id in ids {
            if cancel_in(&mut tx, tenant, id, reason, now).await? {
                entries.push(
                    Entry::new(tenant, actor, Action::JobCancelled)
                        .job(id)
                        .details(serde_json::json!({ "reason": reason })),
                );
                cancelled.push(id.clone());
            }
        }
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("cancelling jobs")?;
        Ok(cancelled)
    }

    /// Claim up to `limit` due webhooks for `owner` until `until`.
    pub async fn claim_notifications(
        &self,
        owner: &str,
        now: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<Notification>, StoreError> {
        let due: Vec<(String,)> =
            Sql::new("SELECT id FROM notifications WHERE state = 'pending' AND next_at <= ")
                .bind(now)
                .push(" AND owner_until < ")
                .bind(now)
                .push(" ORDER BY next_at LIMIT ")
                .bind(i64::from(limit))
                .build_as()
                .fetch_all(&self.read)
                .await
                .doing("finding due webhooks")?;
        let mut claimed = Vec::new();
        for (id,) in due {
            let row: Option<Notification> = Sql::new("UPDATE notifications SET owner = ")
                .bind(owner)
                .push(", owner_until = ")
                .bind(until)
                .push(" WHERE id = ")
                .bind(id.as_str())
                .push(" AND state = 'pending' AND owner_until < ")
                .bind(now)
                .push(" RETURNING id, tenant_id, job_id, rule, url, body, tries")
                .build_as()
                .fetch_optional(self.writer())
                .await
                .doing("claiming a webhook")?;
            claimed.extend(row);
        }
        Ok(claimed)
    }

    /// Record how a try of webhook `n` went (if `owner` still holds it), with its audit entry.
    pub async fn record_delivery(
        &self,
        n: &Notification,
        owner: &str,
        outcome: &Delivery,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let tries = n.tries + 1;
        let (state, next_at, error, status) = match outcome {
            Delivery::Delivered { status } => ("delivered", now, None, Some(*status)),
            Delivery::Retry { error, next_at } => ("pending", *next_at, Some(error.as_str()), None),
            Delivery::Failed { error } => ("failed", now, Some(error.as_str()), None),
        };
        let mut tx = self.begin_write().await.doing("recording a webhook try")?;
        let done = Sql::new("UPDATE notifications SET state = ")
            .bind(state)
            .push(", tries = ")
            .bind(tries)
            .push(", next_at = ")
            .bind(next_at)
            .push(", last_error = ")
            .bind(error.map(super::settle::storable_text))
            .push(", owner = NULL, owner_until = 0, finished_at = ")
            .bind((state != "pending").then_some(now))
            .push(" WHERE id = ")
            .bind(n.id.as_str())
            .push(" AND owner = ")
            .bind(owner)
            .push(" AND state = 'pending'")
            .build()
            .execute(&mut *tx)
            .await
            .doing("recording a webhook try")?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        let entry = Entry::new(&n.tenant_id, "planner", Action::FollowupNotified)
            .job(&n.job_id)
            .details(serde_json::json!({
                "notification": n.id,
                "rule": n.rule,
                "url": n.url,
                "try": tries,
                "outcome": state,
                "status": status,
                "error": error,
            }));
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("recording a webhook try")?;
        Ok(true)
    }

    /// A job's webhooks: (rule, url, state, tries, last error).
    pub async fn notifications_of(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<Vec<(String, String, String, i64, Option<String>)>, StoreError> {
        Sql::new("SELECT rule, url, state, tries, last_error FROM notifications WHERE job_id = ")
            .bind(job_id)
            .push(" AND tenant_id = ")
            .bind(tenant)
            .push(" ORDER BY id")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading a job's webhooks")
    }
}
