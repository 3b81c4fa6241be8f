#!/usr/bin/env python3
"""Time to ready after `kill -9`, two builds side by side: what an operator's crash drill waits
for. Run through scripts/bench-ready.sh OLD NEW, which builds both commits.

For each spool size, in each round, for each build in alternating order:
  1. a daemon with the default configuration (forwarding to the file sink on) starts on a fresh
     data directory and takes N envelopes of 1 KiB text (100-envelope NDJSON batches);
  2. it is killed with SIGKILL, then restarted and killed again RESTARTS times; each restart's
     seconds from spawn to the first 2xx of /readyz (polled every 2 ms) and the recovery time
     it logs ("recovery finished ... duration_ms") are recorded.
The page cache is left alone: a drill restarts on a warm machine. Prints one row per size and
build with medians, and the ratio NEW/OLD of the median time to ready.
"""

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import urllib.request

import bench_replay

OLD_BIN, NEW_BIN = sys.argv[1], sys.argv[2]
ROUNDS = int(os.environ.get("ROUNDS", "5"))
RESTARTS = int(os.environ.get("RESTARTS", "3"))
SIZES = [int(s) for s in os.environ.get("SIZES", "1000,100000").split(",")]
TEXT = "spool drill " * 85  # about 1 KiB


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Daemon(bench_replay.Daemon):
    """bench_replay's daemon, with the default configuration, a 2 ms readiness poll, and what
    a drill does to it."""

    def __init__(self, binary, data_dir):
        self.log_path = os.path.join(os.path.dirname(data_dir), "daemon.log")
        self.log_from = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        super().__init__(data_dir, [], binary=binary, poll_s=0.002)

    def recovery_ms(self):
        with open(self.log_path, "rb") as f:
            f.seek(self.log_from)
            text = f.read().decode(errors="replace")
        found = re.findall(r"recovery finished.*?duration_ms=(\d+)", text)
        return int(found[-1]) if found else None

    def fill(self, n):
        url = f"http://{self.ingest}/v1/envelopes"
        sent = 0
        while sent < n:
            k = min(100, n - sent)
            body = "\n".join(
                json.dumps({"source": "drill", "tenant": f"t{(sent + i) % 16}", "text": TEXT})
                for i in range(k)).encode()
            req = urllib.request.Request(url, data=body,
                                         headers={"content-type": "application/x-ndjson"})
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status != 202:
                    raise SystemExit(f"ingest answered {r.status}")
            sent += k

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


median = bench_replay.median


def main():
    scratch = tempfile.mkdtemp(prefix="bench-ready-", dir=os.environ.get("SCRATCH"))
    results = {(n, b): {"ready_s": [], "recovery_ms": []} for n in SIZES for b in ("old", "new")}
    try:
        for rnd in range(ROUNDS):
            for n in SIZES:
                order = [("old", OLD_BIN), ("new", NEW_BIN)]
                if rnd % 2:
                    order.reverse()
                for name, binary in order:
                    data_dir = os.path.join(scratch, f"{name}-{n}-{rnd}", "data")
                    os.makedirs(data_dir)
                    d = Daemon(binary, data_dir)
                    d.wait_ready()
                    d.fill(n)
                    d.kill()
                    for _ in range(RESTARTS):
                        d = Daemon(binary, data_dir)
                        ready = d.wait_ready()
                        results[(n, name)]["ready_s"].append(ready)
                        results[(n, name)]["recovery_ms"].append(d.recovery_ms())
                        d.kill()
                    log(f"round {rnd + 1}/{ROUNDS} size {n} {name}: "
                        f"ready {[round(x * 1000) for x in results[(n, name)]['ready_s'][-RESTARTS:]]} ms")
                    shutil.rmtree(os.path.dirname(data_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("| envelopes before the kill | build | time to ready p50 (min-max) | recovery p50 | ready NEW/OLD |")
    print("|---|---|---|---|---|")
    for n in SIZES:
        old = median(results[(n, "old")]["ready_s"])
        for name in ("old", "new"):
            r = results[(n, name)]
            ready = r["ready_s"]
            ratio = f"{median(ready) / old:.2f}" if name == "new" else ""
            print(f"| {n:,} | {name} | {median(ready) * 1000:.0f} ms "
                  f"({min(ready) * 1000:.0f}-{max(ready) * 1000:.0f}) | "
                  f"{median(r['recovery_ms'])} ms | {ratio} |")


if __name__ == "__main__":
    main()
