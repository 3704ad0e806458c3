//! The Fleetbox agent: enroll once, lease shards up to its slots, run each in the sandbox,
//! heartbeat, and deliver every report through a durable on-disk outbox.
//!
//! The agent holds nothing the coordinator cannot rebuild: its identity (state directory)
//! and reports not yet acknowledged (outbox). Everything else is leased and re-leasable.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]
#![warn(clippy::too_many_lines)]

mod code_cache;
mod facts;
mod files;
mod key;
mod metrics;
mod offload;
pub mod outbox;
pub use sessions::DEFAULT_MAX_SESSIONS;
mod review;
mod sessions;
mod tls;
pub use review::ReviewPolicy;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetbox_client::{Client, ClientError};
use fleetbox_proto::api::{
    AgentLoad, EnrollRequest, HeartbeatRequest, LeaseRequest, LeasedTask, ReportBatch,
    ReturnRequest, ShardReport,
};
use fleetbox_proto::{AppliedLimits, ByteSize, ExecutionReport, Limits, Millis, Status, env};
use fleetbox_sandbox::environment::{EnvConfig, Environments};
use fleetbox_sandbox::{Backend, Cancel, RunRequest, Sandbox, SandboxConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, watch};
use tracing::Instrument as _;

pub use facts::machine_facts;
pub use outbox::Outbox;

/// How often leftovers of earlier runs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How long one lease call waits on the coordinator for work.
const LEASE_WAIT_MS: u64 = 10_000;
/// Reports per delivery, at most.
const REPORT_BATCH: usize = 256;
/// Bytes of reports per delivery, at most (one larger report still goes alone): far under the
/// coordinator's 64 MiB body limit, so a backlog of big reports never makes an unsendable batch.
const REPORT_BATCH_BYTES: usize = 8 << 20;

/// The most a job may ask of this machine: larger requests are lowered to these, and what
/// cannot be lowered (the network) is refused unless allowed.
#[derive(Debug, Clone)]
pub struct LocalCaps {
    /// Caps `timeout` and `cpu_time`.
    pub max_timeout: Millis,
    pub max_memory: ByteSize,
    pub max_output: ByteSize,
    pub max_cpus: f64,
    pub max_processes: u32,
    pub max_file_size: ByteSize,
    pub max_open_files: u32,
    pub max_tmp_size: ByteSize,
    pub max_workspace_size: ByteSize,
    pub max_workspace_files: u64,
    pub max_listed_files: u32,
    pub max_hashed_bytes: ByteSize,
    /// Run jobs that ask for `limits.network = true` (off: such shards are `refused`).
    pub allow_network: bool,
    /// The operator's egress allow-list (`--allow-egress FILE`): a job's
    /// `network = { allow = [...] }` runs only when each of its rules is within it.
    pub allow_egress: Vec<fleetbox_proto::EgressRule>,
}

impl Default for LocalCaps {
    fn default() -> Self {
        LocalCaps {
            max_timeout: Millis::from_secs(3600),
            max_memory: ByteSize::mib(4096),
            max_output: ByteSize::mib(16),
            max_cpus: 64.0,
            max_processes: 1024,
            max_file_size: ByteSize::mib(1024),
            max_open_files: 4096,
            max_tmp_size: ByteSize::mib(1024),
            max_workspace_size: ByteSize::mib(4096),
            max_workspace_files: 1_000_000,
            max_listed_files: 10_000,
            max_hashed_bytes: ByteSize::mib(1024),
            allow_network: false,
            allow_egress: Vec::new(),
        }
    }
}

impl LocalCaps {
    /// The limits a shard runs with, or why it is not run at all.
    fn apply(&self, mut l: Limits) -> Result<Limits, String> {
        match &l.network {
            fleetbox_proto::Network::Host if !self.allow_network => {
                return Err(
                    "refused by agent policy: the job asks for `limits.network = true` \
                     and this agent was not started with `--allow-network`"
                        .into(),
                );
            }
            fleetbox_proto::Network::Allow(_) if self.allow_egress.is_empty() => {
                return Err(
                    "refused by agent policy: the job asks for `network = { allow = [...] }` \
                     and this agent allows no egress (`--allow-egress FILE`)"
                        .into(),
                );
            }
            fleetbox_proto::Network::Allow(rules) => {
                fleetbox_proto::egress::within(rules, &self.allow_egress).map_err(|rule| {
                    format!(
                        "refused by agent policy: `{rule}` is outside this agent's egress \
                         allow-list"
                    )
                })?;
            }
            _ => {}
        }
        l.timeout = l.timeout.min(self.max_timeout);
        l.cpu_time = l.cpu_time.min(self.max_timeout);
        l.memory = l.memory.min(self.max_memory);
        l.max_output = l.max_output.min(self.max_output);
        l.cpus = l.cpus.min(self.max_cpus);
        l.max_processes = l.max_processes.min(self.max_processes);
        l.max_file_size = l.max_file_size.min(self.max_file_size);
        l.max_open_files = l.max_open_files.min(self.max_open_files);
        l.tmp_size = l.tmp_size.min(self.max_tmp_size);
        l.workspace_size = l.workspace_size.min(self.max_workspace_size);
        l.workspace_files = l.workspace_files.min(self.max_workspace_files);
        l.max_listed_files = l.max_listed_files.min(self.max_listed_files);
        l.max_hashed_bytes = l.max_hashed_bytes.min(self.max_hashed_bytes);
        Ok(l)
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator base URL.
    pub server: String,
    /// Certificates trusted besides the system's for an `https://` coordinator (`--ca-cert`).
    pub trust: fleetbox_client::Trust,
    /// Enrollment token (used once; the agent token is kept in `state_dir`).
    pub token: String,
    pub name: String,
    pub labels: Vec<String>,
    pub slots: u32,
    pub backend: Backend,
    pub sandbox: SandboxConfig,
    /// Identity and outbox.
    pub state_dir: PathBuf,
    pub caps: LocalCaps,
    /// On shutdown, how long running shards may take before they are handed back.
    pub drain_timeout: Duration,
    /// Shards leased ahead of free slots, so the next one starts without waiting for a lease
    /// round trip.
    pub prefetch: u32,
    /// Make a new report-signing key at start and register it, signed with the old one.
    pub rotate_key: bool,
    /// The machine this agent runs on, as replicas are spread (`None`: `/etc/machine-id`).
    pub machine_id: Option<String>,
    /// Serve the agent's own `/metrics` here (`None`: not at all).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where and how the environments jobs ask for (`[environment]`) are built and cached.
    pub environments: EnvConfig,
    /// What this agent refuses to run after its own review of the code.
    pub review_policy: ReviewPolicy,
    /// Lease server-only shards and nothing else (the coordinator's own server agents).
    pub hardened_only: bool,
    /// Sessions held at most (each an interpreter kept between calls); 0: none.
    pub max_sessions: usize,
    /// Verification tests only (no flag sets it): the share of successful results this agent
    /// corrupts before signing them, as a lying agent would, on a regular schedule (at 0.02,
    /// every 50th).
    #[doc(hidden)]
    pub test_lie_rate: f64,
    /// Verification tests only: successful results reported honestly before the lying starts
    /// (a sleeper).
    #[doc(hidden)]
    pub test_lie_after: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("could not use the state directory `{}`: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator refused enrollment: {0}")]
    Enroll(#[source] ClientError),
    #[error("the coordinator refused the new key: {0}")]
    RotateKey(#[source] ClientError),
    #[error(
        "this host cannot run the `{backend}` sandbox: {why} (`fleetbox doctor --backend {backend}` lists what it lacks and how to fix it)"
    )]
    HostCannot { backend: Backend, why: String },
    #[error(
        "could not open the `{backend}` sandbox: {source} (`fleetbox doctor --backend {backend}` lists what this host lacks and how to fix it)"
    )]
    Sandbox {
        backend: Backend,
        #[source]
        source: fleetbox_sandbox::SandboxError,
    },
}

