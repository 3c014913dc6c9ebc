#!/usr/bin/env bash
# Builds notify.wasm from notify.js with ComponentizeJS (from the npm
# registry, pinned in package-lock.json), against jobhost's contract.
# preview2-shim is pinned beside it: componentize-js imports it without
# declaring it, and 0.26 cannot read the WIT directory.
#   ./build.sh [OUT_DIR]     (default: ./target)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/target}" && cd "${1:-$here/target}" && pwd)
cd "$here"
# npm writes node_modules/.package-lock.json: older than the lock means stale.
[ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --silent --no-audit --no-fund
node build.mjs "$out/notify.wasm"
