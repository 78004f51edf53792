//! `idmap backfill` and `idmap reconcile` against real PostgreSQL and the Kratos emulator over HTTP,
//! driven through the library (no subprocess) except for one end-to-end run of the binary.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::RunQueryDsl;
use idmap::error::Error;
use idmap::jobs::{
    BackfillOptions, BackfillReport, Drift, DriftKind, Jobs, ReconcileObserver, ReconcileOptions,
    RetryPolicy, Stopped,
};
use idmap::proto::api::GetUserByOryIdRequest;
use idmap::store::BackfillCounts;
use kratos_emulator::{
    Emulator, EmulatorConfig, Fault, LinkHeader, NewIdentity, PageTokens, Route,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::*;

/// Retries in milliseconds, so a test that exhausts them stays fast.
fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

fn options(page_size: u32) -> BackfillOptions {
    BackfillOptions {
        page_size,
        retry: quick_retry(),
        ..BackfillOptions::default()
    }
}

/// A backfill run to its end: nothing watches it and nothing stops it but Ory.
async fn run_backfill(jobs: &Jobs, options: &BackfillOptions) -> BackfillReport {
    jobs.backfill(options, &|_: &BackfillCounts| {}, &CancellationToken::new())
        .await
        .unwrap()
}

/// A backfill stopped as Ctrl-C stops it, once the run's counts (resumed pages included) reach
/// `pages` pages.
async fn interrupted_at(jobs: &Jobs, options: &BackfillOptions, pages: i64) -> BackfillReport {
    let cancel = CancellationToken::new();
    let stop = |c: &BackfillCounts| {
        if c.pages >= pages {
            cancel.cancel();
        }
    };
    jobs.backfill(options, &stop, &cancel).await.unwrap()
}

/// An idmap (not serving: backfill and reconcile are commands) on `db` and `ory`, without an admin
/// rate limit so thousands of identities take seconds.
async fn app(db: &TestDb, ory: &Emulator) -> idmap::App {
    let mut config = config(db, ory);
    config.ory.admin_rps = std::num::NonZeroU32::new(10);
    idmap::App::build(config).await.expect("build the app")
}

fn seed(ory: &Emulator, n: usize, prefix: &str) -> Vec<Uuid> {
    (0..n)
        .map(|i| identity(ory, "customer", &format!("{prefix}-{i}@example.com")))
        .collect()
}

/// Does what the outbox worker of a running `idmap serve` would: writes every queued
/// `metadata_public.id` into Ory and removes the rows.
async fn deliver_outbox(db: &TestDb, ory: &Emulator) {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        ory_identity_id: Uuid,
        #[diesel(sql_type = SqlUuid)]
        user_id: Uuid,
    }
    let mut conn = db.conn().await;
    let rows: Vec<Row> = diesel::sql_query("SELECT ory_identity_id, user_id FROM ory_outbox")
        .load(&mut conn)
        .await
        .unwrap();
    for row in rows {
        set_metadata_id(ory, row.ory_identity_id, &row.user_id.to_string());
    }
    db.run_sql("DELETE FROM ory_outbox").await;
}

