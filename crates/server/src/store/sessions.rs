//! Sessions in the store: one interpreter on one agent, kept across calls (`/v1/sessions`).
//!
//! A session's calls are one-shard jobs (see `jobs.session`), one at a time (`busy_job`). The
//! first, with empty code, opens the interpreter on whichever agent that keeps sessions leases
//! it; when it completes, the session is bound to that agent and every later call goes to it
//! alone (`tasks.only_agent`). A session ends `closed` (`DELETE`, idle time, lifetime) or
//! `lost` (its agent stopped answering, its interpreter died, its opening failed); the call
//! under way then is cancelled with the reason. Each end is audited.

use fleetbox_proto::api::{LeasedSession, SessionView};
use fleetbox_proto::{EnvironmentSpec, JobState, Limits};

use super::audit::{Action, Entry};
use super::jobs::{JobSession, NewJob, TASK_COLUMNS, cancel_in, insert_job_in};
use super::settle::Tx;
use super::sql::Sql;
use super::{Doing, Store, StoreError, now_ms};

pub const OPENING: &str = "opening";
pub const OPEN: &str = "open";
pub const CLOSED: &str = "closed";
pub const LOST: &str = "lost";

/// A session to open, with its opening call.
pub struct NewSession {
    pub id: String,
    pub tenant_id: String,
    pub actor: String,
    pub name: String,
    pub limits: Limits,
    pub environment: Option<EnvironmentSpec>,
    pub idle_timeout_ms: u64,
    pub max_lifetime_ms: u64,
}

impl NewSession {
    /// The session as a call's agent is told of it.
    pub fn leased(&self, call: u64) -> LeasedSession {
        LeasedSession {
            id: self.id.clone(),
            call,
            idle_timeout_ms: self.idle_timeout_ms,
            max_lifetime_ms: self.max_lifetime_ms,
        }
    }
}

fn corrupt(what: &'static str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

/// The most code a session's calls may add up to (each call is reviewed with all of it).
pub const MAX_HISTORY: usize = 4 << 20;

/// Why a call cannot be made now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallRefused {
    NotFound,
    /// Closed or lost: its state and why.
    Ended {
        state: String,
        reason: String,
    },
    /// A call is under way (or the session is still opening).
    Busy,
}

#[derive(sqlx::FromRow)]
struct SessionRecord {
    id: String,
    name: String,
    state: String,
    agent_id: Option<String>,
    limits: String,
    environment: Option<String>,
    idle_timeout_ms: i64,
    max_lifetime_ms: i64,
    created_at: i64,
    last_used_at: i64,
    calls: i64,
    open_job: String,
    busy_job: Option<String>,
    history: String,
    ended_at: Option<i64>,
    end_reason: Option<String>,
}

const SESSION_SELECT: &str = "SELECT id, name, state, agent_id, limits, environment, \
     idle_timeout_ms, max_lifetime_ms, created_at, last_used_at, calls, open_job, busy_job, \
     history, ended_at, end_reason FROM sessions";

/// A session as stored.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub view: SessionView,
    pub environment: Option<EnvironmentSpec>,
    pub open_job: String,
    pub busy_job: Option<String>,
    /// The code of its calls so far, each ended by a newline.
    pub history: String,
}

impl SessionRecord {
    fn decode(self) -> Result<SessionRow, StoreError> {
        Ok(SessionRow {
            view: SessionView {
                id: self.id,
                name: self.name,
                state: self.state,
                agent_id: self.agent_id,
                created_at: self.created_at,
                last_used_at: self.last_used_at,
                calls: self.calls.max(0) as u64,
                idle_timeout_ms: self.idle_timeout_ms.max(0) as u64,
                max_lifetime_ms: self.max_lifetime_ms.max(0) as u64,
                limits: super::agents::parse(&self.limits, "session limits")?,
                ended_at: self.ended_at,
                end_reason: self.end_reason,
            },
            environment: self
                .environment
                .as_deref()
                .map(|e| super::agents::parse(e, "session environment"))
                .transpose()?,
            open_job: self.open_job,
            busy_job: self.busy_job,
            history: self.history,
        })
    }
}

impl SessionRow {
    pub fn live(&self) -> bool {
        matches!(self.view.state.as_str(), OPENING | OPEN)
    }

