-- Tenants and scoped, short-lived credentials (issue 33).
--
-- A tenant's caps: NULL is no cap. `submit_rate` is submissions a second (a token bucket per
-- coordinator, burst of one second's worth but at least one).
ALTER TABLE tenants ADD COLUMN max_running_shards BIGINT;
ALTER TABLE tenants ADD COLUMN max_shards_per_day BIGINT;
ALTER TABLE tenants ADD COLUMN max_cpu_seconds_per_day BIGINT;
ALTER TABLE tenants ADD COLUMN submit_rate DOUBLE PRECISION;
ALTER TABLE tenants ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;

-- A token's public id (the first 12 hex digits of its hash for tokens made before this
-- migration; a random one since), its name, its scopes (comma-separated; NULL for the kinds
-- that have none: enroll, agent), when it stops working, when it was revoked, and for
-- enrolment tokens how many enrolments it has left (NULL: unbounded).
ALTER TABLE tokens ADD COLUMN id TEXT;
ALTER TABLE tokens ADD COLUMN name TEXT;
ALTER TABLE tokens ADD COLUMN scopes TEXT;
ALTER TABLE tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE tokens ADD COLUMN revoked_at BIGINT;
ALTER TABLE tokens ADD COLUMN uses_left BIGINT;
ALTER TABLE tokens ADD COLUMN created_by TEXT;
UPDATE tokens SET id = substr(hash, 1, 12);
UPDATE tokens SET scopes = 'read,submit,review,admin' WHERE kind = 'admin';
CREATE UNIQUE INDEX tokens_by_id ON tokens (id);
CREATE INDEX tokens_by_tenant ON tokens (tenant_id, created_at);

-- A tenant's CPU seconds of the last day are summed at every submission and lease.
CREATE INDEX attempts_by_tenant_time ON attempts (tenant_id, received_at);

-- Blobs are stored once by content, but read per tenant: a tenant may download a blob only if
-- it owns it (its agent uploaded it, its report or result stored it). Knowing a hash is not
-- enough. Blobs stored before this migration are owned by the tenants whose rows name them.
CREATE TABLE blob_owners (
    tenant_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, sha256)
);
INSERT INTO blob_owners (tenant_id, sha256, created_at)
    SELECT DISTINCT tenant_id, stdout_blob, 0 FROM attempts WHERE stdout_blob IS NOT NULL
    ON CONFLICT DO NOTHING;
INSERT INTO blob_owners (tenant_id, sha256, created_at)
    SELECT DISTINCT tenant_id, stderr_blob, 0 FROM attempts WHERE stderr_blob IS NOT NULL
    ON CONFLICT DO NOTHING;
INSERT INTO blob_owners (tenant_id, sha256, created_at)
    SELECT DISTINCT tenant_id, output_blob, 0 FROM attempts WHERE output_blob IS NOT NULL
    ON CONFLICT DO NOTHING;
INSERT INTO blob_owners (tenant_id, sha256, created_at)
    SELECT DISTINCT tenant_id, result_blob, 0 FROM jobs WHERE result_blob IS NOT NULL
    ON CONFLICT DO NOTHING;
