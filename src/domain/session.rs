use chrono::{DateTime, Utc};
use serde_json::Value;

use super::IdentityId;

/// An Ory identity as a session's owner sees it: never credentials or `metadata_admin`.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub id: IdentityId,
    pub schema_id: String,
    /// "active" or "inactive".
    pub state: String,
    /// Ory's own `external_id`, if set there.
    pub external_id: Option<String>,
    /// User-editable traits. JSON object (Ory validates them against the schema).
    pub traits: Value,
    /// Admin-written public metadata; `Value::Null` when unset.
    pub metadata_public: Value,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl Identity {
    /// The internal user id recorded in `metadata_public.id`, if it is there as a string.
    pub fn metadata_user_id(&self) -> Option<&str> {
        self.metadata_public.get("id").and_then(Value::as_str)
    }
}

/// One authentication step of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthenticationMethod {
    pub method: String,
    pub aal: Option<String>,
    pub completed_at: Option<DateTime<Utc>>,
    pub provider: Option<String>,
}

/// An Ory session, as whoami validated it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub authenticated_at: Option<DateTime<Utc>>,
    pub issued_at: Option<DateTime<Utc>>,
    pub authenticator_assurance_level: Option<String>,
    pub authentication_methods: Vec<AuthenticationMethod>,
}

/// Whoami's answer: the session and the identity it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionWithIdentity {
    pub session: Session,
    pub identity: Identity,
}
