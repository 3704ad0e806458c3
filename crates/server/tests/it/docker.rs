//! The `docker` backend end to end: an agent runs shards in containers (runc), and the
//! coordinator re-checks every one and runs the `python` reducer in its own containers under
//! gVisor (`runsc`), the strictest sandbox it has. Real dockerd; the test script starts it.

use std::time::Duration;

use fleetbox_proto::{JobState, Verdict};
use fleetbox_sandbox::docker::DockerConfig;
use fleetbox_sandbox::{Backend, SandboxConfig};

use crate::support::{Coordinator, Db, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_the_coordinators_rechecks_run_in_containers() {
    let image = fleetbox_testkit::docker_image().await;
    let server_image = image.clone();
    let Some(mut c) = Coordinator::start_with(Db::Sqlite, move |cfg| {
        cfg.sandbox_backend = Backend::Docker;
        cfg.sandbox.docker = DockerConfig {
            image: server_image,
            runtime: Some("runsc".into()),
            host: None,
        };
    })
    .await
    else {
        return;
    };
    c.agent_on(
        "docker-agent",
        Backend::Docker,
        SandboxConfig {
            warm: 1,
            docker: DockerConfig {
                image: image.clone(),
                runtime: None,
                host: None,
            },
            ..SandboxConfig::default()
        },
    );
    let job = spec(
        r#"
name = "squares in containers"
backend = "docker"
code = "import json, os; print(sum(i * i for i in json.load(open(os.environ['FLEETBOX_INPUT']))['items']))"
[shards]
items = [1, 2, 3, 4, 5, 6]
per_shard = 2
[verify]
recheck = "all"
[aggregate]
reducer = "python"
code = '''
import json, os
print(json.dumps({"total": sum(json.load(open(os.environ["FLEETBOX_INPUT"])))}))
'''
"#,
    );
    let result = c.run(&job, Duration::from_secs(180)).await;
    assert_eq!(result.state, JobState::Completed, "{result:?}");
    assert_eq!(
        result.result_value(),
        Some(serde_json::json!({"total": 91}))
    );
    assert_eq!(result.summary.as_ref().unwrap().verified, 3, "{result:?}");
    for i in 0..3 {
        let d = c.client.shard(&result.id, i).await.unwrap();
        let agent = d.attempts.iter().find(|a| a.agent_id != "server").unwrap();
        assert_eq!(agent.verdict, Verdict::Valid);
        assert_eq!(agent.report["backend"], "docker", "{}", agent.report);
        assert_eq!(agent.report["runtime"], "runc", "{}", agent.report);
        let server = d.attempts.iter().find(|a| a.agent_id == "server").unwrap();
        assert_eq!(server.report["backend"], "docker", "{}", server.report);
        assert_eq!(server.report["runtime"], "runsc", "{}", server.report);
        assert_eq!(server.report["runner"]["id"], "server");
    }
    c.stop().await;
}
