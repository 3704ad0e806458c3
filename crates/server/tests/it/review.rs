//! AI control at submission: syntax errors and programs the review refuses never become jobs
//! (and are audited), server-only ones go only to hardened agents, held ones wait for a
//! person, and `POST /v1/review` answers without running anything.

use std::time::Duration;

use fleetbox_proto::{Decision, JobState};

use crate::support::{Coordinator, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_gates_every_submission() {
    let Some(mut c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());

    // A syntax error: refused with its line and column, nothing stored.
    let err = c
        .client
        .submit(&spec(
            "name = \"bad\"\ncode = \"x = (1,\\nprint(x)\"\n[shards]\ncount = 1\n",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_spec"), "{err}");
    assert!(err.to_string().contains("syntax error at line"), "{err}");

    // A fork bomb: refused by the review, audited, no job.
    let bomb = "import os\nwhile True:\n    os.fork()\n";
    let err = c
        .client
        .submit(&spec(&format!(
            "name = \"bomb\"\ncode = {bomb:?}\n[shards]\ncount = 2\n"
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("rejected_by_review"), "{err}");
    assert!(
        err.to_string().contains("process.fork_loop at line 3"),
        "{err}"
    );
    let jobs = c.client.jobs(None, 100).await.unwrap();
    assert!(jobs.jobs.is_empty(), "{jobs:?}");
    let audit = c.client.audit("action=review.refused").await.unwrap();
    assert_eq!(audit.entries.len(), 1);
    assert_eq!(audit.entries[0].details["decision"], "reject");

    // The review alone.
    let review = c
        .client
        .review("import os as o\no.system('id')\n")
        .await
        .unwrap();
    assert_eq!(review.decision, Decision::RunOnServerOnly);
    assert_eq!(review.findings[0].rule, "process.spawn");
    assert_eq!((review.findings[0].line, review.findings[0].column), (2, 1));
    c.stop().await;
}

/// A held job waits in `pending_review` with nothing leased until a person approves it; a
/// rejected one is cancelled without ever running; both decisions are audited with who made
/// them, and a flag is decided once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_jobs_wait_for_a_person() {
    for db in crate::support::BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        // Held code, once approved, runs where server-only code runs: on an agent marked
        // for it (here the only one), whose own policy accepts it.
        c.agent_with("a", |config| {
            config.review_policy = fleetbox_agent::ReviewPolicy::default_for(true);
        });
        crate::support::harden_the_only_agent(&c).await;
        // High + two mediums (a started program, a network client, and the two together: a
        // remote shell's shape): risk 70, between `hold` (60) and `reject` (80).
        let code = "import subprocess, socket\nsubprocess.run(['true'])\n";
        let held = |name: &str| {
            spec(&format!(
                "name = \"{name}\"\ncode = {code:?}\n[shards]\ncount = 2\n"
            ))
        };
        assert_eq!(
            c.client.review(code).await.unwrap().decision,
            Decision::Hold
        );
        let job = c.client.submit(&held("held")).await.unwrap();
        assert_eq!(job.state, JobState::PendingReview);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let view = c.client.job(&job.id).await.unwrap();
        assert_eq!(view.state, JobState::PendingReview);
        assert_eq!(view.shards.queued, 2, "nothing leased while held: {view:?}");
        let flags = c.client.review_flags("status=open").await.unwrap().flags;
        assert_eq!(flags.len(), 1);
        let flag = &flags[0];
        assert_eq!(
            (flag.job_id.as_str(), flag.kind.as_str()),
            (job.id.as_str(), "code")
        );
        assert_eq!(flag.details["decision"], "hold");

        let decided = c
            .client
            .decide_flag(flag.id, true, Some("looked at it"))
            .await
            .unwrap();
        assert_eq!(decided.status, "approved");
        assert!(decided.decided_by.as_deref().unwrap().starts_with("admin:"));
        let r = c.wait(&job.id, Duration::from_secs(60)).await;
        assert_eq!(r.state, JobState::Completed, "{r:?}");
        let again = c
            .client
            .decide_flag(flag.id, false, None)
            .await
            .unwrap_err();
        assert_eq!(again.code(), Some("flag_decided"), "{again}");

        let job = c.client.submit(&held("rejected")).await.unwrap();
        let flag = c
            .client
            .review_flags(&format!("job={}", job.id))
            .await
            .unwrap()
            .flags
            .remove(0);
        c.client
            .decide_flag(flag.id, false, Some("no sockets here"))
            .await
            .unwrap();
        let r = c.wait(&job.id, Duration::from_secs(30)).await;
        assert_eq!(r.state, JobState::Cancelled);
        assert!(
            r.error
                .as_deref()
                .unwrap_or_default()
                .contains("no sockets here"),
            "{r:?}"
        );
        for i in 0..2 {
            let d = c.client.shard(&job.id, i).await.unwrap();
            assert!(d.attempts.is_empty(), "a rejected job never ran: {d:?}");
        }
        for action in ["review.approved", "review.rejected"] {
            let a = c.client.audit(&format!("action={action}")).await.unwrap();
            assert_eq!(a.entries.len(), 1, "{action}");
            assert!(a.entries[0].actor.starts_with("admin:"));
        }
        let missing = c.client.decide_flag(999_999, true, None).await.unwrap_err();
        assert_eq!(missing.code(), Some("not_found"));
        c.stop().await;
    }
}

/// Result review: a job whose shards return one wild outlier is flagged with the shard named
/// (in its summary and in the review queue); a job with uniform results is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outlying_shard_result_is_flagged_and_queued() {
    let Some(mut c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());
    let code = "import json, os\ni = json.load(open(os.environ['FLEETBOX_INPUT']))['items'][0]\nprint(10**9 if i == WILD else 100 + i % 7)\n";
    let job = |wild: i64| {
        let items: Vec<String> = (0..30).map(|i| i.to_string()).collect();
        spec(&format!(
            "name = \"outliers\"\ncode = {:?}\n[shards]\nitems = [{}]\nper_shard = 1\n[verify]\nrecheck = \"none\"\n",
            code.replace("WILD", &wild.to_string()),
            items.join(", ")
        ))
    };
    let r = c.run(&job(17), Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    let flags = &r.summary.as_ref().unwrap().flags;
    let outliers: Vec<_> = flags.iter().filter(|f| f.kind == "outlier").collect();
    assert_eq!(outliers.len(), 1, "{flags:?}");
    assert_eq!(outliers[0].shard, 17);
    assert!(
        outliers[0].detail.contains("1000000000"),
        "{:?}",
        outliers[0]
    );
    let queued = c
        .client
        .review_flags(&format!("job={}&kind=anomaly", r.id))
        .await
        .unwrap()
        .flags;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].details["outliers"][0]["shard"], 17);
    // The decision is in the audit log: the queue entry, and the flags with the job's end.
    let flagged = c
        .client
        .audit(&format!("job={}&action=review.flagged", r.id))
        .await
        .unwrap();
    assert_eq!(flagged.entries.len(), 1, "{flagged:?}");
    assert_eq!(flagged.entries[0].actor, "reviewer");
    assert_eq!(flagged.entries[0].details["kind"], "anomaly");
    let completed = c
        .client
        .audit(&format!("job={}&action=job.completed", r.id))
        .await
        .unwrap();
    assert_eq!(completed.entries[0].details["flags"][0][0], "outlier");
    assert_eq!(completed.entries[0].details["flags"][0][2], 17);

    let r = c.run(&job(-1), Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed);
    assert!(
        r.summary
            .as_ref()
            .unwrap()
            .flags
            .iter()
            .all(|f| f.kind != "outlier"),
        "{:?}",
        r.summary
    );
    let queued = c
        .client
        .review_flags(&format!("job={}", r.id))
        .await
        .unwrap()
        .flags;
    assert!(queued.is_empty());
    c.stop().await;
}

/// With a model configured (a stand-in OpenAI-compatible endpoint here: no model runs on this
/// machine), a submission's review is the rules plus the model's verdict, and a verdict can
/// raise a program's risk until it is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_reviewer_can_raise_the_risk() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let request = String::from_utf8_lossy(&body);
            // The stand-in calls anything that mines coins malicious.
            let verdict = if request.contains("hashlib") {
                r#"{"verdict": "malicious", "risk": 95, "reasons": ["a proof-of-work loop"]}"#
            } else {
                r#"{"verdict": "safe", "risk": 0, "reasons": []}"#
            };
            let text =
                serde_json::json!({"choices": [{"message": {"content": verdict}}]}).to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    let Some(c) = Coordinator::start_with(fleetbox_testkit::Db::Sqlite, |config| {
        config.llm = Some(fleetbox_review::llm::LlmConfig::new(
            url.clone(),
            "stand-in",
        ));
    })
    .await
    else {
        return;
    };
    let miner = "import hashlib\nn = 0\nwhile not hashlib.sha256(str(n).encode()).hexdigest().startswith('0000'):\n    n += 1\nprint(n)\n";
    let review = c.client.review(miner).await.unwrap();
    assert_eq!(review.decision, Decision::Reject, "{review:?}");
    assert!(
        review.reviewer.contains("llm:stand-in"),
        "{}",
        review.reviewer
    );
    let err = c
        .client
        .submit(&spec(&format!(
            "name = \"miner\"\ncode = {miner:?}\n[shards]\ncount = 1\n"
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("rejected_by_review"), "{err}");
    let fine = c.client.review("print(1)").await.unwrap();
    assert_eq!(fine.decision, Decision::Run);
    c.stop().await;
}

/// A shard that hit a sandbox violation puts the rest of its job on hold: nothing more of it is
/// leased until a person approves (then it goes on) or rejects (then it is cancelled). The
/// reporter is the coordinator's own agent, trusted: an untrusted agent's violation holds
/// nothing until the server reproduces it (`cluster::lies` in the CLI tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_violation_holds_the_rest_of_the_job_for_review() {
    use fleetbox_proto::api::LeaseRequest;
    use fleetbox_proto::{ExecutionReport, Status};
    for db in crate::support::BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let job = c
        .client
        .submit(&spec(
            "name = \"v\"\ncode = \"print(1)\"\n[shards]\ncount = 4\n[verify]\nrecheck = \"none\"\n",
        ))
        .await
        .unwrap();
        let agent = fleetbox_testkit::SignedAgent::enroll(
            &c.running.url(),
            &c.running.own_enroll_token,
            "agent",
        )
        .await;
        let lease = |n| LeaseRequest {
            max_tasks: n,
            wait_ms: 0,
            backend: None,
            hardened_only: false,
            cached_code: Vec::new(),
            sessions: false,
        };
        let first = agent.lease(&lease(1)).await.unwrap().tasks.remove(0);
        let mut report = ExecutionReport::unmeasured(Status::SandboxViolation, None);
        report.message = Some("denied syscall `mount`".into());
        send(&agent, &[(&first, report)]).await;
        let view = c.client.job(&job.id).await.unwrap();
        assert_eq!(view.state, JobState::PendingReview, "{view:?}");
        assert!(
            agent.lease(&lease(10)).await.unwrap().tasks.is_empty(),
            "nothing leased while held"
        );
        let flag = c
            .client
            .review_flags(&format!("job={}&kind=violation", job.id))
            .await
            .unwrap()
            .flags
            .remove(0);
        assert_eq!(flag.details["shard"], first.shard_index);
        c.client.decide_flag(flag.id, true, None).await.unwrap();
        assert_eq!(
            c.client.job(&job.id).await.unwrap().state,
            JobState::Running
        );
        assert_eq!(agent.lease(&lease(10)).await.unwrap().tasks.len(), 3);
        let held = c.client.audit("action=review.held").await.unwrap();
        assert_eq!(held.entries.len(), 1);

        // Nothing left to hold (a one-shard job): it is not held, it ends as its shard did.
        let one = c
        .client
        .submit(&spec(
            "name = \"one\"\ncode = \"print(1)\"\n[shards]\ncount = 1\n[verify]\nrecheck = \"none\"\n",
        ))
        .await
        .unwrap();
        let mut tasks = agent.lease(&lease(10)).await.unwrap().tasks;
        let only = tasks.iter().position(|t| t.job_id == one.id).unwrap();
        let only = tasks.swap_remove(only);
        let violation = ExecutionReport::unmeasured(Status::SandboxViolation, None);
        send(&agent, &[(&only, violation)]).await;
        let r = c.wait(&one.id, Duration::from_secs(30)).await;
        assert_eq!(r.state, JobState::Failed, "{r:?}");
        // ...and its violation is still a flag a person can find.
        let flags = c
            .client
            .review_flags(&format!("job={}&kind=violation", one.id))
            .await
            .unwrap()
            .flags;
        assert_eq!(flags.len(), 1, "{db:?}: {flags:?}");
        assert_eq!(flags[0].details["held"], false, "{flags:?}");
        c.stop().await;
    }
}

