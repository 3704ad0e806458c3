//! The coordinator's store: one code path over SQLite (embedded default) and PostgreSQL.
//!
//! Queries go through sqlx's `Any` driver with `$N` placeholders, which both databases accept;
//! statements with a variable shape are built with [`sql::Sql`], which numbers them.
//! Where the dialects differ (leasing uses `FOR UPDATE SKIP LOCKED` on PostgreSQL) the SQL
//! is chosen by [`DbKind`]. SQLite runs with one writer connection (WAL lets readers go on);
//! PostgreSQL shares one pool, so several coordinators can use the same database.

mod agent_certs;
mod agents;
pub mod audit;
mod audit_read;
pub mod checks;
mod fair;
mod jobs;
mod metrics;
pub mod planner;
pub mod receipts;
pub mod replicas;
mod reports;
pub mod retention;
pub mod review;
pub mod schemas;
pub mod sessions;
mod settle;
mod sql;
mod tasks;
pub mod tenants;
mod tokens;
mod tx;
pub mod verify;

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use agent_certs::{IssuedCert, RevokedCert};
pub(crate) use agents::parse as parse_json;
pub use agents::{Enrolment, HARDENED};
pub use jobs::{FoldOutcome, JobRow, JobSession, NewJob, ResultFact, ShardPage};
pub use reports::{ReportInput, ReportPolicy, Reported, SettleOutcome};
pub use settle::storable_text;
pub use settle::{LeaseGrant, Want};
pub use tasks::{Requeued, backoff_ms};
pub use tokens::{NewToken, Principal, StoredToken, TokenKind, token_id};

/// The tenant every object belongs to until tenants are managed.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

impl DbKind {
    /// Fill a migration's dialect placeholders.
    fn dialect(self, sql: &str) -> String {
        let serial_pk = match self {
            DbKind::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            DbKind::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        sql.replace("{serial_pk}", serial_pk)
    }
}

/// Errors of the store, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL `{url}` is not supported (use `sqlite://PATH` or `postgres://...`)")]
    UnsupportedUrl { url: String },
    #[error("could not connect to `{url}`: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration `{name}` failed: {source}")]
    Migrate {
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("database error while {doing}: {source}")]
    Query {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("tenant schemas: {0}")]
    TenantSchemas(String),
    #[error("stored data is corrupt ({what}): {detail}")]
    Corrupt { what: &'static str, detail: String },
}

/// Attach what was being done to a sqlx error.
pub(crate) trait Doing<T> {
    fn doing(self, doing: &'static str) -> Result<T, StoreError>;
}

impl<T> Doing<T> for Result<T, sqlx::Error> {
    fn doing(self, doing: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query { doing, source })
    }
}

/// Migrations, in order. One text for both databases; the few dialect differences are
/// `{placeholders}` filled by [`DbKind::dialect`].
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../migrations/0001_init.sql")),
    (
        "0002_settle",
        include_str!("../../migrations/0002_settle.sql"),
    ),
    (
        "0003_counts",
        include_str!("../../migrations/0003_counts.sql"),
    ),
    (
        "0004_audit",
        include_str!("../../migrations/0004_audit.sql"),
    ),
    (
        "0005_audit_checkpoints",
        include_str!("../../migrations/0005_audit_checkpoints.sql"),
    ),
    (
        "0006_agent_keys",
        include_str!("../../migrations/0006_agent_keys.sql"),
    ),
    (
        "0007_verification",
        include_str!("../../migrations/0007_verification.sql"),
    ),
    (
        "0008_trust_errors",
        include_str!("../../migrations/0008_trust_errors.sql"),
    ),
    (
        "0009_environment",
        include_str!("../../migrations/0009_environment.sql"),
    ),
    (
        "0010_files",
        include_str!("../../migrations/0010_files.sql"),
    ),
    (
        "0011_backend",
        include_str!("../../migrations/0011_backend.sql"),
    ),
    (
        "0012_review_flags",
        include_str!("../../migrations/0012_review_flags.sql"),
    ),
    (
        "0013_planner",
        include_str!("../../migrations/0013_planner.sql"),
    ),
    (
        "0014_metrics",
        include_str!("../../migrations/0014_metrics.sql"),
    ),
    (
        "0015_result_review",
        include_str!("../../migrations/0015_result_review.sql"),
    ),
    (
        "0016_replicas",
        include_str!("../../migrations/0016_replicas.sql"),
    ),
    (
        "0017_traces",
        include_str!("../../migrations/0017_traces.sql"),
    ),
    (
        "0018_job_controls",
        include_str!("../../migrations/0018_job_controls.sql"),
    ),
    (
        "0019_outcome",
        include_str!("../../migrations/0019_outcome.sql"),
    ),
    (
        "0020_check_failures",
        include_str!("../../migrations/0020_check_failures.sql"),
    ),
    (
        "0021_check_attempt",
        include_str!("../../migrations/0021_check_attempt.sql"),
    ),
    (
        "0022_audit_prunes",
        include_str!("../../migrations/0022_audit_prunes.sql"),
    ),
    (
        "0023_refusals",
        include_str!("../../migrations/0023_refusals.sql"),
    ),
    (
        "0024_hardened",
        include_str!("../../migrations/0024_hardened.sql"),
    ),
    (
        "0025_tenancy",
        include_str!("../../migrations/0025_tenancy.sql"),
    ),
    (
        "0026_pools",
        include_str!("../../migrations/0026_pools.sql"),
    ),
    (
        "0027_blob_bytes",
        include_str!("../../migrations/0027_blob_bytes.sql"),
    ),
    (
        "0028_agent_certs",
        include_str!("../../migrations/0028_agent_certs.sql"),
    ),
    (
        "0029_only_hardened",
        include_str!("../../migrations/0029_only_hardened.sql"),
    ),
    (
        "0030_sessions",
        include_str!("../../migrations/0030_sessions.sql"),
    ),
    (
        "0031_retention",
        include_str!("../../migrations/0031_retention.sql"),
    ),
    (
        "0032_token_changes",
        include_str!("../../migrations/0032_token_changes.sql"),
    ),
    (
        "0033_counts_tenant",
        include_str!("../../migrations/0033_counts_tenant.sql"),
    ),
];

