//! The restart scenarios of issue 11: every replica of a fleet restarted in turn under load
//! (`rolling-restart`), and PostgreSQL restarted under load (`postgres-restart`). Both keep a
//! [`Continuous`] load running through the restarts and read each call's time against the
//! restarts' own, so the measured window is set by the events rather than by a duration.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use embedded_pg::EmbeddedPg;
use kratos_emulator::Emulator;
use rand::RngExt;
use tokio::sync::Notify;
use uuid::Uuid;

use super::env::{self, Database, Server};
use super::load::{self, Continuous, Failure, OryCalls, Plan, Timeline};
use super::report::{self, Finding, Report, Row};
use super::{
    BenchArgs, Client, Scenario, boxed, clients, new_sessions, resolve, resolve_all,
    room_for_sessions,
};
use idmap::config::Config;
use idmap::error::reason;
use idmap::proto::api::{self, resolve_session_request};
use load::MakeCall;

/// Calls in flight per replica while rolling-restart warms its sessions: each waits for its
/// replica's whoami token behind at most this many others, far less than IDMAP_ORY_TIMEOUT, so
/// the warm-up goes at the limiter's pace without a call failing for it.
const WARM_IN_FLIGHT_PER_REPLICA: usize = 2;

/// Refresh ahead starts at this part of an entry's TTL (idmap's `REFRESH_AFTER`); a run that
/// reaches it is no longer measuring the restarts alone, and the report says so.
const REFRESH_AFTER: f64 = 0.8;

/// The allowance past PostgreSQL's downtime for calls that need it to fail.
const UNAVAILABLE_ALLOWANCE: Duration = Duration::from_secs(2);

/// One connection to a replica in rotation.
struct Route {
    replica: usize,
    client: Client,
    /// Calls issued to the replica and not finished yet (shared by its connections), so the
    /// report can say how many its stop had to drain.
    in_flight: Arc<Calls>,
}

/// Calls in flight on one replica.
#[derive(Default)]
struct Calls {
    count: AtomicUsize,
    /// Told when the count falls to zero.
    idle: Notify,
}

impl Calls {
    fn now(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until no call is in flight, at most `limit`; whether that happened. Only for a replica
    /// out of rotation, whose count can only fall.
    async fn idle_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the count is read, so a last call ending in between is not missed.
            idle.as_mut().enable();
            if self.now() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
    }
}

/// Counts a call in flight until it finishes or is dropped.
struct InFlight(Arc<Calls>);

