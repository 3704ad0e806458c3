-- Server re-checks that failed (the coordinator's sandbox, its environment, a missing subject):
-- retried a bounded number of times, then the shard is settled `inconclusive` with a flag
-- (issue 31), rather than retried every 15 s forever.
ALTER TABLE tasks ADD COLUMN check_failures BIGINT NOT NULL DEFAULT 0;
