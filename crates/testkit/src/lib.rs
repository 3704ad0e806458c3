//! What the crates' integration tests share: a fresh database of either kind for one test,
//! and an in-process coordinator on `127.0.0.1:0` (the port the kernel gave it, never a port
//! picked, released and bound again) with in-process agents.
//!
//! PostgreSQL tests never pass by skipping: without `FLEETBOX_TEST_DATABASE_URL` they fail,
//! unless `FLEETBOX_TEST_SKIP_POSTGRES=1` says to skip them.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use fleetbox_proto::JobSpec;
use fleetbox_proto::api::JobResult;

/// Set by `scripts/test` after it starts PostgreSQL.
pub const PG_URL_VAR: &str = "FLEETBOX_TEST_DATABASE_URL";
/// Skip the PostgreSQL half of the suite explicitly (never implicitly).
pub const SKIP_PG_VAR: &str = "FLEETBOX_TEST_SKIP_POSTGRES";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
    /// PostgreSQL with each tenant in a schema of its own (`--tenant-schemas`).
    PostgresSchemas,
}

/// `FLEETBOX_TEST_TENANT_SCHEMAS=1` runs every PostgreSQL test with `--tenant-schemas`.
pub const SCHEMAS_VAR: &str = "FLEETBOX_TEST_TENANT_SCHEMAS";

impl Db {
    /// Whether the coordinator runs with `--tenant-schemas`.
    pub fn tenant_schemas(self) -> bool {
        self == Db::PostgresSchemas
            || (self == Db::Postgres && std::env::var(SCHEMAS_VAR).as_deref() == Ok("1"))
    }
}

pub const BOTH: [Db; 2] = [Db::Sqlite, Db::Postgres];
/// Both stores, and PostgreSQL with a schema per tenant: for the tests of tenants' isolation.
pub const EVERY: [Db; 3] = [Db::Sqlite, Db::Postgres, Db::PostgresSchemas];

/// Logs of the coordinator and agents on stderr when `FLEETBOX_TEST_LOG` holds a filter
/// (`FLEETBOX_TEST_LOG=debug cargo nextest run ...`); silent otherwise.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("FLEETBOX_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// A database URL for one test: a file under `dir`, or a new PostgreSQL database. `None`
/// only when `FLEETBOX_TEST_SKIP_POSTGRES=1` says so; a missing database otherwise fails.
pub async fn database(db: Db, dir: &Path) -> Option<String> {
    match db {
        Db::Sqlite => Some(fleetbox_server::store::Store::sqlite_url(dir)),
        Db::Postgres | Db::PostgresSchemas => postgres_database().await,
    }
}

/// A new, empty PostgreSQL database on the test server (see [`database`]).
pub async fn postgres_database() -> Option<String> {
    if std::env::var(SKIP_PG_VAR).as_deref() == Ok("1") {
        eprintln!("SKIPPED (PostgreSQL): {SKIP_PG_VAR}=1");
        return None;
    }
    let base = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{PG_URL_VAR} is not set: run ./scripts/test, which starts PostgreSQL, \
             or set {SKIP_PG_VAR}=1 to skip the PostgreSQL tests"
        )
    });
    use sqlx::Connection;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let name = format!("fbt_{}_{nanos}_{n}", std::process::id());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("connecting to {PG_URL_VAR}={base:?}: {e}"));
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create database");
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    Some(format!("{prefix}/{name}"))
}

/// The `uv` binary tests build environments with: `FLEETBOX_TEST_UV`, else the one the `uv`
/// package from PyPI carries (the test script installs it); `None` builds with pip.
pub fn test_uv() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("FLEETBOX_TEST_UV") {
        return Some(p.into());
    }
    ["python3", "/usr/bin/python3"].iter().find_map(|python| {
        let out = std::process::Command::new(python)
            .args(["-c", "import uv; print(uv.find_uv_bin())"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().into())
    })
}

/// An environment cache at `root` building with [`test_uv`].
pub fn environments(root: std::path::PathBuf) -> fleetbox_sandbox::environment::EnvConfig {
    let mut config = fleetbox_sandbox::environment::EnvConfig::new(root);
    if let Some(uv) = test_uv() {
        config.installer = fleetbox_sandbox::environment::Installer::Uv(uv);
    }
    config
}

