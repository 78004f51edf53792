-- The identities an unfinished `idmap backfill` run has dealt with, so that a run doing pages again
-- counts each identity once:
-- - after a crash in the middle of a page, the page is done again; a user the run created before the
--   crash is then found linked, and `created` says it still counts as created, not already linked;
-- - after Ory refused the saved page token (current Kratos's tokens expire after an hour), the walk
--   starts again from the first page, and identities `counted` on an earlier page are skipped.
-- The rows of a run are deleted when it finishes (or `--restart` abandons it): its totals are in
-- backfill_runs.
CREATE TABLE backfill_run_identities (
    run_id          bigint  NOT NULL REFERENCES backfill_runs (id) ON DELETE CASCADE,
    ory_identity_id uuid    NOT NULL,
    -- The run created the identity's user; written in the link's transaction.
    created         boolean NOT NULL DEFAULT false,
    -- The run counted the identity; written with its page's counts and the cursor.
    counted         boolean NOT NULL DEFAULT false,
    CONSTRAINT backfill_run_identities_pkey PRIMARY KEY (run_id, ory_identity_id)
);
