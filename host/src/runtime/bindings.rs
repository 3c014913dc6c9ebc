//! Host-side bindings generated from `wit/plugin.wit`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    exports: { default: async },
});

pub(super) use self::exports::jobhost::plugin::phase;
pub(super) use self::jobhost::plugin::host;
pub(super) use self::wasi::config::store as config_store;
