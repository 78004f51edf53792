//! Keyset page tokens of `GET /admin/identities`, in the two forms Kratos versions use
//! ([`PageTokens`]). Identities are listed in id order, so a token only has to name the last id of
//! the page before.
//!
//! ory/x `keysetpagination_v2` encrypts `{"e": <expiry>, "c": <columns>}` and refuses a token
//! past its expiry. The emulator's tokens are base64 JSON instead: opaque enough that a client
//! cannot rely on their content, and no secret to manage. Each carries a serial number so that
//! [`crate::Emulator::expire_page_tokens`] can expire the ones issued so far without a test
//! waiting an hour.

use std::sync::atomic::Ordering;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::{ApiError, now};
use crate::{Emulator, PageTokens};

/// ory/x's reason for an expired token (`ErrPageTokenExpired`).
const EXPIRED: &str = "page token expired, do not persist page tokens";
const INVALID: &str = "The page token is invalid, do not craft your own page tokens";

#[derive(Serialize, Deserialize)]
struct Token {
    /// The last identity id of the previous page.
    #[serde(rename = "a")]
    after: Uuid,
    /// Expiry, Unix milliseconds.
    #[serde(rename = "e")]
    expires_at: i64,
    /// Issue order, for [`crate::Emulator::expire_page_tokens`].
    #[serde(rename = "n")]
    serial: u64,
}

/// The token of the page after identity `after` (the nil UUID: the first page).
pub(crate) fn issue(emu: &Emulator, after: Uuid) -> String {
    match emu.inner.config.page_tokens {
        PageTokens::LastId => after.to_string(),
        PageTokens::Expiring { ttl } => {
            let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
            let token = Token {
                after,
                expires_at: now()
                    .checked_add_signed(ttl)
                    .map_or(i64::MAX, |at| at.timestamp_millis()),
                serial: emu.inner.next_page_token.fetch_add(1, Ordering::SeqCst),
            };
            // Serialising a struct of a UUID and two integers cannot fail.
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
        }
    }
}

/// The identity id a token continues after, or Kratos's 400.
pub(crate) fn parse(emu: &Emulator, raw: &str) -> Result<Uuid, ApiError> {
    let invalid = || ApiError::bad_request(INVALID);
    match emu.inner.config.page_tokens {
        PageTokens::LastId => Uuid::parse_str(raw).map_err(|_| invalid()),
        PageTokens::Expiring { .. } => {
            let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
            let token: Token = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
            let valid_from = emu.inner.page_tokens_valid_from.load(Ordering::SeqCst);
            // Expired once its instant is reached, so a zero lifetime never admits a token.
            if token.expires_at <= now().timestamp_millis() || token.serial < valid_from {
                return Err(ApiError::bad_request(EXPIRED));
            }
            Ok(token.after)
        }
    }
}
