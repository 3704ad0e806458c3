//! The planner: follow-up rules start child jobs (with lineage), re-run failed shards, send
//! webhooks, stop at their caps, and make each child once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetbox_proto::JobState;
use fleetbox_proto::api::JobChain;
use serde_json::json;

use crate::support::{Coordinator, Db, spec};

/// Wait until `check` holds for the chain `id` is in (every job final and planned, say).
async fn wait_chain(
    c: &Coordinator,
    id: &str,
    within: Duration,
    check: impl Fn(&JobChain) -> bool,
) -> JobChain {
    let deadline = Instant::now() + within;
    loop {
        let chain = c.client.chain(id).await.expect("chain");
        if check(&chain) {
            return chain;
        }
        assert!(
            Instant::now() < deadline,
            "chain of {id} not there after {within:?}: {chain:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn settled(chain: &JobChain, jobs: usize) -> bool {
    chain.jobs.len() == jobs && chain.jobs.iter().all(|j| j.state.is_final() && !j.planning)
}

/// The worked example of `docs/SANDBOX_DISTRIBUTED.md`.
const STEP1: &str = include_str!("../../../../examples/chain.toml");

/// Generate numbers → keep those above a threshold from the first job's summary → sort and
/// report: one submission runs the whole chain, with lineage, and the rule that did not match
/// made nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_step_chain_runs_to_the_end_from_one_submission() {
    for db in crate::support::BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a", Default::default());
        let root = c.client.submit(&spec(STEP1)).await.unwrap();
        let chain = wait_chain(&c, &root.id, Duration::from_secs(90), |ch| settled(ch, 3)).await;
        assert_eq!(chain.root, root.id);
        let depths: Vec<u32> = chain
            .jobs
            .iter()
            .map(|j| j.lineage.as_ref().map_or(0, |l| l.depth))
            .collect();
        assert_eq!(depths, [0, 1, 2], "{db:?}: {chain:#?}");
        let (keep, report) = (&chain.jobs[1], &chain.jobs[2]);
        let l1 = keep.lineage.as_ref().unwrap();
        assert_eq!(
            (
                l1.parent_job_id.as_str(),
                l1.root_job_id.as_str(),
                l1.rule.as_str(),
                l1.rule_index
            ),
            (root.id.as_str(), root.id.as_str(), "keep the large ones", 0)
        );
        let l2 = report.lineage.as_ref().unwrap();
        assert_eq!(
            (
                l2.parent_job_id.as_str(),
                l2.root_job_id.as_str(),
                l2.rule.as_str()
            ),
            (keep.id.as_str(), root.id.as_str(), "sort and report")
        );
        // 10 items kept, 3 per shard.
        assert_eq!(keep.shards.total, 4, "{db:?}: {keep:?}");
        let first = c.client.result(&root.id).await.unwrap();
        let metrics = first.metrics.expect("metrics");
        assert_eq!(
            (metrics["shards"].as_u64(), metrics["accepted"].as_u64()),
            (Some(4), Some(4))
        );
        assert!(metrics["duration_ms"]["p95"].is_number(), "{metrics}");
        let last = c.client.result(&report.id).await.unwrap();
        assert_eq!(last.state, JobState::Completed, "{db:?}: {last:?}");
        assert_eq!(
            last.result_value().unwrap(),
            json!([{"sorted": [34, 33, 32, 31, 30, 24, 23, 22, 21, 20], "count": 10}]),
            "{db:?}"
        );
        // Every decision is in the audit log: three rules evaluated at the root (the failure
        // rule did not match), one at `keep`, one at `report` (no rules: nothing).
        let evaluated = c
            .client
            .audit(&format!("job={}&action=followup.evaluated", root.id))
            .await
            .unwrap();
        let matched: Vec<bool> = evaluated
            .entries
            .iter()
            .map(|e| e.details["matched"].as_bool().unwrap())
            .collect();
        assert_eq!(matched, [true, false], "{db:?}: {evaluated:?}");
        let created = c
            .client
            .audit(&format!("job={}&action=followup.created", root.id))
            .await
            .unwrap();
        assert_eq!(created.entries.len(), 1);
        assert_eq!(created.entries[0].details["child"], keep.id.as_str());
        assert_eq!(created.entries[0].actor, "planner");
        let submitted = c
            .client
            .audit(&format!("job={}&action=job.submitted", report.id))
            .await
            .unwrap();
        assert_eq!(submitted.entries[0].actor, "planner");
        assert_eq!(
            submitted.entries[0].details["parent_job_id"],
            keep.id.as_str()
        );
        c.stop().await;
    }
}

