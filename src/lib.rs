//! idmap maps Ory identities to the company's own user records and serves the mapping over gRPC
//! (`idmap.v1.IdentityService`).
//!
//! A request reads top to bottom: `grpc/` (validate, convert) → `service/` (the use case) →
//! `cache/`, then `store/` (PostgreSQL) or `ory/` (Kratos HTTP) → back through `grpc/convert.rs`.
//! Writes to Ory go through the outbox, which `worker/outbox.rs` delivers. `docs/architecture.md`
//! maps every module and what it may import.

pub mod app;
pub mod assertion;
pub mod auth;
pub mod cache;
pub mod cmd;
pub mod config;
pub mod domain;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod ory;
pub mod proto;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
mod tls;
pub mod worker;

pub use app::App;
pub use config::Config;
pub use error::Error;
