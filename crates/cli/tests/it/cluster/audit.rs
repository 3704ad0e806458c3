//! The audit log through a real coordinator: every action leaves its entry with the right actor
//! and subject, the chain verifies, and tampering done directly in the database (SQLite and
//! PostgreSQL) is named by `fleetbox audit verify`.

use std::collections::HashSet;
use std::time::Duration;

use fleetbox_proto::JobState;
use fleetbox_proto::api::{AuditRecord, ReportBatch, ShardReport};
use fleetbox_proto::{ExecutionReport, Status};

use super::harness::{ADMIN, Cluster, Db};
use crate::support::bin;

async fn all_entries(c: &Cluster) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = c.client.audit(&format!("after={after}")).await.unwrap();
        out.extend(page.entries);
        match page.next_after {
            Some(n) => after = n,
            None => return out,
        }
    }
}

async fn db(c: &Cluster) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let url = match &c.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", c.data().join("fleetbox.db").display()),
    };
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap()
}

async fn exec(pool: &sqlx::AnyPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `fleetbox audit verify`: exit code, and the entry it names on stderr.
fn verify_cli(c: &Cluster) -> (i32, String) {
    let out = std::process::Command::new(bin())
        .args(["audit", "verify", "--server", &c.url()])
        .env("FLEETBOX_TOKEN", ADMIN)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn the_audit_log_records_every_action_and_names_tampering(db_kind: Db) {
    let Some(mut c) = Cluster::start_with(db_kind, &["--audit-checkpoint", "200ms"]).await else {
        return;
    };
    let victim = c.add_agent(1);
    // A job with a failing shard.
    let job = c
        .submit(
            "name = \"mixed\"\ncode = \"import os\\nif os.environ['FLEETBOX_SHARD_INDEX'] == '1': raise ValueError('boom')\\nprint(1)\"\nshards = { count = 3 }\naggregate = \"sum\"\nallow_partial = true\n",
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    // A lost agent: killed while it holds a lease (one attempt: the shard dies).
    let sleeper = c
        .submit("name = \"sleeper\"\ncode = \"import time; time.sleep(30)\"\nshards = { count = 1 }\nmax_attempts = 1\n")
        .await;
    c.wait_for(&sleeper.id, Duration::from_secs(30), |v| {
        v.shards.leased > 0
    })
    .await;
    c.kill_agent(victim);
    let r = c.wait(&sleeper.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed, "{r:?}");
    // A forged report the coordinator refuses (a part named as uploaded that is not).
    let forger_client =
        fleetbox_testkit::SignedAgent::enroll(&c.url(), super::harness::ENROLL, "forger").await;
    let mut forged = ShardReport::new(
        "lease_forged",
        1,
        ExecutionReport::unmeasured(Status::Ok, None),
    );
    forged.blobs.stdout = Some("0".repeat(64));
    let refused = forger_client
        .report(&ReportBatch {
            reports: vec![forged],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("missing_blob"));
    // A call with a token nobody issued.
    let stranger = fleetbox_client::Client::new(&c.url(), "not-a-token");
    assert_eq!(
        stranger.jobs(None, 1).await.unwrap_err().code(),
        Some("unauthorized")
    );
    // A cancelled job.
    let cancelled = c
        .submit("name = \"to cancel\"\ncode = \"print(1)\"\nshards = { count = 2 }\n")
        .await;
    c.client.cancel(&cancelled.id).await.unwrap();

    let entries = all_entries(&c).await;
    let has = |action: &str, actor_prefix: &str, job: Option<&str>| {
        entries.iter().any(|e| {
            e.action == action
                && e.actor.starts_with(actor_prefix)
                && job.is_none_or(|j| e.job_id.as_deref() == Some(j))
        })
    };
    for (action, actor, job_id) in [
        ("job.submitted", "admin:", Some(job.id.as_str())),
        ("agent.enrolled", "enroll:", None),
        ("shard.leased", "agent:", Some(job.id.as_str())),
        ("attempt.reported", "agent:", Some(job.id.as_str())),
        // A new agent's successes are held and checked by the server, which accepts them.
        ("shard.checking", "agent:", Some(job.id.as_str())),
        ("attempt.verified", "server", Some(job.id.as_str())),
        ("shard.accepted", "server", Some(job.id.as_str())),
        // ...and its failure too: the server's run fails alike and rejects the shard.
        ("shard.rejected", "server", Some(job.id.as_str())),
        ("job.completed", "server", Some(job.id.as_str())),
        ("agent.lost", "server", None),
        ("lease.expired", "server", Some(sleeper.id.as_str())),
        ("shard.dead", "server", Some(sleeper.id.as_str())),
        ("job.failed", "server", Some(sleeper.id.as_str())),
        ("report.refused", "agent:", None),
        ("job.cancelled", "admin:", Some(cancelled.id.as_str())),
        ("token.used_invalid", "unknown", None),
    ] {
        assert!(
            has(action, actor, job_id),
            "{db_kind:?}: no `{action}` by `{actor}…` for {job_id:?} in {:#?}",
            entries
                .iter()
                .map(|e| (&e.seq, &e.action, &e.actor))
                .collect::<Vec<_>>()
        );
    }
    // Three attempts of the first job (reported in one entry per job per report call), each
    // with its task, lease, status and timings.
    let reported: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e.action == "attempt.reported" && e.job_id.as_deref() == Some(&job.id))
        .flat_map(|e| e.details["attempts"].as_array().unwrap())
        .collect();
    assert_eq!(reported.len(), 3, "{db_kind:?}");
    let statuses: HashSet<&str> = reported
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, HashSet::from(["ok", "error"]));
    assert!(reported.iter().all(|a| a["wall_ms"].is_u64()));
    assert!(
        reported
            .iter()
            .all(|a| a["task"].is_i64() && a["lease"].is_string())
    );
    // The sequence is gap-free and the chain verifies.
    let seqs: Vec<i64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=entries.len() as i64).collect::<Vec<_>>());
    let v = c.client.audit_verify().await.unwrap();
    assert!(v.ok, "{db_kind:?}: {v:?}");
    assert_eq!(v.entries as usize, entries.len());
    assert_eq!(verify_cli(&c).0, 0);

    // A signed checkpoint of the head comes within a tick of the checkpoint interval.
    let head = v.head_seq;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let checkpoint = loop {
        let cps = c.client.audit_checkpoints().await.unwrap();
        if let Some(cp) = cps.into_iter().find(|cp| cp.seq == head) {
            break cp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of entry {head}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(checkpoint.chain, entries.last().unwrap().chain);
    assert_eq!(checkpoint.signature.len(), 128);

    // Exported, with the checkpoints kept elsewhere, and verified offline.
    let cli = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .args(["--server", &c.url()])
            .env("FLEETBOX_TOKEN", ADMIN)
            .output()
            .unwrap()
    };
    let kept = tempfile::tempdir().unwrap();
    let log = kept.path().join("log.jsonl");
    let cps = kept.path().join("checkpoints.jsonl");
    let keys = kept.path().join("trusted.keys");
    std::fs::write(&log, cli(&["audit", "export"]).stdout).unwrap();
    let exported = cli(&["audit", "checkpoints"]);
    std::fs::write(&cps, &exported.stdout).unwrap();
    // The key is pinned here, outside the database: as `audit keys` prints it, and as the
    // coordinator printed it at start (and `audit checkpoints` on stderr).
    let pinned = cli(&["audit", "keys"]);
    std::fs::write(&keys, &pinned.stdout).unwrap();
    let public_key = String::from_utf8_lossy(&pinned.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(public_key.len(), 64, "{pinned:?}");
    assert!(
        String::from_utf8_lossy(&exported.stderr).contains(&public_key),
        "{exported:?}"
    );
    let started = std::fs::read_to_string(c.dir.path().join("server.log")).unwrap();
    assert!(started.contains(&public_key), "the key at start: {started}");
    let offline_with = |file: &std::path::Path, keys: &std::path::Path| {
        let out = std::process::Command::new(bin())
            .args(["audit", "verify", "--file"])
            .arg(file)
            .arg("--checkpoints")
            .arg(&cps)
            .arg("--trusted-keys")
            .arg(keys)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let offline = |file: &std::path::Path| offline_with(file, &keys);
    let (code, stderr) = offline(&log);
    assert_eq!(code, 0, "{stderr}");
    // Believed only with a key given: another key fails it, no key is refused.
    let stranger = kept.path().join("stranger.keys");
    let other = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    std::fs::write(&stranger, hex::encode(other.verifying_key().as_bytes())).unwrap();
    let (code, stderr) = offline_with(&log, &stranger);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not pinned"), "{stderr}");
    let out = std::process::Command::new(bin())
        .args(["audit", "verify", "--file"])
        .arg(&log)
        .arg("--checkpoints")
        .arg(&cps)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--trusted-keys"),
        "{out:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() as i64 >= head);
    // One entry's actor edited in the copy.
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let k = lines.len() / 2;
    let mut e: AuditRecord = serde_json::from_str(&edited[k]).unwrap();
    e.actor = "admin:nobody".into();
    edited[k] = serde_json::to_string(&e).unwrap();
    let bad = kept.path().join("edited.jsonl");
    std::fs::write(&bad, edited.join("\n")).unwrap();
    let (code, stderr) = offline(&bad);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("entry {}", e.seq)), "{stderr}");
    // The tail cut off the copy: the kept checkpoint names an entry it no longer has.
    let short = kept.path().join("short.jsonl");
    std::fs::write(&short, lines[..k].join("\n")).unwrap();
    let (code, stderr) = offline(&short);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("checkpoint"), "{stderr}");

    // Tampering, straight in the database; each time `verify` fails and names the entry.
    c.kill_server();
    let pool = db(&c).await;
    exec(&pool, "CREATE TABLE audit_saved AS SELECT * FROM audit").await;
    // The log as it stands now: entries may have been added since it was listed above (an
    // agent found lost, say), before the coordinator was stopped.
    let (n,): (i64,) = sqlx::query_as("SELECT MAX(seq) FROM audit_saved")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (mid, other) = (n / 2, n / 2 + 1);
    let cases: Vec<(&str, String, i64)> = vec![
        (
            "a field edited",
            format!("UPDATE audit SET actor = 'admin:someone-else' WHERE seq = {mid}"),
            mid,
        ),
        (
            "a row deleted",
            format!("DELETE FROM audit WHERE seq = {mid}"),
            mid,
        ),
        (
            "two rows' contents swapped",
            format!(
                "UPDATE audit SET action = CASE seq WHEN {mid} THEN (SELECT action FROM audit_saved WHERE seq = {other}) \
                 ELSE (SELECT action FROM audit_saved WHERE seq = {mid}) END, \
                 details = CASE seq WHEN {mid} THEN (SELECT details FROM audit_saved WHERE seq = {other}) \
                 ELSE (SELECT details FROM audit_saved WHERE seq = {mid}) END \
                 WHERE seq IN ({mid}, {other})"
            ),
            mid,
        ),
        (
            "a row inserted",
            format!(
                "INSERT INTO audit (tenant_id, seq, at, actor, action, job_id, task_id, lease_id, agent_id, details, leaf, chain) \
                 SELECT tenant_id, {}, at, actor, action, job_id, task_id, lease_id, agent_id, details, leaf, chain \
                 FROM audit_saved WHERE seq = {n}",
                n + 1
            ),
            n + 1,
        ),
        (
            "the tail truncated",
            format!("DELETE FROM audit WHERE seq > {mid}"),
            mid + 1,
        ),
    ];
    for (what, sql, seq) in cases {
        exec(&pool, &sql).await;
        c.start_server();
        let v = c.client.audit_verify().await.unwrap();
        assert!(!v.ok, "{db_kind:?}: {what} went unnoticed");
        assert_eq!(
            v.problem.as_ref().map(|p| p.seq),
            Some(seq),
            "{db_kind:?}: {what}: {v:?}"
        );
        let (code, stderr) = verify_cli(&c);
        assert_eq!(code, 1, "{what}: {stderr}");
        assert!(stderr.contains(&format!("entry {seq}")), "{what}: {stderr}");
        c.kill_server();
        exec(&pool, "DELETE FROM audit").await;
        exec(&pool, "INSERT INTO audit SELECT * FROM audit_saved").await;
    }
    // The tail cut and the head row moved back to match: only the signed checkpoint notices.
    exec(
        &pool,
        "CREATE TABLE heads_saved AS SELECT * FROM audit_heads",
    )
    .await;
    exec(&pool, &format!("DELETE FROM audit WHERE seq > {mid}")).await;
    exec(
        &pool,
        &format!("UPDATE audit_heads SET seq = {mid}, chain = (SELECT chain FROM audit WHERE seq = {mid})"),
    )
    .await;
    c.start_server();
    let v = c.client.audit_verify().await.unwrap();
    assert!(!v.ok, "{db_kind:?}: a consistent truncation went unnoticed");
    assert_eq!(v.problem.as_ref().map(|p| p.seq), Some(mid + 1), "{v:?}");
    assert!(v.problem.unwrap().what.contains("checkpoint"));
    c.kill_server();
    exec(&pool, "DELETE FROM audit").await;
    exec(&pool, "INSERT INTO audit SELECT * FROM audit_saved").await;
    exec(&pool, "DELETE FROM audit_heads").await;
    exec(&pool, "INSERT INTO audit_heads SELECT * FROM heads_saved").await;
    exec(
        &pool,
        "CREATE TABLE checkpoints_saved AS SELECT * FROM audit_checkpoints",
    )
    .await;
    // A checkpoint edited: its signature no longer holds.
    exec(
        &pool,
        &format!("UPDATE audit_checkpoints SET chain = (SELECT chain FROM audit WHERE seq = 1) WHERE seq = {head}"),
    )
    .await;
    c.start_server();
    let v = c.client.audit_verify().await.unwrap();
    assert!(!v.ok, "{db_kind:?}: an edited checkpoint went unnoticed");
    assert_eq!(v.problem.as_ref().map(|p| p.seq), Some(head), "{v:?}");
    c.kill_server();
    let restore_checkpoints = || async {
        exec(&pool, "DELETE FROM audit_checkpoints").await;
        exec(
            &pool,
            "INSERT INTO audit_checkpoints SELECT * FROM checkpoints_saved",
        )
        .await;
    };
    restore_checkpoints().await;
    // An old checkpoint deleted rather than edited: the coordinator's journal still holds it.
    let (first_cp,): (i64,) = sqlx::query_as("SELECT MIN(seq) FROM audit_checkpoints")
        .fetch_one(&pool)
        .await
        .unwrap();
    exec(
        &pool,
        &format!("DELETE FROM audit_checkpoints WHERE seq = {first_cp}"),
    )
    .await;
    c.start_server();
    let v = c.client.audit_verify().await.unwrap();
    assert!(!v.ok, "{db_kind:?}: a deleted checkpoint went unnoticed");
    assert_eq!(v.problem.as_ref().map(|p| p.seq), Some(first_cp), "{v:?}");
    assert!(v.problem.unwrap().what.contains("missing"));
    c.kill_server();
    restore_checkpoints().await;
    c.start_server();
    assert!(
        c.client.audit_verify().await.unwrap().ok,
        "{db_kind:?}: restored"
    );

    // The whole rewrite a database holder can do: an entry edited and every entry after it
    // re-chained, the head moved along, every checkpoint re-signed with a fresh key. The chain
    // is whole again; only the pinned key and the journal give it away.
    c.kill_server();
    rewrite(&pool, mid).await;
    c.start_server();
    let v = c.client.audit_verify().await.unwrap();
    assert!(!v.ok, "{db_kind:?}: a re-signed rewrite went unnoticed");
    assert!(
        v.problem.as_ref().unwrap().what.contains("not pinned"),
        "{v:?}"
    );
    // ...and offline, a copy of the database against the checkpoints kept elsewhere and the
    // pinned keys, with no coordinator.
    let database = c
        .database_url
        .clone()
        .unwrap_or_else(|| c.data().display().to_string());
    let copy_verify = || {
        let out = std::process::Command::new(bin())
            .args(["audit", "verify", "--database", &database, "--checkpoints"])
            .arg(&cps)
            .arg("--trusted-keys")
            .arg(&keys)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = copy_verify();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not pinned"), "{stderr}");
    // The re-signed checkpoints deleted too: the kept ones are missing from it.
    c.kill_server();
    exec(&pool, "DELETE FROM audit_checkpoints").await;
    let (code, stderr) = copy_verify();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
    exec(&pool, "DELETE FROM audit").await;
    exec(&pool, "INSERT INTO audit SELECT * FROM audit_saved").await;
    exec(&pool, "DELETE FROM audit_heads").await;
    exec(&pool, "INSERT INTO audit_heads SELECT * FROM heads_saved").await;
    restore_checkpoints().await;
    let (code, stderr) = copy_verify();
    assert_eq!(code, 0, "{stderr}");
    c.start_server();

    // Pruned behind a checkpoint: the rest still verifies, anchored on it; elsewhere refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let anchor = loop {
        if let Some(cp) = c.client.audit_checkpoints().await.unwrap().last() {
            break cp.seq;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let checkpointed: HashSet<i64> = c
        .client
        .audit_checkpoints()
        .await
        .unwrap()
        .iter()
        .map(|cp| cp.seq)
        .collect();
    let bare = (1..anchor)
        .rev()
        .find(|s| !checkpointed.contains(s))
        .unwrap();
    let refused = c.client.audit_prune(bare).await.unwrap_err();
    assert_eq!(refused.code(), Some("no_checkpoint"), "{refused}");
    let before = log_shape(&pool).await;
    let pruned = c.client.audit_prune(anchor).await.unwrap();
    assert_eq!(pruned["pruned"], anchor, "{pruned}");
    let v = c.client.audit_verify().await.unwrap();
    // (CI saw this fail twice on PostgreSQL with every entry gone after a prune up to an
    // early checkpoint; the shapes name what the tables held.)
    assert!(
        v.ok,
        "{db_kind:?}: after the prune to {anchor}: {v:?}\nbefore: {before}\nafter: {}",
        log_shape(&pool).await
    );
    assert_eq!(v.entries as i64, v.head_seq - anchor, "{v:?}");
}

/// A coordinator SIGKILLed again and again during a job: every entry it wrote committed with
/// its change, so after the job the chain verifies and each accepted shard has exactly one
/// `shard.accepted` entry (and no entry names a change that did not happen).
pub async fn sigkilled_coordinators_leave_a_whole_audit_log(db_kind: Db) {
    let Some(mut c) = Cluster::start(db_kind).await else {
        return;
    };
    c.add_agent(2);
    c.add_agent(2);
    let job = c
        .submit(
            "name = \"killed under\"\ncode = \"import time, os; time.sleep(0.05); print(int(os.environ['FLEETBOX_SHARD_INDEX']))\"\nshards = { count = 120 }\naggregate = \"sum\"\nmax_attempts = 10\n",
        )
        .await;
    let mut mid_job = 0;
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(300 + 70 * round)).await;
        if !c.client.job(&job.id).await.unwrap().state.is_final() {
            mid_job += 1;
        }
        c.kill_server();
        c.start_server();
    }
    assert!(
        mid_job >= 3,
        "{db_kind:?}: only {mid_job} kills landed mid-job"
    );
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{db_kind:?}: {r:?}");
    assert_eq!(
        r.result_value(),
        Some(serde_json::json!((0..120).sum::<u64>()))
    );
    let v = c.client.audit_verify().await.unwrap();
    assert!(v.ok, "{db_kind:?}: {v:?}");
    let entries = all_entries(&c).await;
    let mut accepted: Vec<i64> = entries
        .iter()
        .filter(|e| e.action == "shard.accepted" && e.job_id.as_deref() == Some(&job.id))
        .filter_map(|e| e.task_id)
        .collect();
    accepted.sort();
    let n = accepted.len();
    accepted.dedup();
    assert_eq!(
        n,
        accepted.len(),
        "{db_kind:?}: a shard accepted twice in the log"
    );
    assert_eq!(n, 120, "{db_kind:?}: every accepted shard has its entry");
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.action == "job.completed" && e.job_id.as_deref() == Some(&job.id))
            .count(),
        1
    );
}