fn set_metadata_id(ory: &Emulator, identity: Uuid, id: &str) {
    let current = ory.identity(identity).unwrap()["metadata_public"].clone();
    let mut metadata = if current.is_object() {
        current
    } else {
        json!({})
    };
    metadata["id"] = json!(id);
    ory.patch_identity(
        identity,
        &json!([{"op": "add", "path": "/metadata_public", "value": metadata}]),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_of_thousands_resumes_after_interruptions_without_duplicates_or_misses() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let seeded: HashSet<Uuid> = seed(&ory, 3000, "bulk").into_iter().collect();
    let app = app(&db, &ory).await;
    let jobs = app.jobs();
    let options = options(100);

    // 1. Ctrl-C after five pages.
    let first = interrupted_at(&jobs, &options, 5).await;
    assert_eq!(first.stopped, Some(Stopped::Interrupted));
    assert_eq!(first.counts.pages, 5);
    assert_eq!(first.counts.created, 500);
    assert_eq!(db.count("SELECT count(*) FROM users").await, 500);
    assert!(!first.is_success());

    // 2. Resumed, until Ory fails for longer than the retries last (from page 12 on).
    let pages_before = ory.calls(Route::AdminRead);
    let fail_after_12 = |c: &BackfillCounts| {
        if c.pages == 12 {
            ory.inject_fault(Route::AdminRead, Fault::status(503));
        }
    };
    let second = jobs
        .backfill(&options, &fail_after_12, &CancellationToken::new())
        .await
        .unwrap();
    assert!(
        matches!(&second.stopped, Some(Stopped::Failed(why)) if why.contains("503")),
        "{:?}",
        second.stopped
    );
    assert!(second.resumed_from.is_some());
    assert_eq!(second.counts.pages, 12);
    assert_eq!(second.counts.created, 1200);
    // Seven pages, then the failing page tried as often as the policy allows.
    assert_eq!(ory.calls(Route::AdminRead) - pages_before, 7 + 3);
    assert_eq!(db.count("SELECT count(*) FROM users").await, 1200);

    // 3. Ory recovers, with a few passing failures left: the run rides them out and finishes.
    ory.clear_faults();
    ory.inject_fault(Route::AdminRead, Fault::status(500).times(1));
    ory.inject_fault(Route::AdminRead, Fault::rate_limited(1).times(1));
    let started = tokio::time::Instant::now();
    let third = run_backfill(&jobs, &options).await;
    assert!(third.is_success(), "{third:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(
        third.counts,
        BackfillCounts {
            pages: 30,
            scanned: 3000,
            created: 3000,
            already_linked: 0,
            queued: 0,
            drifted: 0,
            failed: 0,
        }
    );

    // No duplicate and no miss: exactly one user per identity, and one metadata write queued each.
    let linked = db.links().await;
    assert_eq!(linked.len(), 3000);
    let identities: HashSet<Uuid> = linked.iter().map(|(i, _)| *i).collect();
    assert_eq!(identities, seeded);
    assert_eq!(
        db.count("SELECT count(*) FROM ory_outbox WHERE kind = 'set_metadata_public_id'")
            .await,
        3000
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM backfill_runs WHERE finished_at IS NOT NULL AND cursor IS NULL"
        )
        .await,
        1
    );

    // A later run starts over and finds everything linked; the write already queued absorbs the
    // new one.
    let again = run_backfill(&jobs, &options).await;
    assert!(again.resumed_from.is_none());
    assert_eq!(again.counts.created, 0);
    assert_eq!(again.counts.queued, 3000);
    assert_eq!(db.count("SELECT count(*) FROM ory_outbox").await, 3000);
    assert_eq!(db.count("SELECT count(*) FROM users").await, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_follows_next_links_sent_in_a_link_header_of_their_own() {
    // Older ory/x sends rel="first" and rel="next" as two Link headers; reading only the first
    // header would end the walk after one page and report it complete.
    let db = TestDb::new().await;
    let ory = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            link_header: LinkHeader::Split,
            page_tokens: PageTokens::LastId,
            ..EmulatorConfig::default()
        },
    )
    .await
    .unwrap();
    let seeded: HashSet<Uuid> = seed(&ory, 45, "split").into_iter().collect();
    let app = app(&db, &ory).await;
    let report = run_backfill(&app.jobs(), &options(10)).await;
    assert!(report.is_success(), "{report:?}");
    assert_eq!((report.counts.pages, report.counts.scanned), (5, 45));
    assert_eq!(ory.calls(Route::AdminRead), 5);
    let linked: HashSet<Uuid> = db.links().await.into_iter().map(|(i, _)| i).collect();
    assert_eq!(linked, seeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_resumed_after_its_page_token_expired_walks_again_from_the_first_page() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let mut seeded: HashSet<Uuid> = seed(&ory, 50, "expiry").into_iter().collect();
    let app = app(&db, &ory).await;
    let jobs = app.jobs();
    let options = options(10);

    let first = interrupted_at(&jobs, &options, 2).await;
    assert_eq!(first.stopped, Some(Stopped::Interrupted));
    assert_eq!(first.counts.created, 20);

    // More than an hour later: Kratos refuses the saved token. Meanwhile people registered, some of
    // them (with ids sorting below the saved place) where the walk had already been.
    ory.expire_page_tokens();
    seeded.extend(seed(&ory, 5, "meanwhile"));
    ory.reset_calls();
    let resumed = run_backfill(&jobs, &options).await;
    assert!(resumed.is_success(), "{resumed:?}");
    assert!(resumed.resumed_from.is_some());
    // The refused call, then every page from the first.
    assert_eq!(ory.calls(Route::AdminRead), 1 + 6);
    // Counted once each: the identities of the first walk's two pages are not counted again.
    assert_eq!(resumed.counts.scanned, 55);
    assert_eq!(resumed.counts.created, 55);
    assert_eq!(resumed.counts.already_linked, 0);
    let linked = db.links().await;
    assert_eq!(linked.len(), 55);
    let identities: HashSet<Uuid> = linked.iter().map(|(i, _)| *i).collect();
    assert_eq!(identities, seeded);
    assert_eq!(
        db.count("SELECT count(*) FROM backfill_run_identities")
            .await,
        0
    );

    // A Kratos that keeps refusing tokens stops the run instead of walking round: once refused
    // on resume, the first page read, the next token refused again.
    interrupted_at(&jobs, &options, 1).await;
    ory.inject_fault(Route::AdminRead, Fault::status(400).times(1));
    ory.inject_fault(Route::AdminRead, Fault::delay_only(Duration::ZERO).times(1));
    ory.inject_fault(Route::AdminRead, Fault::status(400).times(1));
    let stuck = run_backfill(&jobs, &options).await;
    assert!(
        matches!(&stuck.stopped, Some(Stopped::Failed(why)) if why.contains("refused")),
        "{:?}",
        stuck.stopped
    );
    assert_eq!(db.count("SELECT count(*) FROM users").await, 55);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_stopped_in_the_middle_of_a_page_resumes_without_duplicates_misses_or_miscounts() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let mut seeded = seed(&ory, 50, "midpage");
    seeded.sort();
    let app = app(&db, &ory).await;
    let jobs = app.jobs();
    let options = options(10);

    // The database fails one link of the third page (identities are listed in id order), as if it
    // went down while the page was half done: the rest of the page commits, the cursor stays.
    let victim = seeded[24];
    db.run_sql(&format!(
        "CREATE FUNCTION fail_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               RAISE EXCEPTION 'the database system is shutting down (test)'; END $$; \
             CREATE TRIGGER fail_one BEFORE INSERT ON users FOR EACH ROW \
               WHEN (NEW.ory_identity_id = '{victim}') EXECUTE FUNCTION fail_one();"
    ))
    .await;
    let stopped = run_backfill(&jobs, &options).await;
    assert!(
        matches!(&stopped.stopped, Some(Stopped::Failed(_))),
        "{:?}",
        stopped.stopped
    );
    assert_eq!(stopped.counts.pages, 2);
    assert_eq!(stopped.counts.created, 20);
    // The other nine identities of the third page were linked before the page failed.
    assert_eq!(db.count("SELECT count(*) FROM users").await, 29);

    // The database is back; the run resumes at the third page and does it again.
    db.run_sql("DROP TRIGGER fail_one ON users; DROP FUNCTION fail_one();")
        .await;
    let resumed = run_backfill(&jobs, &options).await;
    assert!(resumed.is_success(), "{resumed:?}");
    // The nine users the run made before it stopped still count as created by it.
    assert_eq!(
        resumed.counts,
        BackfillCounts {
            pages: 5,
            scanned: 50,
            created: 50,
            already_linked: 0,
            queued: 0,
            drifted: 0,
            failed: 0,
        }
    );
    let linked = db.links().await;
    assert_eq!(linked.len(), 50);
    let identities: HashSet<Uuid> = linked.iter().map(|(i, _)| *i).collect();
    assert_eq!(identities, seeded.iter().copied().collect());
    assert_eq!(db.count("SELECT count(*) FROM ory_outbox").await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_calls_ory_no_faster_than_the_admin_rate_limit() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    seed(&ory, 40, "rps");
    let mut config = config(&db, &ory);
    // IDMAP_ORY_ADMIN_RPS=10: one call per 100 ms at most.
    config.ory.admin_rps = std::num::NonZeroU32::new(10);
    let app = idmap::App::build(config).await.unwrap();
    ory.reset_calls();

    let started = tokio::time::Instant::now();
    let report = run_backfill(&app.jobs(), &options(5)).await;
    let elapsed = started.elapsed();
    assert!(report.is_success(), "{report:?}");
    // Eight pages, one list call each and no other admin call: seven waits of 100 ms between them.
    // Only a lower bound: a slow machine may take longer, never less (a few ms are allowed for
    // the limiter's clock not being tokio's).
    assert_eq!(ory.calls(Route::AdminRead), 8);
    assert_eq!(ory.calls(Route::AdminWrite), 0);
    assert!(
        elapsed >= Duration::from_millis(700 - 10),
        "8 admin calls in {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_restart_starts_over_and_dry_run_writes_nothing() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    seed(&ory, 60, "dry");
    let app = app(&db, &ory).await;
    let jobs = app.jobs();

    let dry = BackfillOptions {
        dry_run: true,
        ..options(25)
    };
    let report = run_backfill(&jobs, &dry).await;
    assert!(report.is_success());
    assert_eq!(report.counts.pages, 3);
    assert_eq!(report.counts.scanned, 60);
    assert_eq!(report.counts.created, 60);
    for table in ["users", "ory_outbox", "backfill_runs", "pending_users"] {
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM {table}")).await,
            0,
            "dry run wrote to {table}"
        );
    }
    assert!(idmap::cmd::jobs::backfill_summary(&report).contains("nothing was written"));

    // Interrupted after one page; --restart ignores the saved place and walks from the start.
    interrupted_at(&jobs, &options(25), 1).await;
    let restart = BackfillOptions {
        restart: true,
        ..options(25)
    };
    let report = run_backfill(&jobs, &restart).await;
    assert!(report.is_success());
    assert!(report.resumed_from.is_none());
    assert_eq!(report.counts.pages, 3);
    assert_eq!(report.counts.scanned, 60);
    assert_eq!(report.counts.created, 35);
    assert_eq!(report.counts.already_linked + report.counts.queued, 25);
    assert_eq!(db.count("SELECT count(*) FROM users").await, 60);
    assert_eq!(
        db.count("SELECT count(*) FROM backfill_runs WHERE finished_at IS NULL")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_skips_correct_identities_and_goes_through_the_link_path() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let correct = seed(&ory, 20, "correct");
    let app = app(&db, &ory).await;
    let jobs = app.jobs();

    // Linked, and Ory has the ids: the state a finished backfill plus the outbox leaves.
    run_backfill(&jobs, &options(8)).await;
    deliver_outbox(&db, &ory).await;

    // Now some that need work:
    // - linked, but metadata_public.id was removed in Ory (other keys kept);
    let lost = correct[0];
    ory.patch_identity(
        lost,
        &json!([{"op": "add", "path": "/metadata_public", "value": {"theme": "dark"}}]),
    )
    .unwrap();
    // - linked, but metadata_public.id names another user (left to reconcile);
    let elsewhere = correct[1];
    set_metadata_id(&ory, elsewhere, &Uuid::new_v4().to_string());
    // - linked, but metadata_public is a list: adding `id` would destroy it, so nothing is queued
    //   (left to reconcile);
    let odd = correct[2];
    ory.patch_identity(
        odd,
        &json!([{"op": "replace", "path": "/metadata_public", "value": ["legacy"]}]),
    )
    .unwrap();
    // - new, carrying an id from an earlier idmap (a restored database): adopted, nothing queued;
    let restored_user = Uuid::now_v7();
    let restored = id_of(&ory.create_identity(NewIdentity {
        schema_id: "employee".into(),
        traits: json!({"email": "restored@example.com"}),
        metadata_public: Some(json!({"id": restored_user.to_string()})),
        ..NewIdentity::default()
    }));
    // - new, whose id the pre-persist hook reserved: the pending user is claimed;
    let reservation = app.mapper().reserve_user("customer", None).await.unwrap();
    let registered = id_of(&ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": "registered@example.com"}),
        metadata_public: Some(json!({"id": reservation.user_id().to_string()})),
        ..NewIdentity::default()
    }));
    // - new and deactivated: its user records that.
    let inactive = id_of(&ory.create_identity(NewIdentity {
        schema_id: "customer".into(),
        traits: json!({"email": "inactive@example.com"}),
        state: Some("inactive".into()),
        ..NewIdentity::default()
    }));
    assert_eq!(db.count("SELECT count(*) FROM pending_users").await, 1);

    let report = run_backfill(&jobs, &options(8)).await;
    assert!(report.is_success(), "{report:?}");
    assert_eq!(report.counts.scanned, 23);
    assert_eq!(report.counts.already_linked, 17);
    assert_eq!(report.counts.queued, 1);
    assert_eq!(report.counts.drifted, 2);
    assert_eq!(report.counts.created, 3);
    let summary = idmap::cmd::jobs::backfill_summary(&report);
    assert!(summary.contains("already linked:  17"), "{summary}");
    assert!(summary.contains("drift:           2"), "{summary}");

    assert_eq!(db.user_of(restored).await, restored_user);
    assert_eq!(
        db.user_of(registered).await.to_string(),
        reservation.user_id().to_string()
    );
    assert_eq!(db.count("SELECT count(*) FROM pending_users").await, 0);
    assert_eq!(db.user_state(inactive).await, "inactive");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM users WHERE ory_identity_id = '{inactive}' AND updated_at = created_at"
        ))
        .await,
        1,
        "the state is written with the user, in the link's transaction"
    );
    assert_eq!(db.user_state(restored).await, "active");

    // Writes were queued only where Ory lacks the right id: the lost one and the inactive one.
    let mut conn = db.conn().await;
    #[derive(diesel::QueryableByName)]
    struct Queued {
        #[diesel(sql_type = SqlUuid)]
        ory_identity_id: Uuid,
    }
    let queued: HashSet<Uuid> = diesel::sql_query("SELECT ory_identity_id FROM ory_outbox")
        .load::<Queued>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.ory_identity_id)
        .collect();
    assert_eq!(queued, HashSet::from([lost, inactive]));
}

