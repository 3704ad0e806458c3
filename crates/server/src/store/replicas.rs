//! Replicas and quorum (`verify.replicas`, `verify.quorum`): a shard runs on distinct agents
//! until `quorum` of their results agree under the job's `compare`.
//!
//! In the report's transaction, each agent success of a replicated shard is put with the
//! shard's other unsettled agent results (verdict `unchecked` or `inconclusive`):
//! - a group of `quorum` agreeing results accepts the shard, verified: the group's results
//!   are `valid`, the others `invalid` (an outvoted agent is struck like one a server check
//!   caught);
//! - fewer results than `replicas`: the shard goes back to the queue for another agent (the
//!   lease query never hands it to an agent, nor while others can take it a machine, that ran
//!   it before);
//! - `replicas` results without a quorum: the server's own run settles it (`reported`, then
//!   [`super::Store::finish_check`]); if the server cannot run it, one more replica is issued,
//!   and a shard still without a quorum after `max_attempts` is `rejected` with the reason.
//!
//! Outputs kept as blobs (over the inline size) compare by their canonical hash whatever
//! `compare` says: the store does not read blobs.

use fleetbox_proto::{Compare, Outcome, Status, TaskState, Verdict};
use serde_json::Value;
use sqlx::Row;

use super::audit::{Action, Entry};
use super::settle::Tx;
use super::sql::Sql;
use super::{Doing, StoreError};

/// An agent's result for a shard, not yet settled by a check or a quorum.
#[derive(Debug, Clone)]
pub struct Replica {
    pub attempt_id: i64,
    pub agent_id: String,
    /// What the agent reported: `ok` for a replica; a failure when the check is about one.
    pub status: Status,
    /// The report's message (why a failure failed), as the agent put it.
    pub message: Option<String>,
    /// `unchecked`, or `inconclusive` (a server that could not judge it).
    pub verdict: Verdict,
    pub output: Option<String>,
    pub output_blob: Option<String>,
    pub output_sha256: Option<String>,
    pub stdout_sha256: Option<String>,
    /// The interpreter and backend it ran on (trust is kept per pair).
    pub python: String,
    pub backend: String,
}

impl Replica {
    /// The parsed inline output (`None` for a blob, or no output).
    pub fn value(&self) -> Option<Value> {
        self.output
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
    }
}

/// The columns a [`Replica`] is read from.
const REPLICA_COLUMNS: &str = "SELECT id, agent_id, status, verdict, output, output_blob, \
     output_sha256, stdout_sha256, report FROM attempts WHERE runner = 'agent' AND ";

/// `task_id`'s agent successes still open to judgement, oldest first.
pub(super) async fn pending(
    conn: &mut sqlx::AnyConnection,
    task_id: i64,
) -> Result<Vec<Replica>, StoreError> {
    let rows = Sql::new(REPLICA_COLUMNS)
        .push("status = ")
        .bind(Status::Ok.as_str())
        .push(" AND verdict IN (")
        .bind(Verdict::Unchecked.as_str())
        .push(", ")
        .bind(Verdict::Inconclusive.as_str())
        .push(") AND task_id = ")
        .bind(task_id)
        .push(" ORDER BY id")
        .build()
        .fetch_all(conn)
        .await
        .doing("reading a shard's replicas")?;
    rows.iter().map(replica_of).collect()
}

/// One agent attempt of `task_id`, whatever it reported, while nothing has judged it.
pub(super) async fn unchecked(
    conn: &mut sqlx::AnyConnection,
    task_id: i64,
    attempt_id: i64,
) -> Result<Option<Replica>, StoreError> {
    let row = Sql::new(REPLICA_COLUMNS)
        .push("id = ")
        .bind(attempt_id)
        .push(" AND task_id = ")
        .bind(task_id)
        .push(" AND verdict = ")
        .bind(Verdict::Unchecked.as_str())
        .build()
        .fetch_optional(conn)
        .await
        .doing("reading the attempt to check")?;
    row.as_ref().map(replica_of).transpose()
}

