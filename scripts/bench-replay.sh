#!/usr/bin/env bash
# Replay of a large backlog after a restart: time to ready, replay envelopes/s against the live
# end-to-end rate of the same run, and peak memory at two backlog sizes (the difference is what
# each pending envelope costs in memory). Writes benches/results/replay-<UTC time>.{md,jsonl}.
#
#   scripts/bench-replay.sh                       # 3 rounds of 0.5M and 2M 1 KiB envelopes
#   ROUNDS=1 SIZES=100000 scripts/bench-replay.sh # a quick look
#
# Needs about 10 GB free under target/ for the 2M backlog (spool, seals, file-sink output).
# Drops the page cache before each restart (as after a power loss), which needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 scripts/bench_replay.py
