//! The planner: once a job is final, evaluate its `[[followup]]` rules and start what they
//! ask for — child jobs (with lineage), `rerun_failed` children, `notify` webhooks.
//!
//! A plan is recorded in one transaction guarded on the job's `planned` flag, and a child's id
//! derives from its parent and the rule's index: across crashes and several coordinators a
//! rule that matched makes its child once. Caps (depth, a chain's job budget, a tenant's rate)
//! stop runaway chains; hitting one is flagged and audited. Everything decided is audited.

mod deadline;
pub mod expr;
pub mod guard;
pub mod notify;

use std::sync::Arc;
use std::time::Duration;

use fleetbox_proto::api::JobSummary;
use fleetbox_proto::followup::{ChildSpec, FollowupRule};
use fleetbox_proto::{
    Decision, FollowupAction, JobSpec, Lineage, Recheck, RerunOf, ShardSpec, SpecError,
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::State;
use crate::ids::sha256_hex;
use crate::store::StoreError;
use crate::store::audit::{Action, Entry};
use crate::store::planner::{NewNotification, Plan, PlanFacts, PlanFlag};
use expr::{Rule, Vars};

/// Why a child job (a follow-up, a re-run) cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The store failed: nothing is wrong with the rule or the request.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("job `{0}` does not exist")]
    NoJob(String),
    #[error("the flag names no shard of its job to run again")]
    NoFlaggedShard,
    #[error("job `{0}` has no failed shard to run again")]
    NoFailedShard(String),
    #[error("the rule has no `then`")]
    NoThen,
    #[error("{0}")]
    Then(String),
    #[error("`input.items` gave an empty list: no child to run")]
    NoItems,
    #[error("`input.{field}` must give {want}, it gave {gave}")]
    InputShape {
        field: &'static str,
        want: &'static str,
        gave: Value,
    },
    #[error("`input.{field}`: {why}")]
    Input { field: &'static str, why: RuleError },
    #[error("the child's spec: {0}")]
    Spec(String),
    #[error("the child's code: {0}")]
    Code(String),
    #[error("the review's thread failed: {0}")]
    Thread(String),
    #[error("the code review rejected the child's code (risk {0})")]
    Rejected(u32),
    /// Its tenant is past a cap (shards or CPU of the day, blob bytes).
    #[error("{0}")]
    Capped(String),
}

/// Why a rule's expression gave no value.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error(transparent)]
    Check(#[from] expr::CheckError),
    #[error(transparent)]
    Eval(#[from] expr::EvalError),
}

/// The actor of everything the planner does.
pub const ACTOR: &str = "planner";

/// Limits on what follow-up rules may start.
#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// Off: rules are recorded as not evaluated (`FLEETBOX_FOLLOWUPS=0`,
    /// `DEMO_FOLLOWUP_ENABLED=0`).
    pub enabled: bool,
    /// The deepest a chain may grow (the root is 0), whatever a rule's `max_depth` says.
    pub max_depth: u32,
    /// Most jobs in one chain, the root included.
    pub chain_budget: u64,
    /// Most follow-up jobs a tenant gets per minute.
    pub rate_per_minute: u64,
    /// Tries of one webhook before it is `failed`.
    pub notify_tries: u32,
    /// First retry delay of a webhook; doubles per try (with jitter), capped at five minutes.
    pub notify_backoff_ms: u64,
    /// Hosts, addresses and ranges webhooks may reach though they are not public
    /// (`--notify-allow`; see `guard`).
    pub notify_allow: Vec<guard::Allowed>,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            enabled: true,
            max_depth: 10,
            chain_budget: 100,
            rate_per_minute: 120,
            notify_tries: 8,
            notify_backoff_ms: 1000,
            notify_allow: Vec::new(),
        }
    }
}

/// How often final jobs are looked for when nothing woke the planner (another coordinator's
/// folds, a restart after a crash).
const POLL: Duration = Duration::from_millis(500);

