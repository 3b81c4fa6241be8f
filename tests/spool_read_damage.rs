//! Damage that appears after recovery, met by a reader of the open spool (a disk that goes bad
//! under a running daemon): the reader skips to the next valid frame, loses only the records
//! the damage touched, and counts what it skipped in `spoolgate_spool_read_damaged_*`.

mod spool_common;

use std::os::unix::fs::FileExt;

use bytes::Bytes;
use spool_common::*;
use spoolgate::spool::{Position, RecordKind, Spool};

/// Appends records `from..to` in batches of 50 (one fdatasync each); their positions.
fn append_range(s: &Spool, from: u64, to: u64) -> Vec<Position> {
    let mut positions = Vec::new();
    let numbers: Vec<u64> = (from..to).collect();
    for chunk in numbers.chunks(50) {
        let records: Vec<(RecordKind, Bytes)> = chunk
            .iter()
            .map(|&n| (RecordKind::ENVELOPE, payload(n)))
            .collect();
        positions.extend(s.append_blocking(records, false).expect("append"));
    }
    positions
}

fn segment_path(dir: &std::path::Path, id: u64) -> std::path::PathBuf {
    dir.join(format!("{id:020}.seg"))
}

#[test]
fn a_byte_flipped_after_recovery_costs_a_reader_only_the_record_it_lands_in_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let (s, _, metrics) = open(&opts);
    let positions = append_range(&s, 0, 10);
    assert!(positions.iter().all(|p| p.segment == 1));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(dir.path(), 1))
        .unwrap();
    // A payload byte of record 4: its CRC no longer holds.
    file.write_at(&[0xff], positions[4].offset + 20).unwrap();

    let expected: Vec<u64> = (0..10).filter(|&n| n != 4).collect();
    assert_eq!(read_all(&s), expected);
    assert_eq!(metrics.spool_read_damaged_ranges_total.get(), 1);
    assert_eq!(
        metrics.spool_read_damaged_bytes_total.get(),
        positions[5].offset - positions[4].offset
    );
}

#[test]
fn a_damaged_range_longer_than_the_read_window_is_crossed_window_by_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.segment_bytes_max = 2 << 20;
    opts.commit_batch_bytes_max = 64 * 1024;
    let (s, _, metrics) = open(&opts);
    let positions = append_range(&s, 0, 12_000);
    let last_in_first = positions.iter().filter(|p| p.segment == 1).count();
    // Zero from record 100 to the first record more than three read windows (256 KiB each)
    // further on: a reader must look past several windows to find a frame again.
    let from = positions[100].offset;
    let resume = positions
        .iter()
        .position(|p| p.segment == 1 && p.offset > from + 3 * 256 * 1024 + 1000)
        .expect("the first segment reaches past the damage");
    assert!(resume < last_in_first);
    let to = positions[resume].offset;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(dir.path(), 1))
        .unwrap();
    file.write_at(&vec![0u8; (to - from) as usize], from)
        .unwrap();

    let expected: Vec<u64> = (0..12_000)
        .filter(|&n| !(100..resume as u64).contains(&n))
        .collect();
    assert_eq!(read_all(&s), expected);
    assert_eq!(metrics.spool_read_damaged_ranges_total.get(), 1);
    assert_eq!(metrics.spool_read_damaged_bytes_total.get(), to - from);
}

/// A payload of `len` bytes that names its number.
fn sized(n: u64, len: usize) -> Vec<u8> {
    let mut p = format!("record-{n:06}-").into_bytes();
    p.resize(len, b'x');
    p
}

#[test]
fn a_frame_planted_in_a_record_that_crosses_the_read_window_does_not_hide_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.segment_bytes_max = 1 << 20;
    opts.record_bytes_max = 64 * 1024;
    opts.commit_batch_bytes_max = 128 * 1024;
    let (s, _, metrics) = open(&opts);
    let one = |p: Vec<u8>| {
        s.append_blocking(vec![(RecordKind::ENVELOPE, Bytes::from(p))], false)
            .expect("append")[0]
    };
    one(sized(0, 100));
    // The damage starts at record 1. A reader that meets it reads from 8 bytes past it, one
    // window of 256 KiB at a time; `window_end` is where its first window ends.
    let at = one(sized(1, 4000));
    let window_end = at.offset + 8 + 256 * 1024;
    let mut n = 2;
    let mut next = at.offset + spoolgate::spool::format::frame_len(4000);
    while next < window_end - 40_000 {
        let p = one(sized(n, 4000));
        next = p.offset + spoolgate::spool::format::frame_len(4000);
        n += 1;
    }
    // The record the reader must find again: it starts inside the first window and ends past
    // it, and its payload holds a whole valid frame (of a record numbered 999999), which lies
    // wholly inside the window.
    let mut big = sized(n, 16);
    spoolgate::spool::format::encode_frame(RecordKind::ENVELOPE.0, &sized(999_999, 100), &mut big);
    big.resize(60_000, b'x');
    let big_at = one(big);
    assert_eq!(big_at.segment, 1);
    assert!(big_at.offset < window_end);
    assert!(big_at.offset + spoolgate::spool::format::frame_len(60_000) > window_end);
    one(sized(n + 1, 100));
    one(sized(n + 2, 100));

    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(dir.path(), 1))
        .unwrap();
    file.write_at(&vec![0u8; (big_at.offset - at.offset) as usize], at.offset)
        .unwrap();

    let expected = vec![0, n, n + 1, n + 2];
    assert_eq!(read_all(&s), expected, "the running reader");
    assert_eq!(metrics.spool_read_damaged_ranges_total.get(), 1);
    assert_eq!(
        metrics.spool_read_damaged_bytes_total.get(),
        big_at.offset - at.offset
    );
    drop(s);
    let (s, _, _) = open(&opts);
    assert_eq!(read_all(&s), expected, "recovery");
}

#[test]
fn a_frame_planted_in_a_payload_is_not_taken_for_a_record_when_the_damage_is_its_carrier() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.segment_bytes_max = 1 << 20;
    let (s, _, metrics) = open(&opts);
    let one = |p: Vec<u8>| {
        s.append_blocking(vec![(RecordKind::ENVELOPE, Bytes::from(p))], false)
            .expect("append")[0]
    };
    one(sized(0, 100));
    // Record 1 carries, at an aligned offset of the segment, a whole valid frame of a record
    // numbered 999999 (as a client's `meta` could, in numbers or binary values).
    let mut carrier = sized(1, 16);
    spoolgate::spool::format::encode_frame(
        RecordKind::ENVELOPE.0,
        &sized(999_999, 100),
        &mut carrier,
    );
    carrier.resize(400, b'x');
    let at = one(carrier);
    one(sized(2, 100));
    // Its header damaged: readers must skip to record 2, not to the frame inside it.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(dir.path(), 1))
        .unwrap();
    file.write_at(&[0xff], at.offset + 5).unwrap();

    assert_eq!(read_all(&s), vec![0, 2], "the running reader");
    assert_eq!(metrics.spool_read_damaged_ranges_total.get(), 1);
    drop(s);
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 2], "recovery");
    assert_eq!(report.damaged.len(), 1);
}
