//! The fleet-wide level of the session cache (`session_cache`, an UNLOGGED table): Ory's answer
//! for a credential's fingerprint, served to every replica until `expires_at`. Times are the
//! database's, so replicas whose clocks disagree still agree on what has expired. The `cache`
//! module decides what goes in and when; this file only stores and finds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bytea, Double, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{OptionalExtension, QueryableByName};
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::{AuthenticationMethod, Identity, IdentityId, Session, SessionWithIdentity};

/// Rows deleted per statement by the sweep.
const SWEEP_BATCH: i64 = 1000;

/// A shared entry found for a fingerprint.
#[derive(Debug, Clone)]
pub struct SharedSession {
    pub session: SessionWithIdentity,
    /// How much longer it may be served.
    pub fresh_for: Duration,
}

/// Which shared entries an eviction deletes.
#[derive(Debug, Clone)]
pub enum SharedTarget<'a> {
    Fingerprint(&'a [u8; 32]),
    SessionId(&'a str),
    Identity(IdentityId),
    /// Nothing: the eviction concerns users only.
    None,
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Timestamptz)]
    as_of: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Bytea>)]
    answer: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Double>)]
    fresh_for_secs: Option<f64>,
}

#[derive(QueryableByName)]
struct ClaimRow {
    #[diesel(sql_type = Timestamptz)]
    claimed_at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct SessionIdRow {
    #[diesel(sql_type = Text)]
    session_id: String,
}

/// What a look in the shared level found, and the database's time when it looked.
#[derive(Debug, Clone)]
pub struct SharedLookup {
    pub found: Option<SharedSession>,
    /// When the look was made, by the database's clock: an answer loaded after it is written back
    /// only if nothing evicted it since ([`Store::put_shared_session`]).
    pub as_of: DateTime<Utc>,
}

/// How long evictions are remembered: longer than any load (whoami, with its retries) takes.
const EVICTIONS_KEPT: &str = "10 minutes";

impl Store {
    /// The shared entry for `fingerprint`, if one is still fresh.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "select shared session"))]
    pub async fn shared_session(&self, fingerprint: &[u8; 32]) -> Result<SharedLookup, StoreError> {
        let conn = self.reader().await?;
        let result = diesel::sql_query(
            "SELECT now() AS as_of, c.answer, \
             EXTRACT(EPOCH FROM c.expires_at - now())::float8 AS fresh_for_secs \
             FROM (SELECT 1) AS one LEFT JOIN session_cache c \
             ON c.fingerprint = $1 AND c.expires_at > now()",
        )
        .bind::<Bytea, _>(&fingerprint[..])
        .get_result::<Row>(&mut &**conn)
        .await;
        let row = self.after_read(&conn, result)?;
        // An answer written by a version that encoded it otherwise is not found: Ory is asked.
        let found = match (row.answer, row.fresh_for_secs) {
            (Some(answer), Some(secs)) => {
                serde_json::from_slice::<Answer>(&answer)
                    .ok()
                    .map(|answer| SharedSession {
                        session: answer.into(),
                        fresh_for: Duration::from_secs_f64(secs.max(0.0)),
                    })
            }
            _ => None,
        };
        Ok(SharedLookup {
            found,
            as_of: row.as_of,
        })
    }

