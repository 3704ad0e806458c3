//! What updates by itself: the overview's numbers, charts and alerts, and a job's progress,
//! rendered on the server and sent as HTML fragments over server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State as AxState};
use axum::http::Method;
use axum::response::sse::{Event, KeepAlive, Sse};
use fleetbox_proto::TaskState;
use fleetbox_proto::api::{AgentList, JobView, ReviewFlagList};
use futures_util::stream::{self, Stream};
use maud::{Markup, html};
use tokio::sync::watch;

use super::{LoggedIn, Session, UiError, call};
use crate::State;
use crate::store::now_ms;

/// Seconds between samples of the overview's history.
const EVERY: Duration = Duration::from_secs(10);
/// Samples kept: the last hour.
const KEEP: usize = 360;

/// One sample of the coordinator's counters.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    at: i64,
    queued: i64,
    leased: i64,
    /// Shards settled so far (accepted, rejected or dead), in every job stored.
    settled: i64,
    runs_ok: i64,
    runs_failed: i64,
    violations: i64,
    lag_seconds: f64,
    /// Each agent's runs as reported to this coordinator so far.
    agents: std::collections::BTreeMap<String, crate::metrics::AgentRuns>,
}

/// The overview's last hour, sampled by [`sample`] on each coordinator.
#[derive(Debug, Default)]
pub struct History(VecDeque<Sample>);

impl History {
    fn push(&mut self, s: Sample) {
        if self.0.len() == KEEP {
            self.0.pop_front();
        }
        self.0.push_back(s);
    }
}

/// A sample of `view`: the whole coordinator (`None`) or one tenant. A tenant's runs are its
/// shards settled (accepted against rejected or dead), since the run counters are kept for
/// the coordinator as a whole.
async fn take(state: &State, view: Option<&str>) -> Option<Sample> {
    let m = state.store.stored_metrics(now_ms(), view).await.ok()?;
    let task = |s: TaskState| {
        m.tasks
            .iter()
            .filter(|(n, _)| *n == s.as_str())
            .map(|(_, c)| c)
            .sum::<i64>()
    };
    // Runs reported by agents, by status (`fleetbox_runs_total`).
    let runs = |ok: bool| {
        if view.is_some() {
            return if ok {
                task(TaskState::Accepted)
            } else {
                task(TaskState::Rejected) + task(TaskState::Dead)
            };
        }
        m.counters
            .iter()
            .filter(|(n, labels, _)| {
                n == "fleetbox_runs_total" && (labels == "status=\"ok\"") == ok
            })
            .map(|(_, _, c)| c)
            .sum::<i64>()
    };
    Some(Sample {
        at: now_ms(),
        queued: m.queue.iter().map(|(_, _, n)| n).sum(),
        leased: task(TaskState::Leased),
        settled: task(TaskState::Accepted) + task(TaskState::Rejected) + task(TaskState::Dead),
        runs_ok: runs(true),
        runs_failed: runs(false),
        violations: m
            .counters
            .iter()
            .filter(|(n, _, _)| n == "fleetbox_sandbox_violations_total")
            .map(|(_, _, c)| c)
            .sum(),
        lag_seconds: m.lag_seconds,
        agents: state.metrics.agent_runs(),
    })
}

/// Sample the counters every [`EVERY`] until the coordinator stops.
pub async fn sample(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    loop {
        for view in state.panel.views() {
            if let Some(s) = take(&state, view.as_deref()).await {
                let mut all = state.panel.history.lock().expect("history");
                all.entry(view).or_default().push(s);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// A polyline chart of `values` (oldest first), 600×120.
fn chart(title: &str, unit: &str, values: &[f64]) -> Markup {
    let (w, h) = (600.0, 120.0);
    let max = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9);
    let n = values.len().max(2) as f64 - 1.0;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 / n * w,
                h - 4.0 - v / max * (h - 20.0)
            )
        })
        .collect();
    let last = values.last().copied().unwrap_or(0.0);
    // `chart-queue-depth`: the browser test reads the values a person sees.
    let id = format!("chart-{}", title.to_lowercase().replace(' ', "-"));
    html! {
        figure {
            figcaption { (title) ": " b id=(id) { (format!("{last:.2}")) } " " (unit) " (max " (format!("{max:.2}")) ")" }
            svg.chart width="600" height="120" viewBox="0 0 600 120" role="img" aria-label=(title) {
                polyline fill="none" stroke="#5b8def" stroke-width="2" points=(points.join(" ")) {}
            }
        }
    }
}

