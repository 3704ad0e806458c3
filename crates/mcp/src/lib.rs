//! Fleetbox as a Model Context Protocol server.
//!
//! Tools for an AI agent: run a Python program on the fleet (`run_python`, with the images and
//! files it wrote), submit and follow sharded jobs, and resources for a job's result and a
//! shard's report. Every call goes through the coordinator's HTTP API with the caller's token,
//! so the same validation, limits, verification and audit apply as to any client. The server
//! keeps no state between calls (every call names its job), so it serves both the stateless
//! 2026-07-28 revision and clients of the handshake era (2025-11-25 and earlier).
//!
//! Two transports: stdio ([`serve_stdio`], `fleetbox mcp`, a desktop client launches it) and
//! Streamable HTTP ([`http_service`], mounted at `/mcp` by `fleetbox server --mcp`).

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use fleetbox_client::{Client, ClientError};
use fleetbox_proto::api::RunBody;
use fleetbox_proto::{JobSpec, Millis};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::schema_for_type;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, ErrorData, Implementation, ListResourceTemplatesResult,
    PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    Resource, ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig,
};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Files a program wrote that come back inline: images as image content, other files up to
/// this size as embedded resources; larger ones as links (`fleetbox://blobs/{sha256}`).
const INLINE_IMAGE_MAX: u64 = 4 << 20;
const INLINE_FILE_MAX: u64 = 64 << 10;

/// Where the coordinator is and whose token calls it.
#[derive(Clone)]
enum Caller {
    /// One client for every call (stdio: the token is the process's).
    Fixed(Client),
    /// The token each HTTP request carries (`Authorization: Bearer`), against this base URL.
    PerRequest(String),
}

/// The MCP server.
#[derive(Clone)]
pub struct FleetboxMcp {
    caller: Caller,
    tool_router: ToolRouter<Self>,
}

/// `run_python`'s input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunPython {
    /// The Python 3 program. Its standard output is the answer; it may also write
    /// `output.json`.
    pub code: String,
    /// Optional JSON input, readable at `os.environ["FLEETBOX_INPUT"]` (a file path).
    #[serde(default)]
    pub input: Option<Value>,
    /// Seconds the program may run (default 30).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Files put in the program's working directory first: relative name → text content.
    #[serde(default)]
    pub files: Option<BTreeMap<String, String>>,
    /// Python packages to install for this run (e.g. `["numpy", "sympy==1.12"]`). Beyond the
    /// standard library, only what the fleet's agents happen to have is importable without
    /// asking (often numpy, pandas, scipy and matplotlib on hosts that run the jail; none in a
    /// container image built without them): list every package the code imports to be sure.
    #[serde(default)]
    pub requirements: Option<Vec<String>>,
    /// Hosts the program may reach over the network, through the fleet's egress proxy:
    /// names (`pypi.org`), subdomains (`*.pythonhosted.org`), each with an optional port
    /// (`api.example.com:443`); addresses are not accepted. Agents run it only when their
    /// operator allows those hosts, else the status is `refused`. Without it: no network.
    #[serde(default)]
    pub allow_hosts: Option<Vec<String>>,
}

/// What a run produced.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunOutput {
    /// `ok`, `error` (an exception or non-zero exit), `timeout`, `memory_limit`,
    /// `output_limit`, `killed`, `sandbox_violation`, `sandbox_error` or `refused`.
    pub status: String,
    pub stdout: String,
    pub stderr: String,
    /// `output.json` if written, else stdout parsed as JSON, else stdout as text.
    pub output: Option<Value>,
    /// The exception: `type`, `message` and `traceback` frames.
    pub exception: Option<Value>,
    pub exit_code: Option<i64>,
    pub wall_ms: u64,
    pub peak_memory_bytes: u64,
    /// Files the program wrote in its working directory.
    pub files: Vec<FileOut>,
    /// The job this run was (for `job_status` and the shard's full report).
    pub job_id: String,
    /// With `allow_hosts`: every connection through the egress proxy (`host`, `port`,
    /// `allowed`, and the address reached or why it was refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Value>,
    /// A session call: its number and whether the interpreter lives on (`kept`), or ended
    /// (`ended`, `lost`: open a new session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Value>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FileOut {
    pub path: String,
    pub bytes: u64,
    /// Its content at `fleetbox://blobs/{sha256}`.
    pub sha256: Option<String>,
}

