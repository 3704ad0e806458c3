//! Tenants and their caps, with what each has used against them.

use fleetbox_proto::tenancy::{PoolView, TenantCaps, TenantView};
use fleetbox_proto::{AgentState, TaskState};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::{Action, Entry};
use super::{Doing, Store, StoreError, now_ms};

const DAY_MS: i64 = 24 * 3600 * 1000;

/// What a tenant has used: leased shards now, shards submitted and CPU seconds spent in the
/// last 24 hours.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub running_shards: u64,
    pub shards_today: u64,
    pub cpu_seconds_today: f64,
    pub blob_bytes: u64,
}

fn caps_of(row: &AnyRow) -> Result<TenantCaps, StoreError> {
    let get = |e| StoreError::Query {
        doing: "reading a tenant",
        source: e,
    };
    let cap = |name: &str| -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = row.try_get(name).map_err(get)?;
        Ok(v.map(|v| v.max(0).unsigned_abs()))
    };
    Ok(TenantCaps {
        max_running_shards: cap("max_running_shards")?,
        max_shards_per_day: cap("max_shards_per_day")?,
        max_cpu_seconds_per_day: cap("max_cpu_seconds_per_day")?,
        max_blob_bytes: cap("max_blob_bytes")?,
        submit_rate: row.try_get("submit_rate").map_err(get)?,
        weight: cap("weight")?.map(|w| u32::try_from(w).unwrap_or(u32::MAX)),
    })
}

fn as_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

