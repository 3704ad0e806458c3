//! The settle state machine under races, on SQLite and PostgreSQL, with two stores (two
//! coordinators) on one database: late and current reports for the same shards at the same
//! instant, reports against lease expiry, reports against a cancel. Each race runs many
//! rounds with random delays; after each, every shard settled exactly once.

use fleetbox_proto::{JobState, TaskState};
use std::sync::Arc;
use std::time::Duration;

use fleetbox_proto::Status;
use fleetbox_server::store::{
    DEFAULT_TENANT, ReportInput, ReportPolicy, Reported, SettleOutcome, Store, now_ms,
};
use sqlx::Row;

use crate::support::{BOTH, Db, database, new_job, ok_report};

/// Retries at once; the default strike limit.
const POLICY: ReportPolicy = ReportPolicy {
    backoff_base_ms: 0,
    strikes_limit: 2,
};

const SHARDS: u64 = 20;
const ROUNDS: usize = 8;

/// A few hundred microseconds of jitter, different for every call.
async fn jitter(seed: u64) {
    let nanos = (seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(now_ms() as u64))
        % 800;
    tokio::time::sleep(Duration::from_micros(nanos)).await;
}

/// What the database says, checked against the truth. Reading them asserts that the job's
/// per-state counters equal a count of its tasks.
struct Invariants {
    unsettled: i64,
    unsettled_truth: i64,
    /// (shard, chosen attempts) for accepted shards with other than one chosen attempt.
    bad_choices: Vec<(i64, i64)>,
    /// Chosen attempts on shards that are not accepted.
    stray_choices: i64,
    accepted: i64,
    state: JobState,
}

async fn invariants(url: &str, job: &str) -> Invariants {
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    let state: String = sqlx::query("SELECT state FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("state");
    let state: JobState = state.parse().unwrap();
    // The job's counters, in `TaskState::ALL` order, against a count of its tasks.
    let counters = sqlx::query(
        "SELECT queued, leased, reported, accepted, rejected, dead FROM job_counts WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(&pool)
    .await
    .unwrap();
    let counters: Vec<i64> = (0..6).map(|i| counters.get::<i64, _>(i)).collect();
    let mut truth = vec![0i64; 6];
    for row in
        sqlx::query("SELECT state, COUNT(*) AS n FROM tasks WHERE job_id = $1 GROUP BY state")
            .bind(job)
            .fetch_all(&pool)
            .await
            .unwrap()
    {
        let s: TaskState = row.get::<String, _>("state").parse().unwrap();
        let at = TaskState::ALL.iter().position(|t| *t == s).unwrap();
        truth[at] = row.get("n");
    }
    assert_eq!(
        counters, truth,
        "job `{job}`: counters (queued, leased, reported, accepted, rejected, dead) against its tasks"
    );
    let unsettled = counters[..3].iter().sum();
    let truth = truth[..3].iter().sum();
    let accepted: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM tasks WHERE job_id = $1 AND state = 'accepted'")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap()
            .get("n");
    let bad = sqlx::query(
        "SELECT t.shard_index AS s, (SELECT COUNT(*) FROM attempts a WHERE a.task_id = t.id AND a.chosen = 1) AS n \
         FROM tasks t WHERE t.job_id = $1 AND t.state = 'accepted'",
    )
    .bind(job)
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<i64, _>("s"), r.get::<i64, _>("n")))
    .filter(|(_, n)| *n != 1)
    .collect();
    let stray: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM attempts a JOIN tasks t ON t.id = a.task_id \
         WHERE a.job_id = $1 AND a.chosen = 1 AND t.state <> 'accepted'",
    )
    .bind(job)
    .fetch_one(&pool)
    .await
    .unwrap()
    .get("n");
    // The audit log agrees: one `shard.accepted` entry per accepted shard (exactly once,
    // whatever raced), and the chain verifies.
    let accepted_entries = sqlx::query(
        "SELECT task_id, COUNT(*) AS n FROM audit WHERE job_id = $1 AND action = 'shard.accepted' GROUP BY task_id",
    )
    .bind(job)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        accepted_entries.iter().all(|r| r.get::<i64, _>("n") == 1),
        "job `{job}`: a shard accepted twice in the audit log"
    );
    assert_eq!(
        accepted_entries.len() as i64,
        accepted,
        "job `{job}`: accepted shards against their audit entries"
    );
    pool.close().await;
    let store = Store::open(url).await.unwrap();
    let v = store
        .audit_verify("default", &fleetbox_server::store::audit::Pins::default())
        .await
        .unwrap();
    assert!(v.ok, "job `{job}`: {v:?}");
    store.close().await;
    Invariants {
        unsettled,
        unsettled_truth: truth,
        bad_choices: bad,
        stray_choices: stray,
        accepted,
        state,
    }
}

