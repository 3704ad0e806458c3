//! Agents: enrollment, liveness, load.

use fleetbox_proto::api::{AgentLoad, AgentView, EnrollRequest, MachineFacts};
use fleetbox_proto::{AgentState, TaskState};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::{Action, Entry};
use super::settle::Tx;
use super::{Doing, Store, StoreError, TokenKind, now_ms};

/// The label with which the coordinator's own server agents mark themselves at enrollment.
pub const HARDENED: &str = "hardened";

/// An agent being enrolled: who, with what token, by whom, into which pool.
#[derive(Debug, Clone, Copy)]
pub struct Enrolment<'a> {
    pub tenant_id: &'a str,
    pub agent_id: &'a str,
    /// The sha256 of the agent token it gets.
    pub token_hash: &'a str,
    pub req: &'a EnrollRequest,
    pub actor: &'a str,
    /// One of this coordinator's own agents (`fleetbox up`, server agents).
    pub own: bool,
    /// The pool its enrolment token names (`None`: its tenant's own).
    pub pool: Option<&'a str>,
    /// When its agent token stops working (renewed by heartbeats).
    pub token_expires_at: i64,
}

impl Store {
    /// Register an agent and its token (hash) in one transaction.
    pub async fn enroll_agent(&self, e: &Enrolment<'_>) -> Result<(), StoreError> {
        let Enrolment {
            tenant_id,
            agent_id,
            token_hash,
            req,
            actor,
            own,
            pool,
            token_expires_at,
        } = *e;
        let now = now_ms();
        // The coordinator's own agents may mark themselves for server-only code (its server
        // agents do); anyone else's label is only a label until an operator marks the agent.
        let hardened = own && req.labels.iter().any(|l| l == HARDENED);
        // The tenant's own pool unless the enrolment token named one (which it owns).
        let pool = pool.unwrap_or(tenant_id);
        let mut tx = self.begin_write().await.doing("enrolling an agent")?;
        sqlx::query(
            "INSERT INTO agents (id, tenant_id, name, labels, slots, facts, load, state, created_at, last_seen, public_key, machine_id, own, hardened, pool) \
             VALUES ($1, $2, $3, $4, $5, $6, '{}', $7, $8, $8, $9, $10, $11, $12, $13)",
        )
        .bind(agent_id)
        .bind(tenant_id)
        .bind(&req.name)
        .bind(json(&req.labels))
        .bind(i64::from(req.slots))
        .bind(json(&req.facts))
        .bind(AgentState::Online.as_str())
        .bind(now)
        .bind(&req.public_key)
        .bind(machine_id(&req.facts))
        .bind(i64::from(own))
        .bind(i64::from(hardened))
        .bind(pool)
        .execute(&mut *tx)
        .await
        .doing("inserting an agent")?;
        sqlx::query(
            "INSERT INTO tokens (hash, id, tenant_id, kind, agent_id, created_at, created_by, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(token_hash)
        .bind(super::token_id(token_hash))
        .bind(tenant_id)
        .bind(TokenKind::Agent.as_str())
        .bind(agent_id)
        .bind(now)
        .bind(actor)
        .bind(token_expires_at)
        .execute(&mut *tx)
        .await
        .doing("inserting an agent token")?;
        let entry = Entry::new(tenant_id, actor, Action::AgentEnrolled)
            .agent(agent_id)
            .details(serde_json::json!({
                "name": req.name,
                "labels": req.labels,
                "slots": req.slots,
                "public_key": req.public_key,
                "hardened": hardened,
                "pool": pool,
            }));
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("enrolling an agent")?;
        Ok(())
    }

    /// An admin marks an agent of `tenant` to run server-only code (or takes the mark back),
    /// audited as `agent.hardened`. `false`: no such agent.
    pub async fn set_agent_hardened(
        &self,
        tenant_id: &str,
        agent_id: &str,
        hardened: bool,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("marking an agent")?;
        let found = sqlx::query("UPDATE agents SET hardened = $1 WHERE id = $2 AND tenant_id = $3")
            .bind(i64::from(hardened))
            .bind(agent_id)
            .bind(tenant_id)
            .execute(&mut *tx)
            .await
            .doing("marking an agent")?
            .rows_affected()
            == 1;
        if found {
            let entry = Entry::new(tenant_id, actor, Action::AgentHardened)
                .agent(agent_id)
                .details(serde_json::json!({ "hardened": hardened }));
            self.append_audit(&mut tx, vec![entry], now).await?;
        }
        tx.commit().await.doing("marking an agent")?;
        Ok(found)
    }

    /// Whether `tenant` has an agent `agent_id` (another tenant's is `false`).
    pub async fn has_agent(&self, tenant_id: &str, agent_id: &str) -> Result<bool, StoreError> {
        super::sql::exists(
            &self.read,
            "SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2",
            &[tenant_id, agent_id],
            "looking up an agent",
        )
        .await
    }

    /// The public key an agent signs its reports with (`None`: enrolled before keys).
    pub async fn agent_key(&self, agent_id: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT public_key FROM agents WHERE id = $1")
                .bind(agent_id)
                .fetch_optional(&self.read)
                .await
                .doing("reading an agent's key")?;
        Ok(row.and_then(|(k,)| k))
    }

    /// Replace an agent's key, audited with the old and the new key.
    pub async fn rotate_agent_key(
        &self,
        tenant_id: &str,
        agent_id: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("rotating an agent key")?;
        // Guarded on the old key: two rotations racing cannot both win.
        let changed =
            sqlx::query("UPDATE agents SET public_key = $1 WHERE id = $2 AND public_key = $3")
                .bind(new)
                .bind(agent_id)
                .bind(old)
                .execute(&mut *tx)
                .await
                .doing("rotating an agent key")?
                .rows_affected()
                == 1;
        if changed {
            let entry = Entry::new(
                tenant_id,
                format!("agent:{agent_id}"),
                Action::AgentKeyRotated,
            )
            .agent(agent_id)
            .details(serde_json::json!({ "old": old, "new": new }));
            self.append_audit(&mut tx, vec![entry], now).await?;
        }
        tx.commit().await.doing("rotating an agent key")?;
        Ok(changed)
    }

    /// Record heartbeats (`crate::heartbeats`), all in one transaction: each agent is alive as
    /// of its beat, with the load it reported. A row never goes back: a beat older than what
    /// another coordinator (or a lease call) wrote changes nothing.
    pub async fn touch_agents(&self, beats: &[crate::heartbeats::Beat]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await.doing("recording heartbeats")?;
        for b in beats {
            sqlx::query(
                "UPDATE agents SET last_seen = $1, load = $2, state = $3 \
                 WHERE id = $4 AND last_seen <= $1",
            )
            .bind(b.at)
            .bind(b.load.as_str())
            .bind(AgentState::Online.as_str())
            .bind(b.agent_id.as_str())
            .execute(&mut *tx)
            .await
            .doing("recording heartbeats")?;
        }
        tx.commit().await.doing("recording heartbeats")
    }

    /// Replace what an agent said about its machine (after a restart).
    pub async fn update_agent_facts(
        &self,
        agent_id: &str,
        facts: &MachineFacts,
        slots: u32,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE agents SET facts = $1, slots = $2, machine_id = $3 WHERE id = $4")
            .bind(json(facts))
            .bind(i64::from(slots))
            .bind(machine_id(facts))
            .bind(agent_id)
            .execute(self.writer())
            .await
            .doing("updating agent facts")?;
        Ok(())
    }

    /// Agents silent since `cutoff` become `lost`; returns their ids.
    pub async fn mark_lost_agents(&self, cutoff: i64) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        // Read first: a sweep that finds nobody silent writes nothing.
        let silent = super::sql::exists_at(
            &self.read,
            "SELECT 1 FROM agents WHERE state = $1 AND last_seen < $2 LIMIT 1",
            AgentState::Online.as_str(),
            cutoff,
            "looking for silent agents",
        )
        .await?;
        if !silent {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await.doing("marking lost agents")?;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "UPDATE agents SET state = $1 WHERE state = $2 AND last_seen < $3 \
             RETURNING id, tenant_id, last_seen",
        )
        .bind(AgentState::Lost.as_str())
        .bind(AgentState::Online.as_str())
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await
        .doing("marking lost agents")?;
        let entries = rows
            .iter()
            .map(|(id, tenant, seen)| {
                Entry::new(tenant, "server", Action::AgentLost)
                    .agent(id)
                    .details(serde_json::json!({ "last_seen": seen }))
            })
            .collect();
        self.append_audit(&mut tx, entries, now).await?;
        tx.commit().await.doing("marking lost agents")?;
        Ok(rows.into_iter().map(|(id, _, _)| id).collect())
    }

