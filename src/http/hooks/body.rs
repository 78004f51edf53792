//! The webhook payload: `{"identity": <Kratos identity JSON>}`, the output of the shipped Jsonnet
//! `function(ctx) { identity: ctx.identity }`. The identity is decoded by the Ory client's own
//! decoder ([`IdentityJson`]), so a webhook and an admin API call read the same JSON the same way;
//! this module only adds the envelope and turns a refusal into the hook's 400 with a JSON pointer.

use serde::Deserialize;

use super::error::HookError;
use crate::domain::Identity;
use crate::ory::{IdentityJson, InvalidIdentity, UnsavedIdentity};

#[derive(Debug, Deserialize)]
pub struct HookBody {
    #[serde(default)]
    identity: Option<IdentityJson>,
}

fn refused(e: InvalidIdentity) -> HookError {
    HookError::bad_request(
        match e.field {
            "id" => "#/identity/id",
            _ => "#/identity/schema_id",
        },
        e.to_string(),
    )
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

    fn identity(self) -> Result<IdentityJson, HookError> {
        self.identity.ok_or_else(|| {
            HookError::bad_request(
                "#/identity",
                "identity is required; use the Jsonnet function(ctx) { identity: ctx.identity }",
            )
        })
    }

    /// The identity of a pre-persist hook. Its id is not looked at: Ory sends the nil UUID there.
    pub fn into_new_identity(self) -> Result<UnsavedIdentity, HookError> {
        self.identity()?.into_unsaved().map_err(refused)
    }

    /// The identity of a post-persist hook, which Ory has stored: its id must be a real one.
    pub fn into_stored_identity(self) -> Result<Identity, HookError> {
        self.identity()?.into_identity().map_err(refused)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

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
        assert_eq!(n.metadata_public, Some(serde_json::Map::new()));
        let n = body(json!({"identity": {"id": nil, "schema_id": "c", "metadata_public": [1]}}))
            .into_new_identity()
            .unwrap();
        assert!(n.metadata_public.is_none());
    }

    #[test]
    fn go_zero_time_reads_as_absent_in_hooks_and_in_the_ory_client() {
        // Go marshals an unset time.Time as its zero value; Kratos sends it that way.
        let identity = json!({
            "id": "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "schema_id": "customer",
            "traits": {"email": "a@example.com"}, "metadata_public": null,
            "created_at": "0001-01-01T00:00:00Z", "updated_at": "2024-05-01T10:00:00Z",
        });
        let from_hook = body(json!({ "identity": identity.clone() }))
            .into_stored_identity()
            .unwrap();
        // What the Ory client decodes an admin API answer with.
        let from_client = serde_json::from_value::<IdentityJson>(identity)
            .unwrap()
            .into_identity()
            .unwrap();
        assert_eq!(from_hook.created_at, None, "the year 1 read as a date");
        assert_eq!(
            from_hook.updated_at.map(|t| t.to_rfc3339()).as_deref(),
            Some("2024-05-01T10:00:00+00:00")
        );
        assert_eq!(from_hook, from_client);
    }
}
