#!/usr/bin/env bash
# Runs every test: the guest plugins' unit tests (native), then the host's
# unit and integration tests (which build plugins/ for wasm32-wasip2 first).
set -euo pipefail
cd "$(dirname "$0")"
cargo test --locked --manifest-path plugins/Cargo.toml --workspace
cargo test --locked --workspace
