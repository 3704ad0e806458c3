//! Operators' controls on jobs through the API: pause and resume, priority, and running a
//! finished job's failed shards again. Each needs an admin token and is audited.

use std::time::{Duration, Instant};

use fleetbox_proto::JobState;
use fleetbox_proto::api::{JobView, LeaseRequest};
use fleetbox_testkit::SignedAgent;
use serde_json::{Value, json};

use crate::support::{BOTH, Coordinator, spec};

/// `POST /v1/jobs/{id}/{verb}` with `body` and `token`: the status and the JSON answer.
async fn control(c: &Coordinator, token: &str, id: &str, verb: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/jobs/{id}/{verb}", c.running.url()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn entries(
    c: &Coordinator,
    job: &str,
    action: &str,
) -> Vec<fleetbox_proto::api::AuditRecord> {
    c.client
        .audit(&format!("job={job}&action={action}"))
        .await
        .unwrap()
        .entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_waits_and_a_resumed_one_finishes() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let admin = c.running.admin_token.clone();
        let job = |name: &str| {
            spec(&format!(
                "name = \"{name}\"\ncode = \"print(1)\"\nshards = {{ count = 4 }}\naggregate = \"sum\"\n"
            ))
        };
        let paused = c.client.submit(&job("paused")).await.unwrap();
        let other = c.client.submit(&job("other")).await.unwrap();
        let (status, view) = control(&c, &admin, &paused.id, "pause", json!({})).await;
        assert_eq!(status, 200, "{db:?}: {view}");
        assert_eq!(view["paused"], true);
        // Only an admin token; an unknown job is a 404.
        let (status, _) =
            control(&c, &c.running.enroll_token, &paused.id, "pause", json!({})).await;
        assert_eq!(status, 403);
        let (status, body) = control(&c, &admin, "job_nope", "pause", json!({})).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );

        c.agent("a", Default::default());
        let r = c.wait(&other.id, Duration::from_secs(60)).await;
        assert_eq!(r.state, JobState::Completed, "{db:?}");
        // The paused job's shards stayed queued all along.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v: JobView = c.client.job(&paused.id).await.unwrap();
        assert!(v.paused, "{v:?}");
        assert_eq!(
            (v.shards.queued, v.state),
            (4, JobState::Running),
            "{db:?}: {v:?}"
        );

        let (status, view) = control(&c, &admin, &paused.id, "resume", json!({})).await;
        assert_eq!((status, view["paused"].as_bool()), (200, Some(false)));
        let r = c.wait(&paused.id, Duration::from_secs(60)).await;
        assert_eq!(
            (r.state, r.result_value()),
            (JobState::Completed, Some(json!(4)))
        );
        // Once final, there is nothing to pause.
        let (status, body) = control(&c, &admin, &paused.id, "pause", json!({})).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (409, Some("job_finished"))
        );
        let paused_by = entries(&c, &paused.id, "job.paused").await;
        assert_eq!(paused_by.len(), 1, "{db:?}");
        assert!(paused_by[0].actor.starts_with("admin:"), "{paused_by:?}");
        assert_eq!(entries(&c, &paused.id, "job.resumed").await.len(), 1);
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_priority_reorders_the_queue() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let admin = c.running.admin_token.clone();
        let job = |name: &str| {
            spec(&format!(
                "name = \"{name}\"\ncode = \"print(1)\"\nshards = {{ count = 2 }}\n"
            ))
        };
        let first = c.client.submit(&job("first")).await.unwrap();
        let second = c.client.submit(&job("second")).await.unwrap();
        let (status, view) =
            control(&c, &admin, &second.id, "priority", json!({"priority": 10})).await;
        assert_eq!(
            (status, view["priority"].as_i64()),
            (200, Some(10)),
            "{db:?}: {view}"
        );
        // Malformed bodies are typed errors.
        let (status, body) = control(
            &c,
            &admin,
            &second.id,
            "priority",
            json!({"priority": "high"}),
        )
        .await;
        assert_eq!(
            (status, body["error"]["field"].as_str()),
            (400, Some("priority")),
            "{body}"
        );
        // The queue now hands out the re-prioritised job's shards first.
        let agent = SignedAgent::enroll(&c.running.url(), &c.running.enroll_token, "p").await;
        let lease = agent
            .lease(&LeaseRequest {
                max_tasks: 2,
                wait_ms: 2000,
                backend: None,
                hardened_only: false,
                cached_code: Vec::new(),
                sessions: false,
            })
            .await
            .unwrap();
        let jobs: Vec<&str> = lease.tasks.iter().map(|t| t.job_id.as_str()).collect();
        assert_eq!(jobs, [second.id.as_str(), second.id.as_str()], "{db:?}");
        let changed = entries(&c, &second.id, "job.priority_changed").await;
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].details["priority"], 10);
        assert_eq!(c.client.job(&first.id).await.unwrap().priority, 0);
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_shards_run_again_as_a_child_that_folds_over_the_parent() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a", Default::default());
        let admin = c.running.admin_token.clone();
        // Shard 2 fails until the marker exists (a re-run keeps the shard's input, not its
        // index: the child has one shard).
        let marker = c.dir.path().join("fixed");
        let code = format!(
            "import json, os, pathlib\ni = json.load(open(os.environ['FLEETBOX_INPUT']))['index']\nif i == 2 and not pathlib.Path({:?}).exists():\n    raise SystemExit(3)\nprint(i + 1)\n",
            marker.display().to_string()
        );
        let parent = c
            .client
            .submit(&spec(&format!(
                "name = \"flaky\"\ncode = {code:?}\nshards = {{ count = 4 }}\naggregate = \"sum\"\nmax_attempts = 1\n"
            )))
            .await
            .unwrap();
        // Not while it runs.
        let (status, body) = control(&c, &admin, &parent.id, "rerun-failed", json!({})).await;
        if status != 201 {
            assert!(matches!(status, 409), "{db:?}: {body}");
        }
        // A shard failed: the parent fails, naming it, with no partial number.
        let r = c.wait(&parent.id, Duration::from_secs(60)).await;
        assert_eq!(r.state, JobState::Failed, "{db:?}: {r:?}");
        assert_eq!(r.result_value(), None, "{db:?}: {r:?}");
        assert!(
            r.error.as_deref().unwrap().contains("shard 2: "),
            "{db:?}: {r:?}"
        );
        std::fs::write(&marker, "").unwrap();
        let (status, body) = control(&c, &admin, &parent.id, "rerun-failed", json!({})).await;
        assert_eq!(status, 201, "{db:?}: {body}");
        assert_eq!(body["shards"], json!([2]));
        let child = body["job_id"].as_str().unwrap().to_string();
        let r = c.wait(&child, Duration::from_secs(60)).await;
        // The child's result folds the parent's accepted values with the re-run one.
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        assert_eq!(
            r.result_value(),
            Some(json!(1 + 2 + 3 + 4)),
            "{db:?}: {r:?}"
        );
        let view = c.client.job(&child).await.unwrap();
        let lineage = view.lineage.unwrap();
        assert_eq!(lineage.parent_job_id, parent.id);
        let submitted = entries(&c, &child, "job.submitted").await;
        assert!(submitted[0].actor.starts_with("admin:"), "{submitted:?}");
        // The child has nothing failed: nothing to run again.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (status, body) = loop {
            let got = control(&c, &admin, &child, "rerun-failed", json!({})).await;
            if got.0 != 409 || got.1["error"]["code"] != "job_running" || Instant::now() > deadline
            {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (409, Some("nothing_to_rerun")),
            "{body}"
        );
        c.stop().await;
    }
}

