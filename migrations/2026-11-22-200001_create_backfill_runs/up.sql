-- One row per `idmap backfill` run. The run records, after each page it has fully processed, the token
-- of the next page to read, so a run that stops (Ctrl-C, a crash, an Ory outage outlasting the
-- retries) resumes there instead of walking every identity again. Counters are saved with the cursor,
-- so they count exactly the pages the cursor has passed.
CREATE TABLE backfill_runs (
    id             bigserial   PRIMARY KEY,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- Set when the walk reached the last page, or when `--restart` abandoned the run.
    finished_at    timestamptz,
    -- Ory's opaque page token of the next page to read; NULL: the first page.
    cursor         text,
    pages          bigint      NOT NULL DEFAULT 0,
    scanned        bigint      NOT NULL DEFAULT 0,
    created        bigint      NOT NULL DEFAULT 0,
    already_linked bigint      NOT NULL DEFAULT 0,
    queued         bigint      NOT NULL DEFAULT 0,
    drifted        bigint      NOT NULL DEFAULT 0,
    failed         bigint      NOT NULL DEFAULT 0
);

-- At most one unfinished run: it is the one a new `idmap backfill` resumes.
CREATE UNIQUE INDEX backfill_runs_one_open_key ON backfill_runs ((true)) WHERE finished_at IS NULL;
