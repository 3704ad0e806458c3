//! AI control at the edge: every program is reviewed before it is accepted, and
//! `POST /v1/review` reviews one without running it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State as AxState};
use axum::http::StatusCode;
use fleetbox_proto::{CodeReview, Decision, JobSpec, Recheck, SpecError};
use serde::Deserialize;

use super::{ApiError, Auth, raw_body};
use crate::State;
use crate::store::TokenKind;
use crate::store::audit::{Action, Entry};

/// Review `code` for a submission: a syntax error or a `reject`/`hold` decision refuses it
/// (audited), `run_on_server_only` makes every shard be re-checked by the coordinator.
pub(crate) async fn gate(
    state: &Arc<State>,
    tenant: &str,
    actor: &str,
    code: &str,
    spec: &mut JobSpec,
) -> Result<CodeReview, ApiError> {
    let review = state
        .reviewer
        .review_code(code)
        .map_err(|e| SpecError::new("code", e.to_string()))?;
    match review.decision {
        Decision::Run => {}
        Decision::RunOnServerOnly => {
            spec.verify.get_or_insert_with(Default::default).recheck = Recheck::All;
        }
        Decision::Hold | Decision::Reject => {
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
            let (code, what) = match review.decision {
                Decision::Reject => ("rejected_by_review", "rejected"),
                _ => (
                    "held_for_review",
                    "held for a person's review (there is no approval queue yet, so it is not accepted)",
                ),
            };
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                code,
                format!(
                    "the code review {what} this program (risk {}): {}",
                    review.risk,
                    found.join("; ")
                ),
            )
            .with_field("code"));
        }
    }
    Ok(review)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    code: String,
}

/// `POST /v1/review {code}`: the findings, risk and decision, without running anything.
pub async fn review(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    req: Request,
) -> Result<Json<CodeReview>, ApiError> {
    auth.require(&[TokenKind::Admin])?;
    let body = raw_body(req, &()).await?;
    let body: ReviewBody =
        serde_json::from_slice(&body).map_err(|e| SpecError::new("body", e.to_string()))?;
    if body.code.len() > fleetbox_proto::job::MAX_CODE_BYTES {
        return Err(SpecError::new("code", "is too large").into());
    }
    let review = state
        .reviewer
        .review_code(&body.code)
        .map_err(|e| SpecError::new("code", e.to_string()))?;
    Ok(Json(review))
}