/// A rule that does not match makes nothing; bad expressions and a bad child program are
/// refused at submission with where they are; an expression that would run for ever hits the
/// budget and is an error (flagged), not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_checked_at_submission_and_bounded_when_run() {
    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());
    let refused = |toml: &str| {
        let spec = spec(toml);
        let client = c.client.clone();
        async move { client.submit(&spec).await.unwrap_err() }
    };
    let base = "name = \"x\"\ncode = \"print(1)\"\nshards = { count = 1 }\n";
    let e = refused(&format!(
        "{base}[[followup]]\nwhen = \"summary.failed > 0 && summary.faild == 0\"\nthen = \"self\"\n"
    ))
    .await;
    assert_eq!(e.code(), Some("invalid_spec"), "{e}");
    let text = e.to_string();
    assert!(text.contains("followup[0].when"), "{text}");
    assert!(text.contains("line 1, column 30"), "{text}");
    assert!(text.contains("summary.faild"), "{text}");
    let e = refused(&format!(
        "{base}[[followup]]\nwhen = \"true\"\nthen = \"self\"\ninput = {{ items = \"result.filter(x, \" }}\n"
    ))
    .await;
    assert!(e.to_string().contains("followup[0].input.items"), "{e}");
    let e = refused(&format!(
        "{base}[[followup]]\nwhen = \"true\"\n[followup.then]\nname = \"y\"\ncode = \"x = (\"\nshards = {{ count = 1 }}\n"
    ))
    .await;
    assert!(e.to_string().contains("followup[0].then.code"), "{e}");
    let e = refused(&format!(
        "{base}[[followup]]\nwhen = \"true\"\n[followup.then]\nname = \"y\"\ncode = \"import os\\nwhile True:\\n    os.fork()\\n\"\nshards = {{ count = 1 }}\n"
    ))
    .await;
    assert_eq!(e.code(), Some("rejected_by_review"), "{e}");
    // No AI planner on this coordinator.
    let e = refused(&format!("{base}ai_followup = true\n")).await;
    assert!(e.to_string().contains("ai_followup"), "{e}");
    assert!(c.client.jobs(None, 10).await.unwrap().jobs.is_empty());

    // Does not match: nothing made, the evaluation audited.
    let quiet = c
        .client
        .submit(&spec(&format!(
            "{base}[[followup]]\nwhen = \"summary.failed > 0\"\nthen = \"self\"\n"
        )))
        .await
        .unwrap();
    let chain = wait_chain(&c, &quiet.id, Duration::from_secs(60), |ch| settled(ch, 1)).await;
    assert_eq!(chain.jobs.len(), 1);

    // Three nested passes over 3,000 numbers: refused by the budget, flagged, no child.
    let bomb = c
        .client
        .submit(&spec(
            "name = \"big\"\ncode = \"print(list(range(3000)))\"\nshards = { count = 1 }\naggregate = \"concat\"\n\
             [[followup]]\nwhen = \"result.all(a, result.all(b, result.all(c, a + b + c >= 0)))\"\nthen = \"self\"\n",
        ))
        .await
        .unwrap();
    let started = Instant::now();
    wait_chain(&c, &bomb.id, Duration::from_secs(60), |ch| settled(ch, 1)).await;
    let evaluated = c
        .client
        .audit(&format!("job={}&action=followup.evaluated", bomb.id))
        .await
        .unwrap();
    let error = evaluated.entries[0].details["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("budget"), "{error}");
    let flags = c
        .client
        .review_flags(&format!("job={}", bomb.id))
        .await
        .unwrap();
    assert!(
        flags.flags.iter().any(|f| f.kind == "followup_error"),
        "{flags:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    c.stop().await;
}

/// A rule that starts its own job again stops at its depth cap; the cap is flagged and
/// audited, and cancelling the root with `chain` reaches what is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_triggering_rule_stops_at_the_cap_with_a_flag() {
    for db in crate::support::BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a", Default::default());
        let root = c
            .client
            .submit(&spec(
                "name = \"again\"\ncode = \"print(1)\"\nshards = { count = 2 }\naggregate = \"sum\"\n\
                 [[followup]]\nname = \"forever\"\nwhen = \"true\"\nthen = \"self\"\nmax_depth = 3\n",
            ))
            .await
            .unwrap();
        let chain = wait_chain(&c, &root.id, Duration::from_secs(90), |ch| settled(ch, 4)).await;
        let last = &chain.jobs[3];
        assert_eq!(last.lineage.as_ref().unwrap().depth, 3);
        let capped = c
            .client
            .audit(&format!("job={}&action=followup.capped", last.id))
            .await
            .unwrap();
        assert_eq!(capped.entries.len(), 1, "{db:?}: {capped:?}");
        assert_eq!(capped.entries[0].details["cap"], "depth");
        let flags = c
            .client
            .review_flags(&format!("job={}", last.id))
            .await
            .unwrap();
        assert_eq!(flags.flags.len(), 1, "{flags:?}");
        assert_eq!(flags.flags[0].kind, "followup_capped");
        // Still nothing more after a while.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(c.client.chain(&root.id).await.unwrap().jobs.len(), 4);

        // A chain with a slow step: cancelling the root cancels the running child.
        let slow = c
            .client
            .submit(&spec(
                "name = \"slow chain\"\ncode = \"print(1)\"\nshards = { count = 1 }\n\
                 [[followup]]\nwhen = \"true\"\n[followup.then]\nname = \"slow\"\ncode = \"import time; time.sleep(60)\"\nshards = { count = 2 }\n",
            ))
            .await
            .unwrap();
        let chain = wait_chain(&c, &slow.id, Duration::from_secs(60), |ch| {
            ch.jobs.len() == 2 && ch.jobs[0].state.is_final()
        })
        .await;
        assert!(!chain.jobs[1].state.is_final());
        c.client.cancel_chain(&slow.id).await.unwrap();
        let child = c.client.job(&chain.jobs[1].id).await.unwrap();
        assert_eq!(child.state, JobState::Cancelled, "{db:?}: {child:?}");
        c.stop().await;
    }
}

