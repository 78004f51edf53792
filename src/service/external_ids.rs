//! SetExternalId and RemoveExternalId: a user's business ids after linking.

use std::sync::Arc;

use super::IdentityMapper;
use super::link::external_id_conflict;
use crate::domain::{ExternalId, FieldViolation, Namespace, NamespacedId, Subject, User};
use crate::error::{Error, reason};
use crate::store::{ChangeResult, IdChange};

/// The longest `external_id` Ory stores (Kratos's column is `VARCHAR(64)`).
pub const MAX_ORY_EXTERNAL_ID_CHARS: usize = 64;

impl IdentityMapper {
    /// Gives the subject's user `value` in `namespace`. A different value held there is
    /// EXTERNAL_ID_ALREADY_SET unless `replace`; the value given up stays findable as former.
    pub async fn set_external_id(
        &self,
        subject: Subject,
        namespace: &Namespace,
        value: &ExternalId,
        replace: bool,
    ) -> Result<Arc<User>, Error> {
        let id = NamespacedId::new(namespace.clone(), value.clone());
        self.check_fits_ory("value", &id)?;
        self.change(subject, namespace, IdChange::Set { value, replace })
            .await
    }

    /// Removes the subject's user's value in `namespace` (kept as former); nothing to remove is OK.
    pub async fn remove_external_id(
        &self,
        subject: Subject,
        namespace: &Namespace,
    ) -> Result<Arc<User>, Error> {
        self.change(subject, namespace, IdChange::Remove).await
    }

    async fn change(
        &self,
        subject: Subject,
        namespace: &Namespace,
        change: IdChange<'_>,
    ) -> Result<Arc<User>, Error> {
        let mirrored = self.settings.ory_external_id_namespace.as_ref() == Some(namespace);
        match self
            .store
            .change_external_id(subject, namespace, change, mirrored)
            .await?
        {
            ChangeResult::Done { user, changed } => {
                if changed {
                    if mirrored {
                        self.outbox_wakeup.notify_one();
                    }
                    self.user_written(&user).await;
                    tracing::info!(user = %user.id, %namespace, "external id changed");
                }
                Ok(Arc::new(user))
            }
            ChangeResult::NoUser => Err(match subject {
                Subject::Identity(id) => Error::NotFound {
                    reason: reason::USER_NOT_FOUND,
                    message: format!("no user is linked to Ory identity {id}"),
                    resource_type: "idmap.v1.User",
                    resource_name: format!("ory_identity_id/{id}"),
                },
                Subject::User(id) => Error::NotFound {
                    reason: reason::USER_NOT_FOUND,
                    message: format!("no user has id {id}"),
                    resource_type: "idmap.v1.User",
                    resource_name: format!("user_id/{id}"),
                },
            }),
            ChangeResult::Conflict(conflict) => {
                let identity = match subject {
                    Subject::Identity(id) => Some(id.to_string()),
                    Subject::User(_) => None,
                };
                Err(external_id_conflict(&conflict, identity.as_deref()))
            }
        }
    }

    /// A value in the namespace mirrored to Ory must fit Ory's `external_id`.
    pub(super) fn check_fits_ory(
        &self,
        field: &'static str,
        id: &NamespacedId,
    ) -> Result<(), FieldViolation> {
        let mirrored = self.settings.ory_external_id_namespace.as_ref() == Some(&id.namespace);
        let chars = id.value.as_str().chars().count();
        if mirrored && chars > MAX_ORY_EXTERNAL_ID_CHARS {
            return Err(FieldViolation {
                field: field.into(),
                description: format!(
                    "namespace {} is mirrored to Ory's external_id, which holds at most {MAX_ORY_EXTERNAL_ID_CHARS} characters; got {chars}",
                    id.namespace
                ),
            });
        }
        Ok(())
    }
}
