//! Retention (`--retain`): finished jobs older than the cut-off are deleted with their shards,
//! attempts, leases, flags and notifications, and the blobs no job names any more are released.
//!
//! A job goes in steps so that a large one never holds the write lock for long: its shards in
//! chunks of [`CHUNK`] (each chunk's attempts, leases and shards in one transaction, under the
//! job's row lock, so a late report cannot slip an attempt in between), then the job itself in
//! a last transaction that also releases its blobs and appends `job.pruned` to the audit log.
//! The audit log keeps its entries about the job: its chain and checkpoints are untouched.
//!
//! Blobs: `job_blobs` says which jobs name a tenant's blob. When the last job of a tenant that
//! named it is pruned, the tenant's owner row goes (only rows written since retention existed,
//! `tracked = 1`); a blob no tenant owns is returned to the caller to be removed from the blob
//! store.

use fleetbox_proto::JobState;
use sqlx::Row;

use super::audit::{Action, Entry};
use super::sql::Sql;
use super::{Doing, Store, StoreError, now_ms, settle};

/// Shards deleted per transaction.
const CHUNK: usize = 1000;

/// What one pass of retention deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub shards: u64,
    pub attempts: u64,
    pub sessions: u64,
    /// Blobs no tenant owns any more: the caller removes them from the blob store.
    pub released: Vec<String>,
    /// Blobs a tenant owns no more (tenant, hash), others may still own them: the caller
    /// removes them from that tenant's area of the bucket.
    pub disowned: Vec<(String, String)>,
}

