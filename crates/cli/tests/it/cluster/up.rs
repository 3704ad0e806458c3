//! `fleetbox up` with the CLI client commands, on the shipped examples; and an agent's drain.

use fleetbox_proto::{JobState, TaskState};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::harness::{Cluster, Db, agent_command, up_address};
use crate::support::bin;

fn examples() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn up_runs_the_examples_with_their_expected_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(bin())
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            // The default on Linux, with agents keeping warm jails (one per slot).
            "--backend",
            "jail",
        ])
        .current_dir(dir.path())
        .env("FLEETBOX_WORK_ROOT", dir.path().join("runs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let up = KillOnDrop(up);
    let (url, token) = up_address(stdout);
    // The token is also where the client commands look for it by default.
    let saved = std::fs::read_to_string(dir.path().join("fleetbox-data/admin.token")).unwrap();
    assert_eq!(saved.trim(), token.as_str());

    let submit = |spec: &str| -> Value {
        let out = Command::new(bin())
            .args(["submit", "--wait", "--server", &url])
            .arg(examples().join(spec))
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{spec}: {stderr}");
        assert!(stderr.contains("completed"), "{stderr}");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{spec}: {e}"))
    };
    assert_eq!(submit("sum_squares.toml"), json!(333332833333500000u64));
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(examples().join("wordcount.expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(submit("wordcount.toml"), expected);
    assert_eq!(
        submit("sort_numbers.toml"),
        json!((1..=40).collect::<Vec<u32>>())
    );

    // `fleetbox blob` fetches what a shard wrote, by hash (here: the word-count output file).
    let out = Command::new(bin())
        .args(["jobs", "--json", "--server", &url])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job_id = |name: &str| -> String {
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("no job `{name}` in {jobs}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let wc = job_id("word count");
    let client = fleetbox_client::Client::new(&url, &token);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Shards after the first on each agent start in a jail built while the previous one ran.
    let sq = job_id("sum of squares");
    let mut warm = 0;
    for i in 0..20 {
        let d = rt.block_on(client.shard(&sq, i)).unwrap();
        let report = &d.attempts[0].report;
        assert_eq!(report["backend"], "jail", "{report}");
        let notes = report["notes"].to_string();
        warm += usize::from(notes.contains("warm start"));
    }
    assert!(warm >= 10, "only {warm} of 20 shards started warm");
    let detail = rt.block_on(client.shard(&wc, 0)).unwrap();
    let file = detail.attempts[0].report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "output.json")
        .cloned()
        .unwrap();
    let saved = dir.path().join("shard0-output.json");
    let out = Command::new(bin())
        .args(["blob", file["sha256"].as_str().unwrap(), "-o"])
        .arg(&saved)
        .args(["--server", &url])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(counts["the"], detail.attempts[0].report["output"]["the"]);

    let out = Command::new(bin())
        .args(["jobs", "--server", &url])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listing.matches("completed").count(), 3, "{listing}");

    // `fleetbox run --server`: one program on the fleet (`POST /v1/run`), with an attached
    // file, printed as a local run prints; its status is the exit code.
    std::fs::write(dir.path().join("words.txt"), "a b c\n").unwrap();
    std::fs::write(
        dir.path().join("count.py"),
        "print(len(open('in/words.txt').read().split()))\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args([
            "run",
            "--server",
            &url,
            "--file",
            "in/words.txt=words.txt",
            "count.py",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");
    assert!(
        stderr.contains("ok in") && stderr.contains("[jail]"),
        "{stderr}"
    );
    assert!(stderr.contains("ran as job job_"), "{stderr}");
    std::fs::write(dir.path().join("boom.py"), "import time\ntime.sleep(30)\n").unwrap();
    let out = Command::new(bin())
        .args([
            "run",
            "--server",
            &url,
            "--timeout",
            "300ms",
            "--json",
            "boom.py",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "timeout's exit code");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "timeout", "{report}");

    // Network the local agents do not allow: each refuses it, and the coordinator's own
    // server agent (which asks for server-only shards alone) is not waited for: the run ends
    // `refused` with the agents' reason (it waited forever before).
    for (network, says) in [
        (
            fleetbox_proto::Network::Allow(vec![
                fleetbox_proto::EgressRule::parse("pypi.org:443").unwrap(),
            ]),
            "--allow-egress",
        ),
        (fleetbox_proto::Network::Host, "--allow-network"),
    ] {
        let body = fleetbox_proto::api::RunBody {
            code: "print(1)\n".into(),
            limits: fleetbox_proto::Limits {
                network,
                ..Default::default()
            },
            wait_ms: Some(30_000),
            ..Default::default()
        };
        let answer = rt.block_on(client.run(&body)).unwrap();
        assert_eq!(answer.state, JobState::Failed, "{answer:?}");
        let report = answer.report.expect("the refusal's report");
        assert_eq!(report["status"], "refused", "{report}");
        assert!(
            report["message"].as_str().unwrap().contains(says),
            "{report}"
        );
    }

    // A spec with a mistake is refused before anything is sent, naming the field.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\ncode = \"pass\"\n[shards]\nrange = { start = 0, end = 10, count = 11 }\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["submit", "--server", &url])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`shards.range.count`"));

    // Without a coordinator: a clear error and exit code 1.
    let out = Command::new(bin())
        .args(["jobs", "--server", "http://127.0.0.1:1", "--token", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the coordinator"));

    // SIGTERM stops it cleanly.
    let pid = up.0.id() as i32;
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut up = up;
    let status = wait_timeout(&mut up.0, Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    // ... warm jails included: nothing is left in the work root.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn wait_timeout(child: &mut std::process::Child, t: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < t {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// SIGTERM: running shards finish within the drain timeout, the rest are handed back
/// (not counted as attempts) and run elsewhere; the agent exits 0.
pub async fn sigterm_drains_and_hands_back(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    let state = c.dir.path().join("draining-agent");
    let mut draining = agent_command(&c.url(), &state, 2)
        .args(["--drain-timeout", "500ms"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let job = c
        .submit(
            "name = \"slow\"\ncode = \"import time, os; time.sleep(20 if os.environ['FLEETBOX_SHARD_INDEX'] == '0' else 0.05); print(1)\"\nshards = { count = 4 }\naggregate = \"sum\"\n",
        )
        .await;
    c.wait_for(&job.id, Duration::from_secs(30), |v| {
        v.shards.leased >= 1 && v.shards.accepted >= 1
    })
    .await;
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(draining.id() as i32, libc::SIGTERM) };
    let status = wait_timeout(&mut draining, Duration::from_secs(30)).expect("agent exits");
    assert!(status.success(), "{status:?}");
    assert!(
        std::fs::read_dir(state.join("outbox")).unwrap().count() == 0,
        "the outbox is flushed before exit"
    );
    // Shard 0 was handed back: queued again with its attempt not counted.
    let shards = c.client.shards(&job.id).await.unwrap().shards;
    assert_eq!(shards[0].state, TaskState::Queued, "{shards:?}");
    assert_eq!(
        shards[0].attempts, 0,
        "a handed-back shard costs no attempt"
    );
    assert!(
        shards.iter().all(|s| s.state != TaskState::Leased),
        "nothing stays leased to a stopped agent: {shards:?}"
    );
    // Another agent finishes the job (shard 0 sleeps long: cancel it once it is re-leased).
    c.add_agent(2);
    c.wait_for(&job.id, Duration::from_secs(30), |v| {
        v.shards.leased == 1 && v.shards.accepted == 3
    })
    .await;
    let v = c.client.cancel(&job.id).await.unwrap();
    assert_eq!(v.state, JobState::Cancelled);
    assert_eq!(v.shards.accepted, 3);
}