/// `session_open`'s input.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct SessionOpen {
    /// Seconds each call may run (default 30; a call may ask for another).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Memory the whole session may use, in MiB (default 256): names kept between calls count.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Minutes the session may sit idle before it is closed (default 10).
    #[serde(default)]
    pub idle_minutes: Option<f64>,
    /// Python packages to install for the session (as `run_python`'s `requirements`).
    #[serde(default)]
    pub requirements: Option<Vec<String>>,
    /// Hosts the session may reach (as `run_python`'s `allow_hosts`).
    #[serde(default)]
    pub allow_hosts: Option<Vec<String>>,
}

/// `session_run`'s input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SessionRun {
    /// The session's id (`ses_...`), as `session_open` returned it.
    pub session_id: String,
    /// Python code to run in the session's interpreter: names defined by earlier calls are
    /// there, and names it defines stay for later calls.
    pub code: String,
    /// Seconds this call may run (default the session's); past it the call is interrupted
    /// (KeyboardInterrupt) and the session lives on.
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// A session handle.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SessionId {
    /// The session's id (`ses_...`).
    pub session_id: String,
}

/// A session.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SessionOut {
    pub session_id: String,
    /// `opening`, `open`, `closed` or `lost`.
    pub state: String,
    pub calls: u64,
    /// Why it ended, when it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

fn session_out(v: fleetbox_proto::api::SessionView) -> SessionOut {
    SessionOut {
        session_id: v.id,
        state: v.state,
        calls: v.calls,
        end_reason: v.end_reason,
    }
}

/// `timeout` in seconds as milliseconds, or why it is not one.
fn seconds(timeout: Option<f64>, default: f64) -> Result<Millis, CallToolResult> {
    let s = timeout.unwrap_or(default);
    if s > 0.0 && s <= 3600.0 {
        Ok(Millis((s * 1000.0) as u64))
    } else {
        Err(invalid("`timeout` must be between 0 and 3600 seconds"))
    }
}

/// The environment `requirements` asks for, if any.
fn environment(requirements: Option<Vec<String>>) -> Option<fleetbox_proto::EnvironmentSpec> {
    requirements
        .filter(|r| !r.is_empty())
        .map(|requirements| fleetbox_proto::EnvironmentSpec {
            requirements,
            requirements_file: None,
        })
}

/// Host rules from `allow_hosts`.
fn egress(hosts: Option<Vec<String>>) -> Result<Option<fleetbox_proto::Network>, CallToolResult> {
    let Some(hosts) = hosts.filter(|h| !h.is_empty()) else {
        return Ok(None);
    };
    hosts
        .iter()
        .map(|h| fleetbox_proto::EgressRule::parse(h))
        .collect::<Result<Vec<_>, _>>()
        .map(|rules| Some(fleetbox_proto::Network::Allow(rules)))
        .map_err(|why| invalid(format!("`allow_hosts`: {why}")))
}

/// A job handle.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct JobId {
    /// The job's id (`job_...`), as `submit_job` or `run_python` returned it.
    pub id: String,
}

/// `submit_job`'s input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SubmitJob {
    /// A Fleetbox job spec as JSON: `name`, `code` (Python reading its shard from
    /// `FLEETBOX_INPUT`), `shards` (one of `range: {start, end, count}`, `items` + `per_shard`,
    /// `count`), optional `aggregate` (`collect`, `sum`, `concat`, `merge`, ...), `limits`,
    /// `environment: {requirements}`.
    pub spec: Value,
}

/// `review_code`'s input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReviewCode {
    /// The Python program to review.
    pub code: String,
}

/// What the review found.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReviewOut {
    /// `run`, `run_on_server_only` (every shard re-checked), `hold` or `reject`.
    pub decision: String,
    /// 0–100.
    pub risk: u32,
    /// Each: `rule`, `severity`, `line`, `column`, `message`, `snippet`.
    pub findings: Vec<Value>,
}

