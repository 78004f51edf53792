//! The load generator: `concurrency` tasks issue calls back to back over `connections` HTTP/2
//! connections (task `i` uses connection `i % connections`), first for a warm-up that is not
//! recorded, then for the measured window. A call's latency is recorded when it *started* inside the
//! window; throughput is those calls over the time from the window's start to the last one's end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kratos_emulator::{Emulator, Route};

/// One call in flight; `Err` counts as an error.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// Makes a scenario's calls: given the connection index and a run-wide sequence number, the next
/// call, or `None` when the scenario's supply (pre-created sessions or identities) is used up.
pub type MakeCall = Arc<dyn Fn(usize, u64) -> Option<CallFuture> + Send + Sync>;

/// Latencies are recorded in microseconds, up to a minute, to three significant figures.
const HIGHEST_MICROS: u64 = 60_000_000;

/// How a load run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub concurrency: usize,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Ory calls the in-process emulator counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OryCalls {
    pub whoami: u64,
    pub admin_read: u64,
    pub admin_write: u64,
}

impl OryCalls {
    pub fn snapshot(emulator: &Emulator) -> Self {
        Self {
            whoami: emulator.calls(Route::Whoami),
            admin_read: emulator.calls(Route::AdminRead),
            admin_write: emulator.calls(Route::AdminWrite),
        }
    }

    /// Calls made since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            whoami: self.whoami.saturating_sub(earlier.whoami),
            admin_read: self.admin_read.saturating_sub(earlier.admin_read),
            admin_write: self.admin_write.saturating_sub(earlier.admin_write),
        }
    }
}

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Calls started in the measured window that succeeded or failed.
    pub requests: u64,
    pub errors: u64,
    /// From the window's start to the last measured call's end.
    pub elapsed: Duration,
    /// Latencies of the measured calls, in microseconds.
    pub histogram: Histogram<u64>,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// The scenario ran out of pre-created work before the window ended.
    pub exhausted: bool,
    /// Ory calls during the measured window (`None`: no in-process emulator to ask).
    pub ory: Option<OryCalls>,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// The latency at `quantile` (0.0 to 1.0).
    pub fn latency(&self, quantile: f64) -> Duration {
        Duration::from_micros(self.histogram.value_at_quantile(quantile))
    }

    pub fn max(&self) -> Duration {
        Duration::from_micros(self.histogram.max())
    }

    /// A result from latencies recorded elsewhere (coalescing fires its calls itself).
    pub fn from_latencies(latencies: &[Duration], errors: u64, elapsed: Duration) -> Self {
        let mut histogram = new_histogram();
        for l in latencies {
            record(&mut histogram, *l);
        }
        Self {
            requests: latencies.len() as u64,
            errors,
            elapsed,
            histogram,
            first_error: None,
            exhausted: false,
            ory: None,
        }
    }
}

impl LoadResult {
    /// One result from two windows of the same calls, as if they were one window as long as both.
    pub fn merge(mut self, other: LoadResult) -> LoadResult {
        self.requests += other.requests;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        // Same bounds on both sides, so adding cannot fail; a failure would only lose latencies.
        let _ = self.histogram.add(&other.histogram);
        self.first_error = self.first_error.or(other.first_error);
        self.exhausted |= other.exhausted;
        self.ory = match (self.ory, other.ory) {
            (Some(a), Some(b)) => Some(OryCalls {
                whoami: a.whoami + b.whoami,
                admin_read: a.admin_read + b.admin_read,
                admin_write: a.admin_write + b.admin_write,
            }),
            (a, b) => a.or(b),
        };
        self
    }
}

pub fn new_histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, HIGHEST_MICROS, 3).expect("constant histogram bounds are valid")
}

pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(HIGHEST_MICROS);
    histogram.saturating_record(micros.clamp(1, HIGHEST_MICROS));
}

struct Worker {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
    last_end: Option<Instant>,
}

