-- One row per internal user. The internal id is minted by idmap (or given by the caller), never by Ory.
CREATE TABLE users (
    id              uuid        PRIMARY KEY,
    ory_identity_id uuid        NOT NULL,
    schema_id       text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_ory_identity_id_key UNIQUE (ory_identity_id)
);

-- External (business) ids live in their own table so a user can later hold one id per namespace
-- without rewriting data: today every id is in the default namespace ''.
CREATE TABLE user_external_ids (
    namespace   text        NOT NULL DEFAULT '',
    external_id text        NOT NULL,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT user_external_ids_pkey PRIMARY KEY (namespace, external_id),
    -- One id per namespace per user.
    CONSTRAINT user_external_ids_user_namespace_key UNIQUE (user_id, namespace),
    CONSTRAINT user_external_ids_external_id_check
        CHECK (octet_length(external_id) BETWEEN 1 AND 255)
);
