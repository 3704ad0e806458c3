//! The Fleetbox coordinator.
//!
//! [`start`] opens the store (SQLite in the data directory, or PostgreSQL), makes sure the
//! bootstrap tokens exist, binds the HTTP API and starts its background tasks:
//!
//! - the scheduler (`scheduler`): lost agents, expired leases, folds that are due, audit
//!   checkpoints;
//! - the aggregator (`aggregate`): folds a job's shard values once its last shard settles;
//! - the checker (`checker`): the coordinator's own re-runs of agents' results;
//! - the planner (`planner`) and its notifier (`planner::notify`): follow-up jobs and webhooks;
//! - the panel's sampler (`ui::sample`): the overview's last hour, per view;
//! - with `--agent-mtls`, the revocation follower (`mtls::follow_revocations`): the CRL;
//! - once at start, `quota::measure_old_blobs`: sizes of blobs owned before sizes were kept.
//!
//! Store writes run to their end whatever happens to the request that asked for them
//! (`store::tx`). User code never runs in this process: re-checks and the `python` reducer go
//! through the sandbox crate.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(clippy::too_many_lines)]

mod aggregate;
pub mod api;
pub mod blobs;
mod checker;
pub mod custody;
pub mod heartbeats;
pub mod ids;
mod intake;
pub mod metrics;
pub mod mtls;
mod outputs;
pub mod planner;
pub mod quota;
pub mod receipt;
pub mod reduce;
mod reported;
pub mod retention;
mod scheduler;
pub mod store;
pub mod tls;
mod token_cache;
pub mod ui;

pub use checker::{SERVER_MEMORY, SERVER_PROCESSES};

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fleetbox_proto::Limits;
use fleetbox_sandbox::{Backend, SandboxConfig};
use tokio::sync::{Notify, mpsc, watch};

use crate::api::ApiError;
use crate::blobs::Blobs;
use crate::ids::sha256_hex;
use crate::store::{DEFAULT_TENANT, Principal, Store, StoreError, TokenKind};

