#!/usr/bin/env bash
# Time to ready after `kill -9`, an A/B of two binaries (interleaved, same script, same disk):
# what a crash drill waits for. See scripts/bench_ready.py for the procedure. Usage:
#   scripts/bench-ready.sh OLD_BIN NEW_BIN
#   ROUNDS=3 RESTARTS=3 SIZES=1000,100000 scripts/bench-ready.sh OLD_BIN NEW_BIN
# To compare with an older commit, build it in a worktree first, e.g.
#   git worktree add /tmp/old <commit> && CARGO_TARGET_DIR=/tmp/old-target \
#       cargo build --release --manifest-path /tmp/old/Cargo.toml
#   scripts/bench-ready.sh /tmp/old-target/release/spoolgate target/release/spoolgate
# Scratch data directories go under target/ (the data disk, not a tmpfs /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?old binary}
NEW=${2:?new binary}
mkdir -p target/bench-ready
SCRATCH=$(pwd)/target/bench-ready exec python3 scripts/bench_ready.py "$OLD" "$NEW"
