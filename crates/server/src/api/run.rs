//! `POST /v1/run`: one program on the fleet as a one-shard job, answered when it is done.
//!
//! The job goes through everything any job does (validation, the queue, an agent's sandbox,
//! verification, the audit log); the call only waits for it. Past its `wait_ms` it answers `202`
//! with the job id, and the job goes on.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State as AxState};
use axum::http::StatusCode;
use fleetbox_proto::api::{RunAnswer, RunBody};
use fleetbox_proto::{JobSpec, ShardSpec, SpecError};
use serde_json::Value;

use super::error::request_trace;
use super::{ApiError, Auth, raw_body};
use crate::State;
use fleetbox_proto::tenancy::Scope;

const DEFAULT_WAIT: Duration = Duration::from_secs(60);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// How long a call that runs a program (`/v1/run`, a session's) waits for it: `wait_ms`, by
/// default a minute, at most ten.
pub(super) fn wait_for(wait_ms: Option<u64>) -> Duration {
    wait_ms
        .map_or(DEFAULT_WAIT, Duration::from_millis)
        .min(MAX_WAIT)
}

#[utoipa::path(
    post,
    operation_id = "run",
    path = "/v1/run",
    tag = "jobs",
    summary = "Run one program and wait for its report.",
    request_body = RunBody,
    responses((status = 200, description = "the run finished", body = RunAnswer), (status = 202, description = "still running: poll the job", body = RunAnswer))
)]
pub async fn run(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    req: Request,
) -> Result<(StatusCode, Json<RunAnswer>), ApiError> {
    let principal = auth.scope(Scope::Submit)?;
    let (tenant, actor) = (principal.tenant_id.clone(), principal.actor.clone());
    crate::quota::admit_rate(&state, &tenant).await?;
    crate::quota::admit_shards(&state, &tenant, &actor, 1).await?;
    let body = raw_body(req, &()).await?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let run: RunBody = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." || path == "?" {
            "body".to_string()
        } else {
            path
        };
        SpecError::new(field, e.into_inner().to_string())
    })?;
    let mut spec = JobSpec {
        name: run.name.clone().unwrap_or_else(|| "run".into()),
        code: Some(run.code),
        code_file: None,
        shards: ShardSpec {
            count: Some(1),
            ..Default::default()
        },
        limits: run.limits,
        priority: run.priority,
        max_attempts: 3,
        aggregate: None,
        allow_partial: false,
        min_success_rate: None,
        verify: run.verify,
        environment: run.environment,
        files: run.files,
        backend: run.backend,
        pool: None,
        followup: Vec::new(),
        ai_followup: false,
    };
    let mut plan = spec.plan()?;
    plan.inputs = vec![run.input.unwrap_or(Value::Null)];
    let wait = wait_for(run.wait_ms);
    let deadline = tokio::time::Instant::now() + wait;
    let review = super::review::gate(&state, &tenant, &actor, &plan.code, &mut spec).await?;
    let job = crate::intake::new_job(&spec, plan, tenant.clone(), actor, review, request_trace());
    state.store.insert_job(&job).await?;
    tracing::debug!(job = %job.id, "run submitted");
    state.work.notify_waiters();

    let view = state.wait_job(&tenant, &job.id, deadline).await?;
    if !view.state.is_final() {
        return Ok((
            StatusCode::ACCEPTED,
            Json(RunAnswer {
                job_id: job.id,
                state: view.state,
                report: None,
                error: None,
            }),
        ));
    }
    let report = chosen_report(&state, &tenant, &job.id).await?;
    Ok((
        StatusCode::OK,
        Json(RunAnswer {
            job_id: job.id,
            state: view.state,
            report,
            error: view.error,
        }),
    ))
}

/// The report of a one-shard job's chosen attempt (else its last), with the streams kept in the
/// blob store inline (they are within the run's `max_output`); `None` when nothing ran.
pub(super) async fn chosen_report(
    state: &State,
    tenant: &str,
    job_id: &str,
) -> Result<Option<Value>, ApiError> {
    let Some(detail) = state.store.shard_detail(tenant, job_id, 0).await? else {
        return Ok(None);
    };
    let pick = detail
        .attempts
        .iter()
        .rposition(|a| a.chosen)
        .or_else(|| detail.attempts.len().checked_sub(1));
    let Some(a) = pick.map(|i| &detail.attempts[i]) else {
        return Ok(None);
    };
    let mut report = a.report.clone();
    for (field, blob) in [("stdout", &a.stdout_blob), ("stderr", &a.stderr_blob)] {
        if let (Some(hash), Some(obj)) = (blob, report.as_object_mut())
            && let Ok(bytes) = state.blobs.get(Some(tenant), hash)
        {
            obj.insert(
                field.into(),
                String::from_utf8_lossy(&bytes).into_owned().into(),
            );
        }
    }
    Ok(Some(report))
}
