//! What follows a batch of agent reports once the store has settled them: the reports it
//! dropped audited, the agents' metrics, the trace spans, and the loops woken (leases for
//! re-queued shards, the checker, the folds, the re-checks after a quarantine).

use std::sync::Arc;

use fleetbox_proto::Status;
use fleetbox_proto::api::ReportOutcome;
use fleetbox_proto::trace::TraceParent;

use crate::State;
use crate::store::audit::{Action, Entry};
use crate::store::{ReportInput, Reported, SettleOutcome};

/// Follow up on `inputs`, settled as `reported` says; each report's outcome for the agent.
/// `traces` are the agents' run spans, one per report.
pub(crate) async fn follow(
    state: &Arc<State>,
    tenant: &str,
    agent: &str,
    inputs: &[ReportInput],
    traces: &[Option<String>],
    reported: Reported,
) -> Vec<ReportOutcome> {
    let Reported {
        outcomes,
        ready,
        quarantined,
        held,
    } = reported;
    audit_unknown(state, tenant, agent, inputs, &outcomes).await;
    record(state, agent, inputs, &outcomes, traces);
    // A shard back in the queue (the fleet failed it, or an agent refused it) may go to a
    // waiting agent now.
    if inputs.iter().any(|i| {
        matches!(
            i.status,
            Status::SandboxError | Status::Killed | Status::Refused
        )
    }) {
        state.work.notify_waiters();
    }
    for job in held {
        tracing::warn!(job = %job, agent, "sandbox violation: the job's remaining shards wait for review");
    }
    if outcomes.contains(&SettleOutcome::Accepted) {
        // Some may be held for a server re-check (successes and failures alike).
        state.checks.notify_one();
    }
    for job in ready {
        state.aggregate(job);
    }
    // Agents a quorum outvoted to their strike limit: what they did goes under review.
    for liar in quarantined {
        if let Err(e) = crate::checker::after_quarantine(state, &liar).await {
            tracing::error!(agent = %liar, error = %e, "could not re-check a quarantined agent's results");
        }
    }
    inputs
        .iter()
        .zip(&outcomes)
        .map(|(i, o)| ReportOutcome {
            lease_id: i.lease_id.clone(),
            outcome: o.as_str().to_string(),
        })
        .collect()
}

/// Reports for leases this agent does not hold: nothing of them was stored; what was tried
/// is kept in the audit log.
async fn audit_unknown(
    state: &State,
    tenant: &str,
    agent: &str,
    inputs: &[ReportInput],
    outcomes: &[SettleOutcome],
) {
    let unknown: Vec<_> = inputs
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| **o == SettleOutcome::Unknown)
        .map(|(i, _)| {
            tracing::warn!(agent, lease = %i.lease_id, "report for a lease this agent does not hold: dropped");
            serde_json::json!([i.lease_id, i.task_id, i.attempt])
        })
        .collect();
    if unknown.is_empty() {
        return;
    }
    let entry = Entry::new(tenant, format!("agent:{agent}"), Action::ReportRefused)
        .agent(agent)
        .details(serde_json::json!({
            "code": "unknown_lease",
            "why": "no open lease of this agent for this task and attempt",
            "reports": unknown,
        }));
    if let Err(e) = state.store.audit(vec![entry]).await {
        tracing::error!(error = %e, "could not record refused reports");
    }
}

/// The agent's runs in the metrics, and a span per report in its job's trace.
fn record(
    state: &State,
    agent: &str,
    inputs: &[ReportInput],
    outcomes: &[SettleOutcome],
    traces: &[Option<String>],
) {
    for ((i, o), trace) in inputs.iter().zip(outcomes).zip(traces) {
        if *o != SettleOutcome::Unknown {
            state
                .metrics
                .agent_ran(agent, i.status == Status::Ok, i.wall_ms.max(0) as u64);
        }
        if let Some(parent) = trace.as_deref().and_then(TraceParent::parse) {
            let span = tracing::info_span!("shard.reported", lease = %i.lease_id,
                task = i.task_id, attempt = i.attempt, status = i.status.as_str(),
                outcome = o.as_str());
            fleetbox_proto::trace::enter(&span, &parent);
        }
    }
}
