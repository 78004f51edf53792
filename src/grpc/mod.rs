//! The gRPC adapter: validates requests, converts protobuf to domain types, calls the service, and
//! converts back. No SQL or HTTP here.

mod auth;
pub(crate) mod convert;
mod deadline;
mod ext_authz;
mod identity;
mod incoming;
mod limits;
mod metrics;
mod status;
mod trace;

pub use auth::CallerAuth;
pub use ext_authz::ExtAuthz;
pub use identity::IdentityApi;
pub use incoming::incoming;
pub use limits::{InFlightLimit, MAX_REQUEST_BYTES};
pub use metrics::GrpcMetrics;
pub use status::to_status;
pub use trace::CallSpans;
