//! Result receipts: a completed job's result, each accepted shard's value with the signed
//! report (or the coordinator's run) it came from and its verdict, and the audit entries that
//! record them, with a proof that those entries are in a checkpoint signed by the coordinator.
//! `fleetbox receipt verify receipt.json --trusted-keys FILE` checks one offline, without the
//! database: someone who was never given access to the coordinator can check what it claims.
//!
//! The proof is the hash chain itself: the chain value before the receipt's first entry and
//! every leaf from it to the checkpoint's entry, which must hash to the checkpoint's signed
//! chain value. A receipt's size grows with the entries written while the job ran (64 hex
//! digits each, other jobs' included).

use std::collections::BTreeSet;

use fleetbox_proto::JobState;
use fleetbox_proto::api::{AuditCheckpoint, AuditRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;

use crate::store::audit::{Record, link, signed_by, unhex};

pub const FORMAT: &str = "fleetbox-receipt-v1";

/// Audit actions a receipt keeps about its job.
const KEPT: [&str; 5] = [
    "job.submitted",
    "attempt.reported",
    "attempt.verified",
    "shard.accepted",
    "job.completed",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub format: String,
    pub tenant_id: String,
    pub job_id: String,
    /// The job's result as stored (JSON text), and its sha256 as `job.completed` recorded it.
    pub result: Option<String>,
    pub result_sha256: Option<String>,
    pub shards: Vec<ReceiptShard>,
    /// The entries that record the job, its accepted shards, their reports and checks.
    pub entries: Vec<AuditRecord>,
    pub proof: ChainProof,
    /// Signed by the coordinator: its `seq` is at or past every entry above.
    pub checkpoint: AuditCheckpoint,
}

/// An accepted shard and where its value came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiptShard {
    pub index: u64,
    pub task_id: i64,
    /// `agent`: the value of the agent's signed report; `server`: the coordinator's own run
    /// (the agent's was shown wrong).
    pub value_from: String,
    pub agent_id: String,
    pub lease_id: String,
    pub output_sha256: Option<String>,
    /// Someone other than the reporter agreed (the coordinator's run, or a quorum).
    pub verified: bool,
    /// The sha256 of what the agent signed, and its signature, as the coordinator recorded
    /// them when it checked the signature (`attempt.reported`).
    pub report_sha256: Option<String>,
    pub signature: Option<String>,
}

/// The chain around the receipt's entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainProof {
    /// The chain value after entry `first_seq - 1` (32 zero bytes before the first entry).
    pub previous_chain: String,
    pub first_seq: i64,
    /// The leaf of every entry from `first_seq` to the checkpoint's, in order.
    pub leaves: Vec<String>,
}

/// What a receipt that verifies says.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub shards: usize,
    pub verified_shards: usize,
    pub entries: usize,
    pub checkpoint_seq: i64,
    pub key: String,
}

