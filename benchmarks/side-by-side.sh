#!/usr/bin/env bash
# Compares two jobhost binaries on the queue and phase benchmarks, side by
# side in one run: ROUNDS rounds, each running BEFORE then AFTER, so that
# both see the same machine load. Prints, per figure, the median over the
# rounds (each round's figure is itself a median of --samples runs) for
# both binaries and their ratio AFTER / BEFORE.
#
#   benchmarks/side-by-side.sh BEFORE AFTER [ROUNDS]
#
# Build BEFORE from the older commit (e.g. `git worktree add /tmp/base
# <commit>` and `cargo build --release` there), and build the plugins first
# (./bench.sh does).
set -euo pipefail
before=$1 after=$2 rounds=${3:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# One `name<TAB>value` line per figure of a bench run's output.
figures() {
    awk -F'|' '
        function trim(s) { gsub(/^ +| +$/, "", s); return s }
        /^## Queue throughput/ { section = "throughput" }
        /^## Latency/          { section = "latency" }
        /^## The same with/    { section = "latency, jobs scheduled ahead" }
        /^## Phase overhead/   { section = "phase" }
        /^The storage writer/ || /^1-phase jobs/ { section = "" }
        section == "throughput" && $2 ~ /Process|Full/ {
            split("1 8 64", concurrency, " ")
            for (i = 1; i <= 3; i++)
                printf "jobs/s, %s, %s-phase, concurrency %s\t%s\n",
                    trim($2), trim($3), concurrency[i], trim($(5 + i))
        }
        section ~ /^latency/ && $2 ~ /^ *[0-9.]+ *$/ {
            printf "p50 ms, %s\t%s\n", section, trim($2); section = ""
        }
        section == "phase" && $2 ~ /per run/ { printf "phase, µs per run, 1 task\t%s\n", trim($3) }
        section == "phase" && $2 ~ /runs\/s/  { printf "phase, runs/s, 2 tasks\t%s\n", trim($3) }
    '
}

for round in $(seq "$rounds"); do
    for which in before after; do
        binary=${!which}
        "$binary" bench --only queue-throughput --only queue-latency --only phase-overhead \
            --samples 3 | figures > "$out/$which.$round"
    done
    echo "round $round of $rounds done" >&2
done

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf '| figure | before | after | after / before |\n|---|---:|---:|---:|\n'
cut -f1 "$out/before.1" | while IFS= read -r name; do
    b=$(cat "$out"/before.* | awk -F'\t' -v n="$name" '$1 == n { print $2 }' | median)
    a=$(cat "$out"/after.* | awk -F'\t' -v n="$name" '$1 == n { print $2 }' | median)
    printf '| %s | %s | %s | %.3f |\n' "$name" "$b" "$a" "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')"
done
