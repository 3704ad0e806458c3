//! Request and response bodies of the coordinator's HTTP API (`/v1`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{AgentState, ExecutionReport, JobState, Limits, Status, TaskState, Verdict};

/// The largest request body the coordinator takes (a job spec, a report batch, a blob).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;
/// The largest blob an agent may upload (`PUT /v1/agent/blobs/{sha256}`): an output stream or
/// `output.json` at the largest `limits.max_output`.
pub const MAX_BLOB_BYTES: usize = 1 << 30;

/// Every error the API returns: `{"error": {"code", "message", "trace_id"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`invalid_spec`, `not_found`, `unauthorized`, ...).
    pub code: String,
    pub message: String,
    pub trace_id: String,
    /// The field at fault, for validation errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Shard counts by state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardCounts {
    pub total: u64,
    pub queued: u64,
    pub leased: u64,
    /// Ran, waiting for the coordinator's re-check before they are accepted.
    #[serde(default)]
    pub reported: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub dead: u64,
}

impl ShardCounts {
    pub fn settled(&self) -> u64 {
        self.accepted + self.rejected + self.dead
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub state: JobState,
    pub priority: i32,
    pub max_attempts: u32,
    pub reducer: String,
    pub code_sha256: String,
    pub shards: ShardCounts,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    #[serde(default)]
    pub finished_at: Option<i64>,
    /// Why the job failed or was cancelled.
    #[serde(default)]
    pub error: Option<String>,
    /// Where a follow-up job came from (absent for a submitted job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<crate::Lineage>,
    /// Whether its follow-up rules are still to be evaluated (`false` once planned, and for
    /// jobs without rules).
    #[serde(default)]
    pub planning: bool,
    /// Paused by an operator: its queued shards wait (`POST /v1/jobs/{id}/resume`).
    #[serde(default)]
    pub paused: bool,
    /// The trace it belongs to (W3C trace id, 32 hex digits): in the coordinator's and the
    /// agents' spans and logs, and in its audit entries. Absent for jobs stored before traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// `GET /v1/jobs/{id}/chain`: a chain of follow-up jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobChain {
    pub root: String,
    /// The root first, then by depth and age; each with its `lineage`.
    pub jobs: Vec<JobView>,
    /// The `notify` webhooks the chain's rules queued.
    #[serde(default)]
    pub notifications: Vec<NotificationView>,
}

/// One `notify` webhook and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NotificationView {
    pub job_id: String,
    pub rule: String,
    pub url: String,
    /// `pending`, `delivered`, `failed`.
    pub state: String,
    pub tries: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// `GET /v1/jobs/{id}/result`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    pub id: String,
    pub state: JobState,
    /// The reduced value, as the coordinator's JSON text (exact: an integer sum past 2^64
    /// stays every digit of itself); `null` until the job is `completed` (or when nothing
    /// succeeded).
    #[schema(value_type = Option<serde_json::Value>)]
    pub result: Option<Box<serde_json::value::RawValue>>,
    pub summary: Option<JobSummary>,
    pub error: Option<String>,
    /// The summary under the stable names follow-up rules read (`summary.accepted`,
    /// `summary.duration_ms.p95`, ...; see `docs/SANDBOX_DISTRIBUTED.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Value>,
}

impl JobResult {
    /// The result as a [`Value`]. Integers past what `serde_json` holds (outside
    /// -2^63..2^64-1) become floats here; [`JobResult::result`] keeps the exact text.
    pub fn result_value(&self) -> Option<Value> {
        self.result
            .as_ref()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }
}

/// What the job's result covers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSummary {
    pub shards_total: u64,
    pub shards_accepted: u64,
    pub shards_failed: u64,
    pub shards_dead: u64,
    /// accepted / total.
    pub success_rate: f64,
    /// True when some shards did not contribute to the result.
    pub partial: bool,
    /// Executions by agents, including retries and late duplicates.
    pub attempts: u64,
    /// The coordinator's own re-runs that checked agents' results.
    #[serde(default)]
    pub server_runs: u64,
    pub reducer: String,
    /// Job wall time, submit to result.
    pub duration_ms: u64,
    /// Per-shard run time of the accepted attempts.
    pub shard_wall_ms: Stats,
    pub shard_peak_memory_bytes: Stats,
    /// stdout + stderr bytes produced by all attempts.
    pub bytes_produced: u64,
    /// Human sentence about partial results, failures, etc.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Accepted shards whose value a server re-run confirmed (the rest were taken on trust).
    #[serde(default)]
    pub verified: u64,
    /// What verification found: results that were wrong, programs that are not deterministic,
    /// shards the server could not check.
    #[serde(default)]
    pub flags: Vec<JobFlag>,
}

