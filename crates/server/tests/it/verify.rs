//! Verification with real agents and the coordinator's real sandbox: a lying agent among
//! honest ones is caught and quarantined and the result stays exact; a program whose output
//! is random is flagged, not accepted silently; `numeric` tolerance passes floating-point
//! noise and catches a real difference.

use std::time::Duration;

use fleetbox_proto::{JobState, Verdict};
use serde_json::json;

use crate::support::{BOTH, Coordinator, spec};

/// Each shard returns the sum of squares of its items.
const SQUARES: &str = "import json, os\nitems = json.load(open(os.environ['FLEETBOX_INPUT']))['items']\nprint(sum(i * i for i in items))\n";

/// A liar on 10% of its results (every 10th) among three honest agents, under the default policy
/// (`adaptive`, two strikes): jobs of 400 and then 40 shards until it is quarantined. Then no
/// wrong value stands unflagged: every job is exact, or `needs_review` and exact after
/// `rerun-tainted`; no honest agent was struck; every invalid verdict is audited, and the
/// quarantine; a release lets it lease again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_agent_is_caught_quarantined_and_the_result_stays_exact() {
    liar_is_caught(0.10).await;
}

/// The same with a liar on only 2% of its results (every 50th): it cannot earn trust (250
/// valid results in a row) before two of its lies are checked, so it is quarantined all the
/// same. (A liar drawing its 2% at random earns trust first in about 0.6% of cases; that,
/// and how long it then lasts, is `fleetbox-bench trust`'s simulation, not this test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_on_two_percent_is_caught_quarantined_and_the_result_stays_exact() {
    liar_is_caught(0.02).await;
}

/// `/metrics` as the admin scrapes it.
async fn metrics(c: &Coordinator) -> String {
    reqwest::Client::new()
        .get(format!("{}/metrics", c.running.url()))
        .bearer_auth(&c.running.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Every audit entry `query` selects, following the pages.
async fn audit_all(c: &Coordinator, query: &str) -> Vec<fleetbox_proto::api::AuditRecord> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .client
            .audit(&format!("{query}&limit=5000&after={after}"))
            .await
            .unwrap();
        all.extend(page.entries);
        match page.next_after {
            Some(next) => after = next,
            None => return all,
        }
    }
}

async fn liar_is_caught(rate: f64) {
    for db in BOTH {
        let Some(mut c) = Coordinator::start_with(db, |config| {
            config.check_workers = 2;
        })
        .await
        else {
            continue;
        };
        for name in ["honest-1", "honest-2", "honest-3"] {
            c.agent(name, Default::default());
        }
        c.agent_lying("liar", Default::default(), rate);
        let mut jobs = Vec::new();
        let mut liar = None;
        let mut last_seen = None;
        for n in [400u64].into_iter().chain(std::iter::repeat_n(40, 60)) {
            let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            let job = spec(&format!(
                "name = \"squares\"\ncode = {SQUARES:?}\n[shards]\nitems = [{}]\nper_shard = 1\n[aggregate]\nreducer = \"sum\"\n",
                items.join(", ")
            ));
            let r = c.run(&job, Duration::from_secs(300)).await;
            assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
            jobs.push((r.id.clone(), json!((0..n).map(|i| i * i).sum::<u64>())));
            let agents = c.client.agents().await.unwrap().agents;
            let l = agents.into_iter().find(|a| a.name == "liar").unwrap();
            if l.quarantined.is_some() {
                liar = Some(l);
                break;
            }
            last_seen = Some(l);
        }
        let liar = liar.unwrap_or_else(|| {
            panic!(
                "{db:?}: the {rate} liar was never quarantined in {} jobs: {last_seen:?}",
                jobs.len()
            )
        });
        let tainted = no_wrong_value_stands(&c, &jobs, db).await;
        let agents = c.client.agents().await.unwrap().agents;
        for h in agents.iter().filter(|a| a.name != "liar") {
            assert_eq!(h.strikes, 0, "{db:?}: an honest agent was struck: {h:?}");
            assert!(h.quarantined.is_none(), "{db:?}");
        }
        eprintln!(
            "{db:?}: {rate} liar quarantined after {} job(s), {} strikes; {tainted} finished job(s) tainted and redone",
            jobs.len(),
            liar.strikes
        );
        // The audit log has each invalid verdict and the quarantine (read page by page: a
        // liar caught late leaves more entries than one page holds).
        let verified = audit_all(&c, "action=attempt.verified").await;
        let invalid = verified
            .iter()
            .filter(|e| e.details["verdict"] == "invalid")
            .count();
        let entries = audit_all(&c, "action=agent.quarantined").await;
        assert!(
            invalid as u32 >= liar.strikes,
            "{db:?}: {invalid} for {} strikes",
            liar.strikes
        );
        assert!(
            entries.iter().any(|e| e.action == "agent.quarantined"
                && e.agent_id.as_deref() == Some(liar.id.as_str())),
            "{db:?}"
        );
        // A quarantined agent gets no work until it is released.
        c.client.release_agent(&liar.id).await.unwrap();
        let after = c.client.agents().await.unwrap().agents;
        let released = after.iter().find(|a| a.name == "liar").unwrap();
        assert!(
            released.quarantined.is_none() && released.strikes == 0,
            "{db:?}"
        );
        assert!(c.client.release_agent(&liar.id).await.is_err());
        c.stop().await;
    }
}