/// Why a receipt could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("no job `{0}`")]
    NotFound(String),
    #[error("job `{id}` is `{state}`: a receipt is for a completed job")]
    NotCompleted { id: String, state: String },
    #[error("{0}")]
    Incomplete(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The receipt of `tenant`'s completed job `job_id`, checkpointing the chain first when no
/// checkpoint covers the job's last entry yet.
pub async fn build(
    state: &crate::State,
    tenant: &str,
    job_id: &str,
) -> Result<Receipt, ReceiptError> {
    let store = &state.store;
    let (view, result_blob) = store
        .job_result(tenant, job_id)
        .await?
        .ok_or_else(|| ReceiptError::NotFound(job_id.to_string()))?;
    if view.state != JobState::Completed {
        return Err(ReceiptError::NotCompleted {
            id: job_id.to_string(),
            state: view.state.as_str().to_string(),
        });
    }
    let result = match (&view.result, &result_blob) {
        (Some(raw), _) => Some(raw.get().to_string()),
        (None, Some(blob)) => Some(
            state
                .blobs
                .get(Some(tenant), blob)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|e| ReceiptError::Incomplete(format!("the result blob: {e}")))?,
        ),
        (None, None) => None,
    };
    let values = store.accepted_sources(job_id).await?;
    let all = store.audit_of_job(tenant, job_id).await?;
    let leases: BTreeSet<&str> = values.iter().map(|v| v.lease_id.as_str()).collect();
    let reported = |r: &Record| {
        details(r)["attempts"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| leases.contains(x["lease"].as_str().unwrap_or("")))
        })
    };
    let entries: Vec<Record> = all
        .into_iter()
        .filter(|r| KEPT.contains(&r.action.as_str()))
        .filter(|r| r.action != "attempt.reported" || reported(r))
        .collect();
    let shards = values
        .iter()
        .map(|v| {
            let from_agent = v.runner != "server";
            let signed = entries
                .iter()
                .filter(|r| r.action == "attempt.reported")
                .flat_map(|r| {
                    details(r)["attempts"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .find(|a| a["lease"].as_str() == Some(v.lease_id.as_str()));
            let text = |k: &str| {
                signed
                    .as_ref()
                    .and_then(|a| a[k].as_str().map(str::to_string))
            };
            ReceiptShard {
                index: v.shard_index as u64,
                task_id: v.task_id,
                value_from: if from_agent { "agent" } else { "server" }.into(),
                agent_id: v.agent_id.clone(),
                lease_id: v.lease_id.clone(),
                output_sha256: v.output_sha256.clone(),
                verified: v.verified != 0,
                report_sha256: from_agent.then(|| text("report_sha256")).flatten(),
                signature: from_agent.then(|| text("signature")).flatten(),
            }
        })
        .collect();
    let (first, last) = match (entries.first(), entries.last()) {
        (Some(f), Some(l)) => (f.seq, l.seq),
        _ => {
            return Err(ReceiptError::Incomplete(
                "the job has no audit entries".into(),
            ));
        }
    };
    let checkpoint = covering_checkpoint(state, tenant, last).await?;
    let (leaves, previous) = store.audit_span(tenant, first, checkpoint.seq).await?;
    let previous = previous.ok_or_else(|| {
        ReceiptError::Incomplete(format!(
            "entry {} was pruned: no chain to prove from",
            first - 1
        ))
    })?;
    if leaves.len() as i64 != checkpoint.seq - first + 1 {
        return Err(ReceiptError::Incomplete(format!(
            "entries {first}..{} are not all in the database (pruned?)",
            checkpoint.seq
        )));
    }
    Ok(Receipt {
        format: FORMAT.into(),
        tenant_id: tenant.to_string(),
        job_id: job_id.to_string(),
        result_sha256: result.as_ref().map(|t| {
            result_blob
                .clone()
                .unwrap_or_else(|| sha256_hex(t.as_bytes()))
        }),
        result,
        shards,
        entries: entries.into_iter().map(Record::into_api).collect(),
        proof: ChainProof {
            previous_chain: previous,
            first_seq: first,
            leaves: leaves.into_iter().map(|(_, l)| l).collect(),
        },
        checkpoint,
    })
}

/// The oldest checkpoint at or past entry `seq`; one is made now (and journaled, shipped) when
/// none is yet.
async fn covering_checkpoint(
    state: &crate::State,
    tenant: &str,
    seq: i64,
) -> Result<AuditCheckpoint, ReceiptError> {
    let find = |all: Vec<AuditCheckpoint>| all.into_iter().find(|c| c.seq >= seq);
    if let Some(c) = find(state.store.audit_checkpoints(tenant).await?) {
        return Ok(c);
    }
    let made = state.store.audit_checkpoint(&state.custody.key).await?;
    state
        .custody
        .journal(&made)
        .map_err(|e| ReceiptError::Incomplete(e.to_string()))?;
    if state.custody.ships() {
        state.custody.ship(&made, &state.metrics).await;
    }
    find(state.store.audit_checkpoints(tenant).await?)
        .ok_or_else(|| ReceiptError::Incomplete("no checkpoint covers the job yet".into()))
}

fn details(r: &Record) -> Value {
    serde_json::from_str(&r.details).unwrap_or(Value::Null)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Check a receipt offline against the pinned `keys`: the checkpoint's signature and key, the
/// chain from the proof's first entry to the checkpoint, each entry's leaf, the result against
/// `job.completed`, and each shard against the entries that accepted it and recorded its
/// signed report.
pub fn verify(r: &Receipt, keys: &BTreeSet<String>) -> Result<Verified, String> {
    if r.format != FORMAT {
        return Err(format!("not a `{FORMAT}` receipt (`{}`)", r.format));
    }
    let cp = &r.checkpoint;
    if cp.tenant_id != r.tenant_id {
        return Err("the checkpoint is of another tenant's log".into());
    }
    if let Some(p) = signed_by(cp, keys) {
        return Err(format!("checkpoint of entry {}: {}", p.seq, p.what));
    }
    // The chain from the proof's start through every leaf is the checkpoint's.
    let first = r.proof.first_seq;
    if first < 1 || r.proof.leaves.len() as i64 != cp.seq - first + 1 {
        return Err(format!(
            "the proof has {} leaves for entries {first}..{}",
            r.proof.leaves.len(),
            cp.seq
        ));
    }
    let mut chain = unhex(&r.proof.previous_chain).ok_or("the proof's start is not a sha256")?;
    let mut leaves = Vec::with_capacity(r.proof.leaves.len());
    for (i, leaf) in r.proof.leaves.iter().enumerate() {
        let leaf = unhex(leaf)
            .ok_or_else(|| format!("leaf of entry {} is not a sha256", first + i as i64))?;
        chain = link(&chain, &leaf);
        leaves.push(leaf);
    }
    if hex::encode(chain) != cp.chain.to_ascii_lowercase() {
        return Err(format!(
            "the proof's leaves do not hash to the signed chain value of entry {}",
            cp.seq
        ));
    }
    // Each entry is the one at its place in that chain.
    for e in &r.entries {
        let at = e.seq - first;
        if e.tenant_id != r.tenant_id || at < 0 || at >= leaves.len() as i64 {
            return Err(format!("entry {} is outside the proof", e.seq));
        }
        let record = Record::from_api(e.clone());
        if record.computed_leaf() != leaves[at as usize] {
            return Err(format!(
                "entry {} ({}) is not the one the signed chain holds",
                e.seq, e.action
            ));
        }
    }
    let ours = |action: &'static str| {
        r.entries
            .iter()
            .filter(move |e| e.action == action && e.job_id.as_deref() == Some(r.job_id.as_str()))
    };
    let completed = ours("job.completed")
        .next_back()
        .ok_or("no `job.completed` entry for the job")?;
    if completed.details["state"] != "completed" {
        return Err("the job's last `job.completed` entry is not a completion".into());
    }
    let recorded = completed.details["result_sha256"].as_str();
    let hashed = r.result.as_deref().map(|t| sha256_hex(t.as_bytes()));
    if recorded != r.result_sha256.as_deref() || hashed.as_deref() != recorded {
        return Err(format!(
            "the result hashes to {hashed:?}; the job's completion recorded {recorded:?}"
        ));
    }
    if completed.details["shards_accepted"].as_u64() != Some(r.shards.len() as u64) {
        return Err(format!(
            "{} shards listed; the completion recorded {}",
            r.shards.len(),
            completed.details["shards_accepted"]
        ));
    }
    for s in &r.shards {
        let accepted = ours("shard.accepted")
            .rfind(|e| e.task_id == Some(s.task_id))
            .ok_or_else(|| format!("shard {}: no `shard.accepted` entry", s.index))?;
        if accepted.details["verified"].as_bool() != Some(s.verified) {
            return Err(format!(
                "shard {}: listed as verified = {}, accepted with {}",
                s.index, s.verified, accepted.details["verified"]
            ));
        }
        if s.value_from == "agent" {
            let report = ours("attempt.reported")
                .filter(|e| e.agent_id.as_deref() == Some(s.agent_id.as_str()))
                .flat_map(|e| {
                    e.details["attempts"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .find(|a| {
                    a["task"].as_i64() == Some(s.task_id)
                        && a["lease"].as_str() == Some(s.lease_id.as_str())
                })
                .ok_or_else(|| format!("shard {}: no recorded report of its attempt", s.index))?;
            for (field, listed) in [
                ("report_sha256", &s.report_sha256),
                ("signature", &s.signature),
                ("output_sha256", &s.output_sha256),
            ] {
                if report[field].as_str() != listed.as_deref() {
                    return Err(format!(
                        "shard {}: its {field} is not the one recorded when it was reported",
                        s.index
                    ));
                }
            }
        }
    }
    Ok(Verified {
        shards: r.shards.len(),
        verified_shards: r.shards.iter().filter(|s| s.verified).count(),
        entries: r.entries.len(),
        checkpoint_seq: cp.seq,
        key: cp.public_key.clone(),
    })
}
