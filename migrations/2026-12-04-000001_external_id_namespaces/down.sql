ALTER TABLE ory_outbox DROP COLUMN revision;
DROP TABLE former_external_ids;
ALTER TABLE user_external_ids DROP CONSTRAINT user_external_ids_namespace_check;
