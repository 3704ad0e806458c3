//! Job endpoints (admin tokens).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State as AxState};
use axum::http::StatusCode;
use fleetbox_proto::api::{JobList, JobResult, JobView, ShardDetail, ShardList};
use fleetbox_proto::{JobSpec, JobState, TaskState, UnknownState};
use serde::Deserialize;

use super::error::request_trace;
use super::{ApiError, Auth, Params, raw_body};
use crate::State;
use crate::store::{ShardPage, TokenKind};
use fleetbox_proto::tenancy::Scope;

#[utoipa::path(
    get,
    operation_id = "jobs_status",
    path = "/v1/status",
    tag = "coordinator",
    summary = "The coordinator's version and timing (any token).",
    responses((status = 200, description = "version, database kind, lease and heartbeat periods", body = serde_json::Value))
)]
pub async fn status(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.require(&[
        TokenKind::Admin,
        TokenKind::User,
        TokenKind::Agent,
        TokenKind::Enroll,
    ])?;
    Ok(Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "database": format!("{:?}", state.store.kind()).to_lowercase(),
        "lease_ms": state.config.lease_ms,
        "heartbeat_ms": state.config.heartbeat_ms,
    })))
}

#[utoipa::path(
    post,
    operation_id = "jobs_submit",
    path = "/v1/jobs",
    tag = "jobs",
    summary = "Submit a job: its code, shards, limits, reducer, verification and follow-up rules.",
    request_body = JobSpec,
    responses((status = 201, description = "the job, stored", body = JobView))
)]
pub async fn submit(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    req: Request,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let (tenant, actor) = (principal.tenant_id.clone(), principal.actor.clone());
    crate::quota::admit_rate(&state, &tenant).await?;
    let body = raw_body(req, &()).await?;
    let mut spec = JobSpec::from_json(&body)?;
    let plan = spec.plan()?;
    crate::quota::admit_shards(&state, &tenant, &actor, plan.inputs.len() as u64).await?;
    if let Some(pool) = &spec.pool
        && !state.store.usable_pool(&tenant, pool).await?
    {
        return Err(fleetbox_proto::SpecError::new(
            "pool",
            format!("tenant `{tenant}` may use no pool `{pool}` (`fleetbox pool list` shows those it may)"),
        )
        .into());
    }
    crate::planner::check_rules(&spec.followup, "followup")?;
    if spec.ai_followup && state.ai_templates.is_empty() {
        return Err(fleetbox_proto::SpecError::new(
            "ai_followup",
            "this coordinator has no AI planner (start it with `--ai-planner-templates DIR` and a model: `--llm-url`, `--llm-model`)",
        )
        .into());
    }
    for (field, code) in crate::planner::child_codes(&spec.followup, "followup") {
        super::review::check_child(&state, &code, &field).await?;
    }
    let review = super::review::gate(&state, &tenant, &actor, &plan.code, &mut spec).await?;
    let job = crate::intake::new_job(&spec, plan, tenant.clone(), actor, review, request_trace());
    state.store.insert_job(&job).await?;
    tracing::info!(job = %job.id, shards = job.inputs.len(), name = %job.name, "job submitted");
    state.work.notify_waiters();
    let view = state
        .store
        .job_view(&tenant, &job.id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", &job.id))?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
}

/// A `?state=` filter, or a typed 400 naming the field and the states that exist.
fn parse_state<S: std::str::FromStr<Err = UnknownState>>(name: &str) -> Result<S, ApiError> {
    name.parse().map_err(|e: UnknownState| {
        ApiError::bad_request("invalid_query", e.to_string()).with_field("state")
    })
}

#[utoipa::path(
    get,
    operation_id = "jobs_list",
    path = "/v1/jobs",
    tag = "jobs",
    summary = "List jobs.",
    params(ListQuery),
    responses((status = 200, description = "newest first", body = JobList))
)]
pub async fn list(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Params(q): Params<ListQuery>,
) -> Result<Json<JobList>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let job_state = q
        .state
        .as_deref()
        .map(parse_state::<JobState>)
        .transpose()?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let jobs = state.store.list_jobs(tenant, job_state, limit).await?;
    Ok(Json(JobList { jobs }))
}

