-- The planner (issue 13): follow-up jobs a finished job's rules start, their lineage, and the
-- webhooks `notify` rules send.
--
-- `planned` is 0 while a final job's rules still have to be evaluated (1 for jobs without
-- rules, and for every job stored before this migration). The planner sets it in the same
-- transaction that inserts the children, guarded on 0: a rule creates its child once.
ALTER TABLE jobs ADD COLUMN planned BIGINT NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN parent_job_id TEXT;
ALTER TABLE jobs ADD COLUMN root_job_id TEXT;
ALTER TABLE jobs ADD COLUMN depth BIGINT NOT NULL DEFAULT 0;
-- The parent's rule that made this job: JSON `{"index", "name", "action"}`.
ALTER TABLE jobs ADD COLUMN followup_rule TEXT;
-- A `rerun_failed` child: JSON `{"job_id", "shards"}` (the parent's shard of each of its own).
ALTER TABLE jobs ADD COLUMN rerun_of TEXT;
CREATE INDEX jobs_to_plan ON jobs (planned, state);
CREATE INDEX jobs_by_root ON jobs (root_job_id);
CREATE INDEX jobs_by_parent ON jobs (tenant_id, parent_job_id, created_at);

-- One webhook POST a `notify` rule asked for; its id derives from the job and the rule.
CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    -- `pending`, `delivered`, `failed`.
    state TEXT NOT NULL,
    tries BIGINT NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    -- The coordinator sending it now, and until when.
    owner TEXT,
    owner_until BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX notifications_due ON notifications (state, next_at);
CREATE INDEX notifications_by_job ON notifications (job_id);
