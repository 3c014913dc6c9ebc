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
wasm=plugins/target/wasm32-wasip2/release

# Serves a fresh data directory with the given flags, uploads the plugins
# (with $token, if set) and runs dashboard.mjs against it.
check() {
    local name=$1; shift
    local dir="$out/$name"
    mkdir -p "$dir"
    target/debug/jobhost serve --listen 127.0.0.1:0 --data-dir "$dir/data" "$@" > "$dir/stdout" 2> "$dir/server.log" &
    local server=$!
    trap "kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true" EXIT
    for _ in $(seq 1 300); do grep -q "listening on" "$dir/stdout" && break; sleep 0.1; done
    local url
    url=$(sed -n 's/^jobhost listening on //p' "$dir/stdout")
    [ -n "$url" ] || { cat "$dir/server.log"; exit 1; }
    local auth=()
    [ -n "${token:-}" ] && auth=(-H "Authorization: Bearer $token")
    curl -fsS "${auth[@]}" -X PUT --data-binary @$wasm/sleep.wasm "$url/plugins/sleep/versions/1.0.0" > /dev/null
    curl -fsS "${auth[@]}" -X PUT --data-binary @$wasm/echo.wasm "$url/plugins/echo/versions/1.0.0" > /dev/null
    curl -fsS "${auth[@]}" -X PUT --data-binary @$wasm/echo.wasm "$url/plugins/echo/versions/2.0.0" > /dev/null
    node "$here/dashboard.mjs" "$url" "$out/$name" ${token:-} ${read_token:-}
    kill -INT $server; wait $server || true
    trap - EXIT
}

token="" check open
token="browser-test-token" read_token="browser-read-token" \
    check with-token --tokens "admin:browser-test-token,read:browser-read-token"
cp "$out/open-jobs.png" "$out/dashboard.png"
echo "browser test: ok"
