//! Pending users: ids minted by the pre-persist registration hook before Ory has stored (and so
//! numbered) the identity. Claiming one is part of the link transaction (`users.rs`); this file
//! reserves and sweeps them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;

use super::schema::pending_users;
use super::{Store, StoreError};
use crate::domain::UserId;

/// Rows deleted per statement by the sweep, so one sweep never holds many row locks at once.
const SWEEP_BATCH: i64 = 500;

impl Store {
    /// Records `id` as a pending user of schema `schema_id`, unless it is one already or a user with
    /// that id exists (a claimed reservation must not come back).
    pub async fn reserve_pending_user(
        &self,
        id: UserId,
        schema_id: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "INSERT INTO pending_users (id, schema_id) \
             SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM users WHERE id = $1) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind::<SqlUuid, _>(id.as_uuid())
        .bind::<Text, _>(schema_id)
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(StoreError::classify)
    }

    /// Whether `id` is a pending (reserved, unclaimed) user.
    pub async fn is_pending_user(&self, id: UserId) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        pending_users::table
            .find(id.as_uuid())
            .select(pending_users::id)
            .first::<uuid::Uuid>(&mut conn)
            .await
            .optional()
            .map(|row| row.is_some())
            .map_err(StoreError::classify)
    }

    /// Deletes pending users created before `cutoff`; returns how many. Rows a concurrent claim has
    /// locked are skipped (the claim deletes them itself), so the sweep never waits on a link.
    pub async fn sweep_pending_users(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        let mut total = 0u64;
        loop {
            let deleted = diesel::sql_query(
                "DELETE FROM pending_users WHERE id IN (SELECT id FROM pending_users \
                 WHERE created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind::<Timestamptz, _>(cutoff)
            .bind::<BigInt, _>(SWEEP_BATCH)
            .execute(&mut conn)
            .await
            .map_err(StoreError::classify)?;
            total += deleted as u64;
            if (deleted as i64) < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }
}