/// Coordinator settings (resolved by the CLI from flags, environment and `fleetbox.toml`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Holds the SQLite database, blobs and the bootstrap token files.
    pub data_dir: PathBuf,
    /// `postgres://...`; `None` = SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// How long a lease lasts without a heartbeat.
    pub lease_ms: u64,
    /// How often agents are told to heartbeat.
    pub heartbeat_ms: u64,
    /// How long an agent's credential lasts (`--agent-credential-ttl`): heartbeats renew it
    /// past half its life, so a live agent never sees it end, and a revoked or dead one is cut
    /// off within this.
    pub agent_credential_ms: u64,
    /// Silence after which an agent is `lost` and its leases go back to the queue.
    pub agent_timeout_ms: u64,
    /// First retry delay; doubles per attempt, capped at a minute.
    pub retry_backoff_ms: u64,
    /// Use this admin token instead of the stored/generated one.
    pub admin_token: Option<String>,
    /// Use this enrollment token instead of the stored/generated one.
    pub enroll_token: Option<String>,
    /// How often the audit chain heads are checkpointed (signed) when they moved.
    pub audit_checkpoint_ms: u64,
    /// Finished jobs (and ended sessions) older than this are deleted with their shards,
    /// attempts and the blobs nothing else names (`--retain`); `None` keeps everything.
    pub retain_ms: Option<u64>,
    /// Keep each tenant's rows in a PostgreSQL schema of its own (`--tenant-schemas`; see
    /// `store::schemas`). Once on, the database keeps it for every coordinator.
    pub tenant_schemas: bool,
    /// The key checkpoints and prunes are signed with (an ed25519 seed, hex; made when
    /// missing). `None`: `DATA/audit.key`. Coordinators sharing a database may share one.
    pub audit_key: Option<PathBuf>,
    /// Public keys (hex, one per line) whose checkpoints this coordinator believes besides its
    /// own: the other coordinators on its database.
    pub audit_trusted_keys: Option<PathBuf>,
    /// Where each checkpoint goes as it is made, besides `DATA/audit-checkpoints.jsonl`.
    pub audit_ship: Vec<custody::Sink>,
    /// Write the audit log. Always on in a coordinator; off only for the throughput
    /// benchmark's baseline (what the log costs is measured against it).
    pub audit: bool,
    /// Server re-checks run at once (each in its own fresh sandbox).
    pub check_workers: usize,
    /// How long after a failed try a server re-check is tried again (at most
    /// `checker::MAX_CHECK_FAILURES` tries, then the shard is settled inconclusive).
    pub check_retry_ms: u64,
    /// Invalid results after which an agent is quarantined (no more leases until released).
    pub quarantine_strikes: u32,
    /// `recheck = "adaptive"`: valid results in a row after which an agent is trusted (its
    /// results then sampled at 2%); doubled for each strike on its record.
    pub trusted_after: u32,
    /// Sandbox for server-side runs (the `python` reducer, re-checks).
    pub sandbox_backend: Backend,
    /// The operator chose the `process` backend for server-side runs (`--recheck-backend
    /// process`): untrusted code then runs beside `audit.key`, the tokens and the database, so
    /// a coordinator refuses to start with it otherwise, and says so everywhere when allowed.
    pub weak_sandbox_allowed: bool,
    pub sandbox: SandboxConfig,
    /// Where and how the environments jobs ask for are built for re-checks (`DATA/envs`).
    pub environments: fleetbox_sandbox::environment::EnvConfig,
    /// Serve the Model Context Protocol at `/mcp` (Streamable HTTP, admin tokens).
    pub mcp: bool,
    /// `Origin`s allowed to call `/mcp` (browsers send one; requests with any other are
    /// refused, against DNS rebinding). Clients that send none are not affected.
    pub mcp_origins: Vec<String>,
    /// The code review's rules (`resources/review/rules.toml` format); the shipped ones when
    /// absent.
    pub review_rules: Option<PathBuf>,
    /// An OpenAI-compatible model that reviews code on top of the built-in rules (it can raise
    /// a program's risk, not lower it).
    pub llm: Option<fleetbox_review::llm::LlmConfig>,
    /// Follow-up rules: on or off, and their caps.
    pub planner: planner::PlannerConfig,
    /// A CA certificate (PEM) trusted besides the system's for outgoing HTTPS (the model,
    /// `notify` webhooks).
    pub ca_cert: Option<PathBuf>,
    /// HTTPS on the listener (`--tls-cert`/`--tls-key`, `--tls auto`); `None`: plain HTTP.
    pub tls: Option<tls::TlsSetting>,
    /// Agents must present a client certificate from the coordinator's CA, issued at
    /// enrolment (`--agent-mtls`; needs `tls`).
    pub agent_mtls: bool,
    /// An S3-compatible bucket for blobs (`--blob-store s3://...`), shared by every
    /// coordinator on the database; `None`: `DATA/blobs` alone.
    pub blob_store: Option<blobs::BlobStoreConfig>,
    /// What result review's anomalies do to a job (`--anomalies`).
    pub anomalies: AnomalyAction,
    /// The AI planner's job templates (a directory of job specs, `*.toml`): with a model
    /// (`llm`), jobs that ask (`ai_followup = true`) get a follow-up it picks from them.
    pub ai_planner_templates: Option<PathBuf>,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        let heartbeat_ms = 2000;
        ServerConfig {
            listen,
            database_url: None,
            lease_ms: 10_000,
            heartbeat_ms,
            agent_credential_ms: 3_600_000,
            agent_timeout_ms: heartbeat_ms * 2 + heartbeat_ms / 4,
            retry_backoff_ms: 1000,
            admin_token: None,
            enroll_token: None,
            audit_checkpoint_ms: 60_000,
            retain_ms: None,
            tenant_schemas: false,
            audit_key: None,
            audit_trusted_keys: None,
            audit_ship: Vec::new(),
            audit: true,
            check_workers: std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
            check_retry_ms: 15_000,
            quarantine_strikes: 2,
            trusted_after: store::verify::TRUSTED_AFTER as u32,
            sandbox_backend: Backend::default_for_host(),
            weak_sandbox_allowed: false,
            // The coordinator's own runs get the allow-list: the strictest policy.
            sandbox: SandboxConfig {
                seccomp: fleetbox_sandbox::SeccompMode::Allow,
                ..SandboxConfig::default()
            },
            environments: fleetbox_sandbox::environment::EnvConfig::new(data_dir.join("envs")),
            mcp: false,
            mcp_origins: Vec::new(),
            review_rules: None,
            llm: None,
            planner: planner::PlannerConfig::default(),
            ai_planner_templates: None,
            anomalies: AnomalyAction::Flag,
            ca_cert: None,
            tls: None,
            agent_mtls: false,
            blob_store: None,
            data_dir,
        }
    }
}

