//! Agent endpoints: enroll, lease (long poll), heartbeat, report, return.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State as AxState;
use fleetbox_proto::ExecutionReport;
use fleetbox_proto::api::{
    AgentList, EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, LeaseRequest,
    LeaseResponse, LeasedTask, MAX_BLOB_BYTES, ReportAck, ReportBatch, ReturnRequest, ShardReport,
};
use fleetbox_proto::trace::TraceParent;

use super::{ApiError, Auth, Body};
use crate::State;
use crate::blobs::{FinishError, INLINE_LIMIT, is_sha256};
use crate::ids::{agent_id, random_hex, sha256_hex, token};
use crate::store::audit::{Action, Entry};
use crate::store::{Enrolment, Principal, ReportInput, TokenKind, Want, now_ms};
use fleetbox_proto::tenancy::Scope;

/// Most tasks one lease call may ask for, and the longest long-poll.
const MAX_LEASE_BATCH: u32 = 1000;
/// The most sessions a heartbeat may say an agent holds.
const MAX_HELD_SESSIONS: usize = 1000;
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Most reports in one batch.
const MAX_REPORT_BATCH: usize = 1000;
/// Streams larger than this are kept in the blob store.
const STREAM_INLINE: usize = 4096;

#[utoipa::path(
    get,
    operation_id = "agents_list",
    path = "/v1/agents",
    tag = "agents",
    summary = "The agents, their trust and quarantine.",
    responses((status = 200, description = "every agent of the tenant", body = AgentList))
)]
pub async fn list(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
) -> Result<Json<AgentList>, ApiError> {
    let tenant = &auth.scope(Scope::Read)?.tenant_id;
    Ok(Json(AgentList {
        agents: state.store.list_agents(tenant).await?,
    }))
}

#[utoipa::path(
    post,
    operation_id = "agents_release",
    path = "/v1/agents/{id}/release",
    tag = "agents",
    summary = "Let a quarantined agent lease again.",
    params(("id" = String, Path, description = "the agent's id (`agt_…`)")),
    responses((status = 200, description = "released", body = serde_json::Value))
)]
/// `POST /v1/agents/{id}/release`: an admin lets a quarantined agent lease again.
pub async fn release(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let principal = auth.scope(Scope::Admin)?;
    if !state.store.has_agent(&principal.tenant_id, &id).await? {
        return Err(ApiError::not_found("agent", &id));
    }
    if !state
        .store
        .release_agent(&principal.tenant_id, &id, &principal.actor)
        .await?
    {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "not_quarantined",
            format!("agent `{id}` is not quarantined"),
        ));
    }
    tracing::info!(agent = %id, "agent released from quarantine");
    Ok(Json(serde_json::json!({ "released": id })))
}

/// `POST /v1/agents/{id}/hardened` body.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkHardened {
    /// `true`: the agent may run server-only code; `false`: the mark is taken back.
    pub hardened: bool,
}

#[utoipa::path(
    post,
    operation_id = "agents_hardened",
    path = "/v1/agents/{id}/hardened",
    tag = "agents",
    summary = "Mark an agent to run server-only code (or take the mark back).",
    params(("id" = String, Path, description = "the agent's id (`agt_…`)")),
    request_body = MarkHardened,
    responses((status = 200, description = "marked", body = serde_json::Value))
)]
/// `POST /v1/agents/{id}/hardened`: an admin marks an agent (one on gVisor, say) to take the
/// shards of code the review decided `run_on_server_only`.
pub async fn hardened(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    axum::extract::Path(id): axum::extract::Path<String>,
    Body(req): Body<MarkHardened>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let principal = auth.scope(Scope::Admin)?;
    if !state
        .store
        .set_agent_hardened(&principal.tenant_id, &id, req.hardened, &principal.actor)
        .await?
    {
        return Err(ApiError::not_found("agent", &id));
    }
    tracing::info!(agent = %id, hardened = req.hardened, by = %principal.actor, "agent marked");
    Ok(Json(
        serde_json::json!({ "agent": id, "hardened": req.hardened }),
    ))
}

