use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::models::{NewExternalIdRow, NewUserRow, UserRow};
use super::ory_outbox::{self as outbox, OutboxKind};
use super::schema::{former_external_ids, pending_users, user_external_ids, users};
use super::{Store, StoreError};
use crate::domain::{
    Adoption, ExternalId, IdentityId, LinkConflict, LinkOutcome, LinkRequest, Namespace,
    NamespacedId, User, UserId, UserState,
};

/// How many times a link is retried after losing a race to a concurrent link of the same identity.
const LINK_ATTEMPTS: usize = 3;

/// What a link stores of the identity, besides what the request asks for.
#[derive(Debug, Clone, Copy)]
pub struct LinkFacts<'a> {
    /// The identity's schema id, kept current on the user.
    pub schema_id: &'a str,
    /// A new user's state: the identity's, so a deactivated identity's user starts inactive. An
    /// existing user's state is left alone; reconciliation owns its changes.
    pub state: UserState,
    /// What Ory records in `metadata_public.id` now; the write is queued unless it names the user.
    pub ory_has: Option<&'a str>,
    /// The backfill run linking, if one is: a user it creates is marked as the run's in the same
    /// transaction, so the run counts it as created even if it must do the page again.
    pub backfill_run: Option<i64>,
    /// The namespace kept in step with Ory's `external_id` (`IDMAP_ORY_EXTERNAL_ID_NAMESPACE`): a
    /// value the link gives the user there is queued for Ory unless Ory holds it already.
    pub mirrored: Option<&'a Namespace>,
    /// The identity's Ory `external_id`, in the mirrored namespace: adopted when the user holds no
    /// value there.
    pub ory_external_id: Option<&'a NamespacedId>,
}

/// The outcome of [`Store::link`].
#[derive(Debug)]
pub enum LinkResult {
    Linked(LinkOutcome),
    Conflict(LinkConflict),
}

/// Errors inside the link transaction: anything but `Store` rolls back and is then reported.
#[derive(Debug)]
pub(super) enum TxError {
    Store(StoreError),
    Conflict(LinkConflict),
    /// A concurrent link of the same identity committed first; start over to see it.
    LostRace,
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Store(StoreError::classify(e))
    }
}

/// A user row with its business ids, as [`ExternalIdPairs`] gives them.
pub(super) type UserWithIds = (UserRow, Vec<String>);

/// A user's business ids as one array of `namespace` U+001F `value`, ordered by namespace, from a
/// correlated subquery on `user_external_ids`'s `(user_id, namespace)` index: a user and every id
/// it holds in one round trip, one row and one extra index scan. U+001F cannot occur in either
/// part (namespaces are `[a-z0-9._-]`, values refuse control characters), so the split is exact.
/// Hand-written because diesel has no `ARRAY(subquery)`, and its SQL literals opt the whole
/// statement out of the prepared-statement cache, which would cost every lookup a round trip;
/// this carries a static query id, so the statement is prepared once per connection.
#[derive(Debug, Clone, Copy, diesel::query_builder::QueryId)]
pub(super) struct ExternalIdPairs;

impl Expression for ExternalIdPairs {
    type SqlType = diesel::sql_types::Array<diesel::sql_types::Text>;
}

impl<QS> AppearsOnTable<QS> for ExternalIdPairs {}

impl<QS> SelectableExpression<QS> for ExternalIdPairs {}

impl diesel::expression::ValidGrouping<()> for ExternalIdPairs {
    type IsAggregate = diesel::expression::is_aggregate::Never;
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for ExternalIdPairs {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        out.push_sql(
            "ARRAY(SELECT e.namespace || chr(31) || e.external_id FROM user_external_ids e \
             WHERE e.user_id = users.id ORDER BY e.namespace)",
        );
        Ok(())
    }
}

/// Users with all their business ids. A macro, because the query's type is unnameable.
macro_rules! select_users {
    () => {
        users::table.select((UserRow::as_select(), ExternalIdPairs))
    };
}

pub(super) fn into_user((row, pairs): UserWithIds) -> User {
    row.into_domain(pairs)
}