/// Every job is exact, or `needs_review` and exact after `rerun-tainted` (which a job not in
/// `needs_review` refuses). Returns how many were `needs_review`.
async fn no_wrong_value_stands(
    c: &Coordinator,
    jobs: &[(String, serde_json::Value)],
    db: crate::support::Db,
) -> usize {
    let mut tainted = 0;
    for (id, exact) in jobs {
        let view = c.client.job(id).await.unwrap();
        if view.state == JobState::NeedsReview {
            tainted += 1;
            let ack = c.client.rerun_tainted(id).await.unwrap();
            assert!(ack["rechecked"].as_u64().unwrap() > 0, "{db:?}: {ack}");
            let r = c.wait(id, Duration::from_secs(120)).await;
            assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
            assert_eq!(
                r.result_value().as_ref(),
                Some(exact),
                "{db:?}: job {id} after re-run"
            );
            let summary = r.summary.unwrap();
            assert!(
                summary.flags.iter().any(|f| f.kind == "tainted"),
                "{db:?}: {:?}",
                summary.flags
            );
        } else {
            let r = c.client.result(id).await.unwrap();
            assert_eq!(
                r.result_value().as_ref(),
                Some(exact),
                "{db:?}: job {id} is `{}` with a wrong value nobody flagged",
                view.state
            );
        }
        assert!(c.client.rerun_tainted(id).await.is_err());
    }
    tainted
}

/// A program whose output is random cannot be verified: the server's two runs differ, the
/// shard is flagged `nondeterministic` and named in the summary; the job still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_output_is_inconclusive_and_flagged() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        let job = spec(
            "name = \"random\"\ncode = \"import random; print(random.random())\"\nshards = { count = 3 }\n[verify]\nrecheck = \"all\"\n",
        );
        let result = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        let summary = result.summary.unwrap();
        let flagged: Vec<u64> = summary
            .flags
            .iter()
            .filter(|f| f.kind == "nondeterministic")
            .map(|f| f.shard)
            .collect();
        assert_eq!(flagged.len(), 3, "{db:?}: {:?}", summary.flags);
        assert_eq!(summary.verified, 0, "{db:?}");
        for i in 0..3 {
            let d = c.client.shard(&result.id, i).await.unwrap();
            let agent = d.attempts.iter().find(|a| a.agent_id != "server").unwrap();
            assert_eq!(agent.verdict, Verdict::Inconclusive, "{db:?}");
            assert_eq!(
                d.attempts.iter().filter(|a| a.agent_id == "server").count(),
                2,
                "{db:?}: the server ran it twice"
            );
        }
        // In the review queue for a person, one entry per shard.
        let queued = c
            .client
            .review_flags(&format!("job={}&kind=inconclusive", result.id))
            .await
            .unwrap()
            .flags;
        let mut shards: Vec<u64> = queued
            .iter()
            .map(|f| f.details["shard"].as_u64().unwrap())
            .collect();
        shards.sort();
        assert_eq!(shards, [0, 1, 2], "{db:?}: {queued:?}");
        // Not the agent's fault: no strike.
        let agents = c.client.agents().await.unwrap().agents;
        assert_eq!(agents[0].strikes, 0);
        c.stop().await;
    }
}