fn replica_of(row: &sqlx::any::AnyRow) -> Result<Replica, StoreError> {
    let get = |e| StoreError::Query {
        doing: "reading a shard's replicas",
        source: e,
    };
    let report: String = row.try_get("report").map_err(get)?;
    let report: Value = serde_json::from_str(&report).unwrap_or_default();
    Ok(Replica {
        attempt_id: row.try_get("id").map_err(get)?,
        agent_id: row.try_get("agent_id").map_err(get)?,
        status: super::jobs::status(&row.try_get::<String, _>("status").map_err(get)?)?,
        verdict: Verdict::try_from(row.try_get::<String, _>("verdict").map_err(get)?).map_err(
            |e| StoreError::Corrupt {
                what: "attempt verdict",
                detail: e.to_string(),
            },
        )?,
        output: row.try_get("output").map_err(get)?,
        output_blob: row.try_get("output_blob").map_err(get)?,
        output_sha256: row.try_get("output_sha256").map_err(get)?,
        stdout_sha256: row.try_get("stdout_sha256").map_err(get)?,
        python: report["runner"]["python"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        backend: report["backend"].as_str().unwrap_or("").to_string(),
        message: report["message"].as_str().map(str::to_string),
    })
}

/// What the replicas of a shard decide.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// These results (indexes into the replicas) agree and are a quorum; the first is the
    /// shard's value.
    Quorum(Vec<usize>),
    /// Fewer results than `replicas`: another agent runs it.
    More,
    /// `replicas` results (or more) and no quorum: the server settles it.
    Disagree,
}

/// Group `replicas` by agreement under `compare` and decide.
pub fn decide(replicas: &[Replica], compare: Compare, want: u32, quorum: u32) -> Decision {
    let values: Vec<Option<Value>> = replicas.iter().map(Replica::value).collect();
    let outcome = |i: usize| {
        let r = &replicas[i];
        Outcome {
            // A blob's value is not read here: compare such results by hash.
            output: values[i].as_ref(),
            output_sha256: r.output_sha256.as_deref(),
            stdout_sha256: r.stdout_sha256.as_deref().unwrap_or(""),
        }
    };
    let agrees = |a: usize, b: usize| {
        let blob = replicas[a].output_blob.is_some() || replicas[b].output_blob.is_some();
        if blob && matches!(compare, Compare::Numeric(_)) {
            return replicas[a].output_sha256 == replicas[b].output_sha256;
        }
        compare.agrees(&outcome(a), &outcome(b))
    };
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in 0..replicas.len() {
        match groups.iter_mut().find(|g| agrees(g[0], i)) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    if let Some(best) = groups
        .into_iter()
        .filter(|g| g.len() >= quorum as usize)
        .max_by_key(|g| g.len())
    {
        return Decision::Quorum(best);
    }
    if replicas.len() < want as usize {
        Decision::More
    } else {
        Decision::Disagree
    }
}

/// Where a verdict was reached, for the audit entries and the quarantine's reason.
pub(super) struct Judged<'a> {
    pub tenant_id: &'a str,
    pub job_id: &'a str,
    pub task_id: i64,
    pub shard_index: i64,
}

