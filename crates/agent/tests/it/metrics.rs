//! The agent's own `/metrics` (`--metrics-listen`): off unless asked; when asked, on the
//! address it writes to `STATE/metrics.addr`, with what the agent did (slots, runs by status,
//! shards leased, outbox, sandbox overhead), valid under `promtool check metrics` when the
//! test script has installed it.

use std::time::Duration;

use fleetbox_proto::JobState;
use fleetbox_testkit::{Coordinator, Db, spec};

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_its_own_metrics_when_asked() {
    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
        return;
    };
    c.agent_with("exported", |config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    c.agent("quiet", Default::default());
    let r = c
        .run(
            &spec("name = \"m\"\ncode = \"import os, sys\\nif os.environ['FLEETBOX_SHARD_INDEX'] == '5':\\n    sys.exit(3)\\nprint(1)\"\nshards = { count = 8 }\naggregate = \"sum\"\nmax_attempts = 1\nallow_partial = true\n"),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    assert!(
        !c.agent_state("quiet").join("metrics.addr").exists(),
        "metrics are opt-in"
    );
    let addr = std::fs::read_to_string(c.agent_state("exported").join("metrics.addr")).unwrap();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(value(&text, "fleetbox_agent_slots"), Some(2.0), "{text}");
    assert_eq!(
        value(&text, "fleetbox_agent_slots_busy"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "fleetbox_agent_outbox_reports"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "fleetbox_agent_warm_sandboxes"),
        Some(0.0),
        "{text}"
    );
    // What this agent ran of the 8 shards (the other agent ran the rest), counted three ways.
    let ok = value(&text, "fleetbox_agent_runs_total{status=\"ok\"}").unwrap_or(0.0);
    let failed = value(&text, "fleetbox_agent_runs_total{status=\"error\"}").unwrap_or(0.0);
    let leased = value(&text, "fleetbox_agent_leased_total").unwrap();
    let timed = value(&text, "fleetbox_agent_sandbox_overhead_seconds_count").unwrap();
    assert!(ok + failed > 0.0, "{text}");
    assert_eq!(ok + failed, leased, "{text}");
    assert_eq!(timed, leased, "{text}");
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
    {
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing: scripts/test installs it"
        );
    }
    c.stop().await;
}
