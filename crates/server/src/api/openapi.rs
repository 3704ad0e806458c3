//! The OpenAPI 3.1 document of the `/v1` API, generated from the handlers' `#[utoipa::path]`
//! attributes and the types of `fleetbox_proto` (`GET /v1/openapi.json`).

use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, RefOr};
use utoipa::{OpenApi, ToSchema as _};

use super::{agents, audit, jobs, review, run, sessions, tenancy};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fleetbox",
        description = "A distributed sandbox for Python: jobs split into shards, run by agents \
                       in sandboxes, verified, folded into one result, every decision audited. \
                       Every error is `{\"error\": {\"code\", \"message\", \"trace_id\", \"field\"?}}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        jobs::status, jobs::submit, jobs::list, jobs::get_job, jobs::shards, jobs::shard,
        jobs::result, jobs::receipt, jobs::rerun_tainted, jobs::cancel, jobs::pause, jobs::resume, jobs::priority, jobs::rerun_failed, jobs::get_blob, jobs::chain,
        agents::list, agents::release, agents::quarantine, agents::revoke, agents::hardened, agents::enroll, agents::lease, agents::heartbeat,
        agents::return_leases, agents::rotate_key, agents::report, agents::put_blob,
        review::review, review::flags, review::approve, review::reject, review::rerun,
        run::run,
        sessions::open, sessions::run, sessions::list, sessions::get, sessions::close,
        audit::list, audit::prune, audit::checkpoints, audit::verify, audit::keys,
        tenancy::whoami, tenancy::create_tenant, tenancy::list_tenants, tenancy::show_tenant,
        tenancy::update_tenant, tenancy::create_token, tenancy::list_tokens, tenancy::revoke_token,
        tenancy::rotate_token, tenancy::create_pool, tenancy::list_pools,
    ),
    components(schemas(fleetbox_proto::api::ErrorBody)),
    modifiers(&Conventions),
)]
struct Api;

/// What every operation shares: a bearer token (admin, agent or enroll, as the operation
/// says), and the typed error body on every 4xx and 5xx.
struct Conventions;

impl utoipa::Modify for Conventions {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "an admin, agent or enroll token: `Authorization: Bearer fbx_…`",
                    ))
                    .build(),
            ),
        );
        let name = fleetbox_proto::api::ErrorBody::name();
        doc.security = Some(vec![SecurityRequirement::new(
            "token",
            Vec::<String>::new(),
        )]);
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            name.clone(),
                        ))))
                        .build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .entry("4XX".into())
                    .or_insert_with(|| RefOr::T(error("a refused request: bad input, a missing or wrong token, an unknown id, a conflict")));
                op.responses
                    .responses
                    .entry("5XX".into())
                    .or_insert_with(|| {
                        RefOr::T(error("the coordinator failed (its log names the trace id)"))
                    });
            }
        }
    }
}

/// Links from the answers that make a job (`POST /v1/jobs`, `POST /v1/run`) to every
/// operation on `/v1/jobs/{id}…`, naming the new job's id: what a client (and a fuzzer's
/// stateful phase) follows from one to the next. Written into the JSON: utoipa 5 serializes
/// a link's `operationId` as `operation_id`, which no client reads.
fn link_jobs(doc: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let mut targets = Vec::new();
    for (path, item) in paths.iter() {
        if !path.starts_with("/v1/jobs/{id}") {
            continue;
        }
        for method in ["get", "post"] {
            if let Some(id) = item[method]["operationId"].as_str() {
                targets.push((id.to_string(), path.contains("{index}")));
            }
        }
    }
    let sources = [
        ("/v1/jobs", "201", "$response.body#/id"),
        ("/v1/run", "200", "$response.body#/job_id"),
        ("/v1/run", "202", "$response.body#/job_id"),
    ];
    for (path, status, id) in sources {
        let Some(resp) = paths
            .get_mut(path)
            .and_then(|p| p["post"]["responses"].get_mut(status))
        else {
            continue;
        };
        let links: serde_json::Map<String, Value> = targets
            .iter()
            .map(|(target, index)| {
                let mut parameters = json!({ "id": id });
                if *index {
                    parameters["index"] = json!(0);
                }
                (
                    target.clone(),
                    json!({ "operationId": target, "parameters": parameters }),
                )
            })
            .collect();
        resp["links"] = Value::Object(links);
    }
}

/// The document, as served (built once).
pub fn document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(Api::openapi()).expect("the document serializes");
        link_jobs(&mut doc);
        serde_json::to_string_pretty(&doc).expect("the document serializes")
    })
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    /// Every `$ref` names a schema the document has, the run report's egress log and the
    /// spec's `network` forms among them.
    #[test]
    fn every_reference_resolves() {
        let doc: Value = serde_json::from_str(super::document()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        for r in &found {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(schemas.contains_key(name), "{r} does not resolve");
        }
        for name in [
            "NetworkSpec",
            "EgressConnection",
            "Limits",
            "ExecutionReport",
        ] {
            assert!(schemas.contains_key(name), "{name} is missing");
        }
    }
}
