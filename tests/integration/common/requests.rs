//! Requests the tests send again and again, built one way.

use idmap::proto::api::invalidate_session_request::Target;
use idmap::proto::api::resolve_session_request::Credential;
use idmap::proto::api::{InvalidateSessionRequest, LinkIdentityRequest, ResolveSessionRequest};
use uuid::Uuid;

/// ResolveSession with a session token.
pub fn token(t: &str) -> ResolveSessionRequest {
    ResolveSessionRequest {
        credential: Some(Credential::SessionToken(t.to_owned())),
        ..Default::default()
    }
}

/// ResolveSession with a raw Cookie header.
pub fn cookie(c: &str) -> ResolveSessionRequest {
    ResolveSessionRequest {
        credential: Some(Credential::Cookie(c.to_owned())),
        ..Default::default()
    }
}

/// InvalidateSession of `target`.
pub fn invalidate(target: Target) -> InvalidateSessionRequest {
    InvalidateSessionRequest {
        target: Some(target),
    }
}

/// LinkIdentity of `identity`, with a user id and an external id (empty: none).
pub fn link_with(identity: Uuid, user_id: &str, external_id: &str) -> LinkIdentityRequest {
    LinkIdentityRequest {
        ory_identity_id: identity.to_string(),
        user_id: user_id.into(),
        external_id: external_id.into(),
        ..Default::default()
    }
}

/// LinkIdentity of `identity`, minting or adopting the user id, without an external id.
pub fn link(identity: Uuid) -> LinkIdentityRequest {
    link_with(identity, "", "")
}
