//! A cluster over HTTPS with `--tls auto`: a real coordinator process and two agent processes
//! that trust its CA run a job; an agent without the CA refuses to connect (and says how to
//! fix it); plain HTTP to the TLS port gets no answer.

use std::time::{Duration, Instant};

use fleetbox_proto::JobState;

use super::SUM_SQUARES;
use super::harness::{ADMIN, Cluster, Db, agent_command};
use crate::support::bin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_auto_runs_and_strangers_are_refused() {
    let Some(mut c) = Cluster::start_with(Db::Sqlite, &["--tls", "auto"]).await else {
        return;
    };
    assert!(c.url().starts_with("https://"), "{}", c.url());
    assert!(c.ca().exists(), "--tls auto made no CA");
    c.add_agent(2);
    c.add_agent(2);
    let job = c.submit(SUM_SQUARES).await;
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(
        r.result_value(),
        Some(serde_json::json!(super::sum_squares(100_000)))
    );
    let agents = c.client.agents().await.unwrap().agents;
    assert_eq!(agents.len(), 2, "{agents:?}");

    // An agent that does not trust the CA refuses to connect, and says how to fix it.
    let state = c.dir.path().join("stranger");
    let mut stranger = agent_command(&c.url(), &state, 1)
        .env_remove("FLEETBOX_CA_CERT")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = stranger.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the stranger kept trying");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(stranger.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("not trusted") && err.contains("--ca-cert"),
        "{err}"
    );
    assert_eq!(c.client.agents().await.unwrap().agents.len(), 2);

    // The CLI finds the CA in the data directory; without it, it is told the same.
    let out = std::process::Command::new(bin())
        .args(["jobs", "--server", &c.url(), "--token", ADMIN, "--data"])
        .arg(c.data())
        .env_remove("FLEETBOX_CA_CERT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin())
        .args(["jobs", "--server", &c.url(), "--token", ADMIN])
        .env_remove("FLEETBOX_CA_CERT")
        .env("FLEETBOX_DATA", c.dir.path().join("elsewhere"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not trusted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Plain HTTP to the TLS port: no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", c.port))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

/// `--agent-mtls` with real processes: two agents enrol with certificate requests and run a
/// job; `fleetbox agents revoke` cuts one off (audited), and the fleet keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_agent_mtls_runs_and_revokes() {
    let Some(mut c) = Cluster::start_with(Db::Sqlite, &["--tls", "auto", "--agent-mtls"]).await
    else {
        return;
    };
    c.add_agent(2);
    c.add_agent(2);
    let job = c.submit(SUM_SQUARES).await;
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    let agents = c.client.agents().await.unwrap().agents;
    assert_eq!(agents.len(), 2, "{agents:?}");
    let out = std::process::Command::new(bin())
        .args([
            "agents",
            "revoke",
            &agents[0].id,
            "--server",
            &c.url(),
            "--token",
            ADMIN,
        ])
        .arg("--ca-cert")
        .arg(c.ca())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked"));
    let log = c
        .client
        .audit("action=agent.revoked")
        .await
        .unwrap()
        .entries;
    assert_eq!(log.len(), 1, "{log:?}");
    let job = c.submit(SUM_SQUARES).await;
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
}
