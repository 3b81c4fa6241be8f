//! spool-format.md says a reader in another language needs nothing else to read segments and
//! verify chains. `tests/reference/spoolread.py` is such a reader: Python's standard library
//! only, written from the spec. These tests run it on the spec's own vectors and on a spool and
//! sink output the daemon wrote, and hold its findings equal to spoolgate's. Where the spec is
//! wrong or silent about something the code does, the reader disagrees and a test fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const READER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/spoolread.py");

/// Runs the reference reader; returns whether its checks passed and what it printed.
fn spoolread(command: &str, path: &Path) -> (bool, Value) {
    let out = Command::new("python3")
        .arg(READER)
        .arg(command)
        .arg(path)
        .output()
        .expect("python3 runs (the reference reader needs Python 3.8 or later)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "the reader printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), value)
}

/// `spoolgate verify PATH`, spoolgate's own verdict beside the reference reader's.
fn own_verify(path: impl AsRef<Path>) -> std::process::Output {
    Command::new(bin())
        .arg("verify")
        .arg(path.as_ref())
        .output()
        .unwrap()
}

/// The bytes of a hexdump between spool-format.md's `NAME` markers.
fn spec_bytes(name: &str) -> Vec<u8> {
    let hex = spec_hex(name);
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The first record's JSON line, as §8 prints it.
fn spec_json_line() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/spool-format.md")).unwrap();
    let start = doc.find("```json\n").expect("the JSON line") + "```json\n".len();
    doc[start..].lines().next().unwrap().to_string()
}

#[test]
fn the_reference_reader_decodes_the_golden_segment_of_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("00000000000000000001.seg"),
        spec_bytes("golden-segment"),
    )
    .unwrap();
    let (ok, out) = spoolread("dump", dir.path());
    assert!(ok, "{out}");
    assert_eq!(
        out["segments"],
        json!([{"id": 1, "records": 3, "damaged": [], "header": {
            "valid": true, "version": 2, "id": 1, "created_ms": 1_700_000_000_000u64, "segment_bytes_max": 1_048_576,
            "record_bytes_max": 1_114_112}}])
    );
    assert_eq!(
        out["records"],
        json!([
            {"segment": 1, "offset": 64, "kind": "envelope", "payload": {"version": 1, "id": "a1",
             "source": "svc", "text": "hi", "ts_ms": 1_700_000_000_000u64, "slot": 1005, "priority": "normal"}},
            {"segment": 1, "offset": 160, "kind": "envelope", "payload": {"version": 1, "id": "a2",
             "source": "svc", "tenant": "acme", "ts_ms": 1_700_000_000_000u64, "slot": 527, "priority": "high"}},
            // Stored stuffed: its `meta` value -9 is the byte 0xF7.
            {"segment": 1, "offset": 256, "kind": "envelope", "payload": {"version": 1, "id": "a3",
             "source": "svc", "ts_ms": 1_700_000_000_000u64, "meta": {"n": -9}, "slot": 1005, "priority": "normal"}},
        ])
    );
}