/// One thing verification flagged in a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobFlag {
    /// Verification: `agent_result_invalid`, `nondeterministic`, `unverified`; result
    /// review: `outlier`, `agent_outlier`, `error_rate`.
    pub kind: String,
    pub shard: u64,
    pub detail: String,
    /// Result review: what stood out (`value`, `wall_ms`, `cpu_ms`, `peak_memory`,
    /// `output_bytes`, `errors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Result review: how far out (a robust z-score; a failed share for `errors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Result review: the shards (at most 100) and agents involved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
}

impl JobFlag {
    /// Result review's kinds and the model's, which `--anomalies` acts on (verification's
    /// flags are settled by the checks themselves).
    pub fn is_anomaly(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "outlier" | "agent_outlier" | "error_rate" | "model"
        )
    }
}

/// Robust summary of a sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Stats {
    pub count: u64,
    pub min: f64,
    pub median: f64,
    pub mean: f64,
    pub p95: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(mut values: Vec<f64>) -> Stats {
        if values.is_empty() {
            return Stats::default();
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let n = values.len();
        let at = |q: f64| values[((n - 1) as f64 * q).round() as usize];
        Stats {
            count: n as u64,
            min: values[0],
            median: at(0.5),
            mean: values.iter().sum::<f64>() / n as f64,
            p95: at(0.95),
            max: values[n - 1],
        }
    }
}

/// One shard as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardView {
    pub index: u64,
    pub state: TaskState,
    pub attempts: u32,
    pub agent_id: Option<String>,
    /// Status of the attempt that settled it (or of the last attempt).
    pub status: Option<Status>,
    pub wall_ms: Option<u64>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardList {
    pub shards: Vec<ShardView>,
    /// `?from=` of the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// One execution of a shard (`GET /v1/jobs/{id}/shards/{index}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub lease_id: String,
    pub agent_id: String,
    pub attempt: u32,
    pub status: Status,
    /// `unchecked` until verification exists.
    pub verdict: Verdict,
    /// This attempt's value is the shard's value.
    pub chosen: bool,
    /// It arrived after its lease was lost or its shard settled.
    pub late: bool,
    pub received_at: i64,
    /// SHA-256 of the output as RFC 8785 canonical JSON, computed by the coordinator (the
    /// report's own `output_sha256` is the runner's claim).
    #[serde(default)]
    pub output_sha256: Option<String>,
    /// The full report; large streams are replaced by their blob hashes.
    pub report: Value,
    #[serde(default)]
    pub stdout_blob: Option<String>,
    #[serde(default)]
    pub stderr_blob: Option<String>,
}

/// `GET /v1/jobs/{id}/shards/{index}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardDetail {
    pub shard: ShardView,
    pub input: Value,
    pub attempts: Vec<AttemptView>,
}

/// `POST /v1/agents/enroll`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnrollRequest {
    pub name: String,
    /// The agent's ed25519 public key (hex): its reports must be signed with the private half.
    #[serde(default)]
    pub public_key: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub slots: u32,
    #[serde(default)]
    pub facts: MachineFacts,
    /// A certificate signing request (PEM) for the agent's TLS key: a coordinator with
    /// `--agent-mtls` needs one and answers with the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// What an agent tells the coordinator about its machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MachineFacts {
    pub hostname: String,
    pub cores: u32,
    pub memory_bytes: u64,
    pub python: String,
    pub os: String,
    pub arch: String,
    pub backend: String,
    pub version: String,
    /// Which machine (`/etc/machine-id`, or the agent's `--machine-id`): replicas of a shard
    /// go to agents on different machines when they can.
    #[serde(default)]
    pub machine_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnrollResponse {
    pub agent_id: String,
    /// Secret; shown once.
    pub agent_token: String,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    /// When the agent token stops working (ms): heartbeats renew it before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<i64>,
    /// The agent's client certificate (PEM), signed by the coordinator's CA for the request's
    /// key (`--agent-mtls`): present it on every call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
}

/// A client certificate the coordinator issued to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Certificate {
    pub pem: String,
    /// When it stops being valid (ms); a heartbeat past half its life asks for a new one.
    pub expires_at: i64,
}

