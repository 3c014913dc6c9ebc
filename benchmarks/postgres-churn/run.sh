#!/usr/bin/env bash
# What PostgreSQL's tables look like after a long churn: JOBS (default
# 1,000,000) trivial one-phase jobs submitted over HTTP to one
# `jobhost serve --database … --concurrency 64`, with a retention of
# RETENTION (default 2m),
# so jobs are stored, completed and deleted all along, as in a platform that
# runs for months. Prints each jobhost table's size, live and dead tuples and
# free space (pgstattuple) as jobhost left them, autovacuum on (its
# settings are the schema's). Needs Node.js and a PostgreSQL server:
# DATABASE_URL names a database it may connect to; the run works in a
# database of its own, created and dropped here. Not part of CI.
#
#   ./benchmarks/postgres-churn/run.sh          # JOBS=100000 … for a quicker run
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
server=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
jobs=${JOBS:-1000000}
retention=${RETENTION:-2m}
port=${PORT:-8391}
cd "$repo"
cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml -p echo
cargo build --release --locked -p jobhost

database=jobhost_churn_$$
url="${server%/*}/$database"
data=$(mktemp -d)
psql "$server" -qc "CREATE DATABASE $database"
cleanup() {
    [ -n "${serve:-}" ] && kill "$serve" 2>/dev/null && wait "$serve" 2>/dev/null
    psql "$server" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)"
    rm -rf "$data"
}
trap cleanup EXIT
target/release/jobhost serve --database "$url" --data-dir "$data" \
    --listen "127.0.0.1:$port" --retention "$retention" --durability process --concurrency 64 \
    > "$data/serve.log" 2>&1 &
serve=$!
for _ in $(seq 1 100); do curl -sf "localhost:$port/readyz" >/dev/null && break; sleep 0.1; done
curl -sf -X PUT --data-binary @plugins/target/wasm32-wasip2/release/echo.wasm \
    "localhost:$port/plugins/echo/versions/1.0.0" >/dev/null

started=$(date +%s)
node "$here/submit.mjs" "http://127.0.0.1:$port" "$jobs"
# Until every job has finished.
while [ "$(psql "$url" -Atc "SELECT count(*) FROM jobs WHERE status IN ('pending', 'running')")" != 0 ]; do
    sleep 5
done
elapsed=$(( $(date +%s) - started ))

psql "$url" -qc "CREATE EXTENSION IF NOT EXISTS pgstattuple"
echo
echo "## PostgreSQL tables after $jobs jobs in ${elapsed}s (retention $retention, autovacuum as the schema sets it)"
psql "$url" -P footer=off -c "
SELECT c.relname AS \"table\",
       pg_size_pretty(pg_table_size(c.oid)) AS size,
       pg_size_pretty(pg_indexes_size(c.oid)) AS indexes,
       s.tuple_count AS live,
       s.dead_tuple_count AS dead,
       round(s.dead_tuple_percent::numeric, 1) AS \"dead %\",
       round(s.free_percent::numeric, 1) AS \"free %\",
       u.autovacuum_count AS autovacuums
FROM pg_class c
JOIN pg_stat_user_tables u ON u.relid = c.oid
CROSS JOIN LATERAL pgstattuple(c.oid) s
WHERE c.relname IN ('jobs', 'phases', 'events', 'event_blocks', 'attempt_errors',
                    'webhook_deliveries', 'hosts', 'event_positions')
ORDER BY pg_total_relation_size(c.oid) DESC"