/// Two coordinators on one PostgreSQL database, an agent on each, a job's shards settled
/// through both at once: one chain (gap-free, verified), one `shard.accepted` per shard.
pub async fn two_coordinators_keep_one_audit_chain(db_kind: Db) {
    let Some(mut c) = Cluster::start(db_kind).await else {
        return;
    };
    let (second, port2) = c.spawn_server(0, "server2.log");
    let _second = super::KillOnDrop(second);
    c.add_agent(2);
    c.add_agent_to(&format!("http://127.0.0.1:{port2}"), 2);
    let job = c
        .submit(
            "name = \"two heads\"\ncode = \"import os; print(int(os.environ['FLEETBOX_SHARD_INDEX']))\"\nshards = { count = 200 }\naggregate = \"sum\"\n",
        )
        .await;
    let r = c.wait(&job.id, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{db_kind:?}: {r:?}");
    let entries = all_entries(&c).await;
    let seqs: Vec<i64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=entries.len() as i64).collect::<Vec<_>>(),
        "{db_kind:?}"
    );
    let agents: HashSet<&str> = entries
        .iter()
        .filter(|e| e.action == "shard.accepted")
        .filter_map(|e| e.agent_id.as_deref())
        .collect();
    assert_eq!(
        agents.len(),
        2,
        "{db_kind:?}: both coordinators' agents settled shards"
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.action == "shard.accepted" && e.job_id.as_deref() == Some(&job.id))
            .count(),
        200
    );
    let v = c.client.audit_verify().await.unwrap();
    assert!(v.ok, "{db_kind:?}: {v:?}");
}

