//! Result receipts through a real coordinator and agent: `fleetbox job ID --receipt` is checked
//! offline by `fleetbox receipt verify` with the coordinator stopped, and every forgery of it is
//! named.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleetbox_proto::JobState;
use serde_json::Value;

use super::harness::{ADMIN, Cluster, Db};
use crate::support::bin;

fn cli(c: &Cluster, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .args(["--server", &c.url()])
        .env("FLEETBOX_TOKEN", ADMIN)
        .output()
        .unwrap()
}

/// `fleetbox receipt verify`: exit code and stderr.
fn verify(receipt: &Path, keys: &Path) -> (i32, String) {
    let out = Command::new(bin())
        .args(["receipt", "verify"])
        .arg(receipt)
        .arg("--trusted-keys")
        .arg(keys)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sha256(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

pub async fn a_receipt_verifies_offline_and_names_every_forgery(db: Db) {
    let Some(mut c) = Cluster::start_with(db, &["--audit-checkpoint", "200ms"]).await else {
        return;
    };
    c.add_agent(2);
    let code = "import json, os\nitems = json.load(open(os.environ['FLEETBOX_INPUT']))['items']\nprint(sum(i * i for i in items))\n";
    let job = c
        .submit(&format!(
            "name = \"receipted\"\ncode = {code:?}\naggregate = \"sum\"\n[shards]\nitems = [1, 2, 3, 4, 5, 6, 7, 8]\nper_shard = 2\n"
        ))
        .await;
    let done = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Completed, "{db:?}: {done:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("receipt.json");
    let keys = dir.path().join("keys");
    let out = cli(&c, &["job", &job.id, "--receipt"]);
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&path, &out.stdout).unwrap();
    std::fs::write(&keys, cli(&c, &["audit", "keys"]).stdout).unwrap();
    // A job that has not completed has no receipt.
    let failing = c
        .submit("name = \"f\"\ncode = \"raise SystemExit(1)\"\nshards = { count = 1 }\n")
        .await;
    c.wait(&failing.id, Duration::from_secs(60)).await;
    let refused = cli(&c, &["job", &failing.id, "--receipt"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not_completed"),
        "{refused:?}"
    );

    // Offline: the coordinator is gone.
    c.kill_server();
    let (code, stderr) = verify(&path, &keys);
    assert_eq!(code, 0, "{db:?}: {stderr}");
    assert!(
        stderr.contains("4 shard(s), 4 verified"),
        "{db:?}: every value checked by the server (the agent is new): {stderr}"
    );
    let receipt: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(receipt["result"], "204");
    for shard in receipt["shards"].as_array().unwrap() {
        assert_eq!(shard["value_from"], "agent", "{shard}");
        assert_eq!(shard["report_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(shard["signature"].as_str().unwrap().len(), 128);
    }

    // Each forgery, and what it is named.
    type Forge = Box<dyn Fn(&mut Value)>;
    let forged_result = "205".to_string();
    let completed_at = receipt["entries"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["action"] == "job.completed")
        .unwrap();
    let fresh = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let cases: Vec<(&str, Forge, &str)> = vec![
        (
            "a result changed",
            Box::new(move |r| r["result"] = Value::String("205".into())),
            "the result hashes",
        ),
        (
            "a result changed with its hash",
            {
                let text = forged_result.clone();
                Box::new(move |r| {
                    r["result"] = Value::String(text.clone());
                    r["result_sha256"] = Value::String(sha256(&text));
                })
            },
            "completion recorded",
        ),
        (
            "the completion entry edited to match",
            {
                let text = forged_result.clone();
                Box::new(move |r| {
                    r["result"] = Value::String(text.clone());
                    r["result_sha256"] = Value::String(sha256(&text));
                    r["entries"][completed_at]["details"]["result_sha256"] =
                        Value::String(sha256(&text));
                })
            },
            "not the one the signed chain holds",
        ),
        (
            "a shard's report hash",
            Box::new(|r| r["shards"][1]["report_sha256"] = Value::String("0".repeat(64))),
            "not the one recorded",
        ),
        (
            "a shard's verdict changed",
            Box::new(|r| r["shards"][0]["verified"] = Value::Bool(false)),
            "listed as verified",
        ),
        (
            "a shard left out",
            Box::new(|r| {
                r["shards"].as_array_mut().unwrap().pop();
            }),
            "the completion recorded",
        ),
        (
            "a leaf of the proof",
            Box::new(|r| r["proof"]["leaves"][0] = Value::String("1".repeat(64))),
            "do not hash to the signed chain",
        ),
        (
            "the checkpoint re-signed with another key",
            Box::new(move |r| {
                use ed25519_dalek::Signer;
                let cp = &r["checkpoint"];
                let msg = fleetbox_proto::api::AuditCheckpoint::message(
                    cp["tenant_id"].as_str().unwrap(),
                    cp["seq"].as_i64().unwrap(),
                    cp["chain"].as_str().unwrap(),
                    cp["at"].as_i64().unwrap(),
                );
                r["checkpoint"]["public_key"] =
                    Value::String(hex::encode(fresh.verifying_key().as_bytes()));
                r["checkpoint"]["signature"] =
                    Value::String(hex::encode(fresh.sign(&msg).to_bytes()));
            }),
            "not pinned",
        ),
    ];
    for (what, forge, says) in cases {
        let mut copy = receipt.clone();
        forge(&mut copy);
        let forged = dir.path().join("forged.json");
        std::fs::write(&forged, serde_json::to_vec(&copy).unwrap()).unwrap();
        let (code, stderr) = verify(&forged, &keys);
        assert_eq!(code, 1, "{db:?}: {what} passed: {stderr}");
        assert!(stderr.contains(says), "{db:?}: {what}: {stderr}");
    }
}
