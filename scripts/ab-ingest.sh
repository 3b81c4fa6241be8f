#!/usr/bin/env bash
# Interleaved A/B of two spoolgate binaries on one ingest workload, for changes too small for
# scripts/bench-ingest.sh to resolve: each pair runs both on fresh data directories, A first in
# odd pairs and B first in even ones (A B, B A, A B, ...), so neither always runs on a disk the
# other has just written to, and the script prints every pair and the median of the per-pair
# ratios (B/A) of envelopes/s and of daemon CPU per envelope. Both daemons run with durability
# `always`, set explicitly so that a default changed between the two builds cannot make the
# comparison. Usage:
#   scripts/ab-ingest.sh OLD_BIN NEW_BIN [PAIRS] [-- bench flags]
# Default workload: 100-envelope msgpack batches of 1 KiB texts at 16 connections, ingest only
# (forward.enabled = false), 5 s measured per run. Example, for another workload:
#   scripts/ab-ingest.sh /tmp/old /tmp/new 7 -- --connections 64 --batch 1 --text-bytes 512
# With E2E=1 the daemons forward to the file sink and each run waits until everything it
# acknowledged is delivered and tombstoned: the rate is then the end-to-end one, and the CPU
# per envelope covers forwarding too. Each pair also shows both runs' ack p99 (ms) and the
# summary its median ratio, for changes aimed at latency. A_SETS and B_SETS add `--set` flags
# to one side's daemon, so that one binary can be compared with itself under two settings:
#   A_SETS="" B_SETS="--set forward.workers=2" E2E=1 scripts/ab-ingest.sh BIN BIN 5
set -euo pipefail
A=${1:?old binary}
B=${2:?new binary}
PAIRS=${3:-5}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
FLAGS=("$@")
[ ${#FLAGS[@]} -gt 0 ] || FLAGS=(--connections 16 --batch 100 --text-bytes 1024)
SERVE=(--set forward.enabled=false)
RATE=envelopes_per_s
if [ -n "${E2E:-}" ]; then
    SERVE=()
    FLAGS+=(--wait-drained)
    RATE=end_to_end_envelopes_per_s
fi
# On the disk under test, not in /tmp (a tmpfs on many systems, where fdatasync costs nothing).
mkdir -p target
SCRATCH=$(mktemp -d "$PWD/target/ab-ingest.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

run() { # BIN SETS -> "envelopes_per_s cpu_us_per_envelope ack_p99_ms"
    local bin=$1 dir ready=""
    local -a sets
    read -r -a sets <<<"${2:-}"
    dir=$(mktemp -d "$SCRATCH/run.XXXX")
    "$bin" serve --set data_dir="$dir/data" --set ingest.listen=127.0.0.1:0 \
        --set metrics.listen=127.0.0.1:0 --set spool.durability=always \
        ${SERVE[@]+"${SERVE[@]}"} ${sets[@]+"${sets[@]}"} \
        --set spool.quota_soft_bytes=30000000000 --set spool.quota_hard_bytes=32000000000 \
        >"$dir/log" 2>&1 &
    local pid=$!
    # Ready, not merely listening: the CPU of the start-up (recovery, the first segment) is not
    # the workload's, and a load sent before /readyz would meet 503s.
    for _ in $(seq 200); do
        if [ -f "$dir/data/spoolgate.addr" ] && "$bin" health \
            "http://$(python3 -c "import json;print(json.load(open('$dir/data/spoolgate.addr'))['metrics'])")/readyz" \
            >/dev/null 2>&1; then
            ready=1
            break
        fi
        sleep 0.05
    done
    if [ -z "$ready" ]; then
        echo "$bin did not become ready" >&2
        cat "$dir/log" >&2
        kill "$pid"
        exit 1
    fi
    local t0 t1
    t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
    "$bin" bench --data-dir "$dir/data" --duration-s 5 --warmup-s 1 --json "${FLAGS[@]}" >"$dir/out.json"
    t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    kill -TERM "$pid"
    wait "$pid" || true
    python3 - "$dir/out.json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$RATE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ticks, hz = int(sys.argv[2]), int(sys.argv[3])
# The CPU ticks span the warm-up second and the last answers after the measured window, and so
# does the load generator's total of acknowledged envelopes: no correction is needed.
envelopes = r["envelopes_acknowledged_total"]
print(round(r[sys.argv[4]]), round(ticks / hz / envelopes * 1e6, 3), r["latency_p99_ms"])
PY
    rm -rf "$dir"
}

echo "pair order  A env/s  B env/s  B/A   A us/env  B us/env  B/A   A p99 ms  B p99 ms  B/A"
ratios=()
for i in $(seq 1 "$PAIRS"); do
    if [ $((i % 2)) -eq 1 ]; then
        order=AB
        out=$(run "$A" "${A_SETS:-}"); read -r ra ca pa <<<"$out"
        out=$(run "$B" "${B_SETS:-}"); read -r rb cb pb <<<"$out"
    else
        order=BA
        out=$(run "$B" "${B_SETS:-}"); read -r rb cb pb <<<"$out"
        out=$(run "$A" "${A_SETS:-}"); read -r ra ca pa <<<"$out"
    fi
    line=$(python3 -c "print('%4d %5s %8d %8d %5.3f %9.3f %9.3f %5.3f %9.2f %9.2f %5.3f' % ($i, '$order', $ra, $rb, $rb/$ra, $ca, $cb, $cb/$ca, $pa, $pb, $pb/$pa))")
    echo "$line"
    ratios+=("$(python3 -c "print($rb/$ra, $cb/$ca, $pb/$pa)")")
done
printf '%s\n' "${ratios[@]}" | python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
print("median B/A: envelopes/s %.3f, CPU per envelope %.3f, ack p99 %.3f (%d of %d pairs B faster)" % (
    statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows),
    statistics.median(r[2] for r in rows), sum(r[0] > 1 for r in rows), len(rows)))'
