//! The agent's client certificate, for coordinators with `--agent-mtls`: a TLS key made here,
//! a certificate the coordinator's CA signs for it at enrolment, and a new pair asked for in a
//! heartbeat once half of its life has passed.

use fleetbox_client::Trust;
use fleetbox_proto::api::Certificate;
use serde::{Deserialize, Serialize};

/// A TLS key (PEM) and the certificate the coordinator signed for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentCert {
    pub key_pem: String,
    pub certificate: Certificate,
    /// When it was issued (ms).
    pub obtained_at: i64,
}

impl AgentCert {
    /// Past half its life: time to ask for a new one.
    pub fn due(&self, now: i64) -> bool {
        let life = self.certificate.expires_at - self.obtained_at;
        now >= self.obtained_at + life / 2
    }
}

/// A new TLS key and a certificate signing request for it (PEM each).
pub fn request() -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// What the agent's client trusts and presents: `trust`, with `cert` when it has one.
pub fn trust_with(trust: &Trust, cert: Option<&AgentCert>) -> Trust {
    let Some(c) = cert else {
        return trust.clone();
    };
    trust
        .presenting(&c.certificate.pem, &c.key_pem)
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "the client certificate does not load; calls go without it");
            trust.clone()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_loads_and_a_certificate_is_due_at_half_its_life() {
        let (key, csr) = request().unwrap();
        assert!(key.contains("PRIVATE KEY") && csr.contains("CERTIFICATE REQUEST"));
        let c = AgentCert {
            key_pem: key,
            certificate: Certificate {
                pem: String::new(),
                expires_at: 1_000,
            },
            obtained_at: 0,
        };
        assert!(!c.due(499));
        assert!(c.due(500));
    }
}
