//! The scheduler loop: lost agents, expired leases, retries, and aggregation recovery.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::State;
use crate::store::now_ms;

/// How often leases and agents are checked: a lost agent's leases return within
/// `agent_timeout + TICK`.
const TICK: Duration = Duration::from_millis(250);
/// How often jobs are checked for a fold to claim: a missed signal, a failed fold whose
/// back-off passed, a fold abandoned by a dead coordinator (taken over within
/// `FOLD_LEASE_MS + RECOVERY_EVERY * TICK`).
const RECOVERY_EVERY: u32 = 4;
/// How often the queue is checked for ready work, to wake the agents' polls: every 500 ms.
const READY_EVERY: u32 = 2;
/// How often retention runs (`--retain`): once a minute, the first time two seconds after
/// the start.
const RETAIN_EVERY: u32 = 240;
const RETAIN_FIRST: u32 = 8;

pub async fn run(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = 0u32;
    let mut last_checkpoint = now_ms();
    loop {
        if now_ms() - last_checkpoint >= state.config.audit_checkpoint_ms as i64 {
            last_checkpoint = now_ms();
            match state.store.audit_checkpoint(&state.custody.key).await {
                Ok(made) => {
                    if let Err(e) = state.custody.journal(&made) {
                        tracing::error!(error = %e, "journaling audit checkpoints");
                    }
                    // Off the scheduler's loop: a slow sink must not hold up lease expiry.
                    if state.custody.ships() {
                        let state = state.clone();
                        tokio::spawn(async move {
                            state.custody.ship(&made, &state.metrics).await;
                        });
                    }
                }
                Err(e) => tracing::error!(error = %e, "audit checkpoint"),
            }
        }
        if tick.is_multiple_of(RECOVERY_EVERY) {
            match state.store.jobs_to_aggregate(now_ms()).await {
                Ok(jobs) => jobs.into_iter().for_each(|j| state.aggregate(j)),
                Err(e) => tracing::error!(error = %e, "aggregation recovery"),
            }
        }
        if let Some(retain_ms) = state.config.retain_ms
            && tick % RETAIN_EVERY == RETAIN_FIRST
        {
            // Each pass sweeps the next slice of the blob directory.
            let slice = (tick / RETAIN_EVERY % 256) as u8;
            retain(&state, retain_ms, slice).await;
        }
        if tick.is_multiple_of(READY_EVERY) {
            watch_ready(&state).await;
        }
        tick = tick.wrapping_add(1);
        if let Err(e) = sweep(&state).await {
            tracing::error!(error = %e, "scheduler sweep");
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn sweep(state: &State) -> Result<(), crate::store::StoreError> {
    let now = now_ms();
    // After a start-up (perhaps after an outage) agents get one agent timeout to heartbeat
    // before any is called lost: silence while the coordinator was down is not theirs.
    let timeout = state.config.agent_timeout_ms as i64;
    // Leases are not expired meanwhile either: their heartbeats could not arrive.
    if now - state.started_at < timeout {
        return Ok(());
    }
    let lost = state.store.mark_lost_agents(now - timeout).await?;
    for agent in &lost {
        tracing::warn!(
            agent,
            "agent stopped heartbeating: marked lost, its leases return to the queue"
        );
    }
    let (changed, ready) = state
        .store
        .expire_leases(now, &lost, state.config.retry_backoff_ms)
        .await?;
    for t in &changed {
        if t.dead {
            tracing::warn!(task = t.task_id, job = %t.job_id, "shard is dead: out of attempts");
        } else {
            tracing::info!(task = t.task_id, job = %t.job_id, "lease lost: shard queued again");
        }
    }
    if !changed.is_empty() {
        state.work.notify_waiters();
    }
    for job in ready {
        state.aggregate(job);
    }
    // The steps after lease expiry are independent of it and of each other: one failing is
    // logged and the others still run.
    match state.store.reject_unrunnable(now).await {
        // Shards refused by everyone still here (the agent that would have run them left).
        Ok(ready) => ready.into_iter().for_each(|job| state.aggregate(job)),
        Err(e) => tracing::error!(error = %e, "rejecting shards no agent would run"),
    }
    if let Err(e) = end_sessions(state, &lost).await {
        tracing::error!(error = %e, "ending sessions");
    }
    Ok(())
}

/// Wake the waiting lease polls when a shard is ready to run: one read for all of them, where
/// each poll used to re-check on a timer of its own. Its own events (a submission, a report, a
/// requeue) wake them at once; this covers retries whose back-off ran out and work another
/// coordinator on the database queued.
async fn watch_ready(state: &State) {
    match state.store.has_ready_work(now_ms()).await {
        Ok(true) => state.work.notify_waiters(),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "looking for ready work"),
    }
}

async fn retain(state: &State, retain_ms: u64, slice: u8) {
    match crate::retention::pass(
        state,
        now_ms(),
        retain_ms,
        [slice],
        crate::retention::BLOB_GRACE,
    )
    .await
    {
        Ok(p) if p != crate::retention::Pass::default() => tracing::info!(
            jobs = p.pruned.jobs,
            shards = p.pruned.shards,
            attempts = p.pruned.attempts,
            sessions = p.pruned.sessions,
            blobs = p.blobs_removed,
            tenant_copies = p.tenant_copies_removed,
            "retention: deleted what finished before the cut-off"
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "retention"),
    }
}

/// The lost agents' sessions went with them; idle and old sessions end.
async fn end_sessions(state: &State, lost: &[String]) -> Result<(), crate::store::StoreError> {
    let ended = state
        .store
        .lose_sessions_of(lost, "its agent stopped answering")
        .await?
        + state.store.expire_sessions().await?;
    if ended > 0 {
        tracing::info!(ended, "sessions ended");
        state.work.notify_waiters();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_agent_loses_its_leases_within_five_seconds_by_default() {
        let c = crate::ServerConfig::new("127.0.0.1:0".parse().unwrap(), "/tmp".into());
        assert_eq!((c.lease_ms, c.heartbeat_ms), (10_000, 2_000));
        // Lost after `agent_timeout`, noticed at the next tick.
        assert!(c.agent_timeout_ms + TICK.as_millis() as u64 <= 5_000);
        // Two heartbeats may be missed before that.
        assert!(c.agent_timeout_ms > 2 * c.heartbeat_ms);
    }
}
