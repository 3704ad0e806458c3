//! The distributed core with real processes: a coordinator, agents, SQLite and PostgreSQL.
//! Every scenario runs on both stores.

mod api;
mod audit;
mod chaos;
mod followups;
pub mod harness;
mod image;
mod lies;
mod receipt;
mod sessions;
mod tenants;
mod tls;
mod tracing;
mod up;

use fleetbox_proto::{JobState, Status, TaskState};
use std::time::Duration;

use serde_json::json;

use api::{
    agents_show_their_trust, duplicate_late_and_forged_reports,
    malformed_specs_and_bodies_get_typed_errors, priorities_order_the_queue,
    reports_naming_blobs_are_checked, signed_reports_are_checked,
};
use audit::{
    sigkilled_coordinators_leave_a_whole_audit_log,
    the_audit_log_records_every_action_and_names_tampering, two_coordinators_keep_one_audit_chain,
};
use chaos::{
    a_coordinator_killed_mid_fold_is_replaced, an_eight_second_outage_reruns_nothing,
    frozen_agents_race_late_reports_across_two_coordinators,
};
use followups::{
    a_coordinator_killed_after_a_parent_completes_makes_its_child_once,
    chains_from_files_and_the_chain_tree, the_followup_switches_turn_rules_off,
};
use harness::{Cluster, Db};
use lies::failures_are_checked_like_successes;
use receipt::a_receipt_verifies_offline_and_names_every_forgery;
use sessions::a_session_on_a_killed_agent_is_lost;
use tracing::a_job_is_one_trace_from_submission_to_agents_and_back;
use up::sigterm_drains_and_hands_back;

/// `name_sqlite` and `name_postgres` tests for `async fn name(db: Db)`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::Postgres).await;
                }
            )*
        }
    };
}

on_both_stores!(
    a_receipt_verifies_offline_and_names_every_forgery,
    a_session_on_a_killed_agent_is_lost,
    failures_are_checked_like_successes,
    a_job_is_one_trace_from_submission_to_agents_and_back,
    hundred_shards_give_the_right_answer,
    killed_agent_shards_run_elsewhere,
    coordinator_restart_loses_no_report,
    partial_results_only_when_the_spec_allows_them,
    python_reducer_runs_on_the_server,
    sandbox_errors_retry_then_die,
    cancel_stops_a_job,
    duplicate_late_and_forged_reports,
    malformed_specs_and_bodies_get_typed_errors,
    sigterm_drains_and_hands_back,
    priorities_order_the_queue,
    large_outputs_go_to_the_blob_store,
    agents_reenroll_when_the_coordinator_forgets_them,
    shard_files_reach_the_blob_store,
    two_coordinators_share_one_database,
    frozen_agents_race_late_reports_across_two_coordinators,
    an_eight_second_outage_reruns_nothing,
    reports_naming_blobs_are_checked,
    the_audit_log_records_every_action_and_names_tampering,
    sigkilled_coordinators_leave_a_whole_audit_log,
    two_coordinators_keep_one_audit_chain,
    signed_reports_are_checked,
    agents_show_their_trust,
    a_coordinator_killed_after_a_parent_completes_makes_its_child_once,
    chains_from_files_and_the_chain_tree,
    the_followup_switches_turn_rules_off,
);

/// Needs a database that several coordinators share over the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_fold_is_replaced_postgres() {
    a_coordinator_killed_mid_fold_is_replaced(Db::Postgres).await;
}

const SUM_SQUARES: &str = r#"
name = "sum of squares"
code = """
import json, os
s = json.load(open(os.environ["FLEETBOX_INPUT"]))
print(sum(i * i for i in range(s["start"], s["end"])))
"""
aggregate = "sum"
[shards]
range = { start = 0, end = 100000, count = 100 }
"#;

