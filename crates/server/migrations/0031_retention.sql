-- Retention (issue 35): finished jobs older than `--retain` are deleted with their shards,
-- attempts and leases, and the blobs nothing names any more with them.
--
-- `job_blobs` says which job named which blob for which tenant; it is written with the owner
-- row (in the report's, the check's or the fold's transaction). A pruned job's rows go, and a
-- tenant's owner row goes when no job of the tenant names the blob any more; a blob goes when
-- no tenant owns it. Owner rows from before this migration (`tracked = 0`) are never released:
-- the jobs that named them are not all known.
CREATE TABLE job_blobs (
    tenant_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, sha256, job_id)
);
CREATE INDEX job_blobs_by_job ON job_blobs (job_id);
ALTER TABLE blob_owners ADD COLUMN tracked BIGINT NOT NULL DEFAULT 0;
CREATE INDEX blob_owners_by_sha ON blob_owners (sha256);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX sessions_ended ON sessions (ended_at) WHERE ended_at IS NOT NULL;