/// Who this agent is to one coordinator (kept in `state_dir/agent.json`, mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    server: String,
    agent_id: String,
    agent_token: String,
    #[serde(default)]
    heartbeat_ms: u64,
    /// The key registered at enrolment (hex); another key means enrolling again.
    #[serde(default)]
    public_key: String,
    /// The client certificate of a coordinator with `--agent-mtls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<tls::AgentCert>,
}

struct Running {
    lease_id: String,
    cancel: Option<Cancel>,
}

/// Cancel reasons; a run stopped for shutdown was handed back and is not reported.
const CANCEL_UNWANTED: &str =
    "the coordinator no longer wants this shard (job cancelled or shard settled elsewhere)";
const CANCEL_SHUTDOWN: &str = "the agent is shutting down; the shard was handed back";

struct Shared {
    config: AgentConfig,
    /// Signs every report when it is sent.
    key: ed25519_dalek::SigningKey,
    client: Mutex<Client>,
    agent_id: Mutex<String>,
    outbox: Outbox,
    running: Mutex<HashMap<String, Running>>,
    /// Woken when a slot frees up.
    slot_freed: Notify,
    /// Woken when a report lands in the outbox.
    report_ready: Notify,
    /// Finished runs whose reports are being written to the outbox.
    writing: AtomicUsize,
    /// One permit per slot: leased shards beyond the slots (prefetch) wait here.
    slots: Arc<Semaphore>,
    /// Set at shutdown: shards that have not started are handed back, not run.
    stopping: AtomicBool,
    /// Prefetched shards not started because of shutdown.
    unstarted: Mutex<Vec<String>>,
    /// Reports the coordinator refused for good, kept aside in the outbox (`*.refused`).
    set_aside: AtomicU64,
    /// Successful runs so far (for `test_lie_after`).
    ok_runs: Arc<AtomicU64>,
    /// The environments jobs ask for, built once each.
    environments: Arc<Environments>,
    /// The agent's own code review, by the hash of what it received.
    review: review::CodeReview,
    /// Programs received, which leases then name by hash alone.
    code: code_cache::CodeCache,
    /// What `/metrics` counts.
    counters: Arc<metrics::Counters>,
    /// The sessions whose interpreters this agent holds.
    sessions: Arc<sessions::Sessions>,
    /// The client certificate it presents (`--agent-mtls` coordinators).
    tls: Mutex<Option<tls::AgentCert>>,
}

impl Shared {
    fn client(&self) -> Client {
        self.client.lock().expect("client").clone()
    }

    /// Present `cert` from now on, and keep it with the identity.
    fn new_certificate(&self, cert: tls::AgentCert) {
        let path = self.config.state_dir.join("agent.json");
        let saved = fs_err::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Identity>(&b).ok());
        if let Some(mut id) = saved {
            id.tls = Some(cert.clone());
            if let Err(e) = save_identity(&path, &id) {
                tracing::error!(error = %e, "could not keep the new client certificate");
            }
        }
        let mut client = self.client.lock().expect("client");
        let trust = tls::trust_with(&self.config.trust, Some(&cert));
        *client = Client::trusting(&self.config.server, client.token(), &trust);
        *self.tls.lock().expect("tls") = Some(cert);
        tracing::info!("client certificate renewed");
    }

    /// Use the credential a heartbeat renewed from now on, and keep it with the identity (a
    /// restart picks it up; the old one ends a lease's length later).
    fn renew(&self, token: &str) {
        let path = self.config.state_dir.join("agent.json");
        let saved = fs_err::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Identity>(&b).ok());
        if let Some(mut id) = saved {
            id.agent_token = token.to_string();
            if let Err(e) = save_identity(&path, &id) {
                tracing::error!(error = %e, "could not keep the renewed credential; a restart enrols again");
            }
        }
        let mut client = self.client.lock().expect("client");
        *client = client.with_token(token);
        tracing::debug!("agent credential renewed");
    }

    fn busy(&self) -> u32 {
        self.running.lock().expect("running").len() as u32
    }
}