#[test]
fn the_reference_reader_decodes_the_specs_sealed_tombstone_and_dedup_vectors() {
    // The golden segment with the sealed and tombstone payloads of §8 framed after its three
    // envelopes (at 352), and the dedup checkpoint of §10 in the data directory.
    let dir = tempfile::tempdir().unwrap();
    let mut segment = spec_bytes("golden-segment");
    assert_eq!(segment.len(), 352);
    spoolgate::spool::format::encode_frame(2, &spec_bytes("golden-chain:sealed-1"), &mut segment);
    spoolgate::spool::format::encode_frame(
        3,
        &spec_bytes("golden-chain:tombstone-1"),
        &mut segment,
    );
    spoolgate::spool::format::encode_frame(
        3,
        &spec_bytes("golden-chain:tombstone-2"),
        &mut segment,
    );
    std::fs::write(dir.path().join("00000000000000000001.seg"), &segment).unwrap();
    let (ok, out) = spoolread("dump", dir.path());
    assert!(ok, "{out}");
    let records = out["records"].as_array().unwrap();
    assert_eq!(records.len(), 6, "{out}");
    assert_eq!(records[3]["kind"], "sealed");
    let entry = &records[3]["payload"]["entries"][0];
    assert_eq!(entry["position"], json!({"segment": 1, "offset": 64}));
    assert_eq!(entry["record"]["seq"], 1);
    assert_eq!(entry["record"]["hash"], spec_hex("golden-chain:hash-1"));
    assert_eq!(entry["record"]["envelope"]["tags"], json!(["greeting"]));
    assert_eq!(records[4]["kind"], "tombstone");
    assert_eq!(
        records[4]["payload"],
        json!({"positions": [{"segment": 1, "offset": 64}, {"segment": 1, "offset": 1_048_512}]})
    );
    assert_eq!(
        records[5]["payload"],
        json!({"positions": [{"segment": 1, "offset": 64}, {"segment": 1, "offset": 512}],
               "heads": [{"stream": "acme", "seq": 2, "hash": spec_hex("golden-chain:hash-2")}]})
    );

    std::fs::write(
        dir.path()
            .join("dedup-00000000000000000002-00000001700000000000"),
        spec_bytes("golden-chain:dedup-1"),
    )
    .unwrap();
    let (ok, out) = spoolread("dedup", dir.path());
    assert!(ok, "{out}");
    assert_eq!(
        out["entries"],
        json!([{"tenant": "acme", "id": "c1", "segment": 1, "offset": 64, "slot": 527,
                "accepted_ms": 1_700_000_000_000u64}])
    );
}

#[test]
fn the_reference_reader_accepts_the_specs_test_vector_and_refuses_it_with_a_changed_byte() {
    let dir = tempfile::tempdir().unwrap();
    let line = spec_json_line();
    std::fs::write(dir.path().join("a.jsonl"), format!("{line}\n")).unwrap();
    let (ok, out) = spoolread("verify-sink", dir.path());
    assert!(ok, "{out}");
    assert_eq!(out["streams"], json!({"acme": 1}));

    let changed = line.replacen("\"text\":\"hi\"", "\"text\":\"ho\"", 1);
    assert_ne!(changed, line);
    std::fs::write(dir.path().join("a.jsonl"), format!("{changed}\n")).unwrap();
    let (ok, out) = spoolread("verify-sink", dir.path());
    assert!(!ok, "a changed text must break the hash: {out}");
    assert!(
        out["errors"][0]
            .as_str()
            .unwrap()
            .contains("hash does not match"),
        "{out}"
    );
}

/// Envelopes (about 3.6 MB with their seals, so the 1 MiB segments rotate and compaction
/// deletes some) that reach every encoding rule of §5 a reader must reproduce to recompute a
/// hash: strings of each length class, small and large `ts_ms`, tenants and tenant-less
/// streams, PII masked by policy, tags and routing hints from rules, and `meta` with negative
/// and large integers, floats, nested objects, long arrays and non-ASCII keys.
fn varied_envelopes() -> Vec<Value> {
    let many_keys: serde_json::Map<String, Value> = (0..20)
        .map(|k| (format!("k{:02}", 19 - k), json!(k)))
        .collect();
    (0..240)
        .map(|i| {
            let text = match i % 4 {
                0 => format!("alpha order {i}. Mail me at user{i}@example.com please."),
                1 => "long ".repeat(6000 + i),
                2 => format!("refund {i}: card 4111 1111 1111 1111, call +1 415 555 0100."),
                _ => "é—✓ ünïcode text".repeat(3),
            };
            let priority = ["high", "normal", "low"][i % 3];
            let mut e = json!({
                "source": format!("svc-{}", i % 3),
                "id": format!("ref-{i}"),
                "text": text,
                "priority": priority,
            });
            if i % 5 != 0 {
                e["tenant"] = json!(format!("tenant-{}", i % 4));
            }
            if i % 7 == 0 {
                e["ts_ms"] = json!(i);
            }
            if i % 2 == 0 {
                e["meta"] = json!({
                    "zeta": -1, "alpha": -200, "big": u64::MAX, "neg": -5_000_000_000i64,
                    "ratio": 0.25, "exp": 1e300, "nested": {"b": [1, 2, {"z": null, "a": true}], "a": "x"},
                    "list": (0..20).collect::<Vec<_>>(), "many": many_keys.clone(), "ключ": "значение",
                });
            }
            e
        })
        .collect()
}

