//! The aggregator: once a job's last shard settles, fold the accepted values and write the
//! result with its summary. A job whose shards partly failed still gets the fold of what
//! succeeded, marked `partial`.

use std::sync::Arc;

use fleetbox_proto::JobState;
use fleetbox_proto::api::{JobFlag, JobSummary, ShardCounts, Stats};
use fleetbox_proto::env;
use fleetbox_proto::{ByteSize, Limits, Millis, Reducer, Status};
use fleetbox_sandbox::RunRequest;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::State;
use crate::blobs::INLINE_LIMIT;
use crate::planner::ChildError;
use crate::reduce::{ReduceError, ShardValue, reduce};
use crate::store::{FoldOutcome, StoreError, backoff_ms, now_ms};

/// How long a claimed fold lasts without renewal; the folding coordinator renews it every
/// third of that, so a dead coordinator's fold is taken over within this much.
pub const FOLD_LEASE_MS: i64 = 6_000;
/// Folds tried before the job is `failed`.
pub const MAX_FOLD_TRIES: u32 = 3;

pub async fn run(state: Arc<State>, mut jobs: mpsc::UnboundedReceiver<String>) {
    while let Some(job) = jobs.recv().await {
        fold_job(&state, &job).await;
        state.job_may_have_ended(&job);
        state.planner_wake.notify_one();
        state
            .aggregating
            .lock()
            .expect("aggregating set")
            .remove(&job);
    }
}

/// Why one fold did not finish.
#[derive(Debug, thiserror::Error)]
enum FoldError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The reducer failed; the summary was already computed.
    #[error("{cause}")]
    Reduce {
        cause: ReduceFailed,
        summary: Box<JobSummary>,
    },
}

/// Why a job's values could not be folded into its result.
#[derive(Debug, thiserror::Error)]
enum ReduceFailed {
    #[error(transparent)]
    Builtin(#[from] ReduceError),
    #[error("encoding the values for the python reducer: {0}")]
    Encode(String),
    #[error("the reducer's sandbox thread failed: {0}")]
    Thread(String),
    #[error("could not open the `{backend}` sandbox: {why}")]
    Open {
        backend: fleetbox_sandbox::Backend,
        why: String,
    },
    #[error("python reducer: {0}")]
    Python(String),
    #[error("storing the result blob: {0}")]
    Blob(String),
}

/// Claim the job's fold (a leased step: one coordinator at a time), keep the claim alive while
/// folding, and on failure give it back with a back-off, or fail the job after
/// [`MAX_FOLD_TRIES`].
async fn fold_job(state: &Arc<State>, job_id: &str) {
    let owner = state.instance.as_str();
    let now = now_ms();
    let tries = match state
        .store
        .claim_fold(job_id, owner, now, now + FOLD_LEASE_MS)
        .await
    {
        Ok(Some(tries)) => tries,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(job_id, error = %e, "could not claim a fold");
            return;
        }
    };
    let renew = {
        let state = state.clone();
        let job_id = job_id.to_string();
        tokio::spawn(async move {
            let every = std::time::Duration::from_millis(FOLD_LEASE_MS as u64 / 3);
            loop {
                tokio::time::sleep(every).await;
                let until = now_ms() + FOLD_LEASE_MS;
                match state
                    .store
                    .renew_fold(&job_id, &state.instance, until)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(job_id, error = %e, "could not renew a fold"),
                }
            }
        })
    };
    let outcome = aggregate(state, job_id).await;
    renew.abort();
    let Err(error) = outcome else { return };
    let message = error.to_string();
    if tries < MAX_FOLD_TRIES {
        let after = now_ms() + backoff_ms(state.config.retry_backoff_ms, tries);
        tracing::warn!(job_id, tries, error = %message, "fold failed; it will be tried again");
        let why = format!("aggregation try {tries} of {MAX_FOLD_TRIES} failed: {message}");
        if let Err(e) = state.store.release_fold(job_id, owner, after, &why).await {
            tracing::error!(job_id, error = %e, "could not release a failed fold");
        }
        return;
    }
    tracing::error!(job_id, tries, error = %message, "fold failed for the last time: job failed");
    let summary = match error {
        FoldError::Reduce { summary, .. } => *summary,
        FoldError::Store(_) => JobSummary::default(),
    };
    let error = format!("aggregation failed after {tries} tries: {message}");
    let outcome = FoldOutcome {
        state: JobState::Failed,
        result: None,
        result_blob: None,
        summary: &summary,
        error: Some(&error),
        queue: Vec::new(),
    };
    if let Err(e) = state.store.finish_job(job_id, owner, &outcome).await {
        tracing::error!(job_id, error = %e, "could not fail a job");
    }
}

