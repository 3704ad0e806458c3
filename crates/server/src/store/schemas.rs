//! Each tenant in a PostgreSQL schema of its own (`fleetbox server --tenant-schemas`).
//!
//! The tables that hold a tenant's data ([`PER_TENANT`]) are partitioned by `tenant_id`
//! (PostgreSQL's list partitioning) and each tenant's partitions live in its schema
//! `fleetbox_tenant_<name>`. The coordinator's statements do not change (they address the parent
//! tables, and the planner prunes to one tenant's partition where a statement names the tenant),
//! while an operator can dump, restore, grant on, move or drop one tenant's data by its schema.
//! The control plane ([`SHARED`]: tenants, tokens, agents, pools, certificates, trust, metrics)
//! stays in the database's own schema.
//!
//! The mode belongs to the database, not to a coordinator: once `jobs` is partitioned, every
//! coordinator on the database keeps it up (a new tenant gets its partitions before its first
//! row), flag or not. Turning it on converts the tables in one transaction, rows included; the
//! way back is a dump and restore. A partitioned table's unique keys must contain the partition
//! key, so each primary and unique key gets `tenant_id` appended (ids are random, and a shard or
//! lease belongs to one tenant, so the keys are as unique as before) and each foreign key to a
//! partitioned table names the tenant too.

use sqlx::Executor;

use super::settle::Tx;
use super::{DbKind, Doing, Store, StoreError};

/// Tables holding one tenant's data, each partitioned by `tenant_id` in the mode.
pub const PER_TENANT: &[&str] = &[
    "jobs",
    "tasks",
    "leases",
    "attempts",
    "job_counts",
    "review_flags",
    "notifications",
    "sessions",
    "blob_owners",
    "job_blobs",
    "audit",
    "audit_heads",
    "audit_checkpoints",
    "audit_prunes",
];

/// Tables every tenant shares (the control plane), left as they are.
pub const SHARED: &[&str] = &[
    "tenants",
    "tokens",
    "agents",
    "pools",
    "agent_certs",
    "agent_trust",
    "metric_counters",
    "fleetbox_migrations",
];

/// The schema holding `tenant`'s partitions. Tenant names are checked where they enter
/// (`a-z 0-9 - _`), and again here, since the name is written into DDL.
pub fn schema_of(tenant: &str) -> Result<String, StoreError> {
    if !fleetbox_proto::tenancy::valid_tenant_name(tenant) {
        return Err(StoreError::TenantSchemas(format!(
            "`{tenant}` cannot name a schema (a tenant name is 1-40 of a-z 0-9 - _)"
        )));
    }
    Ok(format!("fleetbox_tenant_{tenant}"))
}

/// The statements giving `tenant` its partition of `parent` (named `table` in its schema).
fn partition_ddl(table: &str, parent: &str, tenant: &str) -> Result<[String; 2], StoreError> {
    let schema = schema_of(tenant)?;
    Ok([
        format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
        format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".\"{table}\" PARTITION OF \"{parent}\" \
             FOR VALUES IN ('{tenant}')"
        ),
    ])
}

/// `def` with `tenant_id` added to the column list whose `(` is the first at or after `from`
/// (unchanged when the list has it). `None` when the parentheses do not close.
fn with_tenant(def: &str, from: usize) -> Option<String> {
    let open = from + def[from..].find('(')?;
    let mut depth = 0usize;
    let mut close = None;
    for (i, c) in def[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            _ => {}
        }
    }
    let close = close?;
    let has = def[open + 1..close]
        .split(',')
        .any(|c| c.trim().trim_matches('"') == "tenant_id");
    if has {
        return Some(def.to_string());
    }
    Some(format!("{}, tenant_id{}", &def[..close], &def[close..]))
}

/// A foreign key to re-make once its tables are partitioned.
#[derive(Debug, Clone, PartialEq)]
struct ForeignKey {
    table: String,
    name: String,
    def: String,
    references: String,
}

impl ForeignKey {
    /// The key as it is made again: a key to a partitioned table names the tenant on both sides.
    fn remade(&self) -> Result<String, StoreError> {
        let mut def = self.def.clone();
        if PER_TENANT.contains(&self.references.as_str()) {
            let unparsed = || {
                StoreError::TenantSchemas(format!(
                    "cannot read foreign key `{}` of `{}`: {}",
                    self.name, self.table, self.def
                ))
            };
            if !PER_TENANT.contains(&self.table.as_str()) {
                return Err(StoreError::TenantSchemas(format!(
                    "`{}` is shared but its key `{}` points at `{}`, which is kept per tenant",
                    self.table, self.name, self.references
                )));
            }
            def = with_tenant(&def, 0).ok_or_else(unparsed)?;
            let at = def.find(" REFERENCES ").ok_or_else(unparsed)?;
            def = with_tenant(&def, at).ok_or_else(unparsed)?;
        }
        Ok(format!(
            "ALTER TABLE \"{}\" ADD CONSTRAINT \"{}\" {def}",
            self.table, self.name
        ))
    }
}