/// Record `verdict` for `replica`: the attempt's verdict, the agent's trust for its
/// interpreter and backend (a valid result extends its run, an invalid one resets it), and
/// for an invalid one a strike; at `strikes_limit` strikes the agent is quarantined (audited
/// into `entries`). Returns the agent when this quarantined it.
pub(super) async fn record_verdict(
    tx: &mut Tx,
    replica: &Replica,
    verdict: Verdict,
    at: &Judged<'_>,
    strikes_limit: i64,
    now: i64,
    entries: &mut Vec<Entry>,
) -> Result<Option<String>, StoreError> {
    Sql::new("UPDATE attempts SET verdict = ")
        .bind(verdict.as_str())
        .push(" WHERE id = ")
        .bind(replica.attempt_id)
        .build()
        .execute(&mut **tx)
        .await
        .doing("recording a verdict")?;
    let (valid, invalid) = match verdict {
        Verdict::Valid => (1i64, 0i64),
        Verdict::Invalid => (0, 1),
        _ => return Ok(None),
    };
    Sql::new(
        "INSERT INTO agent_trust (agent_id, python, backend, consecutive_valid, valid, \
         invalid, updated_at) VALUES (",
    )
    .bind(replica.agent_id.as_str())
    .push(", ")
    .bind(replica.python.as_str())
    .push(", ")
    .bind(replica.backend.as_str())
    .push(", ")
    .bind(valid)
    .push(", ")
    .bind(valid)
    .push(", ")
    .bind(invalid)
    .push(", ")
    .bind(now)
    .push(
        ") ON CONFLICT (agent_id, python, backend) DO UPDATE SET \
         consecutive_valid = CASE WHEN excluded.invalid > 0 THEN 0 \
         ELSE agent_trust.consecutive_valid + 1 END, \
         valid = agent_trust.valid + excluded.valid, \
         invalid = agent_trust.invalid + excluded.invalid, \
         updated_at = excluded.updated_at",
    )
    .build()
    .execute(&mut **tx)
    .await
    .doing("recording an agent's trust")?;
    if invalid == 0 {
        return Ok(None);
    }
    let (strikes, already): (i64, Option<i64>) =
        Sql::new("UPDATE agents SET strikes = strikes + 1 WHERE id = ")
            .bind(replica.agent_id.as_str())
            .push(" RETURNING strikes, quarantined_at")
            .build_as()
            .fetch_one(&mut **tx)
            .await
            .doing("counting an agent's strikes")?;
    if strikes < strikes_limit || already.is_some() {
        return Ok(None);
    }
    let why = format!(
        "{strikes} invalid results (the limit is {strikes_limit}); the last on shard {} of job {}",
        at.shard_index, at.job_id
    );
    Sql::new("UPDATE agents SET quarantined_at = ")
        .bind(now)
        .push(", quarantine_reason = ")
        .bind(why.as_str())
        .push(" WHERE id = ")
        .bind(replica.agent_id.as_str())
        .build()
        .execute(&mut **tx)
        .await
        .doing("quarantining an agent")?;
    entries.push(
        Entry::new(at.tenant_id, "server", Action::AgentQuarantined)
            .agent(&replica.agent_id)
            .details(serde_json::json!({ "strikes": strikes, "why": why })),
    );
    Ok(Some(replica.agent_id.clone()))
}

/// What a replicated shard's success did in the report's transaction.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// The shard moved (accepted, re-queued, held for the server, or rejected).
    pub moved: bool,
    /// The attempt chosen as the shard's value, when a quorum accepted it.
    pub chosen: Option<i64>,
    /// Agents this quarantined.
    pub quarantined: Vec<String>,
}

/// A replicated success as it is settled: where, under which lease, and the job's rules.
pub(super) struct Success<'a> {
    pub at: Judged<'a>,
    /// The lease the success came under (current or late).
    pub lease_id: &'a str,
    pub attempts: u32,
    pub max_attempts: u32,
    pub spec: fleetbox_proto::VerifySpec,
    pub strikes_limit: i64,
    pub now: i64,
}

impl Success<'_> {
    fn shard(&self) -> super::settle::Shard<'_> {
        super::settle::Shard {
            id: self.at.task_id,
            tenant: self.at.tenant_id,
            job_id: self.at.job_id,
        }
    }

    fn entry(&self, action: Action, details: Value) -> Entry {
        Entry::new(self.at.tenant_id, "server", action)
            .job(self.at.job_id)
            .task(self.at.task_id)
            .details(details)
    }
}