/// `POST /v1/agent/lease`: up to `max_tasks`, waiting up to `wait_ms` when none is ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseRequest {
    pub max_tasks: u32,
    #[serde(default)]
    pub wait_ms: u64,
    /// The agent's sandbox backend: shards of jobs that ask for another are not leased to it
    /// (an agent that does not say gets only shards of jobs that ask for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Only server-only shards (code the review decided `run_on_server_only`), which only
    /// agents marked `hardened` are given: the coordinator's own server agents ask for these
    /// alone, so they never become ordinary workers on the coordinator's machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hardened_only: bool,
    /// Programs the agent holds, by SHA-256 (at most [`MAX_CACHED_CODE`], most recent first): a
    /// task running one of them comes with an empty `code`, which the agent fills from its
    /// cache. An agent that sends none gets every program in full.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached_code: Vec<String>,
    /// The agent keeps sessions (its backend can, and it has room for another): session calls
    /// may come to it. Calls of a session it opened come to it alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sessions: bool,
}

/// How many program hashes a lease request may name.
pub const MAX_CACHED_CODE: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseResponse {
    pub tasks: Vec<LeasedTask>,
}

/// `POST /v1/run`: one program run on the fleet as a one-shard job, answered when it is done.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"code": "print(6 * 7)", "wait_ms": 100}))]
pub struct RunBody {
    pub code: String,
    /// The program's input (`input.json`, `FLEETBOX_INPUT`); `null` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    #[serde(default)]
    pub limits: Limits,
    /// Files for the workspace: relative name → base64 content.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<crate::EnvironmentSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<crate::VerifySpec>,
    /// The job's name in listings (default `run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub priority: i32,
    /// How long to wait for the answer before `202` with the job id, in ms (default 60000, at
    /// most 600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// The sandbox backend to run in (`process`, `jail`): only agents started with it take
    /// the run. Any agent's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// One entry of the review queue (`GET /v1/review/flags`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReviewFlag {
    pub id: i64,
    pub job_id: String,
    /// What put the job in the queue (`code`: the code review held it).
    pub kind: crate::FlagKind,
    /// `open` until a person decides: `approved`, `rejected` or `rerun`.
    pub status: crate::FlagStatus,
    /// What was flagged (for `code`: the review's findings, risk and decision).
    pub details: Value,
    pub created_at: i64,
    #[serde(default)]
    pub decided_at: Option<i64>,
    #[serde(default)]
    pub decided_by: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
    /// Status `rerun`: the job that runs the flagged shards again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_job_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReviewFlagList {
    pub flags: Vec<ReviewFlag>,
}

/// `POST /v1/jobs/{id}/priority`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPriority {
    /// Higher is leased first.
    pub priority: i32,
}

/// `POST /v1/review/flags/{id}/approve|reject`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideFlag {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The answer to `POST /v1/run` (`200` when the job is final, `202` while it runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunAnswer {
    pub job_id: String,
    pub state: JobState,
    /// The report of the attempt whose result was chosen (else the last one), with its output
    /// and streams inline; `None` while the job runs or when nothing ran.
    #[serde(default)]
    pub report: Option<Value>,
    /// Why the job failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One shard handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeasedTask {
    /// Names this execution; the report must carry it.
    pub lease_id: String,
    pub task_id: i64,
    pub job_id: String,
    pub shard_index: u64,
    pub shard_count: u64,
    /// 1 for the first execution.
    pub attempt: u32,
    /// The program; empty when the agent said it holds `code_sha256` (`cached_code`).
    #[serde(default)]
    pub code: String,
    pub code_sha256: String,
    pub input: Value,
    pub limits: Limits,
    /// The job's `[environment]`, when it asks for packages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<crate::EnvironmentSpec>,
    /// Files for the workspace (name → base64), as the job attached them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
    /// Milliseconds since the epoch; heartbeats move it.
    pub lease_expires_at: i64,
    /// The job's W3C trace context: the agent's spans for this run join the job's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// A call in a session: run in the session's interpreter (opened by call 1), not alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<LeasedSession>,
}

/// The session a leased call belongs to, as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeasedSession {
    pub id: String,
    /// 1: open the session (its code is empty); later calls run in the interpreter call 1
    /// opened, on the agent that opened it.
    pub call: u64,
    /// The agent ends the session after this long without a call.
    pub idle_timeout_ms: u64,
    /// And after this long whatever happens.
    pub max_lifetime_ms: u64,
}

