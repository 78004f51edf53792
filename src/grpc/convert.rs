//! Protobuf <-> domain conversions. Requests are destructured exhaustively, so a field added to the
//! proto breaks the build here instead of being ignored silently.

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value as PbValue, value::Kind};
use serde_json::Value;

use crate::domain::{
    AuthenticationMethod, ExternalId, FieldViolation, Identity, IdentityId, LinkRequest, Namespace,
    NamespacedId, Session, Subject, User, UserId,
};
use crate::error::Error;
use crate::proto::api;

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn json_to_pb(value: &Value) -> PbValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_pb).collect(),
        }),
        Value::Object(map) => Kind::StructValue(pb_struct(map)),
    };
    PbValue { kind: Some(kind) }
}

fn pb_struct(map: &serde_json::Map<String, Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_pb(v)))
            .collect(),
    }
}

/// A JSON object as a `google.protobuf.Struct`; anything else (null included) has no Struct form.
fn json_object(value: &Value) -> Option<Struct> {
    match value {
        Value::Object(map) => Some(pb_struct(map)),
        _ => None,
    }
}

impl From<&User> for api::User {
    fn from(user: &User) -> Self {
        let User {
            id,
            ory_identity_id,
            external_ids,
            schema_id,
            created_at,
            updated_at,
            state,
        } = user;
        Self {
            id: id.to_string(),
            ory_identity_id: ory_identity_id.to_string(),
            external_id: user
                .default_external_id()
                .map(|e| e.as_str().to_owned())
                .unwrap_or_default(),
            schema_id: schema_id.clone(),
            created_at: Some(timestamp(*created_at)),
            updated_at: Some(timestamp(*updated_at)),
            state: state.as_str().to_owned(),
            external_ids: external_ids
                .iter()
                .map(|id| api::ExternalId {
                    namespace: id.namespace.as_str().to_owned(),
                    value: id.value.as_str().to_owned(),
                })
                .collect(),
        }
    }
}