/// Runs `make` under `plan`; with an emulator, counts the Ory calls made during the window.
pub async fn run(plan: Plan, make: MakeCall, emulator: Option<&Emulator>) -> LoadResult {
    let start = Instant::now();
    let window_start = start + plan.warmup;
    let window_end = window_start + plan.duration;
    let sequence = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicBool::new(false));
    let connections = plan.connections.max(1);

    let mut tasks = Vec::with_capacity(plan.concurrency);
    for worker in 0..plan.concurrency.max(1) {
        let make = make.clone();
        let sequence = sequence.clone();
        let exhausted = exhausted.clone();
        tasks.push(tokio::spawn(async move {
            let mut me = Worker {
                latencies: Vec::new(),
                errors: 0,
                first_error: None,
                last_end: None,
            };
            loop {
                let started = Instant::now();
                if started >= window_end {
                    break;
                }
                let seq = sequence.fetch_add(1, Ordering::Relaxed);
                let Some(call) = make(worker % connections, seq) else {
                    exhausted.store(true, Ordering::Relaxed);
                    break;
                };
                let result = call.await;
                let ended = Instant::now();
                if started < window_start {
                    continue;
                }
                me.latencies.push(ended - started);
                me.last_end = Some(me.last_end.map_or(ended, |l| l.max(ended)));
                if let Err(status) = result {
                    me.errors += 1;
                    if me.first_error.is_none() {
                        me.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
                    }
                }
            }
            me
        }));
    }

    // Count Ory calls at the window's edges while the workers run.
    let ory = match emulator {
        Some(emulator) => {
            tokio::time::sleep_until(window_start.into()).await;
            let before = OryCalls::snapshot(emulator);
            tokio::time::sleep_until(window_end.into()).await;
            Some(OryCalls::snapshot(emulator).since(before))
        }
        None => None,
    };

    let mut histogram = new_histogram();
    let mut requests = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut last_end = window_start;
    for task in tasks {
        let Ok(worker) = task.await else {
            errors += 1;
            continue;
        };
        requests += worker.latencies.len() as u64;
        errors += worker.errors;
        for l in &worker.latencies {
            record(&mut histogram, *l);
        }
        if first_error.is_none() {
            first_error = worker.first_error;
        }
        if let Some(end) = worker.last_end {
            last_end = last_end.max(end);
        }
    }
    LoadResult {
        requests,
        errors,
        elapsed: last_end.saturating_duration_since(window_start),
        histogram,
        first_error,
        exhausted: exhausted.load(Ordering::Relaxed),
        ory,
    }
}

/// A failed call of a [`Continuous`] run, with when it ran (since the run's origin) and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub started: Duration,
    pub ended: Duration,
    pub code: tonic::Code,
    /// The `google.rpc.ErrorInfo` reason, when the status carries one (idmap's always do; a
    /// transport failure on the client's side does not).
    pub reason: Option<String>,
    pub message: String,
}

impl Failure {
    fn of(status: &tonic::Status, started: Duration, ended: Duration) -> Self {
        use tonic_types::StatusExt as _;
        Self {
            started,
            ended,
            code: status.code(),
            reason: status.get_details_error_info().map(|info| info.reason),
            message: describe(status).chars().take(300).collect(),
        }
    }

    /// `UNAVAILABLE/DATABASE_UNAVAILABLE`, or `UNAVAILABLE/-` without an ErrorInfo.
    pub fn kind(&self) -> String {
        format!("{:?}/{}", self.code, self.reason.as_deref().unwrap_or("-"))
    }
}

/// A status's message and the chain of errors beneath it: for a failure on the client's side (a
/// transport or HTTP/2 error) the message alone does not say what happened.
pub fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let cause = e.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = e.source();
    }
    text
}