impl Store {
    /// The user linked to an Ory identity.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by identity"))]
    pub async fn user_by_identity(&self, id: IdentityId) -> Result<Option<User>, StoreError> {
        let row = self
            .lookup(|conn| async move {
                select_users!()
                    .filter(users::ory_identity_id.eq(id.as_uuid()))
                    .first::<UserWithIds>(&mut &**conn)
                    .await
                    .optional()
            })
            .await?;
        Ok(row.map(into_user))
    }

    /// The users linked to any of `ids`, in one query (two with a read replica that lacks some).
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by identities"))]
    pub async fn users_by_identities(&self, ids: &[IdentityId]) -> Result<Vec<User>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut uuids: Vec<uuid::Uuid> = ids.iter().map(IdentityId::as_uuid).collect();
        let mut rows: Vec<UserWithIds> = Vec::new();
        if let Some(replica) = self.replica_conn().await {
            let found = match replica {
                Ok(mut conn) => select_users!()
                    .filter(users::ory_identity_id.eq_any(&uuids))
                    .load::<UserWithIds>(&mut conn)
                    .await
                    .map_err(StoreError::classify),
                Err(e) => Err(e),
            };
            match found {
                Ok(found) => {
                    uuids.retain(|id| !found.iter().any(|(u, _)| u.ory_identity_id == *id));
                    rows = found;
                }
                Err(e) => tracing::debug!(error = %e, "read replica failed; asking the primary"),
            }
            if uuids.is_empty() {
                return Ok(rows.into_iter().map(into_user).collect());
            }
        }
        let mut conn = self.conn().await?;
        let primary: Vec<UserWithIds> = select_users!()
            .filter(users::ory_identity_id.eq_any(uuids))
            .load(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        rows.extend(primary);
        Ok(rows.into_iter().map(into_user).collect())
    }

    /// The user holding `value` in `namespace`.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by external id"))]
    pub async fn user_by_external_id(
        &self,
        namespace: &Namespace,
        value: &ExternalId,
    ) -> Result<Option<User>, StoreError> {
        let row = self
            .lookup(|conn| async move {
                users::table
                    .inner_join(user_external_ids::table)
                    .filter(user_external_ids::namespace.eq(namespace.as_str()))
                    .filter(user_external_ids::external_id.eq(value.as_str()))
                    .select((UserRow::as_select(), ExternalIdPairs))
                    .first::<UserWithIds>(&mut &**conn)
                    .await
                    .optional()
            })
            .await?;
        Ok(row.map(into_user))
    }

    /// Sets the stored schema id of the identity's user, if it has one and it differs. Returns the
    /// user as stored afterwards and whether this call changed it; `None` if no user is linked.
    pub async fn update_schema_id(
        &self,
        identity: IdentityId,
        schema_id: &str,
    ) -> Result<Option<(User, bool)>, StoreError> {
        let mut conn = self.conn().await?;
        let changed = diesel::update(
            users::table
                .filter(users::ory_identity_id.eq(identity.as_uuid()))
                .filter(users::schema_id.ne(schema_id)),
        )
        .set((
            users::schema_id.eq(schema_id),
            users::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)
        .await
        .map_err(StoreError::classify)?;
        let user = find_by_identity(&mut conn, identity)
            .await
            .map_err(StoreError::classify)?;
        Ok(user.map(|u| (u, changed > 0)))
    }

    /// Links an identity to a user in one transaction: creates (in the identity's state) or reuses
    /// the user (claiming it when the pre-persist hook left it pending), sets the external id, and
    /// queues the Ory `metadata_public.id` write in the outbox unless `facts.ory_has` (the id Ory
    /// records now) already names the user.
    ///
    /// Uniqueness is left to PostgreSQL's constraints (`INSERT .. ON CONFLICT DO NOTHING` waits for a
    /// concurrent insert of the same key to settle), so concurrent calls cannot create duplicates.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "link transaction"))]
    pub async fn link(
        &self,
        request: &LinkRequest,
        facts: &LinkFacts<'_>,
    ) -> Result<LinkResult, StoreError> {
        let mut conn = self.conn().await?;
        for _ in 0..LINK_ATTEMPTS {
            let result = conn
                .transaction::<_, TxError, _>(async |conn| link_in_tx(conn, request, facts).await)
                .await;
            match result {
                Ok(outcome) => return Ok(LinkResult::Linked(outcome)),
                Err(TxError::Conflict(conflict)) => return Ok(LinkResult::Conflict(conflict)),
                Err(TxError::Store(e)) => return Err(e),
                Err(TxError::LostRace) => continue,
            }
        }
        Err(StoreError::Unavailable(
            "the link kept racing concurrent links of the same identity".into(),
        ))
    }
}

pub(super) async fn find_by_identity(
    conn: &mut AsyncPgConnection,
    id: IdentityId,
) -> QueryResult<Option<User>> {
    let row: Option<UserWithIds> = select_users!()
        .filter(users::ory_identity_id.eq(id.as_uuid()))
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(into_user))
}