fn sum_squares(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

async fn hundred_shards_give_the_right_answer(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    c.add_agent(2);
    let job = c.submit(SUM_SQUARES).await;
    assert_eq!(job.shards.total, 100);
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!(sum_squares(100_000))));
    let s = r.summary.unwrap();
    assert_eq!(
        (
            s.shards_total,
            s.shards_accepted,
            s.shards_failed,
            s.shards_dead
        ),
        (100, 100, 0, 0)
    );
    assert_eq!(s.success_rate, 1.0);
    assert!(!s.partial);
    assert_eq!(s.shard_wall_ms.count, 100);
    assert!(s.shard_peak_memory_bytes.median > 0.0);
    // Shards come in pages.
    let mut from = 0;
    let mut seen = 0;
    let mut pages = 0;
    loop {
        let page = c.client.shards_page(&job.id, from, 30, None).await.unwrap();
        assert!(
            page.shards
                .iter()
                .all(|s| s.state == TaskState::Accepted && s.index >= from)
        );
        seen += page.shards.len();
        pages += 1;
        match page.next {
            Some(n) => from = n,
            None => break,
        }
    }
    assert_eq!((seen, pages), (100, 4));
    let agents = c.client.agents().await.unwrap().agents;
    assert_eq!(agents.len(), 2);
    assert!(
        agents
            .iter()
            .all(|a| a.facts.cores > 0 && !a.facts.python.is_empty())
    );
}

async fn killed_agent_shards_run_elsewhere(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    let victim = c.add_agent(3);
    let job = c
        .submit(
            r#"
name = "slow squares"
code = """
import json, os, time
s = json.load(open(os.environ["FLEETBOX_INPUT"]))
time.sleep(0.4)
print(sum(i * i for i in range(s["start"], s["end"])))
"""
aggregate = "sum"
[shards]
range = { start = 0, end = 3000, count = 12 }
"#,
        )
        .await;
    // The victim holds three or more leases (slots + prefetch) mid-run when it dies.
    c.wait_for(&job.id, Duration::from_secs(30), |v| v.shards.leased >= 3)
        .await;
    c.kill_agent(victim);
    let killed_at = std::time::Instant::now();
    c.add_agent(2);
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!(sum_squares(3000))));
    let shards = c.client.shards(&job.id).await.unwrap().shards;
    let rerun = shards.iter().filter(|s| s.attempts >= 2).count();
    assert!(
        rerun >= 1,
        "the victim's shards must have run again: {shards:?}"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(60));
    let agents = c.client.agents().await.unwrap().agents;
    assert!(
        agents
            .iter()
            .any(|a| a.state == fleetbox_proto::AgentState::Lost),
        "{agents:?}"
    );
}