/// What the audit tables hold: entries (count, first, last, tenants), heads and checkpoints.
async fn log_shape(pool: &sqlx::AnyPool) -> String {
    let entries: (i64, Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT COUNT(*), MIN(seq), MAX(seq) FROM audit")
            .fetch_one(pool)
            .await
            .unwrap();
    let tenants: Vec<(String, i64)> =
        sqlx::query_as("SELECT tenant_id, COUNT(*) FROM audit GROUP BY tenant_id")
            .fetch_all(pool)
            .await
            .unwrap();
    let heads: Vec<(String, i64)> = sqlx::query_as("SELECT tenant_id, seq FROM audit_heads")
        .fetch_all(pool)
        .await
        .unwrap();
    let checkpoints: Vec<(i64,)> = sqlx::query_as("SELECT seq FROM audit_checkpoints ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap();
    format!(
        "entries (count, min, max) {entries:?} by tenant {tenants:?}; heads {heads:?}; \
         checkpoints {:?}",
        checkpoints.iter().map(|c| c.0).collect::<Vec<_>>()
    )
}

/// Rewrite the log as someone holding only the database can: entry `seq`'s actor changed, its
/// leaf and every chain value after it recomputed, the head moved along, and every checkpoint
/// re-signed with a fresh key.
async fn rewrite(pool: &sqlx::AnyPool, seq: i64) {
    use ed25519_dalek::Signer;
    use fleetbox_server::store::audit::{Record, link};
    let records: Vec<Record> = sqlx::query_as(
        "SELECT tenant_id, seq, at, actor, action, job_id, task_id, lease_id, agent_id, details, \
         leaf, chain FROM audit ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut chain = [0u8; 32];
    for mut r in records {
        if r.seq == seq {
            r.actor = "admin:someone-else".into();
        }
        if r.seq >= seq {
            let leaf = r.computed_leaf();
            chain = link(&chain, &leaf);
            exec(
                pool,
                &format!(
                    "UPDATE audit SET actor = '{}', leaf = '{}', chain = '{}' WHERE seq = {}",
                    r.actor,
                    hex::encode(leaf),
                    hex::encode(chain),
                    r.seq
                ),
            )
            .await;
        } else {
            chain = <[u8; 32]>::try_from(hex::decode(&r.chain).unwrap()).unwrap();
        }
    }
    exec(
        pool,
        "UPDATE audit_heads SET chain = (SELECT chain FROM audit WHERE seq = audit_heads.seq)",
    )
    .await;
    let fresh = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT tenant_id, seq, at FROM audit_checkpoints")
            .fetch_all(pool)
            .await
            .unwrap();
    for (tenant, cp, at) in rows {
        let (chain,): (String,) =
            sqlx::query_as(&format!("SELECT chain FROM audit WHERE seq = {cp}"))
                .fetch_one(pool)
                .await
                .unwrap();
        let msg = fleetbox_proto::api::AuditCheckpoint::message(&tenant, cp, &chain, at);
        exec(
            pool,
            &format!(
                "UPDATE audit_checkpoints SET chain = '{chain}', public_key = '{}', signature = '{}' WHERE seq = {cp}",
                hex::encode(fresh.verifying_key().as_bytes()),
                hex::encode(fresh.sign(&msg).to_bytes())
            ),
        )
        .await;
    }
}

/// A webhook receiver on loopback: each request's body, answered `200`.
async fn receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/checkpoints", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        break text[end + 4..end + 4 + length].to_string();
                    }
                };
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tx.send(body);
            });
        }
    });
    (url, rx)
}

