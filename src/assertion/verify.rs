//! `verify`: what an upstream service does with an assertion and idmap's JWKS.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use p256::ecdsa::signature::Verifier as _;
use serde::Deserialize;
use serde_json::Value;

use super::Algorithm;
use super::claims::{AssertionClaims, ISSUER};
use super::error::{AssertionError, echo};

/// How far `iat` may lie in the future before a token is refused: the clocks of idmap and the
/// upstream may differ by this much. `exp` gets no allowance.
pub const CLOCK_SKEW_SECS: i64 = 30;

/// The header members a verifier looks at.
#[derive(Deserialize)]
struct ReceivedHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    /// Extensions the verifier would have to understand (RFC 7515 section 4.1.11); idmap sets none.
    #[serde(default)]
    crit: Option<Value>,
}

/// The claims of `token` once it is shown to be idmap's and valid at `now`.
///
/// The steps, in the order an upstream should take them:
/// 1. split the compact JWS into header, payload and signature (base64url without padding);
/// 2. take the key whose `kid` is the header's `kid` from the JWKS;
/// 3. require the header's `alg` to be the key's algorithm (`EdDSA` for an OKP Ed25519 key,
///    `ES256` for an EC P-256 key), never the other way round: the token does not choose;
/// 4. check the signature over `header.payload` (ES256: 64 bytes `r || s`);
/// 5. require `iss` to be `idmap`, `now < exp`, and `iat <= now + CLOCK_SKEW_SECS`.
///
/// # Errors
/// An [`AssertionError`] naming the first step that failed.
pub fn verify(
    jwks: &Value,
    token: &str,
    now: DateTime<Utc>,
) -> Result<AssertionClaims, AssertionError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AssertionError::Malformed("not three dot-separated parts"));
    };
    let header = decode(header_b64, "header is not base64url")?;
    let header: ReceivedHeader = serde_json::from_slice(&header)
        .map_err(|_| AssertionError::Malformed("header is not a JWS header"))?;
    if header.crit.is_some() {
        return Err(AssertionError::Malformed("unsupported crit header"));
    }
    if let Some(typ) = &header.typ
        && !typ.eq_ignore_ascii_case("JWT")
    {
        return Err(AssertionError::Malformed("typ is not JWT"));
    }
    let kid = header.kid.ok_or(AssertionError::MissingKid)?;
    let key = PublicKey::find(jwks, &kid)?;
    if header.alg != key.algorithm().as_str() {
        return Err(AssertionError::AlgMismatch {
            kid: echo(&kid),
            alg: echo(&header.alg),
            expected: key.algorithm().as_str(),
        });
    }
    let signature = decode(signature_b64, "signature is not base64url")?;
    let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
    key.verify(signed.as_bytes(), &signature)?;

    let payload = decode(payload_b64, "payload is not base64url")?;
    let claims: AssertionClaims = serde_json::from_slice(&payload)
        .map_err(|_| AssertionError::Malformed("payload is not idmap's assertion claims"))?;
    if claims.iss != ISSUER {
        return Err(AssertionError::WrongIssuer(echo(&claims.iss)));
    }
    let now = now.timestamp();
    if now >= claims.exp {
        return Err(AssertionError::Expired {
            exp: claims.exp,
            now,
        });
    }
    if claims.iat > now.saturating_add(CLOCK_SKEW_SECS) {
        return Err(AssertionError::IssuedInFuture {
            iat: claims.iat,
            now,
        });
    }
    Ok(claims)
}

fn decode(part: &str, malformed: &'static str) -> Result<Vec<u8>, AssertionError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AssertionError::Malformed(malformed))
}

/// A public key taken from a JWK.
enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl PublicKey {
    /// The key of `jwks` whose `kid` is `kid`.
    fn find(jwks: &Value, kid: &str) -> Result<PublicKey, AssertionError> {
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(AssertionError::InvalidJwks("no \"keys\" array"))?;
        let mut matching = keys
            .iter()
            .filter(|jwk| jwk.get("kid").and_then(Value::as_str) == Some(kid));
        let jwk = matching
            .next()
            .ok_or_else(|| AssertionError::UnknownKid { kid: echo(kid) })?;
        if matching.next().is_some() {
            return Err(AssertionError::InvalidJwks("two keys share a kid"));
        }
        PublicKey::from_jwk(jwk)
    }

    fn from_jwk(jwk: &Value) -> Result<PublicKey, AssertionError> {
        let member = |name| jwk.get(name).and_then(Value::as_str);
        let coordinate = |name| -> Result<[u8; 32], AssertionError> {
            let text =
                member(name).ok_or(AssertionError::InvalidJwks("a key lacks a coordinate"))?;
            URL_SAFE_NO_PAD
                .decode(text)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or(AssertionError::InvalidJwks(
                    "a coordinate is not 32 bytes of base64url",
                ))
        };
        if member("use").is_some_and(|usage| usage != "sig") {
            return Err(AssertionError::InvalidJwks("the key is not for signatures"));
        }
        let key = match (member("kty"), member("crv")) {
            (Some("OKP"), Some("Ed25519")) => {
                let key = ed25519_dalek::VerifyingKey::from_bytes(&coordinate("x")?)
                    .map_err(|_| AssertionError::InvalidJwks("not an Ed25519 public key"))?;
                PublicKey::Ed25519(key)
            }
            (Some("EC"), Some("P-256")) => {
                let mut point = [0u8; 65];
                point[0] = 0x04; // SEC1 uncompressed
                point[1..33].copy_from_slice(&coordinate("x")?);
                point[33..].copy_from_slice(&coordinate("y")?);
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                    .map_err(|_| AssertionError::InvalidJwks("not a P-256 public key"))?;
                PublicKey::P256(key)
            }
            _ => return Err(AssertionError::InvalidJwks("not an Ed25519 or P-256 key")),
        };
        // A JWK that names an algorithm must name the one its key type implies.
        if member("alg").is_some_and(|alg| alg != key.algorithm().as_str()) {
            return Err(AssertionError::InvalidJwks(
                "the key's alg does not fit its type",
            ));
        }
        Ok(key)
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            PublicKey::Ed25519(_) => Algorithm::EdDsa,
            PublicKey::P256(_) => Algorithm::Es256,
        }
    }

    fn verify(&self, signed: &[u8], signature: &[u8]) -> Result<(), AssertionError> {
        let ok = match self {
            PublicKey::Ed25519(key) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|signature| key.verify_strict(signed, &signature).is_ok()),
            PublicKey::P256(key) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|signature| key.verify(signed, &signature).is_ok()),
        };
        match ok {
            true => Ok(()),
            false => Err(AssertionError::BadSignature),
        }
    }
}
