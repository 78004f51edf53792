//! The webhook payload: `{"identity": <Kratos identity JSON>}`, the output of the shipped Jsonnet
//! `function(ctx) { identity: ctx.identity }`. Only what idmap reads is declared; `credentials`,
//! `metadata_admin` and anything Ory adds later are ignored. Converted to domain types here, at the
//! edge, like `grpc/convert.rs` does for protobuf.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::HookError;
use crate::domain::{Identity, IdentityId};

#[derive(Debug, Deserialize)]
pub struct HookBody {
    #[serde(default)]
    identity: Option<HookIdentity>,
}

#[derive(Debug, Deserialize)]
struct HookIdentity {
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
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    updated_at: Option<DateTime<Utc>>,
}

/// What a pre-persist hook needs of the identity, which Ory has not stored yet (its id is nil).
#[derive(Debug)]
pub struct NewIdentity {
    pub schema_id: String,
    /// `metadata_public` as Ory will store it unless the hook answers otherwise: `None` when it is
    /// neither an object nor null, so no key can be added without destroying it.
    pub metadata_public: Option<Map<String, Value>>,
}

impl HookBody {
    pub fn parse(bytes: &[u8]) -> Result<Self, HookError> {
        serde_json::from_slice(bytes).map_err(|e| {
            HookError::bad_request(
                "#/",
                format!("the body is not a JSON webhook payload {{\"identity\": {{..}}}}: {e}"),
            )
        })
    }

    fn identity(self) -> Result<HookIdentity, HookError> {
        let identity = self.identity.ok_or_else(|| {
            HookError::bad_request(
                "#/identity",
                "identity is required; use the Jsonnet function(ctx) { identity: ctx.identity }",
            )
        })?;
        match identity.schema_id.as_deref() {
            Some(s) if !s.is_empty() => Ok(identity),
            _ => Err(HookError::bad_request(
                "#/identity/schema_id",
                "identity.schema_id is required",
            )),
        }
    }

    /// The identity of a pre-persist hook. Its id is not looked at: Ory sends the nil UUID there.
    pub fn into_new_identity(self) -> Result<NewIdentity, HookError> {
        let identity = self.identity()?;
        let metadata_public = match identity.metadata_public {
            Value::Object(map) => Some(map),
            Value::Null => Some(Map::new()),
            _ => None,
        };
        Ok(NewIdentity {
            schema_id: identity.schema_id.unwrap_or_default(),
            metadata_public,
        })
    }

    /// The identity of a post-persist hook, which Ory has stored: its id must be a real one.
    pub fn into_stored_identity(self) -> Result<Identity, HookError> {
        let identity = self.identity()?;
        let id = IdentityId::parse("identity.id", identity.id.as_deref().unwrap_or_default())
            .map_err(|v| HookError::bad_request("#/identity/id", v.to_string()))?;
        Ok(Identity {
            id,
            schema_id: identity.schema_id.unwrap_or_default(),
            state: identity.state.unwrap_or_else(|| "active".to_owned()),
            external_id: identity.external_id.filter(|e| !e.is_empty()),
            traits: identity.traits,
            metadata_public: identity.metadata_public,
            created_at: identity.created_at,
            updated_at: identity.updated_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(v: Value) -> HookBody {
        HookBody::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn stored_identities_need_a_real_id_and_a_schema() {
        let ok = body(json!({"identity": {
            "id": "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "schema_id": "customer",
            "traits": {"email": "a@example.com"}, "metadata_public": {"id": "x"},
            "credentials": {"password": {}}, "metadata_admin": {"secret": 1}, "new_field": true
        }}))
        .into_stored_identity()
        .unwrap();
        assert_eq!(ok.schema_id, "customer");
        assert_eq!(ok.metadata_user_id(), Some("x"));

        for bad in [
            json!({}),
            json!({"identity": null}),
            json!({"identity": {"schema_id": "customer"}}),
            json!({"identity": {"id": "00000000-0000-0000-0000-000000000000", "schema_id": "c"}}),
            json!({"identity": {"id": "nope", "schema_id": "c"}}),
            json!({"identity": {"id": "3f2504e0-4f89-11d3-9a0c-0305e82c3301"}}),
            json!({"identity": {"id": "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "schema_id": ""}}),
        ] {
            assert!(
                body(bad.clone()).into_stored_identity().is_err(),
                "{bad} accepted"
            );
        }
        assert!(HookBody::parse(b"{not json").is_err());
        assert!(HookBody::parse(br#"{"identity": {"id": 7}}"#).is_err());
    }

    #[test]
    fn new_identities_keep_their_metadata_object() {
        let nil = "00000000-0000-0000-0000-000000000000";
        let n =
            body(json!({"identity": {"id": nil, "schema_id": "c", "metadata_public": {"a": 1}}}))
                .into_new_identity()
                .unwrap();
        assert_eq!(n.metadata_public.unwrap()["a"], 1);
        let n = body(json!({"identity": {"id": nil, "schema_id": "c"}}))
            .into_new_identity()
            .unwrap();
        assert_eq!(n.metadata_public, Some(Map::new()));
        let n = body(json!({"identity": {"id": nil, "schema_id": "c", "metadata_public": [1]}}))
            .into_new_identity()
            .unwrap();
        assert!(n.metadata_public.is_none());
    }
}
