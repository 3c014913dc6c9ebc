//! Loading a plugin: validating the bytes, compiling (or reusing the cached
//! artifact), checking the component against the contract, and keeping a
//! pre-instantiated handle for fast runs.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::Runtime;
use super::bindings::PluginPre;
use super::guest_text::{MAX_METADATA_DESCRIPTION, MAX_METADATA_NAME, cut};
use super::run::sandboxed_store;
use super::sandbox::{PhaseState, SandboxLimits};

/// How long `describe()` may take when a plugin is loaded.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// Bytes 4..8 of a binary: version 1, layer 0 for a core module.
const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];

/// Why a plugin could not be loaded. Nothing is registered on error.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a WebAssembly binary: it does not start with the `\\0asm` header")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component: build for the \
         wasm32-wasip2 target (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error("the component imports something jobhost does not provide: {0}")]
    UnsupportedImports(String),
    #[error(
        "the component does not implement the `jobhost:plugin/plugin` world \
         (export `jobhost:plugin/phase@0.1.0`): {0}"
    )]
    NotAPlugin(String),
    #[error("the component's `describe` function failed: {0}")]
    Describe(String),
    #[error("the component is too large: {0}")]
    TooLarge(String),
}

/// What a plugin says about itself through `describe()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginMetadata {
    pub name: String,
    pub version: String,
    pub description: String,
}

/// A plugin compiled, checked against the contract, and ready to run.
pub struct LoadedPlugin {
    pub metadata: PluginMetadata,
    /// SHA-256 of the component bytes, hex.
    pub content_hash: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// Whether it imports `wasi:config/store` or `wasi:http`: only then
    /// does a run need its plugin's grants read.
    pub uses_grants: bool,
    pub(super) pre: PluginPre<PhaseState>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("metadata", &self.metadata)
            .field("content_hash", &self.content_hash)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of `bytes`, hex: how plugins and their cached artifacts are keyed.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A loaded plugin and the digest of its compiled artifact on disk (the
/// trusted one it was loaded from, or the one just written): the caller
/// keeps it, and passes it to the next [`Runtime::load`] of the same bytes.
#[derive(Debug)]
pub struct Loaded {
    pub plugin: Arc<LoadedPlugin>,
    pub artifact_digest: Option<String>,
}

impl Runtime {
    /// Validates and compiles `wasm` (or loads its cached artifact, if its
    /// digest is `trusted`), checks it implements the plugin world, and asks
    /// it to describe itself. Only then is a new artifact written.
    pub async fn load(&self, wasm: &[u8], trusted: Option<&str>) -> Result<Loaded, LoadError> {
        check_header(wasm)?;
        let hash = content_hash(wasm);
        let cached = {
            let (cache, engine, hash, trusted) = (
                self.cache.clone(),
                self.engine.clone(),
                hash.clone(),
                trusted.map(str::to_owned),
            );
            tokio::task::spawn_blocking(move || cache.load(&engine, &hash, trusted.as_deref()))
                .await
                .map_err(|e| {
                    LoadError::Invalid(format!("loading the artifact did not finish: {e}"))
                })?
        };
        let (component, fresh) = match cached {
            Some(component) => (component, false),
            None => (self.compile(wasm, &hash).await?, true),
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::UnsupportedImports(format!("{e:#}")))?;
        let pre =
            PluginPre::new(instance_pre).map_err(|e| LoadError::NotAPlugin(format!("{e:#}")))?;
        let metadata = self.describe(&pre).await?;
        let uses_grants = component
            .component_type()
            .imports(&self.engine)
            .any(|(name, _)| name.starts_with("wasi:config/") || name.starts_with("wasi:http/"));
        let artifact_digest = if fresh {
            let (cache, hash) = (self.cache.clone(), hash.clone());
            tokio::task::spawn_blocking(move || cache.store(&hash, &component))
                .await
                .unwrap_or_default()
        } else {
            trusted.map(str::to_owned)
        };
        Ok(Loaded {
            plugin: Arc::new(LoadedPlugin {
                metadata,
                content_hash: hash,
                size: wasm.len(),
                uses_grants,
                pre,
            }),
            artifact_digest,
        })
    }

    /// Compiles on a blocking thread, at most
    /// [`RuntimeConfig::max_concurrent_compiles`](super::RuntimeConfig) at a
    /// time: a compile takes every core it can get. A component with too
    /// many functions is refused first; one loaded from its trusted artifact
    /// passed this check when the artifact was written, so it is not parsed
    /// again at every start.
    async fn compile(
        &self,
        wasm: &[u8],
        hash: &str,
    ) -> Result<wasmtime::component::Component, LoadError> {
        check_functions(wasm, self.config.max_functions)?;
        let _permit = self.compiles.acquire().await.expect("never closed");
        let (cache, engine, wasm, hash) = (
            self.cache.clone(),
            self.engine.clone(),
            wasm.to_vec(),
            hash.to_owned(),
        );
        tokio::task::spawn_blocking(move || cache.compile(&engine, &wasm, &hash))
            .await
            .map_err(|e| LoadError::Invalid(format!("compilation did not finish: {e}")))?
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))
    }

