//! Reports: a batch of agents' results stored and their shards settled, in one transaction
//! with a constant number of statements whatever the batch size (what makes thousands of
//! tasks a second possible on a single SQLite writer).
//!
//! The steps, in order: which leases are real, open and the reporter's; the shards they are
//! for, their jobs locked; every attempt stored once; each shard settled in report order (a
//! success accepted, held for a check or put to its replicas; a failure rejected or held for a
//! check; an infrastructure failure retried); then the chosen attempts, the counters, the holds
//! for violations, the reporter's trust and the audit entries.

use std::collections::{BTreeMap, HashMap, HashSet};

use fleetbox_proto::{Status, TaskState};

use super::audit::{Action, Entry};
use super::settle::{self, LeaseEnd, Shard, Tally, storable_text};
use super::sql::Sql;
use super::tasks::backoff_ms;
use super::verify::ReporterTrust;
use super::{Doing, Store, StoreError, now_ms};

/// A report as the store keeps it (blobs already written by the caller).
#[derive(Debug, Clone)]
pub struct ReportInput {
    pub lease_id: String,
    pub task_id: i64,
    /// The attempt the (signed) report names: it must be the lease's.
    pub attempt: u32,
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
    pub cpu_ms: i64,
    pub peak_memory: i64,
    pub bytes_out: i64,
    /// What the audit log keeps of the run (status, timings, files, violations).
    pub audit: serde_json::Value,
    /// The interpreter and backend it ran on (trust is kept per pair).
    pub python: String,
    pub backend: String,
    pub stdout_sha256: String,
    /// The agent's signature over the report, kept with the attempt.
    pub signature: Option<String>,
    /// Every blob it names (streams, output, files kept) and its size: owned by the shard's
    /// tenant once the attempt is stored.
    pub blobs: Vec<(String, u64)>,
}

/// How reports are settled: the coordinator's settings that matter to it.
#[derive(Debug, Clone, Copy)]
pub struct ReportPolicy {
    /// The first retry's delay; doubled per attempt.
    pub backoff_base_ms: u64,
    /// Invalid results after which an agent is quarantined.
    pub strikes_limit: i64,
}

/// What [`Store::report`] did.
#[derive(Debug, Default)]
pub struct Reported {
    /// Per report, in order.
    pub outcomes: Vec<SettleOutcome>,
    /// Jobs whose last shard just settled.
    pub ready: Vec<String>,
    /// Agents quarantined by a quorum that outvoted them.
    pub quarantined: Vec<String>,
    /// Jobs held for a person after a trusted agent's sandbox violation.
    pub held: Vec<String>,
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

/// What a report's status means for its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Accept,
    /// The program failed on its own: final.
    Reject,
    /// The infrastructure failed (sandbox error, killed from outside): run it again.
    Retry,
    /// The agent's own policy refused to run it: another agent may (a refusal is not a
    /// result, so a signed agent cannot fail shards at will by refusing them).
    Refuse,
}

fn disposition(status: Status) -> Disposition {
    match status {
        Status::Ok => Disposition::Accept,
        Status::SandboxError | Status::Killed => Disposition::Retry,
        Status::Refused => Disposition::Refuse,
        _ => Disposition::Reject,
    }
}

/// A reported shard's row as read before settling it.
#[derive(sqlx::FromRow)]
struct ReportedTask {
    id: i64,
    /// The shard's tenant: an agent of a shared pool runs shards of several.
    tenant_id: String,
    job_id: String,
    shard_index: i64,
    /// Distinct agents that run it (`verify.replicas`).
    replicas: i64,
    lease_id: Option<String>,
    #[sqlx(try_from = "i64")]
    attempts: u32,
    #[sqlx(try_from = "i64")]
    max_attempts: u32,
    /// The job's `[verify]` (JSON; `None` = defaults).
    verify: Option<String>,
}

/// A lease as a report is checked against it.
#[derive(sqlx::FromRow)]
struct LeaseRow {
    id: String,
    task_id: i64,
    agent_id: String,
    #[sqlx(try_from = "i64")]
    attempt: u32,
    issued_at: i64,
}

