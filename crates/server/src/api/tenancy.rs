//! Tenants and tokens over HTTP: `/v1/whoami`, `/v1/tenants`, `/v1/tokens`.
//!
//! A tenant's admin manages its own tokens; the operator (an admin of the `default` tenant)
//! also makes tenants, sets their caps and manages every tenant's tokens. Another tenant's
//! token or tenant is `404` to anyone else: ids do not leak.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use fleetbox_proto::tenancy::{
    PoolCreate, PoolList, PoolView, Scope, TenantCreate, TenantList, TenantUpdate, TenantView,
    TokenCreate, TokenIssued, TokenList, TokenView, Whoami, valid_tenant_name,
};
use serde::Deserialize;

use super::{ApiError, Auth, Body, Params};
use crate::State;
use crate::ids::{sha256_hex, token};
use crate::store::{NewToken, Principal, TokenKind, now_ms};

/// Caps `clear` may name.
const CAPS: [&str; 6] = [
    "max_running_shards",
    "max_shards_per_day",
    "max_cpu_seconds_per_day",
    "max_blob_bytes",
    "submit_rate",
    "weight",
];

/// Longest a token may live: ten years.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

#[utoipa::path(
    get,
    operation_id = "whoami",
    path = "/v1/whoami",
    tag = "tenants",
    summary = "The caller's tenant and what its token may do.",
    responses((status = 200, description = "the token's tenant and scopes", body = Whoami))
)]
pub async fn whoami(auth: Auth) -> Json<Whoami> {
    let p = auth.principal();
    Json(Whoami {
        tenant: p.tenant_id.clone(),
        token_id: p.token_id.clone(),
        kind: p.kind.as_str().to_string(),
        scopes: p.scopes.clone(),
        operator: p.is_operator(),
        expires_at: p.expires_at,
    })
}

fn check_caps(caps: &fleetbox_proto::tenancy::TenantCaps) -> Result<(), ApiError> {
    if caps.weight.is_some_and(|w| w == 0 || w > 1000) {
        return Err(
            ApiError::bad_request("invalid_body", "from 1 to 1000").with_field("caps.weight")
        );
    }
    if let Some(r) = caps.submit_rate
        && !(r.is_finite() && (0.001..=1e6).contains(&r))
    {
        return Err(ApiError::bad_request(
            "invalid_body",
            "submissions a second, from 0.001 to 1000000",
        )
        .with_field("caps.submit_rate"));
    }
    Ok(())
}

#[utoipa::path(
    post,
    operation_id = "tenants_create",
    path = "/v1/tenants",
    tag = "tenants",
    summary = "Make a tenant (the operator).",
    request_body = TenantCreate,
    responses((status = 201, description = "the tenant", body = TenantView))
)]
pub async fn create_tenant(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<TenantCreate>,
) -> Result<(StatusCode, Json<TenantView>), ApiError> {
    let op = auth.operator()?;
    if !valid_tenant_name(&req.name) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "1 to 40 of `a-z`, `0-9`, `-` and `_`, starting with a letter or digit",
        )
        .with_field("name"));
    }
    check_caps(&req.caps)?;
    if !state
        .store
        .create_tenant(&req.name, &req.caps, &op.actor)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "tenant_exists",
            format!("a tenant `{}` exists already", req.name),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(tenant_view(&state, &req.name).await?),
    ))
}

async fn tenant_view(state: &State, id: &str) -> Result<TenantView, ApiError> {
    state
        .store
        .tenant_view(id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant", id))
}

#[utoipa::path(
    get,
    operation_id = "tenants_list",
    path = "/v1/tenants",
    tag = "tenants",
    summary = "Every tenant (the operator), or the caller's own.",
    responses((status = 200, description = "tenants with their caps and use", body = TenantList))
)]
pub async fn list_tenants(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<TenantList>, ApiError> {
    let p = auth.scope(Scope::Read)?;
    let tenants = if p.is_operator() {
        state.store.list_tenants().await?
    } else {
        vec![tenant_view(&state, &p.tenant_id).await?]
    };
    Ok(Json(TenantList { tenants }))
}

/// The operator sees every tenant; anyone else only its own (another is `404`).
fn may_see_tenant(p: &Principal, id: &str) -> Result<(), ApiError> {
    if p.is_operator() || p.tenant_id == id {
        Ok(())
    } else {
        Err(ApiError::not_found("tenant", id))
    }
}

#[utoipa::path(
    get,
    operation_id = "tenants_show",
    path = "/v1/tenants/{id}",
    tag = "tenants",
    summary = "One tenant: its caps and what it has used.",
    params(("id" = String, Path, description = "the tenant")),
    responses((status = 200, description = "the tenant", body = TenantView))
)]
pub async fn show_tenant(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    may_see_tenant(auth.scope(Scope::Read)?, &id)?;
    Ok(Json(tenant_view(&state, &id).await?))
}

