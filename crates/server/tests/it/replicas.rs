//! Replicas and quorum (`verify.replicas`, `verify.quorum`): in the store, a replicated shard
//! waits for a second agent, never the same one, and not one on the same machine while an
//! agent on another machine can take it; agreeing replicas accept it verified, disagreeing
//! ones go to the server. With real agents, a liar among honest agents under `replicas = 2,
//! quorum = 2`: every lie is caught and the result is exact.

use std::time::Duration;

use fleetbox_proto::api::{EnrollRequest, MachineFacts};
use fleetbox_proto::{JobState, Status, TaskState, Verdict, VerifySpec};
use fleetbox_server::store::checks::Finding;
use fleetbox_server::store::{
    LeaseGrant, ReportInput, ReportPolicy, Reported, SettleOutcome, Store, now_ms,
};
use serde_json::json;

use crate::support::{BOTH, Coordinator, database, new_job, ok_report, spec};

const POLICY: ReportPolicy = ReportPolicy {
    backoff_base_ms: 0,
    strikes_limit: 2,
};

async fn enroll(store: &Store, id: &str, machine: &str) {
    let req = EnrollRequest {
        name: id.into(),
        slots: 1,
        facts: MachineFacts {
            machine_id: machine.into(),
            ..Default::default()
        },
        ..Default::default()
    };
    crate::support::enroll_in_store(store, id, &req, false).await;
}

async fn lease(store: &Store, agent: &str) -> Vec<LeaseGrant> {
    let now = now_ms();
    store
        .lease_at(
            "default",
            agent,
            10,
            now + 60_000,
            &format!("{agent}.{now}"),
            now,
        )
        .await
        .unwrap()
}

/// Claim the one check waiting and settle it as the server's stricter sandbox failing to run
/// the shard; returns how many other replicas it judged with it.
async fn server_cannot_judge(store: &Store) -> usize {
    let checks = store
        .claim_checks("test-coordinator", 15_000, 4)
        .await
        .unwrap();
    assert_eq!(checks.len(), 1, "{checks:?}");
    let subject = store.check_subject(checks[0]).await.unwrap().unwrap();
    let cannot = Finding::Unverifiable {
        why: "the server's stricter sandbox could not run this shard".into(),
    };
    let others = vec![Verdict::Inconclusive; subject.others.len()];
    store
        .finish_check("test-coordinator", &subject, &[], &cannot, &others, 2)
        .await
        .unwrap()
        .unwrap();
    subject.others.len()
}

