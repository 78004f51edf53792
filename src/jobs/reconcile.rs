//! Reconciliation: finds where idmap and Ory disagree and, when asked, repairs idmap's side and
//! queues Ory's. Ory sends no webhook when an identity is deleted or deactivated, and
//! `metadata_public.id` can be edited or lost, so this is the only way such drift is found.
//!
//! It walks every identity (list API), comparing each with its user: the user's state against the
//! identity's, and `metadata_public.id` against the user id. Then it walks the users: one whose
//! identity the walk did not see is confirmed with `GET /admin/identities/{id}` before it is marked
//! deleted, since the identity may have been created after the walk passed its place.
//!
//! Repairs never call Ory inline: a user's state is idmap's own record, and `metadata_public.id`
//! writes go through the outbox like every other Ory write.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Jobs;
use super::walk::{PageRead, RetryPolicy, Stopped, WalkAgain, describe, is_outage, with_retry};
use crate::domain::{
    ExternalId, Identity, IdentityId, Namespace, Subject, User, UserId, UserState,
};
use crate::error::Error;
use crate::ory::OryError;

/// Users read per query in the walk over users.
const USER_PAGE: i64 = 500;

/// How a reconciliation runs.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Identities per `GET /admin/identities` page (1 to 500).
    pub page_size: u32,
    /// Repair what is found; without it nothing is written.
    pub fix: bool,
    pub retry: RetryPolicy,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        Self {
            page_size: super::backfill::DEFAULT_PAGE_SIZE,
            fix: false,
            retry: RetryPolicy::default(),
        }
    }
}

/// One disagreement between idmap and Ory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// Ory no longer has the user's identity (404).
    Deleted { user: UserId, identity: IdentityId },
    /// The identity's state in Ory is not the user's: deactivated, reactivated, or back after
    /// having been reported deleted.
    State {
        user: UserId,
        identity: IdentityId,
        recorded: UserState,
        actual: UserState,
    },
    /// `metadata_public.id` is missing (or not a string).
    MetadataMissing { user: UserId, identity: IdentityId },
    /// `metadata_public` is neither an object nor null, so it has no room for `id`. Not
    /// repairable by idmap: writing the id would destroy what is there (the outbox parks such
    /// writes), so an operator must decide.
    MetadataNotObject {
        user: UserId,
        identity: IdentityId,
        /// What `metadata_public` holds, as JSON.
        found: String,
    },
    /// `metadata_public.id` holds something other than the linked user's id.
    MetadataElsewhere {
        user: UserId,
        identity: IdentityId,
        found: String,
    },
    /// The user holds a value in the namespace mirrored to Ory, and the identity's `external_id`
    /// is not set.
    ExternalIdMissing {
        user: UserId,
        identity: IdentityId,
        namespace: Namespace,
        value: ExternalId,
    },
    /// The identity's `external_id` is not the user's value in the mirrored namespace (`ours` is
    /// `None` when the user holds none there).
    ExternalIdMismatch {
        user: UserId,
        identity: IdentityId,
        namespace: Namespace,
        ours: Option<ExternalId>,
        ory: String,
    },
}

/// The kinds of drift, in the order the summary lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DriftKind {
    Deleted,
    Inactive,
    Reactivated,
    MetadataMissing,
    MetadataNotObject,
    MetadataElsewhere,
    ExternalIdMissing,
    ExternalIdMismatch,
}

impl DriftKind {
    /// Every kind, in the summary's order.
    pub const ALL: [Self; 8] = [
        Self::Deleted,
        Self::Inactive,
        Self::Reactivated,
        Self::MetadataMissing,
        Self::MetadataNotObject,
        Self::MetadataElsewhere,
        Self::ExternalIdMissing,
        Self::ExternalIdMismatch,
    ];