/// What a job whose result review found anomalies (outlying shards or agents, an error
/// spike) comes to, besides its flags and a review-queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnomalyAction {
    /// Accept: the job is `completed`, flagged.
    #[default]
    Flag,
    /// The job is `needs_review` (its result kept) until a person approves (`completed`) or
    /// rejects (`cancelled`) the flag, or re-runs its shards.
    Review,
    /// The job is `completed` and the flagged shards run again at once in a child job (on any
    /// agent, each checked by the coordinator's sandbox) whose result folds over the job's.
    Rerun,
}

impl std::str::FromStr for AnomalyAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flag" => Ok(AnomalyAction::Flag),
            "review" => Ok(AnomalyAction::Review),
            "rerun" => Ok(AnomalyAction::Rerun),
            other => Err(format!(
                "`{other}` is not an anomaly action (flag, review, rerun)"
            )),
        }
    }
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not prepare `{}`: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not listen on `{addr}`: {source}{}", bind_hint(source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the review rules `{}`: {why}", path.display())]
    ReviewRules { path: PathBuf, why: String },
    #[error("the AI planner's templates `{}`: {why}", path.display())]
    AiPlanner { path: PathBuf, why: String },
    #[error("the AI planner's templates `{}`: {why}", path.display())]
    Templates {
        path: PathBuf,
        why: planner::TemplateError,
    },
    #[error("`--ca-cert`: {0}")]
    CaCert(String),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Blobs(#[from] blobs::OpenError),
    #[error("`--agent-mtls` needs TLS on the listener (`--tls auto` or `--tls-cert`/`--tls-key`)")]
    MtlsWithoutTls,
    #[error(
        "`--agent-timeout` ({timeout_ms} ms) must exceed the heartbeat ({heartbeat_ms} ms) by at least {margin_ms} ms: heartbeats reach the database up to that late, and agents would be called lost while alive"
    )]
    AgentTimeout {
        timeout_ms: u64,
        heartbeat_ms: u64,
        margin_ms: u64,
    },
    #[error("`--audit-trusted-keys`: {0}")]
    TrustedKeys(#[from] custody::CustodyError),
    #[error(
        "server-side runs (re-checks of agents' results, the `python` reducer) would use the `process` backend{why}: untrusted code would run beside `audit.key`, the tokens and the database, with less isolation than the agents it checks. Make the jail work on this host (`fleetbox doctor --backend jail` says what it lacks and how to fix it), use `--recheck-backend docker`, or accept it with `--recheck-backend process`"
    )]
    WeakSandbox { why: String },
}

/// What `/readyz`, the metrics and every server run's report say when server-side runs use the
/// `process` backend by the operator's choice.
pub const WEAK_SANDBOX_WARNING: &str = "server-side runs (re-checks, the python reducer) use the `process` backend, chosen by the operator (--recheck-backend process): weaker than the jail or docker the agents use";

/// What a handler needs of a job, cached: code, limits and shard count never change.
#[derive(Debug)]
pub struct JobInfo {
    pub code: String,
    pub code_sha256: String,
    pub limits: Limits,
    pub shard_count: u64,
    pub environment: Option<fleetbox_proto::EnvironmentSpec>,
    /// Attached files (name → base64).
    pub files: std::collections::BTreeMap<String, String>,
    /// The job's W3C trace context.
    pub traceparent: Option<String>,
    /// A session call's session.
    pub session: Option<fleetbox_proto::api::LeasedSession>,
}

