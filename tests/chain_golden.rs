//! Golden chain vector: the canonical bytes and hashes of spool-format.md §8, recomputed with
//! the library. If this fails, either the chain's byte layout changed (a format change: bump the
//! version and update the contract) or the document is wrong.

mod common;

use spoolgate::chain::{canonical_bytes, link, verify_jsonl, Chains, GENESIS};
use spoolgate::envelope::{Envelope, Priority, ENVELOPE_VERSION};

/// The two gated envelopes of stream "acme" that §8 chains.
fn documented_envelopes() -> [Envelope; 2] {
    let first = Envelope {
        version: ENVELOPE_VERSION,
        id: "c1".into(),
        source: "svc".into(),
        tenant: Some("acme".into()),
        text: Some("hi".into()),
        text_hash: Some("8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4".into()),
        char_len: Some(2),
        tags: vec!["greeting".into()],
        ts_ms: 1_700_000_000_000,
        slot: spoolgate::slots::slot_of("acme"),
        priority: Priority::Normal,
        ..Default::default()
    };
    let second = Envelope {
        id: "c2".into(),
        tags: Vec::new(),
        ..first.clone()
    };
    [first, second]
}

/// The hex between the `golden-chain:NAME` markers of spool-format.md.
fn documented(name: &str) -> String {
    common::spec_hex(&format!("golden-chain:{name}"))
}

#[test]
fn the_gate_computes_the_text_hash_and_length_the_vector_holds() {
    let gate = spoolgate::gate::Gate::new(
        &spoolgate::config::GateConfig::default(),
        std::sync::Arc::new(spoolgate::metrics::Metrics::new()),
    )
    .unwrap();
    let [first, _] = documented_envelopes();
    let mut env = Envelope {
        text_hash: None,
        char_len: None,
        ..first.clone()
    };
    gate.classify(&mut env);
    assert_eq!(env.text_hash, first.text_hash);
    assert_eq!(env.char_len, first.char_len);
}

#[test]
fn the_documented_canonical_bytes_are_what_the_chain_hashes() {
    let [first, _] = documented_envelopes();
    let canonical = canonical_bytes("acme", 1, first.slot, &first).unwrap();
    assert_eq!(hex::encode(&canonical), documented("canonical-1"));
}

#[test]
fn the_documented_hashes_link_from_genesis() {
    let [first, second] = documented_envelopes();
    let h1 = link(
        &GENESIS,
        &canonical_bytes("acme", 1, first.slot, &first).unwrap(),
    );
    let h2 = link(
        &h1,
        &canonical_bytes("acme", 2, second.slot, &second).unwrap(),
    );
    assert_eq!(hex::encode(h1), documented("hash-1"));
    assert_eq!(hex::encode(h2), documented("hash-2"));
}

#[test]
fn sealing_the_documented_envelopes_gives_the_documented_records() {
    let [first, second] = documented_envelopes();
    let mut chains = Chains::new();
    let r1 = chains.seal(first).unwrap();
    let r2 = chains.seal(second).unwrap();
    assert_eq!((r1.stream.as_str(), r1.seq, r2.seq), ("acme", 1, 2));
    assert_eq!(r1.prev_hash, hex::encode(GENESIS));
    assert_eq!(r1.hash, documented("hash-1"));
    assert_eq!(r2.prev_hash, r1.hash);
    assert_eq!(r2.hash, documented("hash-2"));
    // The file sink's JSON lines of these records verify.
    let lines = format!(
        "{}\n{}\n",
        serde_json::to_string(&r1).unwrap(),
        serde_json::to_string(&r2).unwrap()
    );
    let summary = verify_jsonl(lines.as_bytes()).unwrap();
    assert_eq!(summary.records, 2);
}

#[test]
fn the_documented_checkpoint_is_what_sealing_the_documented_envelopes_leaves() {
    let [first, second] = documented_envelopes();
    let mut chains = Chains::new();
    chains.seal(first).unwrap();
    chains.seal(second).unwrap();
    let bytes = chains.checkpoint_bytes().unwrap();
    assert_eq!(hex::encode(&bytes), documented("heads-1"));
    let loaded = Chains::from_checkpoint_bytes(&bytes).unwrap();
    let head = loaded.head("acme").unwrap();
    assert_eq!(head.seq, 2);
    assert_eq!(hex::encode(head.hash), documented("hash-2"));
}

fn assert_documented(name: &str, bytes: &[u8]) {
    assert_eq!(
        hex::encode(bytes),
        documented(name),
        "spool-format.md's {name} differs from the encoder; current bytes:\n{}",
        common::hexdump(bytes)
    );
}

