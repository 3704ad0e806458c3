//! The web panel under `/ui`: server-rendered HTML (readable without JavaScript), live
//! fragments over server-sent events, a login with an API token (a cookie session, CSRF tokens
//! in every form).
//!
//! The panel is a client of the API: every page reads through `/v1` and every action is a
//! `/v1` call made with the session's own token, through the same router, so a page shows
//! exactly what the token may see, an action needs exactly the token the API needs, and the
//! API's handlers write the audit entries. Only the overview's numbers come from the store
//! (the same counters `/metrics` reads).

mod live;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use fleetbox_proto::tenancy::Scope;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::de::DeserializeOwned;
use tower::ServiceExt as _;

use crate::State;
use crate::ids::random_hex;
use crate::store::now_ms;

pub(crate) use live::sample;

/// The session cookie's name.
const COOKIE: &str = "fleetbox_ui";
/// How long a session lasts without use.
const IDLE_MS: i64 = 12 * 3600 * 1000;

/// The panel's state in a coordinator: sessions and the overview's recent history.
#[derive(Default)]
pub struct Panel {
    sessions: Mutex<HashMap<String, Session>>,
    /// The last hour per view: the whole coordinator (`None`, the operator's) and each
    /// tenant a session looks at.
    pub(crate) history: Mutex<HashMap<Option<String>, live::History>>,
}

/// A logged-in browser: the API token it logged in with (kept here, never in the cookie) and
/// the CSRF token its forms must carry.
#[derive(Clone)]
pub struct Session {
    token: String,
    csrf: String,
    seen: i64,
    /// What its token may do, as it logged in: buttons it may not use are not shown (the
    /// API refuses them anyway).
    scopes: Vec<Scope>,
    /// Whose numbers the overview shows: every tenant's (`None`, the operator) or one's.
    view: Option<String>,
}

impl Session {
    /// Whether its token has `scope`.
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whose numbers the overview shows: every tenant's (`None`) or one tenant's.
    pub fn view(&self) -> Option<&str> {
        self.view.as_deref()
    }
}

