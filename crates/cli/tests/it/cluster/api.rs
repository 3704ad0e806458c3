//! The API under hostile use: replayed, late and forged reports; malformed specs and bodies.

use fleetbox_proto::JobState;
use std::time::Duration;

use fleetbox_proto::api::{LeaseRequest, ReportBatch, ShardReport};
use fleetbox_proto::{ExecutionReport, Status};
use serde_json::{Value, json};
use sha2::Digest;

use super::harness::{ADMIN, Cluster, Db, ENROLL};
use fleetbox_testkit::SignedAgent;

async fn fake_agent(c: &Cluster, name: &str) -> SignedAgent {
    SignedAgent::enroll(&c.url(), ENROLL, name).await
}

fn ok_report(lease_id: &str, task_id: i64, attempt: u32, value: Value) -> ReportBatch {
    let mut report = ShardReport::new(
        lease_id,
        task_id,
        ExecutionReport::unmeasured(Status::Ok, Some(value)),
    );
    report.attempt = attempt;
    ReportBatch {
        reports: vec![report],
    }
}

async fn outcome(agent: &SignedAgent, batch: &ReportBatch) -> String {
    agent.report(batch).await.unwrap().results[0]
        .outcome
        .clone()
}

pub async fn duplicate_late_and_forged_reports(db: Db) {
    let Some(c) = Cluster::start(db).await else {
        return;
    };
    let job = c
        .submit(
            // Settling by hand, attempt by attempt: no server re-checks in between.
            "name = \"one\"\ncode = \"print(1)\"\nshards = { count = 1 }\naggregate = \"sum\"\n[verify]\nrecheck = \"none\"\n",
        )
        .await;
    let a = fake_agent(&c, "a").await;
    let b = fake_agent(&c, "b").await;
    let lease = a
        .lease(&LeaseRequest {
            max_tasks: 5,
            wait_ms: 2000,
            backend: None,
            hardened_only: false,
            cached_code: Vec::new(),
            sessions: false,
        })
        .await
        .unwrap();
    assert_eq!(lease.tasks.len(), 1);
    let t1 = lease.tasks[0].clone();
    assert_eq!(t1.attempt, 1);

    // Forged: a lease that was never issued, and someone else's lease.
    assert_eq!(
        outcome(&a, &ok_report("deadbeef.1", t1.task_id, 1, json!(1))).await,
        "unknown"
    );
    assert_eq!(
        outcome(
            &b,
            &ok_report(&t1.lease_id, t1.task_id, t1.attempt, json!(1))
        )
        .await,
        "unknown"
    );
    // A lease id with the wrong task id.
    assert_eq!(
        outcome(
            &a,
            &ok_report(&t1.lease_id, t1.task_id + 99, t1.attempt, json!(1))
        )
        .await,
        "unknown"
    );

    // `a` goes silent: it is lost and its lease is re-issued to `b`.
    let lease_b = b
        .lease(&LeaseRequest {
            max_tasks: 5,
            wait_ms: 10_000,
            backend: None,
            hardened_only: false,
            cached_code: Vec::new(),
            sessions: false,
        })
        .await
        .unwrap();
    assert_eq!(
        lease_b.tasks.len(),
        1,
        "the lost agent's shard must be leased again"
    );
    let t2 = lease_b.tasks[0].clone();
    assert_eq!(t2.task_id, t1.task_id);
    assert_eq!(t2.attempt, 2);
    assert_ne!(t2.lease_id, t1.lease_id);

    // The old lease reports after all: kept and, being a success, it settles the shard.
    assert_eq!(
        outcome(
            &a,
            &ok_report(&t1.lease_id, t1.task_id, t1.attempt, json!(1))
        )
        .await,
        "late"
    );
    // The same report again: stored once.
    assert_eq!(
        outcome(
            &a,
            &ok_report(&t1.lease_id, t1.task_id, t1.attempt, json!(1))
        )
        .await,
        "duplicate"
    );
    // The re-issued lease reports: an extra attempt, never lost.
    assert_eq!(
        outcome(
            &b,
            &ok_report(&t2.lease_id, t2.task_id, t2.attempt, json!(1))
        )
        .await,
        "late"
    );
    assert_eq!(
        outcome(
            &b,
            &ok_report(&t2.lease_id, t2.task_id, t2.attempt, json!(1))
        )
        .await,
        "duplicate"
    );

    let r = c.wait(&job.id, Duration::from_secs(30)).await;
    assert_eq!(r.state, JobState::Completed);
    assert_eq!(r.result_value(), Some(json!(1)));
    let detail = c.client.shard(&job.id, 0).await.unwrap();
    assert_eq!(
        detail.attempts.len(),
        2,
        "both executions are kept: {detail:?}"
    );
    assert!(detail.attempts.iter().all(|a| a.late));
    assert_eq!(detail.attempts.iter().filter(|a| a.chosen).count(), 1);
    assert_eq!(detail.attempts[0].lease_id, t1.lease_id);
    assert_eq!(detail.input, json!({"index": 0}));
}

