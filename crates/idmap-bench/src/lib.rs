//! `idmap-bench`: the benchmark harness. It drives idmap through the generated tonic
//! client over real TCP, by default against servers it starts in this process (a private
//! PostgreSQL or a fresh database in DATABASE_URL, the Kratos emulator, `App::build` + `serve` on
//! 127.0.0.1:0), and measures each scenario next to `grpc.health.v1.Health/Check` on the same server
//! with the same concurrency and connections. See BENCHMARKS.md for what each scenario measures.
//!
//! Error type: `anyhow` (this is a command, off the request path). Performance is reported, never
//! asserted.

mod env;
mod load;
mod report;
mod restarts;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use kratos_emulator::{Emulator, EmulatorConfig, Fault, NewSession, Route};
use rand::RngExt;
use secrecy::SecretString;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::transport::Channel;
use uuid::Uuid;

use env::{Database, Server};
use idmap::config::{CommonArgs, Config, parse_database_url, parse_duration};
use idmap::proto::api::{
    self, identity_service_client::IdentityServiceClient, resolve_session_request,
};
use load::{CallFuture, LoadResult, MakeCall, OryCalls, Plan};
pub use report::{Baseline, Finding, Report, Row};

/// The command line of `idmap-bench`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "idmap-bench",
    version,
    about = "Benchmark idmap (see BENCHMARKS.md): by default against servers started in this process with a private PostgreSQL and the Kratos emulator"
)]
pub struct Cli {
    #[command(flatten)]
    pub args: BenchArgs,
    /// Log line format.
    #[arg(
        long,
        env = idmap::config::ENV_LOG_FORMAT,
        value_name = idmap::config::ENV_LOG_FORMAT,
        default_value = "text"
    )]
    pub log_format: idmap::telemetry::LogFormat,
}

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Scenario {
    /// Every scenario below, in this order.
    All,
    /// ResolveSession over a fixed pool of sessions, all cached before measuring.
    ResolveCached,
    /// Envoy's ext_authz Check over the same kind of pool of cached sessions (the gateway's hot
    /// path: a session-cache hit, a user-cache hit, the identity headers).
    CheckCached,
    /// A gateway-shaped load: --session-pool new sessions (at most 500) each asked about 20 times
    /// through Check, then as many new sessions as many times through ResolveSession: the whoami
    /// calls of each, which must be equal.
    GatewayWhoami,
    /// ResolveSession with a brand-new session on every call (each one a whoami call).
    ResolveUncached,
    /// GetUserByOryId of seeded users, user cache warm.
    GetByOryId,
    /// GetByExternalId of seeded users, user cache warm.
    GetByExternalId,
    /// GetByExternalId of seeded users' ids in namespace `crm`, user cache warm.
    GetByExternalIdNs,
    /// GetUserByOryId with the user cache held to one entry, so every lookup reaches PostgreSQL.
    GetByOryIdCold,
    /// GetByExternalId with the user cache held to one entry, so every lookup reaches PostgreSQL.
    GetByExternalIdCold,
    /// GetByExternalId in namespace `crm` with the user cache held to one entry, so every lookup
    /// reaches PostgreSQL.
    GetByExternalIdNsCold,
    /// BatchGetUsers of --batch-size random seeded identities per call.
    BatchGet,
    /// LinkIdentity of identities idmap has never seen.
    Link,
    /// --coalesce-callers concurrent ResolveSession calls with one new token: whoami calls made.
    Coalesce,
    /// --soak-sessions sessions resolved continuously for --soak-duration with a --soak-ttl TTL.
    TtlSoak,
    /// Memory per cached session (--sessions of them), and that the cache bound bounds it.
    MemoryPerSession,
    /// Cold lookups' p99 with --users users, then with --scale-users users.
    LookupScale,
    /// --fleet-replicas servers on one PostgreSQL and one emulator, --fleet-sessions sessions
    /// resolved round-robin over them for --fleet-duration with a --fleet-ttl TTL (shared session
    /// cache off, then on): whoami calls per session; then a replica started into the warm fleet
    /// resolves every session once: its whoami calls.
    Fleet,
    /// --fleet-replicas servers with the shared session cache on and a whoami limit of
    /// --restart-whoami-rps each, restarted one after the other (out of rotation, graceful stop,
    /// a new one back in) while --restart-sessions sessions are resolved: failed calls, rate-limited
    /// calls and whoami calls.
    RollingRestart,
    /// PostgreSQL halted for --pg-down and resumed while cached sessions are resolved and identities
    /// are linked: memory-hit errors, how long the calls that need PostgreSQL fail against the
    /// downtime, their codes, and whether every link's Ory write arrives.
    PostgresRestart,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::ResolveCached => "resolve-cached",
            Self::CheckCached => "check-cached",
            Self::GatewayWhoami => "gateway-whoami",
            Self::ResolveUncached => "resolve-uncached",
            Self::GetByOryId => "get-by-ory-id",
            Self::GetByExternalId => "get-by-external-id",
            Self::GetByExternalIdNs => "get-by-external-id-ns",
            Self::GetByOryIdCold => "get-by-ory-id-cold",
            Self::GetByExternalIdCold => "get-by-external-id-cold",
            Self::GetByExternalIdNsCold => "get-by-external-id-ns-cold",
            Self::BatchGet => "batch-get",
            Self::Link => "link",
            Self::Coalesce => "coalesce",
            Self::TtlSoak => "ttl-soak",
            Self::MemoryPerSession => "memory-per-session",
            Self::LookupScale => "lookup-scale",
            Self::Fleet => "fleet",
            Self::RollingRestart => "rolling-restart",
            Self::PostgresRestart => "postgres-restart",
        }
    }

    /// Scenarios that need sessions or identities in the in-process emulator.
    fn needs_emulator(self) -> bool {
        matches!(
            self,
            Self::ResolveCached
                | Self::CheckCached
                | Self::GatewayWhoami
                | Self::ResolveUncached
                | Self::Link
                | Self::Coalesce
                | Self::TtlSoak
                | Self::MemoryPerSession
                | Self::Fleet
                | Self::RollingRestart
                | Self::PostgresRestart
        )
    }

    /// Scenarios that change the server's settings, which an external server does not let us do.
    fn needs_own_server(self) -> bool {
        self.needs_emulator()
            || matches!(
                self,
                Self::GetByOryIdCold
                    | Self::GetByExternalIdCold
                    | Self::GetByExternalIdNsCold
                    | Self::LookupScale
            )
    }

    /// The single-user lookup a lookup scenario (warm or cold) makes, of users `1..=users`.
    fn lookup(self, clients: Arc<Vec<Client>>, users: u64) -> Option<MakeCall> {
        match self {
            Self::GetByOryId | Self::GetByOryIdCold => Some(get_by_ory_id(clients, users)),
            Self::GetByExternalId | Self::GetByExternalIdCold => {
                Some(get_by_external_id(clients, users))
            }
            Self::GetByExternalIdNs | Self::GetByExternalIdNsCold => {
                Some(get_by_external_id_ns(clients, users))
            }
            _ => None,
        }
    }
}

