//! Backfill: brings identities that registered before idmap (or while its hooks were off) in. It
//! walks every identity with Ory's admin list API and links each one through the same path as
//! LinkIdentity and the registration hook (`link_seen_identity`), so claiming pending users,
//! adopting an id already in `metadata_public.id`, queueing the `metadata_public.id` write and
//! evicting caches happen in one place. After each page the run saves Ory's next page token in
//! `backfill_runs`, so a run that stops resumes there, and marks the page's identities as counted,
//! so pages done twice (after a crash mid-page, or a walk again from the first page when Ory
//! refuses the saved token) are counted once.

use std::collections::HashMap;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Jobs;
use super::walk::{PageRead, RetryPolicy, Stopped, WalkAgain, describe, is_outage};
use crate::domain::{Identity, IdentityId, LinkRequest, User, UserId, UserState};
use crate::error::Error;
use crate::store::{BackfillCounts, RunProgress};

/// The page size used unless the operator picks another (Ory's default).
pub const DEFAULT_PAGE_SIZE: u32 = 250;

/// How a backfill runs.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Identities per `GET /admin/identities` page (1 to 500).
    pub page_size: u32,
    /// Report what would happen; write nothing (no users, no outbox rows, no run record).
    pub dry_run: bool,
    /// Start over from the first page instead of resuming an unfinished run.
    pub restart: bool,
    /// Identities of a page linked at once. Each link is one short transaction.
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        Self {
            page_size: DEFAULT_PAGE_SIZE,
            dry_run: false,
            restart: false,
            concurrency: 8,
            retry: RetryPolicy::default(),
        }
    }
}

/// What a backfill did.
#[derive(Debug, Clone)]
pub struct BackfillReport {
    /// Counts over the whole run, pages done before a resume included.
    pub counts: BackfillCounts,
    /// When the run resumed here, when it had started.
    pub resumed_from: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the walk ended early; `None`: it read the last page.
    pub stopped: Option<Stopped>,
    pub dry_run: bool,
}

impl BackfillReport {
    /// Whether everything was brought in: the walk finished and nothing failed.
    pub fn is_success(&self) -> bool {
        self.stopped.is_none() && self.counts.failed == 0
    }
}

/// Told about progress after each page.
pub trait BackfillObserver: Sync {
    /// `counts` covers the whole run so far.
    fn page_done(&self, counts: &BackfillCounts);
}

impl<F: Fn(&BackfillCounts) + Sync> BackfillObserver for F {
    fn page_done(&self, counts: &BackfillCounts) {
        self(counts)
    }
}

/// What backfill does with one identity, decided from Ory's view and idmap's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Linked, and `metadata_public.id` already names the user: nothing to do, nothing queued.
    AlreadyLinked,
    /// No user yet: link one (adopting `metadata_public.id` when it names a usable id).
    Create,
    /// Linked, but `metadata_public.id` is missing or not a user id: queue the write.
    QueueMetadata,
    /// Linked to another user than `metadata_public.id` names. Which one is right is
    /// reconciliation's call (`idmap reconcile --fix` keeps the link and rewrites Ory).
    Drift { linked: UserId },
    /// Linked, but `metadata_public` is neither an object nor null, so writing `id` into it would
    /// destroy it: a write queued would only be parked. An operator must edit it in Ory
    /// (`idmap reconcile` reports it as `metadata-not-object`).
    NotAnObject { linked: UserId },
}

fn plan(identity: &Identity, user: Option<&User>) -> Step {
    let Some(user) = user else {
        return Step::Create;
    };
    if !(identity.metadata_public.is_object() || identity.metadata_public.is_null()) {
        return Step::NotAnObject { linked: user.id };
    }
    match identity
        .metadata_user_id()
        .map(|id| UserId::parse("metadata_public.id", id))
    {
        Some(Ok(recorded)) if recorded == user.id => Step::AlreadyLinked,
        Some(Ok(_)) => Step::Drift { linked: user.id },
        Some(Err(_)) | None => Step::QueueMetadata,
    }
}

/// The counts of one step's result.
fn count(step: &Step) -> BackfillCounts {
    let mut counts = BackfillCounts {
        scanned: 1,
        ..BackfillCounts::default()
    };
    match step {
        Step::AlreadyLinked => counts.already_linked = 1,
        Step::Create => counts.created = 1,
        Step::QueueMetadata => counts.queued = 1,
        Step::Drift { .. } | Step::NotAnObject { .. } => counts.drifted = 1,
    }
    counts
}