/// Sessions (`POST /v1/sessions`): how long one may sit idle and live, by default and at most.
pub const SESSION_IDLE_DEFAULT_MS: u64 = 10 * 60 * 1000;
pub const SESSION_LIFETIME_DEFAULT_MS: u64 = 60 * 60 * 1000;
pub const SESSION_LIFETIME_MAX_MS: u64 = 24 * 60 * 60 * 1000;

/// `POST /v1/sessions`: open a session (an interpreter on one agent, kept across calls).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"limits": {"memory": "512MiB", "timeout": "30s"}, "idle_timeout_ms": 600000}))]
pub struct SessionBody {
    /// `memory`, processes, disk and `network` hold for the whole session; `timeout` and
    /// `max_output` for each call (a call may ask for less or more time).
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<crate::EnvironmentSpec>,
    /// Ended after this long without a call (default 10 minutes, at most the lifetime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Ended after this long whatever happens (default 1 hour, at most 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_ms: Option<u64>,
    /// Its name in listings (default `session`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How long to wait for the session's interpreter to start (default 60 s, at most 600 s);
    /// past it the answer is `202` and the session opens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// `POST /v1/sessions/{id}/run`: one call in the session's interpreter.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"code": "x = 41"}))]
pub struct SessionCallBody {
    pub code: String,
    /// This call's time limit (default the session's `limits.timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How long to wait for the answer (default 60 s, at most 600 s); past it `202`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// A session as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionView {
    pub id: String,
    pub name: String,
    /// `opening` (its first call not done), `open`, `closed` (by `DELETE`, idle or lifetime)
    /// or `lost` (its agent or interpreter is gone).
    pub state: String,
    /// The agent holding the interpreter, once it opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub created_at: i64,
    pub last_used_at: i64,
    /// Calls made, the opening included.
    pub calls: u64,
    pub idle_timeout_ms: u64,
    pub max_lifetime_ms: u64,
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

/// `GET /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// The answer to a session call (and to opening one: call 1, with the opening's report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionAnswer {
    pub session: SessionView,
    pub call: u64,
    pub job_id: String,
    pub state: JobState,
    /// The call's report (`stdout`, `stderr`, `exception`, `files`, timings, `session`);
    /// `None` while it runs.
    #[serde(default)]
    pub report: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/agent/heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatRequest {
    /// Leases the agent is still working on.
    pub running: Vec<String>,
    #[serde(default)]
    pub load: AgentLoad,
    /// Sent in the first heartbeat after a (re)start: the machine may have changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<MachineFacts>,
    /// A certificate signing request for a new client certificate, sent when the agent's
    /// is past half its life (`--agent-mtls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    /// The sessions whose interpreters this agent holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentLoad {
    pub slots: u32,
    pub busy: u32,
    /// One-minute load average.
    pub loadavg: f64,
    /// Reports waiting in the outbox.
    pub outbox: u64,
    /// Reports the coordinator refused for good, set aside in the outbox since the agent started.
    #[serde(default)]
    pub set_aside: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    /// Leases that are no longer wanted (job cancelled, shard settled elsewhere).
    pub cancel: Vec<String>,
    pub lease_expires_at: i64,
    /// A new agent token, when the one used is past half its life: use it from now on (the
    /// old one keeps working for a lease's length, for calls already under way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_token: Option<String>,
    /// When the renewed token stops working (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<i64>,
    /// The new client certificate the heartbeat's `csr` asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
    /// Of the heartbeat's `sessions`, those that are no longer open (closed, expired, lost):
    /// end their interpreters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub close_sessions: Vec<String>,
}

/// `POST /v1/agent/reports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportBatch {
    pub reports: Vec<ShardReport>,
}

/// One execution's report, as an agent sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardReport {
    pub lease_id: String,
    pub task_id: i64,
    /// The lease's attempt number ([`LeasedTask::attempt`]): signed with the rest.
    #[serde(default)]
    pub attempt: u32,
    pub report: ExecutionReport,
    /// Parts of the report too large to travel inline, uploaded first as blobs; the
    /// matching field of `report` is then empty (streams) or absent (output).
    #[serde(default, skip_serializing_if = "ReportBlobs::is_empty")]
    pub blobs: ReportBlobs,
    /// The W3C trace context of the agent's run (in the job's trace, from
    /// [`LeasedTask::traceparent`]): the coordinator's span for the report descends from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The agent's ed25519 signature (hex) over [`ShardReport::signed_message`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Why a report's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the report is not signed")]
    Unsigned,
    #[error("the signature is not 64 bytes of hex")]
    Malformed,
    #[error("the signature does not verify with the agent's key")]
    Mismatch,
}

