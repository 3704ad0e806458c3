//! `/v1/sessions`: an interpreter on one agent, kept across calls, so names defined in one call
//! exist in the next (see `store::sessions` for how calls are pinned to the agent).
//!
//! Each call is a one-shard job like `/v1/run`'s (validated, reviewed, queued, reported,
//! audited) and answers with the same report. Calls are not re-run by the server: a call's
//! result depends on the calls before it, which only the session's interpreter holds. Each call
//! is reviewed together with the session's earlier calls, so a program split across calls is
//! judged whole; a call the review would hold or send to the server's own agents is refused,
//! since a session lives on an ordinary agent.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use fleetbox_proto::api::{
    SESSION_IDLE_DEFAULT_MS, SESSION_LIFETIME_DEFAULT_MS, SESSION_LIFETIME_MAX_MS, SessionAnswer,
    SessionBody, SessionCallBody, SessionList,
};
use fleetbox_proto::tenancy::Scope;
use fleetbox_proto::{
    Decision, JobSpec, Limits, Millis, Recheck, SessionOutcome, ShardSpec, SpecError, VerifySpec,
};
use serde::Deserialize;

use super::error::request_trace;
use super::{ApiError, Auth, Body, Params};
use crate::State;
use crate::store::JobSession;
use crate::store::sessions::{CLOSED, CallRefused, LOST, MAX_HISTORY, NewSession, SessionRow};

/// The opening call's program: the interpreter starts, and this is its first call.
const OPENING_CODE: &str = "pass";

#[utoipa::path(
    post,
    operation_id = "sessions_open",
    path = "/v1/sessions",
    tag = "sessions",
    summary = "Open a session: an interpreter on one agent, kept across calls.",
    request_body = SessionBody,
    responses(
        (status = 200, description = "the session is open (or could not be: see its state)", body = SessionAnswer),
        (status = 202, description = "still opening: get the session", body = SessionAnswer)
    )
)]
pub async fn open(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(body): Body<SessionBody>,
) -> Result<(StatusCode, Json<SessionAnswer>), ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let (tenant, actor) = (principal.tenant_id.clone(), principal.actor.clone());
    let (idle_timeout_ms, max_lifetime_ms) = times(&body)?;
    crate::quota::admit_rate(&state, &tenant).await?;
    crate::quota::admit_shards(&state, &tenant, &actor, 1).await?;
    let name = body.name.clone().unwrap_or_else(|| "session".into());
    let mut spec = call_spec(
        &name,
        OPENING_CODE,
        body.limits.clone(),
        body.environment.clone(),
        2,
    );
    let plan = spec.plan()?;
    let review = super::review::gate(&state, &tenant, &actor, OPENING_CODE, &mut spec).await?;
    let session = NewSession {
        id: crate::ids::session_id(),
        tenant_id: tenant.clone(),
        actor: actor.clone(),
        name: spec.name.clone(),
        limits: spec.limits.clone(),
        environment: spec.environment.clone(),
        idle_timeout_ms,
        max_lifetime_ms,
    };
    let mut job =
        crate::intake::new_job(&spec, plan, tenant.clone(), actor, review, request_trace());
    job.session = Some(JobSession {
        leased: session.leased(1),
        only_agent: None,
    });
    state.store.open_session(&session, &job).await?;
    state.work.notify_waiters();
    tracing::info!(session = %session.id, job = %job.id, "session opening");
    answer(
        &state,
        &tenant,
        &session.id,
        &job.id,
        1,
        super::run::wait_for(body.wait_ms),
    )
    .await
}