impl Store {
    /// Make a tenant (audited as `tenant.created` in its own log and the operator's); `false`
    /// when one of that name exists.
    pub async fn create_tenant(
        &self,
        id: &str,
        caps: &TenantCaps,
        actor: &str,
    ) -> Result<bool, StoreError> {
        // With a schema per tenant, its partitions exist before its first row. (A name a pool
        // already has leaves empty partitions behind: no tenant can take that name.)
        self.make_tenant_schema(id).await?;
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("creating a tenant")?;
        // Its own pool carries its name: a name a pool has already is taken.
        let taken = super::sql::exists(
            &mut *tx,
            "SELECT 1 FROM pools WHERE name = $1",
            &[id],
            "creating a tenant",
        )
        .await?;
        let made = !taken
            && sqlx::query(
                "INSERT INTO tenants (id, name, created_at, updated_at, max_running_shards, max_shards_per_day, \
                 max_cpu_seconds_per_day, submit_rate, weight, max_blob_bytes) \
                 VALUES ($1, $1, $2, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(now)
            .bind(as_i64(caps.max_running_shards))
            .bind(as_i64(caps.max_shards_per_day))
            .bind(as_i64(caps.max_cpu_seconds_per_day))
            .bind(caps.submit_rate)
            .bind(i64::from(caps.weight.unwrap_or(1).max(1)))
            .bind(as_i64(caps.max_blob_bytes))
            .execute(&mut *tx)
            .await
            .doing("creating a tenant")?
            .rows_affected()
                > 0;
        if made {
            sqlx::query(
                "INSERT INTO pools (name, tenant_id, shared, created_at) VALUES ($1, $1, 0, $2)",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .doing("creating a tenant's pool")?;
            let details = serde_json::json!({ "tenant": id, "caps": caps });
            let entries = [super::DEFAULT_TENANT, id]
                .into_iter()
                .map(|t| Entry::new(t, actor, Action::TenantCreated).details(details.clone()))
                .collect();
            self.append_audit(&mut tx, entries, now).await?;
        }
        tx.commit().await.doing("creating a tenant")?;
        Ok(made)
    }

    /// Set the caps `caps` names and clear those `clear` names (audited as
    /// `tenant.updated`); `false` when there is no such tenant.
    pub async fn update_tenant(
        &self,
        id: &str,
        caps: &TenantCaps,
        clear: &[&str],
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("updating a tenant")?;
        let mut sql = super::sql::Sql::new("UPDATE tenants SET updated_at = ");
        sql.bind(now);
        let set: [(&str, Option<i64>); 4] = [
            ("max_running_shards", as_i64(caps.max_running_shards)),
            ("max_shards_per_day", as_i64(caps.max_shards_per_day)),
            (
                "max_cpu_seconds_per_day",
                as_i64(caps.max_cpu_seconds_per_day),
            ),
            ("max_blob_bytes", as_i64(caps.max_blob_bytes)),
        ];
        for (column, value) in set {
            if let Some(v) = value {
                sql.push(&format!(", {column} = ")).bind(v);
            } else if clear.contains(&column) {
                sql.push(&format!(", {column} = NULL"));
            }
        }
        if let Some(w) = caps.weight {
            sql.push(", weight = ").bind(i64::from(w.max(1)));
        } else if clear.contains(&"weight") {
            sql.push(", weight = 1");
        }
        if let Some(r) = caps.submit_rate {
            sql.push(", submit_rate = ").bind(r);
        } else if clear.contains(&"submit_rate") {
            sql.push(", submit_rate = NULL");
        }
        sql.push(" WHERE id = ").bind(id);
        let found = sql
            .build()
            .execute(&mut *tx)
            .await
            .doing("updating a tenant")?
            .rows_affected()
            > 0;
        if found {
            let details = serde_json::json!({ "tenant": id, "caps": caps, "cleared": clear });
            let logs: &[&str] = if id == super::DEFAULT_TENANT {
                &[super::DEFAULT_TENANT]
            } else {
                &[super::DEFAULT_TENANT, id]
            };
            let entries = logs
                .iter()
                .map(|t| Entry::new(t, actor, Action::TenantUpdated).details(details.clone()))
                .collect();
            self.append_audit(&mut tx, entries, now).await?;
        }
        tx.commit().await.doing("updating a tenant")?;
        Ok(found)
    }

    /// A tenant's caps, or `None` when there is no such tenant.
    pub async fn tenant_caps(&self, id: &str) -> Result<Option<(i64, TenantCaps)>, StoreError> {
        let row = sqlx::query(
            "SELECT created_at, max_running_shards, max_shards_per_day, max_cpu_seconds_per_day, \
             max_blob_bytes, submit_rate, CASE WHEN weight = 1 THEN NULL ELSE weight END AS weight FROM tenants WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.read)
        .await
        .doing("reading a tenant")?;
        let Some(row) = row else { return Ok(None) };
        let created: i64 = row.try_get("created_at").doing("reading a tenant")?;
        Ok(Some((created, caps_of(&row)?)))
    }

    /// What `id` has used (see [`Usage`]).
    pub async fn tenant_usage(&self, id: &str, now: i64) -> Result<Usage, StoreError> {
        let since = now - DAY_MS;
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM tasks WHERE tenant_id = $1 AND state = $2) AS running, \
             (SELECT CAST(COALESCE(SUM(shard_count), 0) AS BIGINT) FROM jobs WHERE tenant_id = $1 AND created_at >= $3) AS shards, \
             (SELECT CAST(COALESCE(SUM(cpu_ms), 0) AS BIGINT) FROM attempts WHERE tenant_id = $1 AND received_at >= $3) AS cpu, \
             (SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM blob_owners WHERE tenant_id = $1 AND bytes > 0) AS blob_bytes",
        )
        .bind(id)
        .bind(TaskState::Leased.as_str())
        .bind(since)
        .fetch_one(&self.read)
        .await
        .doing("reading a tenant's usage")?;
        let n = |name: &str| -> Result<i64, StoreError> {
            row.try_get::<i64, _>(name)
                .doing("reading a tenant's usage")
        };
        Ok(Usage {
            running_shards: n("running")?.max(0).unsigned_abs(),
            shards_today: n("shards")?.max(0).unsigned_abs(),
            cpu_seconds_today: n("cpu")? as f64 / 1000.0,
            blob_bytes: n("blob_bytes")?.max(0).unsigned_abs(),
        })
    }

    /// Tenants with a cap that stops their leases (CPU seconds a day, blob bytes), and those
    /// caps.
    pub async fn lease_capped_tenants(
        &self,
    ) -> Result<Vec<(String, Option<i64>, Option<i64>)>, StoreError> {
        sqlx::query_as(
            "SELECT id, max_cpu_seconds_per_day, max_blob_bytes FROM tenants \
             WHERE max_cpu_seconds_per_day IS NOT NULL OR max_blob_bytes IS NOT NULL",
        )
        .fetch_all(&self.read)
        .await
        .doing("reading tenants' caps")
    }

    pub async fn tenant_view(&self, id: &str) -> Result<Option<TenantView>, StoreError> {
        let Some((created_at, caps)) = self.tenant_caps(id).await? else {
            return Ok(None);
        };
        let usage = self.tenant_usage(id, now_ms()).await?;
        Ok(Some(TenantView {
            id: id.to_string(),
            created_at,
            caps,
            running_shards: usage.running_shards,
            shards_today: usage.shards_today,
            cpu_seconds_today: usage.cpu_seconds_today,
            blob_bytes: usage.blob_bytes,
        }))
    }

    pub async fn list_tenants(&self) -> Result<Vec<TenantView>, StoreError> {
        let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM tenants ORDER BY id")
            .fetch_all(&self.read)
            .await
            .doing("listing tenants")?;
        let mut out = Vec::with_capacity(ids.len());
        for (id,) in ids {
            if let Some(v) = self.tenant_view(&id).await? {
                out.push(v);
            }
        }
        Ok(out)
    }
}

/// Whose shard a lease ran: the blobs its agent uploads go to that tenant's area of the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOwner {
    pub tenant_id: String,
    pub job_id: String,
}

