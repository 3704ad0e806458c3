//! The transitions of a task (shard), each one guarded update.
//!
//! Every function here changes one task row only if it is still in the state (and, where it
//! matters, under the lease) the transition comes from, and says whether it did. Callers move
//! the job's `unsettled` counter only for transitions that happened, in the same transaction.
//! On PostgreSQL a concurrent transaction that changed the row first makes the guard fail
//! once it commits (READ COMMITTED re-checks the `WHERE` on the new row version); on SQLite
//! there is one writer. Lock order, to keep PostgreSQL free of deadlocks: job rows first
//! (sorted by id, [`lock_jobs`]), then task rows.

use fleetbox_proto::api::task_state;

use super::{DbKind, Doing, StoreError, placeholders};

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// `queued` | `leased` → `accepted`: any report of success for a shard nobody settled.
pub(super) async fn accept(tx: &mut Tx<'_>, task_id: i64, now: i64) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE tasks SET state = $1, lease_id = NULL, lease_expires = NULL, last_error = NULL, \
         updated_at = $2 WHERE id = $3 AND state IN ($4, $5)",
    )
    .bind(task_state::ACCEPTED)
    .bind(now)
    .bind(task_id)
    .bind(task_state::QUEUED)
    .bind(task_state::LEASED)
    .execute(&mut **tx)
    .await
    .doing("accepting a shard")?;
    Ok(done.rows_affected() == 1)
}

/// `leased` under `lease_id` (or `queued`: nobody holds it) → `rejected`: the program failed
/// on its own. A shard leased to someone else meanwhile is left to them.
pub(super) async fn reject(
    tx: &mut Tx<'_>,
    task_id: i64,
    lease_id: &str,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE tasks SET state = $1, last_error = $2, lease_id = NULL, lease_expires = NULL, updated_at = $3 \
         WHERE id = $4 AND (state = $5 OR (state = $6 AND lease_id = $7))",
    )
    .bind(task_state::REJECTED)
    .bind(reason)
    .bind(now)
    .bind(task_id)
    .bind(task_state::QUEUED)
    .bind(task_state::LEASED)
    .bind(lease_id)
    .execute(&mut **tx)
    .await
    .doing("rejecting a shard")?;
    Ok(done.rows_affected() == 1)
}

/// `leased` under `lease_id` → `queued` (not before `not_before`) or `dead`: the lease ended
/// without a value (infrastructure failure, expiry, lost agent). The attempt count cannot
/// change while the lease holds, so the caller's choice of `to` stays right.
pub(super) async fn release(
    tx: &mut Tx<'_>,
    task_id: i64,
    lease_id: &str,
    to: &str,
    not_before: i64,
    reason: &str,
    now: i64,
) -> Result<bool, StoreError> {
    debug_assert!(to == task_state::QUEUED || to == task_state::DEAD);
    let done = sqlx::query(
        "UPDATE tasks SET state = $1, not_before = $2, last_error = $3, lease_id = NULL, \
         lease_expires = NULL, updated_at = $4 WHERE id = $5 AND state = $6 AND lease_id = $7",
    )
    .bind(to)
    .bind(not_before)
    .bind(reason)
    .bind(now)
    .bind(task_id)
    .bind(task_state::LEASED)
    .bind(lease_id)
    .execute(&mut **tx)
    .await
    .doing("releasing a shard")?;
    Ok(done.rows_affected() == 1)
}

/// Take the row locks of `jobs` in id order (PostgreSQL), before any of their tasks'.
pub(super) async fn lock_jobs(
    tx: &mut Tx<'_>,
    kind: DbKind,
    jobs: &[String],
) -> Result<(), StoreError> {
    if kind != DbKind::Postgres || jobs.is_empty() {
        return Ok(());
    }
    let mut sorted = jobs.to_vec();
    sorted.sort();
    sorted.dedup();
    let sql = format!(
        "SELECT id FROM jobs WHERE id IN ({}) ORDER BY id FOR UPDATE",
        placeholders(1, sorted.len())
    );
    let mut q = sqlx::query(&sql);
    for j in &sorted {
        q = q.bind(j);
    }
    q.fetch_all(&mut **tx).await.doing("locking jobs")?;
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
    #[test]
    fn nul_is_made_visible_not_dropped() {
        assert_eq!(super::storable_text("a\0b"), "a\u{2400}b");
    }
}
