//! A plugin whose `describe()` returns a 1 MiB name, version and
//! description: the host must keep only a bounded, visibly cut part.

use jobhost_plugin::bindings::exports::jobhost::plugin::phase::Guest;
use jobhost_plugin::{Context, Input, Metadata, PhaseError};

struct HugeMetadata;

impl Guest for HugeMetadata {
    fn describe() -> Metadata {
        let huge = |c: &str| c.repeat(1 << 20);
        Metadata {
            name: huge("n"),
            version: huge("v"),
            description: huge("d"),
        }
    }

    fn run(_: Context, _: Input) -> Result<String, PhaseError> {
        Ok("null".into())
    }
}

jobhost_plugin::bindings::__export_plugin!(HugeMetadata with_types_in jobhost_plugin::bindings);