impl ShardReport {
    /// A report with every part inline, attempt 0 and unsigned.
    pub fn new(lease_id: impl Into<String>, task_id: i64, report: ExecutionReport) -> Self {
        ShardReport {
            lease_id: lease_id.into(),
            task_id,
            attempt: 0,
            report,
            blobs: ReportBlobs::default(),
            traceparent: None,
            signature: None,
        }
    }

    /// What an agent signs: a domain tag, then the RFC 8785 canonical JSON of the report
    /// without its signature, which holds the task id, the lease id and the attempt number,
    /// so a signature is good for this execution only.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(map) = value.as_object_mut() {
            map.remove("signature");
        }
        let mut out = b"fleetbox-report-v1\n".to_vec();
        crate::canonical::canonical_into(&value, &mut out);
        out
    }

    /// Sign with the agent's key (replacing any signature).
    pub fn sign(&mut self, key: &ed25519_dalek::SigningKey) {
        use ed25519_dalek::Signer;
        self.signature = None;
        let signature = key.sign(&self.signed_message());
        self.signature = Some(hex::encode(signature.to_bytes()));
    }

    /// Check the signature with the agent's registered key (strictly: no malleable or
    /// small-order forms).
    pub fn verify(&self, key: &ed25519_dalek::VerifyingKey) -> Result<(), SignatureError> {
        self.verify_message(key, &self.signed_message())
    }

    /// [`ShardReport::verify`] over its [`ShardReport::signed_message`] made already (the
    /// coordinator hashes the same bytes for the audit log).
    pub fn verify_message(
        &self,
        key: &ed25519_dalek::VerifyingKey,
        message: &[u8],
    ) -> Result<(), SignatureError> {
        let text = self.signature.as_deref().ok_or(SignatureError::Unsigned)?;
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| SignatureError::Malformed)?;
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        key.verify_strict(message, &signature)
            .map_err(|_| SignatureError::Mismatch)
    }
}

/// `POST /v1/agent/key`: replace the agent's key, signed with the key it replaces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RotateKeyRequest {
    /// The new ed25519 public key (hex).
    pub public_key: String,
    /// The old key's signature (hex) over [`RotateKeyRequest::message`].
    pub signature: String,
}

impl RotateKeyRequest {
    pub fn message(agent_id: &str, public_key: &str) -> Vec<u8> {
        format!("fleetbox-rotate-key-v1\n{agent_id}\n{public_key}\n").into_bytes()
    }
}

/// An agent's public key from its hex form, or why not.
pub fn parse_public_key(text: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes)
        .map_err(|_| "a public key is 32 bytes of hex".to_string())?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| "not an ed25519 public key".to_string())?;
    if key.is_weak() {
        return Err("a weak (small-order) ed25519 key".into());
    }
    Ok(key)
}

/// The sha256 of each part of a report uploaded ahead of it: the stream's bytes, or the
/// output value's JSON text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportBlobs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl ReportBlobs {
    pub fn is_empty(&self) -> bool {
        self.stdout.is_none() && self.stderr.is_none() && self.output.is_none()
    }

    /// Every hash named, for uploading or checking.
    pub fn hashes(&self) -> impl Iterator<Item = &str> {
        [&self.stdout, &self.stderr, &self.output]
            .into_iter()
            .filter_map(|h| h.as_deref())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportAck {
    pub results: Vec<ReportOutcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportOutcome {
    pub lease_id: String,
    /// `accepted` (settled or retried the shard), `late` (kept as an extra attempt),
    /// `duplicate` (already stored), `unknown` (no such lease: dropped).
    pub outcome: String,
}

/// `POST /v1/agent/return`: leases given back unrun (agent shutting down).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReturnRequest {
    pub lease_ids: Vec<String>,
    /// Sent once when an agent starts: every lease it holds except these (whose reports
    /// wait in its outbox) was lost with its previous run, and goes back to the queue now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_keeping: Option<Vec<String>>,
}

/// `GET /v1/agents`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub state: AgentState,
    pub labels: Vec<String>,
    pub slots: u32,
    pub facts: MachineFacts,
    pub load: AgentLoad,
    pub last_seen: i64,
    pub leases: u64,
    /// Invalid results since it was last released.
    #[serde(default)]
    pub strikes: u32,
    /// Why it is quarantined (no leases until an admin releases it), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// Its trust per interpreter and backend.
    #[serde(default)]
    pub trust: Vec<AgentTrust>,
    /// Marked to run server-only code (an operator's `fleetbox agents harden`, or the
    /// coordinator's own server agent); a label the agent gave itself is not a mark.
    #[serde(default)]
    pub hardened: bool,
}

