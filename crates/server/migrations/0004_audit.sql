-- The audit log (issue 10): append-only, one hash chain per tenant (RFC 6962 style:
-- leaf = SHA-256(0x00 || canonical entry), chain = SHA-256(0x01 || previous chain || leaf)).
-- Entries are written in the transaction of the change they record; rows are never updated.
CREATE TABLE audit (
    tenant_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    job_id TEXT,
    task_id BIGINT,
    lease_id TEXT,
    agent_id TEXT,
    details TEXT NOT NULL,
    leaf TEXT NOT NULL,
    chain TEXT NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);
CREATE INDEX audit_job ON audit (job_id);
CREATE INDEX audit_agent ON audit (agent_id);
-- The head of each tenant's chain: its row lock serializes appends across coordinators.
CREATE TABLE audit_heads (
    tenant_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    chain TEXT NOT NULL
);