/// Run the agent until `shutdown` resolves, then drain: finish running shards (up to
/// `drain_timeout`), hand back the rest, and try once more to deliver the outbox.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let state_err = |path: PathBuf| move |source| AgentError::State { path, source };
    fs_err::create_dir_all(&config.state_dir).map_err(state_err(config.state_dir.clone()))?;
    let outbox_dir = config.state_dir.join("outbox");
    let outbox = Outbox::open(&outbox_dir).map_err(state_err(outbox_dir))?;
    fleetbox_sandbox::sweep_stale(&config.sandbox);
    // Refused at start, not shard by shard: every run would end in `sandbox_error`.
    if config.backend == Backend::Jail
        && let Err(e) = fleetbox_sandbox::jail::host_supports_jail()
    {
        return Err(AgentError::HostCannot {
            backend: config.backend,
            why: e.to_string(),
        });
    }
    let sandbox: Arc<dyn Sandbox> = Arc::from(
        fleetbox_sandbox::open(config.backend, config.sandbox.clone()).map_err(|source| {
            AgentError::Sandbox {
                backend: config.backend,
                source,
            }
        })?,
    );

    let environments = Environments::new(
        config.environments.clone(),
        sandbox.clone(),
        config.sandbox.python.clone(),
    );
    let key = key::load_or_make(&config.state_dir)
        .map_err(state_err(config.state_dir.join(key::FILE)))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut identity = tokio::select! {
        id = identity(&config, &key) => id?,
        _ = &mut shutdown => return Ok(()),
    };
    let key = if config.rotate_key {
        rotate_key(&config, &mut identity, key).await?
    } else {
        key
    };
    tracing::info!(agent = %identity.agent_id, server = %config.server, slots = config.slots,
        backend = %config.backend, "agent ready");
    let heartbeat = Duration::from_millis(identity.heartbeat_ms.max(100));
    let shared_slots = config.slots.max(1);
    let max_sessions = config.max_sessions;
    let shared = Arc::new(Shared {
        key,
        client: Mutex::new(Client::trusting(
            &config.server,
            &identity.agent_token,
            &tls::trust_with(&config.trust, identity.tls.as_ref()),
        )),
        tls: Mutex::new(identity.tls.clone()),
        review: review::CodeReview::shipped(config.review_policy.clone()),
        code: code_cache::CodeCache::default(),
        agent_id: Mutex::new(identity.agent_id.clone()),
        config,
        outbox,
        running: Mutex::new(HashMap::new()),
        slot_freed: Notify::new(),
        report_ready: Notify::new(),
        writing: AtomicUsize::new(0),
        slots: Arc::new(Semaphore::new(shared_slots as usize)),
        stopping: AtomicBool::new(false),
        unstarted: Mutex::new(Vec::new()),
        set_aside: AtomicU64::new(0),
        ok_runs: Arc::new(AtomicU64::new(0)),
        environments,
        counters: Arc::default(),
        sessions: Arc::new(sessions::Sessions::new(max_sessions)),
    });

    // Whatever this agent held when it last stopped uncleanly is not running any more: give
    // it back now rather than let it wait for the lease to expire.
    tokio::select! {
        _ = hand_back_lost_runs(&shared) => {}
        _ = &mut shutdown => return Ok(()),
    }
    let exporter = shared.config.metrics_listen.map(|addr| {
        let (shared, sandbox, stop) = (shared.clone(), sandbox.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, shared, sandbox, stop).await {
                tracing::error!(%addr, error = %e, "could not serve the agent's metrics");
            }
        })
    });
    let sender = tokio::spawn(deliver_loop(shared.clone(), stop_rx.clone()));
    let beat = tokio::spawn(heartbeat_loop(shared.clone(), heartbeat, stop_rx.clone()));
    let janitor = tokio::spawn(sweep_loop(shared.config.sandbox.clone(), stop_rx.clone()));
    tokio::select! {
        _ = lease_loop(shared.clone(), sandbox) => {}
        _ = &mut shutdown => {}
    }
    tracing::info!("agent stopping: no new leases");
    drain(&shared).await;
    let sessions = shared.sessions.clone();
    let _ = tokio::task::spawn_blocking(move || sessions.close_all()).await;
    let _ = stop_tx.send(true);
    let _ = beat.await;
    let _ = janitor.await;
    let _ = sender.await;
    if let Some(exporter) = exporter {
        let _ = exporter.await;
    }
    // A last delivery, retried briefly (a busy coordinator may answer 503 once); whatever is
    // left stays on disk for the next start.
    for attempt in 0..FINAL_DELIVERY_TRIES {
        match deliver_once(&shared).await {
            Ok(_) if shared.outbox.is_empty() => break,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, attempt, "last delivery before exit"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = shared.outbox.len();
    if left > 0 {
        tracing::warn!(left, "reports kept in the outbox for the next start");
    }
    Ok(())
}

/// Every minute, retry what an earlier cleanup could not remove (run directories moved to
/// the trash, leftovers of killed runs, their cgroups), off the runtime's threads.
async fn sweep_loop(sandbox: fleetbox_sandbox::SandboxConfig, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stop.changed() => return,
        }
        let config = sandbox.clone();
        let _ = tokio::task::spawn_blocking(move || fleetbox_sandbox::sweep_stale(&config)).await;
    }
}

/// Tell the coordinator this agent (re)started, keeping the leases whose reports are in the
/// outbox; retried until the coordinator answers.
async fn hand_back_lost_runs(shared: &Shared) {
    let keep: Vec<String> = match shared.outbox.pending(usize::MAX) {
        Ok(p) => p.into_iter().map(|p| p.report.lease_id).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the outbox; old leases will expire instead");
            return;
        }
    };
    let req = ReturnRequest {
        lease_ids: Vec::new(),
        restarted_keeping: Some(keep),
    };
    let mut backoff = Backoff::from(Duration::from_millis(200));
    loop {
        match shared.client().return_leases(&req).await {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "coordinator not reachable yet");
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// Replace the agent's key: register a new one signed with the old, then keep it.
async fn rotate_key(
    config: &AgentConfig,
    identity: &mut Identity,
    old: ed25519_dalek::SigningKey,
) -> Result<ed25519_dalek::SigningKey, AgentError> {
    let state_err = |source| AgentError::State {
        path: config.state_dir.join(key::FILE),
        source,
    };
    let new = key::fresh().map_err(state_err)?;
    let trust = tls::trust_with(&config.trust, identity.tls.as_ref());
    let client = Client::trusting(&config.server, &identity.agent_token, &trust);
    client
        .rotate_key(&key::rotation(&identity.agent_id, &old, &new))
        .await
        .map_err(AgentError::RotateKey)?;
    // Registered: from now on only the new key's signatures are accepted.
    key::save(&config.state_dir, &new).map_err(state_err)?;
    identity.public_key = key::public_hex(&new);
    let path = config.state_dir.join("agent.json");
    save_identity(&path, identity).map_err(|source| AgentError::State { path, source })?;
    tracing::info!(agent = %identity.agent_id, public_key = %identity.public_key, "report-signing key rotated");
    Ok(new)
}

/// Load the saved identity for this coordinator, or enroll (retrying while it is unreachable).
async fn identity(
    config: &AgentConfig,
    key: &ed25519_dalek::SigningKey,
) -> Result<Identity, AgentError> {
    let path = config.state_dir.join("agent.json");
    let public_key = key::public_hex(key);
    if let Ok(bytes) = fs_err::read(&path)
        && let Ok(id) = serde_json::from_slice::<Identity>(&bytes)
        && id.server == config.server
        && id.public_key == public_key
    {
        return Ok(id);
    }
    let client = Client::trusting(&config.server, &config.token, &config.trust);
    // Over HTTPS, a key for a client certificate: a coordinator with `--agent-mtls` signs it.
    let pending = if config.server.starts_with("https://") {
        Some(tls::request().map_err(|e| AgentError::State {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?)
    } else {
        None
    };
    let req = EnrollRequest {
        csr: pending.as_ref().map(|(_, csr)| csr.clone()),
        name: config.name.clone(),
        labels: config.labels.clone(),
        slots: config.slots,
        facts: machine_facts(
            config.backend,
            config.sandbox.python.as_deref(),
            config.machine_id.as_deref(),
        ),
        public_key: public_key.clone(),
    };
    let mut backoff = Backoff::from(Duration::from_millis(200));
    let resp = loop {
        match client.enroll(&req).await {
            Ok(r) => break r,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "enrollment: coordinator unavailable, retrying");
                tokio::time::sleep(backoff.next()).await;
            }
            Err(e) => return Err(AgentError::Enroll(e)),
        }
    };
    let tls = match (pending, resp.certificate) {
        (Some((key_pem, _)), Some(certificate)) => Some(tls::AgentCert {
            key_pem,
            certificate,
            obtained_at: now_ms(),
        }),
        _ => None,
    };
    let id = Identity {
        server: config.server.clone(),
        agent_id: resp.agent_id,
        agent_token: resp.agent_token,
        heartbeat_ms: resp.heartbeat_ms,
        public_key,
        tls,
    };
    save_identity(&path, &id).map_err(|source| AgentError::State { path, source })?;
    Ok(id)
}

fn save_identity(path: &std::path::Path, id: &Identity) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(id).map_err(std::io::Error::other)?;
    key::write_private(path, &json)
}