pub async fn run(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    loop {
        match state.store.jobs_to_plan(64).await {
            Ok(jobs) => {
                for id in jobs {
                    if let Err(e) = plan_job(&state, &id).await {
                        tracing::error!(job_id = %id, error = %e, "planning failed; it will be tried again");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "finding jobs to plan"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = state.planner_wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The id of the child rule `index` of `parent` makes: the same on every coordinator.
pub fn child_id(parent: &str, index: usize) -> String {
    let hash = sha256_hex(format!("{parent}/followup/{index}").as_bytes());
    format!("job_{}", &hash[..16])
}

/// The names rules read under `summary` (see `docs/SANDBOX_DISTRIBUTED.md`).
pub fn summary_metrics(s: &JobSummary) -> Value {
    json!({
        "shards": s.shards_total,
        "accepted": s.shards_accepted,
        "failed": s.shards_failed,
        "dead": s.shards_dead,
        "success_rate": s.success_rate,
        "partial": s.partial,
        "attempts": s.attempts,
        "verified": s.verified,
        "flags": s.flags.len(),
        "anomalies": s.flags.iter().filter(|f| matches!(f.kind.as_str(), "outlier" | "agent_outlier" | "error_rate")).count(),
        "job_ms": s.duration_ms,
        "duration_ms": {
            "p50": s.shard_wall_ms.median,
            "p95": s.shard_wall_ms.p95,
            "max": s.shard_wall_ms.max,
            "mean": s.shard_wall_ms.mean,
        },
        "peak_memory_bytes": {
            "p50": s.shard_peak_memory_bytes.median,
            "max": s.shard_peak_memory_bytes.max,
        },
    })
}

/// Check every rule's expressions (and those of inline child specs) at submission.
pub fn check_rules(rules: &[FollowupRule], field: &str) -> Result<(), SpecError> {
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let exprs = std::iter::once(("when".to_string(), &rule.when))
            .chain(rule.input.iter().map(|(k, v)| (format!("input.{k}"), v)));
        for (name, text) in exprs {
            Rule::compile(text)
                .map_err(|e| SpecError::new(format!("{at}.{name}"), e.to_string()))?;
        }
        if let Some(ChildSpec::Inline(spec)) = rule.child(&at)? {
            check_rules(&spec.followup, &format!("{at}.then.followup"))?;
        }
    }
    Ok(())
}

/// The codes of inline child specs, with the field each sits at (for the submission review).
pub fn child_codes(rules: &[FollowupRule], field: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{field}[{i}]");
        if let Ok(Some(ChildSpec::Inline(spec))) = rule.child(&at) {
            if let Some(code) = &spec.code {
                out.push((format!("{at}.then.code"), code.clone()));
            }
            out.extend(child_codes(&spec.followup, &format!("{at}.then.followup")));
        }
    }
    out
}

/// Evaluate job `id`'s rules and record what they decided (once: another coordinator may
/// have done it already).
pub async fn plan_job(state: &Arc<State>, id: &str) -> Result<(), StoreError> {
    let Some(facts) = state.store.plan_facts(id).await? else {
        return Ok(());
    };
    let mut plan = Plan::default();
    let spec: JobSpec = match crate::store::parse_json(&facts.spec, "job spec") {
        Ok(spec) => spec,
        Err(e) => {
            // Stored by another version, say: recorded once, not retried for ever.
            let error = format!("its rules cannot be read: {e}");
            plan.entries.push(
                Entry::new(&facts.tenant_id, ACTOR, Action::FollowupEvaluated)
                    .job(id)
                    .details(json!({ "error": error })),
            );
            plan.flags.push(PlanFlag {
                kind: fleetbox_proto::FlagKind::FollowupError,
                details: json!({ "error": error }),
            });
            state.store.commit_plan(id, &facts.tenant_id, plan).await?;
            return Ok(());
        }
    };
    if !state.config.planner.enabled {
        plan.entries.push(
            Entry::new(&facts.tenant_id, ACTOR, Action::FollowupEvaluated)
                .job(id)
                .details(json!({ "disabled": true, "rules": spec.followup.len(),
                    "why": "follow-ups are switched off (FLEETBOX_FOLLOWUPS=0 or DEMO_FOLLOWUP_ENABLED=0)" })),
        );
    } else {
        let mut planner = Planner::new(state, id, &facts, &spec).await?;
        for (i, rule) in spec.followup.iter().enumerate() {
            planner.rule(i, rule, &mut plan).await?;
        }
        if spec.ai_followup && !state.ai_templates.is_empty() {
            planner.ai(&mut plan).await?;
        }
    }
    let made = plan.children.len();
    if state.store.commit_plan(id, &facts.tenant_id, plan).await? {
        tracing::info!(job_id = id, children = made, "follow-up rules evaluated");
        if made > 0 {
            state.work.notify_waiters();
        }
        state.notify_wake.notify_one();
    }
    Ok(())
}

/// One job's planning: what its rules read, and the counts its caps use.
struct Planner<'a> {
    state: &'a Arc<State>,
    id: &'a str,
    facts: &'a PlanFacts,
    spec: &'a JobSpec,
    vars: Arc<Vars>,
    summary: Value,
    result: Value,
    root: String,
    chain_size: u64,
    recent: u64,
}

impl<'a> Planner<'a> {
    async fn new(
        state: &'a Arc<State>,
        id: &'a str,
        facts: &'a PlanFacts,
        spec: &'a JobSpec,
    ) -> Result<Planner<'a>, StoreError> {
        let (result, blob) = state
            .store
            .job_result(&facts.tenant_id, id)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                what: "job",
                detail: format!("`{id}` vanished while planning"),
            })?;
        let value = match (&result.result, blob) {
            (_, Some(hash)) => state
                .blobs
                .get(Some(&facts.tenant_id), &hash)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null),
            (Some(raw), None) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            (None, None) => Value::Null,
        };
        let summary = summary_metrics(&result.summary.unwrap_or_default());
        let job = json!({
            "id": id,
            "name": facts.name,
            "state": facts.state.as_str(),
            "depth": facts.depth,
        });
        let vars = Arc::new(Vars::new([
            ("summary", summary.clone()),
            ("result", value.clone()),
            ("job", job),
        ]));
        let root = facts.root_job_id.clone().unwrap_or_else(|| id.to_string());
        let chain_size = state.store.chain_size(&root).await?;
        let recent = state
            .store
            .followups_since(&facts.tenant_id, crate::store::now_ms() - 60_000)
            .await?;
        Ok(Planner {
            state,
            id,
            facts,
            spec,
            vars,
            summary,
            result: value,
            root,
            chain_size,
            recent,
        })
    }

    fn entry(&self, action: Action, details: Value) -> Entry {
        Entry::new(&self.facts.tenant_id, ACTOR, action)
            .job(self.id)
            .details(details)
    }

    async fn eval(&self, text: &str) -> Result<Value, RuleError> {
        let rule = Rule::compile(text)?;
        Ok(Arc::new(rule).evaluate(self.vars.clone()).await?)
    }

    async fn rule(
        &mut self,
        i: usize,
        rule: &FollowupRule,
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        let name = rule.display_name(i);
        let said = |extra: Value| said(i, &name, rule, extra);
        let matched = match self.eval(&rule.when).await {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("`when` must give true or false, it gave {other}")),
            Err(e) => Err(format!("`when`: {e}")),
        };
        let matched = match matched {
            Ok(m) => m,
            Err(error) => {
                plan.entries.push(self.entry(
                    Action::FollowupEvaluated,
                    said(json!({ "when": rule.when, "error": error })),
                ));
                plan.flags.push(PlanFlag {
                    kind: fleetbox_proto::FlagKind::FollowupError,
                    details: said(json!({ "error": error })),
                });
                return Ok(());
            }
        };
        plan.entries.push(self.entry(
            Action::FollowupEvaluated,
            said(json!({ "when": rule.when, "matched": matched })),
        ));
        if !matched {
            return Ok(());
        }
        self.fire(i, rule, &name, plan).await
    }

    /// Ask the AI planner for a follow-up from the coordinator's templates; the proposal is
    /// audited and made like a rule's child (same caps, same code review).
    async fn ai(&mut self, plan: &mut Plan) -> Result<(), StoreError> {
        let templates = &self.state.ai_templates;
        let offered: Vec<(String, String)> = templates
            .iter()
            .map(|(n, spec)| (n.clone(), spec.name.clone()))
            .collect();
        let reviewer = self.state.reviewer.clone();
        let (name, state, summary) = (
            self.facts.name.clone(),
            self.facts.state.as_str().to_string(),
            self.summary.clone(),
        );
        let asked = tokio::task::spawn_blocking(move || {
            reviewer.propose_followup(&fleetbox_review::FollowupContext {
                job_name: &name,
                state: &state,
                summary: &summary,
                templates: &offered,
            })
        })
        .await
        .unwrap_or_else(|e| Err(format!("the planner's thread failed: {e}")));
        let index = self.spec.followup.len();
        let proposal = match asked {
            Ok(Some(p)) => p,
            Ok(None) => {
                plan.entries.push(self.entry(
                    Action::FollowupEvaluated,
                    json!({ "ai": true, "rule": index, "matched": false, "proposal": null }),
                ));
                return Ok(());
            }
            Err(error) => {
                plan.entries.push(self.entry(
                    Action::FollowupEvaluated,
                    json!({ "ai": true, "rule": index, "error": error }),
                ));
                plan.flags.push(PlanFlag {
                    kind: fleetbox_proto::FlagKind::FollowupError,
                    details: json!({ "ai": true, "error": error }),
                });
                return Ok(());
            }
        };
        plan.entries.push(self.entry(
            Action::FollowupEvaluated,
            json!({ "ai": true, "rule": index, "matched": true,
                    "proposal": proposal.template, "reason": proposal.reason }),
        ));
        let Some((_, template)) = templates.iter().find(|(n, _)| *n == proposal.template) else {
            return Ok(());
        };
        let shardless = template.shards == ShardSpec::default();
        let rule = FollowupRule {
            name: Some(format!("ai:{}", proposal.template)),
            when: "true".into(),
            action: FollowupAction::Job,
            then: Some(serde_json::to_value(template).unwrap_or_default()),
            job_file: None,
            // A template without shards gets the parent's result as its one shard's input.
            input: if shardless {
                [("items".to_string(), "[result]".to_string())].into()
            } else {
                Default::default()
            },
            max_depth: None,
            url: None,
        };
        let name = rule.display_name(index);
        self.fire(index, &rule, &name, plan).await
    }

    /// Make what a rule that matched asks for, unless a cap stops it.
    async fn fire(
        &mut self,
        i: usize,
        rule: &FollowupRule,
        name: &str,
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        let said = |extra: Value| said(i, name, rule, extra);
        let depth = self.facts.depth.max(0) as u32 + 1;
        let max_depth = rule
            .max_depth
            .unwrap_or(self.state.config.planner.max_depth)
            .min(self.state.config.planner.max_depth);
        let made = plan.children.len() as u64;
        let cap = if depth > max_depth {
            Some((
                "depth",
                format!("the chain would reach depth {depth}, over its cap of {max_depth}"),
            ))
        } else if rule.action != FollowupAction::Notify
            && self.chain_size + made >= self.state.config.planner.chain_budget
        {
            Some((
                "chain_budget",
                format!(
                    "the chain rooted at {} has {} jobs, its budget",
                    self.root,
                    self.chain_size + made
                ),
            ))
        } else if rule.action != FollowupAction::Notify
            && self.recent + made >= self.state.config.planner.rate_per_minute
        {
            Some((
                "tenant_rate",
                format!(
                    "{} follow-up jobs in the last minute, the tenant's rate",
                    self.recent + made
                ),
            ))
        } else {
            None
        };
        if let Some((cap, why)) = cap {
            tracing::warn!(job_id = self.id, rule = %name, cap, "follow-up capped: {why}");
            plan.entries.push(self.entry(
                Action::FollowupCapped,
                said(json!({ "cap": cap, "why": why })),
            ));
            plan.flags.push(PlanFlag {
                kind: fleetbox_proto::FlagKind::FollowupCapped,
                details: said(json!({ "cap": cap, "why": why })),
            });
            return Ok(());
        }
        if rule.action == FollowupAction::Notify {
            let n = NewNotification {
                id: child_id(self.id, i).replacen("job_", "ntf_", 1),
                tenant_id: self.facts.tenant_id.clone(),
                job_id: self.id.to_string(),
                rule: name.to_string(),
                url: rule.url.clone().unwrap_or_default(),
                body: self.notification_body(name),
            };
            plan.entries.push(self.entry(
                Action::FollowupCreated,
                said(json!({ "notification": n.id, "url": n.url })),
            ));
            plan.notifications.push(n);
            return Ok(());
        }
        match self.child(i, rule, name, depth).await {
            Ok(Some(child)) => {
                plan.entries.push(self.entry(
                    Action::FollowupCreated,
                    said(
                        json!({ "child": child.id, "shards": child.inputs.len(), "depth": depth }),
                    ),
                ));
                plan.children.push(child);
            }
            Ok(None) => {
                plan.entries.push(self.entry(
                    Action::FollowupCreated,
                    said(json!({ "child": null, "why": "no failed or dead shards to run again" })),
                ));
            }
            Err(ChildError::Store(e)) => return Err(e),
            Err(why) => {
                let why = why.to_string();
                plan.entries
                    .push(self.entry(Action::FollowupFailed, said(json!({ "error": why }))));
                plan.flags.push(PlanFlag {
                    kind: fleetbox_proto::FlagKind::FollowupError,
                    details: said(json!({ "error": why })),
                });
            }
        }
        Ok(())
    }

    fn notification_body(&self, rule: &str) -> Value {
        let small = self.result.to_string().len() <= 64 * 1024;
        json!({
            "job_id": self.id,
            "name": self.facts.name,
            "state": self.facts.state.as_str(),
            "rule": rule,
            "summary": self.summary,
            "result": if small { self.result.clone() } else { Value::Null },
            "result_omitted": !small,
        })
    }

    /// The child job rule `i` makes, `None` when there is nothing to run, or why it cannot.
    async fn child(
        &self,
        i: usize,
        rule: &FollowupRule,
        name: &str,
        depth: u32,
    ) -> Result<Option<crate::store::NewJob>, ChildError> {
        let parent = self
            .state
            .store
            .job_any_tenant(self.id)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                what: "job",
                detail: format!("`{}` vanished while planning", self.id),
            })?;
        // The spec, and shard inputs taken as they are (the parent's own) when not built.
        let (mut spec, mut raw_inputs, rerun_of) = match rule.action {
            FollowupAction::RerunFailed => {
                let failed = self.state.store.shard_inputs(self.id, true).await?;
                if failed.is_empty() {
                    return Ok(None);
                }
                let rerun = RerunOf {
                    job_id: self.id.to_string(),
                    shards: failed.iter().map(|(k, _)| *k).collect(),
                };
                let mut spec = self.spec.clone();
                spec.files = parent.files.clone();
                let inputs: Vec<Value> = failed.into_iter().map(|(_, v)| v).collect();
                (spec, Some(inputs), Some(rerun))
            }
            _ => match rule.child("then") {
                Ok(Some(ChildSpec::SelfSpec)) => {
                    let mut spec = self.spec.clone();
                    spec.files = parent.files.clone();
                    let inputs = if rule.input.is_empty() {
                        let all = self.state.store.shard_inputs(self.id, false).await?;
                        Some(all.into_iter().map(|(_, v)| v).collect())
                    } else {
                        None
                    };
                    (spec, inputs, None)
                }
                Ok(Some(ChildSpec::Inline(spec))) => (*spec, None, None),
                Ok(None) => return Err(ChildError::NoThen),
                Err(e) => return Err(ChildError::Then(e.to_string())),
            },
        };
        if let Some(text) = rule.input.get("items") {
            match self.eval(text).await {
                Ok(Value::Array(items)) if items.is_empty() => return Err(ChildError::NoItems),
                Ok(Value::Array(items)) => {
                    spec.shards = ShardSpec {
                        items: Some(items),
                        per_shard: spec.shards.per_shard,
                        ..Default::default()
                    };
                    raw_inputs = None;
                }
                Ok(gave) => {
                    return Err(ChildError::InputShape {
                        field: "items",
                        want: "a list",
                        gave,
                    });
                }
                Err(why) => {
                    return Err(ChildError::Input {
                        field: "items",
                        why,
                    });
                }
            }
        }
        if let Some(text) = rule.input.get("count") {
            match self.eval(text).await {
                Ok(Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => {
                    spec.shards = ShardSpec {
                        count: n.as_u64(),
                        ..Default::default()
                    };
                    raw_inputs = None;
                }
                Ok(gave) => {
                    return Err(ChildError::InputShape {
                        field: "count",
                        want: "a positive int",
                        gave,
                    });
                }
                Err(why) => {
                    return Err(ChildError::Input {
                        field: "count",
                        why,
                    });
                }
            }
        }
        let child = Child {
            tenant: &self.facts.tenant_id,
            parent: self.id,
            root: &self.root,
            depth,
            index: i,
            rule: name,
            action: rule.action.as_str(),
        };
        build_child(self.state, &child, spec, raw_inputs, rerun_of)
            .await
            .map(Some)
    }
}

