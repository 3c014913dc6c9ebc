#!/usr/bin/env bash
# jobhost on PostgreSQL vs Graphile Worker on the same PostgreSQL, with the
# same trivial-job workload, in one run on this machine. Installs Graphile
# Worker (npm) when missing; neither it nor this script is needed to build
# or test jobhost, and this is not part of CI. Needs a PostgreSQL server:
# DATABASE_URL names a database it may connect to (default: this project's
# machines', postgres://postgres@127.0.0.1:5432/postgres); both systems work
# in databases of their own, created and dropped here.
#
#   ./benchmarks/graphile-worker/run.sh       # JOBS=500 … for a quicker run
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
server=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
jobs=${JOBS:-2000}
(cd "$here" && [ -d node_modules/graphile-worker ] || npm install --silent --no-audit --no-fund)
cd "$repo"
cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml -p echo -p spin
cargo build --release --locked -p jobhost

database=jobhost_graphile_bench_$$
psql "$server" -qc "CREATE DATABASE $database"
trap 'psql "$server" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)"' EXIT
results=$(mktemp)
node "$here/graphile.mjs" "${server%/*}/$database" "$jobs" | tee "$results"
target/release/jobhost bench --only postgres --samples 3 --jobs "$jobs" --database-url "$server" | tee "$results.jobhost"

graphile() { awk -v p="$1" '$1 == p {print $2}' "$results"; }
# jobhost's rows: "| Process | 1 | 1 | <jobs/s> | … |".
jobhost() { awk -F'|' -v d="$1" -v h="$2" -v p="$3" '$2 ~ d && $3 + 0 == h && $4 + 0 == p {gsub(/ /, "", $5); print $5}' "$results.jobhost"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

defaults=$(graphile defaults); tuned=$(graphile tuned)
process=$(jobhost Process 1 1); full=$(jobhost Full 1 1)
echo
echo "## jobhost on PostgreSQL vs Graphile Worker, 1-phase trivial jobs, concurrency 64, $jobs per sample (jobs/s, medians, same run)"
echo "| Graphile Worker, defaults | Graphile Worker, tuned | jobhost, one host, process durability | ratio to defaults | ratio to tuned | jobhost, full durability | ratio to defaults | ratio to tuned |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
echo "| $defaults | $tuned | $process | $(ratio "$process" "$defaults") | $(ratio "$process" "$tuned") | $full | $(ratio "$full" "$defaults") | $(ratio "$full" "$tuned") |"