    /// The stable name the report lines and the summary use (README "Backfill and reconciliation").
    pub fn name(self) -> &'static str {
        match self {
            Self::Deleted => "deleted",
            Self::Inactive => "inactive",
            Self::Reactivated => "reactivated",
            Self::MetadataMissing => "metadata-missing",
            Self::MetadataNotObject => "metadata-not-object",
            Self::MetadataElsewhere => "metadata-elsewhere",
            Self::ExternalIdMissing => "external-id-missing",
            Self::ExternalIdMismatch => "external-id-mismatch",
        }
    }
}

impl std::fmt::Display for DriftKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Drift {
    pub fn kind(&self) -> DriftKind {
        match self {
            Self::Deleted { .. } => DriftKind::Deleted,
            Self::State {
                actual: UserState::Active,
                ..
            } => DriftKind::Reactivated,
            Self::State { .. } => DriftKind::Inactive,
            Self::MetadataMissing { .. } => DriftKind::MetadataMissing,
            Self::MetadataNotObject { .. } => DriftKind::MetadataNotObject,
            Self::MetadataElsewhere { .. } => DriftKind::MetadataElsewhere,
            Self::ExternalIdMissing { .. } => DriftKind::ExternalIdMissing,
            Self::ExternalIdMismatch { .. } => DriftKind::ExternalIdMismatch,
        }
    }

    /// Whether `--fix` can repair it.
    pub fn fixable(&self) -> bool {
        !matches!(self, Self::MetadataNotObject { .. })
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind();
        match self {
            Self::Deleted { user, identity } => write!(
                f,
                "{kind}: user {user} identity {identity}: Ory has no such identity"
            ),
            Self::State {
                user,
                identity,
                recorded,
                actual,
            } => write!(
                f,
                "{kind}: user {user} identity {identity}: user is {recorded}, identity is {actual}"
            ),
            Self::MetadataMissing { user, identity } => write!(
                f,
                "{kind}: user {user} identity {identity}: metadata_public.id is not set"
            ),
            Self::MetadataNotObject {
                user,
                identity,
                found,
            } => write!(
                f,
                "{kind}: user {user} identity {identity}: metadata_public is {found}, not an object; \
                 idmap will not overwrite it (edit it in Ory, then reconcile again)"
            ),
            Self::MetadataElsewhere {
                user,
                identity,
                found,
            } => write!(
                f,
                "{kind}: user {user} identity {identity}: metadata_public.id is {found:?}"
            ),
            Self::ExternalIdMissing {
                user,
                identity,
                namespace,
                value,
            } => write!(
                f,
                "{kind}: user {user} identity {identity}: holds {:?} in namespace {namespace}, Ory's external_id is not set",
                value.as_str()
            ),
            Self::ExternalIdMismatch {
                user,
                identity,
                namespace,
                ours: Some(ours),
                ory,
            } => write!(
                f,
                "{kind}: user {user} identity {identity}: holds {:?} in namespace {namespace}, Ory's external_id is {:?}",
                ours.as_str(),
                abbreviate(ory.clone())
            ),
            Self::ExternalIdMismatch {
                user,
                identity,
                namespace,
                ours: None,
                ory,
            } => write!(
                f,
                "{kind}: user {user} identity {identity}: holds nothing in namespace {namespace}, Ory's external_id is {:?}",
                abbreviate(ory.clone())
            ),
        }
    }
}

/// Longest piece of an identity's JSON a report line quotes.
const QUOTE_CHARS: usize = 60;

/// `text`, cut to [`QUOTE_CHARS`] characters (marked with `...`), so a large `metadata_public`
/// does not flood the report.
fn abbreviate(text: String) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

/// Told about each drift as it is found (and repaired), and about progress.
pub trait ReconcileObserver: Sync {
    /// `repair` is `None` without `--fix`, else how the repair went.
    fn drift(&self, drift: &Drift, repair: Option<&Result<(), Error>>);
    /// Identities read so far.
    fn scanned(&self, _identities: u64) {}
}

/// What a reconciliation was asked to do, and who hears about it.
struct Walk<'a> {
    options: &'a ReconcileOptions,
    observer: &'a dyn ReconcileObserver,
    cancel: &'a CancellationToken,
}

