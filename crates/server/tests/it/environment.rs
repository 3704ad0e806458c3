//! Jobs that ask for packages (`[environment]`) with real agents, a real package index and the
//! coordinator's re-checks: each agent builds the environment once, every report names it, a
//! second job reuses it, and a requirement that cannot be installed ends the job with the
//! installer's message instead of hanging.

use std::time::Duration;

use fleetbox_proto::{JobState, Status};
use serde_json::{Value, json};

use crate::support::{BOTH, Coordinator, spec};

const CODE: &str = "import json, os, six\nitems = json.load(open(os.environ['FLEETBOX_INPUT']))['items']\nprint(json.dumps({'six': six.__version__, 'sum': sum(int(i) for i in items)}))\n";

fn job(requirements: &str, shards: u64, verify: &str) -> fleetbox_proto::JobSpec {
    let items: Vec<String> = (0..shards).map(|i| i.to_string()).collect();
    spec(&format!(
        "name = \"env\"\ncode = {CODE:?}\nmax_attempts = 2\n[environment]\nrequirements = [{requirements}]\n[shards]\nitems = [{}]\nper_shard = 1\n{verify}",
        items.join(", ")
    ))
}

/// The environment notes of every attempt of every shard of a job.
async fn notes(c: &Coordinator, job: &str, shards: u64) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..shards {
        let detail = c.client.shard(job, i).await.unwrap();
        for a in detail.attempts {
            let env = &a.report["environment"];
            assert!(env["hash"].is_string(), "{}", a.report);
            let notes = a.report["notes"].as_array().cloned().unwrap_or_default();
            out.extend(
                notes
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|n| n.starts_with("environment "))
                    .map(String::from),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_builds_a_job_environment_once_and_the_next_job_reuses_it() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a", Default::default());
        c.agent("b", Default::default());
        let shards = 12;
        let first = job("\"six==1.16.0\"", shards, "[verify]\nrecheck = \"all\"\n");
        let want_hash = first.environment.as_ref().unwrap().hash();
        let r = c.run(&first, Duration::from_secs(120)).await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        let result: Value = serde_json::from_str(r.result.as_ref().unwrap().get()).unwrap();
        let values = result.as_array().unwrap();
        assert_eq!(values.len(), shards as usize);
        for (i, v) in values.iter().enumerate() {
            assert_eq!(v, &json!({"six": "1.16.0", "sum": i}), "{db:?}");
        }
        // Every agent's and the coordinator's report names the environment and what it holds.
        let detail = c.client.shard(&r.id, 0).await.unwrap();
        for a in &detail.attempts {
            assert_eq!(a.report["environment"]["hash"], want_hash, "{db:?}");
            let packages = a.report["environment"]["packages"].as_array().unwrap();
            assert!(
                packages.contains(&json!({"name": "six", "version": "1.16.0"})),
                "{db:?}: {packages:?}"
            );
        }
        if !detail.attempts.iter().any(|a| a.agent_id == "server") {
            // Seen once under the full suite's load (verdict inconclusive, no server run):
            // say what the check found, so the next time names its cause.
            let verified = c
                .client
                .audit(&format!("job={}&action=attempt.verified", r.id))
                .await
                .map(|p| p.entries.into_iter().map(|e| e.details).collect::<Vec<_>>());
            panic!(
                "{db:?}: the coordinator did not re-run it in the same environment: {:?}; its checks: {verified:?}",
                detail.attempts
            );
        }
        let built: Vec<String> = notes(&c, &r.id, shards)
            .await
            .into_iter()
            .filter(|n| n.contains("built for this run"))
            .collect();
        // Once per agent that ran a shard, and once on the coordinator.
        assert!(
            (1..=3).contains(&built.len()),
            "{db:?}: one build per machine: {built:?}"
        );
        for dir in ["agents/a/envs", "agents/b/envs", "envs"] {
            let ready = std::fs::read_dir(c.dir.path().join(dir))
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                        .count()
                })
                .unwrap_or(0);
            assert!(ready <= 1, "{db:?}: {dir} holds {ready} environments");
        }

        // The next job with the same requirements (in another order) builds nothing.
        let second = job("\"six==1.16.0\", \"six==1.16.0\"", 6, "");
        assert_eq!(second.environment.as_ref().unwrap().hash(), want_hash);
        let r2 = c.run(&second, Duration::from_secs(60)).await;
        assert_eq!(r2.state, JobState::Completed, "{db:?}: {r2:?}");
        let again = notes(&c, &r2.id, 6).await;
        assert!(
            again.iter().all(|n| n.contains("reused from the cache")),
            "{db:?}: {again:?}"
        );
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requirement_that_cannot_be_installed_ends_the_job_with_the_installers_message() {
    let Some(mut c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());
    let bad = job("\"fleetbox-no-such-package-zzq==1.0\"", 3, "");
    let r = c.run(&bad, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Failed, "{r:?}");
    let detail = c.client.shard(&r.id, 0).await.unwrap();
    assert!(!detail.attempts.is_empty());
    for a in &detail.attempts {
        assert_eq!(a.status, Status::SandboxError);
        let message = a.report["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("building the environment")
                && message.contains("fleetbox-no-such-package-zzq"),
            "{message}"
        );
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirements_that_are_options_or_urls_are_refused_at_submission() {
    let Some(c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    for (bad, field) in [
        (
            "\"--index-url=http://127.0.0.1:9/simple\"",
            "environment.requirements[0]",
        ),
        (
            "\"six\", \"pkg @ file:///etc/passwd\"",
            "environment.requirements[1]",
        ),
    ] {
        let err = c.client.submit(&job(bad, 1, "")).await.unwrap_err();
        assert_eq!(err.code(), Some("invalid_spec"), "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}