/// `list_jobs`' input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListJobs {
    /// Only jobs in this state: `running`, `aggregating`, `completed`, `failed`, `cancelled`,
    /// `needs_review`.
    #[serde(default)]
    pub state: Option<String>,
}

/// A job as the coordinator sees it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct JobOut {
    pub id: String,
    pub name: String,
    pub state: String,
    /// Shard counts by state: `total`, `queued`, `leased`, `reported`, `accepted`, `rejected`,
    /// `dead`.
    pub shards: Value,
    pub error: Option<String>,
}

/// A job's outcome.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ResultOut {
    pub id: String,
    pub state: String,
    /// The folded result, once the job completed.
    pub result: Option<Value>,
    pub error: Option<String>,
    /// Shards, timings, failures, what verification checked.
    pub summary: Option<Value>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct JobsOut {
    pub jobs: Vec<JobOut>,
}

fn job_out(v: fleetbox_proto::api::JobView) -> JobOut {
    JobOut {
        id: v.id,
        name: v.name,
        state: v.state.to_string(),
        shards: serde_json::to_value(&v.shards).unwrap_or(Value::Null),
        error: v.error,
    }
}

/// An API error as a tool error: the model reads the typed message.
fn tool_error(e: &ClientError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(e.to_string())])
}

fn structured<T: Serialize>(value: &T, text: String, is_error: bool) -> CallToolResult {
    let mut r = if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    r.structured_content = serde_json::to_value(value).ok();
    r
}

