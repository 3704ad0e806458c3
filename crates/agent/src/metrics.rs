//! The agent's own `/metrics` in the Prometheus text format, on an address the operator opts
//! into (`--metrics-listen`): what only the agent sees — its slots, the sandboxes it keeps
//! warm, its outbox, how long the sandbox takes around each program, the shards it was handed.
//! The bound address is written to `STATE/metrics.addr` (a port of 0 picks a free one).
//!
//! Unauthenticated, like most exporters: bind it to loopback or a scrape network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetbox_proto::prometheus::{Histogram, escape, family};
use fleetbox_sandbox::Sandbox;
use tokio::sync::watch;

use crate::Shared;

/// Sandbox overhead buckets, seconds (a warm jail is a few ms; a cold container a few
/// hundred).
const OVERHEAD_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// What the agent counts as it works.
#[derive(Debug, Default)]
pub struct Counters {
    /// status → runs.
    runs: Mutex<BTreeMap<String, u64>>,
    /// Time the sandbox took around the program (the run's wall time left out).
    overhead: Mutex<Histogram>,
    leased: AtomicU64,
}

impl Counters {
    /// A run ended with `status`; the sandbox took `total` seconds for a program that ran
    /// `wall` of them.
    pub fn ran(&self, status: &str, total: f64, wall: f64) {
        *self
            .runs
            .lock()
            .expect("metrics")
            .entry(status.to_string())
            .or_default() += 1;
        self.overhead
            .lock()
            .expect("metrics")
            .observe(&OVERHEAD_BUCKETS, (total - wall).max(0.0));
    }

    pub fn leased(&self, n: usize) {
        self.leased.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The exposition.
pub fn render(shared: &Shared, sandbox: &dyn Sandbox) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    };
    gauge(
        &mut out,
        "fleetbox_agent_slots",
        "Shards this agent runs at once.",
        u64::from(shared.config.slots.max(1)),
    );
    gauge(
        &mut out,
        "fleetbox_agent_slots_busy",
        "Shards running now.",
        u64::from(shared.busy()),
    );
    gauge(
        &mut out,
        "fleetbox_agent_warm_sandboxes",
        "Sandboxes built ahead and waiting for a run (warm jails, started containers).",
        sandbox.warm_waiting() as u64,
    );
    gauge(
        &mut out,
        "fleetbox_agent_outbox_reports",
        "Reports in the outbox not yet acknowledged by the coordinator.",
        shared.outbox.len() as u64,
    );
    gauge(
        &mut out,
        "fleetbox_agent_outbox_refused",
        "Reports the coordinator refused for good, set aside in the outbox.",
        shared.set_aside.load(Ordering::Relaxed),
    );
    let counters = &shared.counters;
    family(
        &mut out,
        "fleetbox_agent_leased_total",
        "counter",
        "Shards handed to this agent.",
    );
    let _ = writeln!(
        out,
        "fleetbox_agent_leased_total {}",
        counters.leased.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "fleetbox_agent_runs_total",
        "counter",
        "Runs this agent finished, by status.",
    );
    for (status, n) in counters.runs.lock().expect("metrics").iter() {
        let _ = writeln!(
            out,
            "fleetbox_agent_runs_total{{status=\"{}\"}} {n}",
            escape(status)
        );
    }
    family(
        &mut out,
        "fleetbox_agent_sandbox_overhead_seconds",
        "histogram",
        "Time the sandbox takes around a program (start-up and clean-up), per run.",
    );
    counters.overhead.lock().expect("metrics").write(
        &mut out,
        "fleetbox_agent_sandbox_overhead_seconds",
        "",
        &OVERHEAD_BUCKETS,
    );
    out
}

/// Serve `/metrics` on `addr` until `stop`; the bound address goes to `STATE/metrics.addr`.
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    sandbox: Arc<dyn Sandbox>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    fs_err::write(
        shared.config.state_dir.join("metrics.addr"),
        bound.to_string(),
    )?;
    tracing::info!(%bound, "agent metrics on /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let shared = shared.clone();
            let sandbox = sandbox.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&shared, sandbox.as_ref()),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}
