//! `spoolgate verify DATA_DIR`: the chain evidence in a spool's seals and its `chain-heads`
//! checkpoint, checked as spool-format.md §8 states it. Spools are built here through the
//! library (envelopes appended, batches sealed with a `SealWriter` from chosen heads), so each
//! test can lay out exactly the seals and checkpoint it is about.

mod spool_common;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use spoolgate::chain::{
    verify_spool, ChainHead, Chains, SealWriter, SealedBatch, VerifyError, GENESIS,
};
use spoolgate::envelope::{Envelope, ENVELOPE_VERSION};
use spoolgate::slots::slot_of;
use spoolgate::spool::{Position, RecordKind, Spool, SpoolOptions};

/// A data directory: `spool/` with room for a few seals per segment, `chain-heads` beside it.
struct DataDir {
    dir: tempfile::TempDir,
    spool: Spool,
    /// Heads as sealing assigns them, so consecutive calls to `seal` continue each stream.
    chains: Chains,
}

/// The options of a `DataDir`'s spool, in the data directory `dir`.
fn spool_options(dir: &Path) -> SpoolOptions {
    SpoolOptions {
        segment_bytes_max: 64 * 1024,
        record_bytes_max: 16 * 1024,
        commit_batch_bytes_max: 64 * 1024,
        ..spool_common::options(&dir.join("spool"))
    }
}

/// `spoolgate inspect` on the data directory `dir`: its exit code and its output, as text or
/// (with `json`) as JSON text.
fn inspect(dir: &Path, json: bool) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spoolgate"));
    command.arg("inspect").arg(dir);
    if json {
        command.arg("--json");
    }
    let out = spool_common::output(&mut command);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The sum over the segments of an `inspect --json` report of the count named `key`.