/// Settings of `idmap-bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Scenario to run; repeat the flag for several, or `all`.
    #[arg(long = "scenario", value_enum, default_value = "all")]
    pub scenarios: Vec<Scenario>,

    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// HTTP/2 connections; the in-flight requests use them round-robin.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,

    /// Measured time of each load scenario.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Unmeasured load before each measured window.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Scenarios with a target relative to Health/Check alternate with Health/Check in this many
    /// slices of --duration / --rounds each (after a warm-up of each), so a machine that speeds up
    /// or slows down during the run weighs on both sides of the ratio alike.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,

    /// Users seeded straight into PostgreSQL (`INSERT .. SELECT generate_series`) before the runs.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,

    /// Sessions cached by memory-per-session.
    #[arg(long, default_value_t = 100_000)]
    pub sessions: u64,

    /// The memory-per-session bound check: IDMAP_SESSION_CACHE_MAX_ENTRIES for the second server
    /// (default: a tenth of --sessions).
    #[arg(long)]
    pub memory_bound: Option<u64>,

    /// Sessions in resolve-cached's pool (on as many identities, linked beforehand).
    #[arg(long, default_value_t = 1_000)]
    pub session_pool: usize,

    /// Identities per BatchGetUsers call.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,

    /// Concurrent ResolveSession calls sharing one new token in a coalesce round.
    #[arg(long, default_value_t = 1_000)]
    pub coalesce_callers: usize,

    /// Coalesce rounds, each with a new token.
    #[arg(long, default_value_t = 5)]
    pub coalesce_rounds: usize,

    /// How long the emulator takes to answer the coalesce rounds' whoami (self-hosted Kratos: about
    /// 20 ms at the median, 200 ms at p99), so the callers surely overlap the call.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub coalesce_whoami_delay: Duration,

    /// Distinct sessions ttl-soak resolves (the target: 10000).
    #[arg(long, default_value_t = 1_000)]
    pub soak_sessions: usize,

    /// How long ttl-soak resolves them (the target: 60s).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub soak_duration: Duration,

    /// ttl-soak's IDMAP_SESSION_CACHE_TTL (the target: 30s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub soak_ttl: Duration,

    /// Replicas of the fleet scenario (the target: 3).
    #[arg(long, default_value_t = 3)]
    pub fleet_replicas: usize,

    /// Sessions the fleet scenario resolves (the target: 2000).
    #[arg(long, default_value_t = 2_000)]
    pub fleet_sessions: usize,

    /// How long the fleet scenario resolves them, per setting (the target: 60s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub fleet_duration: Duration,

    /// The fleet's IDMAP_SESSION_CACHE_TTL (the target: 30s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub fleet_ttl: Duration,

    /// Sessions rolling-restart resolves (warmed into the shared session cache first, at the pace
    /// the whoami limit allows).
    #[arg(long, default_value_t = 1_000)]
    pub restart_sessions: usize,

    /// rolling-restart: after taking a replica out of rotation, wait (at most 10 s) for the calls
    /// already sent to it to finish before stopping it, as a pre-stop delay would. By default it is
    /// stopped at once, and those calls are left to idmap's drain.
    #[arg(long)]
    pub restart_wait_idle: bool,

    /// rolling-restart's IDMAP_SHUTDOWN_DELAY: how long a stopping replica keeps serving, with
    /// health NOT_SERVING, after it left the rotation, for the calls already on their way to it
    /// (as a mesh or a Kubernetes preStop hook gives it). `0s` closes its connections at once.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub restart_shutdown_delay: Duration,

    /// rolling-restart's IDMAP_ORY_WHOAMI_RPS, per replica (the target: 20).
    #[arg(long, default_value_t = 20)]
    pub restart_whoami_rps: u32,

    /// IDMAP_SESSION_CACHE_TTL of rolling-restart and postgres-restart: long enough that no entry
    /// is refreshed ahead (at 80% of it) or expires during the run, so that the restarts alone
    /// decide what reaches Ory and PostgreSQL.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub restart_ttl: Duration,

    /// Steady load before the first restart and after the last (rolling-restart), and before the
    /// halt and after the resume (postgres-restart).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub restart_steady: Duration,

    /// How long postgres-restart keeps PostgreSQL down.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub pg_down: Duration,

    /// Calls in flight of each of postgres-restart's loads that need PostgreSQL (links, cold
    /// lookups); the cached resolves get --concurrency.
    #[arg(long, default_value_t = 2)]
    pub pg_db_concurrency: usize,

    /// How long postgres-restart waits, after its load, for the Ory write of every link that
    /// succeeded to arrive.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub pg_outbox_wait: Duration,

    /// Users lookup-scale grows the table to for its second measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub scale_users: u64,

    /// Benchmark an idmap already running at host:port instead of starting one. Only scenarios that
    /// need neither the emulator nor changed server settings run; Ory call counts are unavailable.
    #[arg(long, value_name = "HOST:PORT")]
    pub target: Option<String>,

    /// In process: the PostgreSQL server to create the benchmark's database on (default: a private
    /// cluster). With --target: the target's own database, which the lookups' users are seeded into.
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL", hide_env_values = true, value_parser = parse_database_url)]
    pub database_url: Option<SecretString>,

    /// Append a markdown section (machine, date, command, results) to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,

    /// Send this key as `Authorization: Bearer` on every call. In-process servers then admit only
    /// a caller holding it (granted every RPC), so the caller check is measured; against
    /// `--target`, the key of a caller its callers file grants the scenarios' RPCs.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Settings of the in-process server (as for `idmap serve`); some scenarios override a few, and
    /// the report says which.
    #[command(flatten, next_help_heading = "In-process server settings")]
    pub server: CommonArgs,
}

impl BenchArgs {
    /// The scenarios to run, in `all`'s order, each once.
    pub fn selected(&self) -> Vec<Scenario> {
        let mut out: Vec<Scenario> = if self.scenarios.contains(&Scenario::All) {
            Scenario::value_variants()
                .iter()
                .copied()
                .filter(|s| *s != Scenario::All)
                .collect()
        } else {
            self.scenarios.clone()
        };
        out.sort();
        out.dedup();
        out
    }

    fn plan(&self) -> Plan {
        Plan {
            concurrency: self.concurrency.max(1),
            connections: self.connections.max(1),
            warmup: self.warmup,
            duration: self.duration,
        }
    }
}

type Client = IdentityServiceClient<InterceptedService<Channel, BearerKey>>;

/// `--api-key`, sent as `Authorization: Bearer` on every call of this process (set once by
/// [`run`]), so the server's caller check is part of what is measured.
static API_KEY: OnceLock<MetadataValue<Ascii>> = OnceLock::new();

/// Adds `--api-key` to a call, when one was given.
#[derive(Clone, Copy)]
struct BearerKey;

impl Interceptor for BearerKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = API_KEY.get() {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Runs the benchmark, prints the table, appends the markdown section when asked, and returns what
/// it found.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    if let Some(key) = &args.api_key {
        let value = MetadataValue::try_from(format!("Bearer {key}"))
            .context("--api-key must be printable ASCII")?;
        // A second run in the same process (tests) keeps the first key.
        let _ = API_KEY.set(value);
    }
    let mut report = Report::default();
    if args.api_key.is_some() {
        report.note(
            "--api-key: every call (Health/Check too) carries Authorization: Bearer, and in-process servers admit only its holder, so the caller check is in every measured call".to_owned(),
        );
    }
    let machine = report::Machine::detect();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let command = std::env::args()
        .map(|a| report::shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let measured = match &args.target {
        Some(target) => external(&args, target, &mut report).await,
        None => in_process(&args, &mut report).await,
    };
    if args.api_key.is_some() && args.target.is_none() {
        let _ = std::fs::remove_file(callers_file_path());
    }
    measured?;
    if let Some(peak) = report::peak_rss_bytes() {
        report.note(format!(
            "peak RSS of this process: {}{}",
            report::format_mib(peak),
            if args.target.is_none() {
                " (idmap server, benchmark client, Kratos emulator and its sessions together)"
            } else {
                " (the benchmark client only)"
            }
        ));
    }
    print!("{}", report::text(&report));
    if let Some(path) = &args.markdown {
        use std::io::Write as _;
        let section = report::markdown(&report, &machine, &command, &date);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(section.as_bytes()))
            .with_context(|| format!("cannot append to {}", path.display()))?;
    }
    Ok(report)
}

