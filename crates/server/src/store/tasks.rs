//! Tasks (shards): leasing, heartbeats, expiry and retries. Reports are `store::reports`.
//!
//! Each lease call and each report batch is one transaction with a constant number of
//! statements, whatever the batch size: that is what makes thousands of tasks a second
//! possible on a single SQLite writer.

use std::collections::HashSet;

use fleetbox_proto::TaskState;
use sqlx::Row;

use super::audit::{Action, Entry};
use super::fair;
use super::settle::{self, Asked, LeaseEnd, LeaseGrant, Shard, Tally, Tx, Want};
use super::sql::Sql;
use super::{Doing, Store, StoreError, now_ms};

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

/// A lease found expired (or its agent lost).
#[derive(sqlx::FromRow)]
struct Expired {
    id: i64,
    tenant_id: String,
    job_id: String,
    #[sqlx(try_from = "i64")]
    attempts: u32,
    #[sqlx(try_from = "i64")]
    max_attempts: u32,
    lease_id: Option<String>,
    agent_id: Option<String>,
}

/// One `shard.leased` entry per job in this call, in its tenant's log, naming each shard it
/// handed out (task, shard index, attempt, lease): a lease call of 500 shards is one entry,
/// not 500, on the hot path.
fn leased_entries(grants: &[LeaseGrant], agent_id: &str, expires: i64) -> Vec<Entry> {
    let actor = format!("agent:{agent_id}");
    let mut by_job: std::collections::BTreeMap<(&str, &str), Vec<serde_json::Value>> =
        Default::default();
    for g in grants {
        by_job
            .entry((g.tenant_id.as_str(), g.job_id.as_str()))
            .or_default()
            .push(serde_json::json!([
                g.task_id,
                g.shard_index,
                g.attempt,
                g.lease_id,
            ]));
    }
    by_job
        .into_iter()
        .map(|((tenant, job_id), shards)| {
            let one = (shards.len() == 1).then(|| &shards[0]);
            let mut entry = Entry::new(tenant, actor.as_str(), Action::ShardLeased)
                .job(job_id)
                .agent(agent_id);
            // A single shard is also named as the entry's task and lease.
            if let Some(one) = one {
                if let Some(task) = one[0].as_i64() {
                    entry = entry.task(task);
                }
                if let Some(lease) = one[3].as_str() {
                    entry = entry.lease(lease);
                }
            }
            entry.details(serde_json::json!({
                "expires": expires,
                "shards": shards,
            }))
        })
        .collect()
}

impl Store {
    /// Lease up to `max` ready tasks to `agent_id` (of tenant `tenant_id`) until `expires`:
    /// shards its pool serves, shared fairly between tenants (see `fair.rs`).
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

    /// [`Store::lease`] for an enrolled agent that asks for some shards only (its sandbox
    /// backend, server-only code), leaving out the tenants in `blocked` (past a cap of the
    /// day). An agent with no row gets nothing.
    pub async fn lease_with(
        &self,
        agent_id: &str,
        want: Want<'_>,
        max: u32,
        expires: i64,
        lease_prefix: &str,
        blocked: &[String],
    ) -> Result<Vec<LeaseGrant>, StoreError> {
        let asked = Asked {
            tenant: "",
            pool: "",
            agent: agent_id,
            want,
            max,
            expires,
            lease_prefix,
        };
        self.lease_inner(asked, blocked, now_ms()).await
    }

