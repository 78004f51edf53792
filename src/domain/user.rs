use chrono::{DateTime, Utc};

use super::{ExternalId, IdentityId, Namespace, NamespacedId, UserId};

/// An internal user record, linked to one Ory identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub ory_identity_id: IdentityId,
    /// The user's business ids, at most one per namespace, sorted by namespace.
    pub external_ids: Vec<NamespacedId>,
    /// The identity's schema as last seen from Ory ("customer", "employee", ...).
    pub schema_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// What Ory says of the identity, as reconciliation last found it.
    pub state: UserState,
}

impl User {
    /// The user's value in `namespace`, if it holds one.
    pub fn external_id(&self, namespace: &Namespace) -> Option<&ExternalId> {
        self.external_ids
            .iter()
            .find(|id| &id.namespace == namespace)
            .map(|id| &id.value)
    }

    /// The value in the default namespace (what `User.external_id` carries).
    pub fn default_external_id(&self) -> Option<&ExternalId> {
        // Sorted by namespace, so the default namespace, the empty string, comes first.
        self.external_ids
            .first()
            .filter(|id| id.namespace.is_default())
            .map(|id| &id.value)
    }

    /// Whether the user holds `value` in `namespace`.
    pub fn holds(&self, namespace: &Namespace, value: &ExternalId) -> bool {
        self.external_id(namespace) == Some(value)
    }
}

/// Whose business ids a call changes: a user by its identity or by its own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Identity(IdentityId),
    User(UserId),
}

/// The state of a user's Ory identity. Users are never hard-deleted; reconciliation records here
/// what became of their identity, and sets it back to active when the identity returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum UserState {
    /// The identity exists and is active (and every user is, until reconciliation finds otherwise).
    #[default]
    Active,
    /// The identity exists but is deactivated in Ory.
    Inactive,
    /// Ory no longer has the identity (404).
    Deleted,
}

impl UserState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Inactive => "inactive",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(Self::Active),
            "inactive" => Some(Self::Inactive),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }

    /// The state of a user whose identity Ory reports in `state` ("active" or "inactive"). Ory
    /// defines no other value; anything else is read as inactive, so an identity Ory does not call
    /// active is never reported active.
    pub fn of_identity(state: &str) -> Self {
        if state == "active" {
            Self::Active
        } else {
            Self::Inactive
        }
    }
}

impl std::fmt::Display for UserState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller asks LinkIdentity (or just-in-time linking) to do.
#[derive(Debug, Clone)]
pub struct LinkRequest {
    pub ory_identity_id: IdentityId,
    /// The user to link to; `None`: the identity's existing user, else a new one.
    pub user_id: Option<UserId>,
    /// Business ids to give the user, at most one per namespace; namespaces not named are left
    /// as they are.
    pub external_ids: Vec<NamespacedId>,
}

/// The result of a link: the user, and whether this call created it.
#[derive(Debug, Clone)]
pub struct LinkOutcome {
    pub user: User,
    pub created: bool,
    /// What became of the identity's Ory `external_id` when it was offered for adoption.
    pub adoption: Option<Adoption>,
}

/// Adopting an identity's Ory `external_id` into the mirrored namespace at link time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// The user had no value there and now holds Ory's.
    Adopted(ExternalId),
    /// Another user holds that value in the namespace: nothing was overwritten.
    TakenBy { value: ExternalId, user_id: UserId },
}

/// Why a link could not be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkConflict {
    /// The identity is already linked to this other user.
    IdentityLinked { user_id: UserId },
    /// The requested user is already linked to this other identity.
    UserLinked { ory_identity_id: IdentityId },
    /// Another user holds the value in the namespace.
    ExternalIdTaken {
        namespace: Namespace,
        value: ExternalId,
        user_id: Option<UserId>,
    },
    /// The user already holds this other value in the namespace.
    ExternalIdAlreadySet {
        namespace: Namespace,
        external_id: ExternalId,
    },
}
