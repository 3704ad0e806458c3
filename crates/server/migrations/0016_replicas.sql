-- Replicas (issue 11): a shard of a job with `verify.replicas` > 1 runs on distinct agents
-- until `quorum` results agree. The lease query reads the count from the task itself.
ALTER TABLE tasks ADD COLUMN replicas BIGINT NOT NULL DEFAULT 1;
-- The machine an agent runs on (`/etc/machine-id`, or `--machine-id`): two replicas of one
-- shard go to agents on different machines whenever an agent on another machine can take it.
ALTER TABLE agents ADD COLUMN machine_id TEXT;