/// `{ numeric = 1e-9 }`: floating-point noise between runs passes; a real difference (a lie
/// of one part in a million) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_tolerance_passes_noise_and_catches_a_difference() {
    // Noise of one part in 10^13, up or down by the parity of the process id: runs differ.
    let noisy =
        "import os\nx = 1234.5678\nprint(x * (1 + (1e-13 if os.getpid() % 2 else -1e-13)))\n";
    for db in BOTH {
        let Some(mut c) = Coordinator::start_with(db, |config| {
            // The liar below must keep its work: this test is about the comparison.
            config.quarantine_strikes = 1000;
        })
        .await
        else {
            continue;
        };
        c.agent("honest", Default::default());
        let job = spec(&format!(
            "name = \"noise\"\ncode = {noisy:?}\nshards = {{ count = 4 }}\n[verify]\nrecheck = \"all\"\ncompare = {{ numeric = 1e-9 }}\n"
        ));
        let result = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        let summary = result.summary.unwrap();
        assert!(summary.flags.is_empty(), "{db:?}: {:?}", summary.flags);
        assert_eq!(summary.verified, 4, "{db:?}");
        c.stop_agents().await;

        // An agent that adds one to every value: 1,000,001 against 1,000,000 is caught.
        c.agent_lying("liar", Default::default(), 1.0);
        let job = spec(
            "name = \"off\"\ncode = \"print(1000000)\"\nshards = { count = 3 }\naggregate = \"sum\"\n[verify]\ncompare = { numeric = 1e-9 }\n",
        );
        let result = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        assert_eq!(result.result_value(), Some(json!(3_000_000)), "{db:?}");
        let summary = result.summary.unwrap();
        assert_eq!(
            summary
                .flags
                .iter()
                .filter(|f| f.kind == "agent_result_invalid")
                .count(),
            3,
            "{db:?}: {:?}",
            summary.flags
        );
        let queued = c
            .client
            .review_flags(&format!("job={}&kind=mismatch", result.id))
            .await
            .unwrap()
            .flags;
        assert_eq!(
            queued.len(),
            3,
            "{db:?}: each mismatch is in the review queue"
        );
        c.stop().await;
    }
}

/// A sleeper: honest for its first 30 results (so it earns trust and is re-checked only by
/// sample), then lying on every result. Jobs keep coming until it is caught. Every job that
/// folded one of its unchecked values before that is `needs_review` with the shards named, and
/// `rerun-tainted` makes it exact: no wrong value stays unflagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeper_is_caught_and_the_jobs_it_tainted_are_flagged_and_redone() {
    until_caught("sleeper", 30, 1.0).await;
}