#[utoipa::path(
    get,
    operation_id = "jobs_get_job",
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "One job.",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses((status = 200, description = "the job with its shard counts", body = JobView))
)]
pub async fn get_job(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    state
        .store
        .job_view(tenant, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job", &id))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ShardQuery {
    /// First shard index to list.
    from: Option<u64>,
    limit: Option<u32>,
    state: Option<String>,
}

/// Most shards per page.
const MAX_SHARD_PAGE: u32 = 10_000;

#[utoipa::path(
    get,
    operation_id = "jobs_shards",
    path = "/v1/jobs/{id}/shards",
    tag = "jobs",
    summary = "A job's shards, by index.",
    params(("id" = String, Path, description = "the job's id (`job_…`)"), ShardQuery),
    responses((status = 200, description = "a page of shards", body = ShardList))
)]
pub async fn shards(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
    Params(q): Params<ShardQuery>,
) -> Result<Json<ShardList>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let shard_state = q
        .state
        .as_deref()
        .map(parse_state::<TaskState>)
        .transpose()?;
    if state.store.job(tenant, &id).await?.is_none() {
        return Err(ApiError::not_found("job", &id));
    }
    let page = ShardPage {
        from: q.from.unwrap_or(0),
        limit: q.limit.unwrap_or(1000).clamp(1, MAX_SHARD_PAGE),
        state: shard_state,
    };
    let shards = state.store.shards(tenant, &id, &page).await?;
    // Where the next page starts, when this one is full.
    let next = (shards.len() == page.limit as usize)
        .then(|| shards.last().map(|s| s.index + 1))
        .flatten();
    Ok(Json(ShardList { shards, next }))
}

#[utoipa::path(
    get,
    operation_id = "jobs_shard",
    path = "/v1/jobs/{id}/shards/{index}",
    tag = "jobs",
    summary = "One shard and its attempts.",
    params(("id" = String, Path, description = "the job's id (`job_…`)"), ("index" = u64, Path, description = "the shard's index")),
    responses((status = 200, description = "the shard with every attempt's report", body = ShardDetail))
)]
pub async fn shard(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path((id, index)): Path<(String, String)>,
) -> Result<Json<ShardDetail>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let index: u64 = index.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_path",
            format!("shard index `{index}` is not a number"),
        )
        .with_field("index")
    })?;
    state
        .store
        .shard_detail(tenant, &id, index)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("shard", &format!("{id}/{index}")))
}

#[utoipa::path(
    get,
    operation_id = "jobs_receipt",
    path = "/v1/jobs/{id}/receipt",
    tag = "jobs",
    summary = "A completed job's receipt, checkable offline against the coordinator's key.",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses(
        (status = 200, description = "the result, each accepted shard's report hash, signature and verdict, the audit entries recording them and the chain proof up to a signed checkpoint (`fleetbox receipt verify`)", body = serde_json::Value),
        (status = 409, description = "`not_completed`: the job has not completed")
    )
)]
pub async fn receipt(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<crate::receipt::Receipt>, ApiError> {
    use crate::receipt::ReceiptError;
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    match crate::receipt::build(&state, tenant, &id).await {
        Ok(r) => Ok(Json(r)),
        Err(ReceiptError::NotFound(_)) => Err(ApiError::not_found("job", &id)),
        Err(e @ ReceiptError::NotCompleted { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_completed",
            e.to_string(),
        )),
        Err(ReceiptError::Store(e)) => Err(e.into()),
        Err(e @ ReceiptError::Incomplete(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "receipt_unavailable",
            e.to_string(),
        )),
    }
}

#[utoipa::path(
    get,
    operation_id = "jobs_result",
    path = "/v1/jobs/{id}/result",
    tag = "jobs",
    summary = "A job's result.",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses((status = 200, description = "the reduced result and summary", body = JobResult))
)]
pub async fn result(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<JobResult>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let (mut result, blob) = state
        .store
        .job_result(tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", &id))?;
    result.metrics = result.summary.as_ref().map(crate::planner::summary_metrics);
    if let Some(hash) = &blob {
        // Large results live in the blob store.
        let bytes = state.blobs.get(Some(tenant), hash).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("result blob: {e}"),
            )
        })?;
        let text = String::from_utf8(bytes).map_err(|e| e.to_string());
        let raw = text
            .and_then(|t| serde_json::value::RawValue::from_string(t).map_err(|e| e.to_string()));
        result.result = Some(raw.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("result blob `{hash}` is not JSON: {e}"),
            )
        })?);
    }
    Ok(Json(result))
}

