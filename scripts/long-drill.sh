#!/usr/bin/env bash
# The long crash-recovery drill: 500 SIGKILLs under concurrent load (not run in CI; the fault
# suite runs 20-kill drills). Usage: scripts/long-drill.sh [KILLS] [SEED] [SINK]
# Writes the report to benches/results/drill-<date>-<sink>.json and exits non-zero on any loss,
# any non-identical duplicate or any broken chain.
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-500}
SEED=${2:-42}
SINK=${3:-file}
OUT=benches/results
mkdir -p "$OUT"
cargo build --release --quiet
SCRATCH=$(mktemp -d "$PWD/target/long-drill.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
time ./target/release/spoolgate drill --kills "$KILLS" --seed "$SEED" --sink "$SINK" \
    --clients 4 --flip-rules --data-dir "$SCRATCH/data" \
    --report-json "$OUT/drill-$(date -u +%Y-%m-%d)-$SINK.json"
