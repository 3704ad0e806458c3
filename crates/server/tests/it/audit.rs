//! The audit store on both databases over more than one verification page: a long chain
//! verifies, and an edit deep inside it (past the first page) is named.

use fleetbox_server::store::Store;
use fleetbox_server::store::audit::{Action, Entry, Pins};

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
        let v = store
            .audit_verify("default", &Pins::default())
            .await
            .unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!(v.entries as usize, ENTRIES, "{db:?}");

        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("UPDATE audit SET details = $1 WHERE tenant_id = 'default' AND seq = 6001")
            .bind(r#"{"i":6000,"text":"edited"}"#)
            .execute(&pool)
            .await
            .unwrap();
        let v = store
            .audit_verify("default", &Pins::default())
            .await
            .unwrap();
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
            let v = store.audit_verify(TENANT, &Pins::default()).await.unwrap();
            assert!(v.ok, "{db:?}, run {runs}: {v:?}");
            assert_eq!(v.entries as i64, v.head_seq, "{db:?}");
            runs += 1;
        }
        writer.await.unwrap();
        let v = store.audit_verify(TENANT, &Pins::default()).await.unwrap();
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
        let after = store.audit_verify(TENANT, &Pins::default()).await.unwrap();
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
        let pins = pinned(&key);
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
        assert_eq!(store.audit_prune("default", 10, &key).await.unwrap(), 10);
        let v = store.audit_verify("default", &pins).await.unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!((v.entries, v.head_seq), (5, 15));
        // Up to the head: nothing left, anchored on the head's checkpoint.
        assert_eq!(store.audit_prune("default", 15, &key).await.unwrap(), 5);
        let v = store.audit_verify("default", &pins).await.unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!((v.entries, v.head_seq), (0, 15));
        // The chain goes on from there.
        store.audit(append(3)).await.unwrap();
        let v = store.audit_verify("default", &pins).await.unwrap();
        assert!(v.ok, "{db:?}: {v:?}");
        assert_eq!((v.entries, v.head_seq), (3, 18));
        // An emptied log whose head has no checkpoint is named, not passed.
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("DELETE FROM audit")
            .execute(&pool)
            .await
            .unwrap();
        let v = store.audit_verify("default", &pins).await.unwrap();
        assert!(!v.ok, "{db:?}: {v:?}");
        assert_eq!(v.problem.unwrap().seq, 16, "{db:?}: after the signed prune");
        pool.close().await;
        store.close().await;
    }
}

/// Pins that believe `key` only.
fn pinned(key: &ed25519_dalek::SigningKey) -> Pins {
    Pins {
        keys: [hex::encode(key.verifying_key().as_bytes())].into(),
        checkpoints: Vec::new(),
    }
}

/// What someone holding only the database can do, and how each is named: old entries deleted
/// as if pruned (no signed prune), a checkpoint re-signed with a fresh key (not pinned), a
/// checkpoint kept outside the database deleted from it, one changed.
#[tokio::test]
async fn the_database_alone_cannot_fake_a_prune_a_signature_or_forget_a_checkpoint() {
    use ed25519_dalek::Signer;
    use fleetbox_proto::api::AuditCheckpoint;
    for db in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = database(db, dir.path()).await else {
            continue;
        };
        let store = Store::open(&url).await.unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let entries = |n: usize| {
            (0..n)
                .map(|i| {
                    Entry::new("default", "server", Action::ShardAccepted)
                        .task(i as i64)
                        .details(serde_json::json!({ "i": i }))
                })
                .collect::<Vec<_>>()
        };
        store.audit(entries(10)).await.unwrap();
        let mut kept = store.audit_checkpoint(&key).await.unwrap();
        store.audit(entries(10)).await.unwrap();
        kept.extend(store.audit_checkpoint(&key).await.unwrap());
        assert_eq!(kept.iter().map(|c| c.seq).collect::<Vec<_>>(), [10, 20]);
        let pins = Pins {
            checkpoints: kept.clone(),
            ..pinned(&key)
        };
        assert!(store.audit_verify("default", &pins).await.unwrap().ok);
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        let exec = |sql: String| {
            let pool = pool.clone();
            async move { sqlx::query(&sql).execute(&pool).await.unwrap() }
        };
        exec("CREATE TABLE audit_saved AS SELECT * FROM audit".into()).await;
        exec("CREATE TABLE checkpoints_saved AS SELECT * FROM audit_checkpoints".into()).await;
        let restore = || async {
            exec("DELETE FROM audit".into()).await;
            exec("INSERT INTO audit SELECT * FROM audit_saved".into()).await;
            exec("DELETE FROM audit_checkpoints".into()).await;
            exec("INSERT INTO audit_checkpoints SELECT * FROM checkpoints_saved".into()).await;
        };
        let fails = |what: &'static str, seq: i64, says: &'static str| {
            let store = store.clone();
            let pins = pins.clone();
            async move {
                let v = store.audit_verify("default", &pins).await.unwrap();
                let problem = v
                    .problem
                    .clone()
                    .unwrap_or_else(|| panic!("{db:?}: {what} went unnoticed"));
                assert_eq!(problem.seq, seq, "{db:?}: {what}: {problem:?}");
                assert!(problem.what.contains(says), "{db:?}: {what}: {problem:?}");
            }
        };

        // Old entries deleted behind a checkpoint, as a prune would: no signed prune record.
        exec("DELETE FROM audit WHERE seq <= 10".into()).await;
        fails("a faked prune", 1, "no prune signed by a pinned key").await;
        restore().await;

        // The checkpoint of entry 10 re-signed with a fresh key (a rewrite's last step).
        let fresh = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let c = &kept[0];
        let signature = fresh.sign(&AuditCheckpoint::message(
            &c.tenant_id,
            c.seq,
            &c.chain,
            c.at,
        ));
        exec(format!(
            "UPDATE audit_checkpoints SET public_key = '{}', signature = '{}' WHERE seq = 10",
            hex::encode(fresh.verifying_key().as_bytes()),
            hex::encode(signature.to_bytes())
        ))
        .await;
        fails("a checkpoint re-signed", 10, "not pinned").await;
        restore().await;

        // Every checkpoint deleted: the kept copies name the first.
        exec("DELETE FROM audit_checkpoints".into()).await;
        fails("checkpoints deleted", 10, "missing").await;
        restore().await;

        // A checkpoint's chain replaced and re-signed with the pinned key is impossible
        // without the key; one replaced without a signature fails as edited, and one whose
        // kept copy differs is named as such.
        let mut other = pins.clone();
        other.checkpoints[1].chain = kept[0].chain.clone();
        other.checkpoints[1].signature = hex::encode(
            key.sign(&AuditCheckpoint::message(
                "default",
                20,
                &kept[0].chain,
                kept[1].at,
            ))
            .to_bytes(),
        );
        let v = store.audit_verify("default", &other).await.unwrap();
        let problem = v.problem.unwrap();
        assert_eq!(problem.seq, 20, "{db:?}: {problem:?}");
        assert!(
            problem.what.contains("differs from the copy kept"),
            "{problem:?}"
        );

        // Restored, it verifies again.
        assert!(
            store.audit_verify("default", &pins).await.unwrap().ok,
            "{db:?}"
        );
        pool.close().await;
        store.close().await;
    }
}