/// `rerun_failed` runs exactly the failed shards again, and its result is the whole job's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_failed_runs_exactly_the_failed_shards_and_merges_the_result() {
    for db in crate::support::BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a", Default::default());
        // Shards 1 and 4 fail in the six-shard job only.
        let code = "import json, os\nv = json.load(open('input.json'))['items'][0]\n\
                    if os.environ['FLEETBOX_SHARD_COUNT'] == '6' and v in (2, 5):\n    raise SystemExit(3)\nprint(v * 10)\n";
        let root = c
            .client
            .submit(&spec(&format!(
                "name = \"flaky\"\ncode = {code:?}\nshards = {{ items = [1, 2, 3, 4, 5, 6] }}\naggregate = \"sum\"\nmax_attempts = 1\nallow_partial = true\n\
                 [verify]\nrecheck = \"none\"\n\
                 [[followup]]\nname = \"retry\"\nwhen = \"summary.failed + summary.dead > 0\"\naction = \"rerun_failed\"\n"
            )))
            .await
            .unwrap();
        let chain = wait_chain(&c, &root.id, Duration::from_secs(90), |ch| settled(ch, 2)).await;
        let parent = c.client.result(&root.id).await.unwrap();
        assert_eq!(
            parent.result_value(),
            Some(json!(140)),
            "{db:?}: {parent:?}"
        );
        let child = &chain.jobs[1];
        assert_eq!(child.shards.total, 2, "{db:?}: {child:?}");
        let inputs: Vec<u64> = futures_inputs(&c, &child.id, 2).await;
        assert_eq!(inputs, [2, 5]);
        let merged = c.client.result(&child.id).await.unwrap();
        assert_eq!(merged.state, JobState::Completed);
        assert_eq!(
            merged.result_value(),
            Some(json!(210)),
            "{db:?}: {merged:?}"
        );
        let notes = merged.summary.unwrap().notes.join(" ");
        assert!(notes.contains("re-ran 2 failed shard(s)"), "{notes}");
        c.stop().await;
    }
}

