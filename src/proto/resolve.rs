//! `idmap.v1.ResolveSessionResponse`, written by hand (see the type).

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};

use super::api;

/// `idmap.v1.ResolveSessionResponse`, written by hand instead of generated (build.rs) so that the
/// server can send `session` and `identity` as bytes encoded once per cached session, rather than
/// converting and encoding them again on every cache hit. The test
/// `hand_written_response_encodes_every_field_of_the_proto` holds it to the .proto.
/// On the wire it is exactly the generated message; clients decode it into the public fields.
#[derive(Clone, PartialEq, Default)]
pub struct ResolveSessionResponse {
    /// The validated session.
    pub session: Option<api::Session>,
    /// The session's identity.
    pub identity: Option<api::Identity>,
    /// The linked internal user; absent when the identity has none and auto-linking is off.
    pub user: Option<api::User>,
    /// The signed identity assertion, when asked for; empty otherwise.
    pub assertion: String,
    /// Fields 1 and 2 already encoded ([`ResolveSessionResponse::encode_session`]); when set they
    /// are sent instead of `session` and `identity`.
    encoded_session: Option<Bytes>,
}

impl ResolveSessionResponse {
    /// Fields 1 (`session`) and 2 (`identity`) as they appear in an encoded response.
    pub fn encode_session(session: &api::Session, identity: &api::Identity) -> Bytes {
        let mut buf = Vec::with_capacity(
            encoding::message::encoded_len(1, session)
                + encoding::message::encoded_len(2, identity),
        );
        encoding::message::encode(1, session, &mut buf);
        encoding::message::encode(2, identity, &mut buf);
        Bytes::from(buf)
    }

    /// A response whose session and identity are `encoded` ([`ResolveSessionResponse::encode_session`]).
    pub fn with_encoded_session(encoded: Bytes, user: Option<api::User>) -> Self {
        Self {
            session: None,
            identity: None,
            user,
            assertion: String::new(),
            encoded_session: Some(encoded),
        }
    }
}

impl std::fmt::Debug for ResolveSessionResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolveSessionResponse")
            .field("session", &self.session)
            .field("identity", &self.identity)
            .field("user", &self.user)
            .field("assertion", &self.assertion.len())
            .field(
                "encoded_session",
                &self.encoded_session.as_ref().map(Bytes::len),
            )
            .finish()
    }
}

/// Decodes one optional message field of `ResolveSessionResponse`, as prost's generated code does.
fn merge_message<M: prost::Message + Default>(
    field: &mut Option<M>,
    name: &'static str,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), prost::DecodeError> {
    encoding::message::merge(wire_type, field.get_or_insert_with(M::default), buf, ctx).map_err(
        |mut e| {
            e.push("ResolveSessionResponse", name);
            e
        },
    )
}