#[tokio::test]
async fn replicas_go_to_distinct_agents_and_machines_and_settle_by_quorum() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let store = Store::open(&url).await.unwrap();
        // a and b share a machine; c is on another.
        enroll(&store, "agt_a", "machine-1").await;
        enroll(&store, "agt_b", "machine-1").await;
        enroll(&store, "agt_c", "machine-2").await;
        let mut job = new_job("job_rep", 2, 3);
        job.verify = VerifySpec {
            replicas: 2,
            quorum: 2,
            recheck: fleetbox_proto::Recheck::None,
            ..Default::default()
        };
        store.insert_job(&job).await.unwrap();

        // a runs both shards; each goes back to the queue for a second agent.
        let first = lease(&store, "agt_a").await;
        assert_eq!(first.len(), 2, "{db:?}");
        let reports = [ok_report(&first[0], 0), ok_report(&first[1], 1)];
        let r: Reported = store.report("agt_a", &reports, POLICY).await.unwrap();
        assert!(r.ready.is_empty(), "{db:?}");
        let shard = store
            .shard_detail("default", "job_rep", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(shard.shard.state, TaskState::Queued, "{db:?}");
        // Never the same agent twice; not b (a's machine) while c (another) can take them.
        assert!(lease(&store, "agt_a").await.is_empty(), "{db:?}");
        assert!(lease(&store, "agt_b").await.is_empty(), "{db:?}");
        let second = lease(&store, "agt_c").await;
        assert_eq!(second.len(), 2, "{db:?}");
        // c agrees on shard 0 and lies on shard 1.
        let reports = [ok_report(&second[0], 0), ok_report(&second[1], 41)];
        let r = store.report("agt_c", &reports, POLICY).await.unwrap();
        assert_eq!(r.outcomes[0], SettleOutcome::Accepted, "{db:?}");
        let zero = store
            .shard_detail("default", "job_rep", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(zero.shard.state, TaskState::Accepted, "{db:?}");
        assert!(
            zero.attempts.iter().all(|a| a.verdict == Verdict::Valid),
            "{db:?}: {:?}",
            zero.attempts
        );
        assert_eq!(
            zero.attempts.iter().filter(|a| a.chosen).count(),
            1,
            "{db:?}"
        );
        // The disagreement waits for the server's own run.
        let one = store
            .shard_detail("default", "job_rep", 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.shard.state, TaskState::Reported, "{db:?}");
        // The server cannot judge it (say its stricter limits stop the program): one more
        // replica, since attempts remain.
        let judged = server_cannot_judge(&store).await;
        assert_eq!(judged, 1, "{db:?}: the other replica is judged too");
        let one = store
            .shard_detail("default", "job_rep", 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.shard.state, TaskState::Queued, "{db:?}");
        // Both machines ran it now: b may take it, and its value agrees with a's.
        let third = lease(&store, "agt_b").await;
        assert_eq!(third.len(), 1, "{db:?}");
        let r = store
            .report("agt_b", &[ok_report(&third[0], 1)], POLICY)
            .await
            .unwrap();
        assert_eq!(r.ready, vec!["job_rep".to_string()], "{db:?}");
        let one = store
            .shard_detail("default", "job_rep", 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.shard.state, TaskState::Accepted, "{db:?}");
        for a in &one.attempts {
            let want = if a.agent_id == "agt_c" {
                Verdict::Invalid
            } else {
                Verdict::Valid
            };
            assert_eq!(a.verdict, want, "{db:?}: {a:?}");
            assert_eq!(a.chosen, a.agent_id == "agt_a", "{db:?}: {a:?}");
        }

        // Out of attempts with replicas that disagree and a server that cannot judge: no
        // quorum, rejected with the reason.
        let mut job = new_job("job_noquorum", 1, 2);
        job.verify.replicas = 2;
        job.verify.quorum = 2;
        store.insert_job(&job).await.unwrap();
        let g = lease(&store, "agt_a").await;
        store
            .report("agt_a", &[ok_report(&g[0], 1)], POLICY)
            .await
            .unwrap();
        let g = lease(&store, "agt_c").await;
        store
            .report("agt_c", &[ok_report(&g[0], 2)], POLICY)
            .await
            .unwrap();
        server_cannot_judge(&store).await;
        let shard = store
            .shard_detail("default", "job_noquorum", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(shard.shard.state, TaskState::Rejected, "{db:?}");
        let why = shard.shard.error.unwrap_or_default();
        assert!(
            why.starts_with("no quorum after 2 attempts"),
            "{db:?}: {why}"
        );
        store.close().await;
    }
}

#[tokio::test]
async fn without_another_machine_the_same_machine_may_run_the_replica() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let store = Store::open(&url).await.unwrap();
        enroll(&store, "agt_a", "machine-1").await;
        enroll(&store, "agt_b", "machine-1").await;
        let mut job = new_job("job_one_machine", 1, 3);
        job.verify.replicas = 2;
        job.verify.quorum = 2;
        store.insert_job(&job).await.unwrap();
        let first = lease(&store, "agt_a").await;
        store
            .report("agt_a", &[ok_report(&first[0], 7)], POLICY)
            .await
            .unwrap();
        let second = lease(&store, "agt_b").await;
        assert_eq!(
            second.len(),
            1,
            "{db:?}: the only other agent shares the machine"
        );
        let r = store
            .report("agt_b", &[ok_report(&second[0], 7)], POLICY)
            .await
            .unwrap();
        assert_eq!(r.ready, vec!["job_one_machine".to_string()], "{db:?}");
        store.close().await;
    }
}

/// Each shard returns the square of its item.
const SQUARE: &str = "import json, os\nitems = json.load(open(os.environ['FLEETBOX_INPUT']))['items']\nprint(sum(i * i for i in items))\n";

