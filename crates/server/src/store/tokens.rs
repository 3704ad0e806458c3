//! API tokens, stored only as sha256 hashes.

use sqlx::Row;

use super::{Doing, Store, StoreError, now_ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Everything: submit, inspect and cancel jobs, list agents.
    Admin,
    /// Only `POST /v1/agents/enroll`.
    Enroll,
    /// `POST /v1/agents/enroll` for the agents this coordinator's own process starts
    /// (`fleetbox up`): made at each start, never written to disk; agents it enrolls are
    /// trusted from the start.
    EnrollOwn,
    /// One agent's own calls.
    Agent,
}

impl TokenKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::Enroll => "enroll",
            TokenKind::EnrollOwn => "enroll_own",
            TokenKind::Agent => "agent",
        }
    }

    fn parse(s: &str) -> Option<TokenKind> {
        match s {
            "admin" => Some(TokenKind::Admin),
            "enroll" => Some(TokenKind::Enroll),
            "enroll_own" => Some(TokenKind::EnrollOwn),
            "agent" => Some(TokenKind::Agent),
            _ => None,
        }
    }
}

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: String,
    pub kind: TokenKind,
    pub agent_id: Option<String>,
    /// Who this is in the audit log: `agent:<id>`, or `<kind>:<token id>` (the first 12 hex
    /// digits of the token's hash, which identify it without revealing it).
    pub actor: String,
}

impl Store {
    /// Record a token (idempotent).
    pub async fn add_token(
        &self,
        hash: &str,
        tenant_id: &str,
        kind: TokenKind,
        agent_id: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (hash, tenant_id, kind, agent_id, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(hash)
        .bind(tenant_id)
        .bind(kind.as_str())
        .bind(agent_id)
        .bind(now_ms())
        .execute(&self.write)
        .await
        .doing("storing a token")?;
        Ok(())
    }

    pub async fn token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        let row = sqlx::query("SELECT tenant_id, kind, agent_id FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.read)
            .await
            .doing("looking up a token")?;
        let Some(row) = row else { return Ok(None) };
        let kind: String = row.try_get("kind").doing("reading a token")?;
        let kind = TokenKind::parse(&kind).ok_or(StoreError::Corrupt {
            what: "token kind",
            detail: kind,
        })?;
        let agent_id: Option<String> = row.try_get("agent_id").doing("reading a token")?;
        let actor = match &agent_id {
            Some(id) => format!("agent:{id}"),
            None => format!("{}:{}", kind.as_str(), &hash[..hash.len().min(12)]),
        };
        Ok(Some(Principal {
            tenant_id: row.try_get("tenant_id").doing("reading a token")?,
            kind,
            agent_id,
            actor,
        }))
    }
}