async fn folded_sum(store: &Store, job: &str) -> u64 {
    store
        .accepted_values(DEFAULT_TENANT, job)
        .await
        .unwrap()
        .iter()
        .map(|v| v.output.as_deref().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Two stores on one database (two coordinators), or `None` when PostgreSQL is skipped.
async fn two_stores(db: Db, dir: &std::path::Path) -> Option<(String, Arc<Store>, Arc<Store>)> {
    let url = database(db, dir).await?;
    let a = Arc::new(Store::open(&url).await.unwrap());
    let b = Arc::new(Store::open(&url).await.unwrap());
    Some((url, a, b))
}

/// Every shard leased by `agt_a`, expired, leased again by `agt_b`: returns both grants, by
/// shard.
async fn lease_twice(
    store: &Store,
    job: &str,
) -> Vec<(
    fleetbox_server::store::LeaseGrant,
    fleetbox_server::store::LeaseGrant,
)> {
    let now = now_ms();
    let mut first = store
        .lease_at("default", "agt_a", 1000, now + 50, &format!("{job}a"), now)
        .await
        .unwrap();
    assert_eq!(first.len() as u64, SHARDS);
    let (requeued, _) = store.expire_leases(now + 100, &[], 0).await.unwrap();
    assert_eq!(requeued.len() as u64, SHARDS);
    let mut second = store
        .lease_at(
            "default",
            "agt_b",
            1000,
            now + 60_000,
            &format!("{job}b"),
            now + 200,
        )
        .await
        .unwrap();
    assert_eq!(second.len() as u64, SHARDS);
    first.sort_by_key(|g| g.shard_index);
    second.sort_by_key(|g| g.shard_index);
    first.into_iter().zip(second).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_and_current_reports_racing_settle_each_shard_once() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        for round in 0..ROUNDS {
            let job = format!("job_race{round}");
            one.insert_job(&new_job(&job, SHARDS, 5)).await.unwrap();
            let pairs = lease_twice(&one, &job).await;
            let mut racers = Vec::new();
            for (i, (late, current)) in pairs.into_iter().enumerate() {
                let value = late.shard_index + 1;
                for (store, agent, grant, seed) in [
                    (one.clone(), "agt_a", late, i as u64 * 2),
                    (two.clone(), "agt_b", current, i as u64 * 2 + 1),
                ] {
                    racers.push(tokio::spawn(async move {
                        jitter(seed + round as u64).await;
                        let report = ok_report(&grant, value);
                        let r = store.report(agent, &[report], POLICY).await.unwrap();
                        (r.outcomes, r.ready)
                    }));
                }
            }
            let mut ready = 0;
            let mut winners = 0;
            for r in racers {
                let (outcomes, jobs) = r.await.unwrap();
                ready += jobs.len();
                winners += outcomes
                    .iter()
                    .filter(|o| **o == SettleOutcome::Accepted)
                    .count();
            }
            let inv = invariants(&url, &job).await;
            assert_eq!(inv.unsettled, 0, "{db:?} round {round}: unsettled");
            assert_eq!(inv.unsettled_truth, 0, "{db:?} round {round}");
            assert_eq!(inv.accepted as u64, SHARDS, "{db:?} round {round}");
            assert!(
                inv.bad_choices.is_empty(),
                "{db:?} round {round}: {:?}",
                inv.bad_choices
            );
            assert_eq!(inv.stray_choices, 0, "{db:?} round {round}");
            assert_eq!(
                ready, 1,
                "{db:?} round {round}: the job is ready exactly once"
            );
            assert!(winners as u64 <= SHARDS, "{db:?} round {round}");
            let want: u64 = (1..=SHARDS).sum();
            assert_eq!(folded_sum(&one, &job).await, want, "{db:?} round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_racing_lease_expiry_settle_each_shard_once() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        for round in 0..ROUNDS {
            let job = format!("job_expiry{round}");
            // One attempt only: an expiry that wins kills the shard; a report that wins accepts it.
            one.insert_job(&new_job(&job, SHARDS, 1)).await.unwrap();
            let now = now_ms();
            let grants = one
                .lease_at("default", "agt_a", 1000, now + 50, &job, now)
                .await
                .unwrap();
            let mut racers = Vec::new();
            for (i, g) in grants.into_iter().enumerate() {
                let store = two.clone();
                racers.push(tokio::spawn(async move {
                    jitter(i as u64 + round as u64).await;
                    let r = ok_report(&g, g.shard_index + 1);
                    store
                        .report("agt_a", &[r], POLICY)
                        .await
                        .unwrap()
                        .ready
                        .len()
                }));
            }
            for _ in 0..4 {
                let store = one.clone();
                racers.push(tokio::spawn(async move {
                    jitter(round as u64).await;
                    store
                        .expire_leases(now + 100, &[], 0)
                        .await
                        .unwrap()
                        .1
                        .len()
                }));
            }
            let mut ready = 0;
            for r in racers {
                ready += r.await.unwrap();
            }
            let inv = invariants(&url, &job).await;
            assert_eq!(inv.unsettled, 0, "{db:?} round {round}");
            assert_eq!(inv.unsettled_truth, 0, "{db:?} round {round}");
            assert!(
                inv.bad_choices.is_empty(),
                "{db:?} round {round}: {:?}",
                inv.bad_choices
            );
            assert_eq!(inv.stray_choices, 0, "{db:?} round {round}");
            assert_eq!(ready, 1, "{db:?} round {round}: ready exactly once");
            // Whatever won, the fold holds exactly the accepted shards' values once.
            let values = one.accepted_values(DEFAULT_TENANT, &job).await.unwrap();
            assert_eq!(values.len() as i64, inv.accepted, "{db:?} round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_racing_a_cancel_leave_a_consistent_job() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        for round in 0..ROUNDS {
            let job = format!("job_cancel{round}");
            one.insert_job(&new_job(&job, SHARDS, 3)).await.unwrap();
            let pairs = lease_twice(&one, &job).await;
            let mut racers = Vec::new();
            for (i, (late, current)) in pairs.into_iter().enumerate() {
                for (store, agent, g) in [
                    (one.clone(), "agt_a", late),
                    (two.clone(), "agt_b", current),
                ] {
                    racers.push(tokio::spawn(async move {
                        jitter(i as u64 + round as u64).await;
                        let r = ok_report(&g, 1);
                        store.report(agent, &[r], POLICY).await.unwrap();
                    }));
                }
            }
            let store = two.clone();
            let j = job.clone();
            racers.push(tokio::spawn(async move {
                jitter(round as u64 * 7).await;
                assert!(store.cancel_job("default", &j, "admin:test").await.unwrap());
            }));
            for r in racers {
                r.await.unwrap();
            }
            let inv = invariants(&url, &job).await;
            assert_eq!(inv.state, JobState::Cancelled, "{db:?} round {round}");
            assert_eq!(
                inv.unsettled_truth, 0,
                "{db:?} round {round}: nothing left running"
            );
            assert!(inv.unsettled >= 0, "{db:?} round {round}");
            assert!(
                inv.bad_choices.is_empty(),
                "{db:?} round {round}: {:?}",
                inv.bad_choices
            );
            assert_eq!(inv.stray_choices, 0, "{db:?} round {round}");
        }
    }
}

#[tokio::test]
async fn a_returned_lease_settles_nothing() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, _)) = two_stores(db, dir.path()).await else {
            continue;
        };
        one.insert_job(&new_job("job_ret", 1, 3)).await.unwrap();
        let g = one
            .lease("default", "agt_a", 1, now_ms() + 60_000, "r")
            .await
            .unwrap();
        assert_eq!(
            one.return_leases("agt_a", &[g[0].lease_id.clone()])
                .await
                .unwrap(),
            1
        );
        let r = ok_report(&g[0], 1);
        let Reported {
            outcomes, ready, ..
        } = one.report("agt_a", &[r], POLICY).await.unwrap();
        assert_eq!(outcomes, vec![SettleOutcome::Unknown], "{db:?}");
        assert!(ready.is_empty());
        let inv = invariants(&url, "job_ret").await;
        assert_eq!(
            (inv.unsettled, inv.unsettled_truth, inv.accepted),
            (1, 1, 0),
            "{db:?}"
        );
    }
}

