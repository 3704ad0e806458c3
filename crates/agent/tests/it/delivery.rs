//! Reports on their way to the coordinator: bounded batches, large parts uploaded ahead as
//! blobs, refusals set aside without blocking the rest, outages survived.

use fleetbox_proto::{JobState, TaskState};
use std::time::{Duration, Instant};

use fleetbox_agent::LocalCaps;
use fleetbox_testkit::{BOTH, Coordinator, Db, spec};

fn outbox_entries(dir: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default()
}

/// A run whose report would be far over the 64 MiB request limit (40 MiB of stdout, 40 MiB of
/// output) is delivered whole: its large parts go ahead as blobs, the report stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_over_the_request_limit_arrives_with_its_parts_uploaded_ahead() {
    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
        return;
    };
    c.agent(
        "a1",
        LocalCaps {
            max_output: fleetbox_proto::ByteSize::mib(48),
            ..LocalCaps::default()
        },
    );
    let job = spec(
        r#"
name = "over the limit"
code = '''
import json, sys
sys.stdout.write("o" * (40 << 20))
json.dump({"pad": "p" * (40 << 20)}, open("output.json", "w"))
'''
shards = { count = 1 }
max_attempts = 1
[limits]
max_output = "48MiB"
memory = "512MiB"
"#,
    );
    let result = c.run(&job, Duration::from_secs(120)).await;
    assert_eq!(result.state, JobState::Completed, "{:?}", result.error);
    let value = result.result_value().unwrap();
    assert_eq!(value[0]["pad"].as_str().map(str::len), Some(40 << 20));
    let id = c.client.jobs(None, 1).await.unwrap().jobs.remove(0).id;
    let attempt = c.client.shard(&id, 0).await.unwrap().attempts.remove(0);
    let stdout = c
        .client
        .get_blob(
            attempt
                .stdout_blob
                .as_deref()
                .expect("stdout kept as a blob"),
        )
        .await
        .unwrap();
    assert_eq!(stdout.len(), 40 << 20);
    assert!(stdout.iter().all(|&b| b == b'o'));
    assert_eq!(attempt.report["stdout_bytes"], 40 << 20);
    // The coordinator hashed the value it read from the blob.
    use sha2::Digest;
    let canonical = format!("{{\"pad\":\"{}\"}}", "p".repeat(40 << 20));
    let want = hex::encode(sha2::Sha256::digest(canonical.as_bytes()));
    assert_eq!(attempt.output_sha256.as_deref(), Some(want.as_str()));
    let outbox = c.dir.path().join("agents").join("a1").join("outbox");
    assert!(outbox_entries(&outbox, ".refused").is_empty());
    c.stop().await;
}

/// A report whose uploaded part was lost from the outbox is refused by the coordinator
/// (`missing_blob`): the agent sets it aside with the reason, and everything after it is still
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_the_coordinator_refuses_is_set_aside_and_never_blocks_the_rest() {
    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
        return;
    };
    c.agent("a1", LocalCaps::default());
    let broken = spec(
        r#"
name = "loses its stdout"
code = "import sys; sys.stdout.write('x' * (1 << 20))"
shards = { count = 1 }
max_attempts = 1
[limits]
max_output = "2MiB"
"#,
    );
    let job = c.client.submit(&broken).await.unwrap();
    // Down once the shard is leased: its report (and its stdout blob) wait in the outbox.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.client.job(&job.id).await.unwrap().shards.leased == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = c.running.shutdown_handle().send(true);
    let outbox = c.dir.path().join("agents").join("a1").join("outbox");
    let deadline = Instant::now() + Duration::from_secs(30);
    let blobs = loop {
        let blobs = outbox_entries(&outbox.join("blobs"), "");
        if !outbox_entries(&outbox, ".json").is_empty() && !blobs.is_empty() {
            break blobs;
        }
        assert!(Instant::now() < deadline, "the report reached the outbox");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for b in blobs {
        std::fs::remove_file(b).unwrap();
    }
    c.restart(Duration::ZERO).await;
    let small = spec(
        "name = \"after\"\ncode = \"print(2)\"\nshards = { count = 3 }\naggregate = \"sum\"\n",
    );
    let after = c.run(&small, Duration::from_secs(60)).await;
    assert_eq!(after.state, JobState::Completed, "{after:?}");
    assert_eq!(after.result_value(), Some(serde_json::json!(6)));
    let deadline = Instant::now() + Duration::from_secs(30);
    let aside = loop {
        let aside = outbox_entries(&outbox, ".why");
        if !aside.is_empty() || Instant::now() > deadline {
            break aside;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(aside.len(), 1, "{aside:?}");
    let why = std::fs::read_to_string(&aside[0]).unwrap();
    assert!(why.contains("was not uploaded"), "{why}");
    // Its shard's lease ran out meanwhile: dead, the job failed, nothing stored.
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
