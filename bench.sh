#!/usr/bin/env bash
# Builds the plugins and an optimized jobhost, then prints every benchmark
# scenario's figures (medians; ratios against baselines measured in the same
# run). Arguments go to `jobhost bench`, e.g. ./bench.sh --only cancel-latency
set -euo pipefail
cd "$(dirname "$0")"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
cargo build --release --locked -p jobhost
exec target/release/jobhost bench "$@"
