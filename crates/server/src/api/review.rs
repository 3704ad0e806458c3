//! AI control at the edge: every program is reviewed before it is accepted, and
//! `POST /v1/review` reviews one without running it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State as AxState};
use axum::http::StatusCode;
use fleetbox_proto::{CodeReview, Decision, FlagKind, FlagStatus, JobSpec, Recheck, SpecError};
use serde::Deserialize;

use super::{ApiError, Auth, Params, raw_body};
use crate::State;
use crate::planner::ChildError;
use crate::store::audit::{Action, Entry};
use crate::store::review::FlagDecision;
use fleetbox_proto::api::{DecideFlag, ReviewFlag, ReviewFlagList};
use fleetbox_proto::tenancy::Scope;

/// Review `code` for a submission: a syntax error or a `reject` decision refuses it (audited);
/// `hold` keeps the job `pending_review` until a person approves it (the store does that from
/// the review the job carries) and makes every shard be re-checked by the coordinator;
/// `run_on_server_only` shards are leased only to agents marked `hardened`.
pub(crate) async fn gate(
    state: &Arc<State>,
    tenant: &str,
    actor: &str,
    code: &str,
    spec: &mut JobSpec,
) -> Result<CodeReview, ApiError> {
    let declared = fleetbox_review::declared_by(&spec.limits.network);
    let review = review_off_thread(state, code, "code", declared).await?;
    match review.decision {
        Decision::Run => {}
        // Server-only and held code go only to hardened agents and the coordinator's server
        // agents (`tasks.hardened`); held code waits for a person, then every shard is
        // re-checked.
        Decision::Hold => {
            spec.verify.get_or_insert_with(Default::default).recheck = Recheck::All;
        }
        Decision::RunOnServerOnly => {}
        Decision::Reject => {
            let entry =
                Entry::new(tenant, actor, Action::ReviewRefused).details(serde_json::json!({
                    "name": spec.name,
                    "reviewer": review.reviewer,
                    "risk": review.risk,
                    "decision": review.decision,
                    "findings": review.findings,
                }));
            if let Err(e) = state.store.audit(vec![entry]).await {
                tracing::error!(error = %e, "could not record a refused submission");
            }
            let found: Vec<String> = review
                .findings
                .iter()
                .take(5)
                .map(|f| format!("{} at line {}: {}", f.rule, f.line, f.message))
                .collect();
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "rejected_by_review",
                format!(
                    "the code review rejected this program (risk {}): {}",
                    review.risk,
                    found.join("; ")
                ),
            )
            .with_field("code"));
        }
    }
    Ok(review)
}

/// A follow-up rule's inline child code at submission: a syntax error or a program the review
/// rejects is refused now, naming where it sits (`followup[0].then.code`), not when the child
/// would be made.
pub(crate) async fn check_child(
    state: &Arc<State>,
    code: &str,
    field: &str,
) -> Result<(), ApiError> {
    let review = review_off_thread(state, code, field, &[]).await?;
    if review.decision == Decision::Reject {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected_by_review",
            format!(
                "the code review rejected the follow-up's program (risk {})",
                review.risk
            ),
        )
        .with_field(field));
    }
    Ok(())
}

/// Review on a blocking thread: a model reviewer waits on HTTP.
/// A syntax error is refused naming `field` (where the code sits in the request).
async fn review_off_thread(
    state: &Arc<State>,
    code: &str,
    field: &str,
    declared: &'static [&'static str],
) -> Result<CodeReview, ApiError> {
    let reviewer = state.reviewer.clone();
    let code = code.to_string();
    tokio::task::spawn_blocking(move || reviewer.review_declared(&code, declared))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the review's thread failed: {e}"),
            )
        })?
        .map_err(|e| SpecError::new(field, e.to_string()).into())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    code: String,
}