fn invalid(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

#[tool_router]
impl FleetboxMcp {
    /// For stdio: every call with this client.
    pub fn with_client(client: Client) -> Self {
        FleetboxMcp {
            caller: Caller::Fixed(client),
            tool_router: Self::tool_router(),
        }
    }

    /// For HTTP: every call with the token of the request it came in, to `base`.
    pub fn per_request(base: impl Into<String>) -> Self {
        FleetboxMcp {
            caller: Caller::PerRequest(base.into()),
            tool_router: Self::tool_router(),
        }
    }

    fn client(&self, ctx: &RequestContext<RoleServer>) -> Result<Client, ErrorData> {
        match &self.caller {
            Caller::Fixed(c) => Ok(c.clone()),
            Caller::PerRequest(base) => {
                let token = ctx
                    .extensions
                    .get::<http::request::Parts>()
                    .and_then(|p| p.headers.get("authorization"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        ErrorData::invalid_request("no bearer token on the request", None)
                    })?;
                Ok(Client::new(base, token.trim()))
            }
        }
    }

    /// Run a Python 3 program in a sandbox on the Fleetbox fleet and return what it printed,
    /// its output value, the exception with its traceback if it raised, its status and
    /// timings, and the files it wrote: images (PNG, SVG) come back as images, other small
    /// files as embedded resources, large ones as links. The sandbox has no network (unless
    /// `allow_hosts` names hosts the fleet allows) and hard limits (default 30 s, 256 MiB). Packages beyond the standard library are there only if
    /// listed in `requirements` (or if the agents' Python happens to have them): list numpy,
    /// pandas, matplotlib and the like when the code imports them (matplotlib draws to files:
    /// `plt.savefig("chart.png")`).
    #[tool(output_schema = schema_for_type::<RunOutput>())]
    async fn run_python(
        &self,
        Parameters(p): Parameters<RunPython>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        let mut body = RunBody {
            code: p.code,
            input: p.input,
            wait_ms: Some(600_000),
            ..Default::default()
        };
        body.limits.timeout = match seconds(p.timeout, 30.0) {
            Ok(t) => t,
            Err(e) => return Ok(e),
        };
        body.limits.cpu_time = body.limits.timeout;
        if let Some(files) = p.files {
            let files: Vec<(String, Vec<u8>)> = files
                .into_iter()
                .map(|(n, t)| (n, t.into_bytes()))
                .collect();
            body.files = fleetbox_proto::job::encode_files(&files);
        }
        match egress(p.allow_hosts) {
            Ok(Some(network)) => body.limits.network = network,
            Ok(None) => {}
            Err(e) => return Ok(e),
        }
        body.environment = environment(p.requirements);
        let answer = match client.run(&body).await {
            Ok(a) => a,
            Err(e) => return Ok(tool_error(&e)),
        };
        let Some(report) = answer.report else {
            return Ok(invalid(format!(
                "job {} is `{}` without a report: {}",
                answer.job_id,
                answer.state,
                answer.error.unwrap_or_else(|| "still running".into())
            )));
        };
        Ok(run_result(&client, &report, answer.job_id).await)
    }

    /// Open a Python session on the fleet: one interpreter kept between calls, so variables,
    /// imports and functions defined by one `session_run` exist in the next (like a notebook).
    /// It runs in a sandbox with the same hard limits as `run_python` (memory for the whole
    /// session), and is closed after `idle_minutes` without a call. Close it with
    /// `session_close` when done.
    #[tool(output_schema = schema_for_type::<SessionOut>())]
    async fn session_open(
        &self,
        Parameters(p): Parameters<SessionOpen>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        let mut body = fleetbox_proto::api::SessionBody {
            wait_ms: Some(600_000),
            ..Default::default()
        };
        body.limits.timeout = match seconds(p.timeout, 30.0) {
            Ok(t) => t,
            Err(e) => return Ok(e),
        };
        if let Some(mib) = p.memory_mib {
            body.limits.memory = fleetbox_proto::ByteSize::mib(mib);
        }
        if let Some(minutes) = p.idle_minutes {
            if !(minutes > 0.0 && minutes <= 24.0 * 60.0) {
                return Ok(invalid("`idle_minutes` must be between 0 and 1440"));
            }
            body.idle_timeout_ms = Some((minutes * 60_000.0) as u64);
            body.max_lifetime_ms = Some(
                ((minutes * 60_000.0) as u64).max(fleetbox_proto::api::SESSION_LIFETIME_DEFAULT_MS),
            );
        }
        match egress(p.allow_hosts) {
            Ok(Some(network)) => body.limits.network = network,
            Ok(None) => {}
            Err(e) => return Ok(e),
        }
        body.environment = environment(p.requirements);
        Ok(match client.open_session(&body).await {
            Ok(a) => {
                let is_error = a.session.state != "open";
                let out = session_out(a.session);
                let mut text = format!("session {} is {}", out.session_id, out.state);
                if let Some(why) = out.end_reason.as_deref().or(a.error.as_deref()) {
                    text.push_str(&format!(": {why}"));
                }
                structured(&out, text, is_error)
            }
            Err(e) => tool_error(&e),
        })
    }

    /// Run Python code in an open session's interpreter and return what it printed, its
    /// value, the exception with its traceback, timings and the files it wrote, as
    /// `run_python` does. Names from earlier calls are defined; names this call defines stay.
    /// A call past its timeout is interrupted and the session lives on; if the session is
    /// gone (closed, idle too long, its machine lost) the error says `session_lost`: open a
    /// new one.
    #[tool(output_schema = schema_for_type::<RunOutput>())]
    async fn session_run(
        &self,
        Parameters(p): Parameters<SessionRun>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        let timeout = match p.timeout.map(|t| seconds(Some(t), t)).transpose() {
            Ok(t) => t,
            Err(e) => return Ok(e),
        };
        let body = fleetbox_proto::api::SessionCallBody {
            code: p.code,
            timeout_ms: timeout.map(|t| t.0),
            wait_ms: Some(600_000),
        };
        let answer = match client.session_run(&p.session_id, &body).await {
            Ok(a) => a,
            Err(e) => return Ok(tool_error(&e)),
        };
        let Some(report) = answer.report else {
            return Ok(invalid(format!(
                "call {} of session {} is `{}` without a report: {}",
                answer.call,
                p.session_id,
                answer.state,
                answer.error.unwrap_or_else(|| "still running".into())
            )));
        };
        Ok(run_result(&client, &report, answer.job_id).await)
    }

    /// Close a session: its interpreter and everything it held are gone.
    #[tool(output_schema = schema_for_type::<SessionOut>())]
    async fn session_close(
        &self,
        Parameters(p): Parameters<SessionId>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        Ok(match client.close_session(&p.session_id).await {
            Ok(v) => {
                let out = session_out(v);
                let text = format!("session {} is {}", out.session_id, out.state);
                structured(&out, text, false)
            }
            Err(e) => tool_error(&e),
        })
    }

    /// Submit a sharded job to the fleet: the program runs once per shard, in parallel on
    /// many machines, and the shard results are folded into one. Returns the job; follow it
    /// with `job_status` and read it with `job_result`.
    #[tool(output_schema = schema_for_type::<JobOut>())]
    async fn submit_job(
        &self,
        Parameters(p): Parameters<SubmitJob>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        let spec = match JobSpec::from_json(p.spec.to_string().as_bytes()) {
            Ok(s) => s,
            Err(e) => return Ok(invalid(format!("invalid_spec: {e}"))),
        };
        Ok(match client.submit(&spec).await {
            Ok(v) => {
                let out = job_out(v);
                let text = format!("submitted {} ({}): {}", out.id, out.name, out.state);
                structured(&out, text, false)
            }
            Err(e) => tool_error(&e),
        })
    }

    /// A job's state and its shard counts.
    #[tool(output_schema = schema_for_type::<JobOut>())]
    async fn job_status(
        &self,
        Parameters(p): Parameters<JobId>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        Ok(match client.job(&p.id).await {
            Ok(v) => {
                let out = job_out(v);
                let text = format!("{} is {}: {}", out.id, out.state, out.shards);
                structured(&out, text, false)
            }
            Err(e) => tool_error(&e),
        })
    }

    /// A job's folded result (once it completed), its error if it failed, and its summary.
    #[tool(output_schema = schema_for_type::<ResultOut>())]
    async fn job_result(
        &self,
        Parameters(p): Parameters<JobId>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        Ok(match client.result(&p.id).await {
            Ok(r) => {
                let out = ResultOut {
                    id: r.id,
                    state: r.state.to_string(),
                    result: r
                        .result
                        .as_ref()
                        .and_then(|raw| serde_json::from_str(raw.get()).ok()),
                    error: r.error,
                    summary: r
                        .summary
                        .as_ref()
                        .and_then(|s| serde_json::to_value(s).ok()),
                };
                let text = match &out.result {
                    Some(v) => format!("{} {}: {v}", out.id, out.state),
                    None => format!(
                        "{} {}{}",
                        out.id,
                        out.state,
                        out.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                };
                structured(&out, text, false)
            }
            Err(e) => tool_error(&e),
        })
    }

    /// Cancel a job: its unfinished shards stop.
    #[tool(output_schema = schema_for_type::<JobOut>())]
    async fn cancel_job(
        &self,
        Parameters(p): Parameters<JobId>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        Ok(match client.cancel(&p.id).await {
            Ok(v) => {
                let out = job_out(v);
                let text = format!("{} is {}", out.id, out.state);
                structured(&out, text, false)
            }
            Err(e) => tool_error(&e),
        })
    }

    /// Review a Python program the way the fleet reviews every submission, without running
    /// it: the risky things it does (process spawning, network, native code, dynamic
    /// exec/imports, writes outside its directory, secrets, fork loops, obfuscation), each with
    /// its line, and the decision the fleet would take (`run`, `run_on_server_only`, `hold`,
    /// `reject`). A syntax error comes back as a tool error with its line and column.
    #[tool(output_schema = schema_for_type::<ReviewOut>())]
    async fn review_code(
        &self,
        Parameters(p): Parameters<ReviewCode>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        Ok(match client.review(&p.code).await {
            Ok(r) => {
                let out = ReviewOut {
                    decision: r.decision.as_str().to_string(),
                    risk: r.risk,
                    findings: r
                        .findings
                        .iter()
                        .filter_map(|f| serde_json::to_value(f).ok())
                        .collect(),
                };
                let mut text = format!("decision: {} (risk {})", out.decision, out.risk);
                for f in &r.findings {
                    text.push_str(&format!(
                        "\nline {}: {} ({:?}): {}",
                        f.line, f.rule, f.severity, f.message
                    ));
                }
                structured(&out, text, false)
            }
            Err(e) => tool_error(&e),
        })
    }

    /// The newest jobs (at most 100), optionally only those in one state.
    #[tool(output_schema = schema_for_type::<JobsOut>())]
    async fn list_jobs(
        &self,
        Parameters(p): Parameters<ListJobs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = self.client(&ctx)?;
        Ok(match client.jobs(p.state.as_deref(), 100).await {
            Ok(list) => {
                let out = JobsOut {
                    jobs: list.jobs.into_iter().map(job_out).collect(),
                };
                let text = out
                    .jobs
                    .iter()
                    .map(|j| format!("{} {} {}", j.id, j.state, j.name))
                    .collect::<Vec<_>>()
                    .join("\n");
                structured(&out, text, false)
            }
            Err(e) => tool_error(&e),
        })
    }
}

/// A run's (or a session call's) report as the tool's answer: the structured output, a text
/// summary, and the files it wrote (images inline, small files embedded, large ones linked).
async fn run_result(client: &Client, report: &Value, job_id: String) -> CallToolResult {
    let text = |k: &str| report[k].as_str().unwrap_or_default().to_string();
    let files: Vec<FileOut> = report["files"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .map(|f| FileOut {
                    path: f["path"].as_str().unwrap_or_default().to_string(),
                    bytes: f["bytes"].as_u64().unwrap_or(0),
                    sha256: f["sha256"].as_str().map(String::from),
                })
                .collect()
        })
        .unwrap_or_default();
    let out = RunOutput {
        status: text("status"),
        stdout: text("stdout"),
        stderr: text("stderr"),
        output: report.get("output").cloned().filter(|v| !v.is_null()),
        exception: report.get("exception").cloned().filter(|v| !v.is_null()),
        exit_code: report["exit_code"].as_i64(),
        wall_ms: report["wall_ms"].as_u64().unwrap_or(0),
        peak_memory_bytes: report["peak_memory_bytes"].as_u64().unwrap_or(0),
        files,
        job_id,
        session: report.get("session").cloned().filter(|v| !v.is_null()),
        egress: report["egress"].as_array().cloned().unwrap_or_default(),
    };
    let mut summary = format!("status: {}", out.status);
    if let Some(m) = report["message"].as_str() {
        summary.push_str(&format!(" ({m})"));
    }
    summary.push_str(&format!(
        "\nwall: {} ms, peak memory: {} bytes\n",
        out.wall_ms, out.peak_memory_bytes
    ));
    if !out.stdout.is_empty() {
        summary.push_str(&format!("stdout:\n{}\n", out.stdout));
    }
    if !out.stderr.is_empty() {
        summary.push_str(&format!("stderr:\n{}\n", out.stderr));
    }
    let mut result = structured(&out, summary, out.status != "ok");
    for f in &out.files {
        let Some(hash) = &f.sha256 else { continue };
        let uri = format!("fleetbox://blobs/{hash}");
        let mime = mime_of(&f.path);
        let image = mime.starts_with("image/");
        if (image && f.bytes <= INLINE_IMAGE_MAX) || f.bytes <= INLINE_FILE_MAX {
            match client.get_blob(hash).await {
                Ok(bytes) if image => result.content.push(ContentBlock::image(
                    base64::engine::general_purpose::STANDARD.encode(&bytes),
                    mime,
                )),
                Ok(bytes) => result
                    .content
                    .push(ContentBlock::resource(contents(&uri, mime, bytes))),
                Err(e) => result.content.push(ContentBlock::text(format!(
                    "{}: could not fetch it ({e})",
                    f.path
                ))),
            }
        } else {
            let mut link = Resource::new(uri, f.path.clone());
            link.mime_type = Some(mime.to_string());
            link.size = Some(f.bytes);
            result.content.push(ContentBlock::resource_link(link));
        }
    }
    result
}

fn mime_of(path: &str) -> &'static str {
    let ext = path
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "json" => "application/json",
        "csv" => "text/csv",
        "txt" | "log" | "md" | "py" => "text/plain",
        "html" => "text/html",
        _ => "application/octet-stream",
    }
}

