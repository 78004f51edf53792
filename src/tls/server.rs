//! TLS on idmap's own listeners: the certificate and key (and the CA that signs client
//! certificates, for mTLS), re-read when the files change, and the identity a client
//! certificate carries.
//!
//! cert-manager and the SPIFFE helpers rotate certificates by rewriting the files in place (or
//! swapping the symlink a Secret volume mounts), so the files are compared by content on every
//! check, not by a file-system event that a symlink swap may not raise. A handshake takes the
//! configuration current when it starts; a connection keeps the certificate it was made with, so
//! a rotation drops nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use x509_cert::der::Decode;
use x509_cert::der::oid::AssociatedOid;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::provider;

/// The PEM files of a listener's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates must be signed by one of these CAs (mTLS); `None`: none are asked for.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS files cannot be used. Never holds key material, only paths and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM {what}: {problem}")]
    Pem {
        path: String,
        what: &'static str,
        problem: String,
    },
    #[error("the TLS configuration is not usable: {0}")]
    Config(String),
}

/// The CAs in the PEM file at `path`, as trust anchors.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    roots(path, &read(path)?)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |problem: String| TlsError::Pem {
        path: path.display().to_string(),
        what: "certificate",
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no CERTIFICATE block found".to_owned()));
    }
    Ok(certs)
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, pem)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            what: "CA certificate",
            problem: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        what: "private key",
        problem: e.to_string(),
    })
}

/// The configurations built from one reading of the files.
struct Loaded {
    /// What the files held, to tell a change.
    contents: Vec<Vec<u8>>,
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

/// TLS for the gRPC and HTTP listeners, from one set of files.
pub struct ServerTls {
    files: ServerTlsFiles,
    loaded: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files: a certificate without its key, or a CA file without a CA,
    /// fails here, at start-up.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let contents = Self::read_all(&files)?;
        let loaded = Self::build(&files, contents)?;
        Ok(Self {
            files,
            loaded: RwLock::new(Arc::new(loaded)),
        })
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-reads the files; `Ok(true)` when they changed and new handshakes now use them. A
    /// failure (a rotation caught half-written, say) keeps the configuration in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let contents = Self::read_all(&self.files)?;
        if self.current().contents == contents {
            return Ok(false);
        }
        let loaded = Self::build(&self.files, contents)?;
        *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
        Ok(true)
    }

    /// Re-reads the files every `interval` until `stop` resolves, logging what changed.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut stop = std::pin::pin!(stop);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticks.tick() => {}
            }
            match self.reload() {
                Ok(changed) => {
                    if changed {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded; new connections use it");
                    }
                    failing = false;
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "TLS files changed but cannot be used; still serving the previous certificate");
                }
                Err(_) => {}
            }
        }
    }

    /// The acceptor for a gRPC connection (ALPN h2), with the configuration current now.
    pub fn grpc_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().grpc.clone())
    }

    /// The acceptor for an HTTP/1.1 connection. It asks for no client certificate: the callers of
    /// that listener are Ory's webhooks, which authenticate with their own secret, and probes.
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().http.clone())
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn read_all(files: &ServerTlsFiles) -> Result<Vec<Vec<u8>>, TlsError> {
        let mut contents = vec![read(&files.cert)?, read(&files.key)?];
        if let Some(ca) = &files.client_ca {
            contents.push(read(ca)?);
        }
        Ok(contents)
    }

    fn build(files: &ServerTlsFiles, contents: Vec<Vec<u8>>) -> Result<Loaded, TlsError> {
        let chain = certificates(&files.cert, &contents[0])?;
        let key = key(&files.key, &contents[1])?;
        let client_verifier = match (&files.client_ca, contents.get(2)) {
            (Some(path), Some(pem)) => Some(
                WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(path, pem)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?,
            ),
            _ => None,
        };
        let config = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
                      alpn: &[u8]|
         -> Result<Arc<ServerConfig>, TlsError> {
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            let builder = match verifier {
                Some(verifier) => builder.with_client_cert_verifier(verifier),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| {
                    TlsError::Config(format!(
                        "{} and {}: {e}",
                        files.cert.display(),
                        files.key.display()
                    ))
                })?;
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        Ok(Loaded {
            grpc: config(client_verifier, b"h2")?,
            http: config(None, b"http/1.1")?,
            contents,
        })
    }
}

/// What a verified client certificate says of its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    /// URI SANs: SPIFFE ids.
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    /// The subject's distinguished name, for logs.
    pub subject: String,
}

impl PeerCertificate {
    /// The identity in the leaf certificate a client presented (and the verifier accepted),
    /// if it presented one.
    pub fn of(connection: &rustls::ServerConnection) -> Option<Self> {
        let leaf = connection.peer_certificates()?.first()?;
        Self::parse(leaf)
    }

    fn parse(der: &[u8]) -> Option<Self> {
        let cert = x509_cert::Certificate::from_der(der).ok()?;
        let mut peer = Self {
            subject: cert.tbs_certificate.subject.to_string(),
            ..Self::default()
        };
        let extensions = cert.tbs_certificate.extensions.iter().flatten();
        for extension in extensions {
            if extension.extn_id != SubjectAltName::OID {
                continue;
            }
            let Ok(names) = SubjectAltName::from_der(extension.extn_value.as_bytes()) else {
                continue;
            };
            for name in names.0 {
                match name {
                    GeneralName::UniformResourceIdentifier(uri) => {
                        peer.uris.push(uri.as_str().to_owned());
                    }
                    GeneralName::DnsName(dns) => peer.dns_names.push(dns.as_str().to_owned()),
                    _ => {}
                }
            }
        }
        Some(peer)
    }
}
