//! `backfill_runs`: where an `idmap backfill` run is, so an interrupted one resumes.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::backfill_runs;
use super::{Store, StoreError};

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
            diesel::update(backfill_runs::table.filter(backfill_runs::finished_at.is_null()))
                .set(backfill_runs::finished_at.eq(diesel::dsl::now))
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

    /// Records a processed page: adds its counts and moves the cursor to the next page, in one
    /// statement, so the counters always describe exactly the pages before the cursor. `finished`
    /// closes the run (the page was the last).
    pub async fn advance_backfill_run(
        &self,
        run_id: i64,
        cursor: Option<&str>,
        page: BackfillCounts,
        finished: bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
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
            .execute(&mut conn)
            .await
            .map(|_| ())
            .map_err(StoreError::classify)
    }
}
