#!/usr/bin/env bash
# Builds the sample plugins and runs the CSV pipeline (csv-parse → aggregate →
# render-report) one phase at a time with `jobhost run-phase`, handing each
# phase's output to the next with --previous.
# Run from the repository root or anywhere: ./examples/run-pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
cargo build -p jobhost
jobhost=target/debug/jobhost
wasm=plugins/target/wasm32-wasip2/release
out=$(mktemp -d)

cat > "$out/payload.json" <<'JSON'
{"csv": "order,region,amount\n1001,north,120.50\n1002,south,80\n1003,north,19.5\n1004,east,oops\n1005,south,20\n"}
JSON

$jobhost run-phase "$wasm/csv_parse.wasm" --input @"$out/payload.json" > "$out/parse.json"
$jobhost run-phase "$wasm/aggregate.wasm" --input @"$out/payload.json" \
    --config '{"group_by": "region", "sum": ["amount"]}' \
    --previous parse=@"$out/parse.json" > "$out/aggregate.json"
$jobhost run-phase "$wasm/render_report.wasm" --input @"$out/payload.json" \
    --config '{"title": "Sales by region"}' \
    --previous parse=@"$out/parse.json" --previous aggregate=@"$out/aggregate.json" \
    > "$out/report.json"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["report"])' "$out/report.json" 2>/dev/null \
    || cat "$out/report.json"
