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
# 4 MiB segments, as in the fault suite's drills: a 500-kill run writes some 60-100 MB, which in
# the default 64 MiB segments would hardly ever rotate, so kills would never land while
# compaction deletes segments and checkpoints the chain heads and dedup ids.
time ./target/release/spoolgate drill --kills "$KILLS" --seed "$SEED" --sink "$SINK" \
    --clients 4 --flip-rules --data-dir "$SCRATCH/data" \
    --set spool.segment_bytes_max=4194304 \
    --report-json "$OUT/drill-$(date -u +%Y-%m-%d)-$SINK.json"
# Evidence that compaction ran: the first segment left, and the checkpoints it writes.
first=$(ls "$SCRATCH/data/spool" | grep -m1 '\.seg$' || true)
echo "compaction: first segment left ${first:-none}; chain-heads $( [ -f "$SCRATCH/data/chain-heads" ] && echo present || echo absent ); dedup checkpoints $(ls "$SCRATCH/data" | grep -c '^dedup-' || true)"