/// Checkpoints leave the machine as they are made: appended to a file, piped to a command and
/// posted to a webhook, the same ones the database holds; a sink that fails is counted and
/// does not hold up the others; and a copy of the database verifies against what was shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_shipped_to_a_file_a_command_and_a_webhook() {
    let (url, mut posted) = receiver().await;
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("shipped.jsonl");
    let piped = out.path().join("piped.jsonl");
    let flags = [
        "--audit-checkpoint".to_string(),
        "200ms".into(),
        "--audit-ship".into(),
        format!("file:{}", file.display()),
        "--audit-ship".into(),
        format!("exec:cat >> '{}'", piped.display()),
        "--audit-ship".into(),
        "exec:exit 3".into(),
        "--audit-ship".into(),
        url,
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let Some(c) = Cluster::start_with(Db::Sqlite, &flags).await else {
        return;
    };
    c.submit("name = \"a\"\ncode = \"print(1)\"\nshards = { count = 2 }\n")
        .await;
    let read = |path: &std::path::Path| -> Vec<fleetbox_proto::api::AuditCheckpoint> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let stored = loop {
        let stored = c.client.audit_checkpoints().await.unwrap();
        let head = c.client.audit_verify().await.unwrap().head_seq;
        if stored.last().is_some_and(|cp| cp.seq == head)
            && read(&file).len() == stored.len()
            && read(&piped).len() == stored.len()
        {
            break stored;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not shipped: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(read(&file), stored);
    assert_eq!(read(&piped), stored);
    let mut webhook = Vec::new();
    while webhook.len() < stored.len() {
        let body = tokio::time::timeout(Duration::from_secs(10), posted.recv())
            .await
            .expect("the webhook got every checkpoint")
            .unwrap();
        webhook.push(serde_json::from_str::<fleetbox_proto::api::AuditCheckpoint>(&body).unwrap());
    }
    assert_eq!(webhook, stored);
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", c.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleetbox_audit_ship_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(failures >= 1, "{metrics}");
    // What was shipped is enough to check a copy of the database, with the pinned key.
    let keys = out.path().join("keys");
    let printed = std::process::Command::new(bin())
        .args(["audit", "keys", "--server", &c.url()])
        .env("FLEETBOX_TOKEN", ADMIN)
        .output()
        .unwrap();
    std::fs::write(&keys, printed.stdout).unwrap();
    let checked = std::process::Command::new(bin())
        .args(["audit", "verify", "--database"])
        .arg(c.data())
        .arg("--checkpoints")
        .arg(&file)
        .arg("--trusted-keys")
        .arg(&keys)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
}
