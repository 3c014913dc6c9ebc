#!/usr/bin/env bash
# The dashboard's browser test: installs Debian's chromium and playwright-core
# when missing, starts a real jobhost on an ephemeral port with the test
# plugins, and runs dashboard.mjs against it. Leaves a screenshot at
# target/browser/dashboard.png.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
(cd "$here" && [ -d node_modules/playwright-core ] || npm install --silent --no-audit --no-fund)
cd "$repo"
cargo build -p jobhost
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml -p sleep -p echo
out="$repo/target/browser"
rm -rf "$out" && mkdir -p "$out"
target/debug/jobhost serve --listen 127.0.0.1:0 --data-dir "$out/data" > "$out/stdout" 2> "$out/server.log" &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do grep -q "listening on" "$out/stdout" && break; sleep 0.1; done
url=$(sed -n 's/^jobhost listening on //p' "$out/stdout")
[ -n "$url" ] || { cat "$out/server.log"; exit 1; }
wasm=plugins/target/wasm32-wasip2/release
curl -fsS -X PUT --data-binary @$wasm/sleep.wasm "$url/plugins/sleep/versions/1.0.0" > /dev/null
curl -fsS -X PUT --data-binary @$wasm/echo.wasm "$url/plugins/echo/versions/1.0.0" > /dev/null
node "$here/dashboard.mjs" "$url" "$out/dashboard.png"
echo "browser test: ok"
