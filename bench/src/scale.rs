//! `fleetbox-bench scale`: one large no-op job through `fleetbox server` (release, SQLite; or
//! PostgreSQL with `FLEETBOX_BENCH_DATABASE_URL`) in its own process, so its memory is its own.
//! Measured: the submit's wall time, the coordinator's resident memory after it and at its
//! peak, the job view's latency (`GET /v1/jobs/{id}`, one every 50 ms) while protocol-level
//! executors lease and report every shard (signed, as agents do; no code runs), and the rate
//! they complete at. `--executors 4 --batch 500` is a few busy machines; `--executors 1000
//! --batch 1` is a thousand busy agents. Targets (issue 35): a 1,000,000-shard job submitted
//! in ≤ 10 s, RSS ≤ 500 MB, job view p99 ≤ 20 ms during the run.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleetbox_client::Client;
use fleetbox_proto::api::{EnrollRequest, LeaseRequest, ReportBatch, ShardReport};
use fleetbox_proto::{ExecutionReport, JobSpec, JobState, Status};

use crate::util::fleetbox_bin;

const ADMIN: &str = "bench-admin";
const ENROLL: &str = "bench-enroll";

pub fn run(shards: usize, executors: usize, batch: u32) -> Result<(), String> {
    let bin = fleetbox_bin()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let database = match std::env::var(crate::throughput::PG_VAR) {
        Ok(base) => Some(rt.block_on(crate::throughput::fresh_database(&base))?),
        Err(_) => None,
    };
    let mut cmd = Command::new(&bin);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--server-agents", "0"])
        .args(["--lease", "120s"])
        .arg("--data")
        .arg(dir.path())
        .env("FLEETBOX_ADMIN_TOKEN", ADMIN)
        .env("FLEETBOX_ENROLL_TOKEN", ENROLL)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(url) = &database {
        cmd.env("FLEETBOX_DATABASE_URL", url);
    }
    let mut server = cmd.spawn().map_err(|e| e.to_string())?;
    let pid = server.id();
    let result = crate::idle::listening(&mut server)
        .and_then(|url| rt.block_on(measure(&url, pid, shards, executors, batch)));
    let _ = server.kill();
    let _ = server.wait();
    let m = result?;
    let store = if database.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "scale: one job of {shards} no-op shards, `fleetbox server` ({store}), {executors} \
         protocol-level executors leasing {batch} at a time"
    );
    println!(
        "  submit            {:8.2} s   ({:.0} shards/s; target ≤ 10 s for 1,000,000)",
        m.submit.as_secs_f64(),
        shards as f64 / m.submit.as_secs_f64()
    );
    println!(
        "  coordinator RSS   {:8.0} MB after the submit, {:.0} MB at its peak (target ≤ 500 MB); \
         {:.0} MB idle before",
        m.rss_after_submit, m.rss_peak, m.rss_idle
    );
    println!(
        "  job view          p50 {:6.1} ms   p99 {:6.1} ms   max {:6.1} ms over {} reads during the run (target p99 ≤ 20 ms)",
        m.view_p50, m.view_p99, m.view_max, m.views
    );
    println!(
        "  completion        {:8.0} shards/s ({:.1} s for the run, the fold included)",
        shards as f64 / m.run.as_secs_f64(),
        m.run.as_secs_f64()
    );
    Ok(())
}

struct Measured {
    submit: Duration,
    rss_idle: f64,
    rss_after_submit: f64,
    rss_peak: f64,
    view_p50: f64,
    view_p99: f64,
    view_max: f64,
    views: usize,
    run: Duration,
}

/// `VmRSS` and `VmHWM` of `pid`, in MB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn measure(
    url: &str,
    pid: u32,
    shards: usize,
    executors: usize,
    batch: u32,
) -> Result<Measured, String> {
    let admin = Client::new(url, ADMIN);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_idle, _) = memory(pid);
    let spec = JobSpec::from_toml(&format!(
        "name = \"scale\"\ncode = \"pass\"\nshards = {{ count = {shards} }}\naggregate = \"count\"\n\
         [verify]\nrecheck = \"none\"\n"
    ))
    .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let job = admin.submit(&spec).await.map_err(|e| e.to_string())?;
    let submit = t0.elapsed();
    let (rss_after_submit, _) = memory(pid);

    let mut agents = Vec::with_capacity(executors);
    let enroll = Client::new(url, ENROLL);
    for i in 0..executors {
        let mut seed = [9u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let r = enroll
            .enroll(&EnrollRequest {
                name: format!("busy-{i}"),
                slots: batch,
                public_key: hex::encode(key.verifying_key().as_bytes()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("enrolling executor {i}: {e}"))?;
        agents.push((Client::new(url, &r.agent_token), key));
    }
    let running = Arc::new(AtomicBool::new(true));
    let prober = tokio::spawn(probe(admin.clone(), job.id.clone(), running.clone()));
    let start = Instant::now();
    let handles: Vec<_> = agents
        .into_iter()
        .map(|(agent, key)| tokio::spawn(execute(agent, key, batch)))
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.await.map_err(|e| e.to_string())??;
    }
    if total != shards {
        return Err(format!(
            "{total} of {shards} shards were leased and reported"
        ));
    }
    loop {
        let view = admin.job(&job.id).await.map_err(|e| e.to_string())?;
        if view.state == JobState::Completed {
            break;
        }
        if view.state.is_final() {
            return Err(format!("the job ended `{}`", view.state));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = start.elapsed();
    running.store(false, Ordering::Relaxed);
    let mut views = prober.await.map_err(|e| e.to_string())?;
    let (_, rss_peak) = memory(pid);
    views.sort_by(f64::total_cmp);
    let at = |q: f64| {
        views
            .get(((views.len() as f64 * q) as usize).min(views.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Measured {
        submit,
        rss_idle,
        rss_after_submit,
        rss_peak,
        view_p50: at(0.50),
        view_p99: at(0.99),
        view_max: views.last().copied().unwrap_or(0.0),
        views: views.len(),
        run,
    })
}

/// Read the job's view every 50 ms while `running`; each read's latency in ms.
async fn probe(admin: Client, job: String, running: Arc<AtomicBool>) -> Vec<f64> {
    let mut latencies = Vec::new();
    while running.load(Ordering::Relaxed) {
        let t = Instant::now();
        if admin.job(&job).await.is_ok() {
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies
}

/// A protocol-level executor: lease up to `batch`, report them all done (signed), until the
/// queue is empty; how many it reported.
pub(crate) async fn execute(
    agent: Client,
    key: ed25519_dalek::SigningKey,
    batch: u32,
) -> Result<usize, String> {
    let mut done = 0usize;
    loop {
        let lease = agent
            .lease(&LeaseRequest {
                max_tasks: batch,
                wait_ms: 0,
                backend: None,
                hardened_only: false,
                cached_code: Vec::new(),
                sessions: false,
            })
            .await
            .map_err(|e| e.to_string())?;
        if lease.tasks.is_empty() {
            return Ok(done);
        }
        let reports: Vec<ShardReport> = lease
            .tasks
            .into_iter()
            .map(|t| {
                let mut r = ShardReport::new(
                    t.lease_id,
                    t.task_id,
                    ExecutionReport::unmeasured(Status::Ok, Some(serde_json::json!(1))),
                );
                r.attempt = t.attempt;
                r.sign(&key);
                r
            })
            .collect();
        done += reports.len();
        agent
            .report(&ReportBatch { reports })
            .await
            .map_err(|e| e.to_string())?;
    }
}
