//! `idmap.v1.IdentityService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::{deadline, status::to_status};
use crate::domain::{Credential, ExternalId, FieldViolation, IdentityId, LinkRequest, Namespace};
use crate::error::Error;
use crate::proto::api::{self, identity_service_server::IdentityService};
use crate::service::{IdentityMapper, InvalidateTarget};

/// The gRPC face of [`IdentityMapper`].
#[derive(Clone)]
pub struct IdentityApi {
    mapper: Arc<IdentityMapper>,
}

impl IdentityApi {
    pub fn new(mapper: Arc<IdentityMapper>) -> Self {
        Self { mapper }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn resolve_session(
        &self,
        request: Request<api::ResolveSessionRequest>,
    ) -> Result<Response<api::ResolveSessionResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let api::ResolveSessionRequest {
            credential,
            include_assertion,
        } = message;
        let work = async {
            let credential = match credential {
                Some(api::resolve_session_request::Credential::SessionToken(token)) => {
                    Credential::session_token("session_token", &token)?
                }
                Some(api::resolve_session_request::Credential::Cookie(header)) => {
                    self.mapper.cookie_credential("cookie", &header)?
                }
                None => {
                    return Err(Error::from(FieldViolation {
                        field: "credential".into(),
                        description: "set session_token or cookie".into(),
                    }));
                }
            };
            self.mapper.resolve_session(&credential).await
        };
        let resolved = deadline::within(&metadata, work).await.map_err(to_status)?;
        // Encoded once per cached session, by its first hit.
        let encoded = resolved.rendering.get_or_init(|| {
            api::ResolveSessionResponse::encode_session(
                &(&resolved.session.session).into(),
                &(&resolved.session.identity).into(),
            )
        });
        let mut response = api::ResolveSessionResponse::with_encoded_session(
            encoded.clone(),
            resolved.user.as_deref().map(Into::into),
        );
        if include_assertion && let Some(assertion) = self.mapper.assertion(&resolved) {
            response.assertion = assertion.to_string();
        }
        Ok(Response::new(response))
    }

