//! End to end: N shards of a 10 ms Python program through a real coordinator and 2 local agent
//! processes (1 slot each, `process` backend), against GNU `parallel -j2` running the same
//! program. Target: fleetbox / parallel under 1.25 (without verification); then the same job
//! with verification on, while the agents are new and in steady state.

use fleetbox_proto::JobState;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetbox_client::Client;
use fleetbox_proto::JobSpec;

use crate::util::{fleetbox_bin, which};

const PROGRAM: &str = "import time\ntime.sleep(0.01)\n";

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(shards: usize, backend: &str) -> Result<(), String> {
    let bin = fleetbox_bin()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let prog = dir.path().join("prog.py");
    std::fs::write(&prog, PROGRAM).map_err(|e| e.to_string())?;

    // Baseline: GNU parallel, two at a time.
    let parallel = which("parallel").ok_or("GNU parallel not found: `apt-get install parallel`")?;
    // moreutils installs a `parallel` of its own, with other options, that would "finish" the
    // baseline at once: only GNU's is a baseline.
    let version = Command::new(&parallel)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !version.contains("GNU parallel") {
        return Err(format!(
            "{} is not GNU parallel (moreutils' has the same name): `apt-get install parallel`",
            parallel.display()
        ));
    }
    let seq: String = (1..=shards).map(|i| format!("{i}\n")).collect();
    let t = Instant::now();
    let mut child = Command::new(parallel)
        .args(["-j2", "/usr/bin/python3", "-I", "-B"])
        .arg(&prog)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // `parallel` appends each line as an argument; the program ignores it.
        stdin.write_all(seq.as_bytes()).map_err(|e| e.to_string())?;
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("parallel failed: {status}"));
    }
    let baseline = t.elapsed();

    // Fleetbox: coordinator + 2 agents.
    let mut procs = Kill(Vec::new());
    let mut server = Command::new(&bin)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--admin-token",
            "bench",
            "--enroll-token",
            "bench-enroll",
        ])
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = server.stdout.take().unwrap();
    procs.0.push(server);
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .and_then(Result::ok)
        .ok_or("the server did not start")?;
    let url = first
        .split_whitespace()
        .last()
        .ok_or("no URL in the server's first line")?
        .to_string();
    std::thread::spawn(move || for _ in lines {});
    for i in 0..2 {
        let agent = Command::new(&bin)
            .args([
                "agent",
                "--server",
                &url,
                "--token",
                "bench-enroll",
                "--slots",
                "1",
                "--backend",
                backend,
            ])
            .arg("--state")
            .arg(dir.path().join(format!("agent-{i}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        procs.0.push(agent);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let ours = rt.block_on(async {
        let admin = Client::new(&url, "bench");
        let wait_start = Instant::now();
        while admin.agents().await.map(|a| a.agents.len()).unwrap_or(0) < 2 {
            if wait_start.elapsed() > Duration::from_secs(30) {
                return Err("agents did not enroll".to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The same job on the same agents: without verification (the comparison with
        // `parallel`), then with the default policy while the agents are new (every result
        // re-run on the coordinator until each has `--trusted-after` valid in a row), then,
        // once both are trusted (more untimed runs if need be), in steady state.
        let mut times = Vec::new();
        let mut shard_median = 0.0;
        let trusted = || async {
            let agents = admin.agents().await.map_err(|e| e.to_string())?.agents;
            Ok::<bool, String>(
                agents
                    .iter()
                    .all(|a| a.trust.iter().any(|t| t.recheck_rate < 1.0)),
            )
        };
        let mut warm_ups = 0;
        for phase in 0.. {
            let (verify, timed) = match phase {
                0 => ("[verify]\nrecheck = \"none\"\n", true),
                1 => ("", true),
                _ => {
                    let steady = trusted().await?;
                    if !steady {
                        warm_ups += 1;
                        if warm_ups > 20 {
                            return Err("the agents were never trusted".into());
                        }
                    }
                    ("", steady)
                }
            };
            let spec = JobSpec::from_toml(&format!(
                "name = \"e2e\"\ncode = '''{PROGRAM}'''\nshards = {{ count = {shards} }}\naggregate = \"count\"\n{verify}"
            ))
            .map_err(|e| e.to_string())?;
            let t = Instant::now();
            let job = admin.submit(&spec).await.map_err(|e| e.to_string())?;
            loop {
                let v = admin.job(&job.id).await.map_err(|e| e.to_string())?;
                if v.state.is_final() {
                    if v.state != JobState::Completed || v.shards.accepted != shards as u64 {
                        return Err(format!("job ended `{}` with {:?}", v.state, v.shards));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if timed {
                times.push(t.elapsed());
            }
            if phase == 0 {
                shard_median = admin
                    .result(&job.id)
                    .await
                    .map_err(|e| e.to_string())?
                    .summary
                    .ok_or("no summary")?
                    .shard_wall_ms
                    .median;
            }
            if times.len() == 3 {
                break;
            }
        }
        Ok((times, shard_median))
    })?;
    let (times, shard_median) = ours;
    let ours = times[0];
    println!("e2e: {shards} shards of a 10 ms program, 2 workers");
    println!(
        "  GNU parallel -j2          {:8.0} ms  ({:.1} ms/shard/worker)",
        baseline.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 2e3 / shards as f64
    );
    println!(
        "  fleetbox 2 agents ({backend:7}) {:6.0} ms  ({:.1} ms/shard/worker)   ratio {:.2} (target < 1.25)",
        ours.as_secs_f64() * 1e3,
        ours.as_secs_f64() * 2e3 / shards as f64,
        ours.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  (median shard run as the sandbox measured it: {shard_median:.0} ms; the rest of each cycle is sandbox set-up, lease and report)"
    );
    println!(
        "  with verification, new agents  {:6.0} ms   on/off {:.2}",
        times[1].as_secs_f64() * 1e3,
        times[1].as_secs_f64() / ours.as_secs_f64()
    );
    println!(
        "  with verification, steady      {:6.0} ms   on/off {:.2}",
        times[2].as_secs_f64() * 1e3,
        times[2].as_secs_f64() / ours.as_secs_f64()
    );
    Ok(())
}
