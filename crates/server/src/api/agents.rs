//! Agent endpoints: enroll, lease (long poll), heartbeat, report, return.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State as AxState;
use fleetbox_proto::api::{
    AgentList, EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, LeaseRequest,
    LeaseResponse, LeasedTask, ReportAck, ReportBatch, ReportOutcome, ReturnRequest, ShardReport,
};
use fleetbox_proto::{ExecutionReport, Status};

use super::{ApiError, Auth, Body};
use crate::State;
use crate::blobs::INLINE_LIMIT;
use crate::ids::{agent_id, random_hex, sha256_hex, token};
use crate::store::{ReportInput, TokenKind, now_ms};

/// Most tasks one lease call may ask for, and the longest long-poll.
const MAX_LEASE_BATCH: u32 = 1000;
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Most reports in one batch.
const MAX_REPORT_BATCH: usize = 1000;
/// Streams larger than this are kept in the blob store.
const STREAM_INLINE: usize = 4096;

pub async fn list(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<AgentList>, ApiError> {
    let tenant = &auth.require(&[TokenKind::Admin])?.tenant_id;
    Ok(Json(AgentList {
        agents: state.store.list_agents(tenant).await?,
    }))
}

pub async fn enroll(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let tenant = auth
        .require(&[TokenKind::Enroll, TokenKind::Admin])?
        .tenant_id
        .clone();
    let name = req.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(
            ApiError::bad_request("invalid_body", "must be 1 to 200 bytes").with_field("name"),
        );
    }
    if name.chars().any(char::is_control) {
        return Err(
            ApiError::bad_request("invalid_body", "must not contain control characters")
                .with_field("name"),
        );
    }
    if req.labels.len() > 64
        || req
            .labels
            .iter()
            .any(|l| l.len() > 200 || l.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "invalid_body",
            "at most 64 labels of at most 200 bytes, without control characters",
        )
        .with_field("labels"));
    }
    if req.slots > 1024 {
        return Err(ApiError::bad_request("invalid_body", "at most 1024").with_field("slots"));
    }
    let id = agent_id();
    let secret = token("agent");
    state
        .store
        .enroll_agent(&tenant, &id, &sha256_hex(secret.as_bytes()), &req)
        .await?;
    tracing::info!(agent = %id, name, slots = req.slots, "agent enrolled");
    Ok(Json(EnrollResponse {
        agent_id: id,
        agent_token: secret,
        lease_ms: state.config.lease_ms,
        heartbeat_ms: state.config.heartbeat_ms,
    }))
}

pub async fn lease(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let (tenant, agent) = auth.agent()?;
    if req.max_tasks == 0 || req.max_tasks > MAX_LEASE_BATCH {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("must be between 1 and {MAX_LEASE_BATCH}"),
        )
        .with_field("max_tasks"));
    }
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    let prefix = random_hex(8);
    loop {
        let notified = state.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let expires = now_ms() + state.config.lease_ms as i64;
        let grants = state
            .store
            .lease(tenant, agent, req.max_tasks, expires, &prefix)
            .await?;
        let now = Instant::now();
        if !grants.is_empty() || now >= deadline {
            let mut tasks = Vec::with_capacity(grants.len());
            for g in grants {
                let job = state.job_info(&g.job_id).await?;
                tasks.push(LeasedTask {
                    lease_id: g.lease_id,
                    task_id: g.task_id,
                    job_id: g.job_id,
                    shard_index: g.shard_index,
                    shard_count: job.shard_count,
                    attempt: g.attempt,
                    code: job.code.clone(),
                    code_sha256: job.code_sha256.clone(),
                    input: serde_json::from_str(&g.input).unwrap_or(serde_json::Value::Null),
                    limits: job.limits.clone(),
                    lease_expires_at: expires,
                });
            }
            return Ok(Json(LeaseResponse { tasks }));
        }
        // Wake on new work, or re-check for retries whose back-off has passed.
        let wait = (deadline - now).min(Duration::from_millis(500));
        let mut stopping = state.stopping.clone();
        if *stopping.borrow() {
            return Ok(Json(LeaseResponse { tasks: Vec::new() }));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(wait) => {}
            // The coordinator is stopping: answer now so the graceful shutdown is quick.
            _ = stopping.changed() => {}
        }
    }
}

pub async fn heartbeat(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let (_, agent) = auth.agent()?;
    if req.running.len() > MAX_LEASE_BATCH as usize {
        return Err(ApiError::bad_request("invalid_body", "too many leases").with_field("running"));
    }
    state.store.touch_agent(agent, &req.load).await?;
    if let Some(facts) = &req.facts {
        state
            .store
            .update_agent_facts(agent, facts, req.load.slots.min(1024))
            .await?;
    }
    let expires = now_ms() + state.config.lease_ms as i64;
    let cancel = state
        .store
        .extend_leases(agent, &req.running, expires)
        .await?;
    Ok(Json(HeartbeatResponse {
        cancel,
        lease_expires_at: expires,
    }))
}

pub async fn return_leases(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<ReturnRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (_, agent) = auth.agent()?;
    if req.lease_ids.len() > MAX_LEASE_BATCH as usize {
        return Err(
            ApiError::bad_request("invalid_body", "too many leases").with_field("lease_ids")
        );
    }
    let mut n = state.store.return_leases(agent, &req.lease_ids).await?;
    if let Some(keep) = &req.restarted_keeping {
        if keep.len() > 100_000 {
            return Err(ApiError::bad_request("invalid_body", "too many leases")
                .with_field("restarted_keeping"));
        }
        let lost = state.store.return_lost_runs(agent, keep).await?;
        if lost > 0 {
            tracing::info!(
                agent,
                lost,
                "agent restarted: the leases of its previous run are queued again"
            );
        }
        n += lost;
    }
    if n > 0 {
        state.work.notify_waiters();
    }
    Ok(Json(serde_json::json!({ "returned": n })))
}

