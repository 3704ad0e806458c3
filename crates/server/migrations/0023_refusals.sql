-- A refusal is not a result (issue 31): an agent that refuses a shard (its own policy: no
-- network, its review) gives it back, and the shard goes to another agent, never back to one
-- that refused it. `leases.refused` marks those leases; `tasks.refusals` counts them, so the
-- lease query only looks for a refuser on shards that have one.
ALTER TABLE leases ADD COLUMN refused BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN refusals BIGINT NOT NULL DEFAULT 0;
