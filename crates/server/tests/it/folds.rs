//! Folds as leased steps: one coordinator at a time, retried after a failure, taken over
//! when their coordinator dies; results stored by column, never interpreted.

use fleetbox_proto::JobState;
use std::time::Duration;

use fleetbox_server::store::{FoldOutcome, Store, now_ms};

use crate::support::{BOTH, Coordinator, database, new_job, spec};

#[tokio::test]
async fn two_coordinators_never_hold_one_fold_and_a_dead_ones_is_taken_over() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let a = Store::open(&url).await.unwrap();
        let b = Store::open(&url).await.unwrap();
        a.insert_job(&new_job("job_f", 1, 1)).await.unwrap();
        let now = now_ms();
        // Not settled yet: nobody may fold.
        assert_eq!(
            a.claim_fold("job_f", "coord_a", now, now + 1000)
                .await
                .unwrap(),
            None
        );
        a.cancel_job("default", "job_f", "admin:test")
            .await
            .unwrap();

        a.insert_job(&new_job("job_g", 1, 1)).await.unwrap();
        let g = a.lease("default", "agt", 1, now + 10, "x").await.unwrap();
        a.expire_leases(now + 100, &[], 0).await.unwrap();
        assert!(!g.is_empty());
        let now = now_ms();
        assert_eq!(
            a.claim_fold("job_g", "coord_a", now, now + 1000)
                .await
                .unwrap(),
            Some(1)
        );
        assert_eq!(
            b.claim_fold("job_g", "coord_b", now, now + 1000)
                .await
                .unwrap(),
            None,
            "{db:?}"
        );
        assert!(
            a.jobs_to_aggregate(now).await.unwrap().is_empty(),
            "{db:?}: held"
        );
        // coord_a dies: past its expiry coord_b takes over, and coord_a's late finish is refused.
        let later = now + 1001;
        assert_eq!(
            a.jobs_to_aggregate(later).await.unwrap(),
            vec!["job_g".to_string()]
        );
        // A fold whose coordinator died did not fail: the take-over is still the first try.
        assert_eq!(
            b.claim_fold("job_g", "coord_b", later, later + 1000)
                .await
                .unwrap(),
            Some(1),
            "{db:?}"
        );
        let summary = Default::default();
        let outcome = FoldOutcome {
            state: JobState::Completed,
            result: Some("1"),
            result_blob: None,
            summary: &summary,
            error: None,
            queue: Vec::new(),
        };
        assert!(
            a.finish_job("job_g", "coord_a", &outcome)
                .await
                .unwrap()
                .is_none(),
            "{db:?}"
        );
        assert!(
            !a.renew_fold("job_g", "coord_a", later + 5000)
                .await
                .unwrap(),
            "{db:?}"
        );
        assert!(
            b.finish_job("job_g", "coord_b", &outcome)
                .await
                .unwrap()
                .is_some(),
            "{db:?}"
        );
        let (result, blob) = b.job_result("default", "job_g").await.unwrap().unwrap();
        assert_eq!(result.state, JobState::Completed);
        assert_eq!(result.result_value(), Some(serde_json::json!(1)));
        assert_eq!(blob, None);
    }
}

/// A python reducer that fails on its first try only (a marker file says it ran) is tried
/// again and completes; its result, which holds a `$blob` key, comes back as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fold_is_retried_and_user_values_are_never_interpreted() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        // The reducer may run as another user: the marker's directory is open to it.
        let shared = c.dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let marker = shared.join("reducer-ran-once");
        let job = spec(&format!(
            r#"
name = "retried fold"
code = "import json, os; print(sum(json.load(open(os.environ['FLEETBOX_INPUT']))['items']))"
[shards]
items = [1, 2, 3, 4]
per_shard = 1
[aggregate]
reducer = "python"
code = '''
import json, os
marker = {marker:?}
if not os.path.exists(marker):
    open(marker, "w").write("1")
    raise RuntimeError("first try fails")
values = json.load(open(os.environ["FLEETBOX_INPUT"]))
print(json.dumps({{"$blob": "not a blob", "total": sum(values)}}))
'''
"#
        ));
        let result = c.run(&job, Duration::from_secs(60)).await;
        assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
        assert_eq!(
            result.result_value(),
            Some(serde_json::json!({"$blob": "not a blob", "total": 10})),
            "{db:?}"
        );
        assert!(marker.exists());
        c.stop().await;
    }
}