#[utoipa::path(
    post,
    operation_id = "review_review",
    path = "/v1/review",
    tag = "review",
    summary = "Review code without running it.",
    request_body = ReviewBody,
    responses((status = 200, description = "findings, risk and decision", body = CodeReview))
)]
/// `POST /v1/review {code}`: the findings, risk and decision, without running anything.
pub async fn review(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    req: Request,
) -> Result<Json<CodeReview>, ApiError> {
    auth.scope(Scope::Submit)?;
    let body = raw_body(req, &()).await?;
    let body: ReviewBody =
        serde_json::from_slice(&body).map_err(|e| SpecError::new("body", e.to_string()))?;
    if body.code.len() > fleetbox_proto::job::MAX_CODE_BYTES {
        return Err(SpecError::new("code", "is too large").into());
    }
    Ok(Json(
        review_off_thread(&state, &body.code, "code", &[]).await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FlagQuery {
    status: Option<String>,
    job: Option<String>,
    kind: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    operation_id = "review_flags",
    path = "/v1/review/flags",
    tag = "review",
    summary = "The review queue.",
    params(FlagQuery),
    responses((status = 200, description = "the flags", body = ReviewFlagList))
)]
/// `GET /v1/review/flags?status=&job=&kind=&limit=`: the review queue, newest first.
pub async fn flags(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Params(q): Params<FlagQuery>,
) -> Result<Json<ReviewFlagList>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    let status = match q.status.as_deref().map(str::parse::<FlagStatus>) {
        None => None,
        Some(Ok(status)) => Some(status),
        Some(Err(e)) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("unknown status `{}` ({})", e.name, e.expected),
            )
            .with_field("status"));
        }
    };
    let kind = match q.kind.as_deref().map(str::parse::<FlagKind>) {
        None => None,
        Some(Ok(kind)) => Some(kind),
        Some(Err(e)) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("unknown kind `{}` ({})", e.name, e.expected),
            )
            .with_field("kind"));
        }
    };
    let flags = state
        .store
        .review_flags(
            tenant,
            status,
            q.job.as_deref(),
            kind,
            q.limit.unwrap_or(100),
        )
        .await?;
    Ok(Json(ReviewFlagList { flags }))
}

#[utoipa::path(
    post,
    operation_id = "review_approve",
    path = "/v1/review/flags/{id}/approve",
    tag = "review",
    summary = "Approve a flag.",
    params(("id" = i64, Path, description = "the flag's number")),
    request_body(content = Option<DecideFlag>, content_type = "application/json", description = "optional"),
    responses((status = 200, description = "the flag, approved", body = ReviewFlag))
)]
pub async fn approve(
    state: AxState<Arc<State>>,
    auth: Auth,
    path: Path<String>,
    req: Request,
) -> Result<Json<ReviewFlag>, ApiError> {
    decide(state, auth, path, req, true).await
}

#[utoipa::path(
    post,
    operation_id = "review_reject",
    path = "/v1/review/flags/{id}/reject",
    tag = "review",
    summary = "Reject a flag.",
    params(("id" = i64, Path, description = "the flag's number")),
    request_body(content = Option<DecideFlag>, content_type = "application/json", description = "optional"),
    responses((status = 200, description = "the flag, rejected", body = ReviewFlag))
)]
pub async fn reject(
    state: AxState<Arc<State>>,
    auth: Auth,
    path: Path<String>,
    req: Request,
) -> Result<Json<ReviewFlag>, ApiError> {
    decide(state, auth, path, req, false).await
}

async fn decide(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
    req: Request,
    approve: bool,
) -> Result<Json<ReviewFlag>, ApiError> {
    let principal = auth.scope(Scope::Review)?;
    let (tenant, actor) = (principal.tenant_id.clone(), principal.actor.clone());
    let (id, body) = flag_request(&id, req).await?;
    match state
        .store
        .decide_flag(&tenant, id, approve, &actor, body.note.as_deref())
        .await?
    {
        FlagDecision::NotFound => Err(ApiError::not_found("review flag", &id.to_string())),
        FlagDecision::AlreadyDecided(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "flag_decided",
            format!("review flag {id} is already `{status}`"),
        )),
        FlagDecision::Decided(flag) => {
            tracing::info!(flag = id, job = %flag.job_id, status = %flag.status, "review flag decided");
            state.work.notify_waiters();
            state.job_may_have_ended(&flag.job_id);
            Ok(Json(flag))
        }
    }
}

