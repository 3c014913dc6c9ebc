//! `wasi:config/store@0.2.0-rc.1` for one run: the configuration values and
//! secrets the operator granted the run's plugin version ([`RunGrants`]).
//!
//! jobhost implements the interface itself rather than linking
//! `wasmtime-wasi-config`, whose `get` answers `none` for any missing key:
//! here a key that was not granted is an `error::upstream` that names the
//! grant to ask for, and the refusal is logged on the host too, since a
//! guest's library may swallow the message. Values never reach a log.

use super::bindings::config_store::{Error, Host};
use super::grants::{LOGGED_REFUSALS, RunGrants};
use super::guest_text::cut;
use super::sandbox::PhaseState;
use crate::model::grants::limits::MAX_KEY_LEN;

impl RunGrants {
    /// The value of `key`, or why the guest may not have it.
    pub fn get(&self, key: &str) -> Result<String, String> {
        let covered = self
            .covered()
            .map_err(|refusal| format!("config key `{key}` refused: {refusal}"))?;
        match covered.values.get(key) {
            Some(Some(value)) => Ok(value.clone()),
            Some(None) => Err(format!(
                "secret `{key}` is granted to plugin `{}` but this host holds no value for it: \
                 set {} or add it to the server's secrets file",
                self.plugin,
                secret_variable(key)
            )),
            None => Err(format!(
                "config key `{key}` is not granted to plugin `{}` {}: {}",
                self.plugin,
                self.version,
                self.where_to_grant()
            )),
        }
    }

    /// Every granted key with its value, or why not.
    pub fn get_all(&self) -> Result<Vec<(String, String)>, String> {
        self.covered()?
            .values
            .keys()
            .map(|key| Ok((key.clone(), self.get(key)?)))
            .collect()
    }
}

/// The environment variable a secret's value is read from.
pub fn secret_variable(name: &str) -> String {
    format!("JOBHOST_SECRET_{}", name.to_ascii_uppercase())
}

impl PhaseState {
    /// Logs the first few refusals of a run (a guest may ask in a loop).
    fn refused(&mut self, what: &str, reason: String) -> Error {
        self.config_refusals += 1;
        if self.config_refusals > LOGGED_REFUSALS {
            return Error::Upstream(reason);
        }
        let granted = self.granted();
        tracing::warn!(
            plugin = %granted.map_or(self.plugin(), |g| g.plugin.as_str()),
            job = %granted.map_or("-", |g| g.job_id.as_str()),
            asked = %what,
            %reason,
            "refused a guest's config read"
        );
        Error::Upstream(reason)
    }
}

impl Host for PhaseState {
    fn get(&mut self, key: String) -> Result<Option<String>, Error> {
        // No granted key is longer: a longer one (cut, with a marker) is
        // refused, and its message stays small.
        let key = cut(key, MAX_KEY_LEN);
        let answer = match self.granted() {
            Some(granted) => granted.get(&key),
            None => Err(format!(
                "config key `{key}` refused: this run has no grants"
            )),
        };
        answer
            .map(Some)
            .map_err(|reason| self.refused(&format!("get {key}"), reason))
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, Error> {
        let answer = match self.granted() {
            Some(granted) => granted.get_all(),
            None => Err("this run has no grants".to_owned()),
        };
        answer.map_err(|reason| self.refused("get-all", reason))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runtime::grants::{Covered, Granted};

    fn config(grants: Granted) -> RunGrants {
        RunGrants {
            plugin: "mailer".into(),
            version: "2.0.0".into(),
            job_id: "j1".into(),
            grants,
        }
    }

    #[test]
    fn granted_keys_read_and_the_rest_name_the_grant() {
        let values = BTreeMap::from([
            ("region".to_owned(), Some("eu".to_owned())),
            ("api_key".to_owned(), None),
        ]);
        let granted = config(Granted::Covered(Covered {
            values,
            ..Default::default()
        }));
        assert_eq!(granted.get("region").unwrap(), "eu");
        let missing = granted.get("smtp_password").unwrap_err();
        assert!(missing.contains("`smtp_password` is not granted to plugin `mailer` 2.0.0"));
        assert!(missing.contains("PUT /plugins/mailer/grants"), "{missing}");
        let no_value = granted.get("api_key").unwrap_err();
        assert!(no_value.contains("JOBHOST_SECRET_API_KEY"), "{no_value}");
        assert!(granted.get_all().unwrap_err().contains("api_key"));
    }

    #[test]
    fn an_uncovered_version_and_no_grants_refuse_everything() {
        let other = config(Granted::OtherVersions(vec!["1.0.0".into()]));
        let refused = other.get("region").unwrap_err();
        assert!(refused.contains("do not cover version 2.0.0 (they cover 1.0.0)"));
        assert!(
            config(Granted::Nothing)
                .get_all()
                .unwrap_err()
                .contains("has no grants")
        );
    }

    #[test]
    fn debug_output_shows_keys_not_values() {
        let values = BTreeMap::from([("token".to_owned(), Some("s3cr3t".to_owned()))]);
        let shown = format!(
            "{:?}",
            config(Granted::Covered(Covered {
                values,
                ..Default::default()
            }))
        );
        assert!(
            shown.contains("token") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
}
