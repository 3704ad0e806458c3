//! Follow-up rules with real processes: a coordinator SIGKILLed right after a parent
//! completes makes its child once after the restart, and `fleetbox submit` / `fleetbox job
//! --chain` handle chains from files.

use std::time::{Duration, Instant};

use fleetbox_proto::JobState;

use super::harness::{ADMIN, Cluster, Db};
use crate::support::bin;

const PARENT: &str = "name = \"parent\"\ncode = \"print(2)\"\nshards = { count = 2 }\naggregate = \"sum\"\n\
    [[followup]]\nname = \"next\"\nwhen = \"result == 4\"\n[followup.then]\nname = \"child\"\ncode = \"print(3)\"\nshards = { count = 1 }\n";

/// Kill the coordinator (SIGKILL) the moment each parent is `completed`, restart it: every
/// parent ends with exactly one child, made by exactly one `followup.created` entry.
pub async fn a_coordinator_killed_after_a_parent_completes_makes_its_child_once(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    let mut in_window = 0;
    for round in 0..8 {
        let job = c.submit(PARENT).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Poll as fast as the API answers, and kill as soon as the parent is final.
        let planning = loop {
            if let Ok(v) = c.client.job(&job.id).await
                && v.state.is_final()
            {
                break v.planning;
            }
            assert!(
                Instant::now() < deadline,
                "{db:?}: round {round}: parent did not finish"
            );
        };
        c.kill_server();
        if planning {
            in_window += 1;
        }
        c.start_server();
        let deadline = Instant::now() + Duration::from_secs(60);
        let chain = loop {
            let chain = c.client.chain(&job.id).await.expect("chain");
            if chain.jobs.len() == 2 && chain.jobs.iter().all(|j| j.state.is_final() && !j.planning)
            {
                break chain;
            }
            assert!(
                Instant::now() < deadline,
                "{db:?}: round {round}: {chain:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            chain.jobs[1].state,
            JobState::Completed,
            "{db:?}: {chain:#?}"
        );
        let created = c
            .client
            .audit(&format!("job={}&action=followup.created", job.id))
            .await
            .unwrap();
        assert_eq!(
            created.entries.len(),
            1,
            "{db:?}: round {round}: {created:?}"
        );
        // The restarted coordinator's log says it planned what the killed one had not.
        if in_window >= 2 && round >= 3 {
            break;
        }
    }
    eprintln!("{db:?}: {in_window} kill(s) landed between a parent's completion and its planning");
    assert!(in_window >= 1, "{db:?}: no kill landed before planning");
    let v = c.client.audit_verify().await.unwrap();
    assert!(v.ok, "{db:?}: {v:?}");
}

/// `fleetbox submit` inlines follow-up `job_file`s (a file naming itself repeats its job),
/// refuses a cycle between files, and `fleetbox job ID --chain` prints the chain as a tree.
pub async fn chains_from_files_and_the_chain_tree(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    let dir = c.dir.path().join("specs");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write(
        "first.toml",
        "name = \"first\"\ncode = \"print(5)\"\nshards = { count = 1 }\naggregate = \"sum\"\n\
         [[followup]]\nname = \"to second\"\nwhen = \"result == 5\"\njob_file = \"second.toml\"\n",
    );
    write("second.py", "print(6)\n");
    write(
        "second.toml",
        "name = \"second\"\ncode_file = \"second.py\"\nshards = { count = 1 }\naggregate = \"sum\"\n\
         [[followup]]\nname = \"again\"\nwhen = \"result == 6\"\njob_file = \"second.toml\"\nmax_depth = 3\n",
    );
    write(
        "a.toml",
        "name = \"a\"\ncode = \"print(1)\"\nshards = { count = 1 }\n[[followup]]\nwhen = \"true\"\njob_file = \"b.toml\"\n",
    );
    write(
        "b.toml",
        "name = \"b\"\ncode = \"print(1)\"\nshards = { count = 1 }\n[[followup]]\nwhen = \"true\"\njob_file = \"a.toml\"\n",
    );
    let url = c.url();
    let fleetbox = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .args(["--server", &url, "--token", ADMIN])
            .output()
            .unwrap()
    };
    // The docs' example: an inline child naming its code by file.
    write(
        "keep.py",
        "import json\nprint(sum(json.load(open('input.json'))['items']))\n",
    );
    write(
        "docs.toml",
        "name = \"gen\"\ncode = \"print(7)\"\nshards = { count = 2 }\naggregate = \"collect\"\n\
         [[followup]]\nname = \"keep the large ones\"\nwhen = \"summary.success_rate == 1.0\"\n\
         input = { items = \"result.filter(x, x >= summary.accepted * 3)\" }\n\
         [followup.then]\nname = \"keep\"\ncode_file = \"keep.py\"\nshards = { per_shard = 10 }\naggregate = \"sum\"\n",
    );
    let out = fleetbox(&["submit", "--wait", dir.join("docs.toml").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submitted = String::from_utf8_lossy(&out.stderr).to_string();
    let generated = submitted
        .split_whitespace()
        .find(|w| w.starts_with("job_"))
        .expect("the job's id")
        .trim_end_matches(':')
        .to_string();
    // `fleetbox job ID` is for a person; `--json` is the API's view.
    let out = fleetbox(&["job", &generated]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains("state     completed"), "{human}");
    assert!(human.contains("2/2 settled: 2 ok"), "{human}");
    let out = fleetbox(&["job", &generated, "--json"]);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(view["state"], "completed");
    // A reader that goes away (`| head`) ends it quietly.
    let mut child = std::process::Command::new(bin())
        .args([
            "job", &generated, "--shards", "--server", &url, "--token", ADMIN,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A job whose shards fail: exit 1, nothing on stdout, the failed shard named on stderr.
    write(
        "fails.toml",
        "name = \"fails\"\ncode = \"raise ValueError(7)\"\nshards = { count = 1 }\n",
    );
    let out = fleetbox(&["submit", "--wait", dir.join("fails.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shard 0: error: ValueError: 7"),
        "{out:?}"
    );
    // A syntax error in the code is a spec error (2), as the CLI's own checks are.
    write(
        "broken.toml",
        "name = \"broken\"\ncode = \"print(\"\nshards = { count = 1 }\n",
    );
    let out = fleetbox(&["submit", dir.join("broken.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = fleetbox(&["submit", dir.join("a.toml").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cycle"), "{err}");

    let out = fleetbox(&["submit", dir.join("first.toml").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    let chain = loop {
        let chain = c.client.chain(&root).await.expect("chain");
        if chain.jobs.len() == 4 && chain.jobs.iter().all(|j| j.state.is_final() && !j.planning) {
            break chain;
        }
        assert!(Instant::now() < deadline, "{db:?}: {chain:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let names: Vec<&str> = chain.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["first", "second", "second", "second"]);
    let out = fleetbox(&["job", &root, "--chain"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 4, "{tree}");
    assert!(
        lines[0].starts_with(&format!("{root} completed `first`")),
        "{tree}"
    );
    assert!(
        lines[1].starts_with("└─ ") && lines[1].contains("(rule `to second`)"),
        "{tree}"
    );
    assert!(
        lines[2].starts_with("   └─ ") && lines[2].contains("(rule `again`)"),
        "{tree}"
    );
    assert!(lines[3].starts_with("      └─ "), "{tree}");
    // The last one's rule hit the depth cap: flagged.
    let flags = c
        .client
        .review_flags(&format!("job={}", chain.jobs[3].id))
        .await
        .unwrap();
    assert_eq!(flags.flags[0].kind, "followup_capped", "{flags:?}");
}

/// `DEMO_FOLLOWUP_ENABLED=0` (the original sandbox's switch) and `FLEETBOX_FOLLOWUPS=0` turn
/// follow-ups off: the rules are recorded as not evaluated and nothing starts.
pub async fn the_followup_switches_turn_rules_off(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    c.add_agent(2);
    for var in ["DEMO_FOLLOWUP_ENABLED", "FLEETBOX_FOLLOWUPS"] {
        c.server_env = vec![(var.to_string(), "0".to_string())];
        c.kill_server();
        c.start_server();
        let job = c.submit(PARENT).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = c.client.job(&job.id).await.unwrap();
            if v.state.is_final() && !v.planning {
                break;
            }
            assert!(Instant::now() < deadline, "{db:?} {var}: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            c.client.chain(&job.id).await.unwrap().jobs.len(),
            1,
            "{var}"
        );
        let evaluated = c
            .client
            .audit(&format!("job={}&action=followup.evaluated", job.id))
            .await
            .unwrap();
        assert_eq!(evaluated.entries.len(), 1, "{var}: {evaluated:?}");
        assert_eq!(evaluated.entries[0].details["disabled"], true, "{var}");
    }
    // Back on: the same spec makes its child.
    c.server_env.clear();
    c.kill_server();
    c.start_server();
    let job = c.submit(PARENT).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.client.chain(&job.id).await.unwrap().jobs.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "{db:?}: no child with follow-ups on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
