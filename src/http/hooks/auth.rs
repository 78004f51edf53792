//! Webhook authentication: the shared secret, sent by Ory either as the value of a header (`auth:
//! type: api_key`, `in: header`) or as the password of HTTP basic auth (`auth: type: basic_auth`; the
//! user name is not checked). Checked from the headers alone, before the body is read.

use std::fmt;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, header};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::HookState;
use super::error::HookError;

/// What a request must present. Holds a digest of the secret, not the secret itself.
pub struct WebhookAuth {
    secret_digest: Option<[u8; 32]>,
    header: HeaderName,
}

impl fmt::Debug for WebhookAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookAuth")
            .field("enabled", &self.secret_digest.is_some())
            .field("header", &self.header)
            .finish()
    }
}

/// Both sides are hashed before the comparison, so it takes the same time whatever the length or
/// content of a wrong guess.
fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

impl WebhookAuth {
    pub fn new(secret: Option<&SecretString>, header: HeaderName) -> Self {
        Self {
            secret_digest: secret.map(|s| digest(s.expose_secret().as_bytes())),
            header,
        }
    }

    pub fn enabled(&self) -> bool {
        self.secret_digest.is_some()
    }

    /// Accepts the request if the configured header holds the secret, or basic auth's password is
    /// the secret. Every candidate is compared, so which one matched does not show in the timing.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), HookError> {
        let Some(expected) = &self.secret_digest else {
            return Err(HookError::Unauthorized(
                "idmap's Ory webhooks are disabled: IDMAP_WEBHOOK_SECRET is not set",
            ));
        };
        let mut matched = subtle::Choice::from(0u8);
        let mut presented = false;
        for value in headers.get_all(&self.header) {
            presented = true;
            matched |= digest(value.as_bytes()).ct_eq(expected);
        }
        for value in headers.get_all(header::AUTHORIZATION) {
            if let Some(password) = basic_password(value.as_bytes()) {
                presented = true;
                matched |= digest(&password).ct_eq(expected);
            }
        }
        if bool::from(matched) {
            Ok(())
        } else if presented {
            tracing::warn!("webhook request with wrong credentials refused");
            Err(HookError::Unauthorized("wrong webhook credentials"))
        } else {
            tracing::warn!(header = %self.header, "webhook request without credentials refused");
            Err(HookError::Unauthorized("webhook credentials required"))
        }
    }
}

/// The password of an `Authorization: Basic base64(user:password)` value.
fn basic_password(value: &[u8]) -> Option<Vec<u8>> {
    let (scheme, encoded) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Proof that the request carried the webhook secret. Taken before the body, so a request without
/// it is refused without being read.
pub struct Authenticated;

impl FromRequestParts<HookState> for Authenticated {
    type Rejection = HookError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HookState,
    ) -> Result<Self, Self::Rejection> {
        state.auth.check(&parts.headers).map(|()| Authenticated)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn auth() -> WebhookAuth {
        WebhookAuth::new(
            Some(&SecretString::from("s3cret-s3cret-s3cret")),
            HeaderName::from_static("x-idmap-secret"),
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn basic(user: &str, password: &str) -> String {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {encoded}")
    }

    #[test]
    fn the_header_or_the_basic_password_must_hold_the_secret() {
        let auth = auth();
        assert!(
            auth.check(&headers(&[("x-idmap-secret", "s3cret-s3cret-s3cret")]))
                .is_ok()
        );
        assert!(
            auth.check(&headers(&[(
                "authorization",
                &basic("ory", "s3cret-s3cret-s3cret")
            )]))
            .is_ok()
        );
        // A password containing a colon: only the first colon separates the user.
        let colon = WebhookAuth::new(
            Some(&SecretString::from("a:b:c")),
            HeaderName::from_static("authorization"),
        );
        assert!(
            colon
                .check(&headers(&[("authorization", &basic("u", "a:b:c"))]))
                .is_ok()
        );
        for bad in [
            headers(&[]),
            headers(&[("x-idmap-secret", "s3cret-s3cret-s3cre")]),
            headers(&[("x-idmap-secret", "s3cret-s3cret-s3cret ")]),
            headers(&[("authorization", "s3cret-s3cret-s3cret")]),
            headers(&[("authorization", &basic("s3cret-s3cret-s3cret", "x"))]),
            headers(&[("authorization", "Basic !!!")]),
            headers(&[("authorization", "Bearer s3cret-s3cret-s3cret")]),
        ] {
            assert!(auth.check(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn without_a_secret_everything_is_refused() {
        let auth = WebhookAuth::new(None, header::AUTHORIZATION);
        assert!(!auth.enabled());
        assert!(auth.check(&headers(&[("authorization", "")])).is_err());
        assert!(auth.check(&headers(&[])).is_err());
    }

    #[test]
    fn debug_shows_no_secret() {
        let shown = format!("{:?}", auth());
        assert!(!shown.contains("s3cret"));
    }
}
