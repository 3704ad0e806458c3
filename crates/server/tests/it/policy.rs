//! What an agent's own policy decides, and bad text at the edge, through a real coordinator.

use fleetbox_proto::{JobState, Status, TaskState};
use std::time::{Duration, Instant};

use fleetbox_agent::LocalCaps;

use crate::support::{BOTH, Coordinator, spec};

const NETWORK_JOB: &str = r#"
name = "wants the network"
code = "print(1)"
shards = { count = 1 }
[limits]
network = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_is_refused_unless_the_agent_allows_it() {
    let Some(mut c) = Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    c.agent("strict", LocalCaps::default());
    let result = c.run(&spec(NETWORK_JOB), Duration::from_secs(30)).await;
    assert_eq!(result.state, JobState::Failed, "{result:?}");
    let job = c.client.jobs(None, 1).await.unwrap().jobs.remove(0);
    let shard = c.client.shard(&job.id, 0).await.unwrap();
    assert_eq!(
        shard.shard.state,
        TaskState::Rejected,
        "refused is final, not retried"
    );
    assert_eq!(shard.attempts.len(), 1);
    assert_eq!(shard.shard.status, Some(Status::Refused));
    let why = shard.shard.error.unwrap_or_default();
    assert!(why.contains("--allow-network"), "{why}");
    c.stop().await;

    let Some(mut c) = Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    c.agent(
        "open",
        LocalCaps {
            allow_network: true,
            ..LocalCaps::default()
        },
    );
    let result = c.run(&spec(NETWORK_JOB), Duration::from_secs(30)).await;
    assert_eq!(result.state, JobState::Completed, "{result:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_names_and_code_is_a_typed_error_and_a_nul_exception_is_kept() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        for body in [
            serde_json::json!({"name": "a\u{0}b", "code": "pass", "shards": {"count": 1}}),
            serde_json::json!({"name": "ok", "code": "pass\u{0}", "shards": {"count": 1}}),
        ] {
            let resp = reqwest::Client::new()
                .post(format!("{}/v1/jobs", c.running.url()))
                .bearer_auth(&c.running.admin_token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 422, "{db:?}: {body}");
            let err: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], "invalid_spec", "{db:?}: {err}");
            assert!(err["error"]["trace_id"].is_string());
        }
        c.agent("a1", LocalCaps::default());
        let job = spec(
            r#"
name = "nul exception"
code = "raise ValueError('bad' + chr(0) + 'byte')"
shards = { count = 1 }
"#,
        );
        let result = c.run(&job, Duration::from_secs(30)).await;
        assert_eq!(result.state, JobState::Failed, "{db:?}: {result:?}");
        let id = c.client.jobs(None, 1).await.unwrap().jobs.remove(0).id;
        let shard = c.client.shard(&id, 0).await.unwrap();
        assert_eq!(
            shard.shard.state,
            TaskState::Rejected,
            "{db:?}: not dead, not retried"
        );
        assert_eq!(shard.attempts.len(), 1, "{db:?}");
        let message = &shard.attempts[0].report["exception"]["message"];
        assert_eq!(
            message, "bad\u{0}byte",
            "{db:?}: the report keeps the exact text"
        );
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_hashes_are_the_coordinators_over_canonical_json() {
    let Some(mut c) = Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    c.agent("a1", LocalCaps::default());
    // The same value written with keys in two orders and two number spellings.
    let job = spec(
        r#"
name = "canonical"
code = '''
import os
i = int(os.environ["FLEETBOX_SHARD_INDEX"])
print('{"b": 1, "a": [1.0, 2]}' if i == 0 else '{"a":[1,2.0],"b":1.0}')
'''
shards = { count = 2 }
"#,
    );
    let result = c.run(&job, Duration::from_secs(30)).await;
    assert_eq!(result.state, JobState::Completed, "{result:?}");
    let id = c.client.jobs(None, 1).await.unwrap().jobs.remove(0).id;
    let a = c.client.shard(&id, 0).await.unwrap().attempts.remove(0);
    let b = c.client.shard(&id, 1).await.unwrap().attempts.remove(0);
    use sha2::Digest;
    let want = hex::encode(sha2::Sha256::digest(br#"{"a":[1,2],"b":1}"#));
    assert_eq!(a.output_sha256.as_deref(), Some(want.as_str()));
    assert_eq!(b.output_sha256.as_deref(), Some(want.as_str()));
    c.stop().await;
}

/// A report no request can carry (its JSON is over the 64 MiB body limit) is set aside by the
/// agent, and everything after it is still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_the_coordinator_refuses_never_blocks_the_rest() {
    let Some(mut c) = Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    c.agent("a1", LocalCaps::default());
    // 16 MiB of control bytes: each is six bytes of JSON (`\u0001`), in stdout and in output.
    let huge = spec(
        r#"
name = "unsendable"
code = "import sys; sys.stdout.write(chr(1) * (16 << 20))"
shards = { count = 1 }
max_attempts = 1
[limits]
max_output = "16MiB"
"#,
    );
    let job = c.client.submit(&huge).await.unwrap();
    let small = spec(
        "name = \"after\"\ncode = \"print(2)\"\nshards = { count = 3 }\naggregate = \"sum\"\n",
    );
    let after = c.run(&small, Duration::from_secs(90)).await;
    assert_eq!(after.state, JobState::Completed, "{after:?}");
    assert_eq!(after.result_value(), Some(serde_json::json!(6)));
    let outbox = c.dir.path().join("agents").join("a1").join("outbox");
    // The agent reads, measures and sets aside a 200 MB report: give it time (debug builds).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let aside = loop {
        let aside: Vec<_> = std::fs::read_dir(&outbox)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".refused"))
            .collect();
        if !aside.is_empty() || std::time::Instant::now() > deadline {
            break aside;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(aside.len(), 1, "{aside:?}");
    // Its shard's lease ran out meanwhile: dead with the reason, the job failed, nothing stored.
    let result = c.wait(&job.id, Duration::from_secs(30)).await;
    assert_eq!(result.state, JobState::Failed, "{result:?}");
    let shard = c.client.shard(&job.id, 0).await.unwrap();
    assert_eq!(shard.shard.state, TaskState::Dead, "{:?}", shard.shard);
    assert!(shard.attempts.is_empty());
    c.stop().await;
}

