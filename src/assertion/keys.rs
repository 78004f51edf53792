//! `AssertionKeys`: idmap's signing keys, read from PEM, their JWKS, and signing.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
// The `signature` traits, one crate for both key types.
use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::sec1::ToSec1Point as _;
use p256::pkcs8::{ObjectIdentifier, PrivateKeyInfoRef, SecretDocument};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::Algorithm;
use super::claims::AssertionClaims;
use super::error::{AssertionError, echo};
use super::pem::{self, BlockError, EC_PARAMETERS};

/// Ed25519 in PKCS#8 (RFC 8410).
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// `id-ecPublicKey`: an EC key whose curve is the algorithm's parameter.
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// The curve P-256 (`prime256v1`, `secp256r1`).
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// Keys that are refused by name rather than by number.
const KNOWN_UNSUPPORTED: &[(&str, &str)] = &[
    ("1.2.840.113549.1.1.1", "RSA"),
    ("1.2.840.113549.1.1.10", "RSA-PSS"),
    ("1.2.840.10040.4.1", "DSA"),
    ("1.3.101.110", "X25519"),
    ("1.3.101.111", "X448"),
    ("1.3.101.113", "Ed448"),
];

/// Curves that are refused by name rather than by number.
const KNOWN_CURVES: &[(&str, &str)] = &[
    ("1.3.132.0.34", "P-384"),
    ("1.3.132.0.35", "P-521"),
    ("1.3.132.0.10", "secp256k1"),
];

/// idmap's assertion signing keys: the first signs, all are published.
///
/// Replicas given the same keys in the same order sign with the same key and publish the same
/// JWKS. To rotate: add the new key second (published, not yet signing), wait until upstreams
/// have fetched the JWKS, move it first, and drop the old key once its tokens have expired.
#[derive(Clone)]
pub struct AssertionKeys {
    /// Never empty; `keys[0]` signs.
    keys: Vec<Key>,
}

#[derive(Clone)]
struct Key {
    /// RFC 7638 thumbprint of the public key.
    kid: String,
    secret: Secret,
    public: PublicJwk,
}

#[derive(Clone)]
enum Secret {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

/// The public half, as the base64url members of its JWK.
#[derive(Clone)]
enum PublicJwk {
    Okp { x: String },
    Ec { x: String, y: String },
}

impl AssertionKeys {
    /// Keys from PEM private keys, one key an entry: Ed25519 in PKCS#8 (`BEGIN PRIVATE KEY`), or
    /// ECDSA on P-256 in PKCS#8 or SEC1 (`BEGIN EC PRIVATE KEY`, an `EC PARAMETERS` block before
    /// it is allowed). The first entry signs.
    ///
    /// # Errors
    /// [`AssertionError::NoKeys`] for an empty list; for an entry that is not one PEM private key
    /// of a supported kind, an error naming its position (and the kind, if it is recognised),
    /// never its content; [`AssertionError::DuplicateKey`] when a key is given twice.
    pub fn from_pem<S: AsRef<str>>(pems: &[S]) -> Result<AssertionKeys, AssertionError> {
        let mut keys = Vec::with_capacity(pems.len());
        for (at, entry) in pems.iter().enumerate() {
            let position = at + 1;
            let blocks = key_blocks(entry.as_ref(), position)?;
            match blocks.as_slice() {
                [block] => keys.push(Key::from_block(*block, position)?),
                [] => {
                    return Err(AssertionError::NotPem {
                        position,
                        reason: "no PEM block (expected -----BEGIN PRIVATE KEY-----)",
                    });
                }
                _ => {
                    return Err(AssertionError::NotPem {
                        position,
                        reason: "more than one PEM key in one entry; give one key per entry, or load the text as a bundle",
                    });
                }
            }
        }
        AssertionKeys::from_keys(keys)
    }

    /// Keys from one text holding several PEM private keys one after the other (as one
    /// environment variable may); the first key signs. Positions in errors count the keys of the
    /// bundle.
    ///
    /// # Errors
    /// As [`AssertionKeys::from_pem`].
    pub fn from_pem_bundle(text: &str) -> Result<AssertionKeys, AssertionError> {
        let keys = key_blocks(text, 1)?
            .into_iter()
            .enumerate()
            .map(|(at, block)| Key::from_block(block, at + 1))
            .collect::<Result<Vec<_>, _>>()?;
        AssertionKeys::from_keys(keys)
    }

    fn from_keys(keys: Vec<Key>) -> Result<AssertionKeys, AssertionError> {
        if keys.is_empty() {
            return Err(AssertionError::NoKeys);
        }
        for (at, key) in keys.iter().enumerate() {
            if keys[..at].iter().any(|earlier| earlier.kid == key.kid) {
                return Err(AssertionError::DuplicateKey {
                    position: at + 1,
                    kid: key.kid.clone(),
                });
            }
        }
        Ok(AssertionKeys { keys })
    }