impl InFlight {
    fn new(calls: Arc<Calls>) -> Self {
        calls.count.fetch_add(1, Ordering::AcqRel);
        Self(calls)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How long `--restart-wait-idle` waits for a replica's calls before stopping it anyway.
const IDLE_WAIT: Duration = Duration::from_secs(10);

fn routes_of(replica: usize, clients: &[Client]) -> Vec<Route> {
    let in_flight = Arc::new(Calls::default());
    clients
        .iter()
        .map(|client| Route {
            replica,
            client: client.clone(),
            in_flight: in_flight.clone(),
        })
        .collect()
}

/// The replicas the load may call, as a mesh's endpoint list: read on every call, so that no call
/// is issued to a replica once it is out.
type Rotation = Arc<RwLock<Vec<Route>>>;

/// ResolveSession of `tokens[seq % len]` on a replica in rotation, picked at random per call so
/// that every session meets every replica.
fn routed_resolve(rotation: Rotation, tokens: Arc<Vec<String>>, replicas: usize) -> MakeCall {
    Arc::new(move |_, seq| {
        let token = tokens
            .get(usize::try_from(seq).ok()? % tokens.len().max(1))?
            .clone();
        let picked = {
            let routes = rotation.read().unwrap_or_else(PoisonError::into_inner);
            (!routes.is_empty()).then(|| {
                let route = &routes[rand::rng().random_range(0..routes.len())];
                (
                    route.client.clone(),
                    InFlight::new(route.in_flight.clone()),
                    route.replica,
                )
            })
        };
        boxed(async move {
            // Cannot happen with two replicas or more (one is out at a time); if it did, the
            // call would have had nowhere to go, which is a failure like any other.
            let (mut client, _in_flight, replica) =
                picked.ok_or_else(|| tonic::Status::unavailable("no replica in rotation"))?;
            client
                .resolve_session(api::ResolveSessionRequest {
                    credential: Some(resolve_session_request::Credential::SessionToken(token)),
                    ..Default::default()
                })
                .await
                .map_err(|status| naming(status, &replica_name(replica, replicas)))?;
            Ok(())
        })
    })
}

/// `replica 2` for the second of the first fleet, `replica 2'` for the one that replaced it.
fn replica_name(id: usize, replicas: usize) -> String {
    if id < replicas {
        format!("replica {}", id + 1)
    } else {
        format!("replica {}'", id - replicas + 1)
    }
}

/// The status with the replica it was sent to named in front of its message (and the errors
/// beneath it, which a new status cannot carry), its code and details kept.
fn naming(status: tonic::Status, replica: &str) -> tonic::Status {
    tonic::Status::with_details_and_metadata(
        status.code(),
        format!("{replica}: {}", load::describe(&status)),
        status.details().to_vec().into(),
        status.metadata().clone(),
    )
}

/// One replica's restart, in seconds since the load started.
struct Step {
    /// Calls in flight on the replica when it left rotation: what its stop had to drain.
    draining: usize,
    /// With --restart-wait-idle: whether they all finished before the stop.
    idle: Option<bool>,
    out: Duration,
    /// When the stop was asked for.
    stopping: Duration,
    stopped: Duration,
    back: Duration,
}

pub(super) async fn rolling_restart(
    args: &BenchArgs,
    base: &Config,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::RollingRestart.name();
    let replicas = args.fleet_replicas;
    if replicas < 2 {
        report.note(format!(
            "{name}: skipped; with --fleet-replicas {replicas} there is no replica left to take the calls while one restarts"
        ));
        return Ok(());
    }
    let rps = args.restart_whoami_rps.max(1);
    let mut config = base.clone();
    config.cache.shared_sessions = true;
    config.cache.session_ttl = args.restart_ttl;
    room_for_sessions(&mut config, args.restart_sessions);
    config.ory.whoami_rps = NonZeroU32::new(rps);
    config.shutdown_delay = args.restart_shutdown_delay;
    let mut servers = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        servers.push(Server::start(config.clone()).await?);
    }
    let result = restart_fleet(args, &config, &mut servers, emulator, identities, report).await;
    let mut stopped = Ok(());
    for server in servers {
        stopped = stopped.and(server.stop().await);
    }
    result.and(stopped)
}

async fn restart_fleet(
    args: &BenchArgs,
    config: &Config,
    servers: &mut Vec<Server>,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::RollingRestart.name();
    let replicas = servers.len();
    let rps = config.ory.whoami_rps.map_or(0, NonZeroU32::get);
    let label = format!(
        "{replicas} replicas, IDMAP_SESSION_CACHE_SHARED=on, IDMAP_ORY_WHOAMI_RPS={rps}, IDMAP_SESSION_CACHE_TTL={}, IDMAP_SHUTDOWN_DELAY={}",
        humantime::format_duration(config.cache.session_ttl),
        humantime::format_duration(config.shutdown_delay)
    );
    let per_replica = args.connections.div_ceil(replicas).max(1);
    let mut routes = Vec::new();
    let mut warm_clients = Vec::new();
    for (replica, server) in servers.iter().enumerate() {
        let of_replica =
            clients(&env::connect_channels(&server.addr.to_string(), per_replica).await?);
        warm_clients.push(
            of_replica
                .first()
                .context("a replica without a connection")?
                .clone(),
        );
        routes.extend(routes_of(replica, &of_replica));
    }

    // Every session's first sight costs a whoami call, and the measured phase should meet only
    // the restarts: so each is seen once now, by one replica, at the pace its limiter allows, and
    // lands in the shared cache where the others (and the replicas started later) find it.
    let tokens = Arc::new(new_sessions(
        emulator,
        identities,
        args.restart_sessions.max(1),
    ));
    let expected =
        Duration::from_secs_f64(tokens.len() as f64 / (rps.max(1) as f64 * replicas as f64));
    let warm_plan = Plan {
        concurrency: WARM_IN_FLIGHT_PER_REPLICA * replicas,
        connections: replicas,
        warmup: Duration::ZERO,
        // The supply of tokens ends the warm-up; this only bounds a stuck one.
        duration: expected * 3 + Duration::from_secs(60),
    };
    eprintln!(
        "bench: {name}: warming {} sessions through {replicas} replicas at up to {rps} whoami/s each (about {:.0}s)",
        tokens.len(),
        expected.as_secs_f64()
    );
    let warm_started = Instant::now();
    let before = OryCalls::snapshot(emulator);
    let warm = load::run(
        warm_plan,
        resolve(Arc::new(warm_clients), tokens.clone(), true),
        None,
    )
    .await;
    let warm_whoami = OryCalls::snapshot(emulator).since(before).whoami;
    anyhow::ensure!(
        warm.errors == 0 && warm.requests == tokens.len() as u64,
        "warming {name}'s sessions: {} of {} calls made, {} failed (first: {:?})",
        warm.requests,
        tokens.len(),
        warm.errors,
        warm.first_error
    );
    report.note(format!(
        "{name}: {} sessions warmed first, each resolved once by one replica with {WARM_IN_FLIGHT_PER_REPLICA} calls in flight per replica (so none waits long for its {rps}/s whoami limit): {warm_whoami} whoami calls in {:.1}s, every answer written to the shared session cache; not measured",
        tokens.len(),
        warm_started.elapsed().as_secs_f64()
    ));

    let rotation: Rotation = Arc::new(RwLock::new(routes));
    let mut ids: Vec<usize> = (0..replicas).collect();
    let mut next_id = replicas;
    // A bound for a stuck run only: each stop drains for at most the grace period.
    let limit = args.restart_steady * 2
        + (config.shutdown_grace + Duration::from_secs(60)) * u32::try_from(replicas)?;
    eprintln!(
        "bench: {name} ({label}): {} steady, then each replica restarted in turn, then {} steady",
        humantime::format_duration(args.restart_steady),
        humantime::format_duration(args.restart_steady)
    );
    let ory_start = OryCalls::snapshot(emulator);
    let run = Continuous::start(
        args.concurrency,
        1,
        routed_resolve(rotation.clone(), tokens.clone(), replicas),
        limit,
    );
    let sequence = async {
        tokio::time::sleep(args.restart_steady).await;
        let from = run.now();
        let ory_before = OryCalls::snapshot(emulator);
        let mut steps = Vec::with_capacity(replicas);
        for (i, id) in ids.iter_mut().enumerate() {
            let out = run.now();
            // Out of rotation first, as a mesh removes the endpoint of a pod it terminates; by
            // default the stop follows at once, so the calls already sent are left to its drain.
            let calls = {
                let mut routes = rotation.write().unwrap_or_else(PoisonError::into_inner);
                let calls = routes
                    .iter()
                    .find(|r| r.replica == *id)
                    .map(|r| r.in_flight.clone())
                    .unwrap_or_default();
                routes.retain(|r| r.replica != *id);
                calls
            };
            let draining = calls.now();
            let idle = if args.restart_wait_idle {
                Some(calls.idle_within(IDLE_WAIT).await)
            } else {
                None
            };
            let stopping = run.now();
            servers
                .remove(i)
                .stop()
                .await
                .with_context(|| format!("stopping replica {}", i + 1))?;
            let stopped = run.now();
            let server = Server::start(config.clone())
                .await
                .with_context(|| format!("starting replica {} again", i + 1))?;
            let channels = env::connect_channels(&server.addr.to_string(), per_replica).await?;
            servers.insert(i, server);
            *id = next_id;
            rotation
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(routes_of(next_id, &clients(&channels)));
            next_id += 1;
            steps.push(Step {
                draining,
                idle,
                stopping,
                out,
                stopped,
                back: run.now(),
            });
        }
        let to = run.now();
        let during = OryCalls::snapshot(emulator).since(ory_before);
        tokio::time::sleep(args.restart_steady).await;
        anyhow::Ok((from, to, during, steps))
    }
    .await;
    let timeline = run.stop().await;
    let ory_total = OryCalls::snapshot(emulator).since(ory_start);
    let (from, to, during_ory, steps) = sequence?;
    if warm_started.elapsed() >= config.cache.session_ttl.mul_f64(REFRESH_AFTER) {
        report.note(format!(
            "{name}: the run outlasted {REFRESH_AFTER} of the session TTL since the warm-up, so some whoami calls are refreshes ahead rather than the restarts' doing"
        ));
    }

    let mut all = timeline.all();
    all.ory = Some(ory_total);
    let mut during = timeline.window(from, to);
    during.ory = Some(during_ory);
    let requests = all.requests;
    let elapsed = all.elapsed;
    report.rows.push(Row {
        scenario: name.into(),
        server: format!(
            "{label}; {} sessions, {} steady before and after the restarts{}",
            tokens.len(),
            humantime::format_duration(args.restart_steady),
            if args.restart_wait_idle {
                "; each replica stopped once the calls sent to it had finished (--restart-wait-idle)"
            } else {
                "; each replica stopped as soon as it was out of rotation"
            }
        ),
        load: all,
        baseline: None,
        rss_bytes: report::rss_bytes(),
    });
    report.rows.push(Row {
        scenario: format!("{name} (during the restarts)"),
        server: label.clone(),
        load: during,
        baseline: None,
        rss_bytes: report::rss_bytes(),
    });

    let failed = timeline.failures.len();
    let when = match (timeline.failures.first(), timeline.failures.last()) {
        (Some(first), Some(last)) => format!(
            "; first started {}, last ended {}, relative to the first replica leaving rotation",
            signed_secs(first.started, from),
            signed_secs(last.ended, from)
        ),
        _ => String::new(),
    };
    let incomplete = if timeline.exhausted || timeline.timed_out {
        " (the load did not run to the end)"
    } else {
        ""
    };
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "failed calls while each of the {replicas} replicas was restarted in turn ({requests} ResolveSession calls over {:.1}s)",
            elapsed.as_secs_f64()
        ),
        value: failed as f64,
        shown: format!(
            "{failed}{incomplete}{}{when}",
            if failed > 0 {
                format!(": {}", load::failure_summary(&timeline.failures))
            } else {
                String::new()
            }
        ),
        target: Some("0".into()),
        met: Some(failed == 0 && incomplete.is_empty()),
    });
    let limited = timeline
        .failures
        .iter()
        .filter(|f| f.reason.as_deref() == Some(reason::ORY_RATE_LIMITED))
        .count();
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "calls that failed with ORY_RATE_LIMITED (IDMAP_ORY_WHOAMI_RPS={rps} per replica)"
        ),
        value: limited as f64,
        shown: limited.to_string(),
        target: Some("0".into()),
        met: Some(limited == 0),
    });
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "whoami calls during the restart sequence ({} sessions, all in the shared cache)",
            tokens.len()
        ),
        value: during_ory.whoami as f64,
        shown: format!("{} calls", during_ory.whoami),
        target: None,
        met: None,
    });
    let each = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "replica {}: out of rotation at {} with {} calls in flight{}, stopped {:.2}s later, replica {}' serving and in rotation {:.2}s after that",
                i + 1,
                signed_secs(s.out, from),
                s.draining,
                match s.idle {
                    None => String::new(),
                    Some(idle) => format!(
                        " ({} within {:.2}s, then the stop)",
                        if idle { "all finished" } else { "not all finished" },
                        s.stopping.saturating_sub(s.out).as_secs_f64()
                    ),
                },
                s.stopped.saturating_sub(s.out).as_secs_f64(),
                i + 1,
                s.back.saturating_sub(s.stopped).as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let took = to.saturating_sub(from);
    report.findings.push(Finding {
        scenario: name.into(),
        what: "restart sequence duration".into(),
        value: took.as_secs_f64(),
        shown: format!("{:.2}s ({each})", took.as_secs_f64()),
        target: None,
        met: None,
    });
    Ok(())
}