    /// Stores Ory's answer for `fingerprint`, to be served for `ttl` from now (the database's now),
    /// replacing what was there and releasing any refresh claim; unless an eviction of the
    /// credential, its session or its identity was made at or after `loaded_since` (the answer
    /// was on its way while the eviction ran). `true` if stored.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "upsert shared session"))]
    pub async fn put_shared_session(
        &self,
        fingerprint: &[u8; 32],
        session: &SessionWithIdentity,
        ttl: Duration,
        loaded_since: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let answer = serde_json::to_vec(&Answer::from(session))
            .map_err(|e| StoreError::Query(format!("encoding a session: {e}")))?;
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "INSERT INTO session_cache (fingerprint, session_id, identity_id, answer, expires_at) \
             SELECT $1, $2, $3, $4, now() + make_interval(secs => $5::float8 / 1000) \
             WHERE NOT EXISTS (SELECT 1 FROM session_cache_evictions WHERE evicted_at >= $6 \
             AND ((kind = 'key' AND value = $7) OR (kind = 'session' AND value = $2) \
             OR (kind = 'identity' AND value = $3::text))) \
             ON CONFLICT (fingerprint) DO UPDATE SET session_id = EXCLUDED.session_id, \
             identity_id = EXCLUDED.identity_id, answer = EXCLUDED.answer, \
             expires_at = EXCLUDED.expires_at, refresh_claimed_until = NULL",
        )
        .bind::<Bytea, _>(&fingerprint[..])
        .bind::<Text, _>(&session.session.id)
        .bind::<SqlUuid, _>(session.identity.id.as_uuid())
        .bind::<Bytea, _>(answer)
        .bind::<BigInt, _>(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
        .bind::<Timestamptz, _>(loaded_since)
        .bind::<Text, _>(hex::encode(fingerprint))
        .execute(&mut conn)
        .await
        .map(|stored| stored == 1)
        .map_err(StoreError::classify)
    }

    /// Claims the re-validation of `fingerprint`'s entry for `hold`, if it expires within `window`
    /// and no other replica holds the claim; `Some(now)` (the database's time) if this replica
    /// should ask Ory.
    pub async fn claim_shared_refresh(
        &self,
        fingerprint: &[u8; 32],
        window: Duration,
        hold: Duration,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "UPDATE session_cache \
             SET refresh_claimed_until = now() + make_interval(secs => $3::float8 / 1000) \
             WHERE fingerprint = $1 AND expires_at > now() \
             AND expires_at <= now() + make_interval(secs => $2::float8 / 1000) \
             AND (refresh_claimed_until IS NULL OR refresh_claimed_until < now()) \
             RETURNING now() AS claimed_at",
        )
        .bind::<Bytea, _>(&fingerprint[..])
        .bind::<BigInt, _>(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
        .bind::<BigInt, _>(i64::try_from(hold.as_millis()).unwrap_or(i64::MAX))
        .get_result::<ClaimRow>(&mut conn)
        .await
        .optional()
        .map(|row| row.map(|r| r.claimed_at))
        .map_err(StoreError::classify)
    }

    /// The Ory session a fingerprint's shared entry belongs to, fresh or not.
    pub async fn shared_session_id(
        &self,
        fingerprint: &[u8; 32],
    ) -> Result<Option<String>, StoreError> {
        let conn = self.reader().await?;
        let result =
            diesel::sql_query("SELECT session_id FROM session_cache WHERE fingerprint = $1")
                .bind::<Bytea, _>(&fingerprint[..])
                .get_result::<SessionIdRow>(&mut &**conn)
                .await
                .optional();
        Ok(self.after_read(&conn, result)?.map(|row| row.session_id))
    }

    /// Sends `payload` on `channel` and, in the same statement, deletes the shared entries
    /// `target` names and remembers the eviction: no replica reads such an entry after the
    /// eviction is announced, nor writes back an answer that was on its way meanwhile.
    #[tracing::instrument(name = "db.query", skip_all, fields(db.system = "postgresql", db.operation = "notify and delete shared sessions"))]
    pub async fn notify_and_delete(
        &self,
        channel: &str,
        payload: &str,
        target: SharedTarget<'_>,
    ) -> Result<(), StoreError> {
        let (kind, condition, value) = match target {
            SharedTarget::Fingerprint(f) => {
                ("key", "fingerprint = decode($3, 'hex')", hex::encode(f))
            }
            SharedTarget::SessionId(id) => ("session", "session_id = $3", id.to_owned()),
            SharedTarget::Identity(id) => ("identity", "identity_id = $3::uuid", id.to_string()),
            SharedTarget::None => return self.notify(channel, payload).await,
        };
        let mut conn = self.conn().await?;
        // Data-modifying CTEs run whether or not the outer query reads them, in the same
        // transaction as the NOTIFY, which is sent when that commits.
        diesel::sql_query(format!(
            "WITH gone AS (DELETE FROM session_cache WHERE {condition}), \
             noted AS (INSERT INTO session_cache_evictions (kind, value) VALUES ('{kind}', $3)) \
             SELECT pg_notify($1, $2)"
        ))
        .bind::<Text, _>(channel)
        .bind::<Text, _>(payload)
        .bind::<Text, _>(value)
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(StoreError::classify)
    }

