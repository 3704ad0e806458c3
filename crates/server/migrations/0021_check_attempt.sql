-- The agent attempt a server check is about, when it is a failure (issue 31): an untrusted
-- agent's `error`, `timeout` or `sandbox_violation` is re-run by the server like its successes.
-- NULL: the check is about the shard's latest unchecked success (or its disagreeing replicas).
ALTER TABLE tasks ADD COLUMN check_attempt BIGINT;
