//! A signed agent that lies about failures, against a real coordinator whose re-checks run in
//! the jail: its `error` and `sandbox_violation` reports are checked like successes, it is
//! struck and quarantined, nothing it claimed is folded, and only a violation the server
//! reproduces holds a job. A refusal is not a result: the shard goes to another agent.

use std::time::Duration;

use fleetbox_proto::api::{LeaseRequest, LeasedTask, ReportBatch, ShardReport};
use fleetbox_proto::{ExecutionReport, JobState, Status};
use fleetbox_testkit::SignedAgent;
use serde_json::json;

use super::harness::{Cluster, Db, ENROLL};

/// Each shard prints the sum of the squares of its items.
const SQUARES: &str = "import json, os\nitems = json.load(open(os.environ['FLEETBOX_INPUT']))['items']\nprint(sum(i * i for i in items))\n";

/// A shard that calls `mount`: a violation in the jail.
const MOUNTS: &str =
    "import ctypes\nctypes.CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None)\nprint(1)\n";

async fn lease(agent: &SignedAgent, n: u32) -> Vec<LeasedTask> {
    let req = LeaseRequest {
        max_tasks: n,
        wait_ms: 0,
        backend: None,
        hardened_only: false,
        cached_code: Vec::new(),
        sessions: false,
    };
    agent.lease(&req).await.unwrap().tasks
}

/// Report `status` for each of `tasks`, signed, as the agent's own runs.
async fn report_all(agent: &SignedAgent, tasks: &[LeasedTask], status: Status, message: &str) {
    let reports = tasks
        .iter()
        .map(|t| {
            let mut report = ExecutionReport::unmeasured(status, None);
            report.message = Some(message.into());
            let mut r = ShardReport::new(t.lease_id.clone(), t.task_id, report);
            r.attempt = t.attempt;
            r
        })
        .collect();
    let ack = agent.report(&ReportBatch { reports }).await.unwrap();
    assert!(
        ack.results.iter().all(|r| r.outcome == "accepted"),
        "{ack:?}"
    );
}

