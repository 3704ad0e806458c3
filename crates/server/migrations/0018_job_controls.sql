-- Operators' controls (issue 17): a paused job's queued shards are not leased (its running
-- shards finish, their retries wait) until it is resumed.
ALTER TABLE jobs ADD COLUMN paused BIGINT NOT NULL DEFAULT 0;
