//! The audit store on both databases over more than one verification page: a long chain
//! verifies, and an edit deep inside it (past the first page) is named.

use fleetbox_server::store::Store;
use fleetbox_server::store::audit::{Action, Entry};

use crate::support::{BOTH, database};

/// More than two of verification's pages (4,096 entries each).
const ENTRIES: usize = 9_000;

#[tokio::test]
async fn a_long_chain_verifies_and_an_edit_past_the_first_page_is_named() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let store = Store::open(&url).await.unwrap();
        for start in (0..ENTRIES).step_by(1000) {
            let batch = (start..start + 1000)
                .map(|i| {
                    Entry::new("default", "server", Action::ShardAccepted)
                        .job("job_long")
                        .task(i as i64)
                        .details(serde_json::json!({"i": i, "text": "quote \" and \\ and \n"}))
                })
                .collect();
            store.audit(batch).await.unwrap();
        }
        let v = store.audit_verify("default").await.unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!(v.entries as usize, ENTRIES, "{db:?}");

        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("UPDATE audit SET details = $1 WHERE tenant_id = 'default' AND seq = 6001")
            .bind(r#"{"i":6000,"text":"edited"}"#)
            .execute(&pool)
            .await
            .unwrap();
        let v = store.audit_verify("default").await.unwrap();
        assert!(!v.ok, "{db:?}");
        assert_eq!(v.problem.unwrap().seq, 6001, "{db:?}");
        assert_eq!(
            v.entries, 6000,
            "{db:?}: the entries before the edit were checked"
        );
        pool.close().await;
        store.close().await;
    }
}

/// Verification reads the log up to the head it read first, on a connection of its own: a
/// log that grows while it runs verifies (what was appended after is the next run's), for a
/// tenant whose name needs quoting too; a row added past the head without moving it is named.
#[tokio::test]
async fn a_growing_log_verifies_and_a_row_past_the_head_is_named() {
    const TENANT: &str = "o'neil \\ co";
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let store = Store::open(&url).await.unwrap();
        let batch = |round: usize| {
            (0..200)
                .map(|i| {
                    Entry::new(TENANT, "server", Action::ShardAccepted)
                        .job("job_growing")
                        .task((round * 200 + i) as i64)
                        .details(serde_json::json!({"round": round}))
                })
                .collect::<Vec<_>>()
        };
        store.audit(batch(0)).await.unwrap();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for round in 1..=60 {
                    store.audit(batch(round)).await.unwrap();
                }
            })
        };
        let mut runs = 0;
        while !writer.is_finished() || runs < 3 {
            let v = store.audit_verify(TENANT).await.unwrap();
            assert!(v.ok, "{db:?}, run {runs}: {v:?}");
            assert_eq!(v.entries as i64, v.head_seq, "{db:?}");
            runs += 1;
        }
        writer.await.unwrap();
        let v = store.audit_verify(TENANT).await.unwrap();
        assert!(v.ok && v.entries == 61 * 200, "{db:?}: {v:?}");

        // A row past the head, its hashes copied from the last entry: outside the chain.
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO audit (tenant_id, seq, at, actor, action, job_id, task_id, lease_id, \
             agent_id, details, leaf, chain) SELECT tenant_id, seq + 1, at, actor, action, \
             job_id, task_id, lease_id, agent_id, details, leaf, chain FROM audit \
             WHERE tenant_id = $1 AND seq = $2",
        )
        .bind(TENANT)
        .bind(v.head_seq)
        .execute(&pool)
        .await
        .unwrap();
        let after = store.audit_verify(TENANT).await.unwrap();
        assert!(!after.ok, "{db:?}");
        let problem = after.problem.unwrap();
        assert_eq!(problem.seq, v.head_seq + 1, "{db:?}: {problem:?}");
        assert!(
            problem.what.contains("past its head"),
            "{db:?}: {problem:?}"
        );
        pool.close().await;
        store.close().await;
    }
}

/// Pruning keeps what is left verifiable, anchored on the checkpoint it pruned up to: up to an
/// entry inside the log, and up to the head itself (no entry left; CI found verification
/// failing there, naming the lowest checkpoint as "removed from the end"). Appends after a
/// prune to the head verify too.
#[tokio::test]
async fn a_log_pruned_to_a_checkpoint_or_to_its_head_verifies() {
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let store = Store::open(&url).await.unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let append = |n: usize| {
            (0..n)
                .map(|i| {
                    Entry::new("default", "server", Action::ShardAccepted)
                        .task(i as i64)
                        .details(serde_json::json!({ "i": i }))
                })
                .collect::<Vec<_>>()
        };
        store.audit(append(10)).await.unwrap();
        store.audit_checkpoint(&key).await.unwrap();
        store.audit(append(5)).await.unwrap();
        store.audit_checkpoint(&key).await.unwrap();
        // Up to the first checkpoint: 5 entries left, anchored on entry 10.
        assert_eq!(store.audit_prune("default", 10).await.unwrap(), Ok(10));
        let v = store.audit_verify("default").await.unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!((v.entries, v.head_seq), (5, 15));
        // Up to the head: nothing left, anchored on the head's checkpoint.
        assert_eq!(store.audit_prune("default", 15).await.unwrap(), Ok(5));
        let v = store.audit_verify("default").await.unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!((v.entries, v.head_seq), (0, 15));
        // The chain goes on from there.
        store.audit(append(3)).await.unwrap();
        let v = store.audit_verify("default").await.unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!((v.entries, v.head_seq), (3, 18));
        // An emptied log whose head has no checkpoint is named, not passed.
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("DELETE FROM audit")
            .execute(&pool)
            .await
            .unwrap();
        let v = store.audit_verify("default").await.unwrap();
        assert!(!v.ok, "{db:?}: {v:?}");
        assert_eq!(v.problem.unwrap().seq, 1, "{db:?}");
        pool.close().await;
        store.close().await;
    }
}
