//! What the AI-control review says about a program before it runs.

use serde::{Deserialize, Serialize};

/// How bad a finding is; its weight in the risk score.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn weight(self) -> u32 {
        match self {
            Severity::Low => 5,
            Severity::Medium => 15,
            Severity::High => 40,
            Severity::Critical => 80,
        }
    }
}

/// What happens to a job given its review.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Dispatched as usual.
    Run,
    /// Dispatched, and every shard re-checked by the coordinator's own sandbox.
    RunOnServerOnly,
    /// Kept until a person approves it.
    Hold,
    /// Not accepted.
    Reject,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Run => "run",
            Decision::RunOnServerOnly => "run_on_server_only",
            Decision::Hold => "hold",
            Decision::Reject => "reject",
        }
    }
}

/// One thing a rule matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Finding {
    pub rule: String,
    pub severity: Severity,
    /// 1-based.
    pub line: u32,
    pub column: u32,
    /// What the rule is about.
    pub message: String,
    /// The source line (trimmed, at most 200 bytes).
    pub snippet: String,
}

/// A review of one program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CodeReview {
    pub findings: Vec<Finding>,
    /// 0–100: the weights of the rules that fired (each rule once), capped.
    pub risk: u32,
    pub decision: Decision,
    /// Which reviewer decided (`builtin`, `llm:<model>`).
    pub reviewer: String,
}
