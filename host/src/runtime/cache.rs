//! The on-disk cache of compiled plugin artifacts.
//!
//! Compiling a component with Cranelift takes ~100 ms; loading its serialized
//! artifact takes well under 1 ms. But deserializing runs native code with
//! no further check, so an artifact is loaded only when its SHA-256 equals
//! the digest the caller kept when it was written (the server keeps it in
//! its database, out of reach of whoever can write the cache directory).
//! Files are named by the component's content hash and the engine's
//! compatibility hash, so a different wasmtime version or configuration
//! never even looks at another's files. A file without a trusted digest,
//! or with another one, is removed and recompiled, never loaded; nothing is
//! written for a component until it has passed every check.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Precompiled};

/// How often a load compiled, reused a cached artifact, or rejected a bad
/// cache file (which is then recompiled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub compiled: u64,
    pub reused: u64,
    pub rejected: u64,
}

#[derive(Default)]
struct Counters {
    compiled: AtomicU64,
    reused: AtomicU64,
    rejected: AtomicU64,
}

#[derive(Clone)]
pub(super) struct ArtifactCache {
    dir: Option<PathBuf>,
    engine_key: String,
    counters: Arc<Counters>,
}

impl ArtifactCache {
    pub(super) fn new(engine: &Engine, dir: Option<PathBuf>) -> io::Result<Self> {
        if let Some(dir) = &dir {
            fs::create_dir_all(dir)?;
        }
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ArtifactCache {
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
            counters: Arc::default(),
        })
    }

    /// Which engine configuration artifacts are compiled for.
    pub(super) fn engine_key(&self) -> &str {
        &self.engine_key
    }

    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.counters.compiled.load(Ordering::Relaxed),
            reused: self.counters.reused.load(Ordering::Relaxed),
            rejected: self.counters.rejected.load(Ordering::Relaxed),
        }
    }

    fn path(&self, content_hash: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{content_hash}-{}.cwasm", self.engine_key)))
    }

    /// The cached component for `content_hash`, if its file is there and
    /// its digest is `trusted`. A file that must not be used is removed.
    /// Blocking: call it off the async executor.
    pub(super) fn load(
        &self,
        engine: &Engine,
        content_hash: &str,
        trusted: Option<&str>,
    ) -> Option<Component> {
        let path = self.path(content_hash)?;
        match read_artifact(engine, &path, trusted) {
            Ok(Some(component)) => {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(path = %path.display(), "reused compiled artifact");
                Some(component)
            }
            Ok(None) => None,
            Err(reason) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), %reason, "rejected cached artifact; recompiling");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Compiles `wasm`. Blocking and heavy: the caller bounds how many run.
    pub(super) fn compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        content_hash: &str,
    ) -> wasmtime::Result<Component> {
        let component = Component::new(engine, wasm)?;
        self.counters.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(hash = content_hash, "compiled plugin component");
        Ok(component)
    }

    /// Writes the artifact of a component that passed every check; returns
    /// the digest to keep, or `None` when there is no cache (or the write
    /// failed, which only costs a compile later).
    pub(super) fn store(&self, content_hash: &str, component: &Component) -> Option<String> {
        let path = self.path(content_hash)?;
        let written = component
            .serialize()
            .map_err(io::Error::other)
            .and_then(|artifact| write_artifact(&path, &artifact).map(|()| artifact));
        match written {
            Ok(artifact) => Some(hex::encode(Sha256::digest(&artifact))),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "could not cache compiled artifact");
                None
            }
        }
    }

    /// Removes the artifact of a component no stored version has any more.
    pub(super) fn remove(&self, content_hash: &str) {
        if let Some(path) = self.path(content_hash) {
            let _ = fs::remove_file(path);
        }
    }
}

/// `Ok(None)` when there is no file; `Err(reason)` when there is one that
/// must not be used.
fn read_artifact(
    engine: &Engine,
    path: &Path,
    trusted: Option<&str>,
) -> Result<Option<Component>, String> {
    let artifact = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    let Some(trusted) = trusted else {
        return Err("no digest is on record for it".into());
    };
    if hex::encode(Sha256::digest(&artifact)) != trusted {
        return Err("its digest is not the one on record: the file was changed".into());
    }
    if Engine::detect_precompiled(&artifact) != Some(Precompiled::Component) {
        return Err("not a precompiled component".into());
    }
    // SAFETY: the artifact is the one `write_artifact` wrote from
    // `Component::serialize` (its digest is the one recorded then), and
    // wasmtime checks that it was compiled for this engine's configuration.
    unsafe { Component::deserialize(engine, &artifact) }
        .map(Some)
        .map_err(|e| format!("incompatible with this engine: {e}"))
}

/// Writes to a temporary file and renames it into place, so readers never
/// see a half-written artifact.
fn write_artifact(path: &Path, artifact: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new_in(path.parent().unwrap_or(Path::new(".")))?;
    file.write_all(artifact)?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}
