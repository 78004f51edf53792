//! `backfill_runs`: where an `idmap backfill` run is, so an interrupted one resumes; and
//! `backfill_run_identities`: which identities it has created users for and counted, so pages done
//! twice (after a crash mid-page, or a walk started again from the first page) are counted once.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::schema::{backfill_run_identities, backfill_runs};
use super::{Store, StoreError};
use crate::domain::IdentityId;

/// What a run has counted so far, over the pages its cursor has passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillCounts {
    pub pages: i64,
    pub scanned: i64,
    pub created: i64,
    pub already_linked: i64,
    pub queued: i64,
    pub drifted: i64,
    pub failed: i64,
}

impl std::ops::AddAssign for BackfillCounts {
    fn add_assign(&mut self, other: Self) {
        self.pages += other.pages;
        self.scanned += other.scanned;
        self.created += other.created;
        self.already_linked += other.already_linked;
        self.queued += other.queued;
        self.drifted += other.drifted;
        self.failed += other.failed;
    }
}

/// What an unfinished run has already done with an identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunProgress {
    /// The run created the identity's user.
    pub created: bool,
    /// The identity is in the run's counts already.
    pub counted: bool,
}

/// An unfinished run.
#[derive(Debug, Clone)]
pub struct BackfillRun {
    pub id: i64,
    pub started_at: DateTime<Utc>,
    /// The page token to read next; `None`: the first page.
    pub cursor: Option<String>,
    pub counts: BackfillCounts,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = backfill_runs, check_for_backend(diesel::pg::Pg))]
struct RunRow {
    id: i64,
    started_at: DateTime<Utc>,
    cursor: Option<String>,
    pages: i64,
    scanned: i64,
    created: i64,
    already_linked: i64,
    queued: i64,
    drifted: i64,
    failed: i64,
}

impl From<RunRow> for BackfillRun {
    fn from(row: RunRow) -> Self {
        Self {
            id: row.id,
            started_at: row.started_at,
            cursor: row.cursor,
            counts: BackfillCounts {
                pages: row.pages,
                scanned: row.scanned,
                created: row.created,
                already_linked: row.already_linked,
                queued: row.queued,
                drifted: row.drifted,
                failed: row.failed,
            },
        }
    }
}

