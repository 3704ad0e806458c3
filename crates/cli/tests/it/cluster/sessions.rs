//! `fleetbox session` against real processes: a coordinator and an agent; the agent is
//! SIGKILLed with a session open, and the next call is `session_lost`, never a new interpreter.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::harness::{ADMIN, Cluster, Db};
use crate::support::bin;

/// `fleetbox session ARGS` against the cluster, `stdin` on its standard input.
fn session(c: &Cluster, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(bin())
        .arg("session")
        .args(args)
        .args(["--server", &c.url(), "--token", ADMIN])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn a_session_on_a_killed_agent_is_lost(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    let agent = c.add_agent(1);
    let out = session(&c, &["open", "--timeout", "10s"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert!(id.starts_with("ses_"), "{id}");
    let out = session(&c, &["run", &id, "-"], "x = 41\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = session(&c, &["run", &id, "-"], "print(x + 1)\n");
    assert_eq!(text(&out.stdout), "42\n", "{db:?}: {}", text(&out.stderr));
    // A file a call writes is listed in its report and kept in the blob store, like a run's;
    // the workspace lives on, so the next call still reads it.
    let body = |code: &str| fleetbox_proto::api::SessionCallBody {
        code: code.into(),
        ..Default::default()
    };
    let answer = c
        .client
        .session_run(
            &id,
            &body("open('out.txt', 'w').write('made in a session')"),
        )
        .await
        .unwrap();
    let report = answer.report.expect("the call's report");
    let file = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "out.txt")
        .unwrap_or_else(|| panic!("{db:?}: {report:#}"))
        .clone();
    let blob = c
        .client
        .get_blob(file["sha256"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(blob, b"made in a session", "{db:?}");
    let answer = c
        .client
        .session_run(&id, &body("print(open('out.txt').read())"))
        .await
        .unwrap();
    assert_eq!(
        answer.report.unwrap()["stdout"],
        "made in a session\n",
        "{db:?}"
    );
    // An exception is the call's, with the `fleetbox run` exit code for `error` (1).
    let out = session(&c, &["run", &id, "-"], "1 / 0\n");
    assert_eq!(out.status.code(), Some(1), "{db:?}");
    assert!(
        text(&out.stderr).contains("ZeroDivisionError"),
        "{}",
        text(&out.stderr)
    );
    let out = session(&c, &["list", "--live"], "");
    assert!(text(&out.stdout).contains(&id), "{}", text(&out.stdout));
    // The agent is killed: its session is lost, and says why.
    c.kill_agent(agent);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.client.session(&id).await.unwrap();
        if s.state == "lost" {
            assert_eq!(s.end_reason.as_deref(), Some("its agent stopped answering"));
            break;
        }
        assert!(Instant::now() < deadline, "{db:?}: still {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = session(&c, &["run", &id, "-"], "print(x)\n");
    assert!(!out.status.success(), "{db:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("session_lost") && err.contains("stopped answering"),
        "{err}"
    );
    // Another agent takes new sessions; the lost one stays lost.
    c.add_agent(1);
    let out = session(&c, &["open"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fresh = text(&out.stdout).trim().to_string();
    let out = session(&c, &["run", &fresh, "-"], "print('x' in dir())\n");
    assert_eq!(
        text(&out.stdout),
        "False\n",
        "{db:?}: a fresh interpreter is empty"
    );
    let out = session(&c, &["close", &fresh], "");
    assert!(
        text(&out.stdout).contains("closed"),
        "{}",
        text(&out.stdout)
    );
}