/// The values the shards of job `id` were given (their `items[0]`).
async fn futures_inputs(c: &Coordinator, id: &str, n: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 0..n {
        let d = c.client.shard(id, i).await.unwrap();
        out.push(d.input["items"][0].as_u64().unwrap());
    }
    out
}

/// `notify` against a local server that fails twice, then succeeds: delivered once, with
/// every try recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_retries_with_back_off_and_is_delivered_once() {
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = {
        let (hits, bodies) = (hits.clone(), bodies.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let n = hits.fetch_add(1, Ordering::SeqCst);
                bodies
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap_or_default());
                async move {
                    if n < 2 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            }),
        )
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    let Some(mut c) = Coordinator::start_with(Db::Sqlite, |config| {
        config.planner.notify_backoff_ms = 100;
        // Loopback, allowed by the operator (see the guard's own test below).
        config.planner.notify_allow =
            vec![fleetbox_server::planner::guard::Allowed::parse("127.0.0.1").unwrap()];
    })
    .await
    else {
        return;
    };
    c.agent("a", Default::default());
    let job = c
        .client
        .submit(&spec(&format!(
            "name = \"alert\"\ncode = \"print(7)\"\nshards = {{ count = 3 }}\naggregate = \"sum\"\n\
             [[followup]]\nname = \"page\"\nwhen = \"result == 21\"\naction = \"notify\"\nurl = \"http://127.0.0.1:{port}/hook\"\n"
        )))
        .await
        .unwrap();
    let chain = wait_chain(&c, &job.id, Duration::from_secs(60), |ch| {
        ch.notifications.iter().any(|n| n.state == "delivered")
    })
    .await;
    assert_eq!(chain.jobs.len(), 1);
    let n = &chain.notifications[0];
    assert_eq!((n.tries, n.rule.as_str()), (3, "page"), "{n:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "delivered once, after two failures"
    );
    let last = bodies.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["job_id"], job.id.as_str());
    assert_eq!(last["result"], 21);
    assert_eq!(last["summary"]["accepted"], 3);
    let tries = c
        .client
        .audit(&format!("job={}&action=followup.notified", job.id))
        .await
        .unwrap();
    let outcomes: Vec<&str> = tries
        .entries
        .iter()
        .map(|e| e.details["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["pending", "pending", "delivered"]);
    assert!(
        tries.entries[0].details["error"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    c.stop().await;
}

/// Webhooks to the coordinator's loopback, by address and by a name resolving to it, and to a
/// cloud metadata address: refused without a try reaching anything, failed at once, audited
/// and flagged. (The allow-listed case is the test above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_internal_addresses_are_refused_unless_allowed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = {
        let hits = hits.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                hits.fetch_add(1, Ordering::SeqCst);
                async { axum::http::StatusCode::NO_CONTENT }
            }),
        )
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());
    let job = c
        .client
        .submit(&spec(&format!(
            "name = \"probe\"\ncode = \"print(1)\"\nshards = {{ count = 1 }}\n\
             [[followup]]\nname = \"by-address\"\nwhen = \"true\"\naction = \"notify\"\nurl = \"http://127.0.0.1:{port}/hook\"\n\
             [[followup]]\nname = \"by-name\"\nwhen = \"true\"\naction = \"notify\"\nurl = \"http://localhost:{port}/hook\"\n\
             [[followup]]\nname = \"metadata\"\nwhen = \"true\"\naction = \"notify\"\nurl = \"http://169.254.169.254/latest/meta-data/\"\n"
        )))
        .await
        .unwrap();
    let chain = wait_chain(&c, &job.id, Duration::from_secs(60), |ch| {
        ch.notifications.len() == 3 && ch.notifications.iter().all(|n| n.state == "failed")
    })
    .await;
    for n in &chain.notifications {
        assert_eq!(n.tries, 1, "refused at once, not retried: {n:?}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing reached the loopback"
    );
    let tries = c
        .client
        .audit(&format!("job={}&action=followup.notified", job.id))
        .await
        .unwrap();
    let errors: Vec<&str> = tries
        .entries
        .iter()
        .map(|e| e.details["error"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.starts_with("refused")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("`localhost`")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("link-local")),
        "{errors:?}"
    );
    let flags = c
        .client
        .review_flags(&format!("job={}&kind=notify_failed", job.id))
        .await
        .unwrap()
        .flags;
    assert_eq!(flags.len(), 3);
    c.stop().await;
}