fn clients(channels: &[Channel]) -> Arc<Vec<Client>> {
    Arc::new(
        channels
            .iter()
            .cloned()
            .map(|c| IdentityServiceClient::with_interceptor(c, BearerKey))
            .collect(),
    )
}

fn boxed(
    f: impl Future<Output = Result<(), tonic::Status>> + Send + 'static,
) -> Option<CallFuture> {
    Some(Box::pin(f))
}

/// Health/Check with the same shape of load: every ratio's baseline.
async fn health_baseline(
    args: &BenchArgs,
    channels: &[Channel],
    server: &str,
    report: &mut Report,
) -> Baseline {
    eprintln!("bench: health baseline ({server})");
    let load = load::run(args.plan(), health_call(channels), None).await;
    let baseline = Baseline {
        throughput: load.throughput(),
        p99: load.latency(0.99),
    };
    report.rows.push(Row {
        scenario: "health-check (baseline)".into(),
        server: server.into(),
        load,
        baseline: None,
        rss_bytes: report::rss_bytes(),
    });
    baseline
}

/// `grpc.health.v1.Health/Check` (overall) over `channels`.
fn health_call(channels: &[Channel]) -> MakeCall {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    // Health carries the key too, so both sides of a ratio send the same headers.
    let health: Arc<Vec<HealthClient<InterceptedService<Channel, BearerKey>>>> = Arc::new(
        channels
            .iter()
            .cloned()
            .map(|c| HealthClient::with_interceptor(c, BearerKey))
            .collect(),
    );
    Arc::new(move |conn, _| {
        let mut c = health[conn].clone();
        boxed(async move {
            c.check(HealthCheckRequest::default()).await?;
            Ok(())
        })
    })
}

/// Runs a scenario that has a target relative to Health/Check: `--rounds` slices of Health/Check
/// and of the scenario, alternating, each after its own warm-up, merged into one row each. Records
/// both rows and returns the scenario's result with its paired baseline.
#[allow(clippy::too_many_arguments)]
async fn measure_paired(
    args: &BenchArgs,
    scenario: &str,
    server: &str,
    make: MakeCall,
    health: &MakeCall,
    emulator: Option<&Emulator>,
    report: &mut Report,
) -> (LoadResult, Baseline) {
    eprintln!(
        "bench: {scenario} ({server}), alternating with Health/Check in {} rounds",
        args.rounds.max(1)
    );
    let (health_load, load) = alternate(args, (health, None), (&make, emulator)).await;
    let baseline = Baseline {
        throughput: health_load.throughput(),
        p99: health_load.latency(0.99),
    };
    report.rows.push(Row {
        scenario: format!("health-check (paired with {scenario})"),
        server: server.into(),
        load: health_load,
        baseline: None,
        rss_bytes: report::rss_bytes(),
    });
    report.rows.push(Row {
        scenario: scenario.into(),
        server: server.into(),
        load: load.clone(),
        baseline: Some(baseline),
        rss_bytes: report::rss_bytes(),
    });
    (load, baseline)
}

/// Runs `a` and `b` in `--rounds` alternating slices of `--duration / --rounds` (each after the
/// warm-up), and merges each side's slices into one result.
async fn alternate(
    args: &BenchArgs,
    (a, a_emulator): (&MakeCall, Option<&Emulator>),
    (b, b_emulator): (&MakeCall, Option<&Emulator>),
) -> (LoadResult, LoadResult) {
    let rounds = args.rounds.max(1);
    let slice = Plan {
        duration: args.duration / rounds,
        ..args.plan()
    };
    let mut a_load = load::run(slice, a.clone(), a_emulator).await;
    let mut b_load = load::run(slice, b.clone(), b_emulator).await;
    for _ in 1..rounds {
        a_load = a_load.merge(load::run(slice, a.clone(), a_emulator).await);
        b_load = b_load.merge(load::run(slice, b.clone(), b_emulator).await);
    }
    (a_load, b_load)
}

/// Runs one load scenario and records its row.
#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &BenchArgs,
    scenario: &str,
    server: &str,
    make: MakeCall,
    emulator: Option<&Emulator>,
    baseline: Option<Baseline>,
    report: &mut Report,
) -> LoadResult {
    eprintln!("bench: {scenario} ({server})");
    let load = load::run(args.plan(), make, emulator).await;
    report.rows.push(Row {
        scenario: scenario.into(),
        server: server.into(),
        load: load.clone(),
        baseline,
        rss_bytes: report::rss_bytes(),
    });
    load
}

fn get_by_ory_id(clients: Arc<Vec<Client>>, users: u64) -> MakeCall {
    Arc::new(move |conn, _| {
        let mut c = clients[conn].clone();
        let i = rand::rng().random_range(1..=users.max(1));
        boxed(async move {
            c.get_user_by_ory_id(api::GetUserByOryIdRequest {
                ory_identity_id: env::seeded_identity(i).to_string(),
            })
            .await?;
            Ok(())
        })
    })
}

/// GetByExternalId of random seeded users' ids in the default namespace (no `namespace` sent).
fn get_by_external_id(clients: Arc<Vec<Client>>, users: u64) -> MakeCall {
    get_by_external_id_in(clients, users, "", env::seeded_external_id)
}

/// GetByExternalId of random seeded users' ids in [`env::SEEDED_NAMESPACE`].
fn get_by_external_id_ns(clients: Arc<Vec<Client>>, users: u64) -> MakeCall {
    get_by_external_id_in(
        clients,
        users,
        env::SEEDED_NAMESPACE,
        env::seeded_namespaced_id,
    )
}

/// GetByExternalId of `value(i)` in `namespace` for random seeded users `i`.
fn get_by_external_id_in(
    clients: Arc<Vec<Client>>,
    users: u64,
    namespace: &'static str,
    value: fn(u64) -> String,
) -> MakeCall {
    Arc::new(move |conn, _| {
        let mut c = clients[conn].clone();
        let i = rand::rng().random_range(1..=users.max(1));
        boxed(async move {
            c.get_by_external_id(api::GetByExternalIdRequest {
                external_id: value(i),
                namespace: namespace.to_owned(),
                ..Default::default()
            })
            .await?;
            Ok(())
        })
    })
}

fn batch_get(clients: Arc<Vec<Client>>, users: u64, size: usize) -> MakeCall {
    Arc::new(move |conn, _| {
        let mut c = clients[conn].clone();
        let mut rng = rand::rng();
        let ids = (0..size)
            .map(|_| env::seeded_identity(rng.random_range(1..=users.max(1))).to_string())
            .collect();
        boxed(async move {
            c.batch_get_users(api::BatchGetUsersRequest {
                ory_identity_ids: ids,
            })
            .await?;
            Ok(())
        })
    })
}