/// `replicas = 2, quorum = 2` with a liar (30% of its results) among three honest agents:
/// every wrong value it reported is `invalid` and never chosen, no honest agent is struck,
/// and the result is exact, on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_among_replicas_is_caught_every_time_and_the_result_is_exact() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start_with(db, |config| {
            config.check_workers = 2;
            // Keep the liar working, so that every lie it tells is one the quorum must catch.
            config.quarantine_strikes = 1000;
        })
        .await
        else {
            continue;
        };
        for name in ["honest-1", "honest-2", "honest-3"] {
            c.agent(name, Default::default());
        }
        c.agent_lying("liar", Default::default(), 0.30);
        let n = 60u64;
        let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let job = spec(&format!(
            "name = \"squares\"\ncode = {SQUARE:?}\nmax_attempts = 5\n[shards]\nitems = [{}]\nper_shard = 1\n[aggregate]\nreducer = \"sum\"\n[verify]\nreplicas = 2\nquorum = 2\n",
            items.join(", ")
        ));
        let r = c.run(&job, Duration::from_secs(300)).await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        assert_eq!(
            r.result_value(),
            Some(json!((0..n).map(|i| i * i).sum::<u64>())),
            "{db:?}"
        );
        let agents = c.client.agents().await.unwrap().agents;
        let liar = agents.iter().find(|a| a.name == "liar").unwrap();
        let mut lies = 0;
        let mut liar_runs = 0;
        for i in 0..n {
            let detail = c.client.shard(&r.id, i).await.unwrap();
            let truth = json!(i * i);
            let agents_ok: Vec<_> = detail
                .attempts
                .iter()
                .filter(|a| a.status == Status::Ok && a.agent_id != "server")
                .collect();
            assert!(
                agents_ok.len() >= 2,
                "{db:?}: shard {i} was settled by {} agent result(s)",
                agents_ok.len()
            );
            let distinct: std::collections::HashSet<_> =
                agents_ok.iter().map(|a| &a.agent_id).collect();
            assert_eq!(
                distinct.len(),
                agents_ok.len(),
                "{db:?}: an agent ran shard {i} twice"
            );
            for a in &agents_ok {
                let value = &a.report["output"];
                if a.agent_id == liar.id {
                    liar_runs += 1;
                }
                if *value != truth {
                    lies += 1;
                    assert_eq!(a.agent_id, liar.id, "{db:?}: an honest agent was wrong");
                    assert_eq!(
                        a.verdict,
                        Verdict::Invalid,
                        "{db:?}: a lie on shard {i} stood: {a:?}"
                    );
                    assert!(!a.chosen, "{db:?}");
                } else if a.verdict != Verdict::Unchecked {
                    assert_ne!(
                        a.verdict,
                        Verdict::Invalid,
                        "{db:?}: a true value judged invalid"
                    );
                }
            }
        }
        eprintln!("{db:?}: the liar ran {liar_runs} replicas and lied {lies} times; all caught");
        assert!(
            lies > 0,
            "{db:?}: the liar never lied ({liar_runs} runs); the test proves nothing"
        );
        for h in agents.iter().filter(|a| a.name != "liar") {
            assert_eq!(h.strikes, 0, "{db:?}: an honest agent was struck: {h:?}");
        }
        assert_eq!(liar.strikes as usize, lies, "{db:?}: one strike per lie");
        c.stop().await;
    }
}

/// Replicas do not switch off a re-check the job asks for (`recheck = "all"`, which a code
/// review imposes on flagged code): two agreeing replicas of every shard are still checked by
/// the server's run. And one replica's word (`quorum = 1`) is accepted but not `verified`:
/// nobody other than its reporter agreed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_is_rechecked_when_asked_and_one_result_is_never_verified() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        for name in ["honest-1", "honest-2"] {
            c.agent(name, Default::default());
        }
        let job = spec(&format!(
            "name = \"checked\"\ncode = {SQUARE:?}\n[shards]\nitems = [1, 2, 3]\nper_shard = 1\n[aggregate]\nreducer = \"sum\"\n[verify]\nreplicas = 2\nquorum = 2\nrecheck = \"all\"\n"
        ));
        let r = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        assert_eq!(r.result_value(), Some(json!(14)), "{db:?}");
        for i in 0..3 {
            let detail = c.client.shard(&r.id, i).await.unwrap();
            assert!(
                detail.attempts.iter().any(|a| a.agent_id == "server"),
                "{db:?}: shard {i} was not checked by the server: {:?}",
                detail.attempts
            );
            let agents: Vec<_> = detail
                .attempts
                .iter()
                .filter(|a| a.agent_id != "server")
                .collect();
            assert!(agents.len() >= 2, "{db:?}");
            assert!(
                agents.iter().all(|a| a.verdict == Verdict::Valid),
                "{db:?}: {agents:?}"
            );
        }
        assert_eq!(r.summary.unwrap().verified, 3, "{db:?}");

        let job = spec(&format!(
            "name = \"one\"\ncode = {SQUARE:?}\n[shards]\nitems = [1, 2]\nper_shard = 1\n[aggregate]\nreducer = \"sum\"\n[verify]\nreplicas = 2\nquorum = 1\nrecheck = \"none\"\n"
        ));
        let r = c.run(&job, Duration::from_secs(120)).await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        assert_eq!(r.result_value(), Some(json!(5)), "{db:?}");
        assert_eq!(
            r.summary.unwrap().verified,
            0,
            "{db:?}: one agent's word counted as verified"
        );
        c.stop().await;
    }
}