impl Store {
    /// The unfinished run, if there is one.
    pub async fn open_backfill_run(&self) -> Result<Option<BackfillRun>, StoreError> {
        let mut conn = self.conn().await?;
        let row: Option<RunRow> = backfill_runs::table
            .filter(backfill_runs::finished_at.is_null())
            .select(RunRow::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(StoreError::classify)?;
        Ok(row.map(Into::into))
    }

    /// Resumes the unfinished run, or starts one when there is none. `restart` first closes the
    /// unfinished run (it stays in the table, finished, for the record).
    pub async fn begin_backfill_run(&self, restart: bool) -> Result<BackfillRun, StoreError> {
        let mut conn = self.conn().await?;
        if restart {
            let abandoned: Vec<i64> =
                diesel::update(backfill_runs::table.filter(backfill_runs::finished_at.is_null()))
                    .set(backfill_runs::finished_at.eq(diesel::dsl::now))
                    .returning(backfill_runs::id)
                    .get_results(&mut conn)
                    .await
                    .map_err(StoreError::classify)?;
            diesel::delete(
                backfill_run_identities::table
                    .filter(backfill_run_identities::run_id.eq_any(abandoned)),
            )
            .execute(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        }
        // The unique index on unfinished runs makes a concurrent start insert nothing here; the
        // SELECT below then finds the run the other start made.
        diesel::sql_query(
            "INSERT INTO backfill_runs DEFAULT VALUES ON CONFLICT ((true)) WHERE finished_at IS NULL DO NOTHING",
        )
        .execute(&mut conn)
        .await
        .map_err(StoreError::classify)?;
        let row: RunRow = backfill_runs::table
            .filter(backfill_runs::finished_at.is_null())
            .select(RunRow::as_select())
            .first(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        Ok(row.into())
    }

    /// What the run has done with each of `ids` (identities it has not touched are absent).
    pub async fn backfill_progress(
        &self,
        run_id: i64,
        ids: &[IdentityId],
    ) -> Result<HashMap<IdentityId, RunProgress>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let uuids: Vec<uuid::Uuid> = ids.iter().map(IdentityId::as_uuid).collect();
        let mut conn = self.conn().await?;
        let rows: Vec<(uuid::Uuid, bool, bool)> = backfill_run_identities::table
            .filter(backfill_run_identities::run_id.eq(run_id))
            .filter(backfill_run_identities::ory_identity_id.eq_any(uuids))
            .select((
                backfill_run_identities::ory_identity_id,
                backfill_run_identities::created,
                backfill_run_identities::counted,
            ))
            .load(&mut conn)
            .await
            .map_err(StoreError::classify)?;
        Ok(rows
            .into_iter()
            .map(|(id, created, counted)| {
                (IdentityId::from_uuid(id), RunProgress { created, counted })
            })
            .collect())
    }

    /// Records a processed page in one transaction: adds its counts, marks its identities
    /// (`counted`) as in them, and moves the cursor to the next page, so the counters always
    /// describe exactly the identities marked. `finished` closes the run (the page was the last)
    /// and drops its marks, which only an unfinished run needs.
    pub async fn advance_backfill_run(
        &self,
        run_id: i64,
        cursor: Option<&str>,
        page: BackfillCounts,
        counted: &[IdentityId],
        finished: bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let counted: Vec<uuid::Uuid> = counted.iter().map(IdentityId::as_uuid).collect();
        conn.transaction::<_, diesel::result::Error, _>(async |conn| {
            let finished_at = finished.then(Utc::now);
            diesel::update(backfill_runs::table.find(run_id))
                .set((
                    backfill_runs::cursor.eq(cursor),
                    backfill_runs::pages.eq(backfill_runs::pages + page.pages),
                    backfill_runs::scanned.eq(backfill_runs::scanned + page.scanned),
                    backfill_runs::created.eq(backfill_runs::created + page.created),
                    backfill_runs::already_linked
                        .eq(backfill_runs::already_linked + page.already_linked),
                    backfill_runs::queued.eq(backfill_runs::queued + page.queued),
                    backfill_runs::drifted.eq(backfill_runs::drifted + page.drifted),
                    backfill_runs::failed.eq(backfill_runs::failed + page.failed),
                    backfill_runs::updated_at.eq(diesel::dsl::now),
                    backfill_runs::finished_at.eq(finished_at),
                ))
                .execute(conn)
                .await?;
            if finished {
                diesel::delete(
                    backfill_run_identities::table
                        .filter(backfill_run_identities::run_id.eq(run_id)),
                )
                .execute(conn)
                .await?;
            } else {
                diesel::sql_query(
                    "INSERT INTO backfill_run_identities (run_id, ory_identity_id, counted) \
                     SELECT $1, unnest($2), true \
                     ON CONFLICT (run_id, ory_identity_id) DO UPDATE SET counted = true",
                )
                .bind::<BigInt, _>(run_id)
                .bind::<Array<SqlUuid>, _>(&counted)
                .execute(conn)
                .await?;
            }
            Ok(())
        })
        .await
        .map_err(StoreError::classify)
    }
}

/// Inside a link's transaction: the run created this identity's user.
pub(super) async fn mark_created(
    conn: &mut AsyncPgConnection,
    run_id: i64,
    identity: IdentityId,
) -> QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO backfill_run_identities (run_id, ory_identity_id, created) VALUES ($1, $2, true) \
         ON CONFLICT (run_id, ory_identity_id) DO UPDATE SET created = true",
    )
    .bind::<BigInt, _>(run_id)
    .bind::<SqlUuid, _>(identity.as_uuid())
    .execute(conn)
    .await
    .map(|_| ())
}