/// ResolveSession of `tokens[seq % len]`; with `once`, each token once and then the supply ends.
fn resolve(clients: Arc<Vec<Client>>, tokens: Arc<Vec<String>>, once: bool) -> MakeCall {
    Arc::new(move |conn, seq| {
        let seq = usize::try_from(seq).ok()?;
        if tokens.is_empty() || (once && seq >= tokens.len()) {
            return None;
        }
        let token = tokens[seq % tokens.len()].clone();
        let mut c = clients[conn].clone();
        boxed(async move {
            c.resolve_session(api::ResolveSessionRequest {
                credential: Some(resolve_session_request::Credential::SessionToken(token)),
                ..Default::default()
            })
            .await?;
            Ok(())
        })
    })
}

/// A message encoded ahead of the run, sent as it is. Envoy's `CheckRequest` is a deep nest of
/// envoy-types structs (peers, addresses, the HTTP request, maps): built and moved through the
/// client's futures per call, it cost the load generator more than idmap's whole handling of the
/// call (callgrind: about 24,000 instructions per Check on the client's side beyond a Health/Check,
/// against about 12,000 on the server's), on the two cores it shares with idmap. Envoy builds its
/// requests on cores of its own; the harness builds each session's once.
#[derive(Clone, Debug, Default)]
struct PreEncoded(bytes::Bytes);

impl prost::Message for PreEncoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Only ever sent.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = bytes::Bytes::new();
    }
}

/// Envoy's Check request for a client request carrying `token` in `x-session-token`, encoded.
fn check_request(token: &str) -> PreEncoded {
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use prost::Message;
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers: [("x-session-token".to_owned(), token.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    PreEncoded(request.encode_to_vec().into())
}

/// Check over a pool of sessions (`seq` picks one), failing a call that is not allowed.
fn check(channels: &[Channel], tokens: &[String]) -> MakeCall {
    check_calls(channels, tokens, false)
}

/// Check of each of `tokens` once, in order.
fn check_once(channels: &[Channel], tokens: &[String]) -> MakeCall {
    check_calls(channels, tokens, true)
}

/// Calls `envoy.service.auth.v3.Authorization/Check` with requests encoded beforehand
/// ([`PreEncoded`]) and decodes each answer whole into envoy-types' `CheckResponse`, as Envoy does.
fn check_calls(channels: &[Channel], tokens: &[String], once: bool) -> MakeCall {
    use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
    let gateways: Arc<Vec<tonic::client::Grpc<InterceptedService<Channel, BearerKey>>>> = Arc::new(
        channels
            .iter()
            .cloned()
            .map(|c| tonic::client::Grpc::new(InterceptedService::new(c, BearerKey)))
            .collect(),
    );
    let requests: Arc<Vec<PreEncoded>> =
        Arc::new(tokens.iter().map(|t| check_request(t)).collect());
    Arc::new(move |conn, seq| {
        let seq = usize::try_from(seq).ok()?;
        if requests.is_empty() || (once && seq >= requests.len()) {
            return None;
        }
        let request = requests[seq % requests.len()].clone();
        let mut c = gateways[conn].clone();
        boxed(async move {
            c.ready().await.map_err(|e| {
                tonic::Status::unavailable(format!("the channel is not ready: {e}"))
            })?;
            let answer: CheckResponse = c
                .unary(
                    tonic::Request::new(request),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/envoy.service.auth.v3.Authorization/Check",
                    ),
                    tonic_prost::ProstCodec::<PreEncoded, CheckResponse>::default(),
                )
                .await?
                .into_inner();
            match answer.status {
                Some(status) if status.code == 0 => Ok(()),
                _ => Err(tonic::Status::internal(
                    "Check did not allow a cached session",
                )),
            }
        })
    })
}

/// Loads every user of `1..=users` into the server's user cache (BatchGetUsers puts what it reads
/// there), so the warm lookups start warm.
async fn warm_users(clients: &[Client], users: u64) -> anyhow::Result<()> {
    let Some(client) = clients.first() else {
        return Ok(());
    };
    let mut c = client.clone();
    let mut i = 1;
    while i <= users {
        let end = (i + 999).min(users);
        let ids = (i..=end)
            .map(|n| env::seeded_identity(n).to_string())
            .collect();
        c.batch_get_users(api::BatchGetUsersRequest {
            ory_identity_ids: ids,
        })
        .await
        .context("warming the user cache")?;
        i = end + 1;
    }
    Ok(())
}

/// Resolves every token once at full concurrency (warming a cache, or filling it to measure it).
async fn resolve_all(
    args: &BenchArgs,
    clients: Arc<Vec<Client>>,
    tokens: Arc<Vec<String>>,
) -> LoadResult {
    let plan = Plan {
        warmup: Duration::ZERO,
        // Long enough for any number of tokens; the supply ends the run.
        duration: Duration::from_secs(3600),
        ..args.plan()
    };
    load::run(plan, resolve(clients, tokens, true), None).await
}

fn new_sessions(emulator: &Emulator, identities: &[Uuid], n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            emulator
                .create_session(identities[i % identities.len()], NewSession::default())
                .token
        })
        .collect()
}

/// The base configuration of every in-process server: the `serve` settings given (flags or
/// environment), pointed at the benchmark's database and emulator.
fn base_config(args: &BenchArgs, db: &Database, emulator: &Emulator) -> anyhow::Result<Config> {
    let ory = url::Url::parse(&emulator.url()).context("the emulator's URL")?;
    let mut config = Config::new(db.url.clone(), ory, None, args.server.clone())?;
    match &args.api_key {
        // Only the key's holder may call: every call goes through the caller check.
        Some(key) => {
            config.callers.callers_file = Some(callers_file_for(key)?);
            config.callers.allow_any_caller = false;
        }
        None => config.callers.allow_any_caller |= config.callers.callers_file.is_none(),
    }
    Ok(config)
}

fn callers_file_path() -> PathBuf {
    std::env::temp_dir().join(format!("idmap-bench-callers-{}.toml", std::process::id()))
}

