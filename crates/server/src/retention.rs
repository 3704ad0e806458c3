//! Retention's pass (`--retain`), run by the scheduler once a minute: finished jobs and ended
//! sessions past the cut-off are deleted (`store::retention`), the blobs they were the last to
//! name are removed from the blob store, and one slice of the blob directory (names starting
//! with two given hex digits; 256 slices, so a whole sweep takes about four hours) is swept for
//! blobs no tenant owns: uploads whose report never came, blobs a removal had to leave.
//!
//! A blob stored or sent again within [`BLOB_GRACE`] is never removed: a report naming it may
//! be on its way (an upload comes before its report).

use std::time::Duration;

use crate::State;
use crate::store::StoreError;
use crate::store::retention::Pruned;

/// How long a blob stored or sent is kept whatever the database says.
pub const BLOB_GRACE: Duration = Duration::from_secs(3600);
/// Jobs pruned per pass at most (a backlog drains over passes).
const JOBS_PER_PASS: i64 = 200;

/// What a pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub pruned: Pruned,
    /// Blobs removed from the blob store.
    pub blobs_removed: u64,
    /// Copies removed from a tenant's area of the bucket.
    pub tenant_copies_removed: u64,
}

/// Prune what finished before `now - retain_ms`, remove the blobs released, and sweep the
/// blob directory's slices `slices` for blobs no tenant owns, idle for at least `grace`.
pub async fn pass(
    state: &State,
    now: i64,
    retain_ms: u64,
    slices: impl IntoIterator<Item = u8>,
    grace: Duration,
) -> Result<Pass, StoreError> {
    let cutoff = now.saturating_sub(i64::try_from(retain_ms).unwrap_or(i64::MAX));
    let pruned = state.store.prune(cutoff, JOBS_PER_PASS).await?;
    let tenant_copies_removed = forget(state, &pruned.disowned).await?;
    let mut candidates = pruned.released.clone();
    for slice in slices {
        let blobs = state.blobs.clone();
        let idle = tokio::task::spawn_blocking(move || blobs.idle_in(slice, grace))
            .await
            .unwrap_or_default();
        candidates.extend(state.store.unowned_blobs(&idle).await?);
    }
    candidates.sort();
    candidates.dedup();
    let blobs_removed = remove(state, candidates, grace).await?;
    Ok(Pass {
        pruned,
        blobs_removed,
        tenant_copies_removed,
    })
}

/// Remove each of `disowned` from its tenant's area of the bucket. A report of the same tenant
/// may have named the blob again meanwhile: the copy is put back from here or the shared area
/// (a coordinator that has neither cannot, and the tenant's next read finds nothing; the same
/// narrow race the shared area has, see `docs/OPERATIONS.md`).
async fn forget(state: &State, disowned: &[(String, String)]) -> Result<u64, StoreError> {
    if !state.blobs.keyed_per_tenant() {
        return Ok(0);
    }
    let mut removed = 0;
    for (tenant, hash) in disowned {
        let (blobs, t, h) = (state.blobs.clone(), tenant.clone(), hash.clone());
        let done = tokio::task::spawn_blocking(move || blobs.forget(&t, &h)).await;
        match done {
            Ok(Ok(())) => removed += 1,
            Ok(Err(e)) => {
                tracing::error!(error = %e, blob = %hash, tenant, "removing a tenant's copy")
            }
            Err(e) => tracing::error!(error = %e, "removing a tenant's copy"),
        }
        if state.store.owns_blob(tenant, hash).await? {
            let (blobs, t, h) = (state.blobs.clone(), tenant.clone(), hash.clone());
            let _ = tokio::task::spawn_blocking(move || blobs.claim(&t, &h)).await;
        }
    }
    Ok(removed)
}

/// Remove the blobs of `candidates` that no tenant owns now (checked again: a report may have
/// named one since) and that are idle for `grace`.
async fn remove(
    state: &State,
    candidates: Vec<String>,
    grace: Duration,
) -> Result<u64, StoreError> {
    let unowned = state.store.unowned_blobs(&candidates).await?;
    let blobs = state.blobs.clone();
    let removed = tokio::task::spawn_blocking(move || {
        let mut removed = 0u64;
        for hash in unowned {
            match blobs.remove_if_idle(&hash, grace) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, blob = %hash, "removing a blob"),
            }
        }
        removed
    })
    .await
    .unwrap_or_default();
    Ok(removed)
}
