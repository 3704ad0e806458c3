//! What an agent's own policy decides, through a real coordinator.

use fleetbox_proto::{JobState, Status, TaskState};
use std::time::Duration;

use fleetbox_agent::LocalCaps;
use fleetbox_testkit::{Coordinator, Db, spec};

const NETWORK_JOB: &str = r#"
name = "wants the network"
code = "print(1)"
shards = { count = 1 }
[limits]
network = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_is_refused_unless_the_agent_allows_it() {
    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
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
        "refused by the only agent there is: rejected, not left waiting"
    );
    assert_eq!(shard.attempts.len(), 1);
    assert_eq!(shard.shard.status, Some(Status::Refused));
    let why = shard.shard.error.unwrap_or_default();
    assert!(why.contains("--allow-network"), "{why}");
    c.stop().await;

    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
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

/// A coordinator that lets anything through (a compromised one, or a lax policy) still cannot
/// make an agent run code the agent's own review rejects: it refuses it and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_code_its_review_rejects_whatever_the_coordinator_says() {
    let dir = tempfile::tempdir().unwrap();
    let lax = dir.path().join("lax.toml");
    let shipped = fleetbox_review::SHIPPED_RULES.replace(
        "run_on_server_only = 15\nhold = 60\nreject = 80",
        "run_on_server_only = 101\nhold = 101\nreject = 101",
    );
    assert_ne!(
        shipped,
        fleetbox_review::SHIPPED_RULES,
        "the policy lines moved"
    );
    std::fs::write(&lax, shipped).unwrap();
    let Some(mut c) = Coordinator::start_with(Db::Sqlite, |config| {
        config.review_rules = Some(lax.clone());
    })
    .await
    else {
        return;
    };
    c.agent("careful", LocalCaps::default());
    let bomb = "import os\nwhile True:\n    os.fork()\n";
    let result = c
        .run(
            &spec(&format!(
                "name = \"bomb\"\ncode = {bomb:?}\nshards = {{ count = 2 }}\n"
            )),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(result.state, JobState::Failed, "{result:?}");
    for i in 0..2 {
        let shard = c.client.shard(&result.id, i).await.unwrap();
        assert_eq!(shard.shard.state, TaskState::Rejected);
        assert_eq!(shard.shard.status, Some(Status::Refused));
        let why = shard.shard.error.unwrap_or_default();
        assert!(
            why.contains("review decides `reject`") && why.contains("process.fork_loop at line 3"),
            "{why}"
        );
    }
    c.stop().await;
}
