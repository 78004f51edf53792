use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::models::{NewExternalIdRow, NewUserRow, UserRow};
use super::ory_outbox::{self as outbox, OutboxKind};
use super::schema::{pending_users, user_external_ids, users};
use super::{Store, StoreError};
use crate::domain::{
    ExternalId, IdentityId, LinkConflict, LinkOutcome, LinkRequest, User, UserId, UserState,
};

/// Today every external id lives in the default namespace; the column leaves room for more.
const DEFAULT_NAMESPACE: &str = "";

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
}

/// The outcome of [`Store::link`].
#[derive(Debug)]
pub enum LinkResult {
    Linked(LinkOutcome),
    Conflict(LinkConflict),
}

/// Errors inside the link transaction: anything but `Store` rolls back and is then reported.
#[derive(Debug)]
enum TxError {
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

type UserWithExternalId = (UserRow, Option<String>);

/// Users with their default-namespace external id. A macro, because the query's type is unnameable.
macro_rules! select_users {
    () => {
        users::table
            .left_join(
                user_external_ids::table.on(user_external_ids::user_id
                    .eq(users::id)
                    .and(user_external_ids::namespace.eq(DEFAULT_NAMESPACE))),
            )
            .select((
                UserRow::as_select(),
                user_external_ids::external_id.nullable(),
            ))
    };
}

impl Store {
    /// The user linked to an Ory identity.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by identity"))]
    pub async fn user_by_identity(&self, id: IdentityId) -> Result<Option<User>, StoreError> {
        let row = self
            .lookup(|conn| async move {
                select_users!()
                    .filter(users::ory_identity_id.eq(id.as_uuid()))
                    .first::<UserWithExternalId>(&mut &**conn)
                    .await
                    .optional()
            })
            .await?;
        Ok(row.map(|(user, ext)| user.into_domain(ext)))
    }

    /// The users linked to any of `ids`, in one query (two with a read replica that lacks some).
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by identities"))]
    pub async fn users_by_identities(&self, ids: &[IdentityId]) -> Result<Vec<User>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut uuids: Vec<uuid::Uuid> = ids.iter().map(IdentityId::as_uuid).collect();
        let mut rows: Vec<UserWithExternalId> = Vec::new();
        if let Some(replica) = self.replica_conn().await {
            let found = match replica {
                Ok(mut conn) => select_users!()
                    .filter(users::ory_identity_id.eq_any(&uuids))
                    .load::<UserWithExternalId>(&mut conn)
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
                return Ok(rows
                    .into_iter()
                    .map(|(u, ext)| u.into_domain(ext))
                    .collect());
            }
        }
        let mut conn = self.conn().await?;
        let primary: Vec<UserWithExternalId> = select_users!()
            .filter(users::ory_identity_id.eq_any(uuids))
            .load(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        rows.extend(primary);
        Ok(rows
            .into_iter()
            .map(|(user, ext)| user.into_domain(ext))
            .collect())
    }

    /// The user holding an external id.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select users by external id"))]
    pub async fn user_by_external_id(
        &self,
        external_id: &ExternalId,
    ) -> Result<Option<User>, StoreError> {
        let row = self
            .lookup(|conn| async move {
                users::table
                    .inner_join(user_external_ids::table)
                    .filter(user_external_ids::namespace.eq(DEFAULT_NAMESPACE))
                    .filter(user_external_ids::external_id.eq(external_id.as_str()))
                    .select((
                        UserRow::as_select(),
                        user_external_ids::external_id.nullable(),
                    ))
                    .first::<UserWithExternalId>(&mut &**conn)
                    .await
                    .optional()
            })
            .await?;
        Ok(row.map(|(user, ext)| user.into_domain(ext)))
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

async fn find_by_identity(
    conn: &mut AsyncPgConnection,
    id: IdentityId,
) -> QueryResult<Option<User>> {
    let row: Option<UserWithExternalId> = select_users!()
        .filter(users::ory_identity_id.eq(id.as_uuid()))
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(|(user, ext)| user.into_domain(ext)))
}

async fn link_in_tx(
    conn: &mut AsyncPgConnection,
    request: &LinkRequest,
    facts: &LinkFacts<'_>,
) -> Result<LinkOutcome, TxError> {
    let identity = request.ory_identity_id;
    // Lock the identity's user row so concurrent links of one identity run one after the other.
    // (PostgreSQL cannot lock the nullable side of an outer join, so the user row is locked on its
    // own and its external id read after.)
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
    if facts.ory_has != Some(user_id.to_string().as_str()) {
        outbox::enqueue(conn, OutboxKind::SetMetadataPublicId, identity, user_id).await?;
    }
    let user = find_by_identity(conn, identity)
        .await?
        .ok_or(TxError::LostRace)?;
    Ok(LinkOutcome { user, created })
}

/// A link of an identity that has a user (`row`, locked): checks the request against it, adds
/// the external id if the user has none, and keeps the schema id current.
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
    let mut changed = false;
    if let Some(wanted) = &request.external_id {
        let current: Option<String> = user_external_ids::table
            .filter(user_external_ids::user_id.eq(row.id))
            .filter(user_external_ids::namespace.eq(DEFAULT_NAMESPACE))
            .select(user_external_ids::external_id)
            .first(conn)
            .await
            .optional()?;
        match current {
            Some(current) if current == wanted.as_str() => {}
            Some(current) => {
                return Err(TxError::Conflict(LinkConflict::ExternalIdAlreadySet {
                    external_id: ExternalId::from_trusted(current),
                }));
            }
            None => {
                insert_external_id(conn, user_id, wanted).await?;
                changed = true;
            }
        }
    }
    if row.schema_id != schema_id || changed {
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
/// pending user of that id, with the external id asked for.
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
    if let Some(external_id) = &request.external_id {
        insert_external_id(conn, user_id, external_id).await?;
    }
    if let Some(run) = facts.backfill_run {
        super::backfill_runs::mark_created(conn, run, identity).await?;
    }
    Ok(user_id)
}

async fn insert_external_id(
    conn: &mut AsyncPgConnection,
    user_id: UserId,
    external_id: &ExternalId,
) -> Result<(), TxError> {
    let inserted = diesel::insert_into(user_external_ids::table)
        .values(NewExternalIdRow {
            namespace: DEFAULT_NAMESPACE,
            external_id: external_id.as_str(),
            user_id: user_id.as_uuid(),
        })
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    if inserted == 1 {
        return Ok(());
    }
    let holder: Option<uuid::Uuid> = user_external_ids::table
        .find((DEFAULT_NAMESPACE, external_id.as_str()))
        .select(user_external_ids::user_id)
        .first(conn)
        .await
        .optional()?;
    Err(TxError::Conflict(LinkConflict::ExternalIdTaken {
        user_id: holder.map(UserId::from_uuid),
    }))
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
        let rows: Vec<UserWithExternalId> = select_users!()
            .filter(users::ory_identity_id.gt(after))
            .order(users::ory_identity_id)
            .limit(limit)
            .load(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        Ok(rows
            .into_iter()
            .map(|(user, ext)| user.into_domain(ext))
            .collect())
    }
}