/// What the last hour says needs a person: the queue growing, shards waiting long, a sandbox
/// violation.
fn alerts(h: &[Sample]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(last) = h.last() else {
        return out;
    };
    let five = h
        .iter()
        .rev()
        .find(|s| last.at - s.at >= 5 * 60 * 1000)
        .unwrap_or(&h[0]);
    if last.queued > 10 && last.queued > 2 * five.queued {
        out.push(format!(
            "queue growth: {} shards queued, {} five minutes ago",
            last.queued, five.queued
        ));
    }
    if last.lag_seconds > 60.0 {
        out.push(format!(
            "latency spike: the oldest ready shard has waited {:.0} s",
            last.lag_seconds
        ));
    }
    let first = &h[0];
    if last.violations > first.violations {
        out.push(format!(
            "sandbox violation: {} in the last hour (see the sandbox log)",
            last.violations - first.violations
        ));
    }
    out
}

/// The overview's live part.
pub async fn overview_fragment(state: &Arc<State>, session: &Session) -> Result<Markup, UiError> {
    let agents: AgentList = call(state, session, Method::GET, "/v1/agents", None).await?;
    let flags: ReviewFlagList = call(
        state,
        session,
        Method::GET,
        "/v1/review/flags?status=open&limit=1000",
        None,
    )
    .await?;
    let jobs: fleetbox_proto::api::JobList =
        call(state, session, Method::GET, "/v1/jobs?limit=1000", None).await?;
    let view = session.view();
    let now = take(state, view).await.unwrap_or_default();
    let history: Vec<Sample> = {
        let all = state.panel.history.lock().expect("history");
        let past = all.get(&view.map(str::to_string)).map(|h| &h.0);
        past.into_iter()
            .flatten()
            .cloned()
            .chain([now.clone()])
            .collect()
    };
    let pairs = history.windows(2);
    let throughput: Vec<f64> = pairs
        .clone()
        .map(|w| {
            let dt = ((w[1].at - w[0].at) as f64 / 1000.0).max(1e-3);
            (w[1].settled - w[0].settled).max(0) as f64 / dt
        })
        .collect();
    let failure: Vec<f64> = pairs
        .map(|w| {
            let ok = (w[1].runs_ok - w[0].runs_ok).max(0) as f64;
            let failed = (w[1].runs_failed - w[0].runs_failed).max(0) as f64;
            if ok + failed == 0.0 {
                0.0
            } else {
                100.0 * failed / (ok + failed)
            }
        })
        .collect();
    let failure_over_hour = match (history.first(), history.last()) {
        (Some(first), Some(last)) => {
            let ok = (last.runs_ok - first.runs_ok).max(0) as f64;
            let failed = (last.runs_failed - first.runs_failed).max(0) as f64;
            if ok + failed == 0.0 {
                "0.0".to_string()
            } else {
                format!("{:.1}", 100.0 * failed / (ok + failed))
            }
        }
        _ => "0.0".to_string(),
    };
    let queue: Vec<f64> = history.iter().map(|s| s.queued as f64).collect();
    let online: Vec<_> = agents
        .agents
        .iter()
        .filter(|a| a.state == fleetbox_proto::AgentState::Online)
        .collect();
    let (busy, slots) = online.iter().fold((0, 0), |(b, s), a| {
        (b + a.load.busy, s + a.load.slots.max(a.slots))
    });
    let mut by_state: std::collections::BTreeMap<&str, usize> = Default::default();
    for j in &jobs.jobs {
        *by_state.entry(j.state.as_str()).or_default() += 1;
    }
    let alerts = alerts(&history);
    let (failure_unit, failure_words) = match view {
        None => ("% of runs", "Runs that did not succeed"),
        Some(_) => (
            "% of shards settled",
            "Your shards settled rejected or dead",
        ),
    };
    Ok(html! {
        div.cards {
            div.card { "Queued shards" b #queued { (now.queued) } }
            div.card { "Running shards" b { (now.leased) } }
            div.card { "Agents online" b #online { (online.len()) } }
            div.card { "Utilisation" b { (busy) " / " (slots) } }
            div.card { "Open flags" b #flags { (flags.flags.len()) } }
            div.card { "Processing lag" b { (format!("{:.1}", now.lag_seconds)) " s" } }
        }
        h2 { "Alerts" }
        @if alerts.is_empty() { p.ok #alerts { "None." } }
        @for a in &alerts { div.alert { (a) } }
        h2 { "Jobs by state" }
        div.cards {
            @for (s, n) in &by_state {
                a.card href=(format!("/ui/jobs?state={s}")) { (s) b { (n) } }
            }
        }
        h2 { "Last hour (sampled every " (EVERY.as_secs()) " s on this coordinator)" }
        (chart("Queue depth", "shards", &queue))
        (chart("Throughput", "shards settled/s", &throughput))
        (chart("Failure rate", failure_unit, &failure))
        p { (failure_words) " over the last hour: " b #failure-rate { (failure_over_hour) } " %" }
        h2 { "Agents over the last hour" }
        p { small { "Runs reported to this coordinator, per sample interval: success rate and mean run time." } }
        table #agent-charts {
            tr { th { "Agent" } th { "State" } th { "Load" } th { "Runs" } th { "Success" } th { "Mean run time" } th { "Success rate" } th { "Run time" } }
            @for a in &agents.agents {
                @let series = agent_series(&history, &a.id);
                @let (runs, ok, wall) = series.totals;
                tr {
                    td { (a.name) br; small { (a.id) } }
                    td { (a.state.as_str()) }
                    td { (a.load.busy) " / " (a.load.slots.max(a.slots)) }
                    td { (runs) }
                    td { @if runs > 0 { (format!("{:.1}%", 100.0 * ok as f64 / runs as f64)) } @else { "–" } }
                    td { @if runs > 0 { (format!("{:.0} ms", wall as f64 / runs as f64)) } @else { "–" } }
                    td { (spark(&series.success, 100.0)) }
                    td { (spark(&series.latency, 0.0)) }
                }
            }
        }
    })
}

/// One agent's last hour: its success rate (%) and mean run time (ms) per interval between
/// samples (intervals without runs left out), and its totals (runs, ok, wall ms).
struct AgentSeries {
    success: Vec<f64>,
    latency: Vec<f64>,
    totals: (u64, u64, u64),
}

fn agent_series(history: &[Sample], agent: &str) -> AgentSeries {
    let at = |s: &Sample| s.agents.get(agent).copied().unwrap_or_default();
    let mut out = AgentSeries {
        success: Vec::new(),
        latency: Vec::new(),
        totals: (0, 0, 0),
    };
    for w in history.windows(2) {
        let (a, b) = (at(&w[0]), at(&w[1]));
        let runs = b.runs.saturating_sub(a.runs);
        if runs == 0 {
            continue;
        }
        let ok = b.ok.saturating_sub(a.ok);
        let wall = b.wall_ms.saturating_sub(a.wall_ms);
        out.success.push(100.0 * ok as f64 / runs as f64);
        out.latency.push(wall as f64 / runs as f64);
        out.totals.0 += runs;
        out.totals.1 += ok;
        out.totals.2 += wall;
    }
    out
}

/// A small chart (160×36) of `values`, scaled to `max` (or their own maximum when 0).
fn spark(values: &[f64], max: f64) -> Markup {
    let top = if max > 0.0 {
        max
    } else {
        values.iter().copied().fold(0.0_f64, f64::max).max(1e-9)
    };
    let n = values.len().max(2) as f64 - 1.0;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 / n * 160.0, 34.0 - v / top * 32.0))
        .collect();
    html! {
        svg.chart width="160" height="36" viewBox="0 0 160 36" {
            polyline fill="none" stroke="#2ea44f" stroke-width="1.5" points=(points.join(" ")) {}
        }
    }
}

/// Wait `d` between two events; false when the coordinator is stopping (the stream ends, so
/// an open page does not hold up a graceful shutdown).
async fn pause(state: &State, d: Duration) -> bool {
    let mut stopping = state.stopping.clone();
    if *stopping.borrow() {
        return false;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stopping.wait_for(|s| *s) => true,
    };
    !stopped && !*state.stopping.borrow()
}

/// An SSE event of an HTML fragment (SSE cannot carry a carriage return).
fn fragment(event: &str, m: Markup) -> Event {
    Event::default()
        .event(event)
        .data(m.into_string().replace('\r', ""))
}

/// `GET /ui/live`: the overview's fragment every 2 s.
pub async fn overview_events(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(session): LoggedIn,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let s = stream::unfold(
        (state, session, true),
        |(state, session, first)| async move {
            if !first && !pause(&state, Duration::from_secs(2)).await {
                return None;
            }
            let event = match overview_fragment(&state, &session).await {
                Ok(m) => fragment("live", m),
                Err(e) => fragment("live", html! { p.error { (e.message) } }),
            };
            Some((Ok(event), (state, session, false)))
        },
    );
    Sse::new(s).keep_alive(KeepAlive::default())
}

#[derive(serde::Deserialize, Default)]
pub struct Range {
    pub from: Option<u64>,
    pub to: Option<u64>,
}

/// The most tiles a grid shows: past it, a tile stands for a range of shards.
const TILES: u64 = 1000;

/// A job's state, counts and shard grid over `[from, to)`.
pub async fn job_fragment(
    state: &Arc<State>,
    session: &Session,
    id: &str,
    range: &Range,
) -> Result<(Markup, bool), UiError> {
    let job: JobView = call(
        state,
        session,
        Method::GET,
        &format!("/v1/jobs/{}", super::url_encode(id)),
        None,
    )
    .await?;
    let total = job.shards.total;
    let from = range.from.unwrap_or(0).min(total);
    let to = range.to.unwrap_or(total).clamp(from, total);
    let size = (to - from).div_ceil(TILES).max(1);
    let counts = state
        .store
        .shard_tiles(&job.tenant_id, &job.id, from, to, size)
        .await
        .map_err(|e| UiError {
            status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal".into(),
            message: e.to_string(),
        })?;
    let mut tiles: Vec<Vec<(TaskState, u64)>> =
        vec![Vec::new(); (to - from).div_ceil(size) as usize];
    for (tile, s, n) in counts {
        if let Some(t) = tiles.get_mut(tile as usize) {
            t.push((s, n));
        }
    }
    let c = &job.shards;
    let finished = job.state.is_final();
    let markup = html! {
        p {
            "State: " b #job-state { (job.state.as_str()) }
            " · shards " (c.total) ": "
            span #counts { (c.queued) " queued, " (c.leased) " leased, " (c.reported) " reported, "
                (c.accepted) " accepted, " (c.rejected) " rejected, " (c.dead) " dead" }
        }
        @if size > 1 { p { "Each tile is " (size) " shards (striped: mixed states); click one to see its shards." } }
        div.grid #grid {
            @for (i, t) in tiles.iter().enumerate() {
                @let start = from + i as u64 * size;
                @let end = (start + size).min(to);
                @let class = tile_class(t);
                @let label = format!("shards {start}..{end}: {}", t.iter().map(|(s, n)| format!("{n} {}", s.as_str())).collect::<Vec<_>>().join(", "));
                @if size == 1 {
                    a.tile.(class) href=(format!("/ui/jobs/{}/shards/{start}", job.id)) title=(label) {}
                } @else {
                    a.tile.(class) href=(format!("/ui/jobs/{}?from={start}&to={end}", job.id)) title=(label) {}
                }
            }
        }
    };
    Ok((markup, finished))
}

