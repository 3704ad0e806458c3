//! API tokens, stored only as sha256 hashes. A token's id is the first 12 hex digits of its
//! hash: it names the token in listings and the audit log without revealing it.

use fleetbox_proto::tenancy::{Scope, TokenView};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::{Action, Entry};
use super::settle::Tx;
use super::{Doing, Store, StoreError, now_ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// The bootstrap token of the data directory (`admin.token`): every scope.
    Admin,
    /// A token made by `fleetbox token create`: its scopes.
    User,
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
            TokenKind::User => "user",
            TokenKind::Enroll => "enroll",
            TokenKind::EnrollOwn => "enroll_own",
            TokenKind::Agent => "agent",
        }
    }

    fn parse(s: &str) -> Option<TokenKind> {
        [
            TokenKind::Admin,
            TokenKind::User,
            TokenKind::Enroll,
            TokenKind::EnrollOwn,
            TokenKind::Agent,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Tokens people use (they carry scopes), as opposed to enrolment and agent tokens.
    pub fn is_user(self) -> bool {
        matches!(self, TokenKind::Admin | TokenKind::User)
    }
}

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: String,
    pub kind: TokenKind,
    pub agent_id: Option<String>,
    /// The token's id (the first 12 hex digits of its hash).
    pub token_id: String,
    /// What a user token may do (empty for the other kinds).
    pub scopes: Vec<Scope>,
    /// When it stops working (ms), if ever.
    pub expires_at: Option<i64>,
    /// The pool an enrolment token's agents join (`None`: the tenant's own).
    pub pool: Option<String>,
    /// Who this is in the audit log: `agent:<id>`, or `<kind>:<token id>`.
    pub actor: String,
}

impl Principal {
    pub fn has(&self, scope: Scope) -> bool {
        self.kind.is_user() && self.scopes.contains(&scope)
    }

    /// An admin of the `default` tenant manages every tenant.
    pub fn is_operator(&self) -> bool {
        self.tenant_id == super::DEFAULT_TENANT && self.has(Scope::Admin)
    }
}

/// A token as stored: its principal and whether it was revoked.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub principal: Principal,
    pub revoked_at: Option<i64>,
}

/// A new token to store.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    pub hash: &'a str,
    pub tenant_id: &'a str,
    pub kind: TokenKind,
    pub name: Option<&'a str>,
    pub scopes: &'a [Scope],
    pub expires_at: Option<i64>,
    pub uses: Option<u64>,
    pub pool: Option<&'a str>,
    pub created_by: &'a str,
}