impl Store {
    /// Delete at most `max_jobs` jobs that finished before `cutoff` (ms since the epoch), oldest
    /// first, and the sessions that ended before it.
    pub async fn prune(&self, cutoff: i64, max_jobs: i64) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        let finals: Vec<&str> = JobState::FINAL.iter().map(|s| s.as_str()).collect();
        let jobs: Vec<(String, String)> = Sql::new(
            "SELECT id, tenant_id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ",
        )
        .bind(cutoff)
        .push(" AND state IN (")
        .bind_list(finals.iter().copied())
        .push(") ORDER BY finished_at LIMIT ")
        .bind(max_jobs)
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("finding jobs past retention")?;
        for (job_id, tenant) in jobs {
            self.prune_job(&job_id, &tenant, &mut pruned).await?;
        }
        pruned.sessions = sqlx::query(
            "DELETE FROM sessions WHERE ended_at IS NOT NULL AND ended_at < $1 \
             AND state IN ('closed', 'lost')",
        )
        .bind(cutoff)
        .execute(self.writer())
        .await
        .doing("pruning ended sessions")?
        .rows_affected();
        Ok(pruned)
    }

    async fn prune_job(
        &self,
        job_id: &str,
        tenant: &str,
        pruned: &mut Pruned,
    ) -> Result<(), StoreError> {
        let (mut shards, mut attempts) = (0u64, 0u64);
        loop {
            let mut tx = self.begin_write().await.doing("pruning a job's shards")?;
            settle::lock_jobs(&mut tx, self.kind, &[job_id.to_string()]).await?;
            let ids: Vec<(i64,)> =
                sqlx::query_as("SELECT id FROM tasks WHERE job_id = $1 LIMIT $2")
                    .bind(job_id)
                    .bind(CHUNK as i64)
                    .fetch_all(&mut *tx)
                    .await
                    .doing("pruning a job's shards")?;
            if ids.is_empty() {
                tx.commit().await.doing("pruning a job's shards")?;
                break;
            }
            let ids: Vec<i64> = ids.into_iter().map(|(id,)| id).collect();
            attempts += delete_in(&mut tx, "attempts", "task_id", &ids).await?;
            delete_in(&mut tx, "leases", "task_id", &ids).await?;
            shards += delete_in(&mut tx, "tasks", "id", &ids).await?;
            tx.commit().await.doing("pruning a job's shards")?;
        }
        let mut tx = self.begin_write().await.doing("pruning a job")?;
        settle::lock_jobs(&mut tx, self.kind, &[job_id.to_string()]).await?;
        let named: Vec<(String,)> =
            sqlx::query_as("SELECT sha256 FROM job_blobs WHERE job_id = $1")
                .bind(job_id)
                .fetch_all(&mut *tx)
                .await
                .doing("reading a job's blobs")?;
        for statement in [
            "DELETE FROM job_blobs WHERE job_id = $1",
            "DELETE FROM review_flags WHERE job_id = $1",
            "DELETE FROM notifications WHERE job_id = $1",
            "DELETE FROM job_counts WHERE job_id = $1",
        ] {
            sqlx::query(statement)
                .bind(job_id)
                .execute(&mut *tx)
                .await
                .doing("pruning a job")?;
        }
        // Attempts whose shard went before them (none are expected: belt and braces).
        attempts += sqlx::query("DELETE FROM attempts WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await
            .doing("pruning a job's attempts")?
            .rows_affected();
        let gone = sqlx::query("DELETE FROM jobs WHERE id = $1 AND finished_at IS NOT NULL")
            .bind(job_id)
            .execute(&mut *tx)
            .await
            .doing("pruning a job")?
            .rows_affected();
        if gone == 0 {
            // Another coordinator pruned it first.
            tx.commit().await.doing("pruning a job")?;
            return Ok(());
        }
        let mut released = Vec::new();
        for (sha,) in &named {
            let freed = sqlx::query(
                "DELETE FROM blob_owners WHERE tenant_id = $1 AND sha256 = $2 AND tracked = 1 \
                 AND NOT EXISTS (SELECT 1 FROM job_blobs WHERE tenant_id = $1 AND sha256 = $2)",
            )
            .bind(tenant)
            .bind(sha.as_str())
            .execute(&mut *tx)
            .await
            .doing("releasing a job's blobs")?
            .rows_affected();
            if freed == 0 {
                continue;
            }
            pruned.disowned.push((tenant.to_string(), sha.clone()));
            if !self.blob_owned(&mut tx, sha).await? {
                released.push(sha.clone());
            }
        }
        let mut entry = Entry::new(tenant, "server", Action::JobPruned);
        entry.job_id = Some(job_id.to_string());
        entry.details = serde_json::json!({
            "shards": shards,
            "attempts": attempts,
            "blobs_released": released.len(),
        });
        self.append_audit(&mut tx, vec![entry], now_ms()).await?;
        tx.commit().await.doing("pruning a job")?;
        pruned.jobs += 1;
        pruned.shards += shards;
        pruned.attempts += attempts;
        pruned.released.extend(released);
        Ok(())
    }

    async fn blob_owned(
        &self,
        conn: &mut sqlx::AnyConnection,
        sha: &str,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM blob_owners WHERE sha256 = $1 LIMIT 1")
            .bind(sha)
            .fetch_optional(&mut *conn)
            .await
            .doing("reading a blob's owners")?;
        Ok(row.is_some())
    }

    /// Of `hashes`, those no tenant owns (the blob store's sweep removes them once old).
    pub async fn unowned_blobs(&self, hashes: &[String]) -> Result<Vec<String>, StoreError> {
        let mut unowned = Vec::new();
        for chunk in hashes.chunks(500) {
            let owned: Vec<String> =
                Sql::new("SELECT DISTINCT sha256 FROM blob_owners WHERE sha256 IN (")
                    .bind_list(chunk.iter().map(String::as_str))
                    .push(")")
                    .build()
                    .fetch_all(&self.read)
                    .await
                    .doing("reading blobs' owners")?
                    .into_iter()
                    .map(|r| r.get::<String, _>(0))
                    .collect();
            unowned.extend(chunk.iter().filter(|h| !owned.contains(h)).cloned());
        }
        Ok(unowned)
    }
}

/// `DELETE FROM table WHERE column IN (ids)`; how many rows went.
async fn delete_in(
    conn: &mut sqlx::AnyConnection,
    table: &str,
    column: &str,
    ids: &[i64],
) -> Result<u64, StoreError> {
    Ok(Sql::new(format!("DELETE FROM {table} WHERE {column} IN ("))
        .bind_list(ids.iter().copied())
        .push(")")
        .build()
        .execute(&mut *conn)
        .await
        .doing("pruning a job's shards")?
        .rows_affected())
}