impl From<&Session> for api::Session {
    fn from(session: &Session) -> Self {
        let Session {
            id,
            active,
            expires_at,
            authenticated_at,
            issued_at,
            authenticator_assurance_level,
            authentication_methods,
        } = session;
        Self {
            id: id.clone(),
            active: *active,
            expires_at: expires_at.map(timestamp),
            authenticated_at: authenticated_at.map(timestamp),
            authenticator_assurance_level: authenticator_assurance_level
                .clone()
                .unwrap_or_default(),
            issued_at: issued_at.map(timestamp),
            authentication_methods: authentication_methods
                .iter()
                .map(|m| {
                    let AuthenticationMethod {
                        method,
                        aal,
                        completed_at,
                        provider,
                    } = m;
                    api::AuthenticationMethod {
                        method: method.clone(),
                        aal: aal.clone().unwrap_or_default(),
                        completed_at: completed_at.map(timestamp),
                        provider: provider.clone().unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

impl From<&Identity> for api::Identity {
    fn from(identity: &Identity) -> Self {
        let Identity {
            id,
            schema_id,
            state,
            external_id,
            traits,
            metadata_public,
            created_at,
            updated_at,
        } = identity;
        Self {
            id: id.to_string(),
            schema_id: schema_id.clone(),
            state: state.clone(),
            external_id: external_id.clone().unwrap_or_default(),
            traits: Some(json_object(traits).unwrap_or_default()),
            metadata_public: json_object(metadata_public),
            created_at: created_at.map(timestamp),
            updated_at: updated_at.map(timestamp),
        }
    }
}

/// Parses BatchGetUsers's ids, naming each bad one by its index.
pub fn batch_ids(ids: &[String]) -> Result<Vec<IdentityId>, Error> {
    use crate::service::MAX_BATCH_IDS;
    if ids.len() > MAX_BATCH_IDS {
        return Err(FieldViolation {
            field: "ory_identity_ids".into(),
            description: format!("at most {MAX_BATCH_IDS} ids per call, got {}", ids.len()),
        }
        .into());
    }
    let mut parsed = Vec::with_capacity(ids.len());
    let mut violations = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        match IdentityId::parse("ory_identity_ids", id) {
            Ok(id) => parsed.push(id),
            Err(v) => violations.push(FieldViolation {
                field: format!("ory_identity_ids[{i}]").into(),
                description: v.description,
            }),
        }
    }
    if violations.is_empty() {
        Ok(parsed)
    } else {
        Err(Error::InvalidArgument(violations))
    }
}

impl TryFrom<api::LinkIdentityRequest> for LinkRequest {
    type Error = Error;

    fn try_from(request: api::LinkIdentityRequest) -> Result<Self, Self::Error> {
        let api::LinkIdentityRequest {
            ory_identity_id,
            user_id,
            external_id,
            external_ids,
        } = request;
        let mut violations = Vec::new();
        let identity = IdentityId::parse("ory_identity_id", &ory_identity_id)
            .map_err(|v| violations.push(v))
            .ok();
        let user_id = if user_id.is_empty() {
            None
        } else {
            UserId::parse("user_id", &user_id)
                .map_err(|v| violations.push(v))
                .ok()
        };
        let mut ids: Vec<NamespacedId> = Vec::with_capacity(external_ids.len() + 1);
        if !external_id.is_empty() {
            match ExternalId::parse("external_id", &external_id) {
                Ok(value) => ids.push(NamespacedId::new(Namespace::DEFAULT, value)),
                Err(v) => violations.push(v),
            }
        }
        // The default namespace's value given through the single-id field, if any.
        let legacy = ids.first().map(|id| id.value.clone());
        let mut named = std::collections::HashSet::new();
        if external_ids.len() > MAX_LINK_EXTERNAL_IDS {
            violations.push(FieldViolation {
                field: "external_ids".into(),
                description: format!(
                    "at most {MAX_LINK_EXTERNAL_IDS} ids per call, got {}",
                    external_ids.len()
                ),
            });
        } else {
            for (i, id) in external_ids.iter().enumerate() {
                let indexed = |v: FieldViolation, part: &str| FieldViolation {
                    field: format!("external_ids[{i}].{part}").into(),
                    description: v.description,
                };
                let namespace = Namespace::parse("namespace", &id.namespace)
                    .map_err(|v| violations.push(indexed(v, "namespace")))
                    .ok();
                let value = ExternalId::parse("value", &id.value)
                    .map_err(|v| violations.push(indexed(v, "value")))
                    .ok();
                let (Some(namespace), Some(value)) = (namespace, value) else {
                    continue;
                };
                if !named.insert(namespace.clone()) {
                    violations.push(FieldViolation {
                        field: format!("external_ids[{i}].namespace").into(),
                        description: format!(
                            "names namespace {namespace:?} again; a user holds one value per namespace"
                        ),
                    });
                    continue;
                }
                if namespace.is_default()
                    && let Some(legacy) = &legacy
                {
                    if *legacy != value {
                        violations.push(FieldViolation {
                            field: format!("external_ids[{i}].value").into(),
                            description:
                                "differs from external_id, which sets the default namespace too"
                                    .into(),
                        });
                    }
                    continue;
                }
                ids.push(NamespacedId::new(namespace, value));
            }
        }
        match identity {
            Some(ory_identity_id) if violations.is_empty() => Ok(LinkRequest {
                ory_identity_id,
                user_id,
                external_ids: ids,
            }),
            _ => Err(Error::InvalidArgument(violations)),
        }
    }
}

/// The most business ids one LinkIdentity sets.
pub const MAX_LINK_EXTERNAL_IDS: usize = 100;

/// A request's subject (`oneof subject`), or a violation naming the field.
pub fn subject(
    ory_identity_id: Option<&str>,
    user_id: Option<&str>,
) -> Result<Subject, FieldViolation> {
    match (ory_identity_id, user_id) {
        (Some(id), _) => IdentityId::parse("ory_identity_id", id).map(Subject::Identity),
        (None, Some(id)) => UserId::parse("user_id", id).map(Subject::User),
        (None, None) => Err(FieldViolation {
            field: "subject".into(),
            description: "set ory_identity_id or user_id".into(),
        }),
    }
}

/// Parses BatchGetByExternalIds's values, naming each bad one by its index.
pub fn batch_values(values: &[String]) -> Result<Vec<ExternalId>, Error> {
    use crate::service::MAX_BATCH_IDS;
    if values.len() > MAX_BATCH_IDS {
        return Err(FieldViolation {
            field: "values".into(),
            description: format!(
                "at most {MAX_BATCH_IDS} values per call, got {}",
                values.len()
            ),
        }
        .into());
    }
    let mut parsed = Vec::with_capacity(values.len());
    let mut violations = Vec::new();
    for (i, value) in values.iter().enumerate() {
        match ExternalId::parse("values", value) {
            Ok(value) => parsed.push(value),
            Err(v) => violations.push(FieldViolation {
                field: format!("values[{i}]").into(),
                description: v.description,
            }),
        }
    }
    if violations.is_empty() {
        Ok(parsed)
    } else {
        Err(Error::InvalidArgument(violations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_objects_become_structs_with_every_kind_of_value() {
        let s = json_object(&json!({"a": 1, "b": [true, null, "x"], "c": {"d": 2.5}})).unwrap();
        assert_eq!(s.fields.len(), 3);
        assert_eq!(s.fields["a"].kind, Some(Kind::NumberValue(1.0)));
        let Some(Kind::ListValue(list)) = &s.fields["b"].kind else {
            panic!("b is not a list")
        };
        assert_eq!(list.values[1].kind, Some(Kind::NullValue(0)));
        assert!(json_object(&Value::Null).is_none());
        assert!(json_object(&json!("text")).is_none());
    }

    #[test]
    fn link_request_reports_every_bad_field() {
        let err = LinkRequest::try_from(api::LinkIdentityRequest {
            ory_identity_id: "nope".into(),
            user_id: "also-nope".into(),
            external_id: "bad\u{7}".into(),
            external_ids: vec![api::ExternalId {
                namespace: "CRM".into(),
                value: String::new(),
            }],
        })
        .unwrap_err();
        let Error::InvalidArgument(v) = err else {
            panic!("wrong error")
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.clone()).collect();
        assert_eq!(
            fields,
            [
                "ory_identity_id",
                "user_id",
                "external_id",
                "external_ids[0].namespace",
                "external_ids[0].value"
            ]
        );
    }

    #[test]
    fn link_request_takes_one_value_per_namespace() {
        let id = "3f2504e0-4f89-11d3-9a0c-0305e82c3301".to_string();
        let ext = |namespace: &str, value: &str| api::ExternalId {
            namespace: namespace.into(),
            value: value.into(),
        };
        let request = |external_id: &str, external_ids| api::LinkIdentityRequest {
            ory_identity_id: id.clone(),
            user_id: String::new(),
            external_id: external_id.into(),
            external_ids,
        };
        let ok = LinkRequest::try_from(request("a", vec![ext("", "a"), ext("crm", "c")])).unwrap();
        assert_eq!(ok.external_ids.len(), 2);
        for bad in [
            request("a", vec![ext("", "b")]),
            request("", vec![ext("crm", "1"), ext("crm", "2")]),
            request("", vec![ext("", "1"), ext("", "1")]),
        ] {
            assert!(LinkRequest::try_from(bad).is_err());
        }
    }
}