    /// Whether a shard is queued that `agent_id` could take now, by a read alone (its
    /// tenant's share aside): an idle agent's long poll asks this, and opens a write
    /// transaction only when it says yes.
    pub async fn has_runnable(&self, agent_id: &str, want: Want<'_>) -> Result<bool, StoreError> {
        let now = now_ms();
        // The tenants with ready shards first, then each one's check naming it: with a schema
        // per tenant, a check naming no tenant is planned over every tenant's partitions.
        let tenants: Vec<(String,)> = sqlx::query_as(
            "SELECT t.id FROM tenants t WHERE EXISTS (SELECT 1 FROM tasks k \
             WHERE k.tenant_id = t.id AND k.state = $1 AND k.not_before <= $2)",
        )
        .bind(TaskState::Queued.as_str())
        .bind(now)
        .fetch_all(&self.read)
        .await
        .doing("looking for work")?;
        for (tenant,) in &tenants {
            let mut sql = Sql::new("SELECT 1 FROM tasks WHERE tenant_id = ");
            sql.bind(tenant.as_str())
                .push(" AND state = ")
                .bind(TaskState::Queued.as_str());
            settle::runnable_by(&mut sql, agent_id, tenant, &want, now);
            sql.push(" LIMIT 1");
            let found = sql
                .build()
                .fetch_optional(&self.read)
                .await
                .doing("looking for work")?;
            if found.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether any shard is queued and past its back-off (for anyone): the scheduler's watch.
    pub async fn has_ready_work(&self, now: i64) -> Result<bool, StoreError> {
        super::sql::exists_at(
            &self.read,
            "SELECT 1 FROM tasks WHERE state = $1 AND not_before <= $2 LIMIT 1",
            TaskState::Queued.as_str(),
            now,
            "looking for ready work",
        )
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
        let asked = Asked {
            tenant: tenant_id,
            pool: "",
            agent: agent_id,
            want: Want::default(),
            max,
            expires,
            lease_prefix,
        };
        self.lease_inner(asked, &[], now).await
    }

    async fn lease_inner(
        &self,
        asked: Asked<'_>,
        blocked: &[String],
        now: i64,
    ) -> Result<Vec<LeaseGrant>, StoreError> {
        let agent_id = asked.agent;
        let mut tx = self.begin_write().await.doing("leasing tasks")?;
        let mut tally = Tally::default();
        let grants = self
            .grant(&mut tx, &mut tally, &asked, blocked, now)
            .await?;
        for chunk in grants.chunks(self.rows_per_statement(6)) {
            let mut sql = Sql::new(
                "INSERT INTO leases (id, tenant_id, task_id, agent_id, attempt, issued_at) VALUES ",
            );
            sql.push_rows(chunk, |row, g| {
                row.bind(g.lease_id.as_str())
                    .bind(g.tenant_id.as_str())
                    .bind(g.task_id)
                    .bind(agent_id)
                    .bind(i64::from(g.attempt))
                    .bind(now);
            });
            sql.build()
                .execute(&mut *tx)
                .await
                .doing("recording leases")?;
        }
        tally.apply(&mut tx).await?;
        let entries = leased_entries(&grants, agent_id, asked.expires);
        // Taking work is a sign of life: recorded in the same transaction. (A poll that takes
        // nothing writes nothing: see `agent_polls`.)
        if !grants.is_empty() {
            self.agent_seen(&mut tx, agent_id, &asked.want, now).await?;
        }
        // The audit chain's head is locked last in every transaction (no lock waits behind it).
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("leasing tasks")?;
        Ok(grants)
    }

    /// Up to `asked.max` shards for the agent: from the tenants its pool serves, the one
    /// furthest behind its share first (see `fair.rs`). An agent with no row (the store's own
    /// tests) serves its tenant alone.
    async fn grant(
        &self,
        tx: &mut Tx,
        tally: &mut Tally,
        asked: &Asked<'_>,
        blocked: &[String],
        now: i64,
    ) -> Result<Vec<LeaseGrant>, StoreError> {
        let pool = fair::pool_of(tx, asked.agent)
            .await?
            .unwrap_or_else(|| fair::PoolOf {
                name: super::DEFAULT_TENANT.to_string(),
                owner: asked.tenant.to_string(),
                shared: false,
            });
        let mut claims = fair::claims(tx, &pool, blocked).await?;
        let mut grants = Vec::new();
        let mut left = asked.max;
        while left > 0 {
            let Some((i, n)) = fair::next(&claims, left) else {
                break;
            };
            let one = Asked {
                tenant: &claims[i].tenant,
                pool: &pool.name,
                max: n,
                ..*asked
            };
            let got = settle::lease(tx, tally, self.kind, &one, now).await?;
            let taken = u32::try_from(got.len()).unwrap_or(u32::MAX);
            if taken < n {
                // Nothing more of this tenant's for this agent now.
                claims.swap_remove(i);
            } else {
                claims[i].running += i64::from(taken);
            }
            left = left.saturating_sub(taken);
            grants.extend(got);
        }
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
        let rows = Sql::new("UPDATE tasks SET lease_expires = ")
            .bind(expires)
            .push(" WHERE id IN (SELECT id FROM tasks WHERE state = ")
            .bind(TaskState::Leased.as_str())
            .push(" AND agent_id = ")
            .bind(agent_id)
            .push(" AND lease_id IN (")
            .bind_list(running.iter().map(String::as_str))
            .push(")")
            .push(settle::in_id_order(self.kind))
            .push(" RETURNING lease_id")
            .build()
            .fetch_all(self.writer())
            .await
            .doing("extending leases")?;
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
        self.requeue_leases(agent_id, leases, None).await
    }

    /// An agent restarted in place: every lease it still holds except `keep` (those whose
    /// reports wait in its outbox) died with its previous run. They are queued at once
    /// (the attempt counts: a shard that crashed its agent must not retry for ever).
    pub async fn return_lost_runs(
        &self,
        agent_id: &str,
        keep: &[String],
    ) -> Result<u64, StoreError> {
        let held: Vec<(Option<String>,)> = Sql::new("SELECT lease_id FROM tasks WHERE state = ")
            .bind(TaskState::Leased.as_str())
            .push(" AND agent_id = ")
            .bind(agent_id)
            .build_as()
            .fetch_all(&self.write)
            .await
            .doing("finding an agent's leases")?;
        let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
        let lost: Vec<String> = held
            .into_iter()
            .filter_map(|(l,)| l)
            .filter(|l| !keep.contains(l.as_str()))
            .collect();
        self.requeue_leases(
            agent_id,
            &lost,
            Some("its agent restarted while running it"),
        )
        .await
    }

    /// Queue the tasks `agent_id` holds under `leases` again and close those leases, in one
    /// transaction (see [`settle::requeue`]).
    async fn requeue_leases(
        &self,
        agent_id: &str,
        leases: &[String],
        why: Option<&str>,
    ) -> Result<u64, StoreError> {
        if leases.is_empty() {
            return Ok(0);
        }
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("returning leases")?;
        let mut tally = Tally::default();
        let mut returned = Vec::new();
        for chunk in leases.chunks(self.rows_per_statement(1)) {
            returned.extend(settle::requeue(&mut tx, &mut tally, agent_id, chunk, why, now).await?);
        }
        tally.apply(&mut tx).await?;
        // One entry in each tenant's log whose shards came back (an agent of a shared pool
        // holds several tenants' shards).
        let mut by_tenant: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
        for (tenant, task) in &returned {
            by_tenant.entry(tenant.as_str()).or_default().push(*task);
        }
        let entries = by_tenant
            .into_iter()
            .map(|(tenant, tasks)| {
                Entry::new(tenant, format!("agent:{agent_id}"), Action::LeaseReturned)
                    .agent(agent_id)
                    .details(serde_json::json!({
                        "returned": tasks.len(),
                        "tasks": tasks.iter().take(1000).collect::<Vec<_>>(),
                        "why": why.unwrap_or("handed back unrun"),
                    }))
            })
            .collect();
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("returning leases")?;
        Ok(returned.len() as u64)
    }

    /// Queued shards that agents refused and that no online agent would take any more (the
    /// ones that would have left, or stopped keeping sessions): `rejected`, saying so, rather
    /// than waiting for ever. At most 1,000 a sweep. Returns the jobs now ready to fold.
    pub async fn reject_unrunnable(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let refused: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, tenant_id, job_id FROM tasks WHERE state = $1 AND refusals > 0 \
             ORDER BY id LIMIT 1000",
        )
        .bind(TaskState::Queued.as_str())
        .fetch_all(&self.read)
        .await
        .doing("finding refused shards")?;
        if refused.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await.doing("rejecting refused shards")?;
        let jobs: Vec<String> = refused.iter().map(|(_, _, j)| j.clone()).collect();
        settle::lock_jobs(&mut tx, self.kind, &jobs).await?;
        let mut tally = Tally::default();
        let mut entries = Vec::new();
        let why = "refused by every agent that could run it; no other agent would take it";
        for (id, tenant, job) in &refused {
            if settle::anyone_else_would_run(&mut tx, *id, "").await? {
                continue;
            }
            let shard = Shard {
                id: *id,
                tenant,
                job_id: job,
            };
            if settle::reject_queued(&mut tx, &mut tally, shard, why, now).await? {
                entries.push(
                    Entry::new(tenant, "server", Action::ShardRejected)
                        .job(job)
                        .task(*id)
                        .details(serde_json::json!({ "reason": why })),
                );
            }
        }
        let ready = tally.apply(&mut tx).await?;
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("rejecting refused shards")?;
        Ok(ready)
    }

    /// Requeue (or kill, past `max_attempts`) the tasks whose lease expired or whose agent was
    /// lost. Returns what changed and the jobs whose last shard just settled.
    pub async fn expire_leases(
        &self,
        now: i64,
        lost_agents: &[String],
        backoff_base_ms: u64,
    ) -> Result<(Vec<Requeued>, Vec<String>), StoreError> {
        // Read first: a sweep with no lease run out writes nothing.
        if lost_agents.is_empty() {
            let due = super::sql::exists_at(
                &self.read,
                "SELECT 1 FROM tasks WHERE state = $1 AND lease_expires < $2 LIMIT 1",
                TaskState::Leased.as_str(),
                now,
                "finding expired leases",
            )
            .await?;
            if !due {
                return Ok((Vec::new(), Vec::new()));
            }
        }
        let mut tx = self.begin_write().await.doing("expiring leases")?;
        let mut sql = Sql::new(
            "SELECT id, tenant_id, job_id, attempts, max_attempts, lease_id, agent_id FROM tasks WHERE state = ",
        );
        sql.bind(TaskState::Leased.as_str())
            .push(" AND (lease_expires < ")
            .bind(now);
        if !lost_agents.is_empty() {
            sql.push(" OR agent_id IN (")
                .bind_list(lost_agents.iter().map(String::as_str))
                .push(")");
        }
        sql.push(")");
        let expired: Vec<Expired> = sql
            .build_as()
            .fetch_all(&mut *tx)
            .await
            .doing("finding expired leases")?;
        let jobs: Vec<String> = expired.iter().map(|e| e.job_id.clone()).collect();
        settle::lock_jobs(&mut tx, self.kind, &jobs).await?;
        let mut tally = Tally::default();
        let mut changed = Vec::new();
        let mut entries = Vec::new();
        for e in expired {
            let agent = e.agent_id.unwrap_or_default();
            let why = if lost_agents.contains(&agent) {
                format!("agent `{agent}` stopped heartbeating")
            } else {
                format!("lease on agent `{agent}` expired")
            };
            let dead = e.attempts >= e.max_attempts;
            let (to, reason) = if dead {
                let why = format!("{why} (after {} attempts)", e.attempts);
                (TaskState::Dead, why)
            } else {
                (TaskState::Queued, why)
            };
            let at = now + backoff_ms(backoff_base_ms, e.attempts);
            let shard = Shard {
                id: e.id,
                tenant: &e.tenant_id,
                job_id: &e.job_id,
            };
            let lease = e.lease_id.unwrap_or_default();
            // A report (or another coordinator's sweep) may have settled it since the read.
            let end = LeaseEnd {
                to,
                not_before: at,
                reason: &reason,
            };
            if settle::release(&mut tx, &mut tally, shard, &lease, end, now).await? {
                let entry = |action| {
                    Entry::new(&e.tenant_id, "server", action)
                        .job(&e.job_id)
                        .task(e.id)
                        .lease(&lease)
                        .agent(&agent)
                };
                entries.push(entry(Action::LeaseExpired).details(serde_json::json!({
                    "agent_lost": lost_agents.contains(&agent),
                })));
                let action = if dead {
                    Action::ShardDead
                } else {
                    Action::ShardRequeued
                };
                entries.push(entry(action).details(serde_json::json!({ "reason": reason })));
                changed.push(Requeued {
                    task_id: e.id,
                    job_id: e.job_id,
                    dead,
                });
            }
        }
        let ready = tally.apply(&mut tx).await?;
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("expiring leases")?;
        Ok((changed, ready))
    }
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
    use fleetbox_proto::{Limits, Reducer, Status};

    use super::*;
    use crate::store::{NewJob, ReportInput, ReportPolicy, Reported, SettleOutcome, ShardPage};

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
                success_needed: 1.0,
                inputs: vec![serde_json::json!(1), serde_json::json!(2)],
                actor: "admin:test".into(),
                environment: None,
                files: Default::default(),
                backend: None,
                pool: None,
                review: None,
                has_rules: false,
                lineage: None,
                rerun_of: None,
                traceparent: None,
                session: None,
                verify: fleetbox_proto::VerifySpec {
                    recheck: fleetbox_proto::Recheck::None,
                    ..Default::default()
                },
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
                .all(|s| s.state == TaskState::Queued && s.attempts == 1)
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
            blobs: Vec::new(),
            lease_id: first[0].lease_id.clone(),
            task_id: first[0].task_id,
            attempt: first[0].attempt,
            python: "3".into(),
            backend: "process".into(),
            stdout_sha256: String::new(),
            signature: None,
            status: Status::Ok,
            reason: None,
            output: Some("1".into()),
            output_blob: None,
            output_sha256: None,
            report_json: "{}".into(),
            stdout_blob: None,
            stderr_blob: None,
            wall_ms: 1,
            cpu_ms: 1,
            peak_memory: 1,
            bytes_out: 0,
            audit: serde_json::json!({"status": "ok"}),
        };
        let Reported {
            outcomes, ready, ..
        } = store
            .report(
                "agt_a",
                &[report],
                ReportPolicy {
                    backoff_base_ms: 1000,
                    strikes_limit: 2,
                },
            )
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
                    state: Some(TaskState::Leased),
                },
            )
            .await
            .unwrap();
        assert_eq!(shards.len(), 1);
        assert_eq!(shards[0].agent_id.as_deref(), Some("agt_b"));
    }
}
