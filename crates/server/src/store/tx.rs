//! Write transactions that survive their caller being dropped.
//!
//! An HTTP handler's future is dropped when its client hangs up. If that happened while sqlx
//! was inside `BEGIN` (the statement ran, the `Transaction` not built yet) the connection went
//! back to the pool still in a transaction, and on SQLite's single write connection every
//! later write failed with `attempted to call begin_with at non-zero transaction depth`. Three
//! things make that impossible here:
//!
//! - `BEGIN` and `COMMIT` run on a task of their own that the caller awaits but does not own:
//!   dropping the caller cannot stop them half-way. A transaction begun for a caller that is
//!   gone is dropped by the task, which rolls it back.
//! - A [`WriteTx`] dropped between the two (after some statements) rolls back, as sqlx's
//!   transactions do.
//! - A connection handed back to a pool while still in a transaction is closed, never reused
//!   ([`release_clean`], the pools' `after_release` hook).

use std::ops::{Deref, DerefMut};

use futures_util::future::BoxFuture;
use sqlx::{AnyConnection, AnyPool, Connection};

use super::DbKind;

/// A write transaction (see the module docs). Statements run on `&mut *tx`.
pub(crate) struct WriteTx(sqlx::Transaction<'static, sqlx::Any>, DbKind);

impl Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.0
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.0
    }
}

impl WriteTx {
    /// Begin on `pool`, on a task of its own. On SQLite the write lock is taken at `BEGIN`
    /// (`IMMEDIATE`): a deferred transaction that reads first and then writes fails at once
    /// with `database is locked` when another store holds the lock, since SQLite cannot wait
    /// for an upgrade; an immediate one waits (`busy_timeout`) like any writer.
    pub(crate) async fn begin(pool: &AnyPool, kind: DbKind) -> Result<WriteTx, sqlx::Error> {
        let pool = pool.clone();
        let task = tokio::spawn(async move {
            match kind {
                DbKind::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
                DbKind::Postgres => pool.begin().await,
            }
        });
        Ok(WriteTx(detached(task).await?, kind))
    }

    /// The database it runs on.
    pub(crate) fn kind(&self) -> DbKind {
        self.1
    }

    /// Commit on a task of its own: once asked for, a commit finishes even if the caller is
    /// dropped while it runs.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        detached(tokio::spawn(self.0.commit())).await
    }
}

/// The task's result; a task that panicked is reported as a broken connection.
async fn detached<T>(
    task: tokio::task::JoinHandle<Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match task.await {
        Ok(result) => result,
        Err(e) => Err(sqlx::Error::WorkerCrashed).inspect_err(|_| {
            tracing::error!(error = %e, "a store transaction's task failed");
        }),
    }
}

/// The pools' `after_release` hook: a connection that comes back still inside a transaction
/// (whatever left it so) is closed instead of reused.
pub(super) fn release_clean(
    conn: &mut AnyConnection,
    _meta: sqlx::pool::PoolConnectionMetadata,
) -> BoxFuture<'_, Result<bool, sqlx::Error>> {
    let clean = !conn.is_in_transaction();
    if !clean {
        tracing::warn!("a connection came back inside a transaction: closing it");
    }
    Box::pin(async move { Ok(clean) })
}

#[cfg(test)]
mod tests {
    //! A write's future dropped at each point of its transaction, on both stores: the next
    //! write works, and what the dropped one did is all there or not there at all.
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;
    use std::time::Duration;

    use sqlx::{Connection, Row};

    use super::super::Store;

    async fn stores() -> Vec<(Store, tempfile::TempDir)> {
        let mut out = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let url = Store::sqlite_url(dir.path());
        out.push((Store::open(&url).await.unwrap(), dir));
        if let Some(url) = fleetbox_testkit::postgres_database().await {
            out.push((
                Store::open(&url).await.unwrap(),
                tempfile::tempdir().unwrap(),
            ));
        }
        for (store, _) in &out {
            sqlx::query("CREATE TABLE probe (id BIGINT PRIMARY KEY)")
                .execute(&store.write)
                .await
                .unwrap();
        }
        out
    }

    /// Poll `fut` once (so it has started), then drop it.
    fn poll_once_and_drop<F: Future>(fut: F) {
        let mut fut = pin!(fut);
        let waker = futures_util::task::noop_waker();
        let _ = fut.as_mut().poll(&mut Context::from_waker(&waker));
    }

    async fn insert(store: &Store, id: i64) -> super::WriteTx {
        let mut tx = store.begin_write().await.unwrap();
        sqlx::query("INSERT INTO probe (id) VALUES ($1)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }

    /// A whole write, within a few seconds (a wedged store fails at once or waits forever).
    async fn next_write_works(store: &Store, id: i64) {
        let write = async { insert(store, id).await.commit().await.unwrap() };
        tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .expect("the next write finished");
    }

    async fn has(store: &Store, id: i64) -> bool {
        sqlx::query("SELECT COUNT(*) AS n FROM probe WHERE id = $1")
            .bind(id)
            .fetch_one(&store.read)
            .await
            .unwrap()
            .get::<i64, _>("n")
            == 1
    }

    /// Wait for detached work and pool releases to settle.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_begin_leaves_no_transaction_open() {
        for (store, _dir) in stores().await {
            for round in 0..20 {
                poll_once_and_drop(store.begin_write());
                // Dropped while sqlx waits for the statement's answer, many times over.
                let fut = store.begin_write();
                let _ = tokio::time::timeout(Duration::from_micros(50 * round), fut).await;
                settle().await;
                next_write_works(&store, round as i64).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_dropped_after_its_first_statement_rolls_back() {
        for (store, _dir) in stores().await {
            let tx = insert(&store, 1).await;
            drop(tx);
            settle().await;
            next_write_works(&store, 2).await;
            assert!(!has(&store, 1).await, "the dropped transaction rolled back");
            assert!(has(&store, 2).await);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_asked_for_finishes_when_its_caller_is_dropped() {
        for (store, _dir) in stores().await {
            let tx = insert(&store, 1).await;
            poll_once_and_drop(tx.commit());
            settle().await;
            next_write_works(&store, 2).await;
            assert!(has(&store, 1).await, "the commit ran to its end");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_handed_back_inside_a_transaction_is_never_reused() {
        for (store, _dir) in stores().await {
            // What sqlx's own cancellation window did: `BEGIN` ran, nothing owns it.
            let mut conn = store.write.acquire().await.unwrap();
            std::mem::forget(conn.begin().await.unwrap());
            assert!(conn.is_in_transaction());
            drop(conn);
            settle().await;
            next_write_works(&store, 3).await;
            assert!(has(&store, 3).await);
        }
    }
}