#[utoipa::path(
    post,
    operation_id = "agents_quarantine",
    path = "/v1/agents/{id}/quarantine",
    tag = "agents",
    summary = "Quarantine an agent: no leases until released; its unchecked results are re-checked.",
    params(("id" = String, Path, description = "the agent's id (`agt_…`)")),
    responses((status = 200, description = "quarantined", body = serde_json::Value))
)]
pub async fn quarantine(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let principal = auth.scope(Scope::Admin)?;
    if !state.store.has_agent(&principal.tenant_id, &id).await? {
        return Err(ApiError::not_found("agent", &id));
    }
    if !state
        .store
        .quarantine_agent(&principal.tenant_id, &id, &principal.actor)
        .await?
    {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "not_quarantinable",
            format!("agent `{id}` is quarantined already"),
        ));
    }
    tracing::warn!(agent = %id, by = %principal.actor, "agent quarantined by an operator");
    // As after a quarantine for invalid results: its unchecked values are checked again.
    if let Err(e) = crate::checker::after_quarantine(&state, &id).await {
        tracing::error!(agent = %id, error = %e, "could not re-check a quarantined agent's results");
    }
    Ok(Json(serde_json::json!({ "quarantined": id })))
}

#[utoipa::path(
    post,
    operation_id = "agents_revoke",
    path = "/v1/agents/{id}/revoke",
    tag = "agents",
    summary = "Cut an agent off: revoke its tokens and client certificates (admin scope).",
    params(("id" = String, Path, description = "the agent's id")),
    responses((status = 200, description = "revoked", body = serde_json::Value))
)]
/// `POST /v1/agents/{id}/revoke`: the agent's tokens stop working and its client
/// certificates go on the CRL, on every coordinator sharing the database within a second.
pub async fn revoke(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let principal = auth.scope(Scope::Admin)?;
    if !state
        .store
        .revoke_agent(&principal.tenant_id, &id, &principal.actor)
        .await?
    {
        return Err(ApiError::not_found("agent", &id));
    }
    state.forget_tokens();
    tracing::warn!(agent = %id, by = %principal.actor, "agent revoked");
    Ok(Json(serde_json::json!({ "revoked": id })))
}

#[utoipa::path(
    post,
    operation_id = "agents_enroll",
    path = "/v1/agents/enroll",
    tag = "agent protocol",
    summary = "Enroll an agent (enroll token).",
    request_body = EnrollRequest,
    responses((status = 200, description = "the agent's id and token", body = EnrollResponse))
)]
pub async fn enroll(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let principal = if auth.principal().kind.is_user() {
        auth.scope(Scope::Admin)?
    } else {
        auth.require(&[TokenKind::Enroll, TokenKind::EnrollOwn])?
    };
    let own = principal.kind == TokenKind::EnrollOwn;
    let pool = principal.pool.clone();
    let (tenant, actor) = (principal.tenant_id.clone(), principal.actor.clone());
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
    // Every report is signed: an agent without a key could not report.
    fleetbox_proto::api::parse_public_key(&req.public_key)
        .map_err(|why| ApiError::bad_request("invalid_body", why).with_field("public_key"))?;
    if state.mtls.is_some() && req.csr.is_none() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "this coordinator runs with --agent-mtls: enrolment needs a certificate signing request",
        )
        .with_field("csr"));
    }
    // Signed before anything is stored: a bad request leaves no agent and spends no use.
    let id = agent_id();
    let signed = sign_request(&state, req.csr.as_deref(), &id)?;
    // Spent only by a request that would enrol.
    if principal.kind == TokenKind::Enroll
        && !state.store.spend_enrolment(&principal.token_id).await?
    {
        return Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this enrolment token has no uses left",
        ));
    }
    let secret = token("agent");
    let token_expires_at = now_ms() + state.config.agent_credential_ms.max(1000) as i64;
    state
        .store
        .enroll_agent(&Enrolment {
            tenant_id: &tenant,
            agent_id: &id,
            token_hash: &sha256_hex(secret.as_bytes()),
            req: &req,
            actor: &actor,
            own,
            pool: pool.as_deref(),
            token_expires_at,
        })
        .await?;
    tracing::info!(agent = %id, name, slots = req.slots, own, "agent enrolled");
    let certificate = record_certificate(&state, signed, &id, &tenant).await?;
    Ok(Json(EnrollResponse {
        certificate,
        agent_id: id,
        agent_token: secret,
        lease_ms: state.config.lease_ms,
        heartbeat_ms: state.config.heartbeat_ms,
        token_expires_at: Some(token_expires_at),
    }))
}