/// A callers file granting the holder of `key` every RPC, written once per process.
fn callers_file_for(key: &str) -> anyhow::Result<PathBuf> {
    use sha2::Digest;
    let path = callers_file_path();
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    std::fs::write(
        &path,
        format!(
            "[[callers]]\nname = \"idmap-bench\"\napi_key_sha256 = [\"{hash}\"]\nrpcs = [\"*\"]\n"
        ),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

async fn in_process(args: &BenchArgs, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("bench: starting PostgreSQL and the Kratos emulator");
    let db = Database::start(args.database_url.as_ref()).await?;
    let emulator = Emulator::start(([127, 0, 0, 1], 0).into(), EmulatorConfig::default())
        .await
        .context("cannot start the Kratos emulator")?;
    let result = scenarios_in_process(args, &db, &emulator, report).await;
    emulator.shutdown().await;
    let closed = db.close().await;
    result.and(closed)
}

async fn scenarios_in_process(
    args: &BenchArgs,
    db: &Database,
    emulator: &Emulator,
    report: &mut Report,
) -> anyhow::Result<()> {
    let selected = args.selected();
    let base = base_config(args, db, emulator)?;
    let pg = db.client().await?;
    let started = Instant::now();
    env::seed_users(&pg, 1, args.users).await?;
    eprintln!(
        "bench: seeded {} users in {:.1}s",
        args.users,
        started.elapsed().as_secs_f64()
    );
    if selected.iter().any(|s| {
        matches!(
            s,
            Scenario::GetByExternalIdNs | Scenario::GetByExternalIdNsCold
        )
    }) {
        report.note(format!(
            "get-by-external-id-ns, get-by-external-id-ns-cold: every lookup sets namespace {ns}; each seeded user holds two business ids, bench-<i> in the default namespace and crm-<i> in {ns}, and every user answered carries both",
            ns = env::SEEDED_NAMESPACE,
        ));
    }
    let identities = if selected.iter().any(|s| s.needs_emulator()) {
        env::linked_identities(emulator, &pg, args.session_pool.max(1)).await?
    } else {
        Vec::new()
    };
    let unlimited_whoami = "IDMAP_ORY_WHOAMI_RPS=0 (unlimited)";

    // One server with the given settings (whoami and admin calls unlimited, so the scenarios that
    // call Ory measure idmap rather than the rate limiter) for the scenarios that need no others.
    let main: Vec<Scenario> = selected
        .iter()
        .copied()
        .filter(|s| {
            matches!(
                s,
                Scenario::ResolveCached
                    | Scenario::CheckCached
                    | Scenario::GatewayWhoami
                    | Scenario::ResolveUncached
                    | Scenario::GetByOryId
                    | Scenario::GetByExternalId
                    | Scenario::GetByExternalIdNs
                    | Scenario::BatchGet
                    | Scenario::Link
                    | Scenario::Coalesce
            )
        })
        .collect();
    if !main.is_empty() {
        let mut config = base.clone();
        config.ory.whoami_rps = None;
        config.ory.admin_rps = None;
        let label = "given settings, Ory RPS limits off";
        report.note(format!(
            "\"{label}\": the settings given to the bench (defaults unless flags or IDMAP_* say otherwise) with {unlimited_whoami} and IDMAP_ORY_ADMIN_RPS=0, so resolve-uncached and link measure idmap, not the rate limiter (with the defaults, 100 and 50 calls/s would cap them)"
        ));
        let server = Server::start(config.clone()).await?;
        let channels = env::connect_channels(&server.addr.to_string(), args.connections).await?;
        let cl = clients(&channels);
        let baseline = health_baseline(args, &channels, label, report).await;
        let health = health_call(&channels);
        for scenario in &main {
            main_scenario(
                args,
                *scenario,
                &config,
                (&cl, &channels),
                emulator,
                &identities,
                (baseline, &health),
                label,
                report,
            )
            .await?;
        }
        drop(channels);
        server.stop().await?;
        // Link queues metadata writes to Ory; none may run on into later scenarios.
        pg.batch_execute("DELETE FROM ory_outbox").await?;
    }

    let cold: Vec<Scenario> = selected
        .iter()
        .copied()
        .filter(|s| {
            matches!(
                s,
                Scenario::GetByOryIdCold
                    | Scenario::GetByExternalIdCold
                    | Scenario::GetByExternalIdNsCold
            )
        })
        .collect();
    if !cold.is_empty() {
        let label = "IDMAP_USER_CACHE_MAX_ENTRIES=1";
        let mut config = base.clone();
        config.cache.user_max_entries = 1;
        let server = Server::start(config).await?;
        let channels = env::connect_channels(&server.addr.to_string(), args.connections).await?;
        let cl = clients(&channels);
        let health = health_call(&channels);
        for scenario in &cold {
            let Some(make) = scenario.lookup(cl.clone(), args.users) else {
                continue;
            };
            let (load, baseline) = measure_paired(
                args,
                scenario.name(),
                label,
                make,
                &health,
                Some(emulator),
                report,
            )
            .await;
            ratio_finding(report, scenario.name(), &load, baseline, 0.25, None);
        }
        drop(channels);
        server.stop().await?;
    }

    if selected.contains(&Scenario::TtlSoak) {
        ttl_soak(args, &base, emulator, &identities, report).await?;
    }
    if selected.contains(&Scenario::MemoryPerSession) {
        memory_per_session(args, &base, emulator, &identities, report).await?;
    }
    if selected.contains(&Scenario::LookupScale) {
        lookup_scale(args, &base, db, emulator, report).await?;
    }
    if selected.contains(&Scenario::Fleet) {
        fleet(args, &base, emulator, &identities, report).await?;
    }
    if selected.contains(&Scenario::RollingRestart) {
        restarts::rolling_restart(args, &base, emulator, &identities, report).await?;
    }
    if selected.contains(&Scenario::PostgresRestart) {
        restarts::postgres_restart(args, &base, db, emulator, &identities, report).await?;
    }
    Ok(())
}

/// Channels to every server, interleaved, so the load's connections, and so its calls, are spread
/// round-robin over the replicas.
async fn fleet_channels(servers: &[Server], connections: usize) -> anyhow::Result<Vec<Channel>> {
    let per_server = connections.div_ceil(servers.len().max(1)).max(1);
    let mut each = Vec::with_capacity(servers.len());
    for server in servers {
        each.push(env::connect_channels(&server.addr.to_string(), per_server).await?);
    }
    let mut channels = Vec::with_capacity(per_server * servers.len());
    for i in 0..per_server {
        for of_server in &each {
            channels.push(of_server[i].clone());
        }
    }
    Ok(channels)
}

async fn fleet(
    args: &BenchArgs,
    base: &Config,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::Fleet.name();
    let replicas = args.fleet_replicas.max(1);
    for shared in [false, true] {
        let mut config = base.clone();
        config.cache.session_ttl = args.fleet_ttl;
        room_for_sessions(&mut config, args.fleet_sessions);
        config.cache.shared_sessions = shared;
        config.ory.whoami_rps = None;
        let label = format!(
            "{replicas} replicas, IDMAP_SESSION_CACHE_SHARED={}, IDMAP_SESSION_CACHE_TTL={}, IDMAP_ORY_WHOAMI_RPS=0",
            if shared { "on" } else { "off" },
            humantime::format_duration(args.fleet_ttl)
        );
        let mut servers = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            servers.push(Server::start(config.clone()).await?);
        }
        let channels = fleet_channels(&servers, args.connections.max(replicas)).await?;
        let tokens = Arc::new(new_sessions(
            emulator,
            identities,
            args.fleet_sessions.max(1),
        ));
        let plan = Plan {
            warmup: Duration::ZERO,
            duration: args.fleet_duration,
            connections: channels.len(),
            ..args.plan()
        };
        eprintln!(
            "bench: {name} ({label}, {} sessions for {:?})",
            tokens.len(),
            args.fleet_duration
        );
        let load = load::run(
            plan,
            resolve(clients(&channels), tokens.clone(), false),
            Some(emulator),
        )
        .await;
        let whoami = load.ory.map_or(0, |o| o.whoami);
        let per_session = whoami as f64 / tokens.len() as f64;
        report.rows.push(Row {
            scenario: name.into(),
            server: format!(
                "{label}; {} sessions for {}",
                tokens.len(),
                humantime::format_duration(args.fleet_duration)
            ),
            load,
            baseline: None,
            rss_bytes: report::rss_bytes(),
        });
        report.findings.push(Finding {
            scenario: name.into(),
            what: format!(
                "whoami calls per session across {replicas} replicas, shared session cache {} ({} sessions, {} of continuous resolving, TTL {})",
                if shared { "on" } else { "off" },
                tokens.len(),
                humantime::format_duration(args.fleet_duration),
                humantime::format_duration(args.fleet_ttl)
            ),
            value: per_session,
            shown: format!("{per_session:.2} ({whoami} calls)"),
            target: shared.then(|| "at most 3 (3 replicas, 2,000 sessions, 60 s, TTL 30 s)".into()),
            met: shared.then_some(per_session <= 3.0),
        });

        if shared {
            // A replica joins the warm fleet: its first resolve of each session must not reach Ory.
            let joined = Server::start(config.clone()).await?;
            let joined_channels =
                env::connect_channels(&joined.addr.to_string(), args.connections).await?;
            let before = OryCalls::snapshot(emulator);
            let first = resolve_all(args, clients(&joined_channels), tokens.clone()).await;
            let asked = OryCalls::snapshot(emulator).since(before).whoami;
            report.findings.push(Finding {
                scenario: name.into(),
                what: format!(
                    "whoami calls of a replica started into the warm fleet, resolving each of the {} sessions once ({} errors)",
                    tokens.len(),
                    first.errors
                ),
                value: asked as f64,
                shown: format!("{asked} calls"),
                target: Some("0".into()),
                met: Some(asked == 0 && first.errors == 0),
            });
            drop(joined_channels);
            joined.stop().await?;
        }
        drop(channels);
        for server in servers {
            server.stop().await?;
        }
    }
    Ok(())
}

/// Makes the session cache big enough for a scenario's `sessions`, so no entry is evicted for room.
fn room_for_sessions(config: &mut Config, sessions: usize) {
    config.cache.session_max_entries = config.cache.session_max_entries.max(sessions as u64);
}

/// Records whether a row meets a throughput-ratio (and optionally p99-ratio) target.
fn ratio_finding(
    report: &mut Report,
    scenario: &str,
    load: &LoadResult,
    baseline: Baseline,
    min_throughput: f64,
    max_p99: Option<f64>,
) {
    let throughput = if baseline.throughput > 0.0 {
        load.throughput() / baseline.throughput
    } else {
        0.0
    };
    report.findings.push(Finding {
        scenario: scenario.into(),
        what: "throughput vs Health/Check".into(),
        value: throughput,
        shown: format!("{throughput:.2}x"),
        target: Some(format!("at least {min_throughput}x")),
        met: Some(throughput >= min_throughput && load.errors == 0),
    });
    if let Some(max_p99) = max_p99 {
        let base = baseline.p99.as_secs_f64();
        let p99 = if base > 0.0 {
            load.latency(0.99).as_secs_f64() / base
        } else {
            f64::INFINITY
        };
        report.findings.push(Finding {
            scenario: scenario.into(),
            what: "p99 vs Health/Check".into(),
            value: p99,
            shown: format!("{p99:.2}x"),
            target: Some(format!("at most {max_p99}x")),
            met: Some(p99 <= max_p99),
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn main_scenario(
    args: &BenchArgs,
    scenario: Scenario,
    config: &Config,
    (cl, channels): (&Arc<Vec<Client>>, &[Channel]),
    emulator: &Emulator,
    identities: &[Uuid],
    (baseline, health): (Baseline, &MakeCall),
    label: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = scenario.name();
    match scenario {
        Scenario::ResolveCached => {
            let tokens = Arc::new(new_sessions(emulator, identities, args.session_pool.max(1)));
            let before = OryCalls::snapshot(emulator);
            let warm = resolve_all(args, cl.clone(), tokens.clone()).await;
            anyhow::ensure!(
                warm.errors == 0,
                "warming resolve-cached failed: {:?}",
                warm.first_error
            );
            report.note(format!(
                "resolve-cached: {} sessions warmed first with {} whoami calls",
                tokens.len(),
                OryCalls::snapshot(emulator).since(before).whoami
            ));
            let (load, baseline) = measure_paired(
                args,
                name,
                label,
                resolve(cl.clone(), tokens, false),
                health,
                Some(emulator),
                report,
            )
            .await;
            ratio_finding(report, name, &load, baseline, 0.8, Some(1.5));
        }
        Scenario::CheckCached => {
            let tokens = Arc::new(new_sessions(emulator, identities, args.session_pool.max(1)));
            let warm = resolve_all(args, cl.clone(), tokens.clone()).await;
            anyhow::ensure!(
                warm.errors == 0,
                "warming check-cached failed: {:?}",
                warm.first_error
            );
            report.note(format!(
                "check-cached: {} sessions warmed first (ResolveSession and Check share the session cache); each Check carries the session in x-session-token, as Envoy forwards a client's header; each session's CheckRequest is encoded once before the run (Envoy builds its requests on its own cores) and every answer is decoded whole into envoy-types' CheckResponse",
                tokens.len()
            ));
            let (load, baseline) = measure_paired(
                args,
                name,
                label,
                check(channels, &tokens),
                health,
                Some(emulator),
                report,
            )
            .await;
            ratio_finding(report, name, &load, baseline, 0.8, None);
        }
        Scenario::GatewayWhoami => {
            const REQUESTS_PER_SESSION: usize = 20;
            let sessions = args.session_pool.clamp(1, 500);
            let shaped = |tokens: Vec<String>| -> Arc<Vec<String>> {
                // Every session's requests spread over the run, as a gateway's traffic is.
                Arc::new(
                    (0..REQUESTS_PER_SESSION)
                        .flat_map(|_| tokens.iter().cloned())
                        .collect(),
                )
            };
            let plan = Plan {
                warmup: Duration::ZERO,
                duration: Duration::from_secs(3600),
                ..args.plan()
            };
            let through_check = shaped(new_sessions(emulator, identities, sessions));
            let before = OryCalls::snapshot(emulator);
            let checked = load::run(plan, check_once(channels, &through_check), None).await;
            let check_whoami = OryCalls::snapshot(emulator).since(before).whoami;
            let through_resolve = shaped(new_sessions(emulator, identities, sessions));
            let before = OryCalls::snapshot(emulator);
            let resolved = load::run(plan, resolve(cl.clone(), through_resolve, true), None).await;
            let resolve_whoami = OryCalls::snapshot(emulator).since(before).whoami;
            anyhow::ensure!(
                checked.errors == 0 && resolved.errors == 0,
                "gateway-whoami: calls failed: {:?} {:?}",
                checked.first_error,
                resolved.first_error
            );
            report.note(format!(
                "gateway-whoami: {sessions} new sessions x {REQUESTS_PER_SESSION} requests through Check ({} calls), then {sessions} other new sessions x {REQUESTS_PER_SESSION} through ResolveSession ({} calls), {} in flight",
                checked.requests,
                resolved.requests,
                args.concurrency
            ));
            report.findings.push(Finding {
                scenario: name.into(),
                what: format!(
                    "whoami calls: Check {check_whoami}, ResolveSession {resolve_whoami} ({sessions} sessions each)"
                ),
                value: check_whoami as f64,
                shown: format!("{check_whoami} vs {resolve_whoami}"),
                target: Some("Check's equal to ResolveSession's".into()),
                met: Some(check_whoami == resolve_whoami),
            });
        }
        Scenario::ResolveUncached => {
            // Enough new sessions for a generous rate; running out ends the run early (reported).
            let n = (20_000.0 * (args.warmup + args.duration).as_secs_f64()).ceil() as usize;
            let tokens = Arc::new(new_sessions(emulator, identities, n.max(1)));
            report.note(format!(
                "resolve-uncached: {} new sessions created in the emulator beforehand; every call is a cache miss and one whoami call (emulator over HTTP on this machine)",
                tokens.len()
            ));
            let load = measure(
                args,
                name,
                label,
                resolve(cl.clone(), tokens, true),
                Some(emulator),
                Some(baseline),
                report,
            )
            .await;
            if let Some(ory) = load.ory {
                report.findings.push(Finding {
                    scenario: name.into(),
                    what: "whoami calls per measured request".into(),
                    value: ory.whoami as f64 / load.requests.max(1) as f64,
                    shown: format!("{:.3}", ory.whoami as f64 / load.requests.max(1) as f64),
                    target: None,
                    met: None,
                });
            }
        }
        Scenario::GetByOryId | Scenario::GetByExternalId | Scenario::GetByExternalIdNs => {
            let warm = args.users.min(config.cache.user_max_entries);
            if warm < args.users {
                report.note(format!(
                    "{name}: only {warm} of {} users fit the user cache; the warm lookups pick among those",
                    args.users
                ));
            }
            warm_users(cl, warm).await?;
            let Some(make) = scenario.lookup(cl.clone(), warm) else {
                return Ok(());
            };
            let (load, baseline) =
                measure_paired(args, name, label, make, health, Some(emulator), report).await;
            ratio_finding(report, name, &load, baseline, 0.8, None);
        }
        Scenario::BatchGet => {
            let size = args.batch_size.clamp(1, idmap::service::MAX_BATCH_IDS);
            let label = format!("{label}; {size} ids per call");
            measure(
                args,
                name,
                &label,
                batch_get(cl.clone(), args.users, size),
                Some(emulator),
                Some(baseline),
                report,
            )
            .await;
        }
        Scenario::Link => {
            let n = (4_000.0 * (args.warmup + args.duration).as_secs_f64()).ceil() as usize;
            let fresh = Arc::new(env::fresh_identities(emulator, n.max(1))?);
            report.note(format!(
                "link: {} identities idmap never saw, created in the emulator beforehand; each LinkIdentity reads the identity from Ory and queues a metadata_public.id write (outbox) that the worker delivers during the run",
                fresh.len()
            ));
            let clients = cl.clone();
            let make: MakeCall = Arc::new(move |conn, seq| {
                let id = *fresh.get(usize::try_from(seq).ok()?)?;
                let mut c = clients[conn].clone();
                boxed(async move {
                    c.link_identity(api::LinkIdentityRequest {
                        ory_identity_id: id.to_string(),
                        user_id: String::new(),
                        external_id: format!("bench-link-{seq}"),
                        ..Default::default()
                    })
                    .await?;
                    Ok(())
                })
            });
            measure(
                args,
                name,
                label,
                make,
                Some(emulator),
                Some(baseline),
                report,
            )
            .await;
        }
        Scenario::Coalesce => coalesce(args, cl, emulator, identities, report).await?,
        _ => {}
    }
    Ok(())
}

/// Fires `--coalesce-callers` ResolveSession calls with one new token at once, per round, and
/// counts the whoami calls.
async fn coalesce(
    args: &BenchArgs,
    cl: &Arc<Vec<Client>>,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::Coalesce.name();
    eprintln!("bench: {name}");
    let callers = args.coalesce_callers.max(1);
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut per_round = Vec::new();
    let started = Instant::now();
    for _ in 0..args.coalesce_rounds.max(1) {
        let token = new_sessions(emulator, identities, 1)
            .pop()
            .unwrap_or_default();
        emulator.inject_fault(Route::Whoami, Fault::delay_only(args.coalesce_whoami_delay));
        let before = OryCalls::snapshot(emulator);
        let barrier = Arc::new(tokio::sync::Barrier::new(callers));
        let mut tasks = Vec::with_capacity(callers);
        for i in 0..callers {
            let mut c = cl[i % cl.len()].clone();
            let token = token.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let t0 = Instant::now();
                let r = c
                    .resolve_session(api::ResolveSessionRequest {
                        credential: Some(resolve_session_request::Credential::SessionToken(token)),
                        ..Default::default()
                    })
                    .await;
                (t0.elapsed(), r.is_ok())
            }));
        }
        for task in tasks {
            match task.await {
                Ok((latency, ok)) => {
                    latencies.push(latency);
                    if !ok {
                        errors += 1;
                    }
                }
                Err(_) => errors += 1,
            }
        }
        emulator.clear_faults();
        per_round.push(OryCalls::snapshot(emulator).since(before).whoami);
    }
    let mut load = LoadResult::from_latencies(&latencies, errors, started.elapsed());
    load.ory = Some(OryCalls {
        whoami: per_round.iter().sum(),
        ..OryCalls::default()
    });
    report.rows.push(Row {
        scenario: name.into(),
        server: format!(
            "{callers} callers x {} rounds, whoami answered after {}",
            per_round.len(),
            report::format_latency(args.coalesce_whoami_delay)
        ),
        load,
        baseline: None,
        rss_bytes: report::rss_bytes(),
    });
    let worst = per_round.iter().copied().max().unwrap_or(0);
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!("whoami calls per round of {callers} concurrent calls with one new token"),
        value: worst as f64,
        shown: format!("{per_round:?}"),
        target: Some("exactly 1".into()),
        met: Some(per_round.iter().all(|n| *n == 1) && errors == 0),
    });
    Ok(())
}