/// Where a child job sits in its chain.
pub struct Child<'a> {
    pub tenant: &'a str,
    pub parent: &'a str,
    pub root: &'a str,
    pub depth: u32,
    /// Its id derives from the parent and this (a rule's index, or a review flag's).
    pub index: usize,
    pub rule: &'a str,
    pub action: &'a str,
}

/// A child job from `spec` (its shards `raw_inputs` as they are when given), through the same
/// code review as a submission; why not, when it cannot be made.
pub async fn build_child(
    state: &State,
    child: &Child<'_>,
    mut spec: JobSpec,
    raw_inputs: Option<Vec<Value>>,
    rerun_of: Option<RerunOf>,
) -> Result<crate::store::NewJob, ChildError> {
    if let Some(inputs) = &raw_inputs {
        // Checked with a stand-in; the shards are the inputs as they were.
        spec.shards = ShardSpec {
            count: Some(inputs.len() as u64),
            ..Default::default()
        };
    }
    let mut job_plan = spec.plan().map_err(|e| ChildError::Spec(e.to_string()))?;
    if let Some(inputs) = raw_inputs {
        job_plan.inputs = inputs;
    }
    // A follow-up or re-run counts against its tenant's caps as a submission does.
    let shards = job_plan.inputs.len() as u64;
    if let Some(why) = crate::quota::over_caps(state, child.tenant, shards).await? {
        crate::quota::record_capped(state, child.tenant, ACTOR, &why).await;
        return Err(ChildError::Capped(why));
    }
    let reviewer = state.reviewer.clone();
    let code = job_plan.code.clone();
    let review = match tokio::task::spawn_blocking(move || reviewer.review_code(&code)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(ChildError::Code(e.to_string())),
        Err(e) => return Err(ChildError::Thread(e.to_string())),
    };
    match review.decision {
        Decision::Reject => return Err(ChildError::Rejected(review.risk)),
        // Server-only and held code go only to hardened agents and the coordinator's server
        // agents (`tasks.hardened`); held code waits for a person, then every shard is
        // re-checked.
        Decision::Hold => {
            spec.verify.get_or_insert_with(Default::default).recheck = Recheck::All;
        }
        Decision::RunOnServerOnly => {}
        Decision::Run => {}
    }
    // The parent's trace is set below.
    let mut job = crate::intake::new_job(
        &spec,
        job_plan,
        child.tenant.to_string(),
        ACTOR.to_string(),
        review,
        None,
    );
    job.id = child_id(child.parent, child.index);
    job.lineage = Some((
        Lineage {
            parent_job_id: child.parent.to_string(),
            root_job_id: child.root.to_string(),
            depth: child.depth,
            rule_index: child.index as u32,
            rule: child.rule.to_string(),
        },
        child.action.to_string(),
    ));
    job.rerun_of = rerun_of;
    // A follow-up is part of its parent's trace.
    if let Ok(parent) = state.job_info(child.parent).await {
        job.traceparent = parent.traceparent.clone();
    }
    Ok(job)
}