/// A job held for review after a sandbox violation: a shard that goes back to the queue
/// afterwards (handed back, failed for the fleet's reasons) is held too, not leased.
#[tokio::test]
async fn a_shard_requeued_while_its_job_is_held_stays_held() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((_, one, _)) = two_stores(db, dir.path()).await else {
            continue;
        };
        // Two shards running, one queued when the hold begins.
        one.insert_job(&new_job("job_held", 3, 3)).await.unwrap();
        let g = one
            .lease("default", "agt_a", 2, now_ms() + 60_000, "r")
            .await
            .unwrap();
        assert_eq!(g.len(), 2);
        // The coordinator's own agent: its violation is taken on its word.
        let req = fleetbox_proto::api::EnrollRequest {
            name: "a".into(),
            ..Default::default()
        };
        crate::support::enroll_in_store(&one, "agt_a", &req, true).await;
        let mut r = ok_report(&g[0], 1);
        r.status = Status::SandboxViolation;
        r.reason = Some("forbidden: mount".into());
        let Reported { held, .. } = one.report("agt_a", &[r], POLICY).await.unwrap();
        assert_eq!(held, vec!["job_held".to_string()], "{db:?}");
        assert_eq!(
            one.return_leases("agt_a", &[g[1].lease_id.clone()])
                .await
                .unwrap(),
            1
        );
        let again = one
            .lease("default", "agt_b", 2, now_ms() + 60_000, "r")
            .await
            .unwrap();
        assert!(
            again.is_empty(),
            "{db:?}: a held job's shard was leased: {again:?}"
        );
    }
}