/// A result too large for its row is kept in the blob store, named by `result_blob`, and
/// comes back whole (a value that merely looks like a pointer is shown above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_is_stored_by_column_and_comes_back_whole() {
    let Some(mut c) = Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    c.agent("a1", Default::default());
    let job = spec(
        r#"
name = "large result"
code = "import json; print(json.dumps({'$blob': 'x' * 200_000}))"
shards = { count = 2 }
[limits]
max_output = "1MiB"
"#,
    );
    let result = c.run(&job, Duration::from_secs(60)).await;
    assert_eq!(result.state, JobState::Completed, "{result:?}");
    let want = serde_json::json!({"$blob": "x".repeat(200_000)});
    assert_eq!(
        result.result_value(),
        Some(serde_json::json!([want.clone(), want]))
    );
    let id = c.client.jobs(None, 1).await.unwrap().jobs.remove(0).id;
    let (_, blob) = c
        .running
        .state
        .store
        .job_result("default", &id)
        .await
        .unwrap()
        .unwrap();
    let blob = blob.expect("a 400 kB result is not kept in the row");
    assert!(c.running.state.blobs.get(None, &blob).is_ok());
    c.stop().await;
}

/// `sum` is exact past 2^64: `[2^64-1, 1]` gives every digit of 2^64 through the API, and
/// past `i64::MIN` the same; nothing becomes a float.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_past_two_to_the_64_are_exact_through_the_api() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        for (values, want) in [
            ("[18446744073709551615, 1]", "18446744073709551616"),
            ("[-9223372036854775808, -1]", "-9223372036854775809"),
        ] {
            let job = spec(&format!(
                r#"
name = "big sum"
code = "import os; print({values}[int(os.environ['FLEETBOX_SHARD_INDEX'])])"
shards = {{ count = 2 }}
aggregate = "sum"
"#
            ));
            let result = c.run(&job, Duration::from_secs(60)).await;
            assert_eq!(result.state, JobState::Completed, "{db:?}: {result:?}");
            assert_eq!(
                result.result.as_ref().map(|r| r.get()),
                Some(want),
                "{db:?}"
            );
        }
    }
}

/// Only a fold that failed counts against the job's tries: one whose coordinator stopped or
/// died (its claim ran out) is taken over as the same try.
#[tokio::test]
async fn only_failed_folds_count_as_tries() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let a = Store::open(&url).await.unwrap();
        a.insert_job(&new_job("job_t", 1, 1)).await.unwrap();
        let now = now_ms();
        a.lease("default", "agt", 1, now + 10, "x").await.unwrap();
        a.expire_leases(now + 100, &[], 0).await.unwrap();
        let mut t = now_ms();
        let claim = async |t: i64| a.claim_fold("job_t", "coord", t, t + 1000).await.unwrap();
        assert_eq!(claim(t).await, Some(1), "{db:?}");
        for _ in 0..3 {
            // Killed mid-fold, again and again: never a failure.
            t += 1001;
            assert_eq!(claim(t).await, Some(1), "{db:?}");
        }
        assert!(a.release_fold("job_t", "coord", t, "boom").await.unwrap());
        assert_eq!(claim(t).await, Some(2), "{db:?}: a failed fold counts");
        t += 1001;
        assert_eq!(claim(t).await, Some(2), "{db:?}");
        a.close().await;
    }
}
