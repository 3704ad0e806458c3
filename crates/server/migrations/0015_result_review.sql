-- Result review (issue 12) compares shards' CPU as well as run time, memory and output size.
ALTER TABLE attempts ADD COLUMN cpu_ms BIGINT NOT NULL DEFAULT 0;
-- A flag whose shards a person asked to run again (`status = 'rerun'`) names the job doing it.
ALTER TABLE review_flags ADD COLUMN rerun_job_id TEXT;
