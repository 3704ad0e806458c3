-- Per-state shard counters per job (issue 8): the job view and the fold read one row instead
-- of counting tasks. Changed only by the settle module, last in the transaction of each
-- transition. They replace `jobs.unsettled` (= queued + leased + reported).
CREATE TABLE job_counts (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    queued BIGINT NOT NULL DEFAULT 0,
    leased BIGINT NOT NULL DEFAULT 0,
    reported BIGINT NOT NULL DEFAULT 0,
    accepted BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    dead BIGINT NOT NULL DEFAULT 0
);
INSERT INTO job_counts (job_id, queued, leased, reported, accepted, rejected, dead)
SELECT j.id,
    (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'queued'),
    (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'leased'),
    (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'reported'),
    (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'accepted'),
    (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'rejected'),
    (SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state = 'dead')
FROM jobs j;
ALTER TABLE jobs DROP COLUMN unsettled;
