//! The HTTP API under `/v1`: routing, tracing, authentication and body parsing.

mod agents;
mod audit;
pub mod error;
pub(crate) mod jobs;
mod openapi;
mod review;
mod run;
mod sessions;
mod tenancy;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fleetbox_proto::trace::TraceParent;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

pub use error::ApiError;

use crate::State;
use crate::ids::{random_hex, sha256_hex};
use crate::store::{Principal, TokenKind};
use error::TRACE;

/// Largest request body (job specs carry uploaded `lines`).
pub const MAX_BODY: usize = fleetbox_proto::api::MAX_REQUEST_BYTES;

/// Where `/mcp` sends its tool calls, and whom it accepts.
pub struct McpMount {
    pub base: String,
    pub hosts: Vec<String>,
    pub origins: Vec<String>,
}

pub fn router(state: Arc<State>, mcp: Option<McpMount>) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(jobs::status))
        .route("/v1/openapi.json", get(openapi_json))
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/run", post(run::run))
        .route("/v1/sessions", post(sessions::open).get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::get).delete(sessions::close),
        )
        .route("/v1/sessions/{id}/run", post(sessions::run))
        .route("/v1/review", post(review::review))
        .route("/v1/review/flags", get(review::flags))
        .route("/v1/review/flags/{id}/approve", post(review::approve))
        .route("/v1/review/flags/{id}/reject", post(review::reject))
        .route("/v1/review/flags/{id}/rerun", post(review::rerun))
        .route("/v1/jobs/{id}", get(jobs::get_job))
        .route("/v1/jobs/{id}/shards", get(jobs::shards))
        .route("/v1/jobs/{id}/shards/{index}", get(jobs::shard))
        .route("/v1/jobs/{id}/result", get(jobs::result))
        .route("/v1/jobs/{id}/receipt", get(jobs::receipt))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/pause", post(jobs::pause))
        .route("/v1/jobs/{id}/resume", post(jobs::resume))
        .route("/v1/jobs/{id}/priority", post(jobs::priority))
        .route("/v1/jobs/{id}/rerun-failed", post(jobs::rerun_failed))
        .route("/v1/jobs/{id}/chain", get(jobs::chain))
        .route("/v1/jobs/{id}/rerun-tainted", post(jobs::rerun_tainted))
        .route("/v1/agents", get(agents::list))
        .route("/v1/agents/enroll", post(agents::enroll))
        .route("/v1/agents/{id}/release", post(agents::release))
        .route("/v1/agents/{id}/quarantine", post(agents::quarantine))
        .route("/v1/agents/{id}/revoke", post(agents::revoke))
        .route("/v1/agents/{id}/hardened", post(agents::hardened))
        .route("/v1/agent/lease", post(agents::lease))
        .route("/v1/agent/heartbeat", post(agents::heartbeat))
        .route("/v1/agent/reports", post(agents::report))
        .route("/v1/agent/return", post(agents::return_leases))
        .route("/v1/agent/key", post(agents::rotate_key))
        .route(
            "/v1/agent/blobs/{sha256}",
            axum::routing::put(agents::put_blob),
        )
        .route("/v1/blobs/{sha256}", get(jobs::get_blob))
        .route("/v1/audit", get(audit::list))
        .route("/v1/audit/verify", get(audit::verify))
        .route("/v1/audit/checkpoints", get(audit::checkpoints))
        .route("/v1/audit/keys", get(audit::keys))
        .route("/v1/audit/prune", post(audit::prune))
        .route("/v1/whoami", get(tenancy::whoami))
        .route(
            "/v1/tenants",
            post(tenancy::create_tenant).get(tenancy::list_tenants),
        )
        .route(
            "/v1/tenants/{id}",
            get(tenancy::show_tenant).post(tenancy::update_tenant),
        )
        .route(
            "/v1/tokens",
            post(tenancy::create_token).get(tenancy::list_tokens),
        )
        .route("/v1/tokens/{id}/revoke", post(tenancy::revoke_token))
        .route("/v1/tokens/{id}/rotate", post(tenancy::rotate_token))
        .route(
            "/v1/pools",
            post(tenancy::create_pool).get(tenancy::list_pools),
        );
    router = router.merge(crate::ui::router());
    if let Some(m) = mcp {
        let service = fleetbox_mcp::http_service(m.base, m.hosts, m.origins);
        router = router.merge(
            Router::new()
                .nest_service("/mcp", service)
                .layer(middleware::from_fn_with_state(state.clone(), mcp_auth)),
        );
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), trace))
        .with_state(state)
}

/// `GET /v1/openapi.json`: the API's OpenAPI 3.1 document (no token: it describes, it does
/// not reveal).
async fn openapi_json() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi::document(),
    )
        .into_response()
}

