//! Tenants and scoped tokens, attacked: one tenant reaching for another's jobs, shards, blobs,
//! flags, agents, tokens and audit entries (every one a `404`, so ids do not leak); tokens used
//! past their scope, after revocation (on another coordinator), after expiry; enrolment
//! tokens past their uses; caps and submit rates under a burst.

use std::time::{Duration, Instant};

use fleetbox_proto::JobState;
use fleetbox_proto::tenancy::{Scope, TenantCaps, TenantCreate, TokenCreate};
use fleetbox_testkit::SignedAgent;
use serde_json::{Value, json};

use crate::support::{BOTH, Coordinator, Db, EVERY, spec};

/// `method path` with `token` (and a JSON body for POST): the status and the JSON answer.
async fn call(c: &Coordinator, token: &str, method: &str, path: &str) -> (u16, Value) {
    let http = reqwest::Client::new();
    let url = format!("{}{path}", c.running.url());
    let req = match method {
        "GET" => http.get(&url),
        "DELETE" => http.delete(&url),
        // A session call's body.
        "RUN" => http.post(&url).json(&json!({"code": "print(1)"})),
        _ => http.post(&url).json(&json!({})),
    };
    let resp = req.bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A tenant made by the operator, and a token of it with `scopes`.
async fn tenant(c: &Coordinator, name: &str, caps: TenantCaps) -> String {
    c.client
        .create_tenant(&TenantCreate {
            name: name.into(),
            caps,
        })
        .await
        .unwrap();
    token(c, name, &Scope::ALL).await
}

async fn token(c: &Coordinator, tenant: &str, scopes: &[Scope]) -> String {
    c.client
        .create_token(&TokenCreate {
            tenant: Some(tenant.into()),
            scopes: scopes.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .token
}

async fn enroll_token(c: &Coordinator, tenant: &str, uses: Option<u64>) -> String {
    c.client
        .create_token(&TokenCreate {
            tenant: Some(tenant.into()),
            enroll: true,
            uses,
            ..Default::default()
        })
        .await
        .unwrap()
        .token
}

fn job(name: &str, shards: u32) -> fleetbox_proto::JobSpec {
    spec(&format!(
        "name = \"{name}\"\ncode = \"import sys; sys.stderr.write('x' * 40000); print(1)\"\nshards = {{ count = {shards} }}\naggregate = \"sum\"\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_can_neither_read_nor_touch_another() {
    for db in EVERY {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let a = tenant(&c, "acme", TenantCaps::default()).await;
        let b = tenant(&c, "globex", TenantCaps::default()).await;
        let b_enroll = enroll_token(&c, "globex", None).await;
        c.agent_with("b1", |cfg| cfg.token = b_enroll.clone());
        let as_b = c.client.with_token(&b);
        // B's job runs on B's agent; its stderr is large, so it is kept as a blob.
        let b_job = as_b.submit(&job("b", 2)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = loop {
            let v = as_b.job(&b_job.id).await.unwrap();
            if v.state.is_final() || Instant::now() > deadline {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(done.state, JobState::Completed, "{db:?}: {done:?}");
        let shard = as_b.shard(&b_job.id, 0).await.unwrap();
        let blob = shard.attempts[0]
            .stderr_blob
            .clone()
            .expect("a large stderr is a blob");
        assert!(as_b.get_blob(&blob).await.is_ok(), "{db:?}");
        let b_agent = as_b.agents().await.unwrap().agents[0].id.clone();
        let b_token_id = as_b.tokens(None).await.unwrap().tokens[0].id.clone();
        let b_session = as_b
            .open_session(&Default::default())
            .await
            .unwrap()
            .session
            .id;

        // Every endpoint that names B's things answers A with 404, never 403.
        let id = &b_job.id;
        for (method, path) in [
            ("GET", format!("/v1/jobs/{id}")),
            ("GET", format!("/v1/jobs/{id}/shards")),
            ("GET", format!("/v1/jobs/{id}/shards/0")),
            ("GET", format!("/v1/jobs/{id}/result")),
            ("GET", format!("/v1/jobs/{id}/receipt")),
            ("GET", format!("/v1/jobs/{id}/chain")),
            ("GET", format!("/v1/blobs/{blob}")),
            ("POST", format!("/v1/jobs/{id}/cancel")),
            ("POST", format!("/v1/jobs/{id}/pause")),
            ("POST", format!("/v1/jobs/{id}/resume")),
            ("POST", format!("/v1/jobs/{id}/rerun-failed")),
            ("POST", format!("/v1/jobs/{id}/rerun-tainted")),
            ("POST", format!("/v1/agents/{b_agent}/release")),
            ("POST", format!("/v1/agents/{b_agent}/quarantine")),
            ("POST", format!("/v1/tokens/{b_token_id}/revoke")),
            ("POST", format!("/v1/tokens/{b_token_id}/rotate")),
            ("GET", "/v1/tenants/globex".to_string()),
            ("GET", "/v1/tokens?tenant=globex".to_string()),
            ("GET", format!("/v1/sessions/{b_session}")),
            ("RUN", format!("/v1/sessions/{b_session}/run")),
            ("DELETE", format!("/v1/sessions/{b_session}")),
        ] {
            let (status, body) = call(&c, &a, method, &path).await;
            assert_eq!(status, 404, "{db:?}: {method} {path}: {body}");
            assert_eq!(body["error"]["code"], "not_found", "{method} {path}");
        }
        let (status, _) = call(&c, &a, "POST", "/v1/review/flags/1/approve").await;
        assert_eq!(status, 404, "{db:?}");
        // Lists hold only A's own.
        let as_a = c.client.with_token(&a);
        assert!(
            as_a.jobs(None, 100).await.unwrap().jobs.is_empty(),
            "{db:?}"
        );
        assert!(as_a.agents().await.unwrap().agents.is_empty(), "{db:?}");
        assert!(
            as_a.sessions(false).await.unwrap().sessions.is_empty(),
            "{db:?}"
        );
        // B's session is untouched: open, and its calls run.
        let ran = as_b
            .session_run(
                &b_session,
                &fleetbox_proto::api::SessionCallBody {
                    code: "print(7)".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(ran.session.state, "open", "{db:?}: {ran:?}");
        assert_eq!(ran.report.unwrap()["stdout"], "7\n", "{db:?}");
        let audit = as_a.audit("limit=5000").await.unwrap().entries;
        assert!(
            audit
                .iter()
                .all(|e| e.job_id.as_deref() != Some(id.as_str())),
            "{db:?}: A's log names B's job"
        );
        let tenants = as_a.tenants().await.unwrap().tenants;
        assert_eq!(
            tenants.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["acme"]
        );
        // B's job is untouched, and so are its agent and token.
        let after = as_b.job(id).await.unwrap();
        assert_eq!(
            (after.state, after.paused),
            (JobState::Completed, false),
            "{db:?}"
        );
        assert!(as_b.whoami().await.is_ok());
        // Only the operator makes tenants; A's admin is not the operator.
        let err = as_a
            .create_tenant(&TenantCreate {
                name: "mine".into(),
                caps: TenantCaps::default(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("forbidden"), "{db:?}: {err}");
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_hold_on_every_kind_of_endpoint_and_failures_are_audited() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let admin = tenant(&c, "acme", TenantCaps::default()).await;
        let read = token(&c, "acme", &[Scope::Read]).await;
        let submit = token(&c, "acme", &[Scope::Submit]).await;
        let as_admin = c.client.with_token(&admin);
        let j = as_admin.submit(&job("j", 1)).await.unwrap();
        let id = &j.id;
        // What a read-only token may not do, and what a submit-only one may not read.
        for (token, method, path, scope) in [
            (&read, "POST", "/v1/jobs".to_string(), "submit"),
            (&read, "POST", "/v1/run".to_string(), "submit"),
            (&read, "POST", format!("/v1/jobs/{id}/cancel"), "submit"),
            (&read, "POST", format!("/v1/jobs/{id}/pause"), "submit"),
            (
                &read,
                "POST",
                "/v1/review/flags/1/approve".to_string(),
                "review",
            ),
            (&read, "POST", "/v1/tokens".to_string(), "admin"),
            (&submit, "GET", format!("/v1/jobs/{id}"), "read"),
            (&submit, "GET", "/v1/jobs".to_string(), "read"),
            (&submit, "GET", "/v1/audit".to_string(), "read"),
            (&submit, "GET", "/v1/agents".to_string(), "read"),
        ] {
            let (status, body) = call(&c, token, method, &path).await;
            assert_eq!(status, 403, "{db:?}: {method} {path}: {body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("`{scope}`"))),
                "{method} {path}: {body}"
            );
        }
        let (status, _) = call(&c, &read, "GET", &format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200);
        let (status, _) = call(&c, &submit, "POST", &format!("/v1/jobs/{id}/cancel")).await;
        assert_eq!(status, 200);
        // A token cannot grant what it lacks: an admin-only token makes no review token.
        let admin_only = token(&c, "acme", &[Scope::Admin]).await;
        let err = c
            .client
            .with_token(&admin_only)
            .create_token(&TokenCreate {
                scopes: vec![Scope::Review],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("forbidden"), "{err}");
        // Refusals are in the tenant's log (rate-limited per second, so wait past it).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, _) = call(&c, &read, "POST", "/v1/jobs").await;
        assert_eq!(status, 403);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = as_admin
                .audit("action=token.used_invalid&limit=5000")
                .await
                .unwrap()
                .entries;
            if log
                .iter()
                .any(|e| e.details["why"] == "lacks the `submit` scope")
            {
                break;
            }
            assert!(Instant::now() < deadline, "{db:?}: {log:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let made = as_admin
            .audit("action=token.created&limit=100")
            .await
            .unwrap()
            .entries;
        assert!(made.len() >= 3, "{db:?}: {made:?}");
        c.stop().await;
    }
}

/// Revoke on one coordinator, use on another sharing the database: refused within a second,
/// every time (PostgreSQL, as coordinators share it in production; SQLite below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_within_a_second_on_another_coordinator() {
    let Some(url) = fleetbox_testkit::postgres_database().await else {
        return;
    };
    let Some(one) = Coordinator::start_with(Db::Postgres, |config| {
        config.database_url = Some(url.clone());
    })
    .await
    else {
        return;
    };
    let Some(two) = Coordinator::start_with(Db::Postgres, |config| {
        config.database_url = Some(url.clone());
        config.admin_token = Some(one.running.admin_token.clone());
    })
    .await
    else {
        return;
    };
    let mut slowest = Duration::ZERO;
    for round in 0..8 {
        let t = token(&one, "default", &[Scope::Read]).await;
        let on_two = two.client.with_token(&t);
        // Used (and so cached) on the second coordinator first.
        assert!(on_two.jobs(None, 1).await.is_ok(), "round {round}");
        let id = fleetbox_server::store::token_id(&fleetbox_server::ids::sha256_hex(t.as_bytes()))
            .to_string();
        let revoked = Instant::now();
        one.client.revoke_token(&id).await.unwrap();
        loop {
            match on_two.jobs(None, 1).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    assert_eq!(e.code(), Some("unauthorized"), "{e}");
                    break;
                }
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "round {round}: still accepted after a second"
            );
        }
        slowest = slowest.max(revoked.elapsed());
        // Refused for good: a lookup that raced the revocation is not believed afterwards.
        if round == 0 {
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                assert!(on_two.jobs(None, 1).await.is_err(), "accepted again");
            }
        }
        // And at once on the coordinator that revoked it.
        assert!(one.client.with_token(&t).jobs(None, 1).await.is_err());
    }
    eprintln!("slowest revocation seen on the other coordinator: {slowest:?}");
    two.stop().await;
    one.stop().await;
}

/// An agent's credential renewed on one coordinator: the token it replaces ends a lease later
/// on every coordinator, also on one that believed it from a cache with its old, later end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_agent_token_ends_on_another_coordinator_too() {
    let Some(url) = fleetbox_testkit::postgres_database().await else {
        return;
    };
    let shared = |config: &mut fleetbox_server::ServerConfig| {
        config.database_url = Some(url.clone());
        config.agent_credential_ms = 8_000;
        config.lease_ms = 1_000;
    };
    let Some(one) = Coordinator::start_with(Db::Postgres, shared).await else {
        return;
    };
    let Some(two) = Coordinator::start_with(Db::Postgres, |config| {
        shared(config);
        config.enroll_token = Some(one.running.enroll_token.clone());
    })
    .await
    else {
        return;
    };
    let agent =
        SignedAgent::enroll(&one.running.url(), &one.running.enroll_token, "renewing").await;
    let old_on_two = fleetbox_client::Client::new(&two.running.url(), &agent.token);
    // Believed on two (cached), its end 8 s away.
    assert!(old_on_two.heartbeat(&Default::default()).await.is_ok());
    // Past half its life, a heartbeat on one renews it: the old token ends a lease (1 s) later.
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    let renewed = agent
        .heartbeat(&Default::default())
        .await
        .unwrap()
        .renewed_token
        .expect("renewed past half its life");
    let cut = Instant::now();
    loop {
        match old_on_two.heartbeat(&Default::default()).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                assert!(e.to_string().contains("expired"), "{e}");
                break;
            }
        }
        assert!(
            cut.elapsed() < Duration::from_millis(2_000),
            "the replaced token still works on the other coordinator"
        );
    }
    let new_on_two = fleetbox_client::Client::new(&two.running.url(), &renewed);
    assert!(new_on_two.heartbeat(&Default::default()).await.is_ok());
    two.stop().await;
    one.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_rotate_and_enrolments_run_out() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        // Expiry.
        let short = c
            .client
            .create_token(&TokenCreate {
                scopes: vec![Scope::Read],
                ttl_seconds: Some(1),
                ..Default::default()
            })
            .await
            .unwrap();
        let as_short = c.client.with_token(&short.token);
        assert!(as_short.jobs(None, 1).await.is_ok(), "{db:?}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let err = as_short.jobs(None, 1).await.unwrap_err();
        assert!(err.to_string().contains("expired"), "{db:?}: {err}");
        // Rotation: the new one works, the old one is refused.
        let old = token(&c, "default", &[Scope::Read, Scope::Submit]).await;
        let old_id =
            fleetbox_server::store::token_id(&fleetbox_server::ids::sha256_hex(old.as_bytes()))
                .to_string();
        let new = c.client.rotate_token(&old_id).await.unwrap();
        assert_eq!(new.view.scopes, vec![Scope::Read, Scope::Submit]);
        assert!(c.client.with_token(&new.token).jobs(None, 1).await.is_ok());
        let err = c.client.with_token(&old).jobs(None, 1).await.unwrap_err();
        assert!(err.to_string().contains("revoked"), "{db:?}: {err}");
        // An enrolment token of two uses enrols two agents, then none; a third attempt
        // spends nothing and is told why.
        let enroll = enroll_token(&c, "default", Some(2)).await;
        let url = c.running.url();
        let first = SignedAgent::enroll(&url, &enroll, "e1").await;
        SignedAgent::enroll(&url, &enroll, "e2").await;
        let err = fleetbox_client::Client::new(&url, &enroll)
            .enroll(&fleetbox_proto::api::EnrollRequest {
                name: "e3".into(),
                slots: 1,
                public_key: hex::encode(
                    ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
                        .verifying_key()
                        .as_bytes(),
                ),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no uses left"), "{db:?}: {err}");
        // Agents' own tokens are left out of the list unless asked for; revoking one cuts
        // its agent off at once.
        let plain = c.client.tokens(None).await.unwrap().tokens;
        assert!(plain.iter().all(|t| t.kind != "agent"), "{plain:?}");
        let listed: Value = reqwest::Client::new()
            .get(format!("{url}/v1/tokens?agents=true"))
            .bearer_auth(&c.running.admin_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let first_token = listed["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["agent_id"] == first.agent_id.as_str())
            .expect("the agent's token is listed")["id"]
            .as_str()
            .unwrap()
            .to_string();
        c.client.revoke_token(&first_token).await.unwrap();
        let err = first
            .heartbeat(&Default::default())
            .await
            .expect_err("a revoked agent is refused");
        assert_eq!(err.code(), Some("unauthorized"), "{db:?}: {err}");
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_stop_work_with_typed_errors_and_bursts_get_429() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let capped = tenant(
            &c,
            "capped",
            TenantCaps {
                max_running_shards: Some(1),
                max_shards_per_day: Some(10),
                submit_rate: Some(2.0),
                ..Default::default()
            },
        )
        .await;
        // A burst of 12 submissions: the bucket's 2, then 429 with Retry-After.
        let http = reqwest::Client::new();
        let mut accepted = 0;
        let mut limited = 0;
        for i in 0..12 {
            let resp = http
                .post(format!("{}/v1/jobs", c.running.url()))
                .bearer_auth(&capped)
                .json(&json!({"name": format!("burst{i}"), "code": "print(1)", "shards": {"count": 1}}))
                .send()
                .await
                .unwrap();
            match resp.status().as_u16() {
                201 => accepted += 1,
                429 => {
                    let retry: u64 = resp.headers()["retry-after"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!((1..=2).contains(&retry), "{retry}");
                    let body: Value = resp.json().await.unwrap();
                    assert_eq!(body["error"]["code"], "rate_limited");
                    limited += 1;
                }
                other => panic!("{db:?}: {other}: {}", resp.text().await.unwrap()),
            }
        }
        assert!(
            (2..=3).contains(&accepted) && accepted + limited == 12,
            "{db:?}: {accepted} accepted, {limited} limited"
        );
        // Shards of the day: 10, of which `accepted` are spent.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let as_capped = c.client.with_token(&capped);
        let err = as_capped.submit(&job("big", 9)).await.unwrap_err();
        assert_eq!(err.code(), Some("quota_exceeded"), "{db:?}: {err}");
        let fits = as_capped.submit(&job("fits", 4)).await.unwrap();
        // Running shards: an agent with 4 slots asking for 4 gets 1.
        let enroll = enroll_token(&c, "capped", None).await;
        let agent = SignedAgent::enroll(&c.running.url(), &enroll, "greedy").await;
        let got = agent
            .lease(&fleetbox_proto::api::LeaseRequest {
                max_tasks: 4,
                wait_ms: 0,
                backend: None,
                hardened_only: false,
                cached_code: Vec::new(),
                sessions: false,
            })
            .await
            .unwrap();
        assert_eq!(got.tasks.len(), 1, "{db:?}");
        let again = agent
            .lease(&fleetbox_proto::api::LeaseRequest {
                max_tasks: 4,
                wait_ms: 200,
                backend: None,
                hardened_only: false,
                cached_code: Vec::new(),
                sessions: false,
            })
            .await
            .unwrap();
        assert!(again.tasks.is_empty(), "{db:?}: past the running cap");
        let view = as_capped.tenant("capped").await.unwrap();
        assert_eq!(view.running_shards, 1, "{db:?}: {view:?}");
        assert_eq!(view.shards_today, accepted + 4, "{db:?}: {view:?}");
        let _ = fits;
        // The cap refusal is in the tenant's log.
        let log = as_capped
            .audit("action=tenant.capped")
            .await
            .unwrap()
            .entries;
        assert_eq!(log.len(), 1, "{db:?}: {log:?}");
        c.stop().await;
    }
}

/// Two tenants on the shared pool's two agents: A queues 20,000 shards, then B 50. B's shards
/// all start before A has run 500 more: leases go to the tenant with the fewest running shards,
/// not in queue order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tenant_is_not_starved_by_a_big_one() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let a = tenant(&c, "big", TenantCaps::default()).await;
        let b = tenant(&c, "small", TenantCaps::default()).await;
        let (as_a, as_b) = (c.client.with_token(&a), c.client.with_token(&b));
        let quick = |name: &str, n: u32| {
            spec(&format!(
                "name = \"{name}\"\ncode = \"print(1)\"\nshards = {{ count = {n} }}\naggregate = \"sum\"\n"
            ))
        };
        let big = as_a.submit(&quick("big", 20_000)).await.unwrap();
        // The shared pool's agents (enrolled with the operator's token).
        c.agent("s1", Default::default());
        c.agent("s2", Default::default());
        let done = |v: &fleetbox_proto::api::JobView| {
            v.shards.accepted + v.shards.rejected + v.shards.dead
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while done(&as_a.job(&big.id).await.unwrap()) < 20 {
            assert!(
                Instant::now() < deadline,
                "{db:?}: the big job does not run"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let small = as_b.submit(&quick("small", 50)).await.unwrap();
        let before = done(&as_a.job(&big.id).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = as_b.job(&small.id).await.unwrap();
            if v.shards.queued == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{db:?}: {v:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = done(&as_a.job(&big.id).await.unwrap());
        eprintln!(
            "{db:?}: the big tenant ran {} shards while all 50 of the small one's started",
            after - before
        );
        assert!(after - before < 500, "{db:?}: {before} → {after}");
        as_a.cancel(&big.id).await.unwrap();
        c.stop().await;
    }
}

/// A tenant's own pool runs only its shards; a spec may pin a pool only its tenant may use;
/// the shared pool serves everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_pool_runs_only_its_tenants_shards() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let a = tenant(&c, "acme", TenantCaps::default()).await;
        let b = tenant(&c, "globex", TenantCaps::default()).await;
        let (as_a, as_b) = (c.client.with_token(&a), c.client.with_token(&b));
        // A's own agent, in pool `acme`.
        let a_enroll = enroll_token(&c, "acme", None).await;
        c.agent_with("a1", |cfg| cfg.token = a_enroll.clone());
        let pools = as_a.pools().await.unwrap().pools;
        let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["acme", "default"], "{db:?}: {pools:?}");
        // B may not pin A's pool: refused at submission, naming the field.
        let mut pinned = job("pinned", 2);
        pinned.pool = Some("acme".into());
        let err = as_b.submit(&pinned).await.unwrap_err();
        assert_eq!(err.code(), Some("invalid_spec"), "{db:?}: {err}");
        // B's job waits: no pool that serves B has an agent.
        let waiting = as_b.submit(&job("waiting", 2)).await.unwrap();
        // A's pinned job runs on A's agent.
        let r = {
            let j = as_a.submit(&pinned).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let v = as_a.job(&j.id).await.unwrap();
                if v.state.is_final() {
                    break v;
                }
                assert!(Instant::now() < deadline, "{db:?}: {v:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = as_b.job(&waiting.id).await.unwrap();
        assert_eq!(
            v.shards.queued, 2,
            "{db:?}: A's agent ran B's shards: {v:?}"
        );
        // A shared agent comes: B's job runs on it.
        c.agent("shared", Default::default());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = as_b.job(&waiting.id).await.unwrap();
            if v.state.is_final() {
                assert_eq!(v.state, JobState::Completed, "{db:?}: {v:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{db:?}: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let shard = as_b.shard(&waiting.id, 0).await.unwrap();
        let ran_on = &shard.attempts[0].agent_id;
        let a_agent = &as_a.agents().await.unwrap().agents[0].id;
        assert_ne!(ran_on, a_agent, "{db:?}");
        // The audit entries of B's shards are in B's log, though the agent is the operator's.
        let leased = as_b
            .audit(&format!("job={}&action=shard.leased", waiting.id))
            .await
            .unwrap()
            .entries;
        assert!(!leased.is_empty(), "{db:?}");
        // Only the operator makes shared pools.
        let err = as_a
            .create_pool(&fleetbox_proto::tenancy::PoolCreate {
                name: "mine".into(),
                shared: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("forbidden"), "{db:?}: {err}");
        c.stop().await;
    }
}

/// Agents' credentials expire: a live agent's heartbeats renew its own (it keeps working,
/// under the same id, over several lifetimes); one that stops heartbeating is cut off when its
/// credential ends, and enrols again only with a valid enrolment token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_credentials_expire_unless_heartbeats_renew_them() {
    for db in BOTH {
        let Some(mut c) =
            Coordinator::start_with(db, |config| config.agent_credential_ms = 2000).await
        else {
            continue;
        };
        let enroll = enroll_token(&c, "default", None).await;
        c.agent_with("live", |cfg| cfg.token = enroll.clone());
        // A silent one: enrolled, then never heard from.
        let url = c.running.url();
        let silent = SignedAgent::enroll(&url, &enroll, "silent").await;
        assert!(
            silent.heartbeat(&Default::default()).await.is_ok(),
            "{db:?}"
        );
        tokio::time::sleep(Duration::from_millis(5000)).await;
        // The live agent still runs shards, under the identity it enrolled with.
        let r = c.run(&job("after", 3), Duration::from_secs(60)).await;
        assert_eq!(r.state, JobState::Completed, "{db:?}: {r:?}");
        let agents = c.client.agents().await.unwrap().agents;
        assert_eq!(agents.len(), 2, "{db:?}: re-enrolled: {agents:?}");
        let renewals = c
            .client
            .audit("action=token.created&limit=5000")
            .await
            .unwrap()
            .entries
            .into_iter()
            .filter(|e| e.details.get("renews").is_some())
            .count();
        assert!(
            renewals >= 3,
            "{db:?}: {renewals} renewals in 5 s of 2 s credentials"
        );
        // The silent one's credential ended.
        let err = silent.heartbeat(&Default::default()).await.unwrap_err();
        assert!(err.to_string().contains("expired"), "{db:?}: {err}");
        // It could enrol again with the enrolment token, until that is revoked.
        let id =
            fleetbox_server::store::token_id(&fleetbox_server::ids::sha256_hex(enroll.as_bytes()))
                .to_string();
        c.client.revoke_token(&id).await.unwrap();
        let err = fleetbox_client::Client::new(&url, &enroll)
            .enroll(&fleetbox_proto::api::EnrollRequest {
                name: "again".into(),
                slots: 1,
                public_key: hex::encode(silent.key.verifying_key().as_bytes()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("revoked"), "{db:?}: {err}");
        c.stop().await;
    }
}

/// Blobs belong to the tenant whose shard made them, though the operator's shared agent
/// uploaded them; past its blob bytes a tenant's submissions are refused and its queued
/// shards wait, until the operator lifts the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_bytes_belong_to_the_shards_tenant_and_cap_its_work() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let hoard = tenant(
            &c,
            "hoard",
            TenantCaps {
                max_blob_bytes: Some(1 << 20),
                ..Default::default()
            },
        )
        .await;
        let as_hoard = c.client.with_token(&hoard);
        c.agent("shared", Default::default());
        let first = as_hoard.submit(&job("first", 2)).await.unwrap();
        let done = wait_final(&as_hoard, &first.id).await;
        assert_eq!(done.state, JobState::Completed, "{db:?}: {done:?}");
        // Its 40,000 bytes of stderr (the same in both shards: one blob) are the tenant's.
        let shard = as_hoard.shard(&first.id, 0).await.unwrap();
        let sha = shard.attempts[0]
            .stderr_blob
            .clone()
            .expect("a stderr blob");
        let bytes = as_hoard.get_blob(&sha).await.unwrap();
        assert_eq!(bytes.len(), 40_000, "{db:?}");
        let err = c.client.get_blob(&sha).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some("not_found"),
            "{db:?}: the agent's tenant owns it"
        );
        let view = as_hoard.tenant("hoard").await.unwrap();
        assert_eq!(view.blob_bytes, 40_000, "{db:?}: {view:?}");

        // A job waits with no agent; the operator lowers the cap under what it keeps.
        c.stop_agents().await;
        let queued = as_hoard.submit(&job("queued", 1)).await.unwrap();
        let lower = fleetbox_proto::tenancy::TenantUpdate {
            caps: TenantCaps {
                max_blob_bytes: Some(30_000),
                ..Default::default()
            },
            clear: Vec::new(),
        };
        c.client.update_tenant("hoard", &lower).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let err = as_hoard.submit(&job("refused", 1)).await.unwrap_err();
        assert_eq!(err.code(), Some("quota_exceeded"), "{db:?}: {err}");
        assert!(err.to_string().contains("bytes of blobs"), "{db:?}: {err}");
        // An agent comes: the queued shard is not leased while the tenant is over.
        c.agent("shared2", Default::default());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v = as_hoard.job(&queued.id).await.unwrap();
        assert_eq!(v.shards.queued, 1, "{db:?}: leased past the cap: {v:?}");
        // Lifted: it runs.
        let lift = fleetbox_proto::tenancy::TenantUpdate {
            clear: vec!["max_blob_bytes".into()],
            ..Default::default()
        };
        c.client.update_tenant("hoard", &lift).await.unwrap();
        let done = wait_final(&as_hoard, &queued.id).await;
        assert_eq!(done.state, JobState::Completed, "{db:?}: {done:?}");
        c.stop().await;
    }
}

async fn wait_final(client: &fleetbox_client::Client, id: &str) -> fleetbox_proto::api::JobView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = client.job(id).await.unwrap();
        if v.state.is_final() {
            return v;
        }
        assert!(Instant::now() < deadline, "{v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A follow-up rule's child counts against its tenant's shards of the day as a submission
/// does: past the cap it is not made, and the rule's failure says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_count_against_the_tenants_caps() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let chain = tenant(
            &c,
            "chain",
            TenantCaps {
                max_shards_per_day: Some(3),
                ..Default::default()
            },
        )
        .await;
        let as_chain = c.client.with_token(&chain);
        c.agent("shared", Default::default());
        let parent = as_chain
            .submit(&spec(
                "name = \"parent\"\ncode = \"print(1)\"\nshards = { count = 2 }\naggregate = \"sum\"\n\
                 [[followup]]\nwhen = \"true\"\nthen = { name = \"child\", code = \"print(2)\", shards = { count = 2 } }\n",
            ))
            .await
            .unwrap();
        let done = wait_final(&as_chain, &parent.id).await;
        assert_eq!(done.state, JobState::Completed, "{db:?}: {done:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let failed = loop {
            let log = as_chain
                .audit("action=followup.failed")
                .await
                .unwrap()
                .entries;
            if let Some(e) = log.into_iter().next() {
                break e;
            }
            assert!(Instant::now() < deadline, "{db:?}: no followup.failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let why = failed.details.to_string();
        assert!(why.contains("3 shards a day"), "{db:?}: {why}");
        let capped = as_chain
            .audit("action=tenant.capped")
            .await
            .unwrap()
            .entries;
        assert_eq!(capped.len(), 1, "{db:?}: {capped:?}");
        let jobs = as_chain.jobs(None, 100).await.unwrap().jobs;
        assert_eq!(jobs.len(), 1, "{db:?}: a child was made: {jobs:?}");
        let view = as_chain.tenant("chain").await.unwrap();
        assert_eq!(view.shards_today, 2, "{db:?}: {view:?}");
        c.stop().await;
    }
}

/// `/metrics` per tenant: a tenant's read token scrapes only its own jobs, shards and use
/// (valid exposition, nothing naming another tenant, none of the coordinator's own series);
/// the operator's scrape has every tenant's use against its caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_scrapes_only_its_own_metrics() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let a = tenant(
            &c,
            "acme",
            TenantCaps {
                max_blob_bytes: Some(1 << 30),
                ..Default::default()
            },
        )
        .await;
        let b = tenant(&c, "globex", TenantCaps::default()).await;
        c.agent("shared", Default::default());
        let (as_a, as_b) = (c.client.with_token(&a), c.client.with_token(&b));
        let ja = as_a.submit(&job("a", 3)).await.unwrap();
        let jb = as_b.submit(&job("b", 5)).await.unwrap();
        wait_final(&as_a, &ja.id).await;
        wait_final(&as_b, &jb.id).await;
        let scrape = |token: String| {
            let url = format!("{}/metrics", c.running.url());
            async move {
                let resp = reqwest::Client::new()
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap();
                (resp.status().as_u16(), resp.text().await.unwrap())
            }
        };
        let (status, text) = scrape(token(&c, "acme", &[Scope::Read]).await).await;
        assert_eq!(status, 200, "{db:?}: {text}");
        assert!(
            !text.contains("globex"),
            "{db:?}: another tenant's series:\n{text}"
        );
        assert!(
            !text.contains("fleetbox_http_requests_total"),
            "{db:?}:\n{text}"
        );
        let value = |text: &str, series: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        };
        assert_eq!(
            value(&text, "fleetbox_tasks{state=\"accepted\"}"),
            Some(3.0),
            "{db:?}:\n{text}"
        );
        assert_eq!(
            value(&text, "fleetbox_tenant_shards_24h{tenant=\"acme\"}"),
            Some(3.0),
            "{db:?}"
        );
        assert_eq!(
            value(&text, "fleetbox_tenant_blob_bytes{tenant=\"acme\"}"),
            Some(40_000.0),
            "{db:?}:\n{text}"
        );
        assert_eq!(
            value(
                &text,
                "fleetbox_tenant_cap{tenant=\"acme\",cap=\"max_blob_bytes\"}"
            ),
            Some(f64::from(1u32 << 30)),
            "{db:?}"
        );
        crate::support::promtool_accepts(&text);
        // A token without `read` may not scrape.
        let (status, _) = scrape(token(&c, "acme", &[Scope::Submit]).await).await;
        assert_eq!(status, 403, "{db:?}");
        // The operator sees both tenants and its own series.
        let (status, all) = scrape(c.running.admin_token.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(
            value(&all, "fleetbox_tenant_shards_24h{tenant=\"globex\"}"),
            Some(5.0),
            "{db:?}"
        );
        assert_eq!(
            value(&all, "fleetbox_tenant_shards_24h{tenant=\"acme\"}"),
            Some(3.0),
            "{db:?}"
        );
        assert!(all.contains("fleetbox_http_requests_total"), "{db:?}");
        c.stop().await;
    }
}

/// The panel's overview for a tenant counts only that tenant's shards; the operator's counts
/// every tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_panel_overview_counts_only_its_own_shards() {
    let Some(c) = crate::support::Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    let a = tenant(&c, "acme", TenantCaps::default()).await;
    let b = tenant(&c, "globex", TenantCaps::default()).await;
    // No agent: the shards wait.
    c.client
        .with_token(&a)
        .submit(&job("mine", 2))
        .await
        .unwrap();
    c.client
        .with_token(&b)
        .submit(&job("theirs", 7))
        .await
        .unwrap();
    let base = c.running.url();
    let queued_seen_by = |token: String| {
        let base = base.clone();
        async move {
            let page = crate::support::panel_page(&base, &token, "/ui").await;
            let at = page.find("id=\"queued\">").expect("the queued card") + 12;
            page[at..page[at..].find('<').unwrap() + at].to_string()
        }
    };
    assert_eq!(
        queued_seen_by(token(&c, "acme", &[Scope::Read]).await).await,
        "2"
    );
    assert_eq!(queued_seen_by(c.running.admin_token.clone()).await, "9");
    c.stop().await;
}

/// The panel's sandbox log lists the queue's violation flags (it asked for a kind no flag
/// has until kinds became an enum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_log_lists_violation_flags() {
    let Some(c) = crate::support::Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    let job = c.client.submit(&job("escapee", 1)).await.unwrap();
    let flag = c
        .running
        .state
        .store
        .add_flag(
            "default",
            &job.id,
            fleetbox_proto::FlagKind::Violation,
            &json!({ "shard": 0, "why": "ptrace" }),
        )
        .await
        .unwrap();
    let page =
        crate::support::panel_page(&c.running.url(), &c.running.admin_token, "/ui/violations")
            .await;
    assert!(page.contains(&format!("<td>{flag}</td>")), "{page}");
    assert!(page.contains(&job.id), "{page}");
    c.stop().await;
}

/// Rotating the bootstrap admin token replaces `DATA/admin.token` too: the CLI's default
/// token is the new one, not the revoked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_bootstrap_admin_token_replaces_its_file() {
    let Some(c) = crate::support::Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    let hash = fleetbox_server::ids::sha256_hex(c.running.admin_token.as_bytes());
    let id = fleetbox_server::store::token_id(&hash).to_string();
    let issued = c.client.rotate_token(&id).await.unwrap();
    let file = std::fs::read_to_string(c.dir.path().join("admin.token")).unwrap();
    assert_eq!(file.trim(), issued.token);
    let err = c.client.whoami().await.unwrap_err();
    assert_eq!(err.code(), Some("unauthorized"), "{err}");
    let me = c.client.with_token(&issued.token).whoami().await.unwrap();
    assert!(me.operator, "{me:?}");
    c.stop().await;
}

/// Run `spec` as the holder of `token` and wait for its end: its id and final view.
async fn run_as(
    c: &Coordinator,
    token: &str,
    spec: &fleetbox_proto::JobSpec,
) -> (String, fleetbox_proto::api::JobView) {
    let client = c.client.with_token(token);
    let id = client.submit(spec).await.unwrap().id;
    (id.clone(), wait_final(&client, &id).await)
}

/// A count from PostgreSQL.
async fn count(db: &mut sqlx::PgConnection, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql)
        .fetch_one(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    n
}

/// `--tenant-schemas` on a database with rows: they move into their tenants' schemas in one
/// conversion, nothing is lost (results, blobs, the audit chain), new tenants get schemas of
/// their own on any coordinator of the database, and one tenant still reaches nothing of
/// another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_per_tenant_holds_each_tenants_rows() {
    use fleetbox_server::store::schemas::{PER_TENANT, SHARED};
    use sqlx::Connection;
    let Some(url) = fleetbox_testkit::postgres_database().await else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let audit_key = keys.path().join("audit.key");
    let same_db = |schemas: bool, admin: Option<String>| {
        let (url, audit_key) = (url.clone(), audit_key.clone());
        move |config: &mut fleetbox_server::ServerConfig| {
            config.database_url = Some(url);
            config.tenant_schemas = schemas;
            config.audit_key = Some(audit_key);
            config.admin_token = admin;
        }
    };
    // Rows made the shared way first: the default tenant's job and acme's.
    let mut flat = Coordinator::start_with(Db::Postgres, same_db(false, None))
        .await
        .unwrap();
    let admin = flat.running.admin_token.clone();
    flat.agent("a1", Default::default());
    let acme = tenant(&flat, "acme", TenantCaps::default()).await;
    let (old_acme, done) = run_as(&flat, &acme, &job("before", 3)).await;
    assert_eq!(done.state, JobState::Completed, "{done:?}");
    let (old_default, done) = run_as(&flat, &admin, &job("default", 2)).await;
    assert_eq!(done.state, JobState::Completed, "{done:?}");
    let blob = flat
        .client
        .with_token(&acme)
        .shard(&old_acme, 0)
        .await
        .unwrap()
        .attempts[0]
        .stderr_blob
        .clone()
        .expect("a large stderr is a blob");
    flat.stop().await;

    let mut one = Coordinator::start_with(Db::Postgres, same_db(true, Some(admin.clone())))
        .await
        .unwrap();
    one.agent("a2", Default::default());
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    // Every table naming a tenant is either kept per tenant or knowingly shared.
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT table_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND column_name = 'tenant_id'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    for (table,) in &tables {
        assert!(
            PER_TENANT.contains(&table.as_str()) || SHARED.contains(&table.as_str()),
            "`{table}` names a tenant but is neither kept per tenant nor listed as shared"
        );
    }
    for table in PER_TENANT {
        let parted = count(
            &mut db,
            &format!(
                "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = '{table}'::regclass"
            ),
        )
        .await;
        assert_eq!(parted, 1, "{table} is not partitioned");
        let own = count(
            &mut db,
            &format!("SELECT count(*) FROM ONLY public.{table}"),
        )
        .await;
        assert_eq!(own, 0, "{table}: rows outside every tenant's schema");
    }
    // The rows are in their tenants' schemas, and only there.
    let in_schema = |schema: &str, table: &str, job: &str| {
        format!("SELECT count(*) FROM \"fleetbox_tenant_{schema}\".{table} WHERE job_id = '{job}'")
    };
    assert_eq!(
        count(&mut db, &in_schema("acme", "tasks", &old_acme)).await,
        3
    );
    assert!(count(&mut db, &in_schema("acme", "attempts", &old_acme)).await >= 3);
    assert!(count(&mut db, &in_schema("acme", "audit", &old_acme)).await > 0);
    assert_eq!(
        count(&mut db, &in_schema("default", "tasks", &old_default)).await,
        2
    );
    assert_eq!(
        count(&mut db, &in_schema("default", "tasks", &old_acme)).await,
        0
    );
    assert_eq!(
        count(
            &mut db,
            &format!(
                "SELECT count(*) FROM fleetbox_tenant_acme.blob_owners WHERE sha256 = '{blob}'"
            ),
        )
        .await,
        1
    );
    // Nothing was lost: the old result and the audit chains (the blob's file stayed in the first
    // coordinator's data directory; its owner row, above, is what moved).
    let as_acme = one.client.with_token(&acme);
    let view = as_acme.job(&old_acme).await.unwrap();
    assert_eq!(view.state, JobState::Completed);
    assert_eq!(
        as_acme.result(&old_acme).await.unwrap().result_value(),
        Some(json!(3))
    );
    for client in [&as_acme, &one.client] {
        let verified = client.audit_verify().await.unwrap();
        assert!(verified.ok, "{verified:?}");
    }

    // A tenant made now gets its schema before its first row; jobs keep to their own.
    let globex = tenant(&one, "globex", TenantCaps::default()).await;
    let (new_globex, done) = run_as(&one, &globex, &job("after", 2)).await;
    assert_eq!(done.state, JobState::Completed, "{done:?}");
    assert_eq!(
        count(&mut db, &in_schema("globex", "tasks", &new_globex)).await,
        2
    );
    let (status, _) = call(&one, &acme, "GET", &format!("/v1/jobs/{new_globex}")).await;
    assert_eq!(status, 404);
    let (status, _) = call(&one, &globex, "GET", &format!("/v1/jobs/{old_acme}")).await;
    assert_eq!(status, 404);

    // The mode belongs to the database: a coordinator started without the flag keeps it.
    let two = Coordinator::start_with(Db::Postgres, same_db(false, Some(admin.clone())))
        .await
        .unwrap();
    assert!(two.running.state.store.tenant_schemas().await.unwrap());
    let initech = tenant(&two, "initech", TenantCaps::default()).await;
    let (new_initech, done) = run_as(&two, &initech, &job("elsewhere", 1)).await;
    assert_eq!(done.state, JobState::Completed, "{done:?}");
    assert_eq!(
        count(&mut db, &in_schema("initech", "tasks", &new_initech)).await,
        1
    );
    // A restart converts nothing again, and gives a tenant an older coordinator made (a row
    // without partitions) its schema.
    sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ('legacy', 'legacy', 0)")
        .execute(&mut db)
        .await
        .unwrap();
    one.restart(Duration::from_millis(100)).await;
    let partitions = count(
        &mut db,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'fleetbox_tenant_legacy'",
    )
    .await;
    assert_eq!(partitions, PER_TENANT.len() as i64);
    assert_eq!(
        one.client
            .with_token(&acme)
            .job(&old_acme)
            .await
            .unwrap()
            .state,
        JobState::Completed
    );
    two.stop().await;
    one.stop().await;
}

/// SQLite has no schemas: asking for them is a clear refusal at start, not a silent no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_schemas_on_sqlite_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        fleetbox_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.tenant_schemas = true;
    config.sandbox.work_root = dir.path().join("work");
    config.sandbox_backend = fleetbox_sandbox::Backend::Process;
    config.weak_sandbox_allowed = true;
    let err = fleetbox_server::start(config).await.err().expect("refused");
    assert!(err.to_string().contains("needs PostgreSQL"), "{err}");
}
