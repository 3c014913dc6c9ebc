#!/usr/bin/env bash
# jobhost vs BullMQ on the same trivial-job workload, in one run, on this
# machine. Installs Redis (Debian's redis-server) and BullMQ (npm) when
# missing; neither is needed to build or test jobhost, and this is not part
# of CI. Prints both systems' jobs/s at concurrency 1, 8, 64, three-step
# chains against 3-phase jobs, latency, and the ratios, with Redis at each of
# its persistence settings.
#
#   ./benchmarks/bullmq/run.sh          # JOBS=400 ./benchmarks/bullmq/run.sh for a quicker run
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
port=6390
if ! command -v redis-server >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
fi
(cd "$here" && [ -d node_modules/bullmq ] || npm install --silent --no-audit --no-fund)
cd "$repo"
cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml -p echo
cargo build --release --locked -p jobhost

jobs=${JOBS:-2000}
results=$(mktemp)
for mode in default everysec always; do
    dir=$(mktemp -d)
    case $mode in
        default) persistence=() ;;
        *) persistence=(--appendonly yes --appendfsync "$mode") ;;
    esac
    redis-server --port $port --dir "$dir" --daemonize no "${persistence[@]}" > "$dir/redis.log" 2>&1 &
    redis=$!
    for _ in $(seq 1 50); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.1; done
    node "$here/bullmq.mjs" $port "$jobs" | sed "s/^/$mode /" | tee -a "$results"
    redis-cli -p $port shutdown nosave >/dev/null 2>&1 || kill $redis
    wait $redis 2>/dev/null || true
    rm -rf "$dir"
done
target/release/jobhost bench --only queue-throughput --only queue-latency --samples 3 --jobs "$jobs" | tee "$results.jobhost"

bullmq() { awk -v m="$1" -v w="$2" -v c="$3" '$1 == m && $2 == w && $3 == c {print $4}' "$results"; }
# jobhost's table rows: "| Process | 1 | per step | batched | c1 | c8 | c64 | … |".
jobhost() { awk -F'|' -v d="$1" -v p="$2" -v f="$3" 'NF == 11 && $2 ~ d && $3 + 0 == p {gsub(/ /, "", $f); print $f}' "$results.jobhost"; }
column() { echo $(( $1 == 1 ? 6 : $1 == 8 ? 7 : 8 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

echo
echo "## jobhost vs BullMQ, 1-phase trivial jobs, $jobs per sample (jobs/s, medians, same run)"
echo "| concurrency | BullMQ, Redis default | BullMQ, appendfsync everysec | jobhost, process durability | ratio to everysec | BullMQ, appendfsync always | jobhost, full durability | ratio to always |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for c in 1 8 64; do
    bd=$(bullmq default single $c); be=$(bullmq everysec single $c); ba=$(bullmq always single $c)
    jp=$(jobhost Process 1 "$(column $c)"); jf=$(jobhost Full 1 "$(column $c)")
    echo "| $c | $bd | $be | $jp | $(ratio "$jp" "$be") | $ba | $jf | $(ratio "$jf" "$ba") |"
done
echo
echo "## Three sequential steps at concurrency 64: BullMQ chains of 3 jobs vs jobhost 3-phase jobs (per second)"
echo "| BullMQ, Redis default | BullMQ, everysec | jobhost, process durability | ratio to everysec | BullMQ, always | jobhost, full durability | ratio to always |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
bd=$(bullmq default chain 64); be=$(bullmq everysec chain 64); ba=$(bullmq always chain 64)
jp=$(jobhost Process 3 8); jf=$(jobhost Full 3 8)
echo "| $bd | $be | $jp | $(ratio "$jp" "$be") | $ba | $jf | $(ratio "$jf" "$ba") |"
echo
echo "## Latency add/enqueue → completed, one job at a time (ms)"
echo "| | p50 | p99 |"
echo "|---|---:|---:|"
for mode in default everysec always; do
    awk -v m=$mode '$1 == m && $2 == "latency" {printf "| BullMQ, Redis %s | %s | %s |\n", m, $3, $4}' "$results"
done
grep -m1 -A2 '^| p50 ms' "$results.jobhost" | tail -1 | awk -F'|' '{gsub(/ /, ""); printf "| jobhost, process durability | %s | %s |\n", $2, $3}'