#[utoipa::path(
    post,
    operation_id = "tenants_update",
    path = "/v1/tenants/{id}",
    tag = "tenants",
    summary = "Change a tenant's caps (the operator).",
    params(("id" = String, Path, description = "the tenant")),
    request_body = TenantUpdate,
    responses((status = 200, description = "the tenant", body = TenantView))
)]
pub async fn update_tenant(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
    Body(req): Body<TenantUpdate>,
) -> Result<Json<TenantView>, ApiError> {
    let op = auth.operator()?;
    check_caps(&req.caps)?;
    if let Some(bad) = req.clear.iter().find(|c| !CAPS.contains(&c.as_str())) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("`{bad}` is not a cap (one of {})", CAPS.join(", ")),
        )
        .with_field("clear"));
    }
    let clear: Vec<&str> = req.clear.iter().map(String::as_str).collect();
    if !state
        .store
        .update_tenant(&id, &req.caps, &clear, &op.actor)
        .await?
    {
        return Err(ApiError::not_found("tenant", &id));
    }
    Ok(Json(tenant_view(&state, &id).await?))
}

/// The tenant a token call is about: the caller's own, or (the operator only) another that
/// exists.
async fn target_tenant(
    state: &State,
    p: &Principal,
    asked: Option<&str>,
) -> Result<String, ApiError> {
    let Some(t) = asked.filter(|t| *t != p.tenant_id) else {
        return Ok(p.tenant_id.clone());
    };
    if !p.is_operator() || state.store.tenant_caps(t).await?.is_none() {
        return Err(ApiError::not_found("tenant", t));
    }
    Ok(t.to_string())
}

/// What a new token may be: a user token with scopes the caller has itself (the operator
/// grants any), or an enrolment token; bounded lifetime and uses.
fn check_token(p: &Principal, req: &TokenCreate) -> Result<(), ApiError> {
    let bad = |field: &str, m: &str| ApiError::bad_request("invalid_body", m).with_field(field);
    if req.enroll && !req.scopes.is_empty() {
        return Err(bad("scopes", "an enrolment token has no scopes"));
    }
    if !req.enroll && req.scopes.is_empty() {
        return Err(bad(
            "scopes",
            "a user token needs at least one scope (read, submit, review, admin)",
        ));
    }
    if !req.enroll && req.uses.is_some() {
        return Err(bad("uses", "only an enrolment token counts uses"));
    }
    if !req.enroll && req.pool.is_some() {
        return Err(bad("pool", "only an enrolment token puts agents in a pool"));
    }
    if req.uses == Some(0) {
        return Err(bad("uses", "at least 1"));
    }
    if req
        .ttl_seconds
        .is_some_and(|t| t == 0 || t > MAX_TTL_SECONDS)
    {
        return Err(bad("ttl_seconds", "from 1 second to 10 years"));
    }
    if req
        .name
        .as_deref()
        .is_some_and(|n| n.is_empty() || n.len() > 200 || n.chars().any(char::is_control))
    {
        return Err(bad("name", "1 to 200 bytes without control characters"));
    }
    if let Some(s) = req.scopes.iter().find(|s| !p.is_operator() && !p.has(**s)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("a token may not grant the `{}` scope it lacks", s.as_str()),
        ));
    }
    Ok(())
}

