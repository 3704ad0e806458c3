-- Client certificates of agents (`--agent-mtls`, issue 33).
--
-- Each certificate the coordinator's CA signs for an agent, by the sha256 of its DER (what a
-- connection presents) and its serial (what the CRL names). Revoking an agent sets
-- `revoked_at` on its certificates; every coordinator sharing the database reads the revoked
-- ones each second into its CRL and refuses them, on new connections and open ones.
CREATE TABLE agent_certs (
    fingerprint TEXT PRIMARY KEY,
    serial TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX agent_certs_revoked ON agent_certs (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX agent_certs_by_agent ON agent_certs (agent_id);
