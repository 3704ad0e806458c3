//! `POST /v1/run` latency: `print(1)` from request to answer on `fleetbox up` (coordinator, 2
//! local agents with warm jails, SQLite), p50 and p99 over N sequential calls after the agents
//! earned their trust (a new agent's results wait for the coordinator's re-run). Baseline: bare
//! `python3 -I -B -c 'print(1)'` in the same run. Target: p50 under 25 ms. Then the same calls
//! in one session (`POST /v1/sessions/{id}/run`: the interpreter is already up), against
//! `/v1/run` measured just before.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetbox_client::Client;
use fleetbox_proto::JobState;
use fleetbox_proto::api::RunBody;

use crate::util::{fleetbox_bin, median_of, ms};

pub fn run(calls: usize) -> Result<(), String> {
    let bin = fleetbox_bin()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut up = Command::new(&bin)
        .args(["up", "--listen", "127.0.0.1:0", "--agents", "2"])
        .arg("--data")
        .arg(dir.path().join("data"))
        .env("FLEETBOX_ADMIN_TOKEN", "bench")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = up.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .ok_or("`fleetbox up` did not start")?;
        if let Some(rest) = line.strip_prefix("fleetbox: coordinator on ") {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let result = measure(&url, calls);
    // SIGTERM: agents drain, then the coordinator stops.
    let _ = Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status();
    let _ = up.wait();
    let (run, session, bare) = result?;
    let Timings { p50, p99, mean } = run;
    println!(
        "run: POST /v1/run `print(1)` on `fleetbox up` (2 agents, warm jails, SQLite), {calls} calls"
    );
    println!("  bare python3 -I -B -c 'print(1)'  {:7.2} ms", ms(bare));
    println!(
        "  /v1/run p50 {:7.2} ms   p99 {:7.2} ms   mean {:7.2} ms   p50/bare {:.2}",
        ms(p50),
        ms(p99),
        ms(mean),
        ms(p50) / ms(bare)
    );
    println!(
        "  session call p50 {:7.2} ms   p99 {:7.2} ms   mean {:7.2} ms   p50 session/run {:.2}",
        ms(session.p50),
        ms(session.p99),
        ms(session.mean),
        ms(session.p50) / ms(p50)
    );
    Ok(())
}

/// One series of calls: median, 99th percentile and mean.
struct Timings {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

impl Timings {
    fn of(mut times: Vec<Duration>) -> Timings {
        let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        Timings {
            p50: at(0.50),
            p99: at(0.99),
            mean,
        }
    }
}

fn measure(url: &str, calls: usize) -> Result<(Timings, Timings, Duration), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = Client::new(url, "bench");
    let body = RunBody {
        code: "print(1)\n".into(),
        ..Default::default()
    };
    let once = || async {
        let start = Instant::now();
        let answer = client.run(&body).await.map_err(|e| e.to_string())?;
        let took = start.elapsed();
        if answer.state != JobState::Completed {
            return Err(format!(
                "the run ended `{}`: {:?}",
                answer.state, answer.error
            ));
        }
        Ok::<_, String>(took)
    };
    rt.block_on(async {
        let start = Instant::now();
        while client.agents().await.map(|a| a.agents.len()).unwrap_or(0) < 2 {
            if start.elapsed() > Duration::from_secs(30) {
                return Err("the local agents did not enroll".to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Until both agents are trusted (`--trusted-after` valid results in a row each, every
        // one re-run by the coordinator), then timed: the steady state.
        let mut warm = 0;
        loop {
            // The local agents, not the coordinator's server agents (hardened, for server-only
            // code), which run none of these.
            let agents: Vec<_> = (client.agents().await.map_err(|e| e.to_string())?.agents)
                .into_iter()
                .filter(|a| !a.hardened)
                .collect();
            let trusted =
                |a: &fleetbox_proto::api::AgentView| a.trust.iter().any(|t| t.recheck_rate < 1.0);
            if agents.len() >= 2 && agents.iter().all(trusted) {
                break;
            }
            if warm >= 5_000 {
                return Err(format!("the agents were not trusted after {warm} calls"));
            }
            for _ in 0..50 {
                once().await?;
            }
            warm += 50;
        }
        println!("  warm-up: {warm} calls until both agents were trusted");
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            times.push(once().await?);
        }
        let run = Timings::of(times);
        let session = session_calls(&client, calls).await?;
        let bare = median_of(&["/usr/bin/python3", "-I", "-B", "-c", "print(1)"], 50)?;
        Ok((run, session, bare))
    })
}

/// `calls` calls of `print(1)` in one session (opened first, closed after).
async fn session_calls(client: &Client, calls: usize) -> Result<Timings, String> {
    let opened = client
        .open_session(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    if opened.session.state != "open" {
        return Err(format!("the session did not open: {:?}", opened.session));
    }
    let id = opened.session.id;
    let body = fleetbox_proto::api::SessionCallBody {
        code: "print(1)\n".into(),
        ..Default::default()
    };
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        let answer = client
            .session_run(&id, &body)
            .await
            .map_err(|e| e.to_string())?;
        times.push(start.elapsed());
        if answer.state != JobState::Completed {
            return Err(format!("a session call ended `{}`", answer.state));
        }
    }
    let _ = client.close_session(&id).await;
    Ok(Timings::of(times))
}
