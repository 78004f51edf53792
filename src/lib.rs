//! idmap maps Ory identities to the company's own user records and serves the mapping over gRPC
//! (`idmap.v1.IdentityService`).
//!
//! A request reads top to bottom: `grpc/` (validate, convert) → `service/` (the use case) →
//! `store/` (PostgreSQL) or `ory/` (Kratos HTTP) → back through `grpc/convert.rs`. Writes to Ory go
//! through the outbox (`outbox.rs`).

pub mod app;
pub mod backfill;
pub mod cache;
pub mod cli;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod hooks;
mod http;
pub mod invalidation;
pub mod ory;
pub mod outbox;
pub mod pending;
pub mod proto;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
mod tls;

pub use app::App;
pub use config::Config;
pub use error::Error;