#[tokio::test]
async fn nul_bytes_in_a_failure_reason_are_stored_on_both_databases() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((_, one, _)) = two_stores(db, dir.path()).await else {
            continue;
        };
        one.insert_job(&new_job("job_nul", 1, 3)).await.unwrap();
        let g = one
            .lease("default", "agt_a", 1, now_ms() + 60_000, "n")
            .await
            .unwrap();
        let mut r = ok_report(&g[0], 1);
        r.status = Status::Error;
        r.reason = Some("error: ValueError: a\0b".into());
        r.report_json = serde_json::json!({"exception": {"message": "a\0b"}}).to_string();
        let Reported {
            outcomes, ready, ..
        } = one.report("agt_a", &[r], POLICY).await.unwrap();
        assert_eq!(outcomes, vec![SettleOutcome::Accepted], "{db:?}");
        assert_eq!(ready, vec!["job_nul".to_string()]);
        let detail = one
            .shard_detail("default", "job_nul", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(detail.shard.state, TaskState::Rejected);
        assert_eq!(
            detail.shard.error.as_deref(),
            Some("error: ValueError: a\u{2400}b")
        );
        // The report itself keeps the exact bytes.
        assert_eq!(
            detail.attempts[0].report["exception"]["message"], "a\0b",
            "{db:?}"
        );
    }
}

