use chrono::{DateTime, Utc};

use super::{ExternalId, IdentityId, UserId};

/// An internal user record, linked to one Ory identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub ory_identity_id: IdentityId,
    pub external_id: Option<ExternalId>,
    /// The identity's schema as last seen from Ory ("customer", "employee", ...).
    pub schema_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a caller asks LinkIdentity (or just-in-time linking) to do.
#[derive(Debug, Clone)]
pub struct LinkRequest {
    pub ory_identity_id: IdentityId,
    /// The user to link to; `None`: the identity's existing user, else a new one.
    pub user_id: Option<UserId>,
    /// A business id to give the user; `None` leaves it as it is.
    pub external_id: Option<ExternalId>,
}

/// The result of a link: the user, and whether this call created it.
#[derive(Debug, Clone)]
pub struct LinkOutcome {
    pub user: User,
    pub created: bool,
}
