//! Plugins and their versions: the component bytes, content hash, which
//! version is active, and the digests of compiled artifacts.

use async_trait::async_trait;
use serde::Serialize;

use super::Result;
use crate::model::{PluginGrants, PluginResources};

/// A validated plugin version to store.
pub struct NewPluginVersion {
    pub name: String,
    pub version: String,
    pub content_hash: String,
    pub description: String,
    pub component: Vec<u8>,
    /// The quotas this upload must fit in, with every stored version.
    pub quota: PluginQuota,
}

/// How many plugin versions, and how many bytes of them, may be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginQuota {
    pub max_versions: u64,
    pub max_bytes: u64,
}

impl Default for PluginQuota {
    fn default() -> Self {
        PluginQuota {
            max_versions: 1000,
            max_bytes: 2 << 30,
        }
    }
}

impl NewPluginVersion {
    /// Whether storing this version, beside `versions` versions of `bytes`
    /// bytes in all, would pass its quota; what it answers if so.
    pub(super) fn over_quota(&self, versions: u64, bytes: u64) -> Option<PutOutcome> {
        let quota = self.quota;
        let what = if versions >= quota.max_versions {
            format!("{versions} plugin versions are stored, the limit")
        } else if bytes + self.component.len() as u64 > quota.max_bytes {
            format!(
                "{bytes} bytes of plugins are stored; {} more would pass the limit of {}",
                self.component.len(),
                quota.max_bytes
            )
        } else {
            return None;
        };
        Some(PutOutcome::OverQuota { what })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored; `activated` when it became the active version (the first one).
    Created { activated: bool },
    /// The same bytes were already stored under this version.
    Unchanged,
    /// Other bytes are already stored under this version.
    Conflict { existing_hash: String },
    /// Storing it would pass a quota; `what` says which.
    OverQuota { what: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivateOutcome {
    Activated { previous: Option<String> },
    AlreadyActive,
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteVersionOutcome {
    /// `unused_content`: the content hash, when no other version has the
    /// same bytes, so that its compiled artifacts can go.
    Deleted {
        unused_content: Option<String>,
    },
    NotFound,
    /// Non-terminal jobs pin it.
    InUse {
        jobs: u64,
    },
    /// It is the active version while other versions exist.
    Active,
}

/// Grants as stored (JSON text, on both backends).
pub(super) fn decode_grants(json: &str) -> Result<PluginGrants> {
    serde_json::from_str(json).map_err(|e| {
        super::StorageError::new(
            super::ErrorClass::Other,
            format!("stored plugin grants do not decode: {e}"),
        )
    })
}

/// What setting a plugin's grants did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOutcome {
    Set,
    PluginNotFound,
    /// The grants name a version that is not stored.
    UnknownVersion(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PluginRecord {
    pub name: String,
    pub active_version: Option<String>,
    /// Oldest upload first.
    pub versions: Vec<VersionRecord>,
    /// What the operator granted it (never secret values: secrets are
    /// named only). None until grants are set.
    pub grants: Option<PluginGrants>,
    /// Its memory cap and default timeout, if the operator set them.
    pub resources: PluginResources,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct VersionRecord {
    pub version: String,
    pub content_hash: String,
    pub size: u64,
    pub description: String,
    #[serde(serialize_with = "crate::model::time::as_rfc3339::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub uploaded_at: i64,
}

#[async_trait]
pub trait PluginStore: Send + Sync {
    async fn put_plugin_version(&self, new: NewPluginVersion, now: i64) -> Result<PutOutcome>;

    async fn activate_plugin_version(
        &self,
        name: &str,
        version: &str,
        now: i64,
    ) -> Result<ActivateOutcome>;

    async fn delete_plugin_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<DeleteVersionOutcome>;

    async fn plugins(&self) -> Result<Vec<PluginRecord>>;

    async fn plugin(&self, name: &str) -> Result<Option<PluginRecord>>;

    /// The digest recorded for the compiled artifact of a component.
    async fn artifact_digest(&self, content_hash: &str, engine: &str) -> Result<Option<String>>;

    /// Records the digest of a compiled artifact just written.
    async fn record_artifact(&self, content_hash: &str, engine: &str, digest: &str) -> Result<()>;

    /// Replaces a plugin's grants and logs `plugin:grants:changed`.
    async fn set_plugin_grants(
        &self,
        name: &str,
        grants: &PluginGrants,
        now: i64,
    ) -> Result<GrantOutcome>;

    /// Sets a plugin's resources and logs `plugin:resources:changed`;
    /// false if there is no such plugin.
    async fn set_plugin_resources(
        &self,
        name: &str,
        resources: PluginResources,
        now: i64,
    ) -> Result<bool>;

    /// A plugin's grants, if the operator set any.
    async fn plugin_grants(&self, name: &str) -> Result<Option<PluginGrants>>;

    /// The component bytes of a stored version.
    async fn plugin_component(&self, name: &str, version: &str) -> Result<Option<Vec<u8>>>;
}