/// Failed shards a job's error and notes name (with why).
const NAMED_FAILURES: u32 = 10;

/// Whether enough shards succeeded for a job to complete: at least one, and at least the
/// share its spec needs (`1`: every shard, by default).
fn enough_succeeded(accepted: u64, total: u64, needed: f64) -> bool {
    accepted > 0 && accepted as f64 >= needed * total as f64 - 1e-9
}

/// "2 of 4 shards did not succeed (1 failed, 1 dead): shard 1: ZeroDivisionError ...".
fn shortfall(counts: &ShardCounts, total: u64, failures: &[(u64, String)]) -> String {
    let mut text = format!(
        "{} of {total} shards did not succeed ({} failed, {} dead)",
        total.saturating_sub(counts.accepted),
        counts.rejected,
        counts.dead
    );
    let named: Vec<String> = failures
        .iter()
        .map(|(i, why)| format!("shard {i}: {why}"))
        .collect();
    if !named.is_empty() {
        text.push_str(&format!("; {}", named.join("; ")));
    }
    let more = (counts.rejected + counts.dead).saturating_sub(failures.len() as u64);
    if more > 0 {
        text.push_str(&format!("; and {more} more (`fleetbox job ID --shards`)"));
    }
    text
}

/// Fold one claimed job: its values, its summary, result review, the reduce, and the job's
/// end, each a step below.
async fn aggregate(state: &State, job_id: &str) -> Result<(), FoldError> {
    let Some(job) = state.store.job_any_tenant(job_id).await? else {
        return Ok(());
    };
    let view = state
        .store
        .job_view(&job.tenant_id, job_id)
        .await?
        .ok_or(StoreError::Corrupt {
            what: "job",
            detail: format!("`{job_id}` vanished during aggregation"),
        })?;
    let counts = view.shards;
    let total = counts.total.max(job.shard_count);
    let values = collect_values(state, &job, job_id).await?;
    let mut summary = summarise(state, &job, job_id, &counts, total, values.notes).await?;
    let reviewed = review_results(state, &job.tenant_id, job_id, &values.own_numbers).await?;
    if send_anomalies_to_check(state, &job, job_id, &reviewed.anomalies).await? {
        return Ok(()); // the fold starts over once the server's checks settle
    }
    let mut outliers = outlier_flags(reviewed.anomalies.clone());
    summary.flags.extend(outliers.iter().cloned());
    if !summary.flags.is_empty() {
        summary.notes.push(format!(
            "verification flagged {} shard(s): see `flags`",
            summary.flags.len()
        ));
    }
    let failures = state.store.failure_reasons(job_id, NAMED_FAILURES).await?;
    if summary.partial {
        summary.notes.push(shortfall(&counts, total, &failures));
    }
    let (job_state_now, text, error) =
        match shortfall_error(&counts, total, job.success_needed, &failures) {
            Some(error) => (JobState::Failed, None, Some(error)),
            None => match fold(state, &job.reducer, &job.limits, job_id, values.values).await {
                Ok(v) => (JobState::Completed, Some(v), None),
                Err(cause) => {
                    return Err(FoldError::Reduce {
                        cause,
                        summary: Box::new(summary),
                    });
                }
            },
        };
    let blob = match store_large_result(state, &job.tenant_id, job_id, text.as_deref()).await {
        Ok(blob) => blob,
        Err(cause) => {
            return Err(FoldError::Reduce {
                cause,
                summary: Box::new(summary),
            });
        }
    };
    if job_state_now == JobState::Completed && state.config.llm.is_some() {
        let flag = model_review(state, &view.name, &mut summary, &outliers, text.as_deref()).await;
        outliers.extend(flag);
    }
    let anomalous = outliers.iter().any(JobFlag::is_anomaly);
    let job_state_now = if job_state_now == JobState::Completed
        && anomalous
        && state.config.anomalies == crate::AnomalyAction::Review
    {
        summary.notes.push(
            "result review found anomalies: the job waits for a person (`needs_review`)".into(),
        );
        JobState::NeedsReview
    } else {
        job_state_now
    };
    let outcome = FoldOutcome {
        state: job_state_now,
        result: if blob.is_some() {
            None
        } else {
            text.as_deref()
        },
        result_blob: blob.as_deref(),
        summary: &summary,
        error: error.as_deref(),
        queue: review_queue(&reviewed.sandbox_errors(), anomalous, &outliers),
    };
    let Some(queued) = state
        .store
        .finish_job(job_id, &state.instance, &outcome)
        .await?
    else {
        tracing::warn!(
            job_id,
            "lost the fold to another coordinator; its result stands"
        );
        return Ok(());
    };
    start_pending_reruns(state, &job.tenant_id, job_id).await;
    if anomalous && state.config.anomalies == crate::AnomalyAction::Rerun {
        let flag = *queued.last().expect("the anomaly entry was queued last");
        rerun_anomalies(state, &job.tenant_id, job_id, flag, &outliers).await;
    }
    tracing::info!(
        job_id,
        state = %job_state_now,
        accepted = counts.accepted,
        total,
        "job finished"
    );
    Ok(())
}

