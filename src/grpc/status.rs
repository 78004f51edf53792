//! The one mapping from [`Error`] (and the edge's own refusals) to `tonic::Status`, with machine-readable details
//! (`google.rpc.ErrorInfo`, `BadRequest`, `ResourceInfo`, `RetryInfo`).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::Denied;
use crate::error::{Error, reason};

/// The `ErrorInfo.domain` of every error idmap raises, those that pass Ory's error id through as
/// their reason included: callers match on one domain (the proto's contract), and the reason alone
/// says whether it came from Ory (lower case, Ory's own id) or from idmap (upper case).
const DOMAIN: &str = "idmap";

/// PERMISSION_DENIED's reason when Ory refused the session without an error id.
const FORBIDDEN_WITHOUT_ID: &str = "forbidden";

fn info(reason: &str, metadata: HashMap<String, String>) -> ErrorDetails {
    ErrorDetails::with_error_info(reason, DOMAIN, metadata)
}

pub fn to_status(error: Error) -> Status {
    match error {
        Error::InvalidArgument(violations) => {
            let message = error_message(&violations);
            let mut details = info(reason::INVALID_ARGUMENT, HashMap::new());
            for v in &violations {
                details.add_bad_request_violation(v.field.clone(), v.description.clone());
            }
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        Error::Unauthenticated { message } => Status::with_error_details(
            Code::Unauthenticated,
            message,
            info(reason::SESSION_INVALID, HashMap::new()),
        ),
        Error::PermissionDenied {
            ory_error_id,
            ory_reason,
            redirect_browser_to,
        } => {
            let id = ory_error_id.unwrap_or_else(|| FORBIDDEN_WITHOUT_ID.to_owned());
            let mut metadata = HashMap::from([("ory_error_id".to_owned(), id.clone())]);
            if let Some(url) = redirect_browser_to {
                metadata.insert("redirect_browser_to".to_owned(), url);
            }
            let message = match ory_reason {
                Some(r) => format!("Ory refused the session ({id}): {r}"),
                None => format!("Ory refused the session ({id})"),
            };
            Status::with_error_details(Code::PermissionDenied, message, info(&id, metadata))
        }
        Error::NotFound {
            reason,
            message,
            resource_type,
            resource_name,
        } => {
            let mut details = info(reason, HashMap::new());
            details.set_resource_info(resource_type, resource_name, "", message.clone());
            Status::with_error_details(Code::NotFound, message, details)
        }
        Error::AlreadyExists {
            reason,
            message,
            metadata,
        } => {
            let metadata = metadata
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            Status::with_error_details(Code::AlreadyExists, message, info(reason, metadata))
        }
        Error::Unavailable {
            reason,
            public,
            retry_after,
            detail,
        } => {
            tracing::warn!(reason, detail, "dependency unavailable");
            let mut details = info(reason, HashMap::new());
            if let Some(delay) = retry_after {
                details.set_retry_info(Some(delay));
            }
            Status::with_error_details(Code::Unavailable, public, details)
        }
        Error::DeadlineExceeded => Status::with_error_details(
            Code::DeadlineExceeded,
            "the deadline passed before the request completed",
            info(reason::DEADLINE_EXCEEDED, HashMap::new()),
        ),
        Error::Internal(detail) => {
            tracing::error!(detail, "internal error");
            Status::with_error_details(
                Code::Internal,
                "internal error",
                info(reason::INTERNAL, HashMap::new()),
            )
        }
    }
}

/// A call the caller check refused, logged with who was refused (never with a key).
pub(super) fn caller_refused(path: &str, denied: Denied) -> Status {
    match denied {
        Denied::Unauthenticated { shown } => {
            tracing::warn!(path, presented = %shown, "call refused: no accepted caller identity");
            Status::with_error_details(
                Code::Unauthenticated,
                "the call carries no caller identity idmap accepts (a client certificate, an API key or a trusted mesh identity); this is about the calling service, not a person's session",
                info(reason::CALLER_UNAUTHENTICATED, HashMap::new()),
            )
        }
        Denied::NotAllowed { caller, rpc } => {
            tracing::warn!(path, caller = %caller.name, "call refused: caller not allowed this RPC");
            Status::with_error_details(
                Code::PermissionDenied,
                format!("caller {} may not call {rpc}", caller.name),
                info(
                    reason::CALLER_NOT_ALLOWED,
                    HashMap::from([
                        ("caller".to_owned(), caller.name.to_string()),
                        ("rpc".to_owned(), rpc),
                    ]),
                ),
            )
        }
    }
}

/// A call shed because IDMAP_GRPC_MAX_IN_FLIGHT calls are in progress.
pub(super) fn overloaded(path: &str) -> Status {
    tracing::warn!(
        path,
        "call shed: IDMAP_GRPC_MAX_IN_FLIGHT calls already in progress"
    );
    Status::with_error_details(
        Code::ResourceExhausted,
        "idmap is at its limit of calls in progress; retry with backoff",
        info(reason::SERVER_OVERLOADED, HashMap::new()),
    )
}

fn error_message(violations: &[crate::domain::FieldViolation]) -> String {
    let parts: Vec<String> = violations.iter().map(ToString::to_string).collect();
    format!("invalid request: {}", parts.join("; "))
}
