//! Fleetbox's own image (`fleetbox image build --fleetbox`), built here without a registry: the
//! coordinator runs in a container, one agent on the host and one in a second container, and a
//! job submitted from the host completes.

use std::process::Command;
use std::time::{Duration, Instant};

use fleetbox_proto::JobState;

use super::harness::{ADMIN, ENROLL, agent_command};
use crate::support::{bin, docker};

/// Remove the test's containers and image, whatever happened.
struct Cleanup {
    containers: Vec<String>,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_and_an_agent_run_from_fleetboxs_own_image() {
    if !std::path::Path::new("/var/run/docker.sock").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dockerd is not running in CI"
        );
        eprintln!("skipping: no Docker daemon");
        return;
    }
    let pid = std::process::id();
    let image = format!("fleetbox-selftest:{pid}");
    let (server, agent) = (format!("fbx-server-{pid}"), format!("fbx-agent-{pid}"));
    let _cleanup = Cleanup {
        containers: vec![server.clone(), agent.clone()],
        image: image.clone(),
    };
    let built = Command::new(bin())
        .args(["image", "build", "--fleetbox", "--name", &image])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let version = docker(&["run", "--rm", &image, "--version"]);
    assert!(version.starts_with("fleetbox "), "{version}");

    // What the jail needs from a container: Docker's defaults refuse it, and the doctor says
    // which options to add; with them, a program runs in the jail inside the container.
    let out = Command::new("docker")
        .args(["run", "--rm", &image, "doctor"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("refused in this container"), "{said}");
    assert!(
        said.contains("--security-opt systempaths=unconfined"),
        "{said}"
    );
    let program = tempfile::tempdir().unwrap();
    std::fs::write(program.path().join("p.py"), "print(6 * 7)\n").unwrap();
    let mount = format!("{}:/work/p:ro", program.path().display());
    let ran = docker(&[
        "run",
        "--rm",
        "-v",
        &mount,
        "--cap-add",
        "SYS_ADMIN",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--security-opt",
        "systempaths=unconfined",
        &image,
        "run",
        "--backend",
        "jail",
        "p/p.py",
    ]);
    assert_eq!(ran, "42");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let published = format!("127.0.0.1:{port}:8080");
    // The coordinator's own runs inside a container take `process` (the jail needs a
    // runtime that allows namespaces: see docs/DEPLOY.md).
    docker(&[
        "run",
        "-d",
        "--name",
        &server,
        "-p",
        &published,
        &image,
        "server",
        "--listen",
        "0.0.0.0:8080",
        "--data",
        "/data",
        "--recheck-backend",
        "process",
        "--server-agents",
        "0",
        "--admin-token",
        ADMIN,
        "--enroll-token",
        ENROLL,
    ]);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/readyz")).await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the containerised coordinator is not ready: {}",
            docker(&["logs", &server])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One agent on the host, one in a container on the host's network.
    let state = tempfile::tempdir().unwrap();
    let mut host_agent = agent_command(&url, state.path(), 2).spawn().unwrap();
    docker(&[
        "run",
        "-d",
        "--name",
        &agent,
        "--network",
        "host",
        &image,
        "agent",
        "--server",
        &url,
        "--token",
        ENROLL,
        "--backend",
        "process",
        "--state",
        "/state",
        "--name",
        "in-a-container",
    ]);
    let client = fleetbox_client::Client::new(&url, ADMIN);
    let spec = fleetbox_proto::JobSpec::from_toml(
        "name = \"from an image\"\ncode = \"print(2)\"\nshards = { count = 20 }\naggregate = \"sum\"\n",
    )
    .unwrap();
    let job = client.submit(&spec).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let v = client.job(&job.id).await.unwrap();
        if v.state.is_final() {
            break v;
        }
        assert!(Instant::now() < deadline, "{v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.state, JobState::Completed, "{done:?}");
    let result = client.result(&job.id).await.unwrap();
    assert_eq!(result.result_value(), Some(serde_json::json!(40)));
    let agents = client.agents().await.unwrap().agents;
    assert!(
        agents.iter().any(|a| a.name == "in-a-container"),
        "{agents:?}"
    );
    let _ = host_agent.kill();
    let _ = host_agent.wait();
}