pub async fn report(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(batch): Body<ReportBatch>,
) -> Result<Json<ReportAck>, ApiError> {
    let (tenant, agent) = auth.agent()?;
    if batch.reports.len() > MAX_REPORT_BATCH {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("at most {MAX_REPORT_BATCH} reports per batch"),
        )
        .with_field("reports"));
    }
    let mut inputs = Vec::with_capacity(batch.reports.len());
    for r in batch.reports {
        inputs.push(store_form(&state, r)?);
    }
    let (outcomes, ready) = state
        .store
        .report(tenant, agent, &inputs, state.config.retry_backoff_ms)
        .await?;
    let mut requeued = false;
    let results = inputs
        .iter()
        .zip(&outcomes)
        .map(|(i, o)| {
            if *o == crate::store::SettleOutcome::Unknown {
                tracing::warn!(agent, lease = %i.lease_id, "report for a lease this agent does not hold: dropped");
            }
            requeued |= matches!(i.status, Status::SandboxError | Status::Killed);
            ReportOutcome {
                lease_id: i.lease_id.clone(),
                outcome: o.as_str().to_string(),
            }
        })
        .collect();
    if requeued {
        state.work.notify_waiters();
    }
    for job in ready {
        state.aggregate(job);
    }
    Ok(Json(ReportAck { results }))
}

/// `PUT /v1/agent/blobs/{sha256}`: a file a shard produced, uploaded before its report. The
/// body must hash to the name; the blob store keeps it once.
pub async fn put_blob(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    axum::extract::Path(sha): axum::extract::Path<String>,
    req: axum::extract::Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.agent()?;
    if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ApiError::bad_request(
            "invalid_path",
            format!("`{sha}` is not a lowercase hex sha256"),
        )
        .with_field("sha256"));
    }
    let body = super::raw_body(req, &()).await?;
    let actual = crate::ids::sha256_hex(&body);
    if actual != sha {
        return Err(ApiError::bad_request(
            "blob_hash_mismatch",
            format!("the body hashes to `{actual}`, not `{sha}`"),
        ));
    }
    let bytes = body.len();
    let blobs = state.blobs.clone();
    tokio::task::spawn_blocking(move || blobs.put(&body))
        .await
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
            )
        })?
        .map_err(|e| {
            tracing::error!(error = %e, "blob store");
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "could not store the blob",
            )
        })?;
    Ok(Json(serde_json::json!({ "sha256": sha, "bytes": bytes })))
}

/// Turn an agent's report into what the store keeps: large streams and outputs in blobs.
fn store_form(state: &State, r: ShardReport) -> Result<ReportInput, ApiError> {
    let ShardReport {
        lease_id,
        task_id,
        mut report,
    } = r;
    let blob = |data: &[u8]| {
        state.blobs.put(data).map_err(|e| {
            tracing::error!(error = %e, "blob store");
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "could not store a report blob",
            )
        })
    };
    let stdout_blob = if report.stdout.len() > STREAM_INLINE {
        let h = blob(report.stdout.as_bytes())?;
        report.stdout.clear();
        Some(h)
    } else {
        None
    };
    let stderr_blob = if report.stderr.len() > STREAM_INLINE {
        let h = blob(report.stderr.as_bytes())?;
        report.stderr.clear();
        Some(h)
    } else {
        None
    };
    // The coordinator hashes the value over its RFC 8785 canonical JSON: the agent's own
    // `output_sha256` stays in its report as a claim, never as the hash verification
    // compares. The value itself is kept as serde_json writes it, not as the canonical text:
    // RFC 8785 writes numbers as doubles, which would round integers past 2^53.
    let (output, output_blob, output_sha256) = match report.output.take() {
        None => (None, None, None),
        Some(v) => {
            let canonical = serde_json_canonicalizer::to_string(&v).map_err(|e| {
                ApiError::bad_request(
                    "invalid_report",
                    format!("output cannot be canonicalized: {e}"),
                )
                .with_field("report.output")
            })?;
            let hash = sha256_hex(canonical.as_bytes());
            let text = v.to_string();
            if text.len() > INLINE_LIMIT {
                (None, Some(blob(text.as_bytes())?), Some(hash))
            } else {
                (Some(text), None, Some(hash))
            }
        }
    };
    Ok(ReportInput {
        lease_id,
        task_id,
        status: report.status,
        reason: failure_reason(&report),
        output,
        output_blob,
        output_sha256,
        report_json: serde_json::to_string(&report).unwrap_or_default(),
        stdout_blob,
        stderr_blob,
        wall_ms: report.wall_ms.min(i64::MAX as u64) as i64,
        peak_memory: report.peak_memory_bytes.min(i64::MAX as u64) as i64,
        bytes_out: report
            .stdout_bytes
            .saturating_add(report.stderr_bytes)
            .min(i64::MAX as u64) as i64,
    })
}

/// One line saying why a run did not succeed.
pub fn failure_reason(report: &ExecutionReport) -> Option<String> {
    if report.status == Status::Ok {
        return None;
    }
    let detail = report
        .exception
        .as_ref()
        .map(|e| format!("{}: {}", e.kind, e.message))
        .or_else(|| report.message.clone())
        .or_else(|| report.exit_code.map(|c| format!("exit code {c}")))
        .unwrap_or_default();
    let mut line = format!("{}: {detail}", report.status.as_str());
    if line.len() > 500 {
        line.truncate(line.floor_char_boundary(500));
    }
    Some(line)
}
