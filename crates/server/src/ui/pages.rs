//! The panel's pages and forms. Every read and every action is an API call with the session's
//! token ([`call`]); forms carry the session's CSRF token.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use fleetbox_proto::api::{
    AgentList, AuditPage, JobChain, JobList, JobResult, JobView, ReviewFlag, ReviewFlagList,
    ShardDetail,
};
use fleetbox_proto::tenancy::Scope;
use maud::{Markup, PreEscaped, html};
use serde::Deserialize;
use serde_json::{Value, json};

use super::live::{self, Range};
use super::{LoggedIn, Session, UiError, action, call, layout, raw_call, url_encode, when};
use crate::State;

type Page = Result<Html<String>, UiError>;

#[derive(Deserialize)]
pub struct Next {
    next: Option<String>,
}

pub async fn login_form(Query(q): Query<Next>) -> Html<String> {
    login_page(q.next.as_deref(), None)
}

pub fn login_page(next: Option<&str>, error: Option<&str>) -> Html<String> {
    layout(
        "Log in",
        None,
        html! {
            h1 { "Log in" }
            @if let Some(e) = error { p.error #login-error { (e) } }
            form method="post" action="/ui/login" {
                p { label { "API token (admin) " input #token type="password" name="token" size="60" autocomplete="off"; } }
                input type="hidden" name="next" value=(next.unwrap_or("/ui"));
                button #login type="submit" { "Log in" }
            }
            p { small { "The token stays on the coordinator; the browser keeps a session cookie." } }
        },
    )
}

pub async fn overview(AxState(state): AxState<Arc<State>>, LoggedIn(s): LoggedIn) -> Page {
    let live = live::overview_fragment(&state, &s).await?;
    Ok(layout(
        "Overview",
        Some(&s),
        html! {
            h1 { "Overview" }
            div #live { (live) }
            script { (PreEscaped(
                "new EventSource('/ui/live').addEventListener('live', e => { document.getElementById('live').innerHTML = e.data; });"
            )) }
        },
    ))
}

#[derive(Deserialize, Default)]
pub struct JobFilter {
    state: Option<String>,
    q: Option<String>,
}

impl JobFilter {
    async fn jobs(&self, state: &Arc<State>, s: &Session) -> Result<Vec<JobView>, UiError> {
        let mut path = "/v1/jobs?limit=1000".to_string();
        if let Some(st) = self.state.as_deref().filter(|v| !v.is_empty()) {
            path.push_str(&format!("&state={}", url_encode(st)));
        }
        let list: JobList = call(state, s, Method::GET, &path, None).await?;
        let q = self.q.as_deref().unwrap_or("").trim().to_lowercase();
        Ok(list
            .jobs
            .into_iter()
            .filter(|j| {
                q.is_empty()
                    || j.id.to_lowercase().contains(&q)
                    || j.name.to_lowercase().contains(&q)
            })
            .collect())
    }
}

const JOB_STATES: &[&str] = &[
    "",
    "pending_review",
    "running",
    "aggregating",
    "completed",
    "failed",
    "cancelled",
    "needs_review",
];

pub async fn jobs(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Query(f): Query<JobFilter>,
) -> Page {
    let jobs = f.jobs(&state, &s).await?;
    let current = f.state.clone().unwrap_or_default();
    Ok(layout(
        "Jobs",
        Some(&s),
        html! {
            h1 { "Jobs" }
            form method="get" action="/ui/jobs" {
                "State " select name="state" {
                    @for st in JOB_STATES {
                        option value=(st) selected[*st == current] { @if st.is_empty() { "any" } @else { (st) } }
                    }
                }
                " Search " input name="q" value=(f.q.clone().unwrap_or_default()) placeholder="name or id";
                " " button type="submit" { "Filter" }
            }
            @let unfinished = jobs.iter().filter(|j| !j.state.is_final()).count();
            @if s.may(Scope::Submit) { form method="post" action="/ui/jobs/bulk" {
                input type="hidden" name="csrf" value=(s.csrf);
                input type="hidden" name="state" value=(current);
                input type="hidden" name="q" value=(f.q.clone().unwrap_or_default());
                p {
                    "The " (unfinished) " unfinished jobs listed: "
                    button #bulk-cancel type="submit" name="op" value="cancel" { "Cancel" } " "
                    button #bulk-pause type="submit" name="op" value="pause" { "Pause" } " "
                    button #bulk-resume type="submit" name="op" value="resume" { "Resume" } " · priority "
                    input #bulk-priority-value name="priority" size="4";
                    " " button #bulk-priority type="submit" name="op" value="priority" { "Set" }
                }
            } }
            table #jobs {
                tr { th { "Job" } th { "Name" } th { "State" } th { "Shards" } th { "Priority" } th { "Created" } }
                @for j in &jobs {
                    tr {
                        td { a href=(format!("/ui/jobs/{}", j.id)) { (j.id) } }
                        td { (j.name) }
                        td { (j.state.as_str()) }
                        td { (j.shards.accepted) " / " (j.shards.total) }
                        td { (j.priority) }
                        td { (when(j.created_at)) }
                    }
                }
            }
        },
    ))
}

/// A form's priority as the API's `{priority}` body.
fn priority(field: Option<&str>) -> Result<Value, UiError> {
    let p: i32 = field.unwrap_or("").trim().parse().map_err(|_| UiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_body".into(),
        message: "the priority must be a whole number".into(),
    })?;
    Ok(json!({ "priority": p }))
}

#[derive(Deserialize)]
pub struct Bulk {
    csrf: String,
    op: String,
    state: Option<String>,
    q: Option<String>,
    priority: Option<String>,
}

/// `POST /ui/jobs/bulk`: cancel, pause, resume or re-prioritise every unfinished job the
/// filter lists, one API call each (each audited as the session's token).
pub async fn bulk(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Form(f): Form<Bulk>,
) -> Result<Response, UiError> {
    s.check(&f.csrf)?;
    let (verb, body) = match f.op.as_str() {
        "cancel" | "pause" | "resume" => (f.op.clone(), None),
        "priority" => (
            "priority".to_string(),
            Some(priority(f.priority.as_deref())?),
        ),
        other => {
            return Err(UiError {
                status: StatusCode::BAD_REQUEST,
                code: "invalid_body".into(),
                message: format!("no bulk action `{other}`"),
            });
        }
    };
    let filter = JobFilter {
        state: f.state.clone(),
        q: f.q.clone(),
    };
    for j in filter.jobs(&state, &s).await? {
        if !j.state.is_final() {
            let path = format!("/v1/jobs/{}/{verb}", j.id);
            let _: JobView = call(&state, &s, Method::POST, &path, body.clone()).await?;
        }
    }
    let back = format!(
        "/ui/jobs?state={}&q={}",
        url_encode(f.state.as_deref().unwrap_or("")),
        url_encode(f.q.as_deref().unwrap_or(""))
    );
    Ok(Redirect::to(&back).into_response())
}

#[derive(Deserialize)]
pub struct JobAction {
    csrf: String,
    priority: Option<String>,
}

/// `POST /ui/jobs/{id}/{pause|resume|priority|cancel|rerun-tainted|rerun-failed}`.
pub async fn job_action(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Path((id, verb)): Path<(String, String)>,
    Form(f): Form<JobAction>,
) -> Result<Response, UiError> {
    s.check(&f.csrf)?;
    let body = match verb.as_str() {
        "pause" | "resume" | "cancel" | "rerun-tainted" | "rerun-failed" => None,
        "priority" => Some(priority(f.priority.as_deref())?),
        other => {
            return Err(UiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found".into(),
                message: format!("no job action `{other}`"),
            });
        }
    };
    let path = format!("/v1/jobs/{}/{verb}", url_encode(&id));
    let answer: Value = call(&state, &s, Method::POST, &path, body).await?;
    // A re-run opens its new job; the rest come back to the job.
    let to = match answer["job_id"].as_str().filter(|_| verb == "rerun-failed") {
        Some(child) => format!("/ui/jobs/{}", url_encode(child)),
        None => format!("/ui/jobs/{}", url_encode(&id)),
    };
    Ok(Redirect::to(&to).into_response())
}

