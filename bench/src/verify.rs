//! What verification costs and what it catches, with a real coordinator (its real sandbox:
//! `jail` where the host allows it) and in-process agents on the `process` backend.
//!
//! 1. Overhead with honest agents under the default policy (`adaptive`): sandbox CPU seconds the
//!    coordinator's re-runs spent / CPU seconds the agents spent on the same job, once while the
//!    agents are new (warm-up) and once in steady state; and the job's wall time with
//!    verification on against `recheck = "none"`; and a steady-state job whose every tenth
//!    shard fails, since failures are checked like successes. Target: under 5% in steady state,
//!    failures included.
//! 2. A liar that corrupts 10% of its results from its first one, among 3 honest agents, over
//!    repeated runs: how many of its shards until it is quarantined (target: within 50 in at
//!    least 95% of runs) and how many wrong values reach a final result (target: 0).
//! 3. A sleeper, honest for 200 results and then lying on 10%, among 3 honest agents, jobs of
//!    50 shards until it is caught: its shards from its first lie to its quarantine, the jobs it
//!    tainted (`needs_review`), and the final results with a wrong value nobody flagged
//!    (target: 0).
//!
//! The coordinator's draws use the operating system's randomness (so an agent cannot predict
//! them): runs are repeated rather than seeded.

use std::time::{Duration, Instant};

use fleetbox_proto::JobState;
use fleetbox_testkit::{Coordinator, Db, spec};

/// About 15 ms of CPU per shard.
const WORK: &str = "import json, os\nn = json.load(open(os.environ['FLEETBOX_INPUT']))['index']\nprint(sum(i * i for i in range(150000)) + n)\n";
/// The same work, and every tenth shard fails after it.
const WORK_FAILING: &str = "import json, os\nn = json.load(open(os.environ['FLEETBOX_INPUT']))['index']\nv = sum(i * i for i in range(150000)) + n\nif n % 10 == 0:\n    raise ValueError('every tenth shard fails')\nprint(v)\n";

pub fn run(shards: usize, runs: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        overhead(shards).await?;
        liars(runs).await?;
        sleeper().await
    })
}

fn job(name: &str, shards: usize, verify: &str) -> fleetbox_proto::JobSpec {
    job_of(name, WORK, shards, verify)
}

fn job_of(name: &str, code: &str, shards: usize, more: &str) -> fleetbox_proto::JobSpec {
    spec(&format!(
        "name = {name:?}\ncode = {code:?}\nshards = {{ count = {shards} }}\naggregate = \"sum\"\n{more}"
    ))
}

/// (agent CPU ms, server CPU ms) spent on a job.
async fn cpu_of(c: &Coordinator, id: &str, shards: usize) -> Result<(u64, u64), String> {
    let (mut agent, mut server) = (0, 0);
    for i in 0..shards as u64 {
        let d = c.client.shard(id, i).await.map_err(|e| e.to_string())?;
        for a in d.attempts {
            let cpu = a.report["cpu_user_ms"].as_u64().unwrap_or(0)
                + a.report["cpu_sys_ms"].as_u64().unwrap_or(0);
            if a.agent_id == "server" {
                server += cpu;
            } else {
                agent += cpu;
            }
        }
    }
    Ok((agent, server))
}

/// A coordinator whose re-checks run in the host's strictest backend (its jail helper is the
/// `fleetbox` binary: this one is not).
async fn coordinator() -> Result<Coordinator, String> {
    let helper = Some(crate::util::fleetbox_bin()?);
    Coordinator::start_with(Db::Sqlite, |config| {
        config.sandbox_backend = fleetbox_sandbox::Backend::default_for_host();
        config.sandbox.jail_helper = helper;
    })
    .await
    .ok_or_else(|| "no coordinator".to_string())
}

async fn run_job(
    c: &Coordinator,
    spec: &fleetbox_proto::JobSpec,
) -> Result<(fleetbox_proto::api::JobResult, Duration), String> {
    let t = Instant::now();
    let r = c.run(spec, Duration::from_secs(900)).await;
    if r.state != JobState::Completed {
        return Err(format!("job ended {:?}: {:?}", r.state, r.error));
    }
    Ok((r, t.elapsed()))
}

