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
        "refused is final, not retried"
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
