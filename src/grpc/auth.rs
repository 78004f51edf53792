//! Caller authorization in front of every gRPC service: reads the evidence of who is calling off
//! the request (an `Authorization: Bearer` key, a trusted mesh header), asks the policy
//! (`auth.rs`), and answers a refusal itself, so no handler runs for it. An allowed caller travels
//! on in the request's extensions.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderMap;
use prometheus::IntCounter;
use tonic::body::Body;

use crate::auth::{Access, Caller, CallerPolicy, Denied, Evidence, RPCS};
use crate::config::TrustedHeader;
use crate::metrics;
use crate::tls::PeerCertificate;

use super::incoming::ConnectionInfo;

/// The policy and the mesh header to trust, shared by every connection.
#[derive(Debug, Clone)]
pub struct CallerAuth {
    policy: Arc<CallerPolicy>,
    trusted_header: Option<TrustedHeader>,
    counters: Arc<CallerCounters>,
}

impl CallerAuth {
    pub fn new(policy: Arc<CallerPolicy>, trusted_header: Option<TrustedHeader>) -> Self {
        Self {
            counters: Arc::new(CallerCounters::new(&policy)),
            policy,
            trusted_header,
        }
    }
}

/// `idmap_caller_calls_total`, resolved for every caller of the file, every RPC (and `other`) and
/// both decisions when the server starts, so that counting a call takes no lock.
#[derive(Debug)]
struct CallerCounters {
    by_caller: HashMap<Arc<str>, CounterTable>,
    /// `None` when any caller is allowed: nobody is ever refused.
    unidentified: Option<CounterTable>,
}

/// By method (the RPCs in [`RPCS`] order, then `other`), then allowed and denied.
type CounterTable = Vec<[IntCounter; 2]>;

impl CallerCounters {
    fn new(policy: &CallerPolicy) -> Self {
        let table = |caller: &str| -> CounterTable {
            RPCS.iter()
                .copied()
                .chain(["other"])
                .map(|method| {
                    ["allowed", "denied"].map(|decision| {
                        metrics::get()
                            .caller_calls
                            .with_label_values(&[caller, method, decision])
                    })
                })
                .collect()
        };
        Self {
            by_caller: policy
                .caller_names()
                .into_iter()
                .map(|name| {
                    let counters = table(&name);
                    (name, counters)
                })
                .collect(),
            unidentified: matches!(policy, CallerPolicy::Callers(_)).then(|| table("unidentified")),
        }
    }

    /// Counts a decision about an identified (or refused) caller.
    fn count(&self, access: Access<'_>, decision: &Result<Option<Caller>, Denied>) {
        let (table, verdict) = match decision {
            Ok(None) => return,
            Ok(Some(caller)) => (self.by_caller.get(&*caller.name), 0),
            Err(Denied::NotAllowed { caller, .. }) => (self.by_caller.get(&*caller.name), 1),
            Err(Denied::Unauthenticated { .. }) => (self.unidentified.as_ref(), 1),
        };
        let method = match access {
            Access::Rpc(rpc) => RPCS.iter().position(|known| *known == rpc),
            Access::Open | Access::Identified => None,
        };
        if let Some(table) = table
            && let Some(counters) = table.get(method.unwrap_or(RPCS.len()))
        {
            counters[verdict].inc();
        }
    }
}

impl<S> tower::Layer<S> for CallerAuth {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            auth: self.clone(),
            inner,
        }
    }
}

/// A gRPC service behind [`CallerAuth`].
#[derive(Debug, Clone)]
pub struct Authorized<S> {
    auth: CallerAuth,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let access = access_of(path);
        let trusted = self.auth.trusted_header;
        let peer = request
            .extensions()
            .get::<ConnectionInfo>()
            .and_then(|info| info.peer.as_deref());
        let decision = self
            .auth
            .policy
            .authorize(access, || evidence(request.headers(), peer, trusted));
        self.auth.counters.count(access, &decision);
        match decision {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                futures_util::future::Either::Left(self.inner.call(request))
            }
            Err(denied) => {
                let status = super::status::caller_refused(path, denied);
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// What a call to `path` (`/package.Service/Method`) asks for.
fn access_of(path: &str) -> Access<'_> {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    match service {
        "grpc.health.v1.Health" => Access::Open,
        "idmap.v1.IdentityService" => Access::Rpc(method),
        // A gateway is a caller granted `Check`.
        "envoy.service.auth.v3.Authorization" => Access::Rpc(method),
        // Reflection, and whatever else a client asks for (tonic answers UNIMPLEMENTED).
        _ => Access::Identified,
    }
}