    /// An agent asked for work: a sign of life, in the caller's transaction, and what it
    /// asks for (server-only shards alone; session calls too), which decides whether a shard
    /// others refused still has an agent that would take it.
    /// An agent asks for work: recorded (`last_seen`, its state, what it asks for) only when
    /// the row says otherwise or was last written more than `fresh_ms` ago. An idle agent's
    /// polls then write nothing: its heartbeats keep it seen, and one that freezes mid-poll
    /// is lost when they stop.
    pub async fn agent_polls(
        &self,
        agent_id: &str,
        want: &super::settle::Want<'_>,
        fresh_ms: i64,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let row: Option<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT state, only_hardened, keeps_sessions, last_seen FROM agents WHERE id = $1",
        )
        .bind(agent_id)
        .fetch_optional(&self.read)
        .await
        .doing("reading an agent")?;
        let current = row.is_some_and(|(state, hardened, sessions, seen)| {
            state == AgentState::Online.as_str()
                && hardened == i64::from(want.hardened_only)
                && sessions == i64::from(want.sessions)
                && now - seen < fresh_ms
        });
        if current {
            return Ok(());
        }
        let mut tx = self
            .begin_write()
            .await
            .doing("recording an agent's lease call")?;
        self.agent_seen(&mut tx, agent_id, want, now).await?;
        tx.commit().await.doing("recording an agent's lease call")
    }

    pub(super) async fn agent_seen(
        &self,
        tx: &mut Tx,
        agent_id: &str,
        want: &super::settle::Want<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET last_seen = $1, state = $2, only_hardened = $3, \
             keeps_sessions = $4 WHERE id = $5",
        )
        .bind(now)
        .bind(AgentState::Online.as_str())
        .bind(i64::from(want.hardened_only))
        .bind(i64::from(want.sessions))
        .bind(agent_id)
        .execute(&mut **tx)
        .await
        .doing("recording an agent's lease call")?;
        Ok(())
    }

    pub async fn list_agents(&self, tenant_id: &str) -> Result<Vec<AgentView>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.id, a.name, a.state, a.labels, a.slots, a.facts, a.load, a.last_seen, \
             a.strikes, a.quarantine_reason, a.hardened, a.own, \
             (SELECT COUNT(*) FROM tasks t WHERE t.agent_id = a.id AND t.state = $2) AS leases \
             FROM agents a WHERE a.tenant_id = $1 ORDER BY a.created_at",
        )
        .bind(tenant_id)
        .bind(TaskState::Leased.as_str())
        .fetch_all(&self.read)
        .await
        .doing("listing agents")?;
        let mut views = rows.iter().map(agent_view).collect::<Result<Vec<_>, _>>()?;
        // The coordinator's own agents (`fleetbox up`) are trusted from their first result.
        let own: std::collections::HashSet<String> = rows
            .iter()
            .filter(|r| r.try_get::<i64, _>("own").is_ok_and(|o| o == 1))
            .filter_map(|r| r.try_get::<String, _>("id").ok())
            .collect();
        for t in self.trust_of_tenant(tenant_id).await? {
            if let Some(v) = views.iter_mut().find(|v| v.id == t.agent_id) {
                let error_rate = super::verify::error_rate(t.results, t.errors);
                v.trust.push(fleetbox_proto::api::AgentTrust {
                    recheck_rate: if own.contains(&v.id) && v.quarantined.is_none() {
                        0.0
                    } else if error_rate > super::verify::MAX_ERROR_RATE {
                        1.0
                    } else {
                        super::verify::adaptive_rate(
                            t.consecutive_valid,
                            super::verify::warm_up(self.trusted_after, i64::from(v.strikes)),
                        )
                    },
                    results: t.results.max(0) as u64,
                    error_rate,
                    python: t.python,
                    backend: t.backend,
                    consecutive_valid: t.consecutive_valid.max(0) as u64,
                    valid: t.valid.max(0) as u64,
                    invalid: t.invalid.max(0) as u64,
                });
            }
        }
        Ok(views)
    }
}

