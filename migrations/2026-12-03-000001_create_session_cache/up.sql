-- The fleet-wide level of the session cache: Ory's answer for a credential, shared by every
-- replica, so Ory is asked once per session per TTL however many replicas serve it.
-- UNLOGGED: a cache, rebuilt from Ory after a crash; skipping the WAL makes its writes cheap
-- (and keeps it out of replicas and backups, where it has no use).
-- The credential itself is never stored: `fingerprint` is its SHA-256.
CREATE UNLOGGED TABLE session_cache (
    fingerprint BYTEA PRIMARY KEY CHECK (octet_length(fingerprint) = 32),
    session_id TEXT NOT NULL,
    identity_id UUID NOT NULL,
    -- The session and identity as whoami gave them (JSON, idmap's own encoding).
    answer BYTEA NOT NULL,
    -- Served until then, by the database's clock, so replicas with skewed clocks agree.
    expires_at TIMESTAMPTZ NOT NULL,
    -- A replica re-validating the session ahead of expiry holds this claim, so the fleet asks once.
    refresh_claimed_until TIMESTAMPTZ
);

CREATE INDEX session_cache_session_id ON session_cache (session_id);
CREATE INDEX session_cache_identity_id ON session_cache (identity_id);
CREATE INDEX session_cache_expires_at ON session_cache (expires_at);

-- Evictions of shared entries, kept a few minutes: an answer whose whoami was in flight when the
-- eviction ran must not be written back after it. A write names when its load started and is
-- dropped if an eviction of the same credential, session or identity is as recent.
CREATE UNLOGGED TABLE session_cache_evictions (
    kind TEXT NOT NULL CHECK (kind IN ('key', 'session', 'identity')),
    value TEXT NOT NULL,
    evicted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX session_cache_evictions_value ON session_cache_evictions (value, evicted_at);