/// Shared by every handler and background loop.
pub struct State {
    pub store: Store,
    pub blobs: Blobs,
    pub config: ServerConfig,
    /// Woken when tasks become ready (submit, requeue, return).
    pub work: Notify,
    /// Woken when shards may be waiting for a server re-check.
    pub checks: Notify,
    /// Woken when a job may have follow-up rules to evaluate.
    pub planner_wake: Notify,
    /// Woken when webhooks may be due.
    pub notify_wake: Notify,
    /// Tokens looked up, believed until the database says they changed (`token_cache`).
    tokens: token_cache::TokenCache,
    /// Failed uses of tokens recorded in the audit log this second, and those left out since.
    invalid_tokens: Mutex<InvalidTokens>,
    job_cache: Mutex<HashMap<String, Arc<JobInfo>>>,
    /// Callers waiting for a job to end (`POST /v1/run`), woken when this coordinator ends it.
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
    aggregate_tx: mpsc::UnboundedSender<String>,
    aggregating: Mutex<HashSet<String>>,
    /// Becomes true when the coordinator stops: long polls answer at once.
    pub stopping: watch::Receiver<bool>,
    /// This coordinator process among those sharing the database (owner of the folds it claims).
    pub instance: String,
    /// Agents' heartbeats not written yet (the scheduler writes them together).
    pub heartbeats: heartbeats::Heartbeats,
    /// When this coordinator started (ms): agents get one agent timeout of grace after it.
    pub started_at: i64,
    /// The audit log's keys, journal and shipping (see `custody`).
    pub custody: custody::Custody,
    /// Judges every program before it is accepted (AI control).
    pub reviewer: Arc<dyn fleetbox_review::Reviewer>,
    /// Environments for re-checks of jobs that ask for packages; `None` when the server's
    /// sandbox could not be opened (such checks are then unverifiable).
    pub environments: Option<Arc<fleetbox_sandbox::environment::Environments>>,
    /// The AI planner's templates by name (empty: no AI planner).
    pub ai_templates: Vec<(String, fleetbox_proto::JobSpec)>,
    /// What `/metrics` counts in this process (HTTP, shard run times).
    pub metrics: metrics::Registry,
    /// The web panel's sessions and the overview's last hour.
    pub panel: ui::Panel,
    /// Tenants' caps as read recently, and their submit buckets.
    pub quotas: quota::Quotas,
    /// Agents' client certificates (`--agent-mtls`).
    pub mtls: Option<Arc<mtls::AgentMtls>>,
}

/// A failed use of a token, as the audit log records it.
#[derive(Debug, Clone)]
pub(crate) struct TokenFailure {
    pub tenant: String,
    pub actor: String,
    pub token_id: String,
    /// `unknown`, `revoked`, `expired`, or the scope or kind it lacks.
    pub why: String,
    pub method: String,
    pub path: String,
}

/// A bounded record of calls with unknown tokens: at most [`InvalidTokens::PER_SECOND`] audit
/// entries a second per coordinator, the rest counted into the next entry (a flood of bad
/// tokens cannot flood the log).
#[derive(Debug, Default)]
struct InvalidTokens {
    second: i64,
    recorded: u32,
    left_out: u64,
}

impl InvalidTokens {
    const PER_SECOND: u32 = 10;