#[utoipa::path(
    post,
    operation_id = "sessions_run",
    path = "/v1/sessions/{id}/run",
    tag = "sessions",
    summary = "Run code in a session's interpreter and wait for its report.",
    params(("id" = String, Path, description = "the session's id (`ses_…`)")),
    request_body = SessionCallBody,
    responses(
        (status = 200, description = "the call finished", body = SessionAnswer),
        (status = 202, description = "still running: poll the job", body = SessionAnswer),
        (status = 409, description = "`session_lost` (closed, expired, or its agent or interpreter is gone) or `session_busy` (a call is under way)", body = fleetbox_proto::api::ErrorBody)
    )
)]
pub async fn run(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
    Body(body): Body<SessionCallBody>,
) -> Result<(StatusCode, Json<SessionAnswer>), ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let (tenant, actor) = (principal.tenant_id.clone(), principal.actor.clone());
    let row = state
        .store
        .refresh_session(&tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("session", &id))?;
    if !row.live() {
        return Err(lost(&row));
    }
    if row.history.len() + body.code.len() + 1 > MAX_HISTORY {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "session_full",
            format!(
                "a session's calls may add up to {} of code (each is reviewed with all of them); open a new session",
                fleetbox_proto::ByteSize(MAX_HISTORY as u64)
            ),
        )
        .with_field("code"));
    }
    crate::quota::admit_rate(&state, &tenant).await?;
    crate::quota::admit_shards(&state, &tenant, &actor, 1).await?;
    let mut limits = row.view.limits.clone();
    if let Some(ms) = body.timeout_ms {
        limits.timeout = Millis(ms);
    }
    let mut spec = call_spec(
        &row.view.name,
        &body.code,
        limits,
        row.environment.clone(),
        1,
    );
    let plan = spec.plan()?;
    let whole = format!("{}{}", row.history, body.code);
    let review = super::review::gate(&state, &tenant, &actor, &whole, &mut spec).await?;
    if review.decision != Decision::Run {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected_by_review",
            format!(
                "the code review decided `{}` for this call with the session's earlier calls (risk {}); a session runs on an ordinary agent, so only code the review lets run there may",
                review.decision.as_str(),
                review.risk
            ),
        )
        .with_field("code"));
    }
    let trace = request_trace();
    let made = state
        .store
        .session_call(&tenant, &id, |session| {
            let mut job = crate::intake::new_job(&spec, plan, tenant.clone(), actor, review, trace);
            job.session = Some(session);
            job
        })
        .await?;
    let (job, _) = match made {
        Ok(made) => made,
        Err(CallRefused::NotFound) => return Err(ApiError::not_found("session", &id)),
        Err(CallRefused::Busy) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "session_busy",
                format!("session {id} is running a call (or still opening); one call at a time"),
            ));
        }
        Err(CallRefused::Ended { state: s, reason }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "session_lost",
                format!("session {id} is {s}: {reason}"),
            ));
        }
    };
    state.work.notify_waiters();
    let call = job.session.as_ref().map_or(0, |s| s.leased.call);
    answer(
        &state,
        &tenant,
        &id,
        &job.id,
        call,
        super::run::wait_for(body.wait_ms),
    )
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only sessions opening or open.
    live: Option<bool>,
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    operation_id = "sessions_list",
    path = "/v1/sessions",
    tag = "sessions",
    summary = "The tenant's sessions, newest first, with their agent, age and last use.",
    params(ListQuery),
    responses((status = 200, description = "the sessions", body = SessionList))
)]
pub async fn list(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Params(q): Params<ListQuery>,
) -> Result<Json<SessionList>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let sessions = state
        .store
        .list_sessions(tenant, q.live.unwrap_or(false), limit)
        .await?;
    Ok(Json(SessionList { sessions }))
}

#[utoipa::path(
    get,
    operation_id = "sessions_get",
    path = "/v1/sessions/{id}",
    tag = "sessions",
    summary = "One session.",
    params(("id" = String, Path, description = "the session's id (`ses_…`)")),
    responses((status = 200, description = "the session", body = fleetbox_proto::api::SessionView))
)]
pub async fn get(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<fleetbox_proto::api::SessionView>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    view(&state, tenant, &id).await.map(Json)
}

/// Session `id` brought up to date (see `Store::refresh_session`), or `404`.
async fn view(
    state: &State,
    tenant: &str,
    id: &str,
) -> Result<fleetbox_proto::api::SessionView, ApiError> {
    state
        .store
        .refresh_session(tenant, id)
        .await?
        .map(|s| s.view)
        .ok_or_else(|| ApiError::not_found("session", id))
}