/// What an agent claims a run took, bounded by what the coordinator saw: the time from the
/// lease's issue to the report's arrival (a run cannot outlast the lease it ran under).
fn seen_wall_ms(claimed: i64, issued_at: i64, now: i64) -> i64 {
    claimed.clamp(0, (now - issued_at).max(0))
}

impl Store {
    /// Store a batch of reports from `agent_id` and settle their shards. Returns each report's
    /// outcome and the jobs whose last shard just settled.
    pub async fn report(
        &self,
        agent_id: &str,
        reports: &[ReportInput],
        policy: ReportPolicy,
    ) -> Result<Reported, StoreError> {
        let mut outcomes = vec![SettleOutcome::Unknown; reports.len()];
        if reports.is_empty() {
            return Ok(Reported {
                outcomes,
                ..Default::default()
            });
        }
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("storing reports")?;
        let leases = open_leases(&mut tx, agent_id, reports).await?;
        let valid: Vec<usize> = (0..reports.len())
            .filter(|&i| {
                leases.get(&reports[i].lease_id).is_some_and(|l| {
                    l.task_id == reports[i].task_id && l.attempt == reports[i].attempt
                })
            })
            .collect();
        if valid.is_empty() {
            tx.commit().await.doing("storing reports")?;
            return Ok(Reported {
                outcomes,
                ..Default::default()
            });
        }
        let tasks = reported_tasks(&mut tx, valid.iter().map(|&i| reports[i].task_id)).await?;
        let jobs: Vec<String> = tasks.values().map(|t| t.job_id.clone()).collect();
        settle::lock_jobs(&mut tx, self.kind, &jobs).await?;
        let ids: Vec<i64> = tasks.keys().copied().collect();
        settle::lock_tasks(&mut tx, &ids).await?;
        let valid: Vec<usize> = valid
            .into_iter()
            .filter(|i| tasks.contains_key(&reports[*i].task_id))
            .collect();
        let stored = StoredAttempts {
            agent_id,
            reports,
            rows: &valid,
            tasks: &tasks,
            leases: &leases,
            now,
        };
        let inserted = self.store_attempts(&mut tx, &stored).await?;
        let owned: Vec<super::tenants::BlobRef> = valid
            .iter()
            .map(|&i| &reports[i])
            .filter(|r| inserted.contains_key(&r.lease_id))
            .flat_map(|r| {
                let task = &tasks[&r.task_id];
                r.blobs.iter().map(move |(h, n)| super::tenants::BlobRef {
                    tenant: &task.tenant_id,
                    job_id: &task.job_id,
                    sha256: h,
                    bytes: *n,
                })
            })
            .collect();
        self.own_blob_rows(&mut tx, &owned, now).await?;

        // Settle shards, in report order. Each transition is a guarded update whose row count
        // says whether it happened: two transactions racing for one shard (a late and the
        // current report, a report and an expiry, a report and a cancel) cannot both win, and
        // only a transition that happened moves the job's counters.
        let trust = ReporterTrust::read(&mut tx, agent_id, self.trusted_after).await?;
        let mut run = Settling {
            agent_id,
            actor: format!("agent:{agent_id}"),
            policy,
            now,
            tally: Tally::default(),
            chosen: Vec::new(),
            quarantined: Vec::new(),
            violations: Vec::new(),
            entries: Vec::new(),
        };
        for &i in &valid {
            let r = &reports[i];
            outcomes[i] = match inserted.get(&r.lease_id) {
                None => SettleOutcome::Duplicate,
                Some(&attempt_id) => {
                    let task = &tasks[&r.task_id];
                    let check = trust.check_reason(task.verify.as_deref(), r);
                    let taken = run.settle(&mut tx, task, r, attempt_id, check).await?;
                    if taken {
                        SettleOutcome::Accepted
                    } else {
                        SettleOutcome::Late
                    }
                }
            };
        }
        self.choose_attempts(&mut tx, &run.chosen).await?;
        let ready = run.tally.apply(&mut tx).await?;
        // A violation taken on a trusted agent's word holds the rest of its job, with its
        // flag, in the report's own transaction.
        let mut held = Vec::new();
        for (task_id, why) in std::mem::take(&mut run.violations) {
            let tenant = tasks[&task_id].tenant_id.as_str();
            let (job, entry) =
                super::review::hold_for_violation(&mut tx, tenant, task_id, agent_id, why, now)
                    .await?;
            held.extend(job);
            run.entries.extend(entry);
        }
        // The agent's results and infrastructure failures (its error rate), after the
        // counters and before the audit head, as the lock order has it.
        let counted: Vec<&ReportInput> = valid
            .iter()
            .map(|&i| &reports[i])
            .filter(|r| inserted.contains_key(&r.lease_id))
            .collect();
        ReporterTrust::count(&mut tx, agent_id, &counted, now).await?;
        let mut log = reported_entries(&stored, &inserted, &run.actor);
        log.append(&mut run.entries);
        self.append_audit(&mut tx, log, now).await?;
        tx.commit().await.doing("storing reports")?;
        Ok(Reported {
            outcomes,
            ready,
            quarantined: run.quarantined,
            held,
        })
    }