/// A job's accepted values, merged with its parent's for a `rerun_failed` child.
struct Values {
    values: Vec<ShardValue>,
    /// This job's own numbers by shard (result review reads them, before any merge).
    own_numbers: std::collections::HashMap<u64, f64>,
    /// What the summary says about values that could not be read, and the merge.
    notes: Vec<String>,
}

async fn collect_values(
    state: &State,
    job: &crate::store::JobRow,
    job_id: &str,
) -> Result<Values, FoldError> {
    let (mut values, mut notes) = shard_values(state, &job.tenant_id, job_id).await?;
    let own_numbers = values
        .iter()
        .filter_map(|(i, v)| Some((*i, v.as_f64()?)))
        .collect();
    if let Some(rerun) = &job.rerun_of {
        // A `rerun_failed` child: its shards stand in for the parent's failed ones, and its
        // result is the fold of the whole set.
        let redone = values.len();
        values = merge_with_parent(state, rerun, values, 0).await?;
        notes.push(format!(
            "re-ran {} failed shard(s) of {}: the result folds {} value(s) in all, {redone} of them re-run here",
            rerun.shards.len(),
            rerun.job_id,
            values.len()
        ));
    }
    Ok(Values {
        values,
        own_numbers,
        notes,
    })
}

/// The job's summary from its counters, attempts and verification, before result review.
async fn summarise(
    state: &State,
    job: &crate::store::JobRow,
    job_id: &str,
    counts: &ShardCounts,
    total: u64,
    notes: Vec<String>,
) -> Result<JobSummary, FoldError> {
    let facts = state.store.attempt_facts(&job.tenant_id, job_id).await?;
    let (verified, flags) = state.store.verification_facts(job_id).await?;
    Ok(JobSummary {
        shards_total: total,
        shards_accepted: counts.accepted,
        shards_failed: counts.rejected,
        shards_dead: counts.dead,
        success_rate: if total == 0 {
            0.0
        } else {
            counts.accepted as f64 / total as f64
        },
        partial: counts.accepted < total,
        attempts: facts.attempts,
        server_runs: facts.server_runs,
        reducer: job.reducer.name().to_string(),
        duration_ms: (now_ms() - job.created_at).max(0) as u64,
        shard_wall_ms: Stats::of(facts.chosen_wall_ms),
        shard_peak_memory_bytes: Stats::of(facts.chosen_peak_memory),
        bytes_produced: facts.bytes_out,
        notes,
        verified,
        flags,
    })
}

/// What result review read and found.
struct Reviewed {
    shards: Vec<fleetbox_review::results::ShardFacts>,
    /// Each shard's last status (the same order).
    statuses: Vec<Option<String>>,
    anomalies: Vec<fleetbox_review::results::Anomaly>,
}

impl Reviewed {
    /// Shards that ended in sandbox errors: the fleet, not the program, may be at fault.
    fn sandbox_errors(&self) -> Vec<&fleetbox_review::results::ShardFacts> {
        self.shards
            .iter()
            .zip(&self.statuses)
            .filter(|(f, s)| f.failed && s.as_deref() == Some(Status::SandboxError.as_str()))
            .map(|(f, _)| f)
            .collect()
    }
}