const EXAMPLE: &str = r#"name = "squares"
aggregate = "sum"
code = """
import json, os
n = json.load(open(os.environ["FLEETBOX_INPUT"]))["index"]
print(n * n)
"""
[shards]
count = 10
"#;

fn submit_page(s: &Session, spec: &str, error: Option<&str>) -> Html<String> {
    layout(
        "Submit",
        Some(s),
        html! {
            h1 { "Submit a job" }
            @if let Some(e) = error { p.error #submit-error { (e) } }
            @if s.may(Scope::Submit) {
                form method="post" action="/ui/submit" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    p { textarea #spec name="spec" rows="18" cols="90" { (spec) } }
                    p { small { "A job spec in TOML (or JSON), as `fleetbox submit` takes it." } }
                    button #submit type="submit" { "Submit" }
                }
            } @else {
                p #submit-refused { "This token may not submit jobs (it lacks the `submit` scope)." }
            }
        },
    )
}

pub async fn submit_form(LoggedIn(s): LoggedIn) -> Html<String> {
    submit_page(&s, EXAMPLE, None)
}

#[derive(Deserialize)]
pub struct SubmitForm {
    csrf: String,
    spec: String,
}

pub async fn submit(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Form(f): Form<SubmitForm>,
) -> Result<Response, UiError> {
    s.check(&f.csrf)?;
    let text = f.spec.trim();
    let parsed = if text.starts_with('{') {
        fleetbox_proto::JobSpec::from_json(text.as_bytes())
    } else {
        fleetbox_proto::JobSpec::from_toml(text)
    };
    let spec = match parsed {
        Ok(spec) => spec,
        Err(e) => {
            let page = submit_page(&s, &f.spec, Some(&e.to_string()));
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, page).into_response());
        }
    };
    let body = serde_json::to_value(&spec).unwrap_or(Value::Null);
    match call::<JobView>(&state, &s, Method::POST, "/v1/jobs", Some(body)).await {
        Ok(job) => Ok(Redirect::to(&format!("/ui/jobs/{}", job.id)).into_response()),
        Err(e) => {
            let page = submit_page(&s, &f.spec, Some(&format!("{} ({})", e.message, e.code)));
            Ok((e.status, page).into_response())
        }
    }
}

