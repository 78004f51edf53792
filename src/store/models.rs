use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::schema::{user_external_ids, users};
use crate::domain::{ExternalId, IdentityId, Namespace, NamespacedId, User, UserId, UserState};

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg))]
pub(super) struct UserRow {
    pub id: Uuid,
    pub ory_identity_id: Uuid,
    pub schema_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub state: String,
}

impl UserRow {
    /// The user, with its business ids as `namespace` U+001F `value` strings ordered by namespace
    /// (see `users::ExternalIdPairs`).
    pub fn into_domain(self, pairs: Vec<String>) -> User {
        User {
            id: UserId::from_uuid(self.id),
            ory_identity_id: IdentityId::from_uuid(self.ory_identity_id),
            external_ids: pairs
                .into_iter()
                .filter_map(|pair| {
                    let (namespace, value) = pair.split_once('\u{1f}')?;
                    Some(NamespacedId::new(
                        Namespace::from_trusted(namespace.to_owned()),
                        ExternalId::from_trusted(value.to_owned()),
                    ))
                })
                .collect(),
            schema_id: self.schema_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
            // The column's CHECK constraint allows only the three known values.
            state: UserState::parse(&self.state).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Insertable)]
#[diesel(table_name = users)]
pub(super) struct NewUserRow<'a> {
    pub id: Uuid,
    pub ory_identity_id: Uuid,
    pub schema_id: &'a str,
    pub state: &'a str,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = user_external_ids)]
pub(super) struct NewExternalIdRow<'a> {
    pub namespace: &'a str,
    pub external_id: &'a str,
    pub user_id: Uuid,
}