/// What a reconciliation found.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    /// Identities read from Ory.
    pub identities: u64,
    /// Users compared with their identity.
    pub users: u64,
    /// Identities without a user (`idmap backfill` links them).
    pub unlinked: u64,
    /// Drifts found, by [`Drift::kind`].
    pub drifts: HashMap<DriftKind, u64>,
    /// Drifts repaired (`--fix`).
    pub fixed: u64,
    /// Drifts `--fix` cannot repair ([`Drift::fixable`]); they need an operator.
    pub unfixable: u64,
    /// Identities or users that could not be checked or repaired.
    pub failed: u64,
    /// Why the walk ended early; `None`: everything was checked.
    pub stopped: Option<Stopped>,
    pub fix: bool,
}

impl ReconcileReport {
    pub fn drift_total(&self) -> u64 {
        self.drifts.values().sum()
    }

    /// Drifts found of `kind`.
    pub fn drifts_of(&self, kind: DriftKind) -> u64 {
        self.drifts.get(&kind).copied().unwrap_or(0)
    }
}

impl Jobs {
    /// Compares every identity with its user and every user with its identity; reports each
    /// drift to `observer` and, with `fix`, repairs it. `Err` only when it cannot start.
    pub async fn reconcile(
        &self,
        options: &ReconcileOptions,
        observer: &dyn ReconcileObserver,
        cancel: &CancellationToken,
    ) -> Result<ReconcileReport, Error> {
        let mut report = ReconcileReport {
            fix: options.fix,
            ..ReconcileReport::default()
        };
        let mut seen: HashSet<IdentityId> = HashSet::new();
        let walk = Walk {
            options,
            observer,
            cancel,
        };
        let walked = match self.compare_identities(&walk, &mut report, &mut seen).await {
            Ok(()) => self.compare_unseen_users(&walk, &mut report, &seen).await,
            Err(stopped) => Err(stopped),
        };
        report.stopped = walked.err();
        tracing::info!(?report, "reconciliation ended");
        Ok(report)
    }

