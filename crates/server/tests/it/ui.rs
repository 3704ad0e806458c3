//! The web panel in a real headless Chromium (driven through chromedriver over WebDriver):
//! log in, load every page, submit a job and watch it complete without reloading, approve a
//! flag, and be refused without the right token or the session's CSRF token. Screenshots of
//! the overview and a job page are kept in `target/ui-screenshots/`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Coordinator, Db, Killed, tool};
use crate::webdriver::Browser;

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a port of its own, and a headless Chromium session through it.
async fn browser(profile: &std::path::Path) -> Option<(Killed, Browser)> {
    let driver = tool("chromedriver")?;
    let chromium = tool("chromium")?;
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let killed = Killed(child);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{url}/status")).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // As ENVIRONMENT.md says: no sandbox as root, and nothing that calls out of the machine.
    let mut args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--user-data-dir={}", profile.display()));
    let web = Browser::start(&url, &chromium, &args).await;
    Some((killed, web))
}

/// The text of the element with `id`, found again when a live update replaced it between
/// finding and reading; empty when there is none.
async fn text(web: &Browser, id: &str) -> String {
    for _ in 0..20 {
        if let Ok(e) = web.find(&format!("#{id}")).await
            && let Ok(t) = e.text().await
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    String::new()
}

/// The page's heading, once the page has one (a click may still be loading the next page).
async fn h1(web: &Browser) -> String {
    let mut last = String::new();
    for _ in 0..40 {
        match web.find("h1").await {
            Ok(h) => match h.text().await {
                Ok(t) => return t,
                Err(e) => last = e.0,
            },
            Err(e) => last = e.0,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no heading: {last}")
}

/// Wait until `f` holds, polling.
async fn until<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn log_in(web: &Browser, base: &str, token: &str) {
    web.goto(&format!("{base}/ui/login")).await;
    web.find("#token").await.unwrap().type_text(token).await;
    web.find("#login").await.unwrap().click().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_panel_works_in_a_real_browser() {
    let Some(mut c) = Coordinator::start(Db::Sqlite).await else {
        return;
    };
    c.agent("a", Default::default());
    let profile = tempfile::tempdir().unwrap();
    let Some((_driver, web)) = browser(profile.path()).await else {
        return;
    };
    let base = c.running.url();
    let admin = c.running.admin_token.clone();

    // Every page sends a stranger to the login; a wrong token and a token that may not use
    // the panel (the enroll token) are refused there.
    web.goto(&format!("{base}/ui/jobs")).await;
    assert_eq!(h1(&web).await, "Log in");
    assert!(web.url().await.contains("/ui/login?next="));
    log_in(&web, &base, "fbx_not_a_token").await;
    until(
        "a wrong token is refused",
        Duration::from_secs(20),
        || async { !text(&web, "login-error").await.is_empty() },
    )
    .await;
    log_in(&web, &base, &c.running.enroll_token).await;
    until(
        "the enroll token is refused",
        Duration::from_secs(20),
        || async {
            text(&web, "login-error")
                .await
                .contains("may not use the panel")
        },
    )
    .await;

    // The admin token opens the overview; its numbers arrive live.
    log_in(&web, &base, &admin).await;
    until("the overview", Duration::from_secs(20), || async {
        h1(&web).await == "Overview"
    })
    .await;
    until(
        "the agent shows online",
        Duration::from_secs(20),
        || async { text(&web, "online").await == "1" },
    )
    .await;

    // Submit a job through the form and watch it finish without reloading.
    web.goto(&format!("{base}/ui/submit")).await;
    let spec = web.find("#spec").await.unwrap();
    spec.clear().await;
    spec.type_text(
        "name = \"browser\"\naggregate = \"sum\"\ncode = \"\"\"\nimport json, os, time\ntime.sleep(0.2)\nprint(json.load(open(os.environ['FLEETBOX_INPUT']))['index'])\n\"\"\"\n[shards]\ncount = 12\n",
    )
    .await;
    web.find("#submit").await.unwrap().click().await;
    until("the new job's page", Duration::from_secs(20), || async {
        web.url().await.contains("/ui/jobs/job_")
    })
    .await;
    let job_url = web.url().await;
    let job_id = job_url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string();
    assert!(job_id.starts_with("job_"), "{job_url}");
    assert!(h1(&web).await.contains(&job_id));
    // The counts change on the page as shards settle (server-sent events), and the page
    // shows the result when the job is done, all without a reload from here.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !(text(&web, "job-state").await == "completed" && text(&web, "result").await == "66") {
        assert!(
            Instant::now() < deadline,
            "the job did not complete on the page: {seen:?}"
        );
        seen.insert(text(&web, "counts").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.len() >= 2,
        "the counts never changed on the page: {seen:?}"
    );
    assert_eq!(web.url().await, job_url);
    assert_eq!(web.count(".tile").await, 12);
    web.screenshot(&screenshots().join("job.png")).await;

    // The overview's failure rate counts what agents reported: 12 runs, all `ok`.
    web.goto(&format!("{base}/ui")).await;
    until(
        "the failure rate of 12 ok runs",
        Duration::from_secs(20),
        || async { text(&web, "failure-rate").await == "0.0" },
    )
    .await;
    // Nothing is queued any more: the card and the chart's last point say so.
    assert_eq!(text(&web, "chart-queue-depth").await, "0.00");
    assert_eq!(text(&web, "queued").await, "0");
    // Four more that all fail: 4 of 16 runs.
    let failing = c
        .client
        .submit(&fleetbox_testkit::spec(
            "name = 'fails'\ncode = 'raise ValueError(1)'\n[shards]\ncount = 4",
        ))
        .await
        .unwrap();
    c.wait(&failing.id, Duration::from_secs(60)).await;
    until(
        "the failure rate of 4 failures in 16 runs",
        Duration::from_secs(20),
        || async { text(&web, "failure-rate").await == "25.0" },
    )
    .await;
    assert_eq!(text(&web, "alerts").await, "None.");

    // A shard's page shows its report.
    web.goto(&format!("{base}/ui/jobs/{job_id}/shards/5")).await;
    assert_eq!(text(&web, "shard-state").await, "accepted");
    assert_eq!(text(&web, "status").await, "ok");
    let stdout = web.find("pre.stdout").await.unwrap();
    assert_eq!(stdout.text().await.unwrap().trim(), "5");

    // Every page loads.
    for (path, title) in [
        ("/ui/jobs?state=completed", "Jobs"),
        ("/ui/agents", "Agents"),
        ("/ui/review", "Review queue"),
        ("/ui/violations", "Sandbox and hardening log"),
        (&format!("/ui/audit?job={job_id}"), "Audit log"),
    ] {
        web.goto(&format!("{base}{path}")).await;
        assert_eq!(h1(&web).await, title, "{path}");
    }
    let audit = text(&web, "audit").await;
    assert!(
        audit.contains("job.submitted") && audit.contains("job.completed"),
        "{audit}"
    );

    // Approve a flag from the review queue: the API records who decided.
    let tenant = "default";
    let flag = c
        .running
        .state
        .store
        .add_flag(
            tenant,
            &job_id,
            fleetbox_proto::FlagKind::Anomaly,
            &serde_json::json!({"shard": 3, "why": "a test flag"}),
        )
        .await
        .unwrap();
    web.goto(&format!("{base}/ui/review")).await;
    web.find(&format!("#approve-{flag}"))
        .await
        .unwrap()
        .click()
        .await;
    // (The click returns once the form is sent; the answer may still be on its way.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let approved = loop {
        let decided = c.client.review_flags("status=approved").await.unwrap();
        if let Some(f) = decided.flags.into_iter().find(|f| f.id == flag) {
            break f;
        }
        assert!(Instant::now() < deadline, "flag {flag} was not approved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        approved
            .decided_by
            .as_deref()
            .unwrap_or("")
            .starts_with("admin:"),
        "{approved:?}"
    );
    assert_eq!(web.count(&format!("#approve-{flag}")).await, 0);

    // The overview, live, for the screenshot.
    web.goto(&format!("{base}/ui")).await;
    until(
        "the overview's live part",
        Duration::from_secs(10),
        || async { text(&web, "online").await == "1" },
    )
    .await;
    let agent_id = c.client.agents().await.unwrap().agents[0].id.clone();
    let charts = text(&web, "agent-charts").await;
    assert!(charts.contains(&agent_id), "the agent's row: {charts:?}");
    web.screenshot(&screenshots().join("overview.png")).await;

    // Actions without the right credentials are refused and change nothing: no session
    // (sent to the login), and the session's cookie without its CSRF token (403).
    let running = c
        .client
        .submit(&crate::support::spec(
            "name = \"held\"\ncode = \"import time; time.sleep(30)\"\nshards = { count = 1 }\n",
        ))
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cancel = format!("{base}/ui/jobs/{}/cancel", running.id);
    let anonymous = http
        .post(&cancel)
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 303);
    assert!(
        anonymous.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/ui/login")
    );
    let session = web.cookie("fleetbox_ui").await.expect("the session cookie");
    let forged = http
        .post(&cancel)
        .header("cookie", format!("fleetbox_ui={session}"))
        .form(&[("csrf", "not-the-session-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let view = c.client.job(&running.id).await.unwrap();
    assert!(!view.state.is_final(), "{view:?}");
    // Pause it from its page, set its priority in bulk from the jobs list (filtered by
    // name), then the same button as above, in the browser (with the session's CSRF token),
    // cancels it.
    web.goto(&format!("{base}/ui/jobs/{}", running.id)).await;
    web.find("#pause").await.unwrap().click().await;
    until("the job is paused", Duration::from_secs(20), || async {
        c.client.job(&running.id).await.unwrap().paused && text(&web, "paused").await == "Paused"
    })
    .await;
    web.goto(&format!("{base}/ui/jobs?q=held")).await;
    web.find("#bulk-priority-value")
        .await
        .unwrap()
        .type_text("7")
        .await;
    web.find("#bulk-priority").await.unwrap().click().await;
    until(
        "the listed job's new priority",
        Duration::from_secs(20),
        || async { c.client.job(&running.id).await.unwrap().priority == 7 },
    )
    .await;
    assert_eq!(c.client.job(&job_id).await.unwrap().priority, 0);
    web.goto(&format!("{base}/ui/jobs/{}", running.id)).await;
    web.find("#cancel").await.unwrap().click().await;
    until("the job is cancelled", Duration::from_secs(20), || async {
        c.client.job(&running.id).await.unwrap().state == fleetbox_proto::JobState::Cancelled
    })
    .await;

    // An agent is quarantined and released from its page (each audited as the admin).
    let agent = c.client.agents().await.unwrap().agents.remove(0);
    web.goto(&format!("{base}/ui/agents")).await;
    web.find(&format!("#quarantine-{}", agent.id))
        .await
        .unwrap()
        .click()
        .await;
    until(
        "the agent shows quarantined",
        Duration::from_secs(20),
        || async {
            text(&web, "agents")
                .await
                .contains("quarantined by an operator")
        },
    )
    .await;
    web.find(&format!("#release-{}", agent.id))
        .await
        .unwrap()
        .click()
        .await;
    until("the agent is released", Duration::from_secs(20), || async {
        c.client.agents().await.unwrap().agents[0]
            .quarantined
            .is_none()
    })
    .await;
    let audit = c
        .client
        .audit(&format!("agent={}", agent.id))
        .await
        .unwrap()
        .entries;
    for action in ["agent.quarantined", "agent.released"] {
        let e = audit.iter().find(|e| e.action == action).unwrap();
        assert!(e.actor.starts_with("admin:"), "{e:?}");
    }

    // A job of 100,000 shards (for a backend no agent here has, so it waits): its grid is
    // 1,000 tiles of 100 shards, and a tile opens its 100 shards.
    let big = c
        .client
        .submit(&crate::support::spec(
            "name = \"big\"\ncode = \"print(1)\"\nbackend = \"docker\"\nshards = { count = 100000 }\n",
        ))
        .await
        .unwrap();
    let started = Instant::now();
    web.goto(&format!("{base}/ui/jobs/{}", big.id)).await;
    assert_eq!(web.count(".tile").await, 1000);
    eprintln!("the 100,000-shard job's page: {:?}", started.elapsed());
    web.find(".tile").await.unwrap().click().await;
    until(
        "the first tile's shards",
        Duration::from_secs(20),
        || async { web.url().await.ends_with("?from=0&to=100") },
    )
    .await;
    assert_eq!(web.count(".tile").await, 100);
    web.find("#cancel").await.unwrap().click().await;
    // The cancel's form posts and the page comes back without its buttons: wait for that page
    // before looking for the next button. (CI once found `#logout` in the page that was being
    // left and clicked it after it was gone: a stale element.)
    until(
        "the big job is cancelled",
        Duration::from_secs(20),
        || async {
            c.client.job(&big.id).await.unwrap().state == fleetbox_proto::JobState::Cancelled
                && web.count("#cancel").await == 0
        },
    )
    .await;

    // Logging out ends the session.
    web.find("#logout").await.unwrap().click().await;
    until(
        "the login page after logging out",
        Duration::from_secs(20),
        || async { web.url().await.contains("/ui/login") },
    )
    .await;
    web.goto(&format!("{base}/ui")).await;
    assert_eq!(h1(&web).await, "Log in");

    // A read-only token sees the jobs but none of the buttons its scopes do not allow.
    let read_only = c
        .client
        .create_token(&fleetbox_proto::tenancy::TokenCreate {
            scopes: vec![fleetbox_proto::tenancy::Scope::Read],
            ..Default::default()
        })
        .await
        .unwrap()
        .token;
    log_in(&web, &base, &read_only).await;
    until(
        "the overview, read-only",
        Duration::from_secs(20),
        || async { h1(&web).await == "Overview" },
    )
    .await;
    web.goto(&format!("{base}/ui/jobs/{}", big.id)).await;
    assert!(h1(&web).await.contains("big"), "{}", h1(&web).await);
    for button in [
        "#cancel",
        "#pause",
        "#resume",
        "#priority",
        "#rerun-failed",
        "#rerun-tainted",
    ] {
        assert_eq!(
            web.count(button).await,
            0,
            "{button} shown to a read-only token"
        );
    }
    web.goto(&format!("{base}/ui/jobs")).await;
    assert_eq!(web.count("#bulk-cancel").await, 0);
    web.goto(&format!("{base}/ui/submit")).await;
    assert_eq!(web.count("#submit").await, 0);
    assert_eq!(web.count("#submit-refused").await, 1);
    web.goto(&format!("{base}/ui/agents")).await;
    assert_eq!(web.count("[id^=quarantine-]").await, 0);
    web.quit().await;
}

/// A page left open (its event stream running) does not hold up the coordinator's graceful
/// shutdown: the streams end when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_page_does_not_hold_up_a_shutdown() {
    let Some(c) = Coordinator::start(Db::Sqlite).await else {
        return;
    };
    let base = c.running.url();
    let (http, cookie) = crate::support::panel_login(&base, &c.running.admin_token).await;
    let mut live = http
        .get(format!("{base}/ui/live"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    assert!(
        live.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let first = live.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event: live"));
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), c.stop())
        .await
        .expect("the coordinator stopped with a page open");
    eprintln!(
        "stopped in {:?} with an event stream open",
        started.elapsed()
    );
    // The stream ended with it.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = live.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the event stream outlived the coordinator");
}