    /// Whether to record this one now, and how many were left out before it.
    fn admit(&mut self, now_ms: i64) -> Option<u64> {
        let second = now_ms / 1000;
        if second != self.second {
            self.second = second;
            self.recorded = 0;
        }
        if self.recorded >= Self::PER_SECOND {
            self.left_out += 1;
            return None;
        }
        self.recorded += 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

impl State {
    /// Record a failed use of a token (rate-limited; see [`InvalidTokens`]): in its tenant's
    /// log, or the default one for a token nobody knows.
    pub(crate) async fn audit_token_failure(&self, f: TokenFailure) {
        let admitted = self
            .invalid_tokens
            .lock()
            .expect("invalid tokens")
            .admit(store::now_ms());
        let Some(left_out) = admitted else { return };
        let entry = store::audit::Entry::new(
            &f.tenant,
            f.actor.as_str(),
            store::audit::Action::TokenUsedInvalid,
        )
        .details(serde_json::json!({
            "token_id": f.token_id,
            "why": f.why,
            "method": f.method,
            "path": f.path,
            "left_out_before": left_out,
        }));
        if let Err(e) = self.store.audit(vec![entry]).await {
            tracing::error!(error = %e, "could not record a failed use of a token");
        }
    }

    /// A token looked up recently and not changed since (see `token_cache`).
    fn cached_token(&self, hash: &str) -> Option<Principal> {
        self.tokens.get(hash)
    }

    fn cache_token(&self, hash: &str, principal: &Principal) {
        self.tokens.put(hash, principal);
    }

    /// Forget every cached token (one was revoked here: refuse it at once).
    pub(crate) fn forget_tokens(&self) {
        self.tokens.clear();
    }

    pub async fn job_info(&self, job_id: &str) -> Result<Arc<JobInfo>, ApiError> {
        if let Some(info) = self.job_cache.lock().expect("job cache").get(job_id) {
            return Ok(info.clone());
        }
        let job = self
            .store
            .job_any_tenant(job_id)
            .await?
            .ok_or_else(|| ApiError::not_found("job", job_id))?;
        let info = Arc::new(JobInfo {
            code: job.code,
            code_sha256: job.code_sha256,
            limits: job.limits,
            shard_count: job.shard_count,
            environment: job.environment,
            files: job.files,
            traceparent: job.traceparent,
            session: job.session,
        });
        let mut cache = self.job_cache.lock().expect("job cache");
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(job_id.to_string(), info.clone());
        Ok(info)
    }

    /// Wake whoever waits for this job: it may have ended.
    pub fn job_may_have_ended(&self, job_id: &str) {
        if let Some(n) = self.waiting.lock().expect("waiting").remove(job_id) {
            n.notify_waiters();
        }
    }

    /// Wait until job `id` is final or `deadline` passes; its view either way. Woken by this
    /// coordinator's folds and cancels, and re-read every 200 ms for what another coordinator
    /// sharing the database ends.
    pub async fn wait_job(
        &self,
        tenant_id: &str,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<fleetbox_proto::api::JobView, ApiError> {
        loop {
            let notify = self
                .waiting
                .lock()
                .expect("waiting")
                .entry(id.to_string())
                .or_default()
                .clone();
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let view = self
                .store
                .job_view(tenant_id, id)
                .await?
                .ok_or_else(|| ApiError::not_found("job", id))?;
            if view.state.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(view);
            }
            let next =
                (tokio::time::Instant::now() + std::time::Duration::from_millis(200)).min(deadline);
            let mut stopping = self.stopping.clone();
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(next) => {}
                _ = stopping.wait_for(|s| *s) => return Ok(view),
            }
        }
    }

    /// Queue a job for aggregation (once).
    pub fn aggregate(&self, job_id: String) {
        if self
            .aggregating
            .lock()
            .expect("aggregating set")
            .insert(job_id.clone())
        {
            let _ = self.aggregate_tx.send(job_id);
        }
    }
}

/// A running coordinator.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_token: String,
    pub enroll_token: String,
    /// Enrols the agents this process starts itself (`fleetbox up`), which are trusted from
    /// the start; made at each start and held only in memory.
    pub own_enroll_token: String,
    pub state: Arc<State>,
    /// With TLS: a plain-HTTP listener on loopback for this process's own clients (its MCP
    /// tools, server agents, `fleetbox up`'s agents), which need no certificate.
    local: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// The URL clients use: `https://` with TLS (on `127.0.0.1` when listening on every
    /// address, as the certificate names it).
    pub fn url(&self) -> String {
        if self.state.config.tls.is_none() {
            return format!("http://{}", self.addr);
        }
        let ip = if self.addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            self.addr.ip()
        };
        format!("https://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The URL for clients in this same process: [`Running::url`], or with TLS the plain
    /// loopback listener.
    pub fn local_url(&self) -> String {
        self.local
            .map_or_else(|| self.url(), |a| format!("http://{a}"))
    }

    /// Stop accepting requests, finish the ones in flight, close the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        self.state.last_writes().await;
    }

    /// Resolves when a shutdown was requested and the HTTP server has stopped.
    pub async fn wait(self) -> std::io::Result<()> {
        let res = self.server.await.unwrap_or(Ok(()));
        self.state.last_writes().await;
        res
    }

    /// A handle that triggers a graceful shutdown.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// The agent timeout leaves room for a heartbeat's way to the database (see [`heartbeats`]).
fn check_agent_timeout(config: &ServerConfig) -> Result<(), StartError> {
    let margin_ms = heartbeats::FLUSH.as_millis() as u64;
    if config.agent_timeout_ms < config.heartbeat_ms + margin_ms {
        return Err(StartError::AgentTimeout {
            timeout_ms: config.agent_timeout_ms,
            heartbeat_ms: config.heartbeat_ms,
            margin_ms,
        });
    }
    Ok(())
}

impl State {
    /// What a stopping coordinator writes before it closes the store: the heartbeats waiting.
    async fn last_writes(&self) {
        if let Err(e) = self.heartbeats.flush(&self.store).await {
            tracing::warn!(error = %e, "could not write the last heartbeats");
        }
        self.store.close().await;
    }
}

/// Start the coordinator: store, tokens, HTTP API, scheduler and aggregator.
pub async fn start(config: ServerConfig) -> Result<Running, StartError> {
    let data_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| StartError::DataDir { path, source }
    };
    fs_err::create_dir_all(&config.data_dir).map_err(data_err(&config.data_dir))?;
    check_sandbox(&config)?;
    check_agent_timeout(&config)?;
    fleetbox_sandbox::sweep_stale(&config.sandbox);
    let url = config
        .database_url
        .clone()
        .unwrap_or_else(|| Store::sqlite_url(&config.data_dir));
    let mut store = Store::open(&url).await?;
    if store.keep_tenant_schemas(config.tenant_schemas).await? {
        tracing::info!("each tenant's rows are kept in a schema of its own");
    }
    store.set_audit(config.audit);
    store.set_trusted_after(config.trusted_after);
    let blob_dir = config.data_dir.join("blobs");
    let blobs = Blobs::open_with(&blob_dir, config.blob_store.as_ref()).await?;
    let custody = open_custody(&config)?;
    let admin_token = bootstrap_token(&store, &config, TokenKind::Admin).await?;
    let enroll_token = bootstrap_token(&store, &config, TokenKind::Enroll).await?;
    let own_enroll_token = ids::token("enroll");
    store
        .add_token(
            &sha256_hex(own_enroll_token.as_bytes()),
            DEFAULT_TENANT,
            TokenKind::EnrollOwn,
            None,
        )
        .await?;