async fn lease_loop(shared: Arc<Shared>, sandbox: Arc<dyn Sandbox>) {
    let mut backoff = Backoff::from(Duration::from_millis(100));
    loop {
        let capacity = shared.config.slots + shared.config.prefetch;
        let free = capacity.saturating_sub(shared.busy());
        if free == 0 {
            shared.slot_freed.notified().await;
            continue;
        }
        let req = LeaseRequest {
            max_tasks: free,
            wait_ms: LEASE_WAIT_MS,
            backend: Some(shared.config.backend.as_str().to_string()),
            hardened_only: shared.config.hardened_only,
            cached_code: shared.code.hashes(),
            sessions: shared.sessions.keeps_any()
                && matches!(shared.config.backend, Backend::Jail | Backend::Process),
        };
        match shared.client().lease(&req).await {
            Ok(resp) => {
                backoff.reset();
                shared.counters.leased(resp.tasks.len());
                for task in resp.tasks {
                    start_task(&shared, &sandbox, task);
                }
            }
            // Unknown, or without the client certificate a coordinator with `--agent-mtls`
            // now asks for: enrol again.
            Err(e)
                if matches!(
                    e.code(),
                    Some("unauthorized" | "client_certificate_required")
                ) =>
            {
                tracing::error!(error = %e, "the coordinator no longer accepts this agent; re-enrolling");
                let _ = fs_err::remove_file(shared.config.state_dir.join("agent.json"));
                match identity(&shared.config, &shared.key).await {
                    Ok(id) => {
                        let trust = tls::trust_with(&shared.config.trust, id.tls.as_ref());
                        *shared.client.lock().expect("client") =
                            Client::trusting(&shared.config.server, &id.agent_token, &trust);
                        *shared.tls.lock().expect("tls") = id.tls;
                        *shared.agent_id.lock().expect("agent id") = id.agent_id;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "re-enrollment failed");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease failed; retrying");
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// Doubling waits between tries of a call to the coordinator: from the first wait up to
/// [`Backoff::MAX`], and back to the first after a success.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    first: Duration,
    next: Duration,
}

impl Backoff {
    const MAX: Duration = Duration::from_secs(5);

    fn from(first: Duration) -> Backoff {
        Backoff { first, next: first }
    }

    /// The wait before the next try; the one after is twice as long, up to [`Backoff::MAX`].
    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(Self::MAX);
        wait
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A shard's hold on the agent: its entry in `running` and, once it has one, its slot.
/// Dropping it frees both and wakes the lease loop, on every way out of a run.
struct SlotHold {
    shared: Arc<Shared>,
    lease_id: String,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        self.shared
            .running
            .lock()
            .expect("running")
            .remove(&self.lease_id);
        drop(self.permit.take());
        self.shared.slot_freed.notify_one();
    }
}

fn start_task(shared: &Arc<Shared>, sandbox: &Arc<dyn Sandbox>, task: LeasedTask) {
    let cancel = Cancel::new()
        .map_err(|e| tracing::warn!(error = %e, "no eventfd: this run cannot be cancelled"))
        .ok();
    shared.running.lock().expect("running").insert(
        task.lease_id.clone(),
        Running {
            lease_id: task.lease_id.clone(),
            cancel: cancel.clone(),
        },
    );
    let (span, traceparent) = run_span(&task);
    let run = run_task(shared.clone(), sandbox.clone(), task, cancel, traceparent);
    tokio::spawn(run.instrument(span));
}

/// The run's span, which joins the job's trace (the lease's `traceparent`), and the trace
/// context the report carries back, so the coordinator's span for it descends from this one.
fn run_span(task: &LeasedTask) -> (tracing::Span, Option<String>) {
    let parent = task
        .traceparent
        .as_deref()
        .and_then(fleetbox_proto::trace::TraceParent::parse);
    let span = tracing::info_span!("shard.run", job = %task.job_id, shard = task.shard_index,
        attempt = task.attempt, lease = %task.lease_id,
        trace_id = parent.as_ref().map_or("", |p| p.trace_id.as_str()));
    let traceparent = parent.map(|parent| {
        fleetbox_proto::trace::enter(&span, &parent);
        fleetbox_proto::trace::of_span(&span)
            .unwrap_or(parent)
            .header()
    });
    (span, traceparent)
}

/// One leased shard: a slot, this agent's own policy, the run, its report into the outbox.
async fn run_task(
    shared: Arc<Shared>,
    sandbox: Arc<dyn Sandbox>,
    mut task: LeasedTask,
    cancel: Option<Cancel>,
    traceparent: Option<String>,
) {
    let Some(hold) = take_slot(&shared, &task.lease_id).await else {
        return;
    };
    if let Err(why) = shared.code.resolve(&mut task) {
        return refuse(&shared, &task, why, hold);
    }
    let limits = match shared.config.caps.apply(task.limits.clone()).and_then(|l| {
        let declared = fleetbox_review::declared_by(&l.network);
        // The code cache checked the program against its hash just now.
        shared
            .review
            .judge_hashed(&task.code, &task.code_sha256, declared)
            .map(|()| l)
    }) {
        Ok(limits) => limits,
        Err(why) => return refuse(&shared, &task, why, hold),
    };
    let lease_id = task.lease_id.clone();
    let code = std::mem::take(&mut task.code);
    let (req, files_error) = request(&shared, &task, code, limits, cancel.clone());
    let execution = Execution {
        sandbox,
        outbox: shared.outbox.clone(),
        lie_rate: shared.config.test_lie_rate,
        lie_after: shared.config.test_lie_after,
        ok_runs: shared.ok_runs.clone(),
        cancel: cancel.clone(),
        lease_id: lease_id.clone(),
        task_id: task.task_id,
        attempt: task.attempt,
        environments: shared.environments.clone(),
        environment: task.environment,
        code_sha256: task.code_sha256,
        counters: shared.counters.clone(),
        traceparent,
        files_error,
        session: task.session.map(|s| (s, shared.sessions.clone())),
    };
    let (record, blobs) = match tokio::task::spawn_blocking(move || execution.run(req)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, lease = %lease_id, "sandbox thread failed; the lease will expire and the shard re-run");
            return;
        }
    };
    tracing::debug!(lease = %lease_id, status = record.report.status.as_str(), wall_ms = record.report.wall_ms, "shard ran");
    if cancel.as_ref().and_then(Cancel::reason).as_deref() == Some(CANCEL_SHUTDOWN) {
        // Handed back to the coordinator, which runs it elsewhere: nothing to report.
        return;
    }
    deliver(&shared, record, blobs, hold).await;
}

/// Wait for a slot (a prefetched shard waits for the one before it); `None` when the agent
/// is stopping, the shard then handed back unstarted.
async fn take_slot(shared: &Arc<Shared>, lease_id: &str) -> Option<SlotHold> {
    let permit = shared.slots.clone().acquire_owned().await;
    let mut hold = SlotHold {
        shared: shared.clone(),
        lease_id: lease_id.to_string(),
        permit: None,
    };
    if shared.stopping.load(Ordering::SeqCst) || permit.is_err() {
        shared
            .unstarted
            .lock()
            .expect("unstarted")
            .push(lease_id.to_string());
        return None;
    }
    hold.permit = permit.ok();
    Some(hold)
}

/// This agent's own policy refuses the shard: a signed `refused` report saying why.
fn refuse(shared: &Arc<Shared>, task: &LeasedTask, why: String, hold: SlotHold) {
    tracing::warn!(lease = %task.lease_id, job = %task.job_id, "{why}");
    let mut report = ExecutionReport::unmeasured(Status::Refused, None);
    report.exit_code = None;
    report.message = Some(why);
    report.limits = AppliedLimits::new(task.limits.clone());
    report.code_sha256 = task.code_sha256.clone();
    let mut record = ShardReport::new(task.lease_id.clone(), task.task_id, report);
    record.attempt = task.attempt;
    drop(hold);
    if let Err(e) = shared.outbox.put_with_blobs(&record, Vec::new()) {
        tracing::error!(error = %e, lease = %task.lease_id, "could not write the outbox");
    }
    shared.report_ready.notify_one();
}

/// The sandbox request for a shard, and why its files cannot be had (checked at submission;
/// a file that does not decode is the run's `sandbox_error`).
fn request(
    shared: &Shared,
    task: &LeasedTask,
    code: String,
    limits: fleetbox_proto::Limits,
    cancel: Option<Cancel>,
) -> (RunRequest, Option<String>) {
    let input = serde_json::to_vec(&task.input).unwrap_or_else(|_| b"null".to_vec());
    let mut req = RunRequest::new(code.into_bytes(), Some(input), limits);
    let files_error = match fleetbox_proto::job::decode_files(&task.files) {
        Ok(files) => {
            req.files = files;
            None
        }
        Err(e) => Some(format!("the job's files: {e}")),
    };
    req.runner_id = shared.agent_id.lock().expect("agent id").clone();
    req.cancel = cancel;
    req.env.extend([
        (
            env::FLEETBOX_SHARD_INDEX.to_string(),
            task.shard_index.to_string(),
        ),
        (
            env::FLEETBOX_SHARD_COUNT.to_string(),
            task.shard_count.to_string(),
        ),
        (env::FLEETBOX_JOB_ID.to_string(), task.job_id.clone()),
    ]);
    req.keep_workspace = true;
    (req, files_error)
}

/// What a run needs on the blocking thread it runs on.
struct Execution {
    sandbox: Arc<dyn Sandbox>,
    outbox: Outbox,
    lie_rate: f64,
    lie_after: u64,
    ok_runs: Arc<AtomicU64>,
    cancel: Option<Cancel>,
    lease_id: String,
    task_id: i64,
    attempt: u32,
    environments: Arc<Environments>,
    environment: Option<fleetbox_proto::EnvironmentSpec>,
    code_sha256: String,
    counters: Arc<metrics::Counters>,
    traceparent: Option<String>,
    files_error: Option<String>,
    /// A session call: run in the session's interpreter, not alone.
    session: Option<(fleetbox_proto::api::LeasedSession, Arc<sessions::Sessions>)>,
}

impl Execution {
    /// The run itself: alone in the sandbox, or a call in a session.
    fn sandboxed(&self, req: &RunRequest) -> ExecutionReport {
        match &self.session {
            Some((s, sessions)) => sessions.call(&*self.sandbox, s, req.clone()),
            None => self.sandbox.run(req),
        }
    }

    /// Run the shard (in its environment, when it has one) and make its report: the files it
    /// kept and the large parts, in the outbox's blob store.
    fn run(mut self, mut req: RunRequest) -> (ShardReport, Vec<String>) {
        let started = std::time::Instant::now();
        let mut report = match (self.files_error.take(), self.environment.take()) {
            (Some(why), _) => environment_failed(&req, None, &self.code_sha256, why),
            (None, None) => self.sandboxed(&req),
            (None, Some(spec)) => match spec
                .validate()
                .map_err(|e| e.to_string())
                .and_then(|()| self.environments.get(&spec).map_err(|e| e.to_string()))
            {
                Ok(held) => {
                    req.environment = Some(held.environment.clone());
                    let mut report = self.sandboxed(&req);
                    report.notes.push(held.note());
                    report
                }
                Err(why) => environment_failed(&req, Some(&spec), &self.code_sha256, why),
            },
        };
        self.counters.ran(
            report.status.as_str(),
            started.elapsed().as_secs_f64(),
            report.wall_ms as f64 / 1000.0,
        );
        // A run handed back at shutdown is not reported: its files are not kept either.
        let handed_back =
            self.cancel.as_ref().and_then(Cancel::reason).as_deref() == Some(CANCEL_SHUTDOWN);
        if self.lie_rate > 0.0 && report.status == Status::Ok {
            let n = self.ok_runs.fetch_add(1, Ordering::SeqCst);
            if n >= self.lie_after && lies_on(n - self.lie_after, self.lie_rate) {
                lie(&mut report);
            }
        }
        let mut blobs = files::collect(&mut report, &self.outbox, !handed_back);
        let mut record = ShardReport::new(self.lease_id, self.task_id, report);
        record.attempt = self.attempt;
        record.traceparent = self.traceparent;
        if !handed_back {
            blobs.extend(offload::offload(&mut record, &self.outbox));
        }
        (record, blobs)
    }
}

/// Into the outbox, and the sender woken. The slot is free as soon as the program ends: the
/// next lease overlaps with the outbox's fsync. A crash in between loses no data: the lease
/// expires and the shard re-runs.
async fn deliver(shared: &Arc<Shared>, record: ShardReport, blobs: Vec<String>, hold: SlotHold) {
    shared.writing.fetch_add(1, Ordering::SeqCst);
    drop(hold);
    if let Err(e) = shared.outbox.put_with_blobs(&record, blobs) {
        tracing::error!(error = %e, lease = %record.lease_id, "could not write the outbox; sending directly");
        let _ = shared
            .client()
            .report(&ReportBatch {
                reports: vec![record],
            })
            .await;
    }
    shared.writing.fetch_sub(1, Ordering::SeqCst);
    shared.report_ready.notify_one();
}

/// The report of a shard whose environment or files could not be had: a `sandbox_error`
/// (retried elsewhere, then `dead` with this message), with the environment's hash.
fn environment_failed(
    req: &RunRequest,
    spec: Option<&fleetbox_proto::EnvironmentSpec>,
    code_sha256: &str,
    why: String,
) -> ExecutionReport {
    let mut report = ExecutionReport::unmeasured(Status::SandboxError, None);
    report.exit_code = None;
    report.message = Some(why);
    report.limits = AppliedLimits::new(req.limits.clone());
    report.code_sha256 = code_sha256.to_string();
    report.runner.id = req.runner_id.clone();
    report.environment = spec.map(|spec| fleetbox_proto::EnvironmentInfo {
        hash: spec.hash(),
        packages: Vec::new(),
    });
    report
}

/// Whether a lying agent lies on its `n`-th lying-eligible success: on a regular schedule,
/// `rate` of them (at 2%, the 50th, 100th, …), so a verification test's outcome is the policy's
/// and not the luck of a draw. What a liar drawing at random gets away with, and how often, is
/// `fleetbox-bench trust`'s simulation of the same rules.
fn lies_on(n: u64, rate: f64) -> bool {
    ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
}

/// A lying agent's corruption of a result (verification tests): an integer is off by one, a
/// float off in its last digits (as another machine's rounding would be), anything else
/// replaced.
fn lie(report: &mut ExecutionReport) {
    report.output = Some(match report.output.take() {
        Some(serde_json::Value::Number(n)) if n.is_i64() => {
            serde_json::json!(n.as_i64().unwrap_or(0).wrapping_add(1))
        }
        Some(serde_json::Value::Number(n)) if n.is_f64() => {
            serde_json::json!(n.as_f64().unwrap_or(0.0) * (1.0 + 1e-12))
        }
        _ => serde_json::json!("a lie"),
    });
    report.output_sha256 = None;
}

async fn deliver_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::from(Duration::from_millis(100));
    loop {
        match deliver_once(&shared).await {
            Ok(0) => {
                backoff.reset();
                tokio::select! {
                    _ = shared.report_ready.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
            Ok(_) => backoff.reset(),
            Err(e) => {
                tracing::warn!(error = %e, outbox = shared.outbox.len(), "report delivery failed; kept in the outbox");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Send one batch from the outbox; returns how many were acknowledged.
async fn deliver_once(shared: &Shared) -> Result<usize, ClientError> {
    let batch = match shared.outbox.pending(REPORT_BATCH) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the outbox");
            return Ok(0);
        }
    };
    if batch.is_empty() {
        return Ok(0);
    }
    // Files first, so a report never names a file the coordinator does not have.
    let client = shared.client();
    for pending in &batch {
        for sha in &pending.uploads {
            match shared.outbox.blob(sha) {
                Ok(data) => {
                    client
                        .put_blob(sha, Some(&pending.report.lease_id), data)
                        .await?;
                }
                Err(e) => {
                    tracing::error!(error = %e, blob = %sha, "outbox blob missing; the report goes without it")
                }
            }
        }
    }
    let had_blobs = batch.iter().any(|p| !p.uploads.is_empty());
    let reports: Vec<ShardReport> = batch.into_iter().map(|p| p.report).collect();
    let (mut reports, oversized) = within_budget(reports, REPORT_BATCH_BYTES);
    // Signed as sent (not as stored): a report waiting in the outbox across a key rotation
    // goes with the current key.
    for r in &mut reports {
        r.sign(&shared.key);
    }
    for (lease, bytes) in oversized {
        let why = format!(
            "the report is {bytes} bytes of JSON, over the coordinator's {} MiB request limit",
            fleetbox_proto::api::MAX_REQUEST_BYTES >> 20
        );
        set_aside(shared, &lease, &why);
    }
    let delivered = send_reports(shared, &client, reports).await?;
    // Only after reports that carried files: collecting reads every waiting report.
    if had_blobs && let Err(e) = shared.outbox.collect_blobs() {
        tracing::warn!(error = %e, "could not clear delivered outbox blobs");
    }
    Ok(delivered)
}

/// The oldest reports whose JSON adds up to at most `budget` bytes (at least one), and the
/// leases of reports no request could carry (with their size).
fn within_budget(
    reports: Vec<ShardReport>,
    budget: usize,
) -> (Vec<ShardReport>, Vec<(String, usize)>) {
    let mut used = 0;
    let mut out = Vec::new();
    let mut oversized = Vec::new();
    for r in reports {
        let size = serde_json::to_vec(&r).map(|v| v.len()).unwrap_or(0);
        // A little under the limit: the batch's own JSON wraps the report.
        if size > fleetbox_proto::api::MAX_REQUEST_BYTES - 1024 {
            oversized.push((r.lease_id, size));
            continue;
        }
        if !out.is_empty() && used + size > budget {
            break;
        }
        used += size;
        out.push(r);
    }
    (out, oversized)
}

fn set_aside(shared: &Shared, lease: &str, why: &str) {
    tracing::error!(
        lease,
        reason = why,
        "report set aside in the outbox: the coordinator cannot take it"
    );
    shared.set_aside.fetch_add(1, Ordering::SeqCst);
    if let Err(io) = shared.outbox.set_aside(lease, why) {
        tracing::error!(error = %io, lease, "could not set a refused report aside");
    }
}

/// A refusal that sending the same batch again cannot change (too large, malformed), as
/// opposed to an outage or a credential an operator can fix.
fn refuses_the_batch(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. }
        if (400..500).contains(status) && !matches!(status, 401 | 403 | 408 | 429))
}

/// Post `reports` and clear what the coordinator acknowledged. A batch it refuses is split in
/// halves; a single report it refuses is set aside in the outbox (with the reason), so one bad
/// report never blocks the rest.
async fn send_reports(
    shared: &Shared,
    client: &Client,
    reports: Vec<ShardReport>,
) -> Result<usize, ClientError> {
    let mut queue = vec![reports];
    let mut delivered = 0;
    while let Some(reports) = queue.pop() {
        match client
            .report(&ReportBatch {
                reports: reports.clone(),
            })
            .await
        {
            Ok(ack) => {
                for r in &ack.results {
                    if r.outcome == "unknown" {
                        tracing::warn!(lease = %r.lease_id, "the coordinator does not know this lease; report dropped");
                    }
                    if let Err(e) = shared.outbox.remove(&r.lease_id) {
                        tracing::error!(error = %e, lease = %r.lease_id, "could not clear an outbox entry");
                    }
                }
                delivered += ack.results.len();
            }
            Err(e) if refuses_the_batch(&e) && reports.len() > 1 => {
                tracing::warn!(error = %e, reports = reports.len(), "batch refused; sending it in halves");
                let mut first = reports;
                let second = first.split_off(first.len() / 2);
                queue.push(second);
                queue.push(first);
            }
            Err(e) if refuses_the_batch(&e) => {
                set_aside(shared, &reports[0].lease_id, &e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(delivered)
}

async fn heartbeat_loop(shared: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    // The first heartbeat after a start carries the machine's facts (cores, memory, python).
    let mut facts = Some(machine_facts(
        shared.config.backend,
        shared.config.sandbox.python.as_deref(),
        shared.config.machine_id.as_deref(),
    ));
    loop {
        let mut running: Vec<String> = shared
            .running
            .lock()
            .expect("running")
            .values()
            .map(|r| r.lease_id.clone())
            .collect();
        // A finished shard whose report waits in the outbox still holds its lease: a backlog
        // of big reports must not let leases expire and shards re-run for nothing.
        let waiting = shared.outbox.lease_ids();
        let load_outbox = waiting.len() as u64;
        running.extend(waiting);
        running.truncate(1000);
        // Past half its life, the client certificate is renewed with a new key.
        let renewing = shared
            .tls
            .lock()
            .expect("tls")
            .as_ref()
            .filter(|c| c.due(now_ms()))
            .and_then(|_| tls::request().ok());
        let req = HeartbeatRequest {
            csr: renewing.as_ref().map(|(_, csr)| csr.clone()),
            running,
            load: AgentLoad {
                slots: shared.config.slots,
                busy: shared.busy(),
                loadavg: facts::loadavg(),
                outbox: load_outbox,
                set_aside: shared.set_aside.load(Ordering::SeqCst),
            },
            facts: facts.clone(),
            sessions: shared.sessions.ids(),
        };
        match shared.client().heartbeat(&req).await {
            Ok(resp) => {
                facts = None;
                if let Some(token) = &resp.renewed_token {
                    shared.renew(token);
                }
                if let (Some((key_pem, _)), Some(certificate)) = (renewing, resp.certificate) {
                    shared.new_certificate(tls::AgentCert {
                        key_pem,
                        certificate,
                        obtained_at: now_ms(),
                    });
                }
                // Sessions the coordinator ended, and those past their idle time or lifetime.
                let sessions = shared.sessions.clone();
                let close = resp.close_sessions;
                tokio::task::spawn_blocking(move || sessions.close(&close));
                let running = shared.running.lock().expect("running");
                // Leases of reports waiting in the outbox are listed too; only runs are stopped.
                for lease in resp.cancel {
                    if let Some(c) = running.get(&lease).and_then(|r| r.cancel.as_ref()) {
                        tracing::info!(lease = %lease, "coordinator no longer wants this shard: stopping it");
                        c.cancel(CANCEL_UNWANTED);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Milliseconds since the epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Tries of the last delivery at exit, 200 ms apart.
const FINAL_DELIVERY_TRIES: u32 = 5;

/// Wait for running shards up to the drain timeout; hand back what is still running.
async fn drain(shared: &Shared) {
    shared.stopping.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
    while (shared.busy() > 0 || shared.writing.load(Ordering::SeqCst) > 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::select! {
            _ = shared.slot_freed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let left: Vec<(String, Option<Cancel>)> = shared
        .running
        .lock()
        .expect("running")
        .iter()
        .map(|(k, r)| (k.clone(), r.cancel.clone()))
        .collect();
    let unstarted: Vec<String> = std::mem::take(&mut *shared.unstarted.lock().expect("unstarted"));
    if left.is_empty() && unstarted.is_empty() {
        return;
    }
    // Prefetched shards that never started are the normal case at shutdown; shards cut short
    // past the drain timeout are worth a warning.
    if left.is_empty() {
        tracing::info!(
            count = unstarted.len(),
            "handing back shards that had not started"
        );
    } else {
        tracing::warn!(
            running = left.len(),
            not_started = unstarted.len(),
            "handing back shards still running at shutdown"
        );
    }
    // Stop them first, so nothing keeps running once the coordinator has re-queued them.
    for (_, cancel) in left.iter() {
        if let Some(c) = cancel {
            c.cancel(CANCEL_SHUTDOWN);
        }
    }
    let stop_deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while shared.busy() > 0 && tokio::time::Instant::now() < stop_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lease_ids = left.into_iter().map(|(l, _)| l).chain(unstarted).collect();
    if let Err(e) = shared
        .client()
        .return_leases(&ReturnRequest {
            lease_ids,
            ..Default::default()
        })
        .await
    {
        tracing::warn!(error = %e, "could not hand back leases; they will expire on the coordinator");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_five_seconds_and_start_over_after_a_success() {
        let mut b = Backoff::from(Duration::from_millis(100));
        let waits: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }

    #[test]
    fn a_test_liar_lies_on_a_regular_schedule() {
        let at = |rate| -> Vec<u64> { (0..200).filter(|&n| lies_on(n, rate)).collect() };
        assert_eq!(at(0.02), [49, 99, 149, 199]);
        assert_eq!(at(0.10).len(), 20);
        assert_eq!(at(1.0).len(), 200);
        assert!(at(0.0).is_empty());
    }

    #[test]
    fn local_caps_lower_what_a_job_asks() {
        let caps = LocalCaps {
            max_timeout: Millis::from_secs(5),
            max_memory: ByteSize::mib(64),
            max_output: ByteSize::kib(8),
            max_processes: 8,
            max_tmp_size: ByteSize::mib(4),
            max_workspace_size: ByteSize::mib(32),
            ..LocalCaps::default()
        };
        let asked = Limits {
            timeout: Millis::from_secs(60),
            cpu_time: Millis::from_secs(60),
            memory: ByteSize::mib(1024),
            max_output: ByteSize::mib(1),
            max_processes: 500,
            tmp_size: ByteSize::mib(512),
            workspace_size: ByteSize::mib(8192),
            ..Limits::default()
        };
        let got = caps.apply(asked).unwrap();
        assert_eq!(got.timeout, Millis::from_secs(5));
        assert_eq!(got.cpu_time, Millis::from_secs(5));
        assert_eq!(got.memory, ByteSize::mib(64));
        assert_eq!(got.max_output, ByteSize::kib(8));
        assert_eq!(got.max_processes, 8);
        assert_eq!(got.tmp_size, ByteSize::mib(4));
        assert_eq!(got.workspace_size, ByteSize::mib(32));
        // Smaller requests are kept.
        let small = Limits {
            timeout: Millis(100),
            ..Limits::default()
        };
        assert_eq!(caps.apply(small).unwrap().timeout, Millis(100));
    }

    fn report(lease: &str, stdout_bytes: usize) -> ShardReport {
        let mut report = ExecutionReport::unmeasured(Status::Ok, None);
        report.stdout = "x".repeat(stdout_bytes);
        ShardReport::new(lease, 1, report)
    }

    #[test]
    fn batches_are_bounded_by_bytes_and_a_big_report_goes_alone() {
        let reports: Vec<_> = (0..6).map(|i| report(&format!("l{i}"), 3 << 20)).collect();
        let (first, _) = within_budget(reports.clone(), REPORT_BATCH_BYTES);
        assert_eq!(
            first.len(),
            2,
            "two 3 MiB reports fit in 8 MiB, three do not"
        );
        let huge = vec![report("big", 20 << 20), report("small", 10)];
        let (first, oversized) = within_budget(huge, REPORT_BATCH_BYTES);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].lease_id, "big");
        assert!(oversized.is_empty());
        let unsendable = vec![report("too big", 70 << 20), report("next", 10)];
        let (first, oversized) = within_budget(unsendable, REPORT_BATCH_BYTES);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].lease_id, "next");
        assert_eq!(oversized.len(), 1);
        assert_eq!(oversized[0].0, "too big");
    }

    #[test]
    fn only_refusals_that_cannot_change_set_reports_aside() {
        let api = |status| ClientError::Api {
            status,
            code: "x".into(),
            message: "x".into(),
            trace_id: "t".into(),
            field: None,
        };
        assert!(refuses_the_batch(&api(413)));
        assert!(refuses_the_batch(&api(422)));
        for status in [401, 403, 408, 429, 500, 503] {
            assert!(!refuses_the_batch(&api(status)), "{status}");
        }
    }

    #[test]
    fn the_network_is_refused_unless_allowed() {
        let asked = Limits {
            network: fleetbox_proto::Network::Host,
            ..Limits::default()
        };
        let why = LocalCaps::default().apply(asked.clone()).unwrap_err();
        assert!(why.contains("--allow-network"), "{why}");
        let allowed = LocalCaps {
            allow_network: true,
            ..LocalCaps::default()
        };
        assert!(allowed.apply(asked).unwrap().network.is_host());
    }

    #[test]
    fn named_hosts_run_only_within_the_operators_egress_list() {
        let rule = |s: &str| fleetbox_proto::EgressRule::parse(s).unwrap();
        let asking = |rules: &[&str]| Limits {
            network: fleetbox_proto::Network::Allow(rules.iter().map(|r| rule(r)).collect()),
            ..Limits::default()
        };
        // `--allow-network` alone allows the host's network, not an egress list.
        let host_only = LocalCaps {
            allow_network: true,
            ..LocalCaps::default()
        };
        let why = host_only.apply(asking(&["pypi.org"])).unwrap_err();
        assert!(why.contains("--allow-egress"), "{why}");
        let operator = LocalCaps {
            allow_egress: vec![rule("pypi.org:443"), rule("*.pythonhosted.org")],
            ..LocalCaps::default()
        };
        assert!(
            operator
                .apply(asking(&["pypi.org:443", "files.pythonhosted.org:443"]))
                .is_ok()
        );
        let why = operator
            .apply(asking(&["pypi.org:443", "evil.example.com"]))
            .unwrap_err();
        assert!(why.contains("`evil.example.com` is outside"), "{why}");
        // Any port is wider than the operator's one port.
        assert!(operator.apply(asking(&["pypi.org"])).is_err());
        // Neither list lets a job ask for the host's network.
        let why = operator
            .apply(Limits {
                network: fleetbox_proto::Network::Host,
                ..Limits::default()
            })
            .unwrap_err();
        assert!(why.contains("--allow-network"), "{why}");
    }
}