/// Two coordinators on one PostgreSQL database plan the same finished jobs: each rule's child
/// is made once (many jobs, so the planners race).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_make_each_child_once() {
    let Some(mut c) = Coordinator::start(Db::Postgres).await else {
        return;
    };
    let mut second = c.running.state.config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    second.data_dir = c.dir.path().join("second");
    let other = fleetbox_server::start(second).await.unwrap();
    c.agent("a", Default::default());
    let mut roots = Vec::new();
    for i in 0..12 {
        let job = c
            .client
            .submit(&spec(&format!(
                "name = \"race {i}\"\ncode = \"print({i})\"\nshards = {{ count = 1 }}\n\
                 [[followup]]\nwhen = \"true\"\n[followup.then]\nname = \"child {i}\"\ncode = \"print(0)\"\nshards = {{ count = 1 }}\n"
            )))
            .await
            .unwrap();
        roots.push(job.id);
    }
    for id in &roots {
        let chain = wait_chain(&c, id, Duration::from_secs(90), |ch| settled(ch, 2)).await;
        assert_eq!(chain.jobs.len(), 2, "{chain:#?}");
        let created = c
            .client
            .audit(&format!("job={id}&action=followup.created"))
            .await
            .unwrap();
        assert_eq!(created.entries.len(), 1, "{id}: {created:?}");
    }
    other.shutdown().await;
    c.stop().await;
}

/// The chain's job budget and the tenant's rate stop a chain too, each flagged with its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_budget_and_the_tenant_rate_stop_chains_too() {
    let again = "name = \"again\"\ncode = \"print(1)\"\nshards = { count = 1 }\n\
                 [[followup]]\nwhen = \"true\"\nthen = \"self\"\n";
    for (cap, jobs, change) in [
        (
            "chain_budget",
            3,
            (|c: &mut fleetbox_server::ServerConfig| c.planner.chain_budget = 3) as fn(&mut _),
        ),
        ("tenant_rate", 3, |c: &mut fleetbox_server::ServerConfig| {
            c.planner.rate_per_minute = 2
        }),
    ] {
        let Some(mut c) = Coordinator::start_with(Db::Sqlite, change).await else {
            return;
        };
        c.agent("a", Default::default());
        let root = c.client.submit(&spec(again)).await.unwrap();
        let chain = wait_chain(&c, &root.id, Duration::from_secs(60), |ch| {
            settled(ch, jobs)
        })
        .await;
        let last = &chain.jobs[jobs - 1];
        let capped = c
            .client
            .audit(&format!("job={}&action=followup.capped", last.id))
            .await
            .unwrap();
        assert_eq!(capped.entries.len(), 1, "{cap}: {capped:?}");
        assert_eq!(capped.entries[0].details["cap"], cap);
        let flags = c
            .client
            .review_flags(&format!("job={}", last.id))
            .await
            .unwrap();
        assert_eq!(flags.flags[0].kind, "followup_capped");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            c.client.chain(&root.id).await.unwrap().jobs.len(),
            jobs,
            "{cap}"
        );
        c.stop().await;
    }
}