fn agent_view(row: &AnyRow) -> Result<AgentView, StoreError> {
    let get_s = |c: &str| row.try_get::<String, _>(c).doing("reading an agent");
    let get_i = |c: &str| row.try_get::<i64, _>(c).doing("reading an agent");
    Ok(AgentView {
        id: get_s("id")?,
        name: get_s("name")?,
        state: get_s("state")?
            .parse()
            .map_err(|e: fleetbox_proto::UnknownState| StoreError::Corrupt {
                what: "agent state",
                detail: e.to_string(),
            })?,
        labels: parse(&get_s("labels")?, "agent labels")?,
        slots: get_i("slots")? as u32,
        facts: parse::<MachineFacts>(&get_s("facts")?, "agent facts")?,
        load: parse::<AgentLoad>(&get_s("load")?, "agent load").unwrap_or_default(),
        last_seen: get_i("last_seen")?,
        leases: get_i("leases")? as u64,
        strikes: get_i("strikes")?.max(0) as u32,
        quarantined: row
            .try_get::<Option<String>, _>("quarantine_reason")
            .doing("reading an agent")?,
        trust: Vec::new(),
        hardened: get_i("hardened")? == 1,
    })
}

pub(crate) fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// The machine an agent said it runs on (`None`: it did not say; an older agent).
fn machine_id(facts: &MachineFacts) -> Option<&str> {
    Some(facts.machine_id.as_str()).filter(|m| !m.is_empty())
}