/// Failures grouped by [`Failure::kind`], most frequent first, each with its first message:
/// `Unavailable/DATABASE_UNAVAILABLE x 12 ("...")`, or `none`.
pub fn failure_summary<'a>(failures: impl IntoIterator<Item = &'a Failure>) -> String {
    let mut kinds: std::collections::BTreeMap<String, (u64, String)> = Default::default();
    for f in failures {
        kinds
            .entry(f.kind())
            .or_insert_with(|| (0, f.message.clone()))
            .0 += 1;
    }
    if kinds.is_empty() {
        return "none".to_owned();
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
    kinds
        .into_iter()
        .map(|(kind, (n, message))| format!("{kind} x {n} (\"{message}\")"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One call of a [`Continuous`] run: start since the run's origin and latency, in microseconds.
/// Kept this small because a run of a minute records over a million of them.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub start_us: u64,
    pub took_us: u32,
    pub failed: bool,
}

impl Span {
    pub fn start(&self) -> Duration {
        Duration::from_micros(self.start_us)
    }

    pub fn end(&self) -> Duration {
        Duration::from_micros(self.start_us + u64::from(self.took_us))
    }
}

/// Every call of a [`Continuous`] run.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub origin: Instant,
    pub calls: Vec<Span>,
    pub failures: Vec<Failure>,
    /// The scenario ran out of pre-created work before the run was stopped.
    pub exhausted: bool,
    /// The run hit its time limit instead of being stopped.
    pub timed_out: bool,
}

impl Timeline {
    /// The calls that started in `from..to` (times since the origin), as a measured window.
    pub fn window(&self, from: Duration, to: Duration) -> LoadResult {
        let mut histogram = new_histogram();
        let mut requests = 0;
        let mut errors = 0;
        let mut last_end = from;
        for call in self
            .calls
            .iter()
            .filter(|c| (from..to).contains(&c.start()))
        {
            requests += 1;
            errors += u64::from(call.failed);
            record(
                &mut histogram,
                Duration::from_micros(u64::from(call.took_us)),
            );
            last_end = last_end.max(call.end());
        }
        let first_error = self
            .failures
            .iter()
            .filter(|f| (from..to).contains(&f.started))
            .min_by_key(|f| f.started)
            .map(|f| format!("{:?}: {}", f.code, f.message));
        LoadResult {
            requests,
            errors,
            elapsed: last_end.saturating_sub(from),
            histogram,
            first_error,
            exhausted: self.exhausted,
            ory: None,
        }
    }

    /// The whole run as one window.
    pub fn all(&self) -> LoadResult {
        self.window(Duration::ZERO, Duration::MAX)
    }
}

/// A load that runs until told to stop (or until its time limit), for scenarios whose measured
/// window is set by events (restarts) rather than by a duration: `concurrency` tasks issue calls
/// back to back as in [`run`], with no warm-up, and every call is recorded with its time.
pub struct Continuous {
    origin: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    exhausted: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Span>, Vec<Failure>)>>,
}

impl Continuous {
    /// Starts the load; it ends at [`Continuous::stop`], or after `limit` whatever happens.
    pub fn start(concurrency: usize, connections: usize, make: MakeCall, limit: Duration) -> Self {
        let origin = Instant::now();
        let deadline = origin + limit;
        let stop = Arc::new(AtomicBool::new(false));
        let exhausted = Arc::new(AtomicBool::new(false));
        let sequence = Arc::new(AtomicU64::new(0));
        let connections = connections.max(1);
        let tasks = (0..concurrency.max(1))
            .map(|worker| {
                let (make, stop, exhausted, sequence) = (
                    make.clone(),
                    stop.clone(),
                    exhausted.clone(),
                    sequence.clone(),
                );
                tokio::spawn(async move {
                    let mut spans = Vec::new();
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        if started >= deadline {
                            break;
                        }
                        let seq = sequence.fetch_add(1, Ordering::Relaxed);
                        let Some(call) = make(worker % connections, seq) else {
                            exhausted.store(true, Ordering::Relaxed);
                            break;
                        };
                        let result = call.await;
                        let took = started.elapsed();
                        let start = started - origin;
                        if let Err(status) = &result {
                            failures.push(Failure::of(status, start, start + took));
                        }
                        spans.push(Span {
                            start_us: u64::try_from(start.as_micros()).unwrap_or(u64::MAX),
                            took_us: u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
                            failed: result.is_err(),
                        });
                    }
                    (spans, failures)
                })
            })
            .collect();
        Self {
            origin,
            deadline,
            stop,
            exhausted,
            tasks,
        }
    }

    /// Time since the origin.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Stops issuing calls, waits for those in flight, and returns every call made.
    pub async fn stop(self) -> Timeline {
        // Checked before stopping: workers past the limit ended on their own.
        let timed_out = Instant::now() >= self.deadline;
        self.stop.store(true, Ordering::Relaxed);
        let mut calls = Vec::new();
        let mut failures = Vec::new();
        for task in self.tasks {
            if let Ok((spans, failed)) = task.await {
                calls.extend(spans);
                failures.extend(failed);
            }
        }
        calls.sort_by_key(|c| c.start_us);
        failures.sort_by_key(|f| f.started);
        Timeline {
            origin: self.origin,
            calls,
            failures,
            exhausted: self.exhausted.load(Ordering::Relaxed),
            timed_out,
        }
    }
}