/// `GET /healthz`: the process answers (no token: for probes).
async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: the store answers and its migrations are all applied; `503 not_ready`
/// otherwise (no token: for probes).
async fn readyz(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let not_ready = |m: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", m);
    let (applied, known) = state
        .store
        .readiness()
        .await
        .map_err(|e| not_ready(format!("the store does not answer: {e}")))?;
    if applied < known {
        return Err(not_ready(format!(
            "{applied} of {known} migrations applied"
        )));
    }
    let mut warnings = Vec::new();
    if state.config.sandbox_backend == fleetbox_sandbox::Backend::Process {
        warnings.push(crate::WEAK_SANDBOX_WARNING);
    }
    Ok(axum::Json(serde_json::json!({
        "status": "ready",
        "migrations": applied,
        "sandbox": state.config.sandbox_backend.as_str(),
        "warnings": warnings,
    })))
}

/// `GET /metrics`: Prometheus text format. The operator's scrape has every tenant and agent
/// and this coordinator's own series; a tenant's (a `read` token) only its own jobs, shards,
/// flags, agents and use against its caps.
async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    auth: Auth,
) -> Result<Response, ApiError> {
    let principal = auth.scope(fleetbox_proto::tenancy::Scope::Read)?;
    let operator = principal.is_operator();
    let tenant = (!operator).then_some(principal.tenant_id.as_str());
    let mut stored = state
        .store
        .stored_metrics(crate::store::now_ms(), tenant)
        .await?;
    stored.tenants = match tenant {
        Some(t) => state.store.tenant_view(t).await?.into_iter().collect(),
        None => state.store.list_tenants().await?,
    };
    let mut text = crate::metrics::render(&stored, operator.then_some(&state.metrics));
    if operator {
        crate::metrics::server_sandbox(&mut text, state.config.sandbox_backend);
        crate::metrics::store_writes(&mut text, state.store.writes());
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// `/mcp` takes user tokens only; its tools then call the API with the same token, so each
/// tool needs the scope its endpoint needs.
async fn mcp_auth(auth: Result<Auth, ApiError>, req: Request, next: Next) -> Response {
    match auth.and_then(|a| a.require(&[TokenKind::Admin, TokenKind::User]).map(|_| ())) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Every request runs in a span of its own, in the trace its `traceparent` header names (or a
/// new one): its trace id is in every log line, error body and `x-trace-id` header, and a job
/// it submits keeps it.
async fn trace(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // The route's pattern (`/v1/jobs/{id}`), never the path: ids would make a series each.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let incoming = req
        .headers()
        .get(fleetbox_proto::trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let span = tracing::info_span!(
        "http",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(parent) = &incoming {
        fleetbox_proto::trace::enter(&span, parent);
    }
    // OpenTelemetry's ids when spans are exported; otherwise the caller's trace id (or a new
    // one) and a span id of our own.
    let trace = fleetbox_proto::trace::of_span(&span).unwrap_or_else(|| TraceParent {
        trace_id: incoming
            .as_ref()
            .map_or_else(|| random_hex(16), |t| t.trace_id.clone()),
        span_id: random_hex(8),
        sampled: incoming.as_ref().is_none_or(|t| t.sampled),
    });
    span.record("trace_id", trace.trace_id.as_str());
    let id = trace.trace_id.clone();
    let started = std::time::Instant::now();
    let mut resp = TRACE
        .scope(trace, next.run(req))
        .instrument(span.clone())
        .await;
    let took = started.elapsed();
    span.record("http.response.status_code", resp.status().as_u16());
    state.metrics.request(
        &route,
        method.as_str(),
        resp.status().as_u16(),
        took.as_secs_f64(),
    );
    tracing::debug!(parent: &span, %method, %path, status = resp.status().as_u16(),
        ms = took.as_millis() as u64, "request");
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-trace-id", v);
    }
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for `{} {}`", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "`{}` is not allowed on `{}`",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The caller, from `Authorization: Bearer TOKEN`: a token that is known, not revoked and not
/// expired. Each endpoint then asks for a scope ([`Auth::scope`]) or a token kind.
pub struct Auth {
    principal: Principal,
    /// To record a refusal (a scope the token lacks) in the audit log.
    state: Arc<State>,
    method: String,
    path: String,
}

impl Auth {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// A user token with `scope`; `403 forbidden` (audited) otherwise.
    pub fn scope(&self, scope: fleetbox_proto::tenancy::Scope) -> Result<&Principal, ApiError> {
        if self.principal.has(scope) {
            return Ok(&self.principal);
        }
        self.refuse(&format!("lacks the `{}` scope", scope.as_str()));
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token lacks the `{}` scope", scope.as_str()),
        ))
    }

    /// An admin of the `default` tenant (manages every tenant); `403 forbidden` otherwise.
    pub fn operator(&self) -> Result<&Principal, ApiError> {
        if self.principal.is_operator() {
            return Ok(&self.principal);
        }
        self.refuse("is not the operator's (admin of the `default` tenant)");
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only an admin token of the `default` tenant (the operator) may do this",
        ))
    }

    /// A token of one of `kinds` (agent protocol endpoints).
    pub fn require(&self, kinds: &[TokenKind]) -> Result<&Principal, ApiError> {
        if kinds.contains(&self.principal.kind) {
            Ok(&self.principal)
        } else {
            self.refuse(&format!(
                "is a `{}` token, which may not call this endpoint",
                self.principal.kind.as_str()
            ));
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token may not call this endpoint",
            ))
        }
    }

    /// The agent id of an agent token.
    pub fn agent(&self) -> Result<(&str, &str), ApiError> {
        self.require(&[TokenKind::Agent])?;
        let id = self.principal.agent_id.as_deref().ok_or_else(|| {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "token names no agent")
        })?;
        Ok((&self.principal.tenant_id, id))
    }

    /// Record the refusal in the tenant's audit log (rate-limited), off the request's path.
    fn refuse(&self, why: &str) {
        let state = self.state.clone();
        let failure = crate::TokenFailure {
            tenant: self.principal.tenant_id.clone(),
            actor: self.principal.actor.clone(),
            token_id: self.principal.token_id.clone(),
            why: why.to_string(),
            method: self.method.clone(),
            path: self.path.clone(),
        };
        tokio::spawn(async move { state.audit_token_failure(failure).await });
    }
}

