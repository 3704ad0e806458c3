//! `fleetbox server`, `fleetbox agent` and `fleetbox up` (coordinator + local agents).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use fleetbox_agent::{AgentConfig, LocalCaps};
use fleetbox_proto::{ByteSize, Millis, env};
use fleetbox_sandbox::environment::{EnvConfig, Installer};
use fleetbox_sandbox::{Backend, SandboxConfig, SeccompMode};
use fleetbox_server::ServerConfig;

use crate::config::{AgentSection, FileConfig, RunFlags, resolve_run};
use crate::server_agents::ServerAgents;

/// How the environments jobs ask for (`[environment] requirements`) are built and cached.
#[derive(Debug, Clone, Args)]
pub struct EnvArgs {
    /// What builds environments: `auto` (a `uv` binary on PATH, else pip), `uv`, `pip`, or the
    /// path to a `uv` binary.
    #[arg(long, env = env::FLEETBOX_INSTALLER, default_value = "auto")]
    pub installer: String,
    /// Package index environments install from [default: the installer's, PyPI].
    #[arg(long, env = env::FLEETBOX_INDEX_URL)]
    pub index_url: Option<String>,
    /// A directory of wheels (a wheelhouse) environments may install from.
    #[arg(long)]
    pub find_links: Option<PathBuf>,
    /// Install only from `--find-links`, never from an index (air-gapped fleets).
    #[arg(long, requires = "find_links")]
    pub no_index: bool,
    /// Bytes the environment cache may hold; least recently used environments go first.
    #[arg(long, default_value = "10GiB", value_parser = crate::config::parse_size)]
    pub env_cache_size: ByteSize,
    /// How long building one environment may take.
    #[arg(long, default_value = "10m", value_parser = crate::config::parse_millis)]
    pub env_build_timeout: Millis,
}

impl Default for EnvArgs {
    fn default() -> Self {
        EnvArgs {
            installer: "auto".into(),
            index_url: None,
            find_links: None,
            no_index: false,
            env_cache_size: ByteSize::mib(10 << 10),
            env_build_timeout: Millis::from_secs(600),
        }
    }
}

