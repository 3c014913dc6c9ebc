#!/usr/bin/env bash
# Builds convert_currency.wasm from app.py with componentize-py (from PyPI),
# installed into a virtualenv under the given output directory.
#   ./build.sh [OUT_DIR]     (default: ./target)
#
# The plugin calls HTTP (its `rates_url`), so its world is jobhost's `plugin`
# world plus `wasi:http/outgoing-handler` (world.wit). The WIT it builds
# against is put together under OUT_DIR/wit: the contract from wit/, and
# wasi:http with the interfaces it uses from the wasmtime-wasi-http crate
# the host links (the versions the host implements).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out=$(mkdir -p "${1:-$here/target}" && cd "${1:-$here/target}" && pwd)
if [ ! -x "$out/venv/bin/componentize-py" ]; then
    python3 -m venv "$out/venv"
    "$out/venv/bin/pip" install --quiet "componentize-py==0.25.1"
fi
wasi_http=$(cd "$repo" && cargo metadata --locked --format-version 1 \
        --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" |
    python3 -c 'import json, sys, os
packages = json.load(sys.stdin)["packages"]
print(next(os.path.dirname(p["manifest_path"]) for p in packages if p["name"] == "wasmtime-wasi-http"))')
wit="$out/wit"
rm -rf "$wit" && mkdir -p "$wit/deps/plugin" "$wit/deps/config"
cp "$here/world.wit" "$wit/"
cp "$repo/wit/plugin.wit" "$wit/deps/plugin/"
cp "$repo"/wit/deps/config/*.wit "$wit/deps/config/"
cp "$wasi_http"/wit/deps/*.wit "$wit/deps/"
cd "$here"
"$out/venv/bin/componentize-py" --wit-path "$wit" --world plugin-with-http componentize app -o "$out/convert_currency.wasm"