/// `+1.23s` or `-0.40s`: `at` relative to `reference`.
fn signed_secs(at: Duration, reference: Duration) -> String {
    if at >= reference {
        format!("+{:.2}s", (at - reference).as_secs_f64())
    } else {
        format!("-{:.2}s", (reference - at).as_secs_f64())
    }
}

/// [`signed_secs`] for instants.
fn signed_between(at: Instant, reference: Instant) -> String {
    let base = at.min(reference);
    signed_secs(at - base, reference - base)
}

/// LinkIdentity of `fresh[seq]`; the user of every link that succeeds goes into `linked`, so that
/// its Ory write can be looked for afterwards.
fn link_fresh(
    clients: Arc<Vec<Client>>,
    fresh: Arc<Vec<Uuid>>,
    linked: Arc<Mutex<Vec<(Uuid, String)>>>,
) -> MakeCall {
    Arc::new(move |conn, seq| {
        let id = *fresh.get(usize::try_from(seq).ok()?)?;
        let mut c = clients[conn].clone();
        let linked = linked.clone();
        boxed(async move {
            let user = c
                .link_identity(api::LinkIdentityRequest {
                    ory_identity_id: id.to_string(),
                    user_id: String::new(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .user
                .ok_or_else(|| {
                    tonic::Status::internal("bench: LinkIdentity answered without a user")
                })?;
            linked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((id, user.id));
            Ok(())
        })
    })
}

/// GetByExternalId of an id nobody holds: never in the user cache, so every call reads
/// PostgreSQL, and NOT_FOUND is its answer.
fn cold_lookup(clients: Arc<Vec<Client>>) -> MakeCall {
    Arc::new(move |conn, seq| {
        let mut c = clients[conn].clone();
        boxed(async move {
            match c
                .get_by_external_id(api::GetByExternalIdRequest {
                    external_id: format!("bench-nobody-{seq}"),
                    ..Default::default()
                })
                .await
            {
                Err(status) if status.code() != tonic::Code::NotFound => Err(status),
                _ => Ok(()),
            }
        })
    })
}

/// When PostgreSQL was stopped and started again.
struct Downtime {
    halt_called: Instant,
    halted: Instant,
    resume_called: Instant,
    resumed: Instant,
}

impl Downtime {
    /// What the calls could see: from asking PostgreSQL to stop until it accepts connections again.
    fn length(&self) -> Duration {
        self.resumed - self.halt_called
    }
}

pub(super) async fn postgres_restart(
    args: &BenchArgs,
    base: &Config,
    db: &Database,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::PostgresRestart.name();
    let Some(cluster) = db.cluster() else {
        report.note(format!(
            "{name}: skipped; it stops and starts the PostgreSQL it runs on, and DATABASE_URL names one this run did not start (unset it for a private cluster)"
        ));
        return Ok(());
    };
    let mut config = base.clone();
    config.cache.session_ttl = args.restart_ttl;
    room_for_sessions(&mut config, args.session_pool);
    config.ory.whoami_rps = None;
    config.ory.admin_rps = None;
    let label = format!(
        "IDMAP_SESSION_CACHE_TTL={}, IDMAP_ORY_WHOAMI_RPS=0, IDMAP_ORY_ADMIN_RPS=0",
        humantime::format_duration(args.restart_ttl)
    );
    let server = Server::start(config).await?;
    let result = restart_postgres(
        args, &label, &server, &cluster, db, emulator, identities, report,
    )
    .await;
    let stopped = server.stop().await;
    result.and(stopped)
}

/// The first failure's start and the last failure's end of a run.
fn failure_span(t: &Timeline) -> Option<(Instant, Instant)> {
    let first = t.failures.iter().map(|f| t.origin + f.started).min()?;
    let last = t.failures.iter().map(|f| t.origin + f.ended).max()?;
    Some((first, last))
}

#[allow(clippy::too_many_arguments)]
async fn restart_postgres(
    args: &BenchArgs,
    label: &str,
    server: &Server,
    cluster: &Arc<EmbeddedPg>,
    db: &Database,
    emulator: &Emulator,
    identities: &[Uuid],
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = Scenario::PostgresRestart.name();
    let channels = env::connect_channels(&server.addr.to_string(), args.connections).await?;
    let cl = clients(&channels);
    let tokens = Arc::new(new_sessions(emulator, identities, args.session_pool.max(1)));
    let warm = resolve_all(args, cl.clone(), tokens.clone()).await;
    anyhow::ensure!(
        warm.errors == 0,
        "warming {name}'s sessions failed: {:?}",
        warm.first_error
    );
    // Links that fail fast while PostgreSQL is down use identities up quickly; running out would
    // end the link load early, which the report would say.
    let planned = args.restart_steady * 2 + args.pg_down + Duration::from_secs(10);
    let supply = (1_000.0 * planned.as_secs_f64()).ceil() as usize;
    let fresh = Arc::new(env::fresh_identities(emulator, supply)?);
    report.note(format!(
        "{name}: {} sessions resolved once first (memory hits from then on: session and user cache); {} identities idmap never saw created in the emulator for LinkIdentity, each link queueing a metadata_public.id write in the outbox; cold lookups are GetByExternalId of ids nobody holds (NOT_FOUND from PostgreSQL counts as answered)",
        tokens.len(),
        fresh.len()
    ));

    let linked: Arc<Mutex<Vec<(Uuid, String)>>> = Arc::default();
    let limit = planned * 2 + Duration::from_secs(60);
    let db_in_flight = args.pg_db_concurrency.max(1);
    eprintln!(
        "bench: {name} ({label}): {} steady, PostgreSQL down for {}, {} steady",
        humantime::format_duration(args.restart_steady),
        humantime::format_duration(args.pg_down),
        humantime::format_duration(args.restart_steady)
    );
    let ory_start = OryCalls::snapshot(emulator);
    let hits = Continuous::start(
        args.concurrency,
        cl.len(),
        resolve(cl.clone(), tokens.clone(), false),
        limit,
    );
    let links = Continuous::start(
        db_in_flight,
        cl.len(),
        link_fresh(cl.clone(), fresh.clone(), linked.clone()),
        limit,
    );
    let lookups = Continuous::start(db_in_flight, cl.len(), cold_lookup(cl.clone()), limit);
    let restart = async {
        tokio::time::sleep(args.restart_steady).await;
        let halt_called = Instant::now();
        let pg = cluster.clone();
        tokio::task::spawn_blocking(move || pg.halt())
            .await?
            .context("stopping PostgreSQL")?;
        let halted = Instant::now();
        tokio::time::sleep(args.pg_down).await;
        let resume_called = Instant::now();
        let pg = cluster.clone();
        tokio::task::spawn_blocking(move || pg.resume())
            .await?
            .context("starting PostgreSQL again")?;
        let resumed = Instant::now();
        tokio::time::sleep(args.restart_steady).await;
        anyhow::Ok(Downtime {
            halt_called,
            halted,
            resume_called,
            resumed,
        })
    }
    .await;
    let (hits, links, lookups) = tokio::join!(hits.stop(), links.stop(), lookups.stop());
    let ory_total = OryCalls::snapshot(emulator).since(ory_start);
    let down = restart?;
    let downtime = down.length();
    report.note(format!(
        "{name}: PostgreSQL halt (pg_ctl stop -m fast) took {:.2}s, it stayed down {:.2}s, the resume (pg_ctl start, until it accepts connections) took {:.2}s: {:.2}s from halt called to resume returned",
        (down.halted - down.halt_called).as_secs_f64(),
        (down.resume_called - down.halted).as_secs_f64(),
        (down.resumed - down.resume_called).as_secs_f64(),
        downtime.as_secs_f64()
    ));

    let since = |t: &Timeline, at: Instant| at.saturating_duration_since(t.origin);
    let mut hits_all = hits.all();
    hits_all.ory = Some(ory_total);
    let hits_down = hits.window(since(&hits, down.halt_called), since(&hits, down.resumed));
    let down_calls = hits_down.requests;
    let down_p99 = hits_down.latency(0.99);
    let down_max = hits_down.max();
    let hits_requests = hits_all.requests;
    for (scenario, server, load) in [
        (
            format!("{name} cached resolve"),
            format!("{label}; {} in flight", args.concurrency),
            hits_all,
        ),
        (
            format!("{name} cached resolve (PostgreSQL down)"),
            format!("{label}; calls started from halt called to resume returned"),
            hits_down,
        ),
        (
            format!("{name} link"),
            format!("{label}; {db_in_flight} in flight"),
            links.all(),
        ),
        (
            format!("{name} cold lookup"),
            format!("{label}; {db_in_flight} in flight"),
            lookups.all(),
        ),
    ] {
        report.rows.push(Row {
            scenario,
            server,
            load,
            baseline: None,
            rss_bytes: report::rss_bytes(),
        });
    }

    let hit_errors = hits.failures.len();
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "memory hits (cached ResolveSession) that failed, of {hits_requests}; {down_calls} of them started while PostgreSQL was down (p99 {}, max {})",
            report::format_latency(down_p99),
            report::format_latency(down_max)
        ),
        value: hit_errors as f64,
        shown: if hit_errors == 0 {
            "0".into()
        } else {
            format!("{hit_errors}: {}", load::failure_summary(&hits.failures))
        },
        target: Some("0, answering throughout".into()),
        met: Some(hit_errors == 0 && down_calls > 0 && !hits.exhausted && !hits.timed_out),
    });

    let allowed = downtime + UNAVAILABLE_ALLOWANCE;
    for (what, t) in [("LinkIdentity", &links), ("cold GetByExternalId", &lookups)] {
        let calls = t.calls.len();
        let (value, shown, met) = match failure_span(t) {
            None => (
                0.0,
                format!(
                    "no call failed ({calls} calls, slowest {})",
                    report::format_latency(t.all().max())
                ),
                !t.exhausted && !t.timed_out,
            ),
            Some((first, last)) => {
                let window = last.saturating_duration_since(first);
                // A call in flight when the halt began may fail for it; one that failed before
                // cannot have.
                let before_halt = t
                    .failures
                    .iter()
                    .filter(|f| t.origin + f.ended < down.halt_called)
                    .count();
                // Answered again: some call that started after the last failure succeeded.
                let recovered = t
                    .calls
                    .iter()
                    .any(|c| !c.failed && t.origin + c.start() > last);
                (
                    window.as_secs_f64(),
                    format!(
                        "{:.2}s: first failure started {} from halt called, last one ended {} from resume returned; {} of {calls} calls failed{}{}",
                        window.as_secs_f64(),
                        signed_between(first, down.halt_called),
                        signed_between(last, down.resumed),
                        t.failures.len(),
                        if before_halt > 0 {
                            format!(", {before_halt} of them ended before the halt was called")
                        } else {
                            String::new()
                        },
                        if recovered {
                            ""
                        } else {
                            ", still failing when the load stopped"
                        }
                    ),
                    window <= allowed
                        && recovered
                        && before_halt == 0
                        && !t.exhausted
                        && !t.timed_out,
                )
            }
        };
        report.findings.push(Finding {
            scenario: name.into(),
            what: format!(
                "{what}: unavailable window (first failure's start to last failure's end) vs the downtime (halt called to resume returned: {:.2}s)",
                downtime.as_secs_f64()
            ),
            value,
            shown,
            target: Some(format!(
                "at most the downtime + 2 s ({:.2}s)",
                allowed.as_secs_f64()
            )),
            met: Some(met),
        });
    }
    let db_failures: Vec<&Failure> = links.failures.iter().chain(&lookups.failures).collect();
    let wrong = db_failures
        .iter()
        .filter(|f| f.code != tonic::Code::Unavailable)
        .count();
    report.findings.push(Finding {
        scenario: name.into(),
        what: "failures of the calls that need PostgreSQL, by code/ErrorInfo reason".into(),
        value: wrong as f64,
        shown: load::failure_summary(db_failures.iter().copied()),
        target: Some("all UNAVAILABLE (never INTERNAL or UNKNOWN)".into()),
        met: Some(wrong == 0),
    });

    // Every link that succeeded queued its Ory write in its own transaction: it must arrive.
    let linked = linked
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let has_id = |identity: &Uuid, user: &str| {
        emulator
            .identity(*identity)
            .is_some_and(|i| i["metadata_public"]["id"].as_str() == Some(user))
    };
    let there_at_end = linked.iter().filter(|(i, u)| has_id(i, u)).count();
    let waited = Instant::now();
    let deadline = waited + args.pg_outbox_wait;
    let mut missing = 0;
    for (identity, user) in &linked {
        let want = user.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let arrived = emulator
            .wait_for_identity(
                *identity,
                move |i| i["metadata_public"]["id"].as_str() == Some(want.as_str()),
                left,
            )
            .await;
        missing += usize::from(arrived.is_none());
    }
    let waited = waited.elapsed();
    // Rows still queued are not lost writes, but say what they are: a delivery whose outcome could
    // not be recorded while PostgreSQL was down keeps its claim until the lease ends, and a link
    // whose answer was cut off may have committed with its row.
    let rows = db
        .client()
        .await?
        .query(
            "SELECT ory_identity_id::text, user_id::text, attempts, failed_at IS NOT NULL, \
                    EXTRACT(EPOCH FROM next_attempt_at - now())::float8 \
             FROM ory_outbox ORDER BY id",
            &[],
        )
        .await
        .context("reading the outbox")?;
    let failed = rows.iter().filter(|r| r.get::<_, bool>(3)).count();
    let pending: Vec<String> = rows
        .iter()
        .filter(|r| !r.get::<_, bool>(3))
        .map(|r| {
            let (identity, user): (String, String) = (r.get(0), r.get(1));
            let succeeded = linked.iter().any(|(i, _)| i.to_string() == identity);
            let written = Uuid::parse_str(&identity).is_ok_and(|i| has_id(&i, &user));
            format!(
                "{} link, {} in Ory, {} attempts, due in {:.0}s",
                if succeeded { "a succeeded" } else { "a failed" },
                if written {
                    "already written"
                } else {
                    "not yet"
                },
                r.get::<_, i32>(2),
                r.get::<_, f64>(4)
            )
        })
        .collect();
    let pending_shown = if pending.is_empty() {
        "none pending".to_owned()
    } else {
        let more = pending.len().saturating_sub(5);
        format!(
            "{} pending: {}{}",
            pending.len(),
            pending[..pending.len() - more].join("; "),
            if more > 0 {
                format!("; {more} more")
            } else {
                String::new()
            }
        )
    };
    report.findings.push(Finding {
        scenario: name.into(),
        what: format!(
            "links that succeeded whose metadata_public.id did not reach Ory within {} of the load's end",
            humantime::format_duration(args.pg_outbox_wait)
        ),
        value: missing as f64,
        shown: format!(
            "{missing} of {} ({there_at_end} written when the load stopped, the rest within {:.1}s after; ory_outbox afterwards: {failed} failed, {pending_shown})",
            linked.len(),
            waited.as_secs_f64()
        ),
        target: Some("none lost".into()),
        met: Some(missing == 0 && !linked.is_empty()),
    });
    drop(channels);
    Ok(())
}
