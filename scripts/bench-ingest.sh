#!/usr/bin/env bash
# Ingest and end-to-end benchmark: spoolgate next to Redis 7 XADD with appendfsync always, both
# on the same filesystem, measured in the same run and alternated round by round so a slow
# phase of a shared disk hits both (Redis goes first in odd rounds, spoolgate in even ones, so
# neither always runs right after the other). Writes
# benches/results/ingest-<date>T<hhmm>Z.{jsonl,md,svg}, named by the run's start so that runs
# of the same day do not overwrite each other.
#
#   scripts/bench-ingest.sh            # 3 rounds (ROUNDS=5 for more), ~7 minutes
#
# What it measures (durability `always` everywhere, passed to every daemon explicitly so a
# changed default cannot change what is measured):
#   (a) single-envelope JSON requests, 64 connections: acks/s and p50/p99/p99.9 latency,
#       vs redis-benchmark -c 50 -P 1 XADD of a 512 B field (the baseline the issue
#       prescribes, kept as the headline), and also vs -c 64 -P 1, the same number of requests
#       in flight as spoolgate's 64 connections;
#   (b) 100-envelope msgpack batches, 16 connections: envelopes/s, vs XADD -c 50 -P 16, and
#       also vs -c 100 -P 16 (1,600 envelopes in flight, as 16 requests of 100);
#   (c) end to end with the file sink: envelopes acknowledged, gated, chained, delivered and
#       tombstoned per second, vs ingest-only (forward.enabled=false) at the same load, for
#       both (b)'s batches and (a)'s single-envelope requests; for the batches also a paced
#       run at 90% of the end-to-end rate, sampling the backlog once a second (the report
#       flags a paced run that reached less than 97% of its target rate);
#   a concurrency sweep (1..256 connections) for the plot.
# Ingest-only runs use forward.enabled=false so the comparison with XADD (which also only
# appends) is like for like; (c) shows what forwarding costs on top. For the same reason Redis
# runs with AOF rewrites off (--auto-aof-rewrite-percentage 0): by default it rewrites the AOF
# each time the file has doubled since the last rewrite (past 64 MB), several times a run,
# while spoolgate's ingest-only runs compact nothing. Each Redis measurement follows an
# unrecorded run of the same configuration, as the load generator drops its first second, and
# that run's rate sizes -n so that the measured run lasts about DURATION seconds, as
# spoolgate's does; the report gives both lengths. The report also flags every spoolgate run
# that got answers other than 202 or transport errors (its rate counts 202s only and its
# latencies are those of 202s).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
REDIS_PORT=${REDIS_PORT:-6390}
OUT=benches/results
STARTED=$(date -u +%Y-%m-%dT%H:%MZ)
DATE=${STARTED//:/}
mkdir -p "$OUT"
mkdir -p target
SCRATCH=$(mktemp -d "$PWD/target/bench-ingest.XXXXXX")
REDIS_PID=""
DAEMON_PID=""
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    apt-get install -y redis-server redis-tools >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y redis-server redis-tools >/dev/null; }
fi
cargo build --release --quiet
BIN=$PWD/target/release/spoolgate

start_redis() {
    rm -rf "$SCRATCH/redis" && mkdir -p "$SCRATCH/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$SCRATCH/redis" \
        --appendonly yes --appendfsync always --auto-aof-rewrite-percentage 0 --save "" \
        --daemonize no --logfile "$SCRATCH/redis.log" &
    REDIS_PID=$!
    for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
    echo "redis did not start" >&2; exit 1
}
stop_redis() { kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true; REDIS_PID=""; }

FIELD=$(head -c 512 /dev/zero | tr '\0' 'x')
# One redis-benchmark run of XADD: prints rps, p50 ms and p99 ms, read from its CSV by column
# name (Redis 7.0: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
# "p95_latency_ms","p99_latency_ms","max_latency_ms"), so a version that renames them fails
# the run instead of reporting another column. redis-benchmark counts an error reply (a full
# disk's MISCONF, say) as a finished request, so the server's own count of error replies is
# compared before and after, and a run with any fails the script: no Redis row holds failed
# XADDs.
redis_errors() {
    redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | awk -F: '$1 == "total_error_replies" { print $2 }'
}
redis_xadd() { # clients pipeline requests
    local before after
    before=$(redis_errors)
    redis-benchmark -p "$REDIS_PORT" -c "$1" -P "$2" -n "$3" --csv XADD bench '*' f "$FIELD" \
        | python3 -c '
import csv, sys
r = list(csv.DictReader(sys.stdin))[-1]
print(r["rps"], r["p50_latency_ms"], r["p99_latency_ms"])'
    after=$(redis_errors)
    if [ -z "$before" ] || [ "$after" != "$before" ]; then
        echo "Redis answered errors during XADD -c $1 -P $2 (total_error_replies $before -> $after)" >&2
        exit 1
    fi
}

start_daemon() { # extra --set arguments
    rm -rf "$SCRATCH/data"
    "$BIN" serve --data-dir "$SCRATCH/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
        --set spool.durability=always "$@" >"$SCRATCH/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 200); do
        [ -f "$SCRATCH/data/spoolgate.addr" ] && "$BIN" health \
            "http://$(python3 -c "import json;print(json.load(open('$SCRATCH/data/spoolgate.addr'))['metrics'])")/readyz" \
            >/dev/null 2>&1 && return
        sleep 0.05
    done
    echo "spoolgate did not become ready" >&2; cat "$SCRATCH/daemon.log" >&2; exit 1
}
stop_daemon() { kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""; }

