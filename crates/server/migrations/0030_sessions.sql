-- Sessions (issue 36): one interpreter on one agent, kept across calls. Each call is a
-- one-shard job whose `session` says which session, which call and the session's time limits
-- (what the agent needs). A call's shard goes only to agents that keep sessions
-- (`tasks.session`), and, once the session is open, only to the agent holding it
-- (`tasks.only_agent`): the first call (the opening, `open_job`) binds the session to the agent
-- that ran it. A session is `opening`, `open`, `closed` (by `DELETE`, idle time or lifetime) or
-- `lost` (its agent or interpreter is gone); `busy_job` is the call under way. `history` is the
-- code of its calls so far: each call is reviewed with it, so a program split across calls is
-- judged whole.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    actor TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    agent_id TEXT,
    limits TEXT NOT NULL,
    environment TEXT,
    idle_timeout_ms BIGINT NOT NULL,
    max_lifetime_ms BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    calls BIGINT NOT NULL DEFAULT 0,
    open_job TEXT NOT NULL,
    busy_job TEXT,
    history TEXT NOT NULL DEFAULT '',
    ended_at BIGINT,
    end_reason TEXT
);
CREATE INDEX sessions_by_tenant ON sessions (tenant_id, created_at);
CREATE INDEX sessions_live ON sessions (state, agent_id);
ALTER TABLE jobs ADD COLUMN session TEXT;
ALTER TABLE tasks ADD COLUMN only_agent TEXT;
ALTER TABLE tasks ADD COLUMN session BIGINT NOT NULL DEFAULT 0;
-- Whether an agent's last lease call said it keeps sessions: a session call every such agent
-- refused is rejected rather than kept for one that never leases session calls.
ALTER TABLE agents ADD COLUMN keeps_sessions BIGINT NOT NULL DEFAULT 0;
-- The scheduler's sweep of queued shards that agents refused (see `reject_unrunnable`).
CREATE INDEX tasks_refused_queued ON tasks (id) WHERE state = 'queued' AND refusals > 0;