/// A review re-run: a child of `parent` running `shards` again with its code, every shard
/// checked by the coordinator's sandbox, its result folded over the parent's values.
pub async fn review_rerun(
    state: &State,
    tenant: &str,
    parent: &str,
    flag: i64,
    shards: &[u64],
) -> Result<crate::store::NewJob, ChildError> {
    let rule = format!("review:flag {flag}");
    let again = Again {
        shards: Shards::These(shards),
        // Past any rule's index: one re-run per flag.
        index: 10_000 + flag.max(0) as usize,
        rule: &rule,
        action: "review_rerun",
        check_all: true,
    };
    rerun_child(state, tenant, parent, again).await
}

/// An operator's re-run of finished job `parent`'s failed (rejected or dead) shards, the
/// `run`-th: a child with the parent's spec, its result folded over the parent's values.
pub async fn rerun_failed(
    state: &State,
    tenant: &str,
    parent: &str,
    run: usize,
) -> Result<crate::store::NewJob, ChildError> {
    let again = Again {
        shards: Shards::Failed,
        index: 20_000 + run,
        rule: "operator:rerun_failed",
        action: "rerun_failed",
        check_all: false,
    };
    rerun_child(state, tenant, parent, again).await
}

enum Shards<'a> {
    These(&'a [u64]),
    Failed,
}