/// An in-process coordinator on `127.0.0.1:0` with short leases, and in-process agents.
pub struct Coordinator {
    pub dir: tempfile::TempDir,
    config: fleetbox_server::ServerConfig,
    pub running: fleetbox_server::Running,
    pub client: fleetbox_client::Client,
    agents: Vec<tokio::task::JoinHandle<()>>,
    stop_agents: tokio::sync::watch::Sender<bool>,
}

impl Coordinator {
    pub async fn start(db: Db) -> Option<Coordinator> {
        Coordinator::start_with(db, |_| {}).await
    }

    /// [`Coordinator::start`] with the test's changes to the configuration.
    pub async fn start_with(
        db: Db,
        change: impl FnOnce(&mut fleetbox_server::ServerConfig),
    ) -> Option<Coordinator> {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let url = database(db, dir.path()).await?;
        let mut config =
            fleetbox_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().into());
        if db != Db::Sqlite {
            config.database_url = Some(url);
        }
        config.tenant_schemas = db.tenant_schemas();
        config.lease_ms = 6000;
        config.heartbeat_ms = 500;
        config.agent_timeout_ms = 4000;
        config.retry_backoff_ms = 100;
        config.sandbox.work_root = dir.path().join("work");
        // The reducer tests leave marker files outside their workspace.
        config.sandbox_backend = fleetbox_sandbox::Backend::Process;
        config.weak_sandbox_allowed = true;
        config.environments = environments(dir.path().join("envs"));
        change(&mut config);
        let running = fleetbox_server::start(config.clone())
            .await
            .expect("coordinator starts");
        // Restarts come back on the same address, so agents find it again.
        config.listen = running.addr;
        let client = fleetbox_client::Client::new(&running.url(), &running.admin_token);
        let (stop_agents, _) = tokio::sync::watch::channel(false);
        Some(Coordinator {
            dir,
            config,
            running,
            client,
            agents: Vec::new(),
            stop_agents,
        })
    }

    /// Start an in-process agent on the `process` backend with these caps.
    pub fn agent(&mut self, name: &str, caps: fleetbox_agent::LocalCaps) {
        self.agent_lying(name, caps, 0.0);
    }

    /// Start an in-process agent on `backend` with this sandbox configuration (its work root
    /// is set to the coordinator's test directory).
    pub fn agent_on(
        &mut self,
        name: &str,
        backend: fleetbox_sandbox::Backend,
        mut sandbox: fleetbox_sandbox::SandboxConfig,
    ) {
        sandbox.work_root = self.dir.path().join("work");
        self.spawn_agent(name, backend, sandbox, |_| {});
    }

    /// Start an in-process agent on the `process` backend, its configuration changed first.
    pub fn agent_with(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut fleetbox_agent::AgentConfig),
    ) {
        let sandbox = fleetbox_sandbox::SandboxConfig {
            work_root: self.dir.path().join("work"),
            ..Default::default()
        };
        self.spawn_agent(name, fleetbox_sandbox::Backend::Process, sandbox, change);
    }

    /// The state directory of the agent called `name`.
    pub fn agent_state(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("agents").join(name)
    }

    /// A sleeper: honest for its first `after` successful results, then lying on `lie_rate`.
    pub fn agent_sleeping(&mut self, name: &str, after: u64, lie_rate: f64) {
        self.agent_with(name, |config| {
            config.test_lie_rate = lie_rate;
            config.test_lie_after = after;
        });
    }

    /// An agent that corrupts this share of its successful results, signing them with its
    /// own valid key (verification tests).
    pub fn agent_lying(&mut self, name: &str, caps: fleetbox_agent::LocalCaps, lie_rate: f64) {
        self.agent_with(name, |config| {
            config.caps = caps;
            config.test_lie_rate = lie_rate;
        });
    }

    fn spawn_agent(
        &mut self,
        name: &str,
        backend: fleetbox_sandbox::Backend,
        sandbox: fleetbox_sandbox::SandboxConfig,
        change: impl FnOnce(&mut fleetbox_agent::AgentConfig),
    ) {
        let mut config = fleetbox_agent::AgentConfig {
            trust: Default::default(),
            server: self.running.url(),
            token: self.running.enroll_token.clone(),
            name: name.into(),
            labels: Vec::new(),
            slots: 2,
            backend,
            sandbox,
            state_dir: self.agent_state(name),
            caps: Default::default(),
            drain_timeout: Duration::from_secs(5),
            prefetch: 1,
            rotate_key: false,
            machine_id: None,
            metrics_listen: None,
            environments: environments(self.agent_state(name).join("envs")),
            review_policy: fleetbox_agent::ReviewPolicy::default_for(false),
            hardened_only: false,
            max_sessions: fleetbox_agent::DEFAULT_MAX_SESSIONS,
            test_lie_rate: 0.0,
            test_lie_after: 0,
        };
        change(&mut config);
        let mut stop = self.stop_agents.subscribe();
        self.agents.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = fleetbox_agent::run(config, shutdown).await {
                panic!("agent failed: {e}");
            }
        }));
    }

    /// Submit and wait (up to `within`) for a final state.
    pub async fn run(&self, spec: &JobSpec, within: Duration) -> JobResult {
        let job = self.client.submit(spec).await.expect("submit");
        self.wait(&job.id, within).await
    }

    /// Wait (up to `within`) for job `id` to reach a final state.
    pub async fn wait(&self, id: &str, within: Duration) -> JobResult {
        let deadline = Instant::now() + within;
        loop {
            let result = self.client.result(id).await.expect("result");
            if result.state.is_final() {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still `{}` after {within:?}",
                result.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop the coordinator (agents keep running), wait `down`, start it again on the same
    /// address, database and data directory.
    pub async fn restart(&mut self, down: Duration) {
        let _ = self.running.shutdown_handle().send(true);
        tokio::time::sleep(down).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let next = loop {
            match fleetbox_server::start(self.config.clone()).await {
                Ok(next) => break next,
                // The old server may still be letting go of the address.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("coordinator restarts: {e}"),
            }
        };
        std::mem::replace(&mut self.running, next).shutdown().await;
    }

    /// Stop the agents started so far (they drain and exit); agents started later run.
    pub async fn stop_agents(&mut self) {
        let _ = self.stop_agents.send(true);
        for a in self.agents.drain(..) {
            let _ = a.await;
        }
        self.stop_agents = tokio::sync::watch::channel(false).0;
    }

    pub async fn stop(self) {
        let _ = self.stop_agents.send(true);
        for a in self.agents {
            let _ = a.await;
        }
        self.running.shutdown().await;
    }
}

pub fn spec(toml: &str) -> JobSpec {
    JobSpec::from_toml(toml).expect("valid spec")
}

/// An agent driven by hand through the API (no sandbox): enrolled with a key of its own, its
/// reports signed as a real agent signs them. Derefs to its [`fleetbox_client::Client`].
pub struct SignedAgent {
    pub client: fleetbox_client::Client,
    pub key: ed25519_dalek::SigningKey,
    pub agent_id: String,
    pub token: String,
}

impl SignedAgent {
    pub async fn enroll(url: &str, enroll_token: &str, name: &str) -> SignedAgent {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("randomness");
        let key = ed25519_dalek::SigningKey::from_bytes(&secret);
        let resp = fleetbox_client::Client::new(url, enroll_token)
            .enroll(&fleetbox_proto::api::EnrollRequest {
                name: name.into(),
                slots: 1,
                public_key: hex::encode(key.verifying_key().as_bytes()),
                ..Default::default()
            })
            .await
            .expect("enrollment");
        SignedAgent {
            client: fleetbox_client::Client::new(url, &resp.agent_token),
            key,
            agent_id: resp.agent_id,
            token: resp.agent_token,
        }
    }

    /// Send `batch` with every report signed by this agent's key.
    pub async fn report(
        &self,
        batch: &fleetbox_proto::api::ReportBatch,
    ) -> Result<fleetbox_proto::api::ReportAck, fleetbox_client::ClientError> {
        let mut batch = batch.clone();
        for r in &mut batch.reports {
            r.sign(&self.key);
        }
        self.client.report(&batch).await
    }
}

impl std::ops::Deref for SignedAgent {
    type Target = fleetbox_client::Client;
    fn deref(&self) -> &fleetbox_client::Client {
        &self.client
    }
}

/// The `docker` tests' image (`FLEETBOX_TEST_DOCKER_IMAGE`, else `fleetbox-python:3.11`),
/// built from this host's Python when the daemon lacks it.
pub async fn docker_image() -> String {
    fleetbox_sandbox::docker::image::test_image().await
}
