//! Ory Actions webhooks (`hook: web_hook`) on the HTTP listener: the pre- and post-persist
//! registration hooks and the after-settings hook (`spec/ory/CONTRACT.md` c; `deploy/ory/` has the
//! Kratos configuration). Handlers validate, convert and call the service; `error.rs` is the one
//! place failures become HTTP answers. Nothing here calls Ory: Kratos is waiting on the answer, inside
//! someone's registration.

mod auth;
mod body;
mod error;
mod handlers;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;

use crate::config::HookSettings;
use crate::service::IdentityMapper;

pub use auth::WebhookAuth;
pub use error::{HookError, message_id, messages_body};

/// The largest webhook body accepted. A Kratos identity is a few KiB; the limit only stops abuse.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
struct HookState {
    mapper: Arc<IdentityMapper>,
    auth: Arc<WebhookAuth>,
}

/// The webhook routes, ready to merge into the HTTP listener's router.
pub fn router(mapper: Arc<IdentityMapper>, settings: &HookSettings) -> Router {
    let auth = WebhookAuth::new(settings.secret.as_ref(), settings.header.clone());
    if !auth.enabled() {
        tracing::warn!(
            "IDMAP_WEBHOOK_SECRET is not set: the Ory webhook endpoints (/hooks/ory/*) refuse every \
             request with 401 until it is, since an unauthenticated hook would let anyone create users"
        );
    }
    Router::new()
        .route("/hooks/ory/registration", post(handlers::registration))
        .route(
            "/hooks/ory/registration/pre-persist",
            post(handlers::registration_pre_persist),
        )
        .route("/hooks/ory/settings", post(handlers::settings))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(HookState {
            mapper,
            auth: Arc::new(auth),
        })
}
