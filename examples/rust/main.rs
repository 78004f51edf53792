//! Resolves an Ory session token with the tonic client generated in the `idmap` crate and prints
//! the user, or what the caller does instead: log in again, step up, retry.
//!
//! ```sh
//! cargo run --example resolve-session -- 127.0.0.1:50051 ory_st_...
//! ```
//!
//! `IDMAP_API_KEY` is the caller's key when the server has a callers file. Exit codes, shared with
//! the Python and Node examples: 0 resolved, 2 log in again, 3 step up, 4 still unavailable after
//! retrying, 1 anything else, 64 usage.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use idmap::proto::api::identity_service_client::IdentityServiceClient;
use idmap::proto::api::resolve_session_request::Credential;
use idmap::proto::api::{ResolveSessionRequest, ResolveSessionResponse};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

/// Every ErrorInfo idmap sends has this domain; without it, the error is not idmap's.
const IDMAP_DOMAIN: &str = "idmap";
const ATTEMPTS: u32 = 4;
const BASE_DELAY: Duration = Duration::from_millis(200);

/// What the calling service does next.
#[derive(Debug, PartialEq)]
enum Action {
    /// The person's session is gone: send them to the login page.
    LogInAgain,
    /// The session is fine but its assurance level is too low: ask for a second factor.
    StepUp {
        redirect_browser_to: Option<String>,
    },
    /// idmap or a dependency is briefly unable to answer; `after` is RetryInfo's delay.
    Retry {
        after: Option<Duration>,
    },
    /// Our own service's caller credentials or grants are wrong: page our team, not the person.
    FixCaller,
    /// idmap's Ory settings are wrong: retrying helps only once its operator has fixed them.
    AlertOperator,
    /// The request itself is malformed (BadRequest's fields): retrying cannot help.
    FixRequest {
        fields: Vec<String>,
    },
    NotFound,
    /// A LinkIdentity that clashes with what is stored.
    Conflict,
    /// A bug in idmap or Ory; the server logged the detail.
    Report,
}

/// The ErrorInfo reason idmap sent (empty when the error is not idmap's) and what to do.
fn explain(status: &Status) -> (String, Action) {
    let details = status.get_error_details();
    let reason = details
        .error_info()
        .filter(|info| info.domain == IDMAP_DOMAIN)
        .map(|info| info.reason.clone())
        .unwrap_or_default();
    // The reason decides before the code: UNAUTHENTICATED and PERMISSION_DENIED each cover both a
    // person's session and our own service's credentials.
    let action = match (status.code(), reason.as_str()) {
        (_, "CALLER_UNAUTHENTICATED" | "CALLER_NOT_ALLOWED") => Action::FixCaller,
        (Code::Unauthenticated, "SESSION_INVALID") => Action::LogInAgain,
        // Anything else refusing us (a mesh, a gateway) is about the calling service.
        (Code::Unauthenticated, _) | (Code::PermissionDenied, "") => Action::FixCaller,
        // Ory's error id passed through (session_aal2_required, or forbidden).
        (Code::PermissionDenied, _) => Action::StepUp {
            redirect_browser_to: details
                .error_info()
                .and_then(|info| info.metadata.get("redirect_browser_to").cloned()),
        },
        (Code::Unavailable, "ORY_ADMIN_UNAUTHORIZED" | "ORY_REDIRECTED") => Action::AlertOperator,
        (Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded, _) => {
            Action::Retry {
                after: details.retry_info().and_then(|r| r.retry_delay),
            }
        }
        (Code::InvalidArgument | Code::OutOfRange, _) => Action::FixRequest {
            fields: details
                .bad_request()
                .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
                .unwrap_or_default(),
        },
        (Code::NotFound, _) => Action::NotFound,
        (Code::AlreadyExists, _) => Action::Conflict,
        _ => Action::Report,
    };
    (reason, action)
}

async fn resolve(
    client: &mut IdentityServiceClient<Channel>,
    api_key: Option<&str>,
    token: &str,
) -> Result<ResolveSessionResponse, Status> {
    let mut attempt = 0;
    loop {
        let mut request = Request::new(ResolveSessionRequest {
            credential: Some(Credential::SessionToken(token.to_owned())),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(5));
        if let Some(key) = api_key {
            let value = MetadataValue::try_from(format!("Bearer {key}")).map_err(|_| {
                Status::invalid_argument("IDMAP_API_KEY is not a valid header value")
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        match client.resolve_session(request).await {
            Ok(answer) => return Ok(answer.into_inner()),
            Err(status) => {
                attempt += 1;
                let Action::Retry { after } = explain(&status).1 else {
                    return Err(status);
                };
                if attempt == ATTEMPTS {
                    return Err(status);
                }
                // A fleet of callers would add jitter, so that they do not retry in step.
                tokio::time::sleep(after.unwrap_or(BASE_DELAY * 2u32.pow(attempt - 1))).await;
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, token] = args.as_slice() else {
        eprintln!(
            "usage: resolve-session HOST:PORT SESSION_TOKEN  (IDMAP_API_KEY: the caller's key)"
        );
        return Ok(ExitCode::from(64));
    };
    let uri = if target.contains("://") {
        target.clone()
    } else {
        format!("http://{target}")
    };
    let channel = Endpoint::from_shared(uri)
        .with_context(|| format!("not a usable address: {target}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {target}"))?;
    let mut client = IdentityServiceClient::new(channel);
    let api_key = std::env::var("IDMAP_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());

    let answer = match resolve(&mut client, api_key.as_deref(), token).await {
        Ok(answer) => answer,
        Err(status) => {
            let (reason, action) = explain(&status);
            let code = match action {
                Action::LogInAgain => {
                    println!("session invalid: send the person to log in again");
                    2
                }
                Action::StepUp {
                    redirect_browser_to,
                } => {
                    let to = redirect_browser_to
                        .unwrap_or_else(|| "the login flow with aal=aal2".to_owned());
                    println!("step up ({reason}): send the browser to {to}");
                    3
                }
                Action::Retry { .. } => {
                    println!("idmap still unavailable ({reason}): try again later");
                    4
                }
                other => {
                    println!(
                        "{other:?}: {:?} {reason}: {}",
                        status.code(),
                        status.message()
                    );
                    1
                }
            };
            return Ok(ExitCode::from(code));
        }
    };

    let email = answer
        .identity
        .as_ref()
        .and_then(|i| i.traits.as_ref())
        .and_then(|t| t.fields.get("email"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("no e-mail");
    let session = answer.session.unwrap_or_default();
    match answer.user {
        Some(user) => println!(
            "user {} ({email}), session {} at {}",
            user.id, session.id, session.authenticator_assurance_level
        ),
        // Only when the server runs with IDMAP_AUTO_LINK=false.
        None => println!(
            "no user linked yet ({email}), session {} at {}",
            session.id, session.authenticator_assurance_level
        ),
    }
    Ok(ExitCode::SUCCESS)
}
