//! Failures injected into whole clusters of processes: agents frozen past their leases while
//! two coordinators share PostgreSQL, a coordinator killed in the middle of a fold, and a
//! coordinator down for 8 s in the middle of a job.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fleetbox_proto::JobState;
use serde_json::json;
use sqlx::Row;

use super::harness::{self, Cluster, Db};

/// Send `signal` (`STOP`, `CONT`) to a child process.
fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{signal} {}", child.id());
}

/// A PostgreSQL pool on the cluster's database.
async fn pool(c: &Cluster) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(c.database_url.as_deref().expect("a PostgreSQL cluster"))
        .await
        .unwrap()
}

/// Frozen agents (SIGSTOP past their lease and the agent timeout) lose their shards to the
/// others, through either coordinator; thawed (SIGCONT), their late reports race the current
/// ones. Round after round across a 300-shard job: the result is exact, every shard counted
/// once.
pub async fn frozen_agents_race_late_reports_across_two_coordinators(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    let (second, port2) = c.spawn_server(0, "server2.log");
    let second = super::KillOnDrop(second);
    c.add_agent(2);
    c.add_agent(2);
    c.add_agent_to(&format!("http://127.0.0.1:{port2}"), 2);
    let job = c
        .submit(
            r#"
name = "frozen agents"
code = """
import os, time
time.sleep(0.2)
print(int(os.environ["FLEETBOX_SHARD_INDEX"]) + 1)
"""
aggregate = "sum"
max_attempts = 10
shards = { count = 300 }
"#,
        )
        .await;
    assert_eq!(job.shards.total, 300);
    let start = Instant::now();
    let mut round = 0;
    loop {
        let view = c.client.job(&job.id).await.unwrap();
        if view.state.is_final() || view.state == JobState::Aggregating {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "{view:?}");
        let victim = round % c.agents.len();
        signal(&c.agents[victim], "STOP");
        // Past the 3 s lease and the 1.5 s agent timeout: its shards go to the others.
        tokio::time::sleep(Duration::from_millis(4500)).await;
        signal(&c.agents[victim], "CONT");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        round += 1;
    }
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(
        r.result_value(),
        Some(json!((1..=300).sum::<u64>())),
        "{r:?}"
    );
    let s = r.summary.unwrap();
    assert_eq!(
        (s.shards_accepted, s.shards_failed, s.shards_dead),
        (300, 0, 0)
    );
    assert!(round >= 2, "the job ended after {round} freeze(s)");
    assert!(
        s.attempts > 300,
        "frozen agents' shards ran again elsewhere ({} attempts)",
        s.attempts
    );
    if db == Db::Postgres {
        let pool = pool(&c).await;
        let chosen: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM attempts WHERE job_id = $1 AND chosen = 1")
                .bind(&job.id)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get("n");
        assert_eq!(chosen, 300, "exactly one chosen attempt per shard");
        let late: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM attempts WHERE job_id = $1 AND late = 1")
                .bind(&job.id)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get("n");
        assert!(late > 0, "thawed agents delivered late reports");
    }
    drop(second);
}

/// The coordinator folding a job is SIGKILLed mid-fold (a python reducer that takes seconds);
/// the other coordinator takes the fold over once the claim expires and completes the job.
pub async fn a_coordinator_killed_mid_fold_is_replaced(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    let (second, port2) = c.spawn_server(0, "server2.log");
    let mut second = Some(super::KillOnDrop(second));
    c.add_agent(2);
    c.add_agent_to(&format!("http://127.0.0.1:{port2}"), 2);
    let job = c
        .submit(
            r#"
name = "slow fold"
code = """
import json, os
print(json.load(open(os.environ["FLEETBOX_INPUT"]))["start"])
"""
[shards]
range = { start = 0, end = 20, count = 20 }
[aggregate]
reducer = "python"
code = """
import json, os, time
values = json.load(open(os.environ["FLEETBOX_INPUT"]))
time.sleep(4)
print(sum(values))
"""
"#,
        )
        .await;
    c.wait_for(&job.id, Duration::from_secs(60), |v| {
        v.state == JobState::Aggregating
    })
    .await;
    let pool = pool(&c).await;
    let owner: String = sqlx::query("SELECT fold_owner FROM jobs WHERE id = $1")
        .bind(&job.id)
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("fold_owner");
    let first_log = c.server_log();
    let second_log = std::fs::read_to_string(c.dir.path().join("server2.log")).unwrap_or_default();
    if first_log.contains(&owner) {
        c.kill_server();
        // Ask the survivor from now on.
        c.client =
            fleetbox_client::Client::new(&format!("http://127.0.0.1:{port2}"), harness::ADMIN);
    } else {
        assert!(
            second_log.contains(&owner),
            "no coordinator logged `{owner}`"
        );
        second = None;
    }
    // The survivor takes over after the claim expires (6 s) and folds again (4 s).
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!((0..20).sum::<u64>())));
    let (tries, finisher): (i64, Option<String>) = {
        let row = sqlx::query("SELECT fold_tries, fold_owner FROM jobs WHERE id = $1")
            .bind(&job.id)
            .fetch_one(&pool)
            .await
            .unwrap();
        (row.get("fold_tries"), row.get("fold_owner"))
    };
    assert_eq!(
        tries, 0,
        "claimed once, taken over once: a fold killed with its coordinator is no failed try"
    );
    assert_eq!(
        finisher, None,
        "the fold's claim is cleared when it finishes"
    );
    drop(second);
}

/// The coordinator is down for 8 s in the middle of a job: agents finish what they hold, the
/// reports wait in their outboxes, and once it is back nothing runs again because of the
/// outage itself (start-up grace, leases of waiting reports heartbeated).
pub async fn an_eight_second_outage_reruns_nothing(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    c.add_agent(2);
    let job = c
        .submit(
            r#"
name = "outage"
code = """
import json, os, time
s = json.load(open(os.environ["FLEETBOX_INPUT"]))
time.sleep(0.5)
print(s["start"])
"""
aggregate = "sum"
[shards]
range = { start = 0, end = 24, count = 24 }
"#,
        )
        .await;
    c.wait_for(&job.id, Duration::from_secs(30), |v| v.shards.accepted >= 4)
        .await;
    c.kill_server();
    tokio::time::sleep(Duration::from_secs(8)).await;
    c.start_server();
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!((0..24).sum::<u64>())));
    let s = r.summary.unwrap();
    assert_eq!(
        s.attempts, 24,
        "one execution per shard: nothing re-ran because of the outage ({s:?})"
    );
}
