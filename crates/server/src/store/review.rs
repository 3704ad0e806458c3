//! The review queue: jobs the code review held, and what a person decided about them.

use fleetbox_proto::api::ReviewFlag;
use fleetbox_proto::{FlagKind, FlagStatus, JobState, TaskState};
use serde_json::Value;

use super::audit::{Action, Entry};
use super::settle::Tx;
use super::sql::Sql;
use super::{Doing, Store, StoreError, now_ms};

/// A held job's shards are not leasable before this (`not_before`): never, until approved.
pub(super) const HELD_UNTIL: i64 = i64::MAX / 2;

#[derive(sqlx::FromRow)]
struct FlagRecord {
    id: i64,
    job_id: String,
    #[sqlx(try_from = "String")]
    kind: FlagKind,
    #[sqlx(try_from = "String")]
    status: FlagStatus,
    details: String,
    created_at: i64,
    decided_at: Option<i64>,
    decided_by: Option<String>,
    note: Option<String>,
    rerun_job_id: Option<String>,
}

impl FlagRecord {
    fn view(self) -> ReviewFlag {
        ReviewFlag {
            id: self.id,
            job_id: self.job_id,
            kind: self.kind,
            status: self.status,
            details: serde_json::from_str(&self.details).unwrap_or(Value::Null),
            created_at: self.created_at,
            decided_at: self.decided_at,
            decided_by: self.decided_by,
            note: self.note,
            rerun_job_id: self.rerun_job_id,
        }
    }
}

const FLAG_SELECT: &str = "SELECT id, job_id, kind, status, details, created_at, decided_at, \
     decided_by, note, rerun_job_id FROM review_flags";

/// What deciding a flag came to.
#[derive(Debug)]
pub enum FlagDecision {
    NotFound,
    /// It was decided before (its status).
    AlreadyDecided(FlagStatus),
    Decided(ReviewFlag),
}

/// Hold a job being submitted: its shards wait, and the queue gets an open `code` flag.
pub(super) async fn hold(
    tx: &mut Tx,
    tenant: &str,
    job_id: &str,
    details: &Value,
    now: i64,
) -> Result<(), StoreError> {
    queued_not_before(tx, job_id, HELD_UNTIL).await?;
    insert_flag(tx, tenant, job_id, FlagKind::Code, details, now)
        .await
        .map(|_| ())
}

/// Move job `job_id` from state `from` to `to`; false when it was not in `from`.
async fn move_job(
    tx: &mut Tx,
    job_id: &str,
    from: JobState,
    to: JobState,
) -> Result<bool, StoreError> {
    let moved = Sql::new("UPDATE jobs SET state = ")
        .bind(to.as_str())
        .push(" WHERE id = ")
        .bind(job_id)
        .push(" AND state = ")
        .bind(from.as_str())
        .build()
        .execute(&mut **tx)
        .await
        .doing("moving a job for review")?;
    Ok(moved.rows_affected() > 0)
}

/// When the job's queued shards may be leased: [`HELD_UNTIL`] holds them, 0 releases them.
/// Returns how many there are.
async fn queued_not_before(tx: &mut Tx, job_id: &str, at: i64) -> Result<u64, StoreError> {
    let changed = Sql::new("UPDATE tasks SET not_before = ")
        .bind(at)
        .push(" WHERE job_id = ")
        .bind(job_id)
        .push(" AND state = ")
        .bind(TaskState::Queued.as_str())
        .build()
        .execute(&mut **tx)
        .await
        .doing("holding or releasing a job's shards")?;
    Ok(changed.rows_affected())
}

/// An open flag of `kind` for `job_id` in the review queue, within `tx`.
pub(super) async fn insert_flag(
    tx: &mut Tx,
    tenant: &str,
    job_id: &str,
    kind: FlagKind,
    details: &Value,
    now: i64,
) -> Result<i64, StoreError> {
    let (id,) = Sql::new(
        "INSERT INTO review_flags (tenant_id, job_id, kind, status, details, created_at) VALUES (",
    )
    .bind(tenant)
    .push(", ")
    .bind(job_id)
    .push(", ")
    .bind(kind.as_str())
    .push(", 'open', ")
    .bind(details.to_string())
    .push(", ")
    .bind(now)
    .push(") RETURNING id")
    .build_as::<(i64,)>()
    .fetch_one(&mut **tx)
    .await
    .doing("flagging a job for review")?;
    Ok(id)
}

/// How a person decided an open flag: who, when, with what note, and the re-run it started.
struct Decided<'a> {
    status: FlagStatus,
    actor: &'a str,
    note: Option<&'a str>,
    rerun_job_id: Option<&'a str>,
    now: i64,
}

