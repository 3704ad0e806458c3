//! What `/metrics` reads from the database: counters and small aggregates, never a scan of
//! tasks or attempts.

use std::collections::BTreeMap;

use fleetbox_proto::JobState;

use super::audit::{Action, Entry};
use super::settle::Tx;
use super::sql::Sql;
use super::{Doing, Store, StoreError};
use crate::metrics::{Stored, escape};

/// The decision counters a batch of audit entries moves: (name, labels) → increment.
pub(super) fn counted(entries: &[Entry]) -> BTreeMap<(&'static str, String), i64> {
    let mut out = BTreeMap::new();
    let mut add = |name: &'static str, labels: String, n: i64| {
        *out.entry((name, labels)).or_insert(0) += n;
    };
    let text = |e: &Entry, key: &str| e.details[key].as_str().map(escape).unwrap_or_default();
    for e in entries {
        match e.action {
            Action::ShardAccepted => add("fleetbox_tasks_total", "state=\"accepted\"".into(), 1),
            Action::ShardRejected => add("fleetbox_tasks_total", "state=\"rejected\"".into(), 1),
            Action::ShardDead => add("fleetbox_tasks_total", "state=\"dead\"".into(), 1),
            Action::LeaseExpired => add("fleetbox_lease_expired_total", String::new(), 1),
            Action::AttemptVerified => add(
                "fleetbox_verification_total",
                format!("verdict=\"{}\"", text(e, "verdict")),
                1,
            ),
            Action::AttemptReported => {
                let attempts = e.details["attempts"].as_array().into_iter().flatten();
                for a in attempts.clone() {
                    let status = a["status"].as_str().map(escape).unwrap_or_default();
                    add("fleetbox_runs_total", format!("status=\"{status}\""), 1);
                }
                let violations = attempts.filter_map(|a| a["violations"].as_array());
                for v in violations.flatten() {
                    let kind = v["kind"].as_str().map(escape).unwrap_or_default();
                    add(
                        "fleetbox_sandbox_violations_total",
                        format!("kind=\"{kind}\""),
                        1,
                    );
                }
            }
            Action::ReportRefused => add(
                "fleetbox_reports_refused_total",
                format!("code=\"{}\"", text(e, "code")),
                1,
            ),
            Action::AgentQuarantined => add("fleetbox_agent_quarantines_total", String::new(), 1),
            Action::FollowupCreated => {
                add("fleetbox_followups_total", "outcome=\"created\"".into(), 1)
            }
            Action::FollowupCapped => {
                add("fleetbox_followups_total", "outcome=\"capped\"".into(), 1)
            }
            Action::FollowupFailed => {
                add("fleetbox_followups_total", "outcome=\"failed\"".into(), 1)
            }
            _ => {}
        }
    }
    out
}

