//! What a result receipt is made of (see `crate::receipt`): a job's accepted values with the
//! attempts they came from, its audit entries, and the chain around them.

use fleetbox_proto::TaskState;

use super::audit::Record;
use super::sql::Sql;
use super::{Doing, Store, StoreError};

/// An accepted shard's chosen attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AcceptedValue {
    pub task_id: i64,
    pub shard_index: i64,
    pub verified: i64,
    pub agent_id: String,
    pub lease_id: String,
    pub runner: String,
    pub output_sha256: Option<String>,
}

impl Store {
    /// `job_id`'s accepted shards, each with the attempt its value was taken from.
    pub async fn accepted_sources(&self, job_id: &str) -> Result<Vec<AcceptedValue>, StoreError> {
        Sql::new(
            "SELECT t.id AS task_id, t.shard_index, t.verified, a.agent_id, a.lease_id, a.runner, \
             a.output_sha256 FROM tasks t JOIN attempts a ON a.id = (SELECT MAX(x.id) FROM \
             attempts x WHERE x.task_id = t.id AND x.chosen = 1) WHERE t.job_id = ",
        )
        .bind(job_id)
        .push(" AND t.state = ")
        .bind(TaskState::Accepted.as_str())
        .push(" ORDER BY t.shard_index")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading a job's accepted values")
    }

    /// Every audit entry of `tenant` about `job_id`, oldest first.
    pub async fn audit_of_job(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<Vec<Record>, StoreError> {
        Sql::new(
            "SELECT tenant_id, seq, at, actor, action, job_id, task_id, lease_id, agent_id, \
             details, leaf, chain FROM audit WHERE tenant_id = ",
        )
        .bind(tenant)
        .push(" AND job_id = ")
        .bind(job_id)
        .push(" ORDER BY seq")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading a job's audit entries")
    }

    /// The leaves of `tenant`'s entries `from..=to` (seq, leaf), and the chain value before
    /// `from` (`None`: that entry is not in the database).
    pub async fn audit_span(
        &self,
        tenant: &str,
        from: i64,
        to: i64,
    ) -> Result<(Vec<(i64, String)>, Option<String>), StoreError> {
        let leaves: Vec<(i64, String)> = Sql::new("SELECT seq, leaf FROM audit WHERE tenant_id = ")
            .bind(tenant)
            .push(" AND seq >= ")
            .bind(from)
            .push(" AND seq <= ")
            .bind(to)
            .push(" ORDER BY seq")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading audit leaves")?;
        let before = if from <= 1 {
            Some(hex::encode(super::audit::GENESIS))
        } else {
            let row: Option<(String,)> = Sql::new("SELECT chain FROM audit WHERE tenant_id = ")
                .bind(tenant)
                .push(" AND seq = ")
                .bind(from - 1)
                .build_as()
                .fetch_optional(&self.read)
                .await
                .doing("reading an audit chain value")?;
            row.map(|(c,)| c)
        };
        Ok((leaves, before))
    }
}