#[derive(Clone)]
pub struct Store {
    kind: DbKind,
    /// Writes (one connection on SQLite).
    write: AnyPool,
    /// Reads (several connections).
    read: AnyPool,
    /// Whether appends are written (see `ServerConfig::audit`).
    audit: bool,
    /// Writes begun (see [`Store::writes`]); shared by the store's clones.
    writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Consecutive valid results after which an agent is trusted (`--trusted-after`).
    trusted_after: i64,
    /// What the store was opened with: the audit log's verification reads through a native
    /// connection of its own (see `audit_read`).
    url: String,
    /// Jobs' trace ids, which never change, as audit entries about them were written.
    traces: audit::TraceIds,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("kind", &self.kind).finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// The embedded default: `fleetbox.db` in `data_dir`.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("fleetbox.db").display()
        )
    }

    /// Connect and bring the schema up to date.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            DbKind::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            DbKind::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl { url: redact(url) });
        };
        let options = AnyConnectOptions::from_str(url).map_err(|source| StoreError::Connect {
            url: redact(url),
            source,
        })?;
        let connect = |max: u32| {
            AnyPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(30))
                .after_release(tx::release_clean)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if kind == DbKind::Sqlite {
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                            )
                            .await?;
                        }
                        Ok(())
                    })
                })
                .connect_with(options.clone())
        };
        let err = |source| StoreError::Connect {
            url: redact(url),
            source,
        };
        let (write, read) = match kind {
            DbKind::Sqlite => {
                let write = connect(1).await.map_err(err)?;
                let read = connect(4).await.map_err(err)?;
                (write, read)
            }
            DbKind::Postgres => {
                let pool = connect(16).await.map_err(err)?;
                (pool.clone(), pool)
            }
        };
        let store = Store {
            kind,
            write,
            read,
            audit: true,
            writes: Default::default(),
            trusted_after: verify::TRUSTED_AFTER,
            url: url.to_string(),
            traces: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// A write transaction that runs to its end (or rolls back) whatever happens to its
    /// caller: see [`tx`].
    pub(crate) async fn begin_write(&self) -> Result<tx::WriteTx, sqlx::Error> {
        tx::WriteTx::begin(self.writer(), self.kind).await
    }

    /// The pool writes go through, counted (see [`Store::writes`]).
    fn writer(&self) -> &AnyPool {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.write
    }

    /// Write transactions and single write statements this store has begun since it was
    /// opened (`fleetbox_store_writes_total`): what an idle fleet costs the database.
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store answers and every migration this build knows is applied: how many are
    /// (`applied`, `known`).
    pub async fn readiness(&self) -> Result<(usize, usize), StoreError> {
        let (applied,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM fleetbox_migrations")
            .fetch_one(&self.read)
            .await
            .doing("checking readiness")?;
        Ok((applied as usize, MIGRATIONS.len()))
    }

    /// Turn the audit log off (the throughput benchmark's baseline) or on.
    pub fn set_audit(&mut self, on: bool) {
        self.audit = on;
    }

    /// Trust an agent under `recheck = "adaptive"` after this many valid results in a row.
    pub fn set_trusted_after(&mut self, n: u32) {
        self.trusted_after = i64::from(n.max(1));
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// Rows per multi-row statement with `params` parameters each. SQLite looks parameter
    /// names up with a linear scan per bind (`sqlite3_bind_parameter_name`), so a statement
    /// with thousands of `$N` costs quadratic time there: keep SQLite's statements small.
    pub(crate) fn rows_per_statement(&self, params: usize) -> usize {
        let budget = match self.kind {
            DbKind::Sqlite => 256,
            DbKind::Postgres => 8192,
        };
        (budget / params.max(1)).max(1)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS fleetbox_migrations (name TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(self.writer())
        .await
        .map_err(|source| StoreError::Migrate {
            name: "fleetbox_migrations",
            source,
        })?;
        for (name, text) in MIGRATIONS {
            let mut tx = self.begin_write().await.doing("starting a migration")?;
            if self.kind == DbKind::Postgres {
                // Several coordinators may start at once against one database.
                sqlx::query("LOCK TABLE fleetbox_migrations IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .doing("locking the migration table")?;
            }
            let done = sqlx::query("SELECT name FROM fleetbox_migrations WHERE name = $1")
                .bind(*name)
                .fetch_optional(&mut *tx)
                .await
                .doing("reading applied migrations")?;
            if done.is_some() {
                continue;
            }
            let sql = self.kind.dialect(text);
            tx.execute(sql.as_str())
                .await
                .map_err(|source| StoreError::Migrate { name, source })?;
            sqlx::query("INSERT INTO fleetbox_migrations (name, applied_at) VALUES ($1, $2)")
                .bind(*name)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .doing("recording a migration")?;
            tx.commit().await.doing("committing a migration")?;
            tracing::info!(migration = name, "applied");
        }
        Ok(())
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_have_no_unfilled_placeholders() {
        for (name, text) in MIGRATIONS {
            for kind in [DbKind::Sqlite, DbKind::Postgres] {
                let sql = kind.dialect(text);
                assert!(!sql.contains("{serial_pk}"), "{name} for {kind:?}");
            }
        }
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://me:secret@localhost/db"),
            "postgres://me:***@localhost/db"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
