-- Fleetbox schema v1, for SQLite and PostgreSQL. Every table carries tenant_id; timestamps are
-- Unix milliseconds. `{serial_pk}` is the one dialect difference (see `DbKind::dialect`).
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
INSERT INTO tenants (id, name, created_at) VALUES ('default', 'default', 0);

CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    kind TEXT NOT NULL,
    agent_id TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    slots BIGINT NOT NULL,
    facts TEXT NOT NULL,
    load TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    trust BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    code TEXT NOT NULL,
    code_sha256 TEXT NOT NULL,
    limits TEXT NOT NULL,
    reducer TEXT NOT NULL,
    priority BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    shard_count BIGINT NOT NULL,
    unsettled BIGINT NOT NULL,
    result TEXT,
    result_blob TEXT,
    summary TEXT,
    error TEXT,
    review TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, created_at);
CREATE INDEX jobs_by_state ON jobs (state);

CREATE TABLE tasks (
    id {serial_pk},
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    job_id TEXT NOT NULL REFERENCES jobs(id),
    shard_index BIGINT NOT NULL,
    state TEXT NOT NULL,
    priority BIGINT NOT NULL,
    input TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    not_before BIGINT NOT NULL DEFAULT 0,
    lease_id TEXT,
    agent_id TEXT,
    lease_expires BIGINT,
    last_error TEXT,
    updated_at BIGINT NOT NULL,
    UNIQUE (job_id, shard_index)
);
CREATE INDEX tasks_ready ON tasks (tenant_id, priority DESC, id) WHERE state = 'queued';
CREATE INDEX tasks_leased ON tasks (lease_expires) WHERE state = 'leased';
CREATE INDEX tasks_by_lease ON tasks (lease_id);

CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    task_id BIGINT NOT NULL,
    agent_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    issued_at BIGINT NOT NULL
);
CREATE INDEX leases_by_task ON leases (task_id);

CREATE TABLE attempts (
    id {serial_pk},
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    task_id BIGINT NOT NULL,
    job_id TEXT NOT NULL,
    lease_id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    status TEXT NOT NULL,
    verdict TEXT NOT NULL DEFAULT 'unchecked',
    chosen BIGINT NOT NULL DEFAULT 0,
    late BIGINT NOT NULL DEFAULT 0,
    output TEXT,
    output_blob TEXT,
    output_sha256 TEXT,
    report TEXT NOT NULL,
    stdout_blob TEXT,
    stderr_blob TEXT,
    wall_ms BIGINT NOT NULL,
    peak_memory BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    signature TEXT,
    received_at BIGINT NOT NULL
);
CREATE INDEX attempts_by_task ON attempts (task_id);
CREATE INDEX attempts_by_job ON attempts (job_id, chosen);
