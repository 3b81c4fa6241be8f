//! Fuzzes everything that reads segment bytes: the frame scanner, recovery (which may zero a
//! torn tail and must always terminate), the reader that iterates the recovered log, and the
//! envelope, sealed and tombstone decoders applied to each payload. None may panic, whatever
//! the bytes, and the records recovery hands its visitor (the daemon's start-up scan) must be
//! the records the reader returns. Recovery runs twice, on a filesystem that reports all-zero
//! blocks as holes (which recovery skips) and on one that reports none; both must find the same
//! records and leave the segment the same.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run segment_reader fuzz/corpus/segment_reader
//! fuzz/seeds/segment_reader -- -max_total_time=600` (the seeds are real segments written by the
//! daemon: envelopes, a seal and a tombstone, and the same torn, bit-flipped and zero-padded)
//! (stable toolchains need RUSTC_BOOTSTRAP for the sanitizer flags cargo-fuzz passes).
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use spoolgate::chain::{SealedBatch, Tombstone};
use spoolgate::envelope::Envelope;
use spoolgate::metrics::Metrics;
use spoolgate::spool::format::{scan, Scanned};
use spoolgate::spool::fs::MemFs;
use spoolgate::spool::{Durability, Position, RecordKind, Spool, SpoolOptions};

const SEGMENT_BYTES_MAX: u64 = 1 << 20;
const RECORD_BYTES_MAX: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // The scanner alone: every frame it reports lies inside the input.
    let result = scan(data, RECORD_BYTES_MAX);
    for item in &result.items {
        if let Scanned::Frame {
            payload_start,
            payload_len,
            ..
        } = item
        {
            assert!(payload_start + payload_len <= data.len());
        }
    }
    assert!(result.data_end as usize <= data.len().max(64));

    if data.len() as u64 > SEGMENT_BYTES_MAX {
        return;
    }
    // Recovery and the reader, on an in-memory filesystem holding the input as segment 1: one
    // that reports every all-zero 4 KiB block as a hole (so recovery skips them) and one that
    // reports none, which must come to the same records and leave the same bytes.
    let with_holes = recover_and_read(MemFs::new(), data);
    let without_holes = recover_and_read(MemFs::without_holes(), data);
    assert!(
        with_holes == without_holes,
        "skipping holes changed what recovery found"
    );
});

/// A record as compared: position, kind, payload, next position.
type Seen = (Position, u8, Vec<u8>, Position);

/// The records a reader returns after recovery, and the segment's bytes after it; `None` when
/// the spool does not open.
fn recover_and_read(fs: MemFs, data: &[u8]) -> Option<(Vec<Seen>, Option<Vec<u8>>)> {
    let fs = Arc::new(fs);
    let dir = Path::new("/spool");
    let path = dir.join("00000000000000000001.seg");
    fs.set_bytes(&path, data.to_vec());
    let opts = SpoolOptions {
        dir: dir.to_path_buf(),
        segment_bytes_max: SEGMENT_BYTES_MAX,
        record_bytes_max: RECORD_BYTES_MAX,
        durability: Durability::Always,
        commit_batch_records_max: 16,
        commit_batch_bytes_max: 1 << 18,
        queue_depth_max: 16,
        preallocate: false,
        preallocate_zeros: false,
        zero_ahead_bytes: 4096,
        cached_behind_bytes: spoolgate::spool::CACHED_BEHIND_BYTES_DEFAULT,
        cached_unread_bytes_max: spoolgate::spool::CACHED_UNREAD_BYTES_MAX_DEFAULT,
    };
    // What recovery hands the start-up scan must be exactly what a reader returns after it.
    let mut visited: Vec<Seen> = Vec::new();
    let Ok((spool, _report)) = Spool::open_visiting(
        opts,
        Arc::new(fs.clone()),
        Arc::new(Metrics::new()),
        None,
        &mut |r| visited.push((r.position, r.kind.0, r.payload.to_vec(), r.next)),
    ) else {
        return None;
    };
    let mut reader = spool.reader(spool.first_position());
    let mut read: Vec<Seen> = Vec::new();
    while let Ok(Some(record)) = reader.next_record() {
        assert!(
            read.len() as u64 <= data.len() as u64 / 16,
            "more records than bytes allow"
        );
        match record.kind {
            RecordKind::ENVELOPE => drop(Envelope::decode(&record.payload)),
            RecordKind::SEALED => drop(SealedBatch::decode(&record.payload)),
            RecordKind::TOMBSTONE => drop(Tombstone::decode(&record.payload)),
            _ => {}
        }
        read.push((
            record.position,
            record.kind.0,
            record.payload.to_vec(),
            record.next,
        ));
    }
    assert_eq!(
        visited, read,
        "recovery visited other records than the reader returns"
    );
    drop(spool);
    Some((read, fs.bytes(&path).map(without_creation_time)))
}

/// The segment's bytes with its header's creation time and CRC zeroed: a recovery that writes a
/// header (a new segment 1 after an empty or headerless input, row 7) stamps the wall clock,
/// which differs between the two recoveries whenever they straddle a millisecond. A header the
/// input held is left alone by both, so nothing else is hidden.
fn without_creation_time(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 64 {
        bytes[24..32].fill(0);
        bytes[60..64].fill(0);
    }
    bytes
}
