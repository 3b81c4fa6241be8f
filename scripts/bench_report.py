#!/usr/bin/env python3
"""Turns scripts/bench-ingest.sh's JSON lines into a Markdown table (medians over rounds, with
ratios against the Redis baselines from the same run, and Redis's latencies next to
spoolgate's) and an SVG plot of the concurrency sweep. Below the tables it names every run whose
figures do not mean what the table says: answers other than 202 or transport errors, and paced
runs below 97% of their target rate. Reads the files of older runs
too, with a dash where they lack a figure. Standard library only, so it runs wherever the
benchmark does."""

import json
import statistics
import sys
from collections import defaultdict


def load(path):
    rows = defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                rows[r["label"]].append(r)
    return rows


def med(rows, label, key):
    vals = [r[key] for r in rows.get(label, []) if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def num(v, spec):
    """v formatted with spec, or a dash where nothing was measured (older runs lack some rows)."""
    return "–" if v != v else format(v, spec)


def rate(v):
    """An envelopes/s median as text, or a dash."""
    return "–" if v != v else f"{v:,.0f}/s"


def cpu(rows, label):
    """Median daemon CPU per envelope in microseconds, or a dash for runs that did not record it."""
    return num(med(rows, label, "daemon_cpu_us_per_envelope"), ".1f")


def rss(rows, label):
    """Median peak resident memory of the daemon in MB, or a dash for runs that did not record it."""
    return num(med(rows, label, "daemon_rss_peak_bytes") / 1e6, ".0f")


def ratio_med(rows, a, b, key_a="envelopes_per_s", key_b="envelopes_per_s"):
    """Median over rounds of a/b, pairing rows of the same round."""
    by_round = {r["round"]: r for r in rows.get(b, [])}
    ratios = [r[key_a] / by_round[r["round"]][key_b]
              for r in rows.get(a, []) if r["round"] in by_round and by_round[r["round"]][key_b]]
    return statistics.median(ratios) if ratios else float("nan")


def redis_latency(rows, label):
    """Median p50 / p99 of a Redis row in ms, or a dash for runs that did not record them."""
    p50, p99 = med(rows, label, "latency_p50_ms"), med(rows, label, "latency_p99_ms")
    return "–" if p50 != p50 and p99 != p99 else f"{num(p50, '.2f')} / {num(p99, '.2f')}"


def paced_fraction(r):
    """Achieved / target rate of a paced run, or None for a run that was not paced."""
    target = r.get("rate_target_envelopes_per_s")
    return r["envelopes_per_s"] / target if target else None


# A paced run that reached less than this share of its target rate measured the backlog of a
# lower rate than the one it is reported at.
PACED_MIN = 0.97


def lengths(rows, prefix):
    """Range of the measured seconds of the rows whose label starts with prefix, as text."""
    vals = [r["duration_s"] for label, rs in rows.items() if label.startswith(prefix)
            for r in rs if r.get("duration_s") is not None]
    if not vals:
        return None
    return f"{min(vals):.1f}-{max(vals):.1f} s (median {statistics.median(vals):.1f})"


def flags(rows):
    """Lines naming every run whose figures do not mean what the table says they do."""
    out = []
    # A run that met backpressure or errors measured them, not the throughput: its rate counts
    # 202s only and its latencies are those of the 202s.
    refused = []
    for label, rs in sorted(rows.items()):
        for r in rs:
            parts = []
            if r.get("requests_429"):
                parts.append(f"429 x{r['requests_429']:,}")
            other = r.get("other_statuses")
            if other:
                parts += [f"{status} x{n:,}" for status, n in sorted(other.items())]
            elif r.get("requests_other"):
                parts.append(f"other statuses x{r['requests_other']:,}")
            if r.get("transport_errors"):
                parts.append(f"transport errors x{r['transport_errors']:,}")
            if parts:
                refused.append(f"{label} (round {r['round']}: {', '.join(parts)})")
    if refused:
        out += ["", "**Answers other than 202, or transport errors, during:** "
                + ", ".join(refused) + " (rates count 202s only; latencies are those of 202s)."]
    slow = [f"{label} (round {r['round']}: {paced_fraction(r):.3f} of "
            f"{r['rate_target_envelopes_per_s']:,.0f}/s)"
            for label, rs in sorted(rows.items()) for r in rs
            if paced_fraction(r) is not None and paced_fraction(r) < PACED_MIN]
    if slow:
        out += ["", f"**Paced runs below {PACED_MIN:.0%} of their target rate** (their backlog is "
                "that of a lower rate): " + ", ".join(slow) + "."]
    return out


def table(rows, machine):
    n = len(rows.get("redis_p1", []))
    redis_s, spoolgate_s = lengths(rows, "redis_"), lengths(rows, "ingest_")
    # Only runs whose Redis rows record their length come from the script that alternates the
    # order, turns AOF rewrites off and warms Redis up; older files get the older sentence.
    if redis_s and spoolgate_s:
        out = [f"Measured on {machine}; medians of {n} rounds, spoolgate and Redis alternated "
               "in each round on the same filesystem (Redis first in odd rounds, spoolgate in "
               "even ones), durability `always` / `appendfsync always` with AOF rewrites off. "
               f"Run lengths: Redis {redis_s}, each after an unrecorded run of the same "
               f"configuration; spoolgate {spoolgate_s}, after a 1 s warm-up.", ""]
    else:
        out = [f"Measured on {machine}; medians of {n} rounds, spoolgate and Redis alternated "
               "in each round on the same filesystem, durability `always` / `appendfsync always`.",
               ""]
    out += ["| workload | spoolgate | XADD baseline | ratio | XADD, same in flight | ratio vs same in flight | spoolgate p50 ms | spoolgate p99 ms | spoolgate p99.9 ms | XADD p50 / p99 ms, baseline | XADD p50 / p99 ms, same in flight | daemon CPU us/env | daemon peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, base, peer, name in [
        ("ingest_single_512", "redis_p1", "redis_p1_c64",
         "(a) 1 envelope/request, 512 B, 64 conns (baseline -c 50 -P 1; same in flight -c 64 -P 1)"),
        ("ingest_single_1024", "redis_p1", "redis_p1_c64",
         "(a) 1 envelope/request, 1 KiB, 64 conns (baseline -c 50 -P 1; same in flight -c 64 -P 1)"),
        ("ingest_batch_512", "redis_p16", "redis_p16_c100",
         "(b) 100-envelope msgpack, 512 B, 16 conns (baseline -c 50 -P 16; same in flight -c 100 -P 16)"),
        ("ingest_batch_1024", "redis_p16", "redis_p16_c100",
         "(b) 100-envelope msgpack, 1 KiB, 16 conns (baseline -c 50 -P 16; same in flight -c 100 -P 16)"),
    ]:
        out.append(
            f"| {name} | {rate(med(rows, label, 'envelopes_per_s'))} | "
            f"{rate(med(rows, base, 'envelopes_per_s'))} | "
            f"{num(ratio_med(rows, label, base), '.2f')} | "
            f"{rate(med(rows, peer, 'envelopes_per_s'))} | "
            f"{num(ratio_med(rows, label, peer), '.2f')} | "
            f"{num(med(rows, label, 'latency_p50_ms'), '.2f')} | "
            f"{num(med(rows, label, 'latency_p99_ms'), '.2f')} | "
            f"{num(med(rows, label, 'latency_p999_ms'), '.2f')} | "
            f"{redis_latency(rows, base)} | {redis_latency(rows, peer)} | "
            f"{cpu(rows, label)} | {rss(rows, label)} |")
    out += ["", "(Ratios are medians of the per-round ratios. spoolgate's latencies run from a "
            "request's write to its 202; redis-benchmark's are per command, from the write of "
            "its pipeline to the pipeline's first reply, so with -P 16 they compare with a "
            "100-envelope request's.)"]
    out += ["", "End to end (file sink; accepted → gated → chained → delivered → tombstoned), "
            "next to ingest-only at the same load from the same run:", "",
            "| load | text | ingest-only env/s | end-to-end env/s | e2e / ingest-only | ack p99 ms, ingest-only / e2e | daemon CPU us/env, ingest-only / e2e | daemon peak RSS MB, ingest-only / e2e | backlog, records (min / max / last of samples once a second; batches paced at 90% of the e2e rate) | paced rate, achieved / target (min over rounds) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for shape, load_name in (("batch", "100-envelope msgpack, 16 conns"),
                             ("single", "1 envelope/request, 64 conns")):
        for size in (512, 1024):
            ingest, e2e = f"ingest_{shape}_{size}", f"e2e_{shape}_{size}"
            if not rows.get(e2e):
                continue
            # Batches outrun the pipeline, so their backlog is sampled in a paced run at 90% of
            # the end-to-end rate; single-envelope requests do not, so at their full rate.
            paced = rows.get(f"paced_{shape}_{size}", [])
            sampled, note = (paced, "") if paced else (rows.get(e2e, []), " (full rate)")
            depth = "–"
            if sampled:
                samples = sampled[len(sampled) // 2].get("pending_samples") or []
                if samples:
                    depth = f"{min(samples):,.0f} / {max(samples):,.0f} / {samples[-1]:,.0f}{note}"
            fractions = [f for f in map(paced_fraction, paced) if f is not None]
            achieved = "–"
            if fractions:
                achieved = f"{min(fractions):.3f}" + (" (below 0.97)" if min(fractions) < PACED_MIN else "")
            out.append(
                f"| {load_name} | {size} B | {num(med(rows, ingest, 'envelopes_per_s'), ',.0f')} | "
                f"{num(med(rows, e2e, 'end_to_end_envelopes_per_s'), ',.0f')} | "
                f"{num(ratio_med(rows, e2e, ingest, 'end_to_end_envelopes_per_s'), '.2f')} | "
                f"{num(med(rows, ingest, 'latency_p99_ms'), '.2f')} / "
                f"{num(med(rows, e2e, 'latency_p99_ms'), '.2f')} | "
                f"{cpu(rows, ingest)} / {cpu(rows, e2e)} | "
                f"{rss(rows, ingest)} / {rss(rows, e2e)} | {depth} | {achieved} |")
    out += flags(rows)
    return "\n".join(out) + "\n"


def svg(rows, machine):
    conns = [1, 4, 16, 64, 256]
    series = [("spoolgate (1 envelope/request)", "sweep_spoolgate_", "#1f77b4"),
              ("Redis XADD -P 1", "sweep_redis_", "#d62728")]
    pts = {name: [(c, med(rows, f"{prefix}{c}", "envelopes_per_s")) for c in conns]
           for name, prefix, _ in series}
    ymax = max([y for p in pts.values() for _, y in p if y == y] + [1]) * 1.1
    w, h, left, bottom, top, right = 640, 400, 80, 50, 40, 20
    pw, ph = w - left - right, h - top - bottom

    def x(i):
        return left + pw * i / (len(conns) - 1)

    def y(v):
        return top + ph * (1 - v / ymax)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w/2}" y="20" text-anchor="middle" font-size="14">Acknowledged writes/s vs concurrent connections (fsync before ack)</text>',
             f'<line x1="{left}" y1="{top+ph}" x2="{left+pw}" y2="{top+ph}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top+ph}" stroke="black"/>']
    for i, c in enumerate(conns):
        parts.append(f'<text x="{x(i)}" y="{top+ph+18}" text-anchor="middle">{c}</text>')
    parts.append(f'<text x="{left+pw/2}" y="{h-8}" text-anchor="middle">connections</text>')
    for k in range(6):
        v = ymax * k / 5
        parts.append(f'<line x1="{left-4}" y1="{y(v)}" x2="{left+pw}" y2="{y(v)}" stroke="#ddd"/>')
        parts.append(f'<text x="{left-8}" y="{y(v)+4}" text-anchor="end">{v/1000:.0f}k</text>')
    for idx, (name, _, color) in enumerate(series):
        p = [(x(i), y(v)) for i, (_, v) in enumerate(pts[name]) if v == v]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in p)}"/>')
        for a, b in p:
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>')
        parts.append(f'<rect x="{left+12}" y="{top+8+idx*18}" width="12" height="3" fill="{color}"/>')
        parts.append(f'<text x="{left+30}" y="{top+13+idx*18}">{name}</text>')
    parts.append(f'<text x="{w-right}" y="{h-8}" text-anchor="end" font-size="9" fill="#666">{machine}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main():
    src, stem, machine = sys.argv[1], sys.argv[2], sys.argv[3]
    rows = load(src)
    with open(stem + ".md", "w") as f:
        f.write(table(rows, machine))
    with open(stem + ".svg", "w") as f:
        f.write(svg(rows, machine))


if __name__ == "__main__":
    main()