/// Collects the lines `idmap reconcile` would print.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl ReconcileObserver for Lines {
    fn drift(&self, drift: &Drift, repair: Option<&Result<(), Error>>) {
        self.0
            .lock()
            .unwrap()
            .push(idmap::cmd::jobs::drift_line(drift, repair));
    }
}

impl Lines {
    fn take(&self) -> Vec<String> {
        let mut lines = std::mem::take(&mut *self.0.lock().unwrap());
        lines.sort();
        lines
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_then_fixes_every_kind_of_drift() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let ids = seed(&ory, 40, "rec");
    let app = app(&db, &ory).await;
    let jobs = app.jobs();
    let never = CancellationToken::new();
    run_backfill(&jobs, &options(16)).await;
    deliver_outbox(&db, &ory).await;
    let report_only = ReconcileOptions {
        page_size: 16,
        fix: false,
        retry: quick_retry(),
    };
    let fix = ReconcileOptions {
        fix: true,
        ..report_only.clone()
    };

    // In step: nothing to report.
    let lines = Lines::default();
    let clean = jobs.reconcile(&report_only, &lines, &never).await.unwrap();
    assert_eq!(clean.drift_total(), 0, "{:?}", lines.take());
    assert_eq!((clean.identities, clean.users), (40, 40));

    let [deleted, inactive, missing, elsewhere, returned] =
        [ids[0], ids[1], ids[2], ids[3], ids[4]];
    assert!(ory.delete_identity(deleted));
    ory.set_identity_state(inactive, "inactive");
    ory.patch_identity(
        missing,
        &json!([{"op": "remove", "path": "/metadata_public/id"}]),
    )
    .unwrap();
    let stranger = Uuid::new_v4().to_string();
    set_metadata_id(&ory, elsewhere, &stranger);
    // Recorded deleted by an earlier run, but the identity is there (restored from a backup).
    db.run_sql(&format!(
        "UPDATE users SET state = 'deleted' WHERE ory_identity_id = '{returned}'"
    ))
    .await;
    // An identity nobody linked yet is counted, not repaired (backfill's job).
    identity(&ory, "customer", "unlinked@example.com");

    let user = |i: Uuid| {
        let db = &db;
        async move { db.user_of(i).await }
    };
    let expected = vec![
        format!(
            "deleted: user {} identity {deleted}: Ory has no such identity",
            user(deleted).await
        ),
        format!(
            "inactive: user {} identity {inactive}: user is active, identity is inactive",
            user(inactive).await
        ),
        format!(
            "metadata-elsewhere: user {} identity {elsewhere}: metadata_public.id is \"{stranger}\"",
            user(elsewhere).await
        ),
        format!(
            "metadata-missing: user {} identity {missing}: metadata_public.id is not set",
            user(missing).await
        ),
        format!(
            "reactivated: user {} identity {returned}: user is deleted, identity is active",
            user(returned).await
        ),
    ];

    // Report only: every drift once, nothing written.
    let report = jobs.reconcile(&report_only, &lines, &never).await.unwrap();
    assert_eq!(lines.take(), expected);
    assert_eq!(report.drift_total(), 5);
    assert_eq!(report.unlinked, 1);
    assert_eq!((report.fixed, report.failed), (0, 0));
    assert!(report.stopped.is_none());
    assert_eq!(db.user_state(deleted).await, "active");
    assert_eq!(db.user_state(returned).await, "deleted");
    assert_eq!(db.count("SELECT count(*) FROM ory_outbox").await, 0);
    let summary = idmap::cmd::jobs::reconcile_summary(&report);
    assert!(summary.contains("deleted:            1"), "{summary}");
    assert!(summary.contains("unlinked:           1"), "{summary}");

    // --fix: the same drifts, each repaired.
    let fixed = jobs.reconcile(&fix, &lines, &never).await.unwrap();
    let repaired: Vec<String> = expected.iter().map(|l| format!("{l} [fixed]")).collect();
    assert_eq!(lines.take(), repaired);
    assert_eq!((fixed.fixed, fixed.failed), (5, 0));
    assert_eq!(db.user_state(deleted).await, "deleted");
    assert_eq!(db.user_state(inactive).await, "inactive");
    assert_eq!(db.user_state(returned).await, "active");
    // Ory is not written inline: the metadata repairs wait in the outbox, naming the linked users.
    assert_eq!(
        ory.identity(elsewhere).unwrap()["metadata_public"]["id"],
        json!(stranger)
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM ory_outbox o JOIN users u ON u.id = o.user_id \
             AND u.ory_identity_id = o.ory_identity_id \
             WHERE o.ory_identity_id IN ('{missing}', '{elsewhere}')"
        ))
        .await,
        2
    );
    assert_eq!(db.count("SELECT count(*) FROM ory_outbox").await, 2);

    // Once the outbox has delivered, all is in step; the deleted user is not asked about again.
    deliver_outbox(&db, &ory).await;
    ory.reset_calls();
    let clean = jobs.reconcile(&report_only, &lines, &never).await.unwrap();
    assert_eq!(clean.drift_total(), 0, "{:?}", lines.take());
    assert_eq!(
        ory.calls(Route::AdminRead),
        3,
        "one call per page, nothing else"
    );

    // The deactivated identity is reactivated in Ory: its user follows.
    ory.set_identity_state(inactive, "active");
    let report = jobs.reconcile(&fix, &lines, &never).await.unwrap();
    assert_eq!(
        lines.take(),
        vec![format!(
            "reactivated: user {} identity {inactive}: user is inactive, identity is active [fixed]",
            user(inactive).await
        )]
    );
    assert_eq!(report.fixed, 1);
    assert_eq!(db.user_state(inactive).await, "active");

    // The RPCs return the state.
    let server = TestServer::start(config(&db, &ory)).await;
    let found = server
        .client
        .clone()
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: deleted.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found.state, "deleted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_metadata_that_is_not_an_object_as_unfixable() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let ids = seed(&ory, 6, "notobj");
    let app = app(&db, &ory).await;
    let jobs = app.jobs();
    let never = CancellationToken::new();
    run_backfill(&jobs, &options(10)).await;
    deliver_outbox(&db, &ory).await;
    // Someone stored a list where idmap keeps an object: adding `id` would destroy it.
    let odd = ids[2];
    ory.patch_identity(
        odd,
        &json!([{"op": "replace", "path": "/metadata_public", "value": ["legacy", 1]}]),
    )
    .unwrap();
    let expected = format!(
        "metadata-not-object: user {} identity {odd}: metadata_public is [\"legacy\",1], not an \
         object; idmap will not overwrite it (edit it in Ory, then reconcile again)",
        db.user_of(odd).await
    );
    let lines = Lines::default();
    let report_only = ReconcileOptions {
        page_size: 10,
        fix: false,
        retry: quick_retry(),
    };

    let report = jobs.reconcile(&report_only, &lines, &never).await.unwrap();
    assert_eq!(lines.take(), vec![expected.clone()]);
    assert_eq!(report.drifts_of(DriftKind::MetadataNotObject), 1);
    assert_eq!(report.drifts_of(DriftKind::MetadataMissing), 0);
    assert_eq!(report.unfixable, 1);

    // --fix leaves it alone: not counted fixed, nothing queued for the outbox to park.
    let fix = ReconcileOptions {
        fix: true,
        ..report_only
    };
    let report = jobs.reconcile(&fix, &lines, &never).await.unwrap();
    assert_eq!(lines.take(), vec![expected], "no [fixed] suffix");
    assert_eq!((report.fixed, report.unfixable, report.failed), (0, 1, 0));
    assert_eq!(db.count("SELECT count(*) FROM ory_outbox").await, 0);
    let summary = idmap::cmd::jobs::reconcile_summary(&report);
    assert!(summary.contains("metadata-not-object: 1"), "{summary}");
    assert!(summary.contains("fixed:              0"), "{summary}");
    assert!(summary.contains("not fixable:        1"), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_confirms_a_missing_identity_before_marking_it_deleted() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let ids = seed(&ory, 5, "confirm");
    let app = app(&db, &ory).await;
    let jobs = app.jobs();
    let never = CancellationToken::new();
    run_backfill(&jobs, &options(10)).await;
    deliver_outbox(&db, &ory).await;
    assert!(ory.delete_identity(ids[0]));

    // Ory cannot answer the confirming GET: the user is counted as failed, not marked deleted.
    let lines = Lines::default();
    let fix = ReconcileOptions {
        page_size: 10,
        fix: true,
        retry: quick_retry(),
    };
    ory.inject_fault(Route::AdminRead, Fault::delay_only(Duration::ZERO).times(1));
    ory.inject_fault(Route::AdminRead, Fault::status(502).times(3));
    let report = jobs.reconcile(&fix, &lines, &never).await.unwrap();
    assert_eq!((report.failed, report.drift_total()), (1, 0));
    assert_eq!(db.user_state(ids[0]).await, "active");

    // With Ory answering, the 404 is confirmed and recorded.
    let report = jobs.reconcile(&fix, &lines, &never).await.unwrap();
    assert_eq!((report.failed, report.fixed), (0, 1));
    assert_eq!(db.user_state(ids[0]).await, "deleted");
}