    /// Why it has ended by the clock at `now` (idle too long with no call `running`, past its
    /// lifetime), if it has.
    pub fn expired(&self, now: i64, running: bool) -> Option<String> {
        let v = &self.view;
        if now - v.created_at >= v.max_lifetime_ms as i64 {
            Some(format!(
                "it reached its lifetime of {}",
                fleetbox_proto::Millis(v.max_lifetime_ms)
            ))
        } else if now - v.last_used_at >= v.idle_timeout_ms as i64 && !running {
            Some(format!(
                "it sat idle for {}",
                fleetbox_proto::Millis(v.idle_timeout_ms)
            ))
        } else {
            None
        }
    }
}

impl Store {
    /// Store a session and its opening call (`opening`, busy with it), audited.
    pub async fn open_session(&self, s: &NewSession, opening: &NewJob) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("opening a session")?;
        sqlx::query(
            "INSERT INTO sessions (id, tenant_id, actor, name, state, limits, environment, \
             idle_timeout_ms, max_lifetime_ms, created_at, last_used_at, calls, open_job, \
             busy_job) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, 1, $11, $11)",
        )
        .bind(s.id.as_str())
        .bind(s.tenant_id.as_str())
        .bind(s.actor.as_str())
        .bind(s.name.as_str())
        .bind(OPENING)
        .bind(serde_json::to_string(&s.limits).map_err(|e| corrupt("session limits", e))?)
        .bind(
            s.environment
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| corrupt("session environment", e))?,
        )
        .bind(s.idle_timeout_ms as i64)
        .bind(s.max_lifetime_ms as i64)
        .bind(now)
        .bind(opening.id.as_str())
        .execute(&mut *tx)
        .await
        .doing("opening a session")?;
        let submitted =
            insert_job_in(&mut tx, self.rows_per_statement(TASK_COLUMNS), opening, now).await?;
        let opened = Entry::new(&s.tenant_id, s.actor.as_str(), Action::SessionOpened)
            .job(&opening.id)
            .details(serde_json::json!({
                "session_id": s.id,
                "name": s.name,
                "idle_timeout_ms": s.idle_timeout_ms,
                "max_lifetime_ms": s.max_lifetime_ms,
            }));
        self.append_audit(&mut tx, vec![opened, submitted], now)
            .await?;
        tx.commit().await.doing("opening a session")?;
        Ok(())
    }

    pub async fn session(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<SessionRow>, StoreError> {
        sqlx::query_as::<_, SessionRecord>(&format!(
            "{SESSION_SELECT} WHERE id = $1 AND tenant_id = $2"
        ))
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&self.read)
        .await
        .doing("reading a session")?
        .map(SessionRecord::decode)
        .transpose()
    }

    /// The tenant's sessions, newest first (`live`: only those opening or open).
    pub async fn list_sessions(
        &self,
        tenant_id: &str,
        live: bool,
        limit: u32,
    ) -> Result<Vec<SessionView>, StoreError> {
        sqlx::query_as::<_, SessionRecord>(&format!(
            "{SESSION_SELECT} WHERE tenant_id = $1 AND ($2 = 0 OR state IN ($3, $4)) \
             ORDER BY created_at DESC, id LIMIT $5"
        ))
        .bind(tenant_id)
        .bind(i64::from(live))
        .bind(OPENING)
        .bind(OPEN)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .doing("listing sessions")?
        .into_iter()
        .map(|r| r.decode().map(|s| s.view))
        .collect()
    }

    /// Bring a session up to date: an `opening` session whose opening call is final becomes
    /// `open` on the agent that ran it (or `lost` with its error), and a live one past its idle
    /// time or lifetime is closed. The row as it then is.
    pub async fn refresh_session(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<SessionRow>, StoreError> {
        let Some(row) = self.session(tenant_id, id).await? else {
            return Ok(None);
        };
        if row.view.state == OPENING {
            let opened: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT j.state, j.error, (SELECT a.agent_id FROM attempts a JOIN tasks t \
                 ON t.id = a.task_id WHERE t.job_id = j.id AND a.status = 'ok' \
                 ORDER BY a.chosen DESC, a.id DESC LIMIT 1) FROM jobs j WHERE j.id = $1",
            )
            .bind(row.open_job.as_str())
            .fetch_optional(&self.read)
            .await
            .doing("reading a session's opening")?;
            match opened {
                Some((state, _, Some(agent))) if state == JobState::Completed.as_str() => {
                    sqlx::query(
                        "UPDATE sessions SET state = $1, agent_id = $2, busy_job = NULL \
                         WHERE id = $3 AND state = $4",
                    )
                    .bind(OPEN)
                    .bind(agent.as_str())
                    .bind(id)
                    .bind(OPENING)
                    .execute(self.writer())
                    .await
                    .doing("binding a session to its agent")?;
                }
                Some((state, error, _)) if JobState::FINAL.iter().any(|s| s.as_str() == state) => {
                    let why = format!(
                        "its interpreter could not be opened: {}",
                        error.unwrap_or(state)
                    );
                    self.end_session(tenant_id, id, LOST, &why, "server")
                        .await?;
                }
                _ => {}
            }
            return self.session(tenant_id, id).await;
        }
        let running = match &row.busy_job {
            Some(job) => !self.job_is_final(job).await?,
            None => false,
        };
        if row.live()
            && let Some(why) = row.expired(now_ms(), running)
        {
            self.end_session(tenant_id, id, CLOSED, &why, "server")
                .await?;
            return self.session(tenant_id, id).await;
        }
        Ok(Some(row))
    }

    /// Make call `job` in session `id` (built by `make` from the call's number and the
    /// session's agent) if the session is open and no call is under way; stored with its job.
    pub async fn session_call(
        &self,
        tenant_id: &str,
        id: &str,
        make: impl FnOnce(JobSession) -> NewJob,
    ) -> Result<Result<(NewJob, SessionRow), CallRefused>, StoreError> {
        let Some(row) = self.refresh_session(tenant_id, id).await? else {
            return Ok(Err(CallRefused::NotFound));
        };
        match row.view.state.as_str() {
            OPEN => {}
            OPENING => return Ok(Err(CallRefused::Busy)),
            state => {
                return Ok(Err(CallRefused::Ended {
                    state: state.to_string(),
                    reason: row.view.end_reason.clone().unwrap_or_default(),
                }));
            }
        }
        if let Some(busy) = &row.busy_job
            && !self.job_is_final(busy).await?
        {
            return Ok(Err(CallRefused::Busy));
        }
        let call = row.view.calls + 1;
        let job = make(JobSession {
            leased: LeasedSession {
                id: id.to_string(),
                call,
                idle_timeout_ms: row.view.idle_timeout_ms,
                max_lifetime_ms: row.view.max_lifetime_ms,
            },
            only_agent: row.view.agent_id.clone(),
        });
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("making a session call")?;
        // Guarded by the call count read above: of two calls racing, one is made.
        let taken = sqlx::query(
            "UPDATE sessions SET calls = $1, busy_job = $2, last_used_at = $3, \
             history = history || $4 WHERE id = $5 AND state = $6 AND calls = $7",
        )
        .bind(call as i64)
        .bind(job.id.as_str())
        .bind(now)
        .bind(format!("{}\n", job.code))
        .bind(id)
        .bind(OPEN)
        .bind(row.view.calls as i64)
        .execute(&mut *tx)
        .await
        .doing("making a session call")?;
        if taken.rows_affected() == 0 {
            return Ok(Err(CallRefused::Busy));
        }
        let entry =
            insert_job_in(&mut tx, self.rows_per_statement(TASK_COLUMNS), &job, now).await?;
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("making a session call")?;
        Ok(Ok((job, row)))
    }

    async fn job_is_final(&self, job_id: &str) -> Result<bool, StoreError> {
        let state: Option<(String,)> = sqlx::query_as("SELECT state FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_optional(&self.read)
            .await
            .doing("reading a session call")?;
        Ok(state.is_none_or(|(s,)| JobState::FINAL.iter().any(|f| f.as_str() == s)))
    }

    /// End a live session `closed` or `lost` with `reason`; its call under way is cancelled.
    /// False when it was not live.
    pub async fn end_session(
        &self,
        tenant_id: &str,
        id: &str,
        state: &str,
        reason: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.doing("ending a session")?;
        let ended = end_in(&mut tx, tenant_id, id, state, reason, now).await?;
        let Some((agent, busy)) = ended else {
            return Ok(false);
        };
        if let Some(job) = busy {
            cancel_in(
                &mut tx,
                tenant_id,
                &job,
                &format!("session {state}: {reason}"),
                now,
            )
            .await?;
        }
        let action = if state == LOST {
            Action::SessionLost
        } else {
            Action::SessionClosed
        };
        let mut entry = Entry::new(tenant_id, actor, action)
            .details(serde_json::json!({ "session_id": id, "reason": reason }));
        if let Some(agent) = agent.as_deref() {
            entry = entry.agent(agent);
        }
        self.append_audit(&mut tx, vec![entry], now).await?;
        tx.commit().await.doing("ending a session")?;
        Ok(true)
    }

    /// Close every live session past its lifetime, or idle for longer than it may be with no
    /// call under way; returns how many.
    pub async fn expire_sessions(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let due: Vec<(String, String)> =
            Sql::new("SELECT s.tenant_id, s.id FROM sessions s WHERE s.state IN (")
                .bind_list([OPENING, OPEN])
                .push(") AND (s.created_at + s.max_lifetime_ms <= ")
                .bind(now)
                .push(" OR (s.last_used_at + s.idle_timeout_ms <= ")
                .bind(now)
                .push(
                    " AND (s.busy_job IS NULL OR EXISTS (SELECT 1 FROM jobs j \
                     WHERE j.id = s.busy_job AND j.state IN (",
                )
                .bind_list(JobState::FINAL.iter().map(|f| f.as_str()))
                .push(")))))")
                .build_as()
                .fetch_all(&self.read)
                .await
                .doing("finding expired sessions")?;
        let mut n = 0;
        for (tenant, id) in due {
            let Some(row) = self.session(&tenant, &id).await? else {
                continue;
            };
            let running = match &row.busy_job {
                Some(job) => !self.job_is_final(job).await?,
                None => false,
            };
            if let Some(why) = row.expired(now, running)
                && self
                    .end_session(&tenant, &id, CLOSED, &why, "server")
                    .await?
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The live sessions of `agents` are lost, for `reason` (they were marked lost, or one
    /// restarted: its interpreters went with its process).
    pub async fn lose_sessions_of(
        &self,
        agents: &[String],
        reason: &str,
    ) -> Result<usize, StoreError> {
        if agents.is_empty() {
            return Ok(0);
        }
        let live: Vec<(String, String)> =
            Sql::new("SELECT tenant_id, id FROM sessions WHERE state IN (")
                .bind_list([OPENING, OPEN])
                .push(") AND agent_id IN (")
                .bind_list(agents.iter().map(String::as_str))
                .push(")")
                .build_as()
                .fetch_all(&self.read)
                .await
                .doing("finding a lost agent's sessions")?;
        let mut n = 0;
        for (tenant, id) in live {
            if self
                .end_session(&tenant, &id, LOST, reason, "server")
                .await?
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Of the sessions `agent` says it holds, those it should end: not live, not its own, or
    /// unknown.
    pub async fn sessions_to_close(
        &self,
        agent: &str,
        held: &[String],
    ) -> Result<Vec<String>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let live: Vec<(String,)> = Sql::new("SELECT id FROM sessions WHERE state IN (")
            .bind_list([OPENING, OPEN])
            .push(") AND (agent_id IS NULL OR agent_id = ")
            .bind(agent)
            .push(") AND id IN (")
            .bind_list(held.iter().map(String::as_str))
            .push(")")
            .build_as()
            .fetch_all(&self.read)
            .await
            .doing("reading an agent's sessions")?;
        Ok(held
            .iter()
            .filter(|h| !live.iter().any(|(id,)| id == *h))
            .cloned()
            .collect())
    }
}

/// `opening`/`open` → `state` in `tx`; the agent and the call under way, or `None` when the
/// session was not live.
async fn end_in(
    tx: &mut Tx,
    tenant_id: &str,
    id: &str,
    state: &str,
    reason: &str,
    now: i64,
) -> Result<Option<(Option<String>, Option<String>)>, StoreError> {
    let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "UPDATE sessions SET state = $1, ended_at = $2, end_reason = $3 \
         WHERE id = $4 AND tenant_id = $5 AND state IN ($6, $7) RETURNING agent_id, busy_job",
    )
    .bind(state)
    .bind(now)
    .bind(reason)
    .bind(id)
    .bind(tenant_id)
    .bind(OPENING)
    .bind(OPEN)
    .fetch_optional(&mut **tx)
    .await
    .doing("ending a session")?;
    Ok(row)
}