async fn link_in_tx(
    conn: &mut AsyncPgConnection,
    request: &LinkRequest,
    facts: &LinkFacts<'_>,
) -> Result<LinkOutcome, TxError> {
    let identity = request.ory_identity_id;
    // Lock the identity's user row so concurrent links of one identity run one after the other.
    let existing: Option<UserRow> = users::table
        .filter(users::ory_identity_id.eq(identity.as_uuid()))
        .select(UserRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?;
    let (user_id, created) = match existing {
        Some(row) => (relink(conn, row, request, facts.schema_id).await?, false),
        None => (link_new_user(conn, request, facts).await?, true),
    };
    let ory_external_id = facts.ory_external_id.map(|id| &id.value);
    let mut changed = false;
    let mut sync_external_id = false;
    for id in &request.external_ids {
        if let Given::Inserted { .. } = give(conn, user_id, id, false).await? {
            changed = true;
            sync_external_id |=
                facts.mirrored == Some(&id.namespace) && ory_external_id != Some(&id.value);
        }
    }
    let adoption = match facts.ory_external_id {
        Some(offered) => adopt(conn, user_id, offered).await?,
        None => None,
    };
    changed |= matches!(adoption, Some(Adoption::Adopted(_)));
    if changed && !created {
        touch(conn, user_id).await?;
    }
    if facts.ory_has != Some(user_id.to_string().as_str()) {
        outbox::enqueue(conn, OutboxKind::SetMetadataPublicId, identity, user_id).await?;
    }
    if sync_external_id {
        outbox::enqueue(conn, OutboxKind::SyncExternalId, identity, user_id).await?;
    }
    let user = find_by_identity(conn, identity)
        .await?
        .ok_or(TxError::LostRace)?;
    Ok(LinkOutcome {
        user,
        created,
        adoption,
    })
}

/// A link of an identity that has a user (`row`, locked): checks the request against it and keeps
/// the schema id current.
async fn relink(
    conn: &mut AsyncPgConnection,
    row: UserRow,
    request: &LinkRequest,
    schema_id: &str,
) -> Result<UserId, TxError> {
    let user_id = UserId::from_uuid(row.id);
    if let Some(wanted) = request.user_id
        && wanted != user_id
    {
        return Err(TxError::Conflict(LinkConflict::IdentityLinked { user_id }));
    }
    if row.schema_id != schema_id {
        diesel::update(users::table.find(row.id))
            .set((
                users::schema_id.eq(schema_id),
                users::updated_at.eq(diesel::dsl::now),
            ))
            .execute(conn)
            .await?;
    }
    Ok(user_id)
}

/// The first link of an identity: inserts its user (the requested id, or a new one), claiming a
/// pending user of that id.
async fn link_new_user(
    conn: &mut AsyncPgConnection,
    request: &LinkRequest,
    facts: &LinkFacts<'_>,
) -> Result<UserId, TxError> {
    let identity = request.ory_identity_id;
    let user_id = request.user_id.unwrap_or_else(UserId::mint);
    let inserted = diesel::insert_into(users::table)
        .values(NewUserRow {
            id: user_id.as_uuid(),
            ory_identity_id: identity.as_uuid(),
            schema_id: facts.schema_id,
            state: facts.state.as_str(),
        })
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    if inserted == 0 {
        // Either the user id is taken by another identity, or a concurrent link of this
        // identity committed after our SELECT.
        let holder: Option<uuid::Uuid> = users::table
            .find(user_id.as_uuid())
            .select(users::ory_identity_id)
            .first(conn)
            .await
            .optional()?;
        return match holder {
            Some(other) if other != identity.as_uuid() => {
                Err(TxError::Conflict(LinkConflict::UserLinked {
                    ory_identity_id: IdentityId::from_uuid(other),
                }))
            }
            _ => Err(TxError::LostRace),
        };
    }
    // Claims the user if the pre-persist hook minted it: from now on it is an ordinary user, and
    // the sweep must not see it as an abandoned reservation.
    diesel::delete(pending_users::table.find(user_id.as_uuid()))
        .execute(conn)
        .await?;
    if let Some(run) = facts.backfill_run {
        super::backfill_runs::mark_created(conn, run, identity).await?;
    }
    Ok(user_id)
}

/// What [`give`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Given {
    /// The user held that value already.
    Unchanged,
    /// The user holds it now; `replaced` is the value it gave up for it.
    Inserted { replaced: Option<ExternalId> },
}

