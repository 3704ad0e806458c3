//! The store's own helper beside the shared ones (`fleetbox-testkit`).

use fleetbox_proto::{Limits, Reducer, Status};
use fleetbox_server::store::{LeaseGrant, NewJob, ReportInput};
pub use fleetbox_testkit::{BOTH, Coordinator, Db, EVERY, database, spec};
use sha2::{Digest, Sha256};

/// A job of `n` shards whose inputs are `0..n`.
pub fn new_job(id: &str, n: u64, max_attempts: u32) -> NewJob {
    NewJob {
        id: id.into(),
        tenant_id: "default".into(),
        name: id.into(),
        spec: serde_json::json!({}),
        code: "pass".into(),
        code_sha256: "x".into(),
        limits: Limits::default(),
        reducer: Reducer::Sum,
        priority: 0,
        max_attempts,
        success_needed: 1.0,
        inputs: (0..n).map(|i| serde_json::json!(i)).collect(),
        actor: "admin:test".into(),
        environment: None,
        files: Default::default(),
        backend: None,
        pool: None,
        review: None,
        has_rules: false,
        lineage: None,
        rerun_of: None,
        traceparent: None,
        session: None,
        // The settle tests drive reports by hand; server re-checks have tests of their own.
        verify: fleetbox_proto::VerifySpec {
            recheck: fleetbox_proto::Recheck::None,
            ..Default::default()
        },
    }
}

/// A helper process (a stand-in server, Prometheus) killed when the test ends, however it ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A successful report of `value` for `grant`, hashed as the coordinator hashes an output
/// (SHA-256 of its canonical JSON), so `compare = "exact"` tells values apart.
pub fn ok_report(grant: &LeaseGrant, value: u64) -> ReportInput {
    let canonical = fleetbox_proto::canonical::canonical(&serde_json::json!(value));
    ReportInput {
        blobs: Vec::new(),
        lease_id: grant.lease_id.clone(),
        task_id: grant.task_id,
        attempt: grant.attempt,
        python: "3.11".into(),
        backend: "process".into(),
        stdout_sha256: String::new(),
        signature: None,
        status: Status::Ok,
        reason: None,
        output: Some(value.to_string()),
        output_blob: None,
        output_sha256: Some(hex::encode(Sha256::digest(canonical.as_bytes()))),
        report_json: "{}".into(),
        stdout_blob: None,
        stderr_blob: None,
        wall_ms: 1,
        cpu_ms: 1,
        peak_memory: 1,
        bytes_out: 0,
        audit: serde_json::json!({"status": "ok"}),
    }
}

/// A tool the test script installs; `None` (the test says so and passes) only outside CI.
pub fn tool(name: &str) -> Option<String> {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "`{name}` is missing: scripts/test installs it"
        );
        eprintln!("skipping: `{name}` is not installed (scripts/test installs it)");
    }
    found
}

/// Wait for the coordinator's one agent to enroll, and mark it to run server-only code.
pub async fn harden_the_only_agent(c: &Coordinator) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let agents = c.client.agents().await.unwrap().agents;
        if let [one] = agents.as_slice() {
            c.client.mark_hardened(&one.id, true).await.unwrap();
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{agents:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A panel session of `token` on the coordinator at `base`: a client that does not follow
/// redirects, and the session's cookie (`name=value`).
pub async fn panel_login(base: &str, token: &str) -> (reqwest::Client, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = http
        .post(format!("{base}/ui/login"))
        .form(&[("token", token), ("next", "/ui")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    (http, cookie)
}

/// The panel page at `path`, as `token` sees it.
pub async fn panel_page(base: &str, token: &str, path: &str) -> String {
    let (http, cookie) = panel_login(base, token).await;
    http.get(format!("{base}{path}"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Enrol agent `id` of the `default` tenant straight into `store` (its token hash is its id;
/// `own`: the coordinator's own agent, trusted from the start).
pub async fn enroll_in_store(
    store: &fleetbox_server::store::Store,
    id: &str,
    req: &fleetbox_proto::api::EnrollRequest,
    own: bool,
) {
    store
        .enroll_agent(&fleetbox_server::store::Enrolment {
            tenant_id: "default",
            agent_id: id,
            token_hash: id,
            req,
            actor: "enroll:test",
            own,
            pool: None,
            token_expires_at: i64::MAX,
        })
        .await
        .unwrap();
}

/// `promtool check metrics` passes `text` (when promtool is installed; CI installs it).
pub fn promtool_accepts(text: &str) {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    use std::io::Write;
    let mut check = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sha256 of each file shard 0 of `job` listed, by name, as `client` reads it.
pub async fn files_of(
    client: &fleetbox_client::Client,
    job: &str,
) -> std::collections::HashMap<String, String> {
    let shard = client.shard(job, 0).await.unwrap();
    shard.attempts[0].report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
