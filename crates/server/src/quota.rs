//! A tenant's caps on the job's path: a submission is admitted (its rate, its shards and CPU
//! of the day), a lease is sized (its running shards, its CPU of the day).
//!
//! Caps are read from the store at most once a second per coordinator, so an operator's
//! change takes effect within a second. The submit rate is a token bucket per coordinator
//! (burst: one second's worth, at least one); the other caps are counted in the store, so
//! they hold across coordinators, give or take the leases granted in the same instant.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetbox_proto::tenancy::TenantCaps;

use crate::State;
use crate::store::audit::{Action, Entry};
use crate::store::{StoreError, now_ms};

/// How long a tenant's caps are believed without reading them again.
const CAPS_FOR: Duration = Duration::from_secs(1);

/// Per-coordinator state: caps read recently, and each tenant's submit bucket.
#[derive(Debug, Default)]
pub struct Quotas {
    caps: Mutex<HashMap<String, (TenantCaps, Instant)>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Tenants past their CPU of the day, as last worked out.
    blocked: Mutex<Option<(Vec<String>, Instant)>>,
}

/// A token bucket: `level` submissions available, refilled at `rate` a second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    /// Take one; on refusal, the seconds until one is available.
    fn take(&mut self, rate: f64, now: Instant) -> Result<(), f64> {
        let burst = rate.max(1.0);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * rate).min(burst);
        self.at = now;
        if self.level >= 1.0 {
            self.level -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.level) / rate)
        }
    }
}

impl Quotas {
    async fn caps(&self, state: &State, tenant: &str) -> Result<TenantCaps, StoreError> {
        if let Some((caps, at)) = self.caps.lock().expect("caps").get(tenant)
            && at.elapsed() < CAPS_FOR
        {
            return Ok(caps.clone());
        }
        let caps = state
            .store
            .tenant_caps(tenant)
            .await?
            .map(|(_, c)| c)
            .unwrap_or_default();
        self.caps
            .lock()
            .expect("caps")
            .insert(tenant.to_string(), (caps.clone(), Instant::now()));
        Ok(caps)
    }

    fn take(&self, tenant: &str, rate: f64) -> Result<(), f64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("buckets");
        buckets
            .entry(tenant.to_string())
            .or_insert(Bucket {
                level: rate.max(1.0),
                at: now,
            })
            .take(rate, now)
    }
}

/// Record in `tenant`'s log that a cap refused `actor` (`tenant.capped`).
pub async fn record_capped(state: &State, tenant: &str, actor: &str, why: &str) {
    let entry =
        Entry::new(tenant, actor, Action::TenantCapped).details(serde_json::json!({ "why": why }));
    if let Err(e) = state.store.audit(vec![entry]).await {
        tracing::error!(error = %e, "could not record a cap");
    }
}