/// Gives `user` (whose row the caller has locked) the value `id` in its namespace. A different value
/// held there is an [`LinkConflict::ExternalIdAlreadySet`] conflict unless `replace`, which keeps it
/// as a former value; a value another user holds is [`LinkConflict::ExternalIdTaken`].
pub(super) async fn give(
    conn: &mut AsyncPgConnection,
    user: UserId,
    id: &NamespacedId,
    replace: bool,
) -> Result<Given, TxError> {
    let current = current_value(conn, user, &id.namespace).await?;
    let replaced = match current {
        Some(current) if current == id.value.as_str() => return Ok(Given::Unchanged),
        Some(current) if !replace => {
            return Err(TxError::Conflict(LinkConflict::ExternalIdAlreadySet {
                namespace: id.namespace.clone(),
                external_id: ExternalId::from_trusted(current),
            }));
        }
        Some(current) => {
            let current = ExternalId::from_trusted(current);
            release(conn, user, &id.namespace).await?;
            Some(current)
        }
        None => None,
    };
    if insert_value(conn, user, id).await? {
        return Ok(Given::Inserted { replaced });
    }
    let holder: Option<uuid::Uuid> = user_external_ids::table
        .find((id.namespace.as_str(), id.value.as_str()))
        .select(user_external_ids::user_id)
        .first(conn)
        .await
        .optional()?;
    Err(TxError::Conflict(LinkConflict::ExternalIdTaken {
        namespace: id.namespace.clone(),
        value: id.value.clone(),
        user_id: holder.map(UserId::from_uuid),
    }))
}

/// Adopts the identity's Ory `external_id` (`offered`, in the mirrored namespace) when the user
/// holds no value there. A value another user holds is reported, never taken from it.
async fn adopt(
    conn: &mut AsyncPgConnection,
    user: UserId,
    offered: &NamespacedId,
) -> Result<Option<Adoption>, TxError> {
    if current_value(conn, user, &offered.namespace)
        .await?
        .is_some()
    {
        return Ok(None);
    }
    if insert_value(conn, user, offered).await? {
        return Ok(Some(Adoption::Adopted(offered.value.clone())));
    }
    let holder: Option<uuid::Uuid> = user_external_ids::table
        .find((offered.namespace.as_str(), offered.value.as_str()))
        .select(user_external_ids::user_id)
        .first(conn)
        .await
        .optional()?;
    Ok(holder.map(|holder| Adoption::TakenBy {
        value: offered.value.clone(),
        user_id: UserId::from_uuid(holder),
    }))
}

/// The user's value in `namespace`.
pub(super) async fn current_value(
    conn: &mut AsyncPgConnection,
    user: UserId,
    namespace: &Namespace,
) -> QueryResult<Option<String>> {
    user_external_ids::table
        .filter(user_external_ids::user_id.eq(user.as_uuid()))
        .filter(user_external_ids::namespace.eq(namespace.as_str()))
        .select(user_external_ids::external_id)
        .first(conn)
        .await
        .optional()
}

