//! What one run may use of its plugin's grants ([`RunGrants`]), resolved
//! when its phase starts: a later change of the grants reaches the next
//! run, not this one. `wasi:config/store` (config_store.rs) and
//! `wasi:http` (http.rs) answer from it.

use std::collections::BTreeMap;

use crate::model::grants::OriginRule;

/// Refusals of one run that are logged on the host (of config reads, and
/// of HTTP requests); the rest only reach the guest.
pub(super) const LOGGED_REFUSALS: u64 = 10;

#[derive(Clone)]
pub struct RunGrants {
    /// The plugin's stored name and version, and the job: for messages.
    pub plugin: String,
    pub version: String,
    pub job_id: String,
    pub grants: Granted,
}

#[derive(Clone)]
pub enum Granted {
    /// The operator set no grants for the plugin.
    Nothing,
    /// The plugin has grants, but they do not cover this version.
    OtherVersions(Vec<String>),
    /// This version's grants.
    Covered(Covered),
}

#[derive(Clone, Default)]
pub struct Covered {
    /// Key → value. A granted secret this host holds no value for maps to
    /// `None`: reading it fails, saying so.
    pub values: BTreeMap<String, Option<String>>,
    /// Origins it may call.
    pub http: Vec<OriginRule>,
}

/// Values stay out of debug output.
impl std::fmt::Debug for RunGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = match &self.grants {
            Granted::Covered(covered) => covered.values.keys().collect(),
            _ => Vec::new(),
        };
        f.debug_struct("RunGrants")
            .field("plugin", &self.plugin)
            .field("version", &self.version)
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

impl RunGrants {
    pub(super) fn where_to_grant(&self) -> String {
        format!(
            "an operator grants it in PUT /plugins/{}/grants, or `jobhost plugin grant {}`",
            self.plugin, self.plugin
        )
    }

    /// This version's values and origins, or why it has none.
    pub(super) fn covered(&self) -> Result<&Covered, String> {
        let (plugin, version) = (&self.plugin, &self.version);
        match &self.grants {
            Granted::Covered(covered) => Ok(covered),
            Granted::Nothing => Err(format!(
                "plugin `{plugin}` has no grants: {}",
                self.where_to_grant()
            )),
            Granted::OtherVersions(covered) => Err(format!(
                "the grants of plugin `{plugin}` do not cover version {version} (they cover {}): \
                 an operator adds it to `versions` in PUT /plugins/{plugin}/grants",
                if covered.is_empty() {
                    "none".to_owned()
                } else {
                    covered.join(", ")
                }
            )),
        }
    }
}
