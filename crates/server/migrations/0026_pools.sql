-- Agent pools and fair shares (issue 33).
--
-- A pool is owned by a tenant; a shared pool (owned by the operator's `default` tenant) serves
-- every tenant, a private one only its owner. Agents join the pool of the enrolment token they
-- enrol with. A shard may name the pool it must run in (`tasks.pool`, from the spec's `pool`);
-- NULL: any pool its tenant may use. Leases from a shared pool go to the tenant with the fewest
-- running shards for its `weight` (see `store/fair.rs`).
CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    shared BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
INSERT INTO pools (name, tenant_id, shared, created_at) VALUES ('default', 'default', 1, 0);
INSERT INTO pools (name, tenant_id, shared, created_at)
    SELECT id, id, 0, created_at FROM tenants WHERE id <> 'default';
ALTER TABLE agents ADD COLUMN pool TEXT NOT NULL DEFAULT 'default';
UPDATE agents SET pool = tenant_id WHERE tenant_id <> 'default';
ALTER TABLE tokens ADD COLUMN pool TEXT;
ALTER TABLE tasks ADD COLUMN pool TEXT;
ALTER TABLE tenants ADD COLUMN weight BIGINT NOT NULL DEFAULT 1;
-- Each lease from a shared pool counts the running shards of every tenant with work.
CREATE INDEX tasks_leased_by_tenant ON tasks (tenant_id) WHERE state = 'leased';