#[utoipa::path(
    post,
    operation_id = "tokens_create",
    path = "/v1/tokens",
    tag = "tenants",
    summary = "Make a token: scoped for people, or an enrolment token for agents (admin).",
    request_body = TokenCreate,
    responses((status = 201, description = "the token; its secret is shown only here", body = TokenIssued))
)]
pub async fn create_token(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<TokenCreate>,
) -> Result<(StatusCode, Json<TokenIssued>), ApiError> {
    let p = auth.scope(Scope::Admin)?;
    check_token(p, &req)?;
    let tenant = target_tenant(&state, p, req.tenant.as_deref()).await?;
    let (kind, prefix) = if req.enroll {
        (TokenKind::Enroll, "enroll")
    } else {
        (TokenKind::User, "user")
    };
    let pool = match &req.pool {
        Some(pool) if !state.store.owns_pool(&tenant, pool).await? => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("tenant `{tenant}` has no pool `{pool}`"),
            )
            .with_field("pool"));
        }
        pool => pool.clone(),
    };
    let secret = token(prefix);
    let hash = sha256_hex(secret.as_bytes());
    let ttl_ms = req
        .ttl_seconds
        .map(|t| i64::try_from(t * 1000).unwrap_or(i64::MAX));
    let view = state
        .store
        .create_token(&NewToken {
            hash: &hash,
            tenant_id: &tenant,
            kind,
            name: req.name.as_deref(),
            scopes: &req.scopes,
            expires_at: ttl_ms.map(|t| now_ms().saturating_add(t)),
            uses: req.uses,
            pool: pool.as_deref(),
            created_by: &p.actor,
        })
        .await?;
    tracing::info!(token = %view.id, tenant, kind = kind.as_str(), by = %p.actor, "token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenIssued {
            token: secret,
            view,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TokenQuery {
    /// Another tenant's tokens (the operator only).
    tenant: Option<String>,
    /// Include agents' own tokens.
    #[serde(default)]
    agents: bool,
}

#[utoipa::path(
    get,
    operation_id = "tokens_list",
    path = "/v1/tokens",
    tag = "tenants",
    summary = "A tenant's tokens, never their secrets (admin).",
    params(TokenQuery),
    responses((status = 200, description = "tokens, newest first", body = TokenList))
)]
pub async fn list_tokens(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Params(q): Params<TokenQuery>,
) -> Result<Json<TokenList>, ApiError> {
    let p = auth.scope(Scope::Admin)?;
    let tenant = target_tenant(&state, p, q.tenant.as_deref()).await?;
    Ok(Json(TokenList {
        tokens: state.store.list_tokens(&tenant, q.agents).await?,
    }))
}

/// Token `id` if the caller may manage it (its tenant's admin, or the operator); `404`
/// otherwise.
async fn managed_token(state: &State, p: &Principal, id: &str) -> Result<TokenView, ApiError> {
    match state.store.token_by_id(id).await? {
        Some(t) if t.tenant == p.tenant_id || p.is_operator() => Ok(t),
        _ => Err(ApiError::not_found("token", id)),
    }
}

#[utoipa::path(
    post,
    operation_id = "tokens_revoke",
    path = "/v1/tokens/{id}/revoke",
    tag = "tenants",
    summary = "Revoke a token: every coordinator refuses it within a second (admin).",
    params(("id" = String, Path, description = "the token's id")),
    responses((status = 200, description = "the token, revoked", body = TokenView))
)]
pub async fn revoke_token(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let p = auth.scope(Scope::Admin)?;
    let t = managed_token(&state, p, &id).await?;
    if !state
        .store
        .revoke_token(&t.tenant, &id, &p.actor, "revoked by hand")
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "revoked_already",
            format!("token `{id}` was revoked already"),
        ));
    }
    state.forget_tokens();
    tracing::warn!(token = %id, tenant = %t.tenant, by = %p.actor, "token revoked");
    Ok(Json(managed_token(&state, p, &id).await?))
}