/// Jobs of 20 shards, one honest agent and one that lies on `rate` of its results after its
/// first `after`, until it is quarantined (at its first invalid result); then every job is
/// exact, or `needs_review` and exact after `rerun-tainted`.
async fn until_caught(name: &str, after: u64, rate: f64) {
    const SHARDS: u64 = 20;
    let code = "import json, os\nprint(json.load(open(os.environ['FLEETBOX_INPUT']))['index'])\n";
    let exact = json!((0..SHARDS).sum::<u64>());
    for db in BOTH {
        let Some(mut c) = Coordinator::start_with(db, |config| {
            config.quarantine_strikes = 1;
            // The sleeper earns trust with its first 30 honest results (the default asks 250).
            config.trusted_after = 10;
        })
        .await
        else {
            continue;
        };
        c.agent("honest", Default::default());
        c.agent_sleeping(name, after, rate);
        let job = spec(&format!(
            "name = \"until caught\"\ncode = {code:?}\nshards = {{ count = {SHARDS} }}\naggregate = \"sum\"\n"
        ));
        let mut jobs = Vec::new();
        let mut caught = false;
        for _ in 0..60 {
            let r = c.run(&job, Duration::from_secs(120)).await;
            assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
            jobs.push(r.id.clone());
            let agents = c.client.agents().await.unwrap().agents;
            if agents
                .iter()
                .any(|a| a.name == name && a.quarantined.is_some())
            {
                caught = true;
                break;
            }
        }
        assert!(
            caught,
            "{db:?}: the {name} was never caught in {} jobs",
            jobs.len()
        );
        let jobs: Vec<_> = jobs.into_iter().map(|id| (id, exact.clone())).collect();
        let tainted = no_wrong_value_stands(&c, &jobs, db).await;
        eprintln!(
            "{db:?}: the {name} was caught after {} jobs; {tainted} finished jobs were tainted and redone",
            jobs.len()
        );
        c.stop().await;
    }
}

/// `recheck = "on_anomaly"`: results are taken on the agents' word, and the shards the result
/// review finds standing out are re-run by the server before the fold. A job with one
/// outlying value (shard 7 returns 10^9 where the others return their square) has that
/// shard, and only it, checked and verified; a uniform job has none checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_anomaly_checks_the_shards_that_stand_out_before_the_fold() {
    const PROGRAM: &str = "import json, os\ni = json.load(open(os.environ['FLEETBOX_INPUT']))['items'][0]\nprint(10**9 if i == 7 else i * i)\n";
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        c.agent("a2", Default::default());
        let items: Vec<String> = (0..30).map(|i| i.to_string()).collect();
        let job = |program: &str| {
            spec(&format!(
                "name = \"anomaly\"\ncode = {program:?}\n[shards]\nitems = [{}]\nper_shard = 1\n[aggregate]\nreducer = \"sum\"\n[verify]\nrecheck = \"on_anomaly\"\n",
                items.join(", ")
            ))
        };
        let r = c.run(&job(PROGRAM), Duration::from_secs(120)).await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        let exact: u64 = (0..30u64).filter(|&i| i != 7).map(|i| i * i).sum::<u64>() + 1_000_000_000;
        assert_eq!(r.result_value(), Some(json!(exact)), "{db:?}");
        let summary = r.summary.clone().unwrap();
        assert_eq!(summary.server_runs, 1, "{db:?}: {summary:?}");
        assert_eq!(summary.verified, 1, "{db:?}");
        assert!(
            summary
                .flags
                .iter()
                .any(|f| f.kind == "outlier" && f.shard == 7),
            "{db:?}: the outlier is still named: {:?}",
            summary.flags
        );
        let seven = c.client.shard(&r.id, 7).await.unwrap();
        let agent = seven
            .attempts
            .iter()
            .find(|a| a.agent_id != "server")
            .unwrap();
        assert_eq!(agent.verdict, Verdict::Valid, "{db:?}");
        let entries = c
            .client
            .audit(&format!("job={}", r.id))
            .await
            .unwrap()
            .entries;
        assert!(
            entries.iter().any(|e| e.action == "shard.checking"
                && e.details["why"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("recheck = on_anomaly")),
            "{db:?}"
        );

        // Nothing stands out: nothing is checked.
        let uniform = c.run(&job("print(1)"), Duration::from_secs(120)).await;
        assert_eq!(uniform.state, JobState::Completed, "{db:?}");
        assert_eq!(uniform.summary.unwrap().server_runs, 0, "{db:?}");
        c.stop().await;
    }
}

