use std::fmt;

use uuid::Uuid;

use super::FieldViolation;

/// The longest external id accepted, in bytes of UTF-8.
pub const MAX_EXTERNAL_ID_BYTES: usize = 255;

/// Parses a UUID in its canonical hyphenated form only: ids travel between services as text, and
/// accepting several spellings of one id would let two strings name the same record.
pub fn parse_uuid(field: &'static str, value: &str) -> Result<Uuid, FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if value.len() != 36 {
        return Err(FieldViolation::new(
            field,
            "must be a UUID in the form 8-4-4-4-12 hex digits",
        ));
    }
    Uuid::try_parse(value)
        .map_err(|_| FieldViolation::new(field, "must be a UUID in the form 8-4-4-4-12 hex digits"))
}

/// The internal user id: minted by idmap or chosen by the caller, never by Ory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Uuid);

impl UserId {
    /// Mints a new id. Version 7 ids are time-ordered, which keeps the primary-key index compact
    /// under a steady stream of inserts.
    pub fn mint() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a caller-supplied id; `field` names the request field in the error.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        let id = parse_uuid(field, value)?;
        // The nil UUID is what an unset id looks like in many languages' defaults; as a user id it
        // would be written to Ory and shared by whoever else made the same mistake.
        if id.is_nil() {
            return Err(FieldViolation::new(field, "must not be the nil UUID"));
        }
        Ok(Self(id))
    }

    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// An Ory identity id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(Uuid);

impl IdentityId {
    /// Parses a caller-supplied id; `field` names the request field in the error.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        let id = parse_uuid(field, value)?;
        // Kratos shows the nil id to pre-persist hooks before the identity exists; it never names a
        // stored identity.
        if id.is_nil() {
            return Err(FieldViolation::new(
                field,
                "must not be the nil UUID (Ory uses it before an identity is stored)",
            ));
        }
        Ok(Self(id))
    }

    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A business id held by at most one user: 1 to 255 bytes of UTF-8 without control characters,
/// compared exactly (no case folding or trimming: the caller's system owns its format).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExternalId(String);