#[test]
fn the_reference_reader_verifies_the_spool_and_the_sink_output_the_daemon_wrote() {
    let scratch = tempfile::tempdir().unwrap();
    let rules = scratch.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"a\"\nkeywords = [\"alpha\"]\ntags = [\"first\", \"a-tag\"]\n\
         intent = \"greeting\"\nrouting = { team = \"one\", area = \"two\" }\n\
         [[rule]]\nname = \"r\"\nkeywords = [\"refund\"]\ntags = [\"money\"]\nlane = \"high\"\n",
    )
    .unwrap();
    let rules_set = format!("gate.rules_path=\"{}\"", rules.display());
    let mut args: Vec<&str> = SMALL_SEGMENTS.to_vec();
    args.extend(["--set", "gate.pii_default=\"mask\"", "--set", &rules_set]);
    let mut d = Daemon::start_in(&scratch.path().join("data"), &args, &[]);
    let envelopes = varied_envelopes();
    for chunk in envelopes.chunks(10) {
        let r = d.post_json(&json!(chunk));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    d.wait_metric("spoolgate_tombstones_written_total", |v| {
        v >= envelopes.len() as f64
    });
    // Compaction must have deleted segments, seals among them, so that the spool's chains
    // continue from the `chain-heads` checkpoint.
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 1.0);
    assert_eq!(d.terminate().code(), Some(0));

    let (ok, sink) = spoolread("verify-sink", &d.data_dir.join("out"));
    assert!(ok, "the reference reader refuses the sink output: {sink}");
    let mut posted: Vec<String> = envelopes
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    posted.sort();
    assert_eq!(sink["ids"], json!(posted));
    // spoolgate's own verifier agrees on the same output.
    let own = own_verify(d.data_dir.join("out"));
    assert!(own.status.success(), "{own:?}");

    let (ok, spool) = spoolread("verify-spool", &d.data_dir);
    assert!(
        ok,
        "the reference reader refuses the spool's seals: {spool}"
    );
    assert_eq!(spool["pending"], json!(0), "{spool}");
    // Every stream's head, from the seals still in the spool and the checkpoint, is where the
    // sink output ends.
    assert_eq!(spool["streams"], sink["streams"], "{spool}\n{sink}");
    let own = own_verify(&d.data_dir);
    assert!(own.status.success(), "{own:?}");
    // The dedup checkpoints compaction wrote (§10) name envelopes of deleted segments, each
    // with its tenant, id and slot as delivered.
    let (ok, dedup) = spoolread("dedup", &d.data_dir);
    assert!(ok, "{dedup}");
    let delivered: std::collections::HashMap<String, Value> = file_sink_records(&d.data_dir)
        .into_iter()
        .map(|r| (r["envelope"]["id"].as_str().unwrap().to_string(), r))
        .collect();
    let first_kept = std::fs::read_dir(d.data_dir.join("spool"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".seg")?.parse::<u64>().ok()
        })
        .min()
        .unwrap();
    let entries = dedup["entries"].as_array().unwrap();
    assert!(!entries.is_empty(), "{dedup}");
    for e in entries {
        let r = &delivered[e["id"].as_str().unwrap()];
        let tenant = r["envelope"]["tenant"].as_str().unwrap_or("");
        assert_eq!(e["tenant"], tenant, "{e}");
        assert_eq!(e["slot"], r["slot"], "{e}");
        assert!(e["segment"].as_u64().unwrap() < first_kept, "{e}");
    }
    // A checkpoint with a byte changed fails its CRC: both readers refuse it.
    let heads_path = d.data_dir.join("chain-heads");
    let intact = std::fs::read(&heads_path).unwrap();
    assert_eq!(&intact[..8], b"SGHEADS1");
    let mut damaged = intact.clone();
    *damaged.last_mut().unwrap() ^= 0x01;
    std::fs::write(&heads_path, &damaged).unwrap();
    let (ok, spool) = spoolread("verify-spool", &d.data_dir);
    assert!(!ok, "{spool}");
    assert!(spool.to_string().contains("CRC mismatch"), "{spool}");
    let own = own_verify(&d.data_dir);
    assert!(!own.status.success(), "{own:?}");
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("CRC mismatch")
            || String::from_utf8_lossy(&own.stdout).contains("CRC mismatch"),
        "{own:?}"
    );
    // Without the checkpoint, the seals left after compaction no longer start at seq 1: both
    // readers must say so.
    std::fs::remove_file(&heads_path).unwrap();
    let (ok, spool) = spoolread("verify-spool", &d.data_dir);
    assert!(!ok, "{spool}");
    let own = own_verify(&d.data_dir);
    assert!(!own.status.success(), "{own:?}");
    let masked = file_sink_records(&d.data_dir).iter().any(|r| {
        r["envelope"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("[EMAIL]")
    });
    let tagged = file_sink_records(&d.data_dir)
        .iter()
        .any(|r| r["envelope"]["routing_hints"]["team"] == "one");
    assert!(
        masked && tagged,
        "the envelopes must reach the PII policy and the rules"
    );
}

