//! idmap's integration tests: a real PostgreSQL (a database per test), the Kratos emulator over real
//! HTTP, and idmap driven through its generated gRPC client over TCP.

// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

mod common;

mod architecture;
mod backfill;
mod binary;
mod cache;
mod callers;
mod database;
mod deploy;
mod external_ids;
mod fleet;
mod gateway;
mod hooks;
mod kratos_fixtures;
mod kubernetes;
mod link;
mod lookup;
mod metrics;
mod nginx;
mod ory_urls;
mod outbox;
mod resolve;
mod server;
mod tls;
mod traces;