/// A lease names the programs the agent holds by hash: a task of one of those comes without
/// its code, the others in full; more hashes than allowed is a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_the_agent_holds_is_named_not_sent() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let code = "print(1)\n";
        c.client
            .submit(&spec(&format!(
                "name = \"by hash\"\ncode = {code:?}\nshards = {{ count = 3 }}\n"
            )))
            .await
            .unwrap();
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(code.as_bytes()))
        };
        let agent = SignedAgent::enroll(&c.running.url(), &c.running.enroll_token, "h").await;
        let lease = |cached_code: Vec<String>| LeaseRequest {
            max_tasks: 1,
            wait_ms: 2000,
            backend: None,
            hardened_only: false,
            cached_code,
            sessions: false,
        };
        let full = agent.lease(&lease(Vec::new())).await.unwrap();
        assert_eq!(full.tasks[0].code, code, "{db:?}");
        assert_eq!(full.tasks[0].code_sha256, sha);
        let named = agent
            .lease(&lease(vec!["0".repeat(64), sha.clone()]))
            .await
            .unwrap();
        assert_eq!(named.tasks[0].code, "", "{db:?}");
        assert_eq!(named.tasks[0].code_sha256, sha);
        let err = agent
            .lease(&lease(vec![sha.clone(); 65]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("invalid_body"), "{db:?}: {err}");
        c.stop().await;
    }
}