async fn coordinator_restart_loses_no_report(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    c.add_agent(2);
    let job = c
        .submit(
            r#"
name = "through a restart"
code = """
import json, os, time
s = json.load(open(os.environ["FLEETBOX_INPUT"]))
time.sleep(0.3)
print(sum(i * i for i in range(s["start"], s["end"])))
"""
aggregate = "sum"
[shards]
range = { start = 0, end = 4000, count = 40 }
"#,
        )
        .await;
    c.wait_for(&job.id, Duration::from_secs(30), |v| v.shards.accepted >= 4)
        .await;
    c.kill_server();
    // Agents finish what they hold; the reports wait in their outboxes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting: usize = (0..2)
        .map(|i| {
            std::fs::read_dir(c.agent_state(i).join("outbox"))
                .unwrap()
                .count()
        })
        .sum();
    assert!(
        waiting > 0,
        "reports should be waiting in the outboxes while the coordinator is down"
    );
    c.start_server();
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!(sum_squares(4000))));
    // Every report written while the coordinator was down arrived: outboxes drain to empty.
    for i in 0..2 {
        let dir = c.agent_state(i).join("outbox");
        let start = std::time::Instant::now();
        while std::fs::read_dir(&dir).unwrap().count() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "outbox {i} did not drain"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

const SOME_FAIL: &str = r#"
name = "some shards fail"
code = """
import json, os
items = json.load(open(os.environ["FLEETBOX_INPUT"]))["items"]
if items[0] % 3 == 0:
    raise ValueError(f"bad item {items[0]}")
print(sum(items))
"""
aggregate = "sum"
[shards]
items = [1, 2, 3, 4, 5, 6, 7]
"#;

async fn partial_results_only_when_the_spec_allows_them(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    // By default a job with failed shards fails, naming them, and shows no number.
    let job = c.submit(SOME_FAIL).await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed, "{r:?}");
    assert!(r.result.is_none(), "{r:?}");
    let error = r.error.clone().unwrap();
    for named in [
        "2 of 7 shards did not succeed (2 failed, 0 dead)",
        "shard 2: error: ValueError: bad item 3",
        "shard 5: error: ValueError: bad item 6",
        "allow_partial",
    ] {
        assert!(error.contains(named), "{named:?} in {error:?}");
    }
    // Below `min_success_rate` too (5 of 7 is 71%).
    let job = c
        .submit(&SOME_FAIL.replace(
            "aggregate = \"sum\"",
            "aggregate = \"sum\"\nmin_success_rate = 0.8",
        ))
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed, "{r:?}");
    assert!(r.error.unwrap().contains("needs 80%"));
    // At or above it, or with `allow_partial`, the job completes, marked partial.
    let job = c
        .submit(&SOME_FAIL.replace(
            "aggregate = \"sum\"",
            "aggregate = \"sum\"\nmin_success_rate = 0.7",
        ))
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert!(r.summary.unwrap().partial);
    let job = c
        .submit(&SOME_FAIL.replace(
            "aggregate = \"sum\"",
            "aggregate = \"sum\"\nallow_partial = true",
        ))
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!(1 + 2 + 4 + 5 + 7)));
    let s = r.summary.unwrap();
    assert_eq!((s.shards_accepted, s.shards_failed), (5, 2));
    assert!(s.partial);
    assert!(
        s.notes.iter().any(|n| n.contains("ValueError: bad item 3")),
        "{:?}",
        s.notes
    );
    // Program errors are final: no retries.
    assert_eq!(s.attempts, 7);
    let rejected = c
        .client
        .shards_page(&job.id, 0, 100, Some("rejected"))
        .await
        .unwrap();
    let idx: Vec<u64> = rejected.shards.iter().map(|s| s.index).collect();
    assert_eq!(idx, vec![2, 5]);
    let shards = c.client.shards(&job.id).await.unwrap().shards;
    assert_eq!(shards[2].state, TaskState::Rejected);
    assert_eq!(shards[2].status, Some(Status::Error));

    // Nothing succeeds: the job fails and says why.
    let job = c
        .submit("name = \"all fail\"\ncode = \"raise SystemExit(3)\"\nshards = { count = 2 }\n")
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed);
    assert!(r.error.unwrap().contains("no shard succeeded"));
    let job = c
        .submit("name = \"none\"\nallow_partial = true\ncode = \"raise SystemExit(3)\"\nshards = { count = 2 }\n")
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(
        r.state,
        JobState::Failed,
        "allow_partial never completes with nothing"
    );
}

async fn python_reducer_runs_on_the_server(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    let job = c
        .submit(
            r#"
name = "python reducer"
code = "import os; print(int(os.environ['FLEETBOX_SHARD_INDEX']) + 1)"
shards = { count = 5 }
[aggregate]
reducer = "python"
code = """
import json, os
values = json.load(open(os.environ["FLEETBOX_INPUT"]))
print(json.dumps({"product": __import__("math").prod(values), "n": len(values)}))
"""
"#,
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!({"product": 120, "n": 5})));
}