impl Store {
    /// Whether this database keeps each tenant in a schema of its own.
    pub async fn tenant_schemas(&self) -> Result<bool, StoreError> {
        if self.kind != DbKind::Postgres {
            return Ok(false);
        }
        let on =
            sqlx::query("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass('jobs')")
                .fetch_optional(&self.read)
                .await
                .doing("reading whether tenants have schemas")?;
        Ok(on.is_some())
    }

    /// Turn on (`want`) or keep up the schema per tenant: tables not yet partitioned are
    /// converted with their rows, and every tenant gets its partitions. Whether the mode is on.
    pub async fn keep_tenant_schemas(&self, want: bool) -> Result<bool, StoreError> {
        if self.kind != DbKind::Postgres {
            return match want {
                true => Err(StoreError::TenantSchemas(
                    "a schema per tenant needs PostgreSQL (SQLite keeps the tenant column)".into(),
                )),
                false => Ok(false),
            };
        }
        let doing = "partitioning tables by tenant";
        let mut tx = self.begin_write().await.doing(doing)?;
        // One coordinator converts; the others wait and find it done.
        sqlx::query("LOCK TABLE fleetbox_migrations IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .doing(doing)?;
        let partitioned = texts(
            &mut tx,
            "SELECT c.relname::text FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid \
             WHERE c.relnamespace = current_schema()::regnamespace",
            None,
        )
        .await?;
        if partitioned.is_empty() && !want {
            tx.commit().await.doing(doing)?;
            return Ok(false);
        }
        let tenants = texts(&mut tx, "SELECT id FROM tenants ORDER BY id", None).await?;
        let convert: Vec<&str> = PER_TENANT
            .iter()
            .copied()
            .filter(|t| !partitioned.iter().any(|p| p == t))
            .collect();
        if !convert.is_empty() {
            tracing::info!(tables = ?convert, "partitioning tables by tenant");
            let keys = foreign_keys(&mut tx, &convert).await?;
            for key in &keys {
                let drop = format!(
                    "ALTER TABLE \"{}\" DROP CONSTRAINT \"{}\"",
                    key.table, key.name
                );
                tx.execute(drop.as_str()).await.doing(doing)?;
            }
            for table in &convert {
                partition_table(&mut tx, table, &tenants).await?;
            }
            for key in &keys {
                tx.execute(key.remade()?.as_str()).await.doing(doing)?;
            }
        }
        // Tenants made by a coordinator that did not know the mode get their partitions.
        let have: Vec<(String, String)> = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_class p ON p.oid = i.inhparent \
             WHERE p.relnamespace = current_schema()::regnamespace",
        )
        .fetch_all(&mut *tx)
        .await
        .doing(doing)?;
        for tenant in &tenants {
            let schema = schema_of(tenant)?;
            for table in PER_TENANT {
                if have.iter().any(|(s, t)| *s == schema && t == table) {
                    continue;
                }
                for ddl in partition_ddl(table, table, tenant)? {
                    tx.execute(ddl.as_str()).await.doing(doing)?;
                }
            }
        }
        tx.commit().await.doing(doing)?;
        Ok(true)
    }

    /// Give a new tenant its schema and partitions, when the database keeps tenants apart.
    /// Each statement commits on its own: a partition locks its parent only for its statement.
    pub(crate) async fn make_tenant_schema(&self, tenant: &str) -> Result<(), StoreError> {
        if !self.tenant_schemas().await? {
            return Ok(());
        }
        for table in PER_TENANT {
            for ddl in partition_ddl(table, table, tenant)? {
                self.writer()
                    .execute(ddl.as_str())
                    .await
                    .doing("making a tenant's schema")?;
            }
        }
        Ok(())
    }
}

/// The first column of `sql`'s rows (text), with `$1` bound to `arg` when given.
async fn texts(tx: &mut Tx, sql: &str, arg: Option<&str>) -> Result<Vec<String>, StoreError> {
    let mut query = sqlx::query_as::<_, (String,)>(sql);
    if let Some(arg) = arg {
        query = query.bind(arg);
    }
    let rows = query
        .fetch_all(&mut **tx)
        .await
        .doing("reading the catalog")?;
    Ok(rows.into_iter().map(|(v,)| v).collect())
}

/// The foreign keys from or to any of `tables`.
async fn foreign_keys(tx: &mut Tx, tables: &[&str]) -> Result<Vec<ForeignKey>, StoreError> {
    let doing = "reading foreign keys";
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid), \
         confrelid::regclass::text FROM pg_constraint \
         WHERE contype = 'f' AND connamespace = current_schema()::regnamespace ORDER BY 1, 2",
    )
    .fetch_all(&mut **tx)
    .await
    .doing(doing)?;
    Ok(rows
        .into_iter()
        .map(|(table, name, def, references)| ForeignKey {
            table,
            name,
            def,
            references,
        })
        .filter(|k| tables.contains(&k.table.as_str()) || tables.contains(&k.references.as_str()))
        .collect())
}