/// Result review: shards and agents that stand out from the rest of the job, and failures
/// that spike.
async fn review_results(
    state: &State,
    tenant: &str,
    job_id: &str,
    own_numbers: &std::collections::HashMap<u64, f64>,
) -> Result<Reviewed, FoldError> {
    let rows = state.store.result_facts(tenant, job_id).await?;
    let statuses = rows.iter().map(|f| f.status.clone()).collect();
    let shards: Vec<fleetbox_review::results::ShardFacts> = rows
        .into_iter()
        .map(|f| {
            let shard = f.shard_index.max(0) as u64;
            fleetbox_review::results::ShardFacts {
                shard,
                agent: f.agent_id.unwrap_or_else(|| "(none)".into()),
                failed: f.state != fleetbox_proto::TaskState::Accepted.as_str(),
                value: own_numbers.get(&shard).copied(),
                wall_ms: f.wall_ms.unwrap_or(0) as f64,
                cpu_ms: f.cpu_ms.unwrap_or(0) as f64,
                peak_memory: f.peak_memory.unwrap_or(0) as f64,
                output_bytes: f.bytes_out.unwrap_or(0) as f64,
            }
        })
        .collect();
    let anomalies = fleetbox_review::results::review(&shards, 20);
    Ok(Reviewed {
        shards,
        statuses,
        anomalies,
    })
}

/// `recheck = "on_anomaly"`: the shards that stand out go to the server before the fold
/// (those it already confirmed stay). Whether any went: the fold then waits for them.
async fn send_anomalies_to_check(
    state: &State,
    job: &crate::store::JobRow,
    job_id: &str,
    anomalies: &[fleetbox_review::results::Anomaly],
) -> Result<bool, FoldError> {
    if job.verify.recheck != fleetbox_proto::Recheck::OnAnomaly || anomalies.is_empty() {
        return Ok(false);
    }
    let shards: std::collections::BTreeSet<u64> = anomalies
        .iter()
        .flat_map(|a| a.shards.iter().copied())
        .collect();
    let shards: Vec<u64> = shards.into_iter().collect();
    let why: Vec<&str> = anomalies.iter().map(|a| a.explanation.as_str()).collect();
    let sent = state
        .store
        .recheck_anomalies(job_id, &state.instance, &shards, &why.join("; "))
        .await?;
    if sent > 0 {
        tracing::info!(
            job_id,
            shards = sent,
            "result review found anomalies: the server checks those shards before the fold"
        );
        state.checks.notify_one();
    }
    Ok(sent > 0)
}

/// Result review's anomalies as the summary's flags.
fn outlier_flags(anomalies: Vec<fleetbox_review::results::Anomaly>) -> Vec<JobFlag> {
    anomalies
        .into_iter()
        .map(|a| JobFlag {
            kind: a.kind.into(),
            shard: a.shards.first().copied().unwrap_or(0),
            detail: a.explanation,
            metric: Some(a.metric.into()),
            score: Some(a.score),
            shards: a.shards.into_iter().take(100).collect(),
            agents: a.agents,
        })
        .collect()
}

/// Why the job fails for want of successful shards, or `None`: it folds.
fn shortfall_error(
    counts: &ShardCounts,
    total: u64,
    success_needed: f64,
    failures: &[(u64, String)],
) -> Option<String> {
    if enough_succeeded(counts.accepted, total, success_needed) {
        return None;
    }
    let why = shortfall(counts, total, failures);
    let needed = if success_needed >= 1.0 {
        "every shard must succeed unless the spec says `allow_partial = true` or \
         `min_success_rate`"
            .to_string()
    } else {
        format!(
            "the spec needs {:.0}% of the shards to succeed",
            success_needed * 100.0
        )
    };
    let none = if counts.accepted == 0 {
        "no shard succeeded: "
    } else {
        ""
    };
    Some(format!("{none}{why}; {needed}"))
}