#[utoipa::path(
    post,
    operation_id = "agents_lease",
    path = "/v1/agent/lease",
    tag = "agent protocol",
    summary = "Lease shards (agent token).",
    request_body = LeaseRequest,
    responses((status = 200, description = "the shards leased (possibly none)", body = LeaseResponse))
)]
pub async fn lease(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let (_, agent) = auth.agent()?;
    if state.store.agent_quarantined(agent).await? {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "agent_quarantined",
            "this agent is quarantined after invalid results; an admin must release it \
             (`fleetbox agents release ID`)",
        ));
    }
    if req.max_tasks == 0 || req.max_tasks > MAX_LEASE_BATCH {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("must be between 1 and {MAX_LEASE_BATCH}"),
        )
        .with_field("max_tasks"));
    }
    if req.cached_code.len() > fleetbox_proto::api::MAX_CACHED_CODE {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!(
                "at most {} program hashes",
                fleetbox_proto::api::MAX_CACHED_CODE
            ),
        )
        .with_field("cached_code"));
    }
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    let prefix = random_hex(8);
    let want = Want {
        backend: req.backend.as_deref(),
        hardened_only: req.hardened_only,
        sessions: req.sessions,
    };
    state
        .store
        .agent_polls(agent, &want, state.config.heartbeat_ms as i64)
        .await?;
    loop {
        let notified = state.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A read first: an idle poll holds no transaction and writes nothing.
        let expires = now_ms() + state.config.lease_ms as i64;
        let grants = if state.store.has_runnable(agent, want).await? {
            let blocked = crate::quota::blocked(&state).await?;
            state
                .store
                .lease_with(agent, want, req.max_tasks, expires, &prefix, &blocked)
                .await?
        } else {
            Vec::new()
        };
        let now = Instant::now();
        if !grants.is_empty() || now >= deadline {
            let mut tasks = Vec::with_capacity(grants.len());
            for g in grants {
                let job = state.job_info(&g.job_id).await?;
                let traceparent = job_step(
                    "shard.leased",
                    job.traceparent.as_deref(),
                    &g.lease_id,
                    g.shard_index,
                    g.attempt,
                );
                tasks.push(LeasedTask {
                    lease_id: g.lease_id,
                    task_id: g.task_id,
                    job_id: g.job_id,
                    shard_index: g.shard_index,
                    shard_count: job.shard_count,
                    attempt: g.attempt,
                    // A program the agent holds is named, not sent again.
                    code: if req.cached_code.contains(&job.code_sha256) {
                        String::new()
                    } else {
                        job.code.clone()
                    },
                    code_sha256: job.code_sha256.clone(),
                    input: serde_json::from_str(&g.input).unwrap_or(serde_json::Value::Null),
                    limits: job.limits.clone(),
                    environment: job.environment.clone(),
                    files: job.files.clone(),
                    lease_expires_at: expires,
                    traceparent,
                    session: job.session.clone(),
                });
            }
            return Ok(Json(LeaseResponse { tasks }));
        }
        // Wake on new work: this coordinator's own events, and the scheduler's watch for ready
        // work (retries past their back-off, work another coordinator queued). No timer of its
        // own: a thousand idle polls cost nothing until there is work.
        let wait = deadline - now;
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

/// A span in the job's trace (when it has one) for one step of a shard's life; the trace
/// context the next step descends from: this span when spans are exported, else the job's.
fn job_step(
    name: &'static str,
    job_trace: Option<&str>,
    lease: &str,
    shard: u64,
    attempt: u32,
) -> Option<String> {
    let parent = TraceParent::parse(job_trace?)?;
    let span = tracing::info_span!("shard", otel.name = name, lease, shard, attempt,
        trace_id = %parent.trace_id);
    fleetbox_proto::trace::enter(&span, &parent);
    Some(
        fleetbox_proto::trace::of_span(&span)
            .unwrap_or(parent)
            .header(),
    )
}

#[utoipa::path(
    post,
    operation_id = "agents_heartbeat",
    path = "/v1/agent/heartbeat",
    tag = "agent protocol",
    summary = "Keep leases alive (agent token).",
    request_body = HeartbeatRequest,
    responses((status = 200, description = "leases to cancel, the new expiry", body = HeartbeatResponse))
)]
pub async fn heartbeat(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let (_, agent) = auth.agent()?;
    if req.running.len() > MAX_LEASE_BATCH as usize {
        return Err(ApiError::bad_request("invalid_body", "too many leases").with_field("running"));
    }
    if req.sessions.len() > MAX_HELD_SESSIONS {
        return Err(
            ApiError::bad_request("invalid_body", "too many sessions").with_field("sessions")
        );
    }
    // A bad request is refused before anything changes (a renewed token it never got would
    // cut the agent off).
    let signed = sign_request(&state, req.csr.as_deref(), agent)?;
    // Written with every other agent's within a second (`crate::heartbeats`).
    state.heartbeats.record(agent, &req.load);
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
    let close_sessions = state.store.sessions_to_close(agent, &req.sessions).await?;
    let renewed = renew_if_due(&state, auth.principal()).await?;
    let certificate =
        record_certificate(&state, signed, agent, &auth.principal().tenant_id).await?;
    Ok(Json(HeartbeatResponse {
        close_sessions,
        certificate,
        cancel,
        lease_expires_at: expires,
        token_expires_at: renewed.as_ref().map(|r| r.1),
        renewed_token: renewed.map(|r| r.0),
    }))
}