/// The id a token is known by: the first 12 hex digits of its hash.
pub fn token_id(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

const TOKEN_COLUMNS: &str = "id, tenant_id, kind, agent_id, name, scopes, created_at, created_by, \
     expires_at, revoked_at, uses_left, pool";

fn scopes_of(text: Option<String>) -> Vec<Scope> {
    text.map(|t| Scope::parse_list(&t).unwrap_or_default())
        .unwrap_or_default()
}

/// Insert `t`; the `token.created` entry to append.
async fn insert_token(tx: &mut Tx, t: &NewToken<'_>, now: i64) -> Result<Entry, StoreError> {
    let id = token_id(t.hash);
    sqlx::query(
        "INSERT INTO tokens (hash, id, tenant_id, kind, name, scopes, created_at, created_by, expires_at, uses_left, pool) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(t.hash)
    .bind(id)
    .bind(t.tenant_id)
    .bind(t.kind.as_str())
    .bind(t.name)
    .bind((!t.scopes.is_empty()).then(|| Scope::join(t.scopes)))
    .bind(now)
    .bind(t.created_by)
    .bind(t.expires_at)
    .bind(t.uses.map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
    .bind(t.pool)
    .execute(&mut **tx)
    .await
    .doing("storing a token")?;
    Ok(
        Entry::new(t.tenant_id, t.created_by, Action::TokenCreated).details(serde_json::json!({
            "token_id": id,
            "kind": t.kind.as_str(),
            "name": t.name,
            "scopes": t.scopes,
            "expires_at": t.expires_at,
            "uses": t.uses,
        })),
    )
}

fn view_of(row: &AnyRow) -> Result<TokenView, StoreError> {
    let get = |e| StoreError::Query {
        doing: "reading a token",
        source: e,
    };
    let uses: Option<i64> = row.try_get("uses_left").map_err(get)?;
    Ok(TokenView {
        id: row.try_get("id").map_err(get)?,
        tenant: row.try_get("tenant_id").map_err(get)?,
        kind: row.try_get("kind").map_err(get)?,
        name: row.try_get("name").map_err(get)?,
        scopes: scopes_of(row.try_get("scopes").map_err(get)?),
        agent_id: row.try_get("agent_id").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
        created_by: row.try_get("created_by").map_err(get)?,
        expires_at: row.try_get("expires_at").map_err(get)?,
        revoked_at: row.try_get("revoked_at").map_err(get)?,
        uses_left: uses.map(|u| u.max(0).unsigned_abs()),
        pool: row.try_get("pool").map_err(get)?,
    })
}

impl Store {
    /// Record a bootstrap token (idempotent; a revoked one stays revoked).
    pub async fn add_token(
        &self,
        hash: &str,
        tenant_id: &str,
        kind: TokenKind,
        agent_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let scopes = (kind == TokenKind::Admin).then(|| Scope::join(&Scope::ALL));
        sqlx::query(
            "INSERT INTO tokens (hash, id, tenant_id, kind, agent_id, scopes, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'server') ON CONFLICT (hash) DO NOTHING",
        )
        .bind(hash)
        .bind(token_id(hash))
        .bind(tenant_id)
        .bind(kind.as_str())
        .bind(agent_id)
        .bind(scopes)
        .bind(now_ms())
        .execute(self.writer())
        .await
        .doing("storing a token")?;
        Ok(())
    }

    /// Store a token made by `POST /v1/tokens`, audited as `token.created`.
    pub async fn create_token(&self, t: &NewToken<'_>) -> Result<TokenView, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("storing a token")?;
        let entry = insert_token(&mut tx, t, now).await?;
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("storing a token")?;
        self.stored_view(token_id(t.hash)).await
    }

    /// Replace token `old` by `t` in one transaction: `t` is stored, `old` revoked (audited as
    /// `token.created` and `token.revoked`). `false`: `old` was revoked already.
    pub async fn rotate_token(
        &self,
        old: &str,
        t: &NewToken<'_>,
    ) -> Result<Option<TokenView>, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("rotating a token")?;
        let revoked = sqlx::query(
            "UPDATE tokens SET revoked_at = $1, changed_at = $1 \
             WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(t.tenant_id)
        .bind(old)
        .execute(&mut *tx)
        .await
        .doing("rotating a token")?
        .rows_affected();
        if revoked == 0 {
            return Ok(None);
        }
        let created = insert_token(&mut tx, t, now).await?;
        let gone = Entry::new(t.tenant_id, t.created_by, Action::TokenRevoked).details(
            serde_json::json!({ "token_id": old, "why": format!("rotated to `{}`", token_id(t.hash)) }),
        );
        self.append_audit(&mut tx, vec![created, gone], now).await?;
        tx.commit().await.doing("rotating a token")?;
        self.stored_view(token_id(t.hash)).await.map(Some)
    }

    async fn stored_view(&self, id: &str) -> Result<TokenView, StoreError> {
        self.token_by_id(id).await?.ok_or(StoreError::Corrupt {
            what: "token",
            detail: format!("`{id}` missing right after it was stored"),
        })
    }

    /// A token of any tenant by its id (the caller checks the tenant).
    pub async fn token_by_id(&self, id: &str) -> Result<Option<TokenView>, StoreError> {
        // From the primary (a token just stored is read back at once); a read, not counted.
        let row = sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.write)
            .await
            .doing("reading a token")?;
        row.as_ref().map(view_of).transpose()
    }

    /// Tokens (by hash) changed after `since` (ms; ended or shortened), with when: what a
    /// coordinator's token cache forgets.
    pub async fn tokens_changed_since(&self, since: i64) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query_as("SELECT hash, changed_at FROM tokens WHERE changed_at > $1")
            .bind(since)
            .fetch_all(&self.read)
            .await
            .doing("reading changed tokens")
    }

    pub async fn token(&self, hash: &str) -> Result<Option<StoredToken>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.read)
        .await
        .doing("looking up a token")?;
        let Some(row) = row else { return Ok(None) };
        let view = view_of(&row)?;
        let kind = TokenKind::parse(&view.kind).ok_or(StoreError::Corrupt {
            what: "token kind",
            detail: view.kind.clone(),
        })?;
        let actor = match &view.agent_id {
            Some(id) => format!("agent:{id}"),
            None => format!("{}:{}", kind.as_str(), view.id),
        };
        Ok(Some(StoredToken {
            principal: Principal {
                tenant_id: view.tenant,
                kind,
                agent_id: view.agent_id,
                token_id: view.id,
                scopes: view.scopes,
                expires_at: view.expires_at,
                pool: view.pool,
                actor,
            },
            revoked_at: view.revoked_at,
        }))
    }

    /// The tenant's tokens (agents' own tokens left out unless `agents`), newest first.
    pub async fn list_tokens(
        &self,
        tenant_id: &str,
        agents: bool,
    ) -> Result<Vec<TokenView>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant_id = $1 AND ($2 = 1 OR kind <> 'agent') \
             ORDER BY created_at DESC, id"
        ))
        .bind(tenant_id)
        .bind(i64::from(agents))
        .fetch_all(&self.read)
        .await
        .doing("listing tokens")?;
        rows.iter().map(view_of).collect()
    }

    /// Revoke a token of `tenant` (audited as `token.revoked`); `false` when there is no such
    /// token or it was revoked already. Every coordinator refuses it within a second.
    pub async fn revoke_token(
        &self,
        tenant_id: &str,
        id: &str,
        actor: &str,
        why: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("revoking a token")?;
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = $1, changed_at = $1 \
             WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .doing("revoking a token")?
        .rows_affected()
            > 0;
        if done {
            let entry = Entry::new(tenant_id, actor, Action::TokenRevoked)
                .details(serde_json::json!({ "token_id": id, "why": why }));
            self.append_audit(&mut tx, vec![entry], now).await?;
        }
        tx.commit().await.doing("revoking a token")?;
        Ok(done)
    }

    /// Give `agent` a new credential `new_hash` until `expires_at`, and let its current one
    /// (`old_id`) end by `old_until` at the latest, in one transaction (audited as
    /// `token.created`). `false`: the old one was revoked meanwhile (no renewal).
    pub async fn renew_agent_token(
        &self,
        tenant_id: &str,
        agent_id: &str,
        old_id: &str,
        new_hash: &str,
        expires_at: i64,
        old_until: i64,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self
            .begin_write()
            .await
            .doing("renewing an agent's credential")?;
        let cut = sqlx::query(
            "UPDATE tokens SET expires_at = CASE WHEN expires_at IS NULL OR expires_at > $1 \
             THEN $1 ELSE expires_at END, changed_at = $4 \
             WHERE id = $2 AND agent_id = $3 AND revoked_at IS NULL",
        )
        .bind(old_until)
        .bind(old_id)
        .bind(agent_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .doing("renewing an agent's credential")?
        .rows_affected();
        if cut == 0 {
            return Ok(false);
        }
        let id = token_id(new_hash);
        sqlx::query(
            "INSERT INTO tokens (hash, id, tenant_id, kind, agent_id, created_at, created_by, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(new_hash)
        .bind(id)
        .bind(tenant_id)
        .bind(TokenKind::Agent.as_str())
        .bind(agent_id)
        .bind(now)
        .bind(format!("agent:{agent_id}"))
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .doing("renewing an agent's credential")?;
        let entry = Entry::new(tenant_id, format!("agent:{agent_id}"), Action::TokenCreated)
            .agent(agent_id)
            .details(serde_json::json!({
                "token_id": id,
                "kind": TokenKind::Agent.as_str(),
                "renews": old_id,
                "expires_at": expires_at,
            }));
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("renewing an agent's credential")?;
        Ok(true)
    }

    /// Spend one use of an enrolment token; `false` when it has none left.
    pub(crate) async fn spend_enrolment(&self, id: &str) -> Result<bool, StoreError> {
        let spent = sqlx::query(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = $1 AND uses_left IS NOT NULL \
             AND uses_left > 0",
        )
        .bind(id)
        .execute(self.writer())
        .await
        .doing("spending an enrolment")?
        .rows_affected();
        if spent > 0 {
            return Ok(true);
        }
        let unbounded: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT uses_left FROM tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.read)
                .await
                .doing("spending an enrolment")?;
        Ok(matches!(unbounded, Some((None,))))
    }
}
