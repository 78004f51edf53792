-- Users minted by the pre-persist registration hook before Ory has stored their identity, so before
-- it has an id to link them to. The user id is already on its way into the identity's
-- metadata_public.id; the row is claimed (deleted in the same transaction as the users insert) when
-- that identity is linked, and swept after IDMAP_PENDING_USER_TTL if it never is (the registration
-- failed after the hook ran, or Kratos retried the hook and kept another answer).
--
-- A separate table rather than a users row with a placeholder identity id: users.ory_identity_id stays
-- NOT NULL and UNIQUE, and no query over users has to remember to skip reservations.
CREATE TABLE pending_users (
    id         uuid        PRIMARY KEY,
    -- The identity schema the registration used, as the hook saw it.
    schema_id  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The sweep deletes by age.
CREATE INDEX pending_users_created_at_idx ON pending_users (created_at);
