//! Bad text at the edge and the coordinator's own hashes, through a real coordinator.

use fleetbox_proto::{JobState, TaskState};
use std::time::Duration;

use fleetbox_agent::LocalCaps;

use crate::support::{BOTH, Coordinator, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_names_and_code_is_a_typed_error_and_a_nul_exception_is_kept() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        for body in [
            serde_json::json!({"name": "a\u{0}b", "code": "pass", "shards": {"count": 1}}),
            serde_json::json!({"name": "ok", "code": "pass\u{0}", "shards": {"count": 1}}),
        ] {
            let resp = reqwest::Client::new()
                .post(format!("{}/v1/jobs", c.running.url()))
                .bearer_auth(&c.running.admin_token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 422, "{db:?}: {body}");
            let err: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], "invalid_spec", "{db:?}: {err}");
            assert!(err["error"]["trace_id"].is_string());
        }
        c.agent("a1", LocalCaps::default());
        let job = spec(
            r#"
name = "nul exception"
code = "raise ValueError('bad' + chr(0) + 'byte')"
shards = { count = 1 }
"#,
        );
        let result = c.run(&job, Duration::from_secs(30)).await;
        assert_eq!(result.state, JobState::Failed, "{db:?}: {result:?}");
        let id = c.client.jobs(None, 1).await.unwrap().jobs.remove(0).id;
        let shard = c.client.shard(&id, 0).await.unwrap();
        assert_eq!(
            shard.shard.state,
            TaskState::Rejected,
            "{db:?}: not dead, not retried"
        );
        // One run by the agent; the server re-ran it to confirm the failure (the agent is
        // not trusted yet) and agreed.
        let agents: Vec<_> = shard
            .attempts
            .iter()
            .filter(|a| a.agent_id != "server")
            .collect();
        assert_eq!(agents.len(), 1, "{db:?}");
        assert_eq!(agents[0].verdict, fleetbox_proto::Verdict::Valid, "{db:?}");
        let message = &shard.attempts[0].report["exception"]["message"];
        assert_eq!(
            message, "bad\u{0}byte",
            "{db:?}: the report keeps the exact text"
        );
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_hashes_are_the_coordinators_over_canonical_json() {
    let Some(mut c) = Coordinator::start(crate::support::Db::Sqlite).await else {
        return;
    };
    c.agent("a1", LocalCaps::default());
    // The same value written with keys in two orders and two number spellings.
    let job = spec(
        r#"
name = "canonical"
code = '''
import os
i = int(os.environ["FLEETBOX_SHARD_INDEX"])
print('{"b": 1, "a": [1.0, 2]}' if i == 0 else '{"a":[1,2.0],"b":1.0}')
'''
shards = { count = 2 }
"#,
    );
    let result = c.run(&job, Duration::from_secs(30)).await;
    assert_eq!(result.state, JobState::Completed, "{result:?}");
    let id = c.client.jobs(None, 1).await.unwrap().jobs.remove(0).id;
    let a = c.client.shard(&id, 0).await.unwrap().attempts.remove(0);
    let b = c.client.shard(&id, 1).await.unwrap().attempts.remove(0);
    use sha2::Digest;
    let want = hex::encode(sha2::Sha256::digest(br#"{"a":[1,2],"b":1}"#));
    assert_eq!(a.output_sha256.as_deref(), Some(want.as_str()));
    assert_eq!(b.output_sha256.as_deref(), Some(want.as_str()));
    c.stop().await;
}

/// Probes need no token: `/healthz` says the process answers, `/readyz` that the store does
/// and every migration is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_probes_answer_without_a_token() {
    for db in crate::support::BOTH {
        let Some(c) = crate::support::Coordinator::start(db).await else {
            continue;
        };
        let http = reqwest::Client::new();
        let health = http
            .get(format!("{}/healthz", c.running.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
        let ready: serde_json::Value = http
            .get(format!("{}/readyz", c.running.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["status"], "ready", "{db:?}");
        assert!(ready["migrations"].as_u64().unwrap() >= 12, "{ready}");
        c.stop().await;
    }
}

/// Query values at the edges: every flag status filters (`rerun` too); a shard index past
/// `i64::MAX` lists nothing (it wrapped to the first page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_values_at_the_edges_mean_what_they_say() {
    for db in BOTH {
        let Some(c) = Coordinator::start(db).await else {
            continue;
        };
        let get = |path: String| {
            let token = c.running.admin_token.clone();
            let url = format!("{}{path}", c.running.url());
            async move {
                let resp = reqwest::Client::new()
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<serde_json::Value>().await.unwrap())
            }
        };
        for status in ["open", "approved", "rejected", "rerun"] {
            let (code, body) = get(format!("/v1/review/flags?status={status}")).await;
            assert_eq!(code, 200, "{db:?}: {status}: {body}");
        }
        let (code, body) = get("/v1/review/flags?status=maybe".into()).await;
        assert_eq!(
            (code, body["error"]["field"].as_str()),
            (400, Some("status")),
            "{body}"
        );
        for kind in fleetbox_proto::FlagKind::ALL {
            let (code, body) = get(format!("/v1/review/flags?kind={kind}")).await;
            assert_eq!(code, 200, "{db:?}: {kind}: {body}");
        }
        let (code, body) = get("/v1/review/flags?kind=sandbox_violation".into()).await;
        assert_eq!(
            (code, body["error"]["field"].as_str()),
            (400, Some("kind")),
            "{body}"
        );
        let job = c
            .client
            .submit(&spec(
                "name = 'edge'\ncode = 'pass'\nshards = { count = 3 }",
            ))
            .await
            .unwrap();
        for from in [u64::MAX, 1 << 63, (1 << 63) - 1, 3] {
            let (code, body) = get(format!("/v1/jobs/{}/shards?from={from}", job.id)).await;
            assert_eq!(code, 200, "{db:?}: {body}");
            assert_eq!(body["shards"], serde_json::json!([]), "{db:?}: from={from}");
        }
        let (_, body) = get(format!("/v1/jobs/{}/shards?from=1", job.id)).await;
        assert_eq!(body["shards"].as_array().unwrap().len(), 2, "{db:?}");
        c.stop().await;
    }
}
