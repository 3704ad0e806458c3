//! The audit log: an append-only table, one hash chain per tenant, in the style of RFC 6962.
//!
//! `leaf = SHA-256(0x00 || canonical(entry))` over the RFC 8785 canonical JSON of the entry
//! (its sequence number, time, tenant, actor, action, subjects and details), and
//! `chain_i = SHA-256(0x01 || chain_{i-1} || leaf_i)` from 32 zero bytes. Entries are appended
//! by [`append`] inside the transaction of the change they record, last (after the shard
//! counters): the change and its entry commit together or not at all. The chain head of each
//! tenant lives in `audit_heads`; its row lock (`FOR UPDATE` on PostgreSQL; SQLite has one
//! writer) serializes appends, so several coordinators on one database keep one chain.
//!
//! [`verify`] recomputes every leaf and link and names the first entry that was edited,
//! deleted, inserted or reordered.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signer, Verifier};
use fleetbox_proto::api::{
    AuditCheckpoint, AuditProblem, AuditPrune, AuditRecord, AuditVerification,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::settle::Tx;
use super::sql::Sql;
use super::{DbKind, Doing, Store, StoreError};

/// What an entry records. The names are the log's vocabulary; new kinds are added, never
/// renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    #[serde(rename = "job.submitted")]
    JobSubmitted,
    #[serde(rename = "job.cancelled")]
    JobCancelled,
    #[serde(rename = "job.completed")]
    JobCompleted,
    #[serde(rename = "job.failed")]
    JobFailed,
    #[serde(rename = "shard.leased")]
    ShardLeased,
    #[serde(rename = "attempt.reported")]
    AttemptReported,
    #[serde(rename = "shard.accepted")]
    ShardAccepted,
    #[serde(rename = "shard.rejected")]
    ShardRejected,
    #[serde(rename = "shard.requeued")]
    ShardRequeued,
    #[serde(rename = "shard.dead")]
    ShardDead,
    #[serde(rename = "lease.expired")]
    LeaseExpired,
    #[serde(rename = "lease.returned")]
    LeaseReturned,
    #[serde(rename = "agent.enrolled")]
    AgentEnrolled,
    #[serde(rename = "agent.lost")]
    AgentLost,
    /// A call with a token that is unknown, revoked, expired, or lacks the endpoint's scope.
    #[serde(rename = "token.used_invalid")]
    TokenUsedInvalid,
    #[serde(rename = "token.created")]
    TokenCreated,
    /// A token was revoked (by hand, or by a rotation).
    #[serde(rename = "token.revoked")]
    TokenRevoked,
    #[serde(rename = "tenant.created")]
    TenantCreated,
    #[serde(rename = "tenant.updated")]
    TenantUpdated,
    /// A submission or lease a tenant's cap or rate stopped.
    #[serde(rename = "tenant.capped")]
    TenantCapped,
    #[serde(rename = "pool.created")]
    PoolCreated,
    #[serde(rename = "report.refused")]
    ReportRefused,
    #[serde(rename = "agent.key_rotated")]
    AgentKeyRotated,
    #[serde(rename = "shard.checking")]
    ShardChecking,
    #[serde(rename = "attempt.verified")]
    AttemptVerified,
    #[serde(rename = "agent.quarantined")]
    AgentQuarantined,
    #[serde(rename = "agent.released")]
    AgentReleased,
    /// An admin cut an agent off: its tokens and client certificates revoked.
    #[serde(rename = "agent.revoked")]
    AgentRevoked,
    /// An operator marked an agent to run server-only code, or took the mark back.
    #[serde(rename = "agent.hardened")]
    AgentHardened,
    #[serde(rename = "job.needs_review")]
    JobNeedsReview,
    #[serde(rename = "job.rerun_tainted")]
    JobRerunTainted,
    /// A submission the code review refused (or held): no job was made.
    #[serde(rename = "review.refused")]
    ReviewRefused,
    /// A job's remaining shards were put on hold for a person (a shard hit a sandbox
    /// violation).
    #[serde(rename = "review.held")]
    ReviewHeld,
    /// A person approved a flag of the review queue (a held job starts).
    #[serde(rename = "review.approved")]
    ReviewApproved,
    /// A person rejected one (a held job is cancelled).
    #[serde(rename = "review.rejected")]
    ReviewRejected,
    /// Something was put in the review queue for a person (an anomaly, sandbox errors, a
    /// verification finding, a webhook given up).
    #[serde(rename = "review.flagged")]
    ReviewFlagged,
    /// A person asked for a flag's shards to run again (a child job, checked by the server).
    #[serde(rename = "review.rerun")]
    ReviewRerun,
    /// The planner evaluated a finished job's rule (matched or not, or its error).
    #[serde(rename = "followup.evaluated")]
    FollowupEvaluated,
    /// A rule that matched made its child job or queued its webhook.
    #[serde(rename = "followup.created")]
    FollowupCreated,
    /// A rule that matched hit a cap (depth, the chain's budget, the tenant's rate): nothing
    /// was made, and the job is flagged.
    #[serde(rename = "followup.capped")]
    FollowupCapped,
    /// A rule that matched could not make its child (its input, its code review).
    #[serde(rename = "followup.failed")]
    FollowupFailed,
    /// One try of a `notify` webhook, and how it went.
    #[serde(rename = "followup.notified")]
    FollowupNotified,
    #[serde(rename = "job.paused")]
    JobPaused,
    #[serde(rename = "job.resumed")]
    JobResumed,
    #[serde(rename = "job.priority_changed")]
    JobPriorityChanged,
    /// A session was asked for (its opening call is the `job.submitted` beside it).
    #[serde(rename = "session.opened")]
    SessionOpened,
    /// A session ended by `DELETE`, its idle time or its lifetime.
    #[serde(rename = "session.closed")]
    SessionClosed,
    /// A session whose agent or interpreter is gone.
    #[serde(rename = "session.lost")]
    SessionLost,
    /// A finished job past retention (`--retain`) was deleted with its shards, attempts and
    /// the blobs nothing else names; its audit entries stay.
    #[serde(rename = "job.pruned")]
    JobPruned,
}

