#!/usr/bin/env bash
# The in-process benchmarks: spool append vs raw write+fdatasync, and the gate vs SHA-256.
# Each prints a Markdown table of medians with its same-run baseline; this script stamps the
# machine and date and keeps the output in benches/results/.
#
#   scripts/bench-micro.sh                     # SPOOLGATE_BENCH_ROUNDS=5 for more rounds
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benches/results
DATE=$(date -u +%Y-%m-%d)
mkdir -p "$OUT"
HEADER="Measured on $(uname -n) ($(nproc) cores, $(uname -r)), $(date -u +%Y-%m-%dT%H:%MZ)."
{
    echo "$HEADER"
    echo
    cargo bench --quiet --bench spool_append -- --json "$OUT/spool-append-$DATE.json" 2>/dev/null
} | tee "$OUT/spool-append-$DATE.md"
{
    echo "$HEADER"
    echo
    cargo bench --quiet --bench gate 2>/dev/null
} | tee "$OUT/gate-$DATE.md"