/// Server-only code runs on the coordinator's own server agent (in its jail, under the
/// re-check limits), never on an ordinary agent waiting beside it; ordinary code never runs
/// on the server agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_only_code_runs_on_the_coordinators_server_agent() {
    let Some(mut c) = Cluster::start_with(Db::Sqlite, &["--backend", "jail"]).await else {
        return;
    };
    c.add_agent(1);
    let code = "import socket\ns = socket.socket()\ns.close()\nprint(2)\n";
    let server_only = c
        .submit(&format!(
            "name = \"server only\"\ncode = {code:?}\naggregate = \"sum\"\nshards = {{ count = 3 }}\n"
        ))
        .await;
    let ordinary = c
        .submit("name = \"ordinary\"\ncode = \"print(1)\"\naggregate = \"sum\"\nshards = { count = 3 }\n")
        .await;
    for (job, value) in [(&server_only, 6), (&ordinary, 3)] {
        let r = c.wait(&job.id, Duration::from_secs(60)).await;
        assert_eq!(r.state, JobState::Completed, "{r:?}");
        assert_eq!(r.result_value(), Some(json!(value)));
    }
    let agents = c.client.agents().await.unwrap().agents;
    let server = agents
        .iter()
        .find(|a| a.name == "server-1")
        .expect("a server agent");
    assert!(server.hardened, "{server:?}");
    assert!(server.labels.iter().any(|l| l == "hardened"));
    for i in 0..3 {
        let d = c.client.shard(&server_only.id, i).await.unwrap();
        assert!(
            d.attempts.iter().all(|a| a.agent_id == server.id),
            "{:?}",
            d.attempts
        );
        assert_eq!(d.attempts[0].report["backend"], "jail");
        let d = c.client.shard(&ordinary.id, i).await.unwrap();
        assert!(d.attempts.iter().all(|a| a.agent_id != server.id));
    }
}

/// The coordinator's own sandbox is the jail with the allow-list policy: a reducer runs in it,
/// and one making a call off the list (`tuxcall`, which the deny list would let through to the
/// kernel's `ENOSYS`) fails with that call named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_reducer_runs_in_a_jail_with_the_allow_list() {
    let Some(mut c) = Cluster::start_with(Db::Sqlite, &["--backend", "jail"]).await else {
        return;
    };
    c.add_agent(2);
    let spec = |reducer: &str| {
        format!(
            "name = \"jailed reducer\"\ncode = \"import os; print(int(os.environ['FLEETBOX_SHARD_INDEX']) + 1)\"\nshards = {{ count = 4 }}\nmax_attempts = 1\n[aggregate]\nreducer = \"python\"\ncode = \"\"\"\n{reducer}\n\"\"\"\n"
        )
    };
    let job = c
        .submit(&spec(
            "import json, os\nprint(sum(json.load(open(os.environ['FLEETBOX_INPUT']))) * 10)",
        ))
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!(100)));
    let job = c
        .submit(&spec(
            "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.syscall(184)\nprint(1)",
        ))
        .await;
    let r = c.wait(&job.id, Duration::from_secs(90)).await;
    assert_eq!(r.state, JobState::Failed, "{r:?}");
    let why = r.error.unwrap_or_default();
    assert!(why.contains("tuxcall"), "{why}");
}

async fn sandbox_errors_retry_then_die(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    // An agent whose interpreter is missing: every run is a `sandbox_error`.
    let state = c.dir.path().join("broken-agent");
    let broken = harness::agent_command(&c.url(), &state, 1)
        .env("FLEETBOX_PYTHON", "/nonexistent/python3")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.agents.push(broken);
    let job = c
        .submit(
            "name = \"doomed\"\ncode = \"print(1)\"\nshards = { count = 2 }\nmax_attempts = 3\n",
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed, "{r:?}");
    let shards = c.client.shards(&job.id).await.unwrap().shards;
    for s in &shards {
        assert_eq!(s.state, TaskState::Dead, "{s:?}");
        assert_eq!(s.attempts, 3, "{s:?}");
        assert!(
            s.error.as_deref().unwrap_or("").contains("sandbox_error"),
            "{s:?}"
        );
    }
}