/// The server's findings about `agent`'s attempts.
async fn findings(c: &Cluster, agent: &str) -> Vec<String> {
    let page = c
        .client
        .audit(&format!("action=attempt.verified&agent={agent}&limit=1000"))
        .await
        .unwrap();
    page.entries
        .iter()
        .map(|e| e.details["finding"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn quarantined(c: &Cluster, agent: &str) -> bool {
    let agents = c.client.agents().await.unwrap().agents;
    agents
        .iter()
        .find(|a| a.id == agent)
        .is_some_and(|a| a.quarantined.is_some())
}

pub async fn failures_are_checked_like_successes(db: Db) {
    // No server agent: the violation is the signed witness's, whom an operator lets run
    // server-only code (as `mount` is).
    let Some(mut c) = Cluster::start_with(db, &["--backend", "jail", "--server-agents", "0"]).await
    else {
        return;
    };

    // 1. A violation the server reproduces holds the job, though its reporter is not trusted.
    let held = c
        .submit(&format!(
            "name = \"mounts\"\ncode = {MOUNTS:?}\nshards = {{ count = 3 }}\n"
        ))
        .await;
    let witness = SignedAgent::enroll(&c.url(), ENROLL, "witness").await;
    c.client
        .mark_hardened(&witness.agent_id, true)
        .await
        .unwrap();
    let one = lease(&witness, 1).await;
    report_all(&witness, &one, Status::SandboxViolation, "forbidden: mount").await;
    c.wait_for(&held.id, Duration::from_secs(60), |j| {
        j.state == JobState::PendingReview
    })
    .await;
    let flags = c
        .client
        .review_flags(&format!("job={}&kind=violation", held.id))
        .await
        .unwrap()
        .flags;
    assert_eq!(flags.len(), 1, "{db:?}: {flags:?}");
    assert_eq!(flags[0].details["held"], true, "{flags:?}");
    assert!(
        flags[0].details["reason"]
            .as_str()
            .unwrap_or("")
            .contains("mount"),
        "the server's own reason: {flags:?}"
    );
    assert_eq!(findings(&c, &witness.agent_id).await, ["failure_confirmed"]);
    assert!(!quarantined(&c, &witness.agent_id).await);
    c.client
        .decide_flag(flags[0].id, false, None)
        .await
        .unwrap();

    // 2. Three violations the server does not reproduce (the whole job): no hold, a strike
    // each, quarantine; the shards take the server's values.
    let clean = c
        .submit(
            "name = \"clean\"\ncode = \"print(2)\"\naggregate = \"sum\"\nshards = { count = 3 }\n",
        )
        .await;
    let liar = SignedAgent::enroll(&c.url(), ENROLL, "violations").await;
    let three = lease(&liar, 3).await;
    assert_eq!(three.len(), 3);
    report_all(&liar, &three, Status::SandboxViolation, "forbidden: mount").await;

    // 3. A liar that reports `error` on 3 of 10 shards of a sum.
    let items: Vec<u64> = (0..10_000).map(|i| 3_000_000 + i).collect();
    let sum = c
        .submit(&format!(
            "name = \"sum\"\ncode = {SQUARES:?}\naggregate = \"sum\"\n[shards]\nitems = {}\nper_shard = 1000\n",
            json!(items)
        ))
        .await;
    // About 9.1e16: past 2^53, exact only as an integer.
    let exact: u64 = items.iter().map(|&i| i * i).sum();
    let errors = SignedAgent::enroll(&c.url(), ENROLL, "errors").await;
    let failed = lease(&errors, 3).await;
    assert_eq!(failed.len(), 3);
    report_all(
        &errors,
        &failed,
        Status::Error,
        "ZeroDivisionError: division by zero",
    )
    .await;

    // 4. A refusal is not a result: two more shards of the sum, refused, go to other agents
    // (never back to the refuser) and cost it nothing. A bystander is online, so someone
    // else could run them.
    let refuser = SignedAgent::enroll(&c.url(), ENROLL, "refuser").await;
    let _bystander = SignedAgent::enroll(&c.url(), ENROLL, "bystander").await;
    let refused = lease(&refuser, 2).await;
    assert_eq!(refused.len(), 2);
    assert!(refused.iter().all(|t| t.job_id == sum.id), "{refused:?}");
    report_all(
        &refuser,
        &refused,
        Status::Refused,
        "refused: this agent does not run such code",
    )
    .await;

    // Honest agents run the rest.
    c.add_agent(2);
    let clean = c.wait(&clean.id, Duration::from_secs(120)).await;
    assert_eq!(clean.state, JobState::Completed, "{db:?}: {clean:?}");
    assert_eq!(clean.result_value(), Some(json!(6)), "{db:?}");
    let flags = clean.summary.as_ref().unwrap().flags.clone();
    assert_eq!(
        flags
            .iter()
            .filter(|f| f.kind == "agent_result_invalid")
            .count(),
        3,
        "{flags:?}"
    );
    assert_eq!(
        findings(&c, &liar.agent_id).await,
        ["succeeds_on_server"; 3],
        "{db:?}"
    );
    assert!(quarantined(&c, &liar.agent_id).await, "{db:?}");
    let held_audit = c
        .client
        .audit(&format!("action=review.held&job={}", clean.id))
        .await
        .unwrap();
    assert!(held_audit.entries.is_empty(), "{held_audit:?}");

    let sum = c.wait(&sum.id, Duration::from_secs(180)).await;
    assert_eq!(sum.state, JobState::Completed, "{db:?}: {sum:?}");
    assert_eq!(
        sum.result_value(),
        Some(json!(exact)),
        "{db:?}: nothing short"
    );
    assert_eq!(
        findings(&c, &errors.agent_id).await,
        ["succeeds_on_server"; 3],
        "{db:?}"
    );
    assert!(quarantined(&c, &errors.agent_id).await, "{db:?}");
    for t in &refused {
        let shard = c.client.shard(&sum.id, t.shard_index).await.unwrap();
        let by: Vec<(&str, Status)> = shard
            .attempts
            .iter()
            .map(|a| (a.agent_id.as_str(), a.status))
            .collect();
        // Its refusal, then another agent's run (and the server's check of it, maybe).
        assert_eq!(
            by[0],
            (refuser.agent_id.as_str(), Status::Refused),
            "{db:?}"
        );
        assert!(
            by[1..]
                .iter()
                .all(|(agent, status)| *agent != refuser.agent_id && *status == Status::Ok),
            "{db:?}: {by:?}"
        );
        assert_eq!(shard.shard.state, fleetbox_proto::TaskState::Accepted);
    }
    assert!(findings(&c, &refuser.agent_id).await.is_empty(), "{db:?}");
    assert!(!quarantined(&c, &refuser.agent_id).await, "{db:?}");
}
