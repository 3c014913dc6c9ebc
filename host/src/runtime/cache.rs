//! The on-disk cache of compiled plugin artifacts.
//!
//! Compiling a component with Cranelift takes ~100 ms; loading its serialized
//! artifact takes well under 1 ms. Files are named by the component's content
//! hash and the engine's compatibility hash, so a different wasmtime version or
//! configuration never even looks at another's files. Each file starts with
//! the SHA-256 of the artifact after it: a truncated or corrupted file is
//! detected, removed and recompiled, never loaded.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Precompiled};

const DIGEST_LEN: usize = 32;

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

    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.counters.compiled.load(Ordering::Relaxed),
            reused: self.counters.reused.load(Ordering::Relaxed),
            rejected: self.counters.rejected.load(Ordering::Relaxed),
        }
    }

    /// The component for `wasm` (whose SHA-256 is `content_hash`), from the
    /// cache when a valid artifact is there, else compiled and cached.
    /// Blocking: call it off the async executor.
    pub(super) fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        content_hash: &str,
    ) -> wasmtime::Result<Component> {
        let path = self
            .dir
            .as_ref()
            .map(|dir| dir.join(format!("{content_hash}-{}.cwasm", self.engine_key)));
        if let Some(path) = &path {
            match read_artifact(engine, path) {
                Ok(Some(component)) => {
                    self.counters.reused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(path = %path.display(), "reused compiled artifact");
                    return Ok(component);
                }
                Ok(None) => {}
                Err(reason) => {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %path.display(), %reason, "rejected cached artifact; recompiling");
                    let _ = fs::remove_file(path);
                }
            }
        }
        let component = Component::new(engine, wasm)?;
        self.counters.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(hash = content_hash, "compiled plugin component");
        if let Some(path) = &path
            && let Err(e) = component
                .serialize()
                .map_err(io::Error::other)
                .and_then(|a| write_artifact(path, &a))
        {
            tracing::warn!(path = %path.display(), error = %e, "could not cache compiled artifact");
        }
        Ok(component)
    }
}

/// `Ok(None)` when there is no file; `Err(reason)` when there is one that
/// must not be used.
fn read_artifact(engine: &Engine, path: &Path) -> Result<Option<Component>, String> {
    let file = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    if file.len() < DIGEST_LEN {
        return Err("truncated".into());
    }
    let (digest, artifact) = file.split_at(DIGEST_LEN);
    if Sha256::digest(artifact).as_slice() != digest {
        return Err("checksum mismatch: the file is corrupt".into());
    }
    if Engine::detect_precompiled(artifact) != Some(Precompiled::Component) {
        return Err("not a precompiled component".into());
    }
    // SAFETY: the artifact was written by `write_artifact` from
    // `Component::serialize` (its checksum matches), and wasmtime checks
    // that it was compiled for this engine's configuration.
    unsafe { Component::deserialize(engine, artifact) }
        .map(Some)
        .map_err(|e| format!("incompatible with this engine: {e}"))
}

/// Writes to a temporary file and renames it into place, so readers never
/// see a half-written artifact.
fn write_artifact(path: &Path, artifact: &[u8]) -> io::Result<()> {
    let mut file = tempfile::NamedTempFile::new_in(path.parent().unwrap_or(Path::new(".")))?;
    file.write_all(&Sha256::digest(artifact))?;
    file.write_all(artifact)?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}