    /// The `kid` of the key that signs.
    pub fn signing_kid(&self) -> &str {
        &self.signing_key().kid
    }

    /// The algorithm of the key that signs.
    pub fn signing_algorithm(&self) -> Algorithm {
        self.signing_key().algorithm()
    }

    /// Every key's `kid` and algorithm, the signing key first.
    pub fn kids(&self) -> impl ExactSizeIterator<Item = (&str, Algorithm)> + '_ {
        self.keys
            .iter()
            .map(|key| (key.kid.as_str(), key.algorithm()))
    }

    /// The public keys as a JWK Set (`{"keys":[...]}`), the signing key first, each with its
    /// `kid`, `alg` and `"use":"sig"`.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self.keys.iter().map(Key::jwk).collect();
        serde_json::json!({ "keys": keys })
    }

    /// `claims` as a compact JWS, signed with the first key; its header is
    /// `{"alg":"EdDSA"|"ES256","typ":"JWT","kid":...}`.
    ///
    /// # Errors
    /// [`AssertionError::InvalidClaims`] for claims that should not be signed (`exp` not after
    /// `iat`, an issuer other than idmap, no `sub`); [`AssertionError::Encode`] or
    /// [`AssertionError::Sign`] if the libraries fail.
    pub fn sign(&self, claims: &AssertionClaims) -> Result<String, AssertionError> {
        claims.check()?;
        let key = self.signing_key();
        let header = Header {
            alg: key.algorithm().as_str(),
            typ: "JWT",
            kid: &key.kid,
        };
        let header = serde_json::to_vec(&header).map_err(AssertionError::Encode)?;
        let payload = serde_json::to_vec(claims).map_err(AssertionError::Encode)?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let signature = key.sign(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }

    fn signing_key(&self) -> &Key {
        // `from_keys` refuses an empty list, so there is always a first key.
        &self.keys[0]
    }
}

/// The JWS protected header idmap writes; the members in this order.
#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

/// The key blocks of `text`, `EC PARAMETERS` blocks left out.
fn key_blocks(text: &str, position: usize) -> Result<Vec<pem::Block<'_>>, AssertionError> {
    let blocks = pem::blocks(text).map_err(|error| AssertionError::NotPem {
        position,
        reason: match error {
            BlockError::Unterminated => "a PEM block has no END line",
            BlockError::Nested => "a PEM BEGIN line inside another block",
        },
    })?;
    Ok(blocks
        .into_iter()
        .filter(|block| block.label != EC_PARAMETERS)
        .collect())
}

impl Key {
    fn from_block(block: pem::Block<'_>, position: usize) -> Result<Key, AssertionError> {
        let unsupported = |kind: &str| AssertionError::UnsupportedKey {
            position,
            kind: kind.to_owned(),
        };
        match block.label {
            "PRIVATE KEY" => {}
            "EC PRIVATE KEY" => {}
            "RSA PRIVATE KEY" => return Err(unsupported("RSA")),
            "DSA PRIVATE KEY" => return Err(unsupported("DSA")),
            "ENCRYPTED PRIVATE KEY" => return Err(unsupported("password-protected")),
            "OPENSSH PRIVATE KEY" => return Err(unsupported("OpenSSH-format")),
            "PUBLIC KEY" | "CERTIFICATE" => {
                return Err(AssertionError::NotPem {
                    position,
                    reason: "a public key or certificate, not a private key",
                });
            }
            other => return Err(unsupported(&format!("PEM {:?}", echo(other)))),
        }
        // Zeroed when dropped, like the key types it is decoded into.
        let (_, der) =
            SecretDocument::from_pem(block.text).map_err(|_| AssertionError::NotPem {
                position,
                reason: "the PEM block does not decode",
            })?;
        let secret = match block.label {
            "PRIVATE KEY" => Secret::from_pkcs8(&der, position)?,
            _ => Secret::from_sec1(&der, position)?,
        };
        Key::new(secret, position)
    }

