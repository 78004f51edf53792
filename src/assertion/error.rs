//! `AssertionError`: loading keys, signing, and verifying. No variant carries key material; a
//! value that came from a token (a `kid`, an `alg`, an issuer) is cut short before it is kept.

/// Why keys could not be loaded, a token not signed, or a token not verified.
///
/// `position` is the 1-based place of a key in the list (or bundle) it was loaded from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssertionError {
    /// The list of keys was empty.
    #[error("no assertion signing key was given")]
    NoKeys,
    /// An entry is not one PEM private key.
    #[error("assertion key {position}: {reason}")]
    NotPem {
        position: usize,
        reason: &'static str,
    },
    /// A well-formed key of a kind idmap does not sign with (RSA, P-384, ...).
    #[error(
        "assertion key {position}: {kind} keys are not supported; use Ed25519 or ECDSA on P-256"
    )]
    UnsupportedKey { position: usize, kind: String },
    /// A key of a supported kind whose encoding is broken.
    #[error("assertion key {position}: not a valid {kind} private key")]
    InvalidKey { position: usize, kind: &'static str },
    /// The same key was given twice.
    #[error("assertion key {position} repeats an earlier key (kid {kid})")]
    DuplicateKey { position: usize, kid: String },
    /// The claims cannot be signed as they are.
    #[error("assertion claims: {0}")]
    InvalidClaims(&'static str),
    /// Two external ids were given for one namespace.
    #[error("assertion claims: namespace {0:?} has two external ids")]
    DuplicateNamespace(String),
    /// The header or the claims did not encode as JSON.
    #[error("encoding the assertion failed")]
    Encode(#[source] serde_json::Error),
    /// The signing library refused to sign.
    #[error("signing the assertion failed")]
    Sign,
    /// The token is not a compact JWS with a JSON header and JSON claims as idmap makes them.
    #[error("malformed assertion: {0}")]
    Malformed(&'static str),
    /// The JWKS handed to [`verify`](super::verify) is not usable.
    #[error("unusable JWKS: {0}")]
    InvalidJwks(&'static str),
    /// The token's header names no `kid`.
    #[error("assertion header has no kid")]
    MissingKid,
    /// No key of the JWKS has the token's `kid`.
    #[error("assertion signed with unknown key {kid:?}")]
    UnknownKid { kid: String },
    /// The token's `alg` is not the algorithm of the key its `kid` names.
    #[error("assertion alg {alg:?} does not match key {kid:?}, which is {expected}")]
    AlgMismatch {
        kid: String,
        alg: String,
        expected: &'static str,
    },
    /// The signature does not verify with the key.
    #[error("assertion signature does not verify")]
    BadSignature,
    /// The token was issued by someone other than idmap.
    #[error("assertion issuer is {0:?}, not idmap")]
    WrongIssuer(String),
    /// `exp` has passed.
    #[error("assertion expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    /// `iat` is further in the future than clock skew explains.
    #[error("assertion issued in the future at {iat} (now {now})")]
    IssuedInFuture { iat: i64, now: i64 },
}

/// At most this many characters of a value that came from outside are kept in an error.
const MAX_ECHOED_CHARS: usize = 64;

/// `value`, cut to [`MAX_ECHOED_CHARS`], for an error about a token or a PEM label.
pub(super) fn echo(value: &str) -> String {
    match value.char_indices().nth(MAX_ECHOED_CHARS) {
        Some((at, _)) => format!("{}...", &value[..at]),
        None => value.to_owned(),
    }
}