/// With `--agent-mtls`, `csr` signed for `agent`; `None` without mTLS or without a request.
fn sign_request(
    state: &State,
    csr: Option<&str>,
    agent: &str,
) -> Result<Option<crate::mtls::Signed>, ApiError> {
    let (Some(mtls), Some(csr)) = (&state.mtls, csr) else {
        return Ok(None);
    };
    if csr.len() > 16 * 1024 {
        return Err(ApiError::bad_request("invalid_body", "at most 16 KiB").with_field("csr"));
    }
    mtls.sign(csr, agent)
        .map(Some)
        .map_err(|why| ApiError::bad_request("invalid_body", why.to_string()).with_field("csr"))
}

/// Record a signed certificate (so it can be revoked) and answer it.
async fn record_certificate(
    state: &State,
    signed: Option<crate::mtls::Signed>,
    agent: &str,
    tenant: &str,
) -> Result<Option<fleetbox_proto::api::Certificate>, ApiError> {
    let Some(signed) = signed else {
        return Ok(None);
    };
    state
        .store
        .record_agent_cert(&crate::store::IssuedCert {
            fingerprint: &signed.fingerprint,
            serial: &signed.serial,
            agent_id: agent,
            tenant_id: tenant,
            expires_at: signed.expires_at,
        })
        .await?;
    Ok(Some(fleetbox_proto::api::Certificate {
        pem: signed.pem,
        expires_at: signed.expires_at,
    }))
}

/// A new credential for the agent behind `p` when its own is past half its life (or has no
/// end: one from before credentials expired): the new token and when it ends. The old one
/// keeps working for a lease's length, for calls already under way.
async fn renew_if_due(state: &State, p: &Principal) -> Result<Option<(String, i64)>, ApiError> {
    let (Some(agent), now) = (p.agent_id.as_deref(), now_ms()) else {
        return Ok(None);
    };
    let ttl = state.config.agent_credential_ms.max(1000) as i64;
    if p.expires_at.is_some_and(|end| end - now > ttl / 2) {
        return Ok(None);
    }
    let secret = token("agent");
    let until = now + ttl;
    let renewed = state
        .store
        .renew_agent_token(
            &p.tenant_id,
            agent,
            &p.token_id,
            &sha256_hex(secret.as_bytes()),
            until,
            now + state.config.lease_ms as i64,
        )
        .await?;
    if renewed {
        tracing::debug!(agent, "agent credential renewed");
    }
    Ok(renewed.then_some((secret, until)))
}

#[utoipa::path(
    post,
    operation_id = "agents_return_leases",
    path = "/v1/agent/return",
    tag = "agent protocol",
    summary = "Hand leases back unrun (agent token).",
    request_body = ReturnRequest,
    responses((status = 200, description = "the leases handed back", body = serde_json::Value))
)]
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
        // Said before it leases anything: the sessions it held went with its process.
        state
            .store
            .lose_sessions_of(&[agent.to_string()], "its agent restarted")
            .await?;
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

