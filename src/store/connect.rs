//! Opening connections to PostgreSQL, plain or over TLS, for the pool, the LISTEN connection and
//! migrations alike.
//!
//! `DATABASE_URL`'s `sslmode` and `sslrootcert` mean what they mean to libpq, because operators
//! copy URLs between tools: `disable` never encrypts; `prefer` (the default) encrypts when the
//! server offers TLS and checks no certificate; `require` insists on TLS, and checks the chain
//! only when a root certificate is given; `verify-ca` checks the chain; `verify-full` the chain
//! and the host name. Without `sslrootcert`, the roots are libpq's default file,
//! `~/.postgresql/root.crt`, where one exists. tokio-postgres knows only the first three modes and
//! no root file, so both parameters are taken off the URL here and become a rustls
//! configuration (`crate::tls`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diesel_async::AsyncPgConnection;
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;
use crate::tls::{self, ServerVerification};

/// libpq's `sslmode`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The `sslmode` values idmap understands, as libpq spells them.
    pub const NAMES: [&str; 5] = ["disable", "prefer", "require", "verify-ca", "verify-full"];

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// Why `DATABASE_URL` cannot be used. Never holds the URL (it may carry a password).
#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "sslmode={mode} checks the server's certificate, so it needs the CA that signed it: set sslrootcert=<PEM file> (libpq's default, ~/.postgresql/root.crt, does not exist)"
    )]
    NoRootCertificate { mode: &'static str },
    #[error("sslrootcert: {0}")]
    RootCertificate(#[from] tls::TlsError),
}

/// Where the database is and how to connect to it. Cheap to clone.
#[derive(Clone)]
pub struct Database(Arc<Inner>);

struct Inner {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    mode: SslMode,
    /// `host:port`, for messages.
    target: String,
}

/// An open connection and the task-less driver it needs polled.
pub(super) type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

impl Database {
    /// Reads a `postgres://` URL, and the root certificates it names.
    pub fn new(url: &SecretString) -> Result<Self, DatabaseUrlError> {
        let mut url = url::Url::parse(url.expose_secret())
            .map_err(|e| DatabaseUrlError::Invalid(format!("not a URL: {e}")))?;
        let mut mode = SslMode::Prefer;
        let mut root_file = None;
        let mut kept = Vec::new();
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    mode = SslMode::parse(&value).ok_or_else(|| {
                        DatabaseUrlError::Invalid(format!(
                            "sslmode={value} is not one of {}",
                            SslMode::NAMES.join(", ")
                        ))
                    })?;
                }
                "sslrootcert" => root_file = Some(PathBuf::from(value.as_ref())),
                _ => kept.push((key.into_owned(), value.into_owned())),
            }
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        let mut config: tokio_postgres::Config = url
            .as_str()
            .parse()
            .map_err(|e: tokio_postgres::Error| DatabaseUrlError::Invalid(e.to_string()))?;
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let root_file = root_file.or_else(default_root_file);
        let verification = match (mode, root_file) {
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
                ServerVerification::None
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(DatabaseUrlError::NoRootCertificate { mode: mode.name() });
            }
            // libpq checks the chain under `require` too when it has roots, for compatibility.
            (SslMode::Require | SslMode::VerifyCa, Some(path)) => {
                ServerVerification::Chain(Arc::new(tls::read_roots(&path)?))
            }
            (SslMode::VerifyFull, Some(path)) => {
                ServerVerification::Full(Arc::new(tls::read_roots(&path)?))
            }
        };
        let client = tls::client_config(verification)
            .map_err(|e| DatabaseUrlError::Invalid(format!("TLS set-up: {e}")))?;
        let target = target(&config);
        Ok(Self(Arc::new(Inner {
            config,
            tls: MakeRustlsConnect::new(client),
            mode,
            target,
        })))
    }

    /// `host:port` of the server, for messages.
    pub fn target(&self) -> &str {
        &self.0.target
    }

    /// Opens a connection; the caller must poll the returned driver.
    pub(super) async fn connect(&self) -> Result<(Client, Connection), StoreError> {
        self.0
            .config
            .connect(self.0.tls.clone())
            .await
            .map_err(|e| self.connect_error(e))
    }

    /// Opens a connection for diesel, its driver running on a task of its own.
    pub(super) async fn connect_diesel(&self) -> Result<AsyncPgConnection, StoreError> {
        let (client, connection) = self.connect().await?;
        AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    fn connect_error(&self, error: tokio_postgres::Error) -> StoreError {
        let Inner { mode, target, .. } = &*self.0;
        // tokio-postgres says what went wrong in the TLS layer in the error's source.
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        if text.contains("server does not support TLS") {
            return StoreError::Unavailable(format!(
                "the server at {target} does not accept TLS connections, and DATABASE_URL's sslmode={} requires TLS",
                mode.name()
            ));
        }
        if text.contains("TLS handshake") {
            return StoreError::Unavailable(format!(
                "TLS with the server at {target} failed (sslmode={}): {text}",
                mode.name()
            ));
        }
        StoreError::from_postgres(error)
    }
}

/// libpq's default root certificate file, if it exists.
fn default_root_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

fn target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(url: &str) -> Result<Database, DatabaseUrlError> {
        Database::new(&SecretString::from(url.to_owned()))
    }

    #[test]
    fn ssl_parameters_are_taken_off_the_url() {
        let db =
            database("postgres://u:p@db.internal:6432/idmap?sslmode=require&application_name=x")
                .unwrap();
        assert_eq!(db.0.mode, SslMode::Require);
        assert_eq!(db.target(), "db.internal:6432");
        assert_eq!(db.0.config.get_application_name(), Some("x"));
        assert_eq!(
            db.0.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let db = database("postgres://u@h/d").unwrap();
        assert_eq!(db.0.mode, SslMode::Prefer);
    }

    #[test]
    fn modes_that_verify_need_roots_and_say_so() {
        let err = database("postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!(!err.to_string().contains("u@h"), "{err}");
        let err = database("postgres://u:secret@h/d?sslmode=verify-everything")
            .err()
            .unwrap();
        assert!(err.to_string().contains("verify-full"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