impl EnvArgs {
    /// The cache at `root` with these settings.
    pub(crate) fn config(&self, root: PathBuf) -> anyhow::Result<EnvConfig> {
        let mut c = EnvConfig::new(root);
        c.installer = Installer::parse(&self.installer)
            .map_err(|e| anyhow::anyhow!("invalid `--installer`: {e}"))?;
        c.index_url = self.index_url.clone();
        c.find_links = match &self.find_links {
            Some(p) => Some(
                std::path::absolute(p)
                    .with_context(|| format!("invalid `--find-links` `{}`", p.display()))?,
            ),
            None => None,
        };
        c.no_index = self.no_index;
        c.max_bytes = self.env_cache_size.0;
        c.build_timeout = self.env_build_timeout.as_duration();
        Ok(c)
    }
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, env = env::FLEETBOX_LISTEN, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Data directory: SQLite database, blobs, bootstrap tokens.
    #[arg(long, env = env::FLEETBOX_DATA, default_value = "fleetbox-data")]
    pub data: PathBuf,
    /// `postgres://user:pass@host/db` to use PostgreSQL instead of SQLite.
    #[arg(long, env = env::FLEETBOX_DATABASE_URL)]
    pub database_url: Option<String>,
    /// An S3-compatible bucket for blobs, `s3://bucket/prefix`, which every coordinator on the
    /// database shares (`DATA/blobs` becomes its cache); credentials and region from
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`.
    #[arg(long, env = env::FLEETBOX_BLOB_STORE, value_name = "URL")]
    pub blob_store: Option<String>,
    /// The S3 endpoint when it is not AWS's (R2, Ceph RGW, SeaweedFS, Garage, ...).
    #[arg(long, env = env::AWS_ENDPOINT_URL, value_name = "URL", requires = "blob_store")]
    pub s3_endpoint: Option<String>,
    /// Lease length without a heartbeat.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_millis)]
    pub lease: Millis,
    /// Heartbeat interval asked of agents.
    #[arg(long, default_value = "2s", value_parser = crate::config::parse_millis)]
    pub heartbeat: Millis,
    /// Silence after which an agent is lost (default: 2.25 heartbeats).
    #[arg(long, value_parser = crate::config::parse_millis)]
    pub agent_timeout: Option<Millis>,
    /// How long an agent's credential lasts; heartbeats renew it past half its life, so a
    /// revoked or vanished agent is cut off within this.
    #[arg(long, default_value = "1h", value_parser = crate::config::parse_millis)]
    pub agent_credential_ttl: Millis,
    /// First retry delay (doubles per attempt, at most 1 minute).
    #[arg(long, default_value = "1s", value_parser = crate::config::parse_millis)]
    pub retry_backoff: Millis,
    /// How often the audit chain heads that moved are checkpointed, signed with the
    /// coordinator's key (`DATA/audit.key`).
    #[arg(long, default_value = "1m", value_parser = crate::config::parse_millis)]
    pub audit_checkpoint: Millis,
    /// Delete finished jobs (with their shards, attempts and the blobs nothing else names)
    /// and ended sessions this long after they ended, e.g. `30d`; the audit log keeps its
    /// entries. Default: keep everything.
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_millis)]
    pub retain: Option<Millis>,
    /// Keep each tenant's jobs, shards, attempts, flags, sessions, blob records and audit log
    /// in a PostgreSQL schema of its own (`fleetbox_tenant_NAME`), converting the database's
    /// rows the first time. The mode then belongs to the database: every coordinator on it
    /// keeps it, with this flag or without. PostgreSQL only.
    #[arg(long)]
    pub tenant_schemas: bool,
    /// The audit signing key (an ed25519 seed, hex; made when missing). Default
    /// `DATA/audit.key`; coordinators sharing a database may share one file.
    #[arg(long)]
    pub audit_key: Option<PathBuf>,
    /// Public keys (hex, one per line, `#` comments) whose checkpoints this coordinator
    /// believes besides its own: the other coordinators on its database (`fleetbox audit keys`
    /// prints each one's).
    #[arg(long)]
    pub audit_trusted_keys: Option<PathBuf>,
    /// Ship each checkpoint as it is made, beyond `DATA/audit-checkpoints.jsonl`:
    /// `file:PATH` (JSON lines appended), `exec:COMMAND` (`sh -c`, the JSON line on stdin) or
    /// an http(s) URL (`POST`ed). Repeatable.
    #[arg(long, value_parser = fleetbox_server::custody::Sink::parse)]
    pub audit_ship: Vec<fleetbox_server::custody::Sink>,
    /// Server re-checks of agents' results run at once (default: half the cores).
    #[arg(long)]
    pub check_workers: Option<usize>,
    /// In-process agents that run code the review decides `run_on_server_only` (and nothing
    /// else) in this coordinator's sandbox, under its re-check limits; 0 leaves such code to
    /// agents an operator marks (`fleetbox agents harden ID`). None on the `process` backend.
    #[arg(long, default_value_t = 1)]
    pub server_agents: u32,
    /// Invalid results after which an agent is quarantined until an admin releases it.
    #[arg(long, default_value_t = 2)]
    pub quarantine_strikes: u32,
    /// `recheck = "adaptive"`: valid results in a row (per agent, interpreter and backend)
    /// after which an agent's results are only sampled (2%); until then each is re-run here.
    /// Doubled for each strike on the agent's record.
    #[arg(long, default_value_t = fleetbox_server::store::verify::TRUSTED_AFTER as u32)]
    pub trusted_after: u32,
    /// Use this admin token (default: generated once, kept in `DATA/admin.token`).
    #[arg(long, env = env::FLEETBOX_ADMIN_TOKEN, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Use this enrollment token (default: generated once, kept in `DATA/enroll.token`).
    #[arg(long, env = env::FLEETBOX_ENROLL_TOKEN, hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Sandbox backend for server-side runs (the `python` reducer, re-checks): `jail`, `docker`
    /// (with `--docker-runtime runsc` for gVisor) or `process`. `process` runs untrusted code
    /// beside the coordinator's keys and database: only this flag chooses it (the coordinator
    /// refuses to start on a fallback), and `/readyz`, the metrics and every re-check say so.
    #[arg(long, alias = "recheck-backend")]
    pub backend: Option<String>,
    #[command(flatten)]
    pub docker: DockerArgs,
    /// Serve the Model Context Protocol at `/mcp` (Streamable HTTP; admin bearer token).
    #[arg(long)]
    pub mcp: bool,
    /// An `Origin` allowed to call `/mcp` (repeatable; requests with any other are refused).
    #[arg(long = "mcp-allow-origin", value_name = "ORIGIN")]
    pub mcp_origins: Vec<String>,
    /// The code review's rules (default: the shipped `resources/review/rules.toml`).
    #[arg(long, value_name = "FILE")]
    pub review_rules: Option<PathBuf>,
    /// An OpenAI-compatible API (e.g. `http://127.0.0.1:11434/v1`) whose model reviews code on
    /// top of the rules: it can raise a program's risk, never lower it.
    #[arg(long, value_name = "URL", requires = "llm_model")]
    pub llm_url: Option<String>,
    /// The model to ask.
    #[arg(long, value_name = "NAME")]
    pub llm_model: Option<String>,
    /// The environment variable holding the API key, if the endpoint needs one.
    #[arg(long, value_name = "VAR")]
    pub llm_key_env: Option<String>,
    /// How long a review may wait for the model (then the rules alone decide).
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_millis)]
    pub llm_timeout: Millis,
    /// How many points the model may lower the rules' risk by (0, the default: it may only
    /// raise it). Also `[review] llm_max_lowering` in `fleetbox.toml`.
    #[arg(long, value_name = "POINTS")]
    pub llm_max_lowering: Option<u32>,
    /// A CA certificate (PEM) to trust besides the system's for outgoing HTTPS (the model,
    /// `notify` webhooks): for endpoints behind a private CA.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub env: EnvArgs,
    #[command(flatten)]
    pub followups: FollowupArgs,
}

/// HTTPS on the coordinator's listener.
#[derive(Debug, Args, Clone, Default)]
pub struct TlsArgs {
    /// `auto`: make a private CA and a certificate in `DATA/tls/` (clients trust
    /// `DATA/tls/ca.pem` with `--ca-cert`); `off`: plain HTTP. Default: on with `--tls-cert`,
    /// and under `fleetbox up` when listening beyond loopback.
    #[arg(long, value_name = "auto|off", value_parser = ["auto", "off"])]
    pub tls: Option<String>,
    /// The certificate chain to serve (PEM); re-read when it changes.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "tls"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Another name (or address) `--tls auto`'s certificate is for; repeatable.
    #[arg(long, value_name = "NAME")]
    pub tls_name: Vec<String>,
    /// Agents must present a client certificate signed by the coordinator's CA
    /// (`DATA/tls/`), issued at enrolment; revoking an agent (`fleetbox agents revoke`) puts
    /// its certificates on the CRL. Needs TLS.
    #[arg(long)]
    pub agent_mtls: bool,
}