impl prost::Message for ResolveSessionResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.encoded_session {
            Some(encoded) => buf.put_slice(encoded),
            None => {
                if let Some(session) = &self.session {
                    encoding::message::encode(1, session, buf);
                }
                if let Some(identity) = &self.identity {
                    encoding::message::encode(2, identity, buf);
                }
            }
        }
        if let Some(user) = &self.user {
            encoding::message::encode(3, user, buf);
        }
        if !self.assertion.is_empty() {
            encoding::string::encode(4, &self.assertion, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            1 => merge_message(&mut self.session, "session", wire_type, buf, ctx),
            2 => merge_message(&mut self.identity, "identity", wire_type, buf, ctx),
            3 => merge_message(&mut self.user, "user", wire_type, buf, ctx),
            4 => encoding::string::merge(wire_type, &mut self.assertion, buf, ctx).map_err(
                |mut e| {
                    e.push("ResolveSessionResponse", "assertion");
                    e
                },
            ),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let head = match &self.encoded_session {
            Some(encoded) => encoded.len(),
            None => {
                self.session
                    .as_ref()
                    .map_or(0, |s| encoding::message::encoded_len(1, s))
                    + self
                        .identity
                        .as_ref()
                        .map_or(0, |i| encoding::message::encoded_len(2, i))
            }
        };
        head + self
            .user
            .as_ref()
            .map_or(0, |u| encoding::message::encoded_len(3, u))
            + if self.assertion.is_empty() {
                0
            } else {
                encoding::string::encoded_len(4, &self.assertion)
            }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::ResolveSessionResponse;
    use crate::proto::{FILE_DESCRIPTOR_SET, api};

    fn sample() -> ResolveSessionResponse {
        let traits = prost_types::Struct {
            fields: [(
                "email".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        "a@example.com".into(),
                    )),
                },
            )]
            .into(),
        };
        ResolveSessionResponse {
            session: Some(api::Session {
                id: "0d615c20-b084-4903-931b-0aea764d2bd1".into(),
                active: true,
                authenticator_assurance_level: "aal1".into(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000,
                    nanos: 5,
                }),
                ..Default::default()
            }),
            identity: Some(api::Identity {
                id: "fa31f4ce-bb47-4b95-8bf5-7c30e64904a6".into(),
                schema_id: "customer".into(),
                state: "active".into(),
                traits: Some(traits),
                ..Default::default()
            }),
            user: Some(api::User {
                id: "60cbc25b-65f6-42cb-a6f9-3c65d2cb397e".into(),
                schema_id: "customer".into(),
                ..Default::default()
            }),
            assertion: "eyJhbGciOiJFZERTQSJ9.e30.c2ln".into(),
            encoded_session: None,
        }
    }

    /// The pre-encoded form is byte for byte what encoding the fields gives, and decodes back to
    /// them, so clients cannot tell the two apart.
    #[test]
    fn pre_encoded_session_is_the_same_message_on_the_wire() {
        let plain = sample();
        let encoded = ResolveSessionResponse::encode_session(
            plain.session.as_ref().unwrap(),
            plain.identity.as_ref().unwrap(),
        );
        let mut pre = ResolveSessionResponse::with_encoded_session(encoded, plain.user.clone());
        pre.assertion = plain.assertion.clone();
        assert_eq!(pre.encoded_len(), plain.encoded_len());
        assert_eq!(pre.encode_to_vec(), plain.encode_to_vec());
        assert_eq!(
            ResolveSessionResponse::decode(&pre.encode_to_vec()[..]).unwrap(),
            plain
        );
        let without_user = ResolveSessionResponse {
            user: None,
            ..plain.clone()
        };
        let bytes = without_user.encode_to_vec();
        assert_eq!(
            ResolveSessionResponse::decode(&bytes[..]).unwrap(),
            without_user
        );
    }

    /// The top-level fields of an encoded message: number, wire type and (length-delimited)
    /// payload, in order.
    fn top_level_fields(mut buf: &[u8]) -> Vec<(u32, prost::encoding::WireType, Vec<u8>)> {
        use prost::encoding::{WireType, decode_key, decode_varint};
        let mut fields = Vec::new();
        while !buf.is_empty() {
            let (number, wire_type) = decode_key(&mut buf).unwrap();
            let payload = match wire_type {
                WireType::LengthDelimited => {
                    let len = usize::try_from(decode_varint(&mut buf).unwrap()).unwrap();
                    let (payload, rest) = buf.split_at(len);
                    buf = rest;
                    payload.to_vec()
                }
                WireType::Varint => decode_varint(&mut buf).unwrap().to_le_bytes().to_vec(),
                other => panic!("field {number}: unexpected wire type {other:?}"),
            };
            fields.push((number, wire_type, payload));
        }
        fields
    }

    /// The hand-written message against the .proto: every field `ResolveSessionResponse` declares
    /// is encoded (in both forms the server sends), once, under its number, as the message type
    /// the .proto names. A field added to the .proto but not to `src/proto/resolve.rs` fails here instead
    /// of being left out of every answer.
    #[test]
    fn hand_written_response_encodes_every_field_of_the_proto() {
        use prost_types::field_descriptor_proto::{Label, Type};

        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let declared = set
            .file
            .iter()
            .filter(|f| f.package() == "idmap.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "ResolveSessionResponse")
            .expect("ResolveSessionResponse is in the descriptor set");

        let plain = sample();
        let mut pre = ResolveSessionResponse::with_encoded_session(
            ResolveSessionResponse::encode_session(
                plain.session.as_ref().unwrap(),
                plain.identity.as_ref().unwrap(),
            ),
            plain.user.clone(),
        );
        pre.assertion = plain.assertion.clone();
        for (form, bytes) in [
            ("fields", plain.encode_to_vec()),
            ("pre-encoded", pre.encode_to_vec()),
        ] {
            let sent = top_level_fields(&bytes);
            let mut numbers: Vec<u32> = sent.iter().map(|(n, _, _)| *n).collect();
            numbers.sort_unstable();
            let mut expected: Vec<u32> = declared
                .field
                .iter()
                .map(|f| u32::try_from(f.number()).unwrap())
                .collect();
            expected.sort_unstable();
            assert_eq!(
                numbers, expected,
                "{form}: the field numbers sent are not the ones the .proto declares"
            );
            for field in &declared.field {
                assert_eq!(field.label(), Label::Optional, "{}", field.name());
                let expected_type = if field.name() == "assertion" {
                    Type::String
                } else {
                    Type::Message
                };
                assert_eq!(field.r#type(), expected_type, "{}", field.name());
                let number = u32::try_from(field.number()).unwrap();
                let (_, wire_type, payload) = sent.iter().find(|(n, _, _)| *n == number).unwrap();
                assert_eq!(*wire_type, prost::encoding::WireType::LengthDelimited);
                // The payload is the field the .proto names, holding what the response holds.
                match (field.name(), field.type_name()) {
                    ("session", ".idmap.v1.Session") => assert_eq!(
                        Some(api::Session::decode(&payload[..]).unwrap()),
                        plain.session
                    ),
                    ("identity", ".idmap.v1.Identity") => assert_eq!(
                        Some(api::Identity::decode(&payload[..]).unwrap()),
                        plain.identity
                    ),
                    ("user", ".idmap.v1.User") => {
                        assert_eq!(Some(api::User::decode(&payload[..]).unwrap()), plain.user)
                    }
                    ("assertion", "") => {
                        assert_eq!(std::str::from_utf8(payload).unwrap(), plain.assertion)
                    }
                    (name, type_name) => panic!(
                        "field {name} ({type_name}, number {number}) of ResolveSessionResponse is \
                         not written by the hand-written message in src/proto/resolve.rs"
                    ),
                }
            }
        }
    }
}
