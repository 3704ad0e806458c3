//! The audit log over HTTP: `GET /v1/audit` (paged, filtered), `GET /v1/audit/verify`, the
//! checkpoints, prunes and the keys (`GET /v1/audit/keys`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State as AxState;
use fleetbox_proto::api::{AuditCheckpoint, AuditKeys, AuditPage, AuditVerification};
use serde::Deserialize;

use super::{ApiError, Auth, Params};
use crate::State;
use crate::store::audit::{Action, AuditFilter, PruneError};
use fleetbox_proto::tenancy::Scope;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    job: Option<String>,
    agent: Option<String>,
    action: Option<String>,
    /// Entries at or after this time, ms since the Unix epoch.
    since: Option<i64>,
    /// Entries after this sequence number (paging).
    after: Option<i64>,
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    operation_id = "audit_list",
    path = "/v1/audit",
    tag = "audit",
    summary = "The audit log's entries.",
    params(AuditQuery),
    responses((status = 200, description = "entries, oldest first", body = AuditPage))
)]
pub async fn list(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Params(q): Params<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let action = q
        .action
        .as_deref()
        .map(|a| {
            a.parse::<Action>()
                .map_err(|e| ApiError::bad_request("invalid_query", e).with_field("action"))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let filter = AuditFilter {
        job_id: q.job,
        agent_id: q.agent,
        action,
        since_ms: q.since,
        after_seq: q.after.unwrap_or(0).max(0),
        limit,
    };
    let records = state.store.audit_list(tenant, &filter).await?;
    let next_after = (records.len() == limit as usize)
        .then(|| records.last().map(|r| r.seq))
        .flatten();
    Ok(Json(AuditPage {
        entries: records.into_iter().map(|r| r.into_api()).collect(),
        next_after,
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Remove the entries up to and including this one: a checkpointed entry.
    before_seq: i64,
}

#[utoipa::path(
    post,
    operation_id = "audit_prune",
    path = "/v1/audit/prune",
    tag = "audit",
    summary = "Remove entries up to a checkpointed one.",
    request_body = PruneRequest,
    responses((status = 200, description = "how many entries were removed", body = serde_json::Value))
)]
/// `POST /v1/audit/prune`: drop old entries behind a checkpoint (export them first).
pub async fn prune(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    super::Body(req): super::Body<PruneRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = &auth.scope(Scope::Admin)?.tenant_id;
    match state
        .store
        .audit_prune(tenant, req.before_seq, &state.custody.key)
        .await
    {
        Ok(n) => Ok(Json(serde_json::json!({ "pruned": n }))),
        Err(PruneError::Store(e)) => Err(e.into()),
        Err(why @ PruneError::NoCheckpoint { .. }) => Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "no_checkpoint",
            why.to_string(),
        )
        .with_field("before_seq")),
    }
}

#[utoipa::path(
    get,
    operation_id = "audit_checkpoints",
    path = "/v1/audit/checkpoints",
    tag = "audit",
    summary = "The signed checkpoints.",
    responses((status = 200, description = "signed checkpoints of the chain head", body = Vec<AuditCheckpoint>))
)]
pub async fn checkpoints(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<Vec<AuditCheckpoint>>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    Ok(Json(state.store.audit_checkpoints(tenant).await?))
}

#[utoipa::path(
    get,
    operation_id = "audit_verify",
    path = "/v1/audit/verify",
    tag = "audit",
    summary = "Recompute the tenant's hash chain.",
    responses((status = 200, description = "whether the chain holds, and the first entry that breaks it", body = AuditVerification))
)]
pub async fn verify(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<AuditVerification>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let pins = state.custody.pins().map_err(|why| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "audit_journal",
            format!("this coordinator's checkpoint journal cannot be read: {why}"),
        )
    })?;
    Ok(Json(state.store.audit_verify(tenant, &pins).await?))
}

#[utoipa::path(
    get,
    operation_id = "audit_keys",
    path = "/v1/audit/keys",
    tag = "audit",
    summary = "The key this coordinator signs checkpoints with, and the keys it believes.",
    responses((status = 200, description = "the public keys, hex", body = AuditKeys))
)]
pub async fn keys(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<AuditKeys>, ApiError> {
    auth.scope(Scope::Read)?;
    Ok(Json(AuditKeys {
        public_key: state.custody.public_key(),
        trusted: state.custody.keys.iter().cloned().collect(),
    }))
}
