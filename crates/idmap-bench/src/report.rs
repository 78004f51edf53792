//! What a benchmark run found, and how it is printed: a table for the terminal and a markdown
//! section (with the machine and the exact command) for BENCHMARKS.md.

use std::fmt::Write as _;
use std::time::Duration;

use super::load::{LoadResult, OryCalls};

/// One measured load run.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario name, e.g. `resolve-cached`.
    pub scenario: String,
    /// Which server settings it ran with, in words.
    pub server: String,
    pub load: LoadResult,
    /// Health/Check on the same server, same concurrency and connections: the ratios' baseline.
    pub baseline: Option<Baseline>,
    /// The process's resident memory after the run (server and client when in process).
    pub rss_bytes: Option<u64>,
}

/// The Health/Check figures a row is compared with.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    pub throughput: f64,
    pub p99: Duration,
}

impl Row {
    /// Throughput as a multiple of Health/Check's.
    pub fn throughput_ratio(&self) -> Option<f64> {
        let b = self.baseline?;
        (b.throughput > 0.0).then(|| self.load.throughput() / b.throughput)
    }

    /// p99 as a multiple of Health/Check's.
    pub fn p99_ratio(&self) -> Option<f64> {
        let b = self.baseline?;
        let base = b.p99.as_secs_f64();
        (base > 0.0).then(|| self.load.latency(0.99).as_secs_f64() / base)
    }
}

/// A result that is not a load row (call counts, memory), with the issue's target when it has one.
#[derive(Debug, Clone)]
pub struct Finding {
    pub scenario: String,
    pub what: String,
    pub value: f64,
    /// The value as it should be read (with units).
    pub shown: String,
    /// The issue's target, in words.
    pub target: Option<String>,
    pub met: Option<bool>,
}

/// Everything a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub findings: Vec<Finding>,
    /// Things the reader must know (skipped scenarios, settings the harness changed).
    pub notes: Vec<String>,
}

impl Report {
    pub fn row(&self, scenario: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.scenario == scenario)
    }

    pub fn findings_of<'a>(&'a self, scenario: &'a str) -> impl Iterator<Item = &'a Finding> {
        self.findings.iter().filter(move |f| f.scenario == scenario)
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("bench: {note}");
        self.notes.push(note);
    }
}

/// A duration the way latencies are read: `850µs`, `1.25ms`, `2.10s`.
pub fn format_latency(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros}µs")
    } else if micros < 1_000_000 {
        format!("{:.2}ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

/// A ratio to the baseline: `0.83x`, or `-` when there is none.
pub fn format_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
}

/// Requests per second, without false precision.
pub fn format_rate(rate: f64) -> String {
    if rate >= 100.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

/// Bytes in MiB with one decimal.
pub fn format_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn format_ory(ory: Option<OryCalls>) -> String {
    ory.map_or_else(
        || "n/a".to_owned(),
        |o| format!("{}/{}/{}", o.whoami, o.admin_read, o.admin_write),
    )
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "",
    }
}

const HEADERS: [&str; 12] = [
    "scenario",
    "server",
    "req/s",
    "p50",
    "p90",
    "p99",
    "max",
    "errors",
    "req/s vs health",
    "p99 vs health",
    "Ory whoami/admin-read/admin-write",
    "RSS after",
];

fn cells(row: &Row) -> [String; 12] {
    let l = &row.load;
    let mut errors = l.errors.to_string();
    if l.exhausted {
        errors.push_str(" (ran out of pre-created work)");
    }
    [
        row.scenario.clone(),
        row.server.clone(),
        format_rate(l.throughput()),
        format_latency(l.latency(0.50)),
        format_latency(l.latency(0.90)),
        format_latency(l.latency(0.99)),
        format_latency(l.max()),
        errors,
        format_ratio(row.throughput_ratio()),
        format_ratio(row.p99_ratio()),
        format_ory(l.ory),
        row.rss_bytes.map_or_else(|| "n/a".to_owned(), format_mib),
    ]
}

/// The plain-text table for the terminal.
pub fn text(report: &Report) -> String {
    let rows: Vec<[String; 12]> = report.rows.iter().map(cells).collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cols: &[String]| {
        let mut s = String::new();
        for (i, c) in cols.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            if i > 1 {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
            s.push_str("  ");
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, &HEADERS.map(str::to_owned));
    for r in &rows {
        line(&mut out, r);
    }
    for row in &report.rows {
        if let Some(e) = &row.load.first_error {
            let _ = writeln!(out, "first error in {}: {e}", row.scenario);
        }
    }
    if !report.findings.is_empty() {
        out.push('\n');
        for f in &report.findings {
            let target = f
                .target
                .as_ref()
                .map(|t| format!("  [target: {t}: {}]", met(f.met)))
                .unwrap_or_default();
            let _ = writeln!(out, "{}: {} = {}{target}", f.scenario, f.what, f.shown);
        }
    }
    if !report.notes.is_empty() {
        out.push('\n');
        for n in &report.notes {
            let _ = writeln!(out, "note: {n}");
        }
    }
    out
}

/// The machine the numbers come from.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpus: usize,
    pub model: String,
    pub memory_bytes: Option<u64>,
    pub load_average: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model,
            memory_bytes: kib_field(&meminfo, "MemTotal:"),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".to_owned()),
        }
    }
}

