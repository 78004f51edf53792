//! `idmap-bench` runs end to end: a tiny run of a few scenarios through the same code path as the
//! command (argument parsing included). Performance is never asserted, only that it measured.

#![allow(clippy::unwrap_used)]

use clap::Parser;
use idmap_bench::Cli;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_tiny_run_measures_and_coalesces_to_one_whoami() {
    let cli = Cli::try_parse_from([
        "idmap-bench",
        "--duration=1s",
        "--warmup=100ms",
        "--concurrency=4",
        "--connections=2",
        "--users=100",
        "--session-pool=10",
        "--coalesce-callers=50",
        "--coalesce-rounds=2",
        "--scenario=get-by-ory-id",
        "--scenario=get-by-external-id-ns",
        "--scenario=get-by-external-id-ns-cold",
        "--scenario=resolve-cached",
        "--scenario=coalesce",
        "--scenario=lookup-scale",
        "--scale-users=300",
        "--rounds=2",
        "--api-key=bench-key-0123456789abcdef",
    ])
    .unwrap();
    let report = idmap_bench::run(cli.args).await.unwrap();

    for scenario in [
        "health-check (baseline)",
        "health-check (paired with resolve-cached)",
        "get-by-ory-id",
        // No errors: every seeded user holds its crm-<i> in namespace crm too.
        "get-by-external-id-ns",
        "get-by-external-id-ns-cold",
        "resolve-cached",
        "lookup-scale get-by-ory-id-cold @100",
        "lookup-scale get-by-ory-id-cold @300",
    ] {
        let row = report
            .row(scenario)
            .unwrap_or_else(|| panic!("no {scenario} row"));
        assert!(row.load.throughput() > 0.0, "{scenario} measured nothing");
        assert_eq!(row.load.errors, 0, "{scenario}: {:?}", row.load.first_error);
    }
    let resolve = report.row("resolve-cached").unwrap();
    assert!(
        resolve.throughput_ratio().is_some(),
        "ratio to Health/Check"
    );
    assert_eq!(
        resolve.load.ory.unwrap().whoami,
        0,
        "a warmed session pool makes no whoami calls"
    );

    for (scenario, target) in [
        ("get-by-external-id-ns", "at least 0.8x"),
        ("get-by-external-id-ns-cold", "at least 0.25x"),
    ] {
        let finding = report.findings_of(scenario).next().unwrap();
        assert_eq!(finding.target.as_deref(), Some(target), "{scenario}");
    }

    assert_eq!(
        report.findings_of("lookup-scale").count(),
        2,
        "one p99 ratio per lookup"
    );

    let coalesce = report.findings_of("coalesce").next().unwrap();
    assert_eq!(coalesce.value, 1.0, "{}", coalesce.shown);
    assert_eq!(coalesce.met, Some(true), "{}", coalesce.shown);
}

/// The restart scenarios run end to end and report their findings. Only what does not depend on
/// the machine's speed is asserted: memory hits answer while PostgreSQL is down, what fails is
/// UNAVAILABLE, no link's Ory write is lost, and a restart that lets the calls already sent to a
/// replica finish fails none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_restarts_report_their_findings() {
    let cli = Cli::try_parse_from([
        "idmap-bench",
        "--concurrency=4",
        "--connections=2",
        "--users=10",
        "--session-pool=10",
        "--scenario=rolling-restart",
        "--scenario=postgres-restart",
        "--fleet-replicas=2",
        "--restart-sessions=20",
        "--restart-wait-idle",
        "--restart-steady=500ms",
        "--pg-down=1s",
        "--pg-outbox-wait=90s",
    ])
    .unwrap();
    let report = idmap_bench::run(cli.args).await.unwrap();

    let finding = |scenario: &str, what: &str| {
        report
            .findings_of(scenario)
            .find(|f| f.what.contains(what))
            .unwrap_or_else(|| panic!("no {scenario} finding on {what}"))
            .clone()
    };
    for (scenario, what) in [
        ("rolling-restart", "failed calls"),
        ("rolling-restart", "ORY_RATE_LIMITED"),
        ("postgres-restart", "memory hits"),
        ("postgres-restart", "by code"),
        ("postgres-restart", "did not reach Ory"),
    ] {
        let f = finding(scenario, what);
        assert_eq!(f.met, Some(true), "{scenario}: {}: {}", f.what, f.shown);
    }
    assert!(
        report.row("rolling-restart").unwrap().load.requests > 0,
        "rolling-restart measured nothing"
    );
    let window = finding("postgres-restart", "LinkIdentity: unavailable window");
    assert!(window.target.is_some(), "{}", window.shown);
}
