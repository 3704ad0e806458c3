//! A typed client for the coordinator's HTTP API (`/v1`), shared by the agent, the CLI and the
//! benchmarks. Errors keep the API's `code`, `message` and `trace_id`.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::time::Duration;

use fleetbox_proto::JobSpec;
use fleetbox_proto::api::{
    AgentList, AuditCheckpoint, AuditPage, AuditVerification, EnrollRequest, EnrollResponse,
    ErrorBody, HeartbeatRequest, HeartbeatResponse, JobList, JobResult, JobView, LeaseRequest,
    LeaseResponse, ReportAck, ReportBatch, ReturnRequest, RunAnswer, RunBody, ShardDetail,
    ShardList,
};
use fleetbox_proto::tenancy::{
    PoolCreate, PoolList, PoolView, TenantCreate, TenantList, TenantUpdate, TenantView,
    TokenCreate, TokenIssued, TokenList, TokenView, Whoami,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator answered with a typed error.
    #[error("{message} ({code}, HTTP {status}, trace {trace_id})")]
    Api {
        status: u16,
        code: String,
        message: String,
        trace_id: String,
        field: Option<String>,
    },
    /// The coordinator could not be reached (or the connection broke).
    #[error("cannot reach the coordinator at `{url}`: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The coordinator's certificate is not one this client trusts: not worth retrying.
    #[error(
        "the coordinator at `{url}` is not trusted: {detail} (give its CA with `--ca-cert`, e.g. `DATA/tls/ca.pem` of `--tls auto`)"
    )]
    Untrusted { url: String, detail: String },
    /// A `--ca-cert` file that holds no certificate.
    #[error("`--ca-cert {path}`: {detail}")]
    BadCa { path: String, detail: String },
    /// A client certificate and key that do not load.
    #[error("the client certificate does not load: {0}")]
    BadIdentity(String),
    #[error("unexpected answer from `{url}`: {detail}")]
    Protocol { url: String, detail: String },
}

impl ClientError {
    /// Worth retrying later: the coordinator is down, restarting or overloaded.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            ClientError::Protocol { .. }
            | ClientError::Untrusted { .. }
            | ClientError::BadCa { .. }
            | ClientError::BadIdentity(_) => false,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// Certificates trusted besides the system's: a private CA (`--ca-cert`, such as the
/// `DATA/tls/ca.pem` a coordinator with `--tls auto` makes); and the client certificate to
/// present, if any (an agent of a coordinator with `--agent-mtls`).
#[derive(Debug, Clone, Default)]
pub struct Trust {
    extra: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
}

impl Trust {
    /// The certificates of a PEM file (one or more).
    pub fn from_pem_file(path: &std::path::Path) -> Result<Trust, ClientError> {
        let bad = |detail: String| ClientError::BadCa {
            path: path.display().to_string(),
            detail,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let extra = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if extra.is_empty() {
            return Err(bad("no certificate in it (PEM expected)".into()));
        }
        Ok(Trust {
            extra,
            identity: None,
        })
    }

    /// The same, presenting the client certificate `cert_pem` with its private key `key_pem`.
    pub fn presenting(&self, cert_pem: &str, key_pem: &str) -> Result<Trust, ClientError> {
        let pem = format!("{cert_pem}\n{key_pem}");
        let identity = reqwest::Identity::from_pem(pem.as_bytes())
            .map_err(|e| ClientError::BadIdentity(e.to_string()))?;
        Ok(Trust {
            identity: Some(identity),
            ..self.clone()
        })
    }

    /// [`Trust::from_pem_file`] of `path`, or only the system's.
    pub fn from_option(path: Option<&std::path::Path>) -> Result<Trust, ClientError> {
        path.map_or_else(|| Ok(Trust::default()), Trust::from_pem_file)
    }
}

/// Whether `e` is a certificate the client does not trust (rather than a network failure).
fn untrusted(e: &reqwest::Error) -> Option<String> {
    bad_certificate(e)
}

/// Look through `e`, its sources, and the errors I/O errors wrap (whose `source` skips
/// them), for a certificate rustls refused.
fn bad_certificate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>()
        && matches!(
            tls,
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
        )
    {
        return Some(tls.to_string());
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        && let Some(why) = bad_certificate(inner)
    {
        return Some(why);
    }
    e.source().and_then(bad_certificate)
}

impl Client {
    /// A client trusting the system's certificates only.
    pub fn new(base: &str, token: &str) -> Client {
        Client::trusting(base, token, &Trust::default())
    }

