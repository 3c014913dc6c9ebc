//! The plugin registry: versioned plugins, validated against the contract on
//! upload, stored durably, and loaded (compiled or from the artifact cache)
//! once per process per version.
//!
//! Hot swap: jobs pin a version at enqueue, and a loaded version stays loaded
//! while the active pointer moves, so a phase that started on v1 finishes on
//! v1 and the next job enqueued runs v2.
//!
//! Grants (`grants`) are read when a phase of a plugin that imports
//! `wasi:config/store` or `wasi:http` starts, so every host sees a change
//! at the next phase; plugins that import neither cost no read.

mod grants;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::model::time::now_ms;
use crate::model::{PluginGrants, PluginResources};
use crate::runtime::{LoadError, LoadedPlugin, PluginMetadata, RunGrants, Runtime, content_hash};
use crate::storage::{
    ActivateOutcome, DeleteVersionOutcome, GrantOutcome, NewPluginVersion, PluginQuota,
    PluginRecord, PutOutcome, Storage, StorageError,
};

pub use grants::{SECRET_PREFIX, Secrets, resolve as resolve_grants};

/// Longest plugin name or version accepted.
const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "invalid plugin {what} `{value}`: use 1-{MAX_NAME_LEN} letters, digits, `.`, `_`, `-` or `+`, starting with a letter or digit"
    )]
    InvalidName { what: &'static str, value: String },
    #[error(transparent)]
    Invalid(#[from] LoadError),
    #[error(
        "version {version} of plugin `{name}` already exists with different content (hash {existing_hash})"
    )]
    VersionConflict {
        name: String,
        version: String,
        existing_hash: String,
    },
    #[error("the plugin store is full: {0}; delete versions no job needs")]
    OverQuota(String),
    #[error("plugin `{name}` has no version `{version}`")]
    NotFound { name: String, version: String },
    #[error("no plugin named `{0}`")]
    NoSuchPlugin(String),
    #[error("invalid grants: {0}")]
    InvalidGrants(String),
    #[error("invalid resources: {0}")]
    InvalidResources(String),
    #[error("version {version} of plugin `{name}` is pinned by {jobs} unfinished job(s)")]
    InUse {
        name: String,
        version: String,
        jobs: u64,
    },
    #[error(
        "version {version} is the active version of plugin `{name}`: activate another version first"
    )]
    Active { name: String, version: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uploaded {
    /// Stored; `activated` when it is the plugin's first version.
    Created {
        activated: bool,
        metadata: PluginMetadata,
    },
    /// The same bytes were already stored under this version.
    Unchanged,
}

pub struct PluginRegistry {
    runtime: Arc<Runtime>,
    storage: Arc<Storage>,
    quota: PluginQuota,
    secrets: Secrets,
    loaded: Mutex<HashMap<(String, String), Arc<LoadedPlugin>>>,
    /// Each plugin's resources, read at every enqueue and phase start: kept
    /// here, refreshed from storage when they change on any host (see
    /// [`PluginRegistry::refresh_resources`]).
    resources: RwLock<HashMap<String, PluginResources>>,
    /// The longest phase timeout the queue allows.
    max_timeout: Duration,
}

fn check_name(what: &'static str, value: &str) -> Result<(), PluginError> {
    let valid = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
    if valid {
        Ok(())
    } else {
        Err(PluginError::InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}

impl PluginRegistry {
    pub fn new(runtime: Arc<Runtime>, storage: Arc<Storage>) -> Self {
        PluginRegistry::with_quota(runtime, storage, PluginQuota::default())
    }

    pub fn with_quota(runtime: Arc<Runtime>, storage: Arc<Storage>, quota: PluginQuota) -> Self {
        PluginRegistry {
            runtime,
            storage,
            quota,
            secrets: Secrets::default(),
            loaded: Mutex::default(),
            resources: RwLock::default(),
            max_timeout: Duration::from_secs(3600),
        }
    }

    /// The longest phase timeout a plugin's default may be.
    pub fn with_max_phase_timeout(mut self, max: Duration) -> Self {
        self.max_timeout = max;
        self
    }

    /// The secret values that grants may name.
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Validates `component` against the contract, then stores it as
    /// `name`@`version`. Nothing is stored when validation fails.
    pub async fn upload(
        &self,
        name: &str,
        version: &str,
        component: Vec<u8>,
    ) -> Result<Uploaded, PluginError> {
        check_name("name", name)?;
        check_name("version", version)?;
        let plugin = self.load_component(&component).await?;
        let new = NewPluginVersion {
            name: name.to_owned(),
            version: version.to_owned(),
            content_hash: content_hash(&component),
            description: plugin.metadata.description.clone(),
            component,
            quota: self.quota,
        };
        match self.storage.put_plugin_version(new, now_ms()).await? {
            PutOutcome::Created { activated } => {
                let metadata = plugin.metadata.clone();
                self.loaded
                    .lock()
                    .await
                    .insert((name.to_owned(), version.to_owned()), plugin);
                Ok(Uploaded::Created {
                    activated,
                    metadata,
                })
            }
            PutOutcome::Unchanged => Ok(Uploaded::Unchanged),
            PutOutcome::OverQuota { what } => Err(PluginError::OverQuota(what)),
            PutOutcome::Conflict { existing_hash } => Err(PluginError::VersionConflict {
                name: name.to_owned(),
                version: version.to_owned(),
                existing_hash,
            }),
        }
    }

    /// Makes `version` the one new jobs pin (hot swap, or rollback). Returns
    /// the previously active version.
    pub async fn activate(&self, name: &str, version: &str) -> Result<Option<String>, PluginError> {
        match self
            .storage
            .activate_plugin_version(name, version, now_ms())
            .await?
        {
            ActivateOutcome::Activated { previous } => Ok(previous),
            ActivateOutcome::AlreadyActive => Ok(Some(version.to_owned())),
            ActivateOutcome::NotFound => Err(self.not_found(name, version)),
        }
    }

    pub async fn delete_version(&self, name: &str, version: &str) -> Result<(), PluginError> {
        let (n, v) = (name.to_owned(), version.to_owned());
        match self.storage.delete_plugin_version(name, version).await? {
            DeleteVersionOutcome::Deleted { unused_content } => {
                self.loaded.lock().await.remove(&(n, v));
                if let Some(hash) = unused_content {
                    self.runtime.forget_artifact(&hash).await;
                }
                Ok(())
            }
            DeleteVersionOutcome::NotFound => Err(self.not_found(name, version)),
            DeleteVersionOutcome::InUse { jobs } => Err(PluginError::InUse {
                name: n,
                version: v,
                jobs,
            }),
            DeleteVersionOutcome::Active => Err(PluginError::Active {
                name: n,
                version: v,
            }),
        }
    }

    /// Replaces the plugin's grants. Every version they name must be
    /// stored; nothing is stored when one is not.
    pub async fn set_grants(&self, name: &str, grants: &PluginGrants) -> Result<(), PluginError> {
        grants.validate().map_err(PluginError::InvalidGrants)?;
        match self
            .storage
            .set_plugin_grants(name, grants, now_ms())
            .await?
        {
            GrantOutcome::Set => Ok(()),
            GrantOutcome::PluginNotFound => Err(PluginError::NoSuchPlugin(name.to_owned())),
            GrantOutcome::UnknownVersion(version) => Err(PluginError::InvalidGrants(format!(
                "versions: plugin `{name}` has no version `{version}`"
            ))),
        }
    }

    /// Sets the plugin's memory cap, default timeout and limits.
    pub async fn set_resources(
        &self,
        name: &str,
        resources: PluginResources,
    ) -> Result<(), PluginError> {
        let max_memory_mb = self.runtime.config().max_plugin_memory >> 20;
        let max_timeout_ms = self.max_timeout.as_millis() as u64;
        resources
            .validate(max_memory_mb, max_timeout_ms)
            .map_err(PluginError::InvalidResources)?;
        if !self
            .storage
            .set_plugin_resources(name, resources, now_ms())
            .await?
        {
            return Err(PluginError::NoSuchPlugin(name.to_owned()));
        }
        self.resources_changed(name, resources);
        Ok(())
    }

    /// Reads a plugin's resources again (after a change on any host, or an
    /// upload that may have made a new plugin of an old name).
    pub async fn refresh_resources(&self, name: &str) -> Result<(), PluginError> {
        let resources = self
            .storage
            .plugin(name)
            .await?
            .map(|plugin| plugin.resources)
            .unwrap_or_default();
        self.resources_changed(name, resources);
        Ok(())
    }

    /// Takes a change of a plugin's resources (made on any host).
    pub fn resources_changed(&self, name: &str, resources: PluginResources) {
        let mut known = self.resources.write().expect("never poisoned");
        if resources == PluginResources::default() {
            known.remove(name);
        } else {
            known.insert(name.to_owned(), resources);
        }
    }

    fn resources_of(&self, name: &str) -> PluginResources {
        let known = self.resources.read().expect("never poisoned");
        known.get(name).copied().unwrap_or_default()
    }

    /// The memory cap of a run of the plugin, if the operator set one.
    pub fn memory_limit(&self, name: &str) -> Option<u64> {
        self.resources_of(name).memory_mb.map(|mb| mb << 20)
    }

    /// Whether the operator limited how many of the plugin's phases run at
    /// once or start per second.
    pub fn limits_starts(&self, name: &str) -> bool {
        self.resources_of(name).limits_starts()
    }

    /// The timeout of a phase whose spec gives none, if the operator set one.
    pub fn default_timeout(&self, name: &str) -> Option<Duration> {
        self.resources_of(name)
            .timeout_ms
            .map(Duration::from_millis)
    }

    /// What a run of `name`@`version` in job `job_id` may read through
    /// `wasi:config/store` and call through `wasi:http`: the grants in
    /// force now, with this host's secret values.
    pub async fn granted_config(
        &self,
        name: &str,
        version: &str,
        job_id: &str,
    ) -> Result<RunGrants, PluginError> {
        let grants = self.storage.plugin_grants(name).await?;
        Ok(grants::resolve(
            grants.as_ref(),
            &self.secrets,
            name,
            version,
            job_id,
        ))
    }

    pub async fn list(&self) -> Result<Vec<PluginRecord>, PluginError> {
        Ok(self.storage.plugins().await?)
    }

    pub async fn get(&self, name: &str) -> Result<Option<PluginRecord>, PluginError> {
        Ok(self.storage.plugin(name).await?)
    }

    /// The loaded, ready-to-run version, loading it from storage (and the
    /// artifact cache) the first time.
    pub async fn load(&self, name: &str, version: &str) -> Result<Arc<LoadedPlugin>, PluginError> {
        let key = (name.to_owned(), version.to_owned());
        if let Some(plugin) = self.loaded.lock().await.get(&key) {
            return Ok(plugin.clone());
        }
        let component = self
            .storage
            .plugin_component(name, version)
            .await?
            .ok_or_else(|| self.not_found(name, version))?;
        let plugin = self.load_component(&component).await?;
        Ok(self
            .loaded
            .lock()
            .await
            .entry(key)
            .or_insert(plugin)
            .clone())
    }

    /// Loads every stored version, so the first job of each does not pay
    /// for it (and so a start-up reports broken artifacts early).
    pub async fn preload(&self) -> Result<usize, PluginError> {
        let mut count = 0;
        for plugin in self.list().await? {
            self.resources_changed(&plugin.name, plugin.resources);
            for version in &plugin.versions {
                self.load(&plugin.name, &version.version).await?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Loads a component, trusting its cached artifact only with the digest
    /// on record, and records the digest of an artifact it writes.
    async fn load_component(&self, component: &[u8]) -> Result<Arc<LoadedPlugin>, PluginError> {
        let hash = content_hash(component);
        let engine = self.runtime.engine_key();
        let trusted = self.storage.artifact_digest(&hash, engine).await?;
        let loaded = self.runtime.load(component, trusted.as_deref()).await?;
        if let Some(digest) = &loaded.artifact_digest
            && trusted.as_ref() != Some(digest)
        {
            self.storage.record_artifact(&hash, engine, digest).await?;
        }
        Ok(loaded.plugin)
    }

    fn not_found(&self, name: &str, version: &str) -> PluginError {
        PluginError::NotFound {
            name: name.to_owned(),
            version: version.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_are_checked() {
        for good in [
            "csv-parse",
            "a",
            "v1.2.0",
            "1.0.0-rc.1+build.5",
            "my_plugin",
        ] {
            assert!(check_name("name", good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a/b", "../etc", "x y", &"a".repeat(65)] {
            assert!(check_name("name", bad).is_err(), "{bad}");
        }
    }
}