#[utoipa::path(
    post,
    operation_id = "agents_rotate_key",
    path = "/v1/agent/key",
    tag = "agent protocol",
    summary = "Register a new signing key, signed by the old one (agent token).",
    request_body = fleetbox_proto::api::RotateKeyRequest,
    responses((status = 200, description = "the new key registered", body = serde_json::Value))
)]
/// `POST /v1/agent/key`: the agent replaces its key, proving it holds the old one.
pub async fn rotate_key(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    Body(req): Body<fleetbox_proto::api::RotateKeyRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (tenant, agent) = auth.agent()?;
    fleetbox_proto::api::parse_public_key(&req.public_key)
        .map_err(|why| ApiError::bad_request("invalid_body", why).with_field("public_key"))?;
    let no_key = || {
        ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "no_agent_key",
            "this agent has no usable key to rotate: enroll it again",
        )
    };
    let old_text = state.store.agent_key(agent).await?.ok_or_else(no_key)?;
    let old = fleetbox_proto::api::parse_public_key(&old_text).map_err(|_| no_key())?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(&req.signature, &mut sig).map_err(|_| {
        ApiError::bad_request("invalid_signature", "the signature is not 64 bytes of hex")
            .with_field("signature")
    })?;
    let message = fleetbox_proto::api::RotateKeyRequest::message(agent, &req.public_key);
    old.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_signature",
                "the rotation is not signed by the agent's current key",
            )
            .with_field("signature")
        })?;
    if !state
        .store
        .rotate_agent_key(tenant, agent, &old_text, &req.public_key)
        .await?
    {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "conflict",
            "the key changed meanwhile; sign with the current key",
        ));
    }
    tracing::info!(agent, "agent key rotated");
    Ok(Json(serde_json::json!({ "public_key": req.public_key })))
}

#[utoipa::path(
    post,
    operation_id = "agents_report",
    path = "/v1/agent/reports",
    tag = "agent protocol",
    summary = "Deliver signed reports (agent token).",
    request_body = ReportBatch,
    responses((status = 200, description = "what became of each report", body = ReportAck))
)]
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
    // Every report must carry the signature of the key the agent registered.
    let key = agent_key(&state, agent).await?;
    // The agents' run spans, for the spans that record what became of each report.
    let traces: Vec<Option<String>> = batch
        .reports
        .iter()
        .map(|r| r.traceparent.clone())
        .collect();
    let inputs = form_reports(&state, tenant, agent, batch, key).await?;
    let policy = crate::store::ReportPolicy {
        backoff_base_ms: state.config.retry_backoff_ms,
        strikes_limit: state.config.quarantine_strikes.max(1) as i64,
    };
    let reported = state.store.report(agent, &inputs, policy).await?;
    let results = crate::reported::follow(&state, tenant, agent, &inputs, &traces, reported).await;
    Ok(Json(ReportAck { results }))
}

/// The key an agent signs its reports with, as registered.
async fn agent_key(state: &State, agent: &str) -> Result<ed25519_dalek::VerifyingKey, ApiError> {
    match state.store.agent_key(agent).await? {
        Some(k) => fleetbox_proto::api::parse_public_key(&k).map_err(|why| {
            tracing::error!(agent, why, "stored agent key is unusable");
            ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "no_agent_key",
                "this agent's registered key is unusable: enroll it again",
            )
        }),
        None => Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "no_agent_key",
            "this agent enrolled without a key and cannot sign reports: enroll it again",
        )),
    }
}