#[tokio::test]
async fn an_agent_restarted_in_place_gets_its_old_leases_requeued_at_once() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, _)) = two_stores(db, dir.path()).await else {
            continue;
        };
        one.insert_job(&new_job("job_restart", 3, 3)).await.unwrap();
        let mut g = one
            .lease("default", "agt_a", 3, now_ms() + 60_000, "s")
            .await
            .unwrap();
        g.sort_by_key(|g| g.shard_index);
        // Shard 0's report waits in the restarted agent's outbox: kept. The others died.
        let keep = vec![g[0].lease_id.clone()];
        assert_eq!(
            one.return_lost_runs("agt_a", &keep).await.unwrap(),
            2,
            "{db:?}"
        );
        let again = one
            .lease("default", "agt_b", 3, now_ms() + 60_000, "t")
            .await
            .unwrap();
        assert_eq!(
            again.len(),
            2,
            "{db:?}: back in the queue without waiting for expiry"
        );
        assert!(
            again.iter().all(|a| a.attempt == 2),
            "{db:?}: the lost run counts"
        );
        // The kept lease still settles; a dead run's report settles nothing.
        let Reported { outcomes, .. } = one
            .report("agt_a", &[ok_report(&g[0], 1)], POLICY)
            .await
            .unwrap();
        assert_eq!(outcomes, vec![SettleOutcome::Accepted], "{db:?}");
        let Reported { outcomes, .. } = one
            .report("agt_a", &[ok_report(&g[1], 1)], POLICY)
            .await
            .unwrap();
        assert_eq!(outcomes, vec![SettleOutcome::Unknown], "{db:?}");
        let inv = invariants(&url, "job_restart").await;
        assert_eq!((inv.unsettled, inv.unsettled_truth), (2, 2), "{db:?}");
    }
}

/// Leases, reports (successes, program failures, infrastructure failures), expiry sweeps and
/// a cancel, all at once from two stores: every transaction touches the job's counters, so
/// this is where a lock-order mistake would deadlock (PostgreSQL answers that with an error,
/// which fails the test) and where a miscounted transition would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_reports_expiry_and_cancel_racing_keep_every_counter_true() {
    const WORKERS: u64 = 6;
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        for round in 0..ROUNDS {
            let job = format!("job_mix{round}");
            one.insert_job(&new_job(&job, 2 * SHARDS, 3)).await.unwrap();
            let mut racers = Vec::new();
            for w in 0..WORKERS {
                let store = if w % 2 == 0 { one.clone() } else { two.clone() };
                let job = job.clone();
                racers.push(tokio::spawn(async move {
                    let agent = format!("agt_{w}");
                    for step in 0..12u64 {
                        jitter(w * 31 + step + round as u64).await;
                        let now = now_ms();
                        // Short leases: the sweeps below take some of them back mid-run.
                        let grants = store
                            .lease_at(
                                "default",
                                &agent,
                                3,
                                now + 3,
                                &format!("{job}{w}s{step}"),
                                now,
                            )
                            .await
                            .unwrap();
                        jitter(w + step).await;
                        let reports: Vec<ReportInput> = grants
                            .iter()
                            .map(|g| {
                                let mut r = ok_report(g, g.shard_index + 1);
                                match (g.shard_index + step + w) % 5 {
                                    0 => r.status = Status::Error,
                                    1 => r.status = Status::SandboxError,
                                    _ => {}
                                }
                                r
                            })
                            .collect();
                        store.report(&agent, &reports, POLICY).await.unwrap();
                    }
                }));
            }
            for s in 0..2u64 {
                let store = if s == 0 { one.clone() } else { two.clone() };
                racers.push(tokio::spawn(async move {
                    for i in 0..20u64 {
                        jitter(i * 7 + s).await;
                        store.expire_leases(now_ms(), &[], 0).await.unwrap();
                    }
                }));
            }
            if round % 2 == 1 {
                let store = two.clone();
                let job = job.clone();
                racers.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    store
                        .cancel_job("default", &job, "admin:test")
                        .await
                        .unwrap();
                }));
            }
            for r in racers {
                r.await.unwrap();
            }
            // Whatever is still leased or queued is settled by sweeps past every lease and
            // back-off, and late reports settle nothing twice.
            let inv = invariants(&url, &job).await;
            assert!(inv.unsettled >= 0, "{db:?} round {round}");
            assert!(
                inv.bad_choices.is_empty(),
                "{db:?} round {round}: {:?}",
                inv.bad_choices
            );
            assert_eq!(inv.stray_choices, 0, "{db:?} round {round}");
            if round % 2 == 1 {
                assert_eq!(inv.state, JobState::Cancelled, "{db:?} round {round}");
                assert_eq!(inv.unsettled, 0, "{db:?} round {round}");
            }
        }
    }
}

