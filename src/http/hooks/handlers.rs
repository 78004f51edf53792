//! The webhook handlers: authenticate (the [`Authenticated`] extractor runs before the body is
//! read), parse, call the service, answer.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::auth::Authenticated;
use super::body::HookBody;
use super::error::HookError;
use super::{HookState, MAX_BODY_BYTES};

fn read(body: Result<Bytes, BytesRejection>) -> Result<HookBody, HookError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HookError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            }
        } else {
            HookError::bad_request("#/", "the request body could not be read")
        }
    })?;
    HookBody::parse(&bytes)
}

/// `POST /hooks/ory/registration`: a post-persist (`parse: false`) after-registration hook. Links
/// the stored identity; the answer body is informational (Ory ignores it).
#[tracing::instrument(name = "hook.registration", skip_all)]
pub(super) async fn registration(
    State(state): State<HookState>,
    _: Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, HookError> {
    let identity = read(body)?.into_stored_identity()?;
    let outcome = state.mapper.link_registered(&identity).await?;
    Ok(Json(json!({
        "user_id": outcome.user.id.to_string(),
        "created": outcome.created,
    })))
}

/// `POST /hooks/ory/registration/pre-persist`: a `parse: true` after-registration hook, run before
/// Ory stores the identity. Answers with the whole `metadata_public` (Ory replaces, never merges)
/// plus `id`, so Ory stores the user id with the identity and no admin write is needed.
#[tracing::instrument(name = "hook.registration_pre_persist", skip_all)]
pub(super) async fn registration_pre_persist(
    State(state): State<HookState>,
    _: Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, HookError> {
    let identity = read(body)?.into_new_identity()?;
    let Some(mut metadata) = identity.metadata_public else {
        // Adding a key would replace whatever is there; the outbox takes the same stance. The
        // registration goes on, and linking later records the conflict for an operator.
        tracing::warn!(
            "pre-persist hook: metadata_public is neither an object nor null; leaving it alone"
        );
        return Ok(Json(json!({})));
    };
    let recorded = metadata
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let reservation = state
        .mapper
        .reserve_user(&identity.schema_id, recorded.as_deref())
        .await?;
    metadata.insert(
        "id".to_owned(),
        Value::String(reservation.user_id().to_string()),
    );
    Ok(Json(json!({ "identity": { "metadata_public": metadata } })))
}

/// `POST /hooks/ory/settings`: an after-settings hook. Keeps the linked user's mirrored fields
/// current; an identity without a user is left alone (200).
#[tracing::instrument(name = "hook.settings", skip_all)]
pub(super) async fn settings(
    State(state): State<HookState>,
    _: Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, HookError> {
    let identity = read(body)?.into_stored_identity()?;
    let user = state.mapper.identity_updated(&identity).await?;
    Ok(Json(json!({ "user_id": user.map(|u| u.id.to_string()) })))
}