    /// Store every attempt once; a conflict on the lease id means a duplicate. Returns the
    /// new attempts' ids by lease.
    async fn store_attempts(
        &self,
        tx: &mut settle::Tx,
        s: &StoredAttempts<'_>,
    ) -> Result<HashMap<String, i64>, StoreError> {
        let mut inserted = HashMap::new();
        for chunk in s.rows.chunks(self.rows_per_statement(21)) {
            let mut sql = Sql::new(
                "INSERT INTO attempts (tenant_id, task_id, job_id, lease_id, agent_id, attempt, status, late, \
                 output, output_blob, output_sha256, report, stdout_blob, stderr_blob, wall_ms, peak_memory, \
                 bytes_out, received_at, stdout_sha256, signature, cpu_ms) VALUES ",
            );
            sql.push_rows(chunk, |row, &i| {
                let r = &s.reports[i];
                let task = &s.tasks[&r.task_id];
                let lease = &s.leases[&r.lease_id];
                let late = task.lease_id.as_deref() != Some(r.lease_id.as_str());
                row.bind(task.tenant_id.as_str())
                    .bind(r.task_id)
                    .bind(task.job_id.as_str())
                    .bind(r.lease_id.as_str())
                    .bind(s.agent_id)
                    .bind(i64::from(lease.attempt))
                    .bind(r.status.as_str())
                    .bind(i64::from(late))
                    .bind(r.output.as_deref())
                    .bind(r.output_blob.as_deref())
                    .bind(r.output_sha256.as_deref())
                    .bind(r.report_json.as_str())
                    .bind(r.stdout_blob.as_deref())
                    .bind(r.stderr_blob.as_deref())
                    .bind(seen_wall_ms(r.wall_ms, lease.issued_at, s.now))
                    .bind(r.peak_memory)
                    .bind(r.bytes_out)
                    .bind(s.now)
                    .bind(r.stdout_sha256.as_str())
                    .bind(r.signature.as_deref())
                    .bind(r.cpu_ms);
            });
            // A lease already reported is the one unique key a new attempt can hit (its id is
            // new); no target, since with a schema per tenant that key is (lease_id, tenant_id).
            sql.push(" ON CONFLICT DO NOTHING RETURNING id, lease_id");
            let rows: Vec<(i64, String)> = sql
                .build_as()
                .fetch_all(&mut **tx)
                .await
                .doing("storing attempts")?;
            inserted.extend(rows.into_iter().map(|(id, lease)| (lease, id)));
        }
        Ok(inserted)
    }

    /// Mark the attempts whose values their shards took.
    async fn choose_attempts(&self, tx: &mut settle::Tx, chosen: &[i64]) -> Result<(), StoreError> {
        for chunk in chosen.chunks(self.rows_per_statement(1)) {
            Sql::new("UPDATE attempts SET chosen = 1 WHERE id IN (")
                .bind_list(chunk.iter().copied())
                .push(")")
                .build()
                .execute(&mut **tx)
                .await
                .doing("choosing attempts")?;
        }
        Ok(())
    }
}