impl TlsArgs {
    /// The setting, with `beyond_loopback` turning `auto` on when nothing was said.
    pub fn setting(&self, auto_by_default: bool) -> Option<fleetbox_server::tls::TlsSetting> {
        use fleetbox_server::tls::TlsSetting;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return Some(TlsSetting::Files {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        match self.tls.as_deref() {
            Some("off") => None,
            Some(_) => Some(TlsSetting::Auto {
                names: self.tls_name.clone(),
            }),
            None if auto_by_default => Some(TlsSetting::Auto {
                names: self.tls_name.clone(),
            }),
            None => None,
        }
    }
}

/// Follow-up rules (`[[followup]]`): on or off, and the caps on what they start.
#[derive(Debug, Clone, Args)]
pub struct FollowupArgs {
    /// Evaluate jobs' follow-up rules (`0`/`false`: record them as switched off;
    /// `DEMO_FOLLOWUP_ENABLED=0` does the same).
    #[arg(long, env = env::FLEETBOX_FOLLOWUPS, default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub followups: bool,
    /// The deepest a chain of follow-ups may grow (the submitted job is depth 0).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub followup_max_depth: u32,
    /// Most jobs one chain may hold, its root included.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub followup_chain_budget: u64,
    /// Most follow-up jobs a tenant gets per minute.
    #[arg(long, default_value_t = 120, value_name = "N")]
    pub followup_rate: u64,
    /// Tries of a `notify` webhook before it is given up (and flagged).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub notify_tries: u32,
    /// First retry delay of a webhook; doubles per try, with jitter.
    #[arg(long, default_value = "1s", value_parser = crate::config::parse_millis)]
    pub notify_backoff: Millis,
    /// A host name, address or range (`10.0.0.0/8`) webhooks may reach though it is not
    /// public (loopback, private, link-local and this host's own addresses are refused
    /// otherwise). Repeatable.
    #[arg(long, value_name = "HOST|ADDR|CIDR", value_parser = fleetbox_server::planner::guard::Allowed::parse)]
    pub notify_allow: Vec<fleetbox_server::planner::guard::Allowed>,
    /// What result review's anomalies (an outlying shard or agent, an error spike) do to a
    /// job: `flag` (accept, flagged and queued), `review` (`needs_review` until a person
    /// decides), `rerun` (run the flagged shards again at once, checked by the server).
    #[arg(long, default_value = "flag", value_parser = |s: &str| s.parse::<fleetbox_server::AnomalyAction>())]
    pub anomalies: fleetbox_server::AnomalyAction,
    /// The AI planner: a directory of job spec templates (`*.toml`) the model (`--llm-url`)
    /// may pick a follow-up from for jobs with `ai_followup = true`. Off without it.
    #[arg(long, value_name = "DIR", requires = "llm_url")]
    pub ai_planner_templates: Option<PathBuf>,
}

impl Default for FollowupArgs {
    fn default() -> Self {
        let d = fleetbox_server::planner::PlannerConfig::default();
        FollowupArgs {
            followups: std::env::var(env::FLEETBOX_FOLLOWUPS)
                .map(|v| {
                    !matches!(
                        v.trim().to_ascii_lowercase().as_str(),
                        "0" | "false" | "no" | "off"
                    )
                })
                .unwrap_or(true),
            followup_max_depth: d.max_depth,
            followup_chain_budget: d.chain_budget,
            followup_rate: d.rate_per_minute,
            notify_tries: d.notify_tries,
            notify_backoff: Millis(d.notify_backoff_ms),
            notify_allow: Vec::new(),
            ai_planner_templates: None,
            anomalies: fleetbox_server::AnomalyAction::Flag,
        }
    }
}

impl FollowupArgs {
    pub fn config(&self) -> fleetbox_server::planner::PlannerConfig {
        // The seed's switch: `DEMO_FOLLOWUP_ENABLED=0` turns follow-ups off as well.
        let demo_off = std::env::var(env::DEMO_FOLLOWUP_ENABLED).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "no" | "off"
            )
        });
        fleetbox_server::planner::PlannerConfig {
            enabled: self.followups && !demo_off,
            max_depth: self
                .followup_max_depth
                .clamp(1, fleetbox_proto::followup::MAX_DEPTH),
            chain_budget: self.followup_chain_budget.max(1),
            rate_per_minute: self.followup_rate.max(1),
            notify_tries: self.notify_tries.max(1),
            notify_backoff_ms: self.notify_backoff.0.max(1),
            notify_allow: self.notify_allow.clone(),
        }
    }
}

