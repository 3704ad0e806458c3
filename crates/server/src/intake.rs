//! Intake: a validated, reviewed and planned spec becomes the job the store keeps.

use fleetbox_proto::JobSpec;

use crate::ids::{job_id, sha256_hex};
use crate::store::NewJob;

/// A validated spec as a job to store; `plan.inputs` are its shards' inputs.
pub fn new_job(
    spec: &JobSpec,
    plan: fleetbox_proto::JobPlan,
    tenant_id: String,
    actor: String,
    review: fleetbox_proto::CodeReview,
    traceparent: Option<String>,
) -> NewJob {
    NewJob {
        id: job_id(),
        tenant_id,
        name: spec.name.trim().to_string(),
        // The spec is kept without the (possibly large) uploaded text; the shards have it.
        spec: {
            let mut s = spec.clone();
            s.shards.text = None;
            s.shards.items = None;
            s.files.clear();
            serde_json::to_value(&s).unwrap_or_default()
        },
        code_sha256: sha256_hex(plan.code.as_bytes()),
        code: plan.code,
        limits: spec.limits.clone(),
        reducer: plan.reducer,
        priority: spec.priority,
        max_attempts: spec.max_attempts,
        success_needed: spec.success_needed(),
        verify: spec.verify.clone().unwrap_or_default(),
        environment: spec.environment.clone(),
        files: spec.files.clone(),
        backend: spec.backend.clone(),
        pool: spec.pool.clone(),
        review: Some(review),
        inputs: plan.inputs,
        actor,
        has_rules: !spec.followup.is_empty() || spec.ai_followup,
        lineage: None,
        rerun_of: None,
        // The trace of the request that makes it (a follow-up takes its parent's).
        traceparent,
        session: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored spec drops the uploaded items (the shards hold them); the code is hashed; a
    /// spec with follow-up rules says so; the trace is the one handed in.
    #[test]
    fn a_planned_spec_becomes_the_job_the_store_keeps() {
        let spec = JobSpec::from_toml(
            "name = \" squares \"\ncode = \"print(1)\"\n[shards]\nitems = [1, 2, 3]\nper_shard = 1\n[[followup]]\nwhen = \"true\"\nthen = { name = \"next\", code = \"print(2)\", shards = { count = 1 } }\n",
        )
        .unwrap();
        let plan = spec.plan().unwrap();
        let job = new_job(
            &spec,
            plan,
            "t1".into(),
            "admin:x".into(),
            fleetbox_proto::CodeReview {
                findings: Vec::new(),
                risk: 0,
                decision: fleetbox_proto::Decision::Run,
                reviewer: "builtin".into(),
            },
            Some("00-aa-bb-01".into()),
        );
        assert_eq!(job.name, "squares");
        assert_eq!(job.inputs.len(), 3);
        assert!(
            job.spec["shards"].get("items").is_none_or(|v| v.is_null()),
            "{}",
            job.spec
        );
        assert_eq!(job.code_sha256, sha256_hex(b"print(1)"));
        assert!(job.has_rules);
        assert_eq!(job.traceparent.as_deref(), Some("00-aa-bb-01"));
        assert!(job.id.starts_with("job_"));
    }
}