/// Large results go to the blob store; the row keeps its hash in `result_blob`.
async fn store_large_result(
    state: &State,
    tenant: &str,
    job_id: &str,
    text: Option<&str>,
) -> Result<Option<String>, ReduceFailed> {
    let Some(t) = text.filter(|t| t.len() > INLINE_LIMIT * 16) else {
        return Ok(None);
    };
    let blobs = state.blobs.clone();
    let bytes = t.as_bytes().to_vec();
    let owner = tenant.to_string();
    let hash = tokio::task::spawn_blocking(move || blobs.put(Some(&owner), &bytes))
        .await
        .map_err(|e| ReduceFailed::Blob(e.to_string()))?
        .map_err(|e| ReduceFailed::Blob(e.to_string()))?;
    state
        .store
        .own_blobs(tenant, job_id, &[(&hash, t.len() as u64)])
        .await
        .map_err(|e| ReduceFailed::Blob(e.to_string()))?;
    Ok(Some(hash))
}

/// With a model configured it is shown the summary, the statistics' findings and the start
/// of the result; "suspicious" adds a flag (it can add one, never clear one), returned too.
async fn model_review(
    state: &State,
    name: &str,
    summary: &mut JobSummary,
    outliers: &[JobFlag],
    text: Option<&str>,
) -> Option<JobFlag> {
    let reviewer = state.reviewer.clone();
    let metrics = crate::planner::summary_metrics(summary);
    let found: Vec<String> = outliers.iter().map(|f| f.detail.clone()).collect();
    let head: String = text.unwrap_or("null").chars().take(4096).collect();
    let name = name.to_string();
    let verdict = tokio::task::spawn_blocking(move || {
        reviewer.review_results(&fleetbox_review::ResultContext {
            job_name: &name,
            summary: &metrics,
            anomalies: &found,
            result_head: &head,
        })
    })
    .await
    .unwrap_or_else(|e| Err(format!("its thread failed: {e}")));
    match verdict {
        Ok(Some(v)) if v.suspicious => {
            let flag = JobFlag {
                kind: "model".into(),
                shard: 0,
                detail: format!(
                    "the model finds the results suspicious: {}",
                    v.reasons.join("; ")
                ),
                metric: None,
                score: None,
                shards: Vec::new(),
                agents: Vec::new(),
            };
            summary.flags.push(flag.clone());
            Some(flag)
        }
        Ok(_) => None,
        Err(why) => {
            summary
                .notes
                .push(format!("the model gave no verdict on the results: {why}"));
            None
        }
    }
}

/// What goes into the review queue, in the transaction that stores the result: a job is
/// never finished with its anomalies or sandbox errors unqueued. The anomaly entry is last.
fn review_queue(
    broken: &[&fleetbox_review::results::ShardFacts],
    anomalous: bool,
    outliers: &[JobFlag],
) -> Vec<(fleetbox_proto::FlagKind, Value)> {
    let mut queue = Vec::new();
    if !broken.is_empty() {
        let mut agents: Vec<&str> = broken.iter().map(|f| f.agent.as_str()).collect();
        agents.sort_unstable();
        agents.dedup();
        queue.push((
            fleetbox_proto::FlagKind::SandboxError,
            serde_json::json!({
                "shards": broken.iter().map(|f| f.shard).take(100).collect::<Vec<_>>(),
                "agents": agents,
                "detail": format!("{} shard(s) ended in sandbox errors", broken.len()),
            }),
        ));
    }
    if anomalous {
        // For a person to look at; the job's result stands, flagged.
        queue.push((
            fleetbox_proto::FlagKind::Anomaly,
            serde_json::json!({ "outliers": outliers }),
        ));
    }
    queue
}

/// Re-runs a person asked for while the job was held start now that it has finished.
async fn start_pending_reruns(state: &State, tenant: &str, job_id: &str) {
    let pending = match state.store.pending_reruns(job_id).await {
        Ok(pending) => pending,
        Err(e) => {
            tracing::error!(job_id, error = %e, "could not read pending re-runs");
            return;
        }
    };
    for (flag, details) in pending {
        let shards = crate::store::review::flag_shards(&details);
        match crate::planner::review_rerun(state, tenant, job_id, flag, &shards).await {
            Ok(child) => match state.store.attach_rerun(flag, &child).await {
                Ok(_) => state.work.notify_waiters(),
                Err(e) => {
                    tracing::error!(job_id, flag, error = %e, "could not start a flag's re-run")
                }
            },
            Err(ChildError::Store(e)) => {
                tracing::error!(job_id, flag, error = %e, "could not make a flag's re-run")
            }
            Err(why) => {
                tracing::warn!(job_id, flag, error = %why, "a flag's re-run cannot be made")
            }
        }
    }
}

