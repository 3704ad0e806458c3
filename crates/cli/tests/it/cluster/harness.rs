//! A real coordinator process on 127.0.0.1 and real agent processes, on SQLite or on a
//! PostgreSQL database created for the test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetbox_client::Client;
use fleetbox_proto::JobSpec;
use fleetbox_proto::api::{JobResult, JobView};

use crate::support::bin;

pub const ADMIN: &str = "test-admin-token";
pub const ENROLL: &str = "test-enroll-token";
pub use fleetbox_testkit::{Db, postgres_database};

/// The port in a `... listening on http://127.0.0.1:PORT` line.
pub fn port_of(line: &str) -> u16 {
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// The coordinator's URL and admin token, from the first lines `fleetbox up` prints; the rest
/// of its output is read on a thread (a closed pipe would end it).
pub fn up_address(stdout: std::process::ChildStdout) -> (String, String) {
    let (mut url, mut token) = (None, None);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref().take(4) {
        let line = line.unwrap();
        if let Some(t) = line.strip_prefix("fleetbox: admin token: ") {
            token = Some(t.to_string());
        }
        if let Some(rest) = line.strip_prefix("fleetbox: coordinator on ") {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            url = Some(format!("http://127.0.0.1:{}", port_of(addr)));
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (
        url.expect("`fleetbox up` prints where it listens"),
        token.expect("`fleetbox up` prints the admin token"),
    )
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub database_url: Option<String>,
    pub server: Option<Child>,
    pub agents: Vec<Child>,
    pub client: Client,
    /// Extra `fleetbox server` flags.
    pub server_flags: Vec<String>,
    /// Extra environment variables of `fleetbox server`.
    pub server_env: Vec<(String, String)>,
}

impl Cluster {
    /// Start a coordinator with short leases and heartbeats, so failures show within seconds.
    pub async fn start(db: Db) -> Option<Cluster> {
        Cluster::start_with(db, &[]).await
    }

    pub async fn start_with(db: Db, flags: &[&str]) -> Option<Cluster> {
        let database_url = match db {
            Db::Sqlite => None,
            Db::Postgres | Db::PostgresSchemas => Some(postgres_database().await?),
        };
        let mut flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        if db.tenant_schemas() {
            flags.push("--tenant-schemas".into());
        }
        let mut cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            database_url,
            server: None,
            agents: Vec::new(),
            client: Client::new("http://127.0.0.1:0", ADMIN),
            server_flags: flags,
            server_env: Vec::new(),
        };
        // The kernel picks the first port; restarts come back on it.
        cluster.start_server();
        let trust = if cluster.tls() {
            fleetbox_client::Trust::from_pem_file(&cluster.ca()).expect("the coordinator's CA")
        } else {
            Default::default()
        };
        cluster.client = Client::trusting(&cluster.url(), ADMIN, &trust);
        Some(cluster)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Whether the coordinator serves HTTPS (`--tls ...`).
    pub fn tls(&self) -> bool {
        self.server_flags.iter().any(|f| f.starts_with("--tls"))
    }

    /// The CA a `--tls auto` coordinator made.
    pub fn ca(&self) -> PathBuf {
        self.data().join("tls").join("ca.pem")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start (or restart) the coordinator process and wait until it listens.
    pub fn start_server(&mut self) {
        let (child, port) = self.spawn_server(self.port, "server.log");
        self.port = port;
        self.server = Some(child);
    }

    /// Another coordinator on the same database (and, for SQLite, the same data directory),
    /// on `port` (0: one the kernel picks); returns it with the port it listens on.
    pub fn spawn_server(&self, port: u16, log: &str) -> (Child, u16) {
        let mut cmd = Command::new(bin());
        cmd.args(["server", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data")
            .arg(self.data())
            .args(["--admin-token", ADMIN, "--enroll-token", ENROLL])
            .args([
                "--lease",
                "3s",
                "--heartbeat",
                "300ms",
                "--agent-timeout",
                "1500ms",
            ])
            .args(["--retry-backoff", "100ms"])
            .args(&self.server_flags)
            .envs(self.server_env.iter().map(|(k, v)| (k, v)))
            .env("FLEETBOX_LOG", "info")
            .env_remove("FLEETBOX_DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(log_file(&self.dir.path().join(log)));
        if let Some(url) = &self.database_url {
            cmd.args(["--database-url", url]);
        }
        // The reducer tests leave marker files outside their workspace: `process` unless a
        // test asks for another backend.
        if !self.server_flags.iter().any(|f| f == "--backend") {
            cmd.args(["--backend", "process"]);
        }
        let mut child = cmd.spawn().expect("spawn fleetbox server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("server did not start: {}", self.server_log()));
        assert!(line.contains("listening on"), "unexpected: {line}");
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        (child, port_of(&line))
    }

    /// An agent process talking to the coordinator at `url`.
    pub fn add_agent_to(&mut self, url: &str, slots: u32) -> usize {
        let i = self.agents.len();
        let state = self.dir.path().join(format!("agent-{i}"));
        let mut cmd = agent_command(url, &state, slots);
        if url.starts_with("https://") {
            cmd.env("FLEETBOX_CA_CERT", self.ca());
        }
        let child = cmd
            .stderr(log_file(&self.dir.path().join(format!("agent-{i}.log"))))
            .spawn()
            .expect("spawn fleetbox agent");
        self.agents.push(child);
        i
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    /// Start an agent process; returns its index in `agents`.
    pub fn add_agent(&mut self, slots: u32) -> usize {
        let url = self.url();
        self.add_agent_to(&url, slots)
    }

    pub fn agent_state(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    pub fn kill_agent(&mut self, i: usize) {
        let _ = self.agents[i].kill();
        let _ = self.agents[i].wait();
    }

    pub async fn submit(&self, spec_toml: &str) -> JobView {
        let spec = JobSpec::from_toml(spec_toml).expect("test spec parses");
        self.client.submit(&spec).await.expect("submit")
    }

    /// Wait until the job is final; panics with the logs after `timeout`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> JobResult {
        let start = Instant::now();
        loop {
            if let Ok(view) = self.client.job(id).await
                && view.state.is_final()
            {
                return self.client.result(id).await.expect("result");
            }
            if start.elapsed() > timeout {
                panic!(
                    "job {id} not finished after {timeout:?}: {:?}\n--- server log ---\n{}",
                    self.client.job(id).await,
                    tail(&self.server_log(), 4000)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Poll `check` on the job's view until it holds.
    pub async fn wait_for(&self, id: &str, timeout: Duration, check: impl Fn(&JobView) -> bool) {
        let start = Instant::now();
        loop {
            if let Ok(view) = self.client.job(id).await
                && check(&view)
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "condition on {id} not met in {timeout:?}: {:?}",
                self.client.job(id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.kill_server();
    }
}

pub fn agent_command(url: &str, state: &Path, slots: u32) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["agent", "--server", url, "--token", ENROLL])
        .args(["--slots", &slots.to_string(), "--backend", "process"])
        .arg("--state")
        .arg(state)
        .env("FLEETBOX_LOG", "info")
        .stdout(Stdio::null());
    cmd
}

fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

fn tail(s: &str, n: usize) -> &str {
    &s[s.floor_char_boundary(s.len().saturating_sub(n))..]
}