/// An agent's claimed run time is bounded by the lease it ran under (issue to report, as the
/// coordinator saw it): a signed claim of 10^12 ms never reaches a job's summary.
#[tokio::test]
async fn a_claimed_run_time_is_bounded_by_the_lease() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((_, one, _)) = two_stores(db, dir.path()).await else {
            continue;
        };
        one.insert_job(&new_job("job_wall", 2, 3)).await.unwrap();
        let leased_at = now_ms();
        let g = one
            .lease("default", "agt_a", 2, now_ms() + 60_000, "r")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut lying = ok_report(&g[0], 1);
        lying.wall_ms = 1_000_000_000_000;
        let mut honest = ok_report(&g[1], 2);
        honest.wall_ms = 20;
        one.report("agt_a", &[lying, honest], POLICY).await.unwrap();
        let bound = (now_ms() - leased_at) as f64;
        let mut walls = one
            .attempt_facts(DEFAULT_TENANT, "job_wall")
            .await
            .unwrap()
            .chosen_wall_ms;
        walls.sort_by(f64::total_cmp);
        assert_eq!(walls.len(), 2, "{db:?}");
        assert_eq!(walls[0], 20.0, "{db:?}: an honest claim stands");
        assert!(
            (40.0..=bound).contains(&walls[1]),
            "{db:?}: {} is not within the lease's {bound} ms",
            walls[1]
        );
    }
}

/// A refusal is not a result: the shard goes to another agent, never back to one that
/// refused it, without spending an attempt; it is rejected only when no agent is left that
/// has not refused it. (A signed agent could otherwise fail any shard by refusing it.)
#[tokio::test]
async fn a_refused_shard_goes_to_another_agent_never_back_to_its_refuser() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        // One attempt only: refusals must not spend it.
        one.insert_job(&new_job("job_ref", 1, 1)).await.unwrap();
        for agent in ["agt_a", "agt_b", "agt_c"] {
            let req = fleetbox_proto::api::EnrollRequest {
                name: agent.into(),
                ..Default::default()
            };
            crate::support::enroll_in_store(&one, agent, &req, false).await;
        }
        let refuse = |store: Arc<Store>, agent: &'static str| async move {
            let g = store
                .lease("default", agent, 1, now_ms() + 60_000, agent)
                .await
                .unwrap();
            assert_eq!(g.len(), 1, "{agent} was offered nothing");
            assert_eq!(g[0].attempt, 1, "a refusal spent an attempt");
            let mut r = ok_report(&g[0], 1);
            r.status = Status::Refused;
            r.output = None;
            r.output_sha256 = None;
            r.reason = Some("refused: the job asks for the network".into());
            let Reported { outcomes, .. } = store.report(agent, &[r], POLICY).await.unwrap();
            assert_eq!(outcomes, vec![SettleOutcome::Accepted]);
        };
        refuse(one.clone(), "agt_a").await;
        let detail = one
            .shard_detail("default", "job_ref", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(detail.shard.state, TaskState::Queued, "{db:?}");
        // Never back to the refuser, on either coordinator.
        for store in [&one, &two] {
            let again = store
                .lease("default", "agt_a", 1, now_ms() + 60_000, "again")
                .await
                .unwrap();
            assert!(again.is_empty(), "{db:?}: offered to its refuser again");
        }
        refuse(two.clone(), "agt_b").await;
        // The last agent that has not refused it: its refusal ends the shard.
        refuse(one.clone(), "agt_c").await;
        let detail = one
            .shard_detail("default", "job_ref", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(detail.shard.state, TaskState::Rejected, "{db:?}");
        assert_eq!(detail.shard.status, Some(Status::Refused), "{db:?}");
        let why = detail.shard.error.unwrap_or_default();
        assert!(
            why.contains("agt_c") && why.contains("no other agent could run it"),
            "{db:?}: {why}"
        );
        assert_eq!(detail.attempts.len(), 3, "{db:?}");
        let inv = invariants(&url, "job_ref").await;
        assert_eq!(inv.unsettled, inv.unsettled_truth, "{db:?}");
    }
}

