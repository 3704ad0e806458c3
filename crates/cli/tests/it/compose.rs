//! `deploy/compose.yaml` on the real `dockerd`, with the images `deploy/build-images` makes
//! here without a registry: PostgreSQL, an S3-protocol server, two coordinators and two agents
//! running shards in the jail. A job submitted to one coordinator completes while that
//! coordinator is stopped and an agent is replaced by a new image version mid-job; its result,
//! shards and blobs read back through the other coordinator.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetbox_proto::{JobState, TaskState};

use crate::support::{bin, docker};

const ADMIN: &str = "compose-test-admin-token";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One compose project and the images made for it, removed whatever happens.
struct Fleet {
    project: String,
    env: Vec<(String, String)>,
    images: Vec<String>,
}

impl Fleet {
    fn compose(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(repo())
            .args(["-p", &self.project, "-f", "deploy/compose.yaml"])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.output().expect("docker-compose runs")
    }

    /// `docker-compose ARGS`, which must succeed.
    fn must(&self, args: &[&str]) {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color", "--tail", "30"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--timeout", "5"]);
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether this machine can run the fleet; outside CI a missing piece skips the test.
fn available() -> bool {
    let docker = Path::new("/var/run/docker.sock").exists();
    let compose = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if docker && compose {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI needs dockerd and docker-compose (scripts/test installs them)"
    );
    eprintln!("skipping: no Docker daemon or no docker-compose");
    false
}

