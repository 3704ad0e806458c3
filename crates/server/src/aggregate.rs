//! The aggregator: once a job's last shard settles, fold the accepted values and write the
//! result with its summary. A job whose shards partly failed still gets the fold of what
//! succeeded, marked `partial`.

use std::sync::Arc;

use fleetbox_proto::api::{JobSummary, Stats, job_state};
use fleetbox_proto::env;
use fleetbox_proto::{ByteSize, Limits, Millis, Reducer, Status};
use fleetbox_sandbox::RunRequest;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::State;
use crate::blobs::INLINE_LIMIT;
use crate::reduce::{ShardValue, reduce};
use crate::store::{StoreError, now_ms};

pub async fn run(state: Arc<State>, mut jobs: mpsc::UnboundedReceiver<String>) {
    while let Some(job) = jobs.recv().await {
        if let Err(e) = aggregate(&state, &job).await {
            tracing::error!(job, error = %e, "aggregation failed; will retry");
        }
        state
            .aggregating
            .lock()
            .expect("aggregating set")
            .remove(&job);
    }
}

async fn aggregate(state: &State, job_id: &str) -> Result<(), StoreError> {
    let Some(job) = state.store.job_any_tenant(job_id).await? else {
        return Ok(());
    };
    match job.state.as_str() {
        job_state::RUNNING => {
            if !state.store.begin_aggregation(job_id).await? {
                return Ok(());
            }
        }
        // Resumed after a restart.
        job_state::AGGREGATING => {}
        _ => return Ok(()),
    }
    let view = state
        .store
        .job_view(&job.tenant_id, job_id)
        .await?
        .ok_or(StoreError::Corrupt {
            what: "job",
            detail: format!("`{job_id}` vanished during aggregation"),
        })?;
    let counts = view.shards;
    let mut values: Vec<ShardValue> = Vec::new();
    let mut unreadable = Vec::new();
    for v in state.store.accepted_values(job_id).await? {
        let text = match (&v.output, &v.output_blob) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(hash)) => match state.blobs.get(hash) {
                Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
                Err(e) => {
                    unreadable.push(format!("shard {}: blob {hash}: {e}", v.shard_index));
                    continue;
                }
            },
            (None, None) => None,
        };
        let value = text
            .map(|t| serde_json::from_str(&t).unwrap_or(Value::String(t)))
            .unwrap_or(Value::Null);
        values.push((v.shard_index, value));
    }
    let facts = state.store.attempt_facts(job_id).await?;
    let failed = counts.rejected;
    let dead = counts.dead;
    let total = counts.total.max(job.shard_count);
    let mut summary = JobSummary {
        shards_total: total,
        shards_accepted: counts.accepted,
        shards_failed: failed,
        shards_dead: dead,
        success_rate: if total == 0 {
            0.0
        } else {
            counts.accepted as f64 / total as f64
        },
        partial: counts.accepted < total,
        attempts: facts.attempts,
        reducer: job.reducer.name().to_string(),
        duration_ms: (now_ms() - job.created_at).max(0) as u64,
        shard_wall_ms: Stats::of(facts.chosen_wall_ms),
        shard_peak_memory_bytes: Stats::of(facts.chosen_peak_memory),
        bytes_produced: facts.bytes_out,
        notes: unreadable,
    };
    let failures = state.store.failure_reasons(job_id, 3).await?;
    if summary.partial {
        let mut note = format!(
            "{} of {} shards did not succeed ({failed} failed, {dead} dead); the result covers the {} that did",
            total - counts.accepted,
            total,
            counts.accepted
        );
        if let Some((idx, why)) = failures.first() {
            note.push_str(&format!("; first failure: shard {idx}: {why}"));
        }
        summary.notes.push(note);
    }
    let (job_state_now, result, error) = if counts.accepted == 0 {
        let first = failures
            .first()
            .map(|(i, w)| format!("; first failure: shard {i}: {w}"))
            .unwrap_or_default();
        (
            job_state::FAILED,
            None,
            Some(format!(
                "no shard succeeded ({failed} failed, {dead} dead){first}"
            )),
        )
    } else {
        match fold(state, &job.reducer, &job.limits, job_id, values).await {
            Ok(v) => (job_state::COMPLETED, Some(v), None),
            Err(e) => (
                job_state::FAILED,
                None,
                Some(format!("aggregation failed: {e}")),
            ),
        }
    };
    // Large results go to the blob store; the row keeps a pointer.
    let stored = match &result {
        Some(v) => {
            let text = serde_json::to_string(v).unwrap_or_default();
            if text.len() > INLINE_LIMIT * 16 {
                match state.blobs.put(text.as_bytes()) {
                    Ok(hash) => Some(serde_json::json!({ "$blob": hash })),
                    Err(e) => {
                        tracing::error!(job_id, error = %e, "result blob");
                        Some(v.clone())
                    }
                }
            } else {
                Some(v.clone())
            }
        }
        None => None,
    };
    state
        .store
        .finish_job(
            job_id,
            job_state_now,
            stored.as_ref(),
            &summary,
            error.as_deref(),
        )
        .await?;
    tracing::info!(
        job_id,
        state = job_state_now,
        accepted = counts.accepted,
        total,
        "job finished"
    );
    Ok(())
}

async fn fold(
    state: &State,
    reducer: &Reducer,
    limits: &Limits,
    job_id: &str,
    values: Vec<ShardValue>,
) -> Result<Value, String> {
    let Reducer::Python { code } = reducer else {
        return reduce(reducer, &values).map_err(|e| e.to_string());
    };
    let list = Value::Array(values.into_iter().map(|(_, v)| v).collect());
    let input = serde_json::to_vec(&list).map_err(|e| e.to_string())?;
    let mut limits = limits.clone();
    limits.timeout = limits.timeout.max(Millis::from_secs(60));
    limits.cpu_time = limits.cpu_time.max(Millis::from_secs(60));
    limits.max_output = limits.max_output.max(ByteSize::mib(16));
    let mut req = RunRequest::new(code.clone(), Some(input), limits);
    req.runner_id = "server".into();
    req.env.push((env::FLEETBOX_JOB_ID.into(), job_id.into()));
    let backend = state.config.sandbox_backend;
    let config = state.config.sandbox.clone();
    let report = tokio::task::spawn_blocking(move || {
        fleetbox_sandbox::open(backend, config).map(|sandbox| sandbox.run(&req))
    })
    .await
    .map_err(|e| format!("the reducer's sandbox thread failed: {e}"))?
    .map_err(|e| format!("could not open the `{backend}` sandbox: {e}"))?;
    if report.status != Status::Ok {
        let why = crate::api::failure_reason(&report).unwrap_or_default();
        return Err(format!("python reducer: {why}"));
    }
    Ok(report.output.unwrap_or(Value::Null))
}
