use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::FieldViolation;

/// The longest session token accepted. Kratos tokens are 39 bytes; the bound only stops abuse.
pub const MAX_SESSION_TOKEN_BYTES: usize = 4 * 1024;
/// The longest Cookie header accepted; browsers cap a cookie at about 4 KiB and proxies a header at
/// 8 to 16 KiB.
pub const MAX_COOKIE_HEADER_BYTES: usize = 16 * 1024;

/// Cookie names Kratos uses for its session: the self-hosted default, and Ory Network's
/// `ory_session_<project slug>` prefix.
const KRATOS_DEFAULT_COOKIE: &str = "ory_kratos_session";
const ORY_NETWORK_COOKIE_PREFIX: &str = "ory_session_";

/// How the caller presented the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// An `ory_st_...` token, sent to Ory as `X-Session-Token`.
    SessionToken,
    /// Ory's session cookie(s), sent to Ory as a `Cookie` header.
    Cookie,
}

/// A session credential. The secret is only readable through [`Credential::expose`], which the Ory
/// client calls to build its request; `Debug` never prints it.
#[derive(Clone)]
pub struct Credential {
    kind: CredentialKind,
    secret: SecretString,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl Credential {
    /// Validates a session token as it will travel in an HTTP header.
    pub fn session_token(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Err(FieldViolation::new(field, "must not be empty"));
        }
        if value.len() > MAX_SESSION_TOKEN_BYTES {
            return Err(FieldViolation::new(
                field,
                format!("must be at most {MAX_SESSION_TOKEN_BYTES} bytes"),
            ));
        }
        // Tokens are header values: visible ASCII only, so nothing can smuggle a second header.
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FieldViolation::new(
                field,
                "must contain only visible ASCII characters",
            ));
        }
        Ok(Self {
            kind: CredentialKind::SessionToken,
            secret: SecretString::from(value.to_owned()),
        })
    }

    /// Validates a raw `Cookie` header and keeps only Ory's session cookie(s): the rest belong to
    /// other applications and are neither forwarded to Ory nor allowed to change the result.
    ///
    /// `configured_name` is an extra cookie name to accept (Kratos's `session.cookie.name`).
    /// Returns `Ok(None)` when the header is well-formed but holds no Ory session cookie.
    pub fn cookie_header(
        field: &'static str,
        header: &str,
        configured_name: Option<&str>,
    ) -> Result<Option<Self>, FieldViolation> {
        if header.trim().is_empty() {
            return Err(FieldViolation::new(field, "must not be empty"));
        }
        if header.len() > MAX_COOKIE_HEADER_BYTES {
            return Err(FieldViolation::new(
                field,
                format!("must be at most {MAX_COOKIE_HEADER_BYTES} bytes"),
            ));
        }
        if !header
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        {
            return Err(FieldViolation::new(
                field,
                "must be a Cookie header value: visible ASCII characters and spaces only",
            ));
        }
        let mut kept: Vec<&str> = Vec::new();
        for pair in header.split(';') {
            let pair = pair.trim();
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let name = name.trim();
            let is_session_cookie = name == KRATOS_DEFAULT_COOKIE
                || (name.len() > ORY_NETWORK_COOKIE_PREFIX.len()
                    && name.starts_with(ORY_NETWORK_COOKIE_PREFIX))
                || configured_name.is_some_and(|c| c == name);
            if is_session_cookie && !value.trim().is_empty() {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            return Ok(None);
        }
        // Sorted, so the same cookies in another order are the same credential (and cache key).
        kept.sort_unstable();
        kept.dedup();
        Ok(Some(Self {
            kind: CredentialKind::Cookie,
            secret: SecretString::from(kept.join("; ")),
        }))
    }

    pub fn kind(&self) -> CredentialKind {
        self.kind
    }

    /// The secret, for the one place that sends it to Ory.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// A SHA-256 of the kind and secret: safe to keep in caches, logs and notifications.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(match self.kind {
            CredentialKind::SessionToken => b"token\0".as_slice(),
            CredentialKind::Cookie => b"cookie\0".as_slice(),
        });
        hasher.update(self.secret.expose_secret().as_bytes());
        hasher.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_header_keeps_only_ory_session_cookies_in_a_stable_order() {
        let a = Credential::cookie_header(
            "cookie",
            "theme=dark; ory_kratos_session=abc; _ga=GA1.2",
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.expose(), "ory_kratos_session=abc");
        let b = Credential::cookie_header("cookie", "ory_kratos_session=abc;x=1", None)
            .unwrap()
            .unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());

        let network =
            Credential::cookie_header("cookie", "ory_session_myproject=v; csrf_token_x=y", None)
                .unwrap()
                .unwrap();
        assert_eq!(network.expose(), "ory_session_myproject=v");

        let custom = Credential::cookie_header("cookie", "sid=1; app=2", Some("sid"))
            .unwrap()
            .unwrap();
        assert_eq!(custom.expose(), "sid=1");
    }

    #[test]
    fn cookie_header_without_a_session_cookie_is_no_credential() {
        assert!(
            Credential::cookie_header("cookie", "theme=dark; ory_session_=x", None)
                .unwrap()
                .is_none()
        );
        assert!(
            Credential::cookie_header("cookie", "ory_kratos_session=", None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_credentials_are_rejected() {
        assert!(Credential::session_token("t", "").is_err());
        assert!(Credential::session_token("t", "ory_st_a b").is_err());
        assert!(Credential::session_token("t", "ory_st_a\r\nX-Evil: 1").is_err());
        assert!(Credential::session_token("t", &"a".repeat(MAX_SESSION_TOKEN_BYTES + 1)).is_err());
        assert!(Credential::cookie_header("c", " ", None).is_err());
        assert!(Credential::cookie_header("c", "ory_kratos_session=a\nb", None).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credential::session_token("t", "ory_st_secretsecret").unwrap();
        assert!(!format!("{c:?}").contains("secretsecret"));
    }

    #[test]
    fn token_and_cookie_with_equal_text_have_different_fingerprints() {
        let t = Credential::session_token("t", "ory_kratos_session=abc").unwrap();
        let c = Credential::cookie_header("c", "ory_kratos_session=abc", None)
            .unwrap()
            .unwrap();
        assert_ne!(t.fingerprint(), c.fingerprint());
    }
}