#[utoipa::path(
    post,
    operation_id = "tokens_rotate",
    path = "/v1/tokens/{id}/rotate",
    tag = "tenants",
    summary = "Replace a token by a new one with the same tenant, scopes, expiry and uses; the old one is revoked (admin).",
    params(("id" = String, Path, description = "the token's id")),
    responses((status = 201, description = "the new token; its secret is shown only here", body = TokenIssued))
)]
pub async fn rotate_token(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<TokenIssued>), ApiError> {
    let p = auth.scope(Scope::Admin)?;
    let old = managed_token(&state, p, &id).await?;
    let (kind, prefix) = match old.kind.as_str() {
        "enroll" => (TokenKind::Enroll, "enroll"),
        "user" | "admin" => (TokenKind::User, "user"),
        other => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_rotatable",
                format!(
                    "`{other}` tokens are not rotated here (an agent rotates its own key; revoke it instead)"
                ),
            ));
        }
    };
    let secret = token(prefix);
    let hash = sha256_hex(secret.as_bytes());
    let scopes = if old.kind == "admin" {
        Scope::ALL.to_vec()
    } else {
        old.scopes.clone()
    };
    let new = NewToken {
        hash: &hash,
        tenant_id: &old.tenant,
        kind,
        name: old.name.as_deref(),
        scopes: &scopes,
        expires_at: old.expires_at,
        uses: old.uses_left,
        pool: old.pool.as_deref(),
        created_by: &p.actor,
    };
    let Some(view) = state.store.rotate_token(&id, &new).await? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "revoked_already",
            format!("token `{id}` was revoked already"),
        ));
    };
    state.forget_tokens();
    tracing::warn!(old = %id, new = %view.id, tenant = %old.tenant, by = %p.actor, "token rotated");
    keep_bootstrap_file(&state, &id, &secret);
    Ok((
        StatusCode::CREATED,
        Json(TokenIssued {
            token: secret,
            view,
        }),
    ))
}

/// A rotated bootstrap token (`DATA/admin.token`, `DATA/enroll.token` of this coordinator)
/// is replaced in its file too, so the CLI's default token is not the revoked one.
fn keep_bootstrap_file(state: &State, old_id: &str, secret: &str) {
    for file in ["admin.token", "enroll.token"] {
        let path = state.config.data_dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if crate::store::token_id(&sha256_hex(text.trim().as_bytes())) != old_id {
            continue;
        }
        match crate::write_secret(&path, secret) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "bootstrap token file holds the rotated token")
            }
            Err(e) => {
                tracing::error!(error = %e, file = %path.display(), "could not replace a rotated bootstrap token's file")
            }
        }
    }
}

#[utoipa::path(
    post,
    operation_id = "pools_create",
    path = "/v1/pools",
    tag = "tenants",
    summary = "Make a pool of agents: a tenant's own (admin), or a shared one (the operator).",
    request_body = PoolCreate,
    responses((status = 201, description = "the pool", body = PoolView))
)]
pub async fn create_pool(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<PoolCreate>,
) -> Result<(StatusCode, Json<PoolView>), ApiError> {
    let p = auth.scope(Scope::Admin)?;
    if !valid_tenant_name(&req.name) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "1 to 40 of `a-z`, `0-9`, `-` and `_`, starting with a letter or digit",
        )
        .with_field("name"));
    }
    let owner = target_tenant(&state, p, req.tenant.as_deref()).await?;
    // A shared pool runs every tenant's code: only the operator's, owned by `default`.
    if req.shared && !(p.is_operator() && owner == crate::store::DEFAULT_TENANT) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the operator makes shared pools (owned by the `default` tenant)",
        ));
    }
    if !state
        .store
        .create_pool(&req.name, &owner, req.shared, &p.actor)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "pool_exists",
            format!("a pool or tenant `{}` exists already", req.name),
        ));
    }
    let view = state
        .store
        .list_pools(Some(&owner))
        .await?
        .into_iter()
        .find(|v| v.name == req.name)
        .ok_or_else(|| ApiError::not_found("pool", &req.name))?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(
    get,
    operation_id = "pools_list",
    path = "/v1/pools",
    tag = "tenants",
    summary = "The pools the caller's tenant may use (the operator: every pool).",
    responses((status = 200, description = "pools with their online agents", body = PoolList))
)]
pub async fn list_pools(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<PoolList>, ApiError> {
    let p = auth.scope(Scope::Read)?;
    let tenant = (!p.is_operator()).then_some(p.tenant_id.as_str());
    Ok(Json(PoolList {
        pools: state.store.list_pools(tenant).await?,
    }))
}