/// Agents the coordinator's own process starts (`fleetbox up`, enrolled with its in-memory
/// token) are trusted from the start: under the default `adaptive` re-check none of their
/// results is run again; an agent enrolled with the ordinary token has every one re-run
/// until it earns trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_own_agents_are_trusted_from_the_start() {
    for db in crate::support::BOTH {
        for own in [true, false] {
            let Some(mut c) = crate::support::Coordinator::start(db).await else {
                continue;
            };
            let token = if own {
                c.running.own_enroll_token.clone()
            } else {
                c.running.enroll_token.clone()
            };
            c.agent_with("local", |config| config.token = token);
            let r = c
                .run(
                    &crate::support::spec(
                        "name = 'own'\ncode = 'print(1)'\naggregate = 'sum'\n[shards]\ncount = 8",
                    ),
                    std::time::Duration::from_secs(60),
                )
                .await;
            assert_eq!(
                r.state,
                fleetbox_proto::JobState::Completed,
                "{db:?}: {r:?}"
            );
            let s = r.summary.unwrap();
            let expected = if own { 0 } else { 8 };
            assert_eq!(s.server_runs, expected, "{db:?}, own: {own}: {s:?}");
            // And the agents list says so: none of an own agent's results are re-checked.
            let agents = c.client.agents().await.unwrap().agents;
            let rate = agents[0].trust[0].recheck_rate;
            assert_eq!(rate, if own { 0.0 } else { 1.0 }, "{db:?}, own: {own}");
            c.stop().await;
        }
    }
}

/// A liar that adds one to integers around 2^60: RFC 8785 writes numbers as doubles, where
/// 2^60 + 1 is 2^60, so the lie passed the `exact` comparison and the sum came out wrong by
/// three. Integers are now compared exactly: each lie is a mismatch, the liar is struck, and the
/// sum (exact to 128 bits) is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_adding_one_to_big_integers_is_caught() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start_with(db, |config| {
            config.quarantine_strikes = 1000;
        })
        .await
        else {
            continue;
        };
        c.agent_lying("liar", Default::default(), 1.0);
        let job = spec(
            "name = \"big\"\ncode = \"print(2**60)\"\nshards = { count = 3 }\naggregate = \"sum\"\n[verify]\nrecheck = \"all\"\n",
        );
        let result = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        assert_eq!(
            result.result_value(),
            Some(json!(3u64 << 60)),
            "{db:?}: a lie was folded"
        );
        let summary = result.summary.unwrap();
        assert_eq!(
            summary
                .flags
                .iter()
                .filter(|f| f.kind == "agent_result_invalid")
                .count(),
            3,
            "{db:?}: {:?}",
            summary.flags
        );
        let agents = c.client.agents().await.unwrap().agents;
        let liar = agents.iter().find(|a| a.name == "liar").unwrap();
        assert_eq!(liar.strikes, 3, "{db:?}");
        c.stop().await;
    }
}

/// A value that differs from the server's only in floating-point rounding (as another machine's
/// BLAS or summation order gives) is `inconclusive`, flagged `machine_dependent`, never a strike:
/// an honest agent on other hardware is not quarantined for it. A difference beyond rounding
/// still is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float_rounding_is_machine_dependent_not_a_lie() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        // Its floats come out 1e-12 off, the way other hardware rounds.
        c.agent_lying("elsewhere", Default::default(), 1.0);
        let job = spec(
            "name = \"floats\"\ncode = \"print(1234.5678 / 7)\"\nshards = { count = 3 }\n[verify]\nrecheck = \"all\"\n",
        );
        let result = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        let summary = result.summary.unwrap();
        let kinds: Vec<&str> = summary.flags.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "machine_dependent").count(),
            3,
            "{db:?}: {:?}",
            summary.flags
        );
        assert!(
            !kinds.contains(&"agent_result_invalid"),
            "{db:?}: {kinds:?}"
        );
        let agents = c.client.agents().await.unwrap().agents;
        let a = agents.iter().find(|a| a.name == "elsewhere").unwrap();
        assert_eq!(a.strikes, 0, "{db:?}: struck for rounding");
        assert!(a.quarantined.is_none(), "{db:?}: quarantined for rounding");
        c.stop().await;
    }
}

