//! Retention (`--retain`), on both stores: a job finished before the cut-off goes with its
//! shards, attempts, leases and the blobs only it named; a later job, the blobs it shares, blobs
//! stored before retention existed and the audit log stay; a blob nobody owns (an upload whose
//! report never came) is swept; one stored within the grace is not.

use std::time::Duration;

use fleetbox_server::retention;
use fleetbox_server::store::{Store, now_ms};
use sqlx::Row;

use crate::support::{BOTH, Coordinator, Db, spec};

/// A job whose one shard writes `shared.txt` (the same bytes in every job) and `own.txt`
/// (its `tag`).
fn writing(tag: &str) -> fleetbox_proto::JobSpec {
    spec(&format!(
        "name = \"{tag}\"\ncode = '''\nopen('shared.txt', 'w').write('the same in every job')\n\
         open('own.txt', 'w').write('only in {tag}')\nprint(1)\n'''\nshards = {{ count = 1 }}\n\
         [verify]\nrecheck = \"none\"\n"
    ))
}

/// The sha256 of each file the job's shard listed, by name.
async fn files(c: &Coordinator, job: &str) -> std::collections::HashMap<String, String> {
    crate::support::files_of(&c.client, job).await
}

async fn rows(pool: &sqlx::AnyPool, sql: &str, job: &str) -> i64 {
    sqlx::query(sql)
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_retention_goes_with_what_only_it_named() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        let state = c.running.state.clone();
        let url = match db {
            Db::Sqlite => Store::sqlite_url(c.dir.path()),
            Db::Postgres | Db::PostgresSchemas => state.config.database_url.clone().unwrap(),
        };
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();

        let old = c.run(&writing("old"), Duration::from_secs(60)).await;
        assert_eq!(old.state, fleetbox_proto::JobState::Completed, "{old:?}");
        let old_files = files(&c, &old.id).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let cutoff = now_ms();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let kept = c.run(&writing("kept"), Duration::from_secs(60)).await;
        let kept_files = files(&c, &kept.id).await;
        assert_eq!(old_files["shared.txt"], kept_files["shared.txt"]);
        // A blob from before retention existed: its owner row is not tracked, so it stays
        // whatever is pruned.
        let legacy = state.blobs.put(None, b"stored before retention").unwrap();
        sqlx::query(
            "INSERT INTO blob_owners (tenant_id, sha256, created_at, bytes) \
             VALUES ('default', $1, 0, 23)",
        )
        .bind(legacy.as_str())
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO job_blobs (tenant_id, sha256, job_id) VALUES ('default', $1, $2)")
            .bind(legacy.as_str())
            .bind(old.id.as_str())
            .execute(&pool)
            .await
            .unwrap();
        // An upload whose report never came: nobody owns it.
        let orphan = state.blobs.put(None, b"uploaded, never reported").unwrap();

        // Within the grace nothing is removed, and the cut-off spares both jobs.
        let pass = retention::pass(&state, cutoff - 1000, 0, 0..=255, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(pass, retention::Pass::default(), "{db:?}");
        let pass = retention::pass(&state, cutoff, 0, 0..=255, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(pass.pruned.jobs, 1, "{db:?}: {pass:?}");
        assert_eq!(pass.blobs_removed, 0, "{db:?}: the grace holds: {pass:?}");
        assert!(state.blobs.contains(None, &orphan));

        // Past the grace: the old job's own blob and the orphan go.
        let pass = retention::pass(&state, cutoff, 0, 0..=255, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(pass.pruned.jobs, 0, "{db:?}: pruned once: {pass:?}");
        assert_eq!(pass.blobs_removed, 2, "{db:?}: {pass:?}");
        assert!(!state.blobs.contains(None, &old_files["own.txt"]), "{db:?}");
        assert!(!state.blobs.contains(None, &orphan), "{db:?}");
        assert!(
            state.blobs.contains(None, &old_files["shared.txt"]),
            "{db:?}"
        );
        assert!(state.blobs.contains(None, &legacy), "{db:?}");

        // The old job is gone everywhere; the kept one whole, its files readable.
        let err = c.client.job(&old.id).await.unwrap_err();
        assert!(err.to_string().contains("not_found"), "{db:?}: {err}");
        for sql in [
            "SELECT COUNT(*) FROM tasks WHERE job_id = $1",
            "SELECT COUNT(*) FROM attempts WHERE job_id = $1",
            "SELECT COUNT(*) FROM job_blobs WHERE job_id = $1",
            "SELECT COUNT(*) FROM job_counts WHERE job_id = $1",
            "SELECT COUNT(*) FROM leases l WHERE NOT EXISTS \
             (SELECT 1 FROM tasks t WHERE t.id = l.task_id) AND $1 <> ''",
        ] {
            assert_eq!(rows(&pool, sql, &old.id).await, 0, "{db:?}: {sql}");
        }
        let still = c.wait(&kept.id, Duration::from_secs(5)).await;
        assert_eq!(still.state, fleetbox_proto::JobState::Completed);
        for sha in kept_files.values() {
            assert!(c.client.get_blob(sha).await.is_ok(), "{db:?}: {sha}");
        }
        let err = c.client.get_blob(&old_files["own.txt"]).await.unwrap_err();
        assert!(err.to_string().contains("not_found"), "{db:?}: {err}");

        // The audit log says so, and still verifies.
        let entries = c.client.audit("limit=5000").await.unwrap().entries;
        let pruned = entries
            .iter()
            .find(|e| e.action == "job.pruned")
            .expect("the prune is audited");
        assert_eq!(pruned.job_id.as_deref(), Some(old.id.as_str()));
        assert_eq!(pruned.details["shards"], 1);
        assert_eq!(pruned.details["blobs_released"], 1);
        assert!(
            entries
                .iter()
                .any(|e| e.action == "job.submitted" && e.job_id.as_deref() == Some(&old.id)),
            "{db:?}: the job's own entries stay"
        );
        let verified = c.client.audit_verify().await.unwrap();
        assert!(verified.ok, "{db:?}: {verified:?}");

        // A large job goes in chunks, each its own transaction, all of it.
        let big = c
            .client
            .submit(&spec(
                "name = \"big\"\ncode = 'print(1)'\nshards = { count = 2500 }\n",
            ))
            .await
            .unwrap();
        c.client.cancel(&big.id).await.unwrap();
        let done = c.wait(&big.id, Duration::from_secs(30)).await;
        assert_eq!(done.state, fleetbox_proto::JobState::Cancelled);
        let pass = retention::pass(&state, now_ms() + 1, 0, [], Duration::ZERO)
            .await
            .unwrap();
        // The kept job went too: the blob it shared is released with the last job naming it.
        assert_eq!(pass.pruned.jobs, 2, "{db:?}: {pass:?}");
        assert_eq!(pass.pruned.shards, 2501, "{db:?}: {pass:?}");
        let mut released = pass.pruned.released.clone();
        released.sort();
        let mut named: Vec<String> = kept_files.values().cloned().collect();
        named.sort();
        assert_eq!(released, named, "{db:?}");
        assert_eq!(pass.blobs_removed, 2, "{db:?}");
        assert!(state.blobs.contains(None, &legacy), "{db:?}");
        assert_eq!(
            rows(
                &pool,
                "SELECT COUNT(*) FROM tasks WHERE job_id = $1",
                &big.id
            )
            .await,
            0
        );
        c.stop().await;
    }
}

/// The scheduler runs retention itself (`--retain`): its first pass comes two seconds after a
/// start, and takes a job final for longer than the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_prunes_by_itself() {
    let Some(mut c) =
        Coordinator::start_with(Db::Sqlite, |config| config.retain_ms = Some(1)).await
    else {
        return;
    };
    c.agent("a1", Default::default());
    let job = c.run(&writing("soon gone"), Duration::from_secs(60)).await;
    assert_eq!(job.state, fleetbox_proto::JobState::Completed);
    c.restart(Duration::ZERO).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match c.client.job(&job.id).await {
            Err(e) if e.to_string().contains("not_found") => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "still there: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.stop().await;
}
