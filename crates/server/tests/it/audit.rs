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
