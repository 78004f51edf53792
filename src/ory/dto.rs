//! Kratos JSON, as in `spec/ory/kratos-api.openapi3.json`. Only what idmap reads is declared;
//! unknown fields are ignored, since Ory adds fields between versions.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::{self, IdentityId};

/// A Kratos timestamp. Go marshals an unset `time.Time` as `0001-01-01T00:00:00Z` (the
/// authentication methods' `completed_at` in Kratos's own fixtures); that means "not recorded", so
/// it reads as absent rather than as a date two thousand years ago.
fn go_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let at = Option::<DateTime<Utc>>::deserialize(d)?;
    Ok(at.filter(|at| at.timestamp() != GO_ZERO_TIME))
}

/// `0001-01-01T00:00:00Z` in Unix seconds.
const GO_ZERO_TIME: i64 = -62_135_596_800;

/// Schema `session`. Only `id` is required by the spec; whoami always embeds the identity.
#[derive(Debug, Deserialize)]
pub(super) struct SessionDto {
    id: Uuid,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default, deserialize_with = "go_time")]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "go_time")]
    authenticated_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "go_time")]
    issued_at: Option<DateTime<Utc>>,
    #[serde(default)]
    authenticator_assurance_level: Option<String>,
    #[serde(default)]
    authentication_methods: Option<Vec<AuthenticationMethodDto>>,
    #[serde(default)]
    identity: Option<IdentityJson>,
}

/// Schema `sessionAuthenticationMethod`.
#[derive(Debug, Deserialize)]
struct AuthenticationMethodDto {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    aal: Option<String>,
    #[serde(default, deserialize_with = "go_time")]
    completed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    provider: Option<String>,
}

/// Schema `identity`, the one decoder of Kratos's identity JSON: the admin API's and whoami's
/// answers, and the webhooks' bodies (the shipped Jsonnet passes `ctx.identity` through). Lenient
/// where the hooks must be: a pre-persist hook sees the nil id, so `id` and `schema_id` are checked
/// by [`IdentityJson::into_identity`] and [`IdentityJson::into_unsaved`], not by serde, and each
/// failure names its field. `metadata_admin` and `credentials` are deliberately not declared:
/// whatever Ory sends of them is dropped here and can never reach a caller.
#[derive(Debug, Deserialize)]
pub struct IdentityJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    schema_id: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    traits: Value,
    #[serde(default)]
    metadata_public: Value,
    #[serde(default, deserialize_with = "go_time")]
    created_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "go_time")]
    updated_at: Option<DateTime<Utc>>,
}

/// An identity JSON idmap cannot use: which field (`id` or `schema_id`), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identity.{field}: {problem}")]
pub struct InvalidIdentity {
    pub field: &'static str,
    pub problem: String,
}

/// What a pre-persist hook knows of an identity Ory has not stored yet (its id is the nil UUID).
#[derive(Debug, Clone, PartialEq)]
pub struct UnsavedIdentity {
    pub schema_id: String,
    /// `metadata_public` as Ory will store it unless the hook answers otherwise: `None` when it is
    /// neither an object nor null, so no key can be added without destroying it.
    pub metadata_public: Option<Map<String, Value>>,
}

impl IdentityJson {
    fn schema_id(&self) -> Result<String, InvalidIdentity> {
        match self.schema_id.as_deref() {
            Some(s) if !s.is_empty() => Ok(s.to_owned()),
            _ => Err(InvalidIdentity {
                field: "schema_id",
                problem: "is required".into(),
            }),
        }
    }

    /// An identity Ory has stored: its id must be a real (non-nil) UUID.
    pub fn into_identity(self) -> Result<domain::Identity, InvalidIdentity> {
        let schema_id = self.schema_id()?;
        let id = IdentityId::parse("identity.id", self.id.as_deref().unwrap_or_default()).map_err(
            |v| InvalidIdentity {
                field: "id",
                problem: v.description,
            },
        )?;
        Ok(domain::Identity {
            id,
            schema_id,
            state: self.state.unwrap_or_else(|| "active".to_owned()),
            external_id: self.external_id.filter(|e| !e.is_empty()),
            traits: self.traits,
            metadata_public: self.metadata_public,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }

    /// An identity a pre-persist hook sees, before Ory stores it: its id is not looked at.
    pub fn into_unsaved(self) -> Result<UnsavedIdentity, InvalidIdentity> {
        let schema_id = self.schema_id()?;
        let metadata_public = match self.metadata_public {
            Value::Object(map) => Some(map),
            Value::Null => Some(Map::new()),
            _ => None,
        };
        Ok(UnsavedIdentity {
            schema_id,
            metadata_public,
        })
    }
}

/// Schema `genericError` inside `errorGeneric`: `{"error": {...}}`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub error: ErrorDetail,
    /// The AAL error repeats `redirect_browser_to` at the top level.
    #[serde(default)]
    pub redirect_browser_to: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorDetail {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub details: Option<Value>,
}

/// One JSON Patch (RFC 6902) operation; Kratos accepts only add, remove and replace.
#[derive(Debug, Serialize)]
pub(super) struct PatchOp<'a> {
    pub op: &'static str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

impl SessionDto {
    pub(super) fn into_domain(self) -> Result<domain::SessionWithIdentity, String> {
        let identity = self
            .identity
            .ok_or_else(|| "whoami answered without the session's identity".to_owned())?
            .into_identity()
            .map_err(|e| e.to_string())?;
        let session = domain::Session {
            id: self.id.hyphenated().to_string(),
            // Kratos computes `active` when serialising; whoami answers 401 for inactive sessions, so
            // a missing flag on a 200 means active.
            active: self.active.unwrap_or(true),
            expires_at: self.expires_at,
            authenticated_at: self.authenticated_at,
            issued_at: self.issued_at,
            authenticator_assurance_level: self.authenticator_assurance_level,
            authentication_methods: self
                .authentication_methods
                .unwrap_or_default()
                .into_iter()
                .map(|m| domain::AuthenticationMethod {
                    method: m.method.unwrap_or_default(),
                    aal: m.aal.filter(|a| !a.is_empty()),
                    completed_at: m.completed_at,
                    provider: m.provider.filter(|p| !p.is_empty()),
                })
                .collect(),
        };
        Ok(domain::SessionWithIdentity { session, identity })
    }
}