/// Which of the reports' leases are real, open and `agent_id`'s, by id.
async fn open_leases(
    tx: &mut settle::Tx,
    agent_id: &str,
    reports: &[ReportInput],
) -> Result<HashMap<String, LeaseRow>, StoreError> {
    Ok(Sql::new(
        "SELECT id, task_id, agent_id, attempt, issued_at FROM leases WHERE closed = 0 AND id IN (",
    )
    .bind_list(reports.iter().map(|r| r.lease_id.as_str()))
    .push(")")
    .build_as::<LeaseRow>()
    .fetch_all(&mut **tx)
    .await
    .doing("checking leases")?
    .into_iter()
    .filter(|l| l.agent_id == agent_id)
    .map(|l| (l.id.clone(), l))
    .collect())
}

/// The shards of `task_ids` with their jobs' `[verify]`, by id.
async fn reported_tasks(
    tx: &mut settle::Tx,
    task_ids: impl Iterator<Item = i64>,
) -> Result<HashMap<i64, ReportedTask>, StoreError> {
    let ids: HashSet<i64> = task_ids.collect();
    Ok(Sql::new(
        "SELECT t.id, t.tenant_id, t.job_id, t.shard_index, t.lease_id, t.attempts, t.max_attempts, \
         t.replicas, j.verify FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id IN (",
    )
    .bind_list(ids)
    .push(")")
    .build_as::<ReportedTask>()
    .fetch_all(&mut **tx)
    .await
    .doing("reading shards")?
    .into_iter()
    .map(|t| (t.id, t))
    .collect())
}

/// What storing a batch's attempts reads.
struct StoredAttempts<'a> {
    agent_id: &'a str,
    reports: &'a [ReportInput],
    /// Indexes of the reports with an open lease of this agent, for a known shard.
    rows: &'a [usize],
    tasks: &'a HashMap<i64, ReportedTask>,
    leases: &'a HashMap<String, LeaseRow>,
    now: i64,
}

/// What the agent reported: one `attempt.reported` entry per job per call, each attempt with
/// its task, lease and run summary (like `shard.leased`: a task costs one entry on the hot
/// path, its `shard.accepted`, not two). The settle entries follow them.
fn reported_entries(
    s: &StoredAttempts<'_>,
    inserted: &HashMap<String, i64>,
    actor: &str,
) -> Vec<Entry> {
    let mut by_job: BTreeMap<(&str, &str), Vec<serde_json::Value>> = BTreeMap::new();
    for &i in s.rows {
        let r = &s.reports[i];
        if !inserted.contains_key(&r.lease_id) {
            continue;
        }
        let task = &s.tasks[&r.task_id];
        let mut attempt = r.audit.clone();
        if let Some(fields) = attempt.as_object_mut() {
            fields.insert("task".into(), task.id.into());
            fields.insert("lease".into(), r.lease_id.as_str().into());
            fields.insert("attempt".into(), r.attempt.into());
        }
        by_job
            .entry((task.tenant_id.as_str(), task.job_id.as_str()))
            .or_default()
            .push(attempt);
    }
    by_job
        .into_iter()
        .map(|((tenant, job_id), attempts)| {
            let mut entry = Entry::new(tenant, actor, Action::AttemptReported)
                .job(job_id)
                .agent(s.agent_id);
            // A single attempt is also named as the entry's task and lease.
            if let [one] = attempts.as_slice() {
                if let Some(task) = one["task"].as_i64() {
                    entry = entry.task(task);
                }
                if let Some(lease) = one["lease"].as_str() {
                    entry = entry.lease(lease);
                }
            }
            entry.details(serde_json::json!({ "attempts": attempts }))
        })
        .collect()
}

/// The report transaction's running state while it settles shards.
struct Settling<'a> {
    agent_id: &'a str,
    actor: String,
    policy: ReportPolicy,
    now: i64,
    tally: Tally,
    /// Attempts whose values their shards took.
    chosen: Vec<i64>,
    /// Agents a quorum outvoted to their strike limit.
    quarantined: Vec<String>,
    /// Violations taken on a trusted agent's word: (task, why).
    violations: Vec<(i64, Option<&'a str>)>,
    entries: Vec<Entry>,
}

