//! `envoy.service.auth.v3.Authorization/Check`: Envoy's ext_authz (and so Istio's `CUSTOM`
//! authorization, Contour, Emissary, Envoy Gateway) asks whether to let a request through. The
//! decision is the gateway's (`gateway/`); this only reads the request's headers out of Envoy's
//! attribute context and writes the verdict back as Envoy's `CheckResponse`, an allowed one with
//! its identity headers encoded once per cached session (`proto/ext_authz.rs`).

use std::borrow::Cow;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse,
    HttpStatus,
};
use envoy_types::pb::envoy::service::auth::v3 as pb;
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use crate::gateway::{Gateway, Presented, Verdict};
use crate::proto::ext_authz::{Authorization, CheckRequest, CheckResponse};

/// The ext_authz server over the gateway's decision.
#[derive(Clone)]
pub struct ExtAuthz {
    gateway: Arc<Gateway>,
}

impl ExtAuthz {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        // One pass over the client's headers: the ones the decision reads (the first of each, but
        // cookies, which a browser may split over several headers on HTTP/2 and which are one
        // list), and every copy of a header idmap sets, which could only be a forgery.
        let mut presented = Presented::default();
        let mut cookie: Option<Cow<'_, str>> = None;
        let mut forged = Vec::new();
        for (name, value) in request.headers() {
            let is = |known: &str| name.eq_ignore_ascii_case(known);
            if is("cookie") {
                cookie = Some(match cookie.take() {
                    None => Cow::Borrowed(value),
                    Some(before) => Cow::Owned(format!("{before}; {value}")),
                });
            } else if is("authorization") {
                presented.authorization.get_or_insert(value);
            } else if is("x-session-token") {
                presented.session_token.get_or_insert(value);
            } else if is("accept") {
                presented.accept.get_or_insert(value);
            } else if self.gateway.is_identity_header(name) {
                forged.push(name.to_ascii_lowercase());
            }
        }
        presented.cookie = cookie.as_deref();
        Ok(Response::new(match self.gateway.decide(&presented).await {
            // Removed even where idmap sets none this time (an anonymous request, a namespace
            // this user lacks).
            Verdict::Allow(allowed) => CheckResponse::allowed(
                self.gateway.encoded_headers(&allowed, |headers| {
                    let set: Vec<HeaderValueOption> = headers.into_iter().map(overwrite).collect();
                    CheckResponse::encode_headers(&set)
                }),
                forged,
            ),
            Verdict::Deny {
                status,
                headers,
                body,
            } => pb::CheckResponse {
                status: Some(rpc::Status {
                    code: match status {
                        401 | 303 => tonic::Code::Unauthenticated,
                        403 => tonic::Code::PermissionDenied,
                        _ => tonic::Code::Unavailable,
                    } as i32,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(status),
                    }),
                    headers: headers.into_iter().map(overwrite).collect(),
                    body: body.to_owned(),
                })),
                ..Default::default()
            }
            .into(),
        }))
    }
}

fn overwrite((key, value): (String, String)) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}
