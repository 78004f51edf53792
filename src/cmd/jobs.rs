//! The `idmap backfill` and `idmap reconcile` commands: their flags, the progress bar, the summary
//! and the exit code. The work itself is in `jobs/`.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ServeArgs};
use crate::error::Error;
use crate::jobs::{
    BackfillOptions, BackfillReport, DEFAULT_PAGE_SIZE, Drift, DriftKind, MAX_PAGE_SIZE,
    ReconcileObserver, ReconcileOptions, ReconcileReport, Stopped,
};
use crate::store::BackfillCounts;

/// Exit code when something failed (identities not linked, a walk that stopped on errors).
pub const EXIT_FAILED: u8 = 1;
/// Exit code of `reconcile` when drift remains: found without `--fix`, or not repairable.
pub const EXIT_DRIFT: u8 = 2;
/// Exit code when Ctrl-C or SIGTERM stopped the walk (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Settings of `idmap backfill`.
#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Identities per `GET /admin/identities` page (1 to 500).
    #[arg(long, default_value_t = DEFAULT_PAGE_SIZE, value_parser = clap::value_parser!(u32).range(1..=MAX_PAGE_SIZE as i64))]
    pub page_size: u32,
    /// Report what would be done without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Start over from the first identity instead of resuming an unfinished run.
    #[arg(long)]
    pub restart: bool,
}

/// Settings of `idmap reconcile`.
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Identities per `GET /admin/identities` page (1 to 500).
    #[arg(long, default_value_t = DEFAULT_PAGE_SIZE, value_parser = clap::value_parser!(u32).range(1..=MAX_PAGE_SIZE as i64))]
    pub page_size: u32,
    /// Repair what is found: record users' states and queue `metadata_public.id` writes.
    #[arg(long)]
    pub fix: bool,
}

/// A command that ran but did not fully succeed; the process exits with `code`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandFailed {
    pub code: u8,
    pub message: String,
}

/// A spinner with counts on a terminal; nothing when stdout is a file or a pipe (scripts, CI),
/// where only the summary is printed.
fn progress() -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {pos} identities ({per_sec}) {wide_msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A token cancelled by Ctrl-C or SIGTERM: the walk stops after the current call, and a backfill
/// keeps its place.
fn cancel_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        crate::shutdown::signal().await;
        token.cancel();
    });
    cancel
}

async fn build(serve: ServeArgs) -> anyhow::Result<crate::App> {
    let config = Config::from_serve_args(serve)?;
    crate::App::build(config).await
}

pub async fn backfill(args: BackfillArgs) -> anyhow::Result<()> {
    let app = build(args.serve).await?;
    let options = BackfillOptions {
        page_size: args.page_size,
        dry_run: args.dry_run,
        restart: args.restart,
        ..BackfillOptions::default()
    };
    let bar = progress();
    let on_page = |counts: &BackfillCounts| {
        bar.set_position(counts.scanned.max(0) as u64);
        bar.set_message(format!(
            "{} created, {} already linked, {} failed",
            counts.created, counts.already_linked, counts.failed
        ));
    };
    let report = app
        .jobs()
        .backfill(&options, &on_page, &cancel_on_signal())
        .await
        .map_err(|e| anyhow::anyhow!("backfill could not start: {}", describe(&e)))?;
    bar.finish_and_clear();
    print!("{}", backfill_summary(&report));
    backfill_outcome(&report)
}

/// The summary `idmap backfill` prints.
pub fn backfill_summary(report: &BackfillReport) -> String {
    let c = &report.counts;
    let mut out = String::new();
    if report.dry_run {
        out.push_str("backfill dry run: nothing was written; the counts say what a run would do\n");
    } else if let Some(started) = report.resumed_from {
        out.push_str(&format!("backfill resumed a run started at {started}\n"));
    }
    out.push_str(&format!("scanned:         {}\n", c.scanned));
    out.push_str(&format!("created:         {}\n", c.created));
    out.push_str(&format!("already linked:  {}\n", c.already_linked));
    out.push_str(&format!("metadata queued: {}\n", c.queued));
    out.push_str(&format!(
        "drift:           {} (metadata_public.id names another user, or metadata_public is not an object; see idmap reconcile)\n",
        c.drifted
    ));
    out.push_str(&format!("failed:          {}\n", c.failed));
    match &report.stopped {
        None => out.push_str("status:          complete\n"),
        Some(Stopped::Interrupted) => out.push_str(if report.dry_run {
            "status:          interrupted\n"
        } else {
            "status:          interrupted; run idmap backfill again to resume\n"
        }),
        Some(Stopped::Failed(why)) => out.push_str(&format!(
            "status:          stopped ({why}){}\n",
            if report.dry_run {
                ""
            } else {
                "; run idmap backfill again to resume"
            }
        )),
    }
    out
}

