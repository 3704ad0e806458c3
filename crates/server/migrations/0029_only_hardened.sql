-- Agents that ask only for server-only shards (the coordinator's own server agents), as their
-- last lease call said: a shard every ordinary agent refused is rejected rather than kept for
-- one of them, which would never lease it.
ALTER TABLE agents ADD COLUMN only_hardened BIGINT NOT NULL DEFAULT 0;