    /// Deletes expired shared entries, and evictions older than any load; returns how many
    /// entries.
    pub async fn sweep_shared_sessions(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(format!(
            "DELETE FROM session_cache_evictions WHERE evicted_at < now() - interval '{EVICTIONS_KEPT}'"
        ))
        .execute(&mut conn)
        .await
        .map_err(StoreError::classify)?;
        let mut total = 0u64;
        loop {
            let deleted = diesel::sql_query(
                "DELETE FROM session_cache WHERE fingerprint IN (SELECT fingerprint \
                 FROM session_cache WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)",
            )
            .bind::<BigInt, _>(SWEEP_BATCH)
            .execute(&mut conn)
            .await
            .map_err(StoreError::classify)?;
            total += deleted as u64;
            if (deleted as i64) < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }
}

/// How an answer is kept in `session_cache.answer`: idmap's own encoding of the domain types,
/// which never leaves this file.
#[derive(Serialize, Deserialize)]
struct Answer {
    session: StoredSession,
    identity: StoredIdentity,
}

#[derive(Serialize, Deserialize)]
struct StoredSession {
    id: String,
    active: bool,
    expires_at: Option<DateTime<Utc>>,
    authenticated_at: Option<DateTime<Utc>>,
    issued_at: Option<DateTime<Utc>>,
    aal: Option<String>,
    methods: Vec<StoredMethod>,
}

#[derive(Serialize, Deserialize)]
struct StoredMethod {
    method: String,
    aal: Option<String>,
    completed_at: Option<DateTime<Utc>>,
    provider: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredIdentity {
    id: Uuid,
    schema_id: String,
    state: String,
    external_id: Option<String>,
    traits: serde_json::Value,
    metadata_public: serde_json::Value,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

impl From<&SessionWithIdentity> for Answer {
    fn from(s: &SessionWithIdentity) -> Self {
        let (session, identity) = (&s.session, &s.identity);
        Self {
            session: StoredSession {
                id: session.id.clone(),
                active: session.active,
                expires_at: session.expires_at,
                authenticated_at: session.authenticated_at,
                issued_at: session.issued_at,
                aal: session.authenticator_assurance_level.clone(),
                methods: session
                    .authentication_methods
                    .iter()
                    .map(|m| StoredMethod {
                        method: m.method.clone(),
                        aal: m.aal.clone(),
                        completed_at: m.completed_at,
                        provider: m.provider.clone(),
                    })
                    .collect(),
            },
            identity: StoredIdentity {
                id: identity.id.as_uuid(),
                schema_id: identity.schema_id.clone(),
                state: identity.state.clone(),
                external_id: identity.external_id.clone(),
                traits: identity.traits.clone(),
                metadata_public: identity.metadata_public.clone(),
                created_at: identity.created_at,
                updated_at: identity.updated_at,
            },
        }
    }
}

impl From<Answer> for SessionWithIdentity {
    fn from(a: Answer) -> Self {
        let (session, identity) = (a.session, a.identity);
        Self {
            session: Session {
                id: session.id,
                active: session.active,
                expires_at: session.expires_at,
                authenticated_at: session.authenticated_at,
                issued_at: session.issued_at,
                authenticator_assurance_level: session.aal,
                authentication_methods: session
                    .methods
                    .into_iter()
                    .map(|m| AuthenticationMethod {
                        method: m.method,
                        aal: m.aal,
                        completed_at: m.completed_at,
                        provider: m.provider,
                    })
                    .collect(),
            },
            identity: Identity {
                id: IdentityId::from_uuid(identity.id),
                schema_id: identity.schema_id,
                state: identity.state,
                external_id: identity.external_id,
                traits: identity.traits,
                metadata_public: identity.metadata_public,
                created_at: identity.created_at,
                updated_at: identity.updated_at,
            },
        }
    }
}
