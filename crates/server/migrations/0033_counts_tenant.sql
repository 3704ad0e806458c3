-- Every table holding a tenant's data names the tenant (issue 33): a job's shard counters were
-- the one exception. With `--tenant-schemas` each of these tables is partitioned by tenant, and
-- a row must say which partition it belongs to.
ALTER TABLE job_counts ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
UPDATE job_counts SET tenant_id = (SELECT j.tenant_id FROM jobs j WHERE j.id = job_counts.job_id);