/// `--anomalies rerun`: run the flagged shards of a finished job again at once (the flag
/// becomes `rerun`, by `server`).
async fn rerun_anomalies(state: &State, tenant: &str, job_id: &str, flag: i64, flags: &[JobFlag]) {
    let mut shards: Vec<u64> = flags
        .iter()
        .flat_map(|f| f.shards.iter().copied())
        .collect();
    shards.sort_unstable();
    shards.dedup();
    let made = match crate::planner::review_rerun(state, tenant, job_id, flag, &shards).await {
        Ok(child) => state
            .store
            .rerun_flag(tenant, flag, "server", Some("--anomalies rerun"), &child)
            .await
            .map(|_| child.id),
        Err(ChildError::Store(e)) => Err(e),
        Err(why) => {
            tracing::warn!(job_id, error = %why, "anomalies not re-run");
            return;
        }
    };
    match made {
        Ok(child) => {
            tracing::info!(job_id, child, "anomalous shards re-run");
            state.work.notify_waiters();
        }
        Err(e) => tracing::error!(job_id, error = %e, "could not re-run anomalous shards"),
    }
}

/// A job's accepted shard values (by shard index), and the shards whose blob could not be read.
async fn shard_values(
    state: &State,
    tenant: &str,
    job_id: &str,
) -> Result<(Vec<ShardValue>, Vec<String>), StoreError> {
    let mut values: Vec<ShardValue> = Vec::new();
    let mut unreadable = Vec::new();
    for v in state.store.accepted_values(tenant, job_id).await? {
        let text = match (&v.output, &v.output_blob) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(hash)) => match state.blobs.get(Some(tenant), hash) {
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
    Ok((values, unreadable))
}

/// The values job `job_id` stands for: its own, and through `rerun_failed` parents theirs,
/// indexed by the original job's shards.
fn merged_values<'a>(
    state: &'a State,
    job_id: &'a str,
    depth: u32,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<ShardValue>, StoreError>> + Send + 'a>> {
    Box::pin(async move {
        let Some(job) = state.store.job_any_tenant(job_id).await? else {
            return Ok(Vec::new());
        };
        let (own, _) = shard_values(state, &job.tenant_id, job_id).await?;
        match job.rerun_of {
            Some(rerun) if depth < fleetbox_proto::followup::MAX_DEPTH => {
                merge_with_parent(state, &rerun, own, depth).await
            }
            _ => Ok(own),
        }
    })
}

/// A `rerun_failed` child's values (`own`, by its shard index) put in place of its parent's
/// shards, over the parent's merged values.
async fn merge_with_parent(
    state: &State,
    rerun: &fleetbox_proto::RerunOf,
    own: Vec<ShardValue>,
    depth: u32,
) -> Result<Vec<ShardValue>, StoreError> {
    let mine: Vec<ShardValue> = own
        .into_iter()
        .filter_map(|(i, v)| rerun.shards.get(i as usize).map(|k| (*k, v)))
        .collect();
    let redone: std::collections::HashSet<u64> = mine.iter().map(|(k, _)| *k).collect();
    let mut all: Vec<ShardValue> = merged_values(state, &rerun.job_id, depth + 1)
        .await?
        .into_iter()
        .filter(|(k, _)| !redone.contains(k))
        .chain(mine)
        .collect();
    all.sort_by_key(|(k, _)| *k);
    Ok(all)
}