/// What [`rerun_child`] runs again, and how the child is named.
struct Again<'a> {
    shards: Shards<'a>,
    index: usize,
    rule: &'a str,
    action: &'a str,
    /// Every shard checked by the coordinator's sandbox.
    check_all: bool,
}

async fn rerun_child(
    state: &State,
    tenant: &str,
    parent: &str,
    again: Again<'_>,
) -> Result<crate::store::NewJob, ChildError> {
    let Some(facts) = state.store.lineage_facts(tenant, parent).await? else {
        return Err(ChildError::NoJob(parent.to_string()));
    };
    let Some(row) = state.store.job_any_tenant(parent).await? else {
        return Err(ChildError::NoJob(parent.to_string()));
    };
    let mut spec: JobSpec = crate::store::parse_json(&facts.spec, "job spec")?;
    spec.followup.clear();
    spec.ai_followup = false;
    spec.files = row.files;
    if again.check_all {
        spec.verify.get_or_insert_with(Default::default).recheck = Recheck::All;
    }
    let picked: Vec<(u64, Value)> = match again.shards {
        Shards::These(these) => state
            .store
            .shard_inputs(parent, false)
            .await?
            .into_iter()
            .filter(|(k, _)| these.contains(k))
            .collect(),
        Shards::Failed => state.store.shard_inputs(parent, true).await?,
    };
    if picked.is_empty() {
        return Err(match again.shards {
            Shards::These(_) => ChildError::NoFlaggedShard,
            Shards::Failed => ChildError::NoFailedShard(parent.to_string()),
        });
    }
    let rerun = RerunOf {
        job_id: parent.to_string(),
        shards: picked.iter().map(|(k, _)| *k).collect(),
    };
    let root = facts.root_job_id.unwrap_or_else(|| parent.to_string());
    let child = Child {
        tenant,
        parent,
        root: &root,
        depth: facts.depth.max(0) as u32 + 1,
        index: again.index,
        rule: again.rule,
        action: again.action,
    };
    let inputs = picked.into_iter().map(|(_, v)| v).collect();
    build_child(state, &child, spec, Some(inputs), Some(rerun)).await
}