/// An agent's record of results checked by the server, for one Python version and backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentTrust {
    pub python: String,
    pub backend: String,
    /// Valid results in a row; the agent is trusted (checked only by sample) from the
    /// coordinator's `--trusted-after` (250 by default).
    pub consecutive_valid: u64,
    pub valid: u64,
    pub invalid: u64,
    /// The share of its results the server re-checks under `adaptive`.
    pub recheck_rate: f64,
    /// Results it reported, and the share that were infrastructure failures (`sandbox_error`,
    /// `killed`); over 10% (after 20 results) it is not trusted.
    #[serde(default)]
    pub results: u64,
    #[serde(default)]
    pub error_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

/// One entry of the audit log (`GET /v1/audit`), with the hashes that chain it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub tenant_id: String,
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// `admin:<token id>`, `enroll:<token id>`, `agent:<id>`, `server`.
    pub actor: String,
    /// `job.submitted`, `shard.accepted`, ... (see `docs/SECURITY.md`, *The audit log*).
    pub action: String,
    pub job_id: Option<String>,
    pub task_id: Option<i64>,
    pub lease_id: Option<String>,
    pub agent_id: Option<String>,
    pub details: Value,
    /// `SHA-256(0x00 || canonical entry)`, hex.
    pub leaf: String,
    /// `SHA-256(0x01 || previous chain || leaf)`, hex.
    pub chain: String,
}

/// `GET /v1/audit`: entries oldest first; `next_after` pages on (`?after=`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditRecord>,
    pub next_after: Option<i64>,
}

/// `GET /v1/audit/verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditVerification {
    pub tenant_id: String,
    /// Entries checked.
    pub entries: u64,
    /// Where the chain's head says the log ends.
    pub head_seq: i64,
    pub ok: bool,
    /// The first entry found edited, deleted, inserted or reordered, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<AuditProblem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditProblem {
    pub seq: i64,
    pub what: String,
}

/// A signed checkpoint of a tenant's audit chain head (`GET /v1/audit/checkpoints`). The
/// signature is ed25519 over [`AuditCheckpoint::message`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditCheckpoint {
    pub tenant_id: String,
    pub seq: i64,
    /// The chain hash after entry `seq`, hex.
    pub chain: String,
    pub at: i64,
    /// The signing coordinator's ed25519 public key, hex.
    pub public_key: String,
    pub signature: String,
}

impl AuditCheckpoint {
    /// The bytes signed: a fixed prefix, then tenant, seq, chain and time, a line each.
    pub fn message(tenant_id: &str, seq: i64, chain: &str, at: i64) -> Vec<u8> {
        format!("fleetbox-audit-checkpoint-v1\n{tenant_id}\n{seq}\n{chain}\n{at}\n").into_bytes()
    }
}

/// A signed record that a tenant's audit entries up to `before_seq` were pruned (`POST
/// /v1/audit/prune`): a log that starts after entry 1 verifies only with one. The signature is
/// ed25519 over [`AuditPrune::message`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditPrune {
    pub tenant_id: String,
    pub before_seq: i64,
    pub at: i64,
    /// The pruning coordinator's ed25519 public key, hex.
    pub public_key: String,
    pub signature: String,
}

impl AuditPrune {
    /// The bytes signed: a fixed prefix, then tenant, the last entry removed and time.
    pub fn message(tenant_id: &str, before_seq: i64, at: i64) -> Vec<u8> {
        format!("fleetbox-audit-prune-v1\n{tenant_id}\n{before_seq}\n{at}\n").into_bytes()
    }
}

/// The keys a coordinator signs and believes audit checkpoints with (`GET /v1/audit/keys`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditKeys {
    /// This coordinator's ed25519 public key, hex: pin it where the database cannot reach.
    pub public_key: String,
    /// Every key whose checkpoints it accepts: its own and `--audit-trusted-keys`.
    pub trusted: Vec<String>,
}
