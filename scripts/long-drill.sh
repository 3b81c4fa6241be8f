#!/usr/bin/env bash
# The long crash-recovery drill: 500 SIGKILLs under concurrent load (not run in CI; the fault
# suite runs 20-kill drills). Usage: scripts/long-drill.sh [KILLS] [SEED] [SINK]
# Writes the report to benches/results/drill-<time>-<sink>-seed<SEED>.json and exits non-zero
# when the drill fails (see `spoolgate drill --help` and src/drill.rs for what it checks) or
# the daemons logged a panic, a damaged range or a missing segment; a failed run keeps its data
# directory and log. CLEAN_STOPS=PCT ends that share of the rounds with SIGTERM instead (a
# rolling restart among the crashes; the report's name then ends in -clean<PCT>); without it a
# seed's schedule is the one earlier reports ran.
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-500}
SEED=${2:-42}
SINK=${3:-file}
OUT=benches/results
mkdir -p "$OUT"
cargo build --release --quiet
SCRATCH=$(mktemp -d "$PWD/target/long-drill.XXXXXX")
KEEP=0
trap '[ "$KEEP" = 1 ] && echo "kept $SCRATCH" >&2 || rm -rf "$SCRATCH"' EXIT
# 4 MiB segments, as in the fault suite's drills: a 500-kill run writes some 60-100 MB, which in
# the default 64 MiB segments would hardly ever rotate, so kills would never land while
# compaction deletes segments and checkpoints the chain heads and dedup ids. For the same
# reason the file sink rotates its output at 1 MiB (the default is 64 MiB).
SETS=(--set spool.segment_bytes_max=4194304)
[ "$SINK" = file ] && SETS+=(--set sinks.default.file_bytes_max=1048576)
CLEAN_STOPS=${CLEAN_STOPS:-0}
SUFFIX=""
[ "$CLEAN_STOPS" != 0 ] && SUFFIX="-clean$CLEAN_STOPS"
REPORT="$OUT/drill-$(date -u +%Y-%m-%dT%H%MZ)-$SINK-seed$SEED$SUFFIX.json"
set +e
time ./target/release/spoolgate drill --kills "$KILLS" --seed "$SEED" --sink "$SINK" \
    --clients 4 --flip-rules --clean-stops "$CLEAN_STOPS" --data-dir "$SCRATCH/data" \
    "${SETS[@]}" --report-json "$REPORT"
rc=$?
set -e
[ "$rc" -ne 0 ] && KEEP=1
# Evidence that compaction ran: the first segment left, and the checkpoints it writes.
first=$(ls "$SCRATCH/data/spool" | grep -m1 '\.seg$' || true)
echo "compaction: first segment left ${first:-none}; chain-heads $( [ -f "$SCRATCH/data/chain-heads" ] && echo present || echo absent ); dedup checkpoints $(ls "$SCRATCH/data" | grep -c '^dedup-' || true)"
if [ "$SINK" = file ]; then
    echo "file sink output files: $(ls "$SCRATCH/data/out" | grep -c '\.jsonl$' || true)"
fi
# A torn tail is what a kill leaves; a panic, a damaged range (at a start or met by a reader
# while running) or a missing segment is a failure.
if grep -E 'panicked|WARN.*damaged|before the durable end|reader skipped bytes|segments are missing|segment is missing' "$SCRATCH/data.log"; then
    echo "the daemons logged a panic, a damaged segment or a missing one" >&2
    KEEP=1
    exit 1
fi
echo "errors the daemons logged: $(grep -c ' ERROR ' "$SCRATCH/data.log" || true)"
exit "$rc"