async fn ttl_soak(
    args: &BenchArgs,
    base: &Config,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::TtlSoak.name();
    let mut config = base.clone();
    config.cache.session_ttl = args.soak_ttl;
    room_for_sessions(&mut config, args.soak_sessions);
    config.ory.whoami_rps = None;
    let label = format!(
        "IDMAP_SESSION_CACHE_TTL={}, IDMAP_ORY_WHOAMI_RPS=0",
        humantime::format_duration(args.soak_ttl)
    );
    let server = Server::start(config).await?;
    let channels = env::connect_channels(&server.addr.to_string(), args.connections).await?;
    let cl = clients(&channels);
    let tokens = Arc::new(new_sessions(
        emulator,
        identities,
        args.soak_sessions.max(1),
    ));
    let plan = Plan {
        warmup: Duration::ZERO,
        duration: args.soak_duration,
        ..args.plan()
    };
    eprintln!(
        "bench: {name} ({label}, {} sessions for {:?})",
        tokens.len(),
        args.soak_duration
    );
    let load = load::run(plan, resolve(cl, tokens.clone(), false), Some(emulator)).await;
    let whoami = load.ory.map_or(0, |o| o.whoami);
    let per_session = whoami as f64 / tokens.len() as f64;
    report.rows.push(Row {
        scenario: name.into(),
        server: format!(
            "{label}; {} sessions for {}",
            tokens.len(),
            humantime::format_duration(args.soak_duration)
        ),
        load,
        baseline: None,
        rss_bytes: report::rss_bytes(),
    });
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "whoami calls per session ({} sessions, {} of continuous resolving, TTL {})",
            tokens.len(),
            humantime::format_duration(args.soak_duration),
            humantime::format_duration(args.soak_ttl)
        ),
        value: per_session,
        shown: format!("{per_session:.2} ({whoami} calls)"),
        target: Some("at most 3 (10,000 sessions, 60 s, TTL 30 s)".into()),
        met: Some(per_session <= 3.0),
    });
    drop(channels);
    server.stop().await
}

