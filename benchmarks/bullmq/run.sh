#!/usr/bin/env bash
# jobhost vs BullMQ on the same trivial-job workload, in one run, on this
# machine. Installs Redis (Debian's redis-server) and BullMQ (npm) when
# missing; neither is needed to build or test jobhost, and this is not part
# of CI. Prints both systems' jobs/s at concurrency 1, 8, 64 and the ratios.
#
#   ./benchmarks/bullmq/run.sh
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

results=$(mktemp)
for mode in default always; do
    dir=$(mktemp -d)
    if [ "$mode" = always ]; then persistence=(--appendonly yes --appendfsync always); else persistence=(); fi
    redis-server --port $port --dir "$dir" --daemonize no "${persistence[@]}" > "$dir/redis.log" 2>&1 &
    redis=$!
    for _ in $(seq 1 50); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.1; done
    node "$here/bullmq.mjs" $port | sed "s/^/$mode /" >> "$results"
    redis-cli -p $port shutdown nosave >/dev/null 2>&1 || kill $redis
    wait $redis 2>/dev/null || true
    rm -rf "$dir"
done
target/release/jobhost bench --only queue-throughput --samples 3 | tee "$results.jobhost"

# jobhost's 1-phase rows: "| Process | 1 | raw | c1 | c8 | c64 | ratio |" and "| Full | 1 | …".
process=$(grep '^| Process | 1 |' "$results.jobhost" | awk -F'|' '{print $5, $6, $7}')
full=$(grep '^| Full | 1 |' "$results.jobhost" | awk -F'|' '{print $5, $6, $7}')
echo
echo "## jobhost vs BullMQ, 1-phase trivial jobs (jobs/s, medians, same run)"
echo "| concurrency | BullMQ (Redis default persistence) | jobhost (process durability) | ratio | BullMQ (appendfsync always) | jobhost (full durability, fsync) | ratio |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
i=1
for concurrency in 1 8 64; do
    b_default=$(awk -v c=$concurrency '$1 == "default" && $3 == c {print $4}' "$results")
    b_always=$(awk -v c=$concurrency '$1 == "always" && $3 == c {print $4}' "$results")
    j_process=$(echo $process | awk -v i=$i '{print $i}')
    j_full=$(echo $full | awk -v i=$i '{print $i}')
    awk -v c=$concurrency -v bd="$b_default" -v jp="$j_process" -v ba="$b_always" -v jf="$j_full" \
        'BEGIN { printf "| %s | %s | %s | %.2f | %s | %s | %.2f |\n", c, bd, jp, jp / bd, ba, jf, jf / ba }'
    i=$((i + 1))
done
