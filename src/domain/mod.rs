//! Domain types: validated ids, users, Ory sessions and identities. No I/O and no wire or storage
//! types here; `grpc/convert.rs`, `store/` and `ory/` convert to and from these at the edges.

use std::borrow::Cow;

mod credential;
mod ids;
mod session;
mod user;

pub use credential::{
    Credential, CredentialKind, MAX_COOKIE_HEADER_BYTES, MAX_SESSION_TOKEN_BYTES,
};
pub use ids::{
    ExternalId, IdentityId, MAX_EXTERNAL_ID_BYTES, MAX_NAMESPACE_CHARS, Namespace, NamespacedId,
    UserId, parse_uuid,
};
pub use session::{AuthenticationMethod, Identity, Session, SessionWithIdentity};
pub use user::{Adoption, LinkConflict, LinkOutcome, LinkRequest, Subject, User, UserState};

/// A field that failed validation: which one, and why, in words a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct FieldViolation {
    /// The request field's name as the caller spelled it (the protobuf field name, with an index
    /// for repeated fields: `ory_identity_ids[3]`).
    pub field: Cow<'static, str>,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    pub(crate) fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field: Cow::Borrowed(field),
            description: description.into(),
        }
    }
}
