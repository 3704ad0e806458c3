//! Client certificates for agents (`--agent-mtls`).
//!
//! Enrolment signs the agent's certificate request with the coordinator's CA (`DATA/tls/`,
//! the one `--tls auto` makes), naming the agent. The HTTPS listener then asks every client for
//! a certificate: users (CLI, SDK, panel) present none and are served as before; an agent's
//! certificate must chain to the CA and must not be on the CRL, or the handshake fails. Agent
//! endpoints called over HTTPS need the certificate issued to the calling agent, so a stolen
//! agent token is useless without the agent's private key.
//!
//! Revoking an agent marks its certificates in the database; every coordinator reads the
//! revoked ones each second, rebuilds its CRL and the verifier that checks it (new
//! handshakes), and refuses them on connections already open (each request checks the
//! connection's certificate against the revoked set).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::ids::sha256_hex;
use crate::store::{RevokedCert, StoreError};
use crate::tls::TlsError;

/// How long an agent's certificate lasts. Revocation, not expiry, is what cuts an agent off;
/// the agent asks for a new one when half of this has passed (see the agent's `tls` module).
pub const CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The CA that signs agents' certificates, and what the listener checks them against.
pub struct AgentMtls {
    issuer: Issuer<'static, KeyPair>,
    verifier: Arc<AgentVerifier>,
    /// Fingerprints of revoked certificates, as last read.
    revoked: RwLock<HashSet<String>>,
    /// What the CRL was built from, to rebuild it only when that changes.
    crl_of: Mutex<Vec<RevokedCert>>,
    /// fingerprint → agent, for certificates seen (a certificate's agent never changes).
    known: Mutex<HashMap<String, String>>,
}

/// Why an agent's certificate request was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("not a certificate request in PEM: {0}")]
    NotARequest(#[source] rcgen::Error),
    #[error("no randomness for a serial number: {0}")]
    Random(String),
    #[error("could not sign the request: {0}")]
    Sign(#[source] rcgen::Error),
}

/// A certificate signed for an agent.
#[derive(Debug, Clone)]
pub struct Signed {
    pub pem: String,
    pub fingerprint: String,
    pub serial: String,
    pub expires_at: i64,
}

impl AgentMtls {
    /// The CA in `dir` (made there if missing, as `--tls auto` would).
    pub fn open(dir: &Path) -> Result<AgentMtls, TlsError> {
        let (ca_der, key) = crate::tls::ensure_ca(dir)?;
        let make = |e: rcgen::Error| TlsError::Make(e.to_string());
        let issuer = Issuer::from_ca_cert_der(&ca_der, key).map_err(make)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca_der.clone())
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let empty = crl(&issuer, &[]).map_err(make)?;
        let verifier = AgentVerifier::new(Arc::new(roots), empty)?;
        Ok(AgentMtls {
            issuer,
            verifier: Arc::new(verifier),
            revoked: RwLock::default(),
            crl_of: Mutex::default(),
            known: Mutex::default(),
        })
    }

    pub fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.verifier.clone()
    }

    /// Sign `csr_pem` for `agent_id`: only the request's key is used; the name (the agent's
    /// id), usage (client authentication) and lifetime are the coordinator's.
    pub fn sign(&self, csr_pem: &str, agent_id: &str) -> Result<Signed, SignError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(SignError::NotARequest)?;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| SignError::Random(e.to_string()))?;
        serial[0] &= 0x7f; // positive
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, agent_id);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + CERT_LIFETIME;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(SignError::Sign)?;
        let expires_at = crate::store::now_ms() + CERT_LIFETIME.as_millis() as i64;
        Ok(Signed {
            pem: cert.pem(),
            fingerprint: sha256_hex(cert.der()),
            serial: hex::encode(serial),
            expires_at,
        })
    }

    /// Take the revoked certificates as read from the database: a new CRL and verifier when
    /// they changed.
    pub fn set_revoked(&self, revoked: Vec<RevokedCert>) -> Result<(), TlsError> {
        let mut of = self.crl_of.lock().expect("crl");
        if *of == revoked {
            return Ok(());
        }
        let list = crl(&self.issuer, &revoked).map_err(|e| TlsError::Make(e.to_string()))?;
        self.verifier.set_crl(list)?;
        *self.revoked.write().expect("revoked") =
            revoked.iter().map(|r| r.fingerprint.clone()).collect();
        tracing::info!(
            revoked = revoked.len(),
            "agent certificate revocation list updated"
        );
        *of = revoked;
        Ok(())
    }

    /// Whether the certificate `fingerprint` was issued to `agent_id` and is not revoked;
    /// the database is asked once per certificate.
    pub async fn belongs_to(
        &self,
        store: &crate::store::Store,
        fingerprint: &str,
        agent_id: &str,
    ) -> Result<bool, StoreError> {
        if self.revoked.read().expect("revoked").contains(fingerprint) {
            return Ok(false);
        }
        let known = self.known.lock().expect("known").get(fingerprint).cloned();
        let owner = match known {
            Some(a) => a,
            None => match store.agent_cert(fingerprint).await? {
                Some((_, true)) => return Ok(false),
                Some((a, false)) => {
                    self.known
                        .lock()
                        .expect("known")
                        .insert(fingerprint.to_string(), a.clone());
                    a
                }
                None => return Ok(false),
            },
        };
        Ok(owner == agent_id)
    }
}