#[utoipa::path(
    post,
    operation_id = "jobs_rerun_tainted",
    path = "/v1/jobs/{id}/rerun-tainted",
    tag = "jobs",
    summary = "Re-check the shards of a job that a quarantined agent's results reached.",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses((status = 200, description = "the shards sent back to be checked", body = serde_json::Value))
)]
/// `POST /v1/jobs/{id}/rerun-tainted`: a `needs_review` job's tainted shards are checked
/// again by the server and the job folds again.
pub async fn rerun_tainted(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let tenant = principal.tenant_id.clone();
    let Some(view) = state.store.job_view(&tenant, &id).await? else {
        return Err(ApiError::not_found("job", &id));
    };
    let Some(n) = state
        .store
        .rerun_tainted(&tenant, &id, &principal.actor)
        .await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_needs_review",
            format!("job `{id}` is `{}`, not `needs_review`", view.state),
        ));
    };
    tracing::info!(job = %id, shards = n, "tainted shards re-run");
    state.checks.notify_one();
    // With nothing left to check the job is settled already: fold it.
    state.aggregate(id.clone());
    Ok(Json(serde_json::json!({ "job_id": id, "rechecked": n })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CancelQuery {
    /// Also cancel the job's descendants that have not finished (a chain of follow-ups).
    #[serde(default)]
    chain: bool,
}

#[utoipa::path(
    post,
    operation_id = "jobs_cancel",
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    summary = "Cancel a job (and, with `chain`, its unfinished follow-ups).",
    params(("id" = String, Path, description = "the job's id (`job_…`)"), CancelQuery),
    responses((status = 200, description = "the job, cancelled", body = JobView))
)]
pub async fn cancel(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
    Params(q): Params<CancelQuery>,
) -> Result<Json<JobView>, ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let tenant = principal.tenant_id.clone();
    let Some(view) = state.store.job_view(&tenant, &id).await? else {
        return Err(ApiError::not_found("job", &id));
    };
    if q.chain {
        let chain = state.store.chain(&tenant, &id).await?.unwrap_or_default();
        let mut ids = vec![id.clone()];
        ids.extend(
            descendants(&chain, &id)
                .into_iter()
                .filter(|j| !j.state.is_final())
                .map(|j| j.id.clone()),
        );
        let cancelled = state
            .store
            .cancel_jobs(&tenant, &ids, &principal.actor, "cancelled with its chain")
            .await?;
        for j in &cancelled {
            state.job_may_have_ended(j);
        }
        tracing::info!(job = %id, cancelled = cancelled.len(), "chain cancelled");
        return state
            .store
            .job_view(&tenant, &id)
            .await?
            .map(Json)
            .ok_or_else(|| ApiError::not_found("job", &id));
    }
    if !state
        .store
        .cancel_job(&tenant, &id, &principal.actor)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!("job `{id}` is already `{}`", view.state),
        ));
    }
    tracing::info!(job = %id, "job cancelled");
    state.job_may_have_ended(&id);
    state
        .store
        .job_view(&tenant, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job", &id))
}

#[utoipa::path(
    post,
    operation_id = "jobs_pause",
    path = "/v1/jobs/{id}/pause",
    tag = "jobs",
    summary = "Pause a job: its queued shards wait (running ones finish).",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses((status = 200, description = "the job, paused", body = JobView))
)]
pub async fn pause(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    control(&state, &auth, &id, Control::Pause(true)).await
}

#[utoipa::path(
    post,
    operation_id = "jobs_resume",
    path = "/v1/jobs/{id}/resume",
    tag = "jobs",
    summary = "Resume a paused job.",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses((status = 200, description = "the job, resumed", body = JobView))
)]
pub async fn resume(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    control(&state, &auth, &id, Control::Pause(false)).await
}

#[utoipa::path(
    post,
    operation_id = "jobs_priority",
    path = "/v1/jobs/{id}/priority",
    tag = "jobs",
    summary = "Change an unfinished job's priority (and its unsettled shards').",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    request_body = fleetbox_proto::api::SetPriority,
    responses((status = 200, description = "the job, re-prioritised", body = JobView))
)]
pub async fn priority(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
    super::Body(req): super::Body<fleetbox_proto::api::SetPriority>,
) -> Result<Json<JobView>, ApiError> {
    control(&state, &auth, &id, Control::Priority(req.priority)).await
}

#[utoipa::path(
    post,
    operation_id = "jobs_rerun_failed",
    path = "/v1/jobs/{id}/rerun-failed",
    tag = "jobs",
    summary = "Run a finished job's failed shards again, as a child job whose result folds over the job's.",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses((status = 201, description = "the child job and the shards it runs", body = serde_json::Value))
)]
pub async fn rerun_failed(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let tenant = principal.tenant_id.clone();
    let Some(view) = state.store.job_view(&tenant, &id).await? else {
        return Err(ApiError::not_found("job", &id));
    };
    if !view.state.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_running",
            format!(
                "job `{id}` is `{}`: its failed shards run again once it is final",
                view.state
            ),
        ));
    }
    let runs = state.store.chain(&tenant, &id).await?.map_or(0, |c| {
        c.iter()
            .filter(|j| j.lineage.as_ref().is_some_and(|l| l.parent_job_id == id))
            .count()
    });
    let mut child = crate::planner::rerun_failed(&state, &tenant, &id, runs)
        .await
        .map_err(|e| match e {
            crate::planner::ChildError::Store(e) => e.into(),
            crate::planner::ChildError::Capped(why) => {
                ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", why)
            }
            why => ApiError::new(StatusCode::CONFLICT, "nothing_to_rerun", why.to_string()),
        })?;
    child.actor = principal.actor.clone();
    state.store.insert_job(&child).await?;
    state.work.notify_waiters();
    let shards = child
        .rerun_of
        .as_ref()
        .map(|r| r.shards.clone())
        .unwrap_or_default();
    tracing::info!(job = %id, child = %child.id, shards = shards.len(), "failed shards run again");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "job_id": child.id, "shards": shards })),
    ))
}