impl Action {
    pub const ALL: [Action; 49] = [
        Action::JobSubmitted,
        Action::JobCancelled,
        Action::JobCompleted,
        Action::JobFailed,
        Action::ShardLeased,
        Action::AttemptReported,
        Action::ShardAccepted,
        Action::ShardRejected,
        Action::ShardRequeued,
        Action::ShardDead,
        Action::LeaseExpired,
        Action::LeaseReturned,
        Action::AgentEnrolled,
        Action::AgentLost,
        Action::TokenUsedInvalid,
        Action::TokenCreated,
        Action::TokenRevoked,
        Action::TenantCreated,
        Action::TenantUpdated,
        Action::TenantCapped,
        Action::PoolCreated,
        Action::ReportRefused,
        Action::AgentKeyRotated,
        Action::ShardChecking,
        Action::AttemptVerified,
        Action::AgentQuarantined,
        Action::AgentReleased,
        Action::AgentRevoked,
        Action::AgentHardened,
        Action::JobNeedsReview,
        Action::JobRerunTainted,
        Action::ReviewRefused,
        Action::ReviewHeld,
        Action::ReviewApproved,
        Action::ReviewRejected,
        Action::ReviewRerun,
        Action::ReviewFlagged,
        Action::FollowupEvaluated,
        Action::FollowupCreated,
        Action::FollowupCapped,
        Action::FollowupFailed,
        Action::FollowupNotified,
        Action::JobPaused,
        Action::JobResumed,
        Action::JobPriorityChanged,
        Action::SessionOpened,
        Action::SessionClosed,
        Action::SessionLost,
        Action::JobPruned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::JobSubmitted => "job.submitted",
            Action::JobCancelled => "job.cancelled",
            Action::JobCompleted => "job.completed",
            Action::JobFailed => "job.failed",
            Action::ShardLeased => "shard.leased",
            Action::AttemptReported => "attempt.reported",
            Action::ShardAccepted => "shard.accepted",
            Action::ShardRejected => "shard.rejected",
            Action::ShardRequeued => "shard.requeued",
            Action::ShardDead => "shard.dead",
            Action::LeaseExpired => "lease.expired",
            Action::LeaseReturned => "lease.returned",
            Action::AgentEnrolled => "agent.enrolled",
            Action::AgentLost => "agent.lost",
            Action::TokenUsedInvalid => "token.used_invalid",
            Action::TokenCreated => "token.created",
            Action::TokenRevoked => "token.revoked",
            Action::TenantCreated => "tenant.created",
            Action::TenantUpdated => "tenant.updated",
            Action::TenantCapped => "tenant.capped",
            Action::PoolCreated => "pool.created",
            Action::ReportRefused => "report.refused",
            Action::AgentKeyRotated => "agent.key_rotated",
            Action::ShardChecking => "shard.checking",
            Action::AttemptVerified => "attempt.verified",
            Action::AgentQuarantined => "agent.quarantined",
            Action::AgentReleased => "agent.released",
            Action::AgentRevoked => "agent.revoked",
            Action::AgentHardened => "agent.hardened",
            Action::JobNeedsReview => "job.needs_review",
            Action::JobRerunTainted => "job.rerun_tainted",
            Action::ReviewRefused => "review.refused",
            Action::ReviewHeld => "review.held",
            Action::ReviewApproved => "review.approved",
            Action::ReviewRejected => "review.rejected",
            Action::ReviewRerun => "review.rerun",
            Action::ReviewFlagged => "review.flagged",
            Action::FollowupEvaluated => "followup.evaluated",
            Action::FollowupCreated => "followup.created",
            Action::FollowupCapped => "followup.capped",
            Action::FollowupFailed => "followup.failed",
            Action::FollowupNotified => "followup.notified",
            Action::JobPaused => "job.paused",
            Action::JobResumed => "job.resumed",
            Action::JobPriorityChanged => "job.priority_changed",
            Action::SessionOpened => "session.opened",
            Action::SessionClosed => "session.closed",
            Action::SessionLost => "session.lost",
            Action::JobPruned => "job.pruned",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not an audit action"))
    }
}

/// One entry before it is appended.
#[derive(Debug, Clone)]
pub struct Entry {
    pub tenant_id: String,
    /// `admin:<token id>`, `agent:<id>`, `server`.
    pub actor: String,
    pub action: Action,
    pub job_id: Option<String>,
    pub task_id: Option<i64>,
    pub lease_id: Option<String>,
    pub agent_id: Option<String>,
    pub details: Value,
}

impl Entry {
    pub fn new(tenant_id: &str, actor: impl Into<String>, action: Action) -> Entry {
        Entry {
            tenant_id: tenant_id.to_string(),
            actor: actor.into(),
            action,
            job_id: None,
            task_id: None,
            lease_id: None,
            agent_id: None,
            details: Value::Null,
        }
    }
    pub fn job(mut self, id: &str) -> Entry {
        self.job_id = Some(id.to_string());
        self
    }
    pub fn task(mut self, id: i64) -> Entry {
        self.task_id = Some(id);
        self
    }
    pub fn lease(mut self, id: &str) -> Entry {
        self.lease_id = Some(id.to_string());
        self
    }
    pub fn agent(mut self, id: &str) -> Entry {
        self.agent_id = Some(id.to_string());
        self
    }
    pub fn details(mut self, details: Value) -> Entry {
        self.details = details;
        self
    }
}

/// A stored entry, as the API and `fleetbox audit` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Record {
    pub tenant_id: String,
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub job_id: Option<String>,
    pub task_id: Option<i64>,
    pub lease_id: Option<String>,
    pub agent_id: Option<String>,
    /// Canonical JSON text.
    pub details: String,
    pub leaf: String,
    pub chain: String,
}

/// The chain before the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// `SHA-256(0x00 || canonical(entry))`, over the fields that make the entry; `details` is
/// the canonical text of the details (as stored: a stored text that is not the canonical form
/// of what was appended hashes to another leaf).
#[allow(clippy::too_many_arguments)]
pub fn leaf(
    tenant_id: &str,
    seq: i64,
    at: i64,
    actor: &str,
    action: &str,
    subjects: [Option<&str>; 3],
    task_id: Option<i64>,
    details: &str,
) -> [u8; 32] {
    // The entry's RFC 8785 form, written directly: its keys in sorted order, its strings
    // escaped as RFC 8785 (and serde_json) escape them, its integers as digits. The same bytes
    // `serde_json_canonicalizer` gives for the whole object (a test checks), at a fraction of
    // the cost: this sits on every hot path. Written into a buffer each thread keeps.
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with_borrow_mut(|out| {
        out.clear();
        out.push(0x00);
        entry_form(
            out, tenant_id, seq, at, actor, action, subjects, task_id, details,
        );
        Sha256::digest(&out[..]).into()
    })
}