/// An audit entry's details about rule `i`: which rule, and `extra`.
fn said(i: usize, name: &str, rule: &FollowupRule, extra: Value) -> Value {
    let mut d = json!({ "rule": i, "name": name, "action": rule.action.as_str() });
    if let (Some(d), Value::Object(extra)) = (d.as_object_mut(), extra) {
        d.extend(extra);
    }
    d
}

/// The AI planner's templates: every `*.toml` job spec in `dir` (its `code_file` read relative
/// to it), named by file stem, checked as a submission would be.
pub fn load_templates(dir: &std::path::Path) -> Result<Vec<(String, JobSpec)>, TemplateError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| TemplateError::Dir(e.to_string()))?;
    let mut paths: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| TemplateError::At {
                path: path.clone(),
                why: "not a UTF-8 name".into(),
            })?
            .to_string();
        let at = |why: String| TemplateError::At {
            path: path.clone(),
            why,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| at(e.to_string()))?;
        let mut spec = JobSpec::from_toml(&text).map_err(|e| at(e.to_string()))?;
        if spec.code.is_none()
            && let Some(file) = spec.code_file.take()
        {
            spec.code = Some(
                std::fs::read_to_string(dir.join(&file))
                    .map_err(|e| at(format!("`code_file` {file}: {e}")))?,
            );
        }
        let mut check = spec.clone();
        if check.shards == ShardSpec::default() {
            check.shards.items = Some(vec![Value::Null]);
        }
        check.plan().map_err(|e| at(e.to_string()))?;
        out.push((name, spec));
    }
    if out.is_empty() {
        return Err(TemplateError::Empty);
    }
    Ok(out)
}

/// Why the AI planner's template directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{0}")]
    Dir(String),
    #[error("`{}`: {why}", path.display())]
    At {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("holds no `*.toml` job spec")]
    Empty,
}
