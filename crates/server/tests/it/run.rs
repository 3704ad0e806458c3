//! `POST /v1/run`: one program on the fleet, answered when it is done, through the same queue,
//! agents, verification and audit log as any job.

use std::time::Duration;

use base64::Engine as _;
use fleetbox_proto::api::RunBody;
use fleetbox_proto::{JobState, Status};
use serde_json::json;

use crate::support::{BOTH, Coordinator};

fn body(code: &str) -> RunBody {
    RunBody {
        code: code.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_answers_with_its_report() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a", Default::default());
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut run = body(
            "import json, os\nx = json.load(open(os.environ['FLEETBOX_INPUT']))\ndata = open('data/in.txt').read()\nopen('out.txt', 'w').write(data.upper())\nprint(json.dumps({'n': x['n'] * 2, 'data': data}))\n",
        );
        run.input = Some(json!({"n": 21}));
        run.files.insert("data/in.txt".into(), b64("hello"));
        let answer = c.client.run(&run).await.unwrap();
        assert_eq!(answer.state, JobState::Completed, "{db:?}: {answer:?}");
        let r = answer.report.expect("a report");
        assert_eq!(r["status"], "ok", "{db:?}: {r}");
        assert_eq!(r["output"], json!({"n": 42, "data": "hello"}), "{db:?}");
        assert_eq!(r["stdout"], "{\"n\": 42, \"data\": \"hello\"}\n");
        let files: Vec<&str> = r["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            files,
            ["out.txt"],
            "{db:?}: the attached file is not listed as created"
        );
        // It is a job like any other: listed, audited.
        let job = c.client.job(&answer.job_id).await.unwrap();
        assert_eq!(job.name, "run");
        let audit = c
            .client
            .audit(&format!("job={}", answer.job_id))
            .await
            .unwrap();
        assert!(
            audit.entries.iter().any(|e| e.action == "job.submitted"),
            "{db:?}"
        );

        // A failing program: the job fails, the report says why.
        let answer = c
            .client
            .run(&body("raise ValueError('no')\n"))
            .await
            .unwrap();
        assert_eq!(answer.state, JobState::Failed, "{db:?}");
        let r = answer.report.expect("a report");
        assert_eq!(r["status"], Status::Error.as_str());
        assert_eq!(r["exception"]["type"], "ValueError", "{r}");

        // Past its wait bound: 202 with the job id, and the job goes on.
        let mut slow = body("import time\ntime.sleep(1.5)\nprint(7)\n");
        slow.wait_ms = Some(100);
        let answer = c.client.run(&slow).await.unwrap();
        assert!(!answer.state.is_final(), "{db:?}: {answer:?}");
        assert!(answer.report.is_none());
        let done = c.wait(&answer.job_id, Duration::from_secs(30)).await;
        assert_eq!(done.state, JobState::Completed, "{db:?}");
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_run_is_refused_naming_the_field() {
    let Some(c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    let mut with_backend = body("print(1)");
    with_backend.backend = Some("firecracker".into());
    let mut bad_file = body("print(1)");
    bad_file.files.insert("../x".into(), "eA==".into());
    let mut not_b64 = body("print(1)");
    not_b64.files.insert("x.txt".into(), "%%%".into());
    let mut bad_limits = body("print(1)");
    bad_limits.limits.max_processes = 0;
    for (run, field) in [
        (body("   "), "code"),
        (with_backend, "backend"),
        (bad_file, "files.\"../x\""),
        (not_b64, "files.\"x.txt\""),
        (bad_limits, "limits.max_processes"),
    ] {
        let err = c.client.run(&run).await.unwrap_err();
        assert_eq!(err.code(), Some("invalid_spec"), "{field}: {err}");
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    // Not JSON of the right shape.
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/run", c.running.url()))
        .bearer_auth(&c.running.admin_token)
        .body("{\"code\": 1}")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let e: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_spec", "{e}");
    assert!(e["error"]["trace_id"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_can_ask_for_an_environment() {
    let Some(mut c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());
    let mut run = body("import six\nprint(six.__version__)\n");
    run.environment = Some(fleetbox_proto::EnvironmentSpec {
        requirements: vec!["six==1.16.0".into()],
        requirements_file: None,
    });
    let answer = c.client.run(&run).await.unwrap();
    assert_eq!(answer.state, JobState::Completed, "{answer:?}");
    let r = answer.report.unwrap();
    assert_eq!(r["stdout"], "1.16.0\n");
    assert_eq!(
        r["environment"]["hash"],
        run.environment.as_ref().unwrap().hash()
    );
    c.stop().await;
}

/// A run (or a job) may ask for a backend: only agents with it lease its shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_asking_for_a_backend_waits_for_an_agent_with_it() {
    let Some(mut c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    // The test agents run the `process` backend.
    c.agent("a", Default::default());
    let mut on_process = body("print('here')");
    on_process.backend = Some("process".into());
    let answer = c.client.run(&on_process).await.unwrap();
    assert_eq!(answer.state, JobState::Completed, "{answer:?}");
    assert_eq!(answer.report.unwrap()["backend"], "process");

    let mut on_jail = body("print('there')");
    on_jail.backend = Some("jail".into());
    on_jail.wait_ms = Some(1500);
    let answer = c.client.run(&on_jail).await.unwrap();
    assert!(!answer.state.is_final(), "{answer:?}");
    let job = c.client.job(&answer.job_id).await.unwrap();
    assert_eq!(
        job.shards.queued, 1,
        "no agent with a jail took it: {job:?}"
    );
    // Meanwhile the process agent still serves everything else.
    let answer = c.client.run(&body("print(1)")).await.unwrap();
    assert_eq!(answer.state, JobState::Completed);

    let mut unknown = body("print(1)");
    unknown.backend = Some("vm".into());
    let err = c.client.run(&unknown).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_spec"));
    assert!(err.to_string().contains("backend"), "{err}");
    c.stop().await;
}