async fn overhead(shards: usize) -> Result<(), String> {
    println!("verify: overhead, {shards} shards of ~15 ms CPU, 2 honest agents, default policy");
    let mut c = coordinator().await?;
    c.agent("honest-1", Default::default());
    c.agent("honest-2", Default::default());
    // Warm-up: the agents are new; every result is checked until each has `--trusted-after`
    // valid in a row. Jobs until both are trusted; their cost is the warm-up's.
    let (mut runs, mut total, mut agent_cpu, mut server_cpu) = (0, 0, 0, 0);
    loop {
        let (warm, _) = run_job(&c, &job("warm-up", shards, "")).await?;
        let (agent, server) = cpu_of(&c, &warm.id, shards).await?;
        runs += warm.summary.as_ref().map_or(0, |s| s.server_runs);
        total += shards;
        agent_cpu += agent;
        server_cpu += server;
        let agents = c.client.agents().await.map_err(|e| e.to_string())?.agents;
        if agents
            .iter()
            .all(|a| a.trust.iter().any(|t| t.recheck_rate < 1.0))
        {
            break;
        }
        if total >= 20 * shards {
            return Err("the agents were never trusted".into());
        }
    }
    println!(
        "  warm-up (new agents)  server re-runs {runs:>4} of {total} until both were trusted   server CPU / agent CPU = {:5.1}%",
        server_cpu as f64 * 100.0 / agent_cpu.max(1) as f64
    );
    // Steady state: the same agents, trusted now.
    let (steady, with) = run_job(&c, &job("steady", shards, "")).await?;
    let (agent, server) = cpu_of(&c, &steady.id, shards).await?;
    let share = server as f64 * 100.0 / agent.max(1) as f64;
    println!(
        "  steady state          server re-runs {:>4} of {shards}   server CPU / agent CPU = {share:5.1}% (target under 5%, {})",
        steady.summary.as_ref().map_or(0, |s| s.server_runs),
        if share < 5.0 { "met" } else { "NOT met" }
    );
    // Failures are claims too: checked at the same rate as successes.
    let failing = job_of(
        "steady, failing",
        WORK_FAILING,
        shards,
        "allow_partial = true\n",
    );
    let (failing, _) = run_job(&c, &failing).await?;
    let (agent, server) = cpu_of(&c, &failing.id, shards).await?;
    let share = server as f64 * 100.0 / agent.max(1) as f64;
    let failed = failing.summary.as_ref().map_or(0, |s| s.shards_failed);
    println!(
        "  steady, {failed} of {shards} failing  server re-runs {:>4} of {shards}   server CPU / agent CPU = {share:5.1}% (target under 5%, {})",
        failing.summary.as_ref().map_or(0, |s| s.server_runs),
        if share < 5.0 { "met" } else { "NOT met" }
    );
    let (_, without) = run_job(
        &c,
        &job("unverified", shards, "[verify]\nrecheck = \"none\"\n"),
    )
    .await?;
    println!(
        "  wall time, verification on / off (steady state): {:.2}s / {:.2}s = {:.3}",
        with.as_secs_f64(),
        without.as_secs_f64(),
        with.as_secs_f64() / without.as_secs_f64()
    );
    c.stop().await;
    Ok(())
}

async fn liars(runs: usize) -> Result<(), String> {
    const SHARDS: usize = 160;
    println!(
        "verify: a 10% liar among 3 honest agents, {runs} runs of {SHARDS} shards, default policy"
    );
    let mut within_50 = 0;
    let mut wrong_results = 0;
    let mut until: Vec<usize> = Vec::new();
    for _ in 0..runs {
        let mut c = coordinator().await?;
        for name in ["honest-1", "honest-2", "honest-3"] {
            c.agent(name, Default::default());
        }
        c.agent_lying("liar", Default::default(), 0.10);
        let cheap = spec(&format!(
            "name = \"liar run\"\ncode = \"import json, os\\nprint(json.load(open(os.environ['FLEETBOX_INPUT']))['index'])\"\nshards = {{ count = {SHARDS} }}\naggregate = \"sum\"\n"
        ));
        let (r, _) = run_job(&c, &cheap).await?;
        let exact: u64 = (0..SHARDS as u64).sum();
        if r.result_value() != Some(serde_json::json!(exact)) {
            wrong_results += 1;
        }
        let agents = c.client.agents().await.map_err(|e| e.to_string())?.agents;
        let liar = agents.iter().find(|a| a.name == "liar").ok_or("no liar")?;
        // Its shards up to its quarantine: the attempts its `attempt.reported` entries (one
        // per job per report call) list before that entry.
        let entries = c
            .client
            .audit("limit=5000")
            .await
            .map_err(|e| e.to_string())?
            .entries;
        let quarantined_at = entries
            .iter()
            .find(|e| e.action == "agent.quarantined" && e.agent_id.as_deref() == Some(&liar.id))
            .map(|e| e.seq);
        let reported = |upto: i64| {
            entries
                .iter()
                .filter(|e| {
                    e.action == "attempt.reported"
                        && e.agent_id.as_deref() == Some(&liar.id)
                        && e.seq < upto
                })
                .map(attempts_in)
                .sum::<usize>()
        };
        match quarantined_at {
            Some(seq) => {
                let n = reported(seq);
                until.push(n);
                if n <= 50 {
                    within_50 += 1;
                }
            }
            None => until.push(usize::MAX),
        }
        c.stop().await;
    }
    until.sort();
    let shown: Vec<String> = until
        .iter()
        .map(|n| {
            if *n == usize::MAX {
                "never".into()
            } else {
                n.to_string()
            }
        })
        .collect();
    println!(
        "  quarantined within 50 of its shards: {within_50}/{runs} runs ({:.0}%, target 95%); its shards until quarantine: {}",
        within_50 as f64 * 100.0 / runs as f64,
        shown.join(" ")
    );
    println!("  final results with a wrong value: {wrong_results}/{runs} (target 0)");
    Ok(())
}