/// Reports like [`Lines`] and expires every page token once, after the first page, as an hour's
/// stall on that page (or a new Kratos pagination secret) would.
struct ExpireAfterFirstPage<'a> {
    lines: Lines,
    ory: &'a Emulator,
    expired: std::sync::atomic::AtomicBool,
}

impl ReconcileObserver for ExpireAfterFirstPage<'_> {
    fn drift(&self, drift: &Drift, repair: Option<&Result<(), Error>>) {
        self.lines.drift(drift, repair);
    }

    fn scanned(&self, _identities: u64) {
        if !self.expired.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.ory.expire_page_tokens();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_walks_again_from_the_first_page_when_ory_refuses_its_page_token() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let mut ids = seed(&ory, 30, "retoken");
    ids.sort();
    let app = app(&db, &ory).await;
    let jobs = app.jobs();
    let never = CancellationToken::new();
    run_backfill(&jobs, &options(10)).await;
    deliver_outbox(&db, &ory).await;
    // One drift on the first page (compared before the refusal), one on the last (after it).
    let (early, late) = (ids[0], ids[29]);
    for id in [early, late] {
        ory.patch_identity(
            id,
            &json!([{"op": "remove", "path": "/metadata_public/id"}]),
        )
        .unwrap();
    }
    let observer = ExpireAfterFirstPage {
        lines: Lines::default(),
        ory: &ory,
        expired: false.into(),
    };
    let options = ReconcileOptions {
        page_size: 10,
        fix: false,
        retry: quick_retry(),
    };
    ory.reset_calls();
    let report = jobs.reconcile(&options, &observer, &never).await.unwrap();
    assert!(report.stopped.is_none(), "{:?}", report.stopped);
    // Page 1, the refused page 2, then pages 1 to 3 again; no identity needed a confirming GET.
    assert_eq!(ory.calls(Route::AdminRead), 5);
    // Each identity compared and each drift reported once, across both walks.
    assert_eq!((report.identities, report.users), (30, 30));
    assert_eq!(report.drifts_of(DriftKind::MetadataMissing), 2);
    let mut expected = vec![
        format!(
            "metadata-missing: user {} identity {early}: metadata_public.id is not set",
            db.user_of(early).await
        ),
        format!(
            "metadata-missing: user {} identity {late}: metadata_public.id is not set",
            db.user_of(late).await
        ),
    ];
    expected.sort();
    assert_eq!(observer.lines.take(), expected);

    // A Kratos that refuses the token again after the walk from the first page stops the run.
    ory.inject_fault(Route::AdminRead, Fault::delay_only(Duration::ZERO).times(1));
    ory.inject_fault(Route::AdminRead, Fault::status(400).times(1));
    ory.inject_fault(Route::AdminRead, Fault::delay_only(Duration::ZERO).times(1));
    ory.inject_fault(Route::AdminRead, Fault::status(400).times(1));
    let lines = Lines::default();
    let stuck = jobs.reconcile(&options, &lines, &never).await.unwrap();
    assert!(
        matches!(&stuck.stopped, Some(Stopped::Failed(why)) if why.contains("refused the page token again")),
        "{:?}",
        stuck.stopped
    );
}