pub fn router() -> Router<Arc<State>> {
    Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/", get(|| async { Redirect::to("/ui") }))
        .route("/ui/login", get(pages::login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/live", get(live::overview_events))
        .route("/ui/jobs", get(pages::jobs))
        .route("/ui/jobs/bulk", post(pages::bulk))
        .route("/ui/submit", get(pages::submit_form).post(pages::submit))
        .route("/ui/jobs/{id}", get(pages::job))
        .route("/ui/jobs/{id}/live", get(live::job_events))
        .route("/ui/jobs/{id}/{action}", post(pages::job_action))
        .route("/ui/jobs/{id}/shards/{index}", get(pages::shard))
        .route("/ui/blobs/{sha256}", get(pages::blob))
        .route("/ui/agents", get(pages::agents))
        .route("/ui/agents/{id}/{action}", post(pages::agent_action))
        .route("/ui/review", get(pages::review))
        .route("/ui/review/{id}/{decision}", post(pages::decide))
        .route("/ui/violations", get(pages::violations))
        .route("/ui/audit", get(pages::audit))
}

impl Panel {
    /// The views to sample: the whole coordinator's, and each tenant's a live session shows.
    pub(crate) fn views(&self) -> Vec<Option<String>> {
        let now = now_ms();
        let mut views: Vec<Option<String>> = self
            .sessions
            .lock()
            .expect("sessions")
            .values()
            .filter(|s| now - s.seen < IDLE_MS)
            .filter_map(|s| s.view.clone().map(Some))
            .collect();
        views.push(None);
        views.sort();
        views.dedup();
        views
    }
}

/// The session of the request's cookie; a page without one redirects to the login.
pub struct LoggedIn(pub Session);

impl FromRequestParts<Arc<State>> for LoggedIn {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<State>) -> Result<Self, Response> {
        let id = cookie(&parts.headers, COOKIE);
        let now = now_ms();
        let mut sessions = state.panel.sessions.lock().expect("sessions");
        sessions.retain(|_, s| now - s.seen < IDLE_MS);
        match id.and_then(|id| sessions.get_mut(&id)) {
            Some(s) => {
                s.seen = now;
                Ok(LoggedIn(s.clone()))
            }
            None => {
                let to = parts
                    .uri
                    .path_and_query()
                    .map_or("/ui", |p| p.as_str())
                    .to_string();
                Err(Redirect::to(&format!("/ui/login?next={}", url_encode(&to))).into_response())
            }
        }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Percent-encode everything but unreserved characters (for `next=` and query values).
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A `next=` target inside the panel, or the overview (never another site).
fn local(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui") && !n.starts_with("//") => n.to_string(),
        _ => "/ui".to_string(),
    }
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// `POST /ui/login`: a token that may read jobs (the `read` scope) opens a session.
async fn login(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let token = form.token.trim().to_string();
    let probe = Session {
        token: token.clone(),
        csrf: String::new(),
        seen: 0,
        scopes: Vec::new(),
        view: Some(String::new()),
    };
    let may_read = call::<serde_json::Value>(&state, &probe, Method::GET, "/v1/jobs?limit=1", None);
    match may_read.await {
        Ok(_) => {
            let id = random_hex(24);
            let me = call::<fleetbox_proto::tenancy::Whoami>(
                &state,
                &probe,
                Method::GET,
                "/v1/whoami",
                None,
            )
            .await;
            // Without an answer: no buttons, and no one's numbers.
            let (scopes, view) = match me {
                Ok(w) => (w.scopes, (!w.operator).then_some(w.tenant)),
                Err(_) => (Vec::new(), Some(String::new())),
            };
            let session = Session {
                token,
                csrf: random_hex(16),
                seen: now_ms(),
                scopes,
                view,
            };
            state
                .panel
                .sessions
                .lock()
                .expect("sessions")
                .insert(id.clone(), session);
            let mut resp = Redirect::to(&local(form.next.as_deref())).into_response();
            let cookie = format!("{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict");
            if let Ok(v) = cookie.parse() {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => {
            let why = if e.status == StatusCode::FORBIDDEN {
                "this token may not use the panel: log in with a token that has the `read` scope"
                    .to_string()
            } else {
                e.message
            };
            let page = pages::login_page(form.next.as_deref(), Some(&why));
            (StatusCode::UNAUTHORIZED, page).into_response()
        }
    }
}

#[derive(serde::Deserialize)]
struct CsrfOnly {
    csrf: String,
}

async fn logout(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CsrfOnly>,
) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        let mut sessions = state.panel.sessions.lock().expect("sessions");
        if sessions.get(&id).is_some_and(|s| s.csrf == form.csrf) {
            sessions.remove(&id);
        }
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    if let Ok(v) = format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0").parse() {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

impl Session {
    /// A form's CSRF token must be the session's: a page of another site cannot act for it.
    pub fn check(&self, csrf: &str) -> Result<(), UiError> {
        if csrf.is_empty() || csrf != self.csrf {
            return Err(UiError {
                status: StatusCode::FORBIDDEN,
                code: "csrf".into(),
                message:
                    "the form's CSRF token is not this session's: reload the page and try again"
                        .into(),
            });
        }
        Ok(())
    }
}

/// A failed call or a refused form, shown as a page with the API's code and message.
#[derive(Debug)]
pub struct UiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let body = layout(
            "Error",
            None,
            html! {
                h1 { "Refused" }
                p.error { (self.message) }
                p { "(" (self.code) ", HTTP " (self.status.as_u16()) ")" }
                p { a href="javascript:history.back()" { "Back" } }
            },
        );
        (self.status, body).into_response()
    }
}

/// Call the API as the session's token, through this coordinator's own router; the JSON
/// answer, or the API's typed error.
pub async fn call<T: DeserializeOwned>(
    state: &Arc<State>,
    session: &Session,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<T, UiError> {
    let resp = raw_call(state, session, method, path, body).await?;
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), crate::api::MAX_BODY)
        .await
        .map_err(|e| UiError {
            status: StatusCode::BAD_GATEWAY,
            code: "internal".into(),
            message: e.to_string(),
        })?;
    if !status.is_success() {
        let err: Option<fleetbox_proto::api::ErrorBody> = serde_json::from_slice(&bytes).ok();
        return Err(match err {
            Some(e) => UiError {
                status,
                code: e.error.code,
                message: e.error.message,
            },
            None => UiError {
                status,
                code: "internal".into(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            },
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| UiError {
        status: StatusCode::BAD_GATEWAY,
        code: "internal".into(),
        message: format!("the API's answer did not parse: {e}"),
    })
}

/// [`call`], the response as it is (blob downloads).
pub async fn raw_call(
    state: &Arc<State>,
    session: &Session,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Response, UiError> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {}", session.token));
    // The panel's call belongs to the trace of the page's request.
    if let Some(t) = crate::api::error::current_trace() {
        req = req.header(fleetbox_proto::trace::HEADER, t.header());
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .map_err(|e| UiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_path".into(),
        message: e.to_string(),
    })?;
    let router = crate::api::router(state.clone(), None);
    Ok(router.oneshot(req).await.unwrap_or_else(|e| match e {}))
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
nav{background:#1d2330;padding:8px 16px;display:flex;gap:16px;align-items:center}
nav a{color:#dfe6f0;text-decoration:none} nav a:hover{color:#fff}
nav form{margin-left:auto} main{padding:16px 24px;max-width:1400px}
table{border-collapse:collapse;background:#fff;width:100%} td,th{border-bottom:1px solid #e3e6ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f3} .cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:10px 14px;min-width:140px}
.card b{display:block;font-size:22px} .error{color:#b00020} .alert{background:#fff3f3;border:1px solid #f3b5b5;padding:6px 10px;margin:4px 0}
.ok{color:#1b7f3b} pre{background:#fff;border:1px solid #e3e6ea;padding:8px;overflow:auto;max-height:400px}
.grid{display:flex;flex-wrap:wrap;gap:2px;max-width:1000px} .tile{width:14px;height:14px;display:inline-block;border-radius:2px}
.s-queued{background:#c9ced6}.s-leased{background:#5b8def}.s-reported{background:#9b6bdf}.s-accepted{background:#2ea44f}
.s-rejected{background:#e36209}.s-dead{background:#b00020}.s-mixed{background:repeating-linear-gradient(45deg,#2ea44f,#2ea44f 3px,#c9ced6 3px,#c9ced6 6px)}
form.inline{display:inline} input,select,textarea,button{font:inherit}
svg.chart{background:#fff;border:1px solid #e3e6ea}
"#;

/// A whole page: navigation (with the session's logout form), title and content.
pub fn layout(title: &str, session: Option<&Session>, content: Markup) -> Html<String> {
    Html(layout_markup(title, session, content).into_string())
}

fn layout_markup(title: &str, session: Option<&Session>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Fleetbox" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                nav {
                    a href="/ui" { b { "Fleetbox" } }
                    a href="/ui" { "Overview" }
                    a href="/ui/jobs" { "Jobs" }
                    a href="/ui/submit" { "Submit" }
                    a href="/ui/agents" { "Agents" }
                    a href="/ui/review" { "Review" }
                    a href="/ui/violations" { "Sandbox log" }
                    a href="/ui/audit" { "Audit" }
                    @if let Some(s) = session {
                        form method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button id="logout" type="submit" { "Log out" }
                        }
                    }
                }
                main { (content) }
            }
        }
    }
}

/// A POST form with the session's CSRF token and one button, shown only to a session whose
/// token has `scope` (the one the API asks of the action).
pub fn action(session: &Session, scope: Scope, to: &str, label: &str, id: &str) -> Markup {
    html! {
        @if session.may(scope) {
            form.inline method="post" action=(to) {
                input type="hidden" name="csrf" value=(session.csrf);
                button id=(id) type="submit" { (label) }
            }
        }
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(when(0), "1970-01-01 00:00:00");
        assert_eq!(when(1_796_290_200_000), "2026-12-03 09:30:00");
        assert_eq!(when(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn next_stays_in_the_panel() {
        assert_eq!(
            local(Some("/ui/jobs?state=running")),
            "/ui/jobs?state=running"
        );
        assert_eq!(local(Some("https://evil.example/")), "/ui");
        assert_eq!(local(Some("//evil.example/ui")), "/ui");
        assert_eq!(local(None), "/ui");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; fleetbox_ui=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