async fn fold(
    state: &State,
    reducer: &Reducer,
    limits: &Limits,
    job_id: &str,
    values: Vec<ShardValue>,
) -> Result<String, ReduceFailed> {
    let Reducer::Python { code } = reducer else {
        return Ok(reduce(reducer, &values)?);
    };
    let list = Value::Array(values.into_iter().map(|(_, v)| v).collect());
    let input = serde_json::to_vec(&list).map_err(|e| ReduceFailed::Encode(e.to_string()))?;
    let mut limits = limits.clone();
    // The coordinator's own sandbox never gets the network, whatever the job asked.
    limits.network = fleetbox_proto::Network::Off;
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
    .map_err(|e| ReduceFailed::Thread(e.to_string()))?
    .map_err(|e| ReduceFailed::Open {
        backend,
        why: e.to_string(),
    })?;
    if report.status != Status::Ok {
        return Err(ReduceFailed::Python(
            report.failure_reason().unwrap_or_default(),
        ));
    }
    Ok(report.output.unwrap_or(Value::Null).to_string())
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    fn counts(total: u64, accepted: u64, rejected: u64, dead: u64) -> ShardCounts {
        ShardCounts {
            total,
            accepted,
            rejected,
            dead,
            ..Default::default()
        }
    }

    #[test]
    fn a_shortfall_names_the_failures_and_what_the_spec_needs() {
        let failures = [(1, "ZeroDivisionError".to_string())];
        assert_eq!(shortfall_error(&counts(4, 4, 0, 0), 4, 1.0, &[]), None);
        let every = shortfall_error(&counts(4, 3, 1, 0), 4, 1.0, &failures).unwrap();
        assert!(
            every.starts_with(
                "1 of 4 shards did not succeed (1 failed, 0 dead); shard 1: ZeroDivisionError"
            ),
            "{every}"
        );
        assert!(every.contains("allow_partial = true"), "{every}");
        let share = shortfall_error(&counts(4, 2, 1, 1), 4, 0.9, &failures).unwrap();
        assert!(share.contains("needs 90% of the shards"), "{share}");
        assert!(share.contains("and 1 more"), "{share}");
        let none = shortfall_error(&counts(2, 0, 2, 0), 2, 0.5, &[]).unwrap();
        assert!(none.starts_with("no shard succeeded: "), "{none}");
        // Enough for the spec: it folds.
        assert_eq!(
            shortfall_error(&counts(4, 3, 1, 0), 4, 0.75, &failures),
            None
        );
    }

    fn facts(shard: u64, agent: &str) -> fleetbox_review::results::ShardFacts {
        fleetbox_review::results::ShardFacts {
            shard,
            agent: agent.into(),
            failed: true,
            value: None,
            wall_ms: 0.0,
            cpu_ms: 0.0,
            peak_memory: 0.0,
            output_bytes: 0.0,
        }
    }

    #[test]
    fn the_review_queue_gets_sandbox_errors_then_anomalies_last() {
        let (a, b, c) = (facts(0, "agt_b"), facts(3, "agt_a"), facts(5, "agt_b"));
        let outliers = outlier_flags(vec![fleetbox_review::results::Anomaly {
            kind: "outlier",
            metric: "value",
            score: 12.0,
            shards: vec![3],
            agents: vec!["agt_a".into()],
            explanation: "shard 3's value stands out".into(),
        }]);
        assert_eq!(outliers[0].shard, 3);
        assert!(outliers[0].is_anomaly());
        let queue = review_queue(&[&a, &b, &c], true, &outliers);
        assert_eq!(queue.len(), 2);
        assert_eq!(queue[0].0, "sandbox_error");
        assert_eq!(queue[0].1["shards"], serde_json::json!([0, 3, 5]));
        assert_eq!(queue[0].1["agents"], serde_json::json!(["agt_a", "agt_b"]));
        assert_eq!(queue[1].0, "anomaly", "the anomaly entry is last");
        assert!(review_queue(&[], false, &[]).is_empty());
        let verification = JobFlag {
            kind: "agent_result_invalid".into(),
            ..outliers[0].clone()
        };
        assert!(!verification.is_anomaly());
    }

    #[test]
    fn a_job_completes_only_with_the_share_its_spec_needs() {
        assert!(enough_succeeded(4, 4, 1.0));
        assert!(
            !enough_succeeded(3, 4, 1.0),
            "one failed shard fails the job"
        );
        assert!(enough_succeeded(3, 4, 0.75));
        assert!(!enough_succeeded(3, 4, 0.9));
        assert!(enough_succeeded(1, 4, 0.0), "allow_partial: any share");
        assert!(!enough_succeeded(0, 4, 0.0), "never with nothing");
        assert!(
            enough_succeeded(9, 10, 0.9),
            "no float rounding against the user"
        );
    }

    #[test]
    fn a_shortfall_names_the_failed_shards() {
        let counts = ShardCounts {
            total: 20,
            accepted: 8,
            rejected: 11,
            dead: 1,
            ..Default::default()
        };
        let text = shortfall(
            &counts,
            20,
            &[(3, "ZeroDivisionError: division by zero".into())],
        );
        assert_eq!(
            text,
            "12 of 20 shards did not succeed (11 failed, 1 dead); shard 3: ZeroDivisionError: \
             division by zero; and 11 more (`fleetbox job ID --shards`)"
        );
    }
}
