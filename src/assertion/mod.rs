//! Signed identity assertions: a JWT that idmap puts next to the identity headers it forwards, so
//! that an upstream service can check that those headers came from idmap and not from a caller.
//!
//! - [`AssertionKeys`] holds idmap's signing keys, read from PEM (Ed25519, or ECDSA on P-256).
//!   Several keys allow rotation: the first signs, all are published in [`AssertionKeys::jwks`].
//!   Each key's `kid` is its RFC 7638 JWK thumbprint, so replicas holding the same keys agree on
//!   the kids without talking to each other.
//! - [`AssertionClaims`] is the payload: the internal user id (`sub`), the Ory identity and
//!   session, the external ids by namespace, and the validity window.
//! - [`verify`] is what an upstream does with a token: pick the key by `kid` from idmap's JWKS,
//!   insist that the token's `alg` is that key's algorithm, check the signature, then the issuer
//!   and the validity window. The tests use it; it is also the reference for upstream
//!   implementations.
//!
//! Private key material never leaves this module: not in `Debug` output, not in an error.
//! This module imports nothing else of idmap: the caller turns its domain values into strings.

mod claims;
mod error;
mod keys;
mod pem;
mod verify;

pub use claims::{AssertionClaims, DEFAULT_NAMESPACE, ISSUER};
pub use error::AssertionError;
pub use keys::AssertionKeys;
pub use verify::{CLOCK_SKEW_SECS, verify};

/// A JWS signature algorithm idmap signs assertions with (RFC 7518 / RFC 8037 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Ed25519 (`"EdDSA"`, RFC 8037).
    EdDsa,
    /// ECDSA on P-256 with SHA-256 (`"ES256"`), the signature as 64 bytes `r || s`.
    Es256,
}

impl Algorithm {
    /// The `alg` value of a JWS header and a JWK.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::EdDsa => "EdDSA",
            Algorithm::Es256 => "ES256",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests;