/// A file as resource contents: text when it is UTF-8, else base64.
fn contents(uri: &str, mime: &str, bytes: Vec<u8>) -> ResourceContents {
    match String::from_utf8(bytes) {
        Ok(text) => ResourceContents::TextResourceContents {
            uri: uri.to_string(),
            mime_type: Some(mime.to_string()),
            text,
            meta: None,
        },
        Err(e) => ResourceContents::BlobResourceContents {
            uri: uri.to_string(),
            mime_type: Some(mime.to_string()),
            blob: base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            meta: None,
        },
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for FleetboxMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("fleetbox", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Fleetbox runs Python in hard sandboxes on a fleet of machines. Use `run_python` \
             for one program (you get its output, exception and files back); use \
             `session_open`, `session_run` and `session_close` to keep variables between \
             calls; use `submit_job` to fan a program out over many shards, then \
             `job_status` and `job_result`.",
        )
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let template = |uri: &str, name: &str, description: &str, mime: &str| {
            let mut t = ResourceTemplate::new(uri, name);
            t.description = Some(description.into());
            t.mime_type = Some(mime.into());
            t
        };
        let templates: Vec<ResourceTemplate> = vec![
            template(
                "fleetbox://jobs/{id}/result",
                "job_result",
                "A job's state, folded result and summary.",
                "application/json",
            ),
            template(
                "fleetbox://jobs/{id}/shards/{index}",
                "shard",
                "One shard: its input and every attempt with its full report.",
                "application/json",
            ),
            template(
                "fleetbox://blobs/{sha256}",
                "blob",
                "A file a program wrote, by its SHA-256.",
                "application/octet-stream",
            ),
        ];
        Ok(ListResourceTemplatesResult::with_all_items(templates))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let client = self.client(&ctx)?;
        let uri = request.uri.clone();
        let not_found = || {
            ErrorData::resource_not_found(
                format!("no such resource `{uri}`"),
                Some(json!({ "uri": uri })),
            )
        };
        let api = |e: ClientError| match e.code() {
            Some("not_found") => not_found(),
            _ => ErrorData::internal_error(e.to_string(), None),
        };
        let parts: Vec<&str> = uri
            .strip_prefix("fleetbox://")
            .ok_or_else(not_found)?
            .split('/')
            .collect();
        let json_contents = |v: Value| ResourceContents::TextResourceContents {
            uri: uri.clone(),
            mime_type: Some("application/json".into()),
            text: v.to_string(),
            meta: None,
        };
        let contents = match parts.as_slice() {
            ["jobs", id, "result"] => {
                let r = client.result(id).await.map_err(api)?;
                json_contents(serde_json::to_value(&r).unwrap_or(Value::Null))
            }
            ["jobs", id, "shards", index] => {
                let index: u64 = index.parse().map_err(|_| not_found())?;
                let d = client.shard(id, index).await.map_err(api)?;
                json_contents(serde_json::to_value(&d).unwrap_or(Value::Null))
            }
            ["blobs", hash] => {
                let bytes = client.get_blob(hash).await.map_err(api)?;
                self::contents(&uri, "application/octet-stream", bytes)
            }
            _ => return Err(not_found()),
        };
        Ok(ReadResourceResult::new(vec![contents]).into())
    }
}

/// Serve MCP on stdin/stdout until the client closes it.
pub async fn serve_stdio(client: Client) -> Result<(), String> {
    let service = FleetboxMcp::with_client(client)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("starting the MCP server on stdio: {e}"))?;
    service
        .waiting()
        .await
        .map_err(|e| format!("the MCP server on stdio: {e}"))?;
    Ok(())
}

/// The Streamable HTTP service (mount it at `/mcp`): stateless, each call with its request's
/// bearer token against the coordinator at `base`. `hosts` are the `Host` values accepted
/// (DNS rebinding); requests carrying an `Origin` header are refused unless it is one of
/// `origins`.
pub fn http_service(
    base: String,
    hosts: Vec<String>,
    origins: Vec<String>,
) -> StreamableHttpService<FleetboxMcp, NeverSessionManager> {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_allowed_hosts(hosts)
        .with_allowed_origins(origins)
        .enforce_origin_validation();
    StreamableHttpService::new(
        move || Ok(FleetboxMcp::per_request(base.clone())),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}
