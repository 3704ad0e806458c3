//! Agents' client certificates (`--agent-mtls`): issued at enrolment, revoked with the agent.

use super::audit::{Action, Entry};
use super::{Doing, Store, StoreError, now_ms};

/// A certificate the coordinator's CA signed for an agent.
#[derive(Debug, Clone)]
pub struct IssuedCert<'a> {
    /// sha256 of its DER, hex.
    pub fingerprint: &'a str,
    /// Its serial number, hex (what the CRL names).
    pub serial: &'a str,
    pub agent_id: &'a str,
    pub tenant_id: &'a str,
    pub expires_at: i64,
}

/// A revoked certificate, for the CRL.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RevokedCert {
    pub fingerprint: String,
    pub serial: String,
    pub revoked_at: i64,
}

impl Store {
    pub async fn record_agent_cert(&self, cert: &IssuedCert<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agent_certs (fingerprint, serial, agent_id, tenant_id, issued_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(cert.fingerprint)
        .bind(cert.serial)
        .bind(cert.agent_id)
        .bind(cert.tenant_id)
        .bind(now_ms())
        .bind(cert.expires_at)
        .execute(self.writer())
        .await
        .doing("recording an agent's certificate")?;
        Ok(())
    }

    /// The agent a certificate was issued to, and whether it is revoked.
    pub async fn agent_cert(
        &self,
        fingerprint: &str,
    ) -> Result<Option<(String, bool)>, StoreError> {
        let row: Option<(String, Option<i64>)> =
            sqlx::query_as("SELECT agent_id, revoked_at FROM agent_certs WHERE fingerprint = $1")
                .bind(fingerprint)
                .fetch_optional(&self.read)
                .await
                .doing("reading an agent's certificate")?;
        Ok(row.map(|(agent, revoked)| (agent, revoked.is_some())))
    }

    /// Every revoked certificate that has not expired (an expired one is refused anyway).
    pub async fn revoked_agent_certs(&self) -> Result<Vec<RevokedCert>, StoreError> {
        sqlx::query_as(
            "SELECT fingerprint, serial, revoked_at FROM agent_certs \
             WHERE revoked_at IS NOT NULL AND expires_at > $1 ORDER BY serial",
        )
        .bind(now_ms())
        .fetch_all(&self.read)
        .await
        .doing("reading revoked certificates")
    }

    /// Cut agent `agent_id` of `tenant_id` off: revoke its tokens and its certificates, in one
    /// transaction (audited as `agent.revoked`). `false` when there is no such agent.
    pub async fn revoke_agent(
        &self,
        tenant_id: &str,
        agent_id: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("revoking an agent")?;
        let known = super::sql::exists(
            &mut *tx,
            "SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2",
            &[tenant_id, agent_id],
            "revoking an agent",
        )
        .await?;
        if !known {
            return Ok(false);
        }
        let tokens = sqlx::query(
            "UPDATE tokens SET revoked_at = $1, changed_at = $1 \
             WHERE agent_id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(agent_id)
        .execute(&mut *tx)
        .await
        .doing("revoking an agent's tokens")?
        .rows_affected();
        let certs = sqlx::query(
            "UPDATE agent_certs SET revoked_at = $1 WHERE agent_id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(agent_id)
        .execute(&mut *tx)
        .await
        .doing("revoking an agent's certificates")?
        .rows_affected();
        let entry = Entry::new(tenant_id, actor, Action::AgentRevoked)
            .agent(agent_id)
            .details(serde_json::json!({ "tokens": tokens, "certificates": certs }));
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("revoking an agent")?;
        Ok(true)
    }
}
