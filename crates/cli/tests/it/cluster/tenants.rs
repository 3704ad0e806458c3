//! `fleetbox tenant` and `fleetbox token` against a real coordinator process: a tenant made
//! with caps, a scoped token printed once, its jobs invisible to the operator's own tenant,
//! an enrolment token running out, revocation, and typed usage errors.

use std::process::{Command, Output};

use super::harness::{ADMIN, Cluster, Db};
use crate::support::bin;

fn fleetbox(c: &Cluster, token: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .args(["--server", &c.url()])
        .env("FLEETBOX_TOKEN", token)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_tokens_from_the_command_line() {
    let Some(c) = Cluster::start(Db::Sqlite).await else {
        return;
    };
    let made = ok(fleetbox(
        &c,
        ADMIN,
        &[
            "tenant",
            "create",
            "acme",
            "--max-running-shards",
            "2",
            "--submit-rate",
            "5/s",
            "--max-blob-bytes",
            "1GiB",
        ],
    ));
    assert!(made.contains("acme") && made.contains("0/2"), "{made}");
    assert!(made.contains("0/1073741824"), "{made}");
    // The secret alone on stdout, what it is on stderr.
    let out = fleetbox(
        &c,
        ADMIN,
        &[
            "token",
            "create",
            "--tenant",
            "acme",
            "--scope",
            "read,submit",
            "--ttl",
            "1d",
            "--name",
            "ci",
        ],
    );
    let (token, about) = text(&out);
    assert!(out.status.success(), "{about}");
    let token = token.trim().to_string();
    assert!(token.starts_with("fbx_user_"), "{token}");
    assert!(
        about.contains("tenant `acme`") && about.contains("read,submit"),
        "{about}"
    );

    // Its job is the tenant's: listed with its token, not with the operator's.
    let spec = c.dir.path().join("job.toml");
    std::fs::write(
        &spec,
        "name = \"acme-job\"\ncode = \"print(1)\"\nshards = { count = 3 }\n",
    )
    .unwrap();
    ok(fleetbox(&c, &token, &["submit", spec.to_str().unwrap()]));
    assert!(ok(fleetbox(&c, &token, &["jobs"])).contains("acme-job"));
    assert!(!ok(fleetbox(&c, ADMIN, &["jobs"])).contains("acme-job"));
    // A read/submit token may not make tokens.
    let out = fleetbox(&c, &token, &["token", "create", "--scope", "read"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("`admin` scope"), "{}", text(&out).1);

    // The tenant's use shows against its caps.
    let shown = ok(fleetbox(&c, ADMIN, &["tenant", "show", "acme", "--json"]));
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown[0]["shards_today"], 3, "{shown}");
    assert_eq!(shown[0]["caps"]["max_running_shards"], 2);
    ok(fleetbox(
        &c,
        ADMIN,
        &["tenant", "update", "acme", "--clear", "max_running_shards"],
    ));
    let list = ok(fleetbox(&c, ADMIN, &["tenant", "list", "--json"]));
    assert!(
        list.contains("\"default\"") && !list.contains("max_running_shards"),
        "{list}"
    );

    // An enrolment token of one use enrols one agent.
    let enroll = ok(fleetbox(
        &c,
        ADMIN,
        &[
            "token", "create", "--tenant", "acme", "--enroll", "--uses", "1",
        ],
    ));
    let listed = ok(fleetbox(&c, ADMIN, &["token", "list", "--tenant", "acme"]));
    assert!(
        listed.contains("1 uses left") && listed.contains("ci"),
        "{listed}"
    );
    fleetbox_testkit::SignedAgent::enroll(&c.url(), enroll.trim(), "one").await;
    let listed = ok(fleetbox(&c, ADMIN, &["token", "list", "--tenant", "acme"]));
    assert!(listed.contains("used up"), "{listed}");

    // Revoked: refused with a reason, and listed as such.
    let tokens: serde_json::Value = serde_json::from_str(&ok(fleetbox(
        &c,
        ADMIN,
        &["token", "list", "--tenant", "acme", "--json"],
    )))
    .unwrap();
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ok(fleetbox(&c, ADMIN, &["token", "revoke", &id])).contains("revoked"));
    let out = fleetbox(&c, &token, &["jobs"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("revoked"), "{}", text(&out).1);

    // Usage errors name what is wrong.
    let out = fleetbox(&c, ADMIN, &["token", "create", "--scope", "read,root"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("`root` is not a scope"),
        "{}",
        text(&out).1
    );
    let out = fleetbox(&c, ADMIN, &["tenant", "create", "Bad/Name"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("1 to 40"), "{}", text(&out).1);
}

/// `fleetbox job ID --shards` streams a large job page by page: every shard once, in order,
/// as one JSON array (or one line each), and `--state` filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_of_a_large_job_are_listed_page_by_page() {
    let Some(c) = Cluster::start(Db::Sqlite).await else {
        return;
    };
    // No agent: all 2,500 stay queued.
    let job = c
        .submit("name = \"many\"\ncode = 'print(1)'\nshards = { count = 2500 }\n")
        .await;
    let out = ok(fleetbox(&c, ADMIN, &["job", &job.id, "--shards", "--json"]));
    let shards: Vec<serde_json::Value> = serde_json::from_str(&out).expect("one JSON array");
    assert_eq!(shards.len(), 2500);
    assert!(
        shards
            .iter()
            .enumerate()
            .all(|(i, s)| s["index"] == i as u64 && s["state"] == "queued")
    );
    let out = ok(fleetbox(&c, ADMIN, &["job", &job.id, "--shards"]));
    assert_eq!(out.lines().count(), 2501, "a header and a line a shard");
    let out = ok(fleetbox(
        &c,
        ADMIN,
        &["job", &job.id, "--shards", "--json", "--state", "dead"],
    ));
    let none: Vec<serde_json::Value> = serde_json::from_str(&out).expect("an empty array");
    assert!(none.is_empty(), "{out}");
}
