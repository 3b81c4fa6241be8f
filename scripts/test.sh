#!/usr/bin/env bash
# The whole test suite: the README's second command. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets
# Packaging: promtool on the alert rules and a live scrape, systemd-analyze on the unit, and the
# Debian package built and unpacked (installs promtool and cargo-deb when missing).
./scripts/check-packaging.sh
