-- Signed records of audit prunes (issue 31): a log that starts after entry 1 verifies only
-- when a prune signed by a pinned key covers the entries before it. Deleting old entries with
-- the database alone is no longer a prune.
CREATE TABLE audit_prunes (
    tenant_id TEXT NOT NULL,
    before_seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (tenant_id, before_seq)
);