/// Why a tenant may not go on now; the API answers `429 rate_limited` (with `Retry-After`)
/// and `403 quota_exceeded`.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("tenant `{tenant}` may submit {rate} jobs a second; try again in {wait_s:.1} s")]
    RateLimited {
        tenant: String,
        rate: f64,
        wait_s: f64,
    },
    #[error("{0}")]
    Exceeded(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether `tenant` may submit now: [`QuotaError::RateLimited`] above its submit rate (not
/// audited: a burst would flood the log).
pub async fn admit_rate(state: &State, tenant: &str) -> Result<(), QuotaError> {
    let caps = state.quotas.caps(state, tenant).await?;
    let Some(rate) = caps.submit_rate else {
        return Ok(());
    };
    state
        .quotas
        .take(tenant, rate)
        .map_err(|wait_s| QuotaError::RateLimited {
            tenant: tenant.to_string(),
            rate,
            wait_s,
        })
}

/// Whether `tenant` may add `shards` shards now: [`QuotaError::Exceeded`] (audited) past its
/// shards or CPU seconds of the last day or its blob bytes.
pub async fn admit_shards(
    state: &State,
    tenant: &str,
    actor: &str,
    shards: u64,
) -> Result<(), QuotaError> {
    let Some(why) = over_caps(state, tenant, shards).await? else {
        return Ok(());
    };
    record_capped(state, tenant, actor, &why).await;
    Err(QuotaError::Exceeded(why))
}

/// Why `tenant` may not add `shards` shards now; `None` when it may. Submissions, re-runs
/// and follow-up jobs all pass here.
pub async fn over_caps(
    state: &State,
    tenant: &str,
    shards: u64,
) -> Result<Option<String>, StoreError> {
    let caps = state.quotas.caps(state, tenant).await?;
    if caps.max_shards_per_day.is_none()
        && caps.max_cpu_seconds_per_day.is_none()
        && caps.max_blob_bytes.is_none()
    {
        return Ok(None);
    }
    let used = state.store.tenant_usage(tenant, now_ms()).await?;
    if let Some(cap) = caps.max_shards_per_day
        && used.shards_today.saturating_add(shards) > cap
    {
        return Ok(Some(format!(
            "tenant `{tenant}` may submit {cap} shards a day: {} in the last 24 hours, {shards} more asked",
            used.shards_today
        )));
    }
    if let Some(cap) = caps.max_cpu_seconds_per_day
        && used.cpu_seconds_today >= cap as f64
    {
        return Ok(Some(format!(
            "tenant `{tenant}` may use {cap} CPU seconds a day: {:.1} used in the last 24 hours",
            used.cpu_seconds_today
        )));
    }
    if let Some(cap) = caps.max_blob_bytes
        && used.blob_bytes >= cap
    {
        return Ok(Some(format!(
            "tenant `{tenant}` may keep {cap} bytes of blobs: it keeps {}",
            used.blob_bytes
        )));
    }
    Ok(None)
}

/// The tenants no lease may serve now: past their CPU seconds of the day or their blob bytes.
/// Worked out at most once a second per coordinator. (Running-shard caps are counted by the lease itself, in
/// its transaction: see `store/fair.rs`.)
pub async fn blocked(state: &State) -> Result<Vec<String>, StoreError> {
    if let Some((list, at)) = &*state.quotas.blocked.lock().expect("blocked")
        && at.elapsed() < CAPS_FOR
    {
        return Ok(list.clone());
    }
    let now = now_ms();
    let mut list = Vec::new();
    for (tenant, cpu, blob_bytes) in state.store.lease_capped_tenants().await? {
        let used = state.store.tenant_usage(&tenant, now).await?;
        let past_cpu = cpu.is_some_and(|cap| used.cpu_seconds_today >= cap as f64);
        let past_bytes = blob_bytes.is_some_and(|cap| used.blob_bytes >= cap.max(0).unsigned_abs());
        if past_cpu || past_bytes {
            list.push(tenant);
        }
    }
    *state.quotas.blocked.lock().expect("blocked") = Some((list.clone(), Instant::now()));
    Ok(list)
}

/// Give blob owner rows from before sizes were kept (migration 0027) their size on disk, a
/// thousand at a time, once at start.
pub async fn measure_old_blobs(state: std::sync::Arc<State>) {
    loop {
        let hashes = match state.store.unmeasured_blobs(1000).await {
            Ok(h) if h.is_empty() => return,
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "could not read blobs to measure");
                return;
            }
        };
        for hash in hashes {
            let bytes = state.blobs.size(None, &hash).unwrap_or(0);
            if let Err(e) = state.store.measured_blob(&hash, bytes).await {
                tracing::warn!(error = %e, "could not record a blob's size");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket { level: 2.0, at: t0 };
        assert!(b.take(2.0, t0).is_ok());
        assert!(b.take(2.0, t0).is_ok());
        let wait = b.take(2.0, t0).unwrap_err();
        assert!((wait - 0.5).abs() < 1e-9, "{wait}");
        assert!(b.take(2.0, t0 + Duration::from_millis(500)).is_ok());
        // A slow rate still admits one at a time.
        let mut slow = Bucket { level: 1.0, at: t0 };
        assert!(slow.take(0.1, t0).is_ok());
        assert!((slow.take(0.1, t0).unwrap_err() - 10.0).abs() < 1e-9);
    }
}