/// A tile's colour: its one state, or striped when its shards are in several.
fn tile_class(t: &[(TaskState, u64)]) -> String {
    match t {
        [(s, _)] => format!("s-{}", s.as_str()),
        [] => "s-queued".into(),
        _ => "s-mixed".into(),
    }
}

/// `GET /ui/jobs/{id}/live`: the job's fragment every second until it is final (then a
/// `final` event: the page reloads to show the result).
pub async fn job_events(
    AxState(state): AxState<Arc<State>>,
    LoggedIn(session): LoggedIn,
    Path(id): Path<String>,
    Query(range): Query<Range>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let s = stream::unfold(
        (state, session, id, range, 0u8),
        |(state, session, id, range, done)| async move {
            if done == 2 {
                return None;
            }
            if done == 0 && !pause(&state, Duration::from_millis(500)).await {
                return None;
            }
            let (event, next) = match job_fragment(&state, &session, &id, &range).await {
                Ok((_, true)) if done == 1 => (Event::default().event("final").data("final"), 2),
                Ok((m, finished)) => (fragment("live", m), u8::from(finished)),
                Err(e) => (fragment("live", html! { p.error { (e.message) } }), 2),
            };
            Some((Ok(event), (state, session, id, range, next)))
        },
    );
    Sse::new(s).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::AgentRuns;

    fn sample(at: i64, runs: u64, ok: u64, wall_ms: u64) -> Sample {
        Sample {
            at,
            agents: [("agt_a".to_string(), AgentRuns { runs, ok, wall_ms })].into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_agents_rate_and_run_time_come_from_the_intervals_with_runs() {
        let h = [
            sample(0, 0, 0, 0),
            sample(10_000, 10, 9, 1_000),
            sample(20_000, 10, 9, 1_000),
            sample(30_000, 14, 11, 3_000),
        ];
        let s = agent_series(&h, "agt_a");
        assert_eq!(s.success, [90.0, 50.0]);
        assert_eq!(s.latency, [100.0, 500.0]);
        assert_eq!(s.totals, (14, 11, 3_000));
        let none = agent_series(&h, "agt_b");
        assert!(none.success.is_empty() && none.totals == (0, 0, 0));
    }

    #[test]
    fn alerts_name_queue_growth_waits_and_violations() {
        let mut a = sample(0, 0, 0, 0);
        a.queued = 5;
        let mut b = sample(6 * 60_000, 0, 0, 0);
        b.queued = 50;
        b.lag_seconds = 90.0;
        b.violations = 2;
        let got = alerts(&[a, b]);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("queue growth"));
        assert!(got[1].starts_with("latency spike"));
        assert!(got[2].starts_with("sandbox violation: 2"));
    }
}
