-- Business ids in namespaces: a user holds at most one value per namespace and any number of
-- namespaces; a value is unique within its namespace. Every id stored so far is in the default
-- namespace '' and stays there. A namespace is '' or 1 to 64 of [a-z0-9._-], starting with a letter
-- or digit (the same rule the API applies).
ALTER TABLE user_external_ids
    ADD CONSTRAINT user_external_ids_namespace_check
        CHECK (namespace = '' OR namespace ~ '^[a-z0-9][a-z0-9._-]{0,63}$');

-- Values a user held and gave up (replaced or removed), so a migration can still find who had one.
-- One row per value: the user that held it last. A former value may be given to another user; the
-- current holder in user_external_ids always wins over this table.
CREATE TABLE former_external_ids (
    namespace   text        NOT NULL,
    external_id text        NOT NULL,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    released_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT former_external_ids_pkey PRIMARY KEY (namespace, external_id)
);

CREATE INDEX former_external_ids_user_id_idx ON former_external_ids (user_id);

-- Changes to a business id in the namespace mirrored to Ory's `external_id` queue one outbox row per
-- identity, whose delivery writes what idmap holds at that moment. A change made while that row is
-- being delivered bumps its revision instead of queueing a second row; the worker removes the row only
-- if the revision it claimed is still the row's, and otherwise delivers again, so the newest value is
-- never lost behind an older one.
ALTER TABLE ory_outbox ADD COLUMN revision bigint NOT NULL DEFAULT 0;