async fn cancel_stops_a_job(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(1);
    let job = c
        .submit(
            "name = \"long\"\ncode = \"import time; time.sleep(30)\"\nshards = { count = 50 }\nlimits = { timeout = \"60s\", cpu_time = \"60s\" }\n",
        )
        .await;
    c.wait_for(&job.id, Duration::from_secs(30), |v| v.shards.leased > 0)
        .await;
    let v = c.client.cancel(&job.id).await.unwrap();
    assert_eq!(v.state, JobState::Cancelled);
    assert!(v.shards.dead >= 49, "{v:?}");
    let again = c.client.cancel(&job.id).await.unwrap_err();
    assert_eq!(again.code(), Some("job_finished"));
    // The running shard is stopped on the agent (told by its next heartbeat), not left to finish.
    let start = std::time::Instant::now();
    loop {
        let detail = c.client.shard(&job.id, 0).await.unwrap();
        if let Some(a) = detail.attempts.first() {
            assert_eq!(a.status, Status::Killed, "{a:?}");
            let message = a.report["message"].as_str().unwrap_or_default();
            assert!(message.starts_with("cancelled:"), "{a:?}");
            assert!(a.report["wall_ms"].as_u64().unwrap() < 20_000);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the running shard was not stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The coordinator goes on: a new job still completes.
    let job = c
        .submit(
            "name = \"after\"\ncode = \"print(2)\"\nshards = { count = 2 }\naggregate = \"sum\"\n",
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.result_value(), Some(json!(4)));
}

async fn large_outputs_go_to_the_blob_store(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    let job = c
        .submit(
            r#"
name = "big outputs"
code = """
import json, os
i = int(os.environ["FLEETBOX_SHARD_INDEX"])
print(json.dumps(list(range(i * 5000, (i + 1) * 5000))))
"""
aggregate = "concat"
shards = { count = 2 }
[limits]
max_output = "1MiB"
"#,
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(
        r.result_value(),
        Some(json!((0..10_000).collect::<Vec<u32>>()))
    );
    let detail = c.client.shard(&job.id, 1).await.unwrap();
    let attempt = &detail.attempts[0];
    let blob = attempt
        .stdout_blob
        .clone()
        .expect("stdout over 4 KiB is a blob");
    assert_eq!(
        attempt.report["stdout"], "",
        "the row keeps the hash, not the bytes"
    );
    let path = c.data().join("blobs").join(&blob[..2]).join(&blob);
    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(stored.starts_with("[5000, 5001"), "{}", &stored[..40]);
    assert_eq!(attempt.report["stdout_sha256"], blob);
}

/// A coordinator that lost its database (a reset, a new deployment) no longer knows the agents'
/// tokens: they enroll again with the enrollment token and go on working.
async fn agents_reenroll_when_the_coordinator_forgets_them(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(1);
    let job = c
        .submit(
            "name = \"before\"\ncode = \"print(1)\"\nshards = { count = 2 }\naggregate = \"sum\"\n",
        )
        .await;
    assert_eq!(
        c.wait(&job.id, Duration::from_secs(60))
            .await
            .result_value(),
        Some(json!(2))
    );
    let before = std::fs::read_to_string(c.agent_state(0).join("agent.json")).unwrap();

    c.kill_server();
    match db {
        Db::Sqlite => std::fs::remove_dir_all(c.data()).unwrap(),
        Db::Postgres | Db::PostgresSchemas => c.database_url = harness::postgres_database().await,
    }
    c.start_server();
    let job = c
        .submit(
            "name = \"after\"\ncode = \"print(3)\"\nshards = { count = 2 }\naggregate = \"sum\"\n",
        )
        .await;
    assert_eq!(
        c.wait(&job.id, Duration::from_secs(60))
            .await
            .result_value(),
        Some(json!(6))
    );
    let after = std::fs::read_to_string(c.agent_state(0).join("agent.json")).unwrap();
    assert_ne!(before, after, "a new identity was saved");
    assert_eq!(c.client.agents().await.unwrap().agents.len(), 1);
}

/// Files a shard writes travel with its report into the blob store, by hash; a symlink the
/// program planted is not followed.
async fn shard_files_reach_the_blob_store(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(1);
    let job = c
        .submit(
            r#"
name = "files"
code = """
import os
open("result.bin", "wb").write(bytes(range(256)) * 400)
os.makedirs("sub", exist_ok=True)
open("sub/note.txt", "w").write("hello")
# Computed, so the code review (which refuses a literal `/etc/shadow`) lets it through: the
# agent's upload rules are what this tests.
os.symlink(os.path.join(os.sep, "etc", "shadow"), "leak")
print(1)
"""
shards = { count = 1 }
"#,
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    let detail = c.client.shard(&job.id, 0).await.unwrap();
    let files = detail.attempts[0].report["files"]
        .as_array()
        .unwrap()
        .clone();
    let sha_of = |name: &str| -> String {
        files
            .iter()
            .find(|f| f["path"] == name)
            .and_then(|f| f["sha256"].as_str())
            .unwrap_or_else(|| panic!("{name} not listed with a hash: {files:?}"))
            .to_string()
    };
    let big = c.client.get_blob(&sha_of("result.bin")).await.unwrap();
    assert_eq!(big, (0..=255u8).collect::<Vec<u8>>().repeat(400));
    assert_eq!(
        c.client.get_blob(&sha_of("sub/note.txt")).await.unwrap(),
        b"hello"
    );
    // The planted symlink: never read, never uploaded.
    use sha2::Digest;
    let shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    let shadow_sha = hex::encode(sha2::Sha256::digest(&shadow));
    let err = c.client.get_blob(&shadow_sha).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
    // A file a job made is one command away: listed by `--files`, saved by `--file PATH`.
    let cli = |args: &[&str]| {
        std::process::Command::new(crate::support::bin())
            .args(args)
            .args(["--server", &c.url(), "--token", harness::ADMIN])
            .output()
            .unwrap()
    };
    let listed = cli(&["job", &job.id, "--files"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("sub/note.txt") && listed.contains("result.bin"),
        "{listed}"
    );
    let saved = c.dir.path().join("note.txt");
    let out = cli(&[
        "job",
        &job.id,
        "--file",
        "sub/note.txt",
        "-o",
        saved.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&saved).unwrap(), b"hello");
    let out = cli(&["job", &job.id, "--file", "nowhere.txt"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--files"),
        "{out:?}"
    );
    // The agent cleaned up after itself: no run directory, no outbox blobs left.
    let blobs = c.agent_state(0).join("outbox").join("blobs");
    let start = std::time::Instant::now();
    while std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "outbox blobs not cleared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two coordinators on one database, an agent on each: every shard runs once (leases never
/// overlap: `FOR UPDATE SKIP LOCKED` on PostgreSQL, the database lock on SQLite), both agents
/// work, and the job is folded once with the right answer.
async fn two_coordinators_share_one_database(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    let (second, port2) = c.spawn_server(0, "server2.log");
    let mut second = KillOnDrop(second);
    c.add_agent(2);
    c.add_agent_to(&format!("http://127.0.0.1:{port2}"), 2);
    let job = c
        .submit(
            r#"
name = "shared queue"
code = """
import json, os, time
s = json.load(open(os.environ["FLEETBOX_INPUT"]))
time.sleep(0.05)
print(sum(i * i for i in range(s["start"], s["end"])))
"""
aggregate = "sum"
[shards]
range = { start = 0, end = 6000, count = 60 }
"#,
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!(sum_squares(6000))));
    let s = r.summary.unwrap();
    assert_eq!(
        (s.shards_accepted, s.attempts),
        (60, 60),
        "no shard ran twice"
    );
    let shards = c.client.shards(&job.id).await.unwrap().shards;
    let agents: std::collections::HashSet<_> =
        shards.iter().filter_map(|s| s.agent_id.clone()).collect();
    assert_eq!(
        agents.len(),
        2,
        "both coordinators handed out work: {agents:?}"
    );
    // The second coordinator answers for the same job.
    let other = fleetbox_client::Client::new(&format!("http://127.0.0.1:{port2}"), harness::ADMIN);
    assert_eq!(
        other.result(&job.id).await.unwrap().result_value(),
        Some(json!(sum_squares(6000)))
    );
    let _ = second.0.kill();
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