impl<'a> Settling<'a> {
    /// Settle one stored report's shard as its status and `check` say; whether this report
    /// is the one that moved it (`false`: late, settled or re-leased meanwhile).
    async fn settle(
        &mut self,
        tx: &mut settle::Tx,
        task: &ReportedTask,
        r: &'a ReportInput,
        attempt_id: i64,
        check: Option<&'static str>,
    ) -> Result<bool, StoreError> {
        let shard = Shard {
            id: task.id,
            tenant: &task.tenant_id,
            job_id: &task.job_id,
        };
        // Only labels a success; the guards decide.
        let current = task.lease_id.as_deref() == Some(r.lease_id.as_str());
        let reason = r
            .reason
            .as_deref()
            .map(storable_text)
            .unwrap_or_else(|| r.status.as_str().to_string());
        let now = self.now;
        match (disposition(r.status), check) {
            (Disposition::Accept, _) if task.replicas > 1 => self
                .accept_replica(tx, task, r)
                .await
                .map(|moved| moved && current),
            (Disposition::Accept, Some(why)) => {
                // Held in `reported` until the coordinator's own run has checked it.
                let done = settle::hold_for_check(tx, &mut self.tally, shard, now).await?;
                if done {
                    self.push(
                        task,
                        r,
                        Action::ShardChecking,
                        serde_json::json!({
                            "output_sha256": r.output_sha256,
                            "late": !current,
                            "why": why,
                        }),
                    );
                }
                Ok(done && current)
            }
            (Disposition::Accept, None) => {
                let done = settle::accept(tx, &mut self.tally, shard, now).await?;
                if done {
                    self.chosen.push(attempt_id);
                    self.push(
                        task,
                        r,
                        Action::ShardAccepted,
                        serde_json::json!({
                            "output_sha256": r.output_sha256,
                            "late": !current,
                            "verified": false,
                        }),
                    );
                }
                // A late success that settles a re-queued shard is still late.
                Ok(done && current)
            }
            (Disposition::Reject, Some(why)) => {
                // Rejected on the agent's word only once the coordinator's own run agrees.
                let done = settle::hold_failure_for_check(
                    tx,
                    &mut self.tally,
                    shard,
                    &r.lease_id,
                    attempt_id,
                    &reason,
                    now,
                )
                .await?;
                if done {
                    self.push(
                        task,
                        r,
                        Action::ShardChecking,
                        serde_json::json!({
                            "status": r.status.as_str(),
                            "reason": reason,
                            "why": why,
                        }),
                    );
                }
                Ok(done)
            }
            (Disposition::Reject, None) => {
                let done =
                    settle::reject(tx, &mut self.tally, shard, &r.lease_id, &reason, now).await?;
                if done {
                    self.push(
                        task,
                        r,
                        Action::ShardRejected,
                        serde_json::json!({ "reason": reason }),
                    );
                    if r.status == Status::SandboxViolation {
                        self.violations.push((task.id, r.reason.as_deref()));
                    }
                }
                Ok(done)
            }
            (Disposition::Retry, _) => self.retry(tx, task, r, reason).await,
            (Disposition::Refuse, _) => self.refused(tx, task, r, reason).await,
        }
    }

    /// The agent refused to run the shard: it goes to another agent (never back to this
    /// one, the attempt not counted), or is `rejected` when no other agent could take it.
    async fn refused(
        &mut self,
        tx: &mut settle::Tx,
        task: &ReportedTask,
        r: &ReportInput,
        reason: String,
    ) -> Result<bool, StoreError> {
        let shard = Shard {
            id: task.id,
            tenant: &task.tenant_id,
            job_id: &task.job_id,
        };
        let now = self.now;
        let why = format!("refused by agent {}: {reason}", self.agent_id);
        if settle::anyone_else_would_run(tx, task.id, self.agent_id).await? {
            let done = settle::refused(tx, &mut self.tally, shard, &r.lease_id, &why, now).await?;
            if done {
                self.push(
                    task,
                    r,
                    Action::ShardRequeued,
                    serde_json::json!({ "reason": why, "refused": true }),
                );
            }
            return Ok(done);
        }
        let why = format!("{why} (no other agent could run it)");
        let done = settle::reject(tx, &mut self.tally, shard, &r.lease_id, &why, now).await?;
        if done {
            self.push(
                task,
                r,
                Action::ShardRejected,
                serde_json::json!({ "reason": why }),
            );
        }
        Ok(done)
    }

