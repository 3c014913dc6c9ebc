#!/usr/bin/env bash
# The user path with nothing but curl: upload plugins, trigger a job, watch
# it over SSE, hot swap a plugin, roll back.
#
#   cargo run -p jobhost -- serve        # in one terminal
#   ./examples/curl-walkthrough.sh       # in another (JOBHOST_URL to point elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
url=${JOBHOST_URL:-http://127.0.0.1:8080}
auth=()
[ -n "${JOBHOST_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $JOBHOST_TOKEN")
wasm=plugins/target/wasm32-wasip2/release

echo "== build the plugins (wasm32-wasip2 components)"
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

echo "== upload the pipeline plugins as version 1.0.0"
for plugin in csv-parse aggregate render-report; do
    curl -sS "${auth[@]}" -X PUT --data-binary @"$wasm/${plugin//-/_}.wasm" \
        "$url/plugins/$plugin/versions/1.0.0"
    echo
done

echo "== trigger a 3-phase job"
job=$(curl -sS "${auth[@]}" -X POST -H 'content-type: application/json' \
    --data @examples/specs/sales-report.json "$url/jobs")
id=$(echo "$job" | sed -E 's/^\{"id":"([^"]+)".*/\1/')
echo "job $id"

echo "== watch it live (the stream ends after the job's terminal event)"
curl -sSN "${auth[@]}" "$url/jobs/$id/events" | grep -E '^event:' | head -40

echo "== the report"
curl -sS "${auth[@]}" "$url/jobs/$id" | sed -E 's/.*"report":"(([^"\\]|\\.)*)".*/\1/' | sed 's/\\n/\n/g'

echo "== hot swap: upload render-report 1.1.0 (same code, new version) and activate it"
curl -sS "${auth[@]}" -X PUT --data-binary @"$wasm/render_report.wasm" "$url/plugins/render-report/versions/1.1.0"
echo
curl -sS "${auth[@]}" -X PUT -H 'content-type: application/json' -d '{"version": "1.1.0"}' \
    "$url/plugins/render-report/active"
echo
echo "== jobs enqueued now pin 1.1.0"
curl -sS "${auth[@]}" -X POST -H 'content-type: application/json' \
    --data @examples/specs/sales-report.json "$url/jobs" | grep -o '"plugin":"render-report","version":"[^"]*"'

echo "== roll back to 1.0.0"
curl -sS "${auth[@]}" -X PUT -H 'content-type: application/json' -d '{"version": "1.0.0"}' \
    "$url/plugins/render-report/active"
echo