async fn sleeper() -> Result<(), String> {
    const SHARDS: u64 = 50;
    const HONEST_FOR: u64 = 200;
    println!(
        "verify: a sleeper honest for {HONEST_FOR} results then lying on 10%, among 3 honest agents, jobs of {SHARDS}"
    );
    let mut c = coordinator().await?;
    for name in ["honest-1", "honest-2", "honest-3"] {
        c.agent(name, Default::default());
    }
    c.agent_sleeping("sleeper", HONEST_FOR, 0.10);
    let cheap = spec(&format!(
        "name = \"sleeper run\"\ncode = \"import json, os\\nprint(json.load(open(os.environ['FLEETBOX_INPUT']))['index'])\"\nshards = {{ count = {SHARDS} }}\naggregate = \"sum\"\n"
    ));
    let exact = serde_json::json!((0..SHARDS).sum::<u64>());
    let mut jobs = Vec::new();
    let mut sleeper_id = None;
    for _ in 0..200 {
        let (r, _) = run_job(&c, &cheap).await?;
        jobs.push(r.id);
        let agents = c.client.agents().await.map_err(|e| e.to_string())?.agents;
        let s = agents
            .iter()
            .find(|a| a.name == "sleeper")
            .ok_or("no sleeper")?;
        sleeper_id = Some(s.id.clone());
        if s.quarantined.is_some() {
            break;
        }
    }
    let sleeper_id = sleeper_id.ok_or("no sleeper")?;
    let mut entries = Vec::new();
    loop {
        let after = entries
            .last()
            .map_or(0, |e: &fleetbox_proto::api::AuditRecord| e.seq);
        let page = c
            .client
            .audit(&format!("agent={sleeper_id}&after={after}&limit=5000"))
            .await
            .map_err(|e| e.to_string())?
            .entries;
        if page.is_empty() {
            break;
        }
        entries.extend(page);
    }
    let quarantined_at = entries
        .iter()
        .find(|e| e.action == "agent.quarantined" && e.agent_id.as_deref() == Some(&sleeper_id))
        .map(|e| e.seq);
    let reported: Vec<(i64, usize)> = entries
        .iter()
        .filter(|e| e.action == "attempt.reported" && e.agent_id.as_deref() == Some(&sleeper_id))
        .map(|e| (e.seq, attempts_in(e)))
        .collect();
    let (mut tainted, mut unflagged_wrong) = (0, 0);
    for id in &jobs {
        let view = c.client.job(id).await.map_err(|e| e.to_string())?;
        let r = c.client.result(id).await.map_err(|e| e.to_string())?;
        if view.state == JobState::NeedsReview {
            tainted += 1;
        } else if r.result_value() != Some(exact.clone()) {
            unflagged_wrong += 1;
        }
    }
    match quarantined_at {
        Some(seq) => {
            let total: usize = reported
                .iter()
                .filter(|(s, _)| *s < seq)
                .map(|(_, n)| n)
                .sum();
            println!(
                "  caught: {} of its shards after it turned, {} jobs run, {tainted} finished jobs tainted (needs_review)",
                total.saturating_sub(HONEST_FOR as usize),
                jobs.len()
            );
        }
        None => println!("  never caught in {} jobs", jobs.len()),
    }
    println!("  final results with a wrong value nobody flagged: {unflagged_wrong} (target 0)");
    c.stop().await;
    Ok(())
}

/// How many attempts an `attempt.reported` entry lists (one entry per job per report call).
fn attempts_in(e: &fleetbox_proto::api::AuditRecord) -> usize {
    e.details["attempts"].as_array().map_or(1, Vec::len)
}
