//! HTTPS on the coordinator's own listener (rustls).
//!
//! `--tls-cert FILE --tls-key FILE` serves the operator's certificate, read again when either
//! file changes (checked at most once a second, on a handshake), so a renewed certificate needs
//! no restart. `--tls auto` makes a private CA and a server certificate signed by it in
//! `DATA/tls/` the first time (`ca.pem` is what clients trust: `--ca-cert DATA/tls/ca.pem`).
//!
//! Handshakes run in tasks of their own (bounded in time), so a slow or silent client holds
//! up no one; the listener hands finished TLS streams to axum.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How the coordinator's listener speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSetting {
    /// The operator's certificate chain and key (PEM).
    Files { cert: PathBuf, key: PathBuf },
    /// A private CA and a certificate for `names` (besides `localhost`, the loopback
    /// addresses and this host's name), made in `DATA/tls/` once.
    Auto { names: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("`{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` holds no {what} in PEM", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("the certificate and key are not usable: {0}")]
    Key(String),
    #[error("could not make the `--tls auto` certificates: {0}")]
    Make(String),
}

/// Where `--tls auto` keeps its files.
pub fn auto_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The certificate and key files to serve: the operator's, or `--tls auto`'s (made now if
/// missing).
pub fn files(
    setting: &TlsSetting,
    data_dir: &Path,
    listen: SocketAddr,
) -> Result<(PathBuf, PathBuf), TlsError> {
    match setting {
        TlsSetting::Files { cert, key } => Ok((cert.clone(), key.clone())),
        TlsSetting::Auto { names } => {
            let dir = auto_dir(data_dir);
            let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
            if !cert.exists() || !key.exists() {
                make_auto(&dir, &auto_names(names, listen))?;
            }
            Ok((cert, key))
        }
    }
}

/// `localhost`, the loopback addresses, this host's name, the address listened on (unless
/// it is `0.0.0.0`/`::`), and the operator's names.
fn auto_names(extra: &[String], listen: SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// The CA in `dir` (`ca.pem`, `ca.key`; the key written mode 0600), made if missing: its
/// certificate and key. An existing CA is kept (clients trust it already).
pub fn ensure_ca(dir: &Path) -> Result<(CertificateDer<'static>, rcgen::KeyPair), TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let make = |e: rcgen::Error| TlsError::Make(e.to_string());
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Read { path, source }
    };
    fs_err::create_dir_all(dir).map_err(io(dir))?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_key_pair = match fs_err::read_to_string(&ca_key) {
        Ok(text) => KeyPair::from_pem(&text).map_err(make)?,
        Err(_) => {
            let k = KeyPair::generate().map_err(make)?;
            crate::write_secret(&ca_key, &k.serialize_pem()).map_err(io(&ca_key))?;
            k
        }
    };
    // The CA's parameters are the same every time, so the kept CA signs as it did.
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(make)?;
    ca.distinguished_name
        .push(DnType::CommonName, "Fleetbox coordinator CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if !ca_pem.exists() {
        let ca_cert = ca.self_signed(&ca_key_pair).map_err(make)?;
        fs_err::write(&ca_pem, ca_cert.pem()).map_err(io(&ca_pem))?;
    }
    let der = CertificateDer::from_pem_slice(&fs_err::read(&ca_pem).map_err(io(&ca_pem))?)
        .map_err(|_| TlsError::Empty {
            path: ca_pem.clone(),
            what: "certificate",
        })?;
    Ok((der, ca_key_pair))
}

/// The CA of `dir` (see [`ensure_ca`]) and a server certificate it signs (`server.pem`,
/// `server.key`) for `names`.
fn make_auto(dir: &Path, names: &[String]) -> Result<(), TlsError> {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let make = |e: rcgen::Error| TlsError::Make(e.to_string());
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Read { path, source }
    };
    let (ca_der, ca_key) = ensure_ca(dir)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(make)?;
    let key = KeyPair::generate().map_err(make)?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(make)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Fleetbox coordinator");
    let cert = params.signed_by(&key, &issuer).map_err(make)?;
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    crate::write_secret(&key_path, &key.serialize_pem()).map_err(io(&key_path))?;
    fs_err::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(())
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        fs_err::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::Empty {
            path: cert.to_path_buf(),
            what: "certificate",
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| TlsError::Empty {
        path: key.to_path_buf(),
        what: "private key",
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(Arc::new(certified))
}

/// The served certificate, read again when its files change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    current: Arc<CertifiedKey>,
    stamp: Option<(SystemTime, SystemTime)>,
    checked: Instant,
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf) -> Result<Reloading, TlsError> {
        let current = load(&cert, &key)?;
        let stamp = stamp(&cert, &key);
        Ok(Reloading {
            cert,
            key,
            state: Mutex::new(Loaded {
                current,
                stamp,
                checked: Instant::now(),
            }),
        })
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut s = self.state.lock().expect("tls state");
        if s.checked.elapsed() >= Duration::from_secs(1) {
            s.checked = Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now != s.stamp {
                // A half-written pair fails to load: keep serving the old one and try again.
                match load(&self.cert, &self.key) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                        s.current = k;
                        s.stamp = now;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed but does not load yet")
                    }
                }
            }
        }
        Some(s.current.clone())
    }
}

/// A rustls server configuration serving `cert`/`key` (reloaded on change), HTTP/1.1; with
/// `clients`, client certificates are asked for and checked by it (`--agent-mtls`).
pub fn server_config(
    cert: PathBuf,
    key: PathBuf,
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = Reloading::new(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let builder = match clients {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How long a client has to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A listener that hands axum finished TLS streams.
pub struct TlsListener {
    streams: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<TlsListener> {
        let addr = tcp.local_addr()?;
        let (tx, streams) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: wait a moment rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { streams, addr })
    }
}

/// Each request over HTTPS carries what the handshake verified of its client.
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for crate::mtls::TlsPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        crate::mtls::TlsPeer::of(stream.io().get_ref().1)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.streams.recv().await {
            Some(s) => s,
            // The accepting task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_makes_a_ca_once_and_a_certificate_that_loads() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let setting = TlsSetting::Auto {
            names: vec!["coord.example".into()],
        };
        let (cert, key) = files(&setting, dir.path(), listen).unwrap();
        load(&cert, &key).unwrap();
        let ca = std::fs::read(auto_dir(dir.path()).join("ca.pem")).unwrap();
        // A new server certificate keeps the CA clients already trust.
        std::fs::remove_file(&cert).unwrap();
        files(&setting, dir.path(), listen).unwrap();
        assert_eq!(
            std::fs::read(auto_dir(dir.path()).join("ca.pem")).unwrap(),
            ca
        );
        use std::os::unix::fs::PermissionsExt;
        for secret in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(auto_dir(dir.path()).join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
    }

    #[test]
    fn a_pair_that_does_not_match_is_refused_with_its_reason() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let auto = TlsSetting::Auto { names: Vec::new() };
        let (cert, _) = files(&auto, a.path(), listen).unwrap();
        let (_, key) = files(&auto, b.path(), listen).unwrap();
        assert!(matches!(load(&cert, &key), Err(TlsError::Key(_))));
        let empty = a.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(load(&empty, &key), Err(TlsError::Empty { .. })));
    }
}
