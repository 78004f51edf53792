//! Business ids beyond linking: setting, replacing and removing a user's value in a namespace,
//! former values, and lookups by many values at once.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::models::UserRow;
use super::ory_outbox::{self as outbox, OutboxKind};
use super::schema::{former_external_ids, user_external_ids, users};
use super::users::{
    ExternalIdPairs, Given, TxError, UserWithIds, find_by_identity, give, into_user, release, touch,
};
use super::{Store, StoreError};
use crate::domain::{
    ExternalId, IdentityId, LinkConflict, Namespace, NamespacedId, Subject, User, UserId,
};

/// What to do to a user's value in one namespace.
#[derive(Debug, Clone, Copy)]
pub enum IdChange<'a> {
    /// Give the user this value; a different one held there is a conflict unless `replace`.
    Set {
        value: &'a ExternalId,
        replace: bool,
    },
    /// Take away whatever value the user holds there.
    Remove,
}

/// The outcome of [`Store::change_external_id`].
#[derive(Debug)]
pub enum ChangeResult {
    /// The user as stored afterwards, and whether this call changed it.
    Done {
        user: User,
        changed: bool,
    },
    /// No user is linked to that identity, or has that id.
    NoUser,
    Conflict(LinkConflict),
}

impl Store {
    /// Sets, replaces or removes a user's value in `namespace` in one transaction. A value given
    /// up is kept as a former value. With `mirrored` (the namespace is kept in step with Ory's
    /// `external_id`), a change queues the write to Ory in the same transaction.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "change external id"))]
    pub async fn change_external_id(
        &self,
        subject: Subject,
        namespace: &Namespace,
        change: IdChange<'_>,
        mirrored: bool,
    ) -> Result<ChangeResult, StoreError> {
        let mut conn = self.conn().await?;
        let result = conn
            .transaction::<_, TxError, _>(async |conn| {
                change_in_tx(conn, subject, namespace, change, mirrored).await
            })
            .await;
        match result {
            Ok(result) => Ok(result),
            Err(TxError::Conflict(conflict)) => Ok(ChangeResult::Conflict(conflict)),
            Err(TxError::Store(e)) => Err(e),
            Err(TxError::LostRace) => Ok(ChangeResult::NoUser),
        }
    }

    /// The user that last held `value` in `namespace` and gave it up (replaced or removed it).
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by former external id"))]
    pub async fn user_by_former_external_id(
        &self,
        namespace: &Namespace,
        value: &ExternalId,
    ) -> Result<Option<User>, StoreError> {
        let row = self
            .lookup(|conn| async move {
                users::table
                    .inner_join(former_external_ids::table)
                    .filter(former_external_ids::namespace.eq(namespace.as_str()))
                    .filter(former_external_ids::external_id.eq(value.as_str()))
                    .select((UserRow::as_select(), ExternalIdPairs))
                    .first::<UserWithIds>(&mut &**conn)
                    .await
                    .optional()
            })
            .await?;
        Ok(row.map(into_user))
    }

    /// The users holding any of `values` in `namespace`, in one query.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by external ids"))]
    pub async fn users_by_external_ids(
        &self,
        namespace: &Namespace,
        values: &[ExternalId],
    ) -> Result<Vec<User>, StoreError> {
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<&str> = values.iter().map(ExternalId::as_str).collect();
        let mut conn = self.conn().await?;
        let rows: Vec<UserWithIds> = users::table
            .inner_join(user_external_ids::table)
            .filter(user_external_ids::namespace.eq(namespace.as_str()))
            .filter(user_external_ids::external_id.eq_any(values))
            .select((UserRow::as_select(), ExternalIdPairs))
            .load(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        Ok(rows.into_iter().map(into_user).collect())
    }

    /// The value `user` holds in `namespace` now (what the outbox writes to Ory), and the user's
    /// identity; `None` if the user is gone.
    pub async fn external_id_of(
        &self,
        user: UserId,
        namespace: &Namespace,
    ) -> Result<Option<(IdentityId, Option<ExternalId>)>, StoreError> {
        let mut conn = self.conn().await?;
        let identity: Option<uuid::Uuid> = users::table
            .find(user.as_uuid())
            .select(users::ory_identity_id)
            .first(&mut conn)
            .await
            .optional()
            .map_err(StoreError::classify)?;
        let Some(identity) = identity else {
            return Ok(None);
        };
        let value = super::users::current_value(&mut conn, user, namespace)
            .await
            .map_err(StoreError::classify)?;
        Ok(Some((
            IdentityId::from_uuid(identity),
            value.map(ExternalId::from_trusted),
        )))
    }

    /// Queues writing `user`'s value in the mirrored namespace to its identity's Ory
    /// `external_id` (reconciliation's repair); a pending write for the identity absorbs it.
    pub async fn queue_external_id_sync(
        &self,
        identity: IdentityId,
        user: UserId,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        outbox::enqueue(&mut conn, OutboxKind::SyncExternalId, identity, user)
            .await
            .map_err(StoreError::classify)
    }
}

async fn change_in_tx(
    conn: &mut AsyncPgConnection,
    subject: Subject,
    namespace: &Namespace,
    change: IdChange<'_>,
    mirrored: bool,
) -> Result<ChangeResult, TxError> {
    // The user row is locked, so concurrent changes of one user's ids run one after the other.
    let locked = match subject {
        Subject::Identity(identity) => {
            users::table
                .filter(users::ory_identity_id.eq(identity.as_uuid()))
                .select((users::id, users::ory_identity_id))
                .for_update()
                .first::<(uuid::Uuid, uuid::Uuid)>(conn)
                .await
        }
        Subject::User(user) => {
            users::table
                .find(user.as_uuid())
                .select((users::id, users::ory_identity_id))
                .for_update()
                .first::<(uuid::Uuid, uuid::Uuid)>(conn)
                .await
        }
    }
    .optional()?;
    let Some((user, identity)) = locked else {
        return Ok(ChangeResult::NoUser);
    };
    let (user, identity) = (UserId::from_uuid(user), IdentityId::from_uuid(identity));
    let changed = match change {
        IdChange::Set { value, replace } => {
            let id = NamespacedId::new(namespace.clone(), value.clone());
            matches!(
                give(conn, user, &id, replace).await?,
                Given::Inserted { .. }
            )
        }
        IdChange::Remove => release(conn, user, namespace).await?.is_some(),
    };
    if changed {
        touch(conn, user).await?;
        if mirrored {
            outbox::enqueue(conn, OutboxKind::SyncExternalId, identity, user).await?;
        }
    }
    let user = find_by_identity(conn, identity)
        .await?
        .ok_or(TxError::LostRace)?;
    Ok(ChangeResult::Done { user, changed })
}
