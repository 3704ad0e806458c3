-- A job's outcome (issue 28): the share of its shards that must succeed for it to complete
-- (`1`, every shard, unless the spec says `allow_partial` or `min_success_rate`); below it
-- the job is `failed`.
ALTER TABLE jobs ADD COLUMN success_needed DOUBLE PRECISION NOT NULL DEFAULT 1;

-- The processing lag is how long the oldest ready shard has waited: queued shards in the
-- order they were queued, read from the front.
CREATE INDEX tasks_waiting ON tasks (updated_at) WHERE state = 'queued';

-- Agents the coordinator's own process started (`fleetbox up`), enrolled with its in-memory
-- `enroll_own` token: trusted from the start (their results are not re-run under `adaptive`).
ALTER TABLE agents ADD COLUMN own BIGINT NOT NULL DEFAULT 0;