    /// Replicas decide together: a quorum accepts, too few wait for another agent, a
    /// disagreement goes to the server (see `store::replicas`). Whether the shard moved.
    async fn accept_replica(
        &mut self,
        tx: &mut settle::Tx,
        task: &ReportedTask,
        r: &ReportInput,
    ) -> Result<bool, StoreError> {
        let success = super::replicas::Success {
            at: super::replicas::Judged {
                tenant_id: &task.tenant_id,
                job_id: &task.job_id,
                task_id: task.id,
                shard_index: task.shard_index,
            },
            lease_id: &r.lease_id,
            attempts: task.attempts,
            max_attempts: task.max_attempts,
            spec: super::verify::policy(task.verify.as_deref()),
            strikes_limit: self.policy.strikes_limit,
            now: self.now,
        };
        let settled =
            super::replicas::settle_success(tx, &mut self.tally, &success, &mut self.entries)
                .await?;
        self.chosen.extend(settled.chosen);
        self.quarantined.extend(settled.quarantined);
        Ok(settled.moved)
    }

    /// The infrastructure failed: back to the queue after a back-off, or `dead` past
    /// `max_attempts`.
    async fn retry(
        &mut self,
        tx: &mut settle::Tx,
        task: &ReportedTask,
        r: &ReportInput,
        reason: String,
    ) -> Result<bool, StoreError> {
        let dead = task.attempts >= task.max_attempts;
        let (to, why) = if dead {
            let why = format!("{reason} (after {} attempts)", task.attempts);
            (TaskState::Dead, why)
        } else {
            (TaskState::Queued, reason)
        };
        let end = LeaseEnd {
            to,
            not_before: self.now + backoff_ms(self.policy.backoff_base_ms, task.attempts),
            reason: &why,
        };
        let shard = Shard {
            id: task.id,
            tenant: &task.tenant_id,
            job_id: &task.job_id,
        };
        let done = settle::release(tx, &mut self.tally, shard, &r.lease_id, end, self.now).await?;
        if done {
            let action = if dead {
                Action::ShardDead
            } else {
                Action::ShardRequeued
            };
            self.push(task, r, action, serde_json::json!({ "reason": why }));
        }
        Ok(done)
    }

    /// A settle entry about `r`'s shard.
    fn push(
        &mut self,
        task: &ReportedTask,
        r: &ReportInput,
        action: Action,
        details: serde_json::Value,
    ) {
        self.entries.push(
            Entry::new(&task.tenant_id, self.actor.as_str(), action)
                .job(&task.job_id)
                .task(task.id)
                .lease(&r.lease_id)
                .agent(self.agent_id)
                .details(details),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_settle_as_program_failures_or_infrastructure_ones() {
        assert_eq!(disposition(Status::Ok), Disposition::Accept);
        for status in [Status::SandboxError, Status::Killed] {
            assert_eq!(disposition(status), Disposition::Retry, "{status}");
        }
        for status in [
            Status::Error,
            Status::Timeout,
            Status::MemoryLimit,
            Status::OutputLimit,
            Status::SandboxViolation,
        ] {
            assert_eq!(disposition(status), Disposition::Reject, "{status}");
        }
        assert_eq!(disposition(Status::Refused), Disposition::Refuse);
    }

    #[test]
    fn an_agents_claimed_run_time_is_bounded_by_its_lease() {
        // Leased at 1,000, reported at 6,000: at most 5 s, never negative.
        assert_eq!(seen_wall_ms(1_200, 1_000, 6_000), 1_200);
        assert_eq!(seen_wall_ms(1_000_000_000_000, 1_000, 6_000), 5_000);
        assert_eq!(seen_wall_ms(-5, 1_000, 6_000), 0);
        // A clock that went back: nothing, not a negative bound.
        assert_eq!(seen_wall_ms(10, 7_000, 6_000), 0);
    }
}
