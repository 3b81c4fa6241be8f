#!/usr/bin/env python3
"""Replay of a large backlog: how long a restart takes to become ready, how fast the backlog it
finds is forwarded, and how much memory that takes, next to the live end-to-end rate measured
in the same run. Run through scripts/bench-replay.sh, which builds the binary first.

For each backlog size, in each round:
  1. an ingest-only daemon (forward.enabled=false) is filled with N envelopes of 1 KiB text
     (100-envelope msgpack batches, paced so the count is N), then stopped with SIGTERM;
  2. the page cache is dropped (as after a power loss; skipped, and said so, without root);
  3. a daemon with forwarding on starts on that spool: time to /readyz (recovery checks every
     frame's CRC, the ledger scan decodes every envelope), then the time until
     spoolgate_spool_pending_records reaches 0 (replay: gate, chain, seal, file sink,
     tombstones, compaction), its peak RSS (VmHWM) and CPU;
  4. `spoolgate verify` checks the file sink's output: every record there, every chain intact.
The baseline, once per round: a fresh daemon with forwarding on, loaded live with the same
batches for DURATION seconds (--wait-drained), its end-to-end envelopes/s and peak RSS.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "spoolgate")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SIZES = [int(s) for s in os.environ.get("SIZES", "500000,2000000").split(",")]
FILL_RATE = int(os.environ.get("FILL_RATE", "200000"))
DURATION = int(os.environ.get("DURATION", "5"))
TEXT_BYTES = int(os.environ.get("TEXT_BYTES", "1024"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
BIG_QUOTAS = [
    "--set", "spool.quota_soft_bytes=30000000000",
    "--set", "spool.quota_hard_bytes=32000000000",
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Daemon:
    """A daemon on ports chosen by the OS, logging to daemon.log next to its data directory.
    scripts/bench_ready.py uses it too, with another binary and a finer poll."""

    def __init__(self, data_dir, extra, binary=BIN, poll_s=0.02):
        self.data_dir = data_dir
        self.poll_s = poll_s
        self.started = time.monotonic()
        self.log = open(os.path.join(os.path.dirname(data_dir), "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0", *extra],
            stdout=self.log, stderr=self.log)
        self.metrics = None
        self.ingest = None

    def wait_ready(self, timeout_s=600):
        """Seconds from spawn to the first 2xx of /readyz."""
        addr_path = os.path.join(self.data_dir, "spoolgate.addr")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}; see daemon.log")
            # The file of the daemon that filled the spool may still be there: only this
            # process's counts.
            if self.metrics is None and os.path.exists(addr_path):
                try:
                    addr = json.load(open(addr_path))
                    if addr["pid"] == self.proc.pid:
                        self.metrics = addr["metrics"]
                        self.ingest = addr["ingest"]
                except (ValueError, KeyError):
                    pass
            if self.metrics is not None:
                try:
                    with urllib.request.urlopen(f"http://{self.metrics}/readyz", timeout=1) as r:
                        if 200 <= r.status < 300:
                            return time.monotonic() - self.started
                except OSError:
                    pass
            time.sleep(self.poll_s)
        raise SystemExit("daemon did not become ready")

    def scrape(self):
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def cpu_s(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_peak_bytes(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()
        if self.proc.returncode != 0:
            raise SystemExit(f"daemon exited with {self.proc.returncode} on SIGTERM")


def bench(data_dir, *args):
    out = subprocess.run(
        [BIN, "bench", "--data-dir", data_dir, "--json", "--connections", "16", "--batch", "100",
         "--text-bytes", str(TEXT_BYTES), *args],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def drop_caches():
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def dir_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def replay_row(scratch, n):
    data = os.path.join(scratch, "data")
    shutil.rmtree(data, ignore_errors=True)
    d = Daemon(data, ["--set", "forward.enabled=false", *BIG_QUOTAS])
    d.wait_ready()
    duration_s = max(1, round(n / FILL_RATE))
    bench(data, "--rate", str(n / duration_s), "--duration-s", str(duration_s), "--warmup-s", "0")
    filled = int(d.scrape()["spoolgate_spool_appends_total"])
    d.stop()
    spool_bytes = dir_bytes(os.path.join(data, "spool"))
    cold = drop_caches()

    d = Daemon(data, BIG_QUOTAS)
    ready_s = d.wait_ready()
    cpu_at_ready = d.cpu_s()
    rss_at_ready = d.rss_peak_bytes()
    ready_at = time.monotonic()
    # Done when every envelope of the backlog is delivered and tombstoned (the pending gauge
    # is refreshed once a second, too coarse to time by).
    while True:
        m = d.scrape()
        if m["spoolgate_tombstones_written_total"] >= filled:
            break
        time.sleep(0.05)
    drain_s = time.monotonic() - ready_at
    replayed = int(m["spoolgate_replay_recovered_total"])
    cpu_s = d.cpu_s()
    rss = d.rss_peak_bytes()
    # Then compaction shrinks the spool to its active segment (it runs at least once a second).
    deadline = time.monotonic() + 30
    while d.scrape()["spoolgate_spool_segments"] > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    spool_after = dir_bytes(os.path.join(data, "spool"))
    pending_after = int(d.scrape()["spoolgate_spool_pending_records"])
    d.stop()
    verify = subprocess.run([BIN, "verify", os.path.join(data, "out")],
                            capture_output=True, text=True)
    if verify.returncode != 0:
        raise SystemExit(f"verify failed after replay: {verify.stdout}{verify.stderr}")
    verified = int(verify.stdout.split(" record(s)")[0].rsplit(" ", 1)[1])
    if verified != filled:
        raise SystemExit(f"{filled} envelopes in the backlog, {verified} records in the sink")
    shutil.rmtree(data)
    return {
        "backlog_envelopes": filled,
        "spool_bytes": spool_bytes,
        "cold_cache": cold,
        "ready_s": ready_s,
        "cpu_s_to_ready": cpu_at_ready,
        "rss_peak_at_ready_bytes": rss_at_ready,
        "replayed": replayed,
        "drain_s": drain_s,
        "replay_envelopes_per_s": replayed / drain_s if drain_s > 0 else None,
        "daemon_cpu_us_per_envelope": cpu_s * 1e6 / replayed if replayed else None,
        "rss_peak_bytes": rss,
        "spool_bytes_after": spool_after,
        "pending_after": pending_after,
        "verified_records": verified,
    }


def live_row(scratch):
    data = os.path.join(scratch, "data")
    shutil.rmtree(data, ignore_errors=True)
    d = Daemon(data, BIG_QUOTAS)
    d.wait_ready()
    cpu0 = d.cpu_s()
    r = bench(data, "--duration-s", str(DURATION), "--wait-drained")
    cpu = d.cpu_s() - cpu0
    rss = d.rss_peak_bytes()
    d.stop()
    shutil.rmtree(data)
    return {
        "end_to_end_envelopes_per_s": r["end_to_end_envelopes_per_s"],
        "daemon_cpu_us_per_envelope": cpu * 1e6 / r["envelopes_acknowledged_total"],
        "rss_peak_bytes": rss,
    }


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def report(rows, out_md, machine):
    lines = [f"# Replay of a backlog, {machine}", "",
             f"{ROUNDS} rounds, {TEXT_BYTES} B texts (one in three with PII), 100-envelope "
             "msgpack batches, durability `always`, file sink. Medians of the rounds; the "
             "ratio is replay envelopes/s over the live end-to-end envelopes/s of the same "
             "round.", "",
             "| backlog envelopes | spool GB | page cache | time to ready s | ready s per GB | "
             "replay env/s | live e2e env/s | replay / live | CPU us/env, replay / live | "
             "peak RSS MB at ready / after replay / live | spool MB after |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---|---|---:|"]
    lives = [r for r in rows if r["kind"] == "live"]
    for n in SIZES:
        rs = [r for r in rows if r["kind"] == "replay" and r["size"] == n]
        ratios = []
        for r in rs:
            live = next(l for l in lives if l["round"] == r["round"])
            ratios.append(r["replay_envelopes_per_s"] / live["end_to_end_envelopes_per_s"])

        def med(key, rows_=rs):
            return median([r[key] for r in rows_])

        gb = med("spool_bytes") / 1e9
        lines.append(
            f"| {med('backlog_envelopes'):,.0f} | {gb:.2f} | "
            f"{'cold' if all(r['cold_cache'] for r in rs) else 'warm'} | "
            f"{med('ready_s'):.2f} | {med('ready_s') / gb:.2f} | "
            f"{med('replay_envelopes_per_s'):,.0f} | "
            f"{med('end_to_end_envelopes_per_s', lives):,.0f} | {median(ratios):.2f} | "
            f"{med('daemon_cpu_us_per_envelope'):.1f} / "
            f"{med('daemon_cpu_us_per_envelope', lives):.1f} | "
            f"{med('rss_peak_at_ready_bytes') / 1e6:.0f} / {med('rss_peak_bytes') / 1e6:.0f} / "
            f"{med('rss_peak_bytes', lives) / 1e6:.0f} | {med('spool_bytes_after') / 1e6:.0f} |")
    lines += ["", "Per round:", "",
              "| round | backlog | ready s | replay env/s | live e2e env/s | ratio | "
              "peak RSS MB | verified records |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] != "replay":
            continue
        live = next(l for l in lives if l["round"] == r["round"])
        lines.append(
            f"| {r['round']} | {r['backlog_envelopes']:,} | {r['ready_s']:.2f} | "
            f"{r['replay_envelopes_per_s']:,.0f} | {live['end_to_end_envelopes_per_s']:,.0f} | "
            f"{r['replay_envelopes_per_s'] / live['end_to_end_envelopes_per_s']:.2f} | "
            f"{r['rss_peak_bytes'] / 1e6:.0f} | {r['verified_records']:,} |")
    open(out_md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    out_dir = os.path.join(ROOT, "benches", "results")
    stamp = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
    machine = (f"{os.uname().nodename} ({os.cpu_count()} cores, {os.uname().release}), "
               f"{time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}")
    scratch = tempfile.mkdtemp(dir=os.path.join(ROOT, "target"), prefix="bench-replay.")
    rows = []
    try:
        for rnd in range(1, ROUNDS + 1):
            log(f"round {rnd}/{ROUNDS}: live end to end")
            rows.append({"kind": "live", "round": rnd, **live_row(scratch)})
            log(f"  {rows[-1]}")
            for n in SIZES:
                log(f"round {rnd}/{ROUNDS}: replay of {n} envelopes")
                rows.append({"kind": "replay", "round": rnd, "size": n,
                             **replay_row(scratch, n)})
                log(f"  {rows[-1]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with open(os.path.join(out_dir, f"replay-{stamp}.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    report(rows, os.path.join(out_dir, f"replay-{stamp}.md"), machine)


if __name__ == "__main__":
    main()