/// The evidence of who is calling that the request and its connection carry.
fn evidence<'a>(
    headers: &'a HeaderMap,
    peer: Option<&'a PeerCertificate>,
    trusted: Option<TrustedHeader>,
) -> Evidence<'a> {
    let api_key = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        })
        .filter(|key| !key.is_empty());
    let mut evidence = Evidence {
        api_key,
        ..Evidence::default()
    };
    if let Some(peer) = peer {
        evidence.spiffe_ids.extend(peer.uris.iter().cloned());
        evidence.dns_names.extend(peer.dns_names.iter().cloned());
        evidence.certificate_subject = Some(&peer.subject);
    }
    match trusted {
        Some(TrustedHeader::XForwardedClientCert) => {
            // Each proxy on the way appends an element; the last is the one of the sidecar in
            // front of idmap, which verified the client's certificate itself.
            if let Some(element) = headers
                .get_all("x-forwarded-client-cert")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .next_back()
                .and_then(|v| split_outside_quotes(v, ',').pop())
            {
                for pair in split_outside_quotes(&element, ';') {
                    let Some((key, value)) = pair.split_once('=') else {
                        continue;
                    };
                    let value = value.trim().trim_matches('"').to_owned();
                    match key.trim().to_ascii_lowercase().as_str() {
                        "uri" => evidence.spiffe_ids.push(value),
                        "dns" => evidence.dns_names.push(value),
                        _ => {}
                    }
                }
            }
        }
        Some(TrustedHeader::L5dClientId) => {
            if let Some(id) = headers.get("l5d-client-id").and_then(|v| v.to_str().ok()) {
                evidence.dns_names.push(id.trim().to_owned());
            }
        }
        None => {}
    }
    evidence
}

/// Splits `value` at `separator`s that are not inside double quotes (XFCC quotes subjects, which
/// hold commas and semicolons).
fn split_outside_quotes(value: &str, separator: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        match c {
            _ if escaped => {
                escaped = false;
                current.push(c);
            }
            '\\' => {
                escaped = true;
                current.push(c);
            }
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c == separator && !quoted => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_what_they_ask_for() {
        assert_eq!(access_of("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access_of("/idmap.v1.IdentityService/ResolveSession"),
            Access::Rpc("ResolveSession")
        );
        assert_eq!(
            access_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Identified
        );
    }

    #[test]
    fn the_mesh_headers_name_the_caller_only_when_trusted() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-client-cert",
            r#"By=spiffe://cluster.local/ns/a/sa/x;URI=spiffe://evil,By=spiffe://cluster.local/ns/idmap/sa/idmap;Hash=abc;Subject="CN=bff, O=web";URI=spiffe://cluster.local/ns/web/sa/bff"#
                .parse()
                .unwrap(),
        );
        headers.insert(
            "l5d-client-id",
            "bff.web.serviceaccount.identity.linkerd.cluster.local"
                .parse()
                .unwrap(),
        );
        headers.insert(http::header::AUTHORIZATION, "Bearer k3y".parse().unwrap());

        let plain = evidence(&headers, None, None);
        assert_eq!(plain.api_key, Some("k3y"));
        assert!(plain.spiffe_ids.is_empty() && plain.dns_names.is_empty());

        let envoy = evidence(&headers, None, Some(TrustedHeader::XForwardedClientCert));
        assert_eq!(envoy.spiffe_ids, ["spiffe://cluster.local/ns/web/sa/bff"]);

        let linkerd = evidence(&headers, None, Some(TrustedHeader::L5dClientId));
        assert_eq!(
            linkerd.dns_names,
            ["bff.web.serviceaccount.identity.linkerd.cluster.local"]
        );
        assert!(linkerd.spiffe_ids.is_empty());
    }
}
