// Matches `diesel print-schema` for migrations/ (written by hand: no diesel CLI, which needs libpq,
// is required to build). Keep it in step with the migrations; the integration tests query every table through it, so drift fails them.

diesel::table! {
    backfill_runs (id) {
        id -> Int8,
        started_at -> Timestamptz,
        updated_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        cursor -> Nullable<Text>,
        pages -> Int8,
        scanned -> Int8,
        created -> Int8,
        already_linked -> Int8,
        queued -> Int8,
        drifted -> Int8,
        failed -> Int8,
    }
}

diesel::table! {
    backfill_run_identities (run_id, ory_identity_id) {
        run_id -> Int8,
        ory_identity_id -> Uuid,
        created -> Bool,
        counted -> Bool,
    }
}

diesel::table! {
    ory_outbox (id) {
        id -> Int8,
        kind -> Text,
        ory_identity_id -> Uuid,
        user_id -> Uuid,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_error -> Nullable<Text>,
        failed_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        revision -> Int8,
    }
}

diesel::table! {
    former_external_ids (namespace, external_id) {
        namespace -> Text,
        external_id -> Text,
        user_id -> Uuid,
        released_at -> Timestamptz,
    }
}

diesel::table! {
    pending_users (id) {
        id -> Uuid,
        schema_id -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    user_external_ids (namespace, external_id) {
        namespace -> Text,
        external_id -> Text,
        user_id -> Uuid,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    users (id) {
        id -> Uuid,
        ory_identity_id -> Uuid,
        schema_id -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        state -> Text,
    }
}

diesel::table! {
    session_cache (fingerprint) {
        fingerprint -> Bytea,
        session_id -> Text,
        identity_id -> Uuid,
        answer -> Bytea,
        expires_at -> Timestamptz,
        refresh_claimed_until -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    session_cache_evictions (kind, value, evicted_at) {
        kind -> Text,
        value -> Text,
        evicted_at -> Timestamptz,
    }
}

diesel::joinable!(backfill_run_identities -> backfill_runs (run_id));
diesel::joinable!(user_external_ids -> users (user_id));
diesel::joinable!(former_external_ids -> users (user_id));

diesel::allow_tables_to_appear_in_same_query!(
    backfill_run_identities,
    backfill_runs,
    former_external_ids,
    ory_outbox,
    pending_users,
    session_cache,
    session_cache_evictions,
    user_external_ids,
    users,
);