enum Control {
    Pause(bool),
    Priority(i32),
}

/// Pause, resume or re-prioritise an unfinished job (`409 job_finished` once it is final).
async fn control(
    state: &Arc<State>,
    auth: &Auth,
    id: &str,
    what: Control,
) -> Result<Json<JobView>, ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let tenant = &principal.tenant_id;
    let changed = match what {
        Control::Pause(p) => {
            state
                .store
                .pause_job(tenant, id, p, &principal.actor)
                .await?
        }
        Control::Priority(p) => {
            state
                .store
                .set_priority(tenant, id, p, &principal.actor)
                .await?
        }
    };
    let view = state
        .store
        .job_view(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))?;
    match changed {
        None => Err(ApiError::not_found("job", id)),
        Some(false) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!("job `{id}` is already `{}`", view.state),
        )),
        Some(true) => {
            // Resumed or re-prioritised shards may be leasable now.
            state.work.notify_waiters();
            tracing::info!(job = %id, paused = view.paused, priority = view.priority, "job changed");
            Ok(Json(view))
        }
    }
}

#[utoipa::path(
    get,
    operation_id = "jobs_get_blob",
    path = "/v1/blobs/{sha256}",
    tag = "jobs",
    summary = "Download a stored blob.",
    params(("sha256" = String, Path, description = "the blob's sha256, 64 lowercase hex digits")),
    responses((status = 200, description = "the blob's bytes", content_type = "application/octet-stream", body = Vec<u8>))
)]
/// `GET /v1/blobs/{sha256}`: a stored stream, output or file, by its hash.
pub async fn get_blob(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(sha): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    // Blobs are stored once by content but read per tenant: knowing a hash is not enough.
    if crate::blobs::is_sha256(&sha) && !state.store.owns_blob(tenant, &sha).await? {
        return Err(ApiError::not_found("blob", &sha));
    }
    let blobs = state.blobs.clone();
    let (sha2, owner) = (sha.clone(), tenant.clone());
    let bytes = tokio::task::spawn_blocking(move || blobs.get(Some(&owner), &sha2))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match bytes {
        Ok(b) => Ok(axum::response::IntoResponse::into_response((
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            b,
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(ApiError::bad_request(
            "invalid_path",
            format!("`{sha}` is not a sha256"),
        )
        .with_field("sha256")),
        Err(_) => Err(ApiError::not_found("blob", &sha)),
    }
}

/// The jobs below `id` in `chain` (children, their children, ...).
fn descendants<'a>(chain: &'a [JobView], id: &str) -> Vec<&'a JobView> {
    let mut out: Vec<&JobView> = Vec::new();
    let mut frontier = vec![id.to_string()];
    while let Some(parent) = frontier.pop() {
        for j in chain {
            if j.lineage
                .as_ref()
                .is_some_and(|l| l.parent_job_id == parent)
            {
                frontier.push(j.id.clone());
                out.push(j);
            }
        }
    }
    out
}

#[utoipa::path(
    get,
    operation_id = "jobs_chain",
    path = "/v1/jobs/{id}/chain",
    tag = "jobs",
    summary = "The chain a job belongs to.",
    params(("id" = String, Path, description = "the job's id (`job_…`)")),
    responses((status = 200, description = "the job's chain of follow-ups", body = fleetbox_proto::api::JobChain))
)]
/// `GET /v1/jobs/{id}/chain`: every job of the chain `id` is in (its root first, then by
/// depth), each with its lineage, and the webhooks its rules sent.
pub async fn chain(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<fleetbox_proto::api::JobChain>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let jobs = state
        .store
        .chain(tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", &id))?;
    let root = jobs
        .first()
        .map(|j| {
            j.lineage
                .as_ref()
                .map_or(j.id.clone(), |l| l.root_job_id.clone())
        })
        .unwrap_or_else(|| id.clone());
    let mut notifications = Vec::new();
    for j in &jobs {
        for (rule, url, state_name, tries, last_error) in
            state.store.notifications_of(tenant, &j.id).await?
        {
            notifications.push(fleetbox_proto::api::NotificationView {
                job_id: j.id.clone(),
                rule,
                url,
                state: state_name,
                tries: tries.max(0) as u32,
                last_error,
            });
        }
    }
    Ok(Json(fleetbox_proto::api::JobChain {
        root,
        jobs,
        notifications,
    }))
}
