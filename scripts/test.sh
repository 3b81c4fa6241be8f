#!/usr/bin/env bash
# The whole test suite: the README's second command. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/reference_reader.rs runs the Python reference reader of spool-format.md.
command -v python3 >/dev/null || apt-get install -y python3 >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y python3 >/dev/null; }
cargo test --all-targets
# Packaging: promtool on the alert rules and a live scrape, systemd-analyze on the unit, and the
# Debian package built and unpacked (installs promtool and cargo-deb when missing).
./scripts/check-packaging.sh