#[utoipa::path(
    delete,
    operation_id = "sessions_close",
    path = "/v1/sessions/{id}",
    tag = "sessions",
    summary = "Close a session: its interpreter ends (a call under way is cancelled).",
    params(("id" = String, Path, description = "the session's id (`ses_…`)")),
    responses((status = 200, description = "the session as it now is (closing one already ended changes nothing)", body = fleetbox_proto::api::SessionView))
)]
pub async fn close(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<fleetbox_proto::api::SessionView>, ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let tenant = principal.tenant_id.clone();
    let row = state
        .store
        .refresh_session(&tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("session", &id))?;
    if row.live() {
        state
            .store
            .end_session(&tenant, &id, CLOSED, "closed by request", &principal.actor)
            .await?;
        if let Some(job) = &row.busy_job {
            state.job_may_have_ended(job);
        }
    }
    view(&state, &tenant, &id).await.map(Json)
}

/// Wait for call `job` and answer with its report; a report saying the interpreter is gone
/// ends the session `lost`.
async fn answer(
    state: &Arc<State>,
    tenant: &str,
    id: &str,
    job_id: &str,
    call: u64,
    wait: Duration,
) -> Result<(StatusCode, Json<SessionAnswer>), ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let view = state.wait_job(tenant, job_id, deadline).await?;
    let report = if view.state.is_final() {
        super::run::chosen_report(state, tenant, job_id).await?
    } else {
        None
    };
    let gone = report
        .as_ref()
        .and_then(|r| {
            serde_json::from_value::<fleetbox_proto::SessionCall>(r["session"].clone()).ok()
        })
        .filter(|s| s.outcome != SessionOutcome::Kept);
    if let Some(gone) = gone {
        let why = report
            .as_ref()
            .and_then(|r| r["message"].as_str())
            .unwrap_or("its interpreter ended")
            .to_string();
        let why = if gone.outcome == SessionOutcome::Lost {
            why
        } else {
            format!("its interpreter ended during call {}: {why}", gone.call)
        };
        state
            .store
            .end_session(tenant, id, LOST, &why, "server")
            .await?;
    }
    let session = state
        .store
        .refresh_session(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("session", id))?;
    let code = if view.state.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        code,
        Json(SessionAnswer {
            session: session.view,
            call,
            job_id: job_id.to_string(),
            state: view.state,
            report,
            error: view.error,
        }),
    ))
}

/// `409 session_lost` for a session that has ended.
fn lost(row: &SessionRow) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "session_lost",
        format!(
            "session {} is {}: {}",
            row.view.id,
            row.view.state,
            row.view.end_reason.as_deref().unwrap_or("it ended")
        ),
    )
}

/// The idle time and lifetime asked for, defaults filled and bounds checked.
fn times(body: &SessionBody) -> Result<(u64, u64), ApiError> {
    let lifetime = body.max_lifetime_ms.unwrap_or(SESSION_LIFETIME_DEFAULT_MS);
    if !(1000..=SESSION_LIFETIME_MAX_MS).contains(&lifetime) {
        return Err(SpecError::new(
            "max_lifetime_ms",
            format!("must be between 1000 and {SESSION_LIFETIME_MAX_MS} (24 hours)"),
        )
        .into());
    }
    let idle = body
        .idle_timeout_ms
        .unwrap_or(SESSION_IDLE_DEFAULT_MS.min(lifetime));
    if !(1000..=lifetime).contains(&idle) {
        return Err(SpecError::new(
            "idle_timeout_ms",
            "must be between 1000 and the session's lifetime",
        )
        .into());
    }
    Ok((idle, lifetime))
}

/// A call as a one-shard job: never re-checked by the server (its result depends on the calls
/// before it), never retried elsewhere (`max_attempts`; the opening may be).
fn call_spec(
    name: &str,
    code: &str,
    limits: Limits,
    environment: Option<fleetbox_proto::EnvironmentSpec>,
    max_attempts: u32,
) -> JobSpec {
    JobSpec {
        name: name.to_string(),
        code: Some(code.to_string()),
        code_file: None,
        shards: ShardSpec {
            count: Some(1),
            ..Default::default()
        },
        limits,
        priority: 0,
        max_attempts,
        aggregate: None,
        allow_partial: false,
        min_success_rate: None,
        verify: Some(VerifySpec {
            recheck: Recheck::None,
            ..Default::default()
        }),
        environment,
        files: Default::default(),
        backend: None,
        pool: None,
        followup: Vec::new(),
        ai_followup: false,
    }
}
