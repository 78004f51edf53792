//! `envoy.service.auth.v3.Authorization/Check`: Envoy's ext_authz (and so Istio's `CUSTOM`
//! authorization, Contour, Emissary, Envoy Gateway) asks whether to let a request through. The
//! decision is the gateway's (`gateway/`); this only reads the request's headers out of Envoy's
//! attribute context and writes the verdict back as Envoy's `CheckResponse`.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use crate::gateway::{Gateway, Presented, Verdict};

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
        let headers = client_headers(&request);
        let find = |name: &str| headers.get(name);
        let presented = Presented {
            cookie: find("cookie"),
            authorization: find("authorization"),
            session_token: find("x-session-token"),
            accept: find("accept"),
        };
        let verdict = self.gateway.decide(&presented).await;
        Ok(Response::new(match verdict {
            Verdict::Allow { headers: set } => {
                // Every copy the client sent of a header idmap sets goes, even where idmap sets
                // none this time (an anonymous request, a namespace this user lacks).
                let headers_to_remove = headers
                    .names()
                    .filter(|name| self.gateway.is_identity_header(name))
                    .map(str::to_ascii_lowercase)
                    .collect();
                CheckResponse {
                    status: Some(rpc::Status {
                        code: tonic::Code::Ok as i32,
                        ..Default::default()
                    }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers: set.into_iter().map(overwrite).collect(),
                        headers_to_remove,
                        ..Default::default()
                    })),
                    ..Default::default()
                }
            }
            Verdict::Deny {
                status,
                headers,
                body,
            } => CheckResponse {
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
            },
        }))
    }
}

/// The client request's headers as Envoy sends them: the map it fills by default (names lower
/// case, repeated headers joined), or, with `encode_raw_headers`, the header list.
enum ClientHeaders<'a> {
    Map(&'a std::collections::HashMap<String, String>),
    List(Vec<(&'a str, &'a str)>),
}

impl<'a> ClientHeaders<'a> {
    /// The value of `name` (lower case).
    fn get(&self, name: &str) -> Option<&'a str> {
        match self {
            Self::Map(map) => map.get(name).map(String::as_str).or_else(|| {
                // Envoy lower-cases names; anything else building the request may not have.
                map.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
            }),
            Self::List(list) => list
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v),
        }
    }

    fn names(&self) -> Box<dyn Iterator<Item = &'a str> + '_> {
        match self {
            Self::Map(map) => Box::new(map.keys().map(String::as_str)),
            Self::List(list) => Box::new(list.iter().map(|(k, _)| *k)),
        }
    }
}

fn client_headers(request: &CheckRequest) -> ClientHeaders<'_> {
    let Some(http) = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return ClientHeaders::List(Vec::new());
    };
    if !http.headers.is_empty() {
        return ClientHeaders::Map(&http.headers);
    }
    ClientHeaders::List(
        http.header_map
            .as_ref()
            .map(|map| {
                map.headers
                    .iter()
                    .filter_map(|h| {
                        let value = if h.value.is_empty() {
                            std::str::from_utf8(&h.raw_value).ok()?
                        } else {
                            h.value.as_str()
                        };
                        Some((h.key.as_str(), value))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    )
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
