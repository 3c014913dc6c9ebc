//! A plugin whose `describe()` sleeps for an hour in `wasi:io/poll`, where
//! no epoch check runs: loading it must still end, with an error, within
//! the host's describe timeout.

use jobhost_plugin::bindings::exports::jobhost::plugin::phase::Guest;
use jobhost_plugin::{Context, Input, Metadata, PhaseError};

struct SlowDescribe;

impl Guest for SlowDescribe {
    fn describe() -> Metadata {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        Metadata {
            name: "slow-describe".into(),
            version: "0.1.0".into(),
            description: "never seen".into(),
        }
    }

    fn run(_: Context, _: Input) -> Result<String, PhaseError> {
        Ok("null".into())
    }
}

jobhost_plugin::bindings::__export_plugin!(SlowDescribe with_types_in jobhost_plugin::bindings);