    /// A client trusting `trust` besides the system's certificates.
    pub fn trusting(base: &str, token: &str, trust: &Trust) -> Client {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30));
        for c in &trust.extra {
            builder = builder.add_root_certificate(c.clone());
        }
        if let Some(id) = &trust.identity {
            builder = builder.identity(id.clone());
        }
        let http = builder
            .build()
            .expect("a reqwest client with parsed certificates always builds");
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The same coordinator with another token.
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: token.to_string(),
            ..self.clone()
        }
    }

    /// Send `req` with the token; the body of a successful answer, or the API's typed error.
    async fn fetch(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let unreachable = |source: reqwest::Error| match untrusted(&source) {
            Some(detail) => ClientError::Untrusted {
                url: url.to_string(),
                detail,
            },
            None => ClientError::Unreachable {
                url: url.to_string(),
                source,
            },
        };
        let resp = req
            .bearer_auth(&self.token)
            .timeout(timeout)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
                trace_id: body.error.trace_id,
                field: body.error.field,
            }),
            Err(_) => Err(ClientError::Protocol {
                url: url.to_string(),
                detail: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            }),
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: String,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let bytes = self.fetch(req, &url, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url,
            detail: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url), url, Duration::from_secs(30))
            .await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(&url).json(body), url, timeout)
            .await
    }

    /// The Prometheus exposition (`GET /metrics`), as text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let bytes = self
            .fetch(self.http.get(&url), &url, Duration::from_secs(30))
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Upload a file a shard produced (agent token); the coordinator checks the hash. With the
    /// lease whose report will name it, it is stored for that shard's tenant at once.
    pub async fn put_blob(
        &self,
        sha256: &str,
        lease: Option<&str>,
        bytes: Vec<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut url = format!("{}/v1/agent/blobs/{sha256}", self.base);
        if let Some(lease) = lease {
            url.push_str("?lease=");
            for b in lease.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                    url.push(char::from(b));
                } else {
                    url.push_str(&format!("%{b:02X}"));
                }
            }
        }
        self.send(
            self.http.put(&url).body(bytes),
            url,
            Duration::from_secs(300),
        )
        .await
    }

    /// A stored stream, output or file by its sha256 (admin token).
    pub async fn get_blob(&self, sha256: &str) -> Result<Vec<u8>, ClientError> {
        let url = format!("{}/v1/blobs/{sha256}", self.base);
        self.fetch(self.http.get(&url), &url, Duration::from_secs(300))
            .await
    }

    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/status").await
    }

    /// A page of the audit log; `query` is `job=..&agent=..&action=..&since=..&after=..&limit=..`
    /// (already URL-safe: ids and action names need no escaping).
    pub async fn audit(&self, query: &str) -> Result<AuditPage, ClientError> {
        self.get(&format!("/v1/audit?{query}")).await
    }

    /// The signed checkpoints of the audit chain, oldest first.
    pub async fn audit_checkpoints(&self) -> Result<Vec<AuditCheckpoint>, ClientError> {
        self.get("/v1/audit/checkpoints").await
    }

    /// A completed job's receipt (see `fleetbox_server::receipt`), as JSON.
    pub async fn receipt(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.get(&format!("/v1/jobs/{id}/receipt")).await
    }

    /// The key the coordinator signs checkpoints with, and the keys it believes.
    pub async fn audit_keys(&self) -> Result<fleetbox_proto::api::AuditKeys, ClientError> {
        self.get("/v1/audit/keys").await
    }

    /// Drop audit entries up to a checkpointed one; returns `{pruned}`.
    pub async fn audit_prune(&self, before_seq: i64) -> Result<serde_json::Value, ClientError> {
        self.post(
            "/v1/audit/prune",
            &serde_json::json!({ "before_seq": before_seq }),
            Duration::from_secs(300),
        )
        .await
    }

    /// Recompute the audit chain on the coordinator.
    pub async fn audit_verify(&self) -> Result<AuditVerification, ClientError> {
        self.get("/v1/audit/verify").await
    }

    pub async fn submit(&self, spec: &JobSpec) -> Result<JobView, ClientError> {
        self.post("/v1/jobs", spec, Duration::from_secs(300)).await
    }

    /// Run one program on the fleet and wait for it (`POST /v1/run`); `state` is not final
    /// when the coordinator stopped waiting (`wait_ms`).
    pub async fn run(&self, body: &RunBody) -> Result<RunAnswer, ClientError> {
        let wait = Duration::from_millis(body.wait_ms.unwrap_or(60_000).min(600_000));
        self.post("/v1/run", body, wait + Duration::from_secs(30))
            .await
    }

    /// Open a session (`POST /v1/sessions`): an interpreter on one agent, kept across calls.
    pub async fn open_session(
        &self,
        body: &fleetbox_proto::api::SessionBody,
    ) -> Result<fleetbox_proto::api::SessionAnswer, ClientError> {
        let wait = Duration::from_millis(body.wait_ms.unwrap_or(60_000).min(600_000));
        self.post("/v1/sessions", body, wait + Duration::from_secs(30))
            .await
    }

    /// One call in a session's interpreter (`POST /v1/sessions/{id}/run`).
    pub async fn session_run(
        &self,
        id: &str,
        body: &fleetbox_proto::api::SessionCallBody,
    ) -> Result<fleetbox_proto::api::SessionAnswer, ClientError> {
        let wait = Duration::from_millis(body.wait_ms.unwrap_or(60_000).min(600_000));
        self.post(
            &format!("/v1/sessions/{id}/run"),
            body,
            wait + Duration::from_secs(30),
        )
        .await
    }

    pub async fn session(&self, id: &str) -> Result<fleetbox_proto::api::SessionView, ClientError> {
        self.get(&format!("/v1/sessions/{id}")).await
    }

    /// The tenant's sessions, newest first (`live`: only those opening or open).
    pub async fn sessions(
        &self,
        live: bool,
    ) -> Result<fleetbox_proto::api::SessionList, ClientError> {
        self.get(&format!("/v1/sessions?live={live}")).await
    }

    /// Close a session (`DELETE /v1/sessions/{id}`).
    pub async fn close_session(
        &self,
        id: &str,
    ) -> Result<fleetbox_proto::api::SessionView, ClientError> {
        let url = format!("{}/v1/sessions/{id}", self.base);
        self.send(self.http.delete(&url), url, Duration::from_secs(30))
            .await
    }

    /// The code review of a program, without running it (`POST /v1/review`).
    pub async fn review(&self, code: &str) -> Result<fleetbox_proto::CodeReview, ClientError> {
        self.post(
            "/v1/review",
            &serde_json::json!({ "code": code }),
            Duration::from_secs(60),
        )
        .await
    }

    /// The review queue (`status`, `job`, `kind` filters as `key=value&...`).
    pub async fn review_flags(
        &self,
        query: &str,
    ) -> Result<fleetbox_proto::api::ReviewFlagList, ClientError> {
        self.get(&format!("/v1/review/flags?{query}")).await
    }

    /// Approve or reject a review flag.
    /// Run a flag's shards again (a child job of its finished job, checked by the server).
    pub async fn rerun_flag(
        &self,
        id: i64,
        note: Option<&str>,
    ) -> Result<fleetbox_proto::api::ReviewFlag, ClientError> {
        self.post(
            &format!("/v1/review/flags/{id}/rerun"),
            &fleetbox_proto::api::DecideFlag {
                note: note.map(String::from),
            },
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn decide_flag(
        &self,
        id: i64,
        approve: bool,
        note: Option<&str>,
    ) -> Result<fleetbox_proto::api::ReviewFlag, ClientError> {
        let verb = if approve { "approve" } else { "reject" };
        self.post(
            &format!("/v1/review/flags/{id}/{verb}"),
            &fleetbox_proto::api::DecideFlag {
                note: note.map(String::from),
            },
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn jobs(&self, state: Option<&str>, limit: u32) -> Result<JobList, ClientError> {
        match state {
            Some(s) => self.get(&format!("/v1/jobs?state={s}&limit={limit}")).await,
            None => self.get(&format!("/v1/jobs?limit={limit}")).await,
        }
    }

    /// Let a quarantined agent lease again.
    /// Revoke an agent's tokens and client certificates (admin scope).
    pub async fn revoke_agent(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.post(
            &format!("/v1/agents/{id}/revoke"),
            &serde_json::json!({}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn release_agent(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.post(
            &format!("/v1/agents/{id}/release"),
            &serde_json::json!({}),
            Duration::from_secs(10),
        )
        .await
    }

    /// Mark an agent to run server-only code, or take the mark back.
    pub async fn mark_hardened(
        &self,
        id: &str,
        hardened: bool,
    ) -> Result<serde_json::Value, ClientError> {
        self.post(
            &format!("/v1/agents/{id}/hardened"),
            &serde_json::json!({ "hardened": hardened }),
            Duration::from_secs(10),
        )
        .await
    }

    /// The caller's tenant and scopes.
    pub async fn whoami(&self) -> Result<Whoami, ClientError> {
        self.get("/v1/whoami").await
    }

    pub async fn create_tenant(&self, req: &TenantCreate) -> Result<TenantView, ClientError> {
        self.post("/v1/tenants", req, Duration::from_secs(10)).await
    }

    pub async fn tenants(&self) -> Result<TenantList, ClientError> {
        self.get("/v1/tenants").await
    }

    pub async fn tenant(&self, id: &str) -> Result<TenantView, ClientError> {
        self.get(&format!("/v1/tenants/{id}")).await
    }

    pub async fn update_tenant(
        &self,
        id: &str,
        req: &TenantUpdate,
    ) -> Result<TenantView, ClientError> {
        self.post(&format!("/v1/tenants/{id}"), req, Duration::from_secs(10))
            .await
    }

    pub async fn create_token(&self, req: &TokenCreate) -> Result<TokenIssued, ClientError> {
        self.post("/v1/tokens", req, Duration::from_secs(10)).await
    }

    /// A tenant's tokens (`None`: the caller's).
    pub async fn tokens(&self, tenant: Option<&str>) -> Result<TokenList, ClientError> {
        match tenant {
            Some(t) => self.get(&format!("/v1/tokens?tenant={t}")).await,
            None => self.get("/v1/tokens").await,
        }
    }

    pub async fn revoke_token(&self, id: &str) -> Result<TokenView, ClientError> {
        self.post(
            &format!("/v1/tokens/{id}/revoke"),
            &serde_json::json!({}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn rotate_token(&self, id: &str) -> Result<TokenIssued, ClientError> {
        self.post(
            &format!("/v1/tokens/{id}/rotate"),
            &serde_json::json!({}),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn create_pool(&self, req: &PoolCreate) -> Result<PoolView, ClientError> {
        self.post("/v1/pools", req, Duration::from_secs(10)).await
    }

    pub async fn pools(&self) -> Result<PoolList, ClientError> {
        self.get("/v1/pools").await
    }

    pub async fn job(&self, id: &str) -> Result<JobView, ClientError> {
        self.get(&format!("/v1/jobs/{id}")).await
    }

    /// The first page (up to 1000 shards); see [`Client::shards_page`].
    pub async fn shards(&self, id: &str) -> Result<ShardList, ClientError> {
        self.get(&format!("/v1/jobs/{id}/shards")).await
    }

    pub async fn shards_page(
        &self,
        id: &str,
        from: u64,
        limit: u32,
        state: Option<&str>,
    ) -> Result<ShardList, ClientError> {
        let state = state.map(|s| format!("&state={s}")).unwrap_or_default();
        self.get(&format!(
            "/v1/jobs/{id}/shards?from={from}&limit={limit}{state}"
        ))
        .await
    }

    pub async fn shard(&self, id: &str, index: u64) -> Result<ShardDetail, ClientError> {
        self.get(&format!("/v1/jobs/{id}/shards/{index}")).await
    }

    pub async fn result(&self, id: &str) -> Result<JobResult, ClientError> {
        self.get(&format!("/v1/jobs/{id}/result")).await
    }

    /// Check a `needs_review` job's tainted shards again and fold it again.
    pub async fn rerun_tainted(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.post(
            &format!("/v1/jobs/{id}/rerun-tainted"),
            &(),
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn cancel(&self, id: &str) -> Result<JobView, ClientError> {
        self.post(
            &format!("/v1/jobs/{id}/cancel"),
            &(),
            Duration::from_secs(30),
        )
        .await
    }

    /// Cancel a job and its descendants that have not finished (a chain of follow-ups).
    pub async fn cancel_chain(&self, id: &str) -> Result<JobView, ClientError> {
        self.post(
            &format!("/v1/jobs/{id}/cancel?chain=true"),
            &(),
            Duration::from_secs(30),
        )
        .await
    }

    /// The chain of follow-up jobs `id` belongs to.
    pub async fn chain(&self, id: &str) -> Result<fleetbox_proto::api::JobChain, ClientError> {
        self.get(&format!("/v1/jobs/{id}/chain")).await
    }

    pub async fn agents(&self) -> Result<AgentList, ClientError> {
        self.get("/v1/agents").await
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, ClientError> {
        self.post("/v1/agents/enroll", req, Duration::from_secs(30))
            .await
    }

    pub async fn lease(&self, req: &LeaseRequest) -> Result<LeaseResponse, ClientError> {
        let timeout = Duration::from_millis(req.wait_ms) + Duration::from_secs(30);
        self.post("/v1/agent/lease", req, timeout).await
    }

    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post("/v1/agent/heartbeat", req, Duration::from_secs(10))
            .await
    }

    pub async fn report(&self, batch: &ReportBatch) -> Result<ReportAck, ClientError> {
        self.post("/v1/agent/reports", batch, Duration::from_secs(60))
            .await
    }

    pub async fn return_leases(
        &self,
        req: &ReturnRequest,
    ) -> Result<serde_json::Value, ClientError> {
        self.post("/v1/agent/return", req, Duration::from_secs(10))
            .await
    }

    /// Replace this agent's report-signing key (`req` signed with the current one).
    pub async fn rotate_key(
        &self,
        req: &fleetbox_proto::api::RotateKeyRequest,
    ) -> Result<serde_json::Value, ClientError> {
        self.post("/v1/agent/key", req, Duration::from_secs(10))
            .await
    }
}