/// The coordinator's own sandbox never silently degrades: `process` for server-side runs (where
/// untrusted code runs beside `audit.key`, the tokens and the database) stops the start unless
/// the operator chose it; chosen, `/readyz`, the metrics and every re-check's report say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weaker_server_sandbox_is_refused_unless_chosen_and_then_said_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        fleetbox_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.sandbox_backend = fleetbox_sandbox::Backend::Process;
    let err = match fleetbox_server::start(config).await {
        Ok(_) => panic!("a coordinator started with a `process` sandbox nobody chose"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--recheck-backend process"), "{err}");

    // The test coordinator chose it (its reducer tests need it).
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let http = reqwest::Client::new();
        let ready: serde_json::Value = http
            .get(format!("{}/readyz", c.running.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["sandbox"], "process", "{ready}");
        assert!(
            ready["warnings"][0]
                .as_str()
                .unwrap()
                .contains("--recheck-backend process"),
            "{ready}"
        );
        let metrics = metrics(&c).await;
        assert!(metrics.contains("fleetbox_server_sandbox_weak 1"), "{db:?}");
        c.agent("a", Default::default());
        let job = spec(
            "name = \"w\"\ncode = \"print(7)\"\nshards = { count = 1 }\n[verify]\nrecheck = \"all\"\n",
        );
        let result = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        let shard = c.client.shard(&result.id, 0).await.unwrap();
        let server = shard
            .attempts
            .iter()
            .find(|a| a.agent_id == "server")
            .expect("the server's re-check is an attempt");
        assert!(
            server.report["notes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n.as_str().unwrap().contains("--recheck-backend process")),
            "{db:?}: {}",
            server.report
        );
        c.stop().await;
    }
}

/// A check the coordinator cannot finish (here its sandbox has no interpreter) is tried a bounded
/// number of times, then the shard is settled inconclusive: the job finishes with the agent's
/// value, flagged `unverified`, a review entry, an audit entry and a metric, where it was tried
/// every 15 s forever before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_cannot_finish_is_settled_inconclusive_after_bounded_tries() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start_with(db, |config| {
            config.sandbox.python = Some("/nonexistent/python3".into());
            config.check_retry_ms = 50;
        })
        .await
        else {
            continue;
        };
        c.agent("a", Default::default());
        let job = spec(
            "name = \"stuck\"\ncode = \"print(5)\"\nshards = { count = 1 }\n[verify]\nrecheck = \"all\"\n",
        );
        let result = c.run(&job, Duration::from_secs(60)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        assert_eq!(result.result_value(), Some(json!([5])), "{db:?}");
        let summary = result.summary.unwrap();
        let flag = summary
            .flags
            .iter()
            .find(|f| f.kind == "unverified")
            .unwrap_or_else(|| panic!("{db:?}: {:?}", summary.flags));
        assert!(flag.detail.contains("failed 5 times"), "{db:?}: {flag:?}");
        let queued = c
            .client
            .review_flags(&format!("job={}&kind=inconclusive", result.id))
            .await
            .unwrap()
            .flags;
        assert_eq!(queued.len(), 1, "{db:?}");
        let audit = audit_all(&c, &format!("job={}&action=attempt.verified", result.id)).await;
        assert_eq!(audit.len(), 1, "{db:?}");
        assert_eq!(audit[0].details["finding"], "unverifiable", "{db:?}");
        let metrics = metrics(&c).await;
        assert!(
            metrics.contains("fleetbox_checks_abandoned_total 1"),
            "{db:?}"
        );
        c.stop().await;
    }
}