/// A CRL of `revoked`, valid for a day (rebuilt each time the list changes, and at start).
fn crl(
    issuer: &Issuer<'static, KeyPair>,
    revoked: &[RevokedCert],
) -> Result<CertificateRevocationListDer<'static>, rcgen::Error> {
    let now = time::OffsetDateTime::now_utc();
    let revoked_certs = revoked
        .iter()
        .filter_map(|r| {
            let serial = hex::decode(&r.serial).ok()?;
            Some(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(r.revoked_at / 1000)
                    .unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + time::Duration::days(1),
        crl_number: SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.into())
}

/// rustls' WebPKI client verifier for the CA and the current CRL, swapped when the CRL
/// changes. Clients without a certificate are let through (users); the endpoints decide.
#[derive(Debug)]
pub struct AgentVerifier {
    roots: Arc<RootCertStore>,
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl AgentVerifier {
    fn new(
        roots: Arc<RootCertStore>,
        crl: CertificateRevocationListDer<'static>,
    ) -> Result<AgentVerifier, TlsError> {
        let current = build(&roots, crl)?;
        Ok(AgentVerifier {
            hints: current.root_hint_subjects().to_vec(),
            roots,
            current: RwLock::new(current),
        })
    }

    fn set_crl(&self, crl: CertificateRevocationListDer<'static>) -> Result<(), TlsError> {
        let next = build(&self.roots, crl)?;
        *self.current.write().expect("verifier") = next;
        Ok(())
    }

    fn now(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().expect("verifier").clone()
    }
}

fn build(
    roots: &Arc<RootCertStore>,
    crl: CertificateRevocationListDer<'static>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
        .with_crls([crl])
        .only_check_end_entity_revocation()
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Key(e.to_string()))
}

impl ClientCertVerifier for AgentVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.now()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.now().supported_verify_schemes()
    }
}

/// Read the revoked certificates every second until the coordinator stops.
pub async fn follow_revocations(
    state: Arc<crate::State>,
    mtls: Arc<AgentMtls>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match state.store.revoked_agent_certs().await {
            Ok(list) => {
                if let Err(e) = mtls.set_revoked(list) {
                    tracing::error!(error = %e, "could not rebuild the agent CRL");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read revoked agent certificates"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// What the TLS listener knows of a connection: the sha256 of the client certificate it
/// presented (verified by the handshake), if any.
#[derive(Debug, Clone, Default)]
pub struct TlsPeer {
    pub cert_sha256: Option<String>,
}

impl TlsPeer {
    pub fn of(conn: &rustls::ServerConnection) -> TlsPeer {
        TlsPeer {
            cert_sha256: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| sha256_hex(c.as_ref())),
        }
    }
}
