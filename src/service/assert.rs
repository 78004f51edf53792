//! Signed identity assertions: a JWT naming the internal user, its Ory identity and session and its
//! business ids, which gateways forward (`x-idmap-assertion`) and ResolveSession returns on request,
//! so an upstream can check, against the JWKS idmap serves, that identity headers came from idmap.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use super::{IdentityMapper, Resolved};
use crate::assertion::{AssertionClaims, AssertionKeys};

/// How long an assertion lives when the session cache is off (no entry bounds it): short, since it
/// is made again for every request anyway.
const UNCACHED_LIFETIME: Duration = Duration::from_secs(60);

impl IdentityMapper {
    /// The keys assertions are signed with, when IDMAP_ASSERTION_KEY is set.
    pub fn assertion_keys(&self) -> Option<&AssertionKeys> {
        self.assertion_keys.as_deref()
    }

    /// The resolved session's assertion: `None` without keys, or for an identity with no user
    /// (`sub` is the internal user id). Signed once per cache entry and user state: `exp` is when
    /// the entry stops being served (and never after the session expires), so an assertion is
    /// never valid for longer than idmap would vouch for the session itself.
    pub fn assertion(&self, resolved: &Resolved) -> Option<Arc<str>> {
        let keys = self.assertion_keys.as_deref()?;
        let user = resolved.user.as_deref()?;
        let stamp = resolved.user_stamp();
        if let Some(token) = resolved.assertion.get(&stamp) {
            return Some(token);
        }
        let now = SystemTime::now();
        let cached = resolved.served_until > now;
        let mut expires: DateTime<Utc> = if cached {
            resolved.served_until.into()
        } else {
            (now + UNCACHED_LIFETIME).into()
        };
        if let Some(session_ends) = resolved.session.session.expires_at {
            expires = expires.min(session_ends);
        }
        let issued: DateTime<Utc> = now.into();
        // Claims count whole seconds: an entry about to expire still gets a token that is valid
        // for a moment rather than none.
        let expires = expires.max(issued + chrono::Duration::seconds(1));
        let session = &resolved.session;
        let claims = AssertionClaims::new(
            user.id.to_string(),
            session.identity.id.to_string(),
            session.session.id.clone(),
            user.external_ids
                .iter()
                .map(|id| (id.namespace.as_str(), id.value.as_str())),
            issued,
            expires,
        );
        let claims = match claims {
            Ok(claims) => claims.with_state(user.state.as_str()),
            Err(e) => {
                tracing::error!(error = %e, "cannot build an assertion's claims");
                return None;
            }
        };
        let claims = match &session.session.authenticator_assurance_level {
            Some(aal) => claims.with_aal(aal.clone()),
            None => claims,
        };
        let token: Arc<str> = match keys.sign(&claims) {
            Ok(token) => token.into(),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign an assertion");
                return None;
            }
        };
        if cached {
            resolved.assertion.set(stamp, token.clone());
        }
        Some(token)
    }
}