/// Inserts the value unless another row holds it; whether it was inserted.
async fn insert_value(
    conn: &mut AsyncPgConnection,
    user: UserId,
    id: &NamespacedId,
) -> QueryResult<bool> {
    let inserted = diesel::insert_into(user_external_ids::table)
        .values(NewExternalIdRow {
            namespace: id.namespace.as_str(),
            external_id: id.value.as_str(),
            user_id: user.as_uuid(),
        })
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

/// Removes the user's value in `namespace`, keeping it as a former value (the user that last held
/// it); the value removed, if there was one.
pub(super) async fn release(
    conn: &mut AsyncPgConnection,
    user: UserId,
    namespace: &Namespace,
) -> QueryResult<Option<ExternalId>> {
    let removed: Option<String> = diesel::delete(
        user_external_ids::table
            .filter(user_external_ids::user_id.eq(user.as_uuid()))
            .filter(user_external_ids::namespace.eq(namespace.as_str())),
    )
    .returning(user_external_ids::external_id)
    .get_result(conn)
    .await
    .optional()?;
    if let Some(value) = &removed {
        diesel::insert_into(former_external_ids::table)
            .values((
                former_external_ids::namespace.eq(namespace.as_str()),
                former_external_ids::external_id.eq(value),
                former_external_ids::user_id.eq(user.as_uuid()),
            ))
            .on_conflict((
                former_external_ids::namespace,
                former_external_ids::external_id,
            ))
            .do_update()
            .set((
                former_external_ids::user_id.eq(user.as_uuid()),
                former_external_ids::released_at.eq(diesel::dsl::now),
            ))
            .execute(conn)
            .await?;
    }
    Ok(removed.map(ExternalId::from_trusted))
}

/// Marks the user changed.
pub(super) async fn touch(conn: &mut AsyncPgConnection, user: UserId) -> QueryResult<()> {
    diesel::update(users::table.find(user.as_uuid()))
        .set(users::updated_at.eq(diesel::dsl::now))
        .execute(conn)
        .await
        .map(|_| ())
}

impl Store {
    /// Sets a user's state; returns the user as stored afterwards, and whether this call changed it
    /// (`None`: no such user).
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "update user state"))]
    pub async fn set_user_state(
        &self,
        user_id: UserId,
        state: UserState,
    ) -> Result<Option<(User, bool)>, StoreError> {
        let mut conn = self.conn().await?;
        let changed = diesel::update(
            users::table
                .find(user_id.as_uuid())
                .filter(users::state.ne(state.as_str())),
        )
        .set((
            users::state.eq(state.as_str()),
            users::updated_at.eq(diesel::dsl::now),
        ))
        .returning(users::ory_identity_id)
        .get_result::<uuid::Uuid>(&mut conn)
        .await
        .optional()
        .map_err(StoreError::classify)?;
        let identity = match changed {
            Some(identity) => identity,
            None => {
                let found: Option<uuid::Uuid> = users::table
                    .find(user_id.as_uuid())
                    .select(users::ory_identity_id)
                    .first(&mut conn)
                    .await
                    .optional()
                    .map_err(StoreError::classify)?;
                match found {
                    Some(identity) => identity,
                    None => return Ok(None),
                }
            }
        };
        let user = find_by_identity(&mut conn, IdentityId::from_uuid(identity))
            .await
            .map_err(StoreError::classify)?;
        Ok(user.map(|u| (u, changed.is_some())))
    }

    /// Up to `limit` users in identity-id order, starting after `after` (keyset pagination, so a
    /// walk over every user costs one index scan per page however many there are).
    pub async fn users_after_identity(
        &self,
        after: Option<IdentityId>,
        limit: i64,
    ) -> Result<Vec<User>, StoreError> {
        let mut conn = self.conn().await?;
        let after = after.map_or(uuid::Uuid::nil(), |id| id.as_uuid());
        let rows: Vec<UserWithIds> = select_users!()
            .filter(users::ory_identity_id.gt(after))
            .order(users::ory_identity_id)
            .limit(limit)
            .load(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        Ok(rows.into_iter().map(into_user).collect())
    }
}
