use super::IdentityMapper;
use crate::domain::{ExternalId, IdentityId, User};
use crate::error::{Error, reason};

impl IdentityMapper {
    /// The user linked to an Ory identity. Reads idmap's store only.
    pub async fn user_by_identity(&self, id: IdentityId) -> Result<User, Error> {
        self.store
            .user_by_identity(id)
            .await?
            .ok_or_else(|| Error::NotFound {
                reason: reason::USER_NOT_FOUND,
                message: format!("no user is linked to Ory identity {id}"),
                resource_type: "idmap.v1.User",
                resource_name: format!("ory_identity_id/{id}"),
            })
    }

    /// The user holding an external id. Reads idmap's store only.
    pub async fn user_by_external_id(&self, external_id: &ExternalId) -> Result<User, Error> {
        self.store
            .user_by_external_id(external_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                reason: reason::USER_NOT_FOUND,
                message: "no user holds that external id".into(),
                resource_type: "idmap.v1.User",
                resource_name: format!("external_id/{external_id}"),
            })
    }
}