/// The batch's reports as the store takes them, each signature checked; a batch with one
/// bad report is refused whole (audited as `report.refused`).
async fn form_reports(
    state: &Arc<State>,
    tenant: &str,
    agent: &str,
    batch: ReportBatch,
    key: ed25519_dalek::VerifyingKey,
) -> Result<Vec<ReportInput>, ApiError> {
    // With a bucket, each report's blobs go to its shard's tenant's area (one read a batch;
    // without one, the local directory holds them for every tenant alike).
    let owners = if state.blobs.keyed_per_tenant() {
        let leases: Vec<&str> = batch.reports.iter().map(|r| r.lease_id.as_str()).collect();
        state.store.lease_owners(agent, &leases).await?
    } else {
        Default::default()
    };
    // Checking signatures, reading and hashing outputs (some from blobs) is blocking work.
    let for_blocking = state.clone();
    let formed = tokio::task::spawn_blocking(move || {
        batch
            .reports
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let owner = owners.get(&r.lease_id).map(|o| o.tenant_id.as_str());
                signed(&r, &key)
                    .and_then(|hash| store_form(&for_blocking, owner, r, hash))
                    .map_err(|e| e.within(&format!("reports[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )
    })?;
    let refused = match formed {
        Ok(inputs) => return Ok(inputs),
        Err(refused) => refused,
    };
    let entry = Entry::new(tenant, format!("agent:{agent}"), Action::ReportRefused)
        .agent(agent)
        .details(serde_json::json!({
            "code": refused.code,
            "field": refused.field,
            "why": refused.message,
        }));
    if let Err(e) = state.store.audit(vec![entry]).await {
        tracing::error!(error = %e, "could not record a refused report");
    }
    Err(refused)
}

#[utoipa::path(
    put,
    operation_id = "agents_put_blob",
    path = "/v1/agent/blobs/{sha256}",
    tag = "agent protocol",
    summary = "Upload a part of a report ahead of it (agent token).",
    params(
        ("sha256" = String, Path, description = "the blob's sha256, 64 lowercase hex digits"),
        ("lease" = Option<String>, Query, description = "the lease whose report will name it: the blob is stored for, and owned by, that shard's tenant")
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "stored", body = serde_json::Value))
)]
/// `PUT /v1/agent/blobs/{sha256}[?lease=ID]`: a file a shard produced, or a large part of a
/// report, uploaded before the report. The body (at most [`MAX_BLOB_BYTES`]) is streamed to
/// disk while it is hashed; it is stored, once, only if it hashes to the name. With the lease
/// (one this agent holds or held), it goes to its tenant's area of the bucket and the tenant
/// owns it from now on, through the lease's job; without, to the shared area until a report
/// names it.
pub async fn put_blob(
    AxState(state): AxState<Arc<State>>,
    auth: Auth,
    axum::extract::Path(sha): axum::extract::Path<String>,
    super::Params(upload): super::Params<BlobUpload>,
    req: axum::extract::Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (_, agent) = auth.agent()?;
    if !is_sha256(&sha) {
        return Err(ApiError::bad_request(
            "invalid_path",
            format!("`{sha}` is not a lowercase hex sha256"),
        )
        .with_field("sha256"));
    }
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "blob store");
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not store the blob",
        )
    };
    // Disk writes happen on a blocking thread fed through a small queue, so a slow disk
    // slows the upload rather than a runtime worker.
    let owner = match &upload.lease {
        Some(lease) => state
            .store
            .lease_owners(agent, &[lease.as_str()])
            .await?
            .remove(lease),
        None => None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(16);
    let blobs = state.blobs.clone();
    let want = sha.clone();
    let area = owner.as_ref().map(|o| o.tenant_id.clone());
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = blobs.writer()?;
        while let Some(chunk) = rx.blocking_recv() {
            w.write(&chunk)?;
        }
        let bytes = w.len();
        w.finish(&want, area.as_deref()).map(|_| bytes)
    });
    let mut body = req.into_body();
    let mut received = 0usize;
    let mut refused = None;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let chunk = match frame.map(|f| f.into_data()) {
            Ok(Ok(c)) => c,
            Ok(Err(_trailers)) => continue,
            Err(e) => {
                refused = Some(ApiError::bad_request("invalid_body", e.to_string()));
                break;
            }
        };
        received += chunk.len();
        if received > MAX_BLOB_BYTES {
            refused = Some(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("blobs are limited to {} MiB", MAX_BLOB_BYTES >> 20),
            ));
            break;
        }
        if tx.send(chunk).await.is_err() {
            break; // the writer failed: its error is below
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| internal(&e))?;
    if let Some(refused) = refused {
        // The temporary file goes with the writer; nothing is stored.
        return Err(refused);
    }
    match written {
        Ok(bytes) => {
            // Owned by the tenant of the lease's shard (an agent of a shared pool runs several
            // tenants' shards), through its job: pruning the job releases it. Without a lease,
            // by whoever's report names it.
            if let Some(o) = &owner {
                state
                    .store
                    .own_blobs(&o.tenant_id, &o.job_id, &[(&sha, bytes)])
                    .await?;
            }
            Ok(Json(serde_json::json!({ "sha256": sha, "bytes": bytes })))
        }
        Err(FinishError::Mismatch { actual }) => Err(ApiError::bad_request(
            "blob_hash_mismatch",
            format!("the body hashes to `{actual}`, not `{sha}`"),
        )),
        Err(FinishError::Io(e)) => Err(internal(&e)),
    }
}