fn segments_total(report: &serde_json::Value, key: &str) -> u64 {
    report["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[key].as_u64().unwrap())
        .sum()
}

impl DataDir {
    fn new() -> DataDir {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, _) = spool_common::open(&spool_options(dir.path()));
        DataDir {
            dir,
            spool,
            chains: Chains::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Appends a durable tombstone naming `positions`.
    fn tombstone(&mut self, positions: Vec<Position>) {
        let tombstone = spoolgate::chain::Tombstone {
            positions,
            heads: vec![],
        };
        self.spool
            .append_blocking(
                vec![(
                    RecordKind::TOMBSTONE,
                    Bytes::from(tombstone.encode().unwrap()),
                )],
                true,
            )
            .unwrap();
    }

    /// Appends one envelope per id of `stream` and one seal holding them all, continuing the
    /// stream from its current head. Returns the first envelope's position.
    fn seal(&mut self, stream: &str, ids: &[&str]) -> Position {
        let mut writer = SealWriter::new(16 * 1024, 4096);
        let mut first = None;
        for id in ids {
            let envelope = Envelope {
                version: ENVELOPE_VERSION,
                id: (*id).into(),
                source: "svc".into(),
                tenant: Some(stream.into()),
                text: Some(format!("Text of {id}.")),
                ts_ms: 1_700_000_000_000,
                slot: slot_of(stream),
                ..Default::default()
            };
            let position = self
                .spool
                .append_blocking(
                    vec![(
                        RecordKind::ENVELOPE,
                        Bytes::from(envelope.encode().unwrap()),
                    )],
                    false,
                )
                .unwrap()[0];
            first.get_or_insert(position);
            writer.seal(&mut self.chains, position, envelope).unwrap();
        }
        let seals = writer
            .finish()
            .into_iter()
            .map(|p| (RecordKind::SEALED, p))
            .collect();
        self.spool.append_blocking(seals, true).unwrap();
        first.expect("at least one id")
    }

    /// Starts `stream` over from `head`, as if the seals before it had been compacted away.
    fn continue_from(&mut self, stream: &str, head: ChainHead) {
        self.chains.restore(stream, Some(head));
    }

    fn save_checkpoint(&self, heads: &[(&str, ChainHead)]) {
        let mut chains = Chains::new();
        for (stream, head) in heads {
            chains.restore(stream, Some(*head));
        }
        chains
            .save(&self.path().join(spoolgate::daemon::CHAIN_HEADS_FILE))
            .unwrap();
    }

    fn head(&self, stream: &str) -> ChainHead {
        self.chains.head(stream).unwrap()
    }
}

/// The reason of a `Broken` report, with its stream and seq.
fn broken(
    result: Result<spoolgate::chain::SpoolVerifySummary, VerifyError>,
) -> (String, u64, String) {
    match result {
        Err(VerifyError::Broken {
            stream,
            seq,
            reason,
            ..
        }) => (stream, seq, reason),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[test]
fn seals_of_several_streams_from_seq_1_verify_without_a_checkpoint() {
    let mut d = DataDir::new();
    d.seal("acme", &["a1", "a2"]);
    d.seal("globex", &["g1"]);
    d.seal("acme", &["a3"]);
    let summary = verify_spool(d.path()).unwrap();
    assert_eq!(
        (
            summary.streams,
            summary.sealed_records,
            summary.checkpointed_streams
        ),
        (2, 4, 0)
    );
    // The spool directory itself names the same spool.
    assert_eq!(verify_spool(&d.path().join("spool")).unwrap(), summary);
}

#[test]
fn seals_that_start_past_seq_1_need_a_checkpoint_that_links_to_them() {
    let mut d = DataDir::new();
    let compacted = ChainHead {
        seq: 7,
        hash: [7; 32],
    };
    d.continue_from("acme", compacted);
    d.seal("acme", &["a8", "a9"]);
    let (stream, seq, reason) = broken(verify_spool(d.path()));
    assert_eq!((stream.as_str(), seq), ("acme", 8));
    assert!(reason.contains("no checkpoint head"), "{reason}");

    d.save_checkpoint(&[("acme", compacted)]);
    assert_eq!(verify_spool(d.path()).unwrap().sealed_records, 2);

    d.save_checkpoint(&[(
        "acme",
        ChainHead {
            seq: 7,
            hash: [8; 32],
        },
    )]);
    let (_, seq, reason) = broken(verify_spool(d.path()));
    assert_eq!(seq, 8);
    assert!(
        reason.contains("does not link to the checkpoint's head at seq 7"),
        "{reason}"
    );
}

#[test]
fn a_checkpoint_ahead_of_the_seals_in_the_spool_is_a_gap() {
    let mut d = DataDir::new();
    d.seal("acme", &["a1", "a2"]);
    let two = d.head("acme");
    // The head a restart would continue from if the checkpoint named a seal that never
    // became durable: seq 3, which no seal in the spool holds.
    d.save_checkpoint(&[(
        "acme",
        ChainHead {
            seq: 3,
            hash: [3; 32],
        },
    )]);
    let (stream, seq, reason) = broken(verify_spool(d.path()));
    assert_eq!((stream.as_str(), seq), ("acme", 3));
    assert!(
        reason.contains(
            "the checkpoint's head is seq 3, but this stream's seals in the spool end at seq 2"
        ),
        "{reason}"
    );
    // A checkpoint at a seal still in the spool agrees with it.
    d.save_checkpoint(&[("acme", two)]);
    assert_eq!(verify_spool(d.path()).unwrap().checkpointed_streams, 1);
}

#[test]
fn a_sequence_number_skipped_or_sealed_twice_is_reported_at_the_seal() {
    let mut d = DataDir::new();
    d.seal("acme", &["a1"]);
    let one = d.head("acme");
    d.continue_from(
        "acme",
        ChainHead {
            seq: 2,
            hash: one.hash,
        },
    );
    d.seal("acme", &["a3"]);
    let (_, seq, reason) = broken(verify_spool(d.path()));
    assert_eq!(seq, 3);
    assert!(
        reason.contains("gap: the previous seal of this stream is seq 1"),
        "{reason}"
    );

    let mut d = DataDir::new();
    d.seal("acme", &["a1", "a2"]);
    d.continue_from(
        "acme",
        ChainHead {
            seq: 0,
            hash: GENESIS,
        },
    );
    let again = d.seal("acme", &["again"]);
    let (_, seq, reason) = broken(verify_spool(d.path()));
    assert_eq!(seq, 1);
    assert!(reason.starts_with("sealed again"), "{reason}");

    // Unless a poisoned writer refused that range (a void marker from the envelope on):
    // recovery drops it, and so does verify.
    std::fs::write(
        d.path()
            .join("spool")
            .join(format!("void-{:020}-{:020}", again.segment, again.offset)),
        b"",
    )
    .unwrap();
    assert_eq!(verify_spool(d.path()).unwrap().sealed_records, 2);
}

#[test]
fn a_sealed_entry_whose_text_changed_fails_its_hash() {
    let mut d = DataDir::new();
    d.seal("acme", &["a1"]);
    // The seal read back, one text changed, and appended as a later seal of a fresh spool
    // whose envelopes are the same: the hash no longer covers the record.
    let mut reader = d.spool.reader(d.spool.first_position());
    let mut sealed = None;
    while let Some(r) = reader.next_record().unwrap() {
        if r.kind == RecordKind::SEALED {
            sealed = Some(SealedBatch::decode(&r.payload).unwrap());
        }
    }
    let mut batch = sealed.unwrap();
    batch.entries[0].record.envelope.text = Some("Text of a2.".into());
    let other = DataDir::new();
    other
        .spool
        .append_blocking(
            vec![(RecordKind::SEALED, Bytes::from(batch.encode().unwrap()))],
            true,
        )
        .unwrap();
    let (_, seq, reason) = broken(verify_spool(other.path()));
    assert_eq!(seq, 1);
    assert!(reason.contains("hash does not match"), "{reason}");
}

#[test]
fn the_command_verifies_a_data_directory_and_exits_non_zero_naming_the_break() {
    let mut d = DataDir::new();
    d.seal("acme", &["a1", "a2"]);
    let run = |path: &Path| {
        let out = spool_common::output(
            Command::new(env!("CARGO_BIN_EXE_spoolgate"))
                .arg("verify")
                .arg(path),
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = run(d.path());
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ok: spool seals of 1 stream(s), 2 sealed record(s), 0 checkpointed head(s)"),
        "{text}"
    );
    d.save_checkpoint(&[(
        "acme",
        ChainHead {
            seq: 5,
            hash: [5; 32],
        },
    )]);
    let (code, text) = run(d.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("BROKEN: stream \"acme\" seq 5") && text.contains("chain-heads"),
        "{text}"
    );
    // A path that cannot be read is not a broken chain.
    let (code, text) = run(&d.path().join("no-such-file.jsonl"));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("cannot verify"), "{text}");
}

#[test]
fn a_damaged_envelope_frame_is_listed_by_inspect_and_left_unchecked_by_verify() {
    let mut d = DataDir::new();
    let first = d.seal("acme", &["a1", "a2"]);
    // One byte inside the first envelope's payload: its CRC fails, the seal after it holds.
    let segment = d
        .path()
        .join("spool")
        .join(format!("{:020}.seg", first.segment));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[first.offset as usize + 20] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    let summary = verify_spool(d.path()).unwrap();
    assert_eq!((summary.sealed_records, summary.damaged_ranges), (2, 1));
    let (code, text) = inspect(d.path(), false);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("DAMAGED offset {}", first.offset)),
        "{text}"
    );
}

#[test]
fn inspect_counts_in_each_segment_the_envelopes_no_tombstone_names() {
    let mut d = DataDir::new();
    let acme = d.seal("acme", &["a1", "a2", "a3"]);
    d.seal("beta", &["b1", "b2"]);
    // One of acme's envelopes is confirmed; a tombstone naming a position that holds no
    // envelope completes nothing.
    d.tombstone(vec![
        acme,
        Position {
            segment: acme.segment,
            offset: 8,
        },
    ]);
    let (_, json) = inspect(d.path(), true);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(segments_total(&report, "pending_envelopes"), 4, "{report}");
    let (_, text) = inspect(d.path(), false);
    assert!(text.contains("pending=4"), "{text}");
}

#[test]
fn inspect_counts_a_sealed_envelope_whose_frame_is_damaged_as_pending_as_a_start_does() {
    let mut d = DataDir::new();
    let lost = d.seal("acme", &["a1"]);
    d.seal("acme", &["a2"]);
    let delivered = d.seal("acme", &["a3"]);
    d.tombstone(vec![delivered]);
    // One byte inside the payloads of a1 (sealed, not tombstoned: an orphan, which the next
    // start re-sends from its seal) and of a3 (tombstoned: delivered, pending no more). The
    // seals after them hold.
    let segment = d
        .path()
        .join("spool")
        .join(format!("{:020}.seg", lost.segment));
    let mut bytes = std::fs::read(&segment).unwrap();
    for at in [lost, delivered] {
        bytes[at.offset as usize + 20] ^= 0xff;
    }
    std::fs::write(&segment, &bytes).unwrap();

    let (code, json) = inspect(d.path(), true);
    assert_eq!(code, Some(1), "damaged ranges are listed");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    // a1 (the orphan) and a2 (sealed, intact); a3 is tombstoned.
    assert_eq!(segments_total(&report, "pending_envelopes"), 2, "{report}");
    assert_eq!(segments_total(&report, "orphan_envelopes"), 1, "{report}");
    let (_, text) = inspect(d.path(), false);
    assert!(text.contains("pending=2 orphans=1"), "{text}");

    // The daemon's start-up scan, on the spool reopened as a restart would, decides the same.
    let DataDir { dir, spool, .. } = d;
    spool.close().unwrap();
    drop(spool);
    let (spool, _, _) = spool_common::open(&spool_options(dir.path()));
    let ledger = spoolgate::forward::ledger::Ledger::default();
    let summary =
        spoolgate::forward::ledger::scan(&spool, &ledger, 0, |_, _| {}, |_, _| {}).unwrap();
    assert_eq!((summary.pending, summary.orphans), (2, 1), "{summary:?}");
}