sg_bench() { # label, then spoolgate bench arguments; appends a JSON line to results
    # The daemon's CPU time (user + system, from /proc) over the run, warm-up included, per
    # envelope acknowledged in that time; with --wait-drained it also covers the pipeline's
    # work on every one of them. And its peak resident memory since it started (VmHWM; each
    # workload has a daemon of its own, except the sweep's rows, which share one).
    local label=$1; shift
    local before after rss_kib
    before=$(awk '{print $14 + $15}' "/proc/$DAEMON_PID/stat")
    "$BIN" bench --data-dir "$SCRATCH/data" --duration-s "$DURATION" --json "$@" >"$SCRATCH/row.json"
    after=$(awk '{print $14 + $15}' "/proc/$DAEMON_PID/stat")
    rss_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$DAEMON_PID/status")
    python3 -c "
import json, sys
r = json.load(open('$SCRATCH/row.json'))
r['label'] = '$label'; r['round'] = $ROUND
acked = r['envelopes_acknowledged_total']
r['daemon_cpu_us_per_envelope'] = ($after - $before) * 1e6 / $CLK_TCK / acked if acked else None
r['daemon_rss_peak_bytes'] = ${rss_kib:-0} * 1024 or None
print(json.dumps(r))" >>"$SCRATCH/results.jsonl"
}
redis_row() { # label clients pipeline; appends a JSON line to results
    local warm n out rps p50 p99
    redis-cli -p "$REDIS_PORT" del bench >/dev/null
    # The unrecorded run: the counterpart of the load generator's warm-up second (connections
    # open, the stream and the AOF already growing), long enough to give a usable rate (50
    # pipelines per connection; a fraction of a second at the rates seen here).
    warm=$(($2 * $3 * 50 > 5000 ? $2 * $3 * 50 : 5000))
    out=$(redis_xadd "$2" "$3" "$warm")
    read -r rps _ <<<"$out"
    n=$(python3 -c "print(max($2 * $3 * 10, round($rps * $DURATION)))")
    out=$(redis_xadd "$2" "$3" "$n")
    read -r rps p50 p99 <<<"$out"
    python3 -c "
import json
print(json.dumps({'label': '$1', 'round': $ROUND, 'connections': $2, 'pipeline': $3,
                  'requests': $n, 'duration_s': $n / $rps, 'envelopes_per_s': $rps,
                  'latency_p50_ms': $p50, 'latency_p99_ms': $p99}))" >>"$SCRATCH/results.jsonl"
}

CLK_TCK=$(getconf CLK_TCK)
INGEST_ONLY=(--set forward.enabled=false --set spool.quota_soft_bytes=30000000000
    --set spool.quota_hard_bytes=32000000000)
: >"$SCRATCH/results.jsonl"

# Redis's rows of one round: the prescribed baselines and, next to each, the configuration with
# as many requests in flight as spoolgate's load (64 connections; 16 x 100 envelopes).
redis_rows() {
    start_redis
    redis_row redis_p1 50 1
    redis_row redis_p1_c64 64 1
    redis_row redis_p16 50 16
    redis_row redis_p16_c100 100 16
    stop_redis
}
# spoolgate's ingest-only rows of one round. A fresh spool for each workload, and quotas well
# above what it writes: with forwarding off nothing is compacted, and on a fast phase of the
# disk one 5-second batch row writes 3-4 GB, enough to reach the default quota (whose 429s
# would count as lost throughput).
ingest_rows() {
    for size in 512 1024; do
        start_daemon "${INGEST_ONLY[@]}"
        sg_bench "ingest_single_$size" --connections 64 --text-bytes "$size"
        stop_daemon
    done
    for size in 512 1024; do
        start_daemon "${INGEST_ONLY[@]}"
        sg_bench "ingest_batch_$size" --connections 16 --batch 100 --text-bytes "$size"
        stop_daemon
    done
}

for ROUND in $(seq 1 "$ROUNDS"); do
    echo "round $ROUND/$ROUNDS" >&2
    if [ $((ROUND % 2)) -eq 1 ]; then
        redis_rows
        ingest_rows
    else
        ingest_rows
        redis_rows
    fi

    for size in 512 1024; do
        start_daemon
        sg_bench "e2e_batch_$size" --connections 16 --batch 100 --text-bytes "$size" --wait-drained
        e2e=$(tail -1 "$SCRATCH/results.jsonl" | python3 -c "import json,sys; print(json.load(sys.stdin)['end_to_end_envelopes_per_s'])")
        stop_daemon
        start_daemon
        sg_bench "paced_batch_$size" --connections 16 --batch 100 --text-bytes "$size" \
            --rate "$(python3 -c "print($e2e*0.9)")" --wait-drained
        stop_daemon
    done
    # Single-envelope requests end to end: forwarding competes with the costlier per-request
    # path for the same 2 cores, so this is the ratio a sidecar of one-envelope clients sees.
    for size in 512 1024; do
        start_daemon
        sg_bench "e2e_single_$size" --connections 64 --text-bytes "$size" --wait-drained
        stop_daemon
    done
done

# The concurrency sweep for the plot (one round: it shows a shape, the table gives medians).
ROUND=0
start_redis
for c in 1 4 16 64 256; do redis_row "sweep_redis_$c" "$c" 1; done
stop_redis
start_daemon "${INGEST_ONLY[@]}"
for c in 1 4 16 64 256; do sg_bench "sweep_spoolgate_$c" --connections "$c" --text-bytes 512; done
stop_daemon

cp "$SCRATCH/results.jsonl" "$OUT/ingest-$DATE.jsonl"
python3 scripts/bench_report.py "$OUT/ingest-$DATE.jsonl" "$OUT/ingest-$DATE" \
    "$(uname -n) ($(nproc) cores, $(uname -r)), started $STARTED"
cat "$OUT/ingest-$DATE.md"