/// The RFC 8785 bytes of an entry, appended to `out`.
#[allow(clippy::too_many_arguments)]
fn entry_form(
    out: &mut Vec<u8>,
    tenant_id: &str,
    seq: i64,
    at: i64,
    actor: &str,
    action: &str,
    subjects: [Option<&str>; 3],
    task_id: Option<i64>,
    details: &str,
) {
    use std::io::Write as _;
    let [job_id, lease_id, agent_id] = subjects;
    let text = |out: &mut Vec<u8>, s: &str| {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail")
    };
    let opt = |out: &mut Vec<u8>, s: Option<&str>| match s {
        Some(s) => text(out, s),
        None => out.extend_from_slice(b"null"),
    };
    out.extend_from_slice(b"{\"action\":");
    text(out, action);
    out.extend_from_slice(b",\"actor\":");
    text(out, actor);
    out.extend_from_slice(b",\"agent\":");
    opt(out, agent_id);
    // Integers written in place (no intermediate strings).
    let _ = write!(out, ",\"at\":{at},\"details\":");
    out.extend_from_slice(details.as_bytes());
    out.extend_from_slice(b",\"job\":");
    opt(out, job_id);
    out.extend_from_slice(b",\"lease\":");
    opt(out, lease_id);
    let _ = write!(out, ",\"seq\":{seq},\"task\":");
    match task_id {
        Some(t) => {
            let _ = write!(out, "{t}");
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"tenant\":");
    text(out, tenant_id);
    out.push(b'}');
}

pub use fleetbox_proto::canonical::{canonical, canonical_into};

/// `SHA-256(0x01 || previous || leaf)`.
pub fn link(previous: &[u8; 32], leaf: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(previous);
    h.update(leaf);
    h.finalize().into()
}

/// A sha256 from its 64 hex digits (either case), or `None`. Verification decodes two per
/// entry, so through a table rather than a branch per digit.
pub fn unhex(s: &str) -> Option<[u8; 32]> {
    const INVALID: u8 = 0xff;
    const DIGITS: [u8; 256] = {
        let mut t = [INVALID; 256];
        let mut c = 0;
        while c < 10 {
            t[b'0' as usize + c] = c as u8;
            c += 1;
        }
        let mut c = 0;
        while c < 6 {
            t[b'a' as usize + c] = 10 + c as u8;
            t[b'A' as usize + c] = 10 + c as u8;
            c += 1;
        }
        t
    };
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (DIGITS[pair[0] as usize], DIGITS[pair[1] as usize]);
        bad |= (hi | lo) & 0xf0;
        *o = hi << 4 | (lo & 0x0f);
    }
    (bad == 0).then_some(out)
}

impl Record {
    /// From what the API shows (an exported log read back for offline verification).
    pub fn from_api(r: AuditRecord) -> Record {
        Record {
            details: canonical(&r.details),
            tenant_id: r.tenant_id,
            seq: r.seq,
            at: r.at,
            actor: r.actor,
            action: r.action,
            job_id: r.job_id,
            task_id: r.task_id,
            lease_id: r.lease_id,
            agent_id: r.agent_id,
            leaf: r.leaf,
            chain: r.chain,
        }
    }

    /// As the API shows it.
    pub fn into_api(self) -> AuditRecord {
        let details = self.details_value().unwrap_or(Value::Null);
        AuditRecord {
            tenant_id: self.tenant_id,
            seq: self.seq,
            at: self.at,
            actor: self.actor,
            action: self.action,
            job_id: self.job_id,
            task_id: self.task_id,
            lease_id: self.lease_id,
            agent_id: self.agent_id,
            details,
            leaf: self.leaf,
            chain: self.chain,
        }
    }

    fn details_value(&self) -> Option<Value> {
        serde_json::from_str(&self.details).ok()
    }

    /// The leaf this record's fields hash to.
    pub fn computed_leaf(&self) -> [u8; 32] {
        leaf(
            &self.tenant_id,
            self.seq,
            self.at,
            &self.actor,
            &self.action,
            [
                self.job_id.as_deref(),
                self.lease_id.as_deref(),
                self.agent_id.as_deref(),
            ],
            self.task_id,
            &self.details,
        )
    }
}

/// What verification reads of an entry: a stored [`Record`], or an [`EntryRef`] into a page
/// read straight from the database.
pub trait LogEntry: Sync {
    fn seq(&self) -> i64;
    /// The leaf as stored (hex).
    fn stored_leaf(&self) -> &str;
    /// The chain value as stored (hex).
    fn stored_chain(&self) -> &str;
    /// The leaf the entry's fields hash to.
    fn computed_leaf(&self) -> [u8; 32];
}

impl LogEntry for Record {
    fn seq(&self) -> i64 {
        self.seq
    }
    fn stored_leaf(&self) -> &str {
        &self.leaf
    }
    fn stored_chain(&self) -> &str {
        &self.chain
    }
    fn computed_leaf(&self) -> [u8; 32] {
        Record::computed_leaf(self)
    }
}

/// An entry's fields borrowed from a page of text read for verification (no allocation per
/// entry: a million entries a second is the target).
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub tenant_id: &'a str,
    pub seq: i64,
    pub at: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub job_id: Option<&'a str>,
    pub task_id: Option<i64>,
    pub lease_id: Option<&'a str>,
    pub agent_id: Option<&'a str>,
    pub details: &'a str,
    pub leaf: &'a str,
    pub chain: &'a str,
}

impl LogEntry for EntryRef<'_> {
    fn seq(&self) -> i64 {
        self.seq
    }
    fn stored_leaf(&self) -> &str {
        self.leaf
    }
    fn stored_chain(&self) -> &str {
        self.chain
    }
    fn computed_leaf(&self) -> [u8; 32] {
        leaf(
            self.tenant_id,
            self.seq,
            self.at,
            self.actor,
            self.action,
            [self.job_id, self.lease_id, self.agent_id],
            self.task_id,
            self.details,
        )
    }
}

/// The trace id of each job audit entries were written about (a job's trace never changes;
/// read from `jobs.traceparent` once per job and coordinator).
#[derive(Debug, Clone, Default)]
pub(super) struct TraceIds(Arc<Mutex<HashMap<String, Option<String>>>>);

impl TraceIds {
    /// Jobs remembered at most; past it the map starts over.
    const KEEP: usize = 10_000;