/// Add `counted` to the stored counters within `tx` (in key order: two transactions never
/// lock the same rows in opposite orders).
pub(super) async fn bump(
    tx: &mut Tx,
    counted: BTreeMap<(&'static str, String), i64>,
) -> Result<(), StoreError> {
    for ((name, labels), n) in counted {
        Sql::new("INSERT INTO metric_counters (name, labels, value) VALUES (")
            .bind(name)
            .push(", ")
            .bind(labels)
            .push(", ")
            .bind(n)
            .push(
                ") ON CONFLICT (name, labels) DO UPDATE SET value = metric_counters.value + excluded.value",
            )
            .build()
            .execute(&mut **tx)
            .await
            .doing("counting for /metrics")?;
    }
    Ok(())
}

/// Jobs not finished yet: their shards are the queue.
const UNFINISHED: [JobState; 3] = [
    JobState::PendingReview,
    JobState::Running,
    JobState::Aggregating,
];

impl Store {
    /// Everything `/metrics` reads from the database, at `now` (ms): of every tenant, or of
    /// `tenant` alone (its jobs, shards, flags and agents; no counters, which have no
    /// tenant).
    pub async fn stored_metrics(
        &self,
        now: i64,
        tenant: Option<&str>,
    ) -> Result<Stored, StoreError> {
        let age = |t: Option<i64>| t.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        Ok(Stored {
            queue: self.queue_depths(tenant).await?,
            tasks: self.task_counts(tenant).await?,
            agents: self.agent_states(tenant).await?,
            job_age_seconds: age(self.oldest_unfinished(tenant).await?),
            lag_seconds: age(self.oldest_ready(now, tenant).await?),
            executions: self.executions(tenant).await?,
            flags: self.flag_counts(tenant).await?,
            counters: match tenant {
                Some(_) => Vec::new(),
                None => self.counters().await?,
            },
            // Only `/metrics` shows them (the panel's samples do not need them).
            tenants: Vec::new(),
        })
    }

    async fn queue_depths(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        Sql::new(
            "SELECT j.tenant_id, j.priority, CAST(SUM(c.queued) AS BIGINT) FROM jobs j \
             JOIN job_counts c ON c.job_id = j.id WHERE j.state IN (",
        )
        .bind_list(UNFINISHED.map(|s| s.as_str()))
        .push(")")
        .and_eq("j.tenant_id", tenant)
        .push(" GROUP BY j.tenant_id, j.priority ORDER BY j.tenant_id, j.priority")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading queue depths")
    }

    async fn task_counts(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(&'static str, i64)>, StoreError> {
        let columns = [
            "queued", "leased", "reported", "accepted", "rejected", "dead",
        ];
        let mut sql = Sql::new("SELECT ");
        for (i, c) in columns.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.push("CAST(COALESCE(SUM(c.")
                .push(c)
                .push("), 0) AS BIGINT)");
        }
        sql.push(" FROM job_counts c");
        if tenant.is_some() {
            sql.push(" JOIN jobs j ON j.id = c.job_id WHERE 1 = 1")
                .and_eq("j.tenant_id", tenant);
        }
        let row: (i64, i64, i64, i64, i64, i64) = sql
            .build_as()
            .fetch_one(&self.read)
            .await
            .doing("reading task counts")?;
        Ok(columns
            .into_iter()
            .zip([row.0, row.1, row.2, row.3, row.4, row.5])
            .collect())
    }

    async fn agent_states(&self, tenant: Option<&str>) -> Result<Vec<(String, i64)>, StoreError> {
        Sql::new("SELECT state, COUNT(*) FROM agents WHERE 1 = 1")
            .and_eq("tenant_id", tenant)
            .push(" GROUP BY state ORDER BY state")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading agent states")
    }

    async fn oldest_unfinished(&self, tenant: Option<&str>) -> Result<Option<i64>, StoreError> {
        let (oldest,): (Option<i64>,) =
            Sql::new("SELECT MIN(j.created_at) FROM jobs j WHERE j.state IN (")
                .bind_list(UNFINISHED.map(|s| s.as_str()))
                .push(")")
                .and_eq("j.tenant_id", tenant)
                .build_as()
                .fetch_one(&self.read)
                .await
                .doing("reading job ages")?;
        Ok(oldest)
    }

    /// When the oldest shard ready to lease now was queued: queued (not waiting out a retry's
    /// back-off) in a running job that is not paused; walked from the front of
    /// `tasks_waiting`.
    async fn oldest_ready(
        &self,
        now: i64,
        tenant: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let waiting: Option<(i64,)> = Sql::new(
            "SELECT t.updated_at FROM tasks t JOIN jobs j ON j.id = t.job_id \
             WHERE t.state = 'queued' AND t.not_before <= ",
        )
        .bind(now)
        .push(" AND j.state = ")
        .bind(JobState::Running.as_str())
        .push(" AND j.paused = 0")
        .and_eq("j.tenant_id", tenant)
        .push(" ORDER BY t.updated_at LIMIT 1")
        .build_as()
        .fetch_optional(&self.read)
        .await
        .doing("reading the oldest ready shard")?;
        Ok(waiting.map(|(t,)| t))
    }

    /// (agent, result, count) of the agents (of `tenant`).
    async fn executions(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(String, &'static str, i64)>, StoreError> {
        let mut sql = Sql::new(
            "SELECT agent_id, CAST(SUM(results) AS BIGINT), CAST(SUM(errors) AS BIGINT), \
             CAST(SUM(valid) AS BIGINT), CAST(SUM(invalid) AS BIGINT) FROM agent_trust",
        );
        if tenant.is_some() {
            sql.push(" WHERE agent_id IN (SELECT id FROM agents WHERE 1 = 1")
                .and_eq("tenant_id", tenant)
                .push(")");
        }
        let trust: Vec<(String, i64, i64, i64, i64)> = sql
            .push(" GROUP BY agent_id ORDER BY agent_id")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading agent results")?;
        Ok(trust
            .into_iter()
            .flat_map(|(agent, results, errors, valid, invalid)| {
                [
                    ("reported", results),
                    ("infrastructure_error", errors),
                    ("valid", valid),
                    ("invalid", invalid),
                ]
                .map(|(r, n)| (agent.clone(), r, n))
            })
            .collect())
    }

    async fn flag_counts(&self, tenant: Option<&str>) -> Result<Vec<(String, i64)>, StoreError> {
        Sql::new("SELECT kind, COUNT(*) FROM review_flags WHERE 1 = 1")
            .and_eq("tenant_id", tenant)
            .push(" GROUP BY kind ORDER BY kind")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading review flags")
    }

    async fn counters(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        Sql::new("SELECT name, labels, value FROM metric_counters ORDER BY name, labels")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading counters")
    }
}