/// A `kB` field of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix(name))?;
    let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// This process's resident memory (VmRSS).
pub fn rss_bytes() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmRSS:",
    )
}

/// This process's peak resident memory (VmHWM).
pub fn peak_rss_bytes() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmHWM:",
    )
}

/// The markdown section for BENCHMARKS.md.
pub fn markdown(report: &Report, machine: &Machine, command: &str, date: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Run of {date}\n");
    let _ = writeln!(out, "- Command: `{command}`");
    let _ = writeln!(
        out,
        "- Machine: {} CPUs ({}), {} memory; load average at the start {}",
        machine.cpus,
        machine.model,
        machine.memory_bytes.map_or_else(
            || "unknown".to_owned(),
            |b| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
        ),
        machine.load_average
    );
    out.push('\n');
    let _ = writeln!(out, "| {} |", HEADERS.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(HEADERS.len()));
    for row in &report.rows {
        let _ = writeln!(out, "| {} |", cells(row).join(" | "));
    }
    if !report.findings.is_empty() {
        out.push('\n');
        for f in &report.findings {
            let target = f
                .target
                .as_ref()
                .map(|t| format!(" (target: {t}: **{}**)", met(f.met)))
                .unwrap_or_default();
            let _ = writeln!(out, "- {}: {} = {}{target}", f.scenario, f.what, f.shown);
        }
    }
    if !report.notes.is_empty() {
        out.push('\n');
        for n in &report.notes {
            let _ = writeln!(out, "- Note: {n}");
        }
    }
    out.push('\n');
    out
}

/// Quotes a command-line argument for a POSIX shell when it needs it.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{LoadResult, record};

    fn result(latencies_ms: &[u64], elapsed: Duration) -> LoadResult {
        let l: Vec<Duration> = latencies_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        LoadResult::from_latencies(&l, 0, elapsed)
    }

    #[test]
    fn latencies_read_in_the_right_unit() {
        assert_eq!(format_latency(Duration::from_micros(850)), "850µs");
        assert_eq!(format_latency(Duration::from_micros(1_250)), "1.25ms");
        assert_eq!(format_latency(Duration::from_millis(2_100)), "2.10s");
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        // 1..=100 ms: p50 is 50 ms, p99 99 ms, max 100 ms (within the histogram's 0.1 %).
        let ms: Vec<u64> = (1..=100).collect();
        let r = result(&ms, Duration::from_secs(2));
        let close = |d: Duration, ms: f64| (d.as_secs_f64() * 1e3 - ms).abs() < ms * 0.002;
        assert!(close(r.latency(0.50), 50.0), "{:?}", r.latency(0.50));
        assert!(close(r.latency(0.99), 99.0), "{:?}", r.latency(0.99));
        assert!(close(r.max(), 100.0));
        assert_eq!(r.throughput(), 50.0);
        let mut h = crate::load::new_histogram();
        record(&mut h, Duration::ZERO);
        assert_eq!(h.min(), 1, "zero latencies are clamped into the histogram");
    }

    #[test]
    fn ratios_are_to_the_health_baseline() {
        let row = Row {
            scenario: "resolve-cached".into(),
            server: "defaults".into(),
            load: result(&[2; 100], Duration::from_secs(1)),
            baseline: Some(Baseline {
                throughput: 125.0,
                p99: Duration::from_millis(1),
            }),
            rss_bytes: None,
        };
        assert_eq!(format_ratio(row.throughput_ratio()), "0.80x");
        assert_eq!(format_ratio(row.p99_ratio()), "2.00x");
        let no_baseline = Row {
            baseline: None,
            ..row
        };
        assert_eq!(format_ratio(no_baseline.throughput_ratio()), "-");
        assert_eq!(format_rate(1234.56), "1235");
        assert_eq!(format_rate(12.345), "12.3");
    }

    #[test]
    fn tables_and_commands_render() {
        let mut report = Report::default();
        report.rows.push(Row {
            scenario: "get-by-ory-id".into(),
            server: "defaults".into(),
            load: result(&[1, 2, 3], Duration::from_secs(1)),
            baseline: None,
            rss_bytes: Some(3 << 20),
        });
        let t = text(&report);
        assert!(t.starts_with("scenario"), "{t}");
        assert!(t.contains("3.0 MiB"), "{t}");
        let machine = Machine {
            cpus: 2,
            model: "cpu".into(),
            memory_bytes: Some(1 << 30),
            load_average: "0.00 0.00 0.00".into(),
        };
        let md = markdown(&report, &machine, "idmap-bench", "today");
        assert!(md.contains("| get-by-ory-id | defaults | 3.0 |"), "{md}");
        assert_eq!(shell_quote("--scenario=all"), "--scenario=all");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(kib_field("VmRSS:\t  2048 kB\n", "VmRSS:"), Some(2 << 20));
    }
}