impl FromRequestParts<Arc<State>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<State>) -> Result<Self, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("the `Authorization` header must be `Bearer <token>`"))?;
        let hash = sha256_hex(token.as_bytes());
        let (method, path) = (parts.method.to_string(), parts.uri.path().to_string());
        let failed = |tenant: &str, actor: &str, why: &str| crate::TokenFailure {
            tenant: tenant.to_string(),
            actor: actor.to_string(),
            token_id: crate::store::token_id(&hash).to_string(),
            why: why.to_string(),
            method: method.clone(),
            path: path.clone(),
        };
        let principal = match state.cached_token(&hash) {
            Some(p) => p,
            None => match state.store.token(&hash).await? {
                Some(t) if t.revoked_at.is_some() => {
                    let p = &t.principal;
                    state
                        .audit_token_failure(failed(&p.tenant_id, &p.actor, "revoked"))
                        .await;
                    return Err(unauthorized("this token was revoked"));
                }
                Some(t) => {
                    state.cache_token(&hash, &t.principal);
                    t.principal
                }
                None => {
                    state
                        .audit_token_failure(failed(
                            crate::store::DEFAULT_TENANT,
                            "unknown",
                            "unknown",
                        ))
                        .await;
                    return Err(unauthorized("unknown token"));
                }
            },
        };
        if principal
            .expires_at
            .is_some_and(|at| at <= crate::store::now_ms())
        {
            state
                .audit_token_failure(failed(&principal.tenant_id, &principal.actor, "expired"))
                .await;
            return Err(unauthorized("this token expired"));
        }
        if !agent_certificate_ok(parts, state, &principal).await? {
            state
                .audit_token_failure(failed(
                    &principal.tenant_id,
                    &principal.actor,
                    "no client certificate of this agent",
                ))
                .await;
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "client_certificate_required",
                "agents must present the client certificate issued to them at enrolment \
                 (this coordinator runs with --agent-mtls); enrol again to get one",
            ));
        }
        Ok(Auth {
            principal,
            state: state.clone(),
            method,
            path,
        })
    }
}

/// With `--agent-mtls`, an agent's call over HTTPS must come on a connection whose client
/// certificate was issued to that agent and is not revoked. Calls on the coordinator's plain
/// loopback listener (its own in-process agents) carry no TLS and are not asked.
async fn agent_certificate_ok(
    parts: &Parts,
    state: &Arc<State>,
    principal: &Principal,
) -> Result<bool, ApiError> {
    let Some(mtls) = &state.mtls else {
        return Ok(true);
    };
    if principal.kind != TokenKind::Agent {
        return Ok(true);
    }
    let Some(peer) = parts
        .extensions
        .get::<axum::extract::ConnectInfo<crate::mtls::TlsPeer>>()
    else {
        return Ok(true);
    };
    let (Some(cert), Some(agent)) = (&peer.0.cert_sha256, &principal.agent_id) else {
        return Ok(false);
    };
    Ok(mtls.belongs_to(&state.store, cert, agent).await?)
}

/// A JSON body whose errors name the field and use the API's error shape.
pub struct Body<T>(pub T);

/// A query string as `T`, or a typed `400 invalid_query`.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Params(q.0))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = raw_body(req, state).await?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de).map(Body).map_err(|e| {
            let field = e.path().to_string();
            let err = ApiError::bad_request("invalid_body", e.inner().to_string());
            if field.is_empty() || field == "." || field == "?" {
                err
            } else {
                err.with_field(field)
            }
        })
    }
}

pub(crate) async fn raw_body<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<axum::body::Bytes, ApiError> {
    axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request bodies are limited to {} MiB", MAX_BODY >> 20),
                )
            } else {
                ApiError::bad_request("invalid_body", e.body_text())
            }
        })
}
