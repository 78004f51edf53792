DROP TABLE backfill_run_identities;