/// One segment as both readers see it: (id, header intact, records, damaged ranges as
/// (offset, bytes), bytes of a damaged tail).
type SegmentView = (u64, bool, u64, Vec<(u64, u64)>, u64);

/// Both readers, run on `spool`, name segment `id` as the one missing and exit non-zero.
fn both_readers_name_missing(spool: &Path, id: u64) {
    let (code, inspected) = inspect_json(spool);
    assert_eq!(code, Some(1), "{inspected}");
    assert_eq!(inspected["missing_segments"], json!([[id, id]]));
    let (ok, dump) = spoolread("dump", spool);
    assert!(!ok);
    assert_eq!(dump["missing_segments"], inspected["missing_segments"]);
}

/// Replaces the directory `to` with copies of the `segments` whose id `keep` accepts.
fn copy_segments(segments: &[std::path::PathBuf], to: &Path, keep: impl Fn(u64) -> bool) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for s in segments {
        let id: u64 = s.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        if keep(id) {
            std::fs::copy(s, to.join(s.file_name().unwrap())).unwrap();
        }
    }
}

/// `spoolgate inspect SPOOL --json`: its exit code and its report.
fn inspect_json(spool: &Path) -> (Option<i32>, Value) {
    let out = Command::new(bin())
        .arg("inspect")
        .arg(spool)
        .arg("--json")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).expect("inspect --json");
    (out.status.code(), report)
}