    let listener = bind(config.listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let environments = environments(&config);
    let reviewer = reviewer(&config).await?;
    let ai_templates = ai_templates(&config)?;
    let mtls = match (config.agent_mtls, &config.tls) {
        (false, _) => None,
        (true, None) => return Err(StartError::MtlsWithoutTls),
        (true, Some(_)) => Some(Arc::new(mtls::AgentMtls::open(&tls::auto_dir(
            &config.data_dir,
        ))?)),
    };
    let (aggregate_tx, aggregate_rx) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let state = Arc::new(State {
        store,
        blobs,
        config,
        work: Notify::new(),
        checks: Notify::new(),
        planner_wake: Notify::new(),
        notify_wake: Notify::new(),
        tokens: token_cache::TokenCache::default(),
        invalid_tokens: Mutex::new(InvalidTokens::default()),
        job_cache: Mutex::new(HashMap::new()),
        waiting: Mutex::new(HashMap::new()),
        aggregate_tx,
        aggregating: Mutex::new(HashSet::new()),
        stopping: shutdown.subscribe(),
        instance: format!("coord_{}", ids::random_hex(8)),
        heartbeats: heartbeats::Heartbeats::default(),
        started_at: store::now_ms(),
        custody,
        reviewer,
        environments,
        ai_templates,
        metrics: metrics::Registry::default(),
        panel: ui::Panel::default(),
        quotas: quota::Quotas::default(),
        mtls,
    });
    if let Some(m) = &state.mtls {
        tokio::spawn(mtls::follow_revocations(
            state.clone(),
            m.clone(),
            shutdown.subscribe(),
        ));
    }
    tokio::spawn(scheduler::run(state.clone(), shutdown.subscribe()));
    tokio::spawn(heartbeats::run(state.clone(), shutdown.subscribe()));
    tokio::spawn(token_cache::follow(state.clone(), shutdown.subscribe()));
    tokio::spawn(ui::sample(state.clone(), shutdown.subscribe()));
    tokio::spawn(aggregate::run(state.clone(), aggregate_rx));
    tokio::spawn(checker::run(state.clone(), shutdown.subscribe()));
    tokio::spawn(planner::run(state.clone(), shutdown.subscribe()));
    tokio::spawn(planner::notify::run(state.clone(), shutdown.subscribe()));
    tokio::spawn(quota::measure_old_blobs(state.clone()));
    let (server, local) = serve(&state, listener, addr, shutdown_rx).await?;
    tracing::info!(%addr, database = %store::redact(&url), blobs = %state.blobs.describe(),
        instance = %state.instance, "coordinator listening");
    Ok(Running {
        addr,
        admin_token,
        enroll_token,
        own_enroll_token,
        state,
        local,
        shutdown,
        server,
    })
}

type Serving = tokio::task::JoinHandle<std::io::Result<()>>;

/// Serve the API on `listener`: plain HTTP, or HTTPS and then a plain loopback listener for
/// this process's own clients (see [`Running::local_url`]).
async fn serve(
    state: &Arc<State>,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> Result<(Serving, Option<SocketAddr>), StartError> {
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let Some(setting) = &state.config.tls else {
        let mcp = state.config.mcp.then(|| mcp_mount(state, addr, addr));
        let app = api::router(state.clone(), mcp);
        let server = axum::serve(listener, app).with_graceful_shutdown(stopped(shutdown));
        return Ok((tokio::spawn(async move { server.await }), None));
    };
    let (cert, key) = tls::files(setting, &state.config.data_dir, addr)?;
    let clients = state.mtls.as_ref().map(|m| m.verifier());
    let config = tls::server_config(cert, key, clients)?;
    let local_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let local = bind(local_addr).await?;
    let local_addr = local.local_addr().map_err(|source| StartError::Bind {
        addr: local_addr,
        source,
    })?;
    let mcp = state.config.mcp.then(|| mcp_mount(state, addr, local_addr));
    let app = api::router(state.clone(), mcp);
    let tls = tls::TlsListener::new(listener, config)
        .map_err(|source| StartError::Bind { addr, source })?;
    let inner = axum::serve(local, api::router(state.clone(), None))
        .with_graceful_shutdown(stopped(shutdown.clone()));
    let app = app.into_make_service_with_connect_info::<mtls::TlsPeer>();
    let outer = axum::serve(tls, app).with_graceful_shutdown(stopped(shutdown));
    let server = tokio::spawn(async move {
        let (a, b) = tokio::join!(outer, inner);
        a.and(b)
    });
    Ok((server, Some(local_addr)))
}

/// The coordinator's own sandbox: the `process` backend only when the operator chose it.
fn check_sandbox(config: &ServerConfig) -> Result<(), StartError> {
    if config.sandbox_backend != Backend::Process {
        return Ok(());
    }
    if !config.weak_sandbox_allowed {
        let why = match fleetbox_sandbox::jail::host_supports_jail() {
            Err(e) => format!(" (the jail cannot run here: {e})"),
            Ok(()) => String::new(),
        };
        return Err(StartError::WeakSandbox { why });
    }
    tracing::warn!("{WEAK_SANDBOX_WARNING}");
    Ok(())
}

/// The audit key, the keys pinned beside it, and where checkpoints are shipped.
fn open_custody(config: &ServerConfig) -> Result<custody::Custody, StartError> {
    let key_path = config
        .audit_key
        .clone()
        .unwrap_or_else(|| config.data_dir.join("audit.key"));
    let audit_key = audit_key(&key_path).map_err(|source| StartError::DataDir {
        path: key_path.clone(),
        source,
    })?;
    let trusted = match &config.audit_trusted_keys {
        Some(path) => custody::read_trusted_keys(path).map_err(StartError::TrustedKeys)?,
        None => Vec::new(),
    };
    let custody = custody::Custody::new(
        audit_key,
        trusted,
        config.data_dir.join("audit-checkpoints.jsonl"),
        config.audit_ship.clone(),
    );
    tracing::info!(
        public_key = %custody.public_key(),
        key = %key_path.display(),
        "audit checkpoints are signed with this key: pin it outside the database (`fleetbox audit verify --trusted-keys`)"
    );
    Ok(custody)
}

/// Where the environments jobs ask for are built for re-checks (none without a sandbox).
fn environments(config: &ServerConfig) -> Option<Arc<fleetbox_sandbox::environment::Environments>> {
    match fleetbox_sandbox::open(config.sandbox_backend, config.sandbox.clone()) {
        Ok(sandbox) => Some(fleetbox_sandbox::environment::Environments::new(
            config.environments.clone(),
            Arc::from(sandbox),
            config.sandbox.python.clone(),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "no sandbox for building environments: re-checks of jobs with `[environment]` are unverifiable");
            None
        }
    }
}

/// The code reviewer: the rules (shipped or `--review-rules`), with a model when configured.
async fn reviewer(config: &ServerConfig) -> Result<Arc<dyn fleetbox_review::Reviewer>, StartError> {
    let builtin = match &config.review_rules {
        None => fleetbox_review::BuiltinReviewer::shipped(),
        Some(path) => {
            let why = |why: String| StartError::ReviewRules {
                path: path.clone(),
                why,
            };
            let text = std::fs::read_to_string(path).map_err(|e| why(e.to_string()))?;
            let rules = fleetbox_review::RuleSet::parse(&text).map_err(|e| why(e.to_string()))?;
            fleetbox_review::BuiltinReviewer::new(rules)
        }
    };
    if let Some(path) = &config.ca_cert {
        fleetbox_review::llm::ca_certificate(path).map_err(StartError::CaCert)?;
    }
    let reviewer: Arc<dyn fleetbox_review::Reviewer> = match config.llm.clone().map(|mut llm| {
        if llm.ca_cert.is_none() {
            llm.ca_cert = config.ca_cert.clone();
        }
        llm
    }) {
        None => Arc::new(builtin),
        // Its blocking HTTP client is made (and used) off the async threads.
        Some(llm) => {
            let path = PathBuf::from(&llm.url);
            let made = tokio::task::spawn_blocking(move || {
                fleetbox_review::llm::LlmReviewer::new(llm, builtin)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            Arc::new(made.map_err(|why| StartError::ReviewRules { path, why })?)
        }
    };
    Ok(reviewer)
}

/// The AI planner's templates, when it is on.
fn ai_templates(
    config: &ServerConfig,
) -> Result<Vec<(String, fleetbox_proto::JobSpec)>, StartError> {
    let ai_templates = match &config.ai_planner_templates {
        None => Vec::new(),
        Some(dir) => {
            if config.llm.is_none() {
                return Err(StartError::AiPlanner {
                    path: dir.clone(),
                    why: "the AI planner needs a model (`--llm-url` and `--llm-model`)".into(),
                });
            }
            planner::load_templates(dir).map_err(|why| StartError::Templates {
                path: dir.clone(),
                why,
            })?
        }
    };
    Ok(ai_templates)
}

/// Where MCP tool calls go: this coordinator's own API, with the caller's token.
/// `/mcp` served on `addr`, its tools calling the API on `calls` (plain HTTP: the listener
/// itself, or with TLS the loopback one).
fn mcp_mount(state: &State, addr: SocketAddr, calls: SocketAddr) -> api::McpMount {
    let ip = if calls.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        calls.ip()
    };
    api::McpMount {
        base: format!("http://{}", SocketAddr::new(ip, calls.port())),
        hosts: ["localhost".to_string(), "127.0.0.1".into(), "::1".into()]
            .into_iter()
            .chain([addr.ip().to_string()])
            .collect(),
        origins: state.config.mcp_origins.clone(),
    }
}

/// Listen on `addr`. A coordinator restarted on its old address may find it held for a moment
/// by what its killed predecessor left (a sandbox child between fork and exec): it retries
/// for a few seconds before giving up.
/// What to do about a bind error, when there is something to say.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there: stop it, or choose another address with `--listen`, \
             e.g. `--listen 127.0.0.1:8081`)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need privileges: choose another with `--listen`)"
        }
        _ => "",
    }
}

