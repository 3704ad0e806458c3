//! `/metrics`: valid under `promtool check metrics`, the listed series present with the values
//! a job left, the same totals from two coordinators on one database, and a real Prometheus
//! server scraping a live coordinator.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetbox_proto::JobState;

use crate::support::{Coordinator, Db, Killed, spec, tool};

async fn scrape(c: &Coordinator, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("{}/metrics", c.running.url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// A coordinator on SQLite with one agent, after a job of `shards` shards of `code`
/// completed.
async fn after_a_job(code: &str, shards: u32) -> Option<Coordinator> {
    let mut c = Coordinator::start(Db::Sqlite).await?;
    c.agent("a", Default::default());
    let r = c
        .run(
            &spec(&format!(
                "name = \"m\"\ncode = {code:?}\nshards = {{ count = {shards} }}\naggregate = \"sum\"\n"
            )),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    Some(c)
}

/// The value of the series written exactly as `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_what_a_job_did_and_pass_promtool() {
    for db in crate::support::BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a", Default::default());
        let code = "import os\ni = int(os.environ['FLEETBOX_SHARD_INDEX'])\nif i == 3:\n    raise SystemExit(2)\nprint(i)\n";
        let r = c
            .run(
                &spec(&format!(
                    "name = \"m\"\ncode = {code:?}\nshards = {{ count = 4 }}\naggregate = \"sum\"\nmax_attempts = 1\nallow_partial = true\n[verify]\nrecheck = \"all\"\n"
                )),
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        let (status, _) = scrape(&c, None).await;
        assert_eq!(status, 401, "{db:?}: /metrics needs a token");
        let (status, text) = scrape(&c, Some(&c.running.admin_token)).await;
        assert_eq!(status, 200);
        for (series, want) in [
            ("fleetbox_tasks_total{state=\"accepted\"}", 3.0),
            ("fleetbox_tasks_total{state=\"rejected\"}", 1.0),
            ("fleetbox_tasks{state=\"queued\"}", 0.0),
            ("fleetbox_tasks{state=\"accepted\"}", 3.0),
            ("fleetbox_agents{state=\"online\"}", 1.0),
            // The three successes and the failure, each confirmed by the server's run.
            ("fleetbox_verification_total{verdict=\"valid\"}", 4.0),
            ("fleetbox_runs_total{status=\"ok\"}", 3.0),
            ("fleetbox_runs_total{status=\"error\"}", 1.0),
            ("fleetbox_lease_expired_total", 0.0),
            ("fleetbox_job_age_seconds", 0.0),
            (
                "fleetbox_http_requests_total{route=\"/v1/jobs\",method=\"POST\",status=\"201\"}",
                1.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(want), "{db:?}: {series}\n{text}");
        }
        assert!(
            text.contains("fleetbox_http_request_duration_seconds_bucket{route=\"/v1/jobs/{id}/result\",le=\"+Inf\"}"),
            "{text}"
        );
        assert!(
            text.contains("fleetbox_task_duration_seconds_count{backend=\"process\"}"),
            "{text}"
        );
        assert!(
            text.contains("fleetbox_agent_execution_total{agent=\""),
            "{text}"
        );
        for family in [
            "fleetbox_queue_depth",
            "fleetbox_processing_lag_seconds",
            "fleetbox_sandbox_violations_total",
            "fleetbox_review_flags_total",
        ] {
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        crate::support::promtool_accepts(&text);
        // A second coordinator on the same database reports the same stored totals.
        if db == Db::Postgres {
            let mut second = c.running.state.config.clone();
            second.listen = "127.0.0.1:0".parse().unwrap();
            second.data_dir = c.dir.path().join("second");
            let other = fleetbox_server::start(second).await.unwrap();
            let resp = reqwest::Client::new()
                .get(format!("{}/metrics", other.url()))
                .bearer_auth(&other.admin_token)
                .send()
                .await
                .unwrap();
            let theirs = resp.text().await.unwrap();
            for series in [
                "fleetbox_tasks_total{state=\"accepted\"}",
                "fleetbox_verification_total{verdict=\"valid\"}",
            ] {
                assert_eq!(value(&theirs, series), value(&text, series), "{series}");
            }
            other.shutdown().await;
        }
        c.stop().await;
    }
}

/// A real Prometheus server (the Debian package) scrapes a live coordinator; its query API
/// then answers for series a job moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_two_coordinators_through_the_dashboards_queries() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    // Two coordinators on one PostgreSQL: the one that ran the job, and one that did not.
    let Some(url) = fleetbox_testkit::postgres_database().await else {
        return;
    };
    let on_shared = |config: &mut fleetbox_server::ServerConfig| {
        config.database_url = Some(url.clone());
    };
    let Some(mut c) = Coordinator::start_with(Db::Postgres, on_shared).await else {
        return;
    };
    c.agent("a", Default::default());
    let r = c
        .run(
            &spec(
                "name = \"m\"\ncode = \"print(2)\"\nshards = { count = 5 }\naggregate = \"sum\"\n",
            ),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    let Some(other) = Coordinator::start_with(Db::Postgres, |config| {
        config.database_url = Some(url.clone());
        config.admin_token = Some(c.running.admin_token.clone());
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: fleetbox\n    metrics_path: /metrics\n    authorization:\n      credentials: {}\n    static_configs:\n      - targets: ['{}', '{}']\n",
            c.running.admin_token, c.running.addr, other.running.addr
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _server = Killed(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    // Every series of a query's answer: (its labels, its value).
    let query = |q: String| {
        let http = http.clone();
        async move {
            let resp = http
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", q.as_str())])
                .send()
                .await
                .ok()?;
            let body: serde_json::Value = resp.json().await.ok()?;
            let rows = body["data"]["result"].as_array()?.iter().map(|r| {
                let value = r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok());
                (r["metric"].clone(), value.unwrap_or(f64::NAN))
            });
            Some(rows.collect::<Vec<_>>())
        }
    };
    let one = |q: &'static str| {
        let query = &query;
        async move {
            query(q.to_string())
                .await
                .and_then(|r| r.first().map(|(_, v)| *v))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if one("count(up{job=\"fleetbox\"} == 1)").await == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        one("count(up{job=\"fleetbox\"} == 1)").await,
        Some(2.0),
        "prometheus log:\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    // Both serve the database's series (a plain `sum` would say twice the truth)...
    assert_eq!(
        one("sum(fleetbox_tasks_total{state=\"accepted\"})").await,
        Some(10.0)
    );
    // ...and the dashboard's own queries read the truth.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../../resources/grafana/fleetbox.json")).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    let find = |name: &str| {
        exprs
            .iter()
            .find(|e| {
                e.contains(&format!("({name})"))
                    || e.contains(&format!("({name}["))
                    || e.contains(&format!("(rate({name}["))
            })
            .unwrap_or_else(|| panic!("no panel reads `{name}`: {exprs:?}"))
            .clone()
    };
    let by = |rows: Vec<(serde_json::Value, f64)>, label: &str, value: &str| {
        rows.iter()
            .find(|(m, _)| m[label] == value)
            .map(|(_, v)| *v)
    };
    let tasks = query(find("fleetbox_tasks")).await.unwrap();
    assert_eq!(by(tasks, "state", "accepted"), Some(5.0));
    let agents = query(find("fleetbox_agents")).await.unwrap();
    assert_eq!(by(agents, "state", "online"), Some(1.0));
    // Per-process series are summed: the run times reported to the first coordinator.
    let runs = one("sum(fleetbox_task_duration_seconds_count)").await;
    assert!(runs.is_some_and(|n| n >= 5.0), "{runs:?}");
    other.stop().await;
    c.stop().await;
}

/// The Grafana dashboard in `resources/grafana/` queries only series a live coordinator
/// serves (a histogram's `_bucket`, `_sum` and `_count` included), and every panel reads the
/// dashboard's Prometheus data source: a renamed metric breaks this test, not the dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_served_series() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../../resources/grafana/fleetbox.json"))
            .expect("the dashboard is JSON");
    let Some(c) = after_a_job("print(1)", 3).await else {
        return;
    };
    let (status, text) = scrape(&c, Some(&c.running.admin_token)).await;
    assert_eq!(status, 200);
    let mut served = std::collections::HashSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        served.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                served.insert(format!("{name}{suffix}"));
            }
        }
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut queried = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names: Vec<&str> = expr
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .filter(|w| w.starts_with("fleetbox_"))
                .collect();
            assert!(
                !names.is_empty(),
                "{title}: `{expr}` reads no fleetbox series"
            );
            for name in names {
                assert!(
                    served.contains(name),
                    "{title}: `{expr}` reads `{name}`, which /metrics does not serve"
                );
                // Every coordinator serves the database's series: summing them across
                // coordinators would multiply them.
                if fleetbox_server::metrics::DATABASE_SERIES.contains(&name) {
                    assert!(
                        expr.contains("max"),
                        "{title}: `{expr}` must take the `max` of `{name}` across coordinators"
                    );
                }
                queried += 1;
            }
        }
    }
    eprintln!(
        "{queried} series references in {} panels, all served",
        panels.len()
    );
    c.stop().await;
}

