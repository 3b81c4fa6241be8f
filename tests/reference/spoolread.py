#!/usr/bin/env python3
"""A second reader of spoolgate's files, written from spool-format.md alone.

spool-format.md promises that a reader in another language needs nothing else to list
segments, read every record, recognise damage, decode envelopes and verify hash chains. This
file keeps that promise honest: it uses only Python's standard library (zlib for CRC-32,
hashlib for SHA-256, its own small msgpack codec), and every rule it applies cites the section
of the spec it comes from. tests/reference_reader.rs runs it against the spec's golden bytes
and against spools and sink output written by the daemon, and compares its findings with
spoolgate's own.

Usage (each prints one JSON object on stdout, exits 1 when a check fails):

    spoolread.py dump SPOOL_DIR         every record in log order (§1-§4), decoded (§5, §8),
                                        and the segments missing between present ones (§4)
    spoolread.py verify-spool DATA_DIR  the seals in the spool against chain-heads (§8)
    spoolread.py verify-sink PATH       forward records, JSON lines (a file or a directory) (§8)
    spoolread.py dedup DATA_DIR         the dedup checkpoints (§10)
"""

import hashlib
import json
import os
import struct
import sys
import zlib

# --- msgpack (only what the spec's payloads use) ---------------------------------------------


class Reader:
    def __init__(self, data):
        self.data = data
        self.at = 0

    def take(self, n):
        if self.at + n > len(self.data):
            raise ValueError("msgpack: truncated")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def value(self):
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self.str(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        sizes = {0xCC: "B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: "b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if b in sizes:
            fmt = sizes[b]
            return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        if b == 0xCA:
            return struct.unpack(">f", self.take(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        lengths = {0xD9: "B", 0xDA: ">H", 0xDB: ">I"}
        if b in lengths:
            fmt = lengths[b]
            return self.str(struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0])
        if b in (0xC4, 0xC5, 0xC6):
            fmt = {0xC4: "B", 0xC5: ">H", 0xC6: ">I"}[b]
            return bytes(self.take(struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]))
        if b in (0xDC, 0xDD):
            fmt = ">H" if b == 0xDC else ">I"
            n = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
            return [self.value() for _ in range(n)]
        if b in (0xDE, 0xDF):
            fmt = ">H" if b == 0xDE else ">I"
            return self.map(struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0])
        raise ValueError(f"msgpack: unsupported type byte 0x{b:02x}")

    def str(self, n):
        return bytes(self.take(n)).decode("utf-8")

    def map(self, n):
        out = {}
        for _ in range(n):
            k = self.value()
            out[k] = self.value()
        return out


def unpack(data):
    r = Reader(data)
    v = r.value()
    if r.at != len(data):
        raise ValueError("msgpack: trailing bytes")
    return v


def pack_uint(n):
    # §5: integers in their smallest encoding.
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return b"\xcc" + struct.pack("B", n)
    if n < 0x10000:
        return b"\xcd" + struct.pack(">H", n)
    if n < 0x100000000:
        return b"\xce" + struct.pack(">I", n)
    return b"\xcf" + struct.pack(">Q", n)


def pack_int(n):
    # §5: signed forms only for negative values, again the smallest.
    if n >= 0:
        return pack_uint(n)
    if n >= -32:
        return struct.pack("b", n)
    for code, fmt in ((0xD0, "b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")):
        lo = -(1 << (struct.calcsize(fmt) * 8 - 1))
        if n >= lo:
            return bytes([code]) + struct.pack(fmt, n)
    raise ValueError("integer out of range")


def pack_str(s):
    b = s.encode("utf-8")
    n = len(b)
    if n < 32:
        head = bytes([0xA0 | n])
    elif n < 0x100:
        head = b"\xd9" + struct.pack("B", n)
    elif n < 0x10000:
        head = b"\xda" + struct.pack(">H", n)
    else:
        head = b"\xdb" + struct.pack(">I", n)
    return head + b


def pack_len(n, fix, small, big):
    if n < 16:
        return bytes([fix | n])
    if n < 0x10000:
        return bytes([small]) + struct.pack(">H", n)
    return bytes([big]) + struct.pack(">I", n)


def pack_map_head(n):
    return pack_len(n, 0x80, 0xDE, 0xDF)


def pack_array_head(n):
    return pack_len(n, 0x90, 0xDC, 0xDD)


def pack_json_value(v):
    """A client `meta` value as §5 encodes it: null, bool, smallest ints, other numbers as
    float64, strings, arrays, and objects with keys sorted bytewise at every depth."""
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        return pack_int(v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        return pack_str(v)
    if isinstance(v, list):
        return pack_array_head(len(v)) + b"".join(pack_json_value(x) for x in v)
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: k.encode("utf-8"))
        return pack_map_head(len(keys)) + b"".join(pack_str(k) + pack_json_value(v[k]) for k in keys)
    raise ValueError(f"not a JSON value: {v!r}")


# --- §5 Envelope v1, §6 slots, §8 canonical bytes --------------------------------------------

# §5: the keys, in the order they appear, and how each value is written.
ENVELOPE_KEYS = [
    ("version", "uint"),
    ("id", "str"),
    ("source", "str"),
    ("tenant", "str"),
    ("text", "str"),
    ("text_hash", "str"),
    ("char_len", "uint"),
    ("pii", "map_uint"),
    ("tags", "array_str"),
    ("intent_hint", "str"),
    ("routing_hints", "map_str"),
    ("summary_extractive", "str"),
    ("embed_preview", "array_f32"),
    ("embed_ref", "str"),
    ("ts_ms", "uint"),
    ("meta", "json"),
    ("slot", "uint"),
    ("priority", "str"),
]
KNOWN_KEYS = {k for k, _ in ENVELOPE_KEYS}


def sorted_keys(m):
    return sorted(m, key=lambda k: k.encode("utf-8"))


def pack_envelope(env):
    """§5: one encoding per envelope. Unknown keys are ignored (readers must); empty values
    are absent, so they are skipped here too."""
    parts = []
    for key, kind in ENVELOPE_KEYS:
        if key not in env:
            continue
        v = env[key]
        if kind == "uint":
            body = pack_uint(v)
        elif kind == "str":
            body = pack_str(v)
        elif kind == "map_uint":
            body = pack_map_head(len(v)) + b"".join(pack_str(k) + pack_uint(v[k]) for k in sorted_keys(v))
        elif kind == "map_str":
            body = pack_map_head(len(v)) + b"".join(pack_str(k) + pack_str(v[k]) for k in sorted_keys(v))
        elif kind == "array_str":
            body = pack_array_head(len(v)) + b"".join(pack_str(t) for t in v)
        elif kind == "array_f32":
            body = pack_array_head(len(v)) + b"".join(b"\xca" + struct.pack(">f", x) for x in v)
        else:
            body = pack_json_value(v)
        parts.append(pack_str(key) + body)
    return pack_map_head(len(parts)) + b"".join(parts)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def stream_of(env):
    # §6: the tenant, or the source when there is no tenant.
    return env["tenant"] if env.get("tenant") else env["source"]


def slot_of(stream):
    return fnv1a64(stream.encode("utf-8")) % 1024


def canonical(stream, seq, slot, env):
    # §8: a map of stream, seq, slot, envelope, in this order.
    return (
        pack_map_head(4)
        + pack_str("stream")
        + pack_str(stream)
        + pack_str("seq")
        + pack_uint(seq)
        + pack_str("slot")
        + pack_uint(slot)
        + pack_str("envelope")
        + pack_envelope(env)
    )


def link(prev_hex, stream, seq, slot, env):
    return hashlib.sha256(bytes.fromhex(prev_hex) + canonical(stream, seq, slot, env)).hexdigest()


# --- §1-§4 segments and frames ----------------------------------------------------------------

HEADER_LEN = 64
MARKER = b"\xf7SGF"
RECORD_BYTES_MAX = (1 << 20) + (64 << 10)  # §3: the writer's default bound
KINDS = {1: "envelope", 2: "sealed", 3: "tombstone", 4: "rotation"}


def segment_ids(spool_dir):
    ids = []
    for name in os.listdir(spool_dir):
        digits = name[:-4] if name.endswith(".seg") else ""
        if len(digits) == 20 and digits.isdigit():
            ids.append(int(digits))
    return sorted(ids)


def payload_max(spool_dir):
    """§3: the frame payload bound of a spool: the largest `record_bytes_max` an intact
    segment header records (§2, bytes 40..44), and at least the default."""
    bound = RECORD_BYTES_MAX
    for seg in segment_ids(spool_dir):
        with open(os.path.join(spool_dir, f"{seg:020}.seg"), "rb") as f:
            head = f.read(HEADER_LEN)
        if len(head) == HEADER_LEN and head[:8] == b"SPOOLSEG" and zlib.crc32(head[:60]) == struct.unpack_from("<I", head, 60)[0]:
            bound = max(bound, struct.unpack_from("<I", head, 40)[0])
    return bound


def frame_at(data, at, bound):
    """(kind, payload, total) when a valid frame with a stored payload of at most `bound`
    bytes starts at `at` (§3), else None. A stuffed payload (flags bit 0) is returned
    unstuffed."""
    if at + 16 > len(data) or data[at : at + 4] != MARKER:
        return None
    length, kind, flags, reserved, crc = struct.unpack_from("<IBBHI", data, at + 4)
    if kind == 0 or flags not in (0, 1) or reserved != 0 or length > bound:
        return None
    end = at + 16 + length
    if end > len(data):
        return None
    payload = data[at + 16 : end]
    if zlib.crc32(data[at + 4 : at + 12] + payload) != crc:
        return None
    if flags == 1:
        # Every 0xF7 is followed by 0x00 in a stuffed payload; remove those.
        if payload.count(b"\xf7") != payload.count(b"\xf7\x00"):
            return None
        payload = payload.replace(b"\xf7\x00", b"\xf7")
    total = (16 + length + 7) // 8 * 8
    return kind, payload, total


def read_segment(data, bound):
    """The frames of one segment and its damaged ranges, by the table of §4 (read-only: a torn
    tail is reported, not zeroed)."""
    header = {"valid": False}
    if len(data) >= HEADER_LEN and data[:8] == b"SPOOLSEG" and zlib.crc32(data[:60]) == struct.unpack_from("<I", data, 60)[0]:
        version, header_len, _flags, seg_id, created_ms, seg_max, rec_max = struct.unpack_from("<HHIQQQI", data, 8)
        if version not in (1, 2):
            raise SystemExit(f"segment format version {version}: this reader knows 1 and 2 (§2)")
        header = {"valid": True, "version": version, "id": seg_id, "created_ms": created_ms, "segment_bytes_max": seg_max, "record_bytes_max": rec_max}
    frames, damaged = [], []
    at = HEADER_LEN
    while at < len(data):
        found = frame_at(data, at, bound)
        if found:
            kind, payload, total = found
            frames.append((at, kind, payload))
            at += total
            continue
        # Rows 2, 3, 5: find the next valid frame at an aligned offset.
        nxt = data.find(MARKER, at + 1)
        while nxt != -1 and (nxt % 8 != 0 or not frame_at(data, nxt, bound)):
            nxt = data.find(MARKER, nxt + 1)
        if nxt != -1:
            damaged.append({"offset": at, "bytes": nxt - at})
            at = nxt
            continue
        tail = data[at:]
        if any(tail):
            damaged.append({"offset": at, "bytes": len(tail.rstrip(b"\0")), "tail": True})
        break
    return header, frames, damaged


def records(spool_dir):
    """Every record in log order (§1): (segment, offset, kind, payload)."""
    bound = payload_max(spool_dir)
    for seg in segment_ids(spool_dir):
        with open(os.path.join(spool_dir, f"{seg:020}.seg"), "rb") as f:
            data = f.read()
        _header, frames, _damaged = read_segment(data, bound)
        for offset, kind, payload in frames:
            yield seg, offset, kind, payload


def position(p):
    return (p["segment"], p["offset"])


# --- commands ----------------------------------------------------------------------------------


def cmd_dump(spool_dir):
    ids = segment_ids(spool_dir)
    # Row 9 of §4: ids missing between two present ones (a missing prefix is compaction's).
    missing = [[a + 1, b - 1] for a, b in zip(ids, ids[1:]) if a + 1 < b]
    out = {"segments": [], "records": [], "missing_segments": missing}
    rotations = []  # what each segment's last rotation frame (§3, kind 4) names
    zeroed = []  # whether each segment is a file of zeros with no header (row 7)
    bound = payload_max(spool_dir)
    for seg in ids:
        with open(os.path.join(spool_dir, f"{seg:020}.seg"), "rb") as f:
            data = f.read()
        header, frames, damaged = read_segment(data, bound)
        out["segments"].append({"id": seg, "header": header, "records": len(frames), "damaged": damaged})
        rotated_to = None
        for _offset, kind, payload in frames:
            if kind == 4:
                # §3: exactly a one-key map {"next_segment": uint}; the last one counts.
                try:
                    frame = unpack(payload)
                except (ValueError, IndexError, struct.error):
                    frame = None
                ok = isinstance(frame, dict) and list(frame) == ["next_segment"] and type(frame["next_segment"]) is int
                rotated_to = frame["next_segment"] if ok else None
        rotations.append(rotated_to)
        zeroed.append(not header["valid"] and not any(data))
    # Row 9 at the end: the newest segment's rotation frame names the next id, and that
    # segment is not there (checked again now: a running daemon may have just created it).
    # A newest file of zeros with no header is one recovery removes (row 7): the segment
    # before it is then the newest, and if it names that file, its contents were lost.
    newest = len(ids) - 1 - (1 if ids and zeroed[-1] and len(ids) > 1 else 0)
    if newest >= 0:
        nxt = ids[newest] + 1
        gone = not os.path.exists(os.path.join(spool_dir, f"{nxt:020}.seg")) or (zeroed[-1] and ids[-1] == nxt)
        if rotations[newest] == nxt and gone and not any(a <= nxt <= b for a, b in missing):
            missing.append([nxt, nxt])
    for seg, offset, kind, payload in records(spool_dir):
        rec = {"segment": seg, "offset": offset, "kind": KINDS.get(kind, kind)}
        if kind in KINDS:
            rec["payload"] = unpack(payload)
        out["records"].append(rec)
    return out, not missing


def cmd_verify_spool(data_dir):
    """§8, "Verifying the seals in a spool": per stream one run of consecutive seqs, linked,
    each hash recomputed, starting from the chain-heads checkpoint."""
    spool_dir = os.path.join(data_dir, "spool")
    heads = {}
    first_kept = None
    heads_path = os.path.join(data_dir, "chain-heads")
    if os.path.exists(heads_path):
        with open(heads_path, "rb") as f:
            data = f.read()
        if data[:8] == b"SGHEADS1":
            body = data[12:]
            if len(data) < 12 or zlib.crc32(body) != struct.unpack_from("<I", data, 8)[0]:
                return {"errors": [f"{heads_path}: damaged (CRC mismatch)"]}, False
        else:
            body = data  # the form written before 2026-12-03: the body alone
        r = Reader(body)
        for stream, head in r.value():
            heads[stream] = (head["seq"], bytes(head["hash"]).hex())
        # §8: optionally followed by one uint, the oldest segment compaction kept.
        first_kept = r.value() if r.at < len(body) else None
        if r.at != len(body) or not (first_kept is None or (type(first_kept) is int and first_kept >= 0)):
            return {"errors": [f"{heads_path}: damaged (bytes after its heads)"]}, False
    last = {}  # stream -> (seq, hash hex) of the latest entry read
    present = segment_ids(spool_dir)
    missing_oldest = []
    if first_kept is not None and present and present[0] > first_kept:
        missing_oldest = [first_kept, present[0] - 1]
    envelopes, sealed, tombstoned = set(), {}, set()
    tomb_heads = {}  # stream -> highest seq a tombstone's heads name
    errors = []
    for seg, offset, kind, payload in records(spool_dir):
        if kind == 1:
            envelopes.add((seg, offset))
        elif kind == 3:
            t = unpack(payload)
            tombstoned.update(position(p) for p in t["positions"])
            # §8: the optional heads, a floor for the stream heads a restart continues from.
            for h in t.get("heads", []):
                if h["seq"] > tomb_heads.get(h["stream"], 0):
                    tomb_heads[h["stream"]] = h["seq"]
        elif kind == 2:
            for entry in unpack(payload)["entries"]:
                r = entry["record"]
                stream, seq = r["stream"], r["seq"]
                sealed[position(entry["position"])] = r
                want = link(r["prev_hash"], stream, seq, r["slot"], r["envelope"])
                if want != r["hash"]:
                    errors.append(f"{stream} seq {seq}: hash does not match its canonical bytes")
                if r["slot"] != slot_of(stream) or stream_of(r["envelope"]) != stream:
                    errors.append(f"{stream} seq {seq}: slot or stream does not match the envelope")
                if stream in last:
                    prev_seq, prev_hash = last[stream]
                    if seq != prev_seq + 1 or r["prev_hash"] != prev_hash:
                        errors.append(f"{stream} seq {seq}: does not follow seq {prev_seq}")
                elif stream in heads:
                    c, head_hash = heads[stream]
                    ok = (seq == c + 1 and r["prev_hash"] == head_hash) or (seq == c and r["hash"] == head_hash) or seq < c
                    if not ok:
                        errors.append(f"{stream} seq {seq}: does not continue the checkpoint head at {c}")
                elif seq != 1 or r["prev_hash"] != "0" * 64:
                    errors.append(f"{stream} seq {seq}: first entry without a checkpoint head must be seq 1")
                if stream in heads and seq == heads[stream][0] and r["hash"] != heads[stream][1]:
                    errors.append(f"{stream} seq {seq}: differs from the checkpoint head")
                last[stream] = (seq, r["hash"])
    for stream, (c, _) in heads.items():
        if stream in last and last[stream][0] < c:
            errors.append(f"{stream}: entries end at seq {last[stream][0]}, before the checkpoint head {c}")
    # Where each stream continues after a restart: the highest of checkpoint, seals and
    # tombstone heads (§8, "Replay rule").
    streams = {s: v[0] for s, v in heads.items()}
    for s, v in last.items():
        streams[s] = max(streams.get(s, 0), v[0])
    for s, seq in tomb_heads.items():
        streams[s] = max(streams.get(s, 0), seq)
    # §8, "Replay rule": a sealed entry naming no envelope record that could be read, and no
    # tombstone, is pending as well (re-sent from the entry), unless its segment is below the
    # oldest present one (compaction's: delivered).
    first_present = present[0] if present else 0
    orphans = {p for p in sealed if p not in envelopes and p not in tombstoned and p[0] >= first_present}
    pending = (envelopes - tombstoned) | orphans
    out = {
        "envelopes": len(envelopes),
        "sealed_entries": len(sealed),
        "tombstoned": len(envelopes & tombstoned),
        "pending": len(pending),
        "pending_sealed": len(pending & set(sealed)),
        "orphans": len(orphans),
        "streams": streams,
        # Segments below the oldest present one and not below the one compaction last kept:
        # removed by something else (§8, "The chain-heads checkpoint").
        "missing_oldest_segments": missing_oldest,
        "errors": errors[:10],
    }
    return out, not errors


def sink_lines(path):
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".jsonl")]
    for name in files:
        with open(name, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield name, number, line


def cmd_verify_sink(path):
    """§8, "Forwarded records": per stream, equal seqs identical, seqs 1, 2, 3, ... without a
    gap, each prev_hash the previous hash, each hash recomputed from the record's fields."""
    by_stream = {}
    errors = []
    lines = duplicates = 0
    for name, number, line in sink_lines(path):
        lines += 1
        rec = json.loads(line)
        # §8: a line holds the record's keys and nothing else, hashes in lower case; what the
        # hash does not cover must not be there.
        extra = set(rec) - {"stream", "seq", "prev_hash", "hash", "slot", "envelope"}
        extra |= {"envelope." + k for k in set(rec.get("envelope", {})) - KNOWN_KEYS}
        if extra:
            errors.append(f"{name}:{number}: keys the hash does not cover: {sorted(extra)}")
            continue
        if any(c.isupper() for c in rec["prev_hash"] + rec["hash"]):
            errors.append(f"{name}:{number}: prev_hash and hash must be lowercase hex")
            continue
        seqs = by_stream.setdefault(rec["stream"], {})
        seen = seqs.get(rec["seq"])
        if seen is not None:
            duplicates += 1
            if seen != rec:
                errors.append(f"{name}:{number}: {rec['stream']} seq {rec['seq']} delivered twice, differently")
            continue
        seqs[rec["seq"]] = rec
    for stream, seqs in sorted(by_stream.items()):
        prev = "0" * 64
        for expect, seq in enumerate(sorted(seqs), 1):
            r = seqs[seq]
            if seq != expect:
                errors.append(f"{stream}: seq {expect} missing")
                break
            if r["prev_hash"] != prev:
                errors.append(f"{stream} seq {seq}: prev_hash is not the hash of seq {seq - 1}")
                break
            if r["slot"] != slot_of(stream) or stream_of(r["envelope"]) != stream:
                errors.append(f"{stream} seq {seq}: slot or stream does not match the envelope")
                break
            if link(prev, stream, seq, r["slot"], r["envelope"]) != r["hash"]:
                errors.append(f"{stream} seq {seq}: hash does not match its canonical bytes")
                break
            prev = r["hash"]
    out = {
        "lines": lines,
        "duplicates": duplicates,
        "streams": {s: max(seqs) for s, seqs in by_stream.items()},
        "ids": sorted(r["envelope"]["id"] for seqs in by_stream.values() for r in seqs.values()),
        "errors": errors[:10],
    }
    return out, not errors


def cmd_dedup(data_dir):
    """§10: every dedup checkpoint in the data directory, checked (magic, CRC) and decoded."""
    files, entries, errors = [], [], []
    for name in sorted(os.listdir(data_dir)):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "dedup" or not all(len(p) == 20 and p.isdigit() for p in parts[1:]):
            continue
        with open(os.path.join(data_dir, name), "rb") as f:
            data = f.read()
        if data[:8] != b"SGDEDUP1" or zlib.crc32(data[12:]) != struct.unpack_from("<I", data, 8)[0]:
            errors.append(f"{name}: bad magic or CRC")
            continue
        body = unpack(data[12:])
        files.append({"name": name, "first_kept_segment": int(parts[1]), "written_ms": int(parts[2]), "entries": len(body["entries"])})
        for e in body["entries"]:
            tenant, _, ident = e["key"].partition("\0")
            entries.append({"tenant": tenant, "id": ident, "segment": e["position"]["segment"], "offset": e["position"]["offset"], "slot": e["slot"], "accepted_ms": e["accepted_ms"]})
    return {"files": files, "entries": entries, "errors": errors}, not errors


def main(argv):
    commands = {
        "dump": cmd_dump,
        "verify-spool": cmd_verify_spool,
        "verify-sink": cmd_verify_sink,
        "dedup": cmd_dedup,
    }
    if len(argv) != 3 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    out, ok = commands[argv[1]](argv[2])
    json.dump(out, sys.stdout, sort_keys=True, default=lambda b: b.hex())
    print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