    fn new(secret: Secret, position: usize) -> Result<Key, AssertionError> {
        let public = match &secret {
            Secret::Ed25519(key) => PublicJwk::Okp {
                x: URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
            },
            Secret::P256(key) => {
                let point = key.verifying_key().as_affine().to_sec1_point(false);
                // An uncompressed point of a valid public key has both; this is not reached.
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    return Err(AssertionError::InvalidKey {
                        position,
                        kind: "P-256",
                    });
                };
                PublicJwk::Ec {
                    x: URL_SAFE_NO_PAD.encode(x),
                    y: URL_SAFE_NO_PAD.encode(y),
                }
            }
        };
        Ok(Key {
            kid: public.thumbprint(),
            secret,
            public,
        })
    }

    fn algorithm(&self) -> Algorithm {
        match self.secret {
            Secret::Ed25519(_) => Algorithm::EdDsa,
            Secret::P256(_) => Algorithm::Es256,
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let alg = self.algorithm().as_str();
        match &self.public {
            PublicJwk::Okp { x } => serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": alg, "use": "sig",
            }),
            PublicJwk::Ec { x, y } => serde_json::json!({
                "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": self.kid, "alg": alg, "use": "sig",
            }),
        }
    }

    /// The JWS signature of `input`: 64 bytes for both algorithms (ES256 as `r || s`, RFC 7518
    /// section 3.4, not DER).
    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, AssertionError> {
        match &self.secret {
            Secret::Ed25519(key) => {
                let signature: ed25519_dalek::Signature =
                    key.try_sign(input).map_err(|_| AssertionError::Sign)?;
                Ok(signature.to_bytes().to_vec())
            }
            Secret::P256(key) => {
                let signature: p256::ecdsa::Signature =
                    key.try_sign(input).map_err(|_| AssertionError::Sign)?;
                Ok(signature.to_bytes().to_vec())
            }
        }
    }
}

impl Secret {
    fn from_pkcs8(der: &SecretDocument, position: usize) -> Result<Secret, AssertionError> {
        let invalid = |kind| AssertionError::InvalidKey { position, kind };
        let info: PrivateKeyInfoRef<'_> = der.decode_msg().map_err(|_| invalid("PKCS#8"))?;
        let algorithm = info.algorithm.oid;
        if algorithm == OID_ED25519 {
            let key = ed25519_dalek::SigningKey::try_from(info).map_err(|_| invalid("Ed25519"))?;
            return Ok(Secret::Ed25519(key));
        }
        if algorithm == OID_EC_PUBLIC_KEY {
            let curve = info.algorithm.parameters_oid().map_err(|_| invalid("EC"))?;
            if curve != OID_P256 {
                return Err(unsupported_curve(curve, position));
            }
            let key = p256::SecretKey::try_from(info).map_err(|_| invalid("P-256"))?;
            return Ok(Secret::P256(key.into()));
        }
        let kind = KNOWN_UNSUPPORTED
            .iter()
            .find(|(oid, _)| algorithm.to_string() == *oid)
            .map_or_else(
                || format!("algorithm {algorithm}"),
                |(_, name)| (*name).to_owned(),
            );
        Err(AssertionError::UnsupportedKey { position, kind })
    }

    fn from_sec1(der: &SecretDocument, position: usize) -> Result<Secret, AssertionError> {
        let invalid = AssertionError::InvalidKey {
            position,
            kind: "SEC1 EC",
        };
        let sec1: sec1::EcPrivateKey<'_> = der.decode_msg().map_err(|_| invalid)?;
        // Without parameters, the 32-byte key is taken as P-256, the only curve offered.
        if let Some(curve) = sec1.parameters.and_then(sec1::EcParameters::named_curve)
            && curve != OID_P256
        {
            return Err(unsupported_curve(curve, position));
        }
        let key = p256::SecretKey::from_sec1_der(der.as_bytes()).map_err(|_| {
            AssertionError::InvalidKey {
                position,
                kind: "P-256",
            }
        })?;
        Ok(Secret::P256(key.into()))
    }
}

fn unsupported_curve(curve: ObjectIdentifier, position: usize) -> AssertionError {
    let name = KNOWN_CURVES
        .iter()
        .find(|(oid, _)| curve.to_string() == *oid)
        .map_or_else(|| format!("curve {curve}"), |(_, name)| (*name).to_owned());
    AssertionError::UnsupportedKey {
        position,
        kind: format!("ECDSA {name}"),
    }
}

impl PublicJwk {
    /// The RFC 7638 thumbprint: base64url SHA-256 of the required members, in lexicographic
    /// order, without whitespace. Written out by hand so no JSON map's ordering can change it;
    /// base64url needs no JSON escaping.
    fn thumbprint(&self) -> String {
        let canonical = match self {
            PublicJwk::Okp { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            PublicJwk::Ec { x, y } => {
                format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
        };
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// Kids and algorithms only: the keys themselves stay out of logs.
impl fmt::Debug for AssertionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Public<'a>(&'a Key);
        impl fmt::Debug for Public<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("Key")
                    .field("kid", &self.0.kid)
                    .field("alg", &self.0.algorithm().as_str())
                    .finish()
            }
        }
        f.debug_struct("AssertionKeys")
            .field("signing_kid", &self.signing_kid())
            .field("keys", &self.keys.iter().map(Public).collect::<Vec<_>>())
            .finish()
    }
}
