//! The gRPC server: the business service, health and reflection on one port.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::config::GrpcSettings;
use crate::proto::ext_authz::AuthorizationServer;

use crate::gateway::Gateway;
use crate::grpc::{
    CallSpans, CallerAuth, ExtAuthz, GrpcMetrics, IdentityApi, InFlightLimit, MAX_REQUEST_BYTES,
};
use crate::proto::{self, api::identity_service_server::IdentityServiceServer};
use crate::service::IdentityMapper;
use crate::tls::ServerTls;

/// The name health checks use for the business service.
pub const SERVICE_NAME: &str = "idmap.v1.IdentityService";

/// How long a keepalive ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long calls on a connection past IDMAP_GRPC_MAX_CONNECTION_AGE may take to finish.
const MAX_CONNECTION_AGE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// The layers in front of every service, from the outside in: metrics, the call's span, the
/// in-flight limit, the caller check.
type Layers =
    Stack<CallerAuth, Stack<InFlightLimit, Stack<CallSpans, Stack<GrpcMetrics, Identity>>>>;

/// The gRPC services, ready to serve, and the health they report.
pub(super) struct GrpcServer {
    router: Router<Layers>,
    pub health: HealthReporter,
}

impl GrpcServer {
    /// Health (SERVING, overall and for [`SERVICE_NAME`]), both reflection versions, the
    /// identity service and Envoy's ext_authz `Check`, all behind the caller authorization `auth`.
    pub async fn build(
        mapper: Arc<IdentityMapper>,
        gateway: Arc<Gateway>,
        auth: CallerAuth,
        limits: &GrpcSettings,
    ) -> anyhow::Result<Self> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_status(&health, ServingStatus::Serving).await;
        // Both versions describe both reflection services, so a client of either lists both; and
        // the google.rpc detail messages a status carries (ErrorInfo, BadRequest, RetryInfo), so
        // grpcurl prints a failure's details instead of "not recognized".
        let services = [
            proto::FILE_DESCRIPTOR_SET,
            proto::ENVOY_EXT_AUTHZ_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let reflection = || {
            services.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET),
                |builder, set| builder.register_encoded_file_descriptor_set(set),
            )
        };
        let reflection_v1 = reflection()
            .build_v1()
            .context("building the reflection service")?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building the reflection service")?;
        let mut server = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            // tonic hands hyper `None` for these unless told, which turns off h2's protection
            // against clients that open and reset streams faster than the server can serve them
            // (CVE-2023-44487). These are h2's and hyper's own defaults.
            .http2_max_pending_accept_reset_streams(Some(20))
            .http2_max_local_error_reset_streams(Some(1024))
            .http2_keepalive_interval(Some(limits.keepalive))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
        if let Some(age) = limits.max_connection_age {
            server = server
                .max_connection_age(age)
                .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE);
        }
        let identity = IdentityServiceServer::new(IdentityApi::new(mapper))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let router = server
            .layer(GrpcMetrics::new(&services))
            .layer(CallSpans)
            .layer(InFlightLimit::new(limits.max_in_flight))
            .layer(auth)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(identity)
            .add_service(
                AuthorizationServer::new(ExtAuthz::new(gateway))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            );
        Ok(Self { router, health })
    }

    /// Serves connections accepted on `listener` until `signal` resolves and in-flight calls end.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<Arc<ServerTls>>,
        signal: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        self.router
            .serve_with_incoming_shutdown(crate::grpc::incoming(listener, tls), signal)
            .await
            .map_err(anyhow::Error::from)
    }
}

/// Turns health NOT_SERVING, overall and for [`SERVICE_NAME`], so balancers stop sending calls.
pub(super) async fn not_serving(health: &HealthReporter) {
    set_status(health, ServingStatus::NotServing).await;
}

async fn set_status(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status(SERVICE_NAME, status).await;
    health.set_service_status("", status).await;
}
