DROP TABLE backfill_runs;