/// Replace `table` by a table of the same columns partitioned by tenant, with a partition for
/// each of `tenants`, its rows, its sequences, and its keys and indexes (unique ones naming the
/// tenant). Its foreign keys are dropped before and made again after, by the caller.
async fn partition_table(tx: &mut Tx, table: &str, tenants: &[String]) -> Result<(), StoreError> {
    let doing = "partitioning a table by tenant";
    let keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid = to_regclass($1) AND contype IN ('p', 'u') ORDER BY contype, conname",
    )
    .bind(table)
    .fetch_all(&mut **tx)
    .await
    .doing(doing)?;
    let indexes = texts(
        tx,
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1 \
         AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = to_regclass($1)) \
         ORDER BY indexname",
        Some(table),
    )
    .await?;
    let serials: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.relname::text, a.attname::text FROM pg_depend d \
         JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
         JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
         WHERE d.refobjid = to_regclass($1) AND d.deptype = 'a'",
    )
    .bind(table)
    .fetch_all(&mut **tx)
    .await
    .doing(doing)?;

    let parted = format!("{table}__by_tenant");
    let mut ddl = vec![format!(
        "CREATE TABLE \"{parted}\" (LIKE \"{table}\" INCLUDING DEFAULTS INCLUDING CONSTRAINTS \
         INCLUDING GENERATED INCLUDING IDENTITY) PARTITION BY LIST (tenant_id)"
    )];
    for tenant in tenants {
        ddl.extend(partition_ddl(table, &parted, tenant)?);
    }
    ddl.push(format!(
        "INSERT INTO \"{parted}\" SELECT * FROM \"{table}\""
    ));
    for (sequence, column) in &serials {
        ddl.push(format!(
            "ALTER SEQUENCE \"{sequence}\" OWNED BY \"{parted}\".\"{column}\""
        ));
    }
    ddl.push(format!("DROP TABLE \"{table}\""));
    ddl.push(format!("ALTER TABLE \"{parted}\" RENAME TO \"{table}\""));
    let unparsed = |def: &str| StoreError::TenantSchemas(format!("cannot read `{def}`"));
    for (name, def) in &keys {
        let def = with_tenant(def, 0).ok_or_else(|| unparsed(def))?;
        ddl.push(format!(
            "ALTER TABLE \"{table}\" ADD CONSTRAINT \"{name}\" {def}"
        ));
    }
    for def in &indexes {
        let def = match def.starts_with("CREATE UNIQUE INDEX") {
            true => {
                let at = def.find(" USING ").ok_or_else(|| unparsed(def))?;
                with_tenant(def, at).ok_or_else(|| unparsed(def))?
            }
            false => def.clone(),
        };
        ddl.push(def);
    }
    for statement in &ddl {
        tx.execute(statement.as_str()).await.doing(doing)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_unique_indexes_gain_the_tenant_once() {
        assert_eq!(
            with_tenant("PRIMARY KEY (id)", 0).unwrap(),
            "PRIMARY KEY (id, tenant_id)"
        );
        assert_eq!(
            with_tenant("PRIMARY KEY (tenant_id, seq)", 0).unwrap(),
            "PRIMARY KEY (tenant_id, seq)"
        );
        let index = "CREATE UNIQUE INDEX x ON public.t USING btree (lower(a), b) WHERE (b > 0)";
        let at = index.find(" USING ").unwrap();
        assert_eq!(
            with_tenant(index, at).unwrap(),
            "CREATE UNIQUE INDEX x ON public.t USING btree (lower(a), b, tenant_id) WHERE (b > 0)"
        );
        assert_eq!(with_tenant("UNIQUE (a", 0), None);
    }

    #[test]
    fn a_key_to_a_partitioned_table_names_the_tenant_on_both_sides() {
        let key = ForeignKey {
            table: "tasks".into(),
            name: "tasks_job_id_fkey".into(),
            def: "FOREIGN KEY (job_id) REFERENCES jobs(id)".into(),
            references: "jobs".into(),
        };
        assert_eq!(
            key.remade().unwrap(),
            "ALTER TABLE \"tasks\" ADD CONSTRAINT \"tasks_job_id_fkey\" \
             FOREIGN KEY (job_id, tenant_id) REFERENCES jobs(id, tenant_id)"
        );
        let to_tenants = ForeignKey {
            def: "FOREIGN KEY (tenant_id) REFERENCES tenants(id)".into(),
            references: "tenants".into(),
            ..key.clone()
        };
        assert!(
            to_tenants
                .remade()
                .unwrap()
                .ends_with("REFERENCES tenants(id)")
        );
        let shared = ForeignKey {
            table: "agents".into(),
            ..key
        };
        assert!(shared.remade().is_err());
    }

    #[test]
    fn a_name_written_into_ddl_is_a_tenant_name() {
        assert_eq!(schema_of("acme-2").unwrap(), "fleetbox_tenant_acme-2");
        for hostile in ["a'); DROP TABLE jobs; --", "A", "x\"y", ""] {
            assert!(schema_of(hostile).is_err(), "{hostile}");
            assert!(partition_ddl("jobs", "jobs", hostile).is_err());
        }
    }
}