    /// Put the trace id of each entry's job into its details (`trace_id`, hashed with the
    /// rest), reading those not yet known in `tx` (which sees a job inserted in it).
    async fn name(&self, tx: &mut Tx, entries: &mut [Entry]) -> Result<(), StoreError> {
        let unknown: BTreeSet<&str> = {
            let known = self.0.lock().expect("trace ids");
            entries
                .iter()
                .filter_map(|e| e.job_id.as_deref())
                .filter(|j| !known.contains_key(*j))
                .collect()
        };
        if !unknown.is_empty() {
            let rows: Vec<(String, Option<String>)> =
                Sql::new("SELECT id, traceparent FROM jobs WHERE id IN (")
                    .bind_list(unknown.iter().copied())
                    .push(")")
                    .build_as()
                    .fetch_all(&mut **tx)
                    .await
                    .doing("reading jobs' trace ids")?;
            let mut known = self.0.lock().expect("trace ids");
            if known.len() + rows.len() > Self::KEEP {
                known.clear();
            }
            for (id, traceparent) in rows {
                let trace = traceparent
                    .as_deref()
                    .and_then(fleetbox_proto::trace::TraceParent::parse)
                    .map(|t| t.trace_id);
                known.insert(id, trace);
            }
        }
        let known = self.0.lock().expect("trace ids");
        for e in entries {
            let Some(Some(trace)) = e.job_id.as_deref().map(|j| known.get(j).cloned().flatten())
            else {
                continue;
            };
            match &mut e.details {
                Value::Null => e.details = serde_json::json!({ "trace_id": trace }),
                Value::Object(map) => {
                    map.entry("trace_id").or_insert(Value::String(trace));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Append `entries` in this transaction, last: group by tenant (in tenant order, the lock
/// order), take each chain head under its row lock, hash, insert, move the head.
pub(super) async fn append(
    tx: &mut Tx,
    kind: DbKind,
    mut entries: Vec<Entry>,
    at: i64,
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let counted = super::metrics::counted(&entries);
    entries.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    let mut start = 0;
    while start < entries.len() {
        let tenant = entries[start].tenant_id.clone();
        let end = entries[start..]
            .iter()
            .position(|e| e.tenant_id != tenant)
            .map_or(entries.len(), |n| start + n);
        append_tenant(tx, kind, &tenant, &entries[start..end], at).await?;
        start = end;
    }
    super::metrics::bump(tx, counted).await
}

/// `tenant`'s chain head `(seq, chain)`, locked until the transaction ends (`FOR UPDATE` on
/// PostgreSQL; SQLite's write transaction holds its one write lock already).
async fn lock_head(
    tx: &mut Tx,
    kind: DbKind,
    tenant: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    let mut head = Sql::new("SELECT seq, chain FROM audit_heads WHERE tenant_id = ");
    head.bind(tenant);
    if kind == DbKind::Postgres {
        head.push(" FOR UPDATE");
    }
    head.build_as()
        .fetch_optional(&mut **tx)
        .await
        .doing("locking the audit chain head")
}

async fn append_tenant(
    tx: &mut Tx,
    kind: DbKind,
    tenant: &str,
    entries: &[Entry],
    at: i64,
) -> Result<(), StoreError> {
    let (mut seq, chain) = match lock_head(tx, kind, tenant).await? {
        Some(head) => head,
        None => {
            // The tenant's first entry: create its head (two coordinators creating it race
            // harmlessly), then lock it.
            Sql::new("INSERT INTO audit_heads (tenant_id, seq, chain) VALUES (")
                .bind(tenant)
                .push(", 0, ")
                .bind(hex::encode(GENESIS))
                .push(") ON CONFLICT (tenant_id) DO NOTHING")
                .build()
                .execute(&mut **tx)
                .await
                .doing("creating an audit chain head")?;
            lock_head(tx, kind, tenant)
                .await?
                .ok_or_else(|| StoreError::Corrupt {
                    what: "audit chain head",
                    detail: format!("tenant `{tenant}`'s head vanished as it was created"),
                })?
        }
    };
    let mut chain = unhex(&chain).ok_or_else(|| StoreError::Corrupt {
        what: "audit chain head",
        detail: format!("tenant `{tenant}` has a head that is not a sha256"),
    })?;
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        seq += 1;
        let text = if e.details.is_null() {
            "{}".to_string()
        } else {
            canonical(&e.details)
        };
        let l = leaf(
            tenant,
            seq,
            at,
            &e.actor,
            e.action.as_str(),
            [
                e.job_id.as_deref(),
                e.lease_id.as_deref(),
                e.agent_id.as_deref(),
            ],
            e.task_id,
            &text,
        );
        chain = link(&chain, &l);
        rows.push((seq, e, text, hex::encode(l), hex::encode(chain)));
    }
    // The whole batch goes as one JSON parameter the database unfolds: one statement
    // whatever the batch's size (SQLite looks each `$N` up by a linear scan, so a multi-row
    // VALUES list costs quadratic time there).
    let batch: Vec<_> = rows
        .iter()
        .map(|(seq, e, details, leaf, chain)| {
            (
                seq,
                e.actor.as_str(),
                e.action.as_str(),
                e.job_id.as_deref(),
                e.task_id,
                e.lease_id.as_deref(),
                e.agent_id.as_deref(),
                details.as_str(),
                leaf.as_str(),
                chain.as_str(),
            )
        })
        .collect();
    let batch = serde_json::to_string(&batch).expect("entries serialize");
    let unfold = match kind {
        DbKind::Sqlite => {
            "INSERT INTO audit (tenant_id, seq, at, actor, action, job_id, task_id, lease_id, \
             agent_id, details, leaf, chain) SELECT $1, e.value->>0, $2, e.value->>1, \
             e.value->>2, e.value->>3, e.value->>4, e.value->>5, e.value->>6, e.value->>7, \
             e.value->>8, e.value->>9 FROM json_each($3) AS e"
        }
        DbKind::Postgres => {
            "INSERT INTO audit (tenant_id, seq, at, actor, action, job_id, task_id, lease_id, \
             agent_id, details, leaf, chain) SELECT $1, CAST(e->>0 AS BIGINT), $2, e->>1, \
             e->>2, e->>3, CAST(e->>4 AS BIGINT), e->>5, e->>6, e->>7, e->>8, e->>9 \
             FROM jsonb_array_elements(CAST($3 AS jsonb)) AS e"
        }
    };
    sqlx::query(unfold)
        .bind(tenant)
        .bind(at)
        .bind(batch)
        .execute(&mut **tx)
        .await
        .doing("appending to the audit log")?;
    Sql::new("UPDATE audit_heads SET seq = ")
        .bind(seq)
        .push(", chain = ")
        .bind(hex::encode(chain))
        .push(" WHERE tenant_id = ")
        .bind(tenant)
        .build()
        .execute(&mut **tx)
        .await
        .doing("moving the audit chain head")?;
    Ok(())
}

/// Check a sequence of records (in `seq` order) against the chain from `start` (the chain
/// value before the first record, and its sequence number).
pub fn verify_records<E: LogEntry>(
    records: &[E],
    start: (i64, [u8; 32]),
) -> Result<(u64, i64, [u8; 32]), AuditProblem> {
    // The leaves are independent of each other: computed on every core; the links, which are
    // a sequence, follow in one pass.
    let leaves = computed_leaves(records);
    let (mut seq, mut chain) = start;
    let mut n = 0u64;
    for (r, computed) in records.iter().zip(leaves) {
        if r.seq() != seq + 1 {
            return Err(AuditProblem {
                seq: seq + 1,
                what: if r.seq() > seq + 1 {
                    format!(
                        "entries {}..{} are missing (deleted, or the log was reordered)",
                        seq + 1,
                        r.seq() - 1
                    )
                } else {
                    format!("entry {} appears out of order after {seq}", r.seq())
                },
            });
        }
        if unhex(r.stored_leaf()) != Some(computed) {
            return Err(AuditProblem {
                seq: r.seq(),
                what: "its content does not hash to its leaf (edited, or another entry's content)"
                    .into(),
            });
        }
        chain = link(&chain, &computed);
        if unhex(r.stored_chain()) != Some(chain) {
            return Err(AuditProblem {
                seq: r.seq(),
                what: "its chain hash does not follow from the entry before it (inserted, or the \
                       chain was rewritten)"
                    .into(),
            });
        }
        seq = r.seq();
        n += 1;
    }
    Ok((n, seq, chain))
}

/// Each record's leaf, computed in parallel over the available cores for long runs.
fn computed_leaves<E: LogEntry>(records: &[E]) -> Vec<[u8; 32]> {
    const SERIAL: usize = 1024;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if records.len() < SERIAL || threads < 2 {
        return records.iter().map(E::computed_leaf).collect();
    }
    let per = records.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = records
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(E::computed_leaf).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("hashing does not panic"))
            .collect()
    })
}

impl Store {
    /// Append `entries` in `tx`, last (after the shard counters).
    pub(super) async fn append_audit(
        &self,
        tx: &mut Tx,
        entries: Vec<Entry>,
        now: i64,
    ) -> Result<(), StoreError> {
        if !self.audit {
            return Ok(());
        }
        let mut entries = entries;
        self.traces.name(tx, &mut entries).await?;
        append(tx, self.kind, entries, now).await
    }

    /// Append entries that record no state change of their own (refusals, failed
    /// authentications) in a transaction of their own.
    pub async fn audit(&self, entries: Vec<Entry>) -> Result<(), StoreError> {
        if !self.audit {
            return Ok(());
        }
        let mut tx = self
            .begin_write()
            .await
            .doing("appending to the audit log")?;
        append(&mut tx, self.kind, entries, super::now_ms()).await?;
        tx.commit().await.doing("appending to the audit log")
    }

    /// Entries of `tenant`, oldest first, filtered.
    pub async fn audit_list(
        &self,
        tenant: &str,
        filter: &AuditFilter,
    ) -> Result<Vec<Record>, StoreError> {
        let mut sql = Sql::new(
            "SELECT tenant_id, seq, at, actor, action, job_id, task_id, lease_id, agent_id, \
             details, leaf, chain FROM audit WHERE tenant_id = ",
        );
        sql.bind(tenant).push(" AND seq > ").bind(filter.after_seq);
        if let Some(job) = &filter.job_id {
            sql.push(" AND job_id = ").bind(job.as_str());
        }
        if let Some(agent) = &filter.agent_id {
            sql.push(" AND agent_id = ").bind(agent.as_str());
        }
        if let Some(action) = filter.action {
            sql.push(" AND action = ").bind(action.as_str());
        }
        if let Some(since) = filter.since_ms {
            sql.push(" AND at >= ").bind(since);
        }
        sql.push(" ORDER BY seq LIMIT ")
            .bind(i64::from(filter.limit.clamp(1, 10_000)));
        sql.build_as::<Record>()
            .fetch_all(&self.read)
            .await
            .doing("reading the audit log")
    }

    /// Recompute `tenant`'s whole chain (in pages) and compare it with its head, believing
    /// only what `pins` holds from outside the database: checkpoints and prune records signed
    /// by another key, a kept checkpoint missing or changed, and entries removed with no signed
    /// prune are failures.
    pub async fn audit_verify(
        &self,
        tenant: &str,
        pins: &Pins,
    ) -> Result<AuditVerification, StoreError> {
        let head: Option<(i64, String)> =
            Sql::new("SELECT seq, chain FROM audit_heads WHERE tenant_id = ")
                .bind(tenant)
                .build_as()
                .fetch_optional(&self.read)
                .await
                .doing("reading the audit chain head")?;
        let (head_seq, head_chain) = head.unwrap_or((0, hex::encode(GENESIS)));
        let mut walk = Walk {
            state: (0, GENESIS),
            entries: 0,
        };
        // Checkpoints first: each must carry a good signature and match the chain at its entry.
        let checkpoints = self.audit_checkpoints(tenant).await?;
        let problem = match pins.hold(tenant, &checkpoints) {
            Some(problem) => Some(problem),
            None => {
                let head = (head_seq, head_chain.as_str());
                self.verify_chain(tenant, pins, &checkpoints, head, &mut walk)
                    .await?
            }
        };
        Ok(AuditVerification {
            tenant_id: tenant.to_string(),
            entries: walk.entries,
            head_seq,
            ok: problem.is_none(),
            problem,
        })
    }

    /// The chain from its anchor to `head` (seq, chain), against the checkpoints: the first
    /// problem, if any.
    async fn verify_chain(
        &self,
        tenant: &str,
        pins: &Pins,
        checkpoints: &[AuditCheckpoint],
        head: (i64, &str),
        walk: &mut Walk,
    ) -> Result<Option<AuditProblem>, StoreError> {
        if let Some(problem) = self.anchor(tenant, pins, checkpoints, head.0, walk).await? {
            return Ok(Some(problem));
        }
        let mut pending: std::collections::BTreeMap<i64, &AuditCheckpoint> = checkpoints
            .iter()
            .filter(|c| c.seq > walk.state.0)
            .map(|c| (c.seq, c))
            .collect();
        if let Some(problem) = self.walk_pages(tenant, head.0, &mut pending, walk).await? {
            return Ok(Some(problem));
        }
        if let Some((&seq, _)) = pending.iter().next() {
            return Ok(Some(AuditProblem {
                seq: walk.state.0 + 1,
                what: format!(
                    "a signed checkpoint names entry {seq}, but the log ends at {}: entries \
                     were removed from the end",
                    walk.state.0
                ),
            }));
        }
        self.check_end(tenant, head, walk).await
    }

    /// A pruned log starts after entry 1: it is anchored on the checkpoint of the entry before
    /// its first, under a signed prune record. Sets where the walk starts.
    async fn anchor(
        &self,
        tenant: &str,
        pins: &Pins,
        checkpoints: &[AuditCheckpoint],
        head_seq: i64,
        walk: &mut Walk,
    ) -> Result<Option<AuditProblem>, StoreError> {
        let first: Option<(Option<i64>,)> =
            Sql::new("SELECT MIN(seq) FROM audit WHERE tenant_id = ")
                .bind(tenant)
                .build_as()
                .fetch_optional(&self.read)
                .await
                .doing("reading the audit log")?;
        // A log pruned up to its head holds no entry: it is anchored on the head's checkpoint.
        let first = match first {
            Some((Some(first),)) => first,
            _ if head_seq > 0 => head_seq + 1,
            _ => return Ok(None),
        };
        if first <= 1 {
            return Ok(None);
        }
        let prunes = self.audit_prunes(tenant).await?;
        if let Some(problem) = pins.pruned(&prunes, first) {
            return Ok(Some(problem));
        }
        let Some(c) = checkpoints.iter().find(|c| c.seq == first - 1) else {
            return Ok(Some(AuditProblem {
                seq: 1,
                what: format!(
                    "entries 1..{} are missing and no checkpoint anchors entry {first}",
                    first - 1
                ),
            }));
        };
        let chain = unhex(&c.chain).ok_or_else(|| StoreError::Corrupt {
            what: "audit checkpoint",
            detail: format!("checkpoint {} has a chain that is not a sha256", c.seq),
        })?;
        walk.state = (c.seq, chain);
        Ok(None)
    }

    /// Hash the log page by page up to `head_seq`, each entry against the one before and each
    /// checkpoint met against the chain there (taken out of `pending`).
    ///
    /// Pages are read ahead while the one before is hashed (on the blocking pool): the
    /// database and the hashing run side by side. Entries up to the head read first: the head
    /// and its entries commit together, so the log up to it is complete; entries appended
    /// while verification runs are the next verification's.
    async fn walk_pages(
        &self,
        tenant: &str,
        head_seq: i64,
        pending: &mut std::collections::BTreeMap<i64, &AuditCheckpoint>,
        walk: &mut Walk,
    ) -> Result<Option<AuditProblem>, StoreError> {
        let (pages, mut next) = tokio::sync::mpsc::channel::<super::audit_read::PageRead>(2);
        let reader = {
            let store = self.clone();
            let tenant = tenant.to_string();
            let after = walk.state.0;
            tokio::spawn(async move { store.read_audit_log(tenant, after, head_seq, pages).await })
        };
        let _stop_reading = AbortOnDrop(reader);
        while let Some(page) = next.recv().await {
            let page = page?;
            if page.is_empty() {
                break;
            }
            let tenant_id = tenant.to_string();
            let state = walk.state;
            let (checked, page) = tokio::task::spawn_blocking(move || {
                let checked = verify_records(&page.entries(&tenant_id), state);
                (checked, page)
            })
            .await
            .map_err(|e| StoreError::Corrupt {
                what: "audit verification",
                detail: format!("the hashing task failed: {e}"),
            })?;
            match checked {
                Ok((n, seq, chain)) => {
                    walk.entries += n;
                    walk.state = (seq, chain);
                }
                Err(p) => {
                    // The entries of this page before the bad one were good.
                    walk.entries += (p.seq - 1 - walk.state.0).max(0) as u64;
                    return Ok(Some(p));
                }
            }
            for r in page.entries(tenant) {
                if let Some(c) = pending.remove(&r.seq)
                    && c.chain != r.chain
                {
                    return Ok(Some(AuditProblem {
                        seq: r.seq,
                        what: "the chain at this entry differs from its signed checkpoint \
                               (the log was rewritten up to here)"
                            .into(),
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Where the walk ended against the head: entries removed from the end, the head edited,
    /// or entries added past it outside the chain.
    async fn check_end(
        &self,
        tenant: &str,
        (head_seq, head_chain): (i64, &str),
        walk: &Walk,
    ) -> Result<Option<AuditProblem>, StoreError> {
        let state = walk.state;
        if state.0 == head_seq && hex::encode(state.1) == head_chain {
            // Entries past the head must be ones appended since it was read: the head read
            // after them has moved at least as far.
            let last: (Option<i64>,) = Sql::new("SELECT MAX(seq) FROM audit WHERE tenant_id = ")
                .bind(tenant)
                .build_as()
                .fetch_one(&self.read)
                .await
                .doing("reading the audit log")?;
            let now: Option<(i64,)> = Sql::new("SELECT seq FROM audit_heads WHERE tenant_id = ")
                .bind(tenant)
                .build_as()
                .fetch_optional(&self.read)
                .await
                .doing("reading the audit chain head")?;
            if let (Some(last), Some((now,))) = (last.0, now)
                && last > now
            {
                return Ok(Some(AuditProblem {
                    seq: now + 1,
                    what: format!(
                        "the log goes on past its head ({now}): entries were added outside \
                         the chain"
                    ),
                }));
            }
            return Ok(None);
        }
        Ok(Some(if state.0 < head_seq {
            AuditProblem {
                seq: state.0 + 1,
                what: format!(
                    "the log ends at {} but its head is at {head_seq}: entries were removed \
                     from the end",
                    state.0
                ),
            }
        } else {
            AuditProblem {
                seq: head_seq,
                what: "the chain head does not match the log's last entry (the head was \
                       edited)"
                    .into(),
            }
        }))
    }
}

/// How far an audit verification got: the last entry hashed (seq, chain) and how many.
struct Walk {
    state: (i64, [u8; 32]),
    entries: u64,
}

/// Aborts a task when dropped (verification stopped early).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Verify an exported log (entries in `seq` order, one tenant) offline, against `checkpoints`
/// kept elsewhere. A log that starts after entry 1 (exported `--since`, or pruned) is checked
/// from its first entry on, whose own leaf must hold; its link to what came before needs a
/// checkpoint of the entry before it.
pub fn verify_export(
    records: &[Record],
    checkpoints: &[AuditCheckpoint],
    keys: &BTreeSet<String>,
) -> Result<(u64, i64), AuditProblem> {
    if let Some(problem) = checkpoints.iter().find_map(|c| signed_by(c, keys)) {
        return Err(problem);
    }
    let Some(first) = records.first() else {
        return Ok((0, 0));
    };
    let before = first.seq - 1;
    let start = if before == 0 {
        (0, GENESIS)
    } else if let Some(cp) = checkpoints.iter().find(|c| c.seq == before) {
        (before, unhex(&cp.chain).unwrap_or(GENESIS))
    } else {
        // No anchor: take the first entry's chain as given, check its leaf and all that follows.
        if unhex(&first.leaf) != Some(first.computed_leaf()) {
            return Err(AuditProblem {
                seq: first.seq,
                what: "its content does not hash to its leaf".into(),
            });
        }
        let anchor = unhex(&first.chain).unwrap_or(GENESIS);
        let (n, last, _) = verify_records(&records[1..], (first.seq, anchor))?;
        check_checkpoints(records, checkpoints)?;
        return Ok((n + 1, last));
    };
    let (n, last, _) = verify_records(records, start)?;
    check_checkpoints(records, checkpoints)?;
    Ok((n, last))
}

fn check_checkpoints(
    records: &[Record],
    checkpoints: &[AuditCheckpoint],
) -> Result<(), AuditProblem> {
    let last = records.last().map_or(0, |r| r.seq);
    for cp in checkpoints {
        match records.iter().find(|r| r.seq == cp.seq) {
            Some(r) if r.chain != cp.chain => {
                return Err(AuditProblem {
                    seq: cp.seq,
                    what: "the chain at this entry differs from its signed checkpoint".into(),
                });
            }
            None if cp.seq > last => {
                return Err(AuditProblem {
                    seq: last + 1,
                    what: format!(
                        "a signed checkpoint names entry {}, but the log ends at {last}",
                        cp.seq
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Check a checkpoint's signature with the key it names.
pub fn checkpoint_signature_ok(c: &AuditCheckpoint) -> bool {
    let msg = AuditCheckpoint::message(&c.tenant_id, c.seq, &c.chain, c.at);
    signature_ok(&c.public_key, &c.signature, &msg)
}

/// Whether `signature` (hex) is `public_key`'s (hex) over `msg`.
fn signature_ok(public_key: &str, signature: &str, msg: &[u8]) -> bool {
    let (Ok(key), Ok(sig)) = (hex::decode(public_key), hex::decode(signature)) else {
        return false;
    };
    let (Ok(key), Ok(sig)) = (<[u8; 32]>::try_from(key), <[u8; 64]>::try_from(sig)) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else {
        return false;
    };
    key.verify(msg, &ed25519_dalek::Signature::from_bytes(&sig))
        .is_ok()
}

/// A checkpoint's problem unless it carries a good signature by one of `keys`.
pub fn signed_by(c: &AuditCheckpoint, keys: &BTreeSet<String>) -> Option<AuditProblem> {
    let what = if !checkpoint_signature_ok(c) {
        "the checkpoint at this entry does not carry a good signature (edited)".to_string()
    } else if !keys.contains(&c.public_key.to_ascii_lowercase()) {
        format!(
            "the checkpoint at this entry is signed by a key that is not pinned ({}…): re-signed \
             by someone holding the database, or a coordinator whose key was not given",
            &c.public_key[..c.public_key.len().min(16)]
        )
    } else {
        return None;
    };
    Some(AuditProblem { seq: c.seq, what })
}

/// Why the audit log was not pruned.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no checkpoint at entry {before_seq}: prune up to a checkpointed entry (the newest: {newest})"
    )]
    NoCheckpoint { before_seq: i64, newest: String },
}

/// A public key as pinned: 64 hex digits of an ed25519 key, lowercase.
pub fn parse_public_key(text: &str) -> Result<String, String> {
    let key = text.trim().to_ascii_lowercase();
    let bytes = hex::decode(&key).map_err(|_| format!("`{key}` is not hex"))?;
    let bytes = <[u8; 32]>::try_from(bytes)
        .map_err(|_| format!("`{key}` is not 32 bytes (64 hex digits)"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| format!("`{key}` is not an ed25519 public key"))?;
    Ok(key)
}

/// What audit verification believes from outside the database: the public keys pinned for
/// checkpoints and prune records (the coordinator's own and `--audit-trusted-keys`, or a
/// verifier's `--trusted-keys`), and checkpoints kept elsewhere (the coordinator's journal,
/// a shipped copy), each of which must be in the database, alike.
#[derive(Debug, Clone, Default)]
pub struct Pins {
    pub keys: BTreeSet<String>,
    pub checkpoints: Vec<AuditCheckpoint>,
}

impl Pins {
    /// The first problem of `tenant`'s stored checkpoints against the pins.
    pub fn hold(&self, tenant: &str, stored: &[AuditCheckpoint]) -> Option<AuditProblem> {
        if let Some(problem) = stored.iter().find_map(|c| signed_by(c, &self.keys)) {
            return Some(problem);
        }
        let by_seq: HashMap<i64, &AuditCheckpoint> = stored.iter().map(|c| (c.seq, c)).collect();
        for kept in self.checkpoints.iter().filter(|c| c.tenant_id == tenant) {
            if let Some(problem) = signed_by(kept, &self.keys) {
                return Some(AuditProblem {
                    seq: problem.seq,
                    what: format!("a kept checkpoint: {}", problem.what),
                });
            }
            match by_seq.get(&kept.seq) {
                None => {
                    return Some(AuditProblem {
                        seq: kept.seq,
                        what: "the checkpoint of this entry kept outside the database is missing \
                               from it: checkpoints were deleted"
                            .into(),
                    });
                }
                Some(c) if c.chain != kept.chain => {
                    return Some(AuditProblem {
                        seq: kept.seq,
                        what: "the checkpoint of this entry differs from the copy kept outside \
                               the database"
                            .into(),
                    });
                }
                Some(_) => {}
            }
        }
        None
    }

    /// Entries before `first` are gone: the problem unless a prune signed by a pinned key
    /// covers them.
    fn pruned(&self, prunes: &[AuditPrune], first: i64) -> Option<AuditProblem> {
        let covered = prunes
            .iter()
            .filter(|p| {
                self.keys.contains(&p.public_key.to_ascii_lowercase())
                    && signature_ok(
                        &p.public_key,
                        &p.signature,
                        &AuditPrune::message(&p.tenant_id, p.before_seq, p.at),
                    )
            })
            .map(|p| p.before_seq)
            .max()
            .unwrap_or(0);
        (covered < first - 1).then(|| AuditProblem {
            seq: covered + 1,
            what: format!(
                "entries {}..{} are missing and no prune signed by a pinned key covers them{}",
                covered + 1,
                first - 1,
                if covered > 0 {
                    format!(" (the last signed prune ends at {covered})")
                } else {
                    String::new()
                }
            ),
        })
    }
}

impl Store {
    /// Sign and store a checkpoint of every tenant's chain head that moved since its last
    /// checkpoint. Returns how many were written. Two coordinators checkpointing one head
    /// store it once.
    pub async fn audit_checkpoint(
        &self,
        key: &ed25519_dalek::SigningKey,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        let heads: Vec<(String, i64, String)> = Sql::new(
            "SELECT h.tenant_id, h.seq, h.chain FROM audit_heads h WHERE h.seq > \
             COALESCE((SELECT MAX(c.seq) FROM audit_checkpoints c WHERE c.tenant_id = h.tenant_id), 0)",
        )
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading audit chain heads")?;
        let now = super::now_ms();
        let public_key = hex::encode(key.verifying_key().as_bytes());
        let mut made = Vec::new();
        for (tenant, seq, chain) in heads {
            let msg = AuditCheckpoint::message(&tenant, seq, &chain, now);
            let signature = hex::encode(key.sign(&msg).to_bytes());
            let stored = Sql::new(
                "INSERT INTO audit_checkpoints (tenant_id, seq, chain, at, public_key, signature) VALUES (",
            )
            .bind(tenant.as_str())
            .push(", ")
            .bind(seq)
            .push(", ")
            .bind(chain.as_str())
            .push(", ")
            .bind(now)
            .push(", ")
            .bind(public_key.as_str())
            .push(", ")
            .bind(signature.as_str())
            .push(") ON CONFLICT (tenant_id, seq) DO NOTHING")
            .build()
            .execute(self.writer())
            .await
            .doing("storing an audit checkpoint")?
            .rows_affected()
                == 1;
            // Another coordinator's copy of the same head is its to keep.
            if stored {
                made.push(AuditCheckpoint {
                    tenant_id: tenant,
                    seq,
                    chain,
                    at: now,
                    public_key: public_key.clone(),
                    signature,
                });
            }
        }
        Ok(made)
    }

    /// Remove `tenant`'s entries up to `before_seq`, which must be a checkpointed entry (the
    /// signed chain value there anchors what is left). Returns how many went, or why not.
    /// Export them first: they are gone from the database.
    pub async fn audit_prune(
        &self,
        tenant: &str,
        before_seq: i64,
        key: &ed25519_dalek::SigningKey,
    ) -> Result<u64, PruneError> {
        let checkpoints = self.audit_checkpoints(tenant).await?;
        if !checkpoints.iter().any(|c| c.seq == before_seq) {
            let at: Vec<String> = checkpoints
                .iter()
                .rev()
                .take(5)
                .map(|c| c.seq.to_string())
                .collect();
            return Err(PruneError::NoCheckpoint {
                before_seq,
                newest: if at.is_empty() {
                    "none yet".to_string()
                } else {
                    at.join(", ")
                },
            });
        }
        let mut tx = self.begin_write().await.doing("pruning the audit log")?;
        // The signed record that these entries were pruned, not deleted: a verifier finds the
        // log starting after entry 1 and needs it.
        let at = super::now_ms();
        let signature = hex::encode(
            key.sign(&AuditPrune::message(tenant, before_seq, at))
                .to_bytes(),
        );
        Sql::new(
            "INSERT INTO audit_prunes (tenant_id, before_seq, at, public_key, signature) VALUES (",
        )
        .bind(tenant)
        .push(", ")
        .bind(before_seq)
        .push(", ")
        .bind(at)
        .push(", ")
        .bind(hex::encode(key.verifying_key().as_bytes()))
        .push(", ")
        .bind(signature)
        .push(") ON CONFLICT (tenant_id, before_seq) DO NOTHING")
        .build()
        .execute(&mut *tx)
        .await
        .doing("recording an audit prune")?;
        let done = Sql::new("DELETE FROM audit WHERE tenant_id = ")
            .bind(tenant)
            .push(" AND seq <= ")
            .bind(before_seq)
            .build()
            .execute(&mut *tx)
            .await
            .doing("pruning the audit log")?;
        tx.commit().await.doing("pruning the audit log")?;
        Ok(done.rows_affected())
    }

    /// `tenant`'s signed prune records, oldest first.
    pub async fn audit_prunes(&self, tenant: &str) -> Result<Vec<AuditPrune>, StoreError> {
        let rows: Vec<(String, i64, i64, String, String)> = Sql::new(
            "SELECT tenant_id, before_seq, at, public_key, signature FROM audit_prunes \
             WHERE tenant_id = ",
        )
        .bind(tenant)
        .push(" ORDER BY before_seq")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading audit prunes")?;
        Ok(rows
            .into_iter()
            .map(
                |(tenant_id, before_seq, at, public_key, signature)| AuditPrune {
                    tenant_id,
                    before_seq,
                    at,
                    public_key,
                    signature,
                },
            )
            .collect())
    }

    /// `tenant`'s checkpoints, oldest first.
    pub async fn audit_checkpoints(
        &self,
        tenant: &str,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        let rows: Vec<(String, i64, String, i64, String, String)> = Sql::new(
            "SELECT tenant_id, seq, chain, at, public_key, signature FROM audit_checkpoints \
             WHERE tenant_id = ",
        )
        .bind(tenant)
        .push(" ORDER BY seq")
        .build_as()
        .fetch_all(&self.read)
        .await
        .doing("reading audit checkpoints")?;
        Ok(rows
            .into_iter()
            .map(
                |(tenant_id, seq, chain, at, public_key, signature)| AuditCheckpoint {
                    tenant_id,
                    seq,
                    chain,
                    at,
                    public_key,
                    signature,
                },
            )
            .collect())
    }
}

/// Which entries [`Store::audit_list`] returns.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub job_id: Option<String>,
    pub agent_id: Option<String>,
    pub action: Option<Action>,
    pub since_ms: Option<i64>,
    /// Entries after this sequence number (paging).
    pub after_seq: i64,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, prev: [u8; 32], action: &str) -> (Record, [u8; 32]) {
        let details = serde_json::json!({"n": seq});
        let l = leaf(
            "t",
            seq,
            1000 + seq,
            "server",
            action,
            [Some("job_1"), None, None],
            Some(seq),
            &canonical(&details),
        );
        let c = link(&prev, &l);
        (
            Record {
                tenant_id: "t".into(),
                seq,
                at: 1000 + seq,
                actor: "server".into(),
                action: action.into(),
                job_id: Some("job_1".into()),
                task_id: Some(seq),
                lease_id: None,
                agent_id: None,
                details: serde_json_canonicalizer::to_string(&details).unwrap(),
                leaf: hex::encode(l),
                chain: hex::encode(c),
            },
            c,
        )
    }

    fn log(n: i64) -> Vec<Record> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|s| {
                let (r, c) = record(s, prev, "shard.accepted");
                prev = c;
                r
            })
            .collect()
    }

    #[test]
    fn hex_digests_decode_in_either_case_and_nothing_else_does() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let lower = hex::encode(digest);
        assert_eq!(unhex(&lower), Some(digest));
        assert_eq!(unhex(&lower.to_uppercase()), Some(digest));
        assert_eq!(unhex(&lower[2..]), None);
        for bad in ['g', 'G', ' ', '/', ':', '@', '`', '\u{e9}'] {
            let mut s = lower.clone();
            s.replace_range(10..11, &bad.to_string());
            assert_eq!(unhex(&s), None, "{bad:?}");
        }
    }

    #[test]
    fn the_leaf_is_the_hash_of_the_rfc_8785_form() {
        let details = serde_json::json!({
            "z": [1, -2, 18446744073709551615u64, {"b": null, "a": true}],
            "esc": "quote \" back \\ nl \n tab \t ctl \u{1} del \u{7f} é \u{2028} 😀",
            "f": 1.5,
            "e": 1e300,
        });
        for details in [
            details.clone(),
            serde_json::json!({"n": 3, "s": "x"}),
            Value::Null,
        ] {
            let whole = serde_json::json!({
                "tenant": "t\u{0}", "seq": 7, "at": 123, "actor": "agent:a", "action": "shard.accepted",
                "job": "job_1", "task": 9, "lease": null, "agent": "a", "details": details,
            });
            let mut h = Sha256::new();
            h.update([0u8]);
            h.update(serde_json_canonicalizer::to_vec(&whole).unwrap());
            let want: [u8; 32] = h.finalize().into();
            let got = leaf(
                "t\u{0}",
                7,
                123,
                "agent:a",
                "shard.accepted",
                [Some("job_1"), None, Some("a")],
                Some(9),
                &canonical(&details),
            );
            assert_eq!(got, want, "{details}");
            assert_eq!(
                canonical(&details),
                serde_json_canonicalizer::to_string(&details).unwrap()
            );
        }
    }

    #[test]
    fn an_intact_log_verifies_and_each_kind_of_tampering_is_named() {
        let good = log(10);
        assert_eq!(verify_records(&good, (0, GENESIS)).unwrap().0, 10);
        // Edited.
        let mut edited = good.clone();
        edited[4].actor = "admin:x".into();
        assert_eq!(verify_records(&edited, (0, GENESIS)).unwrap_err().seq, 5);
        // Deleted.
        let mut deleted = good.clone();
        deleted.remove(6);
        assert_eq!(verify_records(&deleted, (0, GENESIS)).unwrap_err().seq, 7);
        // Two entries' contents swapped (sequence numbers kept).
        let mut swapped = good.clone();
        let (a, b) = (swapped[2].clone(), swapped[3].clone());
        swapped[2] = Record { seq: 3, ..b };
        swapped[3] = Record { seq: 4, ..a };
        assert_eq!(verify_records(&swapped, (0, GENESIS)).unwrap_err().seq, 3);
        // An entry inserted with a valid leaf of its own, renumbering the rest.
        let mut inserted = good[..3].to_vec();
        let (fake, _) = record(4, GENESIS, "job.cancelled");
        inserted.push(fake);
        assert_eq!(verify_records(&inserted, (0, GENESIS)).unwrap_err().seq, 4);
    }
}
