//! `/metrics` in the Prometheus text format (version 0.0.4).
//!
//! Two kinds of series:
//! - what lives in the database is read from it on every scrape, so several coordinators on
//!   one database report the same truth: queue depth, task states, agents, job age, lag, per
//!   agent results (from the trust counters), review flags, and the decision counters the
//!   audit appends keep in `metric_counters` (lease expiries, verdicts, violations, refused
//!   reports, quarantines, follow-ups) in the same transaction as the decision;
//! - what only this process sees is kept in memory: HTTP requests and their latency, and the
//!   run time of the shards reported to it, by backend.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

pub use fleetbox_proto::prometheus::escape;
use fleetbox_proto::prometheus::{Histogram, family};
use fleetbox_proto::tenancy::TenantView;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Shard run time buckets, seconds.
const RUN_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
];

/// What this process counts in memory.
#[derive(Debug, Default)]
pub struct Registry {
    /// (route, method, status) → requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// route → latency.
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// backend → shard run time.
    runs: Mutex<BTreeMap<String, Histogram>>,
    /// agent → the runs it reported to this coordinator (the panel's per-agent charts).
    agents: Mutex<BTreeMap<String, AgentRuns>>,
    /// Server re-checks given up after too many failed tries (settled inconclusive).
    checks_abandoned: std::sync::atomic::AtomicU64,
    /// Tries to ship an audit checkpoint that a sink refused.
    audit_ship_failures: std::sync::atomic::AtomicU64,
}

/// Runs an agent reported: how many, how many `ok`, their wall time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentRuns {
    pub runs: u64,
    pub ok: u64,
    pub wall_ms: u64,
}

