//! Paths of the guest plugin components built from `plugins/` by this
//! crate's build script: one `&str` constant per plugin (e.g. [`CSV_PARSE`]
//! for `plugins/csv-parse`), and [`ALL`] as (plugin name, path) pairs.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

/// Reads a plugin's component bytes.
pub fn bytes(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}
