#!/usr/bin/env bash
# Builds notify.wasm from notify.js with ComponentizeJS (from the npm
# registry, pinned in package-lock.json), against jobhost's contract.
#   ./build.sh [OUT_DIR]     (default: ./target)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/target}" && cd "${1:-$here/target}" && pwd)
cd "$here"
[ -d node_modules/@bytecodealliance/componentize-js ] || npm ci --silent --no-audit --no-fund
node build.mjs "$out/notify.wasm"