/// Re-running a held job's violation flag: the job goes on at once, and once it has finished
/// the flagged shard runs again in a child job (checked by the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerunning_a_held_jobs_flag_resumes_it_and_reruns_the_shard_after() {
    use fleetbox_proto::api::LeaseRequest;
    use fleetbox_proto::{ExecutionReport, Status};
    let Some(c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    let job = c
        .client
        .submit(&spec(
            "name = \"v\"\ncode = \"print(1)\"\naggregate = \"sum\"\n[shards]\ncount = 3\n[verify]\nrecheck = \"none\"\n",
        ))
        .await
        .unwrap();
    let agent = fleetbox_testkit::SignedAgent::enroll(
        &c.running.url(),
        &c.running.own_enroll_token,
        "agent",
    )
    .await;
    let lease = |n| LeaseRequest {
        max_tasks: n,
        wait_ms: 0,
        backend: None,
        hardened_only: false,
        cached_code: Vec::new(),
        sessions: false,
    };
    let first = agent.lease(&lease(1)).await.unwrap().tasks.remove(0);
    let violation = ExecutionReport::unmeasured(Status::SandboxViolation, None);
    send(&agent, &[(&first, violation)]).await;
    assert_eq!(
        c.client.job(&job.id).await.unwrap().state,
        JobState::PendingReview
    );
    let flag = c
        .client
        .review_flags(&format!("job={}&kind=violation", job.id))
        .await
        .unwrap()
        .flags
        .remove(0);
    let rerun = c
        .client
        .rerun_flag(flag.id, Some("false positive?"))
        .await
        .unwrap();
    assert_eq!(
        (rerun.status.as_str(), rerun.rerun_job_id.as_deref()),
        ("rerun", None)
    );
    assert_eq!(
        c.client.job(&job.id).await.unwrap().state,
        JobState::Running
    );
    // The rest of the job runs and it finishes.
    let rest = agent.lease(&lease(10)).await.unwrap().tasks;
    assert_eq!(rest.len(), 2);
    let done_reports: Vec<_> = rest
        .iter()
        .map(|t| {
            let mut report = ExecutionReport::unmeasured(Status::Ok, None);
            report.output = Some(serde_json::json!(1));
            (t, report)
        })
        .collect();
    send(&agent, &done_reports).await;
    let done = c.wait(&job.id, Duration::from_secs(30)).await;
    assert!(done.state.is_final(), "{done:?}");
    // Its fold started the re-run of the flagged shard.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let child = loop {
        let f = c
            .client
            .review_flags(&format!("job={}&kind=violation", job.id))
            .await
            .unwrap();
        if let Some(id) = f.flags[0].rerun_job_id.clone() {
            break id;
        }
        assert!(std::time::Instant::now() < deadline, "{f:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let child = c.client.job(&child).await.unwrap();
    assert_eq!(child.shards.total, 1);
    assert_eq!(
        child.lineage.unwrap().rule,
        format!("review:flag {}", flag.id)
    );
    let d = c.client.shard(&child.id, 0).await.unwrap();
    assert_eq!(
        d.input,
        c.client
            .shard(&job.id, first.shard_index)
            .await
            .unwrap()
            .input
    );
    c.stop().await;
}

/// The job of the outlier test: 30 one-number shards, shard `wild` printing 10^9 — but only
/// in a 30-shard job, so a re-run of it alone prints a normal value.
fn outlier_job(wild: i64) -> fleetbox_proto::JobSpec {
    let code = "import json, os\ni = json.load(open(os.environ['FLEETBOX_INPUT']))['items'][0]\n\
                wild = os.environ['FLEETBOX_SHARD_COUNT'] == '30' and i == WILD\nprint(10**9 if wild else 100)\n";
    let items: Vec<String> = (0..30).map(|i| i.to_string()).collect();
    spec(&format!(
        "name = \"outliers\"\ncode = {:?}\naggregate = \"sum\"\n[shards]\nitems = [{}]\nper_shard = 1\n[verify]\nrecheck = \"none\"\n",
        code.replace("WILD", &wild.to_string()),
        items.join(", ")
    ))
}

/// `--anomalies review`: the job waits in `needs_review` with its result until a person
/// approves it; a person can instead re-run the flagged shard (a child job checked by the
/// server, folded over the job's values), once. `--anomalies rerun` does that by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anomaly_policy_holds_or_reruns_and_a_person_can_rerun() {
    for action in [
        fleetbox_server::AnomalyAction::Review,
        fleetbox_server::AnomalyAction::Rerun,
    ] {
        let Some(mut c) = Coordinator::start_with(fleetbox_testkit::Db::Sqlite, |config| {
            config.anomalies = action;
        })
        .await
        else {
            return;
        };
        c.agent("a", Default::default());
        let job = c.client.submit(&outlier_job(17)).await.unwrap();
        let flag = loop {
            let flags = c
                .client
                .review_flags(&format!("job={}&kind=anomaly", job.id))
                .await
                .unwrap()
                .flags;
            let view = c.client.job(&job.id).await.unwrap();
            if let Some(f) = flags.into_iter().next()
                && (view.state == JobState::NeedsReview || view.state.is_final())
            {
                break f;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let view = c.client.job(&job.id).await.unwrap();
        match action {
            fleetbox_server::AnomalyAction::Review => {
                assert_eq!(view.state, JobState::NeedsReview, "{view:?}");
                assert_eq!(flag.status, "open");
                // A person re-runs the flagged shard: a child job, checked by the server.
                let rerun = c
                    .client
                    .rerun_flag(flag.id, Some("looks wrong"))
                    .await
                    .unwrap();
                assert_eq!(rerun.status, "rerun");
                let child = rerun.rerun_job_id.clone().unwrap();
                let r = c.wait(&child, Duration::from_secs(60)).await;
                assert_eq!(r.state, JobState::Completed, "{r:?}");
                assert_eq!(r.result_value(), Some(serde_json::json!(3000)), "{r:?}");
                let d = c.client.shard(&child, 0).await.unwrap();
                assert_eq!(d.input["items"][0], 17);
                assert!(d.attempts.iter().any(|a| a.agent_id == "server"), "{d:?}");
                let again = c.client.rerun_flag(flag.id, None).await.unwrap_err();
                assert_eq!(again.code(), Some("flag_decided"), "{again}");
                let audit = c
                    .client
                    .audit(&format!("job={}&action=review.rerun", job.id))
                    .await
                    .unwrap();
                assert!(audit.entries[0].actor.starts_with("admin:"));
                // A second anomalous job: approving its flag completes it, result as folded.
                let job2 = c.client.submit(&outlier_job(3)).await.unwrap();
                let flag2 = loop {
                    let flags = c
                        .client
                        .review_flags(&format!("job={}&kind=anomaly", job2.id))
                        .await
                        .unwrap()
                        .flags;
                    if let Some(f) = flags.into_iter().next() {
                        break f;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                c.client.decide_flag(flag2.id, true, None).await.unwrap();
                let r = c.client.result(&job2.id).await.unwrap();
                assert_eq!(r.state, JobState::Completed);
                assert_eq!(
                    r.result_value(),
                    Some(serde_json::json!(29 * 100 + 1_000_000_000))
                );
            }
            fleetbox_server::AnomalyAction::Rerun => {
                assert_eq!(view.state, JobState::Completed, "{view:?}");
                // The re-run starts after the fold that raised the flag (the coordinator's
                // pending re-runs): the flag is `open` until then.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                let flag = loop {
                    let flag = c
                        .client
                        .review_flags(&format!("job={}&kind=anomaly", job.id))
                        .await
                        .unwrap()
                        .flags
                        .remove(0);
                    if flag.status != "open" || std::time::Instant::now() > deadline {
                        break flag;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                assert_eq!(flag.status, "rerun", "{flag:?}");
                assert_eq!(flag.decided_by.as_deref(), Some("server"));
                let child = flag.rerun_job_id.unwrap();
                let r = c.wait(&child, Duration::from_secs(60)).await;
                assert_eq!(r.result_value(), Some(serde_json::json!(3000)), "{r:?}");
                let chain = c.client.chain(&job.id).await.unwrap();
                assert_eq!(chain.jobs.len(), 2);
                assert_eq!(
                    chain.jobs[1].lineage.as_ref().unwrap().rule,
                    format!("review:flag {}", flag.id)
                );
            }
            fleetbox_server::AnomalyAction::Flag => unreachable!(),
        }
        c.stop().await;
    }
}

/// Shards that end in sandbox errors (an agent whose interpreter is missing) put an entry in
/// the review queue naming them and the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_errors_are_queued_for_review() {
    let Some(mut c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    c.agent_on(
        "broken",
        fleetbox_sandbox::Backend::Process,
        fleetbox_sandbox::SandboxConfig {
            python: Some("/nonexistent/python3".into()),
            ..Default::default()
        },
    );
    let r = c
        .run(
            &spec(
                "name = \"broken\"\ncode = \"print(1)\"\nmax_attempts = 2\n[shards]\ncount = 2\n",
            ),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(r.state, JobState::Failed, "{r:?}");
    let flags = c
        .client
        .review_flags(&format!("job={}&kind=sandbox_error", r.id))
        .await
        .unwrap()
        .flags;
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_eq!(flags[0].details["shards"], serde_json::json!([0, 1]));
    assert_eq!(flags[0].details["agents"].as_array().unwrap().len(), 1);
    c.stop().await;
}

/// Report these runs of these leased shards, signed, as an agent does.
async fn send(
    agent: &fleetbox_testkit::SignedAgent,
    runs: &[(
        &fleetbox_proto::api::LeasedTask,
        fleetbox_proto::ExecutionReport,
    )],
) {
    use fleetbox_proto::api::{ReportBatch, ShardReport};
    let reports = runs
        .iter()
        .map(|(task, report)| {
            let mut r = ShardReport::new(task.lease_id.clone(), task.task_id, report.clone());
            r.attempt = task.attempt;
            r
        })
        .collect();
    agent.report(&ReportBatch { reports }).await.unwrap();
}

/// Code the review decides `run_on_server_only` is never leased to an ordinary agent: with two
/// ordinary agents (one calling itself `hardened` in its labels, which is no mark) and one an
/// operator marked, every run is the marked agent's (or the coordinator's own re-check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_only_code_goes_only_to_agents_marked_for_it() {
    for db in [fleetbox_testkit::Db::Sqlite, fleetbox_testkit::Db::Postgres] {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("plain", Default::default());
        c.agent_with("self-declared", |config| {
            config.labels = vec!["hardened".into()];
        });
        c.agent_with("gvisor", |config| {
            config.review_policy = fleetbox_agent::ReviewPolicy::default_for(true);
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let agents = loop {
            let agents = c.client.agents().await.unwrap().agents;
            if agents.len() == 3 {
                break agents;
            }
            assert!(std::time::Instant::now() < deadline, "{agents:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let id = |name: &str| agents.iter().find(|a| a.name == name).unwrap().id.clone();
        assert!(agents.iter().all(|a| !a.hardened), "{db:?}: {agents:?}");
        let missing = c
            .client
            .mark_hardened("agt_nobody", true)
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Some("not_found"), "{missing}");
        c.client.mark_hardened(&id("gvisor"), true).await.unwrap();

        // A socket: server-only. Six shards; two agents wait for work all along.
        let code = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.close()\nprint(1)\n";
        let r = c
            .run(
                &spec(&format!(
                    "name = \"server only\"\ncode = {code:?}\naggregate = \"sum\"\n[shards]\ncount = 6\n"
                )),
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        assert_eq!(r.result_value(), Some(serde_json::json!(6)));
        let submitted = c
            .client
            .audit(&format!("job={}&action=job.submitted", r.id))
            .await
            .unwrap();
        assert_eq!(
            submitted.entries[0].details["review"]["decision"],
            "run_on_server_only"
        );
        let marked = id("gvisor");
        for i in 0..6 {
            let d = c.client.shard(&r.id, i).await.unwrap();
            assert!(
                d.attempts
                    .iter()
                    .all(|a| a.agent_id == marked || a.agent_id == "server"),
                "{db:?}: shard {i} ran on an ordinary agent: {:?}",
                d.attempts
            );
        }
        let leased = c
            .client
            .audit("action=shard.leased&limit=1000")
            .await
            .unwrap();
        assert!(
            leased
                .entries
                .iter()
                .all(|e| e.actor == format!("agent:{marked}")),
            "{db:?}: {:?}",
            leased.entries
        );
        let marks = c.client.audit("action=agent.hardened").await.unwrap();
        assert_eq!(marks.entries.len(), 1, "{db:?}");
        assert_eq!(marks.entries[0].details["hardened"], true);
        c.stop().await;
    }
}