/// A raw request: (status, body, x-trace-id header).
async fn raw(
    c: &Cluster,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value, String) {
    let http = reqwest::Client::new();
    let url = format!("{}{path}", c.url());
    let mut req = match method {
        "GET" => http.get(&url),
        "DELETE" => http.delete(&url),
        "PUT" => http.put(&url),
        _ => http.post(&url),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let trace = resp
        .headers()
        .get("x-trace-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, trace)
}

/// (method, path, token, body, expected status, error code, field)
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    u16,
    &'a str,
    Option<&'a str>,
);

pub async fn malformed_specs_and_bodies_get_typed_errors(db: Db) {
    let Some(c) = Cluster::start(db).await else {
        return;
    };
    let agent = fake_agent(&c, "probe").await;
    // The agent's token, taken from its client for raw calls.
    let raw_agent = SignedAgent::enroll(&c.url(), ENROLL, "raw").await;
    let agent_token = raw_agent.token.as_str();
    let good = r#"{"name":"x","code":"print(1)","shards":{"count":1}}"#;
    let big_items = format!(
        r#"{{"name":"x","code":"print(1)","shards":{{"items":[{}],"per_shard":1}}}}"#,
        vec!["1"; 1_000_001].join(",")
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/jobs",
            None,
            Some(good),
            401,
            "unauthorized",
            None,
        ),
        (
            "POST",
            "/v1/jobs",
            Some("wrong"),
            Some(good),
            401,
            "unauthorized",
            None,
        ),
        (
            "POST",
            "/v1/jobs",
            Some(agent_token),
            Some(good),
            403,
            "forbidden",
            None,
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some("{not json"),
            422,
            "invalid_spec",
            Some("spec"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some("[]"),
            422,
            "invalid_spec",
            Some("spec"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"code":"x","shards":{"count":1}}"#),
            422,
            "invalid_spec",
            Some("name"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","shards":{"count":1}}"#),
            422,
            "invalid_spec",
            Some("code"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code":"p","shards":{"count":-1}}"#),
            422,
            "invalid_spec",
            Some("shards.count"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code":"p","shards":{}}"#),
            422,
            "invalid_spec",
            Some("shards"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code":"p","shards":{"count":1},"limits":{"memory":"a lot"}}"#),
            422,
            "invalid_spec",
            Some("limits.memory"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code":"p","shards":{"count":1},"limits":{"timeout":"0s"}}"#),
            422,
            "invalid_spec",
            Some("limits.timeout"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code":"p","shards":{"count":1},"aggregate":"median"}"#),
            422,
            "invalid_spec",
            Some("aggregate"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code":"p","shards":{"count":1},"bogus":1}"#),
            422,
            "invalid_spec",
            Some("bogus"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code":"p","shards":{"range":{"start":9,"end":1,"count":2}}}"#),
            422,
            "invalid_spec",
            Some("shards.range.end"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(r#"{"name":"x","code_file":"/etc/passwd","shards":{"count":1}}"#),
            422,
            "invalid_spec",
            Some("code_file"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(ADMIN),
            Some(big_items.as_str()),
            422,
            "invalid_spec",
            Some("shards.items"),
        ),
        (
            "GET",
            "/v1/jobs/job_nope",
            Some(ADMIN),
            None,
            404,
            "not_found",
            None,
        ),
        (
            "GET",
            "/v1/jobs?state=sleeping",
            Some(ADMIN),
            None,
            400,
            "invalid_query",
            Some("state"),
        ),
        (
            "GET",
            "/v1/jobs?limit=many",
            Some(ADMIN),
            None,
            400,
            "invalid_query",
            None,
        ),
        (
            "POST",
            "/v1/jobs/job_nope/cancel",
            Some(ADMIN),
            None,
            404,
            "not_found",
            None,
        ),
        (
            "GET",
            "/v1/nowhere",
            Some(ADMIN),
            None,
            404,
            "not_found",
            None,
        ),
        (
            "GET",
            "/v1/jobs/job_nope/shards/x",
            Some(ADMIN),
            None,
            400,
            "invalid_path",
            Some("index"),
        ),
        (
            "DELETE",
            "/v1/jobs",
            Some(ADMIN),
            None,
            405,
            "method_not_allowed",
            None,
        ),
        (
            "POST",
            "/v1/agents/enroll",
            Some(ENROLL),
            Some(r#"{"name":""}"#),
            400,
            "invalid_body",
            Some("name"),
        ),
        (
            "POST",
            "/v1/agents/enroll",
            Some(ENROLL),
            Some(r#"{"name":"x","slots":"two"}"#),
            400,
            "invalid_body",
            Some("slots"),
        ),
        (
            "POST",
            "/v1/agents/enroll",
            Some(agent_token),
            Some(r#"{"name":"x"}"#),
            403,
            "forbidden",
            None,
        ),
        (
            "POST",
            "/v1/agent/lease",
            Some(ADMIN),
            Some(r#"{"max_tasks":1}"#),
            403,
            "forbidden",
            None,
        ),
        (
            "POST",
            "/v1/agent/lease",
            Some(agent_token),
            Some(r#"{"max_tasks":0}"#),
            400,
            "invalid_body",
            Some("max_tasks"),
        ),
        (
            "POST",
            "/v1/agent/lease",
            Some(agent_token),
            Some(r#"{"max_tasks":1,"wait_ms":-5}"#),
            400,
            "invalid_body",
            Some("wait_ms"),
        ),
        (
            "POST",
            "/v1/agent/reports",
            Some(agent_token),
            Some(r#"{"reports":[{"lease_id":"x","task_id":1}]}"#),
            400,
            "invalid_body",
            Some("reports[0]"),
        ),
        (
            "POST",
            "/v1/agent/reports",
            Some(agent_token),
            Some(r#"{"reports":[{"lease_id":"x","task_id":1,"report":{"status":"great"}}]}"#),
            400,
            "invalid_body",
            Some("reports[0].report.status"),
        ),
        (
            "POST",
            "/v1/agent/heartbeat",
            Some(agent_token),
            Some("null"),
            400,
            "invalid_body",
            None,
        ),
    ];
    for (method, path, token, body, status, code, field) in cases {
        let (got, body_json, trace) = raw(&c, method, path, token, body).await;
        let what = format!("{method} {path} {:?}", body.map(|b| &b[..b.len().min(80)]));
        assert_eq!(got, status, "{what}: {body_json}");
        let err = &body_json["error"];
        assert_eq!(err["code"], code, "{what}: {body_json}");
        assert!(!err["message"].as_str().unwrap_or("").is_empty(), "{what}");
        assert_eq!(
            err["trace_id"].as_str().unwrap(),
            trace,
            "{what}: trace ids agree"
        );
        assert!(!trace.is_empty());
        if let Some(f) = field {
            assert_eq!(err["field"], f, "{what}: {body_json}");
        }
    }
    // A body over the limit.
    let huge = format!(
        r#"{{"name":"x","code":"{}","shards":{{"count":1}}}}"#,
        "a".repeat(65 << 20)
    );
    let (got, body_json, _) = raw(&c, "POST", "/v1/jobs", Some(ADMIN), Some(&huge)).await;
    assert_eq!(got, 413, "{body_json}");
    assert_eq!(body_json["error"]["code"], "payload_too_large");

    // After all that, nothing is stored and the coordinator still works.
    assert!(c.client.jobs(None, 100).await.unwrap().jobs.is_empty());
    let job = c
        .submit("name = \"fine\"\ncode = \"print(5)\"\nshards = { count = 1 }\n")
        .await;
    let lease = agent
        .lease(&LeaseRequest {
            max_tasks: 1,
            wait_ms: 2000,
            backend: None,
            hardened_only: false,
            cached_code: Vec::new(),
            sessions: false,
        })
        .await
        .unwrap();
    let t = &lease.tasks[0];
    assert_eq!(
        outcome(
            &agent,
            &ok_report(&t.lease_id, t.task_id, t.attempt, json!(5))
        )
        .await,
        "accepted"
    );
    let r = c.wait(&job.id, Duration::from_secs(30)).await;
    assert_eq!(r.result_value(), Some(json!([5])));
    // A restarted agent's first heartbeat refreshes what the coordinator knows of its machine.
    agent
        .heartbeat(&fleetbox_proto::api::HeartbeatRequest {
            csr: None,
            sessions: Vec::new(),
            running: Vec::new(),
            load: fleetbox_proto::api::AgentLoad {
                slots: 3,
                ..Default::default()
            },
            facts: Some(fleetbox_proto::api::MachineFacts {
                cores: 7,
                python: "3.99".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // The facts are written at once; the load with the other heartbeats, within a tick.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let probe = loop {
        let agents = c.client.agents().await.unwrap().agents;
        let probe = agents.into_iter().find(|a| a.name == "probe").unwrap();
        if probe.load.slots == 3 || std::time::Instant::now() > deadline {
            break probe;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (probe.facts.cores, probe.slots, probe.load.slots),
        (7, 3, 3)
    );
    assert_eq!(probe.facts.python, "3.99");
    // Successful responses carry a trace id too (a W3C trace id: 32 hex digits).
    let (status, _, trace) = raw(&c, "GET", "/v1/jobs", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    assert_eq!(trace.len(), 32);
}

/// Higher priority is leased first, whatever the submission order; ties go oldest first.
pub async fn priorities_order_the_queue(db: Db) {
    let Some(c) = Cluster::start(db).await else {
        return;
    };
    let low = c
        .submit("name = \"low\"\ncode = \"pass\"\nshards = { count = 3 }\npriority = -5\n")
        .await;
    let normal = c
        .submit("name = \"normal\"\ncode = \"pass\"\nshards = { count = 3 }\n")
        .await;
    let high = c
        .submit("name = \"high\"\ncode = \"pass\"\nshards = { count = 3 }\npriority = 10\n")
        .await;
    let agent = fake_agent(&c, "picky").await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let lease = agent
            .lease(&LeaseRequest {
                max_tasks: 3,
                wait_ms: 1000,
                backend: None,
                hardened_only: false,
                cached_code: Vec::new(),
                sessions: false,
            })
            .await
            .unwrap();
        assert_eq!(lease.tasks.len(), 3);
        let jobs: std::collections::HashSet<_> =
            lease.tasks.iter().map(|t| t.job_id.clone()).collect();
        assert_eq!(jobs.len(), 1, "one batch, one job: {jobs:?}");
        order.push(lease.tasks[0].job_id.clone());
        let mut shards: Vec<u64> = lease.tasks.iter().map(|t| t.shard_index).collect();
        shards.sort();
        assert_eq!(shards, vec![0, 1, 2]);
    }
    assert_eq!(order, vec![high.id, normal.id, low.id]);
}

/// Parts of a report named as sent ahead (`blobs`) must be stored and must not also be inline;
/// an upload must hash to its name. Each refusal is a typed 400 naming the field, and the shard
/// still settles from a correct report.
pub async fn reports_naming_blobs_are_checked(db: Db) {
    let Some(c) = Cluster::start(db).await else {
        return;
    };
    let job = c
        .submit("name = \"one\"\ncode = \"print(1)\"\nshards = { count = 1 }\n[verify]\nrecheck = \"none\"\n")
        .await;
    let a = fake_agent(&c, "a").await;
    let lease = a
        .lease(&LeaseRequest {
            max_tasks: 1,
            wait_ms: 2000,
            backend: None,
            hardened_only: false,
            cached_code: Vec::new(),
            sessions: false,
        })
        .await
        .unwrap();
    let t = &lease.tasks[0];
    let stdout = b"x".repeat(300_000);
    let sha = hex::encode(sha2::Sha256::digest(&stdout));
    let mut report = ExecutionReport::unmeasured(Status::Ok, Some(json!(1)));
    report.stdout_bytes = stdout.len() as u64;
    let mut record = ShardReport::new(&t.lease_id, t.task_id, report);
    record.attempt = t.attempt;
    record.blobs.stdout = Some(sha.clone());
    let batch = ReportBatch {
        reports: vec![record.clone()],
    };
    // Not uploaded yet.
    match a.report(&batch).await {
        Err(fleetbox_client::ClientError::Api {
            status,
            code,
            field,
            ..
        }) => {
            assert_eq!((status, code.as_str()), (400, "missing_blob"));
            assert_eq!(field.as_deref(), Some("reports[0].blobs.stdout"));
        }
        other => panic!("{other:?}"),
    }
    // An upload under another hash is refused and stores nothing.
    let wrong = a
        .put_blob(&"0".repeat(64), None, stdout.clone())
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some("blob_hash_mismatch"));
    a.put_blob(&sha, None, stdout.clone()).await.unwrap();
    // An upload naming a lease is owned by that shard's tenant at once, but only when the
    // uploading agent holds the lease: under another agent's, it owns nothing.
    let b = fake_agent(&c, "b").await;
    let foreign = b"uploaded under another agent's lease".to_vec();
    let foreign_sha = hex::encode(sha2::Sha256::digest(&foreign));
    b.put_blob(&foreign_sha, Some(&t.lease_id), foreign)
        .await
        .unwrap();
    let err = c.client.get_blob(&foreign_sha).await.unwrap_err();
    assert!(err.to_string().contains("not_found"), "{err}");
    let own = b"uploaded under its own lease".to_vec();
    let own_sha = hex::encode(sha2::Sha256::digest(&own));
    a.put_blob(&own_sha, Some(&t.lease_id), own.clone())
        .await
        .unwrap();
    assert_eq!(c.client.get_blob(&own_sha).await.unwrap(), own);
    // Both inline and ahead.
    let mut both = record.clone();
    both.report.stdout = "inline".into();
    let err = a
        .report(&ReportBatch {
            reports: vec![both],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_report"));
    // An output blob that is not JSON.
    let not_json = b"{not json".to_vec();
    let not_json_sha = hex::encode(sha2::Sha256::digest(&not_json));
    a.put_blob(&not_json_sha, None, not_json).await.unwrap();
    let mut bad_output = record.clone();
    bad_output.report.output = None;
    bad_output.blobs.output = Some(not_json_sha);
    let err = a
        .report(&ReportBatch {
            reports: vec![bad_output],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_report"));
    // Nothing was stored by the refusals: the right report settles the shard.
    assert_eq!(outcome(&a, &batch).await, "accepted");
    let result = c.wait(&job.id, Duration::from_secs(30)).await;
    assert_eq!(result.state, JobState::Completed);
    let detail = c.client.shard(&job.id, 0).await.unwrap();
    assert_eq!(detail.attempts.len(), 1);
    assert_eq!(
        detail.attempts[0].stdout_blob.as_deref(),
        Some(sha.as_str())
    );
    assert_eq!(c.client.get_blob(&sha).await.unwrap(), stdout);
}

/// Reports must carry the signature of the reporting agent's registered key over this very
/// execution: a forged signature, another agent's key, an unsigned report, and a signed
/// report moved to another lease are each refused with a typed error and audited, and store
/// nothing; a report for a task never leased stores nothing and is audited; a replayed report
/// is a duplicate. A rotated key takes over from the old one.
pub async fn signed_reports_are_checked(db: Db) {
    let Some(c) = Cluster::start(db).await else {
        return;
    };
    let job = c
        .submit(
            "name = \"signed\"\ncode = \"print(1)\"\nshards = { count = 2 }\naggregate = \"sum\"\n",
        )
        .await;
    let a = fake_agent(&c, "a").await;
    let b = fake_agent(&c, "b").await;
    let lease = a
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
    assert_eq!(lease.tasks.len(), 2);
    let (t0, t1) = (lease.tasks[0].clone(), lease.tasks[1].clone());
    let report_for = |t: &fleetbox_proto::api::LeasedTask, value: Value| {
        ok_report(&t.lease_id, t.task_id, t.attempt, value).reports[0].clone()
    };
    let refused = |e: fleetbox_client::ClientError| match e {
        fleetbox_client::ClientError::Api {
            status,
            code,
            field,
            ..
        } => (status, code, field.unwrap_or_default()),
        other => panic!("{other:?}"),
    };
    let send_raw = |r: ShardReport| {
        let client = a.client.clone();
        async move { client.report(&ReportBatch { reports: vec![r] }).await }
    };

    // Unsigned.
    let e = send_raw(report_for(&t0, json!(1))).await.unwrap_err();
    assert_eq!(
        refused(e),
        (400, "unsigned_report".into(), "reports[0].signature".into())
    );
    // Signed by another agent's key (b's), sent with a's token.
    let mut other = report_for(&t0, json!(1));
    other.sign(&b.key);
    let e = send_raw(other).await.unwrap_err();
    assert_eq!(refused(e).1, "invalid_signature");
    // A good signature, then the value changed (a lie after signing).
    let mut edited = report_for(&t0, json!(1));
    edited.sign(&a.key);
    edited.report.output = Some(json!(1000));
    let e = send_raw(edited).await.unwrap_err();
    assert_eq!(refused(e).1, "invalid_signature");
    // Not hex at all.
    let mut garbage = report_for(&t0, json!(1));
    garbage.signature = Some("zz".into());
    let e = send_raw(garbage).await.unwrap_err();
    assert_eq!(refused(e).1, "invalid_signature");
    // A's signed report for t0, moved onto t1's lease.
    let mut moved = report_for(&t0, json!(1));
    moved.sign(&a.key);
    moved.lease_id = t1.lease_id.clone();
    moved.task_id = t1.task_id;
    let e = send_raw(moved).await.unwrap_err();
    assert_eq!(refused(e).1, "invalid_signature");
    // Signed correctly, for a task this agent never leased, and for a wrong attempt number.
    assert_eq!(
        outcome(&a, &ok_report("never.1", t0.task_id, 1, json!(1))).await,
        "unknown"
    );
    assert_eq!(
        outcome(
            &a,
            &ok_report(&t0.lease_id, t0.task_id, t0.attempt + 1, json!(1))
        )
        .await,
        "unknown"
    );
    // Nothing of all that was stored.
    let shard = c.client.shard(&job.id, t0.shard_index).await.unwrap();
    assert!(shard.attempts.is_empty(), "{:?}", shard.attempts);

    // The real report, then the same bytes replayed: stored once.
    assert_eq!(
        outcome(
            &a,
            &ok_report(&t0.lease_id, t0.task_id, t0.attempt, json!(1))
        )
        .await,
        "accepted"
    );
    let mut replay = report_for(&t0, json!(1));
    replay.sign(&a.key);
    let ack = a
        .client
        .report(&ReportBatch {
            reports: vec![replay],
        })
        .await
        .unwrap();
    assert_eq!(ack.results[0].outcome, "duplicate");

    // Rotation: signed with the current key, the new key takes over; the old one is refused.
    let new_key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let public_key = hex::encode(new_key.verifying_key().as_bytes());
    let message = fleetbox_proto::api::RotateKeyRequest::message(&a.agent_id, &public_key);
    // Signed by the wrong key: refused.
    let wrong = fleetbox_proto::api::RotateKeyRequest {
        public_key: public_key.clone(),
        signature: hex::encode(ed25519_dalek::Signer::sign(&b.key, &message).to_bytes()),
    };
    assert_eq!(
        refused(a.client.rotate_key(&wrong).await.unwrap_err()).1,
        "invalid_signature"
    );
    let right = fleetbox_proto::api::RotateKeyRequest {
        public_key,
        signature: hex::encode(ed25519_dalek::Signer::sign(&a.key, &message).to_bytes()),
    };
    a.client.rotate_key(&right).await.unwrap();
    let mut old_signed = report_for(&t1, json!(1));
    old_signed.sign(&a.key);
    let e = send_raw(old_signed).await.unwrap_err();
    assert_eq!(refused(e).1, "invalid_signature");
    let mut new_signed = report_for(&t1, json!(1));
    new_signed.sign(&new_key);
    let ack = a
        .client
        .report(&ReportBatch {
            reports: vec![new_signed],
        })
        .await
        .unwrap();
    assert_eq!(ack.results[0].outcome, "accepted");
    let r = c.wait(&job.id, Duration::from_secs(30)).await;
    assert_eq!(r.state, JobState::Completed);
    assert_eq!(r.result_value(), Some(json!(2)));

    // Every refusal is in the audit log, with its code; the rotation too.
    let entries = c.client.audit("limit=5000").await.unwrap().entries;
    let codes: Vec<String> = entries
        .iter()
        .filter(|e| e.action == "report.refused")
        .filter_map(|e| e.details["code"].as_str().map(String::from))
        .collect();
    for code in ["unsigned_report", "invalid_signature", "unknown_lease"] {
        assert!(
            codes.iter().any(|c| c == code),
            "{code} not audited: {codes:?}"
        );
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "invalid_signature").count(),
        5
    );
    assert!(
        entries.iter().any(|e| e.action == "agent.key_rotated"
            && e.agent_id.as_deref() == Some(a.agent_id.as_str()))
    );
}

/// `fleetbox agents` shows each agent's trust once the coordinator has checked its results,
/// and `release` of an agent that is not quarantined is refused with a clear error.
pub async fn agents_show_their_trust(db: Db) {
    // Trusted after 10 valid results in a row (BOINC's threshold; the default is 250), so a
    // 12-shard job shows both phases.
    let Some(mut c) = Cluster::start_with(db, &["--trusted-after", "10"]).await else {
        return;
    };
    c.add_agent(2);
    let job = c
        .submit("name = \"checked\"\ncode = \"print(2)\"\nshards = { count = 12 }\naggregate = \"sum\"\n")
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert_eq!(r.result_value(), Some(json!(24)));
    let summary = r.summary.unwrap();
    // A new agent: its results are checked by the server until it has 10 valid in a row (the
    // last ones may arrive after that, and be sampled).
    assert!(summary.verified >= 10, "{summary:?}");
    assert_eq!(summary.verified, summary.server_runs, "{summary:?}");
    let checked = summary.verified;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(crate::support::bin())
            .args(args)
            .args(["--server", &c.url()])
            .env("FLEETBOX_TOKEN", ADMIN)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, json_out, stderr) = cli(&["agents", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let list: fleetbox_proto::api::AgentList = serde_json::from_str(&json_out).unwrap();
    assert_eq!(list.agents.len(), 1);
    let agent = &list.agents[0];
    assert_eq!(agent.trust.len(), 1, "{agent:?}");
    assert_eq!(agent.trust[0].valid, checked);
    assert_eq!(agent.trust[0].consecutive_valid, checked);
    assert!(
        agent.trust[0].recheck_rate < 1.0,
        "trusted after 10 valid in a row"
    );
    let (code, table, stderr) = cli(&["agents"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        table.contains(&format!("{checked} in a row, {checked}/0")),
        "{table}"
    );
    let (code, _, stderr) = cli(&["agents", "release", &agent.id]);
    assert_ne!(code, 0);
    assert!(stderr.contains("not quarantined"), "{stderr}");
}
