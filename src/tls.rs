//! TLS set-up shared by every outgoing HTTPS client.

/// reqwest is built without a bundled crypto provider (the default one, aws-lc, needs cmake to
/// build); install ring's once per process before the first client is built.
pub fn install_crypto_provider() {
    // Fails only when a provider is installed already, which is what we want either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