/// Six shards of 20 MB results while the coordinator is down: the agent's outbox holds them,
/// delivers them in bounded batches once it is back, and the restart itself re-runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_results_held_through_an_outage_are_all_delivered() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent(
            "a1",
            LocalCaps {
                max_output: fleetbox_proto::ByteSize::mib(32),
                ..LocalCaps::default()
            },
        );
        let job = spec(
            r#"
name = "big results"
code = '''
import json, os
i = int(os.environ["FLEETBOX_SHARD_INDEX"])
json.dump({"n": i, "pad": "x" * 20_000_000}, open("output.json", "w"))
'''
shards = { count = 6 }
aggregate = "merge"
[limits]
max_output = "32MiB"
"#,
        );
        let view = c.client.submit(&job).await.unwrap();
        // Down as soon as the first shards have run: the rest run and wait in the outbox.
        let outbox = c.dir.path().join("agents").join("a1").join("outbox");
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.client.job(&view.id).await.unwrap().shards.leased == 0 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = c.running.shutdown_handle().send(true);
        c.restart(Duration::from_secs(4)).await;
        let result = c.wait(&view.id, Duration::from_secs(120)).await;
        assert_eq!(
            result.state,
            JobState::Completed,
            "{db:?}: {:?}",
            result.error
        );
        let why: Vec<String> = std::fs::read_dir(&outbox)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".why"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        assert!(why.is_empty(), "{db:?}: set aside: {why:?}");
        let value = result.result_value().unwrap();
        assert_eq!(
            value["n"], 15,
            "{db:?}: every shard folded once: {:?}",
            result.summary
        );
        assert_eq!(value["pad"].as_str().unwrap().len(), 20_000_000);
        let summary = result.summary.unwrap();
        assert_eq!(summary.shards_accepted, 6, "{db:?}");
        assert_eq!(summary.attempts, 6, "{db:?}: the outage re-ran nothing");
        // The last acknowledgement may still be on its way to the agent.
        let deadline = Instant::now() + Duration::from_secs(20);
        let left = loop {
            let left = std::fs::read_dir(&outbox)
                .unwrap()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count();
            if left == 0 || Instant::now() > deadline {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(left, 0, "{db:?}: the outbox drained");
        c.stop().await;
    }
}