impl ExternalId {
    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Err(FieldViolation::new(field, "must not be empty"));
        }
        if value.len() > MAX_EXTERNAL_ID_BYTES {
            return Err(FieldViolation::new(
                field,
                format!(
                    "must be at most {MAX_EXTERNAL_ID_BYTES} bytes of UTF-8, got {}",
                    value.len()
                ),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(FieldViolation::new(
                field,
                "must not contain control characters",
            ));
        }
        // Format characters (bidi overrides, zero-width spaces and joiners, ...) are invisible:
        // two ids that look the same to an operator would be different ids, and a bidi override
        // can make one id display as another.
        if let Some(c) = value.chars().find(|c| {
            unicode_general_category::get_general_category(*c)
                == unicode_general_category::GeneralCategory::Format
        }) {
            return Err(FieldViolation::new(
                field,
                format!(
                    "must not contain invisible format characters (found U+{:04X})",
                    u32::from(c)
                ),
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// Wraps a value read back from storage, which only ever holds validated ids.
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The longest namespace name.
pub const MAX_NAMESPACE_CHARS: usize = 64;

/// The namespace of a business id: empty (the default, what the single-id API fields mean) or 1 to
/// 64 characters of `[a-z0-9._-]` starting with a letter or digit. Names are lower case only, so
/// `CRM` and `crm` cannot become two namespaces by accident.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Namespace(String);

impl Namespace {
    /// The default namespace.
    pub const DEFAULT: Namespace = Namespace(String::new());

    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        if value.is_empty() {
            return Ok(Self::DEFAULT);
        }
        if value.len() > MAX_NAMESPACE_CHARS {
            return Err(FieldViolation::new(
                field,
                format!(
                    "must be at most {MAX_NAMESPACE_CHARS} characters, got {}",
                    value.chars().count()
                ),
            ));
        }
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let mut chars = value.chars();
        if !chars.next().is_some_and(valid)
            || !chars.all(|c| valid(c) || matches!(c, '.' | '_' | '-'))
        {
            return Err(FieldViolation::new(
                field,
                "must be empty (the default namespace) or [a-z0-9._-] starting with a letter or digit",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// Wraps a value read back from storage, which only ever holds validated namespaces.
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }

    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A business id: a value in a namespace. A value is unique within its namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespacedId {
    pub namespace: Namespace,
    pub value: ExternalId,
}

impl NamespacedId {
    pub fn new(namespace: Namespace, value: ExternalId) -> Self {
        Self { namespace, value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_ids_accept_only_the_canonical_form() {
        assert!(IdentityId::parse("f", "3f2504e0-4f89-11d3-9a0c-0305e82c3301").is_ok());
        assert!(IdentityId::parse("f", "3F2504E0-4F89-11D3-9A0C-0305E82C3301").is_ok());
        for bad in [
            "",
            "not-a-uuid",
            "3f2504e04f8911d39a0c0305e82c3301",
            "{3f2504e0-4f89-11d3-9a0c-0305e82c3301}",
            "urn:uuid:3f2504e0-4f89-11d3-9a0c-0305e82c3301",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert!(IdentityId::parse("f", bad).is_err(), "{bad:?} accepted");
        }
        assert!(UserId::parse("f", "3f2504e0-4f89-11d3-9a0c-0305e82c33").is_err());
        assert!(UserId::parse("f", "00000000-0000-0000-0000-000000000000").is_err());
        assert!(UserId::parse("f", "3f2504e0-4f89-11d3-9a0c-0305e82c3301").is_ok());
    }

    #[test]
    fn external_ids_are_bounded_and_free_of_control_characters() {
        assert!(ExternalId::parse("f", "crm-42").is_ok());
        assert!(ExternalId::parse("f", "ü".repeat(127).as_str()).is_ok());
        assert!(ExternalId::parse("f", &"a".repeat(255)).is_ok());
        assert!(ExternalId::parse("f", &"a".repeat(256)).is_err());
        // 128 two-byte characters are 256 bytes: the limit is on bytes, not characters.
        assert!(ExternalId::parse("f", "ü".repeat(128).as_str()).is_err());
        assert!(ExternalId::parse("f", "").is_err());
        assert!(ExternalId::parse("f", "a\nb").is_err());
        assert!(ExternalId::parse("f", "a\u{0}b").is_err());
        assert!(ExternalId::parse("f", "a\u{85}b").is_err());
        // Invisible format characters: bidi overrides and isolates, zero-width space, joiners,
        // the byte-order mark, a soft hyphen, a tag character.
        for invisible in [
            "\u{202E}",
            "\u{2066}",
            "\u{200B}",
            "\u{200D}",
            "\u{FEFF}",
            "\u{AD}",
            "\u{E0041}",
        ] {
            let err = ExternalId::parse("f", &format!("crm{invisible}42")).unwrap_err();
            assert!(
                err.description.contains("format characters"),
                "{invisible:?}: {err}"
            );
        }
        // Visible non-ASCII stays allowed.
        assert!(ExternalId::parse("f", "kunde-müller-北京").is_ok());
    }

    #[test]
    fn namespaces_are_lower_case_names_or_the_default() {
        assert!(Namespace::parse("f", "").unwrap().is_default());
        for good in [
            "crm",
            "billing.v2",
            "legacy_erp",
            "a",
            "0-ledger",
            &"a".repeat(64),
        ] {
            assert_eq!(Namespace::parse("f", good).unwrap().as_str(), good);
        }
        for bad in [
            "CRM",
            "-crm",
            ".x",
            "_x",
            "crm id",
            "crm/1",
            "kündigung",
            &"a".repeat(65),
            "crm\n",
        ] {
            assert!(Namespace::parse("f", bad).is_err(), "{bad:?} accepted");
        }
    }
}