/// Decide open flag `id` of `tenant` within `tx` (guarded on `open`): its job, or `None` when
/// it does not exist or was decided already.
async fn decide_open(
    tx: &mut Tx,
    tenant: &str,
    id: i64,
    d: &Decided<'_>,
) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = Sql::new("UPDATE review_flags SET status = ")
        .bind(d.status.as_str())
        .push(", decided_at = ")
        .bind(d.now)
        .push(", decided_by = ")
        .bind(d.actor)
        .push(", note = ")
        .bind(d.note)
        .push(", rerun_job_id = ")
        .bind(d.rerun_job_id)
        .push(" WHERE id = ")
        .bind(id)
        .push(" AND tenant_id = ")
        .bind(tenant)
        .push(" AND status = ")
        .bind(FlagStatus::Open.as_str())
        .push(" RETURNING job_id")
        .build_as()
        .fetch_optional(&mut **tx)
        .await
        .doing("deciding a review flag")?;
    Ok(row.map(|(job,)| job))
}

impl Store {
    /// What a flag that could not be decided is: missing, or decided before.
    async fn undecidable(&self, tenant: &str, id: i64) -> Result<FlagDecision, StoreError> {
        Ok(match self.flag(tenant, id).await? {
            None => FlagDecision::NotFound,
            Some(f) => FlagDecision::AlreadyDecided(f.status),
        })
    }

    /// The flag as it is now, once decided.
    async fn decided(&self, tenant: &str, id: i64) -> Result<FlagDecision, StoreError> {
        Ok(match self.flag(tenant, id).await? {
            Some(f) => FlagDecision::Decided(f),
            None => FlagDecision::NotFound,
        })
    }
}

/// A shard hit a sandbox violation (reported by a trusted agent, or reproduced by the
/// coordinator's own run): it always raises a `violation` flag a person can find. A running
/// job with shards not yet leased is also held: they wait (`pending_review`) until a person
/// decides that flag (one open flag per held job). A job with nothing left to hold (a
/// one-shard run, every shard leased) or already past `running` is flagged without a hold.
/// In the caller's transaction, after its counters; returns the audit entry, and the job when
/// it was put on hold now.
pub(super) async fn hold_for_violation(
    tx: &mut Tx,
    tenant: &str,
    task_id: i64,
    agent: &str,
    reason: Option<&str>,
    now: i64,
) -> Result<(Option<String>, Option<Entry>), StoreError> {
    let d = "holding a job after a sandbox violation";
    let found: Option<(String, i64, String)> = Sql::new(
        "SELECT t.job_id, t.shard_index, j.state FROM tasks t JOIN jobs j ON j.id = t.job_id \
         WHERE t.id = ",
    )
    .bind(task_id)
    .push(" AND t.tenant_id = ")
    .bind(tenant)
    .build_as()
    .fetch_optional(&mut **tx)
    .await
    .doing(d)?;
    let Some((job_id, shard, state)) = found else {
        return Ok((None, None));
    };
    if state == JobState::PendingReview.as_str() {
        return Ok((None, None)); // already held: its open violation flag waits for a person
    }
    let moved = move_job(tx, &job_id, JobState::Running, JobState::PendingReview).await?;
    let held = moved && queued_not_before(tx, &job_id, HELD_UNTIL).await? > 0;
    if moved && !held {
        // Nothing left to hold: the job goes on to its fold, flagged.
        move_job(tx, &job_id, JobState::PendingReview, JobState::Running).await?;
    }
    let details = serde_json::json!({
        "shard": shard, "agent": agent, "reason": reason, "held": held,
    });
    let id = insert_flag(tx, tenant, &job_id, FlagKind::Violation, &details, now).await?;
    let entry = if held {
        Entry::new(tenant, "server", Action::ReviewHeld).details(details)
    } else {
        Entry::new(tenant, "server", Action::ReviewFlagged)
            .details(serde_json::json!({ "flag": id, "kind": "violation", "details": details }))
    };
    let entry = entry.job(&job_id).task(task_id).agent(agent);
    Ok((held.then_some(job_id), Some(entry)))
}