mod binary {
    use std::process::{Command, Stdio};

    use secrecy::ExposeSecret;

    use super::*;

    fn idmap(args: &[&str], db: &TestDb, ory: &Emulator) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idmap"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", db.url().expose_secret())
            .env("ORY_PUBLIC_URL", ory.url())
            .env("IDMAP_ORY_ADMIN_RPS", "0")
            .stdin(Stdio::null());
        cmd
    }

    async fn run(mut cmd: Command) -> (i32, String, String) {
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("run idmap"))
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idmap_backfill_and_reconcile_print_a_summary_and_exit_accordingly() {
        let db = TestDb::new().await;
        let ory = emulator().await;
        seed(&ory, 30, "bin");

        let (code, stdout, stderr) = run(idmap(&["backfill", "--page-size", "7"], &db, &ory)).await;
        assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
        for line in [
            "scanned:         30",
            "created:         30",
            "already linked:  0",
            "failed:          0",
            "status:          complete",
        ] {
            assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
        }
        // Not a terminal: no progress bar drawn into the output.
        assert!(!stdout.contains("identities ("), "{stdout}");
        assert_eq!(db.count("SELECT count(*) FROM users").await, 30);

        // Nothing delivered the queued writes (no `idmap serve` runs): reconcile reports 30 drifts
        // and exits 2.
        let (code, stdout, _) = run(idmap(&["reconcile"], &db, &ory)).await;
        assert_eq!(code, 2, "{stdout}");
        assert_eq!(stdout.matches("metadata-missing: user ").count(), 30);
        assert!(stdout.contains("metadata-missing:   30"), "{stdout}");

        // --fix queues the 29 writes it can; the identity whose metadata_public is not an object
        // is left to an operator, so drift remains: exit 2.
        let odd = db.links().await[0].0;
        ory.patch_identity(
            odd,
            &json!([{"op": "replace", "path": "/metadata_public", "value": "legacy"}]),
        )
        .unwrap();
        let (code, stdout, _) = run(idmap(&["reconcile", "--fix"], &db, &ory)).await;
        assert_eq!(code, 2, "{stdout}");
        assert!(stdout.contains("metadata-missing:   29"), "{stdout}");
        assert!(stdout.contains("metadata-not-object: 1"), "{stdout}");
        assert!(stdout.contains("fixed:              29"), "{stdout}");
        assert!(stdout.contains("not fixable:        1"), "{stdout}");

        // Ory refuses the credentials: the walk stops at once, the summary says so, exit 1.
        let guarded = Emulator::start(
            "127.0.0.1:0".parse().unwrap(),
            EmulatorConfig {
                api_key: Some("ory_pat_right".into()),
                ..EmulatorConfig::default()
            },
        )
        .await
        .unwrap();
        let mut cmd = idmap(&["backfill", "--restart"], &db, &guarded);
        cmd.env("ORY_API_KEY", "ory_pat_wrong");
        let (code, stdout, stderr) = run(cmd).await;
        assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.contains("status:          stopped"), "{stdout}");
        assert!(stderr.contains("ORY_API_KEY"), "{stderr}");
        assert!(
            !stderr.contains("ory_pat_wrong"),
            "the key leaked: {stderr}"
        );
    }
}

