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

/// A hundred heartbeats from twenty agents cost a handful of writes (one transaction every 250 ms,
/// not one a beat), every agent's `last_seen` moves to its latest beat, and a beat that
/// arrives late (another coordinator's, older) never moves a row back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_written_together_and_never_go_back() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let url = c.running.url();
        let mut agents = Vec::new();
        for i in 0..20 {
            agents.push(SignedAgent::enroll(&url, &c.running.enroll_token, &format!("b{i}")).await);
        }
        let store = &c.running.state.store;
        let writes = store.writes();
        let started = fleetbox_server::store::now_ms();
        for _ in 0..5 {
            for a in &agents {
                a.heartbeat(&Default::default()).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Two ticks for the last beats to be written.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let written = store.writes() - writes;
        let ticks = (fleetbox_server::store::now_ms() - started) / 250 + 2;
        assert!(
            written as i64 <= ticks,
            "{db:?}: 100 heartbeats took {written} writes (at most one a tick: {ticks})"
        );
        let mut last = Vec::new();
        for a in &agents {
            let (state, seen_at) = seen(&c, &a.agent_id).await;
            assert_eq!(state, AgentState::Online, "{db:?}");
            assert!(seen_at >= started, "{db:?}: {} not written", a.agent_id);
            last.push(seen_at);
        }
        // An older beat changes nothing.
        let stale = fleetbox_server::heartbeats::Beat {
            agent_id: agents[0].agent_id.clone(),
            at: started - 60_000,
            load: "{}".into(),
        };
        store.touch_agents(&[stale]).await.unwrap();
        assert_eq!(seen(&c, &agents[0].agent_id).await.1, last[0], "{db:?}");
        c.stop().await;
    }
}