/// Listen on `addr`. An address still in use is tried again for a few seconds (a restarted
/// coordinator's old socket may linger), saying so once.
async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut said = false;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                if !said {
                    tracing::warn!(%addr, "address in use; trying again for 5 s");
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(source) => return Err(StartError::Bind { addr, source }),
        }
    }
}

/// The admin/enrollment token: the configured one, else the one saved in the data directory,
/// else a new one saved there (mode 0600). Only its hash goes to the database.
async fn bootstrap_token(
    store: &Store,
    config: &ServerConfig,
    kind: TokenKind,
) -> Result<String, StartError> {
    let (given, file) = match kind {
        TokenKind::Admin => (&config.admin_token, "admin.token"),
        _ => (&config.enroll_token, "enroll.token"),
    };
    let path = config.data_dir.join(file);
    let token = match given {
        Some(t) => t.trim().to_string(),
        None => match fs_err::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => {
                let t = ids::token(match kind {
                    TokenKind::Admin => "admin",
                    _ => "enroll",
                });
                write_secret(&path, &t).map_err(|source| StartError::DataDir {
                    path: path.clone(),
                    source,
                })?;
                t
            }
        },
    };
    store
        .add_token(&sha256_hex(token.as_bytes()), DEFAULT_TENANT, kind, None)
        .await?;
    Ok(token)
}

/// The coordinator's ed25519 key for audit checkpoints: its seed (hex) in `path`, mode 0600,
/// made on first start. Coordinators starting together on one shared file (a volume both
/// mount) end with the same key: the new file is written aside and linked into place only if
/// no other got there first, and then whichever is in place is read.
fn audit_key(path: &std::path::Path) -> std::io::Result<ed25519_dalek::SigningKey> {
    if !path.exists() {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag).map_err(|e| std::io::Error::other(e.to_string()))?;
        let aside = path.with_extension(format!("new-{}", hex::encode(tag)));
        write_secret(&aside, &hex::encode(seed))?;
        let linked = std::fs::hard_link(&aside, path);
        let _ = std::fs::remove_file(&aside);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    let text = fs_err::read_to_string(path)?;
    let seed = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a 32-byte hex ed25519 seed",
            )
        })?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

pub(crate) fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    /// Coordinators starting together on one shared key file all end with one key, whichever
    /// made it.
    #[test]
    fn coordinators_racing_to_make_the_audit_key_share_one() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.key");
            let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| super::audit_key(&path).unwrap().to_bytes()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]));
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "only the key is left");
        }
    }
}