impl Jobs {
    /// Walks every Ory identity and links the ones without a user. Per-identity failures are
    /// counted and logged; an outage that outlasts the retries, or `cancel`, stops the walk with the
    /// cursor at the first unfinished page. `Err` only when the run cannot start.
    pub async fn backfill(
        &self,
        options: &BackfillOptions,
        observer: &dyn BackfillObserver,
        cancel: &CancellationToken,
    ) -> Result<BackfillReport, Error> {
        let run = if options.dry_run {
            None
        } else {
            Some(self.store.begin_backfill_run(options.restart).await?)
        };
        let mut report = BackfillReport {
            counts: run.as_ref().map(|r| r.counts).unwrap_or_default(),
            resumed_from: run
                .as_ref()
                .filter(|r| r.counts.pages > 0)
                .map(|r| r.started_at),
            stopped: None,
            dry_run: options.dry_run,
        };
        let mut cursor = run.as_ref().and_then(|r| r.cursor.clone());
        let mut walk_again = WalkAgain::default();
        if let Some(run) = &run {
            tracing::info!(run = run.id, resumed = report.resumed_from.is_some(), cursor = ?cursor, "backfill started");
        }
        loop {
            if cancel.is_cancelled() {
                report.stopped = Some(Stopped::Interrupted);
                break;
            }
            let page = match self
                .identity_page(options.page_size, cursor.as_deref(), &options.retry, cancel)
                .await
            {
                Ok(PageRead::Page(page)) => page,
                // Current Kratos's page tokens expire after an hour, so a run resumed later than
                // that (or after Ory changed its pagination secret) cannot go on where it stopped.
                // Walking again from the first page is safe and honest: linking is idempotent, and
                // identities the run already counted are skipped.
                Ok(PageRead::TokenRefused(reason)) => {
                    match walk_again.after_refusal(&reason, "the run's counts") {
                        Ok(()) => {
                            cursor = None;
                            continue;
                        }
                        Err(stopped) => {
                            report.stopped = Some(stopped);
                            break;
                        }
                    }
                }
                Err(stopped) => {
                    report.stopped = Some(stopped);
                    break;
                }
            };
            let run_id = run.as_ref().map(|r| r.id);
            let (page_counts, counted) =
                match self.backfill_page(&page.identities, run_id, options).await {
                    Ok((mut counts, counted)) => {
                        for rejected in &page.rejected {
                            tracing::warn!(%rejected, "cannot read an identity Ory listed");
                        }
                        counts.scanned += page.rejected.len() as i64;
                        counts.failed += page.rejected.len() as i64;
                        counts.pages = 1;
                        (counts, counted)
                    }
                    Err(e) => {
                        // The page is done again on resume; linking is idempotent, and the users this
                        // run created before stopping are marked as its own, so they still count as
                        // created then.
                        report.stopped = Some(Stopped::Failed(describe(&e)));
                        break;
                    }
                };
            let last = page.next_page_token.is_none();
            if let Some(run) = &run
                && let Err(e) = self
                    .store
                    .advance_backfill_run(
                        run.id,
                        page.next_page_token.as_deref(),
                        page_counts,
                        &counted,
                        last,
                    )
                    .await
            {
                report.stopped = Some(Stopped::Failed(describe(&e.into())));
                break;
            }
            report.counts += page_counts;
            observer.page_done(&report.counts);
            match page.next_page_token {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        tracing::info!(counts = ?report.counts, stopped = ?report.stopped, dry_run = options.dry_run, "backfill ended");
        Ok(report)
    }

    /// Handles one page: its counts, and the identities they cover. `Err` when a dependency is
    /// down: the page must be done again.
    async fn backfill_page(
        &self,
        identities: &[Identity],
        run: Option<i64>,
        options: &BackfillOptions,
    ) -> Result<(BackfillCounts, Vec<IdentityId>), Error> {
        let ids: Vec<IdentityId> = identities.iter().map(|i| i.id).collect();
        let progress: HashMap<IdentityId, RunProgress> = match run {
            Some(run) => self.store.backfill_progress(run, &ids).await?,
            None => HashMap::new(),
        };
        let users: HashMap<IdentityId, User> = self
            .store
            .users_by_identities(&ids)
            .await?
            .into_iter()
            .map(|u| (u.ory_identity_id, u))
            .collect();
        // Identities this run counted on an earlier page are in its counts already (the walk
        // started again from the first page) and were dealt with then.
        let todo: Vec<&Identity> = identities
            .iter()
            .filter(|i| !progress.get(&i.id).is_some_and(|p| p.counted))
            .collect();
        let results: Vec<Result<BackfillCounts, Error>> =
            futures_util::stream::iter(todo.iter().map(|identity| {
                let step = plan(identity, users.get(&identity.id));
                let created_by_run = progress.get(&identity.id).is_some_and(|p| p.created);
                async move {
                    let counts = if options.dry_run {
                        count(&step)
                    } else {
                        self.backfill_identity(identity, step, run).await?
                    };
                    // This run created the user before it stopped mid-page: the page done again
                    // finds the user linked, but the run's counts do not hold it yet.
                    Ok(if created_by_run {
                        count(&Step::Create)
                    } else {
                        counts
                    })
                }
            }))
            .buffer_unordered(options.concurrency.max(1))
            .collect()
            .await;
        let mut counts = BackfillCounts::default();
        let mut outage = None;
        for result in results {
            match result {
                Ok(c) => counts += c,
                Err(e) if is_outage(&e) => outage = Some(e),
                Err(_) => {
                    counts.scanned += 1;
                    counts.failed += 1;
                }
            }
        }
        match outage {
            Some(e) => Err(e),
            None => Ok((counts, todo.iter().map(|i| i.id).collect())),
        }
    }

    async fn backfill_identity(
        &self,
        identity: &Identity,
        step: Step,
        run: Option<i64>,
    ) -> Result<BackfillCounts, Error> {
        let result = match &step {
            Step::AlreadyLinked => return Ok(count(&step)),
            Step::Drift { linked } => {
                tracing::warn!(
                    identity = %identity.id,
                    user = %linked,
                    metadata_public_id = identity.metadata_user_id().unwrap_or_default(),
                    "identity is linked to another user than its metadata_public.id names; left for `idmap reconcile`"
                );
                return Ok(count(&step));
            }
            Step::NotAnObject { linked } => {
                tracing::warn!(
                    identity = %identity.id,
                    user = %linked,
                    "identity's metadata_public is not an object, so idmap cannot add its id; left for an operator (see `idmap reconcile`)"
                );
                return Ok(count(&step));
            }
            Step::Create | Step::QueueMetadata => {
                let request = LinkRequest {
                    ory_identity_id: identity.id,
                    user_id: None,
                    external_ids: Vec::new(),
                };
                self.mapper
                    .link_seen_identity_in_run(request, identity, run)
                    .await
                    .map_err(Error::from)
            }
        };
        match result {
            Ok(outcome) => {
                if outcome.created {
                    Ok(count(&Step::Create))
                } else if step == Step::Create {
                    // A concurrent link (a hook, a ResolveSession) got there first.
                    Ok(count(&Step::AlreadyLinked))
                } else {
                    Ok(count(&step))
                }
            }
            Err(e) => {
                if !is_outage(&e) {
                    tracing::warn!(identity = %identity.id, error = %describe(&e), "cannot backfill an identity");
                }
                Err(e)
            }
        }
    }

    /// Sets a user's state and evicts it everywhere when that changed it.
    pub(crate) async fn record_state(&self, user: UserId, state: UserState) -> Result<(), Error> {
        if let Some((user, true)) = self.store.set_user_state(user, state).await? {
            tracing::info!(user = %user.id, identity = %user.ory_identity_id, state = %state, "user state recorded");
            self.mapper.user_written(&user).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity(metadata: serde_json::Value) -> Identity {
        Identity {
            id: IdentityId::from_uuid(uuid::Uuid::new_v4()),
            schema_id: "customer".into(),
            state: "active".into(),
            external_id: None,
            traits: json!({}),
            metadata_public: metadata,
            created_at: None,
            updated_at: None,
        }
    }

    fn user(identity: &Identity) -> User {
        User {
            id: UserId::mint(),
            ory_identity_id: identity.id,
            external_ids: Vec::new(),
            schema_id: "customer".into(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            state: UserState::Active,
        }
    }

    #[test]
    fn each_identity_gets_the_step_its_state_needs() {
        let unlinked = identity(json!(null));
        assert_eq!(plan(&unlinked, None), Step::Create);

        let missing = identity(json!({"theme": "dark"}));
        assert_eq!(plan(&missing, Some(&user(&missing))), Step::QueueMetadata);

        let garbage = identity(json!({"id": "not-a-uuid"}));
        assert_eq!(plan(&garbage, Some(&user(&garbage))), Step::QueueMetadata);

        let mut correct = identity(json!(null));
        let u = user(&correct);
        correct.metadata_public = json!({"id": u.id.to_string()});
        assert_eq!(plan(&correct, Some(&u)), Step::AlreadyLinked);

        let elsewhere = identity(json!({"id": UserId::mint().to_string()}));
        let u = user(&elsewhere);
        assert_eq!(plan(&elsewhere, Some(&u)), Step::Drift { linked: u.id });

        for odd in [json!(["legacy"]), json!("id"), json!(7)] {
            let odd = identity(odd);
            let u = user(&odd);
            assert_eq!(plan(&odd, Some(&u)), Step::NotAnObject { linked: u.id });
            assert_eq!(count(&plan(&odd, Some(&u))).drifted, 1);
        }
        // Not linked yet: the user is created whatever the metadata holds.
        assert_eq!(plan(&identity(json!(["legacy"])), None), Step::Create);
    }
}