    /// Removes the compiled artifact of a component no version uses any more.
    pub async fn forget_artifact(&self, content_hash: &str) {
        let (cache, hash) = (self.cache.clone(), content_hash.to_owned());
        let _ = tokio::task::spawn_blocking(move || cache.remove(&hash)).await;
    }

    async fn describe(&self, pre: &PluginPre<PhaseState>) -> Result<PluginMetadata, LoadError> {
        let limits = SandboxLimits {
            memory: self.config.memory_limit,
            log_bytes: 0,
            captured_output: 0,
        };
        let deadline = std::time::Instant::now() + DESCRIBE_TIMEOUT;
        let state = PhaseState::new(
            "(loading)",
            &limits,
            CancellationToken::new(),
            deadline,
            None,
            None,
            &self.http,
        );
        let mut store = sandboxed_store(self, state);
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("instance slots are never closed");
        let described = async {
            let instance = pre.instantiate_async(&mut store).await?;
            instance
                .jobhost_plugin_phase()
                .call_describe(&mut store)
                .await
        };
        // The epoch deadline stops guest code; this also stops a guest
        // parked in a host call (a WASI poll), where no epoch check happens.
        let metadata = tokio::time::timeout(DESCRIBE_TIMEOUT, described)
            .await
            .map_err(|_| {
                LoadError::Describe(format!(
                    "it did not return within {} s",
                    DESCRIBE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| LoadError::Describe(format!("{e:#}")))?;
        Ok(PluginMetadata {
            name: cut(metadata.name, MAX_METADATA_NAME),
            version: cut(metadata.version, MAX_METADATA_NAME),
            description: cut(metadata.description, MAX_METADATA_DESCRIPTION),
        })
    }
}

/// Counts the functions of every core module in the component, before
/// anything is compiled: compile time and memory grow with them.
fn check_functions(wasm: &[u8], max: u32) -> Result<(), LoadError> {
    let mut functions: u64 = 0;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| LoadError::Invalid(e.to_string()))?;
        if let wasmparser::Payload::FunctionSection(section) = payload {
            functions += u64::from(section.count());
        }
    }
    if functions > u64::from(max) {
        return Err(LoadError::TooLarge(format!(
            "it defines {functions} functions, more than the limit of {max}"
        )));
    }
    Ok(())
}

fn check_header(wasm: &[u8]) -> Result<(), LoadError> {
    if wasm.len() < 8 || &wasm[..4] != WASM_MAGIC {
        return Err(LoadError::NotWasm);
    }
    if wasm[4..8] == CORE_MODULE_VERSION {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tells_wasm_core_modules_and_components_apart() {
        assert!(matches!(
            check_header(b"hello world"),
            Err(LoadError::NotWasm)
        ));
        assert!(matches!(check_header(b"\0asm"), Err(LoadError::NotWasm)));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