impl Store {
    /// The tenant and job of each of `leases` that agent `agent_id` holds or held; leases of
    /// other agents, and unknown ones, are left out.
    pub async fn lease_owners(
        &self,
        agent_id: &str,
        leases: &[&str],
    ) -> Result<std::collections::HashMap<String, LeaseOwner>, StoreError> {
        let mut owners = std::collections::HashMap::new();
        for chunk in leases.chunks(500) {
            let rows = super::sql::Sql::new(
                "SELECT l.id, l.tenant_id, t.job_id FROM leases l JOIN tasks t ON t.id = l.task_id \
                 WHERE l.agent_id = ",
            )
            .bind(agent_id)
            .push(" AND l.id IN (")
            .bind_list(chunk.iter().copied())
            .push(")")
            .build()
            .fetch_all(&self.read)
            .await
            .doing("reading leases' owners")?;
            for r in rows {
                owners.insert(
                    r.get::<String, _>(0),
                    LeaseOwner {
                        tenant_id: r.get(1),
                        job_id: r.get(2),
                    },
                );
            }
        }
        Ok(owners)
    }

    /// Record that `tenant` owns the blobs `owned` (hash and size) and that job `job_id` names
    /// them (idempotent).
    pub async fn own_blobs(
        &self,
        tenant: &str,
        job_id: &str,
        owned: &[(&str, u64)],
    ) -> Result<(), StoreError> {
        if owned.is_empty() {
            return Ok(());
        }
        let rows: Vec<BlobRef> = owned
            .iter()
            .map(|&(sha256, bytes)| BlobRef {
                tenant,
                job_id,
                sha256,
                bytes,
            })
            .collect();
        let mut tx = self.begin_write().await.doing("recording a blob's owner")?;
        self.own_blob_rows(&mut tx, &rows, now_ms()).await?;
        tx.commit().await.doing("recording a blob's owner")
    }

    /// Blob owner rows from before sizes were kept (`bytes = -1`), at most `limit` of them.
    pub async fn unmeasured_blobs(&self, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT sha256 FROM blob_owners WHERE bytes < 0 ORDER BY sha256 LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.read)
        .await
        .doing("reading unmeasured blobs")?;
        Ok(rows.into_iter().map(|(h,)| h).collect())
    }

    /// Set the size of a blob measured on disk (0 for one no longer there).
    pub async fn measured_blob(&self, hash: &str, bytes: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE blob_owners SET bytes = $1 WHERE sha256 = $2 AND bytes < 0")
            .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
            .bind(hash)
            .execute(self.writer())
            .await
            .doing("measuring a blob")?;
        Ok(())
    }

    pub async fn owns_blob(&self, tenant: &str, hash: &str) -> Result<bool, StoreError> {
        super::sql::exists(
            &self.read,
            "SELECT 1 FROM blob_owners WHERE tenant_id = $1 AND sha256 = $2",
            &[tenant, hash],
            "reading a blob's owner",
        )
        .await
    }
}

