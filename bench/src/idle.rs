//! What idle agents cost a coordinator: `fleetbox server` (release build, SQLite, no server
//! agents) in its own process, and N simulated agents in this one, each as a real agent idles:
//! a heartbeat every 2 s and a lease long poll (30 s) always outstanding. Over a window, the
//! coordinator's CPU (from `/proc/PID/stat`) and its database writes (its own counter,
//! `fleetbox_store_writes_total` on `/metrics`), against the same window with no agent (the
//! baseline) and against the heartbeats the agents sent. Target: 1,000 idle agents cost at most
//! 10% of one core and no writes beyond their heartbeats (written together: one transaction
//! every 250 ms). Each agent holds two connections on
//! each side: the descriptor limit (`ulimit -n`) must allow twice the agents and some.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetbox_client::Client;
use fleetbox_proto::api::{EnrollRequest, HeartbeatRequest, LeaseRequest};

use crate::util::fleetbox_bin;

const ADMIN: &str = "bench-admin";
const ENROLL: &str = "bench-enroll";
const HEARTBEAT: Duration = Duration::from_secs(2);

pub fn run(agents: usize, seconds: u64) -> Result<(), String> {
    let bin = fleetbox_bin()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut server = Command::new(&bin)
        .args(["server", "--listen", "127.0.0.1:0", "--server-agents", "0"])
        .arg("--data")
        .arg(dir.path())
        .env("FLEETBOX_ADMIN_TOKEN", ADMIN)
        .env("FLEETBOX_ENROLL_TOKEN", ENROLL)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = listening(&mut server).and_then(|url| measure(&url, server.id(), agents, seconds));
    let _ = server.kill();
    let _ = server.wait();
    let (alone, idle) = result?;
    println!(
        "idle: `fleetbox server` (SQLite) with {agents} simulated idle agents (heartbeat every 2 s, \
         a 30 s lease poll always open), {seconds} s windows"
    );
    println!(
        "  no agent      CPU {:5.2}% of a core   writes {:6.1}/s",
        alone.cpu_percent, alone.writes_per_s
    );
    // Heartbeats are written together, one transaction every 250 ms (4 a second) at most.
    println!(
        "  {agents:>5} agents  CPU {:5.2}% of a core   writes {:6.1}/s   heartbeats {:6.1}/s   \
         (target ≤ 10%, and no writes but the heartbeats': at most 4/s)",
        idle.cpu_percent, idle.writes_per_s, idle.heartbeats_per_s,
    );
    println!(
        "  CPU per agent {:.3}% of a core; ratio to the coordinator alone {:.1}",
        (idle.cpu_percent - alone.cpu_percent) / agents as f64,
        idle.cpu_percent / alone.cpu_percent.max(0.01)
    );
    Ok(())
}

/// The address `fleetbox server` says it listens on.
pub(crate) fn listening(server: &mut Child) -> Result<String, String> {
    let stdout = server.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .ok_or("`fleetbox server` did not start")?;
        if let Some(rest) = line.strip_prefix("fleetbox: coordinator listening on ") {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(url)
}

/// One window's costs.
struct Window {
    cpu_percent: f64,
    writes_per_s: f64,
    heartbeats_per_s: f64,
}

fn measure(url: &str, pid: u32, agents: usize, seconds: u64) -> Result<(Window, Window), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let admin = Client::new(url, ADMIN);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let beats = Arc::new(AtomicU64::new(0));
        let alone = window(&admin, pid, seconds, &beats).await?;
        let enroll = Client::new(url, ENROLL);
        let mut tasks = Vec::with_capacity(agents);
        for i in 0..agents {
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            let resp = enroll
                .enroll(&EnrollRequest {
                    name: format!("idle-{i}"),
                    slots: 1,
                    public_key: hex::encode(key.verifying_key().as_bytes()),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("enrolling agent {i}: {e}"))?;
            let client = Client::new(url, &resp.agent_token);
            tasks.push(tokio::spawn(idle_agent(client, beats.clone())));
        }
        // Let every agent reach its steady state (first heartbeat and poll) before measuring.
        tokio::time::sleep(HEARTBEAT * 2).await;
        let idle = window(&admin, pid, seconds, &beats).await?;
        let online = admin
            .agents()
            .await
            .map_err(|e| e.to_string())?
            .agents
            .iter()
            .filter(|a| a.state == fleetbox_proto::AgentState::Online)
            .count();
        for t in tasks {
            t.abort();
        }
        if online != agents {
            return Err(format!("{online} of {agents} agents online at the end"));
        }
        Ok((alone, idle))
    })
}

/// An idle agent: a heartbeat every 2 s, a lease poll always open.
async fn idle_agent(client: Client, beats: Arc<AtomicU64>) {
    let poller = client.clone();
    tokio::spawn(async move {
        let req = LeaseRequest {
            max_tasks: 1,
            wait_ms: 30_000,
            backend: Some("jail".into()),
            hardened_only: false,
            cached_code: Vec::new(),
            sessions: false,
        };
        loop {
            if poller.lease(&req).await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        if client.heartbeat(&HeartbeatRequest::default()).await.is_ok() {
            beats.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn window(
    admin: &Client,
    pid: u32,
    seconds: u64,
    beats: &AtomicU64,
) -> Result<Window, String> {
    let (cpu0, writes0, beats0) = (
        cpu_ticks(pid)?,
        writes(admin).await?,
        beats.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu1, writes1, beats1) = (
        cpu_ticks(pid)?,
        writes(admin).await?,
        beats.load(Ordering::Relaxed),
    );
    let secs = started.elapsed().as_secs_f64();
    let hz = clock_ticks_per_second();
    Ok(Window {
        cpu_percent: (cpu1 - cpu0) as f64 / hz / secs * 100.0,
        // The scrape itself is not a write; the count is the coordinator's own.
        writes_per_s: writes1.saturating_sub(writes0) as f64 / secs,
        heartbeats_per_s: beats1.saturating_sub(beats0) as f64 / secs,
    })
}

/// The process's user + system CPU in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(field(14) + field(15))
}

/// `fleetbox_store_writes_total` from the coordinator's `/metrics`.
async fn writes(admin: &Client) -> Result<u64, String> {
    let text = admin.metrics().await.map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix("fleetbox_store_writes_total "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no fleetbox_store_writes_total in /metrics".to_string())
}

/// `getconf CLK_TCK` (100 on every Linux this runs on; asked, not assumed).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