fn views_by_inspect(spool: &Path) -> Vec<SegmentView> {
    let (_, v) = inspect_json(spool);
    v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let records = s["records"]
                .as_object()
                .unwrap()
                .values()
                .map(|n| n.as_u64().unwrap())
                .sum();
            let damaged = s["damaged"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["offset"].as_u64().unwrap() > 0 || d["records_lost"] != 0)
                .map(|d| {
                    (
                        d["offset"].as_u64().unwrap(),
                        d["len_bytes"].as_u64().unwrap(),
                    )
                })
                .collect();
            (
                s["id"].as_u64().unwrap(),
                s["header"].get("Ok").is_some(),
                records,
                damaged,
                s["tail_garbage_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn views_by_reference(spool: &Path) -> Vec<SegmentView> {
    let (_, out) = spoolread("dump", spool);
    out["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let all = s["damaged"].as_array().unwrap();
            let damaged = all
                .iter()
                .filter(|d| d.get("tail").is_none())
                .map(|d| (d["offset"].as_u64().unwrap(), d["bytes"].as_u64().unwrap()))
                .collect();
            let tail = all
                .iter()
                .filter(|d| d.get("tail").is_some())
                .map(|d| d["bytes"].as_u64().unwrap())
                .sum();
            (
                s["id"].as_u64().unwrap(),
                s["header"]["valid"] == true,
                s["records"].as_u64().unwrap(),
                damaged,
                tail,
            )
        })
        .collect()
}

/// §4's table, applied by two readers to the same damage: a seeded series of byte flips, each
/// on a fresh copy of a spool the daemon wrote, must leave both with the same records and the
/// same damaged ranges in every segment.
#[test]
fn the_reference_reader_finds_the_records_and_damage_that_spoolgate_inspect_finds() {
    let scratch = tempfile::tempdir().unwrap();
    let mut args: Vec<&str> = SMALL_SEGMENTS.to_vec();
    args.extend(["--set", "forward.enabled=false"]);
    let mut d = Daemon::start_in(&scratch.path().join("data"), &args, &[]);
    for chunk in varied_envelopes().chunks(10) {
        let r = d.post_json(&json!(chunk));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    assert_eq!(d.terminate().code(), Some(0));
    let spool = d.data_dir.join("spool");
    let segments: Vec<std::path::PathBuf> = {
        let mut s: Vec<_> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        s.sort();
        s
    };
    assert!(segments.len() >= 3, "the envelopes span several segments");
    let clean = views_by_inspect(&spool);
    assert_eq!(views_by_reference(&spool), clean);

    let mut rng = fastrand::Rng::with_seed(7);
    let copy = scratch.path().join("copy");
    let mut damaged_cases = 0;
    for _ in 0..24 {
        copy_segments(&segments, &copy, |_| true);
        let target = copy.join(segments[rng.usize(..segments.len())].file_name().unwrap());
        let mut bytes = std::fs::read(&target).unwrap();
        // Mostly inside the data, where a flip damages frames; sometimes the header.
        let data_bytes = 64 * 1024;
        let at = if rng.u8(..8) == 0 {
            rng.usize(..64)
        } else {
            rng.usize(64..data_bytes.min(bytes.len()))
        };
        bytes[at] ^= 1 << rng.u8(..8);
        std::fs::write(&target, &bytes).unwrap();
        let by_inspect = views_by_inspect(&copy);
        damaged_cases += usize::from(by_inspect != clean);
        assert_eq!(
            views_by_reference(&copy),
            by_inspect,
            "byte {at} of {} flipped",
            target.display()
        );
    }
    assert!(
        damaged_cases >= 12,
        "most flips must damage something: {damaged_cases} of 24"
    );

    // Row 9: a segment removed between two present ones. Both readers name the same missing
    // id, and both exit non-zero.
    copy_segments(&segments, &copy, |_| true);
    let gone = &segments[segments.len() / 2];
    std::fs::remove_file(copy.join(gone.file_name().unwrap())).unwrap();
    let gone_id: u64 = gone.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    both_readers_name_missing(&copy, gone_id);

    // Row 9 at the end: the segment appends had moved on to, and any prepared after it, removed.
    // Only the rotation frame ending the segment before it can tell; both readers read it.
    let (_, clean_json) = inspect_json(&spool);
    let active = clean_json["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["records"].get("rotation").is_some())
        .map(|s| s["id"].as_u64().unwrap() + 1)
        .max()
        .expect("the envelopes span several segments, so some rotated");
    copy_segments(&segments, &copy, |id| id < active);
    both_readers_name_missing(&copy, active);

    // The same segment left as a file of zeros with no header (rows 7 and 9): still missing.
    std::fs::write(copy.join(format!("{active:020}.seg")), vec![0u8; 4096]).unwrap();
    both_readers_name_missing(&copy, active);
}

#[test]
fn the_reference_reader_names_the_oldest_segments_missing_below_the_checkpoints_first_kept() {
    let data = tempfile::tempdir().unwrap();
    let spool = data.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    // The golden segment (three envelopes, no seals) as segment 3, and a checkpoint saying that
    // compaction kept segment 1 and after: segments 1 and 2 were removed by something else.
    std::fs::write(
        spool.join("00000000000000000003.seg"),
        spec_bytes("golden-segment"),
    )
    .unwrap();
    let mut heads = spoolgate::chain::Chains::new();
    heads.first_kept = Some(1);
    heads.save(&data.path().join("chain-heads")).unwrap();
    let (_, out) = spoolread("verify-spool", data.path());
    assert_eq!(out["missing_oldest_segments"], json!([1, 2]), "{out}");
    assert_eq!(out["envelopes"], 3, "{out}");

    heads.first_kept = Some(3);
    heads.save(&data.path().join("chain-heads")).unwrap();
    let (ok, out) = spoolread("verify-spool", data.path());
    assert!(ok, "{out}");
    assert_eq!(out["missing_oldest_segments"], json!([]), "{out}");
}

#[test]
fn the_reference_reader_reads_a_version_1_segment_and_refuses_broken_stuffing() {
    let dir = tempfile::tempdir().unwrap();
    let mut segment = spec_bytes("golden-segment");
    // A version 1 header (as a build from before 2026-12-04 wrote), its CRC made again.
    segment[8..10].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32fast::hash(&segment[0..60]);
    segment[60..64].copy_from_slice(&crc.to_le_bytes());
    // After the three envelopes, a frame flagged stuffed whose 0xF7 is not followed by 0x00,
    // under a matching CRC, and then a good frame.
    let stored = b"ab\xf7c";
    let at = segment.len();
    segment.extend_from_slice(&[0xF7, b'S', b'G', b'F']);
    segment.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    segment.extend_from_slice(&[1, 1, 0, 0]);
    let mut h = crc32fast::Hasher::new();
    h.update(&segment[at + 4..at + 12]);
    h.update(stored);
    segment.extend_from_slice(&h.finalize().to_le_bytes());
    segment.extend_from_slice(stored);
    segment.resize(at + 24, 0);
    spoolgate::spool::format::encode_frame(
        3,
        &spec_bytes("golden-chain:tombstone-1"),
        &mut segment,
    );
    std::fs::write(dir.path().join("00000000000000000001.seg"), &segment).unwrap();
    let (ok, out) = spoolread("dump", dir.path());
    assert!(ok, "{out}");
    assert_eq!(out["segments"][0]["records"], 4, "{out}");
    assert_eq!(
        out["segments"][0]["damaged"],
        json!([{"offset": at, "bytes": 24}]),
        "{out}"
    );
    assert_eq!(out["records"][2]["payload"]["meta"], json!({"n": -9}));
    assert_eq!(out["records"][3]["kind"], "tombstone");
}

#[test]
fn the_reference_reader_counts_a_sealed_envelope_whose_record_is_damaged_as_pending() {
    // The golden segment and the sealed entry of §8 naming its first envelope, at (1, 64),
    // whose frame marker is then damaged: an orphan, pending and re-sent from the entry.
    let data = tempfile::tempdir().unwrap();
    let spool = data.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let mut segment = spec_bytes("golden-segment");
    spoolgate::spool::format::encode_frame(2, &spec_bytes("golden-chain:sealed-1"), &mut segment);
    segment[64..68].copy_from_slice(&[0xff; 4]);
    std::fs::write(spool.join("00000000000000000001.seg"), &segment).unwrap();
    let (ok, out) = spoolread("verify-spool", data.path());
    assert!(ok, "{out}");
    assert_eq!(out["envelopes"], 2, "{out}");
    assert_eq!(out["orphans"], 1, "{out}");
    assert_eq!(out["pending"], 3, "{out}");
    assert_eq!(out["pending_sealed"], 1, "{out}");
}
