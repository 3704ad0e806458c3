//! AI control at submission: syntax errors and programs the review refuses never become jobs
//! (and are audited), risky ones run with every shard re-checked by the coordinator, and
//! `POST /v1/review` answers without running anything.

use std::time::Duration;

use fleetbox_proto::{Decision, JobState};

use crate::support::{Coordinator, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_gates_every_submission() {
    let Some(mut c) = Coordinator::start(fleetbox_testkit::Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());

    // A syntax error: refused with its line and column, nothing stored.
    let err = c
        .client
        .submit(&spec(
            "name = \"bad\"\ncode = \"x = (1,\\nprint(x)\"\n[shards]\ncount = 1\n",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_spec"), "{err}");
    assert!(err.to_string().contains("syntax error at line"), "{err}");

    // A fork bomb: refused by the review, audited, no job.
    let bomb = "import os\nwhile True:\n    os.fork()\n";
    let err = c
        .client
        .submit(&spec(&format!(
            "name = \"bomb\"\ncode = {bomb:?}\n[shards]\ncount = 2\n"
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("rejected_by_review"), "{err}");
    assert!(
        err.to_string().contains("process.fork_loop at line 3"),
        "{err}"
    );
    let jobs = c.client.jobs(None, 100).await.unwrap();
    assert!(jobs.jobs.is_empty(), "{jobs:?}");
    let audit = c.client.audit("action=review.refused").await.unwrap();
    assert_eq!(audit.entries.len(), 1);
    assert_eq!(audit.entries[0].details["decision"], "reject");

    // Risky but allowed: it runs, and every shard is re-checked on the coordinator.
    let risky = "import subprocess\nprint(subprocess.run(['true']).returncode)\n";
    let r = c
        .run(
            &spec(&format!(
                "name = \"risky\"\ncode = {risky:?}\n[shards]\ncount = 3\n"
            )),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    for i in 0..3 {
        let d = c.client.shard(&r.id, i).await.unwrap();
        assert!(
            d.attempts.iter().any(|a| a.agent_id == "server"),
            "shard {i} was not re-checked: {:?}",
            d.attempts
        );
    }
    let submitted = c
        .client
        .audit(&format!("job={}&action=job.submitted", r.id))
        .await
        .unwrap();
    assert_eq!(
        submitted.entries[0].details["review"]["decision"],
        "run_on_server_only"
    );

    // The review alone.
    let review = c
        .client
        .review("import os as o\no.system('id')\n")
        .await
        .unwrap();
    assert_eq!(review.decision, Decision::RunOnServerOnly);
    assert_eq!(review.findings[0].rule, "process.spawn");
    assert_eq!((review.findings[0].line, review.findings[0].column), (2, 1));
    c.stop().await;
}
