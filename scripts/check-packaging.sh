#!/usr/bin/env bash
# Checks everything under packaging/ and the Debian package, as CI does (scripts/test.sh calls
# this after the Rust tests):
#   - promtool: the alert rules parse, their unit tests pass, the scrape config is valid, and a
#     live /metrics scrape of a running daemon passes `promtool check metrics`;
#   - the example config passes `spoolgate config check`;
#   - systemd-analyze verify accepts the unit;
#   - cargo deb builds the package, it holds the expected files, and the binary extracted from
#     it with dpkg -x runs;
#   - the dashboard is valid JSON, the Kubernetes manifest valid YAML, and the config in its
#     ConfigMap passes `spoolgate config check`.
# It installs promtool (Debian's prometheus package) and cargo-deb when they are missing. If an
# installation fails (no network), that check is reported as SKIPPED and the script says so
# loudly; a check that runs and fails always fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

FAILED=()
SKIPPED=()
pass() { echo "PASS  $1"; }
fail() { echo "FAIL  $1"; FAILED+=("$1"); }
skip() { echo "SKIP  $1 ($2)"; SKIPPED+=("$1"); }
check() { # name, command...
    local name=$1; shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

SCRATCH=$(mktemp -d)
DAEMON_PID=""
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt_install() { # package
    apt-get install -y --no-install-recommends "$1" >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends "$1" >/dev/null 2>&1; }
}
command -v promtool >/dev/null || apt_install prometheus || true
command -v systemd-analyze >/dev/null || apt_install systemd || true

cargo build --release --quiet
BIN=$PWD/target/release/spoolgate

check "spoolgate config check packaging/config/spoolgate.toml" \
    "$BIN" config check packaging/config/spoolgate.toml

if command -v promtool >/dev/null; then
    check "promtool check rules" promtool check rules packaging/prometheus/alerts.yml
    check "promtool test rules" promtool test rules packaging/prometheus/alerts_test.yml
    check "promtool check config" promtool check config packaging/prometheus/prometheus.yml

    # A live scrape after some traffic, so labelled series exist.
    "$BIN" serve --data-dir "$SCRATCH/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
        >"$SCRATCH/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 200); do
        [ -s "$SCRATCH/data/spoolgate.addr" ] && break
        sleep 0.05
    done
    ADDRS=$(cat "$SCRATCH/data/spoolgate.addr")
    INGEST=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['ingest'])" "$ADDRS")
    METRICS=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['metrics'])" "$ADDRS")
    for _ in $(seq 200); do
        "$BIN" health "http://$METRICS/readyz" >/dev/null 2>&1 && break
        sleep 0.05
    done
    curl -sf -XPOST "http://$INGEST/v1/envelopes" -H 'content-type: application/json' \
        -d '{"source":"packaging-check","text":"mail jane@example.com"}' >/dev/null
    curl -s -XPOST "http://$INGEST/v1/envelopes" -H 'content-type: text/plain' -d 'x' >/dev/null || true
    curl -sf "http://$METRICS/metrics" >"$SCRATCH/metrics.txt"
    # promtool prints lint findings (such as a counter without _total) and exits non-zero on
    # them; every finding is a failure here, since all names are meant to follow the rules.
    if promtool check metrics <"$SCRATCH/metrics.txt" >"$SCRATCH/lint.txt" 2>&1; then
        pass "promtool check metrics (live scrape, $(grep -c '^# HELP' "$SCRATCH/metrics.txt") families)"
    else
        cat "$SCRATCH/lint.txt"
        fail "promtool check metrics (live scrape)"
    fi
    kill -TERM "$DAEMON_PID"
    if wait "$DAEMON_PID"; then pass "daemon exits 0 on SIGTERM"; else fail "daemon exits 0 on SIGTERM"; fi
    DAEMON_PID=""
else
    skip "promtool checks" "promtool could not be installed"
fi