impl Registry {
    /// A server re-check given up after too many failed tries.
    pub fn check_abandoned(&self) {
        self.checks_abandoned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A sink (`--audit-ship`) refused a checkpoint; it is tried again next time.
    pub fn audit_ship_failed(&self) {
        self.audit_ship_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .expect("metrics")
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
        self.latency
            .lock()
            .expect("metrics")
            .entry(route.to_string())
            .or_default()
            .observe(&BUCKETS, seconds);
    }

    pub fn shard_ran(&self, backend: &str, wall_ms: u64) {
        self.runs
            .lock()
            .expect("metrics")
            .entry(backend.to_string())
            .or_default()
            .observe(&RUN_BUCKETS, wall_ms as f64 / 1000.0);
    }

    /// A run `agent` reported to this coordinator.
    pub fn agent_ran(&self, agent: &str, ok: bool, wall_ms: u64) {
        let mut agents = self.agents.lock().expect("metrics");
        let a = agents.entry(agent.to_string()).or_default();
        a.runs += 1;
        a.ok += u64::from(ok);
        a.wall_ms += wall_ms;
    }

    /// Every agent's runs so far, as this coordinator saw them.
    pub fn agent_runs(&self) -> BTreeMap<String, AgentRuns> {
        self.agents.lock().expect("metrics").clone()
    }

    fn write(&self, out: &mut String) {
        family(
            out,
            "fleetbox_http_requests_total",
            "counter",
            "HTTP requests this coordinator answered, by route, method and status.",
        );
        for ((route, method, status), n) in self.requests.lock().expect("metrics").iter() {
            let _ = writeln!(
                out,
                "fleetbox_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        family(
            out,
            "fleetbox_http_request_duration_seconds",
            "histogram",
            "Time to answer an HTTP request, by route.",
        );
        for (route, h) in self.latency.lock().expect("metrics").iter() {
            h.write(
                out,
                "fleetbox_http_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
                &BUCKETS,
            );
        }
        family(
            out,
            "fleetbox_task_duration_seconds",
            "histogram",
            "Run time of the shard attempts reported to this coordinator, by backend.",
        );
        for (backend, h) in self.runs.lock().expect("metrics").iter() {
            h.write(
                out,
                "fleetbox_task_duration_seconds",
                &format!("backend=\"{}\"", escape(backend)),
                &RUN_BUCKETS,
            );
        }
    }
}

/// What the database says, for one scrape.
#[derive(Debug, Default)]
pub struct Stored {
    /// (tenant, priority) → queued shards of unfinished jobs.
    pub queue: Vec<(String, i64, i64)>,
    /// task state → shards.
    pub tasks: Vec<(&'static str, i64)>,
    /// agent state → agents.
    pub agents: Vec<(String, i64)>,
    /// Seconds since the oldest unfinished job was submitted (0 without one).
    pub job_age_seconds: f64,
    /// Seconds the oldest ready queued shard has waited (0 without one).
    pub lag_seconds: f64,
    /// (agent, result) → count.
    pub executions: Vec<(String, &'static str, i64)>,
    /// flag kind → flags raised.
    pub flags: Vec<(String, i64)>,
    /// (name, labels) → value, from `metric_counters`.
    pub counters: Vec<(String, String, i64)>,
    /// The tenants scraped, with their use and caps (filled by `/metrics`, not the store).
    pub tenants: Vec<TenantView>,
}

/// The counter families the audit appends keep, with their help (those absent from the
/// database are written as 0 where they have no labels, so they exist from the start).
const COUNTERS: &[(&str, &str)] = &[
    (
        "fleetbox_tasks_total",
        "Shards settled, by final state (accepted, rejected, dead), as each settle was audited.",
    ),
    (
        "fleetbox_lease_expired_total",
        "Leases that ran out (agent silent or lost): the shard went back to the queue or died.",
    ),
    (
        "fleetbox_verification_total",
        "Verdicts on agents' results by the coordinator's re-checks.",
    ),
    (
        "fleetbox_runs_total",
        "Runs agents reported, by status (ok, error, timeout, ...).",
    ),
    (
        "fleetbox_sandbox_violations_total",
        "Sandbox violations in reported runs (the seed's sandbox_escape_attempts), by kind.",
    ),
    (
        "fleetbox_reports_refused_total",
        "Agent reports refused (unsigned, bad signature, unknown lease), by code.",
    ),
    (
        "fleetbox_agent_quarantines_total",
        "Agents quarantined for invalid results.",
    ),
    (
        "fleetbox_followups_total",
        "Follow-up rules that fired, by outcome (created, capped, failed).",
    ),
];

/// The series every coordinator reads from the shared database: each reports the same value,
/// so dashboards aggregate them across coordinators with `max`, never `sum` (which would
/// multiply them by the number of coordinators). The rest are each process's own.
pub const DATABASE_SERIES: &[&str] = &[
    "fleetbox_queue_depth",
    "fleetbox_tasks",
    "fleetbox_tasks_total",
    "fleetbox_agents",
    "fleetbox_job_age_seconds",
    "fleetbox_processing_lag_seconds",
    "fleetbox_agent_execution_total",
    "fleetbox_review_flags_total",
    "fleetbox_lease_expired_total",
    "fleetbox_verification_total",
    "fleetbox_runs_total",
    "fleetbox_sandbox_violations_total",
    "fleetbox_reports_refused_total",
    "fleetbox_agent_quarantines_total",
    "fleetbox_followups_total",
    "fleetbox_tenant_running_shards",
    "fleetbox_tenant_shards_24h",
    "fleetbox_tenant_cpu_seconds_24h",
    "fleetbox_tenant_blob_bytes",
    "fleetbox_tenant_cap",
];

/// The whole exposition.
/// `fleetbox_server_sandbox{backend}`: 1 for the backend server-side runs use; and
/// `fleetbox_server_sandbox_weak`, 1 when that is `process` (the operator's choice).
pub fn server_sandbox(out: &mut String, backend: fleetbox_sandbox::Backend) {
    family(
        out,
        "fleetbox_server_sandbox",
        "gauge",
        "The sandbox backend of server-side runs (re-checks, the python reducer).",
    );
    let _ = writeln!(out, "fleetbox_server_sandbox{{backend=\"{backend}\"}} 1");
    family(
        out,
        "fleetbox_server_sandbox_weak",
        "gauge",
        "1 when server-side runs use the process backend, weaker than the agents' jail or docker.",
    );
    let weak = u8::from(backend == fleetbox_sandbox::Backend::Process);
    let _ = writeln!(out, "fleetbox_server_sandbox_weak {weak}");
}

/// `fleetbox_store_writes_total`: this process's writes to the database.
pub fn store_writes(out: &mut String, writes: u64) {
    family(
        out,
        "fleetbox_store_writes_total",
        "counter",
        "Write transactions and single write statements this coordinator began.",
    );
    let _ = writeln!(out, "fleetbox_store_writes_total {writes}");
}

/// The whole exposition: what the database says and, for the operator, this process's own
/// series (`registry`); a tenant's scrape has only its own database series.
pub fn render(stored: &Stored, registry: Option<&Registry>) -> String {
    let mut out = String::with_capacity(8192);
    if let Some(registry) = registry {
        process_series(&mut out, registry);
    }
    database_series(&mut out, stored);
    if let Some(registry) = registry {
        registry.write(&mut out);
    }
    out
}

fn process_series(out: &mut String, registry: &Registry) {
    family(
        out,
        "fleetbox_checks_abandoned_total",
        "counter",
        "Server re-checks given up after repeated failures (settled inconclusive, flagged), by this coordinator.",
    );
    let _ = writeln!(
        out,
        "fleetbox_checks_abandoned_total {}",
        registry
            .checks_abandoned
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    family(
        out,
        "fleetbox_audit_ship_failures_total",
        "counter",
        "Tries to ship an audit checkpoint (--audit-ship) that the sink refused, by this coordinator; each is tried again at the next checkpoint.",
    );
    let _ = writeln!(
        out,
        "fleetbox_audit_ship_failures_total {}",
        registry
            .audit_ship_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

fn database_series(out: &mut String, stored: &Stored) {
    tenant_series(out, &stored.tenants);
    family(
        out,
        "fleetbox_queue_depth",
        "gauge",
        "Shards waiting to be leased, by priority and tenant.",
    );
    for (tenant, priority, n) in &stored.queue {
        let _ = writeln!(
            out,
            "fleetbox_queue_depth{{priority=\"{priority}\",tenant=\"{}\"}} {n}",
            escape(tenant)
        );
    }
    family(
        out,
        "fleetbox_tasks",
        "gauge",
        "Shards by state now, all jobs.",
    );
    for (state, n) in &stored.tasks {
        let _ = writeln!(out, "fleetbox_tasks{{state=\"{state}\"}} {n}");
    }
    family(out, "fleetbox_agents", "gauge", "Agents by state.");
    for (state, n) in &stored.agents {
        let _ = writeln!(out, "fleetbox_agents{{state=\"{}\"}} {n}", escape(state));
    }
    family(
        out,
        "fleetbox_job_age_seconds",
        "gauge",
        "Age of the oldest job that has not finished.",
    );
    let _ = writeln!(out, "fleetbox_job_age_seconds {}", stored.job_age_seconds);
    family(
        out,
        "fleetbox_processing_lag_seconds",
        "gauge",
        "How long the oldest shard ready to run has waited in the queue.",
    );
    let _ = writeln!(
        out,
        "fleetbox_processing_lag_seconds {}",
        stored.lag_seconds
    );
    family(
        out,
        "fleetbox_agent_execution_total",
        "counter",
        "Results agents reported, by agent and result (reported, infrastructure_error, valid, invalid).",
    );
    for (agent, result, n) in &stored.executions {
        let _ = writeln!(
            out,
            "fleetbox_agent_execution_total{{agent=\"{}\",result=\"{result}\"}} {n}",
            escape(agent)
        );
    }
    family(
        out,
        "fleetbox_review_flags_total",
        "counter",
        "Flags raised for the review queue, by kind.",
    );
    for (kind, n) in &stored.flags {
        let _ = writeln!(
            out,
            "fleetbox_review_flags_total{{kind=\"{}\"}} {n}",
            escape(kind)
        );
    }
    for (name, help) in COUNTERS {
        family(out, name, "counter", help);
        let mut any = false;
        for (n, labels, v) in stored.counters.iter().filter(|(n, _, _)| n == name) {
            any = true;
            if labels.is_empty() {
                let _ = writeln!(out, "{n} {v}");
            } else {
                let _ = writeln!(out, "{n}{{{labels}}} {v}");
            }
        }
        if !any
            && matches!(
                *name,
                "fleetbox_lease_expired_total" | "fleetbox_agent_quarantines_total"
            )
        {
            let _ = writeln!(out, "{name} 0");
        }
    }
}

/// Each tenant's use against its caps (`fleetbox_tenant_*`; caps as `fleetbox_tenant_cap`).
fn tenant_series(out: &mut String, tenants: &[TenantView]) {
    type Gauge = (&'static str, &'static str, fn(&TenantView) -> f64);
    let gauges: [Gauge; 4] = [
        (
            "fleetbox_tenant_running_shards",
            "The tenant's shards leased now.",
            |t| t.running_shards as f64,
        ),
        (
            "fleetbox_tenant_shards_24h",
            "Shards the tenant submitted in the last 24 hours.",
            |t| t.shards_today as f64,
        ),
        (
            "fleetbox_tenant_cpu_seconds_24h",
            "CPU seconds the tenant's shards reported in the last 24 hours.",
            |t| t.cpu_seconds_today,
        ),
        (
            "fleetbox_tenant_blob_bytes",
            "Bytes of the blobs the tenant owns.",
            |t| t.blob_bytes as f64,
        ),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        for t in tenants {
            let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", escape(&t.id), value(t));
        }
    }
    family(
        out,
        "fleetbox_tenant_cap",
        "gauge",
        "The tenant's caps, by cap (absent: no cap).",
    );
    for t in tenants {
        let c = &t.caps;
        let caps = [
            ("max_running_shards", c.max_running_shards.map(|v| v as f64)),
            ("max_shards_per_day", c.max_shards_per_day.map(|v| v as f64)),
            (
                "max_cpu_seconds_per_day",
                c.max_cpu_seconds_per_day.map(|v| v as f64),
            ),
            ("max_blob_bytes", c.max_blob_bytes.map(|v| v as f64)),
            ("submit_rate", c.submit_rate),
        ];
        for (cap, v) in caps {
            if let Some(v) = v {
                let _ = writeln!(
                    out,
                    "fleetbox_tenant_cap{{tenant=\"{}\",cap=\"{cap}\"}} {v}",
                    escape(&t.id)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let r = Registry::default();
        r.request("/v1/jobs", "POST", 201, 0.003);
        r.request("/v1/jobs", "POST", 201, 0.2);
        r.shard_ran("jail", 40);
        let text = render(&Stored::default(), Some(&r));
        assert!(text.contains(
            "fleetbox_http_requests_total{route=\"/v1/jobs\",method=\"POST\",status=\"201\"} 2"
        ));
        assert!(text.contains(
            "fleetbox_http_request_duration_seconds_bucket{route=\"/v1/jobs\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "fleetbox_http_request_duration_seconds_bucket{route=\"/v1/jobs\",le=\"0.25\"} 2"
        ));
        assert!(
            text.contains("fleetbox_http_request_duration_seconds_count{route=\"/v1/jobs\"} 2")
        );
        assert!(
            text.contains("fleetbox_task_duration_seconds_bucket{backend=\"jail\",le=\"0.05\"} 1")
        );
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