async fn wait_until<F, Fut>(what: &str, fleet: &Fleet, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}:\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Wait until the coordinator at `url` is ready.
async fn ready(fleet: &Fleet, what: &str, url: &str) {
    let probe = format!("{url}/readyz");
    wait_until(what, fleet, Duration::from_secs(90), || {
        let probe = probe.clone();
        async move {
            reqwest::get(&probe)
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
}

/// Wait until both agents are online, as `client`'s coordinator sees them.
async fn both_online(fleet: &Fleet, what: &str, client: &fleetbox_client::Client) {
    wait_until(what, fleet, Duration::from_secs(60), || async {
        client.agents().await.is_ok_and(|a| {
            a.agents
                .iter()
                .filter(|a| a.state == fleetbox_proto::AgentState::Online)
                .count()
                == 2
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compose_fleet_survives_a_stopped_coordinator_and_an_agent_upgrade() {
    if !available() {
        return;
    }
    let pid = std::process::id();
    let tag = |name: &str| format!("fleetbox-compose-{name}:{pid}");
    let (image, next) = (tag("fleetbox"), tag("next"));
    let (ports, urls): (Vec<u16>, Vec<String>) = (0..2)
        .map(|_| {
            let p = free_port();
            (p, format!("http://127.0.0.1:{p}"))
        })
        .unzip();
    let mut fleet = Fleet {
        project: format!("fbxcompose{pid}"),
        env: vec![
            ("FLEETBOX_ADMIN_TOKEN".into(), ADMIN.into()),
            ("FLEETBOX_IMAGE".into(), image.clone()),
            ("FLEETBOX_AGENT_1_IMAGE".into(), image.clone()),
            ("FLEETBOX_AGENT_2_IMAGE".into(), image.clone()),
            ("FLEETBOX_POSTGRES_IMAGE".into(), tag("postgres")),
            ("FLEETBOX_S3_IMAGE".into(), tag("s3")),
            ("FLEETBOX_PORT_1".into(), ports[0].to_string()),
            ("FLEETBOX_PORT_2".into(), ports[1].to_string()),
        ],
        images: vec![image.clone(), next.clone(), tag("postgres"), tag("s3")],
    };

    // The images, from this host: `deploy/build-images` with this build's binary.
    let built = Command::new(repo().join("deploy/build-images"))
        .env("FLEETBOX_BIN", bin())
        .envs(fleet.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "deploy/build-images: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    // A new version of the agents' image: another image, made from the first without a
    // registry.
    let mut build = Command::new("docker")
        .args(["build", "-q", "-t", &next, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut build.stdin.take().unwrap(),
        format!("FROM {image}\nLABEL fleetbox.test-version=next\n").as_bytes(),
    )
    .unwrap();
    assert!(build.wait().unwrap().success(), "docker build of {next}");

    fleet.must(&["up", "-d"]);
    let clients: Vec<fleetbox_client::Client> = urls
        .iter()
        .map(|u| fleetbox_client::Client::new(u, ADMIN))
        .collect();
    for (i, url) in urls.iter().enumerate() {
        ready(&fleet, &format!("coordinator-{} ready", i + 1), url).await;
    }
    both_online(&fleet, "both agents online", &clients[1]).await;

    // 40 shards of about a second each on 2 agents of 2 slots: 10 s or more of work, each
    // shard writing 40 kB of stderr (a blob in the bucket).
    let spec = fleetbox_proto::JobSpec::from_toml(
        "name = \"fleet\"\ncode = \"\"\"\nimport os, sys, time\ntime.sleep(1)\nsys.stderr.write('e' * 40000)\n\
         print(int(os.environ['FLEETBOX_SHARD_INDEX']))\n\"\"\"\nshards = { count = 40 }\n\
         aggregate = \"sum\"\n[verify]\nrecheck = \"none\"\n",
    )
    .unwrap();
    let job = clients[0].submit(&spec).await.unwrap();
    let done_at_least = |n: u64| {
        let (client, id) = (&clients[1], job.id.clone());
        async move { client.job(&id).await.is_ok_and(|v| v.shards.accepted >= n) }
    };
    wait_until("two shards done", &fleet, Duration::from_secs(60), || {
        done_at_least(2)
    })
    .await;
    // The coordinator the job was submitted to goes away mid-job.
    fleet.must(&["stop", "--timeout", "10", "coordinator-1"]);
    assert!(
        clients[0].job(&job.id).await.is_err(),
        "coordinator-1 still answers"
    );
    wait_until("eight shards done", &fleet, Duration::from_secs(60), || {
        done_at_least(8)
    })
    .await;
    // A rolling upgrade of agent-1: drained, replaced by the new image, same volume.
    let before = clients[1].job(&job.id).await.unwrap();
    assert!(
        !before.state.is_final(),
        "the job ended before the upgrade: {before:?}"
    );
    fleet.set("FLEETBOX_AGENT_1_IMAGE", &next);
    fleet.must(&["up", "-d", "--no-deps", "agent-1"]);
    let agent_1 = format!("{}_agent-1_1", fleet.project);
    let running = docker(&["inspect", "-f", "{{.Config.Image}}", &agent_1]);
    assert_eq!(running, next, "agent-1 runs the new image");

    let deadline = Instant::now() + Duration::from_secs(120);
    let view = loop {
        let v = clients[1].job(&job.id).await.unwrap();
        if v.state.is_final() {
            break v;
        }
        assert!(Instant::now() < deadline, "{v:?}\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        view.state,
        JobState::Completed,
        "{view:?}\n{}",
        fleet.logs()
    );
    let result = clients[1].result(&job.id).await.unwrap();
    assert_eq!(
        result.result_value(),
        Some(serde_json::json!(780)),
        "0 + 1 + ... + 39"
    );
    // No shard lost: every one accepted once, from a jail in an agent's container, and its
    // stderr blob read back through coordinator-2 from the bucket.
    for index in 0..40u64 {
        let shard = clients[1].shard(&job.id, index).await.unwrap();
        assert_eq!(
            shard.shard.state,
            TaskState::Accepted,
            "shard {index}: {shard:?}"
        );
        let chosen: Vec<_> = shard.attempts.iter().filter(|a| a.chosen).collect();
        assert_eq!(chosen.len(), 1, "shard {index}: {shard:?}");
        assert_eq!(chosen[0].report["backend"], "jail", "shard {index}");
        let blob = chosen[0].stderr_blob.clone().expect("a stderr blob");
        let bytes = clients[1].get_blob(&blob).await.unwrap();
        assert_eq!(bytes, b"e".repeat(40000), "shard {index}");
    }
    // The upgraded agent kept its identity (its volume) and came back.
    both_online(&fleet, "agent-1 back online", &clients[1]).await;
    // coordinator-1, started again, serves the job it took in.
    fleet.must(&["start", "coordinator-1"]);
    ready(&fleet, "coordinator-1 back", &urls[0]).await;
    let again = clients[0].result(&job.id).await.unwrap();
    assert_eq!(again.result_value(), Some(serde_json::json!(780)));
}
