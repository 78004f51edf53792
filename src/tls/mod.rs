//! TLS with rustls and ring, for every connection idmap makes or accepts: the HTTPS clients
//! (Ory), the listeners (`server.rs`: certificates re-read when they change, client certificates
//! and the caller identity they carry) and PostgreSQL (`client.rs`: the verifications libpq's
//! `sslmode`s ask for).
//!
//! ring rather than rustls's default aws-lc: aws-lc-sys needs cmake to build, and every TLS
//! configuration here names its provider, so nothing depends on a process-wide default.

mod client;
mod server;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use client::{ServerVerification, client_config};
pub use server::{PeerCertificate, ServerTls, ServerTlsFiles, TlsError, read_roots};

/// reqwest is built without a bundled crypto provider; install ring's once per process before the
/// first client is built.
pub fn install_crypto_provider() {
    // Fails only when a provider is installed already, which is what we want either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The provider every TLS configuration of idmap is built with.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
