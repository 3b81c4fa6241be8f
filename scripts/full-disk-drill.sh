#!/usr/bin/env bash
# The crash-recovery drill on a full disk (not run in CI; needs root for the tmpfs).
# Usage: scripts/full-disk-drill.sh [KILLS] [SEED]
#
# The data directory sits on a 48 MiB tmpfs of which a filler takes 40 MiB, the free-space
# watermarks are off and segments are 1 MiB, so the spool itself fills the disk again and
# again: ingest meets real ENOSPC (429 `enospc`), seals and tombstones find no room and spend
# the 3 MiB disk reserve (then 429 `reserve` and /readyz 503 while less than 3 MiB is free),
# and compaction runs on a full filesystem. The HTTP sink refuses one stream every other
# 500 ms (`--flaky-stream`) so a backlog builds. The dedup index is bounded to 4,096 ids so
# that its checkpoints (~85 bytes an id) do not fill the 8 MiB by themselves: with the default
# bound a 200-kill run keeps ~3 MB of them, less than the spent reserve's 3 MiB stays free,
# and the daemon refuses ingest and stays unready, as it should on a disk that full.
#
# Writes the report to benches/results/drill-<time>-http-fulldisk-seed<SEED>.json and exits
# non-zero when the drill fails (any loss, non-identical duplicate, broken chain, 5xx answer,
# envelope left untombstoned; or no 429 enospc/reserve at all: the disk never filled), keeping
# the data directory; then prints what the daemon logged about the reserve, ENOSPC and torn
# tails, and fails if it logged a panic, a damaged range or a missing segment. The daemons log
# outside the tmpfs: on the full filesystem their lines would be lost exactly when it matters.
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-60}
SEED=${2:-67}
OUT=benches/results
mkdir -p "$OUT"
cargo build --release --quiet
MNT=$(mktemp -d "${TMPDIR:-/tmp}/full-disk-drill.XXXXXX")
mount -t tmpfs -o size=48m tmpfs "$MNT"
LOG="${TMPDIR:-/tmp}/full-disk-drill-$(date -u +%Y-%m-%dT%H%M%SZ).log"
trap 'umount "$MNT"; rmdir "$MNT"' EXIT
# The filler: another process's 40 MiB, written (tmpfs has no fallocate of unwritten blocks).
head -c $((40 * 1024 * 1024)) /dev/zero > "$MNT/filler"
# CLEAN_STOPS=PCT: that share of the rounds ends with SIGTERM (see scripts/long-drill.sh).
CLEAN_STOPS=${CLEAN_STOPS:-0}
SUFFIX=""
[ "$CLEAN_STOPS" != 0 ] && SUFFIX="-clean$CLEAN_STOPS"
REPORT="$OUT/drill-$(date -u +%Y-%m-%dT%H%MZ)-http-fulldisk-seed$SEED$SUFFIX.json"
set +e
time ./target/release/spoolgate drill --kills "$KILLS" --seed "$SEED" --sink http \
    --flaky-stream --flip-rules --clean-stops "$CLEAN_STOPS" --clients 4 --data-dir "$MNT/data" --log "$LOG" --full-disk \
    --set spool.segment_bytes_max=1048576 --set spool.record_bytes_max=65536 \
    --set ingest.envelope_bytes_max=60000 --set spool.commit_batch_bytes_max=65536 \
    --set spool.disk_free_soft_bytes=0 --set spool.disk_free_hard_bytes=0 \
    --set spool.reserve_bytes=3145728 \
    --set forward.batch_records_max=50 --set ingest.dedup_entries_max=4096 \
    --report-json "$REPORT"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    # Keep what the failed drill left, for a look at the spool (spoolgate inspect).
    KEPT="${TMPDIR:-/tmp}/full-disk-drill-data-$(date -u +%H%M%S)"
    cp -a "$MNT/data" "$KEPT" && echo "the data directory is kept in $KEPT" >&2
fi
echo "the daemons' log: $LOG"
if [ -f "$LOG" ]; then
    echo "reserve spent: $(grep -c 'spent the disk reserve' "$LOG" || true)," \
        "made again: $(grep -c 'holding the disk reserve' "$LOG" || true)," \
        "runs of ENOSPC refusals: $(grep -c 'append refused: filesystem full' "$LOG" || true)," \
        "torn tails truncated at a restart: $(grep -c 'truncating a torn tail' "$LOG" || true)"
    # A torn tail is what a kill during an unacknowledged write leaves; a damaged range
    # inside a segment, a missing segment, or a panic, is a failure.
    if grep -E 'panicked|WARN.*damaged|before the durable end|reader skipped bytes|segments are missing|segment is missing' "$LOG"; then
        echo "the daemon logged a panic, a damaged segment or a missing one" >&2
        exit 1
    fi
fi
exit "$rc"