#[utoipa::path(
    post,
    operation_id = "review_rerun",
    path = "/v1/review/flags/{id}/rerun",
    tag = "review",
    summary = "Re-run the shards a flag names, every one checked by the coordinator.",
    params(("id" = i64, Path, description = "the flag's number")),
    request_body(content = Option<DecideFlag>, content_type = "application/json", description = "optional"),
    responses((status = 200, description = "the flag, with the re-run job", body = ReviewFlag))
)]
/// `POST /v1/review/flags/{id}/rerun {note?}`: run a flag's shards again in a child job of its
/// (finished) job, every shard checked by the coordinator's sandbox; the child's result folds
/// over the parent's values. The flag becomes `rerun`, naming the child.
pub async fn rerun(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<ReviewFlag>, ApiError> {
    let principal = auth.scope(Scope::Review)?;
    let (tenant, actor) = (principal.tenant_id.clone(), principal.actor.clone());
    let (id, body) = flag_request(&id, req).await?;
    let flag = state
        .store
        .flag(&tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("review flag", &id.to_string()))?;
    let decided = |status: &FlagStatus| {
        ApiError::new(
            StatusCode::CONFLICT,
            "flag_decided",
            format!("review flag {id} is already `{status}`"),
        )
    };
    if flag.status != FlagStatus::Open {
        return Err(decided(&flag.status));
    }
    let job = state
        .store
        .job_view(&tenant, &flag.job_id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", &flag.job_id))?;
    if job.state == fleetbox_proto::JobState::PendingReview {
        // A held job (a sandbox violation): it goes on now, and the flagged shards run again
        // once it has finished (the fold does it).
        return match state
            .store
            .rerun_held(&tenant, id, &actor, body.note.as_deref())
            .await?
        {
            FlagDecision::NotFound => Err(ApiError::not_found("review flag", &id.to_string())),
            FlagDecision::AlreadyDecided(status) => Err(decided(&status)),
            FlagDecision::Decided(flag) => {
                tracing::info!(flag = id, job = %flag.job_id, "held job resumed; its flagged shards re-run when it ends");
                state.work.notify_waiters();
                Ok(Json(flag))
            }
        };
    }
    if !job.state.is_final() && job.state != fleetbox_proto::JobState::NeedsReview {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_not_finished",
            format!(
                "job `{}` is `{}`: its flagged shards can run again once it has finished",
                job.id, job.state
            ),
        ));
    }
    let shards = crate::store::review::flag_shards(&flag.details);
    let child = crate::planner::review_rerun(&state, &tenant, &flag.job_id, id, &shards)
        .await
        .map_err(|e| match e {
            ChildError::Store(e) => e.into(),
            ChildError::Capped(why) => ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", why),
            why => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "cannot_rerun",
                why.to_string(),
            ),
        })?;
    match state
        .store
        .rerun_flag(&tenant, id, &actor, body.note.as_deref(), &child)
        .await?
    {
        FlagDecision::NotFound => Err(ApiError::not_found("review flag", &id.to_string())),
        FlagDecision::AlreadyDecided(status) => Err(decided(&status)),
        FlagDecision::Decided(flag) => {
            tracing::info!(flag = id, job = %flag.job_id, child = %child.id, "review flag re-run");
            state.work.notify_waiters();
            Ok(Json(flag))
        }
    }
}

/// A flag action's id (from the path) and body (`{note?}`, optional).
async fn flag_request(id: &str, req: Request) -> Result<(i64, DecideFlag), ApiError> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError::bad_request("invalid_path", format!("flag id `{id}` is not a number"))
            .with_field("id")
    })?;
    let body = raw_body(req, &()).await?;
    let body: DecideFlag = if body.is_empty() {
        DecideFlag::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| SpecError::new("body", e.to_string()))?
    };
    if body.note.as_ref().is_some_and(|n| n.len() > 2000) {
        return Err(SpecError::new("note", "at most 2000 bytes").into());
    }
    Ok((id, body))
}