/// The shard's state for a replicated success, as its replicas so far decide.
pub(super) async fn settle_success(
    tx: &mut Tx,
    tally: &mut super::settle::Tally,
    s: &Success<'_>,
    entries: &mut Vec<Entry>,
) -> Result<Settled, StoreError> {
    let replicas = pending(tx, s.at.task_id).await?;
    let spec = &s.spec;
    match decide(&replicas, spec.compare, spec.replicas, spec.quorum) {
        // A re-check the job asks for (`recheck = "all"`, which a code review imposes) is not
        // skipped because replicas agree: the server's run judges them all.
        Decision::Quorum(_) if spec.recheck == fleetbox_proto::Recheck::All => {
            let why = serde_json::json!({
                "why": "recheck = all: a quorum is checked by the server too",
                "replicas": replicas.len(),
            });
            hold(tx, tally, s, why, entries).await
        }
        // One result is its reporter's word: accepted, not verified (nobody else agreed), and
        // still open to a check if its agent is caught lying later.
        Decision::Quorum(group) if group.len() < 2 => {
            accept_single(tx, tally, s, &replicas, group[0], entries).await
        }
        Decision::Quorum(group) => accept_quorum(tx, tally, s, &replicas, &group, entries).await,
        Decision::More if s.attempts < s.max_attempts => {
            one_more(tx, tally, s, replicas.len(), entries).await
        }
        Decision::More => no_quorum(tx, tally, s, replicas.len(), entries).await,
        Decision::Disagree => {
            let why = serde_json::json!({
                "why": "replicas disagree",
                "replicas": replicas.iter().map(|r| serde_json::json!([r.agent_id, r.output_sha256])).collect::<Vec<_>>(),
            });
            hold(tx, tally, s, why, entries).await
        }
    }
}

/// To the server's check (`reported`), saying `why`.
async fn hold(
    tx: &mut Tx,
    tally: &mut super::settle::Tally,
    s: &Success<'_>,
    why: Value,
    entries: &mut Vec<Entry>,
) -> Result<Settled, StoreError> {
    let moved = super::settle::hold_for_check(tx, tally, s.shard(), s.now).await?;
    if moved {
        entries.push(s.entry(Action::ShardChecking, why));
    }
    Ok(Settled {
        moved,
        ..Settled::default()
    })
}

/// One agreeing result (a quorum of one): accepted on its reporter's word, not verified.
async fn accept_single(
    tx: &mut Tx,
    tally: &mut super::settle::Tally,
    s: &Success<'_>,
    replicas: &[Replica],
    chosen: usize,
    entries: &mut Vec<Entry>,
) -> Result<Settled, StoreError> {
    let moved = super::settle::accept(tx, tally, s.shard(), s.now).await?;
    if !moved {
        return Ok(Settled::default());
    }
    let chosen = &replicas[chosen];
    entries.push(
        s.entry(
            Action::ShardAccepted,
            serde_json::json!({
                "verified": false,
                "value_from": "agent",
                "agree": 1,
                "replicas": replicas.len(),
                "output_sha256": chosen.output_sha256,
            }),
        )
        .agent(&chosen.agent_id),
    );
    Ok(Settled {
        moved,
        chosen: Some(chosen.attempt_id),
        quarantined: Vec::new(),
    })
}

/// A quorum of at least two: accepted and verified; each replica judged (the outvoted struck).
async fn accept_quorum(
    tx: &mut Tx,
    tally: &mut super::settle::Tally,
    s: &Success<'_>,
    replicas: &[Replica],
    group: &[usize],
    entries: &mut Vec<Entry>,
) -> Result<Settled, StoreError> {
    let moved = super::settle::accept(tx, tally, s.shard(), s.now).await?;
    if !moved {
        return Ok(Settled::default());
    }
    let chosen = &replicas[group[0]];
    let mut out = Settled {
        moved,
        chosen: Some(chosen.attempt_id),
        quarantined: Vec::new(),
    };
    Sql::new("UPDATE tasks SET verified = 1 WHERE id = ")
        .bind(s.at.task_id)
        .build()
        .execute(&mut **tx)
        .await
        .doing("marking a shard verified")?;
    for (i, r) in replicas.iter().enumerate() {
        let verdict = if group.contains(&i) {
            Verdict::Valid
        } else {
            Verdict::Invalid
        };
        entries.push(
            s.entry(
                Action::AttemptVerified,
                serde_json::json!({
                    "verdict": verdict.as_str(),
                    "finding": if verdict == Verdict::Valid { "quorum" } else { "outvoted" },
                    "compare": s.spec.compare.name(),
                    "attempt": r.attempt_id,
                    "agent_output_sha256": r.output_sha256,
                    "quorum_output_sha256": chosen.output_sha256,
                }),
            )
            .agent(&r.agent_id),
        );
        if let Some(agent) =
            record_verdict(tx, r, verdict, &s.at, s.strikes_limit, s.now, entries).await?
        {
            out.quarantined.push(agent);
        }
    }
    entries.push(
        s.entry(
            Action::ShardAccepted,
            serde_json::json!({
                "verified": true,
                "value_from": "quorum",
                "agree": group.len(),
                "replicas": replicas.len(),
                "output_sha256": chosen.output_sha256,
            }),
        )
        .agent(&chosen.agent_id),
    );
    Ok(out)
}