/// What an agent lets jobs reach over the network (`fleetbox agent`, and `fleetbox up`'s
/// local agents).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NetworkArgs {
    /// Run jobs that ask for `limits.network = true`; without it they are `refused`.
    #[arg(long, env = env::FLEETBOX_ALLOW_NETWORK)]
    pub allow_network: bool,
    /// The hosts jobs may name in `network = { allow = [...] }` (`jail` backend), a file of
    /// rules, one per line (`pypi.org:443`, `*.pythonhosted.org`, `#` comments); a job asking
    /// for more is `refused`.
    #[arg(long, value_name = "FILE")]
    pub allow_egress: Option<PathBuf>,
    /// A hosts file (`ADDRESS NAME...`) the egress proxy resolves from before the system
    /// resolver: pinned names for a mirror.
    #[arg(long, value_name = "FILE")]
    pub egress_hosts: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    /// Coordinator URL.
    #[arg(long, env = env::FLEETBOX_SERVER, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// A CA certificate (PEM) to trust besides the system's for an `https://` coordinator
    /// (`DATA/tls/ca.pem` of one started with `--tls auto`).
    #[arg(long, env = env::FLEETBOX_CA_CERT, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Enrollment token (or the admin token).
    #[arg(long, env = env::FLEETBOX_TOKEN, hide_env_values = true, required = true)]
    pub token: Option<String>,
    /// Shards run at once.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// Sandbox backend (`jail` where the host supports it, else `process`; or `docker`).
    #[arg(long, env = env::SANDBOX_TYPE)]
    pub backend: Option<String>,
    #[command(flatten)]
    pub docker: DockerArgs,
    /// Name shown on the coordinator (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Comma-separated labels.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Identity and outbox directory.
    #[arg(long, env = env::FLEETBOX_AGENT_STATE, default_value = "fleetbox-agent")]
    pub state: PathBuf,
    /// Cap on the wall-clock and CPU time a job may ask for [default: 1h, or `[agent]`].
    #[arg(long, value_parser = crate::config::parse_millis)]
    pub max_timeout: Option<Millis>,
    /// Cap on the memory a job may ask for [default: 4GiB].
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_memory: Option<ByteSize>,
    /// Cap on the output a job may keep per stream [default: 16MiB].
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_output: Option<ByteSize>,
    /// Cap on the processes and threads a job may ask for [default: 1024].
    #[arg(long)]
    pub max_processes: Option<u32>,
    /// Cap on the largest file a job may write [default: 1GiB].
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_file_size: Option<ByteSize>,
    /// Cap on the open files a job may ask for [default: 4096].
    #[arg(long)]
    pub max_open_files: Option<u32>,
    /// Cap on the private `/tmp` a job may ask for [default: 1GiB].
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_tmp_size: Option<ByteSize>,
    /// Cap on the workspace a job may ask for [default: 4GiB].
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_workspace_size: Option<ByteSize>,
    /// Cap on the files a job's workspace may hold [default: 1000000].
    #[arg(long)]
    pub max_workspace_files: Option<u64>,
    /// Cap on the CPU cores a job may ask for [default: 64].
    #[arg(long)]
    pub max_cpus: Option<f64>,
    /// Cap on the files a report lists from a job's workspace [default: 10000].
    #[arg(long)]
    pub max_listed_files: Option<u32>,
    /// Cap on the bytes of workspace files hashed for a report [default: 1GiB].
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_hashed_bytes: Option<ByteSize>,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// This agent runs in a stricter sandbox (gVisor, say) and accepts code its review decides
    /// `run_on_server_only` or `hold`; the coordinator gives it such code only once an operator
    /// marks it (`fleetbox agents harden ID`).
    #[arg(long)]
    pub hardened: bool,
    /// What this agent refuses after its own review of the code, a TOML file:
    /// `refuse = ["reject", "hold", "run_on_server_only"]` [default: `reject`, and `hold` and
    /// `run_on_server_only` unless `--hardened`].
    #[arg(long)]
    pub review_policy: Option<PathBuf>,
    /// On SIGTERM, how long running shards may finish before they are handed back.
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_millis)]
    pub drain_timeout: Millis,
    /// Shards leased ahead of free slots, so the next starts without a lease round trip.
    #[arg(long, default_value_t = 1)]
    pub prefetch: u32,
    /// Sessions held at most (`/v1/sessions`: an interpreter kept between calls, each within
    /// its session's memory limit); 0 keeps none. The jail and process backends keep them.
    #[arg(long, default_value_t = fleetbox_agent::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// Make a new report-signing key (`STATE/agent.key`) and register it with the
    /// coordinator, signed with the old one; then run as usual.
    #[arg(long)]
    pub rotate_key: bool,
    /// The machine this agent runs on, for spreading a shard's replicas over machines
    /// (default: `/etc/machine-id`).
    #[arg(long)]
    pub machine_id: Option<String>,
    /// Serve the agent's own Prometheus metrics (slots, warm sandboxes, outbox, sandbox
    /// overhead) at `http://ADDR/metrics`; port 0 picks one and writes it to
    /// `STATE/metrics.addr`. Off unless given.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `jail` only: jails kept built ahead of the shards, each with the interpreter started and
    /// waiting for its program (default: one per slot; 0 starts every shard cold).
    #[arg(long, env = env::FLEETBOX_WARM)]
    pub warm: Option<u32>,
    /// The jail's seccomp policy: `deny` (everything but the deny list) or `allow` (only the
    /// measured allow-list; every other call denied and reported).
    #[arg(long, env = env::FLEETBOX_SECCOMP, default_value = "deny")]
    pub seccomp: SeccompMode,
    #[command(flatten)]
    pub env: EnvArgs,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Local agents to start.
    #[arg(long, default_value_t = 2)]
    pub agents: u32,
    /// Slots per local agent.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    #[arg(long, env = env::FLEETBOX_DATA, default_value = "fleetbox-data")]
    pub data: PathBuf,
    #[arg(long, env = env::FLEETBOX_LISTEN, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Sandbox backend of the local agents and the server.
    #[arg(long, env = env::SANDBOX_TYPE)]
    pub backend: Option<String>,
    #[command(flatten)]
    pub docker: DockerArgs,
    /// What the local agents let jobs reach (as `fleetbox agent`'s flags).
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Delete finished jobs and ended sessions this long after they ended (as
    /// `fleetbox server --retain`). Default: keep everything.
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_millis)]
    pub retain: Option<Millis>,
    /// HTTPS (`--tls auto` is the default when `--listen` is beyond loopback).
    #[command(flatten)]
    pub tls: TlsArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The `docker` backend's settings (the seed's variables), for every command that runs code.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DockerArgs {
    /// `docker` backend: the image runs use (`fleetbox image build` makes one from this host's
    /// Python). Default `python:3.11-slim`.
    #[arg(long, env = env::DOCKER_IMAGE)]
    pub docker_image: Option<String>,
    /// `docker` backend: the OCI runtime, e.g. `runsc` for gVisor (default: the daemon's).
    #[arg(long, env = env::DOCKER_RUNTIME)]
    pub docker_runtime: Option<String>,
}

