-- Writes to Ory that a committed change implies, delivered by the outbox worker. A row is written in the
-- same transaction as the change, so neither an Ory outage nor a crash can lose it.
CREATE TABLE ory_outbox (
    id              bigserial   PRIMARY KEY,
    -- What to write; today only 'set_metadata_public_id'.
    kind            text        NOT NULL,
    ory_identity_id uuid        NOT NULL,
    user_id         uuid        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    -- When the row may next be tried. Claiming a row pushes this forward by a lease, so a replica that
    -- dies mid-delivery leaves the row to be picked up again once the lease runs out.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    -- Set when delivery failed for a reason retrying cannot fix; such rows are kept for operators.
    failed_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- At most one pending write of a kind per identity: re-linking queues nothing new.
CREATE UNIQUE INDEX ory_outbox_pending_key ON ory_outbox (kind, ory_identity_id) WHERE failed_at IS NULL;
CREATE INDEX ory_outbox_due_idx ON ory_outbox (next_attempt_at) WHERE failed_at IS NULL;