pub async fn job(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Path(id): Path<String>,
    Query(range): Query<Range>,
) -> Page {
    let enc = url_encode(&id);
    let view: JobView = call(&state, &s, Method::GET, &format!("/v1/jobs/{enc}"), None).await?;
    let (live, finished) = live::job_fragment(&state, &s, &id, &range).await?;
    let result: JobResult = call(
        &state,
        &s,
        Method::GET,
        &format!("/v1/jobs/{enc}/result"),
        None,
    )
    .await?;
    let chain: JobChain = call(
        &state,
        &s,
        Method::GET,
        &format!("/v1/jobs/{enc}/chain"),
        None,
    )
    .await?;
    let query = match (range.from, range.to) {
        (Some(f), Some(t)) => format!("?from={f}&to={t}"),
        _ => String::new(),
    };
    let script = format!(
        "const es = new EventSource('/ui/jobs/{}/live{}');\
         es.addEventListener('live', e => {{ document.getElementById('live').innerHTML = e.data; }});\
         es.addEventListener('final', () => {{ es.close(); location.reload(); }});",
        view.id, query
    );
    Ok(layout(
        &view.id,
        Some(&s),
        html! {
            h1 { "Job " (view.id) " · " (view.name) }
            p {
                "Priority " (view.priority) " · created " (when(view.created_at))
                @if let Some(t) = &view.trace_id { " · trace " code { (t) } }
                @if let Some(l) = &view.lineage { " · follow-up of " a href=(format!("/ui/jobs/{}", l.parent_job_id)) { (l.parent_job_id) } " (rule " (l.rule) ")" }
            }
            p {
                @if view.paused { b.error #paused { "Paused" } " " }
                @if !view.state.is_final() {
                    (action(&s, Scope::Submit, &format!("/ui/jobs/{}/cancel", view.id), "Cancel", "cancel")) " "
                    @if view.paused {
                        (action(&s, Scope::Submit, &format!("/ui/jobs/{}/resume", view.id), "Resume", "resume")) " "
                    } @else {
                        (action(&s, Scope::Submit, &format!("/ui/jobs/{}/pause", view.id), "Pause", "pause")) " "
                    }
                    @if s.may(Scope::Submit) {
                        form.inline method="post" action=(format!("/ui/jobs/{}/priority", view.id)) {
                            input type="hidden" name="csrf" value=(s.csrf);
                            "Priority " input #priority-value name="priority" size="4" value=(view.priority);
                            " " button #priority type="submit" { "Set" }
                        }
                    }
                    " "
                }
                (action(&s, Scope::Submit, &format!("/ui/jobs/{}/rerun-tainted", view.id), "Re-check results of quarantined agents", "rerun-tainted"))
                @if view.state.is_final() && (view.shards.rejected + view.shards.dead) > 0 {
                    " " (action(&s, Scope::Submit, &format!("/ui/jobs/{}/rerun-failed", view.id), "Re-run failed shards", "rerun-failed"))
                }
            }
            @if range.from.is_some() { p { a href=(format!("/ui/jobs/{}", view.id)) { "← whole job" } } }
            div #live { (live) }
            @if !finished { script { (PreEscaped(script)) } }
            h2 { "Result" }
            @if let Some(e) = &result.error { p.error { (e) } }
            pre #result { (result.result.as_ref().map_or("null", |r| r.get())) }
            @if let Some(sum) = &result.summary {
                details { summary { "Summary" } pre { (serde_json::to_string_pretty(sum).unwrap_or_default()) } }
            }
            @if chain.jobs.len() > 1 {
                h2 { "Chain" }
                ul {
                    @for j in &chain.jobs {
                        @let depth = j.lineage.as_ref().map_or(0, |l| l.depth);
                        li style=(format!("margin-left:{}em", depth * 2)) {
                            a href=(format!("/ui/jobs/{}", j.id)) { (j.id) } " " (j.name) " · " (j.state.as_str())
                            @if let Some(l) = &j.lineage { " ← " (l.rule) " of " (l.parent_job_id) }
                        }
                    }
                }
            }
        },
    ))
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn shard(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Path((id, index)): Path<(String, String)>,
) -> Page {
    let path = format!("/v1/jobs/{}/shards/{}", url_encode(&id), url_encode(&index));
    let d: ShardDetail = call(&state, &s, Method::GET, &path, None).await?;
    Ok(layout(
        &format!("{id} shard {index}"),
        Some(&s),
        html! {
            h1 { "Job " a href=(format!("/ui/jobs/{id}")) { (id) } " · shard " (index) }
            p { "State " b #shard-state { (d.shard.state.as_str()) } " · attempts " (d.shard.attempts) }
            @if let Some(e) = &d.shard.error { p.error { (e) } }
            @for a in &d.attempts {
                section.attempt {
                    h2 { "Attempt " (a.attempt) " · " (a.status.as_str()) " · " (a.verdict.as_str())
                        @if a.chosen { " · chosen" } @if a.late { " · late" } }
                    p { "Agent " (a.agent_id) " · lease " code { (a.lease_id) } " · received " (when(a.received_at)) }
                    (report(&a.report, a.stdout_blob.as_deref(), a.stderr_blob.as_deref()))
                }
            }
        },
    ))
}

/// An `ExecutionReport` (as stored: large streams replaced by their blobs).
fn report(raw: &Value, stdout_blob: Option<&str>, stderr_blob: Option<&str>) -> Markup {
    let whole = html! {
        details { summary { "The whole report (JSON)" } pre { (serde_json::to_string_pretty(raw).unwrap_or_default()) } }
    };
    let Ok(r) = serde_json::from_value::<fleetbox_proto::ExecutionReport>(raw.clone()) else {
        return whole;
    };
    let stream = |name: &str, text: &str, blob: Option<&str>| {
        html! {
            h3 { (name) }
            @if let Some(b) = blob { p { a href=(format!("/ui/blobs/{b}")) { "download (" (b) ")" } } }
            pre class=(name) { (text) }
        }
    };
    html! {
        table.report {
            tr { th { "Status" } td #status { (r.status.as_str()) } th { "Exit code" } td { (r.exit_code.map_or("–".to_string(), |c| c.to_string())) } }
            tr { th { "Wall" } td { (r.wall_ms) " ms" } th { "CPU (user + system)" } td { (r.cpu_user_ms + r.cpu_sys_ms) " ms" } }
            tr { th { "Peak memory" } td { (r.peak_memory_bytes) " bytes" } th { "Backend" } td { (r.backend) } }
            @if let Some(m) = &r.message { tr { th { "Message" } td colspan="3" { (m) } } }
        }
        h3 { "Output" }
        pre.output { (r.output.as_ref().map_or("null".to_string(), Value::to_string)) }
        (stream("stdout", &r.stdout, stdout_blob))
        (stream("stderr", &r.stderr, stderr_blob))
        @if let Some(e) = &r.exception {
            h3 { "Exception" }
            p.error #exception { b { (e.kind) } ": " (e.message) }
            pre.traceback {
                @for f in &e.traceback {
                    (format!("  File \"{}\", line {}, in {}\n", f.file, f.line, f.function))
                    @if let Some(src) = &f.source { (format!("    {src}\n")) }
                }
            }
        }
        @if !r.files.is_empty() {
            h3 { "Files" }
            table.files {
                tr { th { "Path" } th { "Bytes" } th { "sha256" } }
                @for f in &r.files {
                    tr {
                        td { (f.path) }
                        td { (f.bytes) }
                        td { @if let Some(h) = &f.sha256 { a href=(format!("/ui/blobs/{h}")) { (h) } } }
                    }
                }
            }
        }
        @if !r.violations.is_empty() {
            h3.error { "Violations" }
            pre.violations { (serde_json::to_string_pretty(&r.violations).unwrap_or_default()) }
        }
        details { summary { "Limits" } pre { (serde_json::to_string_pretty(&r.limits).unwrap_or_default()) } }
        (whole)
    }
}

/// `GET /ui/blobs/{sha256}`: a download, through the API with the session's token.
pub async fn blob(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Path(sha): Path<String>,
) -> Result<Response, UiError> {
    let resp = raw_call(
        &state,
        &s,
        Method::GET,
        &format!("/v1/blobs/{}", url_encode(&sha)),
        None,
    )
    .await?;
    if !resp.status().is_success() {
        return Err(UiError {
            status: resp.status(),
            code: "not_found".into(),
            message: format!("no blob `{sha}`"),
        });
    }
    Ok(resp)
}

pub async fn agents(AxState(state): AxState<Arc<State>>, LoggedIn(s): LoggedIn) -> Page {
    let list: AgentList = call(&state, &s, Method::GET, "/v1/agents", None).await?;
    Ok(layout(
        "Agents",
        Some(&s),
        html! {
            h1 { "Agents" }
            table #agents {
                tr { th { "Agent" } th { "State" } th { "Trust" } th { "Strikes" } th { "Load" } th { "Last seen" } th { "Machine" } th {} }
                @for a in &list.agents {
                    tr {
                        td { (a.name) br; small { (a.id) } }
                        td { (a.state.as_str()) @if let Some(q) = &a.quarantined { br; small.error { (q) } } }
                        td {
                            @for t in &a.trust {
                                div { (t.python) "/" (t.backend) ": " (t.consecutive_valid) " valid in a row · re-checks "
                                    (format!("{:.0}%", t.recheck_rate * 100.0)) " · " (t.invalid) " invalid" }
                            }
                        }
                        td { (a.strikes) }
                        td { (a.load.busy) " / " (a.load.slots.max(a.slots)) " · outbox " (a.load.outbox) }
                        td { (when(a.last_seen)) }
                        td { (a.facts.hostname) " · " (a.facts.cores) " cores · Python " (a.facts.python) }
                        td {
                            @if a.quarantined.is_some() {
                                (action(&s, Scope::Admin, &format!("/ui/agents/{}/release", a.id), "Release", &format!("release-{}", a.id)))
                            } @else {
                                (action(&s, Scope::Admin, &format!("/ui/agents/{}/quarantine", a.id), "Quarantine", &format!("quarantine-{}", a.id)))
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// `POST /ui/agents/{id}/{release|quarantine}`.
pub async fn agent_action(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Path((id, verb)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, UiError> {
    s.check(&f.csrf)?;
    if verb != "release" && verb != "quarantine" {
        return Err(UiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: format!("no agent action `{verb}`"),
        });
    }
    let path = format!("/v1/agents/{}/{verb}", url_encode(&id));
    let _: Value = call(&state, &s, Method::POST, &path, None).await?;
    Ok(Redirect::to("/ui/agents").into_response())
}

#[derive(Deserialize, Default)]
pub struct FlagFilter {
    status: Option<String>,
    kind: Option<String>,
    job: Option<String>,
    q: Option<String>,
}

pub async fn review(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Query(f): Query<FlagFilter>,
) -> Page {
    let status = f.status.clone().unwrap_or_else(|| "open".into());
    let mut path = "/v1/review/flags?limit=1000".to_string();
    if !status.is_empty() {
        path.push_str(&format!("&status={}", url_encode(&status)));
    }
    for (k, v) in [("kind", &f.kind), ("job", &f.job)] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            path.push_str(&format!("&{k}={}", url_encode(v)));
        }
    }
    let list: ReviewFlagList = call(&state, &s, Method::GET, &path, None).await?;
    let q = f.q.clone().unwrap_or_default().to_lowercase();
    let flags: Vec<&ReviewFlag> = list
        .flags
        .iter()
        .filter(|fl| q.is_empty() || fl.details.to_string().to_lowercase().contains(&q))
        .collect();
    Ok(layout(
        "Review",
        Some(&s),
        html! {
            h1 { "Review queue" }
            form method="get" action="/ui/review" {
                "Status " select name="status" {
                    @for st in ["open", "approved", "rejected", ""] {
                        option value=(st) selected[st == status] { @if st.is_empty() { "any" } @else { (st) } }
                    }
                }
                " Kind " input name="kind" value=(f.kind.clone().unwrap_or_default()) placeholder="code, violation, mismatch, anomaly, …";
                " Job " input name="job" value=(f.job.clone().unwrap_or_default());
                " Search " input name="q" value=(f.q.clone().unwrap_or_default());
                " " button type="submit" { "Filter" }
            }
            table #flags {
                tr { th { "Flag" } th { "Job" } th { "Kind" } th { "Status" } th { "Details" } th { "Raised" } th {} }
                @for fl in &flags {
                    tr {
                        td { (fl.id) }
                        td { a href=(format!("/ui/jobs/{}", fl.job_id)) { (fl.job_id) } }
                        td { (fl.kind) }
                        td { (fl.status) @if let Some(by) = &fl.decided_by { br; small { "by " (by) } } }
                        td { details { summary { (summary(&fl.details)) } pre { (serde_json::to_string_pretty(&fl.details).unwrap_or_default()) } } }
                        td { (when(fl.created_at)) }
                        td {
                            @if fl.status == fleetbox_proto::FlagStatus::Open {
                                (action(&s, Scope::Review, &format!("/ui/review/{}/approve", fl.id), "Approve", &format!("approve-{}", fl.id)))
                                " " (action(&s, Scope::Review, &format!("/ui/review/{}/reject", fl.id), "Reject", &format!("reject-{}", fl.id)))
                                " " (action(&s, Scope::Review, &format!("/ui/review/{}/rerun", fl.id), "Re-run", &format!("rerun-{}", fl.id)))
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// A flag's details in one line.
fn summary(d: &Value) -> String {
    let text = d.to_string();
    if text.len() > 120 {
        format!("{}…", &text[..text.floor_char_boundary(120)])
    } else {
        text
    }
}

pub async fn decide(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Path((id, decision)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, UiError> {
    s.check(&f.csrf)?;
    if !["approve", "reject", "rerun"].contains(&decision.as_str()) {
        return Err(UiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: format!("no decision `{decision}`"),
        });
    }
    let path = format!("/v1/review/flags/{}/{decision}", url_encode(&id));
    let _: ReviewFlag = call(&state, &s, Method::POST, &path, Some(json!({}))).await?;
    Ok(Redirect::to("/ui/review").into_response())
}

#[derive(Deserialize, Default)]
pub struct AuditFilter {
    job: Option<String>,
    agent: Option<String>,
    action: Option<String>,
    after: Option<i64>,
    q: Option<String>,
}

impl AuditFilter {
    fn path(&self) -> String {
        let mut path = "/v1/audit?limit=500".to_string();
        for (k, v) in [
            ("job", &self.job),
            ("agent", &self.agent),
            ("action", &self.action),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                path.push_str(&format!("&{k}={}", url_encode(v)));
            }
        }
        if let Some(a) = self.after {
            path.push_str(&format!("&after={a}"));
        }
        path
    }
}

fn audit_table(entries: &[&fleetbox_proto::api::AuditRecord]) -> Markup {
    html! {
        table #audit {
            tr { th { "Seq" } th { "At" } th { "Actor" } th { "Action" } th { "Job" } th { "Agent" } th { "Details" } }
            @for e in entries {
                tr {
                    td { (e.seq) }
                    td { (when(e.at)) }
                    td { (e.actor) }
                    td { (e.action) }
                    td { @if let Some(j) = &e.job_id { a href=(format!("/ui/jobs/{j}")) { (j) } } }
                    td { (e.agent_id.clone().unwrap_or_default()) }
                    td { details { summary { (summary(&e.details)) } pre { (serde_json::to_string_pretty(&e.details).unwrap_or_default()) } } }
                }
            }
        }
    }
}

pub async fn audit(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Query(f): Query<AuditFilter>,
) -> Page {
    let page: AuditPage = call(&state, &s, Method::GET, &f.path(), None).await?;
    let q = f.q.clone().unwrap_or_default().to_lowercase();
    let entries: Vec<_> = page
        .entries
        .iter()
        .filter(|e| {
            q.is_empty()
                || e.details.to_string().to_lowercase().contains(&q)
                || e.actor.to_lowercase().contains(&q)
        })
        .collect();
    let field = |v: &Option<String>| v.clone().unwrap_or_default();
    Ok(layout(
        "Audit",
        Some(&s),
        html! {
            h1 { "Audit log" }
            form method="get" action="/ui/audit" {
                "Job " input name="job" value=(field(&f.job));
                " Agent " input name="agent" value=(field(&f.agent));
                " Action " input name="action" value=(field(&f.action)) placeholder="job.submitted, …";
                " Search " input name="q" value=(field(&f.q));
                " " button type="submit" { "Filter" }
            }
            (audit_table(&entries))
            @if let Some(next) = page.next_after {
                p { a href=(format!("/ui/audit?job={}&agent={}&action={}&q={}&after={next}",
                    url_encode(&field(&f.job)), url_encode(&field(&f.agent)), url_encode(&field(&f.action)), url_encode(&field(&f.q)))) { "Next page →" } }
            }
        },
    ))
}

/// `GET /ui/violations`: reported runs with sandbox violations (from the audit log's
/// `attempt.reported` entries) and the flags they raised.
pub async fn violations(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(s): LoggedIn,
    Query(f): Query<AuditFilter>,
) -> Page {
    let filter = AuditFilter {
        action: Some("attempt.reported".into()),
        ..f
    };
    let page: AuditPage = call(&state, &s, Method::GET, &filter.path(), None).await?;
    let with_violations: Vec<_> = page
        .entries
        .iter()
        .filter(|e| {
            e.details["attempts"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|at| at["violations"].as_array().is_some_and(|v| !v.is_empty()))
            })
        })
        .collect();
    let flags: ReviewFlagList = call(
        &state,
        &s,
        Method::GET,
        "/v1/review/flags?kind=violation&limit=1000",
        None,
    )
    .await?;
    Ok(layout(
        "Sandbox log",
        Some(&s),
        html! {
            h1 { "Sandbox and hardening log" }
            form method="get" action="/ui/violations" {
                "Job " input name="job" value=(filter.job.clone().unwrap_or_default());
                " Agent " input name="agent" value=(filter.agent.clone().unwrap_or_default());
                " " button type="submit" { "Filter" }
            }
            h2 { "Runs with violations" }
            (audit_table(&with_violations))
            @if let Some(next) = page.next_after { p { a href=(format!("/ui/violations?after={next}")) { "Older reports →" } } }
            h2 { "Violation flags" }
            table {
                tr { th { "Flag" } th { "Job" } th { "Status" } th { "Details" } }
                @for fl in &flags.flags {
                    tr { td { (fl.id) } td { a href=(format!("/ui/jobs/{}", fl.job_id)) { (fl.job_id) } } td { (fl.status) } td { (summary(&fl.details)) } }
                }
            }
        },
    ))
}
