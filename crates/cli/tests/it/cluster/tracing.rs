//! One trace per job, end to end: a `traceparent` on the submission names the job's trace; the
//! coordinator's and the agent's spans reach a local OTLP/HTTP endpoint in that trace, each
//! step descending from the one before; the job's audit entries name the trace id.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetbox_proto::JobSpec;
use fleetbox_proto::api::JobView;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;

use super::harness::{ADMIN, Cluster, Db, agent_command};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

/// An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1: what the real collector's endpoint
/// takes, decoded with the protocol's own types.
async fn collector() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut got = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        got.push(Span {
                            service: service.clone(),
                            name: span.name,
                            trace: hex::encode(span.trace_id),
                            id: hex::encode(span.span_id),
                            parent: hex::encode(span.parent_span_id),
                        });
                    }
                }
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    Vec::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

/// `POST /v1/jobs` with these extra headers; the job and the `x-trace-id` answered.
async fn submit(c: &Cluster, spec: &str, headers: &[(&str, &str)]) -> (JobView, String) {
    let spec = JobSpec::from_toml(spec).unwrap();
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/jobs", c.url()))
        .bearer_auth(ADMIN)
        .json(&spec);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let trace = resp.headers()["x-trace-id"].to_str().unwrap().to_string();
    (resp.json().await.unwrap(), trace)
}

const SPEC: &str = r#"
name = "traced"
code = """
import json, os
print(json.load(open(os.environ["FLEETBOX_INPUT"]))["items"][0] * 2)
"""
aggregate = "collect"
[shards]
items = [1, 2, 3]
"#;

pub async fn a_job_is_one_trace_from_submission_to_agents_and_back(db: Db) {
    let Some(mut c) = Cluster::start(db).await else {
        return;
    };
    let (endpoint, spans) = collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    c.server_env = otel
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c.kill_server();
    c.start_server();
    let state = c.agent_state(c.agents.len());
    let agent = agent_command(&c.url(), &state, 2)
        .envs(otel)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.agents.push(agent);

    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let (job, answered) = submit(&c, SPEC, &[("traceparent", &caller)]).await;
    assert_eq!(answered, TRACE);
    assert_eq!(job.trace_id.as_deref(), Some(TRACE));
    let result = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(
        result.result_value(),
        Some(serde_json::json!([2, 4, 6])),
        "{result:?}"
    );

    // The spans arrive in batches; wait for the last step of every shard.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ours = loop {
        let ours: Vec<Span> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == TRACE)
            .cloned()
            .collect();
        if ours.iter().filter(|s| s.name == "shard.reported").count() >= 3 {
            break ours;
        }
        assert!(
            Instant::now() < deadline,
            "{db:?}: spans of the job's trace so far: {ours:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let named = |name: &str| -> Vec<&Span> { ours.iter().filter(|s| s.name == name).collect() };
    let ids = |spans: &[&Span]| -> Vec<String> { spans.iter().map(|s| s.id.clone()).collect() };
    // The submission's span descends from the caller's.
    let submitted = named("POST /v1/jobs");
    assert_eq!(submitted.len(), 1, "{ours:#?}");
    assert_eq!(submitted[0].parent, CALLER_SPAN);
    assert_eq!(submitted[0].service, "fleetbox-server");
    // Each lease descends from the submission, each run from its lease, each report from
    // its run; the coordinator's spans and the agent's are told apart by service.
    let leased = named("shard.leased");
    assert_eq!(leased.len(), 3, "{ours:#?}");
    for s in &leased {
        assert_eq!(s.parent, submitted[0].id);
        assert_eq!(s.service, "fleetbox-server");
    }
    let runs = named("shard.run");
    assert_eq!(runs.len(), 3, "{ours:#?}");
    for s in &runs {
        assert!(ids(&leased).contains(&s.parent), "{s:?}");
        assert_eq!(s.service, "fleetbox-agent");
    }
    let reported = named("shard.reported");
    assert_eq!(reported.len(), 3, "{ours:#?}");
    for s in &reported {
        assert!(ids(&runs).contains(&s.parent), "{s:?}");
        assert_eq!(s.service, "fleetbox-server");
    }

    // The coordinator's log lines within the submission carry the trace id.
    let log = c.server_log();
    assert!(
        log.lines()
            .any(|l| l.contains("job submitted") && l.contains(TRACE)),
        "{log}"
    );

    // Every audit entry about the job names its trace.
    let entries = c
        .client
        .audit(&format!("job={}", job.id))
        .await
        .unwrap()
        .entries;
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "job.submitted",
        "shard.leased",
        "attempt.reported",
        "shard.accepted",
        "job.completed",
    ] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    for e in &entries {
        assert_eq!(e.details["trace_id"], TRACE, "{e:?}");
    }

    // Without a usable `traceparent`, a submission starts a trace of its own.
    for headers in [
        vec![],
        vec![("traceparent", "00-not-a-trace-01")],
        vec![(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )],
    ] {
        let (job, answered) = submit(&c, SPEC, &headers).await;
        assert_eq!(answered.len(), 32, "{headers:?}: {answered}");
        assert!(answered.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(answered, TRACE);
        assert_eq!(
            job.trace_id.as_deref(),
            Some(answered.as_str()),
            "{headers:?}"
        );
    }
}