/// An idmap app like [`app`], keeping namespace `crm` in step with Ory's `external_id`.
async fn mirroring_app(db: &TestDb, ory: &Emulator) -> idmap::App {
    let mut config = config(db, ory);
    config.ory.admin_rps = std::num::NonZeroU32::new(10);
    let crm = idmap::domain::Namespace::parse("namespace", "crm").unwrap();
    config.service.ory_external_id_namespace = Some(crm.clone());
    config.outbox.external_id_namespace = Some(crm);
    idmap::App::build(config).await.expect("build the app")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_adopts_ory_external_ids_and_reconcile_repairs_their_drift() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    // The migration recipe: identities imported into Ory with their external_id, then a backfill.
    let imported: Vec<Uuid> = (0..6)
        .map(|i| {
            id_of(&ory.create_identity(NewIdentity {
                schema_id: "customer".into(),
                traits: json!({ "email": format!("import-{i}@example.com") }),
                identifiers: vec![format!("import-{i}@example.com")],
                external_id: Some(format!("legacy-{i}")),
                ..NewIdentity::default()
            }))
        })
        .collect();
    let app = mirroring_app(&db, &ory).await;
    let jobs = app.jobs();
    let never = CancellationToken::new();
    run_backfill(&jobs, &options(4)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM user_external_ids WHERE namespace = 'crm' AND external_id LIKE 'legacy-%'")
            .await,
        6
    );
    assert_eq!(
        db.count("SELECT count(*) FROM ory_outbox WHERE kind = 'sync_external_id'")
            .await,
        0,
        "Ory holds the adopted values"
    );
    deliver_outbox(&db, &ory).await;
    let report_only = ReconcileOptions {
        page_size: 4,
        fix: false,
        retry: quick_retry(),
    };
    let fix = ReconcileOptions {
        fix: true,
        ..report_only.clone()
    };
    let lines = Lines::default();
    let clean = jobs.reconcile(&report_only, &lines, &never).await.unwrap();
    assert_eq!(clean.drift_total(), 0, "{:?}", lines.take());

    // Drift: Ory lost one value, holds another than idmap for a second, and gained one for a
    // third whose user held none in idmap.
    let [missing, mismatch, gained] = [imported[0], imported[1], imported[2]];
    let clear = |identity: Uuid, value: &str| {
        ory.patch_identity(
            identity,
            &json!([{"op": "replace", "path": "/external_id", "value": value}]),
        )
        .unwrap();
    };
    clear(missing, "");
    clear(mismatch, "changed-in-ory");
    db.run_sql(&format!(
        "DELETE FROM user_external_ids WHERE user_id = '{}'",
        db.user_of(gained).await
    ))
    .await;
    let expected = vec![
        format!(
            "external-id-mismatch: user {} identity {gained}: holds nothing in namespace crm, Ory's external_id is \"legacy-2\"",
            db.user_of(gained).await
        ),
        format!(
            "external-id-mismatch: user {} identity {mismatch}: holds \"legacy-1\" in namespace crm, Ory's external_id is \"changed-in-ory\"",
            db.user_of(mismatch).await
        ),
        format!(
            "external-id-missing: user {} identity {missing}: holds \"legacy-0\" in namespace crm, Ory's external_id is not set",
            db.user_of(missing).await
        ),
    ];
    let mut expected = expected;
    expected.sort();
    let report = jobs.reconcile(&report_only, &lines, &never).await.unwrap();
    assert_eq!(lines.take(), expected);
    assert_eq!(report.drifts_of(DriftKind::ExternalIdMissing), 1);
    assert_eq!(report.drifts_of(DriftKind::ExternalIdMismatch), 2);
    assert_eq!(db.count("SELECT count(*) FROM ory_outbox").await, 0);
    let summary = idmap::cmd::jobs::reconcile_summary(&report);
    assert!(summary.contains("external-id-missing"), "{summary}");

    // --fix: idmap's values are queued for Ory; Ory's value is adopted where idmap held none.
    let fixed = jobs.reconcile(&fix, &lines, &never).await.unwrap();
    let repaired: Vec<String> = expected.iter().map(|l| format!("{l} [fixed]")).collect();
    assert_eq!(lines.take(), repaired);
    assert_eq!((fixed.fixed, fixed.failed), (3, 0));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM ory_outbox WHERE kind = 'sync_external_id' \
             AND ory_identity_id IN ('{missing}', '{mismatch}', '{gained}')"
        ))
        .await,
        3
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM user_external_ids WHERE namespace = 'crm' \
             AND external_id = 'legacy-2' AND user_id = '{}'",
            db.user_of(gained).await
        ))
        .await,
        1
    );
}
