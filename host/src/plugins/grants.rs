//! Grants at run time: the secret values this host holds ([`Secrets`]), and
//! a plugin version's grants resolved into what one run may read
//! ([`RunGrants`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

use crate::model::PluginGrants;
use crate::runtime::{Covered, Granted, RunGrants};

/// Environment variables with this prefix hold secrets: a grant names a
/// secret, never a variable, so no grant reaches the server's own settings.
pub const SECRET_PREFIX: &str = "JOBHOST_SECRET_";

/// The secret values this host holds, by name. Loaded once at start from
/// the secrets file (a JSON object of name → value) and from
/// `JOBHOST_SECRET_<NAME>` variables, which win over the file. Values are
/// kept in memory only: never stored, logged or shown.
#[derive(Clone, Default)]
pub struct Secrets(Arc<BTreeMap<String, String>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    /// Reads `file` (if any), then the `JOBHOST_SECRET_*` entries of `vars`.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Secrets> {
        let mut secrets = BTreeMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading secrets file {}", path.display()))?;
            let values: BTreeMap<String, String> =
                serde_json::from_str(&text).with_context(|| {
                    format!(
                        "secrets file {}: expected a JSON object of name to string value",
                        path.display()
                    )
                })?;
            for name in values.keys() {
                check_secret_name(name)
                    .with_context(|| format!("secrets file {}", path.display()))?;
            }
            secrets.extend(values);
        }
        for (variable, value) in vars {
            if let Some(name) = variable.strip_prefix(SECRET_PREFIX) {
                let name = name.to_ascii_lowercase();
                check_secret_name(&name).with_context(|| format!("variable {variable}"))?;
                secrets.insert(name, value);
            }
        }
        Ok(Secrets(Arc::new(secrets)))
    }

    fn get(&self, name: &str) -> Option<&String> {
        self.0.get(name)
    }
}

fn check_secret_name(name: &str) -> anyhow::Result<()> {
    crate::model::grants::check_secret_name(name).map_err(anyhow::Error::msg)
}

/// What a run of `plugin`@`version` (in job `job_id`) may read, given the
/// plugin's grants.
pub fn resolve(
    grants: Option<&PluginGrants>,
    secrets: &Secrets,
    plugin: &str,
    version: &str,
    job_id: &str,
) -> RunGrants {
    let granted = match grants {
        None => Granted::Nothing,
        Some(grants) if !grants.covers(version) => Granted::OtherVersions(grants.versions.clone()),
        Some(grants) => {
            let plain = grants
                .config
                .iter()
                .map(|(key, value)| (key.clone(), Some(value.clone())));
            let secret = grants
                .secrets
                .iter()
                .map(|name| (name.clone(), secrets.get(name).cloned()));
            Granted::Covered(Covered {
                values: plain.chain(secret).collect(),
                http: grants.origin_rules(),
            })
        }
    };
    RunGrants {
        plugin: plugin.to_owned(),
        version: version.to_owned(),
        job_id: job_id.to_owned(),
        grants: granted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secrets_come_from_the_file_and_prefixed_variables_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secrets.json");
        std::fs::write(&file, r#"{"stripe_key": "from-file", "smtp": "file"}"#).unwrap();
        let secrets = Secrets::load(
            Some(&file),
            vars(&[
                ("JOBHOST_SECRET_SMTP", "from-env"),
                ("JOBHOST_DATABASE_URL", "postgres://server-credentials"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(secrets.get("stripe_key").unwrap(), "from-file");
        assert_eq!(secrets.get("smtp").unwrap(), "from-env", "variables win");
        let names = format!("{secrets:?}");
        assert_eq!(names, r#"{"smtp", "stripe_key"}"#, "nothing but the prefix");
        assert!(
            !format!("{secrets:?}").contains("from-"),
            "debug hides values"
        );
    }

    #[test]
    fn bad_secret_sources_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secrets.json");
        std::fs::write(&file, r#"["not", "an", "object"]"#).unwrap();
        let error = Secrets::load(Some(&file), []).unwrap_err();
        assert!(format!("{error:#}").contains("JSON object"), "{error:#}");
        let error = Secrets::load(None, vars(&[("JOBHOST_SECRET_", "x")])).unwrap_err();
        assert!(
            format!("{error:#}").contains("JOBHOST_SECRET_"),
            "{error:#}"
        );
    }

    #[test]
    fn a_run_sees_its_versions_grants_with_secret_values() {
        let grants = PluginGrants {
            versions: vec!["1.0.0".into()],
            config: BTreeMap::from([("region".into(), "eu".into())]),
            secrets: vec!["token".into(), "absent".into()],
            ..Default::default()
        };
        let secrets = Secrets::load(None, vars(&[("JOBHOST_SECRET_TOKEN", "t0k")])).unwrap();
        let run = resolve(Some(&grants), &secrets, "p", "1.0.0", "j");
        assert_eq!(run.get("region").unwrap(), "eu");
        assert_eq!(run.get("token").unwrap(), "t0k");
        assert!(run.get("absent").unwrap_err().contains("holds no value"));
        let other = resolve(Some(&grants), &secrets, "p", "1.1.0", "j");
        assert!(
            other
                .get("region")
                .unwrap_err()
                .contains("do not cover version 1.1.0")
        );
        assert!(matches!(
            resolve(None, &secrets, "p", "1.0.0", "j").grants,
            Granted::Nothing
        ));
    }
}
