//! Sessions through a real coordinator and real agents, on both stores: names survive calls; a
//! call past its limit is interrupted and the session lives on; one call at a time; a program
//! split across calls is reviewed whole; `DELETE`, idle time and a lost agent end a session and
//! the next call is a typed `session_lost`, never a new interpreter; every end is audited.

use std::time::{Duration, Instant};

use fleetbox_client::Client;
use fleetbox_proto::api::{SessionAnswer, SessionBody, SessionCallBody};
use fleetbox_proto::{ByteSize, JobState, Limits, Millis};
use serde_json::Value;

use crate::support::{BOTH, Coordinator};

fn body(code: &str) -> SessionCallBody {
    SessionCallBody {
        code: code.into(),
        ..Default::default()
    }
}

async fn call(c: &Client, id: &str, code: &str) -> SessionAnswer {
    c.session_run(id, &body(code)).await.unwrap()
}

fn report(a: &SessionAnswer) -> &Value {
    a.report
        .as_ref()
        .unwrap_or_else(|| panic!("no report: {a:?}"))
}

async fn open(c: &Client, limits: Limits, idle_timeout_ms: Option<u64>) -> SessionAnswer {
    open_for(c, limits, idle_timeout_ms, None).await
}

async fn open_for(
    c: &Client,
    limits: Limits,
    idle_timeout_ms: Option<u64>,
    max_lifetime_ms: Option<u64>,
) -> SessionAnswer {
    let a = c
        .open_session(&SessionBody {
            limits,
            idle_timeout_ms,
            max_lifetime_ms,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(a.state, JobState::Completed, "{a:?}");
    assert_eq!(a.session.state, "open", "{a:?}");
    a
}

/// Wait until session `id` is `state` in the list, which shows what the scheduler's sweep
/// ended (reading one session would also end it if it is due).
async fn until_state(
    c: &Client,
    id: &str,
    state: &str,
    within: Duration,
) -> fleetbox_proto::api::SessionView {
    let deadline = Instant::now() + within;
    loop {
        let listed = c.sessions(false).await.unwrap().sessions;
        let s = listed.into_iter().find(|s| s.id == id).expect("listed");
        if s.state == state {
            return s;
        }
        assert!(Instant::now() < deadline, "session still {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_names_and_survives_a_timeout() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        c.agent("a2", Default::default());
        let limits = Limits {
            memory: ByteSize::mib(256),
            timeout: Millis(5000),
            ..Limits::default()
        };
        let opened = open(&c.client, limits, None).await;
        let id = opened.session.id.clone();
        let agent = opened.session.agent_id.clone().expect("bound to an agent");
        assert_eq!(opened.call, 1);
        let a = call(&c.client, &id, "x = 41").await;
        assert_eq!(a.state, JobState::Completed, "{db:?}: {a:?}");
        let a = call(&c.client, &id, "print(x + 1)").await;
        assert_eq!(report(&a)["stdout"], "42\n", "{db:?}: {a:?}");
        assert_eq!(report(&a)["output"], 42);
        assert_eq!(report(&a)["session"]["call"], 3);
        assert_eq!(report(&a)["session"]["outcome"], "kept");
        assert_eq!(
            report(&a)["runner"]["id"],
            agent.as_str(),
            "every call on one agent"
        );
        // A call past its own limit is interrupted; the names live on.
        let a = c
            .client
            .session_run(
                &id,
                &SessionCallBody {
                    code: "while True:\n    pass".into(),
                    timeout_ms: Some(500),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(report(&a)["status"], "timeout", "{db:?}: {a:?}");
        assert_eq!(report(&a)["session"]["outcome"], "kept");
        assert_eq!(report(&a)["exception"]["type"], "KeyboardInterrupt");
        let a = call(&c.client, &id, "print(x)").await;
        assert_eq!(report(&a)["stdout"], "41\n", "{db:?}: {a:?}");
        // An exception is the call's; memory holds across calls.
        let a = call(
            &c.client,
            &id,
            "big = bytearray(150 << 20)\nbig[::4096] = b'x' * len(big[::4096])",
        )
        .await;
        assert_eq!(report(&a)["status"], "ok", "{db:?}: {a:?}");
        let a = call(
            &c.client,
            &id,
            "more = bytearray(150 << 20)\nmore[::4096] = b'x' * len(more[::4096])",
        )
        .await;
        assert_ne!(
            report(&a)["status"],
            "ok",
            "{db:?}: 300 MiB fit in 256: {a:?}"
        );
        // Listed with its agent and calls.
        let listed = c.client.sessions(false).await.unwrap().sessions;
        let s = listed.iter().find(|s| s.id == id).expect("listed");
        assert_eq!(s.agent_id.as_deref(), Some(agent.as_str()));
        assert!(s.calls >= 7, "{s:?}");
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_at_a_time_and_a_split_program_is_reviewed_whole() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        let id = open(&c.client, Limits::default(), None).await.session.id;
        // A call under way: the next is `session_busy`, not queued behind it.
        let slow = c
            .client
            .session_run(
                &id,
                &SessionCallBody {
                    code: "import time\ntime.sleep(2)".into(),
                    wait_ms: Some(100),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(slow.report, None, "{slow:?}");
        let busy = c
            .client
            .session_run(&id, &body("print(1)"))
            .await
            .unwrap_err();
        assert_eq!(busy.code(), Some("session_busy"), "{busy}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let a = loop {
            match c.client.session_run(&id, &body("print(2)")).await {
                Ok(a) => break a,
                Err(e) if e.code() == Some("session_busy") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{db:?}: {e}"),
            }
        };
        assert_eq!(report(&a)["stdout"], "2\n");
        // Alone, neither half is anything; together they run a shell command.
        let a = call(&c.client, &id, "from os import *").await;
        assert_eq!(a.state, JobState::Completed, "{db:?}: {a:?}");
        let alone = c.client.review("system('id')").await.unwrap();
        assert_eq!(alone.decision, fleetbox_proto::Decision::Run, "{alone:?}");
        let e = c
            .client
            .session_run(&id, &body("system('id')"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("rejected_by_review"), "{db:?}: {e}");
        // The refused call was not run, and the session goes on.
        let a = call(&c.client, &id, "print('on')").await;
        assert_eq!(report(&a)["stdout"], "on\n");
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_idle_and_lost_sessions_answer_session_lost() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent("a1", Default::default());
        // DELETE.
        let id = open(&c.client, Limits::default(), None).await.session.id;
        let closed = c.client.close_session(&id).await.unwrap();
        assert_eq!(closed.state, "closed");
        assert_eq!(closed.end_reason.as_deref(), Some("closed by request"));
        let e = c
            .client
            .session_run(&id, &body("print(1)"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("session_lost"), "{db:?}: {e}");
        assert!(e.to_string().contains("closed by request"), "{e}");
        // Idle for longer than it may be.
        let idle = open(&c.client, Limits::default(), Some(1000))
            .await
            .session
            .id;
        call(&c.client, &idle, "x = 1").await;
        let s = until_state(&c.client, &idle, "closed", Duration::from_secs(10)).await;
        assert!(s.end_reason.unwrap().contains("idle"), "{db:?}");
        // Past its lifetime, however busy.
        let old = open_for(&c.client, Limits::default(), Some(1500), Some(2000))
            .await
            .session
            .id;
        let deadline = Instant::now() + Duration::from_secs(10);
        let e = loop {
            match c.client.session_run(&old, &body("pass")).await {
                Ok(_) => assert!(Instant::now() < deadline, "{db:?}: still open"),
                Err(e) => break e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(e.code(), Some("session_lost"), "{db:?}: {e}");
        assert!(e.to_string().contains("lifetime"), "{db:?}: {e}");
        // Its agent restarted: the interpreter is gone, which it says before leasing again.
        let restarted = open(&c.client, Limits::default(), None).await.session.id;
        call(&c.client, &restarted, "x = 1").await;
        c.stop_agents().await;
        c.agent("a1", Default::default());
        let s = until_state(&c.client, &restarted, "lost", Duration::from_secs(10)).await;
        assert_eq!(
            s.end_reason.as_deref(),
            Some("its agent restarted"),
            "{db:?}"
        );
        let e = c
            .client
            .session_run(&restarted, &body("print(x)"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("session_lost"), "{db:?}: {e}");
        // Its agent stopped answering.
        let gone = open(&c.client, Limits::default(), None).await.session.id;
        c.stop_agents().await;
        let s = until_state(&c.client, &gone, "lost", Duration::from_secs(20)).await;
        assert_eq!(s.end_reason.as_deref(), Some("its agent stopped answering"));
        let e = c
            .client
            .session_run(&gone, &body("print(1)"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("session_lost"), "{db:?}: {e}");
        // Another tenant's session is not there; every end is audited.
        let e = c.client.session("ses_0000000000000000").await.unwrap_err();
        assert_eq!(e.code(), Some("not_found"));
        let audit = c
            .client
            .audit("action=session.closed&limit=100")
            .await
            .unwrap();
        assert_eq!(audit.entries.len(), 3, "{db:?}: {audit:?}");
        let audit = c
            .client
            .audit("action=session.lost&limit=100")
            .await
            .unwrap();
        assert_eq!(audit.entries.len(), 2, "{db:?}: {audit:?}");
        let audit = c
            .client
            .audit("action=session.opened&limit=100")
            .await
            .unwrap();
        assert_eq!(audit.entries.len(), 5, "{db:?}: {audit:?}");
        // Each call is a `job.submitted` naming its session, call and code hash.
        let submitted = c
            .client
            .audit("action=job.submitted&limit=1000")
            .await
            .unwrap();
        let x = submitted
            .entries
            .iter()
            .find(|e| e.details["session_id"] == restarted.as_str() && e.details["call"] == 2)
            .unwrap_or_else(|| panic!("{db:?}: no entry for call 2"));
        assert_eq!(x.details["code_sha256"].as_str().unwrap().len(), 64);
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_holds_at_most_its_sessions_and_the_rest_go_elsewhere() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        c.agent_with("one-a", |cfg| cfg.max_sessions = 1);
        c.agent_with("one-b", |cfg| cfg.max_sessions = 1);
        c.agent_with("none", |cfg| cfg.max_sessions = 0);
        let first = open(&c.client, Limits::default(), None).await.session;
        let second = open(&c.client, Limits::default(), None).await.session;
        assert_ne!(first.agent_id, second.agent_id, "{db:?}: both on one agent");
        let agents = c.client.agents().await.unwrap().agents;
        let none = agents.iter().find(|a| a.name == "none").unwrap();
        for s in [&first, &second] {
            assert_ne!(s.agent_id.as_deref(), Some(none.id.as_str()), "{db:?}");
        }
        // No room anywhere: the opening is refused by each, and the session says why.
        let third = c
            .client
            .open_session(&SessionBody {
                wait_ms: Some(30_000),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(third.session.state, "lost", "{db:?}: {third:?}");
        assert!(
            third
                .session
                .end_reason
                .as_deref()
                .unwrap()
                .contains("could not be opened"),
            "{db:?}: {third:?}"
        );
        // Closing one makes room again (the agent ends it at its next heartbeat).
        c.client.close_session(&first.id).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let again = c
                .client
                .open_session(&SessionBody::default())
                .await
                .unwrap();
            if again.session.state == "open" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{db:?}: no room after a close: {again:?}"
            );
        }
        c.stop().await;
    }
}
