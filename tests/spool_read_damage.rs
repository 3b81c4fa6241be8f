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
