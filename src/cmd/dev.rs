//! `idmap dev`: the whole service on one machine with no Ory account and no database set-up. A
//! private PostgreSQL cluster (or DATABASE_URL when given), the Kratos emulator seeded with demo
//! identities and live sessions, and the server, with ready-to-paste grpcurl commands.
//!
//! The emulator is a development and test tool: `serve` never starts it.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use embedded_pg::EmbeddedPg;
use kratos_emulator::{Emulator, EmulatorConfig};
use secrecy::SecretString;

use crate::config::{CommonArgs, Config, ENV_DATABASE_URL, ENV_DEV_ORY_ADDR, parse_database_url};
use crate::store::{Database, migrate};

/// Settings of `idmap dev`.
#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Use this PostgreSQL instead of starting a private one.
    #[arg(long, env = ENV_DATABASE_URL, value_name = ENV_DATABASE_URL, hide_env_values = true, value_parser = parse_database_url)]
    pub database_url: Option<SecretString>,

    /// Where the Kratos emulator listens (public and admin API on one port, as on Ory Network).
    #[arg(
        long,
        env = ENV_DEV_ORY_ADDR,
        value_name = ENV_DEV_ORY_ADDR,
        default_value = "127.0.0.1:4433"
    )]
    pub ory_addr: SocketAddr,

    #[command(flatten)]
    pub common: CommonArgs,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    // Keep the cluster alive for as long as the server runs; dropping it stops PostgreSQL.
    let (database_url, _cluster) = match args.database_url {
        Some(url) => (url, None),
        None => {
            tracing::info!("starting a private PostgreSQL cluster");
            let cluster = tokio::task::spawn_blocking(EmbeddedPg::start)
                .await?
                .context("cannot start a private PostgreSQL (set DATABASE_URL to use another)")?;
            (SecretString::from(cluster.url()), Some(cluster))
        }
    };
    let database = Database::new(&database_url)
        .with_context(|| format!("{ENV_DATABASE_URL} is not usable"))?;
    migrate::run_pending(&database).await?;

    let emulator = Emulator::start(args.ory_addr, EmulatorConfig::default())
        .await
        .with_context(|| {
            format!(
                "cannot start the Kratos emulator on IDMAP_DEV_ORY_ADDR {}",
                args.ory_addr
            )
        })?;
    let seed = emulator.seed_demo();
    let ory_url = url::Url::parse(&emulator.url()).context("the emulator's URL")?;

    let mut config = Config::new(database_url, ory_url, None, args.common)?;
    // A laptop's dev server: any caller, unless a callers file is given to try one out.
    let any_caller = config.callers.callers_file.is_none();
    config.callers.allow_any_caller |= any_caller;
    let app = crate::App::build(config).await?;
    let (grpc, http) = crate::app::bind(app.config()).await?;
    let grpc_addr = grpc.local_addr()?;
    print_banner(&emulator, grpc_addr, &seed, any_caller);

    let result = app.serve(grpc, http, crate::shutdown::signal()).await;
    emulator.shutdown().await;
    result
}

fn print_banner(
    emulator: &Emulator,
    grpc: SocketAddr,
    seed: &kratos_emulator::DemoSeed,
    any_caller: bool,
) {
    let host = if grpc.ip().is_unspecified() {
        format!("127.0.0.1:{}", grpc.port())
    } else {
        grpc.to_string()
    };
    let mut out = String::new();
    out.push_str("\nidmap dev is running.\n");
    out.push_str(&format!("  gRPC:            {host} (reflection on)\n"));
    if any_caller {
        out.push_str(
            "  Callers:         any caller may call every RPC (dev only; `serve` needs IDMAP_CALLERS or IDMAP_ALLOW_ANY_CALLER=true)\n",
        );
    }
    out.push_str(&format!(
        "  Kratos emulator: {} (whoami + admin API)\n\n",
        emulator.url()
    ));
    out.push_str("Demo identities and sessions (the tokens are live for 24 hours):\n");
    for entry in &seed.entries {
        out.push_str(&format!(
            "  {:<9} {:<28} identity {}  {}  {}\n",
            entry.schema_id, entry.email, entry.identity_id, entry.aal, entry.note
        ));
    }
    out.push_str("\nTry:\n");
    out.push_str(&format!("  grpcurl -plaintext {host} list\n"));
    out.push_str(&format!(
        "  grpcurl -plaintext {host} grpc.health.v1.Health/Check\n"
    ));
    for entry in &seed.entries {
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"session_token\":\"{}\"}}' {host} idmap.v1.IdentityService/ResolveSession   # {}\n",
            entry.session_token, entry.email
        ));
    }
    if let Some(first) = seed.entries.first() {
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"cookie\":\"ory_kratos_session={}\"}}' {host} idmap.v1.IdentityService/ResolveSession\n",
            first.cookie
        ));
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"ory_identity_id\":\"{}\",\"external_id\":\"crm-1001\"}}' {host} idmap.v1.IdentityService/LinkIdentity\n",
            first.identity_id
        ));
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"ory_identity_id\":\"{}\"}}' {host} idmap.v1.IdentityService/GetUserByOryId\n",
            first.identity_id
        ));
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"external_id\":\"crm-1001\"}}' {host} idmap.v1.IdentityService/GetByExternalId\n"
        ));
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"ory_identity_id\":\"{}\",\"namespace\":\"billing\",\"value\":\"cus_1001\"}}' {host} idmap.v1.IdentityService/SetExternalId\n",
            first.identity_id
        ));
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"namespace\":\"billing\",\"external_id\":\"cus_1001\"}}' {host} idmap.v1.IdentityService/GetByExternalId\n"
        ));
        out.push_str(&format!(
            "  grpcurl -plaintext -d '{{\"attributes\":{{\"request\":{{\"http\":{{\"headers\":{{\"cookie\":\"ory_kratos_session={}\"}}}}}}}}}}' {host} envoy.service.auth.v3.Authorization/Check   # what Envoy asks; the answer's headers go upstream\n",
            first.cookie
        ));
        out.push_str(&format!(
            "  curl -s {}/admin/identities/{}   # metadata_public.id holds the user id once linked\n",
            emulator.url(),
            first.identity_id
        ));
    }
    out.push_str("\nCtrl-C stops everything.\n");
    // The banner is for the person at the terminal, so it goes to stdout, apart from the logs.
    println!("{out}");
}
