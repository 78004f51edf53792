//! The payload of an assertion.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AssertionError;

/// The `iss` of every assertion idmap signs, and the only one [`verify`](super::verify) accepts.
pub const ISSUER: &str = "idmap";

/// The key of the default namespace's external id in [`AssertionClaims::external_ids`].
pub const DEFAULT_NAMESPACE: &str = "";

/// The claims of an identity assertion, as they appear in the JWT's payload.
///
/// Fields after `exp` are left out of the JSON when absent; a verifier ignores claims it does not
/// know, so new ones can be added without breaking upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    /// Always [`ISSUER`].
    pub iss: String,
    /// The internal user id.
    pub sub: String,
    /// The Ory (Kratos) identity id.
    pub ory_identity_id: String,
    /// The Ory session id.
    pub ory_session_id: String,
    /// External ids by namespace; the default namespace is the key [`DEFAULT_NAMESPACE`] (`""`).
    pub external_ids: BTreeMap<String, String>,
    /// Issued at, in Unix seconds.
    pub iat: i64,
    /// Expires at, in Unix seconds; the token is invalid from this second on.
    pub exp: i64,
    /// The session's authenticator assurance level (`aal1`, `aal2`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aal: Option<String>,
    /// The user's state (for example `active`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl AssertionClaims {
    /// Claims for one user and session, valid from `issued_at` until `expires_at` (both cut to
    /// whole seconds). `external_ids` holds (namespace, value) pairs, the default namespace as
    /// [`DEFAULT_NAMESPACE`].
    ///
    /// # Errors
    /// [`AssertionError::InvalidClaims`] when `expires_at` is not after `issued_at`, and
    /// [`AssertionError::DuplicateNamespace`] when a namespace appears twice.
    pub fn new<N, V>(
        sub: impl Into<String>,
        ory_identity_id: impl Into<String>,
        ory_session_id: impl Into<String>,
        external_ids: impl IntoIterator<Item = (N, V)>,
        issued_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Self, AssertionError>
    where
        N: Into<String>,
        V: Into<String>,
    {
        let mut ids = BTreeMap::new();
        for (namespace, value) in external_ids {
            let namespace = namespace.into();
            if ids.contains_key(&namespace) {
                return Err(AssertionError::DuplicateNamespace(namespace));
            }
            ids.insert(namespace, value.into());
        }
        let claims = AssertionClaims {
            iss: ISSUER.to_owned(),
            sub: sub.into(),
            ory_identity_id: ory_identity_id.into(),
            ory_session_id: ory_session_id.into(),
            external_ids: ids,
            iat: issued_at.timestamp(),
            exp: expires_at.timestamp(),
            aal: None,
            state: None,
        };
        claims.check()?;
        Ok(claims)
    }

    /// With the session's authenticator assurance level.
    pub fn with_aal(mut self, aal: impl Into<String>) -> Self {
        self.aal = Some(aal.into());
        self
    }

    /// With the user's state.
    pub fn with_state(mut self, state: impl Into<String>) -> Self {
        self.state = Some(state.into());
        self
    }

    /// The checks that hold for claims worth signing (the fields are public, so
    /// [`AssertionKeys::sign`](super::AssertionKeys::sign) runs them again).
    pub(super) fn check(&self) -> Result<(), AssertionError> {
        if self.exp <= self.iat {
            return Err(AssertionError::InvalidClaims("exp must be after iat"));
        }
        if self.iss != ISSUER {
            return Err(AssertionError::InvalidClaims("iss must be idmap"));
        }
        if self.sub.is_empty() {
            return Err(AssertionError::InvalidClaims("sub is empty"));
        }
        Ok(())
    }
}