/// The AI planner (a stand-in OpenAI-compatible endpoint here: no model runs on this machine,
/// so this is the one mocked part) proposes a follow-up from the coordinator's templates; the
/// proposal is audited, made like a rule's child, and goes through the same code review; a
/// template it was not offered, or none, makes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ai_planner_proposes_from_its_templates_and_is_reviewed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let model = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(
            |axum::Json(req): axum::Json<serde_json::Value>| async move {
                let kind = req["response_format"]["json_schema"]["name"]
                    .as_str()
                    .unwrap_or("");
                let user = req["messages"][1]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let answer = if kind == "code_review" {
                    json!({"verdict": "safe", "risk": 0, "reasons": []})
                } else if kind == "result_review" {
                    // The stand-in finds the `numbers` job's results suspicious (it was shown them).
                    let verdict = if user.contains("`numbers`") && user.contains("[1,2,3,1,2,3]") {
                        "suspicious"
                    } else {
                        "normal"
                    };
                    json!({"verdict": verdict, "reasons": ["the values repeat"]})
                } else if user.contains("`numbers`") {
                    json!({"template": "count", "reason": "the result is a list: count it"})
                } else if user.contains("`odd`") {
                    json!({"template": "rm-everything", "reason": "why not"})
                } else if user.contains("`risky`") {
                    json!({"template": "bomb", "reason": "stress test"})
                } else {
                    json!({"template": "none", "reason": "nothing to do"})
                };
                axum::Json(json!({"choices": [{"message": {"content": answer.to_string()}}]}))
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, model).await });
    let templates = tempfile::tempdir().unwrap();
    std::fs::write(
        templates.path().join("count.toml"),
        "name = \"count the values\"\ncode = \"import json\\nprint(len(json.load(open('input.json'))['items'][0]))\"\nshards = {}\n",
    )
    .unwrap();
    std::fs::write(
        templates.path().join("bomb.toml"),
        "name = \"a stress test\"\ncode = \"import os\\nwhile True:\\n    os.fork()\\n\"\nshards = { count = 1 }\n",
    )
    .unwrap();
    let dir = templates.path().to_path_buf();
    let Some(mut c) = Coordinator::start_with(Db::Sqlite, |config| {
        config.llm = Some(fleetbox_review::llm::LlmConfig::new(
            url.clone(),
            "stand-in",
        ));
        config.ai_planner_templates = Some(dir);
    })
    .await
    else {
        return;
    };
    c.agent("a", Default::default());
    let submit = |name: &str| {
        let spec = spec(&format!(
            "name = \"{name}\"\ncode = \"print([1, 2, 3])\"\nshards = {{ count = 2 }}\naggregate = \"concat\"\nai_followup = true\n"
        ));
        let client = c.client.clone();
        async move { client.submit(&spec).await.unwrap() }
    };
    let numbers = submit("numbers").await;
    let chain = wait_chain(&c, &numbers.id, Duration::from_secs(60), |ch| {
        settled(ch, 2)
    })
    .await;
    let child = &chain.jobs[1];
    assert_eq!(child.lineage.as_ref().unwrap().rule, "ai:count");
    assert_eq!(child.name, "count the values");
    let r = c.client.result(&child.id).await.unwrap();
    assert_eq!(r.result_value(), Some(json!([6])), "{r:?}");
    let evaluated = c
        .client
        .audit(&format!("job={}&action=followup.evaluated", numbers.id))
        .await
        .unwrap();
    assert_eq!(evaluated.entries[0].details["ai"], true);
    assert_eq!(evaluated.entries[0].details["proposal"], "count");
    assert!(
        evaluated.entries[0].details["reason"]
            .as_str()
            .unwrap()
            .contains("count it")
    );
    // After the run the model was shown the results too: it flagged them (a flag, no more).
    let parent = c.client.result(&numbers.id).await.unwrap();
    let flags = parent.summary.unwrap().flags;
    assert!(
        flags
            .iter()
            .any(|f| f.kind == "model" && f.detail.contains("the values repeat")),
        "{flags:?}"
    );
    assert_eq!(parent.state, JobState::Completed);
    let queued = c
        .client
        .review_flags(&format!("job={}&kind=anomaly", numbers.id))
        .await
        .unwrap();
    assert_eq!(queued.flags.len(), 1, "{queued:?}");

    for (name, action, needle) in [
        ("odd", "followup.evaluated", "not an offered template"),
        ("risky", "followup.failed", "code review rejected"),
    ] {
        let job = submit(name).await;
        wait_chain(&c, &job.id, Duration::from_secs(60), |ch| settled(ch, 1)).await;
        let entries = c
            .client
            .audit(&format!("job={}&action={action}", job.id))
            .await
            .unwrap();
        let text = entries.entries[0].details["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(text.contains(needle), "{name}: {text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            c.client.chain(&job.id).await.unwrap().jobs.len(),
            1,
            "{name}"
        );
    }
    let quiet = submit("quiet").await;
    wait_chain(&c, &quiet.id, Duration::from_secs(60), |ch| settled(ch, 1)).await;
    let evaluated = c
        .client
        .audit(&format!("job={}&action=followup.evaluated", quiet.id))
        .await
        .unwrap();
    assert_eq!(evaluated.entries[0].details["matched"], false);
    c.stop().await;
}