/// Resolve the sandbox for this host from `fleetbox.toml`, the environment and `--backend`.
fn sandbox_settings(
    config: Option<&Path>,
    backend: Option<String>,
    docker: &DockerArgs,
) -> anyhow::Result<(Backend, SandboxConfig)> {
    let file = FileConfig::load(config)?;
    let s = resolve_run(
        &file,
        RunFlags {
            backend,
            docker_image: docker.docker_image.clone(),
            docker_runtime: docker.docker_runtime.clone(),
            ..Default::default()
        },
    )?;
    let backend: Backend = s
        .backend
        .parse()
        .context("invalid `--backend` / `SANDBOX_TYPE`")?;
    Ok((
        backend,
        SandboxConfig {
            python: s.python,
            work_root: s.work_root,
            use_cgroups: s.use_cgroups,
            jail_helper: None,
            warm: 0,
            seccomp: SeccompMode::Deny,
            docker: s.docker,
            cgroup_root: s.cgroup_root,
            trace: s.trace,
            egress_hosts: None,
        },
    ))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn server_config(
    args: &ServerArgs,
    backend: Backend,
    sandbox: SandboxConfig,
) -> anyhow::Result<ServerConfig> {
    let mut c = ServerConfig::new(args.listen, args.data.clone());
    c.environments = args.env.config(args.data.join("envs"))?;
    c.mcp = args.mcp;
    c.mcp_origins = args.mcp_origins.clone();
    c.review_rules = args.review_rules.clone();
    c.ca_cert = args.ca_cert.clone();
    c.tls = args.tls.setting(false);
    c.blob_store = args.blob_store.as_ref().map(|url| {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        fleetbox_server::blobs::BlobStoreConfig {
            url: url.clone(),
            endpoint: args.s3_endpoint.clone(),
            region: var(env::AWS_REGION).or_else(|| var(env::AWS_DEFAULT_REGION)),
            access_key_id: var(env::AWS_ACCESS_KEY_ID),
            secret_access_key: var(env::AWS_SECRET_ACCESS_KEY),
        }
    });
    c.agent_mtls = args.tls.agent_mtls;
    c.planner = args.followups.config();
    c.ai_planner_templates = args.followups.ai_planner_templates.clone();
    c.anomalies = args.followups.anomalies;
    if let (Some(url), Some(model)) = (&args.llm_url, &args.llm_model) {
        let mut llm = fleetbox_review::llm::LlmConfig::new(url.clone(), model.clone());
        llm.timeout = args.llm_timeout.as_duration();
        llm.max_lowering = args.llm_max_lowering.unwrap_or(0).min(100);
        llm.may_lower = llm.max_lowering > 0;
        if let Some(var) = &args.llm_key_env {
            llm.api_key = Some(
                std::env::var(var)
                    .with_context(|| format!("`--llm-key-env {var}`: the variable is not set"))?,
            );
        }
        c.llm = Some(llm);
    }
    c.database_url = args.database_url.clone();
    c.lease_ms = args.lease.0.max(100);
    c.heartbeat_ms = args.heartbeat.0.max(50);
    c.agent_credential_ms = args.agent_credential_ttl.0.max(1000);
    c.agent_timeout_ms = args
        .agent_timeout
        .map(|t| t.0)
        .unwrap_or(c.heartbeat_ms * 2 + c.heartbeat_ms / 4);
    c.retry_backoff_ms = args.retry_backoff.0;
    c.audit_checkpoint_ms = args.audit_checkpoint.0.max(100);
    c.retain_ms = args.retain.map(|r| r.0.max(60_000));
    c.tenant_schemas = args.tenant_schemas;
    c.audit_key = args.audit_key.clone();
    c.audit_trusted_keys = args.audit_trusted_keys.clone();
    c.audit_ship = args.audit_ship.clone();
    if let Some(n) = args.check_workers {
        c.check_workers = n.clamp(1, 256);
    }
    c.quarantine_strikes = args.quarantine_strikes.max(1);
    c.trusted_after = args.trusted_after.max(1);
    c.admin_token = args.admin_token.clone();
    c.enroll_token = args.enroll_token.clone();
    c.sandbox_backend = backend;
    // Only the server's own flag chooses `process` for it: a default that fell back (no jail on
    // this host) or `SANDBOX_TYPE=local` in the environment do not.
    c.weak_sandbox_allowed = backend == Backend::Process && args.backend.is_some();
    c.sandbox = sandbox;
    // The coordinator's own sandbox (the python reducer, later rechecks) is the strictest.
    c.sandbox.seccomp = SeccompMode::Allow;
    Ok(c)
}

pub fn server(config: Option<&Path>, mut args: ServerArgs) -> anyhow::Result<ExitCode> {
    let (backend, sandbox) = sandbox_settings(config, args.backend.clone(), &args.docker)?;
    args.llm_max_lowering = args
        .llm_max_lowering
        .or(FileConfig::load(config)?.review.llm_max_lowering);
    let cfg = server_config(&args, backend, sandbox.clone())?;
    runtime()?.block_on(async move {
        let running = fleetbox_server::start(cfg).await?;
        println!("fleetbox: coordinator listening on {}", running.url());
        let (stop_agents, stop_rx) = tokio::sync::watch::channel(false);
        let server_agents = ServerAgents {
            url: running.local_url(),
            own_token: running.own_enroll_token.clone(),
            data: &args.data,
            count: args.server_agents,
            backend,
            sandbox,
        }
        .spawn(&stop_rx)?;
        if !server_agents.is_empty() {
            println!("{}", ServerAgents::started(server_agents.len(), backend));
        }
        println!(
            "fleetbox: admin token in `{}`",
            args.data.join("admin.token").display()
        );
        println!(
            "fleetbox: audit checkpoints signed with ed25519 key {} (pin it outside the database)",
            running.state.custody.public_key()
        );
        let stop = running.shutdown_handle();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        let served = running.wait().await.context("serving the API");
        let _ = stop_agents.send(true);
        for a in server_agents {
            let _ = a.await;
        }
        served?;
        eprintln!("fleetbox: coordinator stopped");
        Ok(ExitCode::SUCCESS)
    })
}

fn agent_config(
    args: AgentArgs,
    file: &AgentSection,
    backend: Backend,
    mut sandbox: SandboxConfig,
) -> anyhow::Result<AgentConfig> {
    // Defaults < `[agent]` in fleetbox.toml < flags.
    let d = LocalCaps::default();
    let caps = LocalCaps {
        max_timeout: args
            .max_timeout
            .or(file.max_timeout)
            .unwrap_or(d.max_timeout),
        max_memory: args.max_memory.or(file.max_memory).unwrap_or(d.max_memory),
        max_output: args.max_output.or(file.max_output).unwrap_or(d.max_output),
        max_cpus: args.max_cpus.or(file.max_cpus).unwrap_or(d.max_cpus),
        max_processes: args
            .max_processes
            .or(file.max_processes)
            .unwrap_or(d.max_processes),
        max_file_size: args
            .max_file_size
            .or(file.max_file_size)
            .unwrap_or(d.max_file_size),
        max_open_files: args
            .max_open_files
            .or(file.max_open_files)
            .unwrap_or(d.max_open_files),
        max_tmp_size: args
            .max_tmp_size
            .or(file.max_tmp_size)
            .unwrap_or(d.max_tmp_size),
        max_workspace_size: args
            .max_workspace_size
            .or(file.max_workspace_size)
            .unwrap_or(d.max_workspace_size),
        max_workspace_files: args
            .max_workspace_files
            .or(file.max_workspace_files)
            .unwrap_or(d.max_workspace_files),
        max_listed_files: args
            .max_listed_files
            .or(file.max_listed_files)
            .unwrap_or(d.max_listed_files),
        max_hashed_bytes: args
            .max_hashed_bytes
            .or(file.max_hashed_bytes)
            .unwrap_or(d.max_hashed_bytes),
        allow_network: args.network.allow_network || file.allow_network.unwrap_or(false),
        allow_egress: match &args.network.allow_egress {
            Some(path) => egress_rules(path)?,
            None => Vec::new(),
        },
    };
    if !caps.allow_egress.is_empty() && backend != Backend::Jail {
        anyhow::bail!(
            "`--allow-egress` needs `--backend jail`: only the jail keeps runs in their own network namespace with the egress proxy as the one way out"
        );
    }
    if let Some(hosts) = &args.network.egress_hosts {
        // Read now, so a broken file stops the agent rather than failing every run.
        fleetbox_sandbox::egress::Resolver::from_hosts_file(hosts).map_err(anyhow::Error::msg)?;
        sandbox.egress_hosts = Some(hosts.clone());
    }
    sandbox.warm = args.warm.unwrap_or(args.slots.max(1)) as usize;
    sandbox.seccomp = args.seccomp;
    let name = args.name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "agent".into())
    });
    let environments = args.env.config(args.state.join("envs"))?;
    let review_policy = match &args.review_policy {
        None => fleetbox_agent::ReviewPolicy::default_for(args.hardened),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the review policy `{}`", path.display()))?;
            fleetbox_agent::ReviewPolicy::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("the review policy `{}`: {e}", path.display()))?
        }
    };
    let trust = fleetbox_client::Trust::from_option(args.ca_cert.as_deref())?;
    Ok(AgentConfig {
        trust,
        server: args.server,
        token: args.token.context("`--token` is required")?,
        name,
        labels: args.labels,
        slots: args.slots.max(1),
        backend,
        sandbox,
        state_dir: args.state,
        caps,
        drain_timeout: args.drain_timeout.as_duration(),
        prefetch: args.prefetch.min(1000),
        max_sessions: args.max_sessions,
        rotate_key: args.rotate_key,
        machine_id: args.machine_id,
        metrics_listen: args.metrics_listen,
        environments,
        review_policy,
        hardened_only: false,
        test_lie_rate: 0.0,
        test_lie_after: 0,
    })
}

