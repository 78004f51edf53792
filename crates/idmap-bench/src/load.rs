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
