#!/usr/bin/env bash
# Builds convert-currency.wasm from app.py with componentize-py (from PyPI),
# installed into a virtualenv under the given output directory.
#   ./build.sh [OUT_DIR]     (default: ./target)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/target}" && cd "${1:-$here/target}" && pwd)
wit="$here/../../../wit"
if [ ! -x "$out/venv/bin/componentize-py" ]; then
    python3 -m venv "$out/venv"
    "$out/venv/bin/pip" install --quiet "componentize-py==0.25.1"
fi
cd "$here"
"$out/venv/bin/componentize-py" --wit-path "$wit" --world plugin componentize app -o "$out/convert_currency.wasm"
