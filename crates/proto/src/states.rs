//! The states of jobs, tasks (shards), attempts and agents, as types.
//!
//! The wire names (DESIGN.md) are the contract shared by the API, the store's columns, the CLI,
//! metrics and docs: each enum serializes to them, parses them back, and is the only place they
//! are spelled. The store binds `as_str()`; nothing else writes a state as a literal.

use serde::{Deserialize, Serialize};

/// A state name that is not one of the enum's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{name}` (expected one of {expected})")]
pub struct UnknownState {
    pub kind: &'static str,
    pub name: String,
    pub expected: String,
}

macro_rules! states {
    ($(#[$meta:meta])* $name:ident, $kind:literal { $($(#[$vmeta:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownState {
                        kind: $kind,
                        name: s.to_string(),
                        expected: [$($wire),+].join(", "),
                    }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownState;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }
    };
}

states! {
    /// Where a job is (DESIGN.md): `pending_review` → `running` → `aggregating` → a final state.
    JobState, "job state" {
        /// Held for a code review before any shard is dispatched.
        PendingReview = "pending_review",
        /// Shards are being run.
        Running = "running",
        /// Every shard settled; a coordinator folds the accepted values.
        Aggregating = "aggregating",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
        /// The result waits for a person's decision.
        NeedsReview = "needs_review",
    }
}

states! {
    /// Where a review flag is: `open` until a person decides it.
    FlagStatus, "flag status" {
        Open = "open",
        Approved = "approved",
        Rejected = "rejected",
        /// Its shards run again in a new job.
        Rerun = "rerun",
    }
}

states! {
    /// What put a job in the review queue.
    FlagKind, "flag kind" {
        /// The code review held the job before it ran.
        Code = "code",
        /// A shard hit a sandbox violation.
        Violation = "violation",
        /// The coordinator's re-run disagreed with the agent's result.
        Mismatch = "mismatch",
        /// A re-check could not say (nondeterministic, unverifiable, machine-dependent).
        Inconclusive = "inconclusive",
        /// Shards ended in sandbox errors.
        SandboxError = "sandbox_error",
        /// Result review found values that stand out.
        Anomaly = "anomaly",
        /// A follow-up rule failed to make its child.
        FollowupError = "followup_error",
        /// A follow-up rule hit a cap (depth, budget, rate).
        FollowupCapped = "followup_capped",
        /// A webhook could not be delivered.
        NotifyFailed = "notify_failed",
    }
}

impl PartialEq<&str> for FlagKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<&str> for FlagStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl JobState {
    /// States a job never leaves.
    pub const FINAL: [JobState; 3] = [JobState::Completed, JobState::Failed, JobState::Cancelled];

    pub fn is_final(self) -> bool {
        JobState::FINAL.contains(&self)
    }
}

states! {
    /// Where one shard is (DESIGN.md). Every change goes through the store's settle module.
    TaskState, "task state" {
        /// Waiting for an agent (not before its back-off).
        Queued = "queued",
        /// An agent holds it under a lease.
        Leased = "leased",
        /// A report arrived and waits for verification.
        Reported = "reported",
        /// Its value is the shard's value.
        Accepted = "accepted",
        /// The program failed on its own: final.
        Rejected = "rejected",
        /// Out of attempts, or its job was cancelled: final.
        Dead = "dead",
    }
}

impl TaskState {
    /// States a shard never leaves.
    pub const SETTLED: [TaskState; 3] = [TaskState::Accepted, TaskState::Rejected, TaskState::Dead];
    /// States that still keep the job from folding.
    pub const UNSETTLED: [TaskState; 3] =
        [TaskState::Queued, TaskState::Leased, TaskState::Reported];

    pub fn is_settled(self) -> bool {
        TaskState::SETTLED.contains(&self)
    }
}

states! {
    /// What verification decided about one attempt.
    Verdict, "verdict" {
        /// Not (yet) checked against anything.
        Unchecked = "unchecked",
        Valid = "valid",
        Invalid = "invalid",
        /// Checked, but nothing could decide.
        Inconclusive = "inconclusive",
    }
}

states! {
    /// Whether an agent is heard from.
    AgentState, "agent state" {
        Online = "online",
        /// Silent past the agent timeout: its leases were taken back.
        Lost = "lost",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_through_serde_and_from_str() {
        for s in JobState::ALL {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), *s);
        }
        for s in TaskState::ALL {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), *s);
        }
        for s in Verdict::ALL {
            assert_eq!(s.as_str().parse::<Verdict>().unwrap(), *s);
        }
        for s in AgentState::ALL {
            assert_eq!(s.as_str().parse::<AgentState>().unwrap(), *s);
        }
    }

    #[test]
    fn unknown_names_say_what_would_do() {
        let err = "finished".parse::<JobState>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown job state `finished` (expected one of pending_review, running, aggregating, \
             completed, failed, cancelled, needs_review)"
        );
    }

    #[test]
    fn settled_and_unsettled_cover_every_task_state() {
        for s in TaskState::ALL {
            assert_ne!(
                TaskState::SETTLED.contains(s),
                TaskState::UNSETTLED.contains(s)
            );
        }
    }
}