impl Store {
    /// Make a pool of `tenant` (audited as `pool.created` in its log); `false` when the name
    /// is taken (by a pool or a tenant).
    pub async fn create_pool(
        &self,
        name: &str,
        tenant: &str,
        shared: bool,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("creating a pool")?;
        let taken = super::sql::exists(
            &mut *tx,
            "SELECT 1 FROM tenants WHERE id = $1",
            &[name],
            "creating a pool",
        )
        .await?;
        let made = !taken
            && sqlx::query(
                "INSERT INTO pools (name, tenant_id, shared, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(tenant)
            .bind(i64::from(shared))
            .bind(now)
            .execute(&mut *tx)
            .await
            .doing("creating a pool")?
            .rows_affected()
                > 0;
        if made {
            let entry = Entry::new(tenant, actor, Action::PoolCreated)
                .details(serde_json::json!({ "pool": name, "shared": shared }));
            self.append_audit(&mut tx, vec![entry], now).await?;
        }
        tx.commit().await.doing("creating a pool")?;
        Ok(made)
    }

    /// Pools `tenant` may use (its own and the shared ones), or every pool (`None`).
    pub async fn list_pools(&self, tenant: Option<&str>) -> Result<Vec<PoolView>, StoreError> {
        let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT p.name, p.tenant_id, p.shared, p.created_at, \
             (SELECT COUNT(*) FROM agents a WHERE a.pool = p.name AND a.state = $1) \
             FROM pools p WHERE CAST($2 AS TEXT) IS NULL OR p.shared = 1 OR p.tenant_id = $2 ORDER BY p.name",
        )
        .bind(AgentState::Online.as_str())
        .bind(tenant)
        .fetch_all(&self.read)
        .await
        .doing("listing pools")?;
        Ok(rows
            .into_iter()
            .map(|(name, tenant, shared, created_at, online)| PoolView {
                name,
                tenant,
                shared: shared != 0,
                created_at,
                agents_online: online.max(0).unsigned_abs(),
            })
            .collect())
    }

    /// A pool by name, if `tenant` may use it (its own, or shared).
    pub async fn usable_pool(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        super::sql::exists(
            &self.read,
            "SELECT 1 FROM pools WHERE name = $1 AND (shared = 1 OR tenant_id = $2)",
            &[name, tenant],
            "reading a pool",
        )
        .await
    }

    /// Whether `tenant` owns pool `name` (its enrolment tokens may put agents in it).
    pub async fn owns_pool(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        super::sql::exists(
            &self.read,
            "SELECT 1 FROM pools WHERE name = $1 AND tenant_id = $2",
            &[name, tenant],
            "reading a pool",
        )
        .await
    }
}

/// A job's blob: its tenant owns it, the job names it (see `job_blobs`).
#[derive(Debug, Clone, Copy)]
pub(super) struct BlobRef<'a> {
    pub tenant: &'a str,
    pub job_id: &'a str,
    pub sha256: &'a str,
    pub bytes: u64,
}

impl Store {
    /// Insert blob owner rows and the jobs naming them; rows already there stay.
    pub(super) async fn own_blob_rows(
        &self,
        conn: &mut sqlx::AnyConnection,
        rows: &[BlobRef<'_>],
        now: i64,
    ) -> Result<(), StoreError> {
        for chunk in rows.chunks(self.rows_per_statement(5)) {
            let mut sql = super::sql::Sql::new(
                "INSERT INTO blob_owners (tenant_id, sha256, created_at, bytes, tracked) VALUES ",
            );
            sql.push_rows(chunk.iter(), |row, r| {
                row.bind(r.tenant)
                    .bind(r.sha256)
                    .bind(now)
                    .bind(i64::try_from(r.bytes).unwrap_or(i64::MAX))
                    .bind(1i64);
            });
            sql.push(" ON CONFLICT DO NOTHING");
            sql.build()
                .execute(&mut *conn)
                .await
                .doing("recording a blob's owner")?;
            let mut sql =
                super::sql::Sql::new("INSERT INTO job_blobs (tenant_id, sha256, job_id) VALUES ");
            sql.push_rows(chunk.iter(), |row, r| {
                row.bind(r.tenant).bind(r.sha256).bind(r.job_id);
            });
            sql.push(" ON CONFLICT DO NOTHING");
            sql.build()
                .execute(&mut *conn)
                .await
                .doing("recording which job names a blob")?;
        }
        Ok(())
    }
}
