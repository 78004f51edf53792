-- What Ory says of the user's identity, as `idmap reconcile` last found it: 'active', 'inactive' (the
-- identity is deactivated in Ory), or 'deleted' (Ory answers 404 for it). Nothing is hard-deleted: a
-- user whose identity is gone keeps its id, external id and history, and becomes active again if the
-- identity reappears. Existing users are active: nothing else was known of them.
ALTER TABLE users
    ADD COLUMN state text NOT NULL DEFAULT 'active',
    ADD CONSTRAINT users_state_check CHECK (state IN ('active', 'inactive', 'deleted'));
