//! An idle agent costs nothing: its long poll reads, holds no transaction and writes nothing
//! until there is work; an agent that freezes mid-poll (its heartbeats stop) is lost within
//! the agent timeout all the same, and its next poll brings it back. Both stores.

use std::time::{Duration, Instant};

use fleetbox_proto::AgentState;
use fleetbox_proto::api::LeaseRequest;

use crate::support::{BOTH, Coordinator};
use fleetbox_testkit::SignedAgent;

fn poll(wait_ms: u64) -> LeaseRequest {
    LeaseRequest {
        max_tasks: 1,
        wait_ms,
        backend: None,
        hardened_only: false,
        cached_code: Vec::new(),
        sessions: false,
    }
}

async fn seen(c: &Coordinator, id: &str) -> (AgentState, i64) {
    let agents = c.client.agents().await.unwrap().agents;
    let a = agents.iter().find(|a| a.id == id).expect("listed");
    (a.state, a.last_seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_poll_writes_nothing_and_a_frozen_agent_is_lost_mid_poll() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let agent = SignedAgent::enroll(&c.running.url(), &c.running.enroll_token, "idle").await;
        assert!(agent.lease(&poll(0)).await.unwrap().tasks.is_empty());
        let (state, first) = seen(&c, &agent.agent_id).await;
        assert_eq!(state, AgentState::Online, "{db:?}");
        // A long poll and no heartbeat: the agent is frozen as far as anyone can tell.
        let started = Instant::now();
        let client = agent.client.clone();
        let pending = tokio::spawn(async move { client.lease(&poll(7_000)).await });
        let writes = c.running.state.store.writes();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(
            seen(&c, &agent.agent_id).await,
            (AgentState::Online, first),
            "{db:?}: the poll wrote"
        );
        // Nor did anything else: the scheduler's sweeps read first.
        assert_eq!(c.running.state.store.writes(), writes, "{db:?}");
        // Lost within the agent timeout (4 s here) and a sweep, while its poll still waits.
        loop {
            let (state, last) = seen(&c, &agent.agent_id).await;
            if state == AgentState::Lost {
                assert_eq!(last, first, "{db:?}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_millis(5_500),
                "{db:?}: still {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!pending.is_finished(), "{db:?}: the poll ended early");
        assert!(pending.await.unwrap().unwrap().tasks.is_empty());
        // Its next poll brings it back, and work reaches it.
        let job = c
            .client
            .submit(&crate::support::spec(
                "name = \"after\"\ncode = 'print(1)'\nshards = { count = 1 }\n",
            ))
            .await
            .unwrap();
        let got = agent.lease(&poll(5_000)).await.unwrap();
        assert_eq!(got.tasks.len(), 1, "{db:?}");
        assert_eq!(got.tasks[0].job_id, job.id);
        assert_eq!(seen(&c, &agent.agent_id).await.0, AgentState::Online);
        c.stop().await;
    }
}
