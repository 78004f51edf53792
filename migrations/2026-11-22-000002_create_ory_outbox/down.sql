DROP TABLE ory_outbox;
