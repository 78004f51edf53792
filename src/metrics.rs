//! Prometheus metrics, served as text at `GET /metrics` on the HTTP listener.
//!
//! One registry per process, as Prometheus's client libraries keep: every layer counts into it
//! without a handle passed down, and a scrape of a replica sees the whole process. The gRPC
//! families follow go-grpc-prometheus's names and labels, so the dashboards written for every
//! other gRPC service work on idmap; idmap's own are under `idmap_`.
//!
//! No label holds a token, an id, an email or anything else unbounded: methods come from the
//! server's descriptors (unknown paths are `unknown`), callers from the callers file, Ory
//! endpoints and cache results from fixed lists. The counters on the request path are resolved
//! once, so a cached ResolveSession pays a few atomic adds, not a label lookup.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for calls answered from memory in microseconds up to ones that wait on Ory for seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// What a lookup of the session or user cache found. The discriminants index [`CacheResult::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Answered from this replica's memory.
    Hit,
    /// Joined a load of the same key already in flight.
    Coalesced,
    /// Not in memory; found in the level the replicas share.
    SharedHit,
    /// Loaded from the source (Ory for sessions, PostgreSQL for users).
    Miss,
    /// Ory failed; a copy kept for stale-if-error answered.
    Stale,
}

impl CacheResult {
    const ALL: [CacheResult; 5] = [
        CacheResult::Hit,
        CacheResult::Coalesced,
        CacheResult::SharedHit,
        CacheResult::Miss,
        CacheResult::Stale,
    ];

    fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Coalesced => "coalesced",
            CacheResult::SharedHit => "shared_hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
        }
    }
}

/// The caches lookups are counted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheName {
    Session,
    User,
    /// Ory's answers to "which identity has this external id" (misses are what it keeps).
    OryExternalId,
}

/// Where an eviction came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionOrigin {
    /// Announced by this replica (InvalidateSession, a link, a hook).
    Local,
    /// Heard from another replica through PostgreSQL's NOTIFY.
    Heard,
}

/// The Ory calls idmap makes, by what they are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OryEndpoint {
    Whoami,
    GetIdentity,
    GetIdentityByExternalId,
    PatchIdentity,
    ListIdentities,
}

impl OryEndpoint {
    fn label(self) -> &'static str {
        match self {
            OryEndpoint::Whoami => "whoami",
            OryEndpoint::GetIdentity => "get_identity",
            OryEndpoint::GetIdentityByExternalId => "get_identity_by_external_id",
            OryEndpoint::PatchIdentity => "patch_identity",
            OryEndpoint::ListIdentities => "list_identities",
        }
    }
}

/// The two rate limiters in front of Ory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter {
    Whoami,
    Admin,
}

impl Limiter {
    fn label(self) -> &'static str {
        match self {
            Limiter::Whoami => "whoami",
            Limiter::Admin => "admin",
        }
    }
}