async fn memory_per_session(
    args: &BenchArgs,
    base: &Config,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::MemoryPerSession.name();
    let n = usize::try_from(args.sessions.max(1))?;
    let bound = args.memory_bound.unwrap_or((args.sessions / 10).max(1));
    eprintln!("bench: {name}: creating {n} sessions in the emulator");
    // Created before the first reading, so the emulator's own memory for them is not counted.
    let tokens = Arc::new(new_sessions(emulator, identities, n));

    let mut config = base.clone();
    config.ory.whoami_rps = None;
    config.cache.session_max_entries = config.cache.session_max_entries.max(args.sessions);
    let unbounded = Server::start(config.clone()).await?;
    let channels = env::connect_channels(&unbounded.addr.to_string(), args.connections).await?;
    let before = report::rss_bytes().unwrap_or(0);
    let fill = resolve_all(args, clients(&channels), tokens.clone()).await;
    let after = report::rss_bytes().unwrap_or(0);
    let per_session = after.saturating_sub(before) as f64 / n as f64;
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "RSS growth per cached session (IDMAP_SESSION_CACHE_MAX_ENTRIES={}, {n} sessions resolved, {} errors; RSS {} -> {})",
            config.cache.session_max_entries,
            fill.errors,
            report::format_mib(before),
            report::format_mib(after)
        ),
        value: per_session,
        shown: format!("{per_session:.0} bytes"),
        target: Some("measured and stated".into()),
        met: Some(fill.errors == 0 && before > 0),
    });

    // The same sessions through a second server whose cache holds only `bound` of them; the first
    // keeps its memory, so freed memory cannot hide growth here.
    let mut config = config;
    config.cache.session_max_entries = bound;
    let bounded = Server::start(config).await?;
    let bounded_channels =
        env::connect_channels(&bounded.addr.to_string(), args.connections).await?;
    let quarters = 4;
    let start = report::rss_bytes().unwrap_or(0);
    let mut readings = Vec::new();
    let chunk = n.div_ceil(quarters);
    for part in tokens.chunks(chunk) {
        resolve_all(args, clients(&bounded_channels), Arc::new(part.to_vec())).await;
        readings.push(report::rss_bytes().unwrap_or(0).saturating_sub(start));
    }
    let total = readings.last().copied().unwrap_or(0);
    let shown = readings
        .iter()
        .map(|r| report::format_mib(*r))
        .collect::<Vec<_>>()
        .join(", ");
    let unbounded_growth = per_session * n as f64;
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "RSS growth with IDMAP_SESSION_CACHE_MAX_ENTRIES={bound} after each quarter of the {n} sessions"
        ),
        value: total as f64,
        shown: format!(
            "{shown} (an unbounded cache grew {} for all of them)",
            report::format_mib(unbounded_growth as u64)
        ),
        target: Some("bounded by the cache size".into()),
        // Bounded: growth levels off instead of following the number of sessions.
        met: Some((total as f64) < unbounded_growth * 0.5),
    });
    drop(channels);
    drop(bounded_channels);
    bounded.stop().await?;
    unbounded.stop().await
}