/// `?lease=` of an upload.
#[derive(Debug, Default, serde::Deserialize)]
pub struct BlobUpload {
    lease: Option<String>,
}

/// Refuse a report without a good signature of the agent's key; the sha256 of what it signed.
fn signed(r: &ShardReport, key: &ed25519_dalek::VerifyingKey) -> Result<String, ApiError> {
    use fleetbox_proto::api::SignatureError;
    use sha2::Digest;
    let message = r.signed_message();
    r.verify_message(key, &message).map_err(|e| {
        let code = match e {
            SignatureError::Unsigned => "unsigned_report",
            SignatureError::Malformed | SignatureError::Mismatch => "invalid_signature",
        };
        ApiError::bad_request(code, e.to_string()).with_field("signature")
    })?;
    Ok(hex::encode(sha2::Sha256::digest(&message)))
}

/// Turn an agent's report into what the store keeps: large streams and outputs in blobs,
/// whether the agent sent them inline or uploaded them ahead ([`ShardReport::blobs`]).
/// `report_sha256` is the hash of what the agent signed: the audit entry keeps it with the
/// signature, so a receipt can name the report each accepted value came from. `owner` is the
/// tenant of the report's shard, whose area of the bucket its blobs go to (`None` without a
/// bucket, or for a lease the agent never held: the store refuses that report anyway).
fn store_form(
    state: &State,
    owner: Option<&str>,
    r: ShardReport,
    report_sha256: String,
) -> Result<ReportInput, ApiError> {
    let ShardReport {
        lease_id,
        task_id,
        attempt,
        mut report,
        blobs: ahead,
        signature,
        traceparent: _,
    } = r;
    state.metrics.shard_ran(&report.backend, report.wall_ms);
    let internal = |e: std::io::Error| {
        tracing::error!(error = %e, "blob store");
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not store a report blob",
        )
    };
    // A part uploaded ahead must be stored already, and not also be inline.
    let uploaded = |hash: &str, inline_empty: bool, field: &str| {
        if !inline_empty {
            return Err(ApiError::bad_request(
                "invalid_report",
                "a part is either inline or uploaded ahead, not both",
            )
            .with_field(field));
        }
        if !state.blobs.contains(owner, hash) {
            return Err(ApiError::bad_request(
                "missing_blob",
                format!("blob `{hash}` was not uploaded before the report"),
            )
            .with_field(field));
        }
        Ok(hash.to_string())
    };
    let stream = |text: &mut String, ahead: Option<String>, field: &str| match ahead {
        Some(h) => uploaded(&h, text.is_empty(), field).map(Some),
        None if text.len() > STREAM_INLINE => {
            let h = state.blobs.put(owner, text.as_bytes()).map_err(internal)?;
            text.clear();
            Ok(Some(h))
        }
        None => Ok(None),
    };
    let stdout_blob = stream(&mut report.stdout, ahead.stdout, "blobs.stdout")?;
    let stderr_blob = stream(&mut report.stderr, ahead.stderr, "blobs.stderr")?;
    let output = match ahead.output {
        Some(h) => {
            let h = uploaded(&h, report.output.is_none(), "blobs.output")?;
            let bytes = state.blobs.get(owner, &h).map_err(internal)?;
            let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::bad_request("invalid_report", format!("output blob is not JSON: {e}"))
                    .with_field("blobs.output")
            })?;
            Some((value, Some((h, bytes))))
        }
        None => report.output.take().map(|v| (v, None)),
    };
    // The coordinator hashes the value over its canonical JSON (integers exact): the agent's own
    // `output_sha256` stays in its report as a claim, never as the hash verification
    // compares. The value itself is kept as serde_json writes it, not as the canonical text:
    // RFC 8785 writes numbers as doubles, which would round integers past 2^53.
    let (output, output_blob, output_sha256) = match output {
        None => (None, None, None),
        Some((v, uploaded)) => {
            let text = v.to_string();
            if text.len() > INLINE_LIMIT
                && let Some((h, _)) = uploaded.filter(|(_, b)| b == text.as_bytes())
            {
                // The agent's upload is the text the coordinator would store: kept as is.
                (None, Some(h), Some(crate::outputs::output_hash(&v)))
            } else {
                let stored = crate::outputs::store(&state.blobs, owner, &v, text).map_err(|e| {
                    tracing::error!(error = %e, "blob store");
                    ApiError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "could not store an output blob",
                    )
                })?;
                (stored.text, stored.blob, Some(stored.hash))
            }
        }
    };
    let mut audit = audit_summary(&report, output_sha256.as_deref());
    audit["report_sha256"] = report_sha256.into();
    audit["signature"] = signature.clone().into();
    let measures = crate::outputs::Measures::of(&report);
    let blobs = named_blobs(
        state,
        owner,
        &report,
        [&stdout_blob, &stderr_blob, &output_blob],
    )
    .map_err(internal)?;
    Ok(ReportInput {
        blobs,
        audit,
        lease_id,
        task_id,
        attempt,
        python: report.runner.python.clone(),
        backend: report.backend.clone(),
        stdout_sha256: report.stdout_sha256.clone(),
        signature,
        status: report.status,
        reason: report.failure_reason(),
        output,
        output_blob,
        output_sha256,
        report_json: serde_json::to_string(&report).unwrap_or_default(),
        stdout_blob,
        stderr_blob,
        wall_ms: measures.wall_ms,
        cpu_ms: measures.cpu_ms,
        peak_memory: measures.peak_memory,
        bytes_out: measures.bytes_out,
    })
}

