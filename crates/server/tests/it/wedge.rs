//! Clients that hang up mid-request never wedge the store: bursts of writes whose HTTP
//! clients time out after a few milliseconds (a 3,000-shard submission, cancels, pauses),
//! after which a new job completes and a silent agent is marked lost, on both stores.

use std::time::{Duration, Instant};

use fleetbox_testkit::SignedAgent;

use crate::support::{BOTH, Coordinator, spec};

const ROUNDS: usize = 30;

fn big_spec() -> serde_json::Value {
    serde_json::json!({
        "name": "burst",
        "code": "print(1)",
        "shards": { "count": 3000 },
        "aggregate": "count",
    })
}

/// One request that gives up after `ms` milliseconds; what it got does not matter.
async fn hang_up(
    http: &reqwest::Client,
    url: String,
    token: &str,
    body: Option<serde_json::Value>,
    ms: u64,
) {
    let mut req = http
        .post(url)
        .bearer_auth(token)
        .timeout(Duration::from_millis(ms));
    if let Some(body) = body {
        req = req.json(&body);
    }
    let _ = req.send().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_hanging_up_mid_write_never_wedge_the_store() {
    for db in BOTH {
        let Some(mut c) = Coordinator::start(db).await else {
            continue;
        };
        let base = c.running.url();
        let token = c.running.admin_token.clone();
        let silent = SignedAgent::enroll(&base, &c.running.enroll_token, "silent").await;
        let targets: Vec<String> = {
            let mut ids = Vec::new();
            for _ in 0..3 {
                ids.push(
                    c.client
                        .submit(&spec("name = 't'\ncode = 'print(1)'\n[shards]\ncount = 50"))
                        .await
                        .unwrap()
                        .id,
                );
            }
            ids
        };
        let http = reqwest::Client::new();
        for round in 0..ROUNDS {
            let mut burst = Vec::new();
            for i in 0..24u64 {
                // Spread over the request's whole life: parsing, review, `BEGIN`, the inserts, `COMMIT`.
                let ms = 1 + (i * 37 + round as u64 * 11) % 160;
                let target = &targets[i as usize % targets.len()];
                let (url, body) = match i % 4 {
                    0 | 1 => (format!("{base}/v1/jobs"), Some(big_spec())),
                    2 => (format!("{base}/v1/jobs/{target}/pause"), None),
                    _ => (format!("{base}/v1/jobs/{target}/cancel"), None),
                };
                burst.push(hang_up(&http, url, &token, body, ms));
            }
            futures_util::future::join_all(burst).await;
            // Every round leaves a store that writes.
            let probe = c
                .client
                .submit(&spec(
                    "name = 'probe'\ncode = 'print(1)'\n[shards]\ncount = 2",
                ))
                .await;
            assert!(probe.is_ok(), "{db:?}, round {round}: {probe:?}");
            c.client.cancel(&probe.unwrap().id).await.unwrap();
        }
        // Writes work: a new job runs to its end on a fresh agent (ahead of the burst's
        // submissions that got through)...
        c.agent("worker", Default::default());
        let job = c
            .client
            .submit(&spec(
                "name = 'after'\ncode = 'print(2)'\naggregate = 'sum'\npriority = 100\n[shards]\ncount = 4",
            ))
            .await
            .expect("a submission after the burst");
        let done = c.wait(&job.id, Duration::from_secs(90)).await;
        assert_eq!(
            done.state,
            fleetbox_proto::JobState::Completed,
            "{db:?}: {done:?}"
        );
        assert_eq!(done.result.as_ref().map(|r| r.get()), Some("8"), "{db:?}");
        // ...and the scheduler's sweep marks the agent that went silent as lost.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let agents = c.client.agents().await.unwrap();
            let state = agents
                .agents
                .iter()
                .find(|a| a.id == silent.agent_id)
                .map(|a| a.state.as_str().to_string());
            if state.as_deref() == Some("lost") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{db:?}: the silent agent is still {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.stop().await;
    }
}