/// When a liar is caught, every job that holds one of its unchecked values is flagged, whatever
/// its state: one still folding (`aggregating`, its fold abandoned) and one already waiting for a
/// person (`needs_review`), where only `completed`/`failed` jobs were before.
#[tokio::test]
async fn tainting_reaches_jobs_being_folded_and_waiting_for_review() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let store = Store::open(&url).await.unwrap();
        enroll(&store, "liar_1", "machine-1").await;
        enroll(&store, "liar_2", "machine-2").await;
        store.insert_job(&new_job("job_fold", 2, 3)).await.unwrap();
        // One shard each.
        for (agent, value) in [("liar_1", 0), ("liar_2", 1)] {
            let now = now_ms();
            let g = store
                .lease_at(
                    "default",
                    agent,
                    1,
                    now + 60_000,
                    &format!("{agent}.l"),
                    now,
                )
                .await
                .unwrap();
            assert_eq!(g.len(), 1, "{db:?}");
            store
                .report(agent, &[ok_report(&g[0], value)], POLICY)
                .await
                .unwrap();
        }
        let state = |s: &Store| {
            let s = s.clone();
            async move { s.job("default", "job_fold").await.unwrap().unwrap().state }
        };
        // A coordinator is folding it.
        let now = now_ms();
        let tries = store
            .claim_fold("job_fold", "coord-x", now, now + 60_000)
            .await
            .unwrap();
        assert_eq!(tries, Some(1), "{db:?}");
        assert_eq!(state(&store).await, JobState::Aggregating, "{db:?}");

        let flagged = store.taint_finished_jobs_of("liar_1").await.unwrap();
        assert_eq!(
            flagged,
            ["job_fold"],
            "{db:?}: a job being folded was missed"
        );
        assert_eq!(state(&store).await, JobState::NeedsReview, "{db:?}");
        let flagged = store.taint_finished_jobs_of("liar_2").await.unwrap();
        assert_eq!(
            flagged,
            ["job_fold"],
            "{db:?}: a job waiting for review was missed"
        );
        let (_, flags) = store.verification_facts("job_fold").await.unwrap();
        let tainted: Vec<_> = flags
            .iter()
            .filter(|f| f.kind == "tainted")
            .map(|f| f.shard)
            .collect();
        assert_eq!(tainted, [0, 1], "{db:?}: {flags:?}");
    }
}

/// A strike doubles the warm-up: an agent caught once (at `--trusted-after 3`) has all of its
/// results re-run until 6 valid in a row, not 3, and the agents list says so. Store-level, so
/// each report meets the trust the last check left.
#[tokio::test]
async fn a_strike_on_record_doubles_the_warm_up() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let mut store = Store::open(&url).await.unwrap();
        store.set_trusted_after(3);
        enroll(&store, "agt_l", "machine-1").await;
        let mut job = new_job("job_warm", 12, 3);
        job.verify = VerifySpec::default();
        store.insert_job(&job).await.unwrap();
        // Report shard `i` (its true value is `i`) as `value`; settle the check it waits for
        // with the server's run (the truth). Whether it waited for one.
        let step = async |i: u64, value: u64| -> bool {
            let now = now_ms();
            let grants = store
                .lease_at("default", "agt_l", 1, now + 60_000, &format!("l{i}"), now)
                .await
                .unwrap();
            assert_eq!(grants.len(), 1, "{db:?}");
            assert_eq!(grants[0].shard_index, i, "{db:?}");
            // The interpreter and backend, as a real report names them (trust is kept per pair).
            let report = ReportInput {
                report_json: json!({"runner": {"python": "3.11"}, "backend": "process"})
                    .to_string(),
                ..ok_report(&grants[0], value)
            };
            store.report("agt_l", &[report], POLICY).await.unwrap();
            let shard = store
                .shard_detail("default", "job_warm", i)
                .await
                .unwrap()
                .unwrap();
            if shard.shard.state != TaskState::Reported {
                return false;
            }
            let checks = store.claim_checks("test", 15_000, 4).await.unwrap();
            let subject = store.check_subject(checks[0]).await.unwrap().unwrap();
            let finding = if value == i {
                Finding::Agrees
            } else {
                Finding::Differs
            };
            store
                .finish_check("test", &subject, &[], &finding, &[], 3)
                .await
                .unwrap()
                .unwrap();
            true
        };
        assert!(step(0, 99).await, "{db:?}: a new agent's result is checked");
        for i in 1..=6 {
            assert!(
                step(i, i).await,
                "{db:?}: result {i} came after {} valid in a row and one strike",
                i - 1
            );
        }
        let agents = store.list_agents("default").await.unwrap();
        assert_eq!(agents[0].strikes, 1, "{db:?}");
        let trust = &agents[0].trust[0];
        assert_eq!(trust.consecutive_valid, 6, "{db:?}");
        assert!(trust.recheck_rate < 1.0, "{db:?}: trusted at 6: {trust:?}");
    }
}