/// Every family idmap exports.
pub struct Metrics {
    registry: Registry,
    pub grpc_started: IntCounterVec,
    pub grpc_handled: IntCounterVec,
    pub grpc_handling_seconds: HistogramVec,
    session_lookups: [IntCounter; 5],
    user_lookups: [IntCounter; 5],
    ory_external_id_lookups: [IntCounter; 5],
    evictions: [IntCounter; 2],
    ory_requests: IntCounterVec,
    ory_seconds: HistogramVec,
    limiter_wait: [Histogram; 2],
    pub caller_calls: IntCounterVec,
    pub outbox_pending: IntGauge,
    pub outbox_parked: IntGauge,
    pub outbox_oldest_age: Gauge,
    pub pending_users: IntGauge,
    pub db_pool_connections: IntGaugeVec,
    pub db_pool_waiting: IntGauge,
    db_pool_wait: Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let family = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            register(&registry, family.clone());
            family
        };
        let histograms = |name: &str, help: &str, labels: &[&str]| {
            let family = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .unwrap_or_else(|e| panic!("metric {name}: {e}"));
            register(&registry, family.clone());
            family
        };
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            register(&registry, gauge.clone());
            gauge
        };

        let grpc_labels = ["grpc_type", "grpc_service", "grpc_method"];
        let cache_lookups = counters(
            "idmap_cache_lookups_total",
            "Lookups of the session and user caches, by what they found.",
            &["cache", "result"],
        );
        let lookups = |cache: &str| {
            CacheResult::ALL.map(|result| cache_lookups.with_label_values(&[cache, result.label()]))
        };
        let evictions = counters(
            "idmap_cache_evictions_total",
            "Evictions: announced by this replica (local), and heard from other replicas through PostgreSQL (heard).",
            &["origin"],
        );
        let limiter_wait = histograms(
            "idmap_ory_rate_limiter_wait_seconds",
            "Time calls spent waiting for a turn under idmap's own Ory rate limits.",
            &["limiter"],
        );
        let pool_wait = Histogram::with_opts(
            HistogramOpts::new(
                "idmap_db_pool_wait_seconds",
                "Time spent waiting for a pooled PostgreSQL connection (writes, transactions, batches).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| panic!("metric idmap_db_pool_wait_seconds: {e}"));
        register(&registry, pool_wait.clone());
        let outbox_oldest_age = Gauge::new(
            "idmap_outbox_oldest_age_seconds",
            "Age of the oldest Ory write still waiting in the outbox (0 when none), as of the scrape.",
        )
        .unwrap_or_else(|e| panic!("metric idmap_outbox_oldest_age_seconds: {e}"));
        register(&registry, outbox_oldest_age.clone());
        let db_pool_connections = IntGaugeVec::new(
            Opts::new(
                "idmap_db_pool_connections",
                "PostgreSQL connections of the pool, in use or idle, as of the scrape.",
            ),
            &["state"],
        )
        .unwrap_or_else(|e| panic!("metric idmap_db_pool_connections: {e}"));
        register(&registry, db_pool_connections.clone());

        let metrics = Self {
            grpc_started: counters(
                "grpc_server_started_total",
                "RPCs started on the server.",
                &grpc_labels,
            ),
            grpc_handled: counters(
                "grpc_server_handled_total",
                "RPCs completed on the server, by status code.",
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            ),
            grpc_handling_seconds: histograms(
                "grpc_server_handling_seconds",
                "Time from an RPC's arrival until the server has its answer.",
                &grpc_labels,
            ),
            session_lookups: lookups("session"),
            user_lookups: lookups("user"),
            ory_external_id_lookups: lookups("ory_external_id"),
            evictions: [
                evictions.with_label_values(&["local"]),
                evictions.with_label_values(&["heard"]),
            ],
            ory_requests: counters(
                "idmap_ory_requests_total",
                "Calls to Ory, by endpoint and HTTP status (`error` when no answer came).",
                &["endpoint", "status"],
            ),
            ory_seconds: histograms(
                "idmap_ory_request_duration_seconds",
                "Time Ory took to answer, by endpoint (after any wait under idmap's rate limits).",
                &["endpoint"],
            ),
            limiter_wait: [
                limiter_wait.with_label_values(&[Limiter::Whoami.label()]),
                limiter_wait.with_label_values(&[Limiter::Admin.label()]),
            ],
            caller_calls: counters(
                "idmap_caller_calls_total",
                "Calls by identified caller (the name in the callers file) and whether they were allowed.",
                &["caller", "grpc_method", "decision"],
            ),
            outbox_pending: gauge(
                "idmap_outbox_pending",
                "Ory writes waiting in the outbox to be delivered, as of the scrape.",
            ),
            outbox_parked: gauge(
                "idmap_outbox_parked",
                "Ory writes parked: delivery failed for a reason retrying cannot fix; an operator must look.",
            ),
            outbox_oldest_age,
            pending_users: gauge(
                "idmap_pending_users",
                "User ids reserved by the registration hook that no identity has claimed yet, as of the scrape.",
            ),
            db_pool_connections,
            db_pool_waiting: gauge(
                "idmap_db_pool_waiting",
                "Tasks waiting for a pooled PostgreSQL connection, as of the scrape.",
            ),
            db_pool_wait: pool_wait,
            registry,
        };
        #[cfg(target_os = "linux")]
        register(
            &metrics.registry,
            prometheus::process_collector::ProcessCollector::for_self(),
        );
        metrics
    }

    /// Counts a lookup of `cache`.
    pub fn cache_lookup(&self, cache: CacheName, result: CacheResult) {
        let counters = match cache {
            CacheName::Session => &self.session_lookups,
            CacheName::User => &self.user_lookups,
            CacheName::OryExternalId => &self.ory_external_id_lookups,
        };
        counters[result as usize].inc();
    }

    pub fn eviction(&self, origin: EvictionOrigin) {
        self.evictions[origin as usize].inc();
    }

    /// Counts an Ory call and how long Ory took; `status` is `None` when no answer came.
    pub fn ory_request(&self, endpoint: OryEndpoint, status: Option<u16>, took: Duration) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.ory_requests
            .with_label_values(&[endpoint.label(), status.as_str()])
            .inc();
        self.ory_seconds
            .with_label_values(&[endpoint.label()])
            .observe(took.as_secs_f64());
    }

    pub fn limiter_wait(&self, limiter: Limiter, waited: Duration) {
        self.limiter_wait[limiter as usize].observe(waited.as_secs_f64());
    }

    pub fn db_pool_wait(&self, waited: Duration) {
        self.db_pool_wait.observe(waited.as_secs_f64());
    }

    /// Every family in Prometheus's text format, with its content type.
    pub fn render(&self) -> (String, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut out = Vec::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        (encoder.format_type().to_owned(), out)
    }
}

fn register(registry: &Registry, collector: impl prometheus::core::Collector + 'static) {
    // Names are constants checked by the tests; a clash is a bug found on the first start.
    if let Err(e) = registry.register(Box::new(collector)) {
        panic!("registering a metric: {e}");
    }
}