/// Too few results yet: back to the queue for another agent.
async fn one_more(
    tx: &mut Tx,
    tally: &mut super::settle::Tally,
    s: &Success<'_>,
    results: usize,
    entries: &mut Vec<Entry>,
) -> Result<Settled, StoreError> {
    let why = format!(
        "replica {results} of {}: another agent runs it",
        s.spec.replicas
    );
    let end = super::settle::LeaseEnd {
        to: TaskState::Queued,
        not_before: s.now,
        reason: &why,
    };
    let moved = super::settle::release(tx, tally, s.shard(), s.lease_id, end, s.now).await?;
    if moved {
        entries.push(s.entry(
            Action::ShardRequeued,
            serde_json::json!({ "reason": why, "replicas": results }),
        ));
    }
    Ok(Settled {
        moved,
        ..Settled::default()
    })
}

/// Out of attempts without a quorum: rejected.
async fn no_quorum(
    tx: &mut Tx,
    tally: &mut super::settle::Tally,
    s: &Success<'_>,
    results: usize,
    entries: &mut Vec<Entry>,
) -> Result<Settled, StoreError> {
    let why = format!(
        "no quorum after {} attempts: {} agreeing results needed, {results} successes",
        s.attempts, s.spec.quorum
    );
    let moved = super::settle::reject(tx, tally, s.shard(), s.lease_id, &why, s.now).await?;
    if moved {
        entries.push(s.entry(Action::ShardRejected, serde_json::json!({ "reason": why })));
    }
    Ok(Settled {
        moved,
        ..Settled::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: i64, value: &str) -> Replica {
        let v: Value = serde_json::from_str(value).unwrap();
        Replica {
            attempt_id: id,
            agent_id: format!("agt_{id}"),
            status: Status::Ok,
            message: None,
            verdict: Verdict::Unchecked,
            output: Some(value.into()),
            output_blob: None,
            output_sha256: Some(fleetbox_proto::canonical::canonical(&v)),
            stdout_sha256: None,
            python: "3.11".into(),
            backend: "process".into(),
        }
    }

    #[test]
    fn replicas_decide_by_quorum_then_wait_then_disagree() {
        let exact = Compare::Exact;
        assert_eq!(decide(&[replica(1, "4")], exact, 2, 2), Decision::More);
        assert_eq!(
            decide(&[replica(1, "4"), replica(2, "4")], exact, 2, 2),
            Decision::Quorum(vec![0, 1])
        );
        assert_eq!(
            decide(&[replica(1, "4"), replica(2, "5")], exact, 2, 2),
            Decision::Disagree
        );
        // An extra replica breaks the tie; the liar is outside the group.
        assert_eq!(
            decide(
                &[replica(1, "4"), replica(2, "5"), replica(3, "4")],
                exact,
                2,
                2
            ),
            Decision::Quorum(vec![0, 2])
        );
        // Three replicas, a quorum of two: one liar is outvoted at once.
        assert_eq!(
            decide(
                &[replica(1, "5"), replica(2, "4"), replica(3, "4")],
                exact,
                3,
                2
            ),
            Decision::Quorum(vec![1, 2])
        );
        let numeric = Compare::Numeric(1e-9);
        assert_eq!(
            decide(
                &[replica(1, "0.30000000000000004"), replica(2, "0.3")],
                numeric,
                2,
                2
            ),
            Decision::Quorum(vec![0, 1])
        );
        assert_eq!(
            decide(&[replica(1, "0.3001"), replica(2, "0.3")], numeric, 2, 2),
            Decision::Disagree
        );
    }
}
