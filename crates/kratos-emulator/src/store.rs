//! In-memory identities and sessions, and their JSON shapes.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::herodot;

/// Credential types that raise an identity's highest available AAL to `aal2`.
const SECOND_FACTORS: [&str; 3] = ["totp", "lookup_secret", "webauthn"];
/// Credential types `createIdentityBody.credentials` may carry (`identityWithCredentials`).
const IMPORTABLE_CREDENTIALS: [&str; 7] = [
    "password",
    "oidc",
    "saml",
    "totp",
    "webauthn",
    "passkey",
    "lookup_secret",
];

/// Now, at the microsecond precision a SQL-backed Kratos stores and returns.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

pub(crate) fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Unpadded base64url, as Kratos uses for `schema_url` (`schema/schema.go`).
fn base64url(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// An error response produced by the store: status and herodot body.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl ApiError {
    pub(crate) fn bad_request(reason: impl AsRef<str>) -> Self {
        Self {
            status: 400,
            body: herodot::generic(400, Some(reason.as_ref())),
        }
    }

    pub(crate) fn not_found() -> Self {
        Self {
            status: 404,
            body: herodot::error_body(404, None, None, "Unable to locate the resource"),
        }
    }

    fn conflict_on_create() -> Self {
        Self {
            status: 409,
            body: herodot::error_body(
                409,
                None,
                Some("This identity conflicts with another identity that already exists."),
                "The resource could not be created due to a conflict",
            ),
        }
    }

    fn conflict_on_update() -> Self {
        Self {
            status: 409,
            body: herodot::error_body(
                409,
                None,
                None,
                "Unable to insert or update resource because a resource with that value exists already",
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Credential {
    identifiers: Vec<String>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct VerifiableAddress {
    id: Uuid,
    value: String,
    verified: bool,
    via: String,
    status: String,
    verified_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct RecoveryAddress {
    id: Uuid,
    value: String,
    via: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// An identity as the store keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) id: Uuid,
    schema_id: String,
    pub(crate) state: String,
    state_changed_at: Option<DateTime<Utc>>,
    traits: Value,
    external_id: Option<String>,
    metadata_public: Value,
    metadata_admin: Value,
    organization_id: Option<Uuid>,
    region: Option<String>,
    credentials: BTreeMap<String, Credential>,
    verifiable_addresses: Vec<VerifiableAddress>,
    recovery_addresses: Vec<RecoveryAddress>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Which parts of an identity a response may show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Admin identity endpoints: `credentials` (without `config`) and `metadata_admin`.
    Admin,
    /// Admin list without `credentials_identifier`: credentials are not expanded.
    AdminNoCredentials,
    /// Whoami: neither `credentials` nor `metadata_admin` (`Identity.MarshalJSON`).
    Public,
}

impl Identity {
    pub(crate) fn has_second_factor(&self) -> bool {
        SECOND_FACTORS
            .iter()
            .any(|t| self.credentials.contains_key(*t))
    }

    fn identifiers(&self, kind: &str) -> &[String] {
        self.credentials
            .get(kind)
            .map(|c| c.identifiers.as_slice())
            .unwrap_or_default()
    }

    pub(crate) fn matches_identifier(&self, needle: &str) -> bool {
        let needle = needle.to_lowercase();
        self.credentials
            .values()
            .any(|c| c.identifiers.contains(&needle))
    }

    pub(crate) fn identifier_contains(&self, needle: &str) -> bool {
        self.credentials
            .values()
            .any(|c| c.identifiers.iter().any(|i| i.contains(needle)))
    }

    pub(crate) fn organization_id(&self) -> Option<Uuid> {
        self.organization_id
    }

    pub(crate) fn external_id(&self) -> Option<&str> {
        self.external_id.as_deref()
    }

    pub(crate) fn to_json(&self, base_url: &str, shape: Shape) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        if shape == Shape::Admin && !self.credentials.is_empty() {
            let creds: Map<String, Value> = self
                .credentials
                .iter()
                .map(|(kind, c)| {
                    (
                        kind.clone(),
                        json!({
                            "type": kind,
                            "identifiers": c.identifiers,
                            "version": c.version,
                            "created_at": ts(&c.created_at),
                            "updated_at": ts(&c.updated_at),
                        }),
                    )
                })
                .collect();
            m.insert("credentials".into(), Value::Object(creds));
        }
        m.insert("schema_id".into(), json!(self.schema_id));
        m.insert(
            "schema_url".into(),
            json!(format!(
                "{base_url}/schemas/{}",
                base64url(self.schema_id.as_bytes())
            )),
        );
        m.insert("state".into(), json!(self.state));
        if let Some(t) = &self.state_changed_at {
            m.insert("state_changed_at".into(), json!(ts(t)));
        }
        m.insert("traits".into(), self.traits.clone());
        // Kratos marks both address lists `omitempty`.
        if !self.verifiable_addresses.is_empty() {
            let list: Vec<Value> = self
                .verifiable_addresses
                .iter()
                .map(|a| {
                    let mut v = json!({
                        "id": a.id,
                        "value": a.value,
                        "verified": a.verified,
                        "via": a.via,
                        "status": a.status,
                        "created_at": ts(&a.created_at),
                        "updated_at": ts(&a.updated_at),
                    });
                    if let (Some(t), Some(o)) = (&a.verified_at, v.as_object_mut()) {
                        o.insert("verified_at".into(), json!(ts(t)));
                    }
                    v
                })
                .collect();
            m.insert("verifiable_addresses".into(), Value::Array(list));
        }
        if !self.recovery_addresses.is_empty() {
            let list: Vec<Value> = self
                .recovery_addresses
                .iter()
                .map(|a| {
                    json!({
                        "id": a.id,
                        "value": a.value,
                        "via": a.via,
                        "created_at": ts(&a.created_at),
                        "updated_at": ts(&a.updated_at),
                    })
                })
                .collect();
            m.insert("recovery_addresses".into(), Value::Array(list));
        }
        m.insert("metadata_public".into(), self.metadata_public.clone());
        if shape != Shape::Public {
            m.insert("metadata_admin".into(), self.metadata_admin.clone());
        }
        m.insert("created_at".into(), json!(ts(&self.created_at)));
        m.insert("updated_at".into(), json!(ts(&self.updated_at)));
        m.insert("organization_id".into(), json!(self.organization_id));
        if let Some(e) = &self.external_id {
            m.insert("external_id".into(), json!(e));
        }
        if let Some(r) = &self.region {
            m.insert("region".into(), json!(r));
        }
        Value::Object(m)
    }
}

/// What a caller wants to create; shared by the Rust API and `POST /admin/identities`.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdentityInput {
    pub(crate) schema_id: String,
    pub(crate) traits: Value,
    pub(crate) state: Option<String>,
    pub(crate) external_id: Option<String>,
    pub(crate) metadata_public: Value,
    pub(crate) metadata_admin: Value,
    pub(crate) organization_id: Option<Uuid>,
    pub(crate) region: Option<String>,
    pub(crate) credentials: Option<Value>,
    pub(crate) extra_identifiers: Vec<String>,
    pub(crate) second_factor: bool,
    pub(crate) verifiable_addresses: Vec<Value>,
}

/// A session as the store keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) id: Uuid,
    pub(crate) identity_id: Uuid,
    pub(crate) token: String,
    pub(crate) cookie: String,
    pub(crate) active: bool,
    pub(crate) aal: String,
    pub(crate) methods: Vec<(String, String)>,
    pub(crate) issued_at: DateTime<Utc>,
    pub(crate) expires_at: DateTime<Utc>,
}

impl Session {
    /// `Session.IsActive()`: the stored flag, the expiry and the identity's state together.
    pub(crate) fn is_active(&self, identity: Option<&Identity>, at: DateTime<Utc>) -> bool {
        self.active && self.expires_at > at && identity.is_some_and(|i| i.state == "active")
    }

    pub(crate) fn to_json(
        &self,
        identity: Option<&Identity>,
        base_url: &str,
        shape: Shape,
        at: DateTime<Utc>,
    ) -> Value {
        let methods: Vec<Value> = self
            .methods
            .iter()
            .map(|(method, aal)| json!({"method": method, "aal": aal, "completed_at": ts(&self.issued_at)}))
            .collect();
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("active".into(), json!(self.is_active(identity, at)));
        m.insert("expires_at".into(), json!(ts(&self.expires_at)));
        m.insert("authenticated_at".into(), json!(ts(&self.issued_at)));
        m.insert(
            "authenticator_assurance_level".into(),
            json!(self.aal.clone()),
        );
        m.insert("authentication_methods".into(), Value::Array(methods));
        m.insert("issued_at".into(), json!(ts(&self.issued_at)));
        if let Some(i) = identity {
            m.insert("identity".into(), i.to_json(base_url, shape));
        }
        m.insert("devices".into(), json!([]));
        Value::Object(m)
    }
}

/// All emulator data behind one lock.
#[derive(Debug, Default)]
pub(crate) struct Store {
    /// Keyed by id so iteration order is the `id ASC` order keyset pagination relies on.
    pub(crate) identities: BTreeMap<Uuid, Identity>,
    pub(crate) sessions: HashMap<Uuid, Session>,
    pub(crate) by_token: HashMap<String, Uuid>,
    pub(crate) by_cookie: HashMap<String, Uuid>,
}

fn traits_string(traits: &Value, key: &str) -> Option<String> {
    traits
        .get(key)
        .and_then(Value::as_str)
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
}

/// The emulator stands in for an identity schema like `fixtures/identity-schema.email-password.json`:
/// `traits.email` is a password identifier and a verification/recovery address, and
/// `traits.username` is a password identifier.
fn derived_identifiers(traits: &Value) -> Vec<String> {
    ["email", "username"]
        .iter()
        .filter_map(|k| traits_string(traits, k))
        .collect()
}

fn valid_state(state: &str) -> Result<(), ApiError> {
    match state {
        "active" | "inactive" => Ok(()),
        other => Err(ApiError::bad_request(format!(
            "identity state must be one of active, inactive; got \"{other}\""
        ))),
    }
}

fn require_object(traits: &Value) -> Result<(), ApiError> {
    if traits.is_object() {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "I[#/traits] S[#/properties/traits/type] expected object",
        ))
    }
}

fn push_unique(list: &mut Vec<String>, value: String) {
    if !list.contains(&value) {
        list.push(value);
    }
}

impl Identity {
    fn set_state(&mut self, state: &str, at: DateTime<Utc>) {
        if self.state != state {
            self.state = state.to_string();
            self.state_changed_at = Some(at);
        }
    }

    /// Recomputes the schema-derived parts (password identifiers and addresses) after traits
    /// changed; address metadata is kept for values that survive, or taken from `imported`.
    fn rederive(&mut self, extra_identifiers: &[String], imported: &[Value], at: DateTime<Utc>) {
        let mut identifiers = derived_identifiers(&self.traits);
        for i in extra_identifiers {
            push_unique(&mut identifiers, i.trim().to_lowercase());
        }
        if identifiers.is_empty() {
            // A password credential with neither identifiers nor an imported hash carries nothing.
            if self
                .credentials
                .get("password")
                .is_some_and(|c| c.version == 0)
            {
                self.credentials.remove("password");
            }
        } else {
            let cred = self
                .credentials
                .entry("password".into())
                .or_insert_with(|| Credential {
                    identifiers: Vec::new(),
                    version: 0,
                    created_at: at,
                    updated_at: at,
                });
            if cred.identifiers != identifiers {
                cred.identifiers = identifiers;
                cred.updated_at = at;
            }
        }

        let email = traits_string(&self.traits, "email");
        let old_verifiable = std::mem::take(&mut self.verifiable_addresses);
        let old_recovery = std::mem::take(&mut self.recovery_addresses);
        if let Some(email) = email {
            let kept = old_verifiable.into_iter().find(|a| a.value == email);
            let imported = imported.iter().find(|a| {
                a.get("value")
                    .and_then(Value::as_str)
                    .is_some_and(|v| v.to_lowercase() == email)
            });
            let mut addr = kept.unwrap_or_else(|| VerifiableAddress {
                id: Uuid::new_v4(),
                value: email.clone(),
                verified: false,
                via: "email".into(),
                status: "pending".into(),
                verified_at: None,
                created_at: at,
                updated_at: at,
            });
            if let Some(imp) = imported {
                let verified = imp
                    .get("verified")
                    .and_then(Value::as_bool)
                    .unwrap_or(addr.verified);
                if verified != addr.verified {
                    addr.verified = verified;
                    addr.verified_at = verified.then_some(at);
                    addr.updated_at = at;
                }
                if let Some(status) = imp.get("status").and_then(Value::as_str) {
                    addr.status = status.to_string();
                } else if verified {
                    addr.status = "completed".into();
                }
            }
            self.verifiable_addresses.push(addr);
            let rec = old_recovery
                .into_iter()
                .find(|a| a.value == email)
                .unwrap_or_else(|| RecoveryAddress {
                    id: Uuid::new_v4(),
                    value: email,
                    via: "email".into(),
                    created_at: at,
                    updated_at: at,
                });
            self.recovery_addresses.push(rec);
        }
    }

    /// Merges `createIdentityBody.credentials` / `updateIdentityBody.credentials`.
    fn import_credentials(&mut self, creds: &Value, at: DateTime<Utc>) -> Result<(), ApiError> {
        let Some(obj) = creds.as_object() else {
            return if creds.is_null() {
                Ok(())
            } else {
                Err(ApiError::bad_request(
                    "Unable to decode JSON payload: credentials must be an object",
                ))
            };
        };
        for (kind, body) in obj {
            if !IMPORTABLE_CREDENTIALS.contains(&kind.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "Unable to decode JSON payload: json: unknown field \"{kind}\""
                )));
            }
            let identifiers = match kind.as_str() {
                "password" => self.identifiers("password").to_vec(),
                "oidc" | "saml" => body
                    .pointer("/config/providers")
                    .and_then(Value::as_array)
                    .map(|ps| {
                        ps.iter()
                            .filter_map(|p| {
                                let provider = p.get("provider")?.as_str()?;
                                let subject = p.get("subject")?.as_str()?;
                                Some(format!("{provider}:{subject}"))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                _ => vec![self.id.to_string()],
            };
            let has_config = body.get("config").is_some_and(|c| !c.is_null());
            let entry = self
                .credentials
                .entry(kind.clone())
                .or_insert_with(|| Credential {
                    identifiers: Vec::new(),
                    version: 0,
                    created_at: at,
                    updated_at: at,
                });
            entry.identifiers = identifiers;
            if has_config && kind == "password" {
                entry.version = 1;
            }
            entry.updated_at = at;
        }
        Ok(())
    }
}

impl Store {
    /// Unique constraints Kratos enforces in SQL: `external_id` and credential identifiers.
    fn conflicts(&self, candidate: &Identity) -> bool {
        self.identities.values().any(|other| {
            other.id != candidate.id
                && ((candidate.external_id.is_some() && other.external_id == candidate.external_id)
                    || candidate.credentials.iter().any(|(kind, c)| {
                        let theirs = other.identifiers(kind);
                        c.identifiers.iter().any(|i| theirs.contains(i))
                    }))
        })
    }

    pub(crate) fn create_identity(&mut self, input: IdentityInput) -> Result<Uuid, ApiError> {
        require_object(&input.traits)?;
        let state = input.state.unwrap_or_else(|| "active".into());
        valid_state(&state)?;
        let at = now();
        let mut identity = Identity {
            id: Uuid::new_v4(),
            schema_id: if input.schema_id.is_empty() {
                "default".into()
            } else {
                input.schema_id
            },
            state,
            state_changed_at: None,
            traits: input.traits,
            external_id: input.external_id.filter(|e| !e.is_empty()),
            metadata_public: input.metadata_public,
            metadata_admin: input.metadata_admin,
            organization_id: input.organization_id,
            region: input.region,
            credentials: BTreeMap::new(),
            verifiable_addresses: Vec::new(),
            recovery_addresses: Vec::new(),
            created_at: at,
            updated_at: at,
        };
        identity.rederive(&input.extra_identifiers, &input.verifiable_addresses, at);
        if let Some(creds) = &input.credentials {
            identity.import_credentials(creds, at)?;
        }
        if input.second_factor && !identity.has_second_factor() {
            identity.import_credentials(&json!({"totp": {}}), at)?;
        }
        if self.conflicts(&identity) {
            return Err(ApiError::conflict_on_create());
        }
        let id = identity.id;
        self.identities.insert(id, identity);
        Ok(id)
    }

    /// `PUT /admin/identities/{id}`: full replace of traits, metadata and external_id.
    pub(crate) fn update_identity(&mut self, id: Uuid, body: UpdateInput) -> Result<(), ApiError> {
        let current = self.identities.get(&id).ok_or_else(ApiError::not_found)?;
        require_object(&body.traits)?;
        let at = now();
        let mut next = current.clone();
        if !body.schema_id.is_empty() {
            next.schema_id = body.schema_id;
        }
        if !body.state.is_empty() {
            valid_state(&body.state)?;
            next.set_state(&body.state, at);
        }
        next.traits = body.traits;
        next.metadata_public = body.metadata_public;
        next.metadata_admin = body.metadata_admin;
        next.external_id = body.external_id.filter(|e| !e.is_empty());
        if body.region.is_some() {
            next.region = body.region;
        }
        next.rederive(&[], &[], at);
        if let Some(creds) = &body.credentials {
            next.import_credentials(creds, at)?;
        }
        self.commit_update(next, at)
    }

    /// `PATCH /admin/identities/{id}`: the patch runs on the admin JSON and the result is read back.
    pub(crate) fn patch_identity(
        &mut self,
        id: Uuid,
        base_url: &str,
        patch: &Value,
    ) -> Result<(), ApiError> {
        let current = self.identities.get(&id).ok_or_else(ApiError::not_found)?;
        let doc = current.to_json(base_url, Shape::Admin);
        let patched = crate::patch::apply(&doc, patch)
            .map_err(|e| ApiError::bad_request(format!("failed to apply JSON patch: {}", e.0)))?;
        let at = now();
        let mut next = current.clone();
        let traits = patched.get("traits").cloned().unwrap_or(Value::Null);
        require_object(&traits)?;
        next.traits = traits;
        match patched.get("schema_id") {
            Some(Value::String(s)) if !s.is_empty() => next.schema_id = s.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    "schema_id must be a non-empty string",
                ));
            }
        }
        match patched.get("state") {
            Some(Value::String(s)) => {
                valid_state(s)?;
                next.set_state(s, at);
            }
            _ => {
                return Err(ApiError::bad_request(
                    "state must be one of active, inactive",
                ));
            }
        }
        next.external_id = match patched.get("external_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()).filter(|s| !s.is_empty()),
            Some(_) => return Err(ApiError::bad_request("external_id must be a string")),
        };
        next.metadata_public = patched
            .get("metadata_public")
            .cloned()
            .unwrap_or(Value::Null);
        next.metadata_admin = patched
            .get("metadata_admin")
            .cloned()
            .unwrap_or(Value::Null);
        next.organization_id = match patched.get("organization_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .ok_or_else(|| ApiError::bad_request("organization_id must be a UUID"))?,
            ),
        };
        next.region = patched
            .get("region")
            .and_then(Value::as_str)
            .map(str::to_string);
        let imported: Vec<Value> = patched
            .get("verifiable_addresses")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        next.rederive(&[], &imported, at);
        self.commit_update(next, at)
    }

    fn commit_update(&mut self, mut next: Identity, at: DateTime<Utc>) -> Result<(), ApiError> {
        if self.conflicts(&next) {
            return Err(ApiError::conflict_on_update());
        }
        next.updated_at = at;
        self.identities.insert(next.id, next);
        Ok(())
    }

    pub(crate) fn set_state(&mut self, id: Uuid, state: &str) -> bool {
        if valid_state(state).is_err() {
            return false;
        }
        let Some(i) = self.identities.get_mut(&id) else {
            return false;
        };
        let at = now();
        i.set_state(state, at);
        i.updated_at = at;
        true
    }

    pub(crate) fn delete_identity(&mut self, id: Uuid) -> bool {
        if self.identities.remove(&id).is_none() {
            return false;
        }
        let doomed: Vec<Uuid> = self
            .sessions
            .values()
            .filter(|s| s.identity_id == id)
            .map(|s| s.id)
            .collect();
        for sid in doomed {
            self.remove_session(sid);
        }
        true
    }

    pub(crate) fn remove_session(&mut self, id: Uuid) -> bool {
        match self.sessions.remove(&id) {
            Some(s) => {
                self.by_token.remove(&s.token);
                self.by_cookie.remove(&s.cookie);
                true
            }
            None => false,
        }
    }

    pub(crate) fn insert_session(&mut self, session: Session) {
        self.by_token.insert(session.token.clone(), session.id);
        self.by_cookie.insert(session.cookie.clone(), session.id);
        self.sessions.insert(session.id, session);
    }

    pub(crate) fn session_by_token(&self, token: &str) -> Option<&Session> {
        self.by_token
            .get(token)
            .and_then(|id| self.sessions.get(id))
    }
}

/// A decoded `updateIdentityBody`.
#[derive(Debug, Default)]
pub(crate) struct UpdateInput {
    pub(crate) schema_id: String,
    pub(crate) state: String,
    pub(crate) traits: Value,
    pub(crate) metadata_public: Value,
    pub(crate) metadata_admin: Value,
    pub(crate) external_id: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) credentials: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::base64url;

    #[test]
    fn schema_url_encoding_matches_kratos() {
        assert_eq!(base64url(b"default"), "ZGVmYXVsdA");
        assert_eq!(base64url(b"customer"), "Y3VzdG9tZXI");
        assert_eq!(base64url(b"ab"), "YWI");
        assert_eq!(base64url(b"abc"), "YWJj");
    }
}
