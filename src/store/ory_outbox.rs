use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Integer, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::{IdentityId, UserId};

/// A write to Ory that the outbox delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    /// Write the internal user id to the identity's `metadata_public.id`.
    SetMetadataPublicId,
    /// Make the identity's `external_id` what the user holds in the mirrored namespace now (or
    /// clear it when the user holds nothing there).
    SyncExternalId,
}

impl OutboxKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::SetMetadataPublicId => "set_metadata_public_id",
            Self::SyncExternalId => "sync_external_id",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "set_metadata_public_id" => Some(Self::SetMetadataPublicId),
            "sync_external_id" => Some(Self::SyncExternalId),
            _ => None,
        }
    }
}

/// A claimed outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    /// `None` for a kind this version does not know (written by a newer replica).
    pub kind: Option<OutboxKind>,
    pub kind_name: String,
    pub ory_identity_id: IdentityId,
    pub user_id: UserId,
    /// Attempts so far, this one included.
    pub attempts: i32,
    /// The row's revision when claimed: a change queued since bumps it.
    pub revision: i64,
}

#[derive(QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = SqlUuid)]
    ory_identity_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    user_id: Uuid,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = BigInt)]
    revision: i64,
}

#[derive(QueryableByName)]
struct Seconds {
    #[diesel(sql_type = diesel::sql_types::Nullable<Double>)]
    seconds: Option<f64>,
}

/// Queues a write; a pending write of the same kind for the identity absorbs it, and its revision is
/// bumped, so a worker delivering it at this moment (with what the store held before this change)
/// delivers it again instead of removing it.
pub(super) async fn enqueue(
    conn: &mut AsyncPgConnection,
    kind: OutboxKind,
    identity: IdentityId,
    user: UserId,
) -> QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO ory_outbox (kind, ory_identity_id, user_id) VALUES ($1, $2, $3) \
         ON CONFLICT (kind, ory_identity_id) WHERE failed_at IS NULL \
         DO UPDATE SET revision = ory_outbox.revision + 1, user_id = EXCLUDED.user_id",
    )
    .bind::<Text, _>(kind.as_str())
    .bind::<SqlUuid, _>(identity.as_uuid())
    .bind::<SqlUuid, _>(user.as_uuid())
    .execute(conn)
    .await
    .map(|_| ())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Store {
    /// Claims up to `limit` due rows for `lease`: they are invisible to other workers until the
    /// lease runs out, so a worker that dies mid-delivery delays a row but never loses it.
    pub async fn claim_outbox(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<ClaimedRow> = diesel::sql_query(
            "UPDATE ory_outbox SET next_attempt_at = now() + make_interval(secs => $2), \
                 attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM ory_outbox \
                 WHERE failed_at IS NULL AND next_attempt_at <= now() \
                 ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, kind, ory_identity_id, user_id, attempts, revision",
        )
        .bind::<BigInt, _>(limit)
        .bind::<Double, _>(secs(lease))
        .load(&mut conn)
        .await
        .map_err(StoreError::classify)?;
        Ok(rows
            .into_iter()
            .map(|r| OutboxRow {
                id: r.id,
                kind: OutboxKind::parse(&r.kind),
                kind_name: r.kind,
                ory_identity_id: IdentityId::from_uuid(r.ory_identity_id),
                user_id: UserId::from_uuid(r.user_id),
                attempts: r.attempts,
                revision: r.revision,
            })
            .collect())
    }

    /// Removes a delivered row, unless a change was queued onto it since it was claimed at
    /// `revision`: then it is made due again at once, so the newer state is delivered too.
    /// Returns whether the row was removed.
    pub async fn complete_outbox(&self, id: i64, revision: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let removed = diesel::sql_query("DELETE FROM ory_outbox WHERE id = $1 AND revision = $2")
            .bind::<BigInt, _>(id)
            .bind::<BigInt, _>(revision)
            .execute(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        if removed == 1 {
            return Ok(true);
        }
        diesel::sql_query(
            "UPDATE ory_outbox SET next_attempt_at = now(), attempts = 0, last_error = NULL \
             WHERE id = $1 AND failed_at IS NULL",
        )
        .bind::<BigInt, _>(id)
        .execute(&mut conn)
        .await
        .map_err(StoreError::classify)?;
        Ok(false)
    }

    /// Schedules another attempt after `delay`, recording why this one failed.
    pub async fn retry_outbox(
        &self,
        id: i64,
        delay: Duration,
        error: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "UPDATE ory_outbox SET next_attempt_at = now() + make_interval(secs => $2), \
             last_error = $3 WHERE id = $1",
        )
        .bind::<BigInt, _>(id)
        .bind::<Double, _>(secs(delay))
        .bind::<Text, _>(error)
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(StoreError::classify)
    }

    /// Makes claimed rows due again at once, for another worker or the next start: a worker that
    /// stops (or runs short of lease) gives back what it will not deliver instead of leaving it
    /// invisible until the lease runs out. `undo_attempt` takes back the attempt the claim counted,
    /// for rows that were never tried.
    pub async fn release_outbox(&self, ids: &[i64], undo_attempt: bool) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "UPDATE ory_outbox SET next_attempt_at = now(), \
                 attempts = CASE WHEN $2 THEN GREATEST(attempts - 1, 0) ELSE attempts END \
             WHERE id = ANY($1) AND failed_at IS NULL",
        )
        .bind::<diesel::sql_types::Array<BigInt>, _>(ids)
        .bind::<diesel::sql_types::Bool, _>(undo_attempt)
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(StoreError::classify)
    }

    /// Parks a row that retrying cannot fix; it stays for operators to see.
    pub async fn fail_outbox(&self, id: i64, error: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query("UPDATE ory_outbox SET failed_at = now(), last_error = $2 WHERE id = $1")
            .bind::<BigInt, _>(id)
            .bind::<Text, _>(error)
            .execute(&mut conn)
            .await
            .map(|_| ())
            .map_err(StoreError::classify)
    }

    /// How long until the next pending row is due (zero if one is due now); `None` if none is pending.
    pub async fn next_outbox_due(&self) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.conn().await?;
        let row: Seconds = diesel::sql_query(
            "SELECT EXTRACT(EPOCH FROM (min(next_attempt_at) - now()))::float8 AS seconds \
             FROM ory_outbox WHERE failed_at IS NULL",
        )
        .get_result(&mut conn)
        .await
        .map_err(StoreError::classify)?;
        Ok(row
            .seconds
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0))))
    }

    /// Rows waiting for delivery (not parked as failed).
    pub async fn pending_outbox(&self) -> Result<i64, StoreError> {
        use super::schema::ory_outbox::dsl;
        let mut conn = self.conn().await?;
        dsl::ory_outbox
            .filter(dsl::failed_at.is_null())
            .count()
            .get_result(&mut conn)
            .await
            .map_err(StoreError::classify)
    }
}

impl Store {
    /// Queues writing `user` to the identity's `metadata_public.id` on its own (reconciliation's
    /// repair); a pending write for the identity absorbs it.
    pub async fn queue_metadata_public_id(
        &self,
        identity: IdentityId,
        user: UserId,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        enqueue(&mut conn, OutboxKind::SetMetadataPublicId, identity, user)
            .await
            .map_err(StoreError::classify)
    }
}