/// The processing lag is how long the oldest ready shard has waited: a paused job's shards
/// are not ready (the panel's latency alert never fires for them), a resumed job's are.
#[tokio::test]
async fn the_processing_lag_counts_ready_shards_only() {
    for db in crate::support::BOTH {
        let dir = tempfile::tempdir().unwrap();
        let Some(url) = crate::support::database(db, dir.path()).await else {
            continue;
        };
        let store = fleetbox_server::store::Store::open(&url).await.unwrap();
        let t0 = fleetbox_server::store::now_ms();
        let later = t0 + 120_000;
        let lag = |m: fleetbox_server::metrics::Stored| m.lag_seconds;
        assert_eq!(
            lag(store.stored_metrics(later, None).await.unwrap()),
            0.0,
            "{db:?}: empty"
        );
        store
            .insert_job(&crate::support::new_job("job_lag", 3, 3))
            .await
            .unwrap();
        store
            .pause_job("default", "job_lag", true, "admin:test")
            .await
            .unwrap();
        let paused = store.stored_metrics(later, None).await.unwrap();
        assert_eq!(
            lag(paused),
            0.0,
            "{db:?}: a paused job's shards are not waiting"
        );
        store
            .pause_job("default", "job_lag", false, "admin:test")
            .await
            .unwrap();
        let waiting = lag(store.stored_metrics(later, None).await.unwrap());
        assert!((119.0..=121.0).contains(&waiting), "{db:?}: {waiting}");
        store.close().await;
    }
}