#[test]
fn the_documented_sealed_payload_is_what_the_worker_writes_for_seq_1() {
    let [first, _] = documented_envelopes();
    let at = spoolgate::spool::Position {
        segment: 1,
        offset: 64,
    };
    let mut chains = Chains::new();
    let mut writer = spoolgate::chain::SealWriter::new(1_114_112, 0);
    let record = writer.seal(&mut chains, at, first).unwrap();
    let payloads = writer.finish();
    assert_eq!(payloads.len(), 1);
    assert_documented("sealed-1", &payloads[0]);
    let batch = spoolgate::chain::SealedBatch::decode(&payloads[0]).unwrap();
    assert_eq!(batch.entries.len(), 1);
    assert_eq!(batch.entries[0].position, at);
    assert_eq!(batch.entries[0].record, record);
    assert_eq!(record.hash, documented("hash-1"));
}

#[test]
fn the_documented_tombstone_payload_is_what_the_worker_writes() {
    let positions = [(1, 64), (1, 1_048_512)]
        .map(|(segment, offset)| spoolgate::spool::Position { segment, offset });
    let bytes = spoolgate::chain::Tombstone {
        positions: positions.to_vec(),
        heads: Vec::new(),
    }
    .encode()
    .unwrap();
    assert_documented("tombstone-1", &bytes);
}

#[test]
fn the_documented_tombstone_with_a_head_is_what_the_worker_writes_after_the_vectors_batch() {
    let [first, second] = documented_envelopes();
    let mut chains = Chains::new();
    let records = [chains.seal(first).unwrap(), chains.seal(second).unwrap()];
    let positions =
        [(1, 64), (1, 512)].map(|(segment, offset)| spoolgate::spool::Position { segment, offset });
    let tombstone = spoolgate::chain::Tombstone {
        positions: positions.to_vec(),
        heads: spoolgate::chain::TombstoneHead::of_records(&records),
    };
    assert_eq!(
        tombstone.heads.len(),
        1,
        "one stream, one head: its highest seq"
    );
    assert_eq!(tombstone.heads[0].seq, 2);
    assert_eq!(tombstone.heads[0].hash, documented("hash-2"));
    let bytes = tombstone.encode().unwrap();
    assert_documented("tombstone-2", &bytes);
    assert_eq!(
        spoolgate::chain::Tombstone::decode(&bytes).unwrap(),
        tombstone
    );
}

#[test]
fn the_documented_json_line_is_what_the_file_sink_writes_for_seq_1() {
    let [first, _] = documented_envelopes();
    let record = Chains::new().seal(first).unwrap();
    let mut line = Vec::new();
    spoolgate::forward::json::write_record(&mut line, &record).unwrap();
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/spool-format.md")).unwrap();
    let (begin, end) = (
        "<!-- golden-chain:line-1:begin -->",
        "<!-- golden-chain:line-1:end -->",
    );
    let inside = &doc[doc.find(begin).expect(begin) + begin.len()..doc.find(end).expect(end)];
    let documented: Vec<&str> = inside
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("```"))
        .collect();
    assert_eq!(documented, [std::str::from_utf8(&line).unwrap()]);
}

#[test]
fn the_documented_dedup_checkpoint_is_what_compaction_writes() {
    let entry = spoolgate::ingest::dedup_file::DedupEntry {
        key: "acme\0c1".into(),
        position: spoolgate::spool::Position {
            segment: 1,
            offset: 64,
        },
        slot: spoolgate::slots::slot_of("acme"),
        accepted_ms: 1_700_000_000_000,
    };
    let bytes = spoolgate::ingest::dedup_file::encode(std::slice::from_ref(&entry)).unwrap();
    assert_documented("dedup-1", &bytes);
    assert_eq!(
        spoolgate::ingest::dedup_file::decode(&bytes).unwrap(),
        vec![entry]
    );
}

#[test]
fn the_documented_checkpoint_with_first_kept_is_what_compaction_writes() {
    let [first, second] = documented_envelopes();
    let mut chains = Chains::new();
    chains.seal(first).unwrap();
    chains.seal(second).unwrap();
    chains.first_kept = Some(7);
    let bytes = chains.checkpoint_bytes().unwrap();
    assert_documented("heads-2", &bytes);
    // The same heads as the checkpoint without it: only the trailing uint differs.
    let without = hex::decode(documented("heads-1")).unwrap();
    assert_eq!(bytes[12..bytes.len() - 1], without[12..]);
    let loaded = Chains::from_checkpoint_bytes(&bytes).unwrap();
    assert_eq!(loaded.first_kept, Some(7));
    assert_eq!(loaded.head("acme").unwrap().seq, 2);
    // A checkpoint without it (the form before 2026-12-04) reads as None.
    assert_eq!(
        Chains::from_checkpoint_bytes(&without).unwrap().first_kept,
        None
    );
}