/// An operator's egress allow-list: one rule per line, `#` comments.
fn egress_rules(path: &Path) -> anyhow::Result<Vec<fleetbox_proto::EgressRule>> {
    let text = fs_err::read_to_string(path).context("reading `--allow-egress`")?;
    let rules = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(n, l)| {
            fleetbox_proto::EgressRule::parse(l)
                .map_err(|e| anyhow::anyhow!("`{}` line {}: {e}", path.display(), n + 1))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if rules.is_empty() {
        anyhow::bail!("`{}` has no rules", path.display());
    }
    Ok(rules)
}

/// What `fleetbox agent` does besides running.
#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// Install the agent as a systemd service: the unit, `/etc/fleetbox/agent.env` (the
    /// coordinator and token) and the state directory; prints what it wrote.
    Install(crate::install_cmd::InstallArgs),
}

pub fn agent(config: Option<&Path>, args: AgentArgs) -> anyhow::Result<ExitCode> {
    if let Some(AgentCommand::Install(install)) = args.command {
        return crate::install_cmd::install(install);
    }
    let (backend, sandbox) = sandbox_settings(config, args.backend.clone(), &args.docker)?;
    let file = FileConfig::load(config)?;
    let cfg = agent_config(args, &file.agent, backend, sandbox)?;
    let rt = runtime()?;
    let result = rt.block_on(async move {
        fleetbox_agent::run(cfg, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    });
    // Runs handed back at shutdown may still sit in blocking threads: do not wait for them
    // (their programs die with this process through PR_SET_PDEATHSIG).
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

pub fn up(config: Option<&Path>, args: UpArgs) -> anyhow::Result<ExitCode> {
    let (backend, sandbox) = sandbox_settings(config, args.backend.clone(), &args.docker)?;
    let agent_file = FileConfig::load(config)?.agent;
    // The local agents' jail policy, as `fleetbox agent` reads it: `FLEETBOX_SECCOMP`, else
    // the deny list.
    let seccomp: SeccompMode = match std::env::var(env::FLEETBOX_SECCOMP) {
        Ok(v) => v
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid `{}`: {e}", env::FLEETBOX_SECCOMP))?,
        Err(_) => SeccompMode::Deny,
    };
    let server_args = ServerArgs {
        listen: args.listen,
        data: args.data.clone(),
        database_url: None,
        blob_store: None,
        s3_endpoint: None,
        lease: Millis::from_secs(10),
        heartbeat: Millis::from_secs(2),
        agent_timeout: None,
        agent_credential_ttl: Millis::from_secs(3600),
        retry_backoff: Millis::from_secs(1),
        audit_checkpoint: Millis::from_secs(60),
        retain: args.retain,
        tenant_schemas: false,
        audit_key: None,
        audit_trusted_keys: None,
        audit_ship: Vec::new(),
        check_workers: None,
        server_agents: 1,
        quarantine_strikes: 2,
        trusted_after: fleetbox_server::store::verify::TRUSTED_AFTER as u32,
        admin_token: std::env::var(env::FLEETBOX_ADMIN_TOKEN).ok(),
        enroll_token: None,
        backend: None,
        docker: args.docker.clone(),
        mcp: true,
        mcp_origins: Vec::new(),
        review_rules: None,
        llm_url: None,
        llm_model: None,
        llm_key_env: None,
        llm_timeout: Millis::from_secs(10),
        llm_max_lowering: None,
        ca_cert: None,
        tls: args.tls.clone(),
        env: EnvArgs::default(),
        followups: FollowupArgs::default(),
    };
    let mut cfg = server_config(&server_args, backend, sandbox.clone())?;
    cfg.tls = args.tls.setting(!args.listen.ip().is_loopback());
    cfg.agent_mtls = args.tls.agent_mtls;
    let rt = runtime()?;
    let result = rt.block_on(async move {
        let running = fleetbox_server::start(cfg).await?;
        let url = running.url();
        let (stop_agents, stop_rx) = tokio::sync::watch::channel(false);
        let mut agents = Vec::new();
        for i in 0..args.agents {
            let cfg = agent_config(
                AgentArgs {
                    command: None,
                    // In this process: the loopback listener, which needs no certificate.
                    server: running.local_url(),
                    ca_cert: None,
                    // The coordinator's own agents: trusted from the start.
                    token: Some(running.own_enroll_token.clone()),
                    slots: args.slots,
                    backend: None,
                    docker: args.docker.clone(),
                    name: Some(format!("local-{}", i + 1)),
                    labels: vec!["local".into()],
                    state: args.data.join("agents").join(format!("local-{}", i + 1)),
                    max_timeout: None,
                    max_memory: None,
                    max_output: None,
                    max_processes: None,
                    max_file_size: None,
                    max_open_files: None,
                    max_tmp_size: None,
                    max_workspace_size: None,
                    max_workspace_files: None,
                    max_cpus: None,
                    max_listed_files: None,
                    max_hashed_bytes: None,
                    network: args.network.clone(),
                    hardened: false,
                    review_policy: None,
                    drain_timeout: Millis::from_secs(10),
                    prefetch: 1,
                    max_sessions: fleetbox_agent::DEFAULT_MAX_SESSIONS,
                    rotate_key: false,
                    machine_id: None,
                    metrics_listen: None,
                    warm: None,
                    seccomp,
                    env: EnvArgs::default(),
                },
                &agent_file,
                backend,
                sandbox.clone(),
            )?;
            let mut rx = stop_rx.clone();
            agents.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(e) = fleetbox_agent::run(cfg, stop).await {
                    eprintln!("fleetbox: local agent failed: {e}");
                }
            }));
        }
        let server_agents = ServerAgents {
            url: running.local_url(),
            own_token: running.own_enroll_token.clone(),
            data: &args.data,
            count: server_args.server_agents,
            backend,
            sandbox: sandbox.clone(),
        }
        .spawn(&stop_rx)?;
        let server_agents_started = server_agents.len();
        agents.extend(server_agents);
        println!("fleetbox: coordinator on {url} (SQLite in `{}`)", args.data.display());
        println!(
            "fleetbox: {} local agent(s), {} slot(s) each, `{backend}` sandbox",
            args.agents, args.slots
        );
        println!("fleetbox: admin token: {}", running.admin_token);
        println!("fleetbox: web panel: {url}/ui (log in with the admin token)");
        println!(
            "fleetbox: try `fleetbox submit examples/sum_squares.toml --wait` (the token is read from `{}`)",
            args.data.join("admin.token").display()
        );
        if server_agents_started > 0 {
            println!("{}", ServerAgents::started(server_agents_started, backend));
        }
        shutdown_signal().await;
        eprintln!("fleetbox: stopping agents, then the coordinator");
        let _ = stop_agents.send(true);
        for a in agents {
            let _ = a.await;
        }
        running.shutdown().await;
        Ok(ExitCode::SUCCESS)
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn caps(flags: &[&str], file: &str) -> LocalCaps {
        let mut argv = vec!["agent", "--server", "http://x", "--token", "t"];
        argv.extend_from_slice(flags);
        let args = Cli::try_parse_from(argv).unwrap().agent;
        let file: FileConfig = toml::from_str(file).unwrap();
        agent_config(
            args,
            &file.agent,
            Backend::Process,
            SandboxConfig::default(),
        )
        .unwrap()
        .caps
    }

    #[test]
    fn agent_policy_layers_defaults_file_and_flags() {
        let d = caps(&[], "");
        assert_eq!(d.max_memory, ByteSize::mib(4096));
        assert!(!d.allow_network);
        let file = "[agent]\nmax_memory = \"1GiB\"\nmax_processes = 10\nallow_network = true\n";
        let f = caps(&[], file);
        assert_eq!(f.max_memory, ByteSize::mib(1024));
        assert_eq!(f.max_processes, 10);
        assert!(f.allow_network);
        let both = caps(&["--max-memory", "512MiB"], file);
        assert_eq!(
            both.max_memory,
            ByteSize::mib(512),
            "flags win over the file"
        );
        assert_eq!(both.max_processes, 10);
        // The report caps too: every cap has a flag.
        let file = "[agent]\nmax_listed_files = 50\nmax_hashed_bytes = \"2MiB\"\n";
        let f = caps(&[], file);
        assert_eq!(
            (f.max_listed_files, f.max_hashed_bytes),
            (50, ByteSize::mib(2))
        );
        let both = caps(
            &["--max-listed-files", "7", "--max-hashed-bytes", "1MiB"],
            file,
        );
        assert_eq!(
            (both.max_listed_files, both.max_hashed_bytes),
            (7, ByteSize::mib(1))
        );
        assert!(toml::from_str::<FileConfig>("[agent]\nmax_memroy = \"1GiB\"\n").is_err());
    }

    #[derive(Parser)]
    struct ServerCli {
        #[command(flatten)]
        server: ServerArgs,
    }

    /// The model may lower the rules' risk only when told how far, by a flag or the file.
    #[test]
    fn the_model_lowers_risk_only_as_far_as_configured() {
        let llm = |flags: &[&str]| {
            let mut argv = vec![
                "server",
                "--llm-url",
                "http://127.0.0.1:1/v1",
                "--llm-model",
                "m",
            ];
            argv.extend_from_slice(flags);
            let args = ServerCli::try_parse_from(argv).unwrap().server;
            server_config(&args, Backend::Process, SandboxConfig::default())
                .unwrap()
                .llm
                .unwrap()
        };
        let default = llm(&[]);
        assert!(!default.may_lower);
        let twenty = llm(&["--llm-max-lowering", "20"]);
        assert!(twenty.may_lower);
        assert_eq!(twenty.max_lowering, 20);
        let file: FileConfig = toml::from_str("[review]\nllm_max_lowering = 15\n").unwrap();
        assert_eq!(file.review.llm_max_lowering, Some(15));
        assert!(toml::from_str::<FileConfig>("[review]\nmax_lowering = 15\n").is_err());
    }
}
