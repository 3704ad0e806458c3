-- Verification (issue 11): server re-checks of agents' results, per-agent trust, quarantine.
-- A job's `[verify]` settings (JSON; NULL = the defaults).
ALTER TABLE jobs ADD COLUMN verify TEXT;
-- What verification flagged in a job: [{kind, shard, detail}] (JSON).
ALTER TABLE jobs ADD COLUMN flags TEXT NOT NULL DEFAULT '[]';
-- A shard in `reported` waits for a server re-check; the coordinator running it holds it until
-- `check_expires` (a dead coordinator's check is taken over after that).
ALTER TABLE tasks ADD COLUMN check_owner TEXT;
ALTER TABLE tasks ADD COLUMN check_expires BIGINT NOT NULL DEFAULT 0;
-- Whether the accepted value was checked (a server run agreed) or taken on trust.
ALTER TABLE tasks ADD COLUMN verified BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tasks_reported ON tasks (check_expires) WHERE state = 'reported';
-- `agent` or `server` (the coordinator's own re-run), and what stdout hashed to.
ALTER TABLE attempts ADD COLUMN runner TEXT NOT NULL DEFAULT 'agent';
ALTER TABLE attempts ADD COLUMN stdout_sha256 TEXT;
-- Trust per (agent, Python version, backend): a new interpreter on the same agent starts over.
CREATE TABLE agent_trust (
    agent_id TEXT NOT NULL,
    python TEXT NOT NULL,
    backend TEXT NOT NULL,
    consecutive_valid BIGINT NOT NULL DEFAULT 0,
    valid BIGINT NOT NULL DEFAULT 0,
    invalid BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, python, backend)
);
-- Invalid results since the agent was last released; at `--quarantine-strikes` it is quarantined.
ALTER TABLE agents ADD COLUMN strikes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN quarantined_at BIGINT;
ALTER TABLE agents ADD COLUMN quarantine_reason TEXT;