    async fn get_user_by_ory_id(
        &self,
        request: Request<api::GetUserByOryIdRequest>,
    ) -> Result<Response<api::GetUserByOryIdResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let api::GetUserByOryIdRequest { ory_identity_id } = message;
        let work = async {
            let id = IdentityId::parse("ory_identity_id", &ory_identity_id)?;
            self.mapper.user_by_identity(id).await
        };
        let user = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::GetUserByOryIdResponse {
            user: Some(user.as_ref().into()),
        }))
    }

    async fn get_by_external_id(
        &self,
        request: Request<api::GetByExternalIdRequest>,
    ) -> Result<Response<api::GetByExternalIdResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let api::GetByExternalIdRequest {
            external_id,
            namespace,
            include_former,
        } = message;
        let work = async {
            let (namespace, value) = parse_pair(&namespace, "external_id", &external_id)?;
            self.mapper
                .user_by_external_id(&namespace, &value, include_former)
                .await
        };
        let found = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::GetByExternalIdResponse {
            user: Some(found.user.as_ref().into()),
            former: found.former,
        }))
    }

    async fn link_identity(
        &self,
        request: Request<api::LinkIdentityRequest>,
    ) -> Result<Response<api::LinkIdentityResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let work = async {
            let request = LinkRequest::try_from(message)?;
            self.mapper.link(request).await
        };
        let outcome = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::LinkIdentityResponse {
            user: Some((&outcome.user).into()),
            created: outcome.created,
        }))
    }

    async fn batch_get_users(
        &self,
        request: Request<api::BatchGetUsersRequest>,
    ) -> Result<Response<api::BatchGetUsersResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let api::BatchGetUsersRequest { ory_identity_ids } = message;
        let work = async {
            let ids = convert::batch_ids(&ory_identity_ids)?;
            self.mapper.users_by_identities(&ids).await
        };
        let users = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::BatchGetUsersResponse {
            users: users.iter().map(|u| u.as_ref().into()).collect(),
        }))
    }

    async fn invalidate_session(
        &self,
        request: Request<api::InvalidateSessionRequest>,
    ) -> Result<Response<api::InvalidateSessionResponse>, Status> {
        use api::invalidate_session_request::Target;
        let (metadata, _, message) = request.into_parts();
        let api::InvalidateSessionRequest { target } = message;
        let work = async {
            let target = match target {
                Some(Target::SessionToken(token)) => InvalidateTarget::Credential(
                    Credential::session_token("session_token", &token)?,
                ),
                Some(Target::SessionId(id)) => {
                    // Ory session ids are UUIDs; the canonical text is what cached sessions hold.
                    let id = crate::domain::parse_uuid("session_id", &id)?;
                    InvalidateTarget::SessionId(id.hyphenated().to_string())
                }
                Some(Target::OryIdentityId(id)) => {
                    InvalidateTarget::Identity(IdentityId::parse("ory_identity_id", &id)?)
                }
                None => {
                    return Err(Error::from(FieldViolation {
                        field: "target".into(),
                        description: "set session_token, session_id or ory_identity_id".into(),
                    }));
                }
            };
            self.mapper.invalidate(target).await
        };
        deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::InvalidateSessionResponse {}))
    }

    async fn set_external_id(
        &self,
        request: Request<api::SetExternalIdRequest>,
    ) -> Result<Response<api::SetExternalIdResponse>, Status> {
        use api::set_external_id_request::Subject as S;
        let (metadata, _, message) = request.into_parts();
        let api::SetExternalIdRequest {
            subject,
            namespace,
            value,
            replace,
        } = message;
        let work = async {
            let subject = match &subject {
                Some(S::OryIdentityId(id)) => convert::subject(Some(id), None),
                Some(S::UserId(id)) => convert::subject(None, Some(id)),
                None => convert::subject(None, None),
            };
            let (subject, pair) = both(subject, parse_pair(&namespace, "value", &value))?;
            let (namespace, value) = pair;
            self.mapper
                .set_external_id(subject, &namespace, &value, replace)
                .await
        };
        let user = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::SetExternalIdResponse {
            user: Some(user.as_ref().into()),
        }))
    }

    async fn remove_external_id(
        &self,
        request: Request<api::RemoveExternalIdRequest>,
    ) -> Result<Response<api::RemoveExternalIdResponse>, Status> {
        use api::remove_external_id_request::Subject as S;
        let (metadata, _, message) = request.into_parts();
        let api::RemoveExternalIdRequest { subject, namespace } = message;
        let work = async {
            let subject = match &subject {
                Some(S::OryIdentityId(id)) => convert::subject(Some(id), None),
                Some(S::UserId(id)) => convert::subject(None, Some(id)),
                None => convert::subject(None, None),
            };
            let namespace = Namespace::parse("namespace", &namespace).map_err(Error::from);
            let (subject, namespace) = both(subject.map_err(Error::from), namespace)?;
            self.mapper.remove_external_id(subject, &namespace).await
        };
        let user = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::RemoveExternalIdResponse {
            user: Some(user.as_ref().into()),
        }))
    }

    async fn batch_get_by_external_ids(
        &self,
        request: Request<api::BatchGetByExternalIdsRequest>,
    ) -> Result<Response<api::BatchGetByExternalIdsResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let api::BatchGetByExternalIdsRequest { namespace, values } = message;
        let work = async {
            let namespace = Namespace::parse("namespace", &namespace).map_err(Error::from);
            let (namespace, values) = both(namespace, convert::batch_values(&values))?;
            self.mapper.users_by_external_ids(&namespace, &values).await
        };
        let users = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::BatchGetByExternalIdsResponse {
            users: users.iter().map(|u| u.as_ref().into()).collect(),
        }))
    }
}

/// A namespace and a value from a request, every violation of both reported at once.
fn parse_pair(
    namespace: &str,
    value_field: &'static str,
    value: &str,
) -> Result<(Namespace, ExternalId), Error> {
    both(
        Namespace::parse("namespace", namespace).map_err(Error::from),
        ExternalId::parse(value_field, value).map_err(Error::from),
    )
}

/// Both results, or one error holding every field violation of the two.
fn both<A, B>(
    a: Result<A, impl Into<Error>>,
    b: Result<B, impl Into<Error>>,
) -> Result<(A, B), Error> {
    match (a.map_err(Into::into), b.map_err(Into::into)) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(Error::InvalidArgument(mut x)), Err(Error::InvalidArgument(y))) => {
            x.extend(y);
            Err(Error::InvalidArgument(x))
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}