/// Cold lookups against two databases on the same PostgreSQL, one with `--users` users and one with
/// `--scale-users`, each behind a server of its own, measured in alternating slices: p99 with many
/// users over p99 with few.
async fn lookup_scale(
    args: &BenchArgs,
    base: &Config,
    db: &Database,
    emulator: &Emulator,
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::LookupScale.name();
    let label = "IDMAP_USER_CACHE_MAX_ENTRIES=1";
    let small = args.users;
    let large = args.scale_users.max(small);

    eprintln!("bench: {name}: seeding a second database with {large} users");
    let started = Instant::now();
    let large_db = db.sibling().await?;
    let result = async {
        env::seed_users(&large_db.client().await?, 1, large).await?;
        report.note(format!(
            "{name}: a second database (same PostgreSQL) seeded with {large} users in {:.1}s (INSERT .. SELECT generate_series, then ANALYZE); the first holds {small}",
            started.elapsed().as_secs_f64()
        ));
        let mut config = base.clone();
        config.cache.user_max_entries = 1;
        let small_server = Server::start(config.clone()).await?;
        config.database_url = large_db.url.clone();
        let large_server = Server::start(config).await?;
        let small_channels =
            env::connect_channels(&small_server.addr.to_string(), args.connections).await?;
        let large_channels =
            env::connect_channels(&large_server.addr.to_string(), args.connections).await?;
        let (small_cl, large_cl) = (clients(&small_channels), clients(&large_channels));

        for (what, lookup) in [
            ("get-by-ory-id-cold", get_by_ory_id as fn(Arc<Vec<Client>>, u64) -> MakeCall),
            ("get-by-external-id-cold", get_by_external_id),
        ] {
            eprintln!(
                "bench: {name} {what}: {small} vs {large} users, alternating in {} rounds",
                args.rounds.max(1)
            );
            let (few, many) = alternate(
                args,
                (&lookup(small_cl.clone(), small), Some(emulator)),
                (&lookup(large_cl.clone(), large), Some(emulator)),
            )
            .await;
            let ratio = many.latency(0.99).as_secs_f64() / few.latency(0.99).as_secs_f64().max(1e-9);
            report.findings.push(Finding {
                scenario: name.into(),
                what: format!("{what} p99 with {large} users vs {small} users"),
                value: ratio,
                shown: format!(
                    "{ratio:.2}x ({} vs {})",
                    report::format_latency(many.latency(0.99)),
                    report::format_latency(few.latency(0.99))
                ),
                target: Some("at most 1.2x (1,000,000 vs 10,000 users)".into()),
                met: Some(ratio <= 1.2 && few.errors == 0 && many.errors == 0),
            });
            for (users, load) in [(small, few), (large, many)] {
                report.rows.push(Row {
                    scenario: format!("{name} {what} @{users}"),
                    server: label.into(),
                    load,
                    baseline: None,
                    rss_bytes: report::rss_bytes(),
                });
            }
        }
        drop((small_channels, large_channels));
        small_server.stop().await?;
        large_server.stop().await
    }
    .await;
    let dropped = large_db.close().await;
    result.and(dropped)
}

/// Against a server we did not start: the health baseline, and the lookups when DATABASE_URL
/// (the target's database) lets us seed their users.
async fn external(args: &BenchArgs, target: &str, report: &mut Report) -> anyhow::Result<()> {
    report.note(format!(
        "external target {target}: Ory call counts are unavailable (no in-process emulator) and RSS is the benchmark client's only"
    ));
    let channels = env::connect_channels(target, args.connections).await?;
    let cl = clients(&channels);
    let label = format!("external {target}");
    let baseline = health_baseline(args, &channels, &label, report).await;
    let selected = args.selected();
    for s in selected.iter().filter(|s| s.needs_own_server()) {
        report.note(format!(
            "{}: skipped; it needs the in-process emulator or changed server settings",
            s.name()
        ));
    }
    let lookups: Vec<Scenario> = selected
        .iter()
        .copied()
        .filter(|s| {
            matches!(
                s,
                Scenario::GetByOryId
                    | Scenario::GetByExternalId
                    | Scenario::GetByExternalIdNs
                    | Scenario::BatchGet
            )
        })
        .collect();
    if lookups.is_empty() {
        return Ok(());
    }
    let Some(url) = &args.database_url else {
        report.note("lookups skipped: set DATABASE_URL to the target's database so their users can be seeded");
        return Ok(());
    };
    let db = Database::existing(url.clone());
    let pg = db.client().await?;
    env::seed_users(&pg, 1, args.users).await?;
    for scenario in lookups {
        let name = scenario.name();
        let make = scenario.lookup(cl.clone(), args.users).unwrap_or_else(|| {
            batch_get(
                cl.clone(),
                args.users,
                args.batch_size.clamp(1, idmap::service::MAX_BATCH_IDS),
            )
        });
        let load = measure(args, name, &label, make, None, Some(baseline), report).await;
        if scenario != Scenario::BatchGet {
            ratio_finding(report, name, &load, baseline, 0.8, None);
        }
    }
    Ok(())
}
