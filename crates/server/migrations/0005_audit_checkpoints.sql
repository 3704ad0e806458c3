-- Signed checkpoints of each tenant's audit chain head (issue 10): a copy of the log can be
-- checked against a checkpoint kept elsewhere. Each names the key that signed it.
CREATE TABLE audit_checkpoints (
    tenant_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    chain TEXT NOT NULL,
    at BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);
