//! `idmap.v1.IdentityService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::{deadline, status::to_status};
use crate::domain::{Credential, ExternalId, FieldViolation, IdentityId, LinkRequest};
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
        let api::ResolveSessionRequest { credential } = message;
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
        Ok(Response::new(
            api::ResolveSessionResponse::with_encoded_session(
                encoded.clone(),
                resolved.user.as_deref().map(Into::into),
            ),
        ))
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
        let api::GetByExternalIdRequest { external_id } = message;
        let work = async {
            let external_id = ExternalId::parse("external_id", &external_id)?;
            self.mapper.user_by_external_id(&external_id).await
        };
        let user = deadline::within(&metadata, work).await.map_err(to_status)?;
        Ok(Response::new(api::GetByExternalIdResponse {
            user: Some(user.as_ref().into()),
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
}