/// A shard refused by one agent waits for the other, which would run it; when that one is
/// lost, the scheduler's sweep rejects the shard (no agent left would take it) instead of
/// leaving the job waiting for ever, and the job is ready to fold.
#[tokio::test]
async fn a_refused_shard_whose_last_taker_left_is_rejected_not_kept_for_ever() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, _two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        one.insert_job(&new_job("job_left", 1, 1)).await.unwrap();
        for agent in ["agt_b", "agt_a"] {
            let req = fleetbox_proto::api::EnrollRequest {
                name: agent.into(),
                ..Default::default()
            };
            crate::support::enroll_in_store(&one, agent, &req, false).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let seen = now_ms();
        let g = one
            .lease("default", "agt_a", 1, now_ms() + 60_000, "agt_a")
            .await
            .unwrap();
        let mut r = ok_report(&g[0], 1);
        r.status = Status::Refused;
        r.output = None;
        r.output_sha256 = None;
        r.reason = Some("refused: not here".into());
        one.report("agt_a", &[r], POLICY).await.unwrap();
        // agt_b would run it: it waits.
        assert!(one.reject_unrunnable(now_ms()).await.unwrap().is_empty());
        let detail = one
            .shard_detail("default", "job_left", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(detail.shard.state, TaskState::Queued, "{db:?}");
        // agt_b is lost (silent since before agt_a's lease): nobody left would take it.
        let lost = one.mark_lost_agents(seen).await.unwrap();
        assert_eq!(lost, ["agt_b"], "{db:?}");
        let ready = one.reject_unrunnable(now_ms()).await.unwrap();
        assert_eq!(ready, ["job_left"], "{db:?}");
        let detail = one
            .shard_detail("default", "job_left", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(detail.shard.state, TaskState::Rejected, "{db:?}");
        assert!(
            detail
                .shard
                .error
                .unwrap_or_default()
                .contains("no other agent would take it"),
            "{db:?}"
        );
        let inv = invariants(&url, "job_left").await;
        assert_eq!(inv.unsettled, inv.unsettled_truth, "{db:?}");
        // Nothing more to do on the next sweep.
        assert!(one.reject_unrunnable(now_ms()).await.unwrap().is_empty());
    }
}

/// Server-only shards (and held ones) go only to agents marked `hardened`: not to an ordinary
/// agent, not to one that calls itself `hardened` in its labels; an agent leasing
/// `hardened_only` gets nothing else. When the only marked agent refuses such a shard it is
/// rejected, though ordinary agents are online: none of them could ever take it.
#[tokio::test]
async fn server_only_shards_go_only_to_marked_agents_and_a_refusal_by_the_last_rejects() {
    use fleetbox_server::store::Want;
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((_, one, two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        let mut server_only = new_job("job_so", 1, 3);
        server_only.review = Some(fleetbox_proto::CodeReview {
            findings: Vec::new(),
            risk: 15,
            decision: fleetbox_proto::Decision::RunOnServerOnly,
            reviewer: "builtin".into(),
        });
        one.insert_job(&server_only).await.unwrap();
        one.insert_job(&new_job("job_plain", 1, 3)).await.unwrap();
        for (agent, labels) in [
            ("agt_plain", vec![]),
            ("agt_liar", vec!["hardened".to_string()]),
            ("agt_marked", vec![]),
        ] {
            let req = fleetbox_proto::api::EnrollRequest {
                name: agent.into(),
                labels,
                ..Default::default()
            };
            crate::support::enroll_in_store(&one, agent, &req, false).await;
        }
        assert!(
            one.set_agent_hardened("default", "agt_marked", true, "admin:test")
                .await
                .unwrap()
        );
        let only_hardened = Want {
            backend: None,
            hardened_only: true,
            sessions: false,
        };
        let lease = |store: Arc<Store>, agent: &'static str, want: Want<'static>| async move {
            store
                .lease_with(agent, want, 10, now_ms() + 60_000, agent, &[])
                .await
                .unwrap()
        };
        // Ordinary and self-declared agents get the ordinary shard only, on either coordinator.
        for (store, agent) in [(&one, "agt_liar"), (&two, "agt_plain")] {
            let got = lease(store.clone(), agent, only_hardened).await;
            assert!(got.is_empty(), "{db:?}: {agent} got {got:?}");
        }
        let got = lease(two.clone(), "agt_liar", Want::default()).await;
        assert_eq!(
            got.iter().map(|g| g.job_id.as_str()).collect::<Vec<_>>(),
            ["job_plain"],
            "{db:?}"
        );
        // The marked agent, asking for server-only shards alone, gets that one.
        let got = lease(one.clone(), "agt_marked", only_hardened).await;
        assert_eq!(got.len(), 1, "{db:?}");
        assert_eq!(got[0].job_id, "job_so");
        let mut r = ok_report(&got[0], 1);
        r.status = Status::Refused;
        r.output = None;
        r.output_sha256 = None;
        r.reason = Some("refused: the job asks for the network".into());
        one.report("agt_marked", &[r], POLICY).await.unwrap();
        let detail = one
            .shard_detail("default", "job_so", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(detail.shard.state, TaskState::Rejected, "{db:?}");
        let why = detail.shard.error.unwrap_or_default();
        assert!(why.contains("no other agent could run it"), "{db:?}: {why}");
    }
}

/// A cancel of a big job racing heartbeats that extend its leases (and reports settling some
/// of them), on two stores: every statement takes its shards' locks in id order, so no round
/// ends in a deadlock (on PostgreSQL a cancel of 20,000 shards against two agents' heartbeats
/// deadlocked about one run in three before: per-state updates locked queued rows before
/// leased ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_cancel_racing_heartbeats_and_reports_never_deadlocks() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some((url, one, two)) = two_stores(db, dir.path()).await else {
            continue;
        };
        for round in 0..ROUNDS {
            let job = format!("big{round}");
            one.insert_job(&new_job(&job, 3000, 3)).await.unwrap();
            let mut grants = Vec::new();
            for agent in ["agt_a", "agt_b"] {
                let got = one
                    .lease(
                        "default",
                        agent,
                        60,
                        now_ms() + 60_000,
                        &format!("{job}{agent}"),
                    )
                    .await
                    .unwrap();
                grants.push((agent, got));
            }
            let mut racing = Vec::new();
            for (i, (agent, got)) in grants.iter().enumerate() {
                let agent: &'static str = agent;
                // Lease ids in reverse, so no two callers hand the database the same order.
                let mut leases: Vec<String> = got.iter().map(|g| g.lease_id.clone()).collect();
                leases.reverse();
                let store = if i == 0 { one.clone() } else { two.clone() };
                racing.push(tokio::spawn(async move {
                    for k in 0..5u64 {
                        jitter(k).await;
                        store
                            .extend_leases(agent, &leases, now_ms() + 60_000)
                            .await
                            .map(|_| ())?;
                    }
                    Ok::<(), fleetbox_server::store::StoreError>(())
                }));
                let reports: Vec<ReportInput> =
                    got.iter().rev().take(10).map(|g| ok_report(g, 1)).collect();
                let store = if i == 0 { two.clone() } else { one.clone() };
                racing.push(tokio::spawn(async move {
                    jitter(7).await;
                    store.report(agent, &reports, POLICY).await.map(|_| ())
                }));
            }
            let canceller = one.clone();
            let cancelled = job.clone();
            racing.push(tokio::spawn(async move {
                jitter(3).await;
                canceller
                    .cancel_job("default", &cancelled, "admin:test")
                    .await
                    .map(|_| ())
            }));
            for r in racing {
                r.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{db:?} round {round}: {e}"));
            }
            let inv = invariants(&url, &job).await;
            assert_eq!(inv.unsettled, 0, "{db:?} round {round}");
            assert_eq!(inv.unsettled, inv.unsettled_truth, "{db:?} round {round}");
        }
    }
}
