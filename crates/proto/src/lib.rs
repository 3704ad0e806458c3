//! The data that crosses Fleetbox process boundaries.
//!
//! Everything here is plain data with serde derives: the [`ExecutionReport`] that every sandbox run
//! returns, the [`Limits`] a run is held to, and the human-readable units ([`ByteSize`], [`Millis`])
//! accepted by every flag, config file and job spec. This crate does no I/O.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod api;
pub mod canonical;
pub mod egress;
pub mod env;
pub mod environment;
pub mod followup;
pub mod job;
mod limits;
pub mod prometheus;
mod report;
pub mod review;
mod schema;
mod states;
pub mod tenancy;
pub mod trace;
mod units;
mod verify;

pub use egress::{EgressConnection, EgressRule, Network};
pub use environment::{EnvironmentInfo, EnvironmentSpec, Package};
pub use followup::{FollowupAction, FollowupRule, Lineage, RerunOf};
pub use job::{AggregateSpec, JobPlan, JobSpec, Reducer, ShardSpec, SpecError};
pub use limits::{AppliedLimits, Enforcement, Limits};
pub use report::{
    ExceptionInfo, ExecutionReport, FileEntry, Frame, MAX_EGRESS_LISTED, Runner, SessionCall,
    SessionOutcome, Status, StreamCapture, Violation,
};
pub use review::{CodeReview, Decision, Finding, Severity};
pub use states::{AgentState, FlagKind, FlagStatus, JobState, TaskState, UnknownState, Verdict};
pub use units::{ByteSize, Millis, UnitError};
pub use verify::{Compare, Outcome, ROUNDING, Recheck, VerifySpec, rounding_only};