impl Store {
    /// Put an open flag of `kind` in the review queue.
    pub async fn add_flag(
        &self,
        tenant: &str,
        job_id: &str,
        kind: FlagKind,
        details: &Value,
    ) -> Result<i64, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("flagging a job")?;
        let id = insert_flag(&mut tx, tenant, job_id, kind, details, now).await?;
        let entry = Entry::new(tenant, "reviewer", Action::ReviewFlagged)
            .job(job_id)
            .details(serde_json::json!({ "flag": id, "kind": kind, "details": details }));
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("flagging a job")?;
        Ok(id)
    }

    /// The review queue, newest first.
    pub async fn review_flags(
        &self,
        tenant: &str,
        status: Option<FlagStatus>,
        job: Option<&str>,
        kind: Option<FlagKind>,
        limit: u32,
    ) -> Result<Vec<ReviewFlag>, StoreError> {
        let mut sql = Sql::new(FLAG_SELECT);
        sql.push(" WHERE tenant_id = ").bind(tenant);
        let status = status.map(FlagStatus::as_str);
        let kind = kind.map(FlagKind::as_str);
        for (column, value) in [("status", status), ("job_id", job), ("kind", kind)] {
            if let Some(v) = value {
                sql.push(" AND ").push(column).push(" = ").bind(v);
            }
        }
        sql.push(" ORDER BY id DESC LIMIT ")
            .bind(i64::from(limit.clamp(1, 1000)));
        let rows: Vec<FlagRecord> = sql
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("listing review flags")?;
        Ok(rows.into_iter().map(FlagRecord::view).collect())
    }

    /// One flag of `tenant`'s queue.
    pub async fn flag(&self, tenant: &str, id: i64) -> Result<Option<ReviewFlag>, StoreError> {
        Ok(Sql::new(FLAG_SELECT)
            .push(" WHERE id = ")
            .bind(id)
            .push(" AND tenant_id = ")
            .bind(tenant)
            .build_as::<FlagRecord>()
            .fetch_optional(&self.read)
            .await
            .doing("reading a review flag")?
            .map(FlagRecord::view))
    }

    /// Re-run an open flag of a held job: the job goes on (as approved) and the flag becomes
    /// `rerun` with no job yet; the fold of the job makes it ([`Store::attach_rerun`]).
    pub async fn rerun_held(
        &self,
        tenant: &str,
        id: i64,
        actor: &str,
        note: Option<&str>,
    ) -> Result<FlagDecision, StoreError> {
        let now = now_ms();
        let d = "re-running a held job's flag";
        let mut tx = self.begin_write().await.doing(d)?;
        let how = Decided {
            status: FlagStatus::Rerun,
            actor,
            note,
            rerun_job_id: None,
            now,
        };
        let Some(job_id) = decide_open(&mut tx, tenant, id, &how).await? else {
            drop(tx);
            return self.undecidable(tenant, id).await;
        };
        if move_job(&mut tx, &job_id, JobState::PendingReview, JobState::Running).await? {
            queued_not_before(&mut tx, &job_id, 0).await?;
        }
        let entry = Entry::new(tenant, actor, Action::ReviewRerun)
            .job(&job_id)
            .details(
                serde_json::json!({ "flag": id, "note": note, "when": "the job has finished" }),
            );
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing(d)?;
        self.decided(tenant, id).await
    }

    /// Flags of job `job_id` whose re-run waits for the job to finish: (id, details).
    pub async fn pending_reruns(&self, job_id: &str) -> Result<Vec<(i64, Value)>, StoreError> {
        let rows: Vec<(i64, String)> =
            Sql::new("SELECT id, details FROM review_flags WHERE job_id = ")
                .bind(job_id)
                .push(" AND status = ")
                .bind(FlagStatus::Rerun.as_str())
                .push(" AND rerun_job_id IS NULL ORDER BY id")
                .build_as()
                .fetch_all(&self.read)
                .await
                .doing("reading pending re-runs")?;
        Ok(rows
            .into_iter()
            .map(|(id, d)| (id, serde_json::from_str(&d).unwrap_or(Value::Null)))
            .collect())
    }

    /// Make the re-run a held job's flag asked for: insert `child` and name it on the flag
    /// (once: guarded on the flag having none yet).
    pub async fn attach_rerun(&self, id: i64, child: &super::NewJob) -> Result<bool, StoreError> {
        let now = now_ms();
        let d = "starting a flag's re-run";
        let mut tx = self.begin_write().await.doing(d)?;
        let done = Sql::new("UPDATE review_flags SET rerun_job_id = ")
            .bind(child.id.as_str())
            .push(" WHERE id = ")
            .bind(id)
            .push(" AND status = ")
            .bind(FlagStatus::Rerun.as_str())
            .push(" AND rerun_job_id IS NULL")
            .build()
            .execute(&mut *tx)
            .await
            .doing(d)?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        let per_statement = self.rows_per_statement(super::jobs::TASK_COLUMNS);
        let submitted = super::jobs::insert_job_in(&mut tx, per_statement, child, now).await?;
        self.append_audit(&mut tx, vec![submitted], now).await?;
        tx.commit().await.doing(d)?;
        Ok(true)
    }

    /// Re-run an open flag's shards: the flag becomes `rerun`, naming `child` (the job that
    /// runs them again), inserted in the same transaction; audited with who did it.
    pub async fn rerun_flag(
        &self,
        tenant: &str,
        id: i64,
        actor: &str,
        note: Option<&str>,
        child: &super::NewJob,
    ) -> Result<FlagDecision, StoreError> {
        let now = now_ms();
        let d = "re-running a review flag";
        let mut tx = self.begin_write().await.doing(d)?;
        let how = Decided {
            status: FlagStatus::Rerun,
            actor,
            note,
            rerun_job_id: Some(&child.id),
            now,
        };
        let Some(job_id) = decide_open(&mut tx, tenant, id, &how).await? else {
            drop(tx);
            return self.undecidable(tenant, id).await;
        };
        let per_statement = self.rows_per_statement(super::jobs::TASK_COLUMNS);
        let submitted = super::jobs::insert_job_in(&mut tx, per_statement, child, now).await?;
        let entry = Entry::new(tenant, actor, Action::ReviewRerun)
            .job(&job_id)
            .details(
                serde_json::json!({ "flag": id, "note": note, "job": child.id,
                "shards": child.rerun_of.as_ref().map(|r| &r.shards) }),
            );
        self.append_audit(&mut tx, vec![entry, submitted], now)
            .await?;
        tx.commit().await.doing(d)?;
        Ok(match self.flag(tenant, id).await? {
            Some(f) => FlagDecision::Decided(f),
            None => FlagDecision::NotFound,
        })
    }

    /// Approve (the held job starts) or reject (it is cancelled) an open flag, audited with
    /// who did it.
    pub async fn decide_flag(
        &self,
        tenant: &str,
        id: i64,
        approve: bool,
        actor: &str,
        note: Option<&str>,
    ) -> Result<FlagDecision, StoreError> {
        let now = now_ms();
        let d = "deciding a review flag";
        let mut tx = self.begin_write().await.doing(d)?;
        let how = Decided {
            status: if approve {
                FlagStatus::Approved
            } else {
                FlagStatus::Rejected
            },
            actor,
            note,
            rerun_job_id: None,
            now,
        };
        let Some(job_id) = decide_open(&mut tx, tenant, id, &how).await? else {
            drop(tx);
            return self.undecidable(tenant, id).await;
        };
        if approve {
            if move_job(&mut tx, &job_id, JobState::PendingReview, JobState::Running).await? {
                queued_not_before(&mut tx, &job_id, 0).await?;
            }
            // A job result review sent to a person: its result stands.
            move_job(&mut tx, &job_id, JobState::NeedsReview, JobState::Completed).await?;
        } else {
            let reason = format!(
                "rejected in review by {actor}{}",
                note.map(|n| format!(": {n}")).unwrap_or_default()
            );
            super::jobs::cancel_in(&mut tx, tenant, &job_id, &reason, now).await?;
        }
        let action = if approve {
            Action::ReviewApproved
        } else {
            Action::ReviewRejected
        };
        let entry = Entry::new(tenant, actor, action)
            .job(&job_id)
            .details(serde_json::json!({ "flag": id, "note": note }));
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing(d)?;
        self.decided(tenant, id).await
    }
}

/// Every shard a flag's details name (`shard`, `shards`, at any depth), sorted, once.
pub fn flag_shards(details: &serde_json::Value) -> Vec<u64> {
    fn walk(v: &serde_json::Value, out: &mut Vec<u64>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("shard", serde_json::Value::Number(n)) => out.extend(n.as_u64()),
                        ("shards", serde_json::Value::Array(a)) => {
                            out.extend(a.iter().filter_map(|x| x.as_u64()))
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(details, &mut out);
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod flag_shard_tests {
    use super::flag_shards;

    #[test]
    fn the_shards_a_flag_names_at_any_depth_sorted_once() {
        let d = serde_json::json!({"shard": 4, "shards": [2, 4], "x": [{"shard": 1}, {"y": {"shards": [9]}}]});
        assert_eq!(flag_shards(&d), [1, 2, 4, 9]);
        assert!(flag_shards(&serde_json::json!({"shard": -1, "shards": "3"})).is_empty());
    }
}
