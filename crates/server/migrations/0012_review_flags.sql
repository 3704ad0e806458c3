-- The review queue (issue 12): what the AI-control stage flagged for a person, and what was
-- decided. A job the code review holds is `pending_review`, its shards not leasable
-- (`not_before` far ahead), until its flag is approved (it runs) or rejected (cancelled).
CREATE TABLE review_flags (
    id {serial_pk},
    tenant_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    details TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    decided_at BIGINT,
    decided_by TEXT,
    note TEXT
);
CREATE INDEX review_flags_by_status ON review_flags (tenant_id, status, id);
CREATE INDEX review_flags_by_job ON review_flags (job_id);