/// The blobs a report names that the store holds (its streams, its output, the files it kept),
/// with their sizes, each made sure to be in `owner`'s area of the bucket before any row names
/// it for that tenant.
fn named_blobs(
    state: &State,
    owner: Option<&str>,
    report: &ExecutionReport,
    parts: [&Option<String>; 3],
) -> std::io::Result<Vec<(String, u64)>> {
    let files = report.files.iter().filter_map(|f| f.sha256.as_ref());
    let mut hashes: Vec<&String> = parts.into_iter().flatten().chain(files).collect();
    hashes.sort();
    hashes.dedup();
    let mut named = Vec::with_capacity(hashes.len());
    for h in hashes {
        let size = match owner {
            Some(tenant) => state.blobs.claim(tenant, h)?,
            None => state.blobs.size(None, h),
        };
        named.extend(size.map(|n| (h.clone(), n)));
    }
    Ok(named)
}

/// What the audit log keeps of a run: status, timings, memory, bytes, the files it created
/// (path, size, sha256; the first 100) and its violations.
fn audit_summary(report: &ExecutionReport, output_sha256: Option<&str>) -> serde_json::Value {
    const FILES: usize = 100;
    let mut summary = serde_json::json!({
        "status": report.status.as_str(),
        "exit_code": report.exit_code,
        "signal": report.signal,
        "wall_ms": report.wall_ms,
        "cpu_ms": report.cpu_user_ms.saturating_add(report.cpu_sys_ms),
        "peak_memory_bytes": report.peak_memory_bytes,
        "stdout_bytes": report.stdout_bytes,
        "stderr_bytes": report.stderr_bytes,
        "output_sha256": output_sha256,
        "files": report.files.iter().take(FILES).map(|f| serde_json::json!({
            "path": f.path, "bytes": f.bytes, "sha256": f.sha256,
        })).collect::<Vec<_>>(),
        "files_total": report.files.len(),
        "violations": report.violations.iter().map(|v| serde_json::json!({
            "kind": v.kind, "syscall": v.syscall, "count": v.count,
        })).collect::<Vec<_>>(),
        "backend": report.backend,
        "code_sha256": report.code_sha256,
    });
    // Every connection through the egress proxy, allowed or refused, and those tried around it.
    if !report.egress.is_empty() || report.egress_direct_refused > 0 {
        summary["egress"] = serde_json::json!(report.egress);
        summary["egress_direct_refused"] = report.egress_direct_refused.into();
    }
    summary
}