    /// Walks every identity Ory has and compares it with its user; `seen` gets every identity
    /// compared.
    async fn compare_identities(
        &self,
        walk: &Walk<'_>,
        report: &mut ReconcileReport,
        seen: &mut HashSet<IdentityId>,
    ) -> Result<(), Stopped> {
        let mut cursor: Option<String> = None;
        let mut walk_again = WalkAgain::default();
        let mut unreadable: HashSet<String> = HashSet::new();
        loop {
            if walk.cancel.is_cancelled() {
                return Err(Stopped::Interrupted);
            }
            let page = match self
                .identity_page(
                    walk.options.page_size,
                    cursor.as_deref(),
                    &walk.options.retry,
                    walk.cancel,
                )
                .await?
            {
                PageRead::Page(page) => page,
                // A page stalled for an hour, or the pagination secret changed: walk again from
                // the first page, passing over what was compared already.
                PageRead::TokenRefused(reason) => {
                    walk_again.after_refusal(&reason, "skipping identities already compared")?;
                    cursor = None;
                    continue;
                }
            };
            for rejected in page.rejected {
                // A walk again from the first page meets the same unreadable entries.
                if unreadable.insert(rejected.clone()) {
                    tracing::warn!(%rejected, "cannot read an identity Ory listed");
                    report.failed += 1;
                }
            }
            let ids: Vec<IdentityId> = page
                .identities
                .iter()
                .map(|i| i.id)
                .filter(|id| !seen.contains(id))
                .collect();
            let users: HashMap<IdentityId, User> = self
                .store
                .users_by_identities(&ids)
                .await
                .map_err(|e| Stopped::Failed(describe(&e.into())))?
                .into_iter()
                .map(|u| (u.ory_identity_id, u))
                .collect();
            for identity in &page.identities {
                if !seen.insert(identity.id) {
                    continue;
                }
                report.identities += 1;
                match users.get(&identity.id) {
                    Some(user) => self
                        .reconcile_pair(user, identity, walk.options, walk.observer, report)
                        .await
                        .map_err(|e| Stopped::Failed(describe(&e)))?,
                    None => report.unlinked += 1,
                }
            }
            walk.observer.scanned(report.identities);
            match page.next_page_token {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// Checks every user whose identity the walk did not see. Users already recorded deleted are
    /// skipped: an identity coming back shows up in a later walk, which reactivates the user.
    async fn compare_unseen_users(
        &self,
        walk: &Walk<'_>,
        report: &mut ReconcileReport,
        seen: &HashSet<IdentityId>,
    ) -> Result<(), Stopped> {
        let mut after = None;
        loop {
            if walk.cancel.is_cancelled() {
                return Err(Stopped::Interrupted);
            }
            let users = self
                .store
                .users_after_identity(after, USER_PAGE)
                .await
                .map_err(|e| Stopped::Failed(describe(&e.into())))?;
            let Some(last) = users.last() else {
                return Ok(());
            };
            after = Some(last.ory_identity_id);
            for user in users
                .iter()
                .filter(|u| u.state != UserState::Deleted && !seen.contains(&u.ory_identity_id))
            {
                self.compare_unseen_user(walk, report, user).await?;
            }
        }
    }

    /// Asks Ory for one user's identity, which the walk did not see, and compares the two.
    async fn compare_unseen_user(
        &self,
        walk: &Walk<'_>,
        report: &mut ReconcileReport,
        user: &User,
    ) -> Result<(), Stopped> {
        let identity = user.ory_identity_id;
        let found = with_retry(
            &walk.options.retry,
            walk.cancel,
            "reading an Ory identity",
            || async {
                match self.ory.get_identity(identity).await {
                    Ok(identity) => Ok(Some(identity)),
                    Err(OryError::NotFound) => Ok(None),
                    Err(e) => Err(e),
                }
            },
        )
        .await;
        let outcome = match found {
            // Created (or linked) after the walk passed its place: compare it now.
            Ok(Some(identity)) => {
                self.reconcile_pair(user, &identity, walk.options, walk.observer, report)
                    .await
            }
            Ok(None) => {
                report.users += 1;
                let drift = Drift::Deleted {
                    user: user.id,
                    identity,
                };
                self.found(drift, walk.options, walk.observer, report, || {
                    self.record_state(user.id, UserState::Deleted)
                })
                .await
            }
            Err(Stopped::Interrupted) => return Err(Stopped::Interrupted),
            Err(Stopped::Failed(why)) => {
                tracing::warn!(user = %user.id, %identity, %why, "cannot check a user's identity");
                report.failed += 1;
                Ok(())
            }
        };
        outcome.map_err(|e| Stopped::Failed(describe(&e)))
    }

    /// Compares a user with its identity. `Err` only on an outage (the run stops).
    async fn reconcile_pair(
        &self,
        user: &User,
        identity: &Identity,
        options: &ReconcileOptions,
        observer: &dyn ReconcileObserver,
        report: &mut ReconcileReport,
    ) -> Result<(), Error> {
        report.users += 1;
        let actual = UserState::of_identity(&identity.state);
        if user.state != actual {
            let drift = Drift::State {
                user: user.id,
                identity: identity.id,
                recorded: user.state,
                actual,
            };
            self.found(drift, options, observer, report, || {
                self.record_state(user.id, actual)
            })
            .await?;
        }
        let recorded = identity.metadata_user_id();
        if !matches!(identity.metadata_public, Value::Object(_) | Value::Null) {
            // The outbox would park the write (see `MetadataWrite::NotAnObject`), so queueing it
            // would repair nothing.
            let drift = Drift::MetadataNotObject {
                user: user.id,
                identity: identity.id,
                found: abbreviate(identity.metadata_public.to_string()),
            };
            self.found(drift, options, observer, report, || async { Ok(()) })
                .await?;
        } else if recorded != Some(user.id.to_string().as_str()) {
            let drift = match recorded {
                None => Drift::MetadataMissing {
                    user: user.id,
                    identity: identity.id,
                },
                Some(found) => Drift::MetadataElsewhere {
                    user: user.id,
                    identity: identity.id,
                    found: found.to_owned(),
                },
            };
            // The link in idmap is the record callers resolve through; Ory's copy follows it.
            self.found(drift, options, observer, report, || async {
                self.store
                    .queue_metadata_public_id(identity.id, user.id)
                    .await?;
                self.outbox_wakeup.notify_one();
                Ok(())
            })
            .await?;
        }
        if let Some(namespace) = &self.mapper.settings().ory_external_id_namespace {
            self.compare_external_id(user, identity, namespace, options, observer, report)
                .await?;
        }
        Ok(())
    }

    /// Compares the user's value in the namespace mirrored to Ory with the identity's
    /// `external_id`. idmap's value wins (the repair queues it for Ory); when the user holds none,
    /// the repair adopts Ory's, unless another user holds it, which is reported, never overwritten.
    async fn compare_external_id(
        &self,
        user: &User,
        identity: &Identity,
        namespace: &Namespace,
        options: &ReconcileOptions,
        observer: &dyn ReconcileObserver,
        report: &mut ReconcileReport,
    ) -> Result<(), Error> {
        let ours = user.external_id(namespace);
        let ory = identity.external_id.as_deref();
        if ours.map(ExternalId::as_str) == ory {
            return Ok(());
        }
        let queue_ours = || async {
            self.store
                .queue_external_id_sync(identity.id, user.id)
                .await?;
            self.outbox_wakeup.notify_one();
            Ok(())
        };
        match (ours, ory) {
            (Some(value), None) => {
                let drift = Drift::ExternalIdMissing {
                    user: user.id,
                    identity: identity.id,
                    namespace: namespace.clone(),
                    value: value.clone(),
                };
                self.found(drift, options, observer, report, queue_ours)
                    .await
            }
            (Some(value), Some(ory)) => {
                let drift = Drift::ExternalIdMismatch {
                    user: user.id,
                    identity: identity.id,
                    namespace: namespace.clone(),
                    ours: Some(value.clone()),
                    ory: ory.to_owned(),
                };
                self.found(drift, options, observer, report, queue_ours)
                    .await
            }
            (None, Some(ory)) => {
                let drift = Drift::ExternalIdMismatch {
                    user: user.id,
                    identity: identity.id,
                    namespace: namespace.clone(),
                    ours: None,
                    ory: ory.to_owned(),
                };
                self.found(drift, options, observer, report, || async {
                    let value = ExternalId::parse("external_id", ory)?;
                    self.mapper
                        .set_external_id(Subject::User(user.id), namespace, &value, false)
                        .await
                        .map(|_| ())
                })
                .await
            }
            (None, None) => Ok(()),
        }
    }

    /// Counts and reports a drift, repairing it with `repair` under `--fix`. An outage during the
    /// repair is returned (the run stops); any other failure is counted.
    async fn found<F, Fut>(
        &self,
        drift: Drift,
        options: &ReconcileOptions,
        observer: &dyn ReconcileObserver,
        report: &mut ReconcileReport,
        repair: F,
    ) -> Result<(), Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        *report.drifts.entry(drift.kind()).or_default() += 1;
        if !drift.fixable() {
            report.unfixable += 1;
        }
        if !options.fix || !drift.fixable() {
            observer.drift(&drift, None);
            return Ok(());
        }
        let result = repair().await;
        observer.drift(&drift, Some(&result));
        match result {
            Ok(()) => {
                report.fixed += 1;
                Ok(())
            }
            Err(e) if is_outage(&e) => Err(e),
            Err(e) => {
                tracing::warn!(%drift, error = %describe(&e), "cannot repair a drift");
                report.failed += 1;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_quotes_are_cut_on_a_character_boundary() {
        assert_eq!(abbreviate("[1,2]".into()), "[1,2]");
        let long = "é".repeat(QUOTE_CHARS + 5);
        let cut = abbreviate(long);
        assert_eq!(cut, format!("{}...", "é".repeat(QUOTE_CHARS)));
    }
}