fn backfill_outcome(report: &BackfillReport) -> anyhow::Result<()> {
    match &report.stopped {
        Some(Stopped::Interrupted) => Err(CommandFailed {
            code: EXIT_INTERRUPTED,
            message: "backfill interrupted".into(),
        }
        .into()),
        Some(Stopped::Failed(why)) => Err(CommandFailed {
            code: EXIT_FAILED,
            message: format!("backfill stopped: {why}"),
        }
        .into()),
        None if report.counts.failed > 0 => Err(CommandFailed {
            code: EXIT_FAILED,
            message: format!(
                "{} identities could not be backfilled (logged above)",
                report.counts.failed
            ),
        }
        .into()),
        None => Ok(()),
    }
}

/// Prints each drift above the progress bar as it is found.
struct Printer<'a> {
    bar: &'a ProgressBar,
}

impl ReconcileObserver for Printer<'_> {
    fn drift(&self, drift: &Drift, repair: Option<&Result<(), Error>>) {
        let line = drift_line(drift, repair);
        // `suspend` rather than `println`: the latter prints nothing when the bar is hidden.
        self.bar.suspend(|| println!("{line}"));
    }

    fn scanned(&self, identities: u64) {
        self.bar.set_position(identities);
    }
}

/// One drift as `idmap reconcile` prints it.
pub fn drift_line(drift: &Drift, repair: Option<&Result<(), Error>>) -> String {
    match repair {
        None => drift.to_string(),
        Some(Ok(())) => format!("{drift} [fixed]"),
        Some(Err(e)) => format!("{drift} [fix failed: {}]", describe(e)),
    }
}

pub async fn reconcile(args: ReconcileArgs) -> anyhow::Result<()> {
    let app = build(args.serve).await?;
    let options = ReconcileOptions {
        page_size: args.page_size,
        fix: args.fix,
        ..ReconcileOptions::default()
    };
    let bar = progress();
    let report = app
        .jobs()
        .reconcile(&options, &Printer { bar: &bar }, &cancel_on_signal())
        .await
        .map_err(|e| anyhow::anyhow!("reconcile could not start: {}", describe(&e)))?;
    bar.finish_and_clear();
    print!("{}", reconcile_summary(&report));
    reconcile_outcome(&report)
}

/// The summary `idmap reconcile` prints.
pub fn reconcile_summary(report: &ReconcileReport) -> String {
    let mut out = String::new();
    out.push_str(&format!("identities scanned: {}\n", report.identities));
    out.push_str(&format!("users checked:      {}\n", report.users));
    out.push_str(&format!(
        "unlinked:           {} (identities without a user; see idmap backfill)\n",
        report.unlinked
    ));
    for kind in DriftKind::ALL {
        let n = report.drifts_of(kind);
        // At least one space, even after the longest kind.
        out.push_str(&format!("{:<19} {n}\n", format!("{kind}:")));
    }
    if report.fix {
        out.push_str(&format!("fixed:              {}\n", report.fixed));
        out.push_str(&format!(
            "not fixable:        {} (see the lines above; idmap will not repair them)\n",
            report.unfixable
        ));
    }
    out.push_str(&format!("failed:             {}\n", report.failed));
    match &report.stopped {
        None => out.push_str("status:             complete\n"),
        Some(stopped) => out.push_str(&format!("status:             {stopped}\n")),
    }
    out
}

fn reconcile_outcome(report: &ReconcileReport) -> anyhow::Result<()> {
    let failed = |code, message: String| Err(CommandFailed { code, message }.into());
    match &report.stopped {
        Some(Stopped::Interrupted) => failed(EXIT_INTERRUPTED, "reconcile interrupted".into()),
        Some(Stopped::Failed(why)) => failed(EXIT_FAILED, format!("reconcile stopped: {why}")),
        None if report.failed > 0 => failed(
            EXIT_FAILED,
            format!("{} checks or repairs failed (logged above)", report.failed),
        ),
        None if !report.fix && report.drift_total() > 0 => failed(
            EXIT_DRIFT,
            format!(
                "{} drifts found; run idmap reconcile --fix to repair them",
                report.drift_total()
            ),
        ),
        None if report.unfixable > 0 => failed(
            EXIT_DRIFT,
            format!(
                "{} drifts remain that idmap cannot repair (listed above); fix them in Ory",
                report.unfixable
            ),
        ),
        None => Ok(()),
    }
}

fn describe(error: &Error) -> String {
    crate::jobs::describe_error(error)
}