# Every spoolgate_* name the alert rules and the dashboard use must be one src/metrics.rs
# defines (a histogram's _bucket, _sum and _count included): a renamed metric would otherwise
# leave an alert that never fires. The live scrape cannot tell, since a labelled family with no
# series yet is not exported.
defined=$(grep -o '"spoolgate_[a-z0-9_]*"' src/metrics.rs | tr -d '"' | sort -u)
unknown=""
for name in $(grep -oh 'spoolgate_[a-z0-9_]*[a-z0-9]' packaging/prometheus/alerts.yml \
        packaging/grafana/spoolgate-dashboard.json | sort -u); do
    base=${name%_bucket}; base=${base%_sum}; base=${base%_count}
    if ! grep -qx "$name" <<<"$defined" && ! grep -qx "$base" <<<"$defined"; then
        unknown="$unknown $name"
    fi
done
if [ -z "$unknown" ]; then
    pass "alert rules and dashboard name only metrics src/metrics.rs defines"
else
    fail "alert rules or dashboard name metrics src/metrics.rs does not define:$unknown"
fi

if command -v systemd-analyze >/dev/null; then
    # verify resolves ExecStart=, so check a copy whose binary path points at the build, and
    # whose User= exists here (the package's postinst creates `spoolgate`).
    mkdir -p "$SCRATCH/unit"
    sed -e "s|/usr/bin/spoolgate|$BIN|g" packaging/systemd/spoolgate.service \
        >"$SCRATCH/unit/spoolgate.service"
    if systemd-analyze verify "$SCRATCH/unit/spoolgate.service" >"$SCRATCH/verify.txt" 2>&1 &&
        ! grep -v -e "Failed to resolve user" -e "^$" "$SCRATCH/verify.txt" | grep -q .; then
        pass "systemd-analyze verify packaging/systemd/spoolgate.service"
    else
        cat "$SCRATCH/verify.txt"
        fail "systemd-analyze verify packaging/systemd/spoolgate.service"
    fi
else
    skip "systemd-analyze verify" "systemd-analyze not available"
fi

if ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --locked --quiet >/dev/null 2>&1 || true
fi
if cargo deb --version >/dev/null 2>&1; then
    if cargo deb --no-build --quiet --output "$SCRATCH/spoolgate.deb" >"$SCRATCH/deb.log" 2>&1; then
        pass "cargo deb"
        dpkg-deb -c "$SCRATCH/spoolgate.deb" >"$SCRATCH/contents.txt"
        for path in ./usr/bin/spoolgate ./etc/spoolgate/spoolgate.toml \
            /systemd/system/spoolgate.service ./usr/share/doc/spoolgate/spool-format.md; do
            check "package contains $path" grep -q -- "$path" "$SCRATCH/contents.txt"
        done
        check "package marks the config as a conffile" \
            sh -c "dpkg-deb -I '$SCRATCH/spoolgate.deb' conffiles | grep -qx /etc/spoolgate/spoolgate.toml"
        dpkg -x "$SCRATCH/spoolgate.deb" "$SCRATCH/root"
        if VERSION=$("$SCRATCH/root/usr/bin/spoolgate" --version); then
            pass "spoolgate --version from the unpacked package: $VERSION"
        else
            fail "spoolgate --version from the unpacked package"
        fi
    else
        cat "$SCRATCH/deb.log"
        fail "cargo deb"
    fi
else
    skip "cargo deb" "cargo-deb could not be installed"
fi

check "grafana dashboard is valid JSON" python3 -c \
    "import json; json.load(open('packaging/grafana/spoolgate-dashboard.json'))"
if python3 -c "import yaml" 2>/dev/null; then
    check "kubernetes manifest is valid YAML" python3 -c \
        "import yaml,sys; list(yaml.safe_load_all(open('packaging/kubernetes/spoolgate-sidecar.yaml')))"
    python3 -c "
import yaml
for doc in yaml.safe_load_all(open('packaging/kubernetes/spoolgate-sidecar.yaml')):
    if doc and doc.get('kind') == 'ConfigMap':
        open('$SCRATCH/k8s.toml', 'w').write(doc['data']['spoolgate.toml'])"
    check "the kubernetes ConfigMap's config passes spoolgate config check" \
        "$BIN" config check "$SCRATCH/k8s.toml"
else
    skip "kubernetes manifest YAML parse" "python3-yaml not installed"
fi

echo
if [ ${#SKIPPED[@]} -gt 0 ]; then
    echo "WARNING: ${#SKIPPED[@]} packaging check(s) SKIPPED: ${SKIPPED[*]}"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "packaging checks FAILED: ${FAILED[*]}"
    exit 1
fi
echo "packaging checks passed"
