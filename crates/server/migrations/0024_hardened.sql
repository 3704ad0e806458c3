-- Code the review decides `run_on_server_only` is never leased to an ordinary agent (issue 32):
-- its shards carry `tasks.hardened`, and only agents marked `agents.hardened` take them, an
-- operator's mark (`fleetbox agents harden ID`) or the coordinator's own server agents. An
-- agent's self-declared label is not a mark.
ALTER TABLE agents ADD COLUMN hardened BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN hardened BIGINT NOT NULL DEFAULT 0;
